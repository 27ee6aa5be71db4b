// Types for @openpcc/client (the implementation is plain ESM JavaScript in src/).

export type Field = [Uint8Array, Uint8Array];

// ----------------------------------------------------------------------- errors
export class OpenPCCError extends Error {}
export class DecodeError extends OpenPCCError {}
export class TruncatedError extends DecodeError {}
export class LimitExceededError extends DecodeError {}
export class UnsupportedError extends DecodeError {}
export class EncodeError extends OpenPCCError {}
export class DecryptError extends OpenPCCError {}
export class StateError extends OpenPCCError {}
export class VerificationError extends OpenPCCError {
  checks?: Check[];
}
export class RelayError extends OpenPCCError {}
export class IssuerError extends OpenPCCError {
  status: number | null;
}
export class GatewayError extends OpenPCCError {
  constructor(status: number, problem?: Record<string, unknown> | null, message?: string);
  status: number;
  problem: Record<string, unknown> | null;
}
export class TokenRejectedError extends GatewayError {}
export class NoCapacityError extends GatewayError {}
export class NoVerifiedNodeError extends OpenPCCError {
  model: string;
  rejected: Record<string, string[]>;
}
export class NodeError extends OpenPCCError {
  status: number;
  body: Uint8Array;
}
export class TruncatedResponseError extends OpenPCCError {}

// ----------------------------------------------------------------------- client
export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | string;
  content: string;
  [k: string]: unknown;
}
export interface ChatCompletionChunk {
  id?: string;
  object?: 'chat.completion.chunk' | string;
  model?: string;
  choices: Array<{ index: number; delta: { role?: string; content?: string | null }; finish_reason?: string | null }>;
  [k: string]: unknown;
}
export interface ChatCompletion {
  id?: string;
  object?: 'chat.completion' | string;
  choices: Array<{ index: number; message: { role: string; content: string | null }; finish_reason?: string | null }>;
  [k: string]: unknown;
}
/**
 * Prefix cache scope (docs/PROTOCOL.md "Prefix cache scope and affinity"): 'conversation'
 * (every turn of one conversation shares the node's prefix cache, no other conversation
 * does), any other string (a named scope, shared on purpose by every request naming it),
 * or null (a fresh cache namespace per request).
 */
export type CacheScope = 'conversation' | string | null;

export interface ChatCreateParams {
  model: string;
  messages: ChatMessage[];
  stream?: boolean;
  /** This request's cache scope (default: the client's `cacheScope`); not sent to the engine. */
  cacheScope?: CacheScope;
  max_tokens?: number;
  temperature?: number;
  [k: string]: unknown;
}
export interface VerifiedNode {
  nodeId: Uint8Array;
  /** The node's attested X25519 key (claims `hpke_public_key`, 32 bytes): sealed requests v1. */
  publicKey: Uint8Array;
  /**
   * The node's attested X-Wing key (claims `pq_public_key`, 1216 bytes), or null for an
   * X25519-only node. Requests are sealed to it (v2) whenever a node serving the model has one.
   */
  pqPublicKey: Uint8Array | null;
  /** The node's attested per-boot Ed25519 public key (claims `signing_key`, 32 bytes). */
  signingKey: Uint8Array;
  models: string[];
  expiresAt: number;
  checks: Check[];
}
export interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

export interface ClientOptions {
  relayUrl: string;
  issuerUrl: string;
  apiKey: string;
  /** The signed release manifest (JSON text or parsed object), or a verified TrustPolicy. */
  policy: string | Record<string, unknown> | TrustPolicy;
  /** Pinned Ed25519 release key(s): PEM text, 32 raw bytes or DER SPKI. */
  releasePublicKey?: string | Uint8Array | Array<string | Uint8Array>;
  /** Candidates per request (1..8, default 3). */
  k?: number;
  fetch?: typeof fetch;
  /** Token challenge issuer name (default: the issuer URL's host name). */
  issuerName?: string;
  /** Tokens per issuance batch (default 10). */
  batchSize?: number;
  /** Unix seconds; what manifests, claims and the node cache are judged by. */
  clock?: () => number;
  /**
   * Where the highest manifest serial seen is kept (a lower one is refused as a rollback).
   * Default: localStorage where there is one, else memory; null: no memory.
   */
  serialStore?: SerialStore | null;
  /**
   * Where a newer release manifest is fetched from before the current one expires (due
   * once less than a quarter of its lifetime is left, at most one attempt per 60 s):
   * 'gateway' (default) — `GET /v1/release-manifest` through the relay; an absolute
   * https:// URL — fetched directly; null — never refreshed. Needs `releasePublicKey`.
   */
  manifestUrl?: 'gateway' | string | null;
  /**
   * Where the last refreshed signed manifest is kept, so a reload starts from the newest
   * valid of it and `policy`. Default: localStorage where there is one, else memory;
   * null: not kept.
   */
  manifestStore?: ManifestStore | null;
  /**
   * Default cache scope of chat requests (default 'conversation'). Legacy completions
   * have no conversation: they use it only when it is a name.
   */
  cacheScope?: CacheScope;
  /**
   * Where the cache secret (32 random bytes, replaced after 7 days by `clock`) is kept as
   * `{"secret": "<64 hex>", "created_at": <unix s>}`. Default: localStorage
   * ("openpcc.cacheSecret") where there is one, else memory; null: this client's memory.
   */
  cacheSecretStore?: CacheSecretStore | null;
  /**
   * List the node that answered a conversation's last turn first among the k candidates
   * next turn (default true); false: candidates in random order always.
   */
  affinity?: boolean;
}

