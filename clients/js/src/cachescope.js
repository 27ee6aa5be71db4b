// Conversation-scoped prefix caching without identity (docs/PROTOCOL.md, "Prefix cache
// scope and affinity"); mirrors openpcc/client/cachescope.py.
//
// A chat resends its whole history every turn. A salt the client derives from a secret
// only it holds and from the start of the conversation is the same for every turn of
// that conversation and different for any other conversation or client; it travels only
// inside the sealed request (inner header openpcc-cache-salt), so only the node sees it.
// Also here: the affinity memory (salt -> the node that answered last), so the next turn
// lists that node first and finds its cache.
import { fromHex, randomBytes, te, toHex } from './bytes.js';
import { hmacSha256 } from './crypto.js';

export const SALT_HEADER = 'openpcc-cache-salt';
export const NODE_ID_HEADER = 'openpcc-node-id';
export const CONVERSATION = 'conversation';
/** A cache secret is replaced by a fresh one once this old (seconds): 7 days. */
export const CACHE_SECRET_LIFETIME = 7 * 86400;
export const AFFINITY_ENTRIES = 1024;
export const CACHE_SECRET_KEY = 'openpcc.cacheSecret';
const LABEL = te.encode('openpcc cache scope v1\0');

/** Python's sort of str keys: by code point (JS's default compares UTF-16 code units). */
function byCodePoint(a, b) {
  for (let i = 0, j = 0; i < a.length && j < b.length;) {
    const x = a.codePointAt(i);
    const y = b.codePointAt(j);
    if (x !== y) return x - y;
    i += x > 0xffff ? 2 : 1;
    j += y > 0xffff ? 2 : 1;
  }
  return a.length - b.length;
}

function write(v) {
  if (v === null || typeof v !== 'object') {
    // Strings: JSON.stringify escapes exactly what Python's json.dumps(ensure_ascii=False)
    // does ("  \\  \b \f \n \r \t, other controls as \u00xx) and keeps U+2028/U+2029 and
    // every other character as itself. Integers and booleans print alike in both.
    return JSON.stringify(v);
  }
  if (Array.isArray(v)) return `[${v.map(write).join(',')}]`;
  const keys = Object.keys(v).sort(byCodePoint);
  return `{${keys.map((k) => `${JSON.stringify(k)}:${write(v[k])}`).join(',')}}`;
}

/**
 * UTF-8 bytes of `obj` as Python's
 * `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes it:
 * keys sorted (by code point) at every level, no whitespace, non-ASCII as itself. Exact
 * for JSON of objects, arrays, strings, booleans, null and integers. `obj` is first taken
 * as JSON.stringify sends it (toJSON applied; undefined members dropped), i.e. as the node
 * receives it. Outside that domain (no Python equivalent): a lone surrogate is written
 * \udxxx as JSON.stringify writes it; a non-integer number as JSON.stringify writes it.
 */
export function canonicalJson(obj) {
  const text = JSON.stringify(obj);
  if (text === undefined) throw new TypeError('canonicalJson: not representable as JSON');
  return te.encode(write(JSON.parse(text)));
}

/** The messages up to and including the first whose role is `user` (all if none is). */
export function conversationPrefix(messages) {
  const out = [];
  for (const m of messages) {
    out.push(m);
    if (m !== null && typeof m === 'object' && !Array.isArray(m) && m.role === 'user') break;
  }
  return out;
}

/**
 * The request's 32-byte salt, or null: no scope, or scope 'conversation' without messages.
 * `scope`: 'conversation' (the default), another string (a named scope, shared on
 * purpose), or null. `secret`: the client's cache secret (32 bytes).
 */
