// Byte helpers and QUIC varints (RFC 9000 §16). No Node built-ins.
import { EncodeError, TruncatedError } from './errors.js';

export const te = new TextEncoder();
export const td = new TextDecoder('utf-8', { fatal: true });

export function concat(...parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

export function toHex(b) {
  let s = '';
  for (const x of b) s += x.toString(16).padStart(2, '0');
  return s;
}

export function fromHex(s) {
  if (typeof s !== 'string' || s.length % 2 || /[^0-9a-fA-F]/.test(s)) throw new TypeError('bad hex');
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.substr(i * 2, 2), 16);
  return out;
}

export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
export function toBase64(b, url = false, pad = true) {
  let s = '';
  for (let i = 0; i < b.length; i += 3) {
    const n = (b[i] << 16) | ((b[i + 1] ?? 0) << 8) | (b[i + 2] ?? 0);
    s += B64[n >> 18] + B64[(n >> 12) & 63];
    s += i + 1 < b.length ? B64[(n >> 6) & 63] : '=';
    s += i + 2 < b.length ? B64[n & 63] : '=';
  }
  if (url) s = s.replace(/\+/g, '-').replace(/\//g, '_');
  if (!pad) s = s.replace(/=+$/, '');
  return s;
}

export function fromBase64(s) {
  s = s.replace(/-/g, '+').replace(/_/g, '/').replace(/\s+/g, '');
  if (/[^A-Za-z0-9+/=]/.test(s)) throw new TypeError('bad base64');
  s = s.replace(/=+$/, '');
  const out = [];
  let acc = 0, bits = 0;
  for (const c of s) {
    acc = (acc << 6) | B64.indexOf(c);
    bits += 6;
    if (bits >= 8) { bits -= 8; out.push((acc >> bits) & 0xff); }
  }
  return new Uint8Array(out);
}

export function encodeVarint(v) {
  if (!Number.isSafeInteger(v) || v < 0) throw new EncodeError(`varint out of range: ${v}`);
  if (v < 0x40) return Uint8Array.of(v);
  if (v < 0x4000) return Uint8Array.of(0x40 | (v >> 8), v & 0xff);
  if (v < 0x40000000) return Uint8Array.of(0x80 | (v >>> 24), (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff);
  const out = new Uint8Array(8);
  let x = BigInt(v);
  for (let i = 7; i >= 0; i--) { out[i] = Number(x & 0xffn); x >>= 8n; }
  out[0] |= 0xc0;
  return out;
}

/** Decode a varint at `off`; returns [value, newOffset]. Throws TruncatedError if cut. */
export function decodeVarint(buf, off = 0) {
  if (off >= buf.length) throw new TruncatedError('varint truncated');
  const first = buf[off];
  const len = 1 << (first >> 6);
  if (off + len > buf.length) throw new TruncatedError('varint truncated');
  let v = first & 0x3f;
  for (let i = 1; i < len; i++) v = v * 256 + buf[off + i];
  return [v, off + len];
}

export function u16(n) { return Uint8Array.of((n >> 8) & 0xff, n & 0xff); }

/** Mutable byte buffer for incremental parsers. */
export class ByteQueue {
  constructor() { this.buf = new Uint8Array(0); }
  push(data) { if (data.length) this.buf = this.buf.length ? concat(this.buf, data) : Uint8Array.from(data); }
  drop(n) { this.buf = this.buf.subarray(n); }
  get length() { return this.buf.length; }
}

export function randomBytes(n) {
  const b = new Uint8Array(n);
  globalThis.crypto.getRandomValues(b);
  return b;
}