export interface CacheSecretStore {
  get(): string | null | undefined | Promise<string | null | undefined>;
  set(text: string): void | Promise<void>;
}
export function webStorageCacheSecretStore(storage: Storage, key?: string): CacheSecretStore;
export function memoryCacheSecretStore(): CacheSecretStore;
/**
 * UTF-8 of `obj` as Python's json.dumps(obj, sort_keys=True, separators=(",", ":"),
 * ensure_ascii=False) writes it (exact for objects, arrays, strings, booleans, null, integers).
 */
export function canonicalJson(obj: unknown): Uint8Array;
/** The messages up to and including the first whose role is 'user' (all if none is). */
export function conversationPrefix<T>(messages: T[]): T[];
/** HMAC-SHA256 salt of a request's cache scope (32 bytes), or null (no scope, or no messages). */
export function deriveCacheSalt(
  secret: Uint8Array,
  scope?: CacheScope,
  request?: { model?: string; messages?: unknown[] | null },
): Promise<Uint8Array | null>;
/** 604800: a cache secret's lifetime in seconds (7 days). */
export const CACHE_SECRET_LIFETIME: number;
/** 1024: conversations whose last answering node the client remembers. */
export const AFFINITY_ENTRIES: number;

export interface ManifestStore {
  get(): string | null | undefined | Promise<string | null | undefined>;
  set(signedManifest: string): void | Promise<void>;
}
export function webStorageManifestStore(storage: Storage, key?: string): ManifestStore;
export function memoryManifestStore(): ManifestStore;

export interface SerialStore {
  get(keyId: string): number | string | null | undefined | Promise<number | string | null | undefined>;
  set(keyId: string, serial: number): void | Promise<void>;
}
export function rememberSerial(policy: TrustPolicy, store: SerialStore | null): Promise<TrustPolicy>;
export function webStorageSerialStore(storage: Storage, prefix?: string): SerialStore;
export function memorySerialStore(): SerialStore;

export class OpenPCCClient {
  readonly wallet: TokenWallet;
  chat: {
    completions: {
      create(params: ChatCreateParams & { stream: true }): AsyncIterable<ChatCompletionChunk>;
      create(params: ChatCreateParams & { stream?: false }): Promise<ChatCompletion>;
    };
  };
  completions: {
    create(params: { model: string; prompt: string; stream: true; cacheScope?: CacheScope; [k: string]: unknown }): AsyncIterable<Record<string, unknown>>;
    create(params: { model: string; prompt: string; stream?: false; cacheScope?: CacheScope; [k: string]: unknown }): Promise<Record<string, unknown>>;
  };
  policy(): Promise<TrustPolicy>;
  /**
   * The gateway's OHTTP key config both request kinds use (see chooseKeyConfig): its
   * `kemId` is the outer layer's KEM, KEM_XWING (0x647a) whenever the manifest pins one.
   */
  keyConfig(): Promise<KeyConfig>;
  verifiedNodes(opts?: { refresh?: boolean }): Promise<VerifiedNode[]>;
  models(): Promise<string[]>;
  /** Node ids whose bundles failed verification, with the reasons. */
  rejected: Record<string, string[]>;
  /** Why the last release-manifest refresh failed (refused or unreachable), or null. */
  readonly manifestRefreshError: Error | null;
  /** The default cache scope of chat requests. */
  cacheScope: CacheScope;
  /**
   * The node id (32 lower-case hex) the most recent sealed answer named in its
   * openpcc-node-id header, or null (absent or malformed). For tests and debugging.
   */
  readonly lastNodeId: string | null;
  /**
   * The KEM requests for `model` are sealed with (the inner layer): KEM_XWING (sealed v2)
   * when a verified node serving it attests an X-Wing key, else KEM_X25519 (v1); null
   * when no verified node serves it.
   */
  innerKem(model: string): Promise<number | null>;
  /** The sealed-request version of the most recent request: 2 (X-Wing), 1 (X25519), or null. */
  readonly lastSealedVersion: 1 | 2 | null;
}

