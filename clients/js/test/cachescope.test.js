// Prefix cache scope and affinity (docs/PROTOCOL.md): the shared vector, the salt inside
// the sealed request only, the cache secret's store and rotation, and affinity, against a
// fake relay + gateway + nodes with the real OHTTP and sealed layers (test/fakestack.js).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import {
  canonicalJson, createClient, deriveCacheSalt, memoryCacheSecretStore, webStorageCacheSecretStore, CACHE_SECRET_LIFETIME,
} from '../src/index.js';
import { Affinity, conversationPrefix } from '../src/cachescope.js';
import { VECTORS, REPO, readJson, hex, toHex } from './helpers.js';
import { RELAY, fakeChatStack, stubPolicy } from './fakestack.js';

const V = readJson(path.join(VECTORS, 'cache_scope_v1.json'));
const TOKEN_KEY_ID = new Uint8Array(32).fill(7);
const T0 = 1_800_000_000;

/** A client of the fake stack: no issuer (a stub wallet), nodes as verified, the clock injectable. */
function chatClient(stack, { clock = { t: T0 }, ...opts } = {}) {
  const c = createClient({
    relayUrl: RELAY, issuerUrl: 'https://issuer.example', apiKey: 'k', policy: stubPolicy(), fetch: stack.fetch,
    clock: () => clock.t, serialStore: null, manifestStore: null, cacheSecretStore: memoryCacheSecretStore(), k: 2, ...opts,
  });
  c.wallet = { take: async () => ({ bytes: new Uint8Array(64), tokenKeyId: TOKEN_KEY_ID }), count: 1 };
  c.tokenKeyChecked = toHex(TOKEN_KEY_ID);
  c.verifiedNodes = async () => stack.nodes.filter((n) => !n.gone);
  return c;
}

const SYS = { role: 'system', content: 'Be brief.' };
const turn1 = [SYS, { role: 'user', content: 'Tell me about Tokyo.' }];
const turn2 = [...turn1, { role: 'assistant', content: 'ok' }, { role: 'user', content: 'And Kyoto?' }];
const turn3 = [...turn2, { role: 'assistant', content: 'ok' }, { role: 'user', content: 'Thanks.' }];
const other = [SYS, { role: 'user', content: 'Something else.' }];
const saltOf = (stack) => {
  const v = stack.lastInner('openpcc-cache-salt');
  assert.ok(v.length <= 1, 'at most one salt header');
  return v[0] ?? null;
};
const secretOf = async (store) => hex(JSON.parse(await store.get()).secret);
const includes = (hay, needle) => Buffer.from(hay).includes(Buffer.from(needle));

test('cache_scope_v1.json: canonicalJson and deriveCacheSalt reproduce every case', async () => {
  const secret = hex(V.secret);
  assert.ok(V.cases.length >= 5);
  for (const c of V.cases) {
    const canon = canonicalJson({ messages: conversationPrefix(c.messages), model: c.model });
    assert.equal(toHex(canon), c.canonical_hex, JSON.stringify(c.messages));
    const salt = await deriveCacheSalt(secret, c.scope, { model: c.model, messages: c.messages });
    assert.equal(salt === null ? null : toHex(salt), c.salt, `scope ${c.scope}`);
    if (salt) assert.equal(salt.length, 32);
  }
  // The vector with U+2028 and an emoji, as raw UTF-8 (not \u escapes), as Python writes them.
  const tricky = V.cases.find((c) => JSON.stringify(c.messages).includes('\u2028'));
  assert.ok(tricky && Buffer.from(tricky.canonical_hex, 'hex').includes(Buffer.from('e280a8', 'hex')));
  assert.ok(Buffer.from(tricky.canonical_hex, 'hex').includes(Buffer.from('😀')));
  // The default scope is the conversation; no messages, no conversation.
  const first = V.cases[0];
  assert.equal(toHex(await deriveCacheSalt(secret, undefined, first)), first.salt);
  assert.equal(await deriveCacheSalt(secret, 'conversation', { model: 'm' }), null);
  await assert.rejects(deriveCacheSalt(secret, 42, first), TypeError);
});

