// The connect options of sections 6, 9 and 16 (17.3 names them for the
// kit): nextRequestId (ids wrap 2^64-1 -> 0), nextSubscriptionId (sids wrap
// 2^64-1 -> 1, skipping live ones), connectTimeoutMs with the busy retry's
// pauses and giving up; and the daemon's final frame kept when a write fails.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";
import {
  ConfigError,
  ConnectionClosedError,
  DaemonBusyError,
  HubClient,
  Kind,
  OverBudgetError,
  TooManyConnectionsError,
  encodeHubReply,
  encodeHubEvent,
} from "../src/index.js";
import { BusyRetry } from "../src/connection.js";
import { HELLO_LEN, f, fakeDaemon, welcome, type Fake, type FakeConn } from "./helpers.js";

const U64_MAX = (1n << 64n) - 1n;
const ackExpect = f({ type: "Ack", id: 0n });

let fake: Fake | null = null;
afterEach(async () => {
  await fake?.close();
  fake = null;
});

interface Req {
  id: bigint;
  kind: number;
  body: Buffer;
}

/**
 * A fake hub that welcomes the client, then answers every request as it
 * arrives (Ping: Ack; Subscribe, Unsubscribe, Status, Publish: their reply)
 * and records it.
 */
async function answering(seen: Req[], onRequest?: (r: Req, c: FakeConn) => void): Promise<Fake> {
  return fakeDaemon(async (c) => {
    const first = await c.bytes(HELLO_LEN);
    currentConn = c;
    c.write(Buffer.concat([welcome(), ackExpect]));
    let buf = Buffer.from(first.subarray(HELLO_LEN));
    const onBytes = (): void => {
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32LE(0)) {
        const payload = buf.subarray(4, 4 + buf.readUInt32LE(0));
        buf = buf.subarray(4 + payload.length);
        const r: Req = { id: payload.readBigUInt64LE(0), kind: payload.readUInt32LE(8), body: Buffer.from(payload.subarray(12)) };
        seen.push(r);
        if (onRequest !== undefined) {
          onRequest(r, c);
          continue;
        }
        if (r.kind !== Kind.Call) c.write(f({ type: "Ack", id: r.id }));
        else {
          const tag = r.body.readUInt32LE(0);
          const rep =
            tag === 1
              ? encodeHubReply({ type: "Subscribed" })
              : tag === 2
                ? encodeHubReply({ type: "Unsubscribed" })
                : tag === 3
                  ? encodeHubReply({ type: "Published", receivers: 1n })
                  : encodeHubReply({ type: "Serving" });
          c.write(f({ type: "Reply", id: r.id, body: rep }));
        }
      }
    };
    c.socket.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      onBytes();
    });
    onBytes();
  });
}

/** The connection of the last answering() fake. */
let currentConn: FakeConn | null = null;
function writeToFake(b: Buffer): void {
  assert.ok(currentConn !== null, "the fake has no connection");
  currentConn.write(b);
}

/** The sid of a Subscribe or Unsubscribe Call's body (right after the hub request tag). */
const sidOf = (r: Req): bigint => r.body.readBigUInt64LE(4);

