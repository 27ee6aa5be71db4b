// The outer layer with X-Wing (HPKE KEM 0x647a): key configs, plain and chunked OHTTP, the
// client's choice of gateway key under the release manifest (X-Wing when pinned, no silent
// downgrade under post_quantum.require), and interop with Python's openpcc.wire.ohttp /
// chunked both ways: this client → our gateway's code, and our Python client → a JS gateway
// (the gateway side written here with @hpke/core and @hpke/hybridkem-x-wing).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { spawn, execFileSync } from 'node:child_process';
import { createClient, memoryCacheSecretStore, VerificationError } from '../src/index.js';
import { TrustPolicy, parseManifest } from '../src/attestation.js';
import { decodeRequest, encodeRequest } from '../src/bhttp.js';
import { concat, decodeVarint, encodeVarint, te, toHex, u16 } from '../src/bytes.js';
import { KEM_X25519, KEM_XWING, aesGcmKey, aesGcmSeal, hkdfExpand, hkdfExtract, hpkeSuite, xorCounter } from '../src/crypto.js';
import {
  ChunkedRequestSender, ChunkedResponseReceiver, encapsulateRequest, kemSizes, parseKeyConfig, parseKeyConfigs,
} from '../src/ohttp.js';
import { chooseKeyConfig } from '../src/client.js';
import { REPO, hex } from './helpers.js';
import { RELAY, fakeChatStack } from './fakestack.js';

const TOKEN_KEY_ID = new Uint8Array(32).fill(7);
const FINAL = te.encode('final');
const ZERO = new Uint8Array(0);

/** A manifest (not signed: its parsing and pins are what is tested) pinning `configs`. */
function policyPinning(configs, postQuantum) {
  const m = {
    format: 'openpcc-release-manifest/1', serial: 1, issued_at: 0, expires_at: 4e9, releases: {},
    ohttp_key_configs: configs.map((c) => (typeof c === 'string' ? c : toHex(c))), token_key_ids: [toHex(TOKEN_KEY_ID)],
    ...(postQuantum === undefined ? {} : { post_quantum: postQuantum }),
  };
  return new TrustPolicy(parseManifest(te.encode(JSON.stringify(m))));
}

/** A client of the fake stack (test/fakestack.js): a stub wallet, nodes as verified. */
function chatClient(stack, policy) {
  const c = createClient({
    relayUrl: RELAY, issuerUrl: 'https://issuer.example', apiKey: 'k', policy, fetch: stack.fetch,
    serialStore: null, manifestStore: null, cacheSecretStore: memoryCacheSecretStore(), k: 2, clock: () => 1_800_000_000,
  });
  c.wallet = { take: async () => ({ bytes: new Uint8Array(64), tokenKeyId: TOKEN_KEY_ID }), count: 1 };
  c.tokenKeyChecked = toHex(TOKEN_KEY_ID);
  c.verifiedNodes = async () => stack.nodes;
  return c;
}
const ask = (c) => c.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }] });

test('X-Wing key configs: 1216-byte key, parsed beside X25519, sizes per KEM', async () => {
  const stack = await fakeChatStack({ nodes: 1, kems: [KEM_XWING, KEM_X25519] });
  const [xw, x] = stack.keyConfigs;
  assert.equal(xw.length, 3 + 1216 + 2 + 4);
  const body = concat(u16(xw.length), xw, u16(x.length), x);
  const configs = parseKeyConfigs(body);
  assert.deepEqual(configs.map((c) => [c.keyId, c.kemId, c.publicKey.length]), [[7, KEM_XWING, 1216], [8, KEM_X25519, 32]]);
  assert.deepEqual(kemSizes(KEM_XWING), { npk: 1216, nenc: 1120 });
  assert.throws(() => parseKeyConfig(xw.subarray(0, 100)), /truncated/);
  assert.throws(() => parseKeyConfig(concat(xw, Uint8Array.of(0))), /length mismatch/);
  // An unknown KEM is skipped in a list, as before.
  const odd = concat(Uint8Array.of(9), u16(0x0021), new Uint8Array(56), u16(4), u16(1), u16(1));
  assert.equal(parseKeyConfigs(concat(u16(odd.length), odd, body)).length, 2);
  // Requests: hdr(7) ‖ enc(1120) ‖ ct; the header names the config's KEM.
  const { request } = await encapsulateRequest(configs[0], te.encode('x'));
  assert.equal(request.length, 7 + 1120 + 1 + 16);
  assert.deepEqual([...request.subarray(0, 7)], [7, 0x64, 0x7a, 0, 1, 0, 1]);
  const sender = await ChunkedRequestSender.create(configs[0]);
  const first = await sender.sealChunk(te.encode('abc'));
  assert.equal(first.length, 7 + 1120 + 1 + 3 + 16);
});

