// End to end against a running stack (skipped unless OPENPCC_CLIENT_CONFIG names its
// client.json; tests/test_js_client.py starts the stack and sets it).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const CFG = process.env.OPENPCC_CLIENT_CONFIG;
const E2E = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../e2e');
const run = (script) => JSON.parse(execFileSync(process.execPath, [path.join(E2E, script), CFG], { timeout: 120000 }).toString().trim().split('\n').pop());

test('Node: tokens, verified node, streamed private chat', { skip: !CFG && 'OPENPCC_CLIENT_CONFIG not set' }, () => {
  const out = run('node-chat.mjs');
  assert.equal(out.text, process.env.OPENPCC_EXPECT_TEXT ?? out.text);
  assert.ok(out.text.length > 0);
  assert.ok(out.chunks > 1, 'streamed in several chunks');
  assert.ok(out.verified_nodes.length >= 1);
  assert.equal(out.non_streamed, out.text);
  assert.equal(out.unknown_model_error, 'NoVerifiedNodeError');
  assert.equal(out.unpinned_manifest_error, 'VerificationError');
  // Two turns of one conversation: the same node answers both (cache affinity).
  const [n1, n2] = out.conversation_node_ids;
  assert.match(n1 ?? '', /^[0-9a-f]{32}$/, 'the node names itself (openpcc-node-id)');
  assert.equal(n2, n1, 'the second turn went to the node that answered the first');
  if (process.env.OPENPCC_EXPECT_KEM) assert.equal(out.outer_kem, Number(process.env.OPENPCC_EXPECT_KEM), 'outer-layer KEM');
  if (process.env.OPENPCC_EXPECT_INNER_KEM) {
    assert.equal(out.inner_kem, Number(process.env.OPENPCC_EXPECT_INNER_KEM), 'inner-layer KEM');
    assert.equal(out.sealed_version, out.inner_kem === 0x647a ? 2 : 1, 'sealed-request version');
  }
  console.log(JSON.stringify(out));
});

test('headless Chromium: the example page completes a private streamed chat', { skip: (!CFG || process.env.OPENPCC_SKIP_BROWSER) && 'no stack or browser disabled' }, () => {
  const out = run('browser-chat.mjs');
  assert.equal(out.result, 'ok', `${out.status} ${JSON.stringify(out.logs)}`);
  assert.ok(out.text.length > 0);
  assert.ok(out.chunk_times_ms.length > 1);
  assert.equal(out.has_process, false);
  console.log(JSON.stringify(out));
});
