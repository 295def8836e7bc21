// Errors: what the client itself finds (configuration, token, peer check,
// protocol errors, the end of a connection) and what the daemon reports in
// an Error frame, one class per code (sections 8 and 13).

import type { CloseReason } from "./protocol.js";

/** Base class of every error this library throws. */
export class KeyholeError extends Error {
  override name = "KeyholeError";
}

/** The environment or the options are unusable (no runtime directory, a bad KEYHOLE_DAEMON_UID, ...). Nothing was sent. */
export class ConfigError extends KeyholeError {
  override name = "ConfigError";
}

/** The token, or its file, fails check 1 or 2 of section 11. Nothing was sent; the message never quotes the token. */
export class TokenError extends KeyholeError {
  override name = "TokenError";
}

/** Check 3b of section 11 failed: the token was not sent. */
export class PeerCheckError extends KeyholeError {
  override name = "PeerCheckError";
  constructor(
    message: string,
    readonly path: string,
  ) {
    super(message);
  }
}

/** No socket at the path (ENOENT) or nobody listening on it (ECONNREFUSED). */
export class DaemonNotRunningError extends KeyholeError {
  override name = "DaemonNotRunningError";
  constructor(
    message: string,
    readonly path: string,
  ) {
    super(message);
  }
}

/** The daemon stayed busy (EAGAIN, TooManyUnauthenticated, TooManyConnections) until the connect timeout passed. */
export class DaemonBusyError extends KeyholeError {
  override name = "DaemonBusyError";
  constructor(
    message: string,
    readonly last: DaemonError | null,
  ) {
    super(message);
  }
}

/** Welcome names another service (or version) than the one the client speaks (section 7). */
export class WrongServiceError extends KeyholeError {
  override name = "WrongServiceError";
  constructor(
    readonly served: string,
    readonly servedVersion: number,
    readonly expected: string,
    readonly expectedVersion: number,
  ) {
    super(
      `the daemon serves ${JSON.stringify(served)} version ${servedVersion}, not ${JSON.stringify(expected)} version ${expectedVersion}`,
    );
  }
}

/** The daemon broke the protocol; the client closed the connection (sections 4, 5, 7). */
export class ProtocolError extends KeyholeError {
  override name = "ProtocolError";
}

/** A request was refused locally, before sending (a subject that is not valid, a frame over the limit, ...). */
export class RequestRefusedError extends KeyholeError {
  override name = "RequestRefusedError";
}

/** A wait passed its deadline. */
export class TimeoutError extends KeyholeError {
  override name = "TimeoutError";
}

/**
 * The connection is over. `reason` says why: the daemon's final frame
 * (`Closing` or an `Error` that closes), a protocol error, the client's own
 * close, or nothing (dropped without a final frame). `transport` is how the
 * end was seen: "eof", "econnreset", or null if the client closed first.
 */
export class ConnectionClosedError extends KeyholeError {
  override name = "ConnectionClosedError";
  constructor(
    message: string,
    readonly reason:
      | { kind: "closing"; reason: CloseReason }
      | { kind: "error"; error: DaemonError }
      | { kind: "protocol"; error: ProtocolError }
      | { kind: "local" }
      | { kind: "dropped"; writeError: NodeJS.ErrnoException | null },
    readonly transport: "eof" | "econnreset" | null,
  ) {
    super(message);
  }
}

/** An Error frame of the daemon. `id` is the failed request's id, or null for an error about the connection. */
export class DaemonError extends KeyholeError {
  override name = "DaemonError";
  /** The code's name ("BadToken", "hub.NoResponders"), or "Unknown(n)" for a service code this client does not know. */
  readonly codeName: string;
  constructor(
    readonly code: number,
    readonly id: bigint | null,
    /** The daemon's text. For people only: never parse it. */
    readonly daemonMessage: string,
    codeName?: string,
  ) {
    const n = codeName ?? codeInfo(code)?.name ?? `service error ${code}`;
    super(`${n} (${code}): ${daemonMessage}`);
    this.codeName = n;
  }
}

