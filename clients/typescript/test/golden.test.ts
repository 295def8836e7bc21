// The golden vectors of tests/vectors/golden.json (section 15): every vector
// encodes and decodes as the file says; every negative vector is refused.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";
import {
  DecodeError,
  FIRST_UNKNOWN_KIND,
  Kind,
  Reader,
  Writer,
  decodeDaemonFrame,
  decodeHubEvent,
  decodeHubReply,
  encodeDaemonFrame,
  encodeExpectBody,
  encodeHandshake,
  encodeHubEvent,
  encodeHubReply,
  encodeHubRequest,
  encodeRequestPayload,
  frame,
  errorFrameProblem,
  type DaemonFrame,
  type HubEvent,
  type HubReply,
  type HubRequest,
} from "../src/index.js";
import { REPO, raw, startDaemon, tokenOf, type Daemon } from "./helpers.js";

type J = unknown;

/** Puts every number outside a string in quotes, so that JSON.parse keeps all its digits. */
function quoteNumbers(src: string): string {
  let out = "";
  let inString = false;
  for (let i = 0; i < src.length; i++) {
    const c = src[i] as string;
    if (inString) {
      out += c;
      if (c === "\\") out += src[++i] ?? "";
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
      out += c;
    } else if (/[-0-9]/.test(c)) {
      let j = i;
      while (j < src.length && /[-0-9.eE+]/.test(src[j] as string)) j++;
      out += `"${src.slice(i, j)}"`;
      i = j - 1;
    } else out += c;
  }
  return out;
}
const text = fs.readFileSync(path.join(REPO, "tests/vectors/golden.json"), "utf8");
// Every integer as a string: instance_id (0x0123456789abcdef) is past 2^53.
const golden = JSON.parse(quoteNumbers(text)) as {
  test_token_hex: string;
  vectors: Array<Record<string, J> & { name: string; hex: string; direction: string }>;
  negative: Array<{
    name: string;
    hex: string;
    direction: string;
    error_code: string | null;
    error_id: string | null;
    closes: boolean;
    decided_after: string;
  }>;
};

/** Numbers and bigints as strings, Buffers as arrays of strings: the form of `golden` above. */
function norm(x: unknown): unknown {
  return JSON.parse(
    JSON.stringify(x, (_k, v: unknown) => {
      if (typeof v === "bigint" || typeof v === "number") return String(v);
      if (v !== null && typeof v === "object" && (v as { type?: unknown }).type === "Buffer") {
        return ((v as { data: number[] }).data ?? []).map(String);
      }
      return v;
    }),
  );
}

const bytes = (a: string[]): Buffer => Buffer.from(a.map(Number));
const big = (s: string): bigint => BigInt(s);

function hubRequest(j: J): HubRequest {
  if (typeof j === "string") return { type: j } as HubRequest;
  const [[name, v]] = Object.entries(j as Record<string, Record<string, J>>) as [[string, Record<string, J>]];
  switch (name) {
    case "Subscribe":
      return { type: "Subscribe", sid: big(v.sid as string), pattern: v.pattern as string, lag: v.lag as "Disconnect" };
    case "Unsubscribe":
      return { type: "Unsubscribe", sid: big(v.sid as string) };
    case "Publish":
      return { type: "Publish", topic: v.topic as string, payload: bytes(v.payload as string[]) };
    case "Serve":
    case "Unserve":
      return { type: name, name: v.name as string };
    case "PublishMemfd":
      return { type: "PublishMemfd", topic: v.topic as string };
    case "Request":
      return { type: "Request", name: v.name as string, timeoutMs: Number(v.timeout_ms), payload: bytes(v.payload as string[]) };
    case "Respond":
      return { type: "Respond", token: big(v.token as string), payload: bytes(v.payload as string[]) };
    case "Fail": {
      const [[fname, fv]] = Object.entries(v.failure as Record<string, Record<string, string>>) as [[string, Record<string, string>]];
      return {
        type: "Fail",
        token: big(v.token as string),
        failure: fname === "Failed" ? { type: "Failed", message: fv.message as string } : { type: "ReplyTooLarge", len: big(fv.len as string) },
      };
    }
  }
  throw new Error(`unknown request ${name}`);
}

