// Finding the socket and the token (section 11 and step 1 of section 16), and
// the checks a client makes on the token before sending it (checks 1 and 2).

import * as fs from "node:fs";
import * as path from "node:path";
import { ConfigError, TokenError } from "./errors.js";
import { TOKEN_LEN } from "./protocol.js";

export type Env = Record<string, string | undefined>;

/** Where the token comes from, first match wins (section 11). */
export type TokenSource =
  | { kind: "explicit"; token: Buffer }
  | { kind: "env"; variable: "KEYHOLE_TOKEN" }
  | { kind: "file"; path: string; origin: "option" | "KEYHOLE_TOKEN_FILE" | "runtime directory" };

export interface Discovered {
  socketPath: string;
  token: TokenSource;
  /** The uid the daemon must run as (check 3 / 3b). */
  daemonUid: number;
}

export interface DiscoverOptions {
  /** Socket path; overrides KEYHOLE_SOCKET. */
  socketPath?: string;
  /**
   * The token's text form (64 lowercase hex digits, optionally one "\n"), as
   * a Buffer. The client takes ownership: it overwrites the Buffer with zeros
   * once the token is decoded. Overrides KEYHOLE_TOKEN and the token files.
   */
  token?: Buffer;
  /** Token file; overrides KEYHOLE_TOKEN and KEYHOLE_TOKEN_FILE. */
  tokenFile?: string;
  /** The daemon's uid; overrides KEYHOLE_DAEMON_UID. */
  daemonUid?: number;
  /** The environment to read (default process.env). */
  env?: Env;
  /** The directory relative paths are resolved against (default process.cwd()). */
  cwd?: string;
}

function get(env: Env, name: string): string | undefined {
  const v = env[name];
  return v === undefined || v === "" ? undefined : v;
}

/** The runtime directory, or null when none of the three variables is set. */
export function runtimeDir(env: Env, cwd: string): string | null {
  const dir = get(env, "KEYHOLE_DIR");
  if (dir !== undefined) return path.resolve(cwd, dir);
  const xdg = get(env, "XDG_RUNTIME_DIR");
  if (xdg !== undefined) return path.resolve(cwd, xdg, "keyhole");
  const home = get(env, "HOME");
  if (home !== undefined) return path.resolve(cwd, home, ".keyhole");
  return null;
}

/** KEYHOLE_DAEMON_UID: ASCII decimal digits only, 0 to 4294967295, leading zeros allowed. */
export function parseDaemonUid(text: string): number {
  if (!/^[0-9]+$/.test(text)) {
    throw new ConfigError(`KEYHOLE_DAEMON_UID must be a uid in decimal digits (such as 1000), not ${JSON.stringify(text)}`);
  }
  const digits = text.replace(/^0+(?=.)/, "");
  const v = digits.length > 10 ? Infinity : Number(digits);
  if (v > 0xffff_ffff) {
    throw new ConfigError(`KEYHOLE_DAEMON_UID must be at most 4294967295, not ${text}`);
  }
  return v;
}

function noRuntimeDir(): ConfigError {
  return new ConfigError(
    "no runtime directory: none of KEYHOLE_DIR, XDG_RUNTIME_DIR and HOME is set; " +
      "set KEYHOLE_DIR to the daemon's directory, or KEYHOLE_SOCKET and the token (KEYHOLE_TOKEN or KEYHOLE_TOKEN_FILE)",
  );
}