test('the client prefers the pinned X-Wing config, else the pinned X25519 one; chat works on both', async () => {
  const stack = await fakeChatStack({ nodes: 2, kems: [KEM_X25519, KEM_XWING] });
  const [x, xw] = stack.keyConfigs;
  // Both pinned: X-Wing, though the gateway lists X25519 first.
  const both = chatClient(stack, policyPinning([x, xw]));
  assert.equal((await both.keyConfig()).kemId, KEM_XWING);
  const answer = await ask(both);
  assert.equal(answer.choices[0].message.content, 'ok');
  assert.deepEqual(stack.outerKems, [KEM_XWING]);
  // Only X25519 pinned (an older manifest): X25519, no refusal without post_quantum.require.
  const legacy = chatClient(stack, policyPinning([x], { require: false }));
  assert.equal((await legacy.keyConfig()).kemId, KEM_X25519);
  await ask(legacy);
  assert.deepEqual(stack.outerKems, [KEM_XWING, KEM_X25519]);
  // A digest pin is as good as a value pin.
  const { sha256 } = await import('../src/crypto.js');
  const byDigest = chatClient(stack, policyPinning([x, `sha256:${toHex(await sha256(xw))}`], { require: true }));
  assert.equal((await byDigest.keyConfig()).kemId, KEM_XWING);
});

test('post_quantum.require: no X-Wing pinned, or none offered, is refused before anything is sent', async () => {
  const stack = await fakeChatStack({ nodes: 1, kems: [KEM_X25519, KEM_XWING] });
  const [x, xw] = stack.keyConfigs;
  const pinsNone = chatClient(stack, policyPinning([x], { require: true }));
  await assert.rejects(pinsNone.keyConfig(), (e) => e instanceof VerificationError && /pins none/.test(e.message));
  await assert.rejects(ask(pinsNone), VerificationError);
  // The manifest pins an X-Wing key, but this gateway offers X25519 only (a downgrade).
  const x25519Only = await fakeChatStack({ nodes: 1, kems: [KEM_X25519] });
  const [onlyX] = x25519Only.keyConfigs;
  const downgraded = chatClient(x25519Only, policyPinning([onlyX, xw], { require: true }));
  await assert.rejects(downgraded.keyConfig(), (e) => e instanceof VerificationError && /offers no X-Wing/.test(e.message));
  await assert.rejects(ask(downgraded), VerificationError);
  assert.deepEqual(stack.outerKems, []);
  assert.deepEqual(x25519Only.outerKems, [], 'nothing was sent to the gateway');
  // chooseKeyConfig alone, on parsed configs.
  const configs = parseKeyConfigs(concat(u16(x.length), x, u16(xw.length), xw));
  assert.equal((await chooseKeyConfig(configs, policyPinning([x, xw], { require: true }))).kemId, KEM_XWING);
  await assert.rejects(chooseKeyConfig(configs.slice(0, 1), policyPinning([x, xw], { require: true })), VerificationError);
});