/** Our decoded daemon frame in golden.json's serde form. */
function serde(fr: DaemonFrame): unknown {
  switch (fr.type) {
    case "Welcome": {
      const w = fr.welcome;
      return {
        Welcome: {
          connection_id: w.connectionId,
          instance_id: w.instanceId,
          max_frame_len: w.maxFrameLen,
          protocol_version: w.protocolVersion,
          service: w.service,
          service_version: w.serviceVersion,
          software_version: w.softwareVersion,
        },
      };
    }
    case "Ack":
      return { Ack: { id: fr.id } };
    case "Error":
      return { Error: { code: fr.code, id: fr.id, message: fr.message } };
    case "Closing":
      return { Closing: fr.reason };
    case "Lagged":
      return { Lagged: { missed: fr.missed, stream: fr.stream } };
    case "Reply":
      return { Reply: { id: fr.id, reply: serdeReply(decodeHubReply(fr.body)) } };
    case "Event":
      return { Event: { event: serdeEvent(decodeHubEvent(fr.body)), stream: fr.stream } };
    // Section 19's frames, in golden.json's form ("frame" in its conventions): the fds count is a
    // field; the descriptors themselves are not in the bytes (section 15).
    case "ReplyFds":
      return { ReplyFds: { fds: fr.fds, id: fr.id, reply: serdeReply(decodeHubReply(fr.body)) } };
    case "EventFds":
      return { EventFds: { event: serdeEvent(decodeHubEvent(fr.body)), fds: fr.fds, stream: fr.stream } };
  }
}

function serdeReply(r: HubReply): unknown {
  switch (r.type) {
    case "Status": {
      const s = r.status;
      return {
        Status: {
          authenticated: s.authenticated,
          names: s.names,
          pending: s.pending,
          requests_in_flight: s.requestsInFlight,
          subscriptions: s.subscriptions,
          topics: s.topics,
          uptime_ms: s.uptimeMs,
          version: s.version,
        },
      };
    }
    case "Published":
      return { Published: { receivers: r.receivers } };
    case "Responded":
      return { Responded: { delivered: r.delivered } };
    case "Topics":
      return { Topics: { names: r.names, patterns: r.patterns, truncated: r.truncated } };
    default:
      return r.type;
  }
}

function serdeEvent(e: HubEvent): unknown {
  switch (e.type) {
    case "Message":
      return { Message: { payload: e.payload, sequence: e.sequence, topic: e.topic } };
    case "Request":
      return { Request: { name: e.name, payload: e.payload, pid: e.pid, token: e.token, uid: e.uid } };
    case "Response": {
      const o = e.outcome;
      const outcome =
        o.type === "Reply"
          ? { Reply: { payload: o.payload } }
          : o.type === "ReplyTooLarge"
            ? { ReplyTooLarge: { len: o.len } }
            : o.type === "Failed"
              ? { Failed: { message: o.message } }
              : o.type;
      return { Response: { outcome, request: e.request } };
    }
    case "MessageMemfd":
      return { MessageMemfd: { len: e.len, sequence: e.sequence, topic: e.topic } };
  }
}

/** Re-encodes a decoded frame, service bodies included, from the typed values. */
function reencode(fr: DaemonFrame): Buffer {
  if (fr.type === "Reply") return encodeDaemonFrame({ ...fr, body: encodeHubReply(decodeHubReply(fr.body)) });
  if (fr.type === "Event") return encodeDaemonFrame({ ...fr, body: encodeHubEvent(decodeHubEvent(fr.body)) });
  if (fr.type === "ReplyFds") return encodeDaemonFrame({ ...fr, body: encodeHubReply(decodeHubReply(fr.body)) });
  if (fr.type === "EventFds") return encodeDaemonFrame({ ...fr, body: encodeHubEvent(decodeHubEvent(fr.body)) });
  return encodeDaemonFrame(fr);
}

