// Scripted fake daemons: the protocol errors of sections 4 and 7, split
// frames, the end of a connection, and the final frame kept when a write fails.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";
import {
  BadMemfdError,
  ConnectionClosedError,
  DescriptorMismatchError,
  DescriptorsNotAcceptedError,
  HubClient,
  NoRespondersError,
  OverBudgetError,
  ProtocolError,
  encodeHubEvent,
  encodeHubReply,
  type DaemonFrame,
} from "../src/index.js";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { HELLO_LEN, TEST_TOKEN_HEX, f, fakeDaemon, hex, tmpdir, welcome, type Fake, type FakeConn } from "./helpers.js";

let fake: Fake | null = null;
afterEach(async () => {
  await fake?.close();
  fake = null;
});

const ackExpect = f({ type: "Ack", id: 0n });

/** A fake that answers the handshake and Expect, then runs `then`. */
async function hub(then: (c: FakeConn) => void | Promise<void>, first: Buffer = Buffer.concat([welcome(), ackExpect])): Promise<HubClient> {
  fake = await fakeDaemon(async (c) => {
    await c.bytes(HELLO_LEN);
    c.write(first);
    await then(c);
  });
  return HubClient.connect({ env: fake.env, connectTimeoutMs: 3000 });
}

async function protocolClose(client: HubClient, pending: Promise<unknown> | null = null): Promise<ProtocolError> {
  if (pending !== null) {
    await assert.rejects(pending, (e: unknown) => e instanceof ConnectionClosedError && e.reason.kind === "protocol");
  }
  const closed = await client.closed;
  assert.equal(closed.reason.kind, "protocol", closed.message);
  return (closed.reason as { error: ProtocolError }).error;
}

const reply = (id: bigint, body: Buffer): Buffer => f({ type: "Reply", id, body });

