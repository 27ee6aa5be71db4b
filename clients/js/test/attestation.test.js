// Attestation: real SEV-SNP captures (tests/attestation-samples) and simulated-TEE
// bundles made by the Python code (with and without an X-Wing key), checked by the JS verifier.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { verifySnp, loadTrustPolicy, verifyNodeEntry, decodeClaims, DecodeError, VerificationError, rememberSerial, memorySerialStore, webStorageSerialStore } from '../src/index.js';
import { REPO, simFixture } from './helpers.js';

const SAMPLES = path.resolve(REPO, 'tests/attestation-samples/sev-snp');
const AT = Date.UTC(2025, 5, 1) / 1000; // inside every sample certificate's validity
const byName = (checks) => Object.fromEntries(checks.map((c) => [c.name, c]));

test('real Milan VCEK report: ECDSA-P384 signature, RSA-PSS AMD chain, TCB', async () => {
  const report = new Uint8Array(readFileSync(path.join(SAMPLES, 'milan-vcek-virtee/report_milan.bin')));
  const vcek = new Uint8Array(readFileSync(path.join(SAMPLES, 'milan-vcek-virtee/vcek_milan.der')));
  const v = await verifySnp(report, vcek, { now: AT });
  const c = byName(v.checks);
  assert.equal(v.platform, 'sev-snp');
  for (const n of ['signature', 'chain', 'tcb']) assert.ok(c[n].ok, `${n}: ${c[n].detail}`);
  assert.match(c.chain.detail, /ARK-Milan/);
  const bad = report.slice();
  bad[0x90] ^= 1; // measurement
  assert.equal(byName((await verifySnp(bad, vcek, { now: AT })).checks).signature.ok, false);
  const late = byName((await verifySnp(report, vcek, { now: Date.UTC(2060, 0, 1) / 1000 })).checks);
  assert.equal(late.chain.ok, false);
});

test('real AWS VLEK report chains to the ASVK', async () => {
  const report = new Uint8Array(readFileSync(path.join(SAMPLES, 'milan-vlek-aws-trustee/test-vlek-report.bin')));
  const vlek = new Uint8Array(readFileSync(path.join(SAMPLES, 'milan-vlek-aws-trustee/test-vlek.der')));
  const c = byName((await verifySnp(report, vlek, { now: AT })).checks);
  for (const n of ['signature', 'chain', 'tcb']) assert.ok(c[n].ok, `${n}: ${c[n].detail}`);
});

const sim = simFixture;

test('simulated-TEE bundle made by Python verifies under a manifest trusting its root', async (t) => {
  const f = sim(t);
  if (!f) return;
  const policy = await loadTrustPolicy(f.signed, f.release_pubkey_pem);
  const node = await verifyNodeEntry(f.entry, policy, f.now);
  assert.equal(Buffer.from(node.publicKey).toString('hex'), f.entry.public_key);
  // make_sim_bundle.py's per-boot signing key: bytes 32..63.
  assert.equal(Buffer.from(node.signingKey).toString('hex'), Buffer.from(Array.from({ length: 32 }, (_, i) => 32 + i)).toString('hex'));
  assert.ok(byName(node.checks)['tee.report_data'].ok);
});

test('claims: signing_key is required, 32 bytes of lower-case hex, sorted between release_id and tee', () => {
  const claims = {
    expires_at: 2000, gpu_evidence_digest: null, hpke_public_key: 'ab'.repeat(32), issued_at: 1000,
    model_digest: 'cd'.repeat(32), node_id: '00112233445566778899aabbccddeeff', release_id: 'dev',
    signing_key: 'ef'.repeat(32), tee: 'simulated-snp',
  };
  const enc = (o) => new TextEncoder().encode(JSON.stringify(o)); // insertion order = sorted above
  const c = decodeClaims(enc(claims));
  assert.equal(Buffer.from(c.signingKey).toString('hex'), 'ef'.repeat(32));
  assert.equal(Buffer.from(c.hpkePublicKey).toString('hex'), 'ab'.repeat(32));
  const { signing_key: _, ...eight } = claims;
  assert.throws(() => decodeClaims(enc(eight)), (e) => e instanceof DecodeError && /missing signing_key/.test(e.message));
  for (const bad of ['EF'.repeat(32), 'ef'.repeat(31), 'ef'.repeat(33), null, 7]) {
    assert.throws(() => decodeClaims(enc({ ...claims, signing_key: bad })), /signing_key must be 32 bytes/);
  }
  const { tee, ...rest } = claims; // signing_key after tee: not canonical
  const { signing_key: sk, ...noKey } = rest;
  assert.throws(() => decodeClaims(enc({ ...noKey, tee, signing_key: sk })), /canonical/);
});

