// The transport of Part I of proto-spec.md: the handshake (section 4), the
// client's request frames (section 6) and the daemon's frames (section 7).
// The frames of section 19 (file descriptors) are in the tables, but this
// client never opts in to descriptors: Node.js's standard library cannot
// pass them (no sendmsg/recvmsg with SCM_RIGHTS).

import { DecodeError, Reader, Writer, toU64 } from "./codec.js";

export const MAGIC = Buffer.from("KYHL", "ascii");
export const PROTOCOL_VERSION = 2;
export const HANDSHAKE_PAYLOAD_LEN = 40;
export const TOKEN_LEN = 32;
/** The protocol ceiling and the receive limit before Welcome (section 10). */
export const MAX_FRAME_CEILING = 16_777_216;
/** The smallest frame limit a daemon may announce; the most a request pipelined before Welcome may carry. */
export const MIN_FRAME_LIMIT = 1024;
export const REQUEST_HEADER_LEN = 12;

/** Request kinds (section 6). */
export enum Kind {
  Call = 0,
  Ping = 1,
  Shutdown = 2,
  Expect = 3,
  /** Opts in to file descriptors (section 19). This client never sends it: Node.js cannot pass descriptors. */
  AcceptFds = 4,
  /** A Call whose frame carries descriptors (section 19). This client never sends it. */
  CallFds = 5,
}
/** Request kinds of 6 or more are answered Error UnknownRequest (section 6). */
export const FIRST_UNKNOWN_KIND = 6;

/** Daemon frame tags (section 7). */
export enum FrameTag {
  Welcome = 0,
  Reply = 1,
  Event = 2,
  Ack = 3,
  Error = 4,
  Closing = 5,
  Lagged = 6,
  /** A Reply carrying descriptors: only to a connection that sent AcceptFds (section 19). */
  ReplyFds = 7,
  /** An Event carrying descriptors: only to a connection that sent AcceptFds (section 19). */
  EventFds = 8,
}

export type CloseReason = "Shutdown" | "SlowConsumer";

export interface Welcome {
  protocolVersion: number;
  service: string;
  serviceVersion: number;
  softwareVersion: string;
  instanceId: bigint;
  connectionId: bigint;
  maxFrameLen: number;
}

export type DaemonFrame =
  | { type: "Welcome"; welcome: Welcome }
  | { type: "Reply"; id: bigint; body: Buffer }
  | { type: "Event"; stream: bigint; body: Buffer }
  | { type: "Ack"; id: bigint }
  | { type: "Error"; id: bigint | null; code: number; message: string }
  | { type: "Closing"; reason: CloseReason }
  | { type: "Lagged"; stream: bigint; missed: bigint }
  // Tags 7 and 8 (section 19): decoded so that their layout is known, but a protocol error on every
  // connection of this client, which never sends AcceptFds (section 7).
  | { type: "ReplyFds"; id: bigint; fds: number; body: Buffer }
  | { type: "EventFds"; stream: bigint; fds: number; body: Buffer };

/** Builds the 44-byte handshake frame. The caller zeroes it once it is written. */
export function encodeHandshake(token: Uint8Array, version = PROTOCOL_VERSION): Buffer {
  if (token.length !== TOKEN_LEN) throw new RangeError(`the token is ${TOKEN_LEN} bytes, not ${token.length}`);
  const frame = Buffer.alloc(4 + HANDSHAKE_PAYLOAD_LEN);
  frame.writeUInt32LE(HANDSHAKE_PAYLOAD_LEN, 0);
  MAGIC.copy(frame, 4);
  frame.writeUInt32LE(version, 8);
  frame.set(token, 12);
  return frame;
}

/** Prefixes a payload with its u32 little-endian length. */
export function frame(payload: Buffer): Buffer {
  const out = Buffer.allocUnsafe(4 + payload.length);
  out.writeUInt32LE(payload.length, 0);
  payload.copy(out, 4);
  return out;
}