describe("fake daemon: protocol errors (section 7)", () => {
  test("a second Welcome closes the connection as a protocol error", async () => {
    const c = await hub((c) => c.write(welcome()));
    assert.match((await protocolClose(c)).message, /second Welcome/);
  });

  test("an Ack when no request is outstanding is a protocol error", async () => {
    const c = await hub((c) => c.write(f({ type: "Ack", id: 1n })));
    assert.match((await protocolClose(c)).message, /no request was outstanding/);
  });

  test("a reply whose id is not the oldest outstanding request's is a protocol error (replies are matched in order, not by arrival)", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 32);
      c.write(f({ type: "Ack", id: 2n }));
    });
    const p1 = c.ping();
    const p2 = c.ping();
    await assert.rejects(p2);
    assert.match((await protocolClose(c, p1)).message, /oldest outstanding request is 1/);
  });

  test("a Reply to a Ping is a protocol error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 16);
      c.write(reply(1n, encodeHubReply({ type: "Serving" })));
    });
    assert.match((await protocolClose(c, c.ping())).message, /answered a Ping .* with a Reply/);
  });

  test("an Ack to a Call is a protocol error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 20);
      c.write(f({ type: "Ack", id: 1n }));
    });
    assert.match((await protocolClose(c, c.status())).message, /answered a Call .* with an Ack/);
  });

  test("a reply of the wrong kind (Published to a Status) is a protocol error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 20);
      c.write(reply(1n, encodeHubReply({ type: "Published", receivers: 1n })));
    });
    assert.match((await protocolClose(c, c.status())).message, /answered a Status with Published/);
  });

  for (const [what, frame] of [
    ["BadToken (3) with an id", { type: "Error", id: 1n, code: 3, message: "x" }],
    ["UnknownRequest (10) without an id", { type: "Error", id: null, code: 10, message: "x" }],
    ["a hub code (1004) without an id", { type: "Error", id: null, code: 1004, message: "x" }],
    ["an undefined transport code (20)", { type: "Error", id: 1n, code: 20, message: "x" }],
    ["DescriptorsNotAccepted (17) without an id", { type: "Error", id: null, code: 17, message: "x" }],
    ["DescriptorMismatch (18) with an id", { type: "Error", id: 1n, code: 18, message: "x" }],
    ["TooManyDescriptors (19) with an id", { type: "Error", id: 1n, code: 19, message: "x" }],
    ["BadMemfd (1008) without an id", { type: "Error", id: null, code: 1008, message: "x" }],
  ] as Array<[string, DaemonFrame]>) {
    test(`an Error of ${what} is a protocol error`, async () => {
      const c = await hub(async (c) => {
        await c.bytes(HELLO_LEN + 16);
        c.write(f(frame));
      });
      await protocolClose(c, c.ping());
    });
  }

  test("the codes of section 19 are typed: DescriptorsNotAccepted (17) with an id fails its request only; DescriptorMismatch (18) without one closes", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 16);
      c.write(f({ type: "Error", id: 1n, code: 17, message: "descriptors not accepted" }));
      await c.bytes(HELLO_LEN + 32);
      c.write(f({ type: "Error", id: null, code: 18, message: "mismatch" }));
    });
    await assert.rejects(c.ping(), (e: unknown) => e instanceof DescriptorsNotAcceptedError && e.id === 1n && e.codeName === "DescriptorsNotAccepted");
    await assert.rejects(c.ping(), (e: unknown) => e instanceof ConnectionClosedError && e.reason.kind === "error" && e.reason.error instanceof DescriptorMismatchError);
  });

  test("BadMemfd (1008) is a typed hub error that fails its request only", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 20);
      c.write(f({ type: "Error", id: 1n, code: 1008, message: "not a sealed memfd" }));
      await c.bytes(HELLO_LEN + 36);
      c.write(f({ type: "Ack", id: 2n }));
    });
    await assert.rejects(c.status(), (e: unknown) => e instanceof BadMemfdError && e.code === 1008 && e.codeName === "hub.BadMemfd");
    await c.ping();
    await c.close();
  });

  test("an Error with the id of the request fails that request only, typed by its code", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 24);
      c.write(f({ type: "Error", id: 1n, code: 1004, message: "nobody" }));
      await c.bytes(HELLO_LEN + 46 + 16);
      c.write(f({ type: "Ack", id: 2n }));
    });
    await assert.rejects(c.request("svc.x", "p"), (e: unknown) => e instanceof NoRespondersError && e.code === 1004 && e.id === 1n);
    await c.ping();
    await c.close();
  });

  test("Lagged for stream 0, of 0 events, or for a Disconnect subscription is a protocol error", async () => {
    for (const lag of [
      { type: "Lagged", stream: 0n, missed: 1n },
      { type: "Lagged", stream: 1n, missed: 0n },
      { type: "Lagged", stream: 1n, missed: 3n },
    ] as DaemonFrame[]) {
      const c = await hub(async (c) => {
        await c.bytes(HELLO_LEN + 38);
        c.write(reply(1n, encodeHubReply({ type: "Subscribed" })));
        c.write(f(lag));
      });
      await c.subscribe("a.b");
      await protocolClose(c);
      await fake?.close();
      fake = null;
    }
  });

  test("Lagged of a DropOldest subscription is delivered to it as a loss", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 38);
      c.write(reply(1n, encodeHubReply({ type: "Subscribed" })));
      c.write(f({ type: "Lagged", stream: 1n, missed: 17n }));
    });
    const sub = await c.subscribe("a.b", { lag: "DropOldest" });
    assert.deepEqual(await sub.next(), { type: "Lagged", missed: 17n });
    await c.close();
  });

  test("a Message on a stream that is not a subscription, and a Request event on a stream other than 0, are protocol errors", async () => {
    let c = await hub((c) => c.write(f({ type: "Event", stream: 5n, body: encodeHubEvent({ type: "Message", topic: "a", sequence: 1n, payload: Buffer.alloc(0) }) })));
    assert.match((await protocolClose(c)).message, /stream 5, which is not a subscription/);
    await fake?.close();
    c = await hub((c) =>
      c.write(f({ type: "Event", stream: 3n, body: encodeHubEvent({ type: "Request", token: 1n, name: "a", uid: 0, pid: 0, payload: Buffer.alloc(0) }) })),
    );
    assert.match((await protocolClose(c)).message, /Request event on stream 3/);
  });

  // Section 19: this client never sends AcceptFds, so a frame of tag 7 or 8 is a protocol error
  // (section 7), whatever it holds; and a MessageMemfd in a plain Event is one for a hub client (19.5).
  test("a ReplyFds (tag 7) answering a Ping, to a client that never sent AcceptFds, is a protocol error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 16);
      c.write(f({ type: "ReplyFds", id: 1n, fds: 1, body: encodeHubReply({ type: "Published", receivers: 1n }) }));
    });
    assert.match((await protocolClose(c, c.ping())).message, /ReplyFds .* did not send AcceptFds/);
  });

  test("a ReplyFds (tag 7) answering a Call, with its exact reply kind, is a protocol error too", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 20);
      c.write(f({ type: "ReplyFds", id: 1n, fds: 1, body: encodeHubReply({ type: "Topics", patterns: [], names: [], truncated: false }) }));
    });
    assert.match((await protocolClose(c, c.topics())).message, /ReplyFds .* did not send AcceptFds/);
  });

  test("an EventFds (tag 8) carrying a MessageMemfd for a subscription is a protocol error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 38);
      c.write(reply(1n, encodeHubReply({ type: "Subscribed" })));
      c.write(f({ type: "EventFds", stream: 1n, fds: 1, body: encodeHubEvent({ type: "MessageMemfd", topic: "a.b", sequence: 1n, len: 5n }) }));
    });
    const sub = await c.subscribe("a.b");
    await assert.rejects(sub.next(), (e: unknown) => e instanceof ConnectionClosedError && e.reason.kind === "protocol");
    assert.match((await protocolClose(c)).message, /EventFds .* did not send AcceptFds/);
  });

  test("the raw bytes of a ReplyFds (tag 7) and an EventFds (tag 8), even with no descriptor announced, are protocol errors", async () => {
    for (const bytes of ["1c000000 07000000 0100000000000000 00000000 03000000 0100000000000000", "14000000 08000000 0100000000000000 01000000 03000000"]) {
      const c = await hub((c) => c.write(hex(bytes)));
      await protocolClose(c);
      await fake?.close();
      fake = null;
    }
  });

  test("a MessageMemfd (hub event tag 3) in a plain Event frame is a protocol error (section 19.5)", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 38);
      c.write(reply(1n, encodeHubReply({ type: "Subscribed" })));
      c.write(f({ type: "Event", stream: 1n, body: encodeHubEvent({ type: "MessageMemfd", topic: "a.b", sequence: 1n, len: 5n }) }));
    });
    const sub = await c.subscribe("a.b");
    await assert.rejects(sub.next(), (e: unknown) => e instanceof ConnectionClosedError && e.reason.kind === "protocol");
    assert.match((await protocolClose(c)).message, /MessageMemfd .* plain Event/);
  });

  test("an Event of a subscription with hub event tag 4, which does not exist, is a protocol error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 38);
      c.write(reply(1n, encodeHubReply({ type: "Subscribed" })));
      c.write(f({ type: "Event", stream: 1n, body: hex("04000000") }));
    });
    await c.subscribe("a.b");
    assert.match((await protocolClose(c)).message, /unknown hub event tag 4/);
  });

  test("an event the hub's decoder rejects (trailing byte) is a protocol error", async () => {
    const body = Buffer.concat([encodeHubEvent({ type: "Response", request: 1n, outcome: { type: "Timeout" } }), Buffer.from([0])]);
    const c = await hub((c) => c.write(f({ type: "Event", stream: 0n, body })));
    assert.match((await protocolClose(c)).message, /left over/);
  });

  for (const [name, bytes] of [
    ["server_unknown_tag (tag 7 is now ReplyFds; this one is cut short)", "0400000007000000"],
    ["a daemon frame of tag 9, the first undefined one", "0400000009000000"],
    ["server_bad_option_tag", "19000000040000000209000000000000000a0000000000000000000000"],
    ["server_unknown_error_code (17 is now DescriptorsNotAccepted, which carries an id: refused for its id presence)", "110000000400000000110000000000000000000000"],
    ["an Error of transport code 20, the first undefined one", "110000000400000000140000000000000000000000"],
    ["server_unknown_close_reason", "080000000500000002000000"],
  ] as const) {
    test(`the negative vector ${name} after Welcome closes the connection as a protocol error`, async () => {
      const c = await hub((c) => c.write(hex(bytes)));
      await protocolClose(c);
    });
  }

  test("server_reply_trailing_byte: a Reply with a byte after the hub reply is a protocol error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 36);
      c.write(hex("19000000 01000000 0100000000000000 03000000 0200000000000000 00"));
    });
    await protocolClose(c, c.publish("news.local", "hello"));
  });

  test("a length prefix over the announced max_frame_len is refused after its 4 bytes, without waiting for the payload", async () => {
    const c = await hub(async (c) => {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(1025);
      c.write(b); // and nothing more
    }, Buffer.concat([welcome({ maxFrameLen: 1024 }), ackExpect]));
    const t0 = Date.now();
    assert.match((await protocolClose(c)).message, /1025 bytes, over the limit of 1024/);
    assert.ok(Date.now() - t0 < 1000);
  });
});