test('manifest post_quantum is parsed strictly', () => {
  const bytes = (extra) => te.encode(JSON.stringify({
    format: 'openpcc-release-manifest/1', serial: 1, issued_at: 0, expires_at: 9, releases: {}, ohttp_key_configs: [], token_key_ids: [], ...extra,
  }));
  assert.equal(parseManifest(bytes({})).requirePostQuantum, false);
  assert.equal(parseManifest(bytes({ post_quantum: { require: true } })).requirePostQuantum, true);
  assert.equal(parseManifest(bytes({ post_quantum: {} })).requirePostQuantum, false);
  for (const bad of [{ require: 1 }, { require: 'yes' }, { require: true, prefer: true }, [], null, true]) {
    assert.throws(() => parseManifest(bytes({ post_quantum: bad })), /post_quantum/, JSON.stringify(bad));
  }
});

// ------------------------------------------------------------------ Python interop

const PY_ENV = () => ({ ...process.env, PYTHONPATH: [REPO, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) });
function havePython(t) {
  try {
    execFileSync(process.env.PYTHON || 'python3', ['-c', 'import Crypto.PublicKey.Hybrid, openpcc.wire.ohttp'], { cwd: REPO, env: PY_ENV(), stdio: 'ignore' });
    return true;
  } catch {
    t.skip('python openpcc (with pycryptodome) not importable');
    return false;
  }
}
const py = (script, input) => JSON.parse(execFileSync(process.env.PYTHON || 'python3', ['-c', script], { cwd: REPO, env: PY_ENV(), input: JSON.stringify(input) }).toString());

/** A Python process that answers one JSON line per JSON line it reads (contexts live on). */
function pySession(script) {
  const child = spawn(process.env.PYTHON || 'python3', ['-u', '-c', script], { cwd: REPO, env: PY_ENV(), stdio: ['pipe', 'pipe', 'inherit'] });
  let buf = '';
  const waiting = [];
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      waiting.shift()(JSON.parse(line));
    }
  });
  return {
    ask: (obj) => new Promise((resolve) => { waiting.push(resolve); child.stdin.write(JSON.stringify(obj) + '\n'); }),
    close: () => child.stdin.end(),
  };
}

const REQ = encodeRequest({ method: 'GET', scheme: 'https', authority: 'gateway', path: '/v1/nodes', headers: [] });
const BIG = te.encode('y'.repeat(5000));

test("this client → our gateway's code: X-Wing plain and chunked OHTTP, opened and answered by openpcc.wire", async (t) => {
  if (!havePython(t)) return;
  const key = py(`
import json
from openpcc.wire import hpke
from gateway.keys import OhttpKey
kp = hpke.generate_key_pair(kem_id=hpke.KEM_XWING)
cfg = OhttpKey(3, kp.private_key, kp.public_key, 0, None, hpke.KEM_XWING).config
print(json.dumps({'seed': kp.private_key.hex(), 'config': cfg.encode().hex()}))`, {});
  const [cfg] = parseKeyConfigs(concat(u16(key.config.length / 2), hex(key.config)));
  assert.equal(cfg.kemId, KEM_XWING);
  const plain = await encapsulateRequest(cfg, REQ);
  const sender = await ChunkedRequestSender.create(cfg);
  const chunked = concat(await sender.sealChunk(REQ.subarray(0, 10)), await sender.sealChunk(REQ.subarray(10)), await sender.sealChunk(BIG, true));
  const out = py(`
import json, sys
from openpcc.wire import hpke, ohttp
from openpcc.wire.chunked import ChunkedRequestReceiver
p = json.load(sys.stdin)
keys = {3: hpke.load_private_key(bytes.fromhex(p['seed']), kem_id=hpke.KEM_XWING)}
req, ctx = ohttp.decapsulate_request(keys, bytes.fromhex(p['plain']))
assert ctx.header.kem_id == hpke.KEM_XWING
resp = ctx.encapsulate_response(b'plain answer ' + req[:4])
r = ChunkedRequestReceiver(keys)
body = bytes.fromhex(p['chunked'])
got = []
for i in range(0, len(body), 700):  # in pieces, the enc cut across them
    got += r.receive_data(body[i:i + 700])
got += r.end_of_input()
s = r.response_sender()
chunks = s.seal_chunk(b'first') + s.seal_chunk(b'second') + s.seal_chunk(b'last', final=True)
print(json.dumps({'plain_req': req.hex(), 'chunked_req': [g.hex() for g in got], 'plain_resp': resp.hex(), 'chunked_resp': chunks.hex()}))`,
  { seed: key.seed, plain: toHex(plain.request), chunked: toHex(chunked) });
  assert.equal(out.plain_req, toHex(REQ));
  assert.deepEqual(out.chunked_req, [REQ.subarray(0, 10), REQ.subarray(10), BIG].map(toHex));
  assert.equal(new TextDecoder().decode(await plain.decapsulate(hex(out.plain_resp))), 'plain answer ' + new TextDecoder().decode(REQ.subarray(0, 4)));
  const rx = sender.responseReceiver();
  const pieces = [...await rx.receiveData(hex(out.chunked_resp)), ...await rx.endOfInput()];
  assert.deepEqual(pieces.map((p) => new TextDecoder().decode(p)), ['first', 'second', 'last']);
});

