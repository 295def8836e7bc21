// Against the real daemon (target/debug/keyholed, or KEYHOLED_BIN).

import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import {
  BadTokenError,
  Connection,
  ConnectionClosedError,
  DaemonNotRunningError,
  HubClient,
  InvalidTopicError,
  Kind,
  NoRespondersError,
  RequestFailedError,
  RequestRefusedError,
  ResponderGoneError,
  SidInUseError,
  UnknownRequestError,
  WrongServiceError,
  DescriptorsNotAcceptedError,
  daemonError,
  encodeHandshake,
  encodeHubRequest,
  encodeRequestPayload,
  frame,
} from "../src/index.js";
import { KEYHOLE, TEST_TOKEN_HEX, raw, startDaemon, tmpdir, tokenOf, type Daemon } from "./helpers.js";

const run = promisify(execFile);

describe("the real daemon", () => {
  let d: Daemon;
  before(async () => {
    d = await startDaemon();
  });
  after(async () => {
    await d.stop();
  });

  test("connect: Welcome names hub v2 with the full frame limit; ping and status answer", async () => {
    const c = await HubClient.connect({ env: d.env });
    assert.equal(c.welcome.service, "hub");
    assert.equal(c.welcome.serviceVersion, 2);
    assert.equal(c.welcome.maxFrameLen, 16_777_216);
    await c.ping();
    const s = await c.status();
    assert.ok(s.authenticated >= 1n);
    assert.match(s.version, /^\d+\.\d+\.\d+/);
    assert.equal(s.version, c.welcome.softwareVersion);
    await c.close();
  });

  test("requests pipelined behind the handshake and Expect are answered in order", async () => {
    const c = await HubClient.connect({
      env: d.env,
      pipeline: [{ type: "Status" }, { type: "Publish", topic: "pipe.x", payload: Buffer.from("a") }, { type: "Topics" }],
    });
    const [s, p, t] = await Promise.all(c.pipelined);
    assert.equal(s?.type, "Status");
    assert.deepEqual(p, { type: "Published", receivers: 0n });
    assert.equal(t?.type, "Topics");
    await c.close();
  });

  test("a wrong token with pipelined requests is reported as the refused handshake (BadToken), not as failed requests", async () => {
    const other = "ff".repeat(32);
    await assert.rejects(
      HubClient.connect({ env: { ...d.env, KEYHOLE_TOKEN: other }, pipeline: [{ type: "Status" }, { type: "Topics" }] }),
      (e: unknown) => e instanceof BadTokenError && e.code === 3 && e.id === null && !e.message.includes(other),
    );
  });

  test("a client of another service is refused at Welcome, naming both services", async () => {
    await assert.rejects(
      Connection.connect({ env: d.env, service: { name: "notes", version: 1 } }),
      (e: unknown) => e instanceof WrongServiceError && /serves "hub" version 2, not "notes" version 1/.test(e.message),
    );
  });

  test("publish/subscribe: messages reach every matching subscription with sequence numbers; unsubscribe ends the stream", async () => {
    const sub = await HubClient.connect({ env: d.env });
    const pub = await HubClient.connect({ env: d.env });
    const a = await sub.subscribe("news.*");
    const b = await sub.subscribe("news.>", { lag: "DropOldest" });
    assert.equal(await pub.publish("news.local", "hello"), 2n);
    assert.equal(await pub.publish("news.local", Buffer.from([0, 255])), 2n);
    assert.equal(await pub.publish("other", "x"), 0n);
    for (const s of [a, b]) {
      assert.deepEqual(await s.next(), { type: "Message", topic: "news.local", sequence: 1n, payload: Buffer.from("hello") });
      assert.deepEqual(await s.next(), { type: "Message", topic: "news.local", sequence: 2n, payload: Buffer.from([0, 255]) });
    }
    await a.unsubscribe();
    assert.equal(await a.next(), null);
    assert.equal(await pub.publish("news.local", "3"), 1n);
    assert.equal((await b.next())?.type, "Message");
    const topics = await pub.topics();
    assert.deepEqual(topics.patterns, [["news.>", 1n]]);
    await sub.close();
    await pub.close();
  });

  test("request/reply: served with a handler, failed, refused for lack of responders, and ResponderGone", async () => {
    const server = await HubClient.connect({ env: d.env });
    const client = await HubClient.connect({ env: d.env });
    await server.serve("svc.clock", (req) => {
      if (req.payload.toString() === "fail") throw new Error("no clock");
      return `12:00 for uid ${req.uid}`;
    });
    assert.equal((await client.request("svc.clock", "now?", { timeoutMs: 2000 })).toString(), `12:00 for uid ${process.geteuid!()}`);
    await assert.rejects(client.request("svc.clock", "fail"), (e: unknown) => e instanceof RequestFailedError && e.responderMessage === "no clock");
    await assert.rejects(client.request("svc.nobody", "x"), (e: unknown) => e instanceof NoRespondersError && e.code === 1004);

    const silent = await HubClient.connect({ env: d.env });
    await silent.serve("svc.silent");
    const gone = client.request("svc.silent", "x");
    const it = silent.requests();
    const first = await it.next();
    assert.equal(first.value?.name, "svc.silent");
    await silent.close();
    await assert.rejects(gone, ResponderGoneError);
    await server.close();
    await client.close();
  });

  test("errors are typed by code and fail one request only: SidInUse, InvalidTopic, UnknownRequest", async () => {
    const c = await HubClient.connect({ env: d.env });
    await assert.rejects(c.call({ type: "Subscribe", sid: 0, pattern: "a", lag: "Disconnect" }), SidInUseError);
    // The client refuses an invalid subject itself, before sending...
    await assert.rejects(c.publish("a..b", "x"), RequestRefusedError);
    // ...and the daemon's own answer, sent raw, is typed too.
    await assert.rejects(
      c.connection.request({ kind: Kind.Call, body: encodeHubRequest({ type: "Publish", topic: "", payload: Buffer.alloc(0) }) }),
      (e: unknown) => e instanceof InvalidTopicError && e.code === 1000,
    );
    // Kinds 4 (AcceptFds) and 5 (CallFds) are defined (section 19); 6 and up are unknown (section 6).
    for (const kind of [6, 7, 0xffff_ffff]) {
      await assert.rejects(c.connection.request({ kind: kind as Kind }), (e: unknown) => e instanceof UnknownRequestError && e.code === 10, `kind ${kind}`);
    }
    await c.ping();
    await c.close();
  });

  test("file descriptors (section 19): the client refuses to send AcceptFds, CallFds and PublishMemfd; nothing is sent", async () => {
    const c = await HubClient.connect({ env: d.env });
    await assert.rejects(c.connection.request({ kind: Kind.AcceptFds }), (e: unknown) => e instanceof RequestRefusedError && /file descriptors/.test(e.message));
    await assert.rejects(c.connection.request({ kind: Kind.CallFds, body: Buffer.alloc(8) }), RequestRefusedError);
    await assert.rejects(c.call({ type: "PublishMemfd", topic: "m.x" }), (e: unknown) => e instanceof RequestRefusedError && /memfd/.test(e.message));
    // The connection is untouched, and the refused requests took no id: the next Ping is answered in order.
    await c.ping();
    await c.close();
  });

  test("file descriptors, raw: AcceptFds is answered Ack (twice), with a body BadRequest; a CallFds before AcceptFds gets DescriptorsNotAccepted (17) with its id; the connection stays open", async () => {
    const sock = path.join(d.dir, "keyhole.sock");
    const req = (id: bigint, kind: number, body: Buffer = Buffer.alloc(0)): Buffer => frame(encodeRequestPayload(id, kind as Kind, body));
    // A CallFds announcing one descriptor, none sent, on a connection that has not sent AcceptFds.
    const callFds = req(3n, Kind.CallFds, Buffer.concat([Buffer.from([1, 0, 0, 0]), encodeHubRequest({ type: "Status" })]));
    let { frames, ended } = await raw(sock, [encodeHandshake(tokenOf(d)), callFds, req(4n, Kind.Ping)], { waitMs: 700 });
    assert.equal(frames[0]?.type, "Welcome");
    const e17 = frames[1];
    assert.ok(e17?.type === "Error" && e17.code === 17 && e17.id === 3n, JSON.stringify(frames[1], (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v)));
    assert.ok(daemonError(e17.code, e17.id, e17.message) instanceof DescriptorsNotAcceptedError);
    assert.deepEqual(frames[2], { type: "Ack", id: 4n });
    assert.equal(ended, null);
    ({ frames, ended } = await raw(
      sock,
      [encodeHandshake(tokenOf(d)), req(5n, Kind.AcceptFds), req(6n, Kind.AcceptFds), req(7n, Kind.AcceptFds, Buffer.from([0])), req(8n, Kind.Ping)],
      { waitMs: 700 },
    ));
    assert.deepEqual(frames.slice(1, 3), [
      { type: "Ack", id: 5n },
      { type: "Ack", id: 6n },
    ]);
    assert.ok(frames[3]?.type === "Error" && frames[3].code === 11 && frames[3].id === 7n);
    assert.deepEqual(frames[4], { type: "Ack", id: 8n });
    assert.equal(ended, null);
  });

  test("not running: a directory without a socket gives DaemonNotRunningError", async () => {
    const dir = tmpdir();
    await assert.rejects(HubClient.connect({ env: { KEYHOLE_DIR: dir } }), DaemonNotRunningError);
    fs.rmSync(dir, { recursive: true });
  });

  test("an explicit token Buffer is overwritten with zeros once it is used", async () => {
    const text = Buffer.from(fs.readFileSync(path.join(d.dir, "session-token")));
    const c = await HubClient.connect({ env: d.env, token: text });
    assert.ok(text.every((b) => b === 0));
    await c.close();
  });

  test("keyhole status (the CLI) works beside the client", async () => {
    const c = await HubClient.connect({ env: d.env });
    const st = await run(KEYHOLE(), ["status"], { env: { ...process.env, ...d.env } });
    assert.match(st.stdout, /connections|authenticated/i);
    await c.close();
  });
});

