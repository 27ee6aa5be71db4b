// A relay + gateway + nodes for chat requests, faked at the fetch level with the real
// layers: the relay's chunked OHTTP (real gateway keys: X25519, or X-Wing, or both), the
// gateway's Binary HTTP, the sealed request (v2 to the nodes' real X-Wing keys, v1 to
// legacy X25519-only nodes) opened by the node it is routed to, and its sealed response.
// What each party saw is logged, so tests can tell what the relay could read (`relaySaw`),
// what the gateway could read (`gatewaySaw`) and what only the node read (`infers[].inner`).
import assert from 'node:assert/strict';
import { decodeRequest } from '../src/bhttp.js';
import { concat, decodeVarint, encodeVarint, randomBytes, te, toHex, u16 } from '../src/bytes.js';
import { KEM_X25519, KEM_XWING, aesGcmKey, aesGcmOpen, aesGcmSeal, hkdf, hkdfExpand, hkdfExtract, hpkeSuite, sha256, xorCounter } from '../src/crypto.js';

export const RELAY = 'https://relay.example';
const td = new TextDecoder();
const FINAL = te.encode('final');

/** A trust policy already "verified" (no manifest): the client takes it as it is. */
export const stubPolicy = () => ({
  acceptsTokenKey: () => true,
  acceptsOhttpKey: async () => true,
  checkCurrent() {},
  keyId: 'stub',
  manifest: { serial: 1, issuedAt: 0, expiresAt: 1e12 },
});

function fieldsObject(fields) {
  const out = {};
  for (const [n, v] of fields) (out[td.decode(n)] ??= []).push(td.decode(v));
  return out;
}

/** Open a sealed request as the node `node` (keys {nodeId, keyPair, pqKeyPair}), v1 or v2. */
async function openSealed(envelope, node) {
  let p = 0;
  const version = envelope[p++];
  assert.ok(version === 1 || version === 2, `sealed request version ${version}`);
  const kem = version === 2 ? KEM_XWING : KEM_X25519;
  const nenc = version === 2 ? 1120 : 32;
  const suiteId = envelope.subarray(p, p + 6); p += 6;
  assert.deepEqual([...suiteId], [kem >> 8, kem & 0xff, 0, 1, 0, 1], 'the version fixes the suite');
  const nonce = envelope.slice(p, p + 16); p += 16;
  const mlen = envelope[p++];
  const model = envelope.subarray(p, p + mlen); p += mlen;
  const n = envelope[p++];
  const cands = [];
  for (let i = 0; i < n; i++) {
    const e = p + 24;
    cands.push({ nodeId: envelope.slice(p, p + 16), keyId: envelope.slice(p + 16, e), enc: envelope.slice(e, e + nenc), wrapped: envelope.slice(e + nenc, e + nenc + 32) });
    p = e + nenc + 32;
  }
  const label = `openpcc sealed request v${version}`;
  const ctx = await sha256(concat(te.encode(`${label} context`), Uint8Array.of(0), suiteId, Uint8Array.of(version), nonce,
    Uint8Array.of(mlen), model, Uint8Array.of(n), ...cands.flatMap((c) => [c.nodeId, c.keyId])));
  const mine = cands.find((c) => toHex(c.nodeId) === toHex(node.nodeId));
  assert.ok(mine, 'routed to a node that is not a candidate');
  const keyPair = version === 2 ? node.pqKeyPair : node.keyPair;
  assert.ok(keyPair, 'a v2 request to a node without an X-Wing key');
  assert.equal(toHex(mine.keyId), toHex((await sha256(version === 2 ? node.pqPublicKey : node.publicKey)).slice(0, 8)), 'key id');
  const hpke = await hpkeSuite(kem).createRecipientContext({
    recipientKey: keyPair, enc: mine.enc, info: concat(te.encode(label), Uint8Array.of(0), mine.nodeId, mine.keyId),
  });
  const dk = new Uint8Array(await hpke.open(mine.wrapped, ctx));
  const key = await aesGcmKey(await hkdf(dk, nonce, 'openpcc request key', 16));
  const iv = await hkdf(dk, nonce, 'openpcc request nonce', 12);
  const plain = [];
  for (let seq = 0; p < envelope.length; seq++) {
    const flag = envelope[p];
    const [len, off] = decodeVarint(envelope, p + 1);
    plain.push(await aesGcmOpen(key, xorCounter(iv, seq), concat(ctx, Uint8Array.of(flag)), envelope.subarray(off, off + len)));
    p = off + len;
  }
  return { request: decodeRequest(concat(...plain)), dk, nonce, ctx, version };
}

