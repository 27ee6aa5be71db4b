// WebCrypto helpers (globalThis.crypto.subtle: browsers and Node >= 20) and the HPKE suite.
import { Aes128Gcm, CipherSuite, HkdfSha256 } from '@hpke/core';
import { DhkemX25519HkdfSha256 } from '@hpke/dhkem-x25519';
import { XWing } from '@hpke/hybridkem-x-wing';
import { concat, te } from './bytes.js';
import { DecryptError, UnsupportedError } from './errors.js';

export const subtle = () => globalThis.crypto.subtle;

export const KEM_X25519 = 0x0020; // DHKEM(X25519, HKDF-SHA256)
export const KEM_XWING = 0x647a; // MLKEM768-X25519 (X-Wing), draft-ietf-hpke-pq

const suites = new Map();
/**
 * The HPKE suite we send with: DHKEM(X25519, HKDF-SHA256) (default) or X-Wing
 * (KEM 0x647a), each with HKDF-SHA256 and AES-128-GCM.
 */
export function hpkeSuite(kemId = KEM_X25519) {
  let s = suites.get(kemId);
  if (!s) {
    let kem;
    if (kemId === KEM_X25519) kem = new DhkemX25519HkdfSha256();
    else if (kemId === KEM_XWING) kem = new XWing();
    else throw new UnsupportedError(`HPKE KEM 0x${kemId.toString(16).padStart(4, '0')} not supported`);
    s = new CipherSuite({ kem, kdf: new HkdfSha256(), aead: new Aes128Gcm() });
    suites.set(kemId, s);
  }
  return s;
}

export async function sha256(data) { return new Uint8Array(await subtle().digest('SHA-256', data)); }
export async function sha384(data) { return new Uint8Array(await subtle().digest('SHA-384', data)); }
export async function sha512(data) { return new Uint8Array(await subtle().digest('SHA-512', data)); }

export async function hmacSha256(key, data) {
  const k = await subtle().importKey('raw', key.length ? key : new Uint8Array(32), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  return new Uint8Array(await subtle().sign('HMAC', k, data));
}

export const hkdfExtract = (salt, ikm) => hmacSha256(salt, ikm);

export async function hkdfExpand(prk, info, length) {
  const out = [];
  let t = new Uint8Array(0);
  let n = 0;
  for (let i = 1; n < length; i++) {
    t = await hmacSha256(prk, concat(t, typeof info === 'string' ? te.encode(info) : info, Uint8Array.of(i)));
    out.push(t);
    n += t.length;
  }
  return concat(...out).subarray(0, length);
}

/** HKDF (RFC 5869) with SHA-256. */
export async function hkdf(ikm, salt, info, length) {
  return hkdfExpand(await hkdfExtract(salt, ikm), info, length);
}

export async function aesGcmKey(raw) {
  return subtle().importKey('raw', raw, { name: 'AES-GCM' }, false, ['encrypt', 'decrypt']);
}
export async function aesGcmSeal(key, iv, aad, pt) {
  return new Uint8Array(await subtle().encrypt({ name: 'AES-GCM', iv, additionalData: aad, tagLength: 128 }, key, pt));
}
export async function aesGcmOpen(key, iv, aad, ct) {
  try {
    return new Uint8Array(await subtle().decrypt({ name: 'AES-GCM', iv, additionalData: aad, tagLength: 128 }, key, ct));
  } catch {
    throw new DecryptError('AES-GCM authentication failed');
  }
}

/** iv XOR big-endian counter, 12 bytes. */
export function xorCounter(iv, i) {
  const out = Uint8Array.from(iv);
  let x = BigInt(i);
  for (let k = out.length - 1; k >= 0 && x > 0n; k--) {
    out[k] ^= Number(x & 0xffn);
    x >>= 8n;
  }
  return out;
}
