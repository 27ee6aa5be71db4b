// WebCrypto helpers (globalThis.crypto.subtle: browsers and Node >= 20) and the HPKE suite.
import { Aes128Gcm, CipherSuite, HkdfSha256 } from '@hpke/core';
import { DhkemX25519HkdfSha256 } from '@hpke/dhkem-x25519';
import { concat, te } from './bytes.js';
import { DecryptError } from './errors.js';

export const subtle = () => globalThis.crypto.subtle;

let suite;
/** DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM, the only suite we send with. */
export function hpkeSuite() {
  suite ??= new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() });
  return suite;
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
