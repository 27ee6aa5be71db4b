// Oblivious HTTP (RFC 9458), key configs (RFC 9540) and chunked OHTTP
// (draft-ietf-ohai-chunked-ohttp-08), client side. Mirrors openpcc/wire/ohttp.py, chunked.py.
// KEMs: X25519 (0x0020) and X-Wing (0x647a; enc 1120 bytes instead of 32); the KEM
// changes the request prefix hdr ‖ enc and nothing else.
import { concat, decodeVarint, encodeVarint, randomBytes, te, u16 } from './bytes.js';
import { KEM_X25519, KEM_XWING, aesGcmKey, aesGcmOpen, hkdfExpand, hkdfExtract, hpkeSuite, xorCounter } from './crypto.js';
import { DecodeError, DecryptError, EncodeError, LimitExceededError, StateError, TruncatedError, UnsupportedError } from './errors.js';

export { KEM_X25519, KEM_XWING };

export const MEDIA_TYPE_REQUEST = 'message/ohttp-req';
export const MEDIA_TYPE_RESPONSE = 'message/ohttp-res';
export const MEDIA_TYPE_CHUNKED_REQUEST = 'message/ohttp-chunked-req';
export const MEDIA_TYPE_CHUNKED_RESPONSE = 'message/ohttp-chunked-res';
export const MEDIA_TYPE_KEYS = 'application/ohttp-keys';
const NK = 16, NN = 12, NT = 16, L = 16; // AES-128-GCM; response nonce max(Nn, Nk)
export const MAX_CHUNK_SIZE = 1 << 20;
// Npk and Nenc per KEM (RFC 9180 §7.1; X-Wing: ML-KEM-768 key/ciphertext ‖ X25519 key).
const KEM_SIZES = new Map([[KEM_X25519, { npk: 32, nenc: 32 }], [KEM_XWING, { npk: 1216, nenc: 1120 }]]);

/** Npk and Nenc of a KEM we implement; UnsupportedError otherwise. */
export function kemSizes(kemId) {
  const s = KEM_SIZES.get(kemId);
  if (!s) throw new UnsupportedError(`KEM 0x${kemId.toString(16).padStart(4, '0')} not supported`);
  return s;
}

/** Parse one KeyConfig (RFC 9458 §3.1): X25519 (0x0020) or X-Wing (0x647a). */
export function parseKeyConfig(b) {
  if (b.length < 7) throw new TruncatedError('key config truncated');
  const keyId = b[0];
  const kemId = (b[1] << 8) | b[2];
  const { npk } = kemSizes(kemId);
  if (b.length < 3 + npk + 2) throw new TruncatedError('key config truncated');
  const publicKey = b.slice(3, 3 + npk);
  const at = 3 + npk;
  const algLen = (b[at] << 8) | b[at + 1];
  if (algLen === 0 || algLen % 4) throw new DecodeError('bad algorithms length');
  if (b.length !== at + 2 + algLen) throw new DecodeError('key config length mismatch');
  const algorithms = [];
  for (let i = at + 2; i < at + 2 + algLen; i += 4) algorithms.push([(b[i] << 8) | b[i + 1], (b[i + 2] << 8) | b[i + 3]]);
  return { keyId, kemId, publicKey, algorithms, encoded: Uint8Array.from(b), supports: (kdf, aead) => algorithms.some(([k, a]) => k === kdf && a === aead) };
}

/** Parse an application/ohttp-keys body; skips unknown KEMs. */
export function parseKeyConfigs(body) {
  const out = [];
  let pos = 0;
  while (pos < body.length) {
    if (body.length - pos < 2) throw new TruncatedError('ohttp-keys truncated');
    const n = (body[pos] << 8) | body[pos + 1];
    if (pos + 2 + n > body.length) throw new TruncatedError('ohttp-keys truncated');
    try {
      out.push(parseKeyConfig(body.subarray(pos + 2, pos + 2 + n)));
    } catch (e) {
      if (!(e instanceof UnsupportedError)) throw e;
    }
    pos += 2 + n;
  }
  if (!out.length) throw new UnsupportedError('no usable key config');
  return out;
}

const hdrFor = (cfg) => concat(Uint8Array.of(cfg.keyId), u16(cfg.kemId), u16(1), u16(1));

async function sender(cfg, label, ekm) {
  const s = hpkeSuite(cfg.kemId);
  const hdr = hdrFor(cfg);
  const ctx = await s.createSenderContext({
    recipientPublicKey: await s.kem.deserializePublicKey(cfg.publicKey),
    info: concat(te.encode(label), Uint8Array.of(0), hdr),
    ...(ekm ? { ekm } : {}),
  });
  return { hdr, ctx, enc: new Uint8Array(ctx.enc) };
}

async function responseKeys(ctx, enc, label, nonce) {
  const secret = new Uint8Array(await ctx.export(te.encode(label), L));
  const prk = await hkdfExtract(concat(enc, nonce), secret);
  return { key: await aesGcmKey(await hkdfExpand(prk, 'key', NK)), nonce: await hkdfExpand(prk, 'nonce', NN) };
}

