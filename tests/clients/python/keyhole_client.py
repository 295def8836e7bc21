"""A keyhole client written from ``proto-spec.md`` alone, standard library only.

keyhole is a local message hub served by ``keyholed`` over a Unix domain
socket. A client must prove that it holds the session token before anything
is served. This module implements protocol version 1:

* locating the socket and the token (section 11 of the spec): ``KEYHOLE_SOCKET``,
  ``KEYHOLE_TOKEN``, ``KEYHOLE_TOKEN_FILE``, ``KEYHOLE_DIR``,
  ``$XDG_RUNTIME_DIR/keyhole``, ``$HOME/.keyhole``;
* the token file checks (regular file, ours, no group/other bits, exactly one
  token) and the peer uid check (``SO_PEERCRED``) before the token is sent;
* the handshake, ``Welcome``, requests with ids, pipelining, events interleaved
  with replies, ``Error`` and ``Closing`` frames;
* encoders and decoders for every message, written from the byte rules of
  sections 3 to 8 (all integers little-endian).

The module is importable as a library (``KeyholeClient.connect()``) and has a
tiny command line for manual use: ``python3 keyhole_client.py ping``.
"""

from __future__ import annotations

import collections
import enum
import os
import select
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

# --------------------------------------------------------------------------
# Constants (sections 3, 4, 10, 11)
# --------------------------------------------------------------------------

MAGIC: bytes = b"KYHL"
"""Handshake magic, ASCII ``KYHL``."""

PROTOCOL_VERSION: int = 1
"""The protocol version this client speaks."""

TOKEN_LEN: int = 32
"""Raw token length in bytes."""

HANDSHAKE_PAYLOAD_LEN: int = 40
"""Payload length of the handshake frame: magic (4) + version (4) + token (32)."""

PROTOCOL_MAX_FRAME_LEN: int = 16 * 1024 * 1024
"""The protocol ceiling on a frame payload, and the limit used before ``Welcome``."""

MAX_TOPIC_LEN: int = 255
"""Longest topic, in bytes of UTF-8."""

MAX_TOKEN_FILE_READ: int = 512
"""A token file is never read past this many bytes (the valid content is 65)."""

SOCKET_NAME: str = "keyhole.sock"
TOKEN_FILE_NAME: str = "session-token"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LEN = _U32  # the frame length prefix is a little-endian u32


# --------------------------------------------------------------------------
# Enumerations (sections 7 and 8)
# --------------------------------------------------------------------------


class ErrorCode(enum.IntEnum):
    """The ``ErrorCode`` enum of section 8 (encoded as its ``u32`` tag)."""

    HandshakeExpected = 0
    BadMagic = 1
    UnsupportedVersion = 2
    BadToken = 3
    AuthTimeout = 4
    PeerNotAllowed = 5
    TooManyUnauthenticated = 6
    TooManyConnections = 7
    FrameTooLarge = 8
    Malformed = 9
    UnknownRequest = 10
    InvalidTopic = 11
    NotPermitted = 12
    ShuttingDown = 13


ERRORS_THAT_CLOSE: frozenset = frozenset(
    code for code in ErrorCode
    if code not in (ErrorCode.UnknownRequest, ErrorCode.InvalidTopic, ErrorCode.NotPermitted)
)
"""Codes after which the daemon closes the connection (section 8, "closes")."""


class CloseReason(enum.IntEnum):
    """The ``CloseReason`` carried by ``Closing`` (section 7)."""

    Shutdown = 0
    SlowConsumer = 1


class RequestTag(enum.IntEnum):
    """``RequestBody`` variant tags (section 6)."""

    Ping = 0
    Status = 1
    Subscribe = 2
    Unsubscribe = 3
    Publish = 4
    Shutdown = 5


class ServerTag(enum.IntEnum):
    """``ServerMessage`` variant tags (section 7)."""

    Welcome = 0
    Pong = 1
    StatusReport = 2
    Ack = 3
    Event = 4
    Error = 5
    Closing = 6


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------


class KeyholeException(Exception):
    """Root of every exception raised by this module."""


class ConfigError(KeyholeException):
    """The socket or the token could not be located (no runtime directory, ...)."""


class TokenError(KeyholeException):
    """The token is missing or unusable. Messages never quote the token."""


class TokenNotFoundError(TokenError):
    """Neither ``KEYHOLE_TOKEN`` nor a token file was found."""


class TokenPermissionError(TokenError):
    """The token file is not a regular file, not ours, or readable by group/others."""


class TokenFormatError(TokenError):
    """The token text is not exactly 64 lowercase hex digits (and an optional ``\\n``)."""


class DaemonNotRunning(KeyholeException):
    """Nothing listens at the socket path (no socket file, or a stale one)."""


class PeerCredentialsError(KeyholeException):
    """The process at the other end of the socket is not running as our uid,
    or its uid could not be determined. The token was not sent."""


class ProtocolError(KeyholeException):
    """The daemon sent bytes this client cannot accept. The connection is closed."""