describe("golden vectors", () => {
  test("the file has the vectors section 15 names", () => {
    assert.ok(golden.vectors.length >= 60, `only ${golden.vectors.length} vectors`);
    assert.equal(golden.negative.length, 19);
    assert.equal(golden.test_token_hex, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
  });

  for (const v of golden.vectors) {
    test(`${v.name}: ${v.direction === "daemon_to_client" ? "decodes to the file's value and encodes back" : "encodes to the file's bytes"}`, () => {
      const want = Buffer.from(v.hex, "hex");
      if (v.direction === "handshake") {
        const h = v.handshake as { magic: string; protocol_version: string; token_hex: string };
        assert.equal(h.magic, "KYHL");
        assert.equal(encodeHandshake(Buffer.from(h.token_hex, "hex"), Number(h.protocol_version)).toString("hex"), v.hex);
      } else if (v.direction === "client_to_daemon") {
        const r = v.request as {
          id: string;
          kind: keyof typeof Kind;
          call?: J;
          fds?: string;
          expect?: { service: string; service_version: string };
        };
        assert.equal(r.call !== undefined, r.kind === "Call" || r.kind === "CallFds", "call: only for a Call or a CallFds");
        assert.equal(r.fds !== undefined, r.kind === "CallFds", "fds: only for a CallFds");
        let body: Buffer = Buffer.alloc(0);
        if (r.kind === "Call") body = encodeHubRequest(hubRequest(r.call));
        if (r.kind === "Expect") body = encodeExpectBody(r.expect!.service, Number(r.expect!.service_version));
        if (r.kind === "CallFds") {
          // This client never sends a CallFds (Node.js cannot pass descriptors, section 19), so it has
          // no encoder of one: the test builds the body from section 6's table, `fds: u32` then the
          // service's request to the end of the payload. The descriptors are not in the bytes: they
          // travel as SCM_RIGHTS with the frame's first byte (sections 15 and 19.2).
          body = Buffer.concat([new Writer().u32(Number(r.fds), "fds").finish(), encodeHubRequest(hubRequest(r.call))]);
        }
        assert.equal(frame(encodeRequestPayload(big(r.id), Kind[r.kind], body)).toString("hex"), v.hex);
        // And read back by section 6: the 12-byte header, then the body of its kind.
        assert.equal(want.readUInt32LE(0), want.length - 4, "the length prefix counts the payload only");
        const rd = new Reader(want.subarray(4));
        assert.equal(rd.u64("id"), big(r.id));
        assert.equal(rd.u32("kind"), Kind[r.kind]);
        if (r.kind === "Ping" || r.kind === "Shutdown" || r.kind === "AcceptFds") {
          assert.equal(want.length, 16, `a ${r.kind} is exactly its 12-byte header`);
        }
        if (r.kind === "CallFds") {
          const fds = rd.u32("fds");
          assert.equal(String(fds), r.fds);
          assert.ok(fds >= 1 && fds <= 8, "a CallFds announces 1 to 8 descriptors (section 6)");
          assert.deepEqual(want.subarray(4 + 16), encodeHubRequest(hubRequest(r.call)), "then the hub request, to the end");
        }
      } else {
        assert.equal(want.readUInt32LE(0), want.length - 4, "the length prefix counts the payload only");
        const fr = decodeDaemonFrame(want.subarray(4));
        assert.deepEqual(norm(serde(fr)), v.frame);
        assert.equal(reencode(fr).toString("hex"), v.hex);
        // Tags 7 and 8 decode from their bytes alone (the descriptors are beside them, section 15),
        // though this client, which never sends AcceptFds, refuses them on a connection (section 7).
        if (fr.type === "ReplyFds" || fr.type === "EventFds") {
          assert.ok(fr.fds >= 1 && fr.fds <= 8, "a frame with descriptors announces 1 to 8 (section 19.2)");
        }
        if (fr.type === "EventFds") {
          // Section 13: an EventFds of the hub carries only a MessageMemfd, with exactly one descriptor.
          assert.equal(fr.fds, 1);
          assert.equal(decodeHubEvent(fr.body).type, "MessageMemfd");
        }
        if (fr.type === "Event") assert.notEqual(decodeHubEvent(fr.body).type, "MessageMemfd", "a MessageMemfd is never a plain Event");
      }
    });
  }

  test("there is a vector of every request kind and every daemon frame", () => {
    const kinds = new Set(golden.vectors.filter((v) => v.direction === "client_to_daemon").map((v) => (v.request as { kind: string }).kind));
    const allKinds = Object.keys(Kind).filter((k) => Number.isNaN(Number(k)));
    assert.deepEqual([...kinds].sort(), allKinds.sort());
    assert.equal(allKinds.length, FIRST_UNKNOWN_KIND, "kinds 0 to 5; 6 is the first undefined one");
    const frames = new Set(golden.vectors.filter((v) => v.direction === "daemon_to_client").map((v) => Object.keys(v.frame as object)[0]));
    assert.deepEqual(
      [...frames].sort(),
      ["Ack", "Closing", "Error", "Event", "EventFds", "Lagged", "Reply", "ReplyFds", "Welcome"],
    );
  });

  for (const n of golden.negative.filter((x) => x.direction === "daemon_to_client")) {
    test(`${n.name}: the client refuses it (${n.decided_after} bytes decide)`, () => {
      const b = Buffer.from(n.hex, "hex");
      assert.equal(b.length, Number(n.decided_after));
      let refused = false;
      try {
        const fr = decodeDaemonFrame(b.subarray(4));
        if (fr.type === "Reply") decodeHubReply(fr.body);
        if (fr.type === "Event") decodeHubEvent(fr.body);
        // Decodes, but a transport code below 1000 that is not in the table, or an id presence that
        // contradicts it, is a protocol error (sections 7 and 8).
        if (fr.type === "Error" && errorFrameProblem(fr.code, fr.id) !== null) refused = true;
        // Tags 7 and 8 decode, but this client never sends AcceptFds: a protocol error (sections 7, 19.4).
        if (fr.type === "ReplyFds" || fr.type === "EventFds") refused = true;
      } catch (e) {
        assert.ok(e instanceof DecodeError, String(e));
        refused = true;
      }
      assert.ok(refused, `${n.name} was accepted`);
    });
  }
});

describe("negative vectors against the real daemon", () => {
  let d: Daemon;
  before(async () => {
    d = await startDaemon();
  });
  after(async () => {
    await d.stop();
  });

  for (const n of golden.negative.filter((x) => x.direction !== "daemon_to_client")) {
    test(`${n.name}: the daemon answers error ${n.error_code} (id ${n.error_id ?? "absent"})${n.closes ? " and closes" : ", and the connection stays open"}`, async () => {
      const sock = path.join(d.dir, "keyhole.sock");
      const bad = Buffer.from(n.hex, "hex");
      const parts: Buffer[] = [];
      if (n.direction === "client_to_daemon") {
        const hs = encodeHandshake(tokenOf(d));
        parts.push(hs);
      }
      parts.push(bad);
      // A Ping after it: answered only if the connection stays open.
      const ping = frame(encodeRequestPayload(99n, Kind.Ping));
      if (!n.closes) parts.push(ping);
      const { frames, ended } = await raw(sock, parts, { waitMs: n.closes ? 3000 : 700 });
      const rest = n.direction === "client_to_daemon" ? frames.slice(1) : frames;
      if (n.direction === "client_to_daemon") assert.equal(frames[0]?.type, "Welcome");
      const err = rest[0];
      assert.ok(err !== undefined && err.type === "Error", `no Error: ${JSON.stringify(norm(frames))}`);
      assert.equal(String(err.code), n.error_code);
      assert.equal(err.id === null ? null : String(err.id), n.error_id);
      if (n.closes) {
        assert.equal(rest.length, 1, "nothing follows an error that closes");
        assert.ok(ended === "eof" || ended === "econnreset", "the connection ended");
      } else {
        assert.deepEqual(rest[1], { type: "Ack", id: 99n });
        assert.equal(ended, null);
      }
    });
  }
});