/** The payload of a request: id, kind, body (section 6). */
export function encodeRequestPayload(id: bigint | number, kind: Kind, body: Buffer = Buffer.alloc(0)): Buffer {
  const w = new Writer().u64(toU64(id, "request id")).u32(kind);
  w.raw(body);
  return w.finish();
}

export function encodeExpectBody(service: string, serviceVersion: number): Buffer {
  return new Writer().string(service).u32(serviceVersion, "service_version").finish();
}

/** Decodes one daemon frame's payload strictly. Service bodies (Reply, Event) are returned raw for the service's decoder. */
export function decodeDaemonFrame(payload: Buffer): DaemonFrame {
  const r = new Reader(payload);
  const tag = r.u32("frame tag");
  let f: DaemonFrame;
  switch (tag) {
    case FrameTag.Welcome: {
      const welcome: Welcome = {
        protocolVersion: r.u32("protocol_version"),
        service: r.string("service"),
        serviceVersion: r.u32("service_version"),
        softwareVersion: r.string("software_version"),
        instanceId: r.u64("instance_id"),
        connectionId: r.u64("connection_id"),
        maxFrameLen: r.u32("max_frame_len"),
      };
      f = { type: "Welcome", welcome };
      break;
    }
    case FrameTag.Reply:
      f = { type: "Reply", id: r.u64("id"), body: r.rest() };
      break;
    case FrameTag.Event:
      f = { type: "Event", stream: r.u64("stream"), body: r.rest() };
      break;
    case FrameTag.Ack:
      f = { type: "Ack", id: r.u64("id") };
      break;
    case FrameTag.Error:
      f = { type: "Error", id: r.optionU64("id"), code: r.u32("code"), message: r.string("message") };
      break;
    case FrameTag.Closing: {
      const reason = r.u32("close reason");
      if (reason === 0) f = { type: "Closing", reason: "Shutdown" };
      else if (reason === 1) f = { type: "Closing", reason: "SlowConsumer" };
      else throw new DecodeError(`unknown close reason ${reason}`);
      break;
    }
    case FrameTag.Lagged:
      f = { type: "Lagged", stream: r.u64("stream"), missed: r.u64("missed") };
      break;
    case FrameTag.ReplyFds:
      f = { type: "ReplyFds", id: r.u64("id"), fds: r.u32("fds"), body: r.rest() };
      break;
    case FrameTag.EventFds:
      f = { type: "EventFds", stream: r.u64("stream"), fds: r.u32("fds"), body: r.rest() };
      break;
    default:
      throw new DecodeError(`unknown daemon frame tag ${tag}`);
  }
  r.end("daemon frame");
  return f;
}

/** Encodes a daemon frame (for fake daemons in tests and for round trips). */
export function encodeDaemonFrame(f: DaemonFrame): Buffer {
  const w = new Writer();
  switch (f.type) {
    case "Welcome": {
      const x = f.welcome;
      w.u32(FrameTag.Welcome).u32(x.protocolVersion).string(x.service).u32(x.serviceVersion);
      w.string(x.softwareVersion).u64(x.instanceId).u64(x.connectionId).u32(x.maxFrameLen);
      break;
    }
    case "Reply":
      w.u32(FrameTag.Reply).u64(f.id).raw(f.body);
      break;
    case "Event":
      w.u32(FrameTag.Event).u64(f.stream).raw(f.body);
      break;
    case "Ack":
      w.u32(FrameTag.Ack).u64(f.id);
      break;
    case "Error":
      w.u32(FrameTag.Error).optionU64(f.id).u32(f.code).string(f.message);
      break;
    case "Closing":
      w.u32(FrameTag.Closing).u32(f.reason === "Shutdown" ? 0 : 1);
      break;
    case "Lagged":
      w.u32(FrameTag.Lagged).u64(f.stream).u64(f.missed);
      break;
    case "ReplyFds":
      w.u32(FrameTag.ReplyFds).u64(f.id).u32(f.fds).raw(f.body);
      break;
    case "EventFds":
      w.u32(FrameTag.EventFds).u64(f.stream).u32(f.fds).raw(f.body);
      break;
  }
  return frame(w.finish());
}
