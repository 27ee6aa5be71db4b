// The OpenPCC client: private, attested chat completions through a relay.
// Mirrors openpcc/client/client.py: tokens from the wallet; k random candidates among
// the nodes whose bundles verified under the signed release manifest; the OpenAI request
// sealed to them; wrapped with the token in chunked OHTTP; POSTed to the relay; the
// answer streamed back, each layer opened incrementally, the node's authenticated end of
// stream required. Runs in browsers and Node >= 20 (fetch, WebCrypto, streams only).
import { decodeResponse, encodeRequest } from './bhttp.js';
import { fromHex, randomBytes, te, toHex } from './bytes.js';
import { loadTrustPolicy, verifyNodeEntry } from './attestation.js';
import {
  DecodeError, GatewayError, NoCapacityError, NoVerifiedNodeError, NodeError, OpenPCCError, RelayError,
  TokenRejectedError, TruncatedError, TruncatedResponseError, VerificationError,
} from './errors.js';
import { ChunkedRequestSender, MEDIA_TYPE_CHUNKED_REQUEST, MEDIA_TYPE_REQUEST, encapsulateRequest, parseKeyConfigs } from './ohttp.js';
import { TokenWallet, formatAuthorization, selectTokenKey } from './privacypass.js';
import { MAX_CANDIDATES, REQUEST_MEDIA_TYPE, sealRequest } from './sealed.js';
import { NodeTruncatedError, ResponseUnwrapper } from './unwrap.js';

const GATEWAY_AUTHORITY = 'gateway';
const KEYS_PATH = '/.well-known/ohttp-gateway';

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

export class OpenPCCClient {
  /**
   * @param {object} o
   * @param {string} o.relayUrl
   * @param {TokenWallet} o.wallet
   * @param {import('./attestation.js').TrustPolicy | Promise<any>} o.policy verified trust policy
   * @param {number} [o.k]
   * @param {typeof fetch} [o.fetch]
   * @param {() => number} [o.clock] Unix seconds (default: Date.now() / 1000)
   */
  constructor({ relayUrl, wallet, policy, k = 3, fetch: f, clock }) {
    if (!(k >= 1 && k <= MAX_CANDIDATES)) throw new RangeError(`k must be 1..${MAX_CANDIDATES}`);
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
    let configs = parseKeyConfigs(new Uint8Array(await r.arrayBuffer()));
    const policy = await this.policy();
    const pinned = [];
    for (const c of configs) if (await policy.acceptsOhttpKey(c.encoded)) pinned.push(c);
    if (!pinned.length) throw new VerificationError("the gateway's OHTTP keys are not the ones the release manifest pins");
    configs = pinned.filter((c) => c.supports(1, 1));
    if (!configs.length) throw new RelayError('the gateway offers no key config this client supports');
    return configs[0];
  }

