// Attestation: the signed release manifest (trust policy), claims and REPORT_DATA binding,
// SEV-SNP reports (real AMD chain: RSA-PSS/SHA-384; simulated TEE: ECDSA development root),
// and bundle verification. Mirrors openpcc/attestation/{policy,claims,snp,amd,bundle}.py
// for the simulated TEE and SEV-SNP. TDX and GPU evidence are NOT verified here: a bundle
// that needs them fails verification (never passes silently).
import { EMBEDDED_PEM, PINNED_ARK_SHA256 } from './amd-roots.js';
import { concat, equalBytes, fromBase64, fromHex, te, toBase64, toHex } from './bytes.js';
import { sha256, sha512, subtle } from './crypto.js';
import { OID, ecdsaDerToRaw, parseCertificate, pemToDers } from './der.js';
import { DecodeError, VerificationError } from './errors.js';

const MANIFEST_FORMAT = 'openpcc-release-manifest/1';
const SIGNED_FORMAT = 'openpcc-signed-manifest/1';
const SIGNING_LABEL = te.encode('OpenPCC release manifest v1\0');
const CLAIMS_LABEL = te.encode('OpenPCC attestation v1 claims\0');
const CLOCK_SKEW = 300;
const MAX_LIFETIME = 24 * 3600;
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,127}$/;
const HEX_RE = /^(?:[0-9a-f]{2})*$/;

// ------------------------------------------------------------------ release manifest

/** Raw 32-byte Ed25519 key from PEM (SPKI), DER SPKI or raw bytes. */
export function loadReleasePublicKey(key) {
  let der = typeof key === 'string' ? null : key;
  if (typeof key === 'string') {
    const m = /-----BEGIN PUBLIC KEY-----([\s\S]*?)-----END PUBLIC KEY-----/.exec(key);
    if (!m) throw new DecodeError('release public key: expected PEM "PUBLIC KEY"');
    der = fromBase64(m[1]);
  }
  if (der.length === 32) return der;
  // SPKI for Ed25519: 30 2a 30 05 06 03 2b 65 70 03 21 00 <32>
  const prefix = fromHex('302a300506032b6570032100');
  if (der.length !== 44 || !equalBytes(der.subarray(0, 12), prefix)) throw new DecodeError('release key is not an Ed25519 key');
  return der.slice(12);
}

function strictObj(v, what, required, optional = []) {
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new DecodeError(`${what} must be an object`);
  for (const k of required) if (!(k in v)) throw new DecodeError(`${what}: missing ${k}`);
  for (const k of Object.keys(v)) if (!required.includes(k) && !optional.includes(k)) throw new DecodeError(`${what}: unknown key ${k}`);
  return v;
}
const isInt = (v) => Number.isSafeInteger(v);
function hexSet(list, what, n) {
  if (!Array.isArray(list)) throw new DecodeError(`${what} must be a list`);
  return new Set(list.map((h) => {
    if (typeof h !== 'string' || !/^(?:[0-9a-fA-F]{2})+$/.test(h) || (n && h.length !== 2 * n)) throw new DecodeError(`${what}: bad hex`);
    return h.toLowerCase();
  }));
}