test("canonicalJson is Python's json.dumps(sort_keys=True, separators=(',', ':'), ensure_ascii=False)", async (t) => {
  const samples = [
    { b: 1, a: [true, false, null, -3, 0, 12345678901], c: { z: '', y: {} }, d: [] },
    { '\uffff': 1, '😀': 2, é: 3, e: 4, E: 5, '': 6, ab: 7, a: 8 }, // code point order, not UTF-16
    { s: '\u0000\u0001\u001f\u007f\u0080\u00a0\u2028\u2029\ufeff"\\/\b\f\n\r\t 😀 東京' },
    [{ role: 'user', content: [{ type: 'text', text: 'hi' }, { type: 'image_url', image_url: { url: 'data:x' } }] }],
  ];
  const py = process.env.PYTHON || 'python3';
  let out;
  try {
    out = execFileSync(py, ['-c', `import json,sys
for line in sys.stdin.buffer.read().decode().split("\\n"):
    print(json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode().hex())`],
    { input: samples.map((s) => JSON.stringify(s)).join('\n'), cwd: REPO }).toString().trim().split('\n');
  } catch (e) {
    t.skip(`python unavailable: ${e.message.split('\n')[0]}`);
    return;
  }
  samples.forEach((s, i) => assert.equal(toHex(canonicalJson(s)), out[i], JSON.stringify(s)));
  // As JSON.stringify sends it: undefined members dropped, toJSON applied.
  assert.equal(Buffer.from(canonicalJson({ b: undefined, a: new Date(0) })).toString(), '{"a":"1970-01-01T00:00:00.000Z"}');
});

test('one conversation keeps its salt across turns; another conversation, or another client, gets another', async () => {
  const stack = await fakeChatStack();
  const store = memoryCacheSecretStore();
  const c = chatClient(stack, { cacheSecretStore: store });
  const r = await c.chat.completions.create({ model: 'm', messages: turn1 });
  assert.equal(r.choices[0].message.content, 'ok');
  const s1 = saltOf(stack);
  assert.match(s1, /^[0-9a-f]{64}$/);
  assert.equal(s1, toHex(await deriveCacheSalt(await secretOf(store), 'conversation', { model: 'm', messages: turn1 })));
  await c.chat.completions.create({ model: 'm', messages: turn2 });
  assert.equal(saltOf(stack), s1, 'turn 2');
  for await (const chunk of c.chat.completions.create({ model: 'm', messages: turn3, stream: true })) assert.ok(chunk.choices);
  assert.equal(saltOf(stack), s1, 'turn 3, streamed');
  await c.chat.completions.create({ model: 'm', messages: other });
  assert.notEqual(saltOf(stack), s1, 'another conversation');
  // Another model: another conversation.
  stack.nodes.forEach((n) => n.models.push('m2'));
  await c.chat.completions.create({ model: 'm2', messages: turn1 });
  assert.notEqual(saltOf(stack), s1, 'another model');
  // Another client (another secret), the same conversation: another salt.
  const c2 = chatClient(stack, { cacheSecretStore: memoryCacheSecretStore() });
  await c2.chat.completions.create({ model: 'm', messages: turn1 });
  assert.notEqual(saltOf(stack), s1, 'another client');
  // A client sharing the store (another tab of the origin) continues the conversation.
  const c3 = chatClient(stack, { cacheSecretStore: store });
  await c3.chat.completions.create({ model: 'm', messages: turn2 });
  assert.equal(saltOf(stack), s1, 'the same store');
});

test('the salt travels only inside the sealed request; cacheScope null sends none; cacheScope never reaches the node', async () => {
  const stack = await fakeChatStack();
  const c = chatClient(stack);
  await c.chat.completions.create({ model: 'm', messages: turn1, cacheScope: 'conversation', temperature: 0 });
  const salt = saltOf(stack);
  assert.ok(salt);
  assert.deepEqual(stack.last().body, { model: 'm', messages: turn1, temperature: 0, stream: false }, 'no cacheScope in the body');
  assert.equal(stack.lastInner('openpcc-sent-at').length, 1);
  // Nothing the relay or the gateway could read holds the salt, its bytes or the header name.
  for (const seen of [...stack.relaySaw, ...stack.gatewaySaw]) {
    for (const needle of [salt, Buffer.from(salt, 'hex'), 'openpcc-cache-salt', 'conversation']) {
      assert.ok(!includes(seen, needle), `${String(needle).slice(0, 20)} visible outside the sealed request`);
    }
  }
  await c.chat.completions.create({ model: 'm', messages: turn1, cacheScope: null });
  assert.equal(saltOf(stack), null, 'cacheScope: null per request');
  assert.ok(!('cacheScope' in stack.last().body));
  const off = chatClient(stack, { cacheScope: null });
  await off.chat.completions.create({ model: 'm', messages: turn1 });
  assert.equal(saltOf(stack), null, 'cacheScope: null for the client');
  await off.chat.completions.create({ model: 'm', messages: turn1, cacheScope: 'conversation' });
  assert.match(saltOf(stack), /^[0-9a-f]{64}$/, 'a request may still ask for one');
  assert.throws(() => c.chat.completions.create({ model: 'm', messages: turn1, cacheScope: 7 }), TypeError);
  assert.throws(() => chatClient(stack, { cacheScope: {} }), TypeError);
});