class DecodeError(ProtocolError):
    """A payload does not decode (truncated, trailing bytes, unknown tag, bad
    UTF-8, bad option byte)."""


class FrameTooLargeError(ProtocolError):
    """A length prefix from the daemon is over the receive limit."""


class ConnectionClosed(KeyholeException):
    """The connection ended.

    ``reset`` is True when the end was ECONNRESET rather than a clean end of
    stream; ``final_frame`` is the daemon's last frame (an ``Error`` that
    closes, or ``Closing``), or None if the connection ended without one.
    """

    def __init__(self, message: str, *, reset: bool = False,
                 final_frame: Optional["ServerMessage"] = None) -> None:
        super().__init__(message)
        self.reset = reset
        self.final_frame = final_frame


class DaemonClosing(ConnectionClosed):
    """The daemon sent ``Closing``; ``reason`` says why."""

    def __init__(self, reason: CloseReason, final_frame: "Closing") -> None:
        super().__init__(f"daemon closed the connection: {reason.name}", final_frame=final_frame)
        self.reason = reason


class KeyholeError(KeyholeException):
    """An ``Error`` frame from the daemon.

    ``code`` is the numeric ``ErrorCode`` tag, ``name`` its name, ``id`` the
    request id it answers (None for errors about the connection), ``message``
    the daemon's text (for humans only), ``closes`` whether the daemon closes
    the connection after it.
    """

    code: int = -1
    name: str = "KeyholeError"

    def __init__(self, message: str = "", id: Optional[int] = None) -> None:  # noqa: A002
        super().__init__(f"{self.name} ({self.code}): {message}")
        self.message = message
        self.id = id

    @property
    def closes(self) -> bool:
        """Whether the daemon closes the connection after this error."""
        return self.code in ERRORS_THAT_CLOSE

    @staticmethod
    def from_frame(frame: "Error") -> "KeyholeError":
        """Build the exception subclass matching ``frame.code``."""
        return ERROR_CLASSES[frame.code](frame.message, frame.id)


def _error_class(code: ErrorCode) -> Type[KeyholeError]:
    """Make the ``KeyholeError`` subclass for one code, e.g. ``BadTokenError``."""
    return type(
        f"{code.name}Error",
        (KeyholeError,),
        {"code": int(code), "name": code.name,
         "__doc__": f"``Error {code.name}`` (code {int(code)}) from the daemon.",
         "__module__": __name__},
    )


ERROR_CLASSES: Dict[ErrorCode, Type[KeyholeError]] = {code: _error_class(code) for code in ErrorCode}
"""One ``KeyholeError`` subclass per error code."""

HandshakeExpectedError = ERROR_CLASSES[ErrorCode.HandshakeExpected]
BadMagicError = ERROR_CLASSES[ErrorCode.BadMagic]
UnsupportedVersionError = ERROR_CLASSES[ErrorCode.UnsupportedVersion]
BadTokenError = ERROR_CLASSES[ErrorCode.BadToken]
AuthTimeoutError = ERROR_CLASSES[ErrorCode.AuthTimeout]
PeerNotAllowedError = ERROR_CLASSES[ErrorCode.PeerNotAllowed]
TooManyUnauthenticatedError = ERROR_CLASSES[ErrorCode.TooManyUnauthenticated]
TooManyConnectionsError = ERROR_CLASSES[ErrorCode.TooManyConnections]
FrameTooLargeDaemonError = ERROR_CLASSES[ErrorCode.FrameTooLarge]
MalformedError = ERROR_CLASSES[ErrorCode.Malformed]
UnknownRequestError = ERROR_CLASSES[ErrorCode.UnknownRequest]
InvalidTopicError = ERROR_CLASSES[ErrorCode.InvalidTopic]
NotPermittedError = ERROR_CLASSES[ErrorCode.NotPermitted]
ShuttingDownError = ERROR_CLASSES[ErrorCode.ShuttingDown]


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    """``RequestBody::Ping`` (tag 0), answered with ``Pong``."""


@dataclass(frozen=True)
class StatusRequest:
    """``RequestBody::Status`` (tag 1), answered with ``StatusReport``."""


@dataclass(frozen=True)
class Subscribe:
    """``RequestBody::Subscribe`` (tag 2), answered with ``Ack``."""

    topic: str


@dataclass(frozen=True)
class Unsubscribe:
    """``RequestBody::Unsubscribe`` (tag 3), answered with ``Ack``."""

    topic: str


@dataclass(frozen=True)
class Publish:
    """``RequestBody::Publish`` (tag 4), answered with ``Ack``."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Shutdown:
    """``RequestBody::Shutdown`` (tag 5), answered with ``Ack`` then ``Closing{Shutdown}``."""


RequestBody = Union[Ping, StatusRequest, Subscribe, Unsubscribe, Publish, Shutdown]


@dataclass(frozen=True)
class Request:
    """A request: the client's id and a body (section 6)."""

    id: int
    body: RequestBody


