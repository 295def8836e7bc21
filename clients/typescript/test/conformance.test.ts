// The conformance kit (proto-spec.md Part IV, section 17) against this
// client's driver (src/conformance.ts): keyhole-conformance (the binary from
// KEYHOLE_CONFORMANCE_BIN, else target/debug/keyhole-conformance) on a temp
// directory, the driver as its own process with KEYHOLE_DIR, and the kit's
// JSON report: every step passed, none skipped.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { payloadOut } from "../src/conformance.js";
import { KEYHOLE_CONFORMANCE, tmpdir } from "./helpers.js";

const DRIVER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../src/conformance.js");

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function start(cmd: string, args: string[], env: NodeJS.ProcessEnv): { exited: Promise<Exit>; kill: () => void } {
  const proc = spawn(cmd, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  proc.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
  proc.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<Exit>((r) => proc.on("close", (code, signal) => r({ code, signal, stdout, stderr })));
  return { exited, kill: () => proc.exitCode === null && proc.kill("SIGKILL") };
}

test("report payloads follow section 17.3: hex up to 4096 bytes, then a fill or the length", () => {
  assert.equal(payloadOut(Buffer.alloc(0)), "");
  assert.equal(payloadOut(Buffer.from([0, 0xab, 0xff])), "00abff");
  assert.equal(payloadOut(Buffer.alloc(4096, 1)), "01".repeat(4096));
  assert.deepEqual(payloadOut(Buffer.alloc(4097, 0xab)), { fill: "ab", len: "4097" });
  const mixed = Buffer.alloc(5000, 7);
  mixed[4999] = 8;
  assert.deepEqual(payloadOut(mixed), { len: "5000" });
});

test("the conformance kit: the driver passes every step", { timeout: 240_000 }, async () => {
  const base = tmpdir();
  const dir = path.join(base, "kit");
  const kit = start(KEYHOLE_CONFORMANCE(), ["--dir", dir, "--json", "--connect-timeout", "30"], { ...process.env });
  try {
    const deadline = Date.now() + 20_000;
    while (!fs.existsSync(path.join(dir, "session-token"))) {
      if (Date.now() > deadline) {
        kit.kill();
        const e = await kit.exited;
        assert.fail(`keyhole-conformance did not start (exit ${e.code}):\n${e.stdout}\n${e.stderr}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    const env: NodeJS.ProcessEnv = { ...process.env, KEYHOLE_DIR: dir };
    for (const v of ["KEYHOLE_SOCKET", "KEYHOLE_TOKEN", "KEYHOLE_TOKEN_FILE", "KEYHOLE_DAEMON_UID"]) delete env[v];
    const driver = await start(process.execPath, [DRIVER], env).exited;
    const k = await kit.exited;
    const context = `--- kit (exit ${k.code})\n${k.stdout}\n${k.stderr}\n--- driver (exit ${driver.code})\n${driver.stdout}\n${driver.stderr}`;
    const line = k.stdout.split("\n").find((l) => l.startsWith("{"));
    assert.ok(line !== undefined, `no JSON report from the kit\n${context}`);
    const report = JSON.parse(line) as { verdict: string; steps: number; passed: string[]; skipped: string[]; failed: unknown };
    assert.equal(report.verdict, "pass", context);
    assert.equal(report.failed, null, context);
    assert.deepEqual(report.skipped, [], context);
    assert.ok(report.steps >= 83, `only ${report.steps} steps\n${context}`);
    assert.equal(report.passed.length, report.steps, context);
    assert.equal(k.code, 0, context);
    assert.equal(driver.code, 0, context);
    assert.match(driver.stdout, /pass/, context);
  } finally {
    kit.kill();
    await kit.exited;
    fs.rmSync(base, { recursive: true, force: true });
  }
});
