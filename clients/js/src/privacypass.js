// Privacy Pass (RFC 9578 type 2, RFC 9577) token wallet over @cloudflare/privacypass-ts.
// Batched issuance (generic batch, privacypass-ts 0.8.1 layout) with a single-request
// fallback when the issuer answers 415. Mirrors openpcc/client/wallet.py (in memory).
import { TOKEN_TYPES, TokenChallenge, genericBatched, publicVerif } from '@cloudflare/privacypass-ts';
import { fromBase64, toBase64, toHex } from './bytes.js';
import { sha256 } from './crypto.js';
import { IssuerError } from './errors.js';

const { BlindRSAMode, Client } = publicVerif;
const BLIND_RSA = TOKEN_TYPES.BLIND_RSA.value;
export const WELL_KNOWN_DIRECTORY = '/.well-known/private-token-issuer-directory';
const DIRECTORY_TYPE = 'application/private-token-issuer-directory';
const TOKEN_REQUEST_TYPE = 'application/private-token-request';
const TOKEN_RESPONSE_TYPE = 'application/private-token-response';
const BATCH_REQUEST_TYPE = 'application/private-token-generic-batch-request';
const BATCH_RESPONSE_TYPE = 'application/private-token-generic-batch-response';

/** `Authorization: PrivateToken token="…"` (base64url with padding, RFC 9577 §2.1). */
export function formatAuthorization(tokenBytes) {
  return `PrivateToken token="${toBase64(tokenBytes, true, true)}"`;
}

/** Parse an issuer directory (RFC 9578 §4); returns the first type-2 key in force. */
export async function selectTokenKey(dir, now = Date.now() / 1000) {
  if (typeof dir?.['issuer-request-uri'] !== 'string' || !Array.isArray(dir['token-keys'])) {
    throw new IssuerError('the issuer directory is malformed');
  }
  const entries = dir['token-keys'].filter((k) => k && k['token-type'] === BLIND_RSA);
  const inForce = entries.filter((k) => k['not-before'] == null || k['not-before'] <= now);
  if (!inForce.length) throw new IssuerError('the issuer directory lists no token key in force');
  const tokenKey = fromBase64(inForce[0]['token-key']);
  const allIds = new Set();
  for (const e of entries) allIds.add(toHex(await sha256(fromBase64(e['token-key']))));
  return { tokenKey, tokenKeyId: await sha256(tokenKey), allKeyIds: allIds, inForce: inForce.length };
}

/** Tokens bought ahead of use, in batches; `take()` returns {bytes, tokenKeyId}. */
export class TokenWallet {
  /**
   * @param {{issuerUrl:string, apiKey:string, issuerName?:string, batchSize?:number,
   *          maxKeys?:number, fetch?:typeof fetch}} opts
   */
  constructor({ issuerUrl, apiKey, issuerName, batchSize = 10, maxKeys = 2, fetch: f }) {
    this.issuerUrl = issuerUrl.replace(/\/+$/, '');
    Object.defineProperty(this, 'apiKey', { value: apiKey, enumerable: false });
    const name = issuerName ?? new URL(this.issuerUrl).hostname;
    // What the gateway redeems: type 2, this issuer, no redemption context, any origin.
    this.challenge = new TokenChallenge(BLIND_RSA, name, new Uint8Array(0), []);
    this.batchSize = batchSize;
    this.maxKeys = maxKeys;
    this.fetch = f ?? ((...a) => globalThis.fetch(...a));
    this.tokens = [];
    this.batchOk = true;
    this.view = null;
    this.refilling = null;
  }

  get count() { return this.tokens.length; }