export async function deriveCacheSalt(secret, scope = CONVERSATION, { model = '', messages } = {}) {
  if (scope === null) return null;
  if (typeof scope !== 'string') throw new TypeError("cacheScope must be 'conversation', a name, or null");
  if (!(secret instanceof Uint8Array) || !secret.length) throw new TypeError('the cache secret must be a non-empty Uint8Array');
  if (scope === CONVERSATION) {
    if (messages === undefined || messages === null) return null;
    if (!Array.isArray(messages)) throw new TypeError('messages must be an array');
    const c = canonicalJson({ messages: conversationPrefix(messages), model });
    return hmacSha256(secret, concatAll([LABEL, te.encode('conversation\0'), c]));
  }
  return hmacSha256(secret, concatAll([LABEL, te.encode('named\0'), te.encode(scope)]));
}

function concatAll(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

/** `{secret, created}` from the stored JSON text, or null if absent or malformed. */
export function parseCacheSecret(text) {
  if (typeof text !== 'string' || !text) return null;
  try {
    const doc = JSON.parse(text);
    const secret = fromHex(doc.secret);
    const created = Number(doc.created_at);
    if (secret.length !== 32 || !Number.isFinite(created)) return null;
    return { secret, created };
  } catch {
    return null;
  }
}

/** The stored form, as the Python client writes cache-secret.json (without its newline). */
export function formatCacheSecret(secret, created) {
  return `{"secret": "${toHex(secret)}", "created_at": ${Math.floor(created)}}`;
}

/**
 * The client's cache secret: 32 random bytes kept in `store` ({get(), set(text)}, either
 * may return a promise; null: this client's memory only), replaced by a fresh one once
 * `lifetime` seconds old by `clock`. The store is read on every use, so clients sharing
 * it (tabs of one origin) share the secret; a malformed entry is replaced.
 */
export class CacheSecret {
  constructor(store, { clock = () => Date.now() / 1000, lifetime = CACHE_SECRET_LIFETIME } = {}) {
    this.store = store ?? null;
    this.clock = clock;
    this.lifetime = lifetime;
    this.held = null; // {secret, created}: the last one used (kept if the store fails)
    this.queue = Promise.resolve();
  }

  /** The secret in force now (one at a time: concurrent first uses make one secret). */
  current() {
    const next = this.queue.then(() => this.#current());
    this.queue = next.catch(() => {});
    return next;
  }

  async #current() {
    const now = this.clock();
    let cur = this.held;
    if (this.store) {
      let stored = null;
      try { stored = parseCacheSecret(await this.store.get()); } catch { stored = null; }
      if (stored && !(cur && cur.created > stored.created)) cur = stored;
    }
    if (!cur || now - cur.created >= this.lifetime) {
      cur = { secret: randomBytes(32), created: Math.floor(now) };
      try { await this.store?.set(formatCacheSecret(cur.secret, cur.created)); } catch { /* kept in memory only */ }
    }
    this.held = cur;
    return cur.secret;
  }
}

/** salt (hex) -> node id (hex) of the last answer; the least recently used dropped beyond the cap. */
export class Affinity {
  constructor(entries = AFFINITY_ENTRIES) { this.entries = entries; this.last = new Map(); }
  get(salt) {
    const node = this.last.get(salt);
    if (node !== undefined) { this.last.delete(salt); this.last.set(salt, node); }
    return node ?? null;
  }
  put(salt, nodeId) {
    this.last.delete(salt);
    this.last.set(salt, nodeId);
    while (this.last.size > this.entries) this.last.delete(this.last.keys().next().value);
  }
  get size() { return this.last.size; }
}

/** The cache secret kept in Web Storage (`localStorage`): shared by an origin's tabs, kept across reloads. */
export function webStorageCacheSecretStore(storage, key = CACHE_SECRET_KEY) {
  return { get: () => storage.getItem(key), set: (text) => storage.setItem(key, text) };
}

/** The cache secret kept in memory (for as long as the process). */
export function memoryCacheSecretStore() {
  let text = null;
  return { get: () => text, set: (t) => { text = t; } };
}

export function defaultCacheSecretStore() {
  try {
    if (globalThis.localStorage) return webStorageCacheSecretStore(globalThis.localStorage);
  } catch { /* storage disabled */ }
  return memoryCacheSecretStore();
}