test('claims: pq_public_key is optional, 1216 bytes of lower-case hex, never null, in canonical order', () => {
  const base = {
    expires_at: 2000, gpu_evidence_digest: null, hpke_public_key: 'ab'.repeat(32), issued_at: 1000,
    model_digest: 'cd'.repeat(32), node_id: '00112233445566778899aabbccddeeff',
  };
  const tail = { release_id: 'dev', signing_key: 'ef'.repeat(32), tee: 'simulated-snp' };
  const enc = (o) => new TextEncoder().encode(JSON.stringify(o)); // insertion order = sorted
  const pq = '5a'.repeat(1216);
  const c = decodeClaims(enc({ ...base, pq_public_key: pq, ...tail }));
  assert.equal(Buffer.from(c.pqPublicKey).toString('hex'), pq);
  assert.ok(enc({ ...base, pq_public_key: pq, ...tail }).length < 4096, 'claims with an X-Wing key fit the limit');
  assert.equal(decodeClaims(enc({ ...base, ...tail })).pqPublicKey, null, 'absent: an X25519-only node');
  for (const bad of [null, '5A'.repeat(1216), '5a'.repeat(1215), '5a'.repeat(1217), '5a'.repeat(32), '', 7, ['5a']]) {
    assert.throws(() => decodeClaims(enc({ ...base, pq_public_key: bad, ...tail })), (e) => e instanceof DecodeError && /pq_public_key must be 1216 bytes/.test(e.message), JSON.stringify(bad)?.slice(0, 20));
  }
  // After tee (not sorted), or with whitespace: not the canonical encoding.
  assert.throws(() => decodeClaims(enc({ ...base, ...tail, pq_public_key: pq })), /canonical/);
  const spaced = new TextEncoder().encode(JSON.stringify({ ...base, pq_public_key: pq, ...tail }).replace('"pq_public_key":', '"pq_public_key": '));
  assert.throws(() => decodeClaims(spaced), /canonical/);
  assert.throws(() => decodeClaims(enc({ ...base, pq_public_key: pq, ...tail, pq_key: pq.slice(0, 64) })), /unknown key pq_key/);
});

test('simulated-TEE bundles: the attested X-Wing key, and post_quantum.require refuses X25519-only nodes', async (t) => {
  const f = sim(t);
  if (!f) return;
  const policy = await loadTrustPolicy(f.signed, f.release_pubkey_pem);
  const pq = await verifyNodeEntry(f.entry, policy, f.now);
  assert.equal(Buffer.from(pq.pqPublicKey).toString('hex'), f.pq_public_key);
  assert.equal(pq.pqPublicKey.length, 1216);
  assert.equal(byName(pq.checks).post_quantum, undefined, 'checked only when the manifest requires it');
  const legacy = await verifyNodeEntry(f.entry_x25519, policy, f.now);
  assert.equal(legacy.pqPublicKey, null);
  const strict = await loadTrustPolicy(f.signed_pq_required, f.release_pubkey_pem);
  assert.equal(strict.postQuantumRequired, true);
  const ok = await verifyNodeEntry(f.entry, strict, f.now);
  assert.ok(byName(ok.checks).post_quantum.ok);
  await assert.rejects(verifyNodeEntry(f.entry_x25519, strict, f.now), (e) => e instanceof VerificationError
    && /^post_quantum: the manifest requires post-quantum keys; the node attests none$/.test(e.message)
    && byName(e.checks).post_quantum.ok === false);
});

test('simulated-TEE bundle is rejected without a dev root, with another measurement, or a swapped key', async (t) => {
  const f = sim(t);
  if (!f) return;
  const reject = async (signed, entry, re) => {
    const policy = await loadTrustPolicy(signed, f.release_pubkey_pem);
    await assert.rejects(verifyNodeEntry(entry, policy, f.now), (e) => e instanceof VerificationError && re.test(e.message));
  };
  await reject(f.signed_no_dev_root, f.entry, /development/);
  await reject(f.signed_other_measurement, f.entry, /tee\.measurement/);
  await reject(f.signed, { ...f.entry, public_key: 'ff'.repeat(32) }, /node_key/);
  const policy = await loadTrustPolicy(f.signed, f.release_pubkey_pem);
  await assert.rejects(verifyNodeEntry(f.entry, policy, f.now + 7200), /claims_window/);
});

test('a manifest signed by an unpinned key, or tampered, is refused', async (t) => {
  const f = sim(t);
  if (!f) return;
  const other = '-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n';
  await assert.rejects(loadTrustPolicy(f.signed, other), /not pinned/);
  const doc = JSON.parse(f.signed);
  const m = JSON.parse(Buffer.from(doc.manifest, 'base64').toString());
  m.development_roots = [];
  doc.manifest = Buffer.from(JSON.stringify(m)).toString('base64');
  await assert.rejects(loadTrustPolicy(JSON.stringify(doc), f.release_pubkey_pem), /signature does not verify/);
});

test('a manifest stops being trusted when it expires, also for a verdict made before', async (t) => {
  const f = sim(t);
  if (!f) return;
  const policy = await loadTrustPolicy(f.signed_expiring, f.release_pubkey_pem, { now: f.now });
  const node = await verifyNodeEntry(f.entry, policy, f.now);
  assert.equal(node.expiresAt, f.now + 60); // the manifest's end, not the claims' hour
  await assert.rejects(verifyNodeEntry(f.entry, policy, f.now + 62), /release manifest expired/);
});

test('a client refuses an older manifest than one it verified before (rollback)', async (t) => {
  const f = sim(t);
  if (!f) return;
  const store = memorySerialStore();
  const newer = await loadTrustPolicy(f.signed, f.release_pubkey_pem, { now: f.now });
  await rememberSerial(newer, store);
  assert.equal(Number(await store.get(newer.keyId)), f.now);
  const older = await loadTrustPolicy(f.signed_older, f.release_pubkey_pem, { now: f.now });
  await assert.rejects(rememberSerial(older, store), /rollback/);
  await rememberSerial(newer, store); // the same serial again is fine
  const items = new Map(); // Web Storage keeps it across restarts
  const storage = { getItem: (k) => items.get(k) ?? null, setItem: (k, v) => items.set(k, v) };
  await rememberSerial(newer, webStorageSerialStore(storage));
  await assert.rejects(rememberSerial(older, webStorageSerialStore(storage)), /rollback/);
});
