// The OpenPCC client: private, attested chat completions through a relay.
// Mirrors openpcc/client/client.py: tokens from the wallet; k random candidates among
// the nodes whose bundles verified under the signed release manifest (only those attesting
// an X-Wing key whenever the model has any; the node that answered a conversation's last
// turn first); the OpenAI request, with its cache salt, sealed to them (v2 with X-Wing,
// else v1 with X25519); wrapped with the token in chunked OHTTP; POSTed to the relay; the
// answer streamed back, each layer opened incrementally, the node's authenticated end of
// stream required. Runs in browsers and Node >= 20 (fetch, WebCrypto, streams only).
import { decodeResponse, encodeRequest } from './bhttp.js';
import {
  Affinity, CONVERSATION, CacheSecret, NODE_ID_HEADER, SALT_HEADER, defaultCacheSecretStore, deriveCacheSalt,
} from './cachescope.js';
import { fromHex, randomBytes, te, toHex } from './bytes.js';
import { loadTrustPolicy, verifyNodeEntry, verifySignedManifest } from './attestation.js';
import {
  DecodeError, GatewayError, NoCapacityError, NoVerifiedNodeError, NodeError, OpenPCCError, RelayError,
  TokenRejectedError, TruncatedError, TruncatedResponseError, VerificationError,
} from './errors.js';
import { ChunkedRequestSender, KEM_X25519, KEM_XWING, MEDIA_TYPE_CHUNKED_REQUEST, MEDIA_TYPE_REQUEST, encapsulateRequest, parseKeyConfigs } from './ohttp.js';
import { TokenWallet, formatAuthorization, selectTokenKey } from './privacypass.js';
import { MAX_CANDIDATES, REQUEST_MEDIA_TYPE, sealRequest } from './sealed.js';
import { NodeTruncatedError, ResponseUnwrapper } from './unwrap.js';

const GATEWAY_AUTHORITY = 'gateway';
const KEYS_PATH = '/.well-known/ohttp-gateway';
const MANIFEST_PATH = '/v1/release-manifest';
// A manifest is due for refresh once less than this share of its lifetime remains.
const MANIFEST_REFRESH_SHARE = 0.25;
// At most one refresh attempt per this many seconds (by the client's clock).
const MANIFEST_RETRY_S = 60;

/** Incremental Server-Sent Events parser: feed(bytes) -> parsed JSON objects or DONE. */
export const DONE = Symbol('DONE');
export class SSEParser {
  constructor() { this.buf = ''; this.dec = new TextDecoder(); }
  /** An event cut off before its blank line is not dispatched (WHATWG HTML 9.2.6). */
  endOfInput() { this.buf = ''; return []; }
  receiveData(bytes) {
    this.buf += this.dec.decode(bytes, { stream: true });
    const out = [];
    let i;
    while ((i = this.buf.search(/\r?\n\r?\n/)) >= 0) {
      const m = /\r?\n\r?\n/.exec(this.buf.slice(i));
      const event = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + m[0].length);
      const data = event.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (!data) continue;
      out.push(data === '[DONE]' ? DONE : JSON.parse(data));
    }
    return out;
  }
}

/**
 * k candidates: the node that answered this conversation's last turn first (when it is
 * among `nodes`), the others random, as for a first turn.
 */
function chooseCandidates(nodes, k, preferredHex) {
  const first = preferredHex ? nodes.find((n) => toHex(n.nodeId) === preferredHex) : undefined;
  if (!first) return randomSample(nodes, k);
  return [first, ...randomSample(nodes.filter((n) => n !== first), k - 1)];
}

/** The answering node's id from the sealed response head: exactly one 32-hex value, else null. */
function nodeIdOf(fields) {
  const td = new TextDecoder();
  const values = (fields ?? []).filter(([n]) => td.decode(n).toLowerCase() === NODE_ID_HEADER).map(([, v]) => td.decode(v));
  return values.length === 1 && /^[0-9a-f]{32}$/.test(values[0]) ? values[0] : null;
}