describe("nextRequestId (section 6: ids wrap, 2^64-1 is followed by 0)", () => {
  test("the first request takes the option's id; 2^64-1 is followed by 0, 1; the Expect keeps id 0 outside the count", async () => {
    const seen: Req[] = [];
    fake = await answering(seen);
    const c = await HubClient.connect({
      env: fake.env,
      nextRequestId: U64_MAX - 1n,
      pipeline: [{ type: "Publish", topic: "p.x", payload: Buffer.from("a") }],
    });
    // The pipelined Publish is the first request of the count.
    assert.deepEqual(await c.pipelined[0], { type: "Published", receivers: 1n });
    const expectFrame = fake.received[0]!.subarray(44, HELLO_LEN);
    assert.equal(expectFrame.readBigUInt64LE(4), 0n, "the Expect sent with the handshake has id 0");
    await Promise.all([c.ping(), c.ping(), c.ping()]);
    assert.deepEqual(
      seen.map((r) => r.id),
      [U64_MAX - 1n, U64_MAX, 0n, 1n],
    );
    await c.close();
  });

  test("three pipelined Pings under 2^64-1 carry 2^64-1, 0, 1 and are answered by id", async () => {
    const seen: Req[] = [];
    fake = await answering(seen);
    const c = await HubClient.connect({ env: fake.env, nextRequestId: U64_MAX });
    await Promise.all([c.ping(), c.ping(), c.ping()]);
    assert.deepEqual(
      seen.map((r) => [r.id, r.kind]),
      [
        [U64_MAX, Kind.Ping],
        [0n, Kind.Ping],
        [1n, Kind.Ping],
      ],
    );
    await c.close();
  });

  test("0 is an id like any other; a number is taken as well as a bigint", async () => {
    const seen: Req[] = [];
    fake = await answering(seen);
    const c = await HubClient.connect({ env: fake.env, nextRequestId: 0 });
    await c.ping();
    assert.equal(seen[0]?.id, 0n);
    await c.close();
  });

  for (const bad of [-1n, 1n << 64n, 1.5, -1, Number.MAX_SAFE_INTEGER + 1]) {
    test(`nextRequestId ${String(bad)} is refused with ConfigError before connecting`, async () => {
      fake = await answering([]);
      await assert.rejects(HubClient.connect({ env: fake.env, nextRequestId: bad }), ConfigError);
      assert.equal(fake.connections, 0);
    });
  }
});

describe("nextSubscriptionId (sections 14, 16: sids wrap 2^64-1 -> 1, never 0, live ones skipped)", () => {
  test("under 2^64-1, subscribe() gives 2^64-1 then 1; events and a Lagged are routed by sid; Unsubscribe carries each sid", async () => {
    const seen: Req[] = [];
    fake = await answering(seen);
    const c = await HubClient.connect({ env: fake.env, nextSubscriptionId: U64_MAX });
    const a = await c.subscribe("a.>", { lag: "DropOldest" });
    const b = await c.subscribe("b.>");
    assert.equal(a.sid, U64_MAX);
    assert.equal(b.sid, 1n);
    assert.deepEqual(seen.map(sidOf), [U64_MAX, 1n]);
    // The fake's connection writes, in one write: a Message on 1, a Lagged of 2^64-1, a Message on 2^64-1.
    const msg = (sid: bigint, topic: string) =>
      f({ type: "Event", stream: sid, body: encodeHubEvent({ type: "Message", topic, sequence: 7n, payload: Buffer.from("x") }) });
    writeToFake(Buffer.concat([msg(1n, "b.one"), f({ type: "Lagged", stream: U64_MAX, missed: 2n }), msg(U64_MAX, "a.one")]));
    assert.deepEqual(await b.next(), { type: "Message", topic: "b.one", sequence: 7n, payload: Buffer.from("x") });
    assert.deepEqual(await a.next(), { type: "Lagged", missed: 2n });
    assert.deepEqual(await a.next(), { type: "Message", topic: "a.one", sequence: 7n, payload: Buffer.from("x") });
    await a.unsubscribe();
    await b.unsubscribe();
    assert.deepEqual(seen.slice(2).map(sidOf), [U64_MAX, 1n]);
    await c.close();
  });

  test("the counter skips sids still live (given explicitly or pipelined), and reuses none while live", async () => {
    const seen: Req[] = [];
    fake = await answering(seen);
    const c = await HubClient.connect({
      env: fake.env,
      nextSubscriptionId: U64_MAX,
      pipeline: [{ type: "Subscribe", sid: U64_MAX, pattern: "p.x", lag: "Disconnect" }],
    });
    await Promise.all(c.pipelined);
    await c.subscribe("e.x", { sid: 2n });
    const s1 = await c.subscribe("n.x"); // 2^64-1 is live: 1
    const s3 = await c.subscribe("n.y"); // 2 is live: 3
    assert.equal(s1.sid, 1n);
    assert.equal(s3.sid, 3n);
    await c.subscription(2n)!.unsubscribe();
    const s4 = await c.subscribe("n.z"); // the counter goes on; it does not go back to 2
    assert.equal(s4.sid, 4n);
    assert.deepEqual(seen.filter((r) => r.body.readUInt32LE(0) === 1).map(sidOf), [U64_MAX, 2n, 1n, 3n, 4n]);
    await c.close();
  });

  test("the default counter starts at 1", async () => {
    fake = await answering([]);
    const c = await HubClient.connect({ env: fake.env });
    assert.equal((await c.subscribe("a.b")).sid, 1n);
    assert.equal((await c.subscribe("a.c")).sid, 2n);
    await c.close();
  });

  for (const bad of [0n, 0, 1n << 64n, -1n, 2.5]) {
    test(`nextSubscriptionId ${String(bad)} is refused with ConfigError before connecting`, async () => {
      fake = await answering([]);
      await assert.rejects(HubClient.connect({ env: fake.env, nextSubscriptionId: bad }), ConfigError);
      assert.equal(fake.connections, 0);
    });
  }
});

