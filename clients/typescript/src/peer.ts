// Check 3b of section 11, for a runtime without peer credentials (Node.js has
// neither SO_PEERCRED nor getpeereid): the socket file's owner and its
// directory, with lstat, once before connecting and once right after the
// connection is established, before anything is sent.
//
// What it proves: the file at the path was created by the expected uid (or
// root) in a directory no other non-root user can change, so no other user
// can have put a socket of their own there or swapped one in between the
// check and the connect. What it does not prove: who holds the listening end
// now (a process of the expected uid may have handed the listening socket to
// a process of another uid, which SO_PEERCRED would catch), nor anything
// about directories further up the path.

import * as fs from "node:fs";
import * as path from "node:path";
import { DaemonNotRunningError, PeerCheckError } from "./errors.js";

export interface PeerSnapshot {
  sockDev: bigint;
  sockIno: bigint;
  dirDev: bigint;
  dirIno: bigint;
}

function describeType(st: fs.BigIntStats): string {
  if (st.isSymbolicLink()) return "a symbolic link";
  if (st.isDirectory()) return "a directory";
  if (st.isFile()) return "a regular file";
  if (st.isFIFO()) return "a FIFO";
  if (st.isSocket()) return "a socket";
  return "not a socket";
}

/**
 * One half of check 3b. `when` is "before connecting" or "after connecting".
 * Throws PeerCheckError naming the path and the check that failed (or
 * DaemonNotRunningError when there is no socket before connecting).
 */
export async function peerSnapshot(socketPath: string, expectedUid: number, when: string): Promise<PeerSnapshot> {
  if (!path.isAbsolute(socketPath)) {
    throw new PeerCheckError(`check 3b (${when}): the socket path ${socketPath} is not absolute, so its directory cannot be examined`, socketPath);
  }
  const dir = path.dirname(socketPath);
  if (dir === socketPath) {
    throw new PeerCheckError(`check 3b (${when}): the socket path ${socketPath} has no parent directory`, socketPath);
  }
  let sock: fs.BigIntStats;
  try {
    sock = await fs.promises.lstat(socketPath, { bigint: true });
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === "ENOENT" && when === "before connecting") {
      throw new DaemonNotRunningError(`the daemon is not running: no socket at ${socketPath}`, socketPath);
    }
    throw new PeerCheckError(`check 3b (${when}): cannot lstat the socket ${socketPath}: ${err.code ?? err.message}`, socketPath);
  }
  if (!sock.isSocket()) {
    throw new PeerCheckError(`check 3b (${when}): ${socketPath} is ${describeType(sock)}, not a socket`, socketPath);
  }
  if (sock.uid !== BigInt(expectedUid)) {
    throw new PeerCheckError(
      `check 3b (${when}): the socket ${socketPath} belongs to uid ${sock.uid}, not to the daemon's expected uid ${expectedUid}; the token was not sent`,
      socketPath,
    );
  }
  let d: fs.BigIntStats;
  try {
    d = await fs.promises.lstat(dir, { bigint: true });
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new PeerCheckError(`check 3b (${when}): cannot lstat the socket's directory ${dir}: ${err.code ?? err.message}`, socketPath);
  }
  if (!d.isDirectory()) {
    throw new PeerCheckError(`check 3b (${when}): the socket's directory ${dir} is ${describeType(d)}, not a directory`, socketPath);
  }
  if (d.uid !== BigInt(expectedUid) && d.uid !== 0n) {
    throw new PeerCheckError(
      `check 3b (${when}): the socket's directory ${dir} belongs to uid ${d.uid}, neither the expected uid ${expectedUid} nor root`,
      socketPath,
    );
  }
  if ((d.mode & 0o022n) !== 0n) {
    throw new PeerCheckError(
      `check 3b (${when}): group or others may write to the socket's directory ${dir} (mode ${(d.mode & 0o777n).toString(8).padStart(4, "0")})`,
      socketPath,
    );
  }
  return { sockDev: sock.dev, sockIno: sock.ino, dirDev: d.dev, dirIno: d.ino };
}

/** The second half: the same socket file and the same directory as before connecting. */
export function samePeer(before: PeerSnapshot, after: PeerSnapshot, socketPath: string): void {
  if (before.sockDev !== after.sockDev || before.sockIno !== after.sockIno) {
    throw new PeerCheckError(`check 3b: the socket ${socketPath} was replaced between the check and the connect`, socketPath);
  }
  if (before.dirDev !== after.dirDev || before.dirIno !== after.dirIno) {
    throw new PeerCheckError(`check 3b: the directory of ${socketPath} was replaced between the check and the connect`, socketPath);
  }
}
