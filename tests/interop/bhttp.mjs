// Interop peer for tests/test_interop_bhttp.py: the real bhttp-js@0.2.1.
//
// stdin:  {"cases": [{"op": ..., ...}, ...]}
// stdout: {"results": [{...} | {"error": "..."}, ...]}  (one result per case)
//
// ops:
//   decode_request  {hex}                          -> {method, url, headers, body_hex}
//   decode_response {hex}                          -> {status, headers, body_hex}
//   encode_request  {method, url, headers, body_hex} -> {hex}
//   encode_response {status, headers, body_hex}      -> {hex}
// headers are [[name, value], ...] in the order fetch's Headers iterates them.
import { BHttpDecoder, BHttpEncoder } from "bhttp-js";

const readStdin = async () => {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return Buffer.concat(chunks).toString("utf8");
};

const hex = (u8) => Buffer.from(u8).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const headerList = (headers) => {
  const out = [];
  headers.forEach((value, name) => out.push([name, value]));
  return out;
};

async function runCase(c) {
  switch (c.op) {
    case "decode_request": {
      const req = new BHttpDecoder().decodeRequest(unhex(c.hex));
      const body = new Uint8Array(await req.arrayBuffer());
      return { method: req.method, url: req.url, headers: headerList(req.headers), body_hex: hex(body) };
    }
    case "decode_response": {
      const res = new BHttpDecoder().decodeResponse(unhex(c.hex));
      const body = new Uint8Array(await res.arrayBuffer());
      return { status: res.status, headers: headerList(res.headers), body_hex: hex(body) };
    }
    case "encode_request": {
      const init = { method: c.method, headers: c.headers };
      if (c.body_hex) init.body = unhex(c.body_hex);
      const req = new Request(c.url, init);
      return { hex: hex(await new BHttpEncoder().encodeRequest(req)) };
    }
    case "encode_response": {
      const body = c.body_hex ? unhex(c.body_hex) : null;
      const res = new Response(body, { status: c.status, headers: c.headers });
      return { hex: hex(await new BHttpEncoder().encodeResponse(res)) };
    }
    default:
      throw new Error(`unknown op ${c.op}`);
  }
}

const input = JSON.parse(await readStdin());
const results = [];
for (const c of input.cases) {
  try {
    results.push(await runCase(c));
  } catch (e) {
    results.push({ error: `${e.name}: ${e.message}` });
  }
}
process.stdout.write(JSON.stringify({ results }));