describe("connectTimeoutMs and busy retries (section 9, \"Admission\")", () => {
  test("BusyRetry: pauses of 5 ms doubling up to 100 ms, each 1 ms to 1 s; it gives up when the next pause would end after the timeout", () => {
    let now = 0;
    const r = new BusyRetry(1000, () => now);
    const pauses: number[] = [];
    for (;;) {
      const p = r.plan();
      if (p === null) break;
      pauses.push(p);
      now += p + 1; // each attempt takes 1 ms
    }
    assert.deepEqual(pauses.slice(0, 6), [5, 10, 20, 40, 80, 100]);
    for (const p of pauses) assert.ok(p >= 1 && p <= 1000, String(p));
    assert.ok(now <= 1000 + 1, `the last pause ended at ${now}, after the timeout`);
    assert.ok(now + 100 > 1000, `gave up at ${now}, with time left for another pause`);
    // Past the timeout: no pause at all.
    assert.equal(new BusyRetry(10, () => 11).plan(), null);
  });

  for (const bad of [0, -5, Number.NaN, Number.POSITIVE_INFINITY]) {
    test(`connectTimeoutMs ${bad} is refused with ConfigError`, async () => {
      fake = await answering([]);
      await assert.rejects(HubClient.connect({ env: fake.env, connectTimeoutMs: bad }), ConfigError);
      assert.equal(fake.connections, 0);
    });
  }

  /** A fake that refuses the first `refusals` connections (all when null) with `code`, then welcomes; records times. */
  async function busyFake(refusals: number | null, code: number, log: { arrived: number[]; refusedAt: number[]; bytes: Buffer[] }): Promise<Fake> {
    let n = 0;
    return fakeDaemon(async (c) => {
      log.arrived.push(performance.now());
      const i = n++;
      const got = await c.bytes(HELLO_LEN);
      log.bytes.push(Buffer.from(got));
      if (refusals === null || i < refusals) {
        log.refusedAt.push(performance.now());
        c.write(f({ type: "Error", id: null, code, message: "busy" }));
        c.socket.end();
        return;
      }
      c.write(Buffer.concat([welcome(), ackExpect]));
      await c.bytes(HELLO_LEN + 16);
      c.write(f({ type: "Ack", id: 1n }));
    });
  }

  test("three busy refusals, then Welcome: each retry comes 1 ms to 1 s after the refusal, with the same bytes", async () => {
    const log = { arrived: [] as number[], refusedAt: [] as number[], bytes: [] as Buffer[] };
    fake = await busyFake(3, 7, log);
    const c = await HubClient.connect({ env: fake.env, connectTimeoutMs: 5000 });
    await c.ping();
    assert.equal(log.arrived.length, 4);
    for (let i = 1; i < 4; i++) {
      const pause = log.arrived[i]! - log.refusedAt[i - 1]!;
      assert.ok(pause >= 1 && pause <= 1000, `pause ${i}: ${pause} ms`);
      assert.deepEqual(log.bytes[i], log.bytes[0], "a retry sends the same handshake and Expect");
    }
    await c.close();
  });

  test("always busy: the client retries until about the connect timeout, then reports the last refusal", async () => {
    const log = { arrived: [] as number[], refusedAt: [] as number[], bytes: [] as Buffer[] };
    fake = await busyFake(null, 6, log);
    const t0 = performance.now();
    await assert.rejects(HubClient.connect({ env: fake.env, connectTimeoutMs: 800 }), (e: unknown) => {
      assert.ok(e instanceof DaemonBusyError, String(e));
      assert.equal(e.last?.code, 6);
      return true;
    });
    const took = performance.now() - t0;
    // Margins for a loaded machine (the kit allows T + 2 s); the pauses themselves are at most 100 ms.
    assert.ok(took <= 800 + 700, `reported after ${took} ms, past the timeout of 800 ms`);
    assert.ok(log.arrived.length >= 5, `only ${log.arrived.length} attempts`);
    const last = log.arrived[log.arrived.length - 1]! - t0;
    assert.ok(last >= 800 - 400, `the last attempt came ${last} ms after the start: gave up too early`);
    for (let i = 1; i < log.arrived.length; i++) {
      const pause = log.arrived[i]! - log.refusedAt[i - 1]!;
      assert.ok(pause >= 1 && pause <= 1000, `pause ${i}: ${pause} ms`);
    }
  });

  test("a busy refusal with TooManyConnections (7) under a short timeout: DaemonBusyError carries the typed refusal", async () => {
    const log = { arrived: [] as number[], refusedAt: [] as number[], bytes: [] as Buffer[] };
    fake = await busyFake(null, 7, log);
    await assert.rejects(
      HubClient.connect({ env: fake.env, connectTimeoutMs: 50 }),
      (e: unknown) => e instanceof DaemonBusyError && e.last instanceof TooManyConnectionsError,
    );
  });
});

