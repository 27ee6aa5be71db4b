// Release-manifest refresh: the client fetches a newer manifest before its own expires
// (GET /v1/release-manifest through the relay, or a manifestUrl), accepts it only under
// the pinned key with a serial at least the current one, stores it and re-verifies nodes.
// The relay and gateway are faked at the fetch level: a real OHTTP gateway key, requests
// opened and answered in BHTTP, so the inner If-None-Match header is what the gateway saw.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, memoryManifestStore, memorySerialStore, VerificationError } from '../src/index.js';
import { decodeRequest } from '../src/bhttp.js';
import { concat, encodeVarint, fromBase64, te, toBase64, toHex, u16 } from '../src/bytes.js';
import { aesGcmKey, aesGcmSeal, hkdfExpand, hkdfExtract, hpkeSuite, sha256 } from '../src/crypto.js';
import { simFixture } from './helpers.js';

const RELAY = 'https://relay.example';
const MANIFEST_URL = 'https://cdn.example/openpcc/manifest.json';
const subtle = globalThis.crypto.subtle;

/** An Ed25519 release key: {raw public key, sign(manifest object) -> signed manifest text}. */
async function releaseKey() {
  const kp = await subtle.generateKey({ name: 'Ed25519' }, true, ['sign', 'verify']);
  const pub = new Uint8Array(await subtle.exportKey('raw', kp.publicKey));
  const keyId = toHex(await sha256(pub));
  const sign = async (m) => {
    const bytes = te.encode(JSON.stringify(m));
    const sig = new Uint8Array(await subtle.sign({ name: 'Ed25519' }, kp.privateKey, concat(te.encode('OpenPCC release manifest v1\0'), bytes)));
    return JSON.stringify({ format: 'openpcc-signed-manifest/1', key_id: keyId, manifest: toBase64(bytes), signature: toBase64(sig) });
  };
  return { pub, sign };
}

/** Known-length BHTTP response (RFC 9292 §3), no trailers. */
function encodeResponse(status, headers, content) {
  const fields = concat(...headers.flatMap(([n, v]) => [encodeVarint(n.length), te.encode(n), encodeVarint(v.length), te.encode(v)]));
  return concat(encodeVarint(1), encodeVarint(status), encodeVarint(fields.length), fields, encodeVarint(content.length), content, encodeVarint(0));
}

/**
 * A relay + gateway: GET /.well-known/ohttp-gateway; POST / with one OHTTP request for
 * /v1/nodes or /v1/release-manifest (200 + ETag, 304 on If-None-Match, 503 when unset);
 * and, outside the relay, MANIFEST_URL. `log` records what each party was asked.
 */
async function fakeStack(entry) {
  const suite = hpkeSuite();
  const kp = await suite.kem.generateKeyPair();
  const pub = new Uint8Array(await suite.kem.serializePublicKey(kp.publicKey));
  const keyConfig = concat(Uint8Array.of(7), u16(0x20), pub, u16(4), u16(1), u16(1));
  const stack = { keyConfig: toHex(keyConfig), gatewayManifest: null, urlManifest: null, log: [] };
  const manifestAnswer = async (text, ifNoneMatch) => {
    if (text === null) return { status: 503, headers: [], body: te.encode('{"title":"no valid release manifest"}') };
    const etag = `"${toHex(await sha256(te.encode(text)))}"`;
    if (ifNoneMatch && ifNoneMatch.split(',').map((s) => s.trim()).includes(etag)) return { status: 304, headers: [['etag', etag]], body: new Uint8Array(0) };
    return { status: 200, headers: [['etag', etag], ['content-type', 'application/json']], body: te.encode(text) };
  };
  stack.fetch = async (url, init = {}) => {
    if (url === RELAY + '/.well-known/ohttp-gateway') return new Response(concat(u16(keyConfig.length), keyConfig));
    if (url === MANIFEST_URL) {
      const inm = new Headers(init.headers).get('if-none-match');
      stack.log.push({ to: 'url', ifNoneMatch: inm });
      const a = await manifestAnswer(stack.urlManifest, inm);
      return new Response(a.status === 304 ? null : a.body, { status: a.status, headers: a.headers });
    }
    assert.equal(url, RELAY + '/');
    assert.equal(init.headers['Content-Type'], 'message/ohttp-req');
    const msg = new Uint8Array(init.body);
    const hdr = msg.subarray(0, 7);
    const enc = msg.subarray(7, 39);
    const ctx = await suite.createRecipientContext({ recipientKey: kp, enc, info: concat(te.encode('message/bhttp request'), Uint8Array.of(0), hdr) });
    const req = decodeRequest(new Uint8Array(await ctx.open(msg.subarray(39))));
    const headers = Object.fromEntries(req.headers.map(([n, v]) => [new TextDecoder().decode(n), new TextDecoder().decode(v)]));
    stack.log.push({ to: 'gateway', path: req.path, ifNoneMatch: headers['if-none-match'] ?? null });
    let a;
    if (req.path === '/v1/nodes') a = { status: 200, headers: [], body: te.encode(JSON.stringify({ nodes: [entry] })) };
    else if (req.path === '/v1/release-manifest') a = await manifestAnswer(stack.gatewayManifest, headers['if-none-match']);
    else a = { status: 404, headers: [], body: new Uint8Array(0) };
    const inner = encodeResponse(a.status, a.headers, a.body);
    const nonce = globalThis.crypto.getRandomValues(new Uint8Array(16));
    const prk = await hkdfExtract(concat(enc, nonce), new Uint8Array(await ctx.export(te.encode('message/bhttp response'), 16)));
    const key = await aesGcmKey(await hkdfExpand(prk, 'key', 16));
    const body = concat(nonce, await aesGcmSeal(key, await hkdfExpand(prk, 'nonce', 12), new Uint8Array(0), inner));
    return new Response(body, { status: 200, headers: { 'content-type': 'message/ohttp-res' } });
  };
  stack.manifestFetches = (to = 'gateway') => stack.log.filter((l) => l.to === to && (to === 'url' || l.path === '/v1/release-manifest'));
  return stack;
}

