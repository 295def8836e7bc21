// A connection of Part I of proto-spec.md, for any service: discovery, check
// 3b, the handshake (with requests pipelined behind it), strict framing,
// replies matched in request order, events, the final frame and the end of
// the connection.

import * as fs from "node:fs";
import * as net from "node:net";
import { DecodeError, toU64 } from "./codec.js";
import { discover, loadToken, type DiscoverOptions } from "./discovery.js";
import {
  ConfigError,
  ConnectionClosedError,
  DaemonBusyError,
  DaemonError,
  DaemonNotRunningError,
  KeyholeError,
  ProtocolError,
  RequestRefusedError,
  TimeoutError,
  WrongServiceError,
  daemonError,
  errorFrameProblem,
  isBusyCode,
  isHandshakeCode,
} from "./errors.js";
import { peerSnapshot, samePeer } from "./peer.js";
import {
  Kind,
  MAX_FRAME_CEILING,
  MIN_FRAME_LIMIT,
  PROTOCOL_VERSION,
  decodeDaemonFrame,
  encodeExpectBody,
  encodeHandshake,
  encodeRequestPayload,
  frame,
  type DaemonFrame,
  type Welcome,
} from "./protocol.js";

/** What a service layer plugs into a connection: its events, checked and routed as they arrive. */
export interface ServiceHooks {
  /** An Event frame. Throw ProtocolError (or DecodeError) to reject it: the connection is closed. */
  onEvent(stream: bigint, body: Buffer): void;
  /** A Lagged frame (stream and missed already checked to be non-zero). Throw ProtocolError to reject it. */
  onLagged(stream: bigint, missed: bigint): void;
}

/** A request waiting for its reply. */
interface Outstanding {
  id: bigint;
  kind: Kind;
  /** Decodes a Reply's body (Calls only); throws to make it a protocol error. */
  decode: (body: Buffer) => unknown;
  /** Called with an Error carrying this request's id, before the promise is rejected. */
  onError?: (err: DaemonError) => void;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/** A request to send; its reply is decoded by `decode`. */
export interface RequestSpec<T> {
  kind: Kind;
  body?: Buffer;
  decode?: (body: Buffer) => T;
  onError?: (err: DaemonError) => void;
  /** Called when the request is queued for sending (with its id), in order with every other request. */
  onSend?: (id: bigint) => void;
}

export interface ConnectOptions extends DiscoverOptions {
  /** The service the client speaks, checked against Welcome; null for a generic client (ping, shutdown). */
  service?: { name: string; version: number } | null;
  /** Send Expect behind the handshake, in the same write (default: true when `service` is given). */
  expect?: boolean;
  /**
   * The connect timeout, in milliseconds: the time allowed from the start of
   * connect() to Welcome, busy retries included (default 10000 ms; section 9,
   * "Admission"). While the daemon is busy (EAGAIN from connect, or the
   * refusals TooManyUnauthenticated and TooManyConnections) the client
   * connects again and resends its handshake and pipelined requests, pausing
   * 5 ms, then twice as long each time up to 100 ms, between reading a
   * refusal and the next connect; it gives up when the timeout has passed or
   * when the next pause would end after it, and then rejects with
   * DaemonBusyError carrying the last refusal. A finite number above 0.
   */
  connectTimeoutMs?: number;
  /**
   * The id of the first request sent on the connection (a u64, 0 to
   * 2^64-1; default 1). Each later request takes the previous id plus 1, and
   * 2^64-1 is followed by 0 (ids wrap; section 6). Every request counts (a
   * Call, Ping, Shutdown, or Expect sent with expectService(), and the
   * pipelined requests, in the order written) except the Expect the client
   * sends on its own with the handshake, which always has id 0 and does not
   * move the count.
   */
  nextRequestId?: bigint | number;
  /** Bound of events held by the application, in frame payload bytes, before reading stops (default 16 MiB). */
  eventQueueBytes?: number;
  /** Write with socket.write instead of through the descriptor (loses the daemon's final frame on EPIPE: tests only). */
  unsafeSocketWrite?: boolean;
}

const ERRNO_CLOSED = new Set(["EPIPE", "ECONNRESET", "ENOTCONN", "ESHUTDOWN"]);
/** How long a connection whose end is near (final frame, failed write) may take to end before it is dropped (section 9: 2 s). */
const CLOSE_GRACE_MS = 2500;

const U64_MAX = (1n << 64n) - 1n;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
/** Busy retries (section 9, "Admission"): each pause is 1 ms to 1 s; this client starts at 5 ms and doubles up to 100 ms. */
const BUSY_FIRST_PAUSE_MS = 5;
const BUSY_MAX_PAUSE_MS = 100;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * The pauses between busy attempts (section 9, "Admission"): from reading
 * the refusal (or EAGAIN) to the next connect, at least 1 ms and at most
 * 1 s, growing; none when the connect timeout has passed or the pause would
 * end after it (the client then gives up and reports the last refusal).
 */
export class BusyRetry {
  private next = BUSY_FIRST_PAUSE_MS;