/** Parse a (verified) manifest's bytes into a policy object. */
export function parseManifest(bytes) {
  let doc;
  try { doc = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes)); } catch (e) { throw new DecodeError(`manifest is not JSON: ${e.message}`); }
  strictObj(doc, 'manifest', ['format', 'serial', 'issued_at', 'expires_at', 'releases', 'ohttp_key_configs', 'token_key_ids'], ['snp', 'tdx', 'gpu', 'development_roots', 'post_quantum', 'comment']);
  if (doc.format !== MANIFEST_FORMAT) throw new DecodeError(`manifest format must be ${MANIFEST_FORMAT}`);
  for (const k of ['serial', 'issued_at', 'expires_at']) if (!isInt(doc[k]) || doc[k] < 0) throw new DecodeError(`manifest ${k} must be a non-negative integer`);
  const releases = new Map();
  for (const [rid, r] of Object.entries(doc.releases && typeof doc.releases === 'object' && !Array.isArray(doc.releases) ? doc.releases : {})) {
    if (!ID_RE.test(rid)) throw new DecodeError(`bad release id ${rid}`);
    strictObj(r, `releases[${rid}]`, ['model_digests'], ['snp', 'tdx', 'gpu', 'comment']);
    const rel = { releaseId: rid, modelDigests: hexSet(r.model_digests, 'model_digests', 32), hasSnp: 'snp' in r, snpMeasurements: new Set(), hasTdx: 'tdx' in r, hasGpu: 'gpu' in r };
    if (rel.hasSnp) {
      strictObj(r.snp, 'snp', ['measurements']);
      rel.snpMeasurements = r.snp.measurements === null ? null : hexSet(r.snp.measurements, 'snp.measurements', 48);
    }
    releases.set(rid, rel);
  }
  const snp = strictObj(doc.snp ?? {}, 'snp', [], ['min_tcb', 'allow_debug', 'allow_smt', 'allow_migration_agent', 'vmpl', 'min_guest_svn']);
  const gpu = strictObj(doc.gpu ?? {}, 'gpu', [], ['require', 'require_ocsp']);
  const pq = strictObj('post_quantum' in doc ? doc.post_quantum : {}, 'post_quantum', [], ['require']);
  if ('require' in pq && typeof pq.require !== 'boolean') throw new DecodeError('post_quantum.require must be a boolean');
  const ohttpConfigs = new Set();
  const ohttpDigests = new Set();
  for (const e of doc.ohttp_key_configs) {
    if (typeof e === 'string' && e.startsWith('sha256:')) ohttpDigests.add(e.slice(7).toLowerCase());
    else ohttpConfigs.add(...hexSet([e], 'ohttp_key_configs'));
  }
  return {
    serial: doc.serial,
    issuedAt: doc.issued_at,
    expiresAt: doc.expires_at,
    releases,
    snpMinTcb: snp.min_tcb ?? {},
    snpAllowDebug: snp.allow_debug ?? false,
    snpAllowSmt: snp.allow_smt ?? true,
    snpAllowMigrationAgent: snp.allow_migration_agent ?? false,
    snpVmpl: 'vmpl' in snp ? snp.vmpl : 0,
    snpMinGuestSvn: snp.min_guest_svn ?? 0,
    requireGpu: gpu.require ?? true,
    developmentRoots: hexSet(doc.development_roots ?? [], 'development_roots', 32),
    ohttpConfigs,
    ohttpDigests,
    tokenKeyIds: hexSet(doc.token_key_ids, 'token_key_ids', 32),
    requirePostQuantum: pq.require ?? false,
  };
}

/**
 * Verify a signed manifest (JSON text or object) under pinned release keys; returns the
 * trust policy. Throws VerificationError for a bad signature, unpinned key, a manifest
 * outside its validity window, or a serial below minSerial.
 */
export async function loadTrustPolicy(signed, releaseKeys, { now = Date.now() / 1000, minSerial = 0 } = {}) {
  const policy = await verifySignedManifest(signed, releaseKeys);
  policy.checkCurrent(now);
  const m = policy.manifest;
  if (m.serial < minSerial) throw new VerificationError(`manifest serial ${m.serial} < ${minSerial} (rollback)`);
  return policy;
}

/**
 * The signature half of loadTrustPolicy: pinned key and Ed25519 signature only, NOT the
 * validity window (the client checks that at every use; it starts from an expired
 * manifest only to refresh it).
 */
export async function verifySignedManifest(signed, releaseKeys) {
  let doc = signed;
  if (typeof signed === 'string') {
    try { doc = JSON.parse(signed); } catch (e) { throw new DecodeError(`signed manifest is not JSON: ${e.message}`); }
  }
  strictObj(doc, 'signed manifest', ['format', 'key_id', 'manifest', 'signature']);
  if (doc.format !== SIGNED_FORMAT) throw new DecodeError(`signed manifest format must be ${SIGNED_FORMAT}`);
  const manifestBytes = fromBase64(doc.manifest);
  const sig = fromBase64(doc.signature);
  if (sig.length !== 64) throw new DecodeError('an Ed25519 signature is 64 bytes');
  const keys = (Array.isArray(releaseKeys) ? releaseKeys : [releaseKeys]).map(loadReleasePublicKey);
  let key = null;
  for (const k of keys) if (toHex(await sha256(k)) === String(doc.key_id).toLowerCase()) key = k;
  if (!key) throw new VerificationError(`manifest signed by key ${String(doc.key_id).slice(0, 16)}…, not pinned`);
  const pub = await subtle().importKey('raw', key, { name: 'Ed25519' }, false, ['verify']);
  const ok = await subtle().verify({ name: 'Ed25519' }, pub, sig, concat(SIGNING_LABEL, manifestBytes));
  if (!ok) throw new VerificationError('release manifest signature does not verify');
  return new TrustPolicy(parseManifest(manifestBytes), String(doc.key_id).toLowerCase());
}

