// The conformance kit's driver for this client (proto-spec.md Part IV,
// section 17): connects with the client's normal API, subscribes to
// `conformance.control`, reports each step on `conformance.report`, and does
// what each instruction says. Run it as
//
//   keyhole-conformance --dir /tmp/kit &
//   KEYHOLE_DIR=/tmp/kit node dist/src/conformance.js
//
// It exits 0 when the kit's verdict is "pass", 1 otherwise (with the kit's
// failure on stderr). No dependencies beyond Node.js's standard library.

import { fileURLToPath } from "node:url";
import { HubClient, IncomingRequest, Subscription, type HubConnectOptions } from "./client.js";
import {
  ConnectionClosedError,
  DaemonBusyError,
  DaemonError,
  ProtocolError,
  ReplyTooLargeError,
  RequestFailedError,
  RequestRefusedError,
  RequestTimeoutError,
  ResponderGoneError,
  TimeoutError,
  WrongServiceError,
} from "./errors.js";
import type { Env } from "./discovery.js";

type Json = null | boolean | string | Json[] | { [k: string]: Json };
type Obj = { [k: string]: Json };
type Op = Obj & { op: string };

/** Each op's own time limit: shorter than the kit's step timeout (15 s by default). */
const OP_TIMEOUT_MS = 8000;
const CONTROL_TOPIC = "conformance.control";
const REPORT_TOPIC = "conformance.report";

/** Thrown by `bounded` when an op's time passes. */
class OpTimeout extends Error {}

function bounded<T>(p: Promise<T>, ms = OP_TIMEOUT_MS): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new OpTimeout(`no result within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

// ---- JSON conventions (section 17.3) ----

function str(v: Json | undefined, what: string): string {
  if (typeof v !== "string") throw new Error(`the instruction's ${what} is not a string: ${JSON.stringify(v)}`);
  return v;
}

function int(v: Json | undefined, what: string): bigint {
  const s = str(v, what);
  if (!/^[0-9]+$/.test(s)) throw new Error(`the instruction's ${what} is not decimal digits: ${JSON.stringify(s)}`);
  return BigInt(s);
}

function n(v: bigint | number): string {
  return v.toString();
}

/** A payload of an instruction: lowercase hex, or {"fill": "XX", "len": "N"}. */
function payloadIn(v: Json | undefined, what = "payload"): Buffer {
  if (typeof v === "string") {
    if (!/^(?:[0-9a-f]{2})*$/.test(v)) throw new Error(`the instruction's ${what} is not lowercase hex`);
    return Buffer.from(v, "hex");
  }
  if (v !== null && typeof v === "object" && !Array.isArray(v)) {
    const fill = str(v.fill, `${what}.fill`);
    if (!/^[0-9a-f]{2}$/.test(fill)) throw new Error(`the instruction's ${what}.fill is not one hex byte`);
    return Buffer.alloc(Number(int(v.len, `${what}.len`)), parseInt(fill, 16));
  }
  throw new Error(`the instruction's ${what} is neither hex nor a fill`);
}

/** A payload of a report: hex up to 4096 bytes; longer, a fill when every byte is equal, else its length. */
export function payloadOut(b: Uint8Array): Json {
  if (b.length <= 4096) return Buffer.from(b.buffer, b.byteOffset, b.length).toString("hex");
  const first = b[0] as number;
  if (b.every((x) => x === first)) return { fill: first.toString(16).padStart(2, "0"), len: n(b.length) };
  return { len: n(b.length) };
}

// ---- results ----

function ok(v: Json): Json {
  return { ok: v };
}

function error(kind: string, fields: Obj = {}): Json {
  return { error: { kind, ...fields } };
}

function closeReason(r: string): Json {
  return r === "Shutdown" ? "shutdown" : r === "SlowConsumer" ? "slow_consumer" : r;
}

function daemonErrorResult(e: DaemonError): Json {
  return error(e.code >= 1000 ? "service" : "daemon", { code: n(e.code) });
}

