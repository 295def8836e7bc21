// The golden vectors of tests/vectors/golden.json (section 15): every vector
// encodes and decodes as the file says; every negative vector is refused.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";
import {
  DecodeError,
  Kind,
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
    // Section 19's frames: golden.json has no vector of them yet; this is a guess at its form.
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
        const r = v.request as { id: string; kind: keyof typeof Kind; call?: J; expect?: { service: string; service_version: string } };
        let body: Buffer = Buffer.alloc(0);
        if (r.kind === "Call") body = encodeHubRequest(hubRequest(r.call));
        if (r.kind === "Expect") body = encodeExpectBody(r.expect!.service, Number(r.expect!.service_version));
        assert.equal(frame(encodeRequestPayload(big(r.id), Kind[r.kind], body)).toString("hex"), v.hex);
      } else {
        assert.equal(want.readUInt32LE(0), want.length - 4, "the length prefix counts the payload only");
        const fr = decodeDaemonFrame(want.subarray(4));
        assert.deepEqual(norm(serde(fr)), v.frame);
        assert.equal(reencode(fr).toString("hex"), v.hex);
      }
    });
  }

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