  constructor(
    private readonly deadline: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** The next pause, or null to give up. */
  plan(): number | null {
    const pause = Math.min(Math.max(this.next, 1), 1000);
    if (this.now() + pause > this.deadline) return null;
    this.next = Math.min(this.next * 2, BUSY_MAX_PAUSE_MS);
    return pause;
  }

  /** Sleeps the next pause and resolves true, or resolves false at once to give up. */
  async pause(): Promise<boolean> {
    const ms = this.plan();
    if (ms === null) return false;
    // A timer may fire a little early by the wall clock: make sure at least `ms` have passed.
    const until = this.now() + ms;
    await sleep(ms);
    while (this.now() < until) await sleep(1);
    return true;
  }
}

/**
 * Writes in order through the socket's file descriptor with fs.writeSync, so
 * that a failed write (EPIPE) does not destroy the socket and lose the
 * daemon's final frame, which net.Socket#write does (section 9, "Keeping the
 * final frame when a write fails").
 *
 * Node closes the descriptor itself when the socket ends (ECONNRESET on a
 * read), and the next socket may get the same number: every write is made on
 * this thread right after checking that the socket is not destroyed, and
 * nothing is written once the connection is abandoned, so that no byte meant
 * for this connection reaches another one.
 */
class Writer {
  private queue: Array<{ buf: Buffer; off: number; done?: () => void }> = [];
  /** The retry after EAGAIN (the socket buffer is full), while one is due. */
  private retry: NodeJS.Timeout | null = null;
  private pause = 1;
  private abandoned = false;
  private pumping = false;
  failed: NodeJS.ErrnoException | null = null;

  constructor(
    private readonly socket: net.Socket,
    private readonly fd: number | null,
    private readonly onFail: (err: NodeJS.ErrnoException) => void,
  ) {}

  write(buf: Buffer, done?: () => void): void {
    if (this.failed !== null || this.abandoned) {
      done?.();
      return;
    }
    if (this.fd === null) {
      this.socket.write(buf, (err) => {
        if (err) this.fail(err as NodeJS.ErrnoException);
        done?.();
      });
      return;
    }
    this.queue.push(done === undefined ? { buf, off: 0 } : { buf, off: 0, done });
    this.pump();
  }

  /** Drops what is not written yet, and writes nothing more (the connection is over). */
  abandon(): void {
    this.abandoned = true;
    if (this.retry !== null) clearTimeout(this.retry);
    this.retry = null;
    this.drop();
  }

  private drop(): void {
    const q = this.queue;
    this.queue = [];
    for (const item of q) item.done?.();
  }

  private fail(err: NodeJS.ErrnoException): void {
    if (this.failed !== null) return;
    this.failed = err;
    this.drop();
    this.onFail(err);
  }

  private pump(): void {
    // Not re-entered from a done callback: one loop writes, in order.
    if (this.fd === null || this.retry !== null || this.pumping) return;
    this.pumping = true;
    try {
      this.writeQueued();
    } finally {
      this.pumping = false;
    }
  }