test('a named scope: one salt for every conversation, the vector derivation; legacy completions only with a name', async () => {
  const stack = await fakeChatStack();
  const store = memoryCacheSecretStore();
  const c = chatClient(stack, { cacheSecretStore: store });
  await c.chat.completions.create({ model: 'm', messages: turn1, cacheScope: 'my-agent' });
  const named = saltOf(stack);
  assert.equal(named, toHex(await deriveCacheSalt(await secretOf(store), 'my-agent')));
  await c.chat.completions.create({ model: 'm', messages: other, cacheScope: 'my-agent' });
  assert.equal(saltOf(stack), named);
  await c.chat.completions.create({ model: 'm', messages: turn1 });
  assert.notEqual(saltOf(stack), named);
  // Legacy completions have no conversation.
  await c.completions.create({ model: 'm', prompt: 'hi' });
  assert.equal(saltOf(stack), null);
  assert.deepEqual(stack.last().body, { model: 'm', prompt: 'hi', stream: false });
  await c.completions.create({ model: 'm', prompt: 'hi', cacheScope: 'conversation' });
  assert.equal(saltOf(stack), null);
  await c.completions.create({ model: 'm', prompt: 'hi', cacheScope: 'my-agent' });
  assert.equal(saltOf(stack), named);
  assert.ok(!('cacheScope' in stack.last().body));
  // A client whose scope is a name uses it for both.
  const agent = chatClient(stack, { cacheSecretStore: store, cacheScope: 'my-agent' });
  await agent.completions.create({ model: 'm', prompt: 'x' });
  assert.equal(saltOf(stack), named);
  await agent.chat.completions.create({ model: 'm', messages: other });
  assert.equal(saltOf(stack), named);
});

test('the cache secret: kept as {secret, created_at}, replaced by a fresh one after 7 days', async () => {
  const stack = await fakeChatStack();
  const clock = { t: T0 + 0.75 };
  const items = new Map();
  const storage = { getItem: (k) => items.get(k) ?? null, setItem: (k, v) => { items.set(k, String(v)); } };
  const c = chatClient(stack, { clock, cacheSecretStore: webStorageCacheSecretStore(storage) });
  await c.chat.completions.create({ model: 'm', messages: turn1 });
  const s1 = saltOf(stack);
  assert.deepEqual([...items.keys()], ['openpcc.cacheSecret']);
  const doc = JSON.parse(items.get('openpcc.cacheSecret'));
  assert.deepEqual(Object.keys(doc), ['secret', 'created_at']);
  assert.match(doc.secret, /^[0-9a-f]{64}$/);
  assert.equal(doc.created_at, T0);
  assert.equal(CACHE_SECRET_LIFETIME, 604800);
  clock.t = T0 + CACHE_SECRET_LIFETIME - 1;
  await c.chat.completions.create({ model: 'm', messages: turn2 });
  assert.equal(saltOf(stack), s1, 'still the same secret');
  clock.t = T0 + CACHE_SECRET_LIFETIME;
  await c.chat.completions.create({ model: 'm', messages: turn2 });
  const s2 = saltOf(stack);
  assert.notEqual(s2, s1, 'a fresh secret after 7 days');
  const doc2 = JSON.parse(items.get('openpcc.cacheSecret'));
  assert.notEqual(doc2.secret, doc.secret);
  assert.equal(doc2.created_at, T0 + CACHE_SECRET_LIFETIME);
  await c.chat.completions.create({ model: 'm', messages: turn3 });
  assert.equal(saltOf(stack), s2);
  // A secret written elsewhere (the Python client's form) is used as it is.
  items.set('openpcc.cacheSecret', `{"secret": "${V.secret}", "created_at": ${T0 + CACHE_SECRET_LIFETIME}}\n`);
  const fresh = chatClient(stack, { clock, cacheSecretStore: webStorageCacheSecretStore(storage) });
  await fresh.chat.completions.create({ model: 'm', messages: V.cases[0].messages });
  assert.equal(saltOf(stack), V.cases[0].salt);
  // A malformed one is replaced.
  items.set('openpcc.cacheSecret', 'not json');
  const again = chatClient(stack, { clock, cacheSecretStore: webStorageCacheSecretStore(storage) });
  await again.chat.completions.create({ model: 'm', messages: turn1 });
  assert.match(JSON.parse(items.get('openpcc.cacheSecret')).secret, /^[0-9a-f]{64}$/);
  // Concurrent first requests share one secret.
  const shared = memoryCacheSecretStore();
  const racer = chatClient(stack, { clock, cacheSecretStore: shared });
  await Promise.all([1, 2, 3].map(() => racer.chat.completions.create({ model: 'm', messages: turn1 })));
  const salts = new Set(stack.infers.slice(-3).map((i) => i.headers['openpcc-cache-salt'][0]));
  assert.equal(salts.size, 1);
  // No store (null): in this client's memory.
  const mem = chatClient(stack, { clock, cacheSecretStore: null });
  await mem.chat.completions.create({ model: 'm', messages: turn1 });
  const m1 = saltOf(stack);
  await mem.chat.completions.create({ model: 'm', messages: turn2 });
  assert.equal(saltOf(stack), m1);
});