/** The node's sealed response: its nonce, then the head and the body, each one sealed chunk. */
async function sealResponse({ dk, nonce, ctx }, status, headers, body) {
  const rnonce = randomBytes(16);
  const salt = concat(nonce, rnonce);
  const key = await aesGcmKey(await hkdf(dk, salt, 'openpcc response key', 16));
  const iv = await hkdf(dk, salt, 'openpcc response nonce', 12);
  const fields = concat(...headers.flatMap(([nm, v]) => [encodeVarint(nm.length), te.encode(nm), encodeVarint(v.length), te.encode(v)]));
  const head = concat(encodeVarint(1), encodeVarint(status), encodeVarint(fields.length), fields);
  const parts = [rnonce];
  for (const [seq, piece] of [head, body].entries()) {
    const flag = seq === 1 ? 1 : 0;
    const sealed = await aesGcmSeal(key, xorCounter(iv, seq), concat(ctx, Uint8Array.of(flag)), concat(encodeVarint(piece.length), piece));
    parts.push(Uint8Array.of(flag), encodeVarint(sealed.length), sealed);
  }
  return concat(...parts);
}

/**
 * `nodes` nodes serving model 'm', each with an X25519 and an X-Wing key, except the
 * first `legacyNodes` (X25519 only, pqPublicKey null: they take sealed v1).
 * `route(candidateHexes) -> hex` is the gateway's pick (default: the first candidate, as
 * an unloaded gateway does). `nodeIdHeader`: true (the node's id), false (none), or
 * (id) -> list of values to send instead.
 */