function checkScope(scope) {
  if (scope !== undefined && scope !== null && typeof scope !== 'string') {
    throw new TypeError("cacheScope must be 'conversation', a name, or null");
  }
}

function randomSample(list, k) {
  const a = list.slice();
  for (let i = a.length - 1; i > 0; i--) {
    const r = new Uint32Array(1);
    globalThis.crypto.getRandomValues(r);
    const j = r[0] % (i + 1);
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a.slice(0, k);
}

function problemOf(bytes) {
  try { const o = JSON.parse(new TextDecoder().decode(bytes)); return o && typeof o === 'object' ? o : null; } catch { return null; }
}

function fieldValue(fields, name) {
  const td = new TextDecoder();
  for (const [n, v] of fields ?? []) if (td.decode(n).toLowerCase() === name) return td.decode(v);
  return null;
}

/**
 * Where a refreshed release manifest comes from: undefined or 'gateway' -> the gateway's
 * GET /v1/release-manifest through the relay; an absolute https:// URL -> fetched directly;
 * null -> never refreshed.
 */
function manifestSource(manifestUrl) {
  if (manifestUrl === null) return null;
  if (manifestUrl === undefined || manifestUrl === 'gateway') return { kind: 'gateway' };
  let url;
  try { url = new URL(manifestUrl); } catch { url = null; }
  if (typeof manifestUrl !== 'string' || !url || url.protocol !== 'https:') {
    throw new TypeError("manifestUrl must be 'gateway', an absolute https:// URL or null");
  }
  return { kind: 'url', url: url.href };
}

/** The policy that should replace `b`: a higher serial, or the same one re-signed for longer. */
const supersedes = (a, b) => a.manifest.serial > b.manifest.serial
  || (a.manifest.serial === b.manifest.serial && a.manifest.expiresAt > b.manifest.expiresAt);

function isCurrent(policy, now) {
  try { policy.checkCurrent(now); return true; } catch { return false; }
}

/**
 * The gateway key config to send with (both request kinds): only configs the manifest pins
 * (key consistency), offering HKDF-SHA256 / AES-128-GCM; X-Wing (KEM 0x647a) if one is
 * pinned, else X25519. Under the manifest's `post_quantum.require`, a gateway (or a
 * manifest) with no pinned X-Wing config is refused with VerificationError: no silent
 * downgrade. Mirrors openpcc/client/client.py choose_key_config.
 */
export async function chooseKeyConfig(configs, policy) {
  const pinned = [];
  for (const c of configs) if (await policy.acceptsOhttpKey(c.encoded)) pinned.push(c);
  if (!pinned.length) throw new VerificationError("the gateway's OHTTP keys are not the ones the release manifest pins");
  const usable = pinned.filter((c) => c.supports(1, 1));
  const pq = usable.find((c) => c.kemId === KEM_XWING);
  if (pq) return pq;
  if (policy.postQuantumRequired) {
    const why = policy.pinsPostQuantumKey?.() === false
      ? 'the release manifest pins none'
      : 'the gateway offers no X-Wing key config the release manifest pins';
    throw new VerificationError(`the release manifest requires a post-quantum (X-Wing) OHTTP key and ${why}`);
  }
  if (!usable.length) throw new RelayError('the gateway offers no key config this client supports');
  return usable[0];
}

export class OpenPCCClient {
  /**
   * @param {object} o
   * @param {string} o.relayUrl
   * @param {TokenWallet} o.wallet
   * @param {import('./attestation.js').TrustPolicy | Promise<any>} o.policy verified trust policy
   * @param {number} [o.k]
   * @param {typeof fetch} [o.fetch]
   * @param {() => number} [o.clock] Unix seconds (default: Date.now() / 1000)
   * @param {any} [o.releasePublicKey] pinned release key(s): without them no refresh
   * @param {string | null} [o.manifestUrl] refresh source (see createClient)
   * @param {object | null} [o.manifestStore] where a refreshed manifest is kept
   * @param {object | null} [o.serialStore] highest serial seen, per signer
   * @param {string | null} [o.cacheScope] default cache scope of chat requests
   * @param {object | null} [o.cacheSecretStore] where the cache secret is kept
   * @param {boolean} [o.affinity] list the node that answered a conversation first next turn
   */
  constructor({
    relayUrl, wallet, policy, k = 3, fetch: f, clock, releasePublicKey, manifestUrl, manifestStore, serialStore,
    cacheScope = CONVERSATION, cacheSecretStore, affinity = true,
  }) {
    if (!(k >= 1 && k <= MAX_CANDIDATES)) throw new RangeError(`k must be 1..${MAX_CANDIDATES}`);
    checkScope(cacheScope);
    this.relayUrl = relayUrl.replace(/\/+$/, '');
    this.wallet = wallet;
    this.policyPromise = Promise.resolve(policy);
    // A bad manifest surfaces on first use (typed); never as an unhandled rejection.
    this.policyPromise.catch(() => {});
    this.k = k;
    this.fetch = f ?? ((...a) => globalThis.fetch(...a));
    // Unix seconds: what manifests, claims and the node cache are judged by (injectable).
    this.clock = clock ?? (() => Date.now() / 1000);
    this.keyConfigPromise = null;
    this.nodes = null;
    this.nodesAt = 0;
    this.rejected = {};
    this.directoryTtl = 30;
    this.tokenKeyChecked = null;
    // Manifest refresh: only with pinned keys to verify a new manifest under.
    const source = manifestSource(manifestUrl);
    this.manifestSource = releasePublicKey ? source : null;
    this.releaseKeys = releasePublicKey ?? null;
    this.manifestStore = manifestStore === undefined ? defaultManifestStore() : manifestStore;
    this.serialStore = serialStore === undefined ? defaultSerialStore() : serialStore;
    this.manifestEtag = null;
    this.manifestAttemptAt = -Infinity;
    this.manifestRefreshing = null;
    /** The last refresh failure (a refused manifest, an unreachable source), or null. */
    this.manifestRefreshError = null;
    this.policyGeneration = 0;
    // Prefix cache scope and affinity (docs/PROTOCOL.md; src/cachescope.js).
    this.cacheScope = cacheScope;
    this.cacheSecret = new CacheSecret(cacheSecretStore === undefined ? defaultCacheSecretStore() : cacheSecretStore, { clock: this.clock });
    this.affinity = affinity === false ? null : new Affinity();
    /** The node id (32 hex) the last sealed answer named (openpcc-node-id), or null. */
    this.lastNodeId = null;
    /** The sealed-request version of the last request: 2 (X-Wing), 1 (X25519), or null. */
    this.lastSealedVersion = null;
    const self = this;
    this.chat = { completions: { create: (params) => self.#createChat(params) } };
    this.completions = { create: (params) => self.#createCompletion(params) };
  }

  policy() { return this.policyPromise; }

  /** The gateway's OHTTP key config, through the relay, pinned by the manifest. */
  keyConfig() {
    this.keyConfigPromise ??= this.#fetchKeyConfig().catch((e) => { this.keyConfigPromise = null; throw e; });
    return this.keyConfigPromise;
  }

  async #fetchKeyConfig() {
    let r;
    try { r = await this.fetch(this.relayUrl + KEYS_PATH); } catch (e) { throw new RelayError(`cannot reach the relay: ${e.message}`); }
    if (r.status !== 200) throw new RelayError(`relay answered ${r.status} for the gateway keys`);
    return chooseKeyConfig(parseKeyConfigs(new Uint8Array(await r.arrayBuffer())), await this.policy());
  }

  async #post(body, contentType, extra = {}) {
    try {
      return await this.fetch(this.relayUrl + '/', { method: 'POST', body, headers: { 'Content-Type': contentType, ...extra } });
    } catch (e) {
      throw new RelayError(`cannot reach the relay: ${e.message}`);
    }
  }

  /** A small GET to the gateway inside plain OHTTP (discovery; no token). */
  async innerGet(path, { headers = [] } = {}) {
    const cfg = await this.keyConfig();
    const req = encodeRequest({ method: 'GET', scheme: 'https', authority: GATEWAY_AUTHORITY, path, headers });
    const enc = await encapsulateRequest(cfg, req);
    const r = await this.#post(enc.request, MEDIA_TYPE_REQUEST);
    if (r.status !== 200) throw new RelayError(`relay/gateway answered ${r.status} to an OHTTP request`);
    const resp = decodeResponse(await enc.decapsulate(new Uint8Array(await r.arrayBuffer())));
    return resp;
  }

  /**
   * Refresh the release manifest if it is due: less than a quarter of its lifetime left,
   * or expired. At most one attempt per 60 s (client clock); a failure is kept in
   * manifestRefreshError and fails nothing, unless the manifest has expired (then this
   * throws VerificationError: nothing can be verified under it any more).
   */
  async #refreshManifestIfDue() {
    if (!this.manifestSource) return;
    if (this.manifestRefreshing) await this.manifestRefreshing;
    let policy = await this.policy();
    const now = this.clock();
    const { issuedAt, expiresAt } = policy.manifest;
    if (expiresAt - now >= (expiresAt - issuedAt) * MANIFEST_REFRESH_SHARE) return;
    if (now - this.manifestAttemptAt >= MANIFEST_RETRY_S && !this.manifestRefreshing) {
      this.manifestAttemptAt = now;
      this.manifestRefreshing = this.#refreshManifest(policy, now)
        .then(() => { this.manifestRefreshError = null; }, (e) => { this.manifestRefreshError = e; })
        .finally(() => { this.manifestRefreshing = null; });
    }
    if (this.manifestRefreshing) await this.manifestRefreshing;
    policy = await this.policy();
    const later = this.clock();
    if (later >= policy.manifest.expiresAt) {
      const why = this.manifestRefreshError ? `; refreshing it failed: ${this.manifestRefreshError.message}` : '; no newer one yet';
      throw new VerificationError(`release manifest expired at ${new Date(policy.manifest.expiresAt * 1000).toISOString()}${why}`);
    }
  }

  /** One refresh attempt: fetch, verify (pinned key, window, serial), store, swap. */
  async #refreshManifest(current, now) {
    const got = await this.#fetchManifest();
    if (!got) return; // 304: what we have is what there is
    const next = await loadTrustPolicy(got.text, this.releaseKeys, { now });
    if (next.manifest.serial < current.manifest.serial) {
      throw new VerificationError(`refreshed release manifest has serial ${next.manifest.serial}, older than the current ${current.manifest.serial} (rollback); keeping the current one`);
    }
    if (supersedes(next, current)) {
      await rememberSerial(next, this.serialStore);
      try { await this.manifestStore?.set(got.text); } catch { /* kept in memory only */ }
      this.#swapPolicy(next);
    }
    this.manifestEtag = got.etag;
  }

  /** {text, etag} of the source's manifest; null when unchanged (304). */
  async #fetchManifest() {
    const etag = this.manifestEtag;
    if (this.manifestSource.kind === 'gateway') {
      const resp = await this.innerGet(MANIFEST_PATH, { headers: etag ? [['if-none-match', etag]] : [] });
      if (resp.status === 304) return null;
      if (resp.status !== 200) throw new GatewayError(resp.status, problemOf(resp.content));
      return { text: new TextDecoder('utf-8', { fatal: true }).decode(resp.content), etag: fieldValue(resp.headers, 'etag') };
    }
    let r;
    try {
      r = await this.fetch(this.manifestSource.url, { headers: etag ? { 'If-None-Match': etag } : {} });
    } catch (e) {
      throw new OpenPCCError(`cannot reach the manifest URL: ${e.message}`);
    }
    if (r.status === 304) return null;
    if (r.status !== 200) throw new OpenPCCError(`the manifest URL answered ${r.status}`);
    return { text: await r.text(), etag: r.headers.get('etag') };
  }

  /** Trust `next` from now on: nodes, the gateway's keys and the token key are checked again. */
  #swapPolicy(next) {
    this.policyPromise = Promise.resolve(next);
    this.policyGeneration += 1;
    this.nodes = null;
    this.nodesAt = 0;
    this.rejected = {};
    this.keyConfigPromise = null;
    this.tokenKeyChecked = null;
  }

  /** Every node in the gateway's directory whose bundle verifies (cached briefly). */
  async verifiedNodes({ refresh = false } = {}) {
    await this.#refreshManifestIfDue();
    const now = this.clock();
    if (refresh || !this.nodes || now - this.nodesAt > this.directoryTtl) {
      const generation = this.policyGeneration;
      const policyPromise = this.policy();
      const resp = await this.innerGet('/v1/nodes');
      if (resp.status !== 200) throw new GatewayError(resp.status, problemOf(resp.content));
      let entries;
      try { entries = JSON.parse(new TextDecoder().decode(resp.content)).nodes; } catch { entries = null; }
      if (!Array.isArray(entries)) throw new GatewayError(502, { title: 'malformed node directory' });
      const policy = await policyPromise;
      const nodes = [];
      this.rejected = {};
      for (const e of entries) {
        try {
          nodes.push(await verifyNodeEntry(e, policy, now));
        } catch (err) {
          if (!(err instanceof OpenPCCError)) throw err;
          this.rejected[String(e?.node_id ?? '?')] = [err.message];
        }
      }
      // Verified under a policy swapped out meanwhile: good for this answer, not the cache.
      if (generation !== this.policyGeneration) return nodes.filter((n) => n.expiresAt > now);
      this.nodes = nodes;
      this.nodesAt = now;
    }
    return this.nodes.filter((n) => n.expiresAt > now);
  }

  /**
   * The KEM requests for `model` are sealed with (the inner layer; keyConfig().kemId is
   * the outer one): KEM_XWING (sealed v2) when a verified node serving it attests an
   * X-Wing key, else KEM_X25519 (v1); null when no verified node serves it.
   */
  async innerKem(model) {
    const nodes = (await this.verifiedNodes()).filter((n) => n.models.includes(model));
    if (!nodes.length) return null;
    return nodes.some((n) => n.pqPublicKey) ? KEM_XWING : KEM_X25519;
  }

  /** Models served by at least one verified node. */
  async models() {
    return [...new Set((await this.verifiedNodes()).flatMap((n) => n.models))].sort();
  }

  /** Key consistency: the token key must be pinned and be the one the gateway redeems. */
  async #checkTokenKey(keyId) {
    const policy = await this.policy();
    if (!policy.acceptsTokenKey(keyId)) throw new VerificationError('the token key is not the one the release manifest pins (possible per-user key)');
    const hex = toHex(keyId);
    if (this.tokenKeyChecked === hex) return;
    const resp = await this.innerGet('/v1/issuer-directory');
    if (resp.status !== 200) throw new GatewayError(resp.status, problemOf(resp.content));
    const view = await selectTokenKey(JSON.parse(new TextDecoder().decode(resp.content)));
    if (!view.allKeyIds.has(hex)) throw new VerificationError("the issuer's token key is not in the directory the gateway redeems against (possible per-user key)");
    this.tokenKeyChecked = hex;
  }

  #createChat(params) {
    // cacheScope is the client's, not the OpenAI API's: it never reaches the node's engine.
    const { model, messages, stream, cacheScope, ...rest } = params ?? {};
    checkScope(cacheScope);
    const body = { model, messages, ...rest, stream: Boolean(stream) };
    const scope = cacheScope === undefined ? this.cacheScope : cacheScope;
    return this.#start(model, '/v1/chat/completions', body, { scope, messages });
  }

  /** Legacy completions have no conversation: no cache scope unless a name is given
   *  (per request, or as the client's cacheScope). */
  #createCompletion(params) {
    const { model, prompt, stream, cacheScope, ...rest } = params ?? {};
    checkScope(cacheScope);
    const scope = cacheScope === undefined ? this.cacheScope : cacheScope;
    return this.#start(model, '/v1/completions', { model, prompt, ...rest, stream: Boolean(stream) }, { scope });
  }

  /** The request's cache salt (null: none), from the cache secret in force now. */
  async #salt(model, { scope, messages }) {
    if (scope === null || (scope === CONVERSATION && !Array.isArray(messages))) return null;
    return deriveCacheSalt(await this.cacheSecret.current(), scope, { model, messages });
  }

  /** stream: true -> AsyncIterable of chunks (also a Promise-free object); else Promise<completion>. */
  #start(model, path, body, scope) {
    if (typeof model !== 'string' || !model) throw new TypeError('model is required');
    const gen = this.#request(model, path, body, scope);
    if (body.stream) return gen;
    return (async () => {
      for await (const item of gen) return item;
      throw new TruncatedResponseError('the node sent no completion');
    })();
  }

  async *#request(model, path, body, scope) {
    const saltBytes = await this.#salt(model, scope);
    const salt = saltBytes ? toHex(saltBytes) : null;
    let nodes = (await this.verifiedNodes()).filter((n) => n.models.includes(model));
    if (!nodes.length) nodes = (await this.verifiedNodes({ refresh: true })).filter((n) => n.models.includes(model));
    if (!nodes.length) throw new NoVerifiedNodeError(model, this.rejected);
    // One KEM per envelope, and X-Wing whenever the model has a node attesting it: a
    // recording of this request then needs ML-KEM-768 broken too (sealed v2).
    const pq = nodes.filter((n) => n.pqPublicKey);
    if (pq.length) nodes = pq;
    const chosen = chooseCandidates(nodes, Math.min(this.k, nodes.length), salt && this.affinity ? this.affinity.get(salt) : null);
    const inner = encodeRequest({
      method: 'POST', scheme: 'https', authority: 'node', path,
      // openpcc-sent-at, inside the encryption: the node refuses an old envelope, whoever
      // replays it (docs/PROTOCOL.md). The cache salt too: only the node sees the scope.
      headers: [
        ['content-type', 'application/json'], ['openpcc-sent-at', String(Math.floor(Date.now() / 1000))],
        ...(salt ? [[SALT_HEADER, salt]] : []),
      ],
      content: te.encode(JSON.stringify(body)),
    });
    const sreq = await sealRequest(chosen.map((n) => ({ nodeId: n.nodeId, publicKey: n.pqPublicKey ?? n.publicKey })), model, inner);
    this.lastSealedVersion = sreq.version;
    const token = await this.wallet.take();
    await this.#checkTokenKey(token.tokenKeyId);
    const outer = encodeRequest({
      method: 'POST', scheme: 'https', authority: GATEWAY_AUTHORITY, path: '/v1/infer',
      headers: [['authorization', formatAuthorization(token.bytes)], ['content-type', REQUEST_MEDIA_TYPE]],
      content: sreq.envelope,
    });
    const sender = await ChunkedRequestSender.create(await this.keyConfig());
    const wire = await sender.sealChunk(outer, true);
    const unwrap = new ResponseUnwrapper(sender.responseReceiver(), sreq.responseOpener());
    const sse = new SSEParser();
    const streaming = Boolean(body.stream);
    const errorBody = [];
    let nodeStatus = null;
    const nodeBody = [];
    const resp = await this.#post(wire, MEDIA_TYPE_CHUNKED_REQUEST, { Incremental: '?1' });
    if (resp.status !== 200) throw new RelayError(`relay answered ${resp.status}`);
    const answeredBy = (headers) => {
      const nodeId = nodeIdOf(headers);
      this.lastNodeId = nodeId;
      if (nodeId && salt && this.affinity) this.affinity.put(salt, nodeId);
    };
    const handle = function* (events) {
      for (const ev of events) {
        if (ev.type === 'node-head') { nodeStatus = ev.status; answeredBy(ev.headers); }
        else if (ev.type === 'node-data') {
          if (nodeStatus !== 200 || !streaming) nodeBody.push(ev.data);
          else for (const obj of sse.receiveData(ev.data)) if (obj !== DONE) yield obj;
        } else if (ev.type === 'gateway-body') errorBody.push(ev.data);
      }
    };
    try {
      const reader = resp.body.getReader();
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (e) {
          if (unwrap.gatewayStatus === 200 && nodeStatus !== null) throw new TruncatedResponseError(`connection lost mid-answer: ${e.message}`);
          throw new RelayError(`transport failed: ${e.message}`);
        }
        if (chunk.done) break;
        yield* handle(await unwrap.receiveData(chunk.value));
      }
      // The end may still carry content (a final chunk with data): same path.
      yield* handle(await unwrap.endOfInput());
      sse.endOfInput();
    } catch (e) {
      if (e instanceof NodeTruncatedError) throw new TruncatedResponseError(e.message);
      if (e instanceof TruncatedError) throw new TruncatedResponseError(`the answer was cut off: ${e.message}`);
      throw e;
    }
    if (unwrap.gatewayStatus !== 200) {
      const concatAll = (xs) => { const n = xs.reduce((a, x) => a + x.length, 0); const o = new Uint8Array(n); let p = 0; for (const x of xs) { o.set(x, p); p += x.length; } return o; };
      const problem = problemOf(concatAll(errorBody));
      const status = unwrap.gatewayStatus ?? 502;
      if (status === 401) throw new TokenRejectedError(status, problem);
      if (status === 503) throw new NoCapacityError(status, problem);
      throw new GatewayError(status, problem);
    }
    const bodyBytes = new Uint8Array(nodeBody.reduce((a, x) => a + x.length, 0));
    { let p = 0; for (const x of nodeBody) { bodyBytes.set(x, p); p += x.length; } }
    if (nodeStatus !== 200) throw new NodeError(nodeStatus ?? 0, bodyBytes);
    if (!streaming) yield JSON.parse(new TextDecoder().decode(bodyBytes));
  }
}