  private writeQueued(): void {
    for (;;) {
      const item = this.queue[0];
      if (item === undefined || this.failed !== null || this.abandoned || this.fd === null) return;
      if (this.socket.destroyed) {
        // The descriptor is closed and its number may be another socket's by now.
        this.abandon();
        return;
      }
      let n: number;
      try {
        n = fs.writeSync(this.fd, item.buf, item.off, item.buf.length - item.off);
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        if (err.code === "EAGAIN" || err.code === "EWOULDBLOCK") {
          // The socket buffer is full (the daemon is not reading): try again shortly.
          this.retry = setTimeout(() => {
            this.retry = null;
            this.pump();
          }, this.pause);
          this.pause = Math.min(this.pause * 2, 20);
          return;
        }
        this.fail(err);
        return;
      }
      this.pause = 1;
      item.off += n;
      if (item.off >= item.buf.length) {
        this.queue.shift();
        item.done?.();
      }
    }
  }
}

type Phase = "handshake" | "open" | "ending" | "closed";

/** One connection to a keyhole daemon. Create it with Connection.connect(). */
export class Connection {
  private phase: Phase = "handshake";
  private readonly writer: Writer;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private limit = MAX_FRAME_CEILING;
  private outstanding: Outstanding[] = [];
  private nextId: bigint;
  private finalFrame: DaemonFrame | null = null;
  private closedError: ConnectionClosedError | null = null;
  private closeWaiters: Array<(e: ConnectionClosedError) => void> = [];
  private welcomeWaiter: { resolve: (w: Welcome) => void; reject: (e: Error) => void } | null = null;
  private heldEventBytes = 0;
  private paused = false;
  private endTimer: NodeJS.Timeout | null = null;
  private _welcome: Welcome | null = null;
  /** The error of the last failed write (EPIPE, ECONNRESET), kept for diagnosis; the daemon's final frame takes precedence. */
  writeError: NodeJS.ErrnoException | null = null;
  hooks: ServiceHooks | null = null;

  private constructor(
    private readonly socket: net.Socket,
    private readonly socketPath: string,
    private readonly service: { name: string; version: number } | null,
    private readonly eventQueueBytes: number,
    unsafeSocketWrite: boolean,
    firstRequestId: bigint,
  ) {
    this.nextId = firstRequestId;
    const handle = (socket as unknown as { _handle?: { fd?: unknown } })._handle;
    const fd = !unsafeSocketWrite && typeof handle?.fd === "number" && handle.fd >= 0 ? handle.fd : null;
    this.writer = new Writer(socket, fd, (err) => this.onWriteFailed(err));
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("end", () => this.onEnd("eof", null));
    socket.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ECONNRESET") this.onEnd("econnreset", null);
      else this.onEnd(null, err);
    });
    socket.on("close", () => this.onEnd(null, null));
  }

  /** The daemon's Welcome (after connect() resolved). */
  get welcome(): Welcome {
    if (this._welcome === null) throw new KeyholeError("no Welcome yet");
    return this._welcome;
  }

  /** The largest payload the daemon accepts (Welcome.max_frame_len). */
  get maxFrameLen(): number {
    return this.welcome.maxFrameLen;
  }

  get isClosed(): boolean {
    return this.phase === "closed";
  }

  /** Resolves when the connection is over, with why. Never rejects. */
  get closed(): Promise<ConnectionClosedError> {
    if (this.closedError !== null) return Promise.resolve(this.closedError);
    return new Promise((r) => this.closeWaiters.push(r));
  }

