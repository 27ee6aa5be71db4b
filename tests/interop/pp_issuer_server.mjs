// Interop peer: a Privacy Pass issuer built on @cloudflare/privacypass-ts 0.8.1.
// Serves the issuer directory and answers token requests with privacypass-ts's
// Issuer (single) and genericBatched.Issuer (batch), so OpenPCC's wallet can be
// checked against an issuer it did not write.
//
// Reads one JSON object on stdin: {"api_key": str, "batch": bool}. Listens on
// 127.0.0.1 on a port the OS picks and prints {"port": n, "token_key": hex} as the
// first stdout line. GET /stats returns how many single and batch requests came.
import http from 'node:http';
import { TOKEN_TYPES, publicVerif, genericBatched } from '@cloudflare/privacypass-ts';

const { BlindRSAMode, Issuer, TokenRequest, getPublicKeyBytes } = publicVerif;
const BLIND_RSA = TOKEN_TYPES.BLIND_RSA;
const DIRECTORY_PATH = '/.well-known/private-token-issuer-directory';
const SINGLE = 'application/private-token-request';
const BATCH = 'application/private-token-generic-batch-request';

async function readStdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

// privacypass-ts deserializers read `bytes.buffer` from offset 0: copy into a fresh buffer.
const fresh = (buf) => new Uint8Array(buf);

const config = await readStdin();
const { privateKey, publicKey } = await Issuer.generateKey(BlindRSAMode.PSS, {
  modulusLength: 2048,
  publicExponent: new Uint8Array([1, 0, 1]),
});
const issuer = new Issuer(BlindRSAMode.PSS, 'issuer.example', privateKey, publicKey);
const batchIssuer = new genericBatched.Issuer(issuer);
const tokenKey = await getPublicKeyBytes(publicKey);
const directory = JSON.stringify({
  'issuer-request-uri': '/token-request',
  'token-keys': [
    {
      'token-type': BLIND_RSA.value,
      'token-key': Buffer.from(tokenKey).toString('base64url'),
      'not-before': Math.floor(Date.now() / 1000) - 60,
    },
  ],
});
const stats = { single: 0, batch: 0, rejected_batch: 0 };

function problem(res, status, title) {
  res.writeHead(status, { 'Content-Type': 'application/problem+json' });
  res.end(JSON.stringify({ type: 'about:blank', title, status }));
}

async function body(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  return fresh(Buffer.concat(chunks));
}

async function handle(req, res) {
  if (req.method === 'GET' && req.url === DIRECTORY_PATH) {
    res.writeHead(200, { 'Content-Type': 'application/private-token-issuer-directory' });
    return res.end(directory);
  }
  if (req.method === 'GET' && req.url === '/stats') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    return res.end(JSON.stringify(stats));
  }
  if (req.method !== 'POST' || req.url !== '/token-request') {
    return problem(res, 404, 'Not Found');
  }
  const ctype = (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (ctype !== SINGLE && ctype !== BATCH) return problem(res, 415, 'Unsupported Media Type');
  if (req.headers.authorization !== `Bearer ${config.api_key}`) {
    return problem(res, 401, 'Unauthorized');
  }
  const bytes = await body(req);
  if (ctype === BATCH) {
    if (!config.batch) {
      stats.rejected_batch++;
      return problem(res, 415, 'Unsupported Media Type');
    }
    stats.batch++;
    const batch = genericBatched.BatchedTokenRequest.deserialize(bytes);
    const resp = await batchIssuer.issue(batch);
    res.writeHead(200, { 'Content-Type': 'application/private-token-generic-batch-response' });
    return res.end(Buffer.from(resp.serialize()));
  }
  stats.single++;
  const resp = await issuer.issue(TokenRequest.deserialize(BLIND_RSA, bytes));
  res.writeHead(200, { 'Content-Type': 'application/private-token-response' });
  return res.end(Buffer.from(resp.serialize()));
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    process.stderr.write(`${err.stack}\n`);
    if (!res.headersSent) problem(res, 400, 'Bad Request');
  });
});
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  process.stdout.write(`${JSON.stringify({ port, token_key: Buffer.from(tokenKey).toString('hex') })}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