/**
 * createClient({relayUrl, issuerUrl, apiKey, policy, releasePublicKey, k?, fetch?, issuerName?,
 * batchSize?, clock?, serialStore?, manifestUrl?, manifestStore?, cacheScope?, cacheSecretStore?,
 * affinity?})
 * `policy`: the signed release manifest (JSON text or parsed object) or an already
 * verified TrustPolicy; `releasePublicKey`: the pinned Ed25519 key (PEM text, raw
 * 32 bytes, DER SPKI) or a list of them. The client starts from the newest valid of
 * `policy` and the manifest in `manifestStore` (one an earlier refresh kept), and
 * refreshes it before it expires from `manifestUrl` (default: the gateway, through the
 * relay).
 */
export function createClient(opts) {
  const {
    relayUrl, issuerUrl, apiKey, policy, releasePublicKey, k, fetch: f, issuerName, batchSize, clock, manifestUrl,
    cacheScope, cacheSecretStore, affinity,
  } = opts;
  if (!relayUrl || !issuerUrl || !apiKey || !policy) throw new TypeError('relayUrl, issuerUrl, apiKey and policy are required');
  const preverified = typeof policy?.acceptsTokenKey === 'function';
  if (!preverified && !releasePublicKey) throw new TypeError('releasePublicKey is required to verify the signed release manifest');
  const refreshable = Boolean(releasePublicKey) && manifestSource(manifestUrl) !== null;
  const serialStore = opts.serialStore === undefined ? defaultSerialStore() : opts.serialStore;
  const manifestStore = opts.manifestStore === undefined ? defaultManifestStore() : opts.manifestStore;
  const now = (clock ?? (() => Date.now() / 1000))();
  const trust = startupPolicy(policy, releasePublicKey, { now, serialStore, manifestStore, allowExpired: refreshable });
  const wallet = new TokenWallet({ issuerUrl, apiKey, issuerName, batchSize, fetch: f });
  return new OpenPCCClient({
    relayUrl, wallet, policy: trust, k, fetch: f, clock, releasePublicKey, manifestUrl, manifestStore, serialStore,
    cacheScope, cacheSecretStore, affinity,
  });
}

