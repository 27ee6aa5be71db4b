// The sealed-request layer (client -> node), client side. Spec: docs/PROTOCOL.md
// "Sealed requests"; mirrors openpcc/wire/sealed.py byte for byte. Version 2 wraps the
// data key with X-Wing (post-quantum hybrid), version 1 with X25519.
import { decodeResponse } from './bhttp.js';
import { concat, decodeVarint, encodeVarint, randomBytes, te, u16 } from './bytes.js';
import { KEM_X25519, KEM_XWING, aesGcmKey, aesGcmOpen, aesGcmSeal, hkdf, hpkeSuite, sha256, xorCounter } from './crypto.js';
import { DecodeError, EncodeError, LimitExceededError, StateError, TruncatedError } from './errors.js';

export const REQUEST_MEDIA_TYPE = 'application/openpcc-sealed-request';
export const RESPONSE_MEDIA_TYPE = 'application/openpcc-sealed-response';
export const NODE_ID_LEN = 16;
const KEY_ID_LEN = 8;
const NONCE_LEN = 16;
const WRAPPED_LEN = 16 + 16; // data key + AES-128-GCM tag
export const MAX_CANDIDATES = 8;
const CHUNK_SIZE = 16 * 1024;
const MAX_REQUEST_BYTES = 8 * 1024 * 1024;
const REQUEST_BUCKETS = [1024, 4096, 16384, 65536, 262144, 1048576];
const MAX_CHUNK_SEALED = 16384 + 16;
const FLAG_MORE = 0x00;
const FLAG_FINAL = 0x01;

function version(number, kemId, npk, nenc) {
  const label = `openpcc sealed request v${number}`;
  return {
    number, kemId, npk, nenc,
    suite: concat(u16(kemId), u16(0x0001), u16(0x0001)),
    wrapInfoLabel: te.encode(label),
    contextLabel: te.encode(`${label} context`),
  };
}
// The version fixes the KEM, so an envelope never mixes the two: one X25519 wrap beside
// X-Wing ones would let whoever records it now and breaks X25519 later read it.
/** Version 2: X-Wing (ML-KEM-768 + X25519), what clients send to nodes attesting an X-Wing key. */
export const SEALED_V2 = version(2, KEM_XWING, 1216, 1120);
/** Version 1: X25519 only; deprecated, still opened by nodes (docs/PROTOCOL.md). */
export const SEALED_V1 = version(1, KEM_X25519, 32, 32);
const BY_PK_LEN = new Map([[SEALED_V1.npk, SEALED_V1], [SEALED_V2.npk, SEALED_V2]]);

/** The version an envelope to this node key takes: its KEM follows from the length (32 or 1216). */
export function versionForKey(publicKey) {
  const v = BY_PK_LEN.get(publicKey?.length);
  if (!v) throw new EncodeError(`node public key must be ${[...BY_PK_LEN.keys()].join(' or ')} bytes`);
  return v;
}

/** A node key's 8-byte id: SHA-256(raw public key)[0..8] (X25519: 32 bytes; X-Wing: 1216). */
export async function keyIdFor(publicKey) { return (await sha256(publicKey)).slice(0, KEY_ID_LEN); }

export function padBucket(size, buckets) {
  for (const b of buckets) if (size <= b) return b;
  const top = buckets[buckets.length - 1];
  return Math.ceil(size / top) * top;
}

async function context(v, nonce, model, cands) {
  const m = te.encode(model);
  const parts = [v.contextLabel, Uint8Array.of(0), v.suite, Uint8Array.of(v.number), nonce, Uint8Array.of(m.length), m, Uint8Array.of(cands.length)];
  for (const c of cands) parts.push(c.nodeId, c.keyId);
  return sha256(concat(...parts));
}

async function derive(dk, salt, keyLabel, nonceLabel) {
  return { key: await aesGcmKey(await hkdf(dk, salt, keyLabel, 16)), iv: await hkdf(dk, salt, nonceLabel, 12) };
}

