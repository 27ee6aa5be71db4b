// @openpcc/client: browser and Node >= 20 entry point.
export {
  createClient, OpenPCCClient, SSEParser, DONE, rememberSerial, webStorageSerialStore, memorySerialStore,
  webStorageManifestStore, memoryManifestStore, chooseKeyConfig,
} from './client.js';
export {
  canonicalJson, conversationPrefix, deriveCacheSalt, webStorageCacheSecretStore, memoryCacheSecretStore,
  CACHE_SECRET_LIFETIME, AFFINITY_ENTRIES,
} from './cachescope.js';
export { TokenWallet, formatAuthorization } from './privacypass.js';
export { loadTrustPolicy, TrustPolicy, verifyNodeEntry, verifySnp, parseSnpReport, decodeClaims, reportDataFor } from './attestation.js';
export { sealRequest, ResponseOpener, keyIdFor, versionForKey, SEALED_V1, SEALED_V2 } from './sealed.js';
export { encodeRequest, decodeRequest, decodeResponse, ResponseStreamDecoder } from './bhttp.js';
export {
  parseKeyConfigs, encapsulateRequest, ChunkedRequestSender, ChunkedResponseReceiver, KEM_X25519, KEM_XWING,
} from './ohttp.js';
export { ResponseUnwrapper, NodeTruncatedError } from './unwrap.js';
export * from './errors.js';