describe("fake daemon: the first frame (section 4)", () => {
  for (const [what, first, pattern] of [
    ["a Welcome with max_frame_len 1023", welcome({ maxFrameLen: 1023 }), /frame limit of 1023/],
    ["a Welcome with max_frame_len 16777217", welcome({ maxFrameLen: 16_777_217 }), /frame limit of 16777217/],
    ["a Welcome of protocol version 3", welcome({ protocolVersion: 3 }), /protocol version 3/],
    ["an Ack", f({ type: "Ack", id: 0n }), /first frame is an Ack/],
    ["an Error with an id", f({ type: "Error", id: 0n, code: 10, message: "x" }), /first frame is an Error with code 10 and id 0/],
    ["an Error FrameTooLarge (not a code of a pending connection)", f({ type: "Error", id: null, code: 8, message: "x" }), /code 8/],
    ["a Closing", f({ type: "Closing", reason: "Shutdown" }), /first frame is a Closing/],
  ] as Array<[string, Buffer, RegExp]>) {
    test(`${what} as the first frame fails connect() with a ProtocolError`, async () => {
      await assert.rejects(
        hub(() => undefined, first),
        (e: unknown) => e instanceof ProtocolError && pattern.test(e.message),
      );
    });
  }

  test("a Welcome of another service fails connect() naming both services", async () => {
    await assert.rejects(
      hub(() => undefined, welcome({ service: "notes", serviceVersion: 1 })),
      /the daemon serves "notes" version 1, not "hub" version 2/,
    );
  });

  test("the end of the connection before any frame is a refusal, not a hang", async () => {
    fake = await fakeDaemon(async (c) => {
      await c.bytes(44);
      c.socket.end();
    });
    await assert.rejects(HubClient.connect({ env: fake.env }), (e: unknown) => e instanceof ConnectionClosedError && /before answering the handshake/.test(e.message));
  });

  test("the client sends the handshake, then Expect hub v2, in its first write, and nothing before", async () => {
    const c = await hub(() => undefined);
    const got = fake!.received[0]!;
    assert.equal(
      got.subarray(0, HELLO_LEN).toString("hex"),
      "280000004b59484c02000000000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f" +
        "1b000000000000000000000003000000030000000000000068756202000000",
    );
    await c.close();
  });
});

