// ResponseUnwrapper against tests/vectors/final_chunk_content_v1.json: a gateway answer whose
// final chunked-OHTTP chunk carries the last of the node's sealed bytes and the BHTTP end.
// The same bytes are decoded by tests/test_unwrap.py in Python.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { x25519 } from '@noble/curves/ed25519';
import { hpkeSuite } from '../src/crypto.js';
import { ChunkedRequestSender, parseKeyConfig } from '../src/ohttp.js';
import { ResponseOpener } from '../src/sealed.js';
import { ResponseUnwrapper } from '../src/unwrap.js';
import { REPO, VECTORS, readJson, hex } from './helpers.js';

const V = readJson(path.join(REPO, 'tests/vectors/final_chunk_content_v1.json'));
const DRAFT = readJson(path.join(VECTORS, 'chunked-ohttp/draft-ietf-ohai-chunked-ohttp-08_example.json'));
const NODE = readJson(path.join(REPO, 'tests/vectors/sealed_request_v1.json'));

async function unwrapper() {
  const s = hpkeSuite();
  const sk = hex(DRAFT.client_ephemeral_private_key);
  const ekm = { privateKey: await s.kem.deserializePrivateKey(sk), publicKey: await s.kem.deserializePublicKey(x25519.getPublicKey(sk)) };
  const sender = await ChunkedRequestSender.create(parseKeyConfig(hex(DRAFT.key_config)), { ekm });
  const pcs = DRAFT.request_plaintext_chunks;
  for (let i = 0; i < pcs.length; i++) await sender.sealChunk(hex(pcs[i]), i === pcs.length - 1);
  const opener = new ResponseOpener(hex(NODE.data_key), hex(NODE.request_nonce), hex(NODE.context));
  return new ResponseUnwrapper(sender.responseReceiver(), opener);
}

test('content in the final chunked-OHTTP chunk reaches the node layer', async () => {
  const finalChunk = hex(V.plaintext_chunks[V.plaintext_chunks.length - 1]);
  assert.ok(finalChunk.length > 2, 'the vector must put node bytes in the final chunk');
  const wire = hex(V.encapsulated_response);
  for (const step of [1, 7, 64, wire.length]) {
    const u = await unwrapper();
    const events = [];
    for (let o = 0; o < wire.length; o += step) events.push(...(await u.receiveData(wire.subarray(o, o + step))));
    events.push(...(await u.endOfInput()));
    assert.deepEqual(events[0], { type: 'gateway-head', status: 200 });
    assert.deepEqual(events.filter((e) => e.type === 'node-head').map((e) => e.status), [V.node_status]);
    const body = Buffer.concat(events.filter((e) => e.type === 'node-data').map((e) => e.data)).toString();
    assert.equal(body, V.node_body);
  }
});

test('a cut answer is truncation (or a final chunk that fails to authenticate)', async () => {
  const wire = hex(V.encapsulated_response);
  for (let cut = 0; cut < wire.length; cut += 9) {
    const u = await unwrapper();
    await assert.rejects(
      (async () => { await u.receiveData(wire.subarray(0, cut)); await u.endOfInput(); })(),
      (e) => ['TruncatedError', 'DecryptError', 'NodeTruncatedError'].includes(e.name),
    );
  }
});