export class TrustPolicy {
  constructor(manifest, keyId = 'unsigned') { this.manifest = manifest; this.keyId = keyId; }
  /**
   * Throws VerificationError unless the manifest is inside its validity window at `now`
   * (Unix seconds). Checked at every node verification: a running client must stop
   * trusting a manifest the moment it expires, not at its next start.
   */
  checkCurrent(now) {
    if (now + CLOCK_SKEW < this.manifest.issuedAt) throw new VerificationError('release manifest issued in the future');
    if (now >= this.manifest.expiresAt) throw new VerificationError(`release manifest expired at ${new Date(this.manifest.expiresAt * 1000).toISOString()}`);
  }
  get development() { return this.manifest.developmentRoots.size > 0; }
  release(id) { return this.manifest.releases.get(id) ?? null; }
  /** One bare KeyConfig (no length prefix), pinned by value or SHA-256. */
  async acceptsOhttpKey(config) {
    return this.manifest.ohttpConfigs.has(toHex(config)) || this.manifest.ohttpDigests.has(toHex(await sha256(config)));
  }
  acceptsTokenKey(keyId) { return this.manifest.tokenKeyIds.has(toHex(keyId)); }
  /** `post_quantum.require`: only a pinned X-Wing gateway key config, and only nodes whose
   *  claims attest an X-Wing key (`pq_public_key`), will do: no silent downgrade on either layer. */
  get postQuantumRequired() { return this.manifest.requirePostQuantum === true; }
  /** Whether an X-Wing (KEM 0x647a) config is pinned by value: true / false, or null when
   *  only a sha256: pin could be one. */
  pinsPostQuantumKey() {
    for (const c of this.manifest.ohttpConfigs) if (c.slice(2, 6) === '647a') return true;
    return this.manifest.ohttpDigests.size ? null : false;
  }
}

// ------------------------------------------------------------------------- claims

const CLAIM_FIELDS = ['expires_at', 'gpu_evidence_digest', 'hpke_public_key', 'issued_at', 'model_digest', 'node_id', 'release_id', 'signing_key', 'tee'];
// Absent (never null) on a node with only its X25519 key, so claims from before X-Wing
// keep their exact bytes.
const PQ_CLAIM = 'pq_public_key';
const PQ_KEY_LEN = 1216; // X-Wing (KEM 0x647a) public key

function canonicalClaims(obj) {
  const keys = [...CLAIM_FIELDS, ...(PQ_CLAIM in obj ? [PQ_CLAIM] : [])].sort();
  return '{' + keys.map((k) => `${JSON.stringify(k)}:${JSON.stringify(obj[k])}`).join(',') + '}';
}

/** Strict decode of canonical claims bytes (see openpcc/attestation/claims.py). */
export function decodeClaims(bytes) {
  if (bytes.length > 4096) throw new DecodeError('claims too large');
  const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  if (/[^\x20-\x7e]/.test(text)) throw new DecodeError('claims must be ASCII');
  let obj;
  try { obj = JSON.parse(text); } catch (e) { throw new DecodeError(`claims are not JSON: ${e.message}`); }
  strictObj(obj, 'claims', CLAIM_FIELDS, [PQ_CLAIM]);
  for (const k of ['hpke_public_key', 'model_digest', 'gpu_evidence_digest', 'signing_key']) {
    if (k === 'gpu_evidence_digest' && obj[k] === null) continue;
    if (typeof obj[k] !== 'string' || !HEX_RE.test(obj[k]) || obj[k].length !== 64) throw new DecodeError(`${k} must be 32 bytes of lower-case hex`);
  }
  const pq = obj[PQ_CLAIM];
  if (PQ_CLAIM in obj && (typeof pq !== 'string' || !HEX_RE.test(pq) || pq.length !== 2 * PQ_KEY_LEN)) {
    throw new DecodeError(`${PQ_CLAIM} must be ${PQ_KEY_LEN} bytes of lower-case hex (absent, not null, without an X-Wing key)`);
  }
  for (const k of ['issued_at', 'expires_at']) if (!isInt(obj[k]) || obj[k] < 0) throw new DecodeError(`${k} must be an integer`);
  for (const k of ['node_id', 'release_id']) if (typeof obj[k] !== 'string' || !ID_RE.test(obj[k])) throw new DecodeError(`${k} is malformed`);
  if (!['sev-snp', 'tdx', 'simulated-snp'].includes(obj.tee)) throw new DecodeError('unknown tee');
  if (canonicalClaims(obj) !== text) throw new DecodeError('claims are not in canonical form');
  return {
    ...obj, hpkePublicKey: fromHex(obj.hpke_public_key), modelDigest: obj.model_digest, signingKey: fromHex(obj.signing_key),
    pqPublicKey: PQ_CLAIM in obj ? fromHex(pq) : null,
  };
}