/** The gateway side of one OHTTP request, written here: open it with `keys` (id -> {kem, kp}). */
async function jsGatewayOpen(keys, msg, chunked) {
  const hdr = msg.subarray(0, 7);
  const k = keys.get(hdr[0]);
  assert.equal((hdr[1] << 8) | hdr[2], k.kem);
  const { nenc } = kemSizes(k.kem);
  const enc = msg.subarray(7, 7 + nenc);
  const suite = hpkeSuite(k.kem);
  const label = chunked ? 'message/bhttp chunked request' : 'message/bhttp request';
  const ctx = await suite.createRecipientContext({ recipientKey: k.kp, enc, info: concat(te.encode(label), Uint8Array.of(0), hdr) });
  if (!chunked) return { ctx, enc, pieces: [new Uint8Array(await ctx.open(msg.subarray(7 + nenc)))] };
  const pieces = [];
  for (let p = 7 + nenc; p < msg.length;) {
    const [len, off] = decodeVarint(msg, p);
    if (len === 0) { pieces.push(new Uint8Array(await ctx.open(msg.subarray(off), FINAL))); break; }
    pieces.push(new Uint8Array(await ctx.open(msg.subarray(off, off + len), ZERO)));
    p = off + len;
  }
  return { ctx, enc, pieces };
}

async function jsGatewayRespond({ ctx, enc }, chunked, parts) {
  const nonce = globalThis.crypto.getRandomValues(new Uint8Array(16));
  const label = chunked ? 'message/bhttp chunked response' : 'message/bhttp response';
  const prk = await hkdfExtract(concat(enc, nonce), new Uint8Array(await ctx.export(te.encode(label), 16)));
  const key = await aesGcmKey(await hkdfExpand(prk, 'key', 16));
  const iv = await hkdfExpand(prk, 'nonce', 12);
  if (!chunked) return concat(nonce, await aesGcmSeal(key, iv, ZERO, parts[0]));
  const out = [nonce];
  for (const [i, part] of parts.entries()) {
    const last = i === parts.length - 1;
    const sealed = await aesGcmSeal(key, xorCounter(iv, i), last ? FINAL : ZERO, part);
    out.push(last ? Uint8Array.of(0) : encodeVarint(sealed.length), sealed);
  }
  return concat(...out);
}