/** What an op's failure reports (the table of section 17.3). */
export function errorResult(e: unknown): Json {
  if (e instanceof OpTimeout) return error("timeout");
  if (e instanceof ConnectionClosedError) {
    const r = e.reason;
    switch (r.kind) {
      case "closing":
        return error("closed", { reason: closeReason(r.reason) });
      case "protocol":
        return error("protocol");
      case "error":
        // A refusal of the handshake ends the connection with its Error too.
        if (r.error.id === null && isRefusal(r.error) && e.message.startsWith("the daemon refused")) {
          return error("refused", { code: n(r.error.code) });
        }
        return daemonErrorResult(r.error);
      case "dropped":
      case "local":
        return error("closed", { reason: null });
    }
  }
  if (e instanceof WrongServiceError) return error("wrong_service", { service: e.served, version: n(e.servedVersion) });
  if (e instanceof ProtocolError) return error("protocol");
  if (e instanceof DaemonBusyError) {
    if (e.last !== null) return error("refused", { code: n(e.last.code) });
    return error("other", { text: e.message });
  }
  if (e instanceof DaemonError) {
    if (e.id === null && isRefusal(e)) return error("refused", { code: n(e.code) });
    return daemonErrorResult(e);
  }
  if (e instanceof ResponderGoneError) return error("outcome", { outcome: "responder_gone" });
  if (e instanceof RequestTimeoutError) return error("outcome", { outcome: "timeout" });
  if (e instanceof ReplyTooLargeError) return error("outcome", { outcome: "reply_too_large", len: n(e.len) });
  if (e instanceof RequestFailedError) return error("outcome", { outcome: "failed", message: e.responderMessage });
  if (e instanceof RequestRefusedError && /frame limit/.test(e.message)) return error("too_large");
  if (e instanceof TimeoutError) return error("timeout");
  return error("other", { text: e instanceof Error ? `${e.name}: ${e.message}` : String(e) });
}

function isRefusal(e: DaemonError): boolean {
  return (e.code >= 0 && e.code <= 7) || e.code === 13;
}

// ---- one connection's ops ----

const PIPELINABLE = new Set(["ping", "shutdown", "status", "topics", "publish", "request"]);

class Session {
  private subs = new Map<string, Subscription>();
  private requests = new Map<string, IncomingRequest>();
  /** Request events taken from the client's queue while waiting for another name. */
  private stash = new Map<string, IncomingRequest[]>();
  private incoming: AsyncIterator<IncomingRequest>;
  private pendingNext: Promise<IteratorResult<IncomingRequest>> | null = null;

  constructor(
    readonly client: HubClient,
    private readonly connectOpts: HubConnectOptions,
  ) {
    this.incoming = client.requests();
  }

  /** Runs one op to its end and returns its result (never throws). */
  async run(op: Op): Promise<Json> {
    try {
      return await bounded(this.exec(op));
    } catch (e) {
      return errorResult(e);
    }
  }

  /** Starts an op that can be pipelined: its request is sent before this returns. */
  private start(op: Op): Promise<Json> {
    const c = this.client;
    switch (op.op) {
      case "ping":
        return c.ping().then(() => ok("ack"));
      case "shutdown":
        return c.shutdown().then(() => ok("ack"));
      case "status":
        return c.status().then((s) =>
          ok({
            status: {
              authenticated: n(s.authenticated),
              pending: n(s.pending),
              topics: n(s.topics),
              subscriptions: n(s.subscriptions),
              names: n(s.names),
              requests_in_flight: n(s.requestsInFlight),
              uptime_ms: n(s.uptimeMs),
              version: s.version,
            },
          }),
        );
      case "topics":
        return c.topics().then((t) =>
          ok({
            topics: {
              patterns: t.patterns.map(([p, k]) => [p, n(k)]),
              names: t.names.map(([p, k]) => [p, n(k)]),
              truncated: t.truncated,
            },
          }),
        );
      case "publish":
        return c.publish(str(op.topic, "topic"), payloadIn(op.payload)).then((r) => ok({ published: n(r) }));
      case "request": {
        const timeoutMs = Number(int(op.timeout_ms, "timeout_ms"));
        return c.request(str(op.name, "name"), payloadIn(op.payload), { timeoutMs }).then((b) => ok({ reply: payloadOut(b) }));
      }
      default:
        return Promise.reject(new Error(`unknown op ${JSON.stringify(op.op)}`));
    }
  }

