// Interop peer: @cloudflare/privacypass-ts 0.8.1, type 0x0002 (Blind RSA 2048).
// Reads {"mode": ..., ...} as JSON on stdin, writes JSON on stdout. All byte
// strings are hex. One invocation per protocol step; client state between
// steps travels as JSON (token_input, inv, token_key).
import {
  TOKEN_TYPES,
  TokenChallenge,
  AuthenticatorInput,
  Token,
  WWWAuthenticateHeader,
  AuthorizationHeader,
  publicVerif,
  genericBatched,
  util,
} from '@cloudflare/privacypass-ts';

const { BlindRSAMode, Client, Issuer, Origin, TokenRequest, TokenResponse, getPublicKeyBytes } =
  publicVerif;
const BLIND_RSA = TOKEN_TYPES.BLIND_RSA;
const RSA_PSS = { name: 'RSA-PSS', hash: 'SHA-384' };

// Fresh, exactly-sized ArrayBuffer: privacypass-ts reads `bytes.buffer` from offset 0
// in several deserializers, so a pooled Node Buffer would be parsed wrongly.
const hex = (h) => new Uint8Array(Buffer.from(h, 'hex'));
const toHex = (u) => Buffer.from(u).toString('hex');

async function readStdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

// privacypass-ts keeps its own (unexported) converter: PSS SPKI -> rsaEncryption SPKI.
async function importTokenKey(tokenKey) {
  const spki = util.convertRSASSAPSSToEnc(tokenKey);
  return crypto.subtle.importKey('spki', spki, RSA_PSS, true, ['verify']);
}

async function importPrivate(pkcs8) {
  const priv = await crypto.subtle.importKey('pkcs8', pkcs8, RSA_PSS, true, ['sign']);
  const jwk = await crypto.subtle.exportKey('jwk', priv);
  const pub = await crypto.subtle.importKey(
    'jwk',
    { kty: 'RSA', n: jwk.n, e: jwk.e, alg: 'PS384', ext: true },
    RSA_PSS,
    true,
    ['verify'],
  );
  return { priv, pub };
}

const modes = {
  async keygen() {
    const { privateKey, publicKey } = await Issuer.generateKey(BlindRSAMode.PSS, {
      modulusLength: 2048,
      publicExponent: new Uint8Array([1, 0, 1]),
    });
    const issuer = new Issuer(BlindRSAMode.PSS, 'issuer.example', privateKey, publicKey);
    return {
      pkcs8: toHex(new Uint8Array(await crypto.subtle.exportKey('pkcs8', privateKey))),
      token_key: toHex(await getPublicKeyBytes(publicKey)),
      token_key_id: toHex(await issuer.tokenKeyID()),
    };
  },

  async token_key_of({ pkcs8 }) {
    const { priv, pub } = await importPrivate(hex(pkcs8));
    const issuer = new Issuer(BlindRSAMode.PSS, 'issuer.example', priv, pub);
    return {
      token_key: toHex(await getPublicKeyBytes(pub)),
      token_key_id: toHex(await issuer.tokenKeyID()),
    };
  },

  async client_begin({ token_key, challenge }) {
    const client = new Client(BlindRSAMode.PSS);
    const chl = TokenChallenge.deserialize(hex(challenge));
    const req = await client.createTokenRequest(chl, hex(token_key));
    // finData is a plain (non-#private) field of the compiled class.
    const fin = client.finData;
    return {
      token_request: toHex(req.serialize()),
      state: { token_input: toHex(fin.tokenInput), inv: toHex(fin.inv), token_key },
    };
  },

  async client_finish({ state, token_response }) {
    const client = new Client(BlindRSAMode.PSS);
    const tokenInput = hex(state.token_input);
    client.finData = {
      tokenInput,
      authInput: AuthenticatorInput.deserialize(BLIND_RSA, tokenInput, { bytesRead: 0 }),
      inv: hex(state.inv),
      pkIssuer: await importTokenKey(hex(state.token_key)),
    };
    const token = await client.finalize(client.deserializeTokenResponse(hex(token_response)));
    const origin = new Origin(BlindRSAMode.PSS);
    const ok = await origin.verify(token, await importTokenKey(hex(state.token_key)));
    return { token: toHex(token.serialize()), verified: ok };
  },

  async issue({ pkcs8, token_request }) {
    const { priv, pub } = await importPrivate(hex(pkcs8));
    const issuer = new Issuer(BlindRSAMode.PSS, 'issuer.example', priv, pub);
    const req = TokenRequest.deserialize(BLIND_RSA, hex(token_request));
    const resp = await issuer.issue(req);
    return { token_response: toHex(resp.serialize()) };
  },

  async verify({ token_key, token }) {
    const origin = new Origin(BlindRSAMode.PSS);
    const tok = Token.deserialize(BLIND_RSA, hex(token));
    return { verified: await origin.verify(tok, await importTokenKey(hex(token_key))) };
  },

  async headers({ challenge, token_key, max_age, token, parse_www = [], parse_auth = [] }) {
    const chl = TokenChallenge.deserialize(hex(challenge));
    const www = new WWWAuthenticateHeader(chl, hex(token_key), max_age ?? undefined);
    const auth = new AuthorizationHeader(Token.deserialize(BLIND_RSA, hex(token)));
    const parsed_www = parse_www.map((h) =>
      WWWAuthenticateHeader.parse(h).map((w) => ({
        token_challenge: toHex(w.challenge.serialize()),
        token_key: toHex(w.tokenKey),
        max_age: w.maxAge ?? null,
      })),
    );
    const parsed_auth = parse_auth.map((h) =>
      AuthorizationHeader.parse(BLIND_RSA, h).map((a) => toHex(a.token.serialize())),
    );
    return {
      www_authenticate: www.toString(),
      www_authenticate_quoted: www.toString(true),
      authorization: auth.toString(),
      authorization_quoted: auth.toString(true),
      parsed_www,
      parsed_auth,
    };
  },
};

// Generic batched issuance (privacypass-ts genericBatched).
modes.batch_client = async ({ token_key, challenge, count }) => {
  const reqs = [];
  const states = [];
  for (let i = 0; i < count; i++) {
    const out = await modes.client_begin({ token_key, challenge });
    reqs.push(
      new genericBatched.TokenRequest(TokenRequest.deserialize(BLIND_RSA, hex(out.token_request))),
    );
    states.push(out.state);
  }
  const batch = new genericBatched.Client().createTokenRequest(reqs);
  return { batch_request: toHex(batch.serialize()), states };
};

modes.batch_issue = async ({ pkcs8, batch_request }) => {
  const { priv, pub } = await importPrivate(hex(pkcs8));
  const issuer = new genericBatched.Issuer(
    new Issuer(BlindRSAMode.PSS, 'issuer.example', priv, pub),
  );
  const resp = await issuer.issue(genericBatched.BatchedTokenRequest.deserialize(hex(batch_request)));
  return { batch_response: toHex(resp.serialize()) };
};

modes.batch_parse_response = async ({ batch_response }) => {
  const resp = new genericBatched.Client().deserializeTokenResponse(hex(batch_response));
  return {
    items: resp.tokenResponses.map((r) =>
      r.tokenResponse === null
        ? null
        : { token_type: r.tokenType, response: toHex(r.tokenResponse.serialize()) },
    ),
  };
};

const input = await readStdin();
const fn = modes[input.mode];
if (!fn) {
  process.stderr.write(`unknown mode ${input.mode}\n`);
  process.exit(2);
}
process.stdout.write(JSON.stringify(await fn(input)));
