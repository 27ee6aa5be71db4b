// Interop peer for openpcc.wire.hpke / openpcc.wire.ohttp, using hpke-js 1.8.0 and, for
// the KEM X-Wing (MLKEM768-X25519, 0x647a), @hpke/hybridkem-x-wing 0.7.0.
// stdin: JSON {op, ...} (all bytes as lowercase hex); stdout: JSON result.
//   open:    {kem?, aead, sk, enc, info, msgs:[{aad, ct}], exports:[{ctx, L}]} -> {pts, exports}
//   seal:    {kem?, aead, pk, info, msgs:[{aad, pt}], exports:[{ctx, L}]}      -> {enc, cts, exports}
//            kem: 0x20 (default, DHKEM(X25519, HKDF-SHA256)) or 0x647a (X-Wing)
//   ohttp_client:  {key_config, aead, bhttp, ske, pke, response?}  -> {request, response_bhttp?}
//   ohttp_gateway: {sk, request, response_bhttp, response_nonce}   -> {request_bhttp, response}
// The RFC 9458 framing below is deliberately written from the RFC, not from our code.
import { AeadId, CipherSuite, KdfId, KemId } from "hpke-js";

const hex = (b) => Buffer.from(new Uint8Array(b)).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const cat = (...xs) => new Uint8Array(Buffer.concat(xs.map((x) => Buffer.from(x))));
const te = new TextEncoder();

async function kemFor(kem = 0x20) {
  if (kem === 0x20) return KemId.DhkemX25519HkdfSha256;
  if (kem !== 0x647a) throw new Error(`unknown kem ${kem}`);
  // Imported on use, so an install that predates it still runs the X25519 ops.
  const { XWing } = await import("@hpke/hybridkem-x-wing");
  return new XWing();
}

function suiteFor(aead, kem = KemId.DhkemX25519HkdfSha256) {
  return new CipherSuite({
    kem,
    kdf: KdfId.HkdfSha256,
    aead: aead === 3 ? AeadId.Chacha20Poly1305 : AeadId.Aes128Gcm,
  });
}

function u16(n) {
  return new Uint8Array([(n >> 8) & 0xff, n & 0xff]);
}

async function exportsOf(ctx, exports) {
  const out = [];
  for (const e of exports ?? []) out.push(hex(await ctx.export(unhex(e.ctx), e.L)));
  return out;
}

// RFC 9458 §4.4 response key schedule, using hpke-js's KDF and AEAD primitives.
async function responseAead(suite, ctx, enc, responseNonce) {
  const nk = suite.aead.keySize;
  const nn = suite.aead.nonceSize;
  const secret = await ctx.export(te.encode("message/bhttp response"), Math.max(nn, nk));
  const prk = await suite.kdf.extract(cat(enc, responseNonce), secret);
  const key = await suite.kdf.expand(prk, te.encode("key"), nk);
  const nonce = await suite.kdf.expand(prk, te.encode("nonce"), nn);
  return { aead: suite.aead.createEncryptionContext(key), nonce };
}

const ops = {
  async open(p) {
    const suite = suiteFor(p.aead, await kemFor(p.kem));
    const ctx = await suite.createRecipientContext({
      recipientKey: await suite.kem.deserializePrivateKey(unhex(p.sk)),
      enc: unhex(p.enc),
      info: unhex(p.info),
    });
    const pts = [];
    for (const m of p.msgs) pts.push(hex(await ctx.open(unhex(m.ct), unhex(m.aad))));
    return { pts, exports: await exportsOf(ctx, p.exports) };
  },

  async seal(p) {
    const suite = suiteFor(p.aead, await kemFor(p.kem));
    const ctx = await suite.createSenderContext({
      recipientPublicKey: await suite.kem.deserializePublicKey(unhex(p.pk)),
      info: unhex(p.info),
    });
    const cts = [];
    for (const m of p.msgs) cts.push(hex(await ctx.seal(unhex(m.pt), unhex(m.aad))));
    return { enc: hex(ctx.enc), cts, exports: await exportsOf(ctx, p.exports) };
  },

  async ohttp_client(p) {
    const suite = suiteFor(p.aead);
    // Key config (RFC 9458 §3.1), X25519 only: key_id(1) kem_id(2) pk(32) ...
    const kc = unhex(p.key_config);
    const keyId = kc[0];
    const pk = kc.slice(3, 35);
    const hdr = cat([keyId], u16(0x0020), u16(0x0001), u16(p.aead));
    const info = cat(te.encode("message/bhttp request"), [0], hdr);
    const ekm = {
      privateKey: await suite.kem.deserializePrivateKey(unhex(p.ske)),
      publicKey: await suite.kem.deserializePublicKey(unhex(p.pke)),
    };
    const ctx = await suite.createSenderContext({
      recipientPublicKey: await suite.kem.deserializePublicKey(pk),
      info,
      ekm,
    });
    const enc = new Uint8Array(ctx.enc);
    const ct = await ctx.seal(unhex(p.bhttp));
    const out = { request: hex(cat(hdr, enc, new Uint8Array(ct))) };
    if (p.response !== undefined) {
      const res = unhex(p.response);
      const nlen = Math.max(suite.aead.keySize, suite.aead.nonceSize);
      const r = await responseAead(suite, ctx, enc, res.slice(0, nlen));
      out.response_bhttp = hex(await r.aead.open(r.nonce, res.slice(nlen), new Uint8Array()));
    }
    return out;
  },

  async ohttp_gateway(p) {
    const req = unhex(p.request);
    const aead = (req[5] << 8) | req[6];
    const suite = suiteFor(aead);
    const hdr = req.slice(0, 7);
    const enc = req.slice(7, 39);
    const ctx = await suite.createRecipientContext({
      recipientKey: await suite.kem.deserializePrivateKey(unhex(p.sk)),
      enc,
      info: cat(te.encode("message/bhttp request"), [0], hdr),
    });
    const requestBhttp = await ctx.open(req.slice(39));
    const nonce = unhex(p.response_nonce);
    const r = await responseAead(suite, ctx, enc, nonce);
    const ct = await r.aead.seal(r.nonce, unhex(p.response_bhttp), new Uint8Array());
    return { request_bhttp: hex(requestBhttp), response: hex(cat(nonce, new Uint8Array(ct))) };
  },
};

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const payload = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const op = ops[payload.op];
if (op === undefined) throw new Error(`unknown op ${payload.op}`);
process.stdout.write(JSON.stringify(await op(payload)));
