// Minimal DER / X.509 reader: just what the attestation verifier needs. No Node built-ins.
import { concat, fromBase64, td } from './bytes.js';
import { DecodeError } from './errors.js';

/** Read one TLV at `off`: {tag, start (of value), end, hdr (offset of tag), raw}. */
export function tlv(buf, off = 0) {
  if (off + 2 > buf.length) throw new DecodeError('DER truncated');
  const tag = buf[off];
  let len = buf[off + 1];
  let p = off + 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n === 0 || n > 4 || p + n > buf.length) throw new DecodeError('bad DER length');
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + buf[p + i];
    p += n;
  }
  if (p + len > buf.length) throw new DecodeError('DER value overruns its input');
  return { tag, start: p, end: p + len, hdr: off, value: buf.subarray(p, p + len), raw: buf.subarray(off, p + len) };
}

export function children(buf, node) {
  const out = [];
  let p = node.start;
  while (p < node.end) {
    const c = tlv(buf, p);
    out.push(c);
    p = c.end;
  }
  return out;
}

export function oidToString(v) {
  const parts = [Math.floor(v[0] / 40), v[0] % 40];
  let acc = 0;
  for (let i = 1; i < v.length; i++) {
    acc = acc * 128 + (v[i] & 0x7f);
    if (!(v[i] & 0x80)) { parts.push(acc); acc = 0; }
  }
  return parts.join('.');
}

function parseTime(node) {
  const s = String.fromCharCode(...node.value);
  const m = node.tag === 0x17 ? /^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s) : /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s);
  if (!m) throw new DecodeError(`unsupported certificate time ${s}`);
  let y = Number(m[1]);
  if (node.tag === 0x17) y += y < 50 ? 2000 : 1900;
  return Date.UTC(y, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])) / 1000;
}

function commonName(buf, name) {
  for (const rdn of children(buf, name)) {
    for (const atv of children(buf, rdn)) {
      const [oid, val] = children(buf, atv);
      if (oidToString(oid.value) === '2.5.4.3') return new TextDecoder().decode(val.value);
    }
  }
  return '';
}

export const OID = {
  ecdsaSha384: '1.2.840.10045.4.3.3',
  rsaPss: '1.2.840.113549.1.1.10',
  ecPublicKey: '1.2.840.10045.2.1',
  secp384r1: '1.3.132.0.34',
  rsaEncryption: '1.2.840.113549.1.1.1',
  sha384: '2.16.840.1.101.3.4.2.2',
};

/** Parse a DER certificate into the fields the verifier uses. */
export function parseCertificate(der) {
  try {
    const cert = tlv(der, 0);
    if (cert.tag !== 0x30 || cert.end !== der.length) throw new DecodeError('not a certificate');
    const [tbs, sigAlg, sigVal] = children(der, cert);
    const t = children(der, tbs);
    let i = t[0].tag === 0xa0 ? 1 : 0;
    i += 1; // serial
    i += 1; // signature algorithm (inner)
    const issuer = t[i++];
    const validity = children(der, t[i++]);
    const subject = t[i++];
    const spki = t[i++];
    const extensions = new Map();
    for (; i < t.length; i++) {
      if (t[i].tag !== 0xa3) continue;
      const [seq] = children(der, t[i]);
      for (const ext of children(der, seq)) {
        const parts = children(der, ext);
        const oid = oidToString(parts[0].value);
        const octets = parts[parts.length - 1];
        extensions.set(oid, Uint8Array.from(octets.value));
      }
    }
    const algParts = children(der, sigAlg);
    const sigAlgOid = oidToString(algParts[0].value);
    let pssSaltLength = 20;
    let pssHashSha384 = false;
    if (sigAlgOid === OID.rsaPss && algParts[1]) {
      for (const p of children(der, algParts[1])) {
        if (p.tag === 0xa0) pssHashSha384 = oidToString(children(der, children(der, p)[0])[0].value) === OID.sha384;
        if (p.tag === 0xa2) pssSaltLength = children(der, p)[0].value.reduce((a, b) => a * 256 + b, 0);
      }
    }
    const spkiParts = children(der, spki);
    const spkiAlg = children(der, spkiParts[0]);
    return {
      der,
      tbs: Uint8Array.from(tbs.raw),
      sigAlgOid,
      pssSaltLength,
      pssHashSha384,
      signature: Uint8Array.from(sigVal.value.subarray(1)), // BIT STRING, 0 unused bits
      issuerCN: commonName(der, issuer),
      subjectCN: commonName(der, subject),
      issuerRaw: Uint8Array.from(issuer.raw),
      subjectRaw: Uint8Array.from(subject.raw),
      notBefore: parseTime(validity[0]),
      notAfter: parseTime(validity[1]),
      spki: Uint8Array.from(spki.raw),
      keyAlgOid: oidToString(spkiAlg[0].value),
      keyCurveOid: spkiAlg[1]?.tag === 0x06 ? oidToString(spkiAlg[1].value) : null,
      extensions,
    };
  } catch (e) {
    if (e instanceof DecodeError) throw e;
    throw new DecodeError(`unreadable certificate: ${e.message}`);
  }
}

/** All certificates in a PEM text, as DER. */
export function pemToDers(text) {
  const out = [];
  const re = /-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/g;
  let m;
  while ((m = re.exec(text))) out.push(fromBase64(m[1]));
  if (!out.length) throw new DecodeError('no certificate in PEM text');
  return out;
}

/** DER ECDSA-Sig-Value -> raw r||s of `size` bytes each (WebCrypto's format). */
export function ecdsaDerToRaw(sig, size = 48) {
  const seq = tlv(sig, 0);
  const [r, s] = children(sig, seq);
  const fix = (v) => {
    let x = v.value;
    while (x.length > size && x[0] === 0) x = x.subarray(1);
    if (x.length > size) throw new DecodeError('ECDSA integer too large');
    const out = new Uint8Array(size);
    out.set(x, size - x.length);
    return out;
  };
  return concat(fix(r), fix(s));
}

export { td };