class ChunkCipher {
  constructor({ key, iv }, ctx) { this.key = key; this.iv = iv; this.ctx = ctx; this.seq = 0; }
  nonce() {
    if (this.seq >= 2 ** 32) throw new StateError('chunk counter exhausted');
    return xorCounter(this.iv, this.seq++);
  }
  async seal(data, final) {
    const flag = final ? FLAG_FINAL : FLAG_MORE;
    const sealed = await aesGcmSeal(this.key, this.nonce(), concat(this.ctx, Uint8Array.of(flag)), data);
    return concat(Uint8Array.of(flag), encodeVarint(sealed.length), sealed);
  }
  open(flag, sealed) { return aesGcmOpen(this.key, this.nonce(), concat(this.ctx, Uint8Array.of(flag)), sealed); }
}

class FrameReader {
  constructor(max = MAX_CHUNK_SEALED) { this.buf = new Uint8Array(0); this.max = max; this.finalSeen = false; }
  feed(data) {
    if (this.finalSeen && data.length) throw new DecodeError('data after the final chunk');
    this.buf = concat(this.buf, data);
    const frames = [];
    while (this.buf.length && !this.finalSeen) {
      const flag = this.buf[0];
      if (flag !== FLAG_MORE && flag !== FLAG_FINAL) throw new DecodeError(`unknown chunk flag ${flag}`);
      let len, off;
      try { [len, off] = decodeVarint(this.buf, 1); } catch (e) { if (e instanceof TruncatedError) break; throw e; }
      if (len > this.max) throw new LimitExceededError(`sealed chunk of ${len} bytes over ${this.max}`);
      if (len < 16) throw new DecodeError('sealed chunk shorter than its tag');
      if (this.buf.length < off + len) break;
      frames.push([flag, this.buf.slice(off, off + len)]);
      this.buf = this.buf.subarray(off + len);
      if (flag === FLAG_FINAL) {
        this.finalSeen = true;
        if (this.buf.length) throw new DecodeError('data after the final chunk');
      }
    }
    return frames;
  }
}

/**
 * Seal one Binary HTTP request to every candidate ({nodeId, publicKey}: 16 bytes, and
 * 32 (X25519, version 1) or 1216 (X-Wing, version 2); all of one KEM, else EncodeError).
 * dataKey, requestNonce, ephemerals (X25519 CryptoKeyPairs or X-Wing 64-byte
 * encapsulation seeds) and wraps (stored enc ‖ wrapped key per candidate, as in the v2
 * vector, whose X-Wing encapsulations were drawn at random) are injectable for test
 * vectors only.
 */