export function createClient(opts: ClientOptions): OpenPCCClient;

export class TokenWallet {
  constructor(opts: { issuerUrl: string; apiKey: string; issuerName?: string; batchSize?: number; maxKeys?: number; fetch?: typeof fetch });
  readonly count: number;
  take(): Promise<{ bytes: Uint8Array; tokenKeyId: Uint8Array }>;
  refill(n?: number): Promise<number>;
}
export function formatAuthorization(token: Uint8Array): string;

// ------------------------------------------------------------------ attestation
export interface ReleaseManifest {
  serial: number;
  issuedAt: number;
  expiresAt: number;
  [k: string]: unknown;
}
export class TrustPolicy {
  /** The verified manifest, parsed. */
  readonly manifest: ReleaseManifest;
  readonly development: boolean;
  /** The signing key's id (SHA-256 of the raw Ed25519 key, hex). */
  readonly keyId: string;
  /** Throws VerificationError unless the manifest is valid at `now` (Unix seconds). */
  checkCurrent(now: number): void;
  acceptsOhttpKey(config: Uint8Array): Promise<boolean>;
  acceptsTokenKey(keyId: Uint8Array): boolean;
  /**
   * The manifest's `post_quantum.require`: only a pinned X-Wing OHTTP key, and only nodes
   * whose claims attest an X-Wing key (`pq_public_key`; check `post_quantum`), will do.
   */
  readonly postQuantumRequired: boolean;
  /** An X-Wing config pinned by value: true / false; null if only a sha256: pin could be one. */
  pinsPostQuantumKey(): boolean | null;
}
export function loadTrustPolicy(
  signed: string | Record<string, unknown>,
  releaseKeys: string | Uint8Array | Array<string | Uint8Array>,
  opts?: { now?: number; minSerial?: number },
): Promise<TrustPolicy>;
export function verifyNodeEntry(entry: Record<string, unknown>, policy: TrustPolicy, now?: number): Promise<VerifiedNode>;
export function verifySnp(
  report: Uint8Array,
  endorsement: string | Uint8Array,
  opts: { now: number; chainPem?: string; expectedReportData?: Uint8Array; policy?: Record<string, unknown> },
): Promise<{ platform: 'sev-snp' | 'simulated-snp'; product: string | null; checks: Check[] }>;
export function parseSnpReport(report: Uint8Array): Record<string, unknown>;
/** The attested claims (canonical JSON, 9 keys and the optional `pq_public_key`), with the byte strings decoded too. */
export interface Claims {
  expires_at: number;
  gpu_evidence_digest: string | null;
  hpke_public_key: string;
  issued_at: number;
  model_digest: string;
  node_id: string;
  release_id: string;
  signing_key: string;
  tee: 'sev-snp' | 'tdx' | 'simulated-snp';
  /** Absent (never null) for an X25519-only node; else 2432 lower-case hex. */
  pq_public_key?: string;
  hpkePublicKey: Uint8Array;
  modelDigest: string;
  /** The node's per-boot Ed25519 public key (32 bytes). */
  signingKey: Uint8Array;
  /** The node's X-Wing public key (1216 bytes), or null when the claims have none. */
  pqPublicKey: Uint8Array | null;
}
export function decodeClaims(bytes: Uint8Array): Claims;
export function reportDataFor(claimsBytes: Uint8Array): Promise<Uint8Array>;

// ------------------------------------------------------------------------ wire
export interface SealedRequest {
  envelope: Uint8Array;
  context: Uint8Array;
  /** 2 (X-Wing keys) or 1 (X25519 keys). */
  version: 1 | 2;
  kemId: number;
  responseOpener(): ResponseOpener;
}
/** What one sealed-request version fixes (docs/PROTOCOL.md "Sealed requests"). */
export interface SealedVersion {
  number: 1 | 2;
  kemId: number;
  /** Public key and encapsulation sizes of its KEM. */
  npk: number;
  nenc: number;
  suite: Uint8Array;
  wrapInfoLabel: Uint8Array;
  contextLabel: Uint8Array;
}
/** X-Wing (KEM 0x647a, 1216-byte keys, 1120-byte enc): what clients send. */
export const SEALED_V2: SealedVersion;
/** X25519 (KEM 0x0020): deprecated, for nodes attesting no X-Wing key. */
export const SEALED_V1: SealedVersion;
/** The version a node key (32 or 1216 bytes) is sealed to; EncodeError for other sizes. */
export function versionForKey(publicKey: Uint8Array): SealedVersion;
/**
 * Seal to 1..8 candidates whose keys are all X-Wing (1216 bytes: version 2) or all
 * X25519 (32 bytes: version 1); mixed KEMs are an EncodeError. `testing` is for vectors
 * only: `ephemerals` are X25519 key pairs or X-Wing 64-byte encapsulation seeds; `wraps`
 * are stored enc ‖ wrapped key bytes, one per candidate.
 */