describe("the daemon's final frame when a write fails (section 9)", () => {
  /**
   * The fake writes Error OverBudget and closes; in the same tick, before the
   * client has read anything, the client writes. Through the descriptor the
   * write fails (EPIPE) and the Error is still read; net.Socket#write would
   * fail before the next read and destroy the socket, losing it.
   */
  async function writeAfterClose(unsafeSocketWrite: boolean): Promise<{ results: PromiseSettledResult<unknown>[]; writeError: string | null }> {
    let conn: FakeConn | null = null;
    fake = await fakeDaemon(async (c) => {
      await c.bytes(HELLO_LEN);
      conn = c;
      c.write(Buffer.concat([welcome(), ackExpect]));
    });
    const client = await HubClient.connect({ env: fake.env, unsafeSocketWrite });
    const c = conn as unknown as FakeConn;
    c.write(f({ type: "Error", id: null, code: 15, message: "over budget" }));
    c.socket.destroy();
    const results = await Promise.allSettled([client.publish("big", Buffer.alloc(64 * 1024, 0xab)), client.ping()]);
    // The failed write's callback may come after the end was read.
    for (let i = 0; i < 100 && client.connection.writeError === null; i++) await new Promise((r) => setTimeout(r, 10));
    const writeError = client.connection.writeError?.code ?? null;
    await fake.close();
    fake = null;
    return { results, writeError };
  }

  const keptFinalFrame = (r: PromiseSettledResult<unknown>): boolean =>
    r.status === "rejected" &&
    r.reason instanceof ConnectionClosedError &&
    r.reason.reason.kind === "error" &&
    r.reason.reason.error instanceof OverBudgetError;

  test("a write to a connection the daemon closed fails (EPIPE), and the Error it sent first is reported by every request", async () => {
    for (let i = 0; i < 3; i++) {
      const { results, writeError } = await writeAfterClose(false);
      assert.ok(writeError === "EPIPE" || writeError === "ECONNRESET", `no write failed (${String(writeError)}): the test did not exercise a failed write`);
      for (const r of results) assert.ok(keptFinalFrame(r), `lost the final frame: ${r.status === "rejected" ? String(r.reason) : "fulfilled"}`);
    }
  });

  test("control: with net.Socket#write (unsafeSocketWrite) the same scenario loses the Error, so the test above can fail", async () => {
    const { results, writeError } = await writeAfterClose(true);
    assert.ok(writeError === "EPIPE" || writeError === "ECONNRESET", String(writeError));
    assert.ok(
      results.every((r) => !keptFinalFrame(r)),
      "net.Socket#write kept the final frame: this Node.js no longer destroys the socket's input on EPIPE, and the test above no longer tells the two writes apart",
    );
  });
});