test("affinity: the node that answered is listed first next turn, the others random; affinity: false doesn't", async () => {
  // The gateway takes the last candidate (as if the first were loaded): the client must
  // follow the node that answered, not the one it listed first.
  const stack = await fakeChatStack({ nodes: 5, route: (c) => c[c.length - 1] });
  const c = chatClient(stack, { k: 3 });
  assert.equal(c.lastNodeId, null);
  await c.chat.completions.create({ model: 'm', messages: turn1 });
  const answered = stack.last().answeredBy;
  assert.equal(c.lastNodeId, answered);
  stack.route = (cands) => cands[0];
  const others = new Set();
  for (const messages of [turn2, turn3, turn2, turn3, turn2, turn3]) {
    for await (const _ of c.chat.completions.create({ model: 'm', messages, stream: true })) { /* drain */ }
    const { candidates } = stack.last();
    assert.equal(candidates[0], answered, 'the answering node first');
    assert.equal(candidates.length, 3);
    assert.equal(new Set(candidates).size, 3);
    candidates.slice(1).forEach((x) => others.add(x));
    assert.equal(c.lastNodeId, answered);
  }
  assert.ok(others.size >= 3, 'the others are drawn at random');
  // No scope, no affinity: nothing remembered.
  const remembered = c.affinity.size;
  await c.chat.completions.create({ model: 'm', messages: other, cacheScope: null });
  assert.equal(c.affinity.size, remembered);
  // The node is gone from the verified nodes: k random others, and the next answer is remembered.
  stack.nodes.find((n) => toHex(n.nodeId) === answered).gone = true;
  await c.chat.completions.create({ model: 'm', messages: turn2 });
  assert.ok(!stack.last().candidates.includes(answered));
  assert.equal(stack.last().candidates.length, 3);
  const next = stack.last().answeredBy;
  await c.chat.completions.create({ model: 'm', messages: turn3 });
  assert.equal(stack.last().candidates[0], next);

  // affinity: false: random order always (the first candidate is not stuck to one node).
  const stack2 = await fakeChatStack({ nodes: 5 });
  const off = chatClient(stack2, { k: 3, affinity: false });
  const firsts = new Set();
  for (let i = 0; i < 24; i++) {
    await off.chat.completions.create({ model: 'm', messages: i ? turn2 : turn1 });
    firsts.add(stack2.last().candidates[0]);
    assert.equal(off.lastNodeId, stack2.last().answeredBy);
  }
  assert.ok(firsts.size > 1, 'random first candidates');
  assert.equal(stack2.lastInner('openpcc-cache-salt').length, 1, 'the salt is sent all the same');
});

test('no or a malformed openpcc-node-id: nothing remembered', async () => {
  const stack = await fakeChatStack({ nodes: 5, nodeIdHeader: false });
  const c = chatClient(stack, { k: 2 });
  await c.chat.completions.create({ model: 'm', messages: turn1 });
  assert.equal(c.lastNodeId, null);
  for (const bad of [(id) => [id.toUpperCase()], (id) => [id.slice(2)], (id) => [id, id], (id) => [`${id}00`]]) {
    stack.nodeIdHeader = bad;
    await c.chat.completions.create({ model: 'm', messages: turn1 });
    assert.equal(c.lastNodeId, null);
  }
  assert.equal(c.affinity.size, 0);
  stack.nodeIdHeader = true;
  await c.chat.completions.create({ model: 'm', messages: turn1 });
  assert.equal(c.lastNodeId, stack.last().answeredBy);
  assert.equal(c.affinity.size, 1);
});

test('affinity memory: least recently used dropped beyond its cap (1024 by default)', () => {
  const a = new Affinity(3);
  for (const s of ['a', 'b', 'c']) a.put(s, `n${s}`);
  assert.equal(a.get('a'), 'na'); // a is now the most recent
  a.put('d', 'nd');
  assert.equal(a.size, 3);
  assert.equal(a.get('b'), null);
  assert.equal(a.get('a'), 'na');
  a.put('c', 'nc2');
  a.put('e', 'ne');
  assert.equal(a.get('d'), null);
  assert.equal(a.get('c'), 'nc2');
  assert.equal(new Affinity().entries, 1024);
});