/** Plain OHTTP: returns {request, decapsulate(responseBytes) -> bhttp bytes}. */
export async function encapsulateRequest(cfg, bhttpRequest, { ekm } = {}) {
  if (!cfg.supports(1, 1)) throw new UnsupportedError('key config lacks HKDF-SHA256/AES-128-GCM');
  const { hdr, ctx, enc } = await sender(cfg, 'message/bhttp request', ekm);
  const ct = new Uint8Array(await ctx.seal(bhttpRequest, new Uint8Array(0)));
  let used = false;
  return {
    request: concat(hdr, enc, ct),
    async decapsulate(resp) {
      if (used) throw new StateError('response already opened');
      used = true;
      if (resp.length < L + NT) throw new TruncatedError('ohttp response truncated');
      const k = await responseKeys(ctx, enc, 'message/bhttp response', resp.subarray(0, L));
      return aesGcmOpen(k.key, k.nonce, new Uint8Array(0), resp.subarray(L));
    },
  };
}

const FINAL_AAD = te.encode('final');

/** Chunked OHTTP request sender. Call `await ChunkedRequestSender.create(cfg)`. */
export class ChunkedRequestSender {
  static async create(cfg, { ekm, maxChunkSize = MAX_CHUNK_SIZE } = {}) {
    if (!cfg.supports(1, 1)) throw new UnsupportedError('key config lacks HKDF-SHA256/AES-128-GCM');
    const s = new ChunkedRequestSender();
    Object.assign(s, await sender(cfg, 'message/bhttp chunked request', ekm));
    s.maxChunkSize = maxChunkSize;
    s.started = false;
    s.finished = false;
    return s;
  }
  /** Returns the wire bytes for this chunk (with the header before the first one). */
  async sealChunk(data, final = false) {
    if (this.finished) throw new StateError('request already finished');
    if (data.length > this.maxChunkSize) throw new EncodeError('chunk over the limit');
    if (!final && !data.length) throw new EncodeError('a non-final chunk may not be empty');
    const sealed = new Uint8Array(await this.ctx.seal(data, final ? FINAL_AAD : new Uint8Array(0)));
    const prefix = this.started ? new Uint8Array(0) : concat(this.hdr, this.enc);
    this.started = true;
    this.finished = final;
    return concat(prefix, final ? Uint8Array.of(0) : encodeVarint(sealed.length), sealed);
  }
  responseReceiver(opts) { return new ChunkedResponseReceiver(this.ctx, this.enc, opts); }
}

/** Chunked OHTTP response receiver: receiveData and endOfInput both -> the plaintext of every
 *  chunk that completed (endOfInput: the final chunk's, when it has any). */
export class ChunkedResponseReceiver {
  constructor(ctx, enc, { maxChunkSize = MAX_CHUNK_SIZE } = {}) {
    this.ctx = ctx;
    this.enc = enc;
    this.max = maxChunkSize;
    this.buf = new Uint8Array(0);
    this.keys = null;
    this.seq = 0;
    this.finalBuf = null; // bytes after the 0x00 indicator
    this.failed = false;
    this.done = false;
  }
  async receiveData(data) {
    if (this.failed) throw new StateError('response stream already failed');
    try {
      return await this.#receive(data);
    } catch (e) {
      this.failed = true;
      throw e;
    }
  }
  async #receive(data) {
    if (this.finalBuf) {
      this.finalBuf = concat(this.finalBuf, data);
      if (this.finalBuf.length > this.max + NT) throw new LimitExceededError('final chunk over the limit');
      return [];
    }
    this.buf = concat(this.buf, data);
    if (!this.keys) {
      if (this.buf.length < L) return [];
      this.keys = await responseKeys(this.ctx, this.enc, 'message/bhttp chunked response', this.buf.subarray(0, L));
      this.buf = this.buf.subarray(L);
    }
    const out = [];
    while (this.buf.length) {
      let n, off;
      try {
        [n, off] = decodeVarint(this.buf, 0);
      } catch (e) {
        if (e instanceof TruncatedError) break;
        throw e;
      }
      if (n === 0) {
        this.finalBuf = this.buf.slice(off);
        this.buf = new Uint8Array(0);
        if (this.finalBuf.length > this.max + NT) throw new LimitExceededError('final chunk over the limit');
        break;
      }
      if (n > this.max + NT) throw new LimitExceededError('chunk over the limit');
      if (n < NT + 1) throw new DecodeError('non-final chunk too short');
      if (this.buf.length < off + n) break;
      out.push(await this.#open(this.buf.subarray(off, off + n), new Uint8Array(0)));
      this.buf = this.buf.subarray(off + n);
    }
    return out;
  }
  async #open(sealed, aad) {
    if (this.seq >= 2 ** 52) throw new StateError('chunk counter exhausted');
    const nonce = xorCounter(this.keys.nonce, this.seq++);
    return aesGcmOpen(this.keys.key, nonce, aad, sealed);
  }
  /** The input ended: returns the final chunk's plaintext, or throws TruncatedError. */
  async endOfInput() {
    if (this.failed) throw new StateError('response stream already failed');
    if (!this.finalBuf) { this.failed = true; throw new TruncatedError('chunked response ended before its final chunk'); }
    if (this.finalBuf.length < NT) { this.failed = true; throw new TruncatedError('final chunk shorter than its tag'); }
    try {
      const pt = await this.#open(this.finalBuf, FINAL_AAD);
      this.done = true;
      return pt.length ? [pt] : [];
    } catch (e) {
      this.failed = true;
      throw e instanceof DecryptError ? e : e;
    }
  }
}
