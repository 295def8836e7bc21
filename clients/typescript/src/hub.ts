// The hub's messages (Part II of proto-spec.md, section 13) and its subject
// rules (section 14).

import { DecodeError, Reader, Writer } from "./codec.js";

export const HUB_SERVICE = "hub";
export const HUB_VERSION = 2;

export type Lag = "Disconnect" | "DropOldest";

export type Failure = { type: "ReplyTooLarge"; len: bigint | number } | { type: "Failed"; message: string };

/** A hub request (the body of a Call). u64 fields take a bigint or a safe integer. */
export type HubRequest =
  | { type: "Status" }
  | { type: "Subscribe"; sid: bigint | number; pattern: string; lag: Lag }
  | { type: "Unsubscribe"; sid: bigint | number }
  | { type: "Publish"; topic: string; payload: Uint8Array }
  | { type: "Serve"; name: string }
  | { type: "Unserve"; name: string }
  | { type: "Request"; name: string; timeoutMs: number; payload: Uint8Array }
  | { type: "Respond"; token: bigint | number; payload: Uint8Array }
  | { type: "Fail"; token: bigint | number; failure: Failure }
  | { type: "Topics" }
  /**
   * Tag 10 (section 19.5): only ever sent as a CallFds carrying a sealed memfd. It is here for the
   * tables and the encoder; HubClient refuses to send it, since Node.js cannot pass descriptors.
   */
  | { type: "PublishMemfd"; topic: string };

export interface Status {
  authenticated: bigint;
  pending: bigint;
  topics: bigint;
  subscriptions: bigint;
  names: bigint;
  requestsInFlight: bigint;
  uptimeMs: bigint;
  version: string;
}

export type HubReply =
  | { type: "Status"; status: Status }
  | { type: "Subscribed" }
  | { type: "Unsubscribed" }
  | { type: "Published"; receivers: bigint }
  | { type: "Serving" }
  | { type: "Unserved" }
  | { type: "Requested" }
  | { type: "Responded"; delivered: boolean }
  | { type: "Topics"; patterns: Array<[string, bigint]>; names: Array<[string, bigint]>; truncated: boolean };

export type Outcome =
  | { type: "Reply"; payload: Buffer }
  | { type: "ResponderGone" }
  | { type: "Timeout" }
  | { type: "ReplyTooLarge"; len: bigint }
  | { type: "Failed"; message: string };

export type HubEvent =
  | { type: "Message"; topic: string; sequence: bigint; payload: Buffer }
  | { type: "Request"; token: bigint; name: string; uid: number; pid: number; payload: Buffer }
  | { type: "Response"; request: bigint; outcome: Outcome }
  /**
   * Tag 3 (section 19.5): always an EventFds carrying the memfd; the payload is its first `len`
   * bytes. This client never receives one: in a plain Event it is a protocol error.
   */
  | { type: "MessageMemfd"; topic: string; sequence: bigint; len: bigint };

const REQUEST_TAGS = {
  Status: 0,
  Subscribe: 1,
  Unsubscribe: 2,
  Publish: 3,
  Serve: 4,
  Unserve: 5,
  Request: 6,
  Respond: 7,
  Fail: 8,
  Topics: 9,
  PublishMemfd: 10,
} as const;

/** The one reply kind that answers each request (section 13). */
export const REPLY_FOR: Record<HubRequest["type"], HubReply["type"]> = {
  Status: "Status",
  Subscribe: "Subscribed",
  Unsubscribe: "Unsubscribed",
  Publish: "Published",
  Serve: "Serving",
  Unserve: "Unserved",
  Request: "Requested",
  Respond: "Responded",
  Fail: "Responded",
  Topics: "Topics",
  PublishMemfd: "Published",
};

export function encodeHubRequest(req: HubRequest): Buffer {
  const w = new Writer().u32(REQUEST_TAGS[req.type]);
  switch (req.type) {
    case "Status":
    case "Topics":
      break;
    case "Subscribe":
      w.u64(req.sid, "sid").string(req.pattern).u32(req.lag === "Disconnect" ? 0 : 1);
      break;
    case "Unsubscribe":
      w.u64(req.sid, "sid");
      break;
    case "Publish":
      w.string(req.topic).bytes(req.payload);
      break;
    case "Serve":
    case "Unserve":
      w.string(req.name);
      break;
    case "PublishMemfd":
      w.string(req.topic);
      break;
    case "Request":
      w.string(req.name).u32(req.timeoutMs, "timeout_ms").bytes(req.payload);
      break;
    case "Respond":
      w.u64(req.token, "token").bytes(req.payload);
      break;
    case "Fail":
      w.u64(req.token, "token");
      if (req.failure.type === "ReplyTooLarge") w.u32(0).u64(req.failure.len, "len");
      else w.u32(1).string(req.failure.message);
      break;
  }
  return w.finish();
}

function pairs(r: Reader, what: string): Array<[string, bigint]> {
  // Each (String, u64) takes at least 16 bytes (section 5).
  const n = r.count(what, 16);
  const out: Array<[string, bigint]> = [];
  for (let i = 0; i < n; i++) out.push([r.string(`${what} entry`), r.u64(`${what} count`)]);
  return out;
}

