// Binary HTTP, OHTTP and chunked OHTTP against the official vectors in tests/vectors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { x25519 } from '@noble/curves/ed25519';
import { encodeRequest, decodeRequest, decodeResponse, ResponseStreamDecoder } from '../src/bhttp.js';
import { parseKeyConfigs, parseKeyConfig, encapsulateRequest, ChunkedRequestSender } from '../src/ohttp.js';
import { hpkeSuite } from '../src/crypto.js';
import { VECTORS, readJson, hex, toHex } from './helpers.js';

const BHTTP = readJson(path.join(VECTORS, 'bhttp/rfc9292_examples.json')).examples;
const OHTTP = readJson(path.join(VECTORS, 'ohttp/rfc9458_appendix_a.json'));
const CHUNKED = readJson(path.join(VECTORS, 'chunked-ohttp/draft-ietf-ohai-chunked-ohttp-08_example.json'));
const str = (b) => Buffer.from(b).toString();
const fields = (fs) => fs.map(([n, v]) => [str(n), str(v)]);

test('RFC 9292 §5.1: the known-length request is reproduced byte for byte', () => {
  const ex = BHTTP.find((e) => e.name === 'request_known_length');
  const d = ex.decoded;
  const out = encodeRequest({ method: d.method, scheme: d.scheme, authority: d.authority, path: d.path, headers: d.header_fields });
  assert.equal(toHex(out), ex.bhttp);
});

test('RFC 9292 examples decode (requests and responses, both framings, truncation, padding)', () => {
  for (const ex of BHTTP) {
    const d = ex.decoded;
    if (d.framing_indicator === 0 || d.framing_indicator === 2) {
      const r = decodeRequest(hex(ex.bhttp));
      assert.deepEqual([r.method, r.scheme, r.authority, r.path], [d.method, d.scheme, d.authority, d.path], ex.name);
      assert.deepEqual(fields(r.headers), d.header_fields, ex.name);
      assert.equal(toHex(r.content), d.content_hex, ex.name);
      assert.equal(r.padding, d.padding_length, ex.name);
    } else {
      const r = decodeResponse(hex(ex.bhttp));
      assert.equal(r.status, d.status, ex.name);
      assert.deepEqual(fields(r.headers), d.header_fields, ex.name);
      assert.equal(toHex(r.content), d.content_hex, ex.name);
      assert.deepEqual(fields(r.trailers), d.trailer_fields, ex.name);
      assert.deepEqual(r.informational.map((i) => i.status), (d.informational ?? []).map((i) => i.status), ex.name);
    }
  }
});

test('indeterminate responses stream byte by byte', () => {
  for (const ex of BHTTP.filter((e) => e.decoded.framing_indicator === 3)) {
    const dec = new ResponseStreamDecoder();
    const evs = [];
    for (const b of hex(ex.bhttp)) evs.push(...dec.receiveData(Uint8Array.of(b)));
    evs.push(...dec.endOfInput());
    const head = evs.find((e) => e.type === 'head');
    assert.equal(head.status, ex.decoded.status);
    const body = Buffer.concat(evs.filter((e) => e.type === 'data').map((e) => e.data));
    assert.equal(body.toString('hex'), ex.decoded.content_hex, ex.name);
    assert.equal(evs[evs.length - 1].type, 'end');
  }
  const cut = new ResponseStreamDecoder();
  cut.receiveData(hex('0340c8000548656c6c'));
  assert.throws(() => cut.endOfInput(), { name: 'TruncatedError' });
});

async function ekm(sk, pk) {
  const s = hpkeSuite();
  return { privateKey: await s.kem.deserializePrivateKey(hex(sk)), publicKey: await s.kem.deserializePublicKey(pk ? hex(pk) : x25519.getPublicKey(hex(sk))) };
}

test('RFC 9458 Appendix A: request reproduced, response opened', async () => {
  const [cfg] = parseKeyConfigs(hex(OHTTP.application_ohttp_keys_body_derived.hex));
  assert.equal(toHex(cfg.encoded), OHTTP.key_config);
  const e = await encapsulateRequest(cfg, hex(OHTTP.request_bhttp), { ekm: await ekm(OHTTP.client_ephemeral_private_key, OHTTP.client_ephemeral_public_key) });
  assert.equal(toHex(e.request), OHTTP.encapsulated_request);
  assert.equal(toHex(await e.decapsulate(hex(OHTTP.encapsulated_response))), OHTTP.response_bhttp);
});

test('chunked OHTTP draft-08 example: request reproduced chunk by chunk, response opened', async () => {
  const cfg = parseKeyConfig(hex(CHUNKED.key_config));
  const s = await ChunkedRequestSender.create(cfg, { ekm: await ekm(CHUNKED.client_ephemeral_private_key, CHUNKED.client_ephemeral_public_key) });
  const pcs = CHUNKED.request_plaintext_chunks;
  const parts = [];
  for (let i = 0; i < pcs.length; i++) parts.push(await s.sealChunk(hex(pcs[i]), i === pcs.length - 1));
  assert.equal(Buffer.concat(parts).toString('hex'), CHUNKED.encapsulated_request);
  for (const split of [1, 7, 1000]) {
    const s2 = await ChunkedRequestSender.create(cfg, { ekm: await ekm(CHUNKED.client_ephemeral_private_key, CHUNKED.client_ephemeral_public_key) });
    for (let i = 0; i < pcs.length; i++) await s2.sealChunk(hex(pcs[i]), i === pcs.length - 1);
    const rx = s2.responseReceiver();
    const wire = hex(CHUNKED.encapsulated_response);
    const got = [];
    for (let o = 0; o < wire.length; o += split) got.push(...(await rx.receiveData(wire.subarray(o, o + split))));
    // endOfInput lists the final chunk's plaintext when it has any; the vector lists an
    // empty final one too.
    const fin = await rx.endOfInput();
    got.push(fin.length ? fin[0] : new Uint8Array(0));
    assert.deepEqual(got.map(toHex), CHUNKED.response_plaintext_chunks);
  }
  const s3 = await ChunkedRequestSender.create(cfg, { ekm: await ekm(CHUNKED.client_ephemeral_private_key, CHUNKED.client_ephemeral_public_key) });
  for (let i = 0; i < pcs.length; i++) await s3.sealChunk(hex(pcs[i]), i === pcs.length - 1);
  const rx = s3.responseReceiver();
  const wire = hex(CHUNKED.encapsulated_response);
  await rx.receiveData(wire.subarray(0, wire.length - 3));
  await assert.rejects(rx.endOfInput(), (e) => ['TruncatedError', 'DecryptError'].includes(e.name));
});