/**
 * The Python fixture's node entry, a fake stack pinned by manifests made here: the
 * fixture's releases and development root, this stack's OHTTP key, signed by `key`.
 */
async function setup(t) {
  const f = simFixture(t);
  if (!f) return null;
  const stack = await fakeStack(f.entry);
  const base = JSON.parse(new TextDecoder().decode(fromBase64(JSON.parse(f.signed).manifest)));
  const key = await releaseKey();
  const other = await releaseKey();
  // Lifetime 460 s from now - 60: due (< 115 s left) from now + 285, expired at now + 400.
  const manifest = ({ serial, expiresIn = 400, by = key }) => by.sign({
    ...base, serial, issued_at: f.now - 60, expires_at: f.now + expiresIn, ohttp_key_configs: [stack.keyConfig],
  });
  const clock = { t: f.now };
  const stores = { manifestStore: memoryManifestStore(), serialStore: memorySerialStore() };
  const client = async (policy, extra = {}) => {
    const c = createClient({
      relayUrl: RELAY, issuerUrl: 'https://issuer.example', apiKey: 'k', policy, releasePublicKey: key.pub,
      fetch: stack.fetch, clock: () => clock.t, ...stores, ...extra,
    });
    await c.policy();
    return c;
  };
  return { f, stack, key, other, manifest, clock, stores, client };
}

const serialOf = async (c) => (await c.policy()).manifest.serial;

test('refresh near expiry picks the newer serial, stores it, re-verifies nodes; a reload starts from it', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const configured = await s.manifest({ serial: 100 });
  const newer = await s.manifest({ serial: 101, expiresIn: 86400 });
  s.stack.gatewayManifest = newer;
  const c = await s.client(configured);
  const [n0] = await c.verifiedNodes();
  assert.equal(n0.expiresAt, s.f.now + 400); // bounded by the configured manifest
  assert.equal(s.stack.manifestFetches().length, 0, 'not due yet: no refresh');
  s.clock.t = s.f.now + 290; // 110 s of 460 left: due
  const [n1] = await c.verifiedNodes();
  assert.equal(s.stack.manifestFetches().length, 1);
  assert.equal(await serialOf(c), 101);
  assert.equal(n1.expiresAt, s.f.now + 3600, 'nodes re-verified under the new manifest (the claims bound it now)');
  assert.equal(await s.stores.manifestStore.get(), newer);
  assert.equal(Number(await s.stores.serialStore.get((await c.policy()).keyId)), 101);
  assert.equal(c.manifestRefreshError, null);
  // A reload with the old configured manifest starts from the stored newer one (and the
  // remembered serial 101 does not make the configured 100 a rollback error).
  const again = await s.client(configured);
  assert.equal(await serialOf(again), 101);
});

test('304: the refresh sends If-None-Match with the last ETag and keeps the manifest', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const configured = await s.manifest({ serial: 100 });
  s.stack.gatewayManifest = configured; // the gateway has nothing newer yet
  const c = await s.client(configured);
  s.clock.t = s.f.now + 290;
  await c.verifiedNodes();
  s.clock.t += 61;
  await c.verifiedNodes();
  const [first, second] = s.stack.manifestFetches();
  assert.equal(first.ifNoneMatch, null);
  assert.equal(second.ifNoneMatch, `"${toHex(await sha256(te.encode(configured)))}"`);
  assert.equal(await serialOf(c), 100);
  assert.equal(c.manifestRefreshError, null);
  assert.equal(await s.stores.manifestStore.get(), null, 'nothing new to store');
});