/** REPORT_DATA = SHA-512("OpenPCC attestation v1 claims\0" ‖ canonical claims). */
export async function reportDataFor(claimsBytes) { return sha512(concat(CLAIMS_LABEL, claimsBytes)); }

// ---------------------------------------------------------------------------- SNP

const REPORT_SIZE = 0x4a0;
const SIGNED_SIZE = 0x2a0;
const MBZ_COMMON = [[0x04c, 0x050], [0x1eb, 0x1ec], [0x1ef, 0x1f0]];
const MBZ = { 2: [[0x188, 0x1a0], [0x1f8, 0x2a0]], 3: [[0x18b, 0x1a0], [0x1f8, 0x2a0]], 5: [[0x18b, 0x1a0], [0x208, 0x2a0]] };
const AMD_OID = '1.3.6.1.4.1.3704.1';
const TCB_OIDS = { [`${AMD_OID}.3.1`]: 'bl', [`${AMD_OID}.3.2`]: 'tee', [`${AMD_OID}.3.3`]: 'snp', [`${AMD_OID}.3.8`]: 'ucode', [`${AMD_OID}.3.9`]: 'fmc' };

const u32 = (b, o) => b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] * 2 ** 24);
const u64big = (b, o) => { let x = 0n; for (let i = 7; i >= 0; i--) x = (x << 8n) | BigInt(b[o + i]); return x; };

export function productFromCpuid(fam, mod) {
  if (fam === 0x19) {
    if (mod <= 0x0f) return 'Milan';
    if ((mod >= 0x10 && mod <= 0x1f) || (mod >= 0xa0 && mod <= 0xaf)) return 'Genoa';
  }
  if (fam === 0x1a) return 'Turin';
  return null;
}
const productFromName = (n) => { const base = (n ?? '').split('-')[0]; return ['Milan', 'Genoa', 'Turin'].includes(base) ? base : null; };

function tcbComponents(b, product) {
  return product === 'Turin' ? { fmc: b[0], bl: b[1], tee: b[2], snp: b[3], ucode: b[7] } : { bl: b[0], tee: b[1], snp: b[6], ucode: b[7] };
}

export function parseSnpReport(data) {
  if (data.length !== REPORT_SIZE) throw new DecodeError(`SNP report must be ${REPORT_SIZE} bytes, got ${data.length}`);
  const version = u32(data, 0);
  if (![2, 3, 4, 5].includes(version)) throw new DecodeError(`unsupported SNP report version ${version}`);
  const v3 = version >= 3;
  const policy = u64big(data, 0x008);
  const r = {
    raw: data,
    version,
    guestSvn: u32(data, 4),
    policy,
    debug: Boolean((policy >> 19n) & 1n),
    smtAllowed: Boolean((policy >> 16n) & 1n),
    migrateMa: Boolean((policy >> 18n) & 1n),
    reservedOne: Boolean((policy >> 17n) & 1n),
    vmpl: u32(data, 0x030),
    signatureAlgo: u32(data, 0x034),
    platformSmt: Boolean(data[0x040] & 1),
    keyInfo: u32(data, 0x048),
    reportData: data.slice(0x050, 0x090),
    measurement: data.slice(0x090, 0x0c0),
    reportedTcb: data.slice(0x180, 0x188),
    product: v3 ? productFromCpuid(data[0x188], data[0x189]) : null,
    chipId: data.slice(0x1a0, 0x1e0),
  };
  r.signingKey = (r.keyInfo >> 2) & 7;
  const problems = [];
  for (const [s, e] of [...MBZ_COMMON, ...(version === 2 ? MBZ[2] : version >= 5 ? MBZ[5] : MBZ[3]), [0x330, 0x4a0]]) {
    if (data.subarray(s, e).some((x) => x)) problems.push(`reserved bytes 0x${s.toString(16)}..0x${(e - 1).toString(16)} are not zero`);
  }
  if (r.keyInfo >>> 5) problems.push('reserved key-info bits set');
  if (!r.reservedOne) problems.push('policy bit 17 (reserved, must be 1) is clear');
  r.problems = problems;
  return r;
}