/** A handshake refused by the daemon: an Error with the id absent and a code of 0 to 7 or 13 as the first frame. */
export class HandshakeRefusedError extends DaemonError {}
export class HandshakeExpectedError extends HandshakeRefusedError {}
export class BadMagicError extends HandshakeRefusedError {}
export class UnsupportedVersionError extends HandshakeRefusedError {}
export class BadTokenError extends HandshakeRefusedError {}
export class AuthTimeoutError extends HandshakeRefusedError {}
export class PeerNotAllowedError extends HandshakeRefusedError {}
export class TooManyUnauthenticatedError extends HandshakeRefusedError {}
export class TooManyConnectionsError extends HandshakeRefusedError {}
export class ShuttingDownError extends HandshakeRefusedError {}
export class FrameTooLargeError extends DaemonError {}
export class MalformedError extends DaemonError {}
export class UnknownRequestError extends DaemonError {}
export class BadRequestError extends DaemonError {}
export class NotPermittedError extends DaemonError {}
export class InternalError extends DaemonError {}
export class OverBudgetError extends DaemonError {}
export class DaemonWrongServiceError extends DaemonError {}
/** 17: a CallFds on a connection that has not sent AcceptFds (section 19). This client sends neither. */
export class DescriptorsNotAcceptedError extends DaemonError {}
/** 18: descriptors that no frame announces, or a frame whose descriptors did not arrive with it (section 19.4). */
export class DescriptorMismatchError extends DaemonError {}
/** 19: a CallFds announcing 0 or more than 8 descriptors, or more than 8 in one read (section 19.4). */
export class TooManyDescriptorsError extends DaemonError {}

/** A service's error (code 1000 and up): it fails one request; the connection stays open. */
export class ServiceError extends DaemonError {}
export class InvalidTopicError extends ServiceError {}
export class HubShuttingDownError extends ServiceError {}
export class TooManySubscriptionsError extends ServiceError {}
export class SidInUseError extends ServiceError {}
export class NoRespondersError extends ServiceError {}
export class BusyError extends ServiceError {}
export class TooManyNamesError extends ServiceError {}
export class TooLargeError extends ServiceError {}
/** 1008: a PublishMemfd whose descriptor is not a sealed memfd of at most 1 GiB, or a hub request carrying descriptors it should not (section 19.5). */
export class BadMemfdError extends ServiceError {}

type ErrorClass = new (code: number, id: bigint | null, message: string, codeName?: string) => DaemonError;

interface CodeInfo {
  name: string;
  /** Whether the id is present (section 8's table). */
  hasId: boolean;
  cls: ErrorClass;
}

/** Section 8: the transport's codes. */
const TRANSPORT: ReadonlyArray<CodeInfo> = [
  { name: "HandshakeExpected", hasId: false, cls: HandshakeExpectedError },
  { name: "BadMagic", hasId: false, cls: BadMagicError },
  { name: "UnsupportedVersion", hasId: false, cls: UnsupportedVersionError },
  { name: "BadToken", hasId: false, cls: BadTokenError },
  { name: "AuthTimeout", hasId: false, cls: AuthTimeoutError },
  { name: "PeerNotAllowed", hasId: false, cls: PeerNotAllowedError },
  { name: "TooManyUnauthenticated", hasId: false, cls: TooManyUnauthenticatedError },
  { name: "TooManyConnections", hasId: false, cls: TooManyConnectionsError },
  { name: "FrameTooLarge", hasId: false, cls: FrameTooLargeError },
  { name: "Malformed", hasId: false, cls: MalformedError },
  { name: "UnknownRequest", hasId: true, cls: UnknownRequestError },
  { name: "BadRequest", hasId: true, cls: BadRequestError },
  { name: "NotPermitted", hasId: true, cls: NotPermittedError },
  { name: "ShuttingDown", hasId: false, cls: ShuttingDownError },
  { name: "Internal", hasId: true, cls: InternalError },
  { name: "OverBudget", hasId: false, cls: OverBudgetError },
  { name: "WrongService", hasId: false, cls: DaemonWrongServiceError },
  { name: "DescriptorsNotAccepted", hasId: true, cls: DescriptorsNotAcceptedError },
  { name: "DescriptorMismatch", hasId: false, cls: DescriptorMismatchError },
  { name: "TooManyDescriptors", hasId: false, cls: TooManyDescriptorsError },
];