test('our Python client → a JS OHTTP gateway: X-Wing plain and chunked, both ways', async (t) => {
  if (!havePython(t)) return;
  const keys = new Map();
  const configs = [];
  for (const [id, kem] of [[4, KEM_X25519], [5, KEM_XWING]]) {
    const s = hpkeSuite(kem);
    const kp = await s.kem.generateKeyPair();
    keys.set(id, { kem, kp });
    const pub = new Uint8Array(await s.kem.serializePublicKey(kp.publicKey));
    const c = concat(Uint8Array.of(id), u16(kem), pub, u16(8), u16(1), u16(1), u16(1), u16(3));
    configs.push(u16(c.length), c);
  }
  const session = pySession(`
import json, sys
from openpcc.wire import hpke, ohttp
from openpcc.wire.chunked import ChunkedRequestSender
from openpcc.client.client import choose_key_config
p = json.loads(sys.stdin.readline())
cfg = choose_key_config(ohttp.parse_key_configs(bytes.fromhex(p['keys'])), None)
plain, pctx = ohttp.encapsulate_request(cfg, bytes.fromhex(p['req']))
s = ChunkedRequestSender(cfg)
chunked = s.seal_chunk(b'one') + s.seal_chunk(bytes.fromhex(p['big'])) + s.seal_chunk(b'', final=True)
print(json.dumps({'kem': cfg.kem_id, 'plain': plain.hex(), 'chunked': chunked.hex()}))
p = json.loads(sys.stdin.readline())
r = s.response_receiver()
got = r.receive_data(bytes.fromhex(p['chunked'])) + r.end_of_input()
print(json.dumps({'plain': pctx.decapsulate_response(bytes.fromhex(p['plain'])).hex(), 'chunked': [g.hex() for g in got]}))`);
  try {
    const req = await session.ask({ keys: toHex(concat(...configs)), req: toHex(REQ), big: toHex(BIG) });
    assert.equal(req.kem, KEM_XWING, 'no manifest: the gateway\'s X-Wing config is preferred');
    const p = await jsGatewayOpen(keys, hex(req.plain), false);
    assert.deepEqual(p.pieces.map(toHex), [toHex(REQ)]);
    const c = await jsGatewayOpen(keys, hex(req.chunked), true);
    assert.deepEqual(c.pieces.map(toHex), [te.encode('one'), BIG, ZERO].map(toHex));
    assert.deepEqual(decodeRequest(concat(...p.pieces)).path, '/v1/nodes');
    const answers = await session.ask({
      plain: toHex(await jsGatewayRespond(p, false, [te.encode('js plain')])),
      chunked: toHex(await jsGatewayRespond(c, true, [te.encode('a'), te.encode('bb'), te.encode('end')])),
    });
    assert.equal(answers.plain, toHex(te.encode('js plain')));
    assert.deepEqual(answers.chunked, ['a', 'bb', 'end'].map((s) => toHex(te.encode(s))));
  } finally {
    session.close();
  }
});

test('a truncated or tampered X-Wing chunked response is never complete', async () => {
  const s = hpkeSuite(KEM_XWING);
  const kp = await s.kem.generateKeyPair();
  const pub = new Uint8Array(await s.kem.serializePublicKey(kp.publicKey));
  const keys = new Map([[2, { kem: KEM_XWING, kp }]]);
  const cfg = parseKeyConfig(concat(Uint8Array.of(2), u16(KEM_XWING), pub, u16(4), u16(1), u16(1)));
  const sender = await ChunkedRequestSender.create(cfg);
  const wire = concat(await sender.sealChunk(te.encode('q')), await sender.sealChunk(ZERO, true));
  const resp = await jsGatewayRespond(await jsGatewayOpen(keys, wire, true), true, [te.encode('a'), te.encode('z')]);
  const whole = sender.responseReceiver();
  assert.deepEqual([...await whole.receiveData(resp), ...await whole.endOfInput()].map((b) => new TextDecoder().decode(b)), ['a', 'z']);
  const cut = sender.responseReceiver();
  await cut.receiveData(resp.subarray(0, resp.length - 3));
  await assert.rejects(cut.endOfInput());
  const flipped = Uint8Array.from(resp);
  flipped[20] ^= 1;
  const r = new ChunkedResponseReceiver(sender.ctx, sender.enc);
  await assert.rejects((async () => { await r.receiveData(flipped); await r.endOfInput(); })());
});