function derInt(raw) {
  if (raw.length < 3 || raw[0] !== 0x02 || raw[1] !== raw.length - 2 || raw[1] > 8) throw new Error('not a short DER INTEGER');
  let v = 0;
  for (const b of raw.subarray(2)) v = v * 256 + b;
  return v;
}

function endorsementInfo(cert) {
  const tcb = {};
  const errors = [];
  for (const [oid, name] of Object.entries(TCB_OIDS)) {
    const raw = cert.extensions.get(oid);
    if (raw) { try { tcb[name] = derInt(raw); } catch (e) { errors.push(`${name} SPL extension: ${e.message}`); } }
  }
  let productName = null;
  const pn = cert.extensions.get(`${AMD_OID}.2`);
  if (pn && (pn[0] === 0x16 || pn[0] === 0x0c) && pn[1] === pn.length - 2) productName = new TextDecoder().decode(pn.subarray(2));
  let hwid = cert.extensions.get(`${AMD_OID}.4`) ?? null;
  if (hwid && (hwid.length === 66 || hwid.length === 10) && hwid[0] === 0x04 && hwid[1] === hwid.length - 2) hwid = hwid.subarray(2);
  const csp = cert.extensions.get(`${AMD_OID}.5`);
  const kind = csp || cert.subjectCN === 'SEV-VLEK' ? 'VLEK' : 'VCEK';
  const product = productFromName(productName) ?? productFromName(cert.issuerCN.replace(/^SEV-/, '').replace(/^VLEK-/, ''));
  return { kind, product, tcb, hwid, errors };
}

async function verifyCertSignature(child, parent) {
  try {
    if (child.sigAlgOid === OID.ecdsaSha384) {
      if (parent.keyAlgOid !== OID.ecPublicKey || parent.keyCurveOid !== OID.secp384r1) return false;
      const k = await subtle().importKey('spki', parent.spki, { name: 'ECDSA', namedCurve: 'P-384' }, false, ['verify']);
      return subtle().verify({ name: 'ECDSA', hash: 'SHA-384' }, k, ecdsaDerToRaw(child.signature, 48), child.tbs);
    }
    if (child.sigAlgOid === OID.rsaPss) {
      if (!child.pssHashSha384 || parent.keyAlgOid !== OID.rsaEncryption) return false;
      const k = await subtle().importKey('spki', parent.spki, { name: 'RSA-PSS', hash: 'SHA-384' }, false, ['verify']);
      return subtle().verify({ name: 'RSA-PSS', saltLength: child.pssSaltLength }, k, child.signature, child.tbs);
    }
  } catch {
    return false;
  }
  return false;
}

const ARK_PRODUCT_BY_FP = Object.fromEntries(Object.entries(PINNED_ARK_SHA256).map(([p, fp]) => [fp, p]));

/** leaf <- chain[0] <- ... <- chain[-1] (self-signed root, pinned AMD ARK or trusted). */
export async function verifyChain(leaf, chain, { now, product, vlek, trustedRoots = new Set() }) {
  const problems = [];
  const root = chain[chain.length - 1];
  const rootFp = toHex(await sha256(root.der));
  const amdProduct = ARK_PRODUCT_BY_FP[rootFp] ?? null;
  const rootKind = amdProduct ? 'amd' : trustedRoots.has(rootFp) ? 'trusted' : null;
  if (!rootKind) problems.push(`root ${JSON.stringify(root.subjectCN)} (${rootFp.slice(0, 16)}...) is not a pinned AMD ARK and not an explicitly trusted root`);
  const certs = [leaf, ...chain];
  for (let i = 0; i < chain.length; i++) {
    const child = certs[i], parent = chain[i];
    if (!equalBytes(child.issuerRaw, parent.subjectRaw) || !(await verifyCertSignature(child, parent))) {
      problems.push(`${JSON.stringify(child.subjectCN)} not issued by ${JSON.stringify(parent.subjectCN)}`);
    }
  }
  if (!equalBytes(root.issuerRaw, root.subjectRaw) || !(await verifyCertSignature(root, root))) problems.push(`root ${JSON.stringify(root.subjectCN)} is not self-signed`);
  for (const c of certs) {
    if (now < c.notBefore) problems.push(`${JSON.stringify(c.subjectCN)} not valid yet`);
    else if (now > c.notAfter) problems.push(`${JSON.stringify(c.subjectCN)} expired`);
  }
  if (rootKind === 'amd') {
    if (chain.length !== 2) problems.push('AMD chain must be ASK/ASVK + ARK');
    if (!certs.every((c) => c.sigAlgOid === OID.rsaPss && c.pssHashSha384)) problems.push('AMD chain certificates must be signed RSASSA-PSS with SHA-384');
    if (product && product !== amdProduct) problems.push(`report is from ${product} but chain roots in ARK-${amdProduct}`);
    const wantInter = vlek ? `SEV-VLEK-${amdProduct}` : `SEV-${amdProduct}`;
    if (chain[0].subjectCN !== wantInter) problems.push(`intermediate is ${chain[0].subjectCN}, want ${wantInter}`);
    const wantLeaf = vlek ? 'SEV-VLEK' : 'SEV-VCEK';
    if (leaf.subjectCN !== wantLeaf) problems.push(`endorsement key is ${leaf.subjectCN}, want ${wantLeaf}`);
  }
  return { ok: !problems.length, detail: problems.join('; ') || (rootKind === 'amd' ? `chains to ARK-${amdProduct}` : `trusted root ${rootFp.slice(0, 16)}...`), rootKind, rootFp };
}

