// A client of keyholed's hub (Part II of proto-spec.md): typed requests,
// subscriptions as streams, request/reply, serving names.

import { toU64 } from "./codec.js";
import { Connection, type ConnectOptions, type RequestSpec } from "./connection.js";
import {
  ConfigError,
  ConnectionClosedError,
  ProtocolError,
  ReplyTooLargeError,
  RequestFailedError,
  RequestRefusedError,
  RequestTimeoutError,
  ResponderGoneError,
  TimeoutError,
  type DaemonError,
} from "./errors.js";
import {
  HUB_SERVICE,
  HUB_VERSION,
  REPLY_FOR,
  decodeHubEvent,
  decodeHubReply,
  encodeHubRequest,
  subjectProblem,
  type Failure,
  type HubReply,
  type HubRequest,
  type Lag,
  type Outcome,
  type Status,
} from "./hub.js";
import { Kind } from "./protocol.js";

export type Payload = Uint8Array | string;

const U64_MAX = (1n << 64n) - 1n;

/** The sid after `sid` in a counter: 2^64-1 is followed by 1 (0 is never a sid). */
function nextSidAfter(sid: bigint): bigint {
  return sid >= U64_MAX ? 1n : sid + 1n;
}

function bytesOf(p: Payload): Uint8Array {
  return typeof p === "string" ? Buffer.from(p, "utf8") : p;
}

/** An unbounded-by-itself queue read as an async iterator; the connection's event bound limits it. */
class AsyncQueue<T> implements AsyncIterableIterator<T> {
  private items: T[] = [];
  private waiters: Array<{ resolve: (r: IteratorResult<T>) => void; reject: (e: Error) => void }> = [];
  private ended: { error: Error | null } | null = null;

  constructor(private readonly onTake: (item: T) => void) {}

  push(item: T): void {
    const w = this.waiters.shift();
    if (w !== undefined) {
      this.onTake(item);
      w.resolve({ value: item, done: false });
    } else this.items.push(item);
  }

  end(error: Error | null): void {
    if (this.ended !== null) return;
    this.ended = { error };
    for (const w of this.waiters.splice(0)) {
      if (error !== null) w.reject(error);
      else w.resolve({ value: undefined, done: true });
    }
  }

  get size(): number {
    return this.items.length;
  }