@dataclass(frozen=True)
class Status:
    """The ``Status`` record carried by ``StatusReport``."""

    authenticated: int
    pending: int
    topics: int
    subscribers: int
    uptime_ms: int
    version: str


@dataclass(frozen=True)
class Welcome:
    """``ServerMessage::Welcome`` (tag 0): the first frame of an authenticated connection."""

    protocol_version: int
    daemon_version: str
    connection_id: int
    max_frame_len: int


@dataclass(frozen=True)
class Pong:
    """``ServerMessage::Pong`` (tag 1)."""

    id: int


@dataclass(frozen=True)
class StatusReport:
    """``ServerMessage::StatusReport`` (tag 2)."""

    id: int
    status: Status


@dataclass(frozen=True)
class Ack:
    """``ServerMessage::Ack`` (tag 3)."""

    id: int


@dataclass(frozen=True)
class Event:
    """``ServerMessage::Event`` (tag 4): a payload published on a subscribed topic."""

    topic: str
    sequence: int
    payload: bytes


@dataclass(frozen=True)
class Error:
    """``ServerMessage::Error`` (tag 5)."""

    id: Optional[int]
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Closing:
    """``ServerMessage::Closing`` (tag 6): no frame follows it."""

    reason: CloseReason


ServerMessage = Union[Welcome, Pong, StatusReport, Ack, Event, Error, Closing]
Reply = Union[Pong, StatusReport, Ack, Error]


# --------------------------------------------------------------------------
# Encoding (section 5: no padding, no field names, little-endian integers)
# --------------------------------------------------------------------------


def _u32(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"{value} does not fit in a u32")
    return _U32.pack(value)


def _u64(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"{value} does not fit in a u64")
    return _U64.pack(value)


def _option_u64(value: Optional[int]) -> bytes:
    return b"\x00" if value is None else b"\x01" + _u64(value)


def _bytes_field(value: bytes) -> bytes:
    return _u64(len(value)) + bytes(value)


def _string(value: str) -> bytes:
    return _bytes_field(value.encode("utf-8"))


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length as a little-endian u32 (section 3).

    The prefix counts the payload only, not its own 4 bytes.
    """
    return _LEN.pack(len(payload)) + payload


def encode_request_payload(request: Request) -> bytes:
    """Encode a request's payload (no length prefix)."""
    body = request.body
    head = _u64(request.id)
    if isinstance(body, Ping):
        return head + _u32(RequestTag.Ping)
    if isinstance(body, StatusRequest):
        return head + _u32(RequestTag.Status)
    if isinstance(body, Subscribe):
        return head + _u32(RequestTag.Subscribe) + _string(body.topic)
    if isinstance(body, Unsubscribe):
        return head + _u32(RequestTag.Unsubscribe) + _string(body.topic)
    if isinstance(body, Publish):
        return head + _u32(RequestTag.Publish) + _string(body.topic) + _bytes_field(body.payload)
    if isinstance(body, Shutdown):
        return head + _u32(RequestTag.Shutdown)
    raise TypeError(f"not a request body: {body!r}")


def encode_request(request: Request) -> bytes:
    """Encode a request as a complete frame, length prefix included."""
    return frame(encode_request_payload(request))


def encode_server_message_payload(message: ServerMessage) -> bytes:
    """Encode a daemon message's payload (used by the tests to round-trip vectors)."""
    if isinstance(message, Welcome):
        return (_u32(ServerTag.Welcome) + _u32(message.protocol_version) + _string(message.daemon_version)
                + _u64(message.connection_id) + _u32(message.max_frame_len))
    if isinstance(message, Pong):
        return _u32(ServerTag.Pong) + _u64(message.id)
    if isinstance(message, StatusReport):
        s = message.status
        return (_u32(ServerTag.StatusReport) + _u64(message.id) + _u64(s.authenticated) + _u64(s.pending)
                + _u64(s.topics) + _u64(s.subscribers) + _u64(s.uptime_ms) + _string(s.version))
    if isinstance(message, Ack):
        return _u32(ServerTag.Ack) + _u64(message.id)
    if isinstance(message, Event):
        return _u32(ServerTag.Event) + _string(message.topic) + _u64(message.sequence) + _bytes_field(message.payload)
    if isinstance(message, Error):
        return _u32(ServerTag.Error) + _option_u64(message.id) + _u32(message.code) + _string(message.message)
    if isinstance(message, Closing):
        return _u32(ServerTag.Closing) + _u32(message.reason)
    raise TypeError(f"not a server message: {message!r}")


def encode_server_message(message: ServerMessage) -> bytes:
    """Encode a daemon message as a complete frame."""
    return frame(encode_server_message_payload(message))