async function verifyReportSignature(rep, leaf) {
  if (rep.signatureAlgo !== 1) return [false, `unsupported SIGNATURE_ALGO ${rep.signatureAlgo}`];
  if (rep.signingKey !== 0 && rep.signingKey !== 1) return [false, 'report signed by no usable key'];
  if (leaf.keyAlgOid !== OID.ecPublicKey || leaf.keyCurveOid !== OID.secp384r1) return [false, 'endorsement key is not an ECDSA P-384 key'];
  const le = (o) => {
    const b = rep.raw.subarray(o, o + 72);
    if (b.subarray(48).some((x) => x)) return null;
    return Uint8Array.from(b.subarray(0, 48)).reverse();
  };
  const r = le(0x2a0), s = le(0x2e8);
  if (!r || !s) return [false, 'signature integers too large'];
  const k = await subtle().importKey('spki', leaf.spki, { name: 'ECDSA', namedCurve: 'P-384' }, false, ['verify']);
  const ok = await subtle().verify({ name: 'ECDSA', hash: 'SHA-384' }, k, concat(r, s), rep.raw.subarray(0, SIGNED_SIZE));
  return ok ? [true, `signed by the ${rep.signingKey ? 'VLEK' : 'VCEK'}`] : [false, 'ECDSA P-384 signature over bytes 0x000..0x29F does not verify'];
}

/**
 * Verify one SNP report (Uint8Array) against its VCEK/VLEK PEM; chainPem optional (the
 * simulated TEE's root, or ASK+ARK; default: the pinned AMD chain of the product).
 * Returns {platform, checks: [{name, ok, detail}]}.
 */
