// End-to-end against a running stack: reads STATE/client.json (argv[2] or
// $OPENPCC_CLIENT_CONFIG), sends one private streamed chat, prints a JSON summary.
import { readFileSync } from 'node:fs';
import { createClient, NoVerifiedNodeError, VerificationError } from '../src/index.js';

const cfgPath = process.argv[2] ?? process.env.OPENPCC_CLIENT_CONFIG;
const prompt = process.argv[3] ?? 'Say hello privately';
const cfg = JSON.parse(readFileSync(cfgPath, 'utf8'));
const client = createClient({
  relayUrl: cfg.relay_url,
  issuerUrl: cfg.issuer_url,
  apiKey: readFileSync(cfg.api_key_file, 'utf8').trim(),
  policy: readFileSync(cfg.policy, 'utf8'),
  releasePublicKey: readFileSync(cfg.release_pubkey, 'utf8'),
});
const t0 = performance.now();
let first = null;
const chunks = [];
const stream = await client.chat.completions.create({
  model: cfg.model,
  messages: [{ role: 'user', content: prompt }],
  stream: true,
});
for await (const chunk of stream) {
  first ??= performance.now() - t0;
  chunks.push(chunk);
}
const text = chunks.map((c) => c.choices?.[0]?.delta?.content ?? '').join('');
// The next turn of the same conversation: the same cache salt, so affinity lists the node
// that answered first and the gateway (unloaded) sends it there.
const firstNode = client.lastNodeId;
await client.chat.completions.create({
  model: cfg.model,
  messages: [{ role: 'user', content: prompt }, { role: 'assistant', content: text }, { role: 'user', content: 'And once more?' }],
});
const conversationNodes = [firstNode, client.lastNodeId];
const nodes = await client.verifiedNodes();
const second = await client.chat.completions.create({ model: cfg.model, messages: [{ role: 'user', content: 'again' }] });
// Typed failures: an unknown model, and a manifest under a key that is not pinned.
let unknownModel = null;
try { await client.chat.completions.create({ model: 'no-such-model', messages: [], stream: false }); } catch (e) { unknownModel = e instanceof NoVerifiedNodeError ? e.name : `wrong: ${e}`; }
const otherKey = '-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n';
let unpinned = null;
try {
  const bad = createClient({ relayUrl: cfg.relay_url, issuerUrl: cfg.issuer_url, apiKey: 'x', policy: readFileSync(cfg.policy, 'utf8'), releasePublicKey: otherKey });
  await bad.chat.completions.create({ model: cfg.model, messages: [] });
} catch (e) { unpinned = e instanceof VerificationError ? e.name : `wrong: ${e}`; }
process.stdout.write(JSON.stringify({
  unknown_model_error: unknownModel,
  unpinned_manifest_error: unpinned,
  text,
  chunks: chunks.length,
  first_chunk_ms: Math.round(first),
  total_ms: Math.round(performance.now() - t0),
  verified_nodes: nodes.map((n) => Buffer.from(n.nodeId).toString('hex')),
  models: await client.models(),
  tokens_left: client.wallet.count,
  non_streamed: second.choices?.[0]?.message?.content ?? null,
  conversation_node_ids: conversationNodes,
  // The outer layer's KEM: X-Wing (0x647a) whenever the manifest pins the gateway's X-Wing config.
  outer_kem: (await client.keyConfig()).kemId,
  // The inner layer's: X-Wing (sealed v2) whenever a verified node serving the model attests an X-Wing key.
  inner_kem: await client.innerKem(cfg.model),
  sealed_version: client.lastSealedVersion,
}) + '\n');