export function sealRequest(
  candidates: Array<{ nodeId: Uint8Array; publicKey: Uint8Array }>,
  model: string,
  bhttpRequest: Uint8Array,
  testing?: { dataKey?: Uint8Array; requestNonce?: Uint8Array; ephemerals?: Array<CryptoKeyPair | Uint8Array>; wraps?: Uint8Array[] },
): Promise<SealedRequest>;
export type SealedEvent = { type: 'head'; status: number; headers: Field[] } | { type: 'data'; data: Uint8Array };
export class ResponseOpener {
  constructor(dataKey: Uint8Array, requestNonce: Uint8Array, context: Uint8Array);
  readonly complete: boolean;
  receiveData(data: Uint8Array): Promise<SealedEvent[]>;
  endOfInput(): SealedEvent[];
}
/** A node key's 8-byte id: SHA-256(raw X25519 or X-Wing public key)[0..8]. */
export function keyIdFor(publicKey: Uint8Array): Promise<Uint8Array>;

export interface BhttpRequest {
  method: string;
  scheme: string;
  authority?: string;
  path: string;
  headers?: Array<[string | Uint8Array, string | Uint8Array]>;
  content?: Uint8Array;
  trailers?: Array<[string | Uint8Array, string | Uint8Array]>;
}
export function encodeRequest(req: BhttpRequest, opts?: { indeterminate?: boolean; padding?: number }): Uint8Array;
export function decodeRequest(buf: Uint8Array): Required<BhttpRequest> & { headers: Field[]; trailers: Field[]; padding: number };
export function decodeResponse(buf: Uint8Array): {
  status: number;
  headers: Field[];
  content: Uint8Array;
  trailers: Field[];
  informational: Array<{ status: number; headers: Field[] }>;
  padding: number;
};
export type StreamEvent =
  | { type: 'informational' | 'head'; status: number; headers: Field[] }
  | { type: 'data'; data: Uint8Array }
  | { type: 'end'; trailers: Field[] };
export class ResponseStreamDecoder {
  readonly complete: boolean;
  receiveData(data: Uint8Array): StreamEvent[];
  endOfInput(): StreamEvent[];
}

export interface KeyConfig {
  keyId: number;
  kemId: number;
  publicKey: Uint8Array;
  algorithms: Array<[number, number]>;
  encoded: Uint8Array;
  supports(kdf: number, aead: number): boolean;
}
export function parseKeyConfigs(body: Uint8Array): KeyConfig[];
/** DHKEM(X25519, HKDF-SHA256). */
export const KEM_X25519: 0x0020;
/** X-Wing (MLKEM768-X25519): enc 1120 bytes, public key 1216. */
export const KEM_XWING: 0x647a;
/**
 * From the gateway's key configs: the pinned X-Wing one, else the pinned X25519 one;
 * VerificationError if none is pinned, or if the manifest requires post-quantum and no
 * X-Wing config is pinned (no silent downgrade).
 */
export function chooseKeyConfig(configs: KeyConfig[], policy: TrustPolicy): Promise<KeyConfig>;
export function encapsulateRequest(
  cfg: KeyConfig,
  bhttp: Uint8Array,
  testing?: { ekm?: CryptoKeyPair },
): Promise<{ request: Uint8Array; decapsulate(response: Uint8Array): Promise<Uint8Array> }>;
export class ChunkedRequestSender {
  static create(cfg: KeyConfig, opts?: { ekm?: CryptoKeyPair; maxChunkSize?: number }): Promise<ChunkedRequestSender>;
  sealChunk(data: Uint8Array, final?: boolean): Promise<Uint8Array>;
  responseReceiver(opts?: { maxChunkSize?: number }): ChunkedResponseReceiver;
}
export class ChunkedResponseReceiver {
  receiveData(data: Uint8Array): Promise<Uint8Array[]>;
  endOfInput(): Promise<Uint8Array[]>;
}
export type UnwrapEvent =
  | { type: 'gateway-head'; status: number }
  | { type: 'gateway-body'; data: Uint8Array }
  | { type: 'node-head'; status: number; headers: Field[] }
  | { type: 'node-data'; data: Uint8Array };
export class ResponseUnwrapper {
  constructor(receiver: ChunkedResponseReceiver, opener: ResponseOpener);
  readonly gatewayStatus: number | null;
  receiveData(data: Uint8Array): Promise<UnwrapEvent[]>;
  endOfInput(): Promise<UnwrapEvent[]>;
}

export class SSEParser {
  receiveData(bytes: Uint8Array): Array<Record<string, unknown> | typeof DONE>;
  endOfInput(): Array<Record<string, unknown> | typeof DONE>;
}
export const DONE: unique symbol;