export async function verifySnp(report, endorsementPem, { now, chainPem, expectedReportData, policy } = {}) {
  const checks = [];
  const add = (name, ok, detail = '') => checks.push({ name, ok: Boolean(ok), detail });
  const rep = typeof report.problems === 'undefined' ? parseSnpReport(report) : report;
  const leaf = parseCertificate(typeof endorsementPem === 'string' ? pemToDers(endorsementPem)[0] : endorsementPem);
  const info = endorsementInfo(leaf);
  add('report_parse', !rep.problems.length, rep.problems.join('; ') || `version ${rep.version}`);
  const product = rep.product ?? info.product;
  const vlek = rep.signingKey === 1;
  add('signature', ...(await verifyReportSignature(rep, leaf)));
  const chainProblems = [];
  if (rep.product && info.product && rep.product !== info.product) chainProblems.push(`report CPUID says ${rep.product}, certificate ${info.product}`);
  if ((rep.signingKey === 0 || rep.signingKey === 1) && info.kind !== (vlek ? 'VLEK' : 'VCEK')) chainProblems.push('report signer and certificate kind differ');
  let result = null;
  let chainDers = chainPem ? pemToDers(chainPem) : null;
  if (!chainDers && !product) chainProblems.push('cannot tell the product line, and no chain given');
  else {
    if (!chainDers) { const p = EMBEDDED_PEM[product]; chainDers = [...pemToDers(vlek ? p.ASVK : p.ASK), ...pemToDers(p.ARK)]; }
    result = await verifyChain(leaf, chainDers.map(parseCertificate), { now, product, vlek, trustedRoots: policy?.trustedRoots ?? new Set() });
    if (!result.ok) chainProblems.push(result.detail);
  }
  add('chain', !chainProblems.length, chainProblems.join('; ') || result.detail);
  const platform = result?.rootKind === 'trusted' ? 'simulated-snp' : 'sev-snp';
  // TCB: the key was issued for exactly the reported TCB; hwID = CHIP_ID (unless masked).
  const tcbProblems = [...info.errors];
  const reported = tcbComponents(rep.reportedTcb, product);
  for (const [name, value] of Object.entries(reported)) {
    if (info.tcb[name] === undefined) tcbProblems.push(`certificate lacks the ${name} SPL extension`);
    else if (info.tcb[name] !== value) tcbProblems.push(`REPORTED_TCB ${name}=${value} but certificate says ${info.tcb[name]}`);
  }
  if (rep.signingKey === 0) {
    if (!info.hwid) tcbProblems.push('VCEK has no hwID extension');
    else if (rep.chipId.some((x) => x)) {
      const want = info.hwid.length === 8 ? rep.chipId.subarray(0, 8) : rep.chipId;
      if (!equalBytes(info.hwid, want)) tcbProblems.push('VCEK hwID does not match CHIP_ID');
    }
  }
  add('tcb', !tcbProblems.length, tcbProblems.join('; ') || 'REPORTED_TCB matches the certificate');
  add('debug', !rep.debug || policy?.allowDebug, rep.debug ? 'guest policy allows debugging (bit 19)' : 'debug disallowed');
  if (expectedReportData) add('report_data', equalBytes(rep.reportData, expectedReportData), 'REPORT_DATA binding to the claims');
  if (policy) {
    if (policy.measurements === null) add('measurement', true, 'not constrained by policy');
    else add('measurement', policy.measurements.has(toHex(rep.measurement)), 'launch measurement in the release');
    const smtBad = !policy.allowSmt && (rep.smtAllowed || rep.platformSmt);
    add('smt', !smtBad, smtBad ? 'SMT allowed/enabled but policy forbids it' : '');
    add('migration_agent', !(rep.migrateMa && !policy.allowMigrationAgent), '');
    if (policy.vmpl !== null && policy.vmpl !== undefined) add('vmpl', rep.vmpl === policy.vmpl, `VMPL ${rep.vmpl}, policy wants ${policy.vmpl}`);
    if (policy.minTcb) {
      const low = Object.entries(policy.minTcb).filter(([k, v]) => (reported[k] ?? -1) < v).map(([k, v]) => `${k}=${reported[k]} < ${v}`);
      add('min_tcb', !low.length, low.join('; ') || 'at or above minimum');
    }
    if (policy.minGuestSvn) add('guest_svn', rep.guestSvn >= policy.minGuestSvn, `${rep.guestSvn} vs minimum ${policy.minGuestSvn}`);
  }
  return { platform, product, checks };
}

// ------------------------------------------------------------------------- bundle

function strictB64(s, what) {
  if (typeof s !== 'string') throw new DecodeError(`${what} must be base64 text`);
  const b = fromBase64(s);
  if (toBase64(b) !== s) throw new DecodeError(`${what} is not canonical base64`);
  return b;
}

/**
 * Verify one `GET /v1/nodes` entry at `now` (Unix seconds) under a TrustPolicy.
 * Returns {nodeId, publicKey, pqPublicKey, models, expiresAt}; throws VerificationError
 * listing every failed check. The node keys (X25519, and X-Wing or null) and id come
 * from the attested claims only.
 */
