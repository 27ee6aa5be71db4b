// Binary HTTP (RFC 9292), sans-IO. Mirrors openpcc/wire/bhttp.py and bhttp_stream.py.
// Fields are [name, value] pairs of Uint8Array (order and repeats kept).
import { concat, decodeVarint, encodeVarint, te } from './bytes.js';
import { DecodeError, EncodeError, LimitExceededError, StateError, TruncatedError, UnsupportedError } from './errors.js';

export const LIMITS = Object.freeze({
  maxFieldLines: 256,
  maxFieldSectionSize: 65536,
  maxControlFieldSize: 8192,
  maxContentSize: 16 * 1024 * 1024,
  maxContentChunks: 65536,
  maxInformational: 8,
});

const TOKEN_RE = /^[!#$%&'*+\-.^_`|~0-9a-z]+$/;
const bytesOf = (x) => (typeof x === 'string' ? te.encode(x) : x);

function checkName(n, Err) {
  const s = String.fromCharCode(...n);
  if (!n.length || !TOKEN_RE.test(s)) throw new Err(`bhttp: bad field name ${JSON.stringify(s)}`);
}
function checkValue(v, Err) {
  for (let i = 0; i < v.length; i++) {
    const c = v[i];
    const ws = c === 0x20 || c === 0x09;
    if (ws ? i === 0 || i === v.length - 1 : c < 0x21 || c === 0x7f) {
      throw new Err('bhttp: bad byte in a field value');
    }
  }
}

function encodeFields(fields, indeterminate) {
  const parts = [];
  for (const [rawName, rawValue] of fields ?? []) {
    const name = bytesOf(typeof rawName === 'string' ? rawName.toLowerCase() : rawName);
    const value = bytesOf(rawValue);
    checkName(name, EncodeError);
    checkValue(value, EncodeError);
    parts.push(encodeVarint(name.length), name, encodeVarint(value.length), value);
  }
  const body = concat(...parts);
  return indeterminate ? concat(body, Uint8Array.of(0)) : concat(encodeVarint(body.length), body);
}

/**
 * Known-length (or indeterminate) request; no truncation (as the Python default).
 * @param {{method:string, scheme:string, authority:string, path:string, headers?:Array<[any,any]>, content?:Uint8Array, trailers?:Array<[any,any]>}} req
 */
export function encodeRequest(req, { indeterminate = false, padding = 0 } = {}) {
  const ctl = [req.method, req.scheme, req.authority ?? '', req.path].map(bytesOf);
  const parts = [encodeVarint(indeterminate ? 2 : 0)];
  for (const c of ctl) parts.push(encodeVarint(c.length), c);
  parts.push(encodeFields(req.headers, indeterminate));
  const content = req.content ?? new Uint8Array(0);
  if (indeterminate) {
    if (content.length) parts.push(encodeVarint(content.length), content);
    parts.push(Uint8Array.of(0));
  } else {
    parts.push(encodeVarint(content.length), content);
  }
  parts.push(encodeFields(req.trailers, indeterminate));
  parts.push(new Uint8Array(padding));
  return concat(...parts);
}

class Reader {
  constructor(buf, limits) { this.buf = buf; this.pos = 0; this.limits = limits; }
  get done() { return this.pos >= this.buf.length; }
  varint() { const [v, p] = decodeVarint(this.buf, this.pos); this.pos = p; return v; }
  take(n) {
    if (this.pos + n > this.buf.length) throw new TruncatedError('bhttp: input ended early');
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
}

function readFieldLines(r, end) {
  const fields = [];
  while (r.pos < end) {
    const nlen = r.varint();
    if (nlen === 0) throw new DecodeError('bhttp: empty field name');
    if (r.pos + nlen > end) throw new DecodeError('bhttp: field line overruns its section');
    const name = r.take(nlen);
    const vlen = r.varint();
    if (r.pos + vlen > end) throw new DecodeError('bhttp: field line overruns its section');
    const value = r.take(vlen);
    checkName(name, DecodeError);
    checkValue(value, DecodeError);
    fields.push([name, value]);
    if (fields.length > r.limits.maxFieldLines) throw new LimitExceededError('bhttp: too many field lines');
  }
  return fields;
}

function readKnownFields(r) {
  const len = r.varint();
  if (len > r.limits.maxFieldSectionSize) throw new LimitExceededError('bhttp: field section too large');
  if (r.pos + len > r.buf.length) throw new TruncatedError('bhttp: field section truncated');
  return readFieldLines(r, r.pos + len);
}

function readIndeterminateFields(r) {
  const fields = [];
  const start = r.pos;
  for (;;) {
    const nlen = r.varint();
    if (nlen === 0) return fields;
    const name = r.take(nlen);
    const value = r.take(r.varint());
    checkName(name, DecodeError);
    checkValue(value, DecodeError);
    fields.push([name, value]);
    if (fields.length > r.limits.maxFieldLines) throw new LimitExceededError('bhttp: too many field lines');
    if (r.pos - start > r.limits.maxFieldSectionSize) throw new LimitExceededError('bhttp: field section too large');
  }
}

function readContent(r, indeterminate) {
  if (!indeterminate) {
    const n = r.varint();
    if (n > r.limits.maxContentSize) throw new LimitExceededError('bhttp: content too large');
    return r.take(n);
  }
  const chunks = [];
  let total = 0;
  for (;;) {
    const n = r.varint();
    if (n === 0) return concat(...chunks);
    total += n;
    if (total > r.limits.maxContentSize) throw new LimitExceededError('bhttp: content too large');
    if (chunks.length >= r.limits.maxContentChunks) throw new LimitExceededError('bhttp: too many chunks');
    chunks.push(r.take(n));
  }
}

function readPadding(r) {
  const rest = r.buf.subarray(r.pos);
  if (rest.some((b) => b !== 0)) throw new DecodeError('bhttp: non-zero bytes after the message');
  return rest.length;
}

/** Decode a response (framing 1 or 3), with RFC 9292 §3.8 truncation and padding. */
export function decodeResponse(buf, limits = LIMITS) {
  const r = new Reader(buf, limits);
  const framing = r.varint();
  if (framing !== 1 && framing !== 3) throw new UnsupportedError(`bhttp: framing ${framing} is not a response`);
  const ind = framing === 3;
  const informational = [];
  let status;
  for (;;) {
    status = r.varint();
    if (status >= 100 && status <= 199) {
      if (informational.length >= limits.maxInformational) throw new LimitExceededError('bhttp: too many informational responses');
      if (r.done) throw new TruncatedError('bhttp: ended after an informational response');
      informational.push({ status, headers: ind ? readIndeterminateFields(r) : readKnownFields(r) });
      continue;
    }
    if (status < 200 || status > 599) throw new DecodeError(`bhttp: invalid status ${status}`);
    break;
  }
  const resp = { status, headers: [], content: new Uint8Array(0), trailers: [], informational, padding: 0 };
  const sections = [
    () => { resp.headers = ind ? readIndeterminateFields(r) : readKnownFields(r); },
    () => { resp.content = readContent(r, ind); },
    () => { resp.trailers = ind ? readIndeterminateFields(r) : readKnownFields(r); },
  ];
  for (const s of sections) {
    if (r.done) break;
    s();
  }
  resp.padding = readPadding(r);
  return resp;
}

/** Decode a request (framing 0 or 2); used by tests. */
export function decodeRequest(buf, limits = LIMITS) {
  const r = new Reader(buf, limits);
  const framing = r.varint();
  if (framing !== 0 && framing !== 2) throw new UnsupportedError(`bhttp: framing ${framing} is not a request`);
  const ind = framing === 2;
  const ctl = [];
  for (let i = 0; i < 4; i++) {
    const n = r.varint();
    if (n > limits.maxControlFieldSize) throw new LimitExceededError('bhttp: control data too large');
    ctl.push(new TextDecoder().decode(r.take(n)));
  }
  const req = { method: ctl[0], scheme: ctl[1], authority: ctl[2], path: ctl[3], headers: [], content: new Uint8Array(0), trailers: [], padding: 0 };
  if (!r.done) req.headers = ind ? readIndeterminateFields(r) : readKnownFields(r);
  if (!r.done) req.content = readContent(r, ind);
  if (!r.done) req.trailers = ind ? readIndeterminateFields(r) : readKnownFields(r);
  req.padding = readPadding(r);
  return req;
}

/**
 * Incremental decoder of an indeterminate-length response (framing 3).
 * receiveData(bytes) -> events: {type:'informational'|'head', status, headers} |
 * {type:'data', data} | {type:'end', trailers}.
 */
export class ResponseStreamDecoder {
  constructor(limits = LIMITS) {
    this.limits = limits;
    this.buf = new Uint8Array(0);
    this.stage = 'framing';
    this.content = 0;
    this.informational = 0;
    this.failed = false;
  }
  get complete() { return this.stage === 'done'; }
  receiveData(data) {
    if (this.failed) throw new StateError('bhttp stream already failed');
    this.buf = this.buf.length ? concat(this.buf, data) : Uint8Array.from(data);
    try {
      return this.#parse();
    } catch (e) {
      this.failed = true;
      throw e;
    }
  }
  #parse() {
    const events = [];
    for (;;) {
      if (this.stage === 'done') {
        if (this.buf.some((b) => b !== 0)) throw new DecodeError('bhttp stream: non-zero bytes after the message');
        this.buf = new Uint8Array(0);
        return events;
      }
      const r = new Reader(this.buf, this.limits);
      let ev;
      try {
        ev = this.#step(r);
      } catch (e) {
        if (e instanceof TruncatedError) return events;
        throw e;
      }
      this.buf = this.buf.subarray(r.pos);
      if (ev) events.push(ev);
    }
  }
  #step(r) {
    switch (this.stage) {
      case 'framing':
        if (r.varint() !== 3) throw new DecodeError('bhttp stream: expected an indeterminate-length response');
        this.stage = 'status';
        return null;
      case 'status': {
        const status = r.varint();
        const headers = readIndeterminateFields(r);
        if (status >= 100 && status <= 199) {
          if (++this.informational > this.limits.maxInformational) throw new LimitExceededError('bhttp stream: too many informational responses');
          return { type: 'informational', status, headers };
        }
        if (status < 200 || status > 599) throw new DecodeError(`bhttp stream: invalid status ${status}`);
        this.stage = 'content';
        return { type: 'head', status, headers };
      }
      case 'content': {
        const n = r.varint();
        if (n === 0) { this.stage = 'trailers'; return null; }
        this.content += n;
        if (this.content > this.limits.maxContentSize) throw new LimitExceededError('bhttp stream: content exceeds the limit');
        return { type: 'data', data: Uint8Array.from(r.take(n)) };
      }
      case 'trailers': {
        const trailers = readIndeterminateFields(r);
        this.stage = 'done';
        return { type: 'end', trailers };
      }
      default:
        throw new DecodeError('bhttp stream: data after the end of the message');
    }
  }
  /** The transport ended: only the trailers may be missing. */
  endOfInput() {
    if (this.stage === 'trailers' && !this.buf.length) {
      this.stage = 'done';
      return [{ type: 'end', trailers: [] }];
    }
    if (this.stage !== 'done') throw new TruncatedError('bhttp stream: message ended before its content was complete');
    return [];
  }
}

export const headerValue = (fields, name) => {
  const want = te.encode(name.toLowerCase());
  for (const [n, v] of fields) {
    if (n.length === want.length && n.every((b, i) => b === want[i])) return new TextDecoder().decode(v);
  }
  return null;
};