def encode_handshake(token: Union[bytes, bytearray, memoryview]) -> bytearray:
    """Build the 44-byte handshake frame (section 4) in a ``bytearray``.

    The caller should :func:`wipe` the result once it has been sent.
    """
    if len(token) != TOKEN_LEN:
        raise ValueError(f"a token is {TOKEN_LEN} bytes")
    out = bytearray(4 + HANDSHAKE_PAYLOAD_LEN)
    _LEN.pack_into(out, 0, HANDSHAKE_PAYLOAD_LEN)
    out[4:8] = MAGIC
    _U32.pack_into(out, 8, PROTOCOL_VERSION)
    out[12:44] = token
    return out


def wipe(buffer: Union[bytearray, memoryview]) -> None:
    """Overwrite a mutable buffer with zeros (for token copies)."""
    for i in range(len(buffer)):
        buffer[i] = 0


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


class _Reader:
    """Reads the section 5 types from one payload, refusing to run past its end."""

    def __init__(self, payload: Union[bytes, bytearray, memoryview]) -> None:
        self._buf = memoryview(payload)
        self._pos = 0

    def _take(self, n: int, what: str) -> memoryview:
        if n > len(self._buf) - self._pos:
            raise DecodeError(f"{what}: needs {n} bytes, {len(self._buf) - self._pos} left")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def u32(self, what: str) -> int:
        return _U32.unpack(self._take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack(self._take(8, what))[0]

    def option_u64(self, what: str) -> Optional[int]:
        presence = self.u8(what + " presence")
        if presence == 0:
            return None
        if presence == 1:
            return self.u64(what)
        raise DecodeError(f"{what}: option presence byte {presence} (only 0 and 1 are valid)")

    def raw_bytes(self, what: str) -> bytes:
        n = self.u64(what + " length")
        # The length is checked against the bytes left before anything is allocated.
        return bytes(self._take(n, what))

    def string(self, what: str) -> str:
        raw = self.raw_bytes(what)
        try:
            return raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as err:
            raise DecodeError(f"{what}: not valid UTF-8 ({err.reason})") from None

    def enum(self, kind: Type[enum.IntEnum], what: str) -> enum.IntEnum:
        tag = self.u32(what)
        try:
            return kind(tag)
        except ValueError:
            raise DecodeError(f"{what}: unknown tag {tag}") from None

    def finish(self) -> None:
        left = len(self._buf) - self._pos
        if left:
            raise DecodeError(f"{left} trailing byte(s) after the message")


def decode_server_message(payload: Union[bytes, bytearray, memoryview]) -> ServerMessage:
    """Decode one daemon payload (no length prefix) or raise :class:`DecodeError`."""
    r = _Reader(payload)
    tag = r.enum(ServerTag, "message tag")
    message: ServerMessage
    if tag == ServerTag.Welcome:
        message = Welcome(r.u32("protocol_version"), r.string("daemon_version"),
                          r.u64("connection_id"), r.u32("max_frame_len"))
    elif tag == ServerTag.Pong:
        message = Pong(r.u64("id"))
    elif tag == ServerTag.StatusReport:
        rid = r.u64("id")
        message = StatusReport(rid, Status(r.u64("authenticated"), r.u64("pending"), r.u64("topics"),
                                           r.u64("subscribers"), r.u64("uptime_ms"), r.string("version")))
    elif tag == ServerTag.Ack:
        message = Ack(r.u64("id"))
    elif tag == ServerTag.Event:
        message = Event(r.string("topic"), r.u64("sequence"), r.raw_bytes("payload"))
    elif tag == ServerTag.Error:
        rid = r.option_u64("id")
        code = ErrorCode(r.enum(ErrorCode, "error code"))
        message = Error(rid, code, r.string("message"))
    else:  # ServerTag.Closing
        message = Closing(CloseReason(r.enum(CloseReason, "close reason")))
    r.finish()
    return message


def decode_request(payload: Union[bytes, bytearray, memoryview]) -> Request:
    """Decode one request payload (no length prefix) or raise :class:`DecodeError`.

    A client does not need this; it is here so the tests can check that the
    encoder and the spec's rejection rules agree.
    """
    r = _Reader(payload)
    rid = r.u64("id")
    tag = r.enum(RequestTag, "body tag")
    body: RequestBody
    if tag == RequestTag.Ping:
        body = Ping()
    elif tag == RequestTag.Status:
        body = StatusRequest()
    elif tag == RequestTag.Subscribe:
        body = Subscribe(r.string("topic"))
    elif tag == RequestTag.Unsubscribe:
        body = Unsubscribe(r.string("topic"))
    elif tag == RequestTag.Publish:
        body = Publish(r.string("topic"), r.raw_bytes("payload"))
    else:
        body = Shutdown()
    r.finish()
    return Request(rid, body)


def split_frame(data: Union[bytes, bytearray], limit: int = PROTOCOL_MAX_FRAME_LEN) -> Tuple[bytes, bytes]:
    """Split one complete frame off ``data``: returns (payload, rest).

    Raises :class:`FrameTooLargeError` if the prefix is over ``limit`` and
    :class:`DecodeError` if the frame is incomplete.
    """
    if len(data) < 4:
        raise DecodeError("incomplete length prefix")
    (length,) = _LEN.unpack_from(data, 0)
    if length > limit:
        raise FrameTooLargeError(f"frame of {length} bytes is over the limit of {limit}")
    if len(data) < 4 + length:
        raise DecodeError("incomplete frame")
    return bytes(data[4:4 + length]), bytes(data[4 + length:])


# --------------------------------------------------------------------------
# Locating the daemon and the token (section 11)
# --------------------------------------------------------------------------


def _env_value(env: Mapping[str, str], name: str) -> Optional[str]:
    """A variable set to the empty string counts as unset."""
    value = env.get(name)
    return value if value else None


def runtime_dir(env: Optional[Mapping[str, str]] = None) -> str:
    """The runtime directory: ``$KEYHOLE_DIR``, else ``$XDG_RUNTIME_DIR/keyhole``,
    else ``$HOME/.keyhole`` (first match wins; empty counts as unset)."""
    env = os.environ if env is None else env
    explicit = _env_value(env, "KEYHOLE_DIR")
    if explicit:
        return explicit
    xdg = _env_value(env, "XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "keyhole")
    home = _env_value(env, "HOME")
    if home:
        return os.path.join(home, ".keyhole")
    raise ConfigError("no runtime directory: set KEYHOLE_DIR, XDG_RUNTIME_DIR or HOME")


def socket_path(env: Optional[Mapping[str, str]] = None) -> str:
    """``$KEYHOLE_SOCKET``, else ``<runtime directory>/keyhole.sock``."""
    env = os.environ if env is None else env
    return _env_value(env, "KEYHOLE_SOCKET") or os.path.join(runtime_dir(env), SOCKET_NAME)


def token_file_path(env: Optional[Mapping[str, str]] = None) -> str:
    """``$KEYHOLE_TOKEN_FILE``, else ``<runtime directory>/session-token``."""
    env = os.environ if env is None else env
    return _env_value(env, "KEYHOLE_TOKEN_FILE") or os.path.join(runtime_dir(env), TOKEN_FILE_NAME)


_HEX_DIGITS = b"0123456789abcdef"


def parse_token_text(text: Union[bytes, bytearray]) -> bytearray:
    """Parse the token's text form: exactly 64 lowercase hex digits, optionally
    followed by one ``\\n``, nothing else. Returns the 32 raw bytes.

    Errors never quote the text.
    """
    n = len(text)
    if n == 65 and text[64] == 0x0A:
        n = 64
    if n != 64:
        raise TokenFormatError("a token is exactly 64 lowercase hex digits, optionally followed by one newline")
    out = bytearray(TOKEN_LEN)
    for i in range(TOKEN_LEN):
        hi = _HEX_DIGITS.find(text[2 * i])
        lo = _HEX_DIGITS.find(text[2 * i + 1])
        if hi < 0 or lo < 0:
            wipe(out)
            raise TokenFormatError("a token holds only lowercase hex digits 0-9a-f")
        out[i] = hi * 16 + lo
    return out


def read_token_file(path: str) -> bytearray:
    """Read and check a token file (section 11, check 1); returns the raw token.

    The file, after following symbolic links, must be a regular file owned by
    our effective uid with ``mode & 0o077 == 0``, holding one token.
    """
    try:
        # O_NONBLOCK: a FIFO planted at the path must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TokenNotFoundError(f"no token file at {path}") from None
    except PermissionError as err:
        raise TokenPermissionError(f"cannot open the token file {path}: {err.strerror}") from None
    text = bytearray()
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenPermissionError(f"the token file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenPermissionError(
                f"the token file {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
        if st.st_mode & 0o077:
            raise TokenPermissionError(
                f"the token file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "group and others must have no permission (expected 0600)")
        while len(text) <= MAX_TOKEN_FILE_READ:
            chunk = os.read(fd, MAX_TOKEN_FILE_READ + 1 - len(text))
            if not chunk:
                break
            text += chunk
        return parse_token_text(text)
    finally:
        os.close(fd)
        wipe(text)


def load_token(env: Optional[Mapping[str, str]] = None) -> bytearray:
    """The raw token: from ``$KEYHOLE_TOKEN`` if set (precedence over any file),
    else from the token file."""
    env = os.environ if env is None else env
    text = _env_value(env, "KEYHOLE_TOKEN")
    if text is not None:
        raw = bytearray(text.encode("ascii", errors="replace"))
        try:
            return parse_token_text(raw)
        except TokenFormatError as err:
            raise TokenFormatError(f"KEYHOLE_TOKEN: {err}") from None
        finally:
            wipe(raw)
    return read_token_file(token_file_path(env))


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    if not hasattr(socket, "SO_PEERCRED"):
        raise PeerCredentialsError("SO_PEERCRED is not available on this platform")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as err:
        raise PeerCredentialsError(f"cannot read the peer's credentials: {err}") from None
    _pid, uid, _gid = struct.unpack("iII", raw)
    return uid


def check_peer(sock: socket.socket, expected_uid: Optional[int] = None) -> None:
    """Section 11, check 3: raise unless the peer runs as ``expected_uid``:
    by default ``$KEYHOLE_DAEMON_UID`` when set (for ``--allow-uid`` clients),
    else our effective uid."""
    if expected_uid is None:
        configured = os.environ.get("KEYHOLE_DAEMON_UID", "").strip()
        if configured:
            try:
                expected_uid = int(configured, 10)
            except ValueError:
                raise PeerCredentialsError(
                    f"KEYHOLE_DAEMON_UID is not a uid: {configured!r}") from None
    expected = os.geteuid() if expected_uid is None else expected_uid
    uid = peer_uid(sock)
    if uid != expected:
        raise PeerCredentialsError(
            f"the socket's peer runs as uid {uid}, not {expected}; the token was not sent")


# --------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------


class KeyholeClient:
    """An authenticated connection to ``keyholed``.

    Use :meth:`connect`. Requests can be sent one at a time (:meth:`ping`,
    :meth:`status`, :meth:`publish`, ...) or pipelined (:meth:`send` then
    :meth:`reply`, or :meth:`pipeline`). Events that arrive while a reply is
    awaited are queued and returned by :meth:`next_event`.

    Replies must arrive in request order; a reply whose id is not the oldest
    outstanding request's is a :class:`ProtocolError`.
    """

    def __init__(self, sock: socket.socket, welcome: Welcome, rbuf: bytearray) -> None:
        self.sock = sock
        self.welcome = welcome
        self._rbuf = rbuf
        self._next_id = 1
        self._outstanding: Deque[int] = collections.deque()
        self._replies: Dict[int, Reply] = {}
        self._events: Deque[Event] = collections.deque()
        self.final_frame: Optional[ServerMessage] = None
        self._closed = False

    # -- connecting -------------------------------------------------------

    @classmethod
    def connect(cls, socket_path_: Optional[str] = None, token: Optional[bytearray] = None, *,
                env: Optional[Mapping[str, str]] = None, timeout: float = 10.0) -> "KeyholeClient":
        """Connect, check the peer, authenticate and wait for ``Welcome``.

        ``socket_path_`` and ``token`` default to what the environment says
        (section 11). The token is checked before connecting, and the raw
        token (one passed in included) is wiped before this returns or raises.
        Raises :class:`KeyholeError` (e.g. ``BadTokenError``) if the daemon
        refuses the handshake.
        """
        env = os.environ if env is None else env
        path = socket_path_ if socket_path_ is not None else socket_path(env)
        raw_token = token if token is not None else load_token(env)
        try:
            sock = open_checked_socket(path, timeout=timeout)
            try:
                send_handshake(sock, raw_token)
            except BaseException:
                sock.close()
                raise
        finally:
            wipe(raw_token)
        try:
            welcome, rbuf = read_welcome(sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock, welcome, rbuf)

    # -- plumbing ---------------------------------------------------------

    def _fill(self) -> None:
        """Read more bytes into the receive buffer.

        End of stream and ECONNRESET both mean the daemon ended the
        connection (ECONNRESET when it closed with bytes of ours unread);
        both raise :class:`ConnectionClosed`.
        """
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            self._closed = True
            raise ConnectionClosed("connection reset by the daemon", reset=True,
                                   final_frame=self.final_frame) from None
        if not chunk:
            self._closed = True
            if self._rbuf:
                raise ProtocolError("end of stream inside a frame")
            raise ConnectionClosed("end of stream", final_frame=self.final_frame)
        self._rbuf += chunk

    @property
    def closed(self) -> bool:
        """True once the connection has ended or the daemon sent its final frame."""
        return self._closed or self.final_frame is not None

    def _read_message(self) -> ServerMessage:
        """Read and decode the next daemon frame. A frame that does not decode
        closes the connection (section 5) and raises :class:`ProtocolError`."""
        if self.final_frame is not None:
            raise ConnectionClosed("the daemon already sent its final frame", final_frame=self.final_frame)
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        try:
            msg = read_frame_message(self._rbuf, self.welcome.max_frame_len, self._fill)
        except ProtocolError:
            self.close()
            raise
        if isinstance(msg, Closing) or (isinstance(msg, Error) and msg.code in ERRORS_THAT_CLOSE):
            self.final_frame = msg
        return msg

    def _write(self, data: bytes) -> None:
        """Write everything, reading incoming bytes meanwhile so that neither
        side can block the other when many requests are pipelined."""
        view = memoryview(data)
        deadline_s = self.sock.gettimeout()
        while view:
            readable, writable, _ = select.select([self.sock], [self.sock], [], deadline_s)
            if not readable and not writable:
                raise TimeoutError("timed out writing to the daemon")
            if readable:
                try:
                    chunk = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    # The daemon closed: whatever it sent (an Error?) is buffered.
                    raise BrokenPipeError("the daemon closed the connection while we were writing")
                self._rbuf += chunk
            if writable:
                try:
                    sent = self.sock.send(view, getattr(socket, "MSG_NOSIGNAL", 0))
                except BlockingIOError:
                    continue
                view = view[sent:]

    def send(self, body: RequestBody, id: Optional[int] = None) -> int:  # noqa: A002
        """Send one request without waiting; returns its id."""
        return self.send_many([body], [id] if id is not None else None)[0]

    def send_many(self, bodies: Sequence[RequestBody], ids: Optional[Sequence[int]] = None) -> List[int]:
        """Send several requests in one write; returns their ids.

        Ids default to a counter; ids passed in should be distinct (the daemon
        allows duplicates, but :meth:`reply` could not tell them apart)."""
        if ids is None:
            ids = list(range(self._next_id, self._next_id + len(bodies)))
            self._next_id += len(bodies)
        elif len(ids) != len(bodies):
            raise ValueError("one id per request body")
        out = bytearray()
        for rid, body in zip(ids, bodies):
            payload = encode_request_payload(Request(rid, body))
            if len(payload) > self.welcome.max_frame_len:
                raise ValueError(f"request of {len(payload)} bytes is over the daemon's "
                                 f"limit of {self.welcome.max_frame_len}")
            out += frame(payload)
        self._outstanding.extend(ids)
        try:
            self._write(bytes(out))
        except (BrokenPipeError, ConnectionResetError):
            # Surface the daemon's final frame if it sent one.
            self._drain_to_end()
            raise
        return list(ids)

    def _drain_to_end(self) -> None:
        """Read until the connection ends, raising the daemon's final Error/Closing."""
        while True:
            self.next_message()

    def next_message(self) -> ServerMessage:
        """The next frame from the daemon: a reply or an event.

        Replies are matched against the outstanding requests (in order).
        An ``Error`` that closes the connection is raised as a
        :class:`KeyholeError`; ``Closing`` as :class:`DaemonClosing`.
        """
        msg = self._read_message()
        if isinstance(msg, Event):
            return msg
        if isinstance(msg, Closing):
            raise DaemonClosing(msg.reason, msg)
        if isinstance(msg, Welcome):
            self.close()
            raise ProtocolError("a second Welcome")
        if isinstance(msg, Error) and msg.id is None:
            raise KeyholeError.from_frame(msg)
        reply_id = msg.id  # type: ignore[union-attr]
        if not self._outstanding:
            self.close()
            raise ProtocolError(f"a reply (id {reply_id}) with no request outstanding")
        expected = self._outstanding.popleft()
        if reply_id != expected:
            self.close()
            raise ProtocolError(f"reply for id {reply_id}, expected the reply for id {expected}")
        return msg

    def reply(self, rid: int) -> Reply:
        """Wait for the reply to request ``rid``, queueing events that arrive
        first. Replies to earlier outstanding requests are kept for later.
        Returns ``Error`` replies as messages (use :meth:`call` to raise)."""
        while rid not in self._replies:
            msg = self.next_message()
            if isinstance(msg, Event):
                self._events.append(msg)
            else:
                self._replies[msg.id] = msg  # type: ignore[union-attr]
        return self._replies.pop(rid)

    def call(self, body: RequestBody) -> Reply:
        """Send one request and wait for its reply; an ``Error`` reply raises."""
        reply = self.reply(self.send(body))
        if isinstance(reply, Error):
            raise KeyholeError.from_frame(reply)
        return reply

    def pipeline(self, bodies: Sequence[RequestBody]) -> List[Reply]:
        """Send all requests in one write and return their replies in order."""
        return [self.reply(rid) for rid in self.send_many(bodies)]

    def next_event(self) -> Event:
        """The next event: a queued one, else read until one arrives."""
        while not self._events:
            msg = self.next_message()
            if isinstance(msg, Event):
                return msg
            self._replies[msg.id] = msg  # type: ignore[union-attr]
        return self._events.popleft()

    # -- requests -----------------------------------------------------------

    def ping(self) -> None:
        """Send ``Ping``, wait for ``Pong``."""
        self._expect(self.call(Ping()), Pong)

    def status(self) -> Status:
        """Send ``Status``, return the report."""
        return self._expect(self.call(StatusRequest()), StatusReport).status  # type: ignore[union-attr]

    def subscribe(self, topic: str) -> None:
        """Subscribe to ``topic`` (acknowledged once in place)."""
        self._expect(self.call(Subscribe(topic)), Ack)

    def unsubscribe(self, topic: str) -> None:
        """Unsubscribe from ``topic``; events already queued may still arrive."""
        self._expect(self.call(Unsubscribe(topic)), Ack)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` on ``topic`` (acknowledged once queued for every subscriber)."""
        self._expect(self.call(Publish(topic, bytes(payload))), Ack)

    def shutdown(self) -> None:
        """Ask the daemon to shut down; returns after the ``Ack``."""
        self._expect(self.call(Shutdown()), Ack)

    @staticmethod
    def _expect(reply: Reply, kind: type) -> Reply:
        if not isinstance(reply, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {reply!r}")
        return reply

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Close our end (allowed at any time)."""
        self._closed = True
        self.sock.close()

    def __enter__(self) -> "KeyholeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checked_socket(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect to the pathname socket ``path`` and check the peer's uid.

    Nothing is sent. Raises :class:`PeerCredentialsError` (after closing the
    socket) if the peer is not running as our effective uid.
    """
    if not path or path.startswith("\0") or "\0" in path:
        raise ConfigError("the socket must be a pathname socket (no NUL byte, not the abstract namespace)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise DaemonNotRunning(f"daemon not running: {path}: {err.strerror}") from None
        check_peer(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def send_handshake(sock: socket.socket, token: Union[bytearray, bytes]) -> None:
    """Send the 44-byte handshake carrying ``token`` and wipe the frame buffer."""
    hs = encode_handshake(token)
    try:
        sock.sendall(hs, getattr(socket, "MSG_NOSIGNAL", 0))
    finally:
        wipe(hs)


def read_frame_message(rbuf: bytearray, limit: int, fill: Callable[[], None]) -> ServerMessage:
    """Take one frame off the front of ``rbuf`` and decode it.

    ``fill`` is called whenever more bytes are needed; it appends to ``rbuf``
    or raises. The length prefix is checked against ``limit`` before the
    payload is read, and bytes after the frame stay in ``rbuf``.
    """
    while len(rbuf) < 4:
        fill()
    (length,) = _LEN.unpack_from(rbuf, 0)
    if length > limit:
        raise FrameTooLargeError(f"daemon frame of {length} bytes is over the limit of {limit}")
    while len(rbuf) < 4 + length:
        fill()
    payload = bytes(rbuf[4:4 + length])
    del rbuf[:4 + length]
    return decode_server_message(payload)


def read_welcome(sock: socket.socket) -> Tuple[Welcome, bytearray]:
    """Read the daemon's first frame after the handshake.

    Returns ``Welcome`` and any bytes already received after it. An ``Error``
    raises the matching :class:`KeyholeError`; end of stream or reset with no
    frame raises :class:`ConnectionClosed`.
    """
    rbuf = bytearray()

    def fill() -> None:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            raise ConnectionClosed("connection reset before Welcome", reset=True) from None
        if not chunk:
            if rbuf:
                raise ProtocolError("end of stream inside the daemon's first frame")
            raise ConnectionClosed("end of stream before Welcome: the handshake was refused")
        rbuf.extend(chunk)

    msg = read_frame_message(rbuf, PROTOCOL_MAX_FRAME_LEN, fill)
    if isinstance(msg, Welcome):
        if msg.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(f"Welcome for protocol version {msg.protocol_version}")
        if msg.max_frame_len > PROTOCOL_MAX_FRAME_LEN:
            raise ProtocolError(f"Welcome announces max_frame_len {msg.max_frame_len} over the protocol ceiling")
        return msg, rbuf
    if isinstance(msg, Error):
        raise KeyholeError.from_frame(msg)
    raise ProtocolError(f"expected Welcome or Error as the daemon's first frame, got {type(msg).__name__}")


# --------------------------------------------------------------------------
# A minimal command line, for manual checks
# --------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """``keyhole_client.py ping|status|pub TOPIC MESSAGE|sub TOPIC [COUNT]``."""
    if not argv:
        print("usage: keyhole_client.py ping|status|pub TOPIC MESSAGE|sub TOPIC [COUNT]", file=sys.stderr)
        return 2
    try:
        with KeyholeClient.connect() as client:
            cmd = argv[0]
            if cmd == "ping":
                start = time.monotonic()
                client.ping()
                print(f"pong in {(time.monotonic() - start) * 1000:.2f} ms")
            elif cmd == "status":
                print(client.status())
            elif cmd == "pub" and len(argv) == 3:
                client.publish(argv[1], argv[2].encode())
            elif cmd == "sub" and len(argv) in (2, 3):
                client.subscribe(argv[1])
                remaining = int(argv[2]) if len(argv) == 3 else -1
                while remaining != 0:
                    ev = client.next_event()
                    print(ev.topic, ev.sequence, ev.payload.decode("utf-8", "replace"), flush=True)
                    remaining -= 1
            else:
                print("bad usage", file=sys.stderr)
                return 2
    except KeyholeError as err:
        print(f"keyhole_client: daemon error {err}", file=sys.stderr)
        return 7
    except (TokenError, PeerCredentialsError) as err:
        print(f"keyhole_client: {err}", file=sys.stderr)
        return 4
    except DaemonNotRunning as err:
        print(f"keyhole_client: {err}", file=sys.stderr)
        return 3
    except KeyholeException as err:
        print(f"keyhole_client: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