  /**
   * Connects: finds the socket and the token, makes check 3b, sends the
   * handshake (and Expect, and `pipeline`, in the same write), and waits for
   * Welcome, retrying while the daemon is busy. The replies to `pipeline`
   * are in `replies`, in order.
   */
  static async connect(
    opts: ConnectOptions = {},
    pipeline: Array<RequestSpec<unknown>> = [],
    hooks: ServiceHooks | null = null,
  ): Promise<{ connection: Connection; replies: Array<Promise<unknown>> }> {
    const timeout = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    if (typeof timeout !== "number" || !Number.isFinite(timeout) || timeout <= 0) {
      throw new ConfigError(`connectTimeoutMs must be a finite number of milliseconds above 0: ${String(timeout)}`);
    }
    let firstRequestId: bigint;
    try {
      firstRequestId = toU64(opts.nextRequestId ?? 1n, "nextRequestId");
    } catch (e) {
      throw new ConfigError((e as Error).message);
    }
    const started = Date.now();
    const deadline = started + timeout;
    const found = discover(opts);
    const service = opts.service ?? null;
    const expect = opts.expect ?? service !== null;
    const retry = new BusyRetry(deadline);
    let token: Buffer | null = null;
    let lastBusy: DaemonError | null = null;
    const busy = (why: string): DaemonBusyError =>
      new DaemonBusyError(`the daemon at ${found.socketPath} ${why}, and stayed busy for the connect timeout of ${timeout} ms`, lastBusy);
    try {
      for (;;) {
        const before = await peerSnapshot(found.socketPath, found.daemonUid, "before connecting");
        let socket: net.Socket;
        try {
          socket = await openSocket(found.socketPath, Math.max(1, deadline - Date.now()));
        } catch (e) {
          const err = e as NodeJS.ErrnoException;
          if (err.code === "ENOENT" || err.code === "ECONNREFUSED") {
            throw new DaemonNotRunningError(`the daemon is not running: ${err.code} on ${found.socketPath}`, found.socketPath);
          }
          if (err.code === "EAGAIN" || err.code === "EWOULDBLOCK") {
            // A full listen queue: busy, like a refusal (without a code of its own).
            if (await retry.pause()) continue;
            throw busy("is busy (its listen queue is full)");
          }
          if (e instanceof TimeoutError && lastBusy !== null) throw busy("refused earlier attempts as busy");
          if (e instanceof KeyholeError) throw e;
          throw new KeyholeError(`cannot connect to ${found.socketPath}: ${err.code ?? err.message}`);
        }
        const conn = new Connection(
          socket,
          found.socketPath,
          service,
          opts.eventQueueBytes ?? 16 * 1024 * 1024,
          opts.unsafeSocketWrite ?? false,
          firstRequestId,
        );
        conn.hooks = hooks;
        try {
          samePeer(before, await peerSnapshot(found.socketPath, found.daemonUid, "after connecting"), found.socketPath);
          if (token === null) token = await loadToken(found.token, opts.env ?? process.env);
        } catch (e) {
          socket.destroy();
          throw e;
        }
        // Handshake, Expect, then the pipelined requests, in one write. A retry sends the same bytes
        // (the refused connection discarded them unread), with the same ids.
        const parts: Buffer[] = [encodeHandshake(token)];
        const replies: Array<Promise<unknown>> = [];
        if (expect && service !== null) {
          const p = conn.enqueue({ kind: Kind.Expect, body: encodeExpectBody(service.name, service.version) }, MIN_FRAME_LIMIT, parts, 0n);
          p.catch(() => undefined);
        }
        for (const spec of pipeline) {
          const p = conn.enqueue(spec, MIN_FRAME_LIMIT, parts);
          p.catch(() => undefined);
          replies.push(p);
        }
        const bytes = Buffer.concat(parts);
        const handshake = parts[0] as Buffer;
        handshake.fill(0);
        conn.writer.write(bytes, () => bytes.subarray(0, 44).fill(0));
        try {
          await conn.waitWelcome(Math.max(1, deadline - Date.now()));
          return { connection: conn, replies };
        } catch (e) {
          conn.destroy();
          if (e instanceof DaemonError && isBusyCode(e.code)) {
            lastBusy = e;
            if (await retry.pause()) continue;
            throw busy(`refused the connection as busy (${e.message})`);
          }
          if (e instanceof TimeoutError && lastBusy !== null) throw busy("refused earlier attempts as busy");
          throw e;
        }
      }
    } finally {
      token?.fill(0);
    }
  }