export async function sealRequest(candidates, model, bhttpRequest, { dataKey, requestNonce, ephemerals, wraps } = {}) {
  if (candidates.length < 1 || candidates.length > MAX_CANDIDATES) throw new EncodeError(`1 to ${MAX_CANDIDATES} candidates`);
  const ids = new Set(candidates.map((c) => c.nodeId.join(',')));
  if (ids.size !== candidates.length) throw new EncodeError('candidate node ids must be distinct');
  for (const c of candidates) if (c.nodeId.length !== NODE_ID_LEN) throw new EncodeError('bad node id');
  const versions = new Set(candidates.map((c) => versionForKey(c.publicKey)));
  if (versions.size !== 1) throw new EncodeError('candidates mix X25519 and X-Wing keys: one KEM per envelope');
  const [v] = versions;
  const m = te.encode(model);
  if (m.length < 1 || m.length > 255) throw new EncodeError('model name must be 1 to 255 bytes');
  if (bhttpRequest.length > MAX_REQUEST_BYTES) throw new EncodeError('request too large');
  const dk = dataKey ?? randomBytes(16);
  const nonce = requestNonce ?? randomBytes(NONCE_LEN);
  if (dk.length !== 16 || nonce.length !== NONCE_LEN) throw new EncodeError('data key and request nonce must be 16 bytes');
  if (wraps && (wraps.length !== candidates.length || wraps.some((w) => w.length !== v.nenc + WRAPPED_LEN))) {
    throw new EncodeError(`one ${v.nenc + WRAPPED_LEN}-byte wrap per candidate`);
  }
  const cands = [];
  for (const c of candidates) cands.push({ nodeId: c.nodeId, publicKey: c.publicKey, keyId: await keyIdFor(c.publicKey) });
  const ctx = await context(v, nonce, model, cands);
  const suite = hpkeSuite(v.kemId);
  const header = [Uint8Array.of(v.number), v.suite, nonce, Uint8Array.of(m.length), m, Uint8Array.of(cands.length)];
  for (const [i, c] of cands.entries()) {
    header.push(c.nodeId, c.keyId);
    if (wraps) { header.push(wraps[i]); continue; }
    const s = await suite.createSenderContext({
      recipientPublicKey: await suite.kem.deserializePublicKey(c.publicKey),
      info: concat(v.wrapInfoLabel, Uint8Array.of(0), c.nodeId, c.keyId),
      ...(ephemerals ? { ekm: ephemerals[i] } : {}),
    });
    header.push(new Uint8Array(s.enc), new Uint8Array(await s.seal(dk, ctx)));
  }
  const padded = new Uint8Array(padBucket(bhttpRequest.length, REQUEST_BUCKETS));
  padded.set(bhttpRequest);
  const cipher = new ChunkCipher(await derive(dk, nonce, 'openpcc request key', 'openpcc request nonce'), ctx);
  const parts = [concat(...header)];
  for (let off = 0; off < padded.length; off += CHUNK_SIZE) {
    parts.push(await cipher.seal(padded.subarray(off, off + CHUNK_SIZE), off + CHUNK_SIZE >= padded.length));
  }
  return {
    envelope: concat(...parts),
    context: ctx,
    version: v.number,
    kemId: v.kemId,
    responseOpener: () => new ResponseOpener(dk, nonce, ctx),
  };
}

/**
 * Client side of the sealed response. receiveData(bytes) resolves to events:
 * {type:'head', status, headers} once, then {type:'data', data}. endOfInput() throws
 * TruncatedError unless the authenticated final chunk arrived.
 */
export class ResponseOpener {
  constructor(dk, requestNonce, ctx) {
    this.dk = dk; this.requestNonce = requestNonce; this.ctx = ctx;
    this.nonceBuf = new Uint8Array(0); this.cipher = null; this.reader = new FrameReader();
    this.headSeen = false; this.failed = false;
  }
  get complete() { return this.reader.finalSeen; }
  async receiveData(data) {
    if (this.failed) throw new StateError('response stream already failed');
    try { return await this.#receive(data); } catch (e) { this.failed = true; throw e; }
  }
  async #receive(data) {
    if (!this.cipher) {
      this.nonceBuf = concat(this.nonceBuf, data);
      if (this.nonceBuf.length < NONCE_LEN) return [];
      const nonce = this.nonceBuf.slice(0, NONCE_LEN);
      data = this.nonceBuf.slice(NONCE_LEN);
      this.cipher = new ChunkCipher(await derive(this.dk, concat(this.requestNonce, nonce), 'openpcc response key', 'openpcc response nonce'), this.ctx);
    }
    const events = [];
    for (const [flag, sealed] of this.reader.feed(data)) {
      const body = await this.cipher.open(flag, sealed);
      const [len, off] = decodeVarint(body, 0);
      if (off + len > body.length) throw new DecodeError('response chunk length exceeds its padding bucket');
      if (body.subarray(off + len).some((b) => b !== 0)) throw new DecodeError('non-zero response padding');
      const piece = body.slice(off, off + len);
      if (!this.headSeen) {
        const r = decodeResponse(piece);
        events.push({ type: 'head', status: r.status, headers: r.headers });
        this.headSeen = true;
      } else if (piece.length) {
        events.push({ type: 'data', data: piece });
      }
    }
    if (this.reader.finalSeen && !this.headSeen) throw new DecodeError('response ended without a head');
    return events;
  }
  endOfInput() {
    if (!this.cipher) throw new TruncatedError('sealed response ended before its nonce');
    if (!this.reader.finalSeen) throw new TruncatedError('sealed stream ended before its final chunk');
    return [];
  }
}
