// One answer, unwrapped layer by layer: chunked OHTTP, the gateway's Binary HTTP stream, and
// the node's sealed response. Mirrors openpcc/client/unwrap.py: every layer's receiveData and
// endOfInput return the list of what completed, and both go through the same path, so content
// in the final chunked-OHTTP chunk (the draft allows it) reaches the node layer like any other.
import { ResponseStreamDecoder } from './bhttp.js';
import { TruncatedError } from './errors.js';

export class NodeTruncatedError extends TruncatedError {}

export class ResponseUnwrapper {
  constructor(receiver, opener) {
    this.receiver = receiver;
    this.stream = new ResponseStreamDecoder();
    this.opener = opener;
    this.gatewayStatus = null;
  }

  async receiveData(data) {
    return this.#outer(await this.receiver.receiveData(data));
  }

  /** TruncatedError if any layer is incomplete; the node's own end is required only when
   *  the gateway said 200 (NodeTruncatedError). */
  async endOfInput() {
    const events = await this.#outer(await this.receiver.endOfInput());
    events.push(...(await this.#gateway(this.stream.endOfInput())));
    if (this.gatewayStatus === 200) {
      try {
        events.push(...this.#node(this.opener.endOfInput()));
      } catch (e) {
        if (e instanceof TruncatedError) throw new NodeTruncatedError("the node's authenticated end of stream never arrived");
        throw e;
      }
    }
    return events;
  }

  async #outer(plaintexts) {
    const events = [];
    for (const plain of plaintexts) events.push(...(await this.#gateway(this.stream.receiveData(plain))));
    return events;
  }

  async #gateway(streamEvents) {
    const events = [];
    for (const ev of streamEvents) {
      if (ev.type === 'head') {
        this.gatewayStatus = ev.status;
        events.push({ type: 'gateway-head', status: ev.status });
      } else if (ev.type === 'data') {
        if (this.gatewayStatus === 200) events.push(...this.#node(await this.opener.receiveData(ev.data)));
        else events.push({ type: 'gateway-body', data: ev.data });
      }
    }
    return events;
  }

  #node(items) {
    return items.map((i) => (i.type === 'head'
      ? { type: 'node-head', status: i.status, headers: i.headers }
      : { type: 'node-data', data: i.data }));
  }
}