  next(): Promise<IteratorResult<T>> {
    if (this.items.length > 0) {
      const item = this.items.shift() as T;
      this.onTake(item);
      return Promise.resolve({ value: item, done: false });
    }
    if (this.ended !== null) {
      if (this.ended.error !== null) return Promise.reject(this.ended.error);
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<T> {
    return this;
  }
}

/** What a subscription yields: its messages, and a count of the ones the daemon dropped (lag DropOldest). */
export type SubscriptionItem =
  | { type: "Message"; topic: string; sequence: bigint; payload: Buffer }
  | { type: "Lagged"; missed: bigint };

interface Held<T> {
  item: T;
  bytes: number;
}

/** A subscription: an async iterator of its items. It ends after unsubscribe(); it throws ConnectionClosedError when the connection ends. */
export class Subscription implements AsyncIterable<SubscriptionItem> {
  /** @internal */ readonly queue: AsyncQueue<Held<SubscriptionItem>>;
  constructor(
    private readonly client: HubClient,
    readonly sid: bigint,
    readonly pattern: string,
    readonly lag: Lag,
    release: (bytes: number) => void,
  ) {
    this.queue = new AsyncQueue((h) => release(h.bytes));
  }

  /** The next item; rejects with ConnectionClosedError when the connection ended. */
  async next(): Promise<SubscriptionItem | null> {
    const r = await this.queue.next();
    return r.done === true ? null : r.value.item;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<SubscriptionItem> {
    for (;;) {
      const r = await this.queue.next();
      if (r.done === true) return;
      yield r.value.item;
    }
  }

  /** Ends the subscription: nothing of it arrives after the Unsubscribed reply (section 14). */
  async unsubscribe(): Promise<void> {
    await this.client.call({ type: "Unsubscribe", sid: this.sid });
  }
}

/** A Request event for a name this connection serves. Answer every one (section 16, step 14). */
export class IncomingRequest {
  constructor(
    private readonly client: HubClient,
    readonly token: bigint,
    readonly name: string,
    readonly uid: number,
    readonly pid: number,
    readonly payload: Buffer,
  ) {}

  /** Answers with a reply; resolves with `delivered`. A reply that would not fit is sent as Fail{ReplyTooLarge}. */
  respond(payload: Payload): Promise<boolean> {
    return this.client.respond(this.token, payload);
  }

  fail(message: string): Promise<boolean> {
    return this.client.fail(this.token, { type: "Failed", message });
  }
}

export interface HubConnectOptions extends Omit<ConnectOptions, "service"> {
  /** Hub requests to send in the handshake's write, behind Expect (each at most 1024 bytes of payload). Their replies are in `client.pipelined`. */
  pipeline?: HubRequest[];
  /**
   * The sid subscribe() gives the connection's first subscription that it
   * numbers itself (1 to 2^64-1; default 1). Each later one takes the
   * previous sid plus 1, 2^64-1 being followed by 1 (0 is never a sid), and
   * a sid still live on the connection (from its Subscribe until its
   * Unsubscribed reply, including one given explicitly or pipelined) is
   * skipped (sections 14 and 16, step 14).
   */
  nextSubscriptionId?: bigint | number;
}

export interface RequestOptions {
  /** The daemon's timeout: 0 means 30 s, more than one hour is cut to one hour (section 14). */
  timeoutMs?: number;
}

/** A client of the hub service of keyholed. */
export class HubClient {
  private subs = new Map<bigint, Subscription>();
  private responses = new Map<bigint, (o: Outcome) => void>();
  private requestQueue: AsyncQueue<Held<IncomingRequest>>;
  private handlers = new Map<string, (req: IncomingRequest) => Payload | Promise<Payload>>();
  private nextSid = 1n;
  /** The replies to `pipeline`, in order. */
  pipelined: Array<Promise<HubReply>> = [];
  private conn!: Connection;

  private constructor() {
    this.requestQueue = new AsyncQueue((h) => this.conn.releaseEvents(h.bytes));
  }

  /** Connects to keyholed (section 16): discovery, check 3b, handshake + Expect hub v2 in one write, Welcome checked. */
  static async connect(opts: HubConnectOptions = {}): Promise<HubClient> {
    const client = new HubClient();
    if (opts.nextSubscriptionId !== undefined) {
      let sid: bigint;
      try {
        sid = toU64(opts.nextSubscriptionId, "nextSubscriptionId");
      } catch (e) {
        throw new ConfigError((e as Error).message);
      }
      if (sid === 0n) throw new ConfigError("nextSubscriptionId must be from 1 to 2^64-1: 0 is never a sid");
      client.nextSid = sid;
    }
    const specs = (opts.pipeline ?? []).map((r) => client.spec(r));
    const { pipeline: _ignored, nextSubscriptionId: _sid, ...rest } = opts;
    const { connection, replies } = await Connection.connect(
      { ...rest, service: { name: HUB_SERVICE, version: HUB_VERSION } },
      specs as Array<RequestSpec<unknown>>,
      {
        onEvent: (stream, body) => client.onEvent(stream, body),
        onLagged: (stream, missed) => client.onLagged(stream, missed),
      },
    );
    client.conn = connection;
    client.pipelined = replies as Array<Promise<HubReply>>;
    void connection.closed.then((err) => client.onClosed(err));
    return client;
  }

  get connection(): Connection {
    return this.conn;
  }

  get welcome() {
    return this.conn.welcome;
  }

  /** Resolves with why the connection ended. */
  get closed(): Promise<ConnectionClosedError> {
    return this.conn.closed;
  }

  close(): Promise<void> {
    return this.conn.close();
  }

  ping(): Promise<void> {
    return this.conn.ping();
  }

  shutdown(): Promise<void> {
    return this.conn.shutdown();
  }

  /** The RequestSpec of a hub request, with the client's bookkeeping of streams and routes. */
  private spec(req: HubRequest): RequestSpec<HubReply> {
    if (req.type === "PublishMemfd") {
      // Section 19.5: a PublishMemfd travels only as a CallFds with a sealed memfd, which Node.js cannot send.
      throw new RequestRefusedError("PublishMemfd must carry a sealed memfd as a CallFds, and this client does not pass file descriptors; nothing was sent");
    }
    const problem = (() => {
      switch (req.type) {
        case "Subscribe":
          return subjectProblem(req.pattern, "pattern");
        case "Publish":
          return subjectProblem(req.topic, "topic");
        case "Serve":
        case "Unserve":
        case "Request":
          return subjectProblem(req.name, "name");
        default:
          return null;
      }
    })();
    if (problem !== null) {
      const subject = req.type === "Subscribe" ? req.pattern : req.type === "Publish" ? req.topic : (req as { name: string }).name;
      throw new RequestRefusedError(`invalid subject ${JSON.stringify(subject.slice(0, 64))}: ${problem}; nothing was sent`);
    }
    const want = REPLY_FOR[req.type];
    const spec: RequestSpec<HubReply> = {
      kind: Kind.Call,
      body: encodeHubRequest(req),
      decode: (body) => {
        const rep = decodeHubReply(body);
        if (rep.type !== want) throw new ProtocolError(`the hub answered a ${req.type} with ${rep.type}, not ${want}`);
        if (req.type === "Unsubscribe") {
          // Nothing of this sid arrives after its Unsubscribed reply.
          const sid = toU64(req.sid, "sid");
          const sub = this.subs.get(sid);
          if (sub !== undefined) {
            this.subs.delete(sid);
            sub.queue.end(null);
          }
        }
        return rep;
      },
    };
    if (req.type === "Subscribe") {
      const sid = toU64(req.sid, "sid");
      let created: Subscription | null = null;
      spec.onSend = () => {
        if (sid !== 0n && !this.subs.has(sid)) {
          created = new Subscription(this, sid, req.pattern, req.lag, (b) => this.conn.releaseEvents(b));
          this.subs.set(sid, created);
        }
      };
      spec.onError = () => {
        if (created !== null && this.subs.get(sid) === created) {
          this.subs.delete(sid);
          created.queue.end(null);
        }
      };
    }
    return spec;
  }

  /** Sends any hub request and resolves with its reply (the one kind that answers it), or rejects with a typed DaemonError. */
  call(req: HubRequest): Promise<HubReply> {
    let spec: RequestSpec<HubReply>;
    try {
      spec = this.spec(req);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.conn.request(spec);
  }

  async status(): Promise<Status> {
    const r = await this.call({ type: "Status" });
    if (r.type !== "Status") throw new ProtocolError("unreachable");
    return r.status;
  }

  async topics(): Promise<{ patterns: Array<[string, bigint]>; names: Array<[string, bigint]>; truncated: boolean }> {
    const r = await this.call({ type: "Topics" });
    if (r.type !== "Topics") throw new ProtocolError("unreachable");
    return { patterns: r.patterns, names: r.names, truncated: r.truncated };
  }

  /** Publishes; resolves with the number of subscriptions the event was queued for. */
  async publish(topic: string, payload: Payload): Promise<bigint> {
    const r = await this.call({ type: "Publish", topic, payload: bytesOf(payload) });
    if (r.type !== "Published") throw new ProtocolError("unreachable");
    return r.receivers;
  }

  /** Subscribes to a pattern; its events are routed to the Subscription from the moment the request is sent. */
  async subscribe(pattern: string, opts: { lag?: Lag; sid?: bigint | number } = {}): Promise<Subscription> {
    let sid: bigint;
    if (opts.sid !== undefined) sid = toU64(opts.sid, "sid");
    else sid = this.allocateSid();
    await this.call({ type: "Subscribe", sid, pattern, lag: opts.lag ?? "Disconnect" });
    const sub = this.subs.get(sid);
    if (sub === undefined) throw new ProtocolError(`subscription ${sid} vanished`);
    return sub;
  }

  /** The next sid of the counter: 2^64-1 is followed by 1, never 0, and live sids are skipped. */
  private allocateSid(): bigint {
    // At most 4096 subscriptions are live (error 1002), so this ends quickly.
    while (this.subs.has(this.nextSid)) this.nextSid = nextSidAfter(this.nextSid);
    const sid = this.nextSid;
    this.nextSid = nextSidAfter(sid);
    return sid;
  }

  /** The live subscription of this sid (one made by call() or pipelined at connect included). */
  subscription(sid: bigint | number): Subscription | undefined {
    return this.subs.get(toU64(sid, "sid"));
  }

  /**
   * Sends a request to whoever serves `name` and waits for its outcome: the
   * reply's payload, or a RequestOutcomeError (ResponderGone, Timeout,
   * ReplyTooLarge, Failed), or a DaemonError (NoResponders, Busy, TooLarge).
   */
  async request(name: string, payload: Payload, opts: RequestOptions = {}): Promise<Buffer> {
    const outcome = await this.requestOutcome(name, payload, opts);
    switch (outcome.type) {
      case "Reply":
        return outcome.payload;
      case "ResponderGone":
        throw new ResponderGoneError(`the responder of ${JSON.stringify(name)} went away before answering`);
      case "Timeout":
        throw new RequestTimeoutError(`the request to ${JSON.stringify(name)} timed out`);
      case "ReplyTooLarge":
        throw new ReplyTooLargeError(`the reply from ${JSON.stringify(name)} (${outcome.len} bytes) would not fit in a frame`, outcome.len);
      case "Failed":
        throw new RequestFailedError(outcome.message);
    }
  }

  /** Like request(), but resolves with the Response's outcome whatever it is. */
  async requestOutcome(name: string, payload: Payload, opts: RequestOptions = {}): Promise<Outcome> {
    const timeoutMs = opts.timeoutMs ?? 0;
    const spec = this.spec({ type: "Request", name, timeoutMs, payload: bytesOf(payload) });
    let id = -1n;
    let outcome: Outcome | null = null;
    let wake: (() => void) | null = null;
    // The route for Response{request: id} is in place before the request is sent.
    spec.onSend = (sent) => {
      id = sent;
      this.responses.set(sent, (o) => {
        outcome = o;
        wake?.();
      });
    };
    spec.onError = () => this.responses.delete(id);
    await this.conn.request(spec);
    if (outcome !== null) return outcome;
    const effective = timeoutMs === 0 ? 30_000 : Math.min(timeoutMs, 3_600_000);
    const localDeadline = effective + 5_000;
    return new Promise<Outcome>((resolve, reject) => {
      const t = setTimeout(() => {
        // A late Response still finds its route (and is dropped): it must not be taken for a protocol error.
        this.responses.set(id, () => this.responses.delete(id));
        reject(new TimeoutError(`no Response to the request to ${JSON.stringify(name)} within ${localDeadline} ms`));
      }, localDeadline);
      const onClose = (err: ConnectionClosedError) => {
        clearTimeout(t);
        reject(err);
      };
      void this.conn.closed.then(onClose);
      wake = () => {
        clearTimeout(t);
        if (outcome !== null) resolve(outcome);
      };
    });
  }

  /** Serves `name`. With a handler, each request for it is answered with the handler's result (a throw fails it); without, requests come from requests(). */
  async serve(name: string, handler?: (req: IncomingRequest) => Payload | Promise<Payload>): Promise<void> {
    if (handler !== undefined) this.handlers.set(name, handler);
    try {
      await this.call({ type: "Serve", name });
    } catch (e) {
      if (handler !== undefined) this.handlers.delete(name);
      throw e;
    }
  }

  async unserve(name: string): Promise<void> {
    await this.call({ type: "Unserve", name });
    this.handlers.delete(name);
  }

  /** The Request events of served names without a handler. Throws ConnectionClosedError when the connection ends. */
  async *requests(): AsyncIterableIterator<IncomingRequest> {
    for (;;) {
      const r = await this.requestQueue.next();
      if (r.done === true) return;
      yield r.value.item;
    }
  }

  /** Answers a request; a reply whose Response would not fit is sent as Fail{ReplyTooLarge} instead. Resolves with `delivered`. */
  async respond(token: bigint | number, payload: Payload): Promise<boolean> {
    const bytes = bytesOf(payload);
    if (36 + bytes.length > this.conn.maxFrameLen) {
      return this.fail(token, { type: "ReplyTooLarge", len: bytes.length });
    }
    const r = await this.call({ type: "Respond", token, payload: bytes });
    if (r.type !== "Responded") throw new ProtocolError("unreachable");
    return r.delivered;
  }

  async fail(token: bigint | number, failure: Failure): Promise<boolean> {
    const r = await this.call({ type: "Fail", token, failure });
    if (r.type !== "Responded") throw new ProtocolError("unreachable");
    return r.delivered;
  }

  // ---- events ----

  private onEvent(stream: bigint, body: Buffer): void {
    const ev = decodeHubEvent(body);
    const bytes = body.length + 12;
    switch (ev.type) {
      case "Message": {
        const sub = this.subs.get(stream);
        if (sub === undefined) throw new ProtocolError(`the hub sent a Message on stream ${stream}, which is not a subscription of this connection`);
        this.conn.holdEvents(bytes);
        sub.queue.push({ item: { type: "Message", topic: ev.topic, sequence: ev.sequence, payload: ev.payload }, bytes });
        return;
      }
      case "Request": {
        if (stream !== 0n) throw new ProtocolError(`the hub sent a Request event on stream ${stream}, not 0`);
        const req = new IncomingRequest(this, ev.token, ev.name, ev.uid, ev.pid, ev.payload);
        const handler = this.handlers.get(ev.name);
        if (handler !== undefined) {
          void this.runHandler(handler, req);
          return;
        }
        this.conn.holdEvents(bytes);
        this.requestQueue.push({ item: req, bytes });
        return;
      }
      case "Response": {
        if (stream !== 0n) throw new ProtocolError(`the hub sent a Response event on stream ${stream}, not 0`);
        const route = this.responses.get(ev.request);
        if (route === undefined) throw new ProtocolError(`the hub sent a Response to request ${ev.request}, which is not a Request of this connection waiting for one`);
        this.responses.delete(ev.request);
        route(ev.outcome);
        return;
      }
      case "MessageMemfd":
        // Always an EventFds (section 19.5), which this client never receives; in a plain Event it is a protocol error.
        throw new ProtocolError(`the hub sent a MessageMemfd (stream ${stream}) in a plain Event frame, without its memfd`);
    }
  }

  private async runHandler(handler: (req: IncomingRequest) => Payload | Promise<Payload>, req: IncomingRequest): Promise<void> {
    try {
      let result: Payload;
      try {
        result = await handler(req);
      } catch (e) {
        await req.fail(e instanceof Error ? e.message : String(e));
        return;
      }
      await req.respond(result);
    } catch {
      // The connection ended: nothing to answer on.
    }
  }

  private onLagged(stream: bigint, missed: bigint): void {
    const sub = this.subs.get(stream);
    if (sub === undefined || sub.lag !== "DropOldest") {
      throw new ProtocolError(`the hub sent a Lagged for stream ${stream}, which is not a DropOldest subscription of this connection`);
    }
    sub.queue.push({ item: { type: "Lagged", missed }, bytes: 0 });
  }

  private onClosed(err: ConnectionClosedError): void {
    const error = err.reason.kind === "local" ? null : err;
    for (const sub of this.subs.values()) sub.queue.end(error);
    this.subs.clear();
    this.requestQueue.end(error);
  }
}

export type { DaemonError };
