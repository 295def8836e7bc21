// Discovery (section 11) and check 3b, against fake daemons that record what they receive.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, test } from "node:test";
import { ConfigError, HubClient, PeerCheckError, discover, parseDaemonUid, parseTokenText } from "../src/index.js";
import { HELLO_LEN, f, fakeDaemon, welcome } from "./helpers.js";

const me = process.geteuid!();

describe("discovery (section 11)", () => {
  test("the runtime directory: KEYHOLE_DIR, then XDG_RUNTIME_DIR/keyhole, then HOME/.keyhole; empty counts as unset", () => {
    const sock = (env: Record<string, string>) => discover({ env, cwd: "/w" }).socketPath;
    assert.equal(sock({ KEYHOLE_DIR: "/k", XDG_RUNTIME_DIR: "/x", HOME: "/h" }), "/k/keyhole.sock");
    assert.equal(sock({ KEYHOLE_DIR: "", XDG_RUNTIME_DIR: "/x", HOME: "/h" }), "/x/keyhole/keyhole.sock");
    assert.equal(sock({ XDG_RUNTIME_DIR: "", HOME: "/h" }), "/h/.keyhole/keyhole.sock");
    assert.equal(sock({ KEYHOLE_DIR: "rel" }), "/w/rel/keyhole.sock", "relative to the working directory");
    assert.equal(sock({ KEYHOLE_SOCKET: "s.sock", KEYHOLE_TOKEN: "x" }), "/w/s.sock");
  });

  test("without any of the variables, the error names KEYHOLE_DIR and KEYHOLE_SOCKET; socket and token given need no directory", () => {
    assert.throws(() => discover({ env: {} }), (e: unknown) => e instanceof ConfigError && /KEYHOLE_DIR/.test(e.message) && /KEYHOLE_SOCKET/.test(e.message));
    const d = discover({ env: { KEYHOLE_SOCKET: "/s", KEYHOLE_TOKEN: "x" } });
    assert.equal(d.socketPath, "/s");
    assert.deepEqual(d.token, { kind: "env", variable: "KEYHOLE_TOKEN" });
  });

  test("where the token comes from: option, KEYHOLE_TOKEN, KEYHOLE_TOKEN_FILE, the runtime directory", () => {
    const env = { KEYHOLE_DIR: "/k", KEYHOLE_TOKEN: "t", KEYHOLE_TOKEN_FILE: "/f" };
    assert.equal(discover({ env, tokenFile: "/o" }).token.kind, "file");
    assert.deepEqual(discover({ env }).token, { kind: "env", variable: "KEYHOLE_TOKEN" });
    assert.deepEqual(discover({ env: { ...env, KEYHOLE_TOKEN: "" } }).token, { kind: "file", path: "/f", origin: "KEYHOLE_TOKEN_FILE" });
    assert.deepEqual(discover({ env: { KEYHOLE_DIR: "/k", KEYHOLE_TOKEN_FILE: "" } }).token, {
      kind: "file",
      path: "/k/session-token",
      origin: "runtime directory",
    });
  });

  test("KEYHOLE_DAEMON_UID: decimal digits only, 0 to 4294967295, leading zeros allowed", () => {
    assert.equal(parseDaemonUid("1000"), 1000);
    assert.equal(parseDaemonUid("0001000"), 1000);
    assert.equal(parseDaemonUid("4294967295"), 4294967295);
    assert.equal(parseDaemonUid("0"), 0);
    for (const bad of ["4294967296", "-1", "+1", " 1000", "1000 ", "1e3", "0x10", "١٠"]) {
      assert.throws(() => parseDaemonUid(bad), (e: unknown) => e instanceof ConfigError && /KEYHOLE_DAEMON_UID/.test(e.message), bad);
    }
    assert.equal(discover({ env: { KEYHOLE_DIR: "/k" } }).daemonUid, me);
    assert.equal(discover({ env: { KEYHOLE_DIR: "/k", KEYHOLE_DAEMON_UID: "" } }).daemonUid, me);
  });

  test("the token's text form: 64 lowercase hex digits and at most one newline", () => {
    const t = "00".repeat(31) + "1f";
    assert.equal(parseTokenText(Buffer.from(t), "x").toString("hex"), t);
    assert.equal(parseTokenText(Buffer.from(t + "\n"), "x").toString("hex"), t);
    for (const bad of [t.toUpperCase(), t + "\r\n", t + "\n\n", t + " ", t.slice(1), "g" + t.slice(1), " " + t]) {
      assert.throws(() => parseTokenText(Buffer.from(bad), "x"), (e: unknown) => e instanceof Error && e.name === "TokenError" && !e.message.includes(t));
    }
  });
});

describe("check 3b (the socket file's owner and its directory)", () => {
  async function recorder() {
    return fakeDaemon(async (c) => {
      await c.bytes(HELLO_LEN);
      c.write(Buffer.concat([welcome(), f({ type: "Ack", id: 0n })]));
    });
  }

  test("a good socket in a 0700 directory of our uid passes", async () => {
    const fake = await recorder();
    const c = await HubClient.connect({ env: fake.env });
    await c.close();
    await fake.close();
  });

  test("a directory that group or others may write to fails the check, and nothing is sent", async () => {
    const fake = await recorder();
    fs.chmodSync(fake.dir, 0o770);
    await assert.rejects(HubClient.connect({ env: fake.env }), (e: unknown) => e instanceof PeerCheckError && /may write to the socket's directory/.test(e.message) && e.path === fake.socketPath);
    assert.equal(fake.connections, 0);
    await fake.close();
  });

  test("a symbolic link to the socket fails the check (lstat, not stat)", async () => {
    const fake = await recorder();
    const link = path.join(fake.dir, "link.sock");
    fs.symlinkSync(fake.socketPath, link);
    await assert.rejects(HubClient.connect({ env: { ...fake.env, KEYHOLE_SOCKET: link } }), /is a symbolic link, not a socket/);
    assert.equal(fake.connections, 0);
    await fake.close();
  });

  test("a regular file at the socket path fails the check", async () => {
    const fake = await recorder();
    const p = path.join(fake.dir, "file.sock");
    fs.writeFileSync(p, "");
    await assert.rejects(HubClient.connect({ env: { ...fake.env, KEYHOLE_SOCKET: p } }), /is a regular file, not a socket/);
    await fake.close();
  });

  test("a socket of another uid than KEYHOLE_DAEMON_UID fails the check; the token is never sent", async () => {
    const fake = await recorder();
    const other = me === 4242 ? 4243 : 4242;
    await assert.rejects(
      HubClient.connect({ env: { ...fake.env, KEYHOLE_DAEMON_UID: String(other) } }),
      (e: unknown) => e instanceof PeerCheckError && new RegExp(`belongs to uid ${me}, not to the daemon's expected uid ${other}`).test(e.message),
    );
    assert.equal(fake.connections, 0);
    await fake.close();
  });

  test("a bad KEYHOLE_DAEMON_UID is an error naming it, and nothing is sent", async () => {
    const fake = await recorder();
    await assert.rejects(HubClient.connect({ env: { ...fake.env, KEYHOLE_DAEMON_UID: "me" } }), /KEYHOLE_DAEMON_UID/);
    assert.equal(fake.connections, 0);
    await fake.close();
  });

  test("a directory owned by another uid (not root) fails the check", { skip: me !== 0 ? "needs root to chown" : false }, async () => {
    const fake = await recorder();
    fs.chownSync(fake.dir, 4242, 4242);
    await assert.rejects(HubClient.connect({ env: fake.env }), /belongs to uid 4242, neither the expected uid/);
    await fake.close();
  });
});