/** Section 13: the hub's codes, sent as 1000 + n. */
const HUB: ReadonlyArray<CodeInfo> = [
  { name: "InvalidTopic", hasId: true, cls: InvalidTopicError },
  { name: "ShuttingDown", hasId: true, cls: HubShuttingDownError },
  { name: "TooManySubscriptions", hasId: true, cls: TooManySubscriptionsError },
  { name: "SidInUse", hasId: true, cls: SidInUseError },
  { name: "NoResponders", hasId: true, cls: NoRespondersError },
  { name: "Busy", hasId: true, cls: BusyError },
  { name: "TooManyNames", hasId: true, cls: TooManyNamesError },
  { name: "TooLarge", hasId: true, cls: TooLargeError },
  { name: "BadMemfd", hasId: true, cls: BadMemfdError },
].map((c) => ({ ...c, name: `hub.${c.name}` }));

/** Codes a pending connection can get (section 4): 0 to 7 and 13. */
export function isHandshakeCode(code: number): boolean {
  return (code >= 0 && code <= 7) || code === 13;
}

/** Codes that mean "busy": connect again (section 9, "Admission"). */
export function isBusyCode(code: number): boolean {
  return code === 6 || code === 7;
}

export function codeInfo(code: number): CodeInfo | undefined {
  if (code < 1000) return TRANSPORT[code];
  return HUB[code - 1000];
}

/** Whether a code below 1000 is defined (a code below 1000 not in the table is a protocol error). */
export function isKnownTransportCode(code: number): boolean {
  return code < TRANSPORT.length;
}

/** Whether an Error with this code must carry an id (service codes always do). */
export function codeHasId(code: number): boolean {
  if (code >= 1000) return true;
  const info = TRANSPORT[code];
  if (info === undefined) throw new RangeError(`no transport code ${code}`);
  return info.hasId;
}

/**
 * Why an Error frame received after Welcome is a protocol error, or null if it
 * is not: a code below 1000 that is not in section 8's table, or an id
 * presence that contradicts it (a service code always has an id).
 */
export function errorFrameProblem(code: number, id: bigint | null): string | null {
  if (code < 1000 && !isKnownTransportCode(code)) return `transport code ${code}, which is not defined`;
  if (codeHasId(code) !== (id !== null)) {
    return `code ${code} ${id === null ? "without an id" : `with id ${id}`}, against the table of section 8`;
  }
  return null;
}

/** The typed error for an Error frame. */
export function daemonError(code: number, id: bigint | null, message: string): DaemonError {
  const info = codeInfo(code);
  if (info !== undefined) return new info.cls(code, id, message, info.name);
  // A service code this client does not know: it fails that request only, reported with its number.
  return new ServiceError(code, id, message, `service error ${code}`);
}

/** A hub Request answered Requested whose Response was not a Reply (section 14). */
export class RequestOutcomeError extends KeyholeError {
  override name = "RequestOutcomeError";
}
/** The responder's connection ended before it answered. */
export class ResponderGoneError extends RequestOutcomeError {}
/** The request's timeout passed before an answer (the daemon's Timeout outcome). */
export class RequestTimeoutError extends RequestOutcomeError {}
/** The responder's reply would not fit in a frame; `len` is its payload length. */
export class ReplyTooLargeError extends RequestOutcomeError {
  constructor(
    message: string,
    readonly len: bigint,
  ) {
    super(message);
  }
}
/** The responder sent Fail{Failed{message}}. */
export class RequestFailedError extends RequestOutcomeError {
  constructor(readonly responderMessage: string) {
    super(`the responder failed the request: ${responderMessage}`);
  }
}