test('manifestUrl: fetched directly (not through the relay) with If-None-Match', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const configured = await s.manifest({ serial: 100 });
  s.stack.urlManifest = await s.manifest({ serial: 102, expiresIn: 86400 });
  const c = await s.client(configured, { manifestUrl: MANIFEST_URL });
  s.clock.t = s.f.now + 290;
  await c.verifiedNodes();
  assert.equal(await serialOf(c), 102);
  s.clock.t = s.f.now + 86400 - 1000; // the new one is due in turn; unchanged at the URL
  await c.verifiedNodes();
  const fetches = s.stack.manifestFetches('url');
  assert.equal(fetches.length, 2);
  assert.equal(fetches[0].ifNoneMatch, null);
  assert.equal(fetches[1].ifNoneMatch, `"${toHex(await sha256(te.encode(s.stack.urlManifest)))}"`);
  assert.equal(s.stack.manifestFetches('gateway').length, 0);
  assert.throws(() => createClient({ relayUrl: RELAY, issuerUrl: 'https://i', apiKey: 'k', policy: configured, releasePublicKey: s.key.pub, manifestUrl: 'http://cdn.example/m.json' }), TypeError);
});

test('an older serial from the gateway is refused and the current manifest kept', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const configured = await s.manifest({ serial: 100 });
  s.stack.gatewayManifest = await s.manifest({ serial: 99, expiresIn: 86400 });
  const c = await s.client(configured);
  s.clock.t = s.f.now + 290;
  const nodes = await c.verifiedNodes(); // the request goes on under the current manifest
  assert.equal(nodes.length, 1);
  assert.equal(await serialOf(c), 100);
  assert.ok(c.manifestRefreshError instanceof VerificationError);
  assert.match(c.manifestRefreshError.message, /older than the current 100 \(rollback\)/);
  assert.equal(await s.stores.manifestStore.get(), null);
});

test('a manifest signed by another key is refused', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const configured = await s.manifest({ serial: 100 });
  s.stack.gatewayManifest = await s.manifest({ serial: 200, expiresIn: 86400, by: s.other });
  const c = await s.client(configured);
  s.clock.t = s.f.now + 290;
  assert.equal((await c.verifiedNodes()).length, 1);
  assert.equal(await serialOf(c), 100);
  assert.match(c.manifestRefreshError.message, /not pinned/);
  assert.equal(await s.stores.manifestStore.get(), null);
  // Nor is a stored one: a reload ignores it.
  await s.stores.manifestStore.set(s.stack.gatewayManifest);
  assert.equal(await serialOf(await s.client(configured)), 100);
});

test('an expired manifest is refreshed before node verification: the request succeeds', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const configured = await s.manifest({ serial: 100 });
  s.stack.gatewayManifest = await s.manifest({ serial: 101, expiresIn: 86400 });
  const c = await s.client(configured);
  s.clock.t = s.f.now + 500; // expired while running
  assert.deepEqual(await c.models(), ['m']);
  assert.equal(await serialOf(c), 101);
  assert.equal(s.stack.manifestFetches().length, 1);
  // Already expired when the client is made: it starts from it only to refresh it.
  const stores = { manifestStore: memoryManifestStore(), serialStore: memorySerialStore() };
  const fresh = await s.client(configured, stores);
  assert.equal((await fresh.verifiedNodes()).length, 1);
  assert.equal(await serialOf(fresh), 101);
  // Expired and nothing to refresh from: the request fails, saying why.
  s.stack.gatewayManifest = null;
  const stuck = await s.client(configured, { manifestStore: memoryManifestStore(), serialStore: memorySerialStore() });
  await assert.rejects(stuck.verifiedNodes(), (e) => e instanceof VerificationError && /expired .*refreshing it failed: .*503/.test(e.message));
  // Without refresh (manifestUrl: null) an expired configured manifest is refused at once.
  const off = createClient({ relayUrl: RELAY, issuerUrl: 'https://i', apiKey: 'k', policy: configured, releasePublicKey: s.key.pub, clock: () => s.clock.t, manifestUrl: null, manifestStore: memoryManifestStore(), serialStore: memorySerialStore() });
  await assert.rejects(off.policy(), /release manifest expired/);
});

test('at most one refresh attempt per 60 s', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const configured = await s.manifest({ serial: 100 });
  const c = await s.client(configured); // the gateway has none (503)
  s.clock.t = s.f.now + 290;
  await Promise.all([c.verifiedNodes(), c.verifiedNodes(), c.models()]);
  assert.equal(s.stack.manifestFetches().length, 1);
  for (const dt of [10, 30, 59]) {
    s.clock.t = s.f.now + 290 + dt;
    assert.equal((await c.verifiedNodes({ refresh: true })).length, 1, 'a failed refresh fails no request');
  }
  assert.equal(s.stack.manifestFetches().length, 1);
  s.clock.t = s.f.now + 290 + 60;
  await c.verifiedNodes();
  assert.equal(s.stack.manifestFetches().length, 2);
  // Expired, with the last attempt under 60 s ago: no new attempt, the request fails.
  s.clock.t = s.f.now + 401;
  await assert.rejects(c.verifiedNodes(), /release manifest expired/);
  assert.equal(s.stack.manifestFetches().length, 2);
  s.clock.t = s.f.now + 290 + 120;
  s.stack.gatewayManifest = await s.manifest({ serial: 101, expiresIn: 86400 });
  assert.equal((await c.verifiedNodes()).length, 1);
  assert.equal(s.stack.manifestFetches().length, 3);
});
