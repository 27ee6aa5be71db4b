// Interop peer: @cloudflare/privacypass-ts 0.8.1 as a client of OUR issuer, over HTTP.
// Reads {"issuer_url", "api_key", "challenge": hex, "count": n (optional, batch if > 1)}
// on stdin. Fetches the issuer directory with Node's fetch, picks the first type-2 key
// in force, builds TokenRequest(s) with privacypass-ts, POSTs them with the Bearer key
// (single: privacypass-ts's own sendTokenRequest), finalizes and verifies with
// privacypass-ts. Writes {"token_key": hex, "tokens": [hex], "verified": [bool]}.
import {
  TOKEN_TYPES,
  TokenChallenge,
  MediaType,
  sendTokenRequest,
  publicVerif,
  genericBatched,
  util,
} from '@cloudflare/privacypass-ts';

const { BlindRSAMode, Client, Origin } = publicVerif;
const BLIND_RSA = TOKEN_TYPES.BLIND_RSA;
const DIRECTORY_PATH = '/.well-known/private-token-issuer-directory';

const hex = (h) => new Uint8Array(Buffer.from(h, 'hex'));
const toHex = (u) => Buffer.from(u).toString('hex');
const b64url = (s) => new Uint8Array(Buffer.from(s, 'base64url'));

async function readStdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

const { issuer_url, api_key, challenge, count = 1 } = await readStdin();
const dirRes = await fetch(issuer_url + DIRECTORY_PATH);
if (dirRes.status !== 200) throw new Error(`directory: HTTP ${dirRes.status}`);
if (dirRes.headers.get('content-type') !== MediaType.PRIVATE_TOKEN_ISSUER_DIRECTORY) {
  throw new Error(`directory: content type ${dirRes.headers.get('content-type')}`);
}
const directory = await dirRes.json();
const now = Date.now() / 1000;
const entry = directory['token-keys'].find(
  (k) => k['token-type'] === BLIND_RSA.value && (k['not-before'] ?? 0) <= now,
);
if (!entry) throw new Error('no type-2 key in force');
const tokenKey = b64url(entry['token-key']);
const requestUrl = new URL(directory['issuer-request-uri'], issuer_url).toString();
const chl = TokenChallenge.deserialize(hex(challenge));
const pk = await crypto.subtle.importKey(
  'spki',
  util.convertRSASSAPSSToEnc(tokenKey),
  { name: 'RSA-PSS', hash: 'SHA-384' },
  true,
  ['verify'],
);
const origin = new Origin(BlindRSAMode.PSS);

const clients = [];
const requests = [];
for (let i = 0; i < count; i++) {
  const client = new Client(BlindRSAMode.PSS);
  requests.push(await client.createTokenRequest(chl, tokenKey));
  clients.push(client);
}

let responses;
if (count === 1) {
  const headers = new Headers({ Authorization: `Bearer ${api_key}` });
  const bytes = await sendTokenRequest(requests[0].serialize(), requestUrl, headers);
  responses = [clients[0].deserializeTokenResponse(bytes)];
} else {
  const batch = new genericBatched.Client().createTokenRequest(
    requests.map((r) => new genericBatched.TokenRequest(r)),
  );
  const res = await fetch(requestUrl, {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${api_key}`,
      'Content-Type': MediaType.ARBITRARY_BATCHED_TOKEN_REQUEST,
      Accept: MediaType.ARBITRARY_BATCHED_TOKEN_RESPONSE,
    },
    body: batch.serialize(),
  });
  if (res.status !== 200) throw new Error(`batch: HTTP ${res.status} ${await res.text()}`);
  if (res.headers.get('content-type') !== MediaType.ARBITRARY_BATCHED_TOKEN_RESPONSE) {
    throw new Error(`batch: content type ${res.headers.get('content-type')}`);
  }
  const parsed = new genericBatched.Client().deserializeTokenResponse(
    new Uint8Array(await res.arrayBuffer()),
  );
  responses = parsed.tokenResponses.map((r) => {
    if (r.tokenResponse === null) throw new Error('issuer left a batch item out');
    return r.tokenResponse;
  });
}

const tokens = [];
const verified = [];
for (let i = 0; i < count; i++) {
  const token = await clients[i].finalize(responses[i]);
  tokens.push(toHex(token.serialize()));
  verified.push(await origin.verify(token, pk));
}
process.stdout.write(JSON.stringify({ token_key: toHex(tokenKey), tokens, verified }));