  private async exec(op: Op): Promise<Json> {
    const c = this.client;
    switch (op.op) {
      case "ping":
      case "shutdown":
      case "status":
      case "topics":
      case "publish":
      case "request":
        return this.start(op);
      case "subscribe": {
        const lagText = str(op.lag, "lag");
        const lag = lagText === "disconnect" ? "Disconnect" : lagText === "drop_oldest" ? "DropOldest" : null;
        if (lag === null) throw new Error(`unknown lag ${JSON.stringify(lagText)}`);
        const sub = await c.subscribe(str(op.pattern, "pattern"), { lag });
        this.subs.set(str(op.as, "as"), sub);
        return ok("subscribed");
      }
      case "unsubscribe": {
        const sub = this.sub(op);
        await sub.unsubscribe();
        return ok("unsubscribed");
      }
      case "next_event": {
        const item = await this.sub(op).next();
        if (item === null) throw new Error("the subscription ended");
        if (item.type === "Lagged") return ok({ lagged: n(item.missed) });
        return ok({ event: { topic: item.topic, sequence: n(item.sequence), payload: payloadOut(item.payload) } });
      }
      case "serve":
        await c.serve(str(op.name, "name"));
        return ok("serving");
      case "unserve":
        await c.unserve(str(op.name, "name"));
        return ok("unserved");
      case "next_request": {
        const req = await this.nextRequest(str(op.name, "name"));
        this.requests.set(str(op.as, "as"), req);
        return ok({ request: { name: req.name, uid: n(req.uid), pid: n(req.pid), payload: payloadOut(req.payload) } });
      }
      case "respond": {
        const delivered = await this.request(op).respond(payloadIn(op.payload));
        return ok({ delivered });
      }
      case "fail": {
        const delivered = await this.request(op).fail(str(op.message, "message"));
        return ok({ delivered });
      }
      case "pipeline": {
        const ops = op.ops;
        if (!Array.isArray(ops)) throw new Error("pipeline without ops");
        const started: Array<Promise<Json>> = [];
        for (const o of ops) {
          const sub = o as Op;
          if (!PIPELINABLE.has(sub.op)) {
            started.push(Promise.resolve(error("other", { text: `op ${sub.op} cannot be pipelined` })));
            continue;
          }
          // Every request is sent (synchronously, in order) before the first answer is awaited.
          started.push(this.start(sub).catch((e: unknown) => errorResult(e)));
        }
        return ok({ results: await Promise.all(started) });
      }
      case "connect": {
        const ops = op.ops;
        if (!Array.isArray(ops)) throw new Error("connect without ops");
        // The connection's own failure is reported alone; its ops are bounded one by one.
        // The optional fields set the client's own connect options for this one connection (section 17.3).
        const extraOpts: HubConnectOptions = { ...this.connectOpts };
        if (op.next_request_id !== undefined) extraOpts.nextRequestId = int(op.next_request_id, "next_request_id");
        if (op.next_sid !== undefined) extraOpts.nextSubscriptionId = int(op.next_sid, "next_sid");
        if (op.connect_timeout_ms !== undefined) extraOpts.connectTimeoutMs = Number(int(op.connect_timeout_ms, "connect_timeout_ms"));
        const extra = await HubClient.connect(extraOpts);
        try {
          const w = extra.welcome;
          const session = new Session(extra, this.connectOpts);
          const results: Json[] = [];
          for (const o of ops) results.push(await session.run(o as Op));
          return ok({
            welcome: {
              protocol_version: n(w.protocolVersion),
              service: w.service,
              service_version: n(w.serviceVersion),
              software_version: w.softwareVersion,
              instance_id: n(w.instanceId),
              connection_id: n(w.connectionId),
              max_frame_len: n(w.maxFrameLen),
            },
            results,
          });
        } finally {
          await extra.close();
        }
      }
      default:
        throw new Error(`unknown op ${JSON.stringify(op.op)}`);
    }
  }

  /** The ops of `connect` are bounded one by one, so the connect op itself gets their time too. */
  async runTop(op: Op): Promise<Json> {
    if (op.op !== "connect") return this.run(op);
    const ops = Array.isArray(op.ops) ? op.ops.length : 0;
    try {
      return await bounded(this.exec(op), OP_TIMEOUT_MS * (1 + ops));
    } catch (e) {
      return errorResult(e);
    }
  }

