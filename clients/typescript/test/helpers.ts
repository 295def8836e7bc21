// Test helpers: the real daemon in a temporary directory, and scripted fake daemons.

import { spawn, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { decodeDaemonFrame, encodeDaemonFrame, type DaemonFrame } from "../src/index.js";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");
export const TEST_TOKEN_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

function bin(envName: string, name: string): string {
  const p = process.env[envName] ?? path.join(REPO, "target/debug", name);
  if (!fs.existsSync(p)) throw new Error(`${name} not found at ${p}: build it (cargo build --bin ${name}) or set ${envName}`);
  return p;
}

export const KEYHOLED = (): string => bin("KEYHOLED_BIN", "keyholed");
export const KEYHOLE = (): string => bin("KEYHOLE_BIN", "keyhole");
export const KEYHOLE_CONFORMANCE = (): string => bin("KEYHOLE_CONFORMANCE_BIN", "keyhole-conformance");

export function tmpdir(): string {
  // Short paths: sun_path is limited to 108 bytes.
  const d = fs.mkdtempSync(path.join(os.tmpdir(), "khts-"));
  fs.chmodSync(d, 0o700);
  return d;
}

export interface Daemon {
  dir: string;
  env: Record<string, string>;
  proc: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
  stop(): Promise<number | null>;
}

/** Starts target/debug/keyholed --dir TMP/run and waits for its socket and token file. */
export async function startDaemon(args: string[] = []): Promise<Daemon> {
  const base = tmpdir();
  const dir = path.join(base, "run");
  const proc = spawn(KEYHOLED(), ["--dir", dir, ...args], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  proc.stderr!.on("data", (c: Buffer) => (err += c.toString()));
  const exited = new Promise<number | null>((r) => proc.on("exit", (code) => r(code)));
  const deadline = Date.now() + 10_000;
  while (!(fs.existsSync(path.join(dir, "keyhole.sock")) && fs.existsSync(path.join(dir, "session-token")))) {
    if (Date.now() > deadline || proc.exitCode !== null) throw new Error(`keyholed did not start:\n${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    dir,
    env: { KEYHOLE_DIR: dir },
    proc,
    stderr: () => err,
    exited,
    async stop() {
      if (proc.exitCode === null) proc.kill("SIGTERM");
      const code = await exited;
      fs.rmSync(base, { recursive: true, force: true });
      return code;
    },
  };
}

export function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ""), "hex");
}

export const WELCOME: DaemonFrame = {
  type: "Welcome",
  welcome: {
    protocolVersion: 2,
    service: "hub",
    serviceVersion: 2,
    softwareVersion: "fake",
    instanceId: 1n,
    connectionId: 1n,
    maxFrameLen: 16_777_216,
  },
};

export function welcome(over: Partial<(DaemonFrame & { type: "Welcome" })["welcome"]> = {}): Buffer {
  return encodeDaemonFrame({ type: "Welcome", welcome: { ...(WELCOME as DaemonFrame & { type: "Welcome" }).welcome, ...over } });
}

export const f = encodeDaemonFrame;

/** A scripted fake daemon: a net.Server in a 0700 directory; `script` gets each connection and the bytes received so far. */
export interface Fake {
  socketPath: string;
  dir: string;
  env: Record<string, string>;
  /** Every byte each connection received. */
  received: Buffer[];
  connections: number;
  close(): Promise<void>;
}

export interface FakeConn {
  socket: net.Socket;
  /** Resolves once at least n bytes have arrived on this connection. */
  bytes(n: number): Promise<Buffer>;
  write(b: Buffer): void;
}

export async function fakeDaemon(script: (c: FakeConn) => void | Promise<void>): Promise<Fake> {
  const dir = tmpdir();
  const socketPath = path.join(dir, "keyhole.sock");
  const received: Buffer[] = [];
  const sockets = new Set<net.Socket>();
  const fake: Fake = {
    socketPath,
    dir,
    env: { KEYHOLE_SOCKET: socketPath, KEYHOLE_TOKEN: TEST_TOKEN_HEX },
    received,
    connections: 0,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    const index = fake.connections++;
    received[index] = Buffer.alloc(0);
    let waiters: Array<{ n: number; r: (b: Buffer) => void }> = [];
    socket.on("data", (d: Buffer) => {
      received[index] = Buffer.concat([received[index] as Buffer, d]);
      const got = received[index] as Buffer;
      waiters = waiters.filter((w) => {
        if (got.length >= w.n) {
          w.r(got);
          return false;
        }
        return true;
      });
    });
    socket.on("error", () => undefined);
    const conn: FakeConn = {
      socket,
      bytes: (n) =>
        new Promise((r) => {
          const got = received[index] as Buffer;
          if (got.length >= n) r(got);
          else waiters.push({ n, r });
        }),
      write: (b) => {
        if (!socket.destroyed) socket.write(b);
      },
    };
    void Promise.resolve(script(conn)).catch(() => socket.destroy());
  });
  await new Promise<void>((r) => server.listen(socketPath, () => r()));
  return fake;
}

/** Handshake (44) + the Expect of hub v2 (4 + 27) a HubClient sends first. */
export const HELLO_LEN = 44 + 31;

/** Raw bytes to the real daemon: returns the decoded frames it sent and how the connection ended. */
export async function raw(
  socketPath: string,
  parts: Buffer[],
  opts: { waitMs?: number } = {},
): Promise<{ frames: DaemonFrame[]; ended: "eof" | "econnreset" | null }> {
  const s = net.createConnection({ path: socketPath, allowHalfOpen: true });
  await new Promise<void>((r, j) => {
    s.once("connect", () => r());
    s.once("error", j);
  });
  let buf = Buffer.alloc(0);
  const frames: DaemonFrame[] = [];
  let ended: "eof" | "econnreset" | null = null;
  const done = new Promise<void>((r) => {
    s.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32LE(0)) {
        const n = buf.readUInt32LE(0);
        frames.push(decodeDaemonFrame(buf.subarray(4, 4 + n)));
        buf = buf.subarray(4 + n);
      }
    });
    s.on("end", () => {
      ended ??= "eof";
      r();
    });
    s.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code === "ECONNRESET") ended ??= "econnreset";
      r();
    });
    setTimeout(r, opts.waitMs ?? 1500);
  });
  for (const p of parts) s.write(p);
  await done;
  s.destroy();
  return { frames, ended };
}

export function tokenOf(d: Daemon): Buffer {
  return Buffer.from(fs.readFileSync(path.join(d.dir, "session-token"), "utf8").trim(), "hex");
}