  async #post(body, contentType, extra = {}) {
    try {
      return await this.fetch(this.relayUrl + '/', { method: 'POST', body, headers: { 'Content-Type': contentType, ...extra } });
    } catch (e) {
      throw new RelayError(`cannot reach the relay: ${e.message}`);
    }
  }

  /** A small GET to the gateway inside plain OHTTP (discovery; no token). */
  async innerGet(path) {
    const cfg = await this.keyConfig();
    const req = encodeRequest({ method: 'GET', scheme: 'https', authority: GATEWAY_AUTHORITY, path });
    const enc = await encapsulateRequest(cfg, req);
    const r = await this.#post(enc.request, MEDIA_TYPE_REQUEST);
    if (r.status !== 200) throw new RelayError(`relay/gateway answered ${r.status} to an OHTTP request`);
    const resp = decodeResponse(await enc.decapsulate(new Uint8Array(await r.arrayBuffer())));
    return resp;
  }

  /** Every node in the gateway's directory whose bundle verifies (cached briefly). */
  async verifiedNodes({ refresh = false } = {}) {
    const now = this.clock();
    if (refresh || !this.nodes || now - this.nodesAt > this.directoryTtl) {
      const resp = await this.innerGet('/v1/nodes');
      if (resp.status !== 200) throw new GatewayError(resp.status, problemOf(resp.content));
      let entries;
      try { entries = JSON.parse(new TextDecoder().decode(resp.content)).nodes; } catch { entries = null; }
      if (!Array.isArray(entries)) throw new GatewayError(502, { title: 'malformed node directory' });
      const policy = await this.policy();
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
      this.nodes = nodes;
      this.nodesAt = now;
    }
    return this.nodes.filter((n) => n.expiresAt > now);
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
    const { model, messages, stream, ...rest } = params ?? {};
    const body = { model, messages, ...rest, stream: Boolean(stream) };
    return this.#start(model, '/v1/chat/completions', body);
  }

  #createCompletion(params) {
    const { model, prompt, stream, ...rest } = params ?? {};
    return this.#start(model, '/v1/completions', { model, prompt, ...rest, stream: Boolean(stream) });
  }

  /** stream: true -> AsyncIterable of chunks (also a Promise-free object); else Promise<completion>. */
  #start(model, path, body) {
    if (typeof model !== 'string' || !model) throw new TypeError('model is required');
    const gen = this.#request(model, path, body);
    if (body.stream) return gen;
    return (async () => {
      for await (const item of gen) return item;
      throw new TruncatedResponseError('the node sent no completion');
    })();
  }

  async *#request(model, path, body) {
    let nodes = (await this.verifiedNodes()).filter((n) => n.models.includes(model));
    if (!nodes.length) nodes = (await this.verifiedNodes({ refresh: true })).filter((n) => n.models.includes(model));
    if (!nodes.length) throw new NoVerifiedNodeError(model, this.rejected);
    const chosen = randomSample(nodes, Math.min(this.k, nodes.length));
    const inner = encodeRequest({
      method: 'POST', scheme: 'https', authority: 'node', path,
      // openpcc-sent-at, inside the encryption: the node refuses an old envelope, whoever
      // replays it (docs/PROTOCOL.md).
      headers: [['content-type', 'application/json'], ['openpcc-sent-at', String(Math.floor(Date.now() / 1000))]],
      content: te.encode(JSON.stringify(body)),
    });
    const sreq = await sealRequest(chosen.map((n) => ({ nodeId: n.nodeId, publicKey: n.publicKey })), model, inner);
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
    const handle = function* (events) {
      for (const ev of events) {
        if (ev.type === 'node-head') nodeStatus = ev.status;
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
 * createClient({relayUrl, issuerUrl, apiKey, policy, releasePublicKey, k?, fetch?, issuerName?, batchSize?})
 * `policy`: the signed release manifest (JSON text or parsed object) or an already
 * verified TrustPolicy; `releasePublicKey`: the pinned Ed25519 key (PEM text, raw
 * 32 bytes, DER SPKI) or a list of them.
 */
export function createClient(opts) {
  const { relayUrl, issuerUrl, apiKey, policy, releasePublicKey, k, fetch: f, issuerName, batchSize, clock } = opts;
  if (!relayUrl || !issuerUrl || !apiKey || !policy) throw new TypeError('relayUrl, issuerUrl, apiKey and policy are required');
  let trust;
  if (typeof policy?.acceptsTokenKey === 'function') trust = policy;
  else {
    if (!releasePublicKey) throw new TypeError('releasePublicKey is required to verify the signed release manifest');
    const serials = opts.serialStore === undefined ? defaultSerialStore() : opts.serialStore;
    const now = (clock ?? (() => Date.now() / 1000))();
    trust = loadTrustPolicy(policy, releasePublicKey, { now }).then((p) => rememberSerial(p, serials));
  }
  const wallet = new TokenWallet({ issuerUrl, apiKey, issuerName, batchSize, fetch: f });
  return new OpenPCCClient({ relayUrl, wallet, policy: trust, k, fetch: f, clock });
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

function defaultSerialStore() {
  try {
    if (globalThis.localStorage) return webStorageSerialStore(globalThis.localStorage);
  } catch { /* storage disabled (opaque origin, privacy mode) */ }
  return memorySerialStore();
}