describe("fake daemon: framing and the end of the connection", () => {
  test("frames split across reads, one byte at a time, are reassembled; several frames in one read are split", async () => {
    const all = Buffer.concat([welcome(), ackExpect]);
    fake = await fakeDaemon(async (c) => {
      await c.bytes(HELLO_LEN);
      for (const b of all) {
        c.write(Buffer.from([b]));
        await new Promise((r) => setImmediate(r));
      }
      await c.bytes(HELLO_LEN + 48);
      c.write(Buffer.concat([f({ type: "Ack", id: 1n }), f({ type: "Ack", id: 2n }), f({ type: "Ack", id: 3n })]));
    });
    const c = await HubClient.connect({ env: fake.env });
    assert.equal(c.welcome.softwareVersion, "fake");
    await Promise.all([c.ping(), c.ping(), c.ping()]);
    await c.close();
  });

  test("the end of the connection in the middle of a frame is the end of the connection, not a protocol error", async () => {
    const c = await hub((c) => {
      c.write(hex("20000000 02000000"));
      c.socket.end();
    });
    const closed = await c.closed;
    assert.equal(closed.reason.kind, "dropped");
    assert.equal(closed.transport, "eof");
  });

  test("Closing{SlowConsumer}: outstanding requests fail with it, and the end is read as end of stream", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 16);
      c.write(f({ type: "Closing", reason: "SlowConsumer" }));
      c.socket.end();
    });
    await assert.rejects(c.ping(), (e: unknown) => e instanceof ConnectionClosedError && e.reason.kind === "closing" && e.reason.reason === "SlowConsumer");
    const closed = await c.closed;
    assert.equal(closed.transport, "eof");
  });

  test("a frame after the final frame is a protocol error", async () => {
    const c = await hub((c) => c.write(Buffer.concat([f({ type: "Closing", reason: "Shutdown" }), f({ type: "Ack", id: 1n })])));
    assert.match((await protocolClose(c)).message, /after its final frame/);
  });

  test("a final Error followed by a reset (ECONNRESET: the fake closes with our bytes unread) is reported by the Error", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 16);
      c.write(f({ type: "Error", id: null, code: 15, message: "over budget" }));
      c.socket.destroy();
    });
    const p = c.ping();
    void c.ping().catch(() => undefined);
    await assert.rejects(p, (e: unknown) => e instanceof ConnectionClosedError && e.reason.kind === "error" && e.reason.error instanceof OverBudgetError);
    const closed = await c.closed;
    assert.ok(closed.transport === "econnreset" || closed.transport === "eof", String(closed.transport));
  });

  // The kit's step shutdown once received the tail of write_fails_after_final_frame's 4 MiB Publish after
  // its handshake: Node closed the first socket on ECONNRESET while the writer waited out EAGAIN, the
  // next socket got the same descriptor number, and the writer's retry wrote the rest into it. The fake
  // runs in a process of its own, as the kit does: in this one its timers would run beside the writer's.
  test("what was not written when a connection ends never reaches the next connection (which may get the same descriptor)", async () => {
    const dir = tmpdir();
    const socketPath = path.join(dir, "keyhole.sock");
    const first = Buffer.concat([welcome(), ackExpect]);
    const error = f({ type: "Error", id: null, code: 15, message: "over budget" });
    const ack = f({ type: "Ack", id: 1n });
    const child = spawn(process.execPath, ["-e", RESET_FAKE, socketPath, String(HELLO_LEN), first.toString("hex"), error.toString("hex"), ack.toString("hex")], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    const lines: string[] = [];
    let waiting: (() => void) | null = null;
    let partial = "";
    child.stdout!.on("data", (d: Buffer) => {
      partial += d.toString();
      const parts = partial.split("\n");
      partial = parts.pop() ?? "";
      lines.push(...parts);
      waiting?.();
    });
    const line = async (): Promise<string> => {
      while (lines.length === 0) await new Promise<void>((r) => (waiting = r));
      return lines.shift() as string;
    };
    try {
      assert.equal(await line(), "ready");
      const env = { KEYHOLE_SOCKET: socketPath, KEYHOLE_TOKEN: TEST_TOKEN_HEX };
      const big = Buffer.alloc(4 << 20, 0x33);
      for (let round = 0; round < 8; round++) {
        const c1 = await HubClient.connect({ env, connectTimeoutMs: 3000 });
        await assert.rejects(c1.publish("t.x", big), (e: unknown) => e instanceof ConnectionClosedError && e.reason.kind === "error");
        await c1.closed;
        const c2 = await HubClient.connect({ env, connectTimeoutMs: 3000 });
        await c2.ping();
        // Longer than the writer's longest pause between retries (20 ms).
        await new Promise((r) => setTimeout(r, 60));
        await c2.close();
        const got = Buffer.from(await line(), "hex");
        assert.equal(got.length, 16, `round ${round}: the second connection received ${got.length} bytes after the handshake and Expect, not the 16 of its Ping: ${got.subarray(0, 32).toString("hex")}`);
      }
    } finally {
      child.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  // Many writes that fill the socket buffer (the descriptor's EAGAIN, retried) and then fail. This test
  // passes with net.Socket#write too (Node has read the Error into the stream's buffer before the write
  // fails); the one that tells the two apart is in options.test.ts ("a write to a connection the daemon
  // closed fails"), and the kit's step write_fails_after_final_frame.
  test("after writes that fill the socket buffer fail with EPIPE, the daemon's final Error is kept and reported (section 9)", async () => {
    const c = await hub(async (c) => {
      await c.bytes(HELLO_LEN + 1);
      c.write(f({ type: "Error", id: null, code: 15, message: "over budget" }));
      c.socket.destroy();
    });
    // Stop reading (the event bound), so that the writes meet the closed socket before the Error is read.
    c.connection.holdEvents(Number.MAX_SAFE_INTEGER);
    // Far more than the socket buffers hold: writes go on after the fake closed.
    const big = Buffer.alloc(60_000, 1);
    const all: Array<Promise<unknown>> = [];
    for (let i = 0; i < 200; i++) all.push(c.publish("t.x", big));
    const results = await Promise.allSettled(all);
    assert.ok(c.connection.writeError !== null, "no write failed: the test did not exercise EPIPE");
    assert.ok(["EPIPE", "ECONNRESET"].includes(c.connection.writeError.code ?? ""), String(c.connection.writeError.code));
    for (const r of results) {
      assert.equal(r.status, "rejected");
      const e = (r as PromiseRejectedResult).reason as ConnectionClosedError;
      assert.ok(e instanceof ConnectionClosedError && e.reason.kind === "error", `lost the final frame: ${String(e)}`);
      assert.ok(e.reason.error instanceof OverBudgetError);
    }
  });
});

/**
 * A fake daemon in a child process (argv: socket, HELLO_LEN, then hex: Welcome+Ack, Error, Ack of request 1).
 * Odd connections: Welcome, then stop reading after 64 bytes of the request, and 100 ms later (the
 * client's writer is then waiting out EAGAIN 20 ms at a time) the Error and a close with bytes unread
 * (a reset). Even connections: Welcome, the Ack of the Ping, then, at their end, a line with the hex of
 * every byte received after the handshake and Expect.
 */
const RESET_FAKE = `
const net = require("node:net");
const [path, helloArg, firstHex, errorHex, ackHex] = process.argv.slice(1);
const hello = Number(helloArg);
let n = 0;
const server = net.createServer({ allowHalfOpen: true }, (s) => {
  const odd = n++ % 2 === 0;
  let got = Buffer.alloc(0);
  let stage = 0;
  s.on("error", () => undefined);
  s.on("data", (d) => {
    got = Buffer.concat([got, d]);
    if (stage === 0 && got.length >= hello) {
      stage = 1;
      s.write(Buffer.from(firstHex, "hex"));
    }
    if (odd && stage === 1 && got.length >= hello + 64) {
      stage = 2;
      s.pause();
      setTimeout(() => {
        s.write(Buffer.from(errorHex, "hex"));
        s.destroy();
      }, 100);
    }
    if (!odd && stage === 1 && got.length >= hello + 16) {
      stage = 2;
      s.write(Buffer.from(ackHex, "hex"));
    }
  });
  s.on("end", () => {
    if (!odd) {
      process.stdout.write(got.subarray(hello).toString("hex") + "\\n");
      s.end();
    }
  });
});
server.listen(path, () => process.stdout.write("ready\\n"));
`;