describe("token file checks (check 1) against the real daemon", () => {
  let d: Daemon;
  before(async () => {
    d = await startDaemon();
  });
  after(async () => {
    await d.stop();
  });

  const tokenText = () => fs.readFileSync(path.join(d.dir, "session-token"), "utf8");
  function withFile(content: string | null, mode = 0o600, fifo = false): Record<string, string> {
    const dir = tmpdir();
    const p = path.join(dir, "tok");
    if (fifo) {
      // A FIFO: opening it without O_NONBLOCK would hang.
      execFileSync("mkfifo", [p]);
    } else fs.writeFileSync(p, content ?? "", { mode });
    fs.chmodSync(p, mode);
    return { ...d.env, KEYHOLE_TOKEN_FILE: p };
  }

  for (const [what, content, mode] of [
    ["readable by group (0640)", null, 0o640],
    ["readable by others (0604)", null, 0o604],
    ["in uppercase", "UPPER", 0o600],
    ["ending in \\r\\n", "CRLF", 0o600],
    ["with two newlines", "NL2", 0o600],
    ["empty", "", 0o600],
  ] as Array<[string, string | null, number]>) {
    test(`a token file ${what} is refused before anything is sent`, async () => {
      const t = tokenText().trim();
      const c = content === "UPPER" ? t.toUpperCase() + "\n" : content === "CRLF" ? t + "\r\n" : content === "NL2" ? t + "\n\n" : content ?? t + "\n";
      const env = withFile(c, mode);
      await assert.rejects(HubClient.connect({ env }), (e: unknown) => e instanceof Error && e.name === "TokenError" && !e.message.includes(t));
    });
  }

  test("a FIFO at the token path is refused at once, not waited on", async () => {
    const env = withFile(null, 0o600, true);
    const t0 = Date.now();
    await assert.rejects(HubClient.connect({ env }), /not a regular file/);
    assert.ok(Date.now() - t0 < 2000);
  });

  test("a token file of another uid is refused", { skip: process.geteuid!() !== 0 ? "needs root to chown" : false }, async () => {
    const env = withFile(tokenText());
    fs.chownSync(env.KEYHOLE_TOKEN_FILE!, 4242, 4242);
    await assert.rejects(HubClient.connect({ env }), /belongs to uid 4242/);
  });

  test("a symbolic link to a good token file is followed and accepted; the token without a newline too (KEYHOLE_TOKEN)", async () => {
    const env = withFile(tokenText());
    const link = env.KEYHOLE_TOKEN_FILE! + ".link";
    fs.symlinkSync(env.KEYHOLE_TOKEN_FILE!, link);
    const c = await HubClient.connect({ env: { ...env, KEYHOLE_TOKEN_FILE: link } });
    await c.close();
    const c2 = await HubClient.connect({ env: { ...d.env, KEYHOLE_TOKEN: tokenText().trim() } });
    await c2.close();
    assert.notEqual(TEST_TOKEN_HEX, tokenText().trim());
  });
});

describe("shutdown", () => {
  test("Shutdown is acknowledged, then Closing{Shutdown} ends the connection, and keyholed exits 0", async () => {
    const d = await startDaemon();
    const c = await HubClient.connect({ env: d.env });
    const watcher = await HubClient.connect({ env: d.env });
    await c.shutdown();
    const closed = await watcher.closed;
    assert.ok(closed instanceof ConnectionClosedError);
    assert.deepEqual(closed.reason, { kind: "closing", reason: "Shutdown" });
    assert.ok(closed.transport === "eof" || closed.transport === "econnreset");
    assert.equal(await d.exited, 0);
    await d.stop();
  });
});