/**
 * The policy a client starts from: the newest valid of the configured one and the stored
 * one (a stored manifest that does not verify under the pinned keys is ignored). With
 * `allowExpired` (the client can refresh) an expired manifest is accepted as a starting
 * point: it trusts no node, but its pinned OHTTP key lets the client fetch a new one.
 */
async function startupPolicy(configured, releaseKeys, { now, serialStore, manifestStore, allowExpired }) {
  const preverified = typeof configured?.acceptsTokenKey === 'function';
  const given = preverified ? configured : await verifySignedManifest(configured, releaseKeys);
  let stored = null;
  if (manifestStore && releaseKeys) {
    try {
      const text = await manifestStore.get();
      if (text) stored = await verifySignedManifest(text, releaseKeys);
    } catch { stored = null; }
  }
  let chosen = given;
  if (stored) {
    const [s, g] = [isCurrent(stored, now), isCurrent(given, now)];
    if ((s && !g) || (s === g && supersedes(stored, given))) chosen = stored;
  }
  // A policy handed in already verified is taken as it is (no window check here, no
  // serial memory), as before manifests were refreshed.
  if (preverified && chosen === given) return chosen;
  // Only an expired one (never one issued in the future) may wait for its refresh.
  if (!(allowExpired && now >= chosen.manifest.expiresAt)) chosen.checkCurrent(now);
  return rememberSerial(chosen, serialStore);
}

