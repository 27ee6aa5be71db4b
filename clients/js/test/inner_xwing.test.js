// The inner layer with X-Wing (sealed requests v2) in the client: requests are sealed to
// the nodes' attested X-Wing keys whenever the model has a node with one (candidates among
// those only, one KEM per envelope), to X25519 (v1) only when none has; under a manifest
// with post_quantum.require an X25519-only node does not verify, so v1 is never sent.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, loadTrustPolicy, memoryCacheSecretStore, KEM_X25519, KEM_XWING, NoVerifiedNodeError } from '../src/index.js';
import { decodeRequest } from '../src/bhttp.js';
import { toHex } from '../src/bytes.js';
import { RELAY, fakeChatStack, stubPolicy } from './fakestack.js';
import { simFixture } from './helpers.js';

const TOKEN_KEY_ID = new Uint8Array(32).fill(7);

/** A client of the fake stack: a stub wallet, its nodes as verified. */
function chatClient(stack, { k = 3, policy = stubPolicy() } = {}) {
  const c = createClient({
    relayUrl: RELAY, issuerUrl: 'https://issuer.example', apiKey: 'k', policy, fetch: stack.fetch,
    serialStore: null, manifestStore: null, cacheSecretStore: memoryCacheSecretStore(), k, clock: () => 1_800_000_000,
  });
  c.wallet = { take: async () => ({ bytes: new Uint8Array(64), tokenKeyId: TOKEN_KEY_ID }), count: 1 };
  c.tokenKeyChecked = toHex(TOKEN_KEY_ID);
  c.verifiedNodes = async () => stack.nodes;
  return c;
}
const ask = (c, content = 'hi') => c.chat.completions.create({ model: 'm', messages: [{ role: 'user', content }], cacheScope: null });

test('nodes with X-Wing keys get sealed v2; the node opens it with its X-Wing key', async () => {
  const stack = await fakeChatStack({ nodes: 3 });
  const c = chatClient(stack);
  assert.equal(await c.innerKem('m'), KEM_XWING);
  assert.equal(await c.innerKem('other-model'), null);
  assert.equal(c.lastSealedVersion, null);
  const answer = await ask(c);
  assert.equal(answer.choices[0].message.content, 'ok');
  assert.equal(stack.last().version, 2);
  assert.equal(stack.last().candidates.length, 3);
  assert.equal(c.lastSealedVersion, 2);
  // The envelope the gateway read: version 2, suite 0x647a/1/1, then 3 × (16 + 8 + 1120 + 32).
  const env = decodeRequest(stack.gatewaySaw.at(-1)).content;
  assert.equal(toHex(env.subarray(0, 7)), '02647a00010001');
  assert.ok(env.length > 7 + 16 + 1 + 1 + 1 + 1 + 3 * (16 + 8 + 1120 + 32));
});

test('X-Wing nodes are preferred: candidates among them only, never mixed with X25519 ones', async () => {
  const stack = await fakeChatStack({ nodes: 5, legacyNodes: 3 });
  const pqIds = new Set(stack.nodes.filter((n) => n.pqPublicKey).map((n) => toHex(n.nodeId)));
  assert.equal(pqIds.size, 2);
  const c = chatClient(stack, { k: 3 });
  assert.equal(await c.innerKem('m'), KEM_XWING);
  for (let i = 0; i < 6; i++) {
    await ask(c, `q${i}`);
    const { candidates, version } = stack.last();
    assert.equal(version, 2);
    assert.equal(candidates.length, 2, 'k capped by the X-Wing nodes, not filled with X25519 ones');
    assert.ok(candidates.every((id) => pqIds.has(id)), 'only X-Wing nodes are candidates');
  }
});

test('a legacy stack (X25519-only nodes) still gets sealed v1', async () => {
  const stack = await fakeChatStack({ nodes: 2, legacyNodes: 2 });
  const c = chatClient(stack, { k: 2 });
  assert.equal(await c.innerKem('m'), KEM_X25519);
  const chunks = [];
  for await (const ch of await c.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }], stream: true })) chunks.push(ch);
  assert.equal(chunks.map((x) => x.choices[0].delta.content).join(''), 'ok');
  assert.equal(stack.last().version, 1);
  assert.equal(stack.last().candidates.length, 2);
  assert.equal(c.lastSealedVersion, 1);
});

test('verified nodes carry the attested X-Wing key; post_quantum.require refuses X25519-only nodes', async (t) => {
  const f = simFixture(t);
  if (!f) return;
  const directory = { nodes: [f.entry, f.entry_x25519] };
  const client = async (signed) => {
    const policy = await loadTrustPolicy(signed, f.release_pubkey_pem, { now: f.now });
    const c = createClient({
      relayUrl: RELAY, issuerUrl: 'https://issuer.example', apiKey: 'k', policy, serialStore: null, manifestStore: null,
      cacheSecretStore: memoryCacheSecretStore(), clock: () => f.now,
      fetch: async () => { throw new Error('nothing may be sent'); },
    });
    // The gateway's directory, as the client gets it through the relay.
    c.innerGet = async (p) => {
      assert.equal(p, '/v1/nodes');
      return { status: 200, headers: [], content: new TextEncoder().encode(JSON.stringify(directory)) };
    };
    c.wallet = { take: async () => { throw new Error('no token may be spent'); }, count: 0 };
    return c;
  };
  // Without the requirement both verify; the X-Wing key is the one from the claims.
  const open = await client(f.signed);
  const nodes = await open.verifiedNodes();
  assert.deepEqual(nodes.map((n) => n.pqPublicKey && toHex(n.pqPublicKey)), [f.pq_public_key, null]);
  assert.equal(await open.innerKem('m'), KEM_XWING);
  // With it, the X25519-only node fails its post_quantum check and is listed as rejected.
  const strict = await client(f.signed_pq_required);
  const only = await strict.verifiedNodes();
  assert.deepEqual(only.map((n) => toHex(n.nodeId)), [f.entry.node_id]);
  const why = strict.rejected[f.entry_x25519.node_id].join(' ');
  assert.match(why, /post_quantum: the manifest requires post-quantum keys/);
  // A model only X25519-only nodes serve has no verified node: refused before anything is sent.
  directory.nodes = [f.entry_x25519];
  const none = await client(f.signed_pq_required);
  await assert.rejects(
    none.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }] }),
    (e) => e instanceof NoVerifiedNodeError && /post_quantum/.test(e.message),
  );
});