export async function fakeChatStack({ nodes: count = 4, legacyNodes = 0, route = (c) => c[0], nodeIdHeader = true, kems = [KEM_X25519] } = {}) {
  const suite = hpkeSuite();
  const pqSuite = hpkeSuite(KEM_XWING);
  // The gateway's OHTTP keys: one config per KEM in `kems` (key ids 7, 8, …), listed in order.
  const gwKeys = new Map();
  for (const [i, kem] of kems.entries()) {
    const s = hpkeSuite(kem);
    const kp = await s.kem.generateKeyPair();
    const pub = new Uint8Array(await s.kem.serializePublicKey(kp.publicKey));
    gwKeys.set(7 + i, { kem, suite: s, kp, config: concat(Uint8Array.of(7 + i), u16(kem), pub, u16(4), u16(1), u16(1)) });
  }
  const keysBody = concat(...[...gwKeys.values()].flatMap((k) => [u16(k.config.length), k.config]));
  const nodes = [];
  for (let i = 0; i < count; i++) {
    const keyPair = await suite.kem.generateKeyPair();
    const pqKeyPair = i < legacyNodes ? null : await pqSuite.kem.generateKeyPair();
    nodes.push({
      nodeId: randomBytes(16), keyPair, publicKey: new Uint8Array(await suite.kem.serializePublicKey(keyPair.publicKey)),
      pqKeyPair, pqPublicKey: pqKeyPair && new Uint8Array(await pqSuite.kem.serializePublicKey(pqKeyPair.publicKey)),
      models: ['m'], expiresAt: 1e12, checks: [], signingKey: new Uint8Array(32),
    });
  }
  const stack = { nodes, route, nodeIdHeader, relaySaw: [], gatewaySaw: [], infers: [], outerKems: [] };
  stack.keyConfigs = [...gwKeys.values()].map((k) => k.config);
  stack.fetch = async (url, init = {}) => {
    stack.relaySaw.push(te.encode(url), te.encode(JSON.stringify(init.headers ?? {})), ...(init.body ? [new Uint8Array(init.body)] : []));
    if (url === RELAY + '/.well-known/ohttp-gateway') return new Response(keysBody);
    assert.equal(url, RELAY + '/');
    assert.equal(init.headers['Content-Type'], 'message/ohttp-chunked-req');
    // The gateway: open the chunked OHTTP request with the key its header names.
    const msg = new Uint8Array(init.body);
    const hdr = msg.subarray(0, 7);
    const gk = gwKeys.get(hdr[0]);
    assert.ok(gk, `unknown key id ${hdr[0]}`);
    assert.equal((hdr[1] << 8) | hdr[2], gk.kem, 'header KEM is the key config\'s');
    stack.outerKems.push(gk.kem);
    const nenc = gk.kem === KEM_XWING ? 1120 : 32;
    const enc = msg.subarray(7, 7 + nenc);
    const hpke = await gk.suite.createRecipientContext({ recipientKey: gk.kp, enc, info: concat(te.encode('message/bhttp chunked request'), Uint8Array.of(0), hdr) });
    const plain = [];
    for (let p = 7 + nenc; p < msg.length;) {
      const [len, off] = decodeVarint(msg, p);
      if (len === 0) { plain.push(new Uint8Array(await hpke.open(msg.subarray(off), FINAL))); break; }
      plain.push(new Uint8Array(await hpke.open(msg.subarray(off, off + len), new Uint8Array(0))));
      p = off + len;
    }
    const outerBytes = concat(...plain);
    stack.gatewaySaw.push(outerBytes);
    const outer = decodeRequest(outerBytes);
    assert.equal(outer.path, '/v1/infer');
    // Route it, and let the node open and answer it.
    const candidates = candidatesOf(outer.content);
    const pick = stack.route(candidates);
    const node = nodes.find((x) => toHex(x.nodeId) === pick);
    const opened = await openSealed(outer.content, node);
    const inner = opened.request;
    const body = JSON.parse(td.decode(inner.content));
    stack.infers.push({ candidates, answeredBy: pick, inner, headers: fieldsObject(inner.headers), body, version: opened.version });
    const answer = body.stream
      ? te.encode(`data: ${JSON.stringify({ choices: [{ index: 0, delta: { content: 'ok' } }] })}\n\ndata: [DONE]\n\n`)
      : te.encode(JSON.stringify({ object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }] }));
    const headers = [['content-type', body.stream ? 'text/event-stream' : 'application/json'], ...nodeIdFields(stack.nodeIdHeader, pick)];
    const sealedResp = await sealResponse(opened, 200, headers, answer);
    const gwResp = concat(encodeVarint(3), encodeVarint(200), Uint8Array.of(0), encodeVarint(sealedResp.length), sealedResp, Uint8Array.of(0, 0));
    // Chunked OHTTP response: one chunk, then an empty final one.
    const rnonce = randomBytes(16);
    const prk = await hkdfExtract(concat(enc, rnonce), new Uint8Array(await hpke.export(te.encode('message/bhttp chunked response'), 16)));
    const key = await aesGcmKey(await hkdfExpand(prk, 'key', 16));
    const iv = await hkdfExpand(prk, 'nonce', 12);
    const c0 = await aesGcmSeal(key, xorCounter(iv, 0), new Uint8Array(0), gwResp);
    const c1 = await aesGcmSeal(key, xorCounter(iv, 1), FINAL, new Uint8Array(0));
    return new Response(concat(rnonce, encodeVarint(c0.length), c0, Uint8Array.of(0), c1), { status: 200 });
  };
  /** The last request's inner header `name` (all its values), as the node read it. */
  stack.lastInner = (name) => stack.infers[stack.infers.length - 1].headers[name] ?? [];
  stack.last = () => stack.infers[stack.infers.length - 1];
  return stack;
}

function nodeIdFields(how, id) {
  if (how === true) return [['openpcc-node-id', id]];
  if (!how) return [];
  return how(id).map((v) => ['openpcc-node-id', v]);
}

function candidatesOf(envelope) {
  const entry = 16 + 8 + (envelope[0] === 2 ? 1120 : 32) + 32; // node_id ‖ key_id ‖ enc ‖ wrapped
  const mlen = envelope[23];
  const n = envelope[24 + mlen];
  const out = [];
  for (let i = 0, p = 25 + mlen; i < n; i++, p += entry) out.push(toHex(envelope.subarray(p, p + 16)));
  return out;
}