/**
 * Refuse `policy` if its manifest is older than one this store saw before (a rollback:
 * an older manifest, validly signed, may still trust a measurement a newer one retired);
 * else remember its serial, per signer. `store`: {get(keyId), set(keyId, serial)}, each
 * may return a promise; null to opt out.
 */
export async function rememberSerial(policy, store) {
  if (!store) return policy;
  const highest = Number((await store.get(policy.keyId)) ?? 0);
  const serial = policy.manifest.serial;
  if (serial < highest) {
    throw new VerificationError(`release manifest serial ${serial} is older than ${highest}, which this client verified before (rollback)`);
  }
  if (serial > highest) await store.set(policy.keyId, serial);
  return policy;
}

/** Serials kept in Web Storage (an extension's or page's localStorage): survive restarts. */
export function webStorageSerialStore(storage, prefix = 'openpcc:release-serial:') {
  return {
    get: (keyId) => storage.getItem(prefix + keyId),
    set: (keyId, serial) => storage.setItem(prefix + keyId, String(serial)),
  };
}

/** Serials kept in memory: they last as long as the process (Node: pass a store of your own). */
export function memorySerialStore() {
  const seen = new Map();
  return { get: (keyId) => seen.get(keyId), set: (keyId, serial) => { seen.set(keyId, serial); } };
}

/**
 * The last refreshed signed manifest (text) kept in Web Storage, so a reload starts from
 * it rather than from an older configured one.
 */
export function webStorageManifestStore(storage, key = 'openpcc:release-manifest') {
  return { get: () => storage.getItem(key), set: (text) => storage.setItem(key, text) };
}

/** The last refreshed manifest kept in memory (for as long as the process). */
export function memoryManifestStore() {
  let text = null;
  return { get: () => text, set: (t) => { text = t; } };
}

function defaultManifestStore() {
  try {
    if (globalThis.localStorage) return webStorageManifestStore(globalThis.localStorage);
  } catch { /* storage disabled */ }
  return memoryManifestStore();
}

function defaultSerialStore() {
  try {
    if (globalThis.localStorage) return webStorageSerialStore(globalThis.localStorage);
  } catch { /* storage disabled (opaque origin, privacy mode) */ }
  return memorySerialStore();
}