export function discover(opts: DiscoverOptions = {}): Discovered {
  const env = opts.env ?? process.env;
  const cwd = opts.cwd ?? process.cwd();
  let dir: string | null | undefined;
  const needDir = (): string => {
    if (dir === undefined) dir = runtimeDir(env, cwd);
    if (dir === null) throw noRuntimeDir();
    return dir;
  };

  let daemonUid: number;
  if (opts.daemonUid !== undefined) {
    if (!Number.isInteger(opts.daemonUid) || opts.daemonUid < 0 || opts.daemonUid > 0xffff_ffff) {
      throw new ConfigError(`daemonUid must be a uid from 0 to 4294967295, not ${opts.daemonUid}`);
    }
    daemonUid = opts.daemonUid;
  } else {
    const text = get(env, "KEYHOLE_DAEMON_UID");
    daemonUid = text === undefined ? process.geteuid!() : parseDaemonUid(text);
  }

  let token: TokenSource;
  if (opts.token !== undefined) token = { kind: "explicit", token: opts.token };
  else if (opts.tokenFile !== undefined) token = { kind: "file", path: path.resolve(cwd, opts.tokenFile), origin: "option" };
  else if (get(env, "KEYHOLE_TOKEN") !== undefined) token = { kind: "env", variable: "KEYHOLE_TOKEN" };
  else {
    const file = get(env, "KEYHOLE_TOKEN_FILE");
    if (file !== undefined) token = { kind: "file", path: path.resolve(cwd, file), origin: "KEYHOLE_TOKEN_FILE" };
    else token = { kind: "file", path: path.join(needDir(), "session-token"), origin: "runtime directory" };
  }

  const sock = opts.socketPath ?? get(env, "KEYHOLE_SOCKET");
  const socketPath = sock !== undefined ? path.resolve(cwd, sock) : path.join(needDir(), "keyhole.sock");
  return { socketPath, token, daemonUid };
}

function hexValue(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  return -1;
}

/**
 * Decodes the token's text form: exactly 64 lowercase hex digits, optionally
 * followed by one "\n", and nothing else. Returns a fresh 32-byte Buffer the
 * caller zeroes. The error never quotes the token.
 */
export function parseTokenText(text: Buffer, what: string): Buffer {
  const n = text.length;
  if (!(n === 64 || (n === 65 && text[64] === 0x0a))) {
    throw new TokenError(`${what} must hold exactly 64 lowercase hexadecimal characters and at most one "\\n" (it holds ${n} bytes)`);
  }
  const out = Buffer.alloc(TOKEN_LEN);
  for (let i = 0; i < TOKEN_LEN; i++) {
    const hi = hexValue(text[2 * i] as number);
    const lo = hexValue(text[2 * i + 1] as number);
    if (hi < 0 || lo < 0) {
      out.fill(0);
      throw new TokenError(`${what} must hold only lowercase hexadecimal characters (0-9, a-f) before its optional "\\n"`);
    }
    out[i] = hi * 16 + lo;
  }
  return out;
}

/** How much of a token file is read at most: more than 65 bytes is an error anyway. */
const TOKEN_FILE_READ_LIMIT = 256;

/** Check 1 of section 11: opens without blocking, checks with fstat on the open descriptor, reads at most 256 bytes. */
export async function readTokenFile(file: string): Promise<Buffer> {
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK | fs.constants.O_NOCTTY);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === "ENOENT") throw new TokenError(`no token file at ${file} (is the daemon running?)`);
    throw new TokenError(`cannot open the token file ${file}: ${err.code ?? err.message}`);
  }
  const text = Buffer.alloc(TOKEN_FILE_READ_LIMIT);
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new TokenError(`the token file ${file} is not a regular file`);
    const euid = process.geteuid!();
    if (st.uid !== euid) throw new TokenError(`the token file ${file} belongs to uid ${st.uid}, not to this process's uid ${euid}`);
    if ((st.mode & 0o077) !== 0) {
      throw new TokenError(
        `the token file ${file} has mode ${(st.mode & 0o777).toString(8).padStart(4, "0")}: group or others have permissions (it must be 0600 or stricter)`,
      );
    }
    let got = 0;
    for (;;) {
      const { bytesRead } = await fh.read(text, got, text.length - got, null);
      if (bytesRead === 0) break;
      got += bytesRead;
      if (got === text.length) break;
    }
    return parseTokenText(text.subarray(0, got), `the token file ${file}`);
  } finally {
    text.fill(0);
    await fh.close();
  }
}

/** Reads the token from its source and makes checks 1 or 2. The returned 32 bytes are the caller's to zero. */
export async function loadToken(source: TokenSource, env: Env = process.env): Promise<Buffer> {
  switch (source.kind) {
    case "explicit":
      try {
        return parseTokenText(source.token, "the token given");
      } finally {
        source.token.fill(0);
      }
    case "env": {
      // The environment's string cannot be wiped; its Buffer copy is.
      const text = Buffer.from(env.KEYHOLE_TOKEN ?? "", "utf8");
      try {
        return parseTokenText(text, "KEYHOLE_TOKEN");
      } finally {
        text.fill(0);
      }
    }
    case "file":
      return readTokenFile(source.path);
  }
}
