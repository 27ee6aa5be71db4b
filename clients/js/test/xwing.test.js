// X-Wing (MLKEM768-X25519, HPKE KEM 0x647a) with @hpke/hybridkem-x-wing: the official
// vectors (tests/vectors/xwing, tests/vectors/hpke-pq) and Python's openpcc.wire.hpke
// both ways (seal here / open there, and back), AES-128-GCM, the suite the client sends with.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { Aes128Gcm, CipherSuite, HkdfSha256 } from '@hpke/core';
import { XWing } from '@hpke/hybridkem-x-wing';
import { REPO, VECTORS, readJson, hex, toHex } from './helpers.js';

const KEM = readJson(path.join(VECTORS, 'xwing/draft-connolly-cfrg-xwing-kem-10_test-vectors.json'));
// The X-Wing / HKDF-SHA256 / AES-128-GCM entry (the ChaCha20-Poly1305 one needs
// @hpke/chacha20poly1305, which the client does not use; tests/test_hpke_xwing.py has it).
const HPKE = readJson(path.join(VECTORS, 'hpke-pq/hpke-pq-fbeb7a1_mlkem768x25519_hkdfsha256_base_aes128gcm.json'))[0];
const suite = () => new CipherSuite({ kem: new XWing(), kdf: new HkdfSha256(), aead: new Aes128Gcm() });
const INFO = new TextEncoder().encode('openpcc x-wing interop');
const MSGS = [['', ''], ['aad-1', 'hello from node'], ['', 'ab'.repeat(1500)]].map(([a, p]) => [Buffer.from(a), Buffer.from(p)]);
const EXPORTS = [['', 32], ['message/bhttp response', 16], ['ctx', 77]];

test('X-Wing KEM vectors: keys from the seed, derandomised encap, decap', async () => {
  const kem = new XWing();
  assert.deepEqual([kem.id, kem.encSize, kem.publicKeySize, kem.privateKeySize], [0x647a, 1120, 1216, 32]);
  for (const v of KEM) {
    const kp = await kem.generateKeyPairDerand(hex(v.seed));
    assert.equal(toHex(await kem.serializePrivateKey(kp.privateKey)), v.sk);
    assert.equal(toHex(await kem.serializePublicKey(kp.publicKey)), v.pk);
    const e = await kem.encap({ recipientPublicKey: kp.publicKey, ekm: hex(v.eseed) });
    assert.equal(toHex(e.enc), v.ct);
    assert.equal(toHex(e.sharedSecret), v.ss);
    const ss = await kem.decap({ enc: hex(v.ct), recipientKey: await kem.deserializePrivateKey(hex(v.sk)) });
    assert.equal(toHex(ss), v.ss);
  }
});

test('draft-ietf-hpke-pq vector (X-Wing, HKDF-SHA256, AES-128-GCM): sender byte for byte, receiver', async () => {
  const v = HPKE;
  assert.deepEqual([v.mode, v.kem_id, v.kdf_id, v.aead_id], [0, 0x647a, 1, 1]);
  const s = suite();
  const sender = await s.createSenderContext({
    recipientPublicKey: await s.kem.deserializePublicKey(hex(v.pkRm)),
    info: hex(v.info),
    ekm: hex(v.ikmE),
  });
  assert.equal(toHex(sender.enc), v.enc);
  const receiver = await s.createRecipientContext({
    recipientKey: await s.kem.deserializePrivateKey(hex(v.skRm)),
    enc: hex(v.enc),
    info: hex(v.info),
  });
  for (const e of v.encryptions) {
    assert.equal(toHex(await sender.seal(hex(e.pt), hex(e.aad))), e.ct);
    assert.equal(toHex(await receiver.open(hex(e.ct), hex(e.aad))), e.pt);
  }
  for (const x of v.exports) {
    assert.equal(toHex(await sender.export(hex(x.exporter_context), x.L)), x.exported_value);
    assert.equal(toHex(await receiver.export(hex(x.exporter_context), x.L)), x.exported_value);
  }
});

function python(t, script, input) {
  const py = process.env.PYTHON || 'python3';
  try {
    execFileSync(py, ['-c', 'import Crypto.PublicKey.Hybrid, openpcc.wire.hpke'], { cwd: REPO, stdio: 'ignore' });
  } catch {
    t.skip('python openpcc (with pycryptodome) not importable');
    return null;
  }
  return JSON.parse(execFileSync(py, ['-c', script], { cwd: REPO, input: JSON.stringify(input) }).toString());
}

const jsonCases = () => ({
  info: toHex(INFO),
  msgs: MSGS.map(([aad, pt]) => ({ aad: toHex(aad), pt: toHex(pt) })),
  exports: EXPORTS.map(([c, n]) => ({ ctx: toHex(Buffer.from(c)), L: n })),
});

test("we open Python's X-Wing seals (openpcc.wire.hpke, pycryptodome)", async (t) => {
  const script = `
import json, sys
from openpcc.wire import hpke
p = json.load(sys.stdin)
kp = hpke.generate_key_pair(kem_id=hpke.KEM_XWING)
s = hpke.setup_sender(kp.public_key, bytes.fromhex(p['info']), suite=hpke.Suite(hpke.KEM_XWING, 1, 1))
cts = [s.seal(bytes.fromhex(m['pt']), bytes.fromhex(m['aad'])).hex() for m in p['msgs']]
exps = [s.export(bytes.fromhex(x['ctx']), x['L']).hex() for x in p['exports']]
print(json.dumps({'sk': kp.private_key.hex(), 'enc': s.enc.hex(), 'cts': cts, 'exports': exps}))`;
  const c = jsonCases();
  const out = python(t, script, c);
  if (out === null) return;
  const s = suite();
  const r = await s.createRecipientContext({
    recipientKey: await s.kem.deserializePrivateKey(hex(out.sk)),
    enc: hex(out.enc),
    info: INFO,
  });
  for (const [i, m] of c.msgs.entries()) assert.equal(toHex(await r.open(hex(out.cts[i]), hex(m.aad))), m.pt);
  for (const [i, x] of c.exports.entries()) assert.equal(toHex(await r.export(hex(x.ctx), x.L)), out.exports[i]);
});

test('Python opens our X-Wing seals', async (t) => {
  const s = suite();
  const kp = await s.kem.generateKeyPair();
  const sender = await s.createSenderContext({ recipientPublicKey: kp.publicKey, info: INFO });
  const c = jsonCases();
  const input = {
    ...c,
    sk: toHex(await s.kem.serializePrivateKey(kp.privateKey)),
    enc: toHex(sender.enc),
    cts: [],
  };
  for (const m of c.msgs) input.cts.push(toHex(await sender.seal(hex(m.pt), hex(m.aad))));
  const script = `
import json, sys
from openpcc.wire import hpke
p = json.load(sys.stdin)
r = hpke.setup_receiver(bytes.fromhex(p['sk']), bytes.fromhex(p['enc']), bytes.fromhex(p['info']), suite=hpke.Suite(hpke.KEM_XWING, 1, 1))
pts = [r.open(bytes.fromhex(ct), bytes.fromhex(m['aad'])).hex() for ct, m in zip(p['cts'], p['msgs'])]
exps = [r.export(bytes.fromhex(x['ctx']), x['L']).hex() for x in p['exports']]
print(json.dumps({'pts': pts, 'exports': exps}))`;
  const out = python(t, script, input);
  if (out === null) return;
  assert.deepEqual(out.pts, c.msgs.map((m) => m.pt));
  const want = [];
  for (const x of c.exports) want.push(toHex(await sender.export(hex(x.ctx), x.L)));
  assert.deepEqual(out.exports, want);
});