  private waitWelcome(ms: number): Promise<Welcome> {
    // The first write can fail at once (it is made in connect()'s turn).
    if (this.closedError !== null) return Promise.reject(handshakeFailure(this.closedError));
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.welcomeWaiter = null;
        reject(new TimeoutError(`no answer to the handshake from ${this.socketPath} within ${ms} ms`));
      }, ms);
      this.welcomeWaiter = {
        resolve: (w) => {
          clearTimeout(t);
          resolve(w);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      };
    });
  }

  /** Queues one request: checks its size, gives it an id, records it as outstanding, and adds its frame to `out` or writes it. */
  private enqueue<T>(spec: RequestSpec<T>, limit: number, out: Buffer[] | null, forceId?: bigint): Promise<T> {
    if (spec.kind === Kind.AcceptFds || spec.kind === Kind.CallFds) {
      // Section 19: Node.js's standard library cannot send or receive SCM_RIGHTS, so this client
      // never opts in; refusing both kinds keeps "never sent AcceptFds" true on every connection.
      return Promise.reject(
        new RequestRefusedError(`this client does not pass file descriptors (Node.js cannot); ${Kind[spec.kind]} was not sent`),
      );
    }
    if (this.closedError !== null) return Promise.reject(this.closedError);
    // While the connection is ending (a final frame read, or a write failed), a request is still
    // recorded: it is rejected with the daemon's reason when the end is read.
    let id: bigint;
    if (forceId !== undefined) id = forceId;
    else {
      id = this.nextId;
      // Every u64 is an id: 2^64-1 is followed by 0 (section 6).
      this.nextId = id === U64_MAX ? 0n : id + 1n;
    }
    const payload = encodeRequestPayload(id, spec.kind, spec.body);
    if (payload.length > limit) {
      return Promise.reject(
        new RequestRefusedError(`the request is ${payload.length} bytes, over the frame limit of ${limit} bytes; nothing was sent`),
      );
    }
    return new Promise<T>((resolve, reject) => {
      const entry: Outstanding = {
        id,
        kind: spec.kind,
        decode: spec.decode ?? (() => undefined),
        resolve: resolve as (v: unknown) => void,
        reject,
      };
      if (spec.onError !== undefined) entry.onError = spec.onError;
      this.outstanding.push(entry);
      spec.onSend?.(id);
      const f = frame(payload);
      if (out !== null) out.push(f);
      else this.writer.write(f);
    });
  }

  /** Sends a request after Welcome and resolves with its decoded reply. Events may arrive meanwhile. */
  request<T>(spec: RequestSpec<T>): Promise<T> {
    if (this.phase === "handshake") return Promise.reject(new KeyholeError("the handshake is not complete"));
    return this.enqueue(spec, this.limit, null);
  }

  /** Ping: resolves when the daemon's Ack arrives. */
  async ping(): Promise<void> {
    await this.request({ kind: Kind.Ping });
  }

  /** Asks the daemon to shut down (Ack, then Closing{Shutdown}). Rejects with NotPermittedError for another uid. */
  async shutdown(): Promise<void> {
    await this.request({ kind: Kind.Shutdown });
  }

  /** Expect: resolves if the daemon serves exactly this service and version; otherwise the daemon closes with WrongService. */
  async expectService(service: string, version: number): Promise<void> {
    await this.request({ kind: Kind.Expect, body: encodeExpectBody(service, version) });
  }

  /** Number of requests waiting for their replies. */
  get inFlight(): number {
    return this.outstanding.length;
  }

  /** Event bytes held by the application; past the bound, reading stops until they are released (section 16, step 10). */
  holdEvents(bytes: number): void {
    this.heldEventBytes += bytes;
    // Once a write failed the connection is over: read on to the daemon's final frame whatever the
    // application holds (what is left is bounded by the socket buffers).
    if (!this.paused && this.heldEventBytes > this.eventQueueBytes && this.phase === "open" && this.writeError === null) {
      this.paused = true;
      this.socket.pause();
    }
  }

  releaseEvents(bytes: number): void {
    this.heldEventBytes -= bytes;
    if (this.paused && this.heldEventBytes <= this.eventQueueBytes) {
      this.paused = false;
      this.socket.resume();
    }
  }

  /** Closes the connection from this end. Outstanding requests are rejected. */
  async close(): Promise<void> {
    this.finish(new ConnectionClosedError("the connection was closed by the client", { kind: "local" }, null));
    await this.closed;
  }

  private destroy(): void {
    this.finish(new ConnectionClosedError("the connection was closed by the client", { kind: "local" }, null));
  }

  // ---- reading ----

  private onData(chunk: Buffer): void {
    if (this.phase === "closed") return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    try {
      for (;;) {
        if ((this.phase as Phase) === "closed") return;
        if (this.buffered < 4) return;
        const len = this.peekLength();
        // The length is checked against the limit before the payload is read or room is made for it.
        if (len > this.limit) {
          throw new ProtocolError(`the daemon sent a frame of ${len} bytes, over the limit of ${this.limit} bytes`);
        }
        if (this.buffered < 4 + len) return;
        const payload = this.take(4 + len).subarray(4);
        let f: DaemonFrame;
        try {
          f = decodeDaemonFrame(payload);
        } catch (e) {
          if (e instanceof DecodeError) throw new ProtocolError(`undecodable frame from the daemon: ${e.message}`);
          throw e;
        }
        this.handleFrame(f);
      }
    } catch (e) {
      if (e instanceof ProtocolError) this.protocolError(e);
      else if (e instanceof DecodeError) this.protocolError(new ProtocolError(`the daemon sent a message that does not decode: ${e.message}`));
      else if (e instanceof Error) this.protocolError(new ProtocolError(`failed to handle a frame: ${e.message}`));
    }
  }

  private peekLength(): number {
    const head = this.chunks[0] as Buffer;
    if (head.length >= 4) return head.readUInt32LE(0);
    const first4 = this.take(4);
    this.chunks.unshift(first4);
    this.buffered += 4;
    return first4.readUInt32LE(0);
  }

  /** Takes exactly n bytes from the buffered chunks. */
  private take(n: number): Buffer {
    const head = this.chunks[0] as Buffer;
    if (head.length >= n) {
      const out = head.subarray(0, n);
      if (head.length === n) this.chunks.shift();
      else this.chunks[0] = head.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let got = 0;
    while (got < n) {
      const c = this.chunks[0] as Buffer;
      const k = Math.min(c.length, n - got);
      c.copy(out, got, 0, k);
      got += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }

  private handleFrame(f: DaemonFrame): void {
    if (this.finalFrame !== null) {
      throw new ProtocolError(`the daemon sent a ${f.type} frame after its final frame`);
    }
    if (this.phase === "handshake") {
      this.handleFirstFrame(f);
      return;
    }
    switch (f.type) {
      case "Welcome":
        throw new ProtocolError("the daemon sent a second Welcome");
      case "Reply":
      case "Ack": {
        const head = this.matchReply(f.id, f.type);
        const isCall = head.kind === Kind.Call || head.kind === Kind.CallFds;
        if (f.type === "Reply" && !isCall) {
          throw new ProtocolError(`the daemon answered a ${Kind[head.kind]} (id ${f.id}) with a Reply`);
        }
        if (f.type === "Ack" && isCall) {
          throw new ProtocolError(`the daemon answered a ${Kind[head.kind]} (id ${f.id}) with an Ack`);
        }
        let value: unknown;
        if (f.type === "Reply") {
          try {
            value = head.decode(f.body);
          } catch (e) {
            if (e instanceof ProtocolError) throw e;
            throw new ProtocolError(`the reply to request ${f.id} does not decode: ${(e as Error).message}`);
          }
        }
        this.outstanding.shift();
        head.resolve(value);
        return;
      }
      case "Error": {
        const problem = errorFrameProblem(f.code, f.id);
        if (problem !== null) throw new ProtocolError(`the daemon sent an Error with ${problem}`);
        const err = daemonError(f.code, f.id, f.message);
        if (f.id !== null) {
          const head = this.matchReply(f.id, "Error");
          this.outstanding.shift();
          head.onError?.(err);
          head.reject(err);
          return;
        }
        this.finalFrame = f;
        this.startEnding();
        return;
      }
      case "Closing":
        this.finalFrame = f;
        this.startEnding();
        return;
      case "Lagged":
        if (f.stream === 0n) throw new ProtocolError("the daemon sent a Lagged for stream 0");
        if (f.missed === 0n) throw new ProtocolError(`the daemon sent a Lagged of 0 events for stream ${f.stream}`);
        this.hooks?.onLagged(f.stream, f.missed);
        return;
      case "Event":
        if (this.hooks === null) throw new ProtocolError(`the daemon sent an Event (stream ${f.stream}) to a client without a service`);
        this.hooks.onEvent(f.stream, f.body);
        return;
      // This client never sends AcceptFds (Node.js cannot pass descriptors), so a frame of tag 7 or 8
      // is a protocol error on every one of its connections (sections 7 and 19.4).
      case "ReplyFds":
        throw new ProtocolError(
          `the daemon sent a ReplyFds (tag 7, id ${f.id}, ${f.fds} descriptors) on a connection that did not send AcceptFds`,
        );
      case "EventFds":
        throw new ProtocolError(
          `the daemon sent an EventFds (tag 8, stream ${f.stream}, ${f.fds} descriptors) on a connection that did not send AcceptFds`,
        );
    }
  }

  private matchReply(id: bigint, what: string): Outstanding {
    const head = this.outstanding[0];
    if (head === undefined) throw new ProtocolError(`the daemon sent ${what} with id ${id} when no request was outstanding`);
    if (head.id !== id) {
      throw new ProtocolError(`the daemon sent ${what} with id ${id}, but the oldest outstanding request is ${head.id}`);
    }
    return head;
  }

  private handleFirstFrame(f: DaemonFrame): void {
    if (f.type === "Welcome") {
      const w = f.welcome;
      if (w.protocolVersion !== PROTOCOL_VERSION) {
        throw new ProtocolError(`the daemon's Welcome speaks protocol version ${w.protocolVersion}, not ${PROTOCOL_VERSION}`);
      }
      if (w.maxFrameLen < MIN_FRAME_LIMIT || w.maxFrameLen > MAX_FRAME_CEILING) {
        throw new ProtocolError(`the daemon's Welcome announces a frame limit of ${w.maxFrameLen} bytes, outside 1024 to 16777216`);
      }
      if (this.service !== null && (w.service !== this.service.name || w.serviceVersion !== this.service.version)) {
        const err = new WrongServiceError(w.service, w.serviceVersion, this.service.name, this.service.version);
        const waiter = this.welcomeWaiter;
        this.welcomeWaiter = null;
        this.finish(new ConnectionClosedError(err.message, { kind: "local" }, null));
        waiter?.reject(err);
        return;
      }
      this._welcome = w;
      this.limit = w.maxFrameLen;
      this.phase = "open";
      const waiter = this.welcomeWaiter;
      this.welcomeWaiter = null;
      waiter?.resolve(w);
      return;
    }
    if (f.type === "Error" && f.id === null && isHandshakeCode(f.code)) {
      // A refusal: reported as such, not as failed requests; the connection ends after it.
      const err = daemonError(f.code, null, f.message);
      this.finalFrame = f;
      const waiter = this.welcomeWaiter;
      this.welcomeWaiter = null;
      waiter?.reject(err);
      this.finish(new ConnectionClosedError(`the daemon refused the handshake: ${err.message}`, { kind: "error", error: err }, null));
      return;
    }
    throw new ProtocolError(`the daemon's first frame is ${describe(f)}, neither Welcome nor a refusal of the handshake`);
  }

  private startEnding(): void {
    if (this.phase === "closed") return;
    this.phase = "ending";
    if (this.paused) {
      this.paused = false;
      this.socket.resume();
    }
    this.armEndTimer();
  }

  private armEndTimer(): void {
    if (this.endTimer !== null) return;
    this.endTimer = setTimeout(() => this.onEnd(null, null), CLOSE_GRACE_MS);
    this.endTimer.unref();
  }

  private onWriteFailed(err: NodeJS.ErrnoException): void {
    // The daemon closed its end. Keep the socket and read on: what it sent
    // before closing (usually an Error that says why) is still to be read.
    this.writeError = err;
    if (!ERRNO_CLOSED.has(err.code ?? "")) {
      this.finish(new ConnectionClosedError(`a write failed: ${err.code ?? err.message}`, { kind: "dropped", writeError: err }, null));
      return;
    }
    if (this.phase === "open" || this.phase === "handshake") {
      if (this.paused) {
        this.paused = false;
        this.socket.resume();
      }
    }
    this.armEndTimer();
  }

  private onEnd(transport: "eof" | "econnreset" | null, other: NodeJS.ErrnoException | null): void {
    if (this.phase === "closed") return;
    let err: ConnectionClosedError;
    const how = transport === null ? "" : transport === "eof" ? " (end of stream)" : " (ECONNRESET)";
    const f = this.finalFrame;
    if (f !== null && f.type === "Closing") {
      err = new ConnectionClosedError(`the daemon closed the connection: Closing{${f.reason}}${how}`, { kind: "closing", reason: f.reason }, transport);
    } else if (f !== null && f.type === "Error") {
      const de = daemonError(f.code, f.id, f.message);
      err = new ConnectionClosedError(`the daemon closed the connection: ${de.message}${how}`, { kind: "error", error: de }, transport);
    } else {
      const why = other !== null ? `: ${other.code ?? other.message}` : this.writeError !== null ? ` (a write failed: ${this.writeError.code})` : "";
      const what =
        this.phase === "handshake"
          ? "the daemon closed the connection before answering the handshake"
          : "the connection was dropped without a final frame";
      err = new ConnectionClosedError(`${what}${how}${why}`, { kind: "dropped", writeError: this.writeError }, transport);
    }
    this.finish(err);
  }

  private protocolError(e: ProtocolError): void {
    const waiter = this.welcomeWaiter;
    this.welcomeWaiter = null;
    waiter?.reject(e);
    this.finish(new ConnectionClosedError(`protocol error: ${e.message}`, { kind: "protocol", error: e }, null));
  }

  private finish(err: ConnectionClosedError): void {
    if (this.phase === "closed") return;
    this.phase = "closed";
    this.closedError = err;
    if (this.endTimer !== null) clearTimeout(this.endTimer);
    const waiter = this.welcomeWaiter;
    this.welcomeWaiter = null;
    waiter?.reject(handshakeFailure(err));
    const pending = this.outstanding.splice(0);
    for (const o of pending) o.reject(err);
    for (const w of this.closeWaiters.splice(0)) w(err);
    this.chunks = [];
    this.buffered = 0;
    this.writer.abandon();
    this.socket.destroy();
  }
}

/** What connect() reports when the connection ends before Welcome: the refusal or protocol error itself. */
function handshakeFailure(err: ConnectionClosedError): Error {
  const r = err.reason;
  return r.kind === "error" || r.kind === "protocol" ? r.error : err;
}

function describe(f: DaemonFrame): string {
  if (f.type === "Error") return `an Error with code ${f.code} and ${f.id === null ? "no id" : `id ${f.id}`}`;
  return `${/^[AEIOU]/.test(f.type) ? "an" : "a"} ${f.type}`;
}

function openSocket(socketPath: string, ms: number): Promise<net.Socket> {
  if (Buffer.byteLength(socketPath) >= (process.platform === "linux" ? 108 : 104)) {
    return Promise.reject(new KeyholeError(`the socket path ${socketPath} is too long for a Unix socket`));
  }
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ path: socketPath, allowHalfOpen: true });
    const t = setTimeout(() => {
      s.destroy();
      reject(new TimeoutError(`connecting to ${socketPath} took more than ${ms} ms`));
    }, ms);
    s.once("connect", () => {
      clearTimeout(t);
      s.removeAllListeners("error");
      resolve(s);
    });
    s.once("error", (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}