export function decodeHubReply(body: Buffer): HubReply {
  const r = new Reader(body);
  const tag = r.u32("hub reply tag");
  let rep: HubReply;
  switch (tag) {
    case 0:
      rep = {
        type: "Status",
        status: {
          authenticated: r.u64(),
          pending: r.u64(),
          topics: r.u64(),
          subscriptions: r.u64(),
          names: r.u64(),
          requestsInFlight: r.u64(),
          uptimeMs: r.u64(),
          version: r.string("version"),
        },
      };
      break;
    case 1:
      rep = { type: "Subscribed" };
      break;
    case 2:
      rep = { type: "Unsubscribed" };
      break;
    case 3:
      rep = { type: "Published", receivers: r.u64("receivers") };
      break;
    case 4:
      rep = { type: "Serving" };
      break;
    case 5:
      rep = { type: "Unserved" };
      break;
    case 6:
      rep = { type: "Requested" };
      break;
    case 7:
      rep = { type: "Responded", delivered: r.bool("delivered") };
      break;
    case 8:
      rep = { type: "Topics", patterns: pairs(r, "patterns"), names: pairs(r, "names"), truncated: r.bool("truncated") };
      break;
    default:
      throw new DecodeError(`unknown hub reply tag ${tag}`);
  }
  r.end("hub reply");
  return rep;
}

export function decodeHubEvent(body: Buffer): HubEvent {
  const r = new Reader(body);
  const tag = r.u32("hub event tag");
  let ev: HubEvent;
  switch (tag) {
    case 0:
      ev = { type: "Message", topic: r.string("topic"), sequence: r.u64("sequence"), payload: r.bytes("payload") };
      break;
    case 1:
      ev = {
        type: "Request",
        token: r.u64("token"),
        name: r.string("name"),
        uid: r.u32("uid"),
        pid: r.u32("pid"),
        payload: r.bytes("payload"),
      };
      break;
    case 2: {
      const request = r.u64("request");
      const otag = r.u32("outcome tag");
      let outcome: Outcome;
      switch (otag) {
        case 0:
          outcome = { type: "Reply", payload: r.bytes("payload") };
          break;
        case 1:
          outcome = { type: "ResponderGone" };
          break;
        case 2:
          outcome = { type: "Timeout" };
          break;
        case 3:
          outcome = { type: "ReplyTooLarge", len: r.u64("len") };
          break;
        case 4:
          outcome = { type: "Failed", message: r.string("message") };
          break;
        default:
          throw new DecodeError(`unknown outcome tag ${otag}`);
      }
      ev = { type: "Response", request, outcome };
      break;
    }
    case 3:
      ev = { type: "MessageMemfd", topic: r.string("topic"), sequence: r.u64("sequence"), len: r.u64("len") };
      break;
    default:
      throw new DecodeError(`unknown hub event tag ${tag}`);
  }
  r.end("hub event");
  return ev;
}

/** Encoders of replies and events, for fake daemons in tests and round trips. */
export function encodeHubReply(rep: HubReply): Buffer {
  const tags: Record<HubReply["type"], number> = {
    Status: 0,
    Subscribed: 1,
    Unsubscribed: 2,
    Published: 3,
    Serving: 4,
    Unserved: 5,
    Requested: 6,
    Responded: 7,
    Topics: 8,
  };
  const w = new Writer().u32(tags[rep.type]);
  switch (rep.type) {
    case "Status": {
      const s = rep.status;
      w.u64(s.authenticated).u64(s.pending).u64(s.topics).u64(s.subscriptions);
      w.u64(s.names).u64(s.requestsInFlight).u64(s.uptimeMs).string(s.version);
      break;
    }
    case "Published":
      w.u64(rep.receivers);
      break;
    case "Responded":
      w.bool(rep.delivered);
      break;
    case "Topics":
      w.u64(rep.patterns.length);
      for (const [t, n] of rep.patterns) w.string(t).u64(n);
      w.u64(rep.names.length);
      for (const [t, n] of rep.names) w.string(t).u64(n);
      w.bool(rep.truncated);
      break;
    default:
      break;
  }
  return w.finish();
}

export function encodeHubEvent(ev: HubEvent): Buffer {
  const w = new Writer();
  switch (ev.type) {
    case "Message":
      w.u32(0).string(ev.topic).u64(ev.sequence).bytes(ev.payload);
      break;
    case "Request":
      w.u32(1).u64(ev.token).string(ev.name).u32(ev.uid).u32(ev.pid).bytes(ev.payload);
      break;
    case "Response": {
      w.u32(2).u64(ev.request);
      const o = ev.outcome;
      if (o.type === "Reply") w.u32(0).bytes(o.payload);
      else if (o.type === "ResponderGone") w.u32(1);
      else if (o.type === "Timeout") w.u32(2);
      else if (o.type === "ReplyTooLarge") w.u32(3).u64(o.len);
      else w.u32(4).string(o.message);
      break;
    }
    case "MessageMemfd":
      w.u32(3).string(ev.topic).u64(ev.sequence).u64(ev.len);
      break;
  }
  return w.finish();
}

/**
 * Checks a subject (section 14): 1 to 255 bytes of UTF-8, `.`-separated
 * non-empty tokens; in a pattern `*` as a whole token and `>` as the whole
 * last token. Returns why it is not valid, or null.
 */
export function subjectProblem(subject: string, kind: "topic" | "pattern" | "name"): string | null {
  const len = Buffer.byteLength(subject, "utf8");
  if (!subject.isWellFormed()) return "is not valid Unicode";
  if (len === 0) return "is empty";
  if (len > 255) return `is ${len} bytes, over 255`;
  const tokens = subject.split(".");
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i] as string;
    if (t === "") return "has an empty token (a leading, trailing or doubled '.')";
    const wild = t.includes("*") || t.includes(">");
    if (!wild) continue;
    if (kind !== "pattern") return `has a wildcard ('*' or '>'), which only a pattern may have`;
    if (t === "*") continue;
    if (t === ">" && i === tokens.length - 1) continue;
    if (t === ">") return "has '>' before its last token";
    return `has a wildcard inside a longer token (${JSON.stringify(t.slice(0, 64))})`;
  }
  return null;
}
