// Typed errors. Wire parsers throw DecodeError and its subclasses; the client throws
// the request-level errors below (mirroring openpcc/client/errors.py).

export class OpenPCCError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}
export class DecodeError extends OpenPCCError {}
export class TruncatedError extends DecodeError {}
export class LimitExceededError extends DecodeError {}
export class UnsupportedError extends DecodeError {}
export class EncodeError extends OpenPCCError {}
export class DecryptError extends OpenPCCError {}
export class StateError extends OpenPCCError {}
export class VerificationError extends OpenPCCError {}

/** The relay could not be reached or answered a non-200 status. */
export class RelayError extends OpenPCCError {}
/** The issuer refused or failed (status is the HTTP status when there was one). */
export class IssuerError extends OpenPCCError {
  constructor(message, { status } = {}) {
    super(message);
    this.status = status ?? null;
  }
}
/** The gateway answered an error (RFC 9457 problem in `problem`). */
export class GatewayError extends OpenPCCError {
  constructor(status, problem, message) {
    super(message ?? `gateway answered ${status}${problem?.title ? `: ${problem.title}` : ''}${problem?.detail ? ` (${problem.detail})` : ''}`);
    this.status = status;
    this.problem = problem ?? null;
  }
}
export class TokenRejectedError extends GatewayError {}
export class NoCapacityError extends GatewayError {}
/** No node serving the model passed attestation; `rejected` maps node id to reasons. */
export class NoVerifiedNodeError extends OpenPCCError {
  constructor(model, rejected) {
    const why = Object.entries(rejected ?? {}).map(([k, v]) => `${k}: ${v.join('; ')}`).join(' | ');
    super(`no attested node serves model ${JSON.stringify(model)}${why ? ` (rejected: ${why})` : ''}`);
    this.model = model;
    this.rejected = rejected ?? {};
  }
}
/** The node answered a non-200 status inside the sealed response. */
export class NodeError extends OpenPCCError {
  constructor(status, body) {
    let text = '';
    try { text = new TextDecoder().decode(body).slice(0, 300); } catch { /* binary */ }
    super(`node answered ${status}${text ? `: ${text}` : ''}`);
    this.status = status;
    this.body = body;
  }
}
/** The answer stopped before the node's authenticated end of stream. */
export class TruncatedResponseError extends OpenPCCError {}