  async directory() {
    let r;
    try {
      r = await this.fetch(this.issuerUrl + WELL_KNOWN_DIRECTORY);
    } catch (e) {
      throw new IssuerError(`cannot reach the issuer at ${this.issuerUrl}: ${e.message}`);
    }
    if (r.status !== 200) throw new IssuerError(`the issuer answered ${r.status} for its directory`, { status: r.status });
    const ct = (r.headers.get('content-type') ?? '').split(';')[0].trim();
    if (ct !== DIRECTORY_TYPE) throw new IssuerError(`issuer directory has content type ${ct}`);
    const dir = await r.json();
    const view = await selectTokenKey(dir);
    if (view.inForce > this.maxKeys) {
      throw new IssuerError(`the issuer directory has ${view.inForce} keys in force: possible per-user keys; refusing`);
    }
    const requestUrl = new URL(dir['issuer-request-uri'], this.issuerUrl + '/').toString();
    if (new URL(requestUrl).origin !== new URL(this.issuerUrl).origin) {
      throw new IssuerError(`the directory names request URL ${requestUrl} outside the issuer; refusing to send the API key there`);
    }
    this.view = { ...view, requestUrl };
    return this.view;
  }

  async take() {
    if (!this.tokens.length) await this.refill();
    const t = this.tokens.shift();
    if (!t) throw new IssuerError('the issuer signed no tokens; try later');
    return t;
  }

  refill(n = this.batchSize) {
    this.refilling ??= this.#refill(n).finally(() => { this.refilling = null; });
    return this.refilling;
  }

  async #refill(n) {
    const view = await this.directory();
    const clients = [];
    const requests = [];
    for (let i = 0; i < n; i++) {
      const c = new Client(BlindRSAMode.PSS);
      requests.push(await c.createTokenRequest(this.challenge, view.tokenKey));
      clients.push(c);
    }
    let responses = null;
    if (this.batchOk && n > 1) responses = await this.#postBatch(view, requests);
    if (responses === null) {
      responses = [];
      for (const req of requests) responses.push(await this.#postSingle(view, clients[0], req));
    }
    let added = 0;
    for (let i = 0; i < n; i++) {
      if (!responses[i]) continue;
      const token = await clients[i].finalize(responses[i]); // verifies the signature
      this.tokens.push({ bytes: token.serialize(), tokenKeyId: view.tokenKeyId });
      added++;
    }
    if (!added) throw new IssuerError('the issuer answered but signed none of the requests');
    return added;
  }

  async #post(url, ctype, accept, body) {
    let r;
    try {
      r = await this.fetch(url, {
        method: 'POST',
        headers: { 'Content-Type': ctype, Accept: accept, Authorization: `Bearer ${this.apiKey}` },
        body,
      });
    } catch (e) {
      throw new IssuerError(`cannot reach the issuer at ${this.issuerUrl}: ${e.message}`);
    }
    return r;
  }

  async #check(r, want) {
    if (r.status === 200) {
      const ct = (r.headers.get('content-type') ?? '').split(';')[0].trim();
      if (ct !== want) throw new IssuerError(`the issuer answered with ${ct || 'no content type'}`);
      return new Uint8Array(await r.arrayBuffer());
    }
    let detail = '';
    try { const p = await r.json(); detail = p.detail || p.title || ''; } catch { /* not JSON */ }
    const what = r.status === 401 ? 'rejected the API key' : r.status === 429 ? `quota used up (retry after ${r.headers.get('retry-after') ?? '?'} s)` : `answered ${r.status}`;
    throw new IssuerError(`the issuer ${what}${detail ? `: ${detail}` : ''}`, { status: r.status });
  }

  async #postBatch(view, requests) {
    const batch = new genericBatched.BatchedTokenRequest(requests.map((q) => new genericBatched.TokenRequest(q)));
    const r = await this.#post(view.requestUrl, BATCH_REQUEST_TYPE, BATCH_RESPONSE_TYPE, batch.serialize());
    if (r.status === 415) { this.batchOk = false; return null; }
    const body = await this.#check(r, BATCH_RESPONSE_TYPE);
    const parsed = genericBatched.GenericBatchTokenResponse.deserialize(body);
    if (parsed.tokenResponses.length !== requests.length) throw new IssuerError('batch response has the wrong number of items');
    return parsed.tokenResponses.map((o) => o.tokenResponse);
  }

  async #postSingle(view, client, req) {
    const r = await this.#post(view.requestUrl, TOKEN_REQUEST_TYPE, TOKEN_RESPONSE_TYPE, req.serialize());
    return client.deserializeTokenResponse(await this.#check(r, TOKEN_RESPONSE_TYPE));
  }
}