  private sub(op: Op): Subscription {
    const label = str(op.sub, "sub");
    const s = this.subs.get(label);
    if (s === undefined) throw new Error(`no subscription labelled ${JSON.stringify(label)}`);
    return s;
  }

  private request(op: Op): IncomingRequest {
    const label = str(op.request, "request");
    const r = this.requests.get(label);
    if (r === undefined) throw new Error(`no request labelled ${JSON.stringify(label)}`);
    return r;
  }

  private async nextRequest(name: string): Promise<IncomingRequest> {
    const held = this.stash.get(name);
    if (held !== undefined && held.length > 0) return held.shift() as IncomingRequest;
    for (;;) {
      // A wait cut short by the op's timeout leaves its pending next() for the following wait.
      this.pendingNext ??= this.incoming.next();
      const r = await this.pendingNext;
      this.pendingNext = null;
      if (r.done === true) throw new Error("the connection's requests ended");
      if (r.value.name === name) return r.value;
      const list = this.stash.get(r.value.name) ?? [];
      list.push(r.value);
      this.stash.set(r.value.name, list);
    }
  }
}

// ---- the run (section 17.2) ----

export interface DriverResult {
  verdict: "pass" | "fail" | "no end";
  /** The end instruction, or why the run ended without one. */
  end: Json;
  steps: string[];
}

function describe(e: unknown): string {
  return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
}

function parseInstruction(payload: Buffer): Obj {
  const v = JSON.parse(payload.toString("utf8")) as Json;
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error("an instruction that is not a JSON object");
  return v;
}

/** Runs the kit's whole script; resolves with the verdict (never rejects for what the kit does). */
export async function runDriver(env: Env = process.env): Promise<DriverResult> {
  const opts: HubConnectOptions = { env };
  const steps: string[] = [];
  const client = await HubClient.connect(opts);
  try {
    const control = await client.subscribe(CONTROL_TOPIC, { lag: "Disconnect" });
    const session = new Session(client, opts);
    let report: Json = { step: "hello", results: [] };
    for (;;) {
      const published = client.publish(REPORT_TOPIC, Buffer.from(JSON.stringify(report), "utf8"));
      // A report that cannot be published (refused by the client, or failed by the kit) ends the run:
      // no instruction would answer it.
      const unpublished = published.then(
        () => new Promise<never>(() => undefined),
        (e: unknown) => {
          throw new Error(`the report of step ${JSON.stringify((report as Obj).step)} was not published: ${describe(e)}`);
        },
      );
      let item;
      try {
        item = await Promise.race([control.next(), unpublished]);
      } catch (e) {
        return { verdict: "no end", end: { why: describe(e) }, steps };
      }
      if (item === null) return { verdict: "no end", end: { why: "the control subscription ended" }, steps };
      if (item.type !== "Message") return { verdict: "no end", end: { why: `the control subscription lost ${item.missed} events` }, steps };
      const instr = parseInstruction(item.payload);
      const step = str(instr.step, "step");
      if (step === "end") {
        return { verdict: instr.verdict === "pass" ? "pass" : "fail", end: instr, steps };
      }
      steps.push(step);
      // The report's Published (receivers 1) may come after the instruction; it is not this step's.
      try {
        await bounded(published);
      } catch {
        // A failure shows in the kit's report; the next instruction (or the end) still comes.
      }
      const ops = instr.ops;
      const results: Json[] = [];
      if (Array.isArray(ops)) for (const op of ops) results.push(await session.runTop(op as Op));
      report = { step, results };
    }
  } finally {
    await client.close();
  }
}

async function main(): Promise<void> {
  let result: DriverResult;
  try {
    result = await runDriver();
  } catch (e) {
    process.stderr.write(`conformance driver: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
    return;
  }
  if (result.verdict === "pass") {
    process.stdout.write(`conformance driver: pass (${result.steps.length} steps)\n`);
    process.exitCode = 0;
  } else {
    process.stderr.write(`conformance driver: ${result.verdict}: ${JSON.stringify(result.end)}\n`);
    process.exitCode = 1;
  }
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) void main();