export async function verifyNodeEntry(entry, policy, now = Date.now() / 1000) {
  policy.checkCurrent(now); // an expired manifest trusts nothing any more
  const checks = [];
  const add = (name, ok, detail = '') => checks.push({ name, ok: Boolean(ok), detail });
  let b, claimsBytes, claims, evidence, listedKey, listedId;
  try {
    b = strictObj(entry.bundle, 'bundle', ['version', 'claims', 'tee', 'evidence', 'endorsements', 'gpu']);
    if (b.version !== 1) throw new DecodeError(`unsupported bundle version ${b.version}`);
    if (!['sev-snp', 'tdx', 'simulated-snp'].includes(b.tee)) throw new DecodeError('unknown tee');
    claimsBytes = strictB64(b.claims, 'claims');
    claims = decodeClaims(claimsBytes);
    evidence = strictB64(b.evidence, 'evidence');
    listedKey = fromHex(entry.public_key);
    listedId = fromHex(entry.node_id);
    if (!Array.isArray(b.gpu)) throw new DecodeError('gpu must be a list');
  } catch (e) {
    throw new DecodeError(`malformed directory entry: ${e.message}`);
  }
  if (now + CLOCK_SKEW < claims.issued_at) add('claims_window', false, 'issued in the future');
  else add('claims_window', now < claims.expires_at, now < claims.expires_at ? 'valid' : 'expired');
  const life = claims.expires_at - claims.issued_at;
  add('claims_lifetime', life > 0 && life <= MAX_LIFETIME, `lifetime ${life} s`);
  add('tee_type', claims.tee === b.tee, `claims say ${claims.tee}, evidence is ${b.tee}`);
  add('node_key', equalBytes(claims.hpkePublicKey, listedKey), 'directory key is the attested key');
  const m = policy.manifest;
  const release = policy.release(claims.release_id);
  add('release', release, `release ${claims.release_id}${release ? '' : ' is not in the manifest'}`);
  add('model_digest', release?.modelDigests.has(claims.model_digest), 'model digest in the release');
  if (policy.postQuantumRequired) {
    // No silent downgrade: a node without an attested X-Wing key takes only X25519-sealed requests.
    const pq = claims.pqPublicKey !== null;
    add('post_quantum', pq, pq ? 'X-Wing key attested' : 'the manifest requires post-quantum keys; the node attests none');
  }
  const simulated = b.tee === 'simulated-snp' || claims.tee === 'simulated-snp';
  if (simulated) add('development', policy.development, policy.development ? 'simulated TEE: manifest trusts development roots' : 'simulated TEE, but the manifest trusts no development root');
  const expectedRd = await reportDataFor(claimsBytes);
  if (b.tee === 'tdx') {
    add('tee.tdx', false, 'TDX quotes are not verified by the JS client yet');
  } else {
    const e = b.endorsements ?? {};
    try {
      strictObj(e, 'endorsements', [], ['vcek', 'vlek', 'ask_ark']);
      if (('vcek' in e) === ('vlek' in e)) throw new DecodeError('SNP endorsements need exactly one of vcek, vlek');
      const rep = parseSnpReport(evidence);
      const product = rep.product ?? endorsementInfo(parseCertificate(pemToDers(e.vcek ?? e.vlek)[0])).product;
      let snpPolicy;
      if (release) {
        const minTable = m.snpMinTcb;
        let minTcb = null;
        if (Object.keys(minTable).length) {
          if (!(product in minTable)) add('tee.min_tcb', false, `no minimum TCB for product ${product} in the manifest`);
          else minTcb = minTable[product];
        }
        snpPolicy = {
          measurements: release.hasSnp ? release.snpMeasurements : new Set(),
          allowDebug: m.snpAllowDebug, allowSmt: m.snpAllowSmt, allowMigrationAgent: m.snpAllowMigrationAgent,
          vmpl: m.snpVmpl, minTcb, minGuestSvn: m.snpMinGuestSvn,
          // Real hardware must chain to AMD: development roots count only for simulated TEEs.
          trustedRoots: b.tee === 'sev-snp' ? new Set() : m.developmentRoots,
        };
      }
      const sub = await verifySnp(rep, e.vcek ?? e.vlek, { now, chainPem: e.ask_ark, expectedReportData: expectedRd, policy: snpPolicy });
      for (const c of sub.checks) add(`tee.${c.name}`, c.ok, c.detail);
      add('tee.root_kind', sub.platform === b.tee, `evidence chains to a ${sub.platform} root, bundle says ${b.tee}`);
    } catch (err) {
      add('tee.evidence', false, err.message);
    }
  }
  if (m.requireGpu) add('gpu_required', b.gpu.length > 0, `${b.gpu.length} GPU(s) attested`);
  if (!b.gpu.length) add('gpu_digest', claims.gpu_evidence_digest === null, 'no GPU');
  else add('gpu', false, 'GPU (NVIDIA SPDM) evidence is not verified by the JS client yet');
  add('node_id', claims.node_id.toLowerCase() === toHex(listedId) && listedId.length === 16, 'directory node id is the attested one');
  const failed = checks.filter((c) => !c.ok);
  if (failed.length) {
    const err = new VerificationError(failed.map((c) => `${c.name}: ${c.detail}`).join('; '));
    err.checks = checks;
    throw err;
  }
  // Trusted until the claims or the manifest that admitted them expire, whichever is first.
  const expiresAt = Math.min(claims.expires_at, policy.manifest.expiresAt);
  return { nodeId: listedId, publicKey: claims.hpkePublicKey, pqPublicKey: claims.pqPublicKey, signingKey: claims.signingKey, models: (entry.models ?? []).map(String), expiresAt, checks };
}
