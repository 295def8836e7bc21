"""The sans-IO half of the keyhole client, shared by the blocking API
(:mod:`keyhole_client._blocking`) and the asyncio API
(:mod:`keyhole_client._asyncio`): constants, enumerations, exceptions, the
encoding and strict decoding of every frame and hub message (sections 3 to 8
and 13 of ``proto-spec.md``), the subject checks (section 14), locating the
socket and the token, the token file checks and the peer uid check (section
11). Nothing here waits on the daemon except :func:`open_checked_socket`,
whose ``connect`` on a Unix socket never blocks (a full listen queue is
``EAGAIN``).
"""

from __future__ import annotations

import array
import enum
import errno
import fcntl
import math
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass
from typing import (Any, BinaryIO, FrozenSet, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type,
                    Union)

# --------------------------------------------------------------------------
# Constants (sections 3, 4, 6, 8, 10, 11, 13)
# --------------------------------------------------------------------------

MAGIC: bytes = b"KYHL"
"""Handshake magic, ASCII ``KYHL``."""

PROTOCOL_VERSION: int = 2
"""The protocol version this client speaks (section 4)."""

TOKEN_LEN: int = 32
"""Raw token length in bytes."""

HANDSHAKE_PAYLOAD_LEN: int = 40
"""Payload length of the handshake frame: magic (4) + version (4) + token (32)."""

HANDSHAKE_FRAME_LEN: int = 4 + HANDSHAKE_PAYLOAD_LEN
"""The handshake on the wire: always 44 bytes."""

REQUEST_HEADER_LEN: int = 12
"""Every request payload starts with ``id: u64`` and ``kind: u32`` (section 6)."""

PROTOCOL_MAX_FRAME_LEN: int = 16 * 1024 * 1024
"""The protocol ceiling on a frame payload, and the receive limit until ``Welcome``."""

MIN_MAX_FRAME_LEN: int = 1024
"""The smallest ``max_frame_len`` a daemon may announce (section 7)."""

SERVICE_CODE_BASE: int = 1000
"""Error codes from 1000 up belong to the service: its error n is sent as 1000 + n."""

MAX_ERROR_MESSAGE_LEN: int = 512
"""The daemon never sends an ``Error.message`` longer than this many bytes."""

MAX_SUBJECT_LEN: int = 255
"""Longest hub topic, pattern or name, in bytes of UTF-8 (section 14)."""

MAX_TOPIC_LEN: int = MAX_SUBJECT_LEN
"""The same limit under its version-1 name."""

MAX_SUBSCRIPTIONS: int = 4096
"""Subscriptions one hub connection may hold; one more is hub error 1002 (section 14)."""

MAX_NAMES: int = 256
"""Names one hub connection may serve; one more is hub error 1006 (section 14)."""

MAX_IN_FLIGHT_PER_RESPONDER: int = 256
"""Requests in flight a responder may hold; when every member of a group
holds this many, a ``Request`` is hub error 1005 ``Busy`` (section 14)."""

MAX_FAILURE_MESSAGE_LEN: int = 512
"""A ``Fail``'s message is at most this many bytes; the hub cuts a longer one (section 13)."""

DEFAULT_REQUEST_TIMEOUT_MS: int = 30_000
"""What ``timeout_ms`` 0 means: 30 seconds (section 14)."""

MAX_REQUEST_TIMEOUT_MS: int = 3_600_000
"""A ``timeout_ms`` over one hour is cut to one hour (section 14)."""

MESSAGE_EVENT_OVERHEAD: int = 8
"""A ``Message`` event's frame is 8 bytes larger than its ``Publish`` (section 13)."""

REQUEST_EVENT_OVERHEAD: int = 12
"""A ``Request`` event's frame is 12 bytes larger than its ``Request`` (section 13)."""

RESPONSE_EVENT_OVERHEAD: int = 4
"""A ``Response`` event carrying a reply is 4 bytes larger than its ``Respond`` (section 13)."""

MAX_TOKEN_FILE_READ: int = 512
"""A token file is never read past this many bytes (the valid content is 64 or 65)."""

SUN_PATH_MAX: int = 108
"""``sun_path`` size on Linux, terminating NUL included (section 2)."""

SOCKET_NAME: str = "keyhole.sock"
TOKEN_FILE_NAME: str = "session-token"

DEFAULT_TIMEOUT: float = 10.0
"""Seconds any single wait on the daemon may take before :class:`KeyholeTimeout`."""

RETRY_FIRST_DELAY: float = 0.01
RETRY_MAX_DELAY: float = 0.2
"""Back-off between connection attempts refused as "busy" (section 9,
"Admission"): each pause, from reading the refusal (or ``EAGAIN``) to the
next ``connect``, doubles from the first delay up to the max (always within
section 9's 1 ms to 1 s); the client gives up, reporting the last refusal,
once the connect timeout has passed or the next pause would end after it."""

DEFAULT_MAX_QUEUED_EVENT_BYTES: int = 16 * 1024 * 1024
"""Default bound of the client's event queue, in bytes of encoded frames."""

MAX_FDS_PER_FRAME: int = 8
"""A frame carries 1 to 8 descriptors (sections 10 and 19.2)."""

RECV_FDS_ROOM: int = MAX_FDS_PER_FRAME + 1
"""Room for descriptors in every ``recvmsg`` control buffer: one more than a
frame may carry, so that a sender of too many is seen (section 19.3)."""

MAX_QUEUED_FDS_AT_DAEMON: int = 64
"""The daemon holds at most this many descriptors for one connection's queue (section 10)."""

DEFAULT_MAX_QUEUED_FDS: int = 256
"""Default bound of the descriptors this client holds in its event queue
(events taken by the application do not count): past it, the queue counts
as full (section 16 step 10), so that a subscriber that does not take its
memfds cannot run out of descriptors."""

MAX_MEMFD_LEN: int = 1 << 30
"""The largest memfd the hub publishes: 1 GiB (sections 10 and 19.5)."""

MEMFD_SEALS: int = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
"""The seals the hub requires on a published memfd (section 19.5)."""

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LEN = _U32  # the frame length prefix is a little-endian u32
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


# --------------------------------------------------------------------------
# Enumerations
# --------------------------------------------------------------------------


class RequestKind(enum.IntEnum):
    """The ``kind`` field of a request header (section 6)."""

    Call = 0
    Ping = 1
    Shutdown = 2
    Expect = 3
    """The service the client's requests are written for: answered ``Ack``,
    or ``Error WrongService`` (no id) and the end of the connection, with
    nothing after it read (section 6)."""
    AcceptFds = 4
    """The client opts in to file descriptors (no body): answered ``Ack``;
    from then on the daemon may send ``ReplyFds`` and ``EventFds`` (section 19.1)."""
    CallFds = 5
    """A ``Call`` that carries 1 to 8 descriptors: ``fds: u32``, then the
    service's request; the descriptors travel with the frame's first byte (section 19.2)."""


class FrameTag(enum.IntEnum):
    """The ``u32`` tag that starts every daemon frame after the handshake (section 7)."""

    Welcome = 0
    Reply = 1
    Event = 2
    Ack = 3
    Error = 4
    Closing = 5
    Lagged = 6
    ReplyFds = 7
    """A ``Reply`` carrying descriptors: ``id``, ``fds: u32``, the service's reply (section 19)."""
    EventFds = 8
    """An ``Event`` carrying descriptors: ``stream``, ``fds: u32``, the service's event (section 19)."""


class ErrorCode(enum.IntEnum):
    """The transport's error codes (section 8), all below 1000."""

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
    BadRequest = 11
    NotPermitted = 12
    ShuttingDown = 13
    Internal = 14
    OverBudget = 15
    WrongService = 16
    DescriptorsNotAccepted = 17
    """A ``CallFds`` before the daemon handled this connection's ``AcceptFds``
    (with the id; the connection stays open; its descriptors were closed unread)."""
    DescriptorMismatch = 18
    """Descriptors no frame announces, or a frame whose descriptors did not
    arrive with it (no id; closes)."""
    TooManyDescriptors = 19
    """``fds`` of 0 or over 8, over 8 in one read, or ``MSG_CTRUNC`` (no id; closes)."""


TRANSPORT_ERRORS_WITH_ID: FrozenSet[int] = frozenset(
    {ErrorCode.UnknownRequest, ErrorCode.BadRequest, ErrorCode.NotPermitted, ErrorCode.Internal,
     ErrorCode.DescriptorsNotAccepted})
"""Transport codes whose ``Error`` carries the request's id and keeps the
connection open. Every other transport code has the id absent and closes
(section 8: "errors that close have the id absent")."""

HANDSHAKE_PHASE_ERRORS: FrozenSet[int] = frozenset(
    {ErrorCode.HandshakeExpected, ErrorCode.BadMagic, ErrorCode.UnsupportedVersion, ErrorCode.BadToken,
     ErrorCode.AuthTimeout, ErrorCode.PeerNotAllowed, ErrorCode.TooManyUnauthenticated,
     ErrorCode.TooManyConnections, ErrorCode.ShuttingDown})
"""Codes a pending connection can get instead of ``Welcome`` (section 4: 0 to
7 and 13). Any other first frame, an ``Error`` with another code included
(``OverBudget`` is only for authenticated connections), is a protocol error."""

BUSY_ERRORS: FrozenSet[int] = frozenset({ErrorCode.TooManyUnauthenticated, ErrorCode.TooManyConnections})
"""Refusals that mean "busy, try again": :meth:`KeyholeClient.connect`
retries them on a new connection within its connect timeout (section 9,
"Admission")."""


class CloseReason(enum.IntEnum):
    """The ``reason`` carried by ``Closing`` (section 7)."""

    Shutdown = 0
    SlowConsumer = 1


class HubRequestTag(enum.IntEnum):
    """The hub's request tags (section 13), the body of a ``Call``."""

    Status = 0
    Subscribe = 1
    Unsubscribe = 2
    Publish = 3
    Serve = 4
    Unserve = 5
    Request = 6
    Respond = 7
    Fail = 8
    Topics = 9
    PublishMemfd = 10
    """``topic``; sent as a ``CallFds`` carrying one sealed memfd (section 19.5)."""


class HubReplyTag(enum.IntEnum):
    """The hub's reply tags (section 13), the body of a ``Reply``."""

    Status = 0
    Subscribed = 1
    Unsubscribed = 2
    Published = 3
    Serving = 4
    Unserved = 5
    Requested = 6
    Responded = 7
    Topics = 8


class HubEventTag(enum.IntEnum):
    """The hub's event tags (section 13), the body of an ``Event``."""

    Message = 0
    Request = 1
    Response = 2
    MessageMemfd = 3
    """``topic``, ``sequence``, ``len``; always an ``EventFds`` carrying the
    published memfd, whose first ``len`` bytes are the payload (section 19.5)."""


class Lag(enum.IntEnum):
    """A subscription's lag policy (sections 9 and 13): what happens when its
    events do not fit in the connection's queue at the daemon."""

    Disconnect = 0
    """The connection is cut (``Closing{SlowConsumer}``); the stream is never incomplete."""
    DropOldest = 1
    """The oldest queued events are dropped and counted in ``Lagged``; the connection stays."""


class FailureTag(enum.IntEnum):
    """The tags of a ``Fail``'s ``Failure`` (section 13)."""

    ReplyTooLarge = 0
    Failed = 1


class OutcomeTag(enum.IntEnum):
    """The tags of a ``Response``'s ``Outcome`` (section 13)."""

    Reply = 0
    ResponderGone = 1
    Timeout = 2
    ReplyTooLarge = 3
    Failed = 4


class HubErrorCode(enum.IntEnum):
    """The hub's own errors (section 13): n, sent on the wire as 1000 + n."""

    InvalidTopic = 0
    ShuttingDown = 1
    TooManySubscriptions = 2
    SidInUse = 3
    NoResponders = 4
    Busy = 5
    TooManyNames = 6
    TooLarge = 7
    BadMemfd = 8


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------


class KeyholeException(Exception):
    """Root of every exception raised by this module."""


class ConfigError(KeyholeException):
    """The socket, the token or the daemon's uid could not be determined from
    the environment (no runtime directory, a bad ``KEYHOLE_DAEMON_UID``, a
    socket path that cannot be used, ...). Nothing was sent."""


class NoRuntimeDirectory(ConfigError):
    """None of ``KEYHOLE_DIR``, ``XDG_RUNTIME_DIR`` and ``HOME`` is set, and
    the socket path was needed from it: the daemon cannot be found (the
    command line reports it as "daemon not running", exit 3, as the Rust CLI
    does)."""


class DaemonUidError(ConfigError):
    """``KEYHOLE_DAEMON_UID`` is not a uid (section 11): nothing was sent,
    not even a connection made."""


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
    """The process at the other end of the socket does not run as the expected
    uid, or its uid could not be determined. The token was not sent."""


class KeyholeTimeout(KeyholeException, TimeoutError):
    """The daemon did not answer within the timeout. The connection stays usable."""


class DaemonBusy(KeyholeTimeout):
    """Every ``connect`` within the connect timeout failed with ``EAGAIN``:
    the listen queue of the daemon's socket stayed full (a connect storm,
    section 9 "Admission"). Nothing was sent. ``attempts`` counts the tries."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


class ProtocolError(KeyholeException):
    """The daemon sent something this client must not accept (section 7).
    The connection has been closed."""


class DecodeError(ProtocolError):
    """A payload does not decode (section 5): truncated, trailing bytes,
    unknown tag, invalid UTF-8, bad option byte."""


class FrameTooLargeError(ProtocolError):
    """A length prefix from the daemon is over the receive limit."""


class WrongServiceError(KeyholeException):
    """``Welcome`` names a service (or a version of it) that this client does
    not speak. The connection has been closed; ``service`` and
    ``service_version`` are the daemon's, ``expected`` is ours."""

    def __init__(self, service: str, service_version: int, expected: Tuple[str, int]) -> None:
        super().__init__(f"the daemon serves `{service}` version {service_version}, "
                         f"not `{expected[0]}` version {expected[1]}")
        self.service = service
        self.service_version = service_version
        self.expected = expected


class RequestTooLarge(KeyholeException, ValueError):
    """A request would be over the ``max_frame_len`` of ``Welcome``; it was not sent."""


class TopicError(KeyholeException, ValueError):
    """A topic, pattern or name is not a valid subject (section 14: 1 to 255
    bytes of UTF-8, ``.``-separated non-empty tokens, the wildcards ``*`` and
    a final ``>`` in a pattern only); it was not sent (section 16 step 14)."""


class SidError(KeyholeException, ValueError):
    """A subscription id the client refuses to send: 0, or the id of one of
    this connection's live subscriptions (the hub would answer 1003
    ``SidInUse``, and routing two streams by one id cannot work)."""


class EventQueueFull(KeyholeException):
    """The client's event queue is at its bound and the next frame is another
    event: take events (:meth:`KeyholeClient.next_event`) before waiting for a
    reply again. Nothing was lost; the connection stays usable. If the
    application never takes them, the daemon eventually cuts the connection
    as a slow consumer (section 16 step 10)."""


class ConnectionClosed(KeyholeException):
    """The connection is over.

    ``reset`` is True when the end was reported as ECONNRESET rather than as
    end of stream (section 9: both mean the same). ``final_frame`` is the
    daemon's last frame (``Closing`` or an ``Error`` that closes), or None if
    the connection ended without one. ``unanswered`` lists the ids of the
    requests that got no reply.
    """

    def __init__(self, message: str, *, reset: bool = False, final_frame: Any = None,
                 unanswered: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.reset = reset
        self.final_frame = final_frame
        self.unanswered = list(unanswered)


class DaemonClosing(ConnectionClosed):
    """The daemon sent ``Closing``; ``reason`` says why. Nothing follows it."""

    def __init__(self, reason: "CloseReason", final_frame: "Closing", unanswered: Sequence[int] = ()) -> None:
        text = {CloseReason.Shutdown: "the daemon is shutting down",
                CloseReason.SlowConsumer: "the daemon cut this connection as a slow consumer"}[reason]
        super().__init__(f"{text} (Closing {reason.name})", final_frame=final_frame, unanswered=unanswered)
        self.reason = reason


class HandshakeRefused(KeyholeException):
    """The daemon refused the handshake: it answered with an ``Error`` (the
    subclasses for codes 0-7 and 13 derive from this class as well as from
    :class:`KeyholeError`) or ended the connection without a frame. Requests
    pipelined behind the handshake were discarded unread.

    ``attempts`` is the number of connections :meth:`KeyholeClient.connect`
    made: more than 1 when it retried "busy" refusals (``TooManyUnauthenticated``,
    ``TooManyConnections``) until its connect timeout ran out."""

    attempts: int = 1


class RefusedWithoutFrame(HandshakeRefused, ConnectionClosed):
    """The connection ended before the daemon's first frame (section 4: also a refusal)."""


class KeyholeError(KeyholeException):
    """An ``Error`` frame from the daemon.

    ``code`` is the ``u32`` on the wire, ``name`` its name, ``id`` the id of
    the request that failed (None for errors about the connection),
    ``message`` the daemon's text (for humans: never parse it).
    """

    code: int = -1
    name: str = "KeyholeError"

    def __init__(self, message: str = "", id: Optional[int] = None,  # noqa: A002
                 code: Optional[int] = None) -> None:
        if code is not None:
            self.code = code
        super().__init__(f"{self.name} ({self.code}): {message}" if message else f"{self.name} ({self.code})")
        self.message = message
        self.id = id

    @property
    def closes(self) -> bool:
        """Whether the daemon closes the connection after this error (section 8)."""
        return self.code < SERVICE_CODE_BASE and self.code not in TRANSPORT_ERRORS_WITH_ID

    @property
    def is_service_error(self) -> bool:
        """Whether the code is the service's (1000 and up) rather than the transport's."""
        return self.code >= SERVICE_CODE_BASE

    @staticmethod
    def from_frame(frame: "Error", service: Optional["Service"] = None) -> "KeyholeError":
        """Build the exception matching ``frame.code``: one class per transport
        code, the service's classes for codes from 1000 (the hub's by
        default), :class:`ServiceError` for a service code it does not know."""
        if frame.code < SERVICE_CODE_BASE:
            return ERROR_CLASSES[ErrorCode(frame.code)](frame.message, frame.id)
        service = HUB if service is None else service
        cls = service.error_classes.get(frame.code - SERVICE_CODE_BASE)
        if cls is None:
            return ServiceError(frame.message, frame.id, code=frame.code)
        return cls(frame.message, frame.id)


class ServiceError(KeyholeError):
    """An error of the service (code 1000 + n): it fails one request only.

    Instantiated directly for a service code the client does not know (the
    hub's client reports those rather than treating them as protocol errors).
    """

    name = "ServiceError"

    def __init__(self, message: str = "", id: Optional[int] = None,  # noqa: A002
                 code: Optional[int] = None) -> None:
        if code is not None and type(self) is ServiceError:
            self.name = f"service error {code - SERVICE_CODE_BASE}"
        super().__init__(message, id, code)

    @property
    def service_code(self) -> int:
        """n, the service's own number for the error."""
        return self.code - SERVICE_CODE_BASE


def _error_class(code: ErrorCode) -> Type[KeyholeError]:
    """Make the ``KeyholeError`` subclass for one transport code, e.g. ``BadTokenError``."""
    bases: Tuple[type, ...] = (KeyholeError, HandshakeRefused) if code in HANDSHAKE_PHASE_ERRORS else (KeyholeError,)
    return type(f"{code.name}Error", bases,
                {"code": int(code), "name": code.name,
                 "__doc__": f"``Error {code.name}`` (transport code {int(code)}) from the daemon.",
                 "__module__": "keyhole_client"})


class WrongServiceDaemonError(WrongServiceError, KeyholeError):
    """``Error WrongService`` (transport code 16) from the daemon: an
    ``Expect`` named another service or version than the daemon's, and the
    daemon closed the connection without reading any request after it
    (section 6). A :class:`WrongServiceError` (so that one ``except`` catches
    both ways of learning it) and a :class:`KeyholeError` (``code``, ``id``
    absent, ``message`` the daemon's text, ``closes``).

    The client names both services (the message is not parsed): ``service``
    and ``service_version`` are the ones of the connection's ``Welcome``,
    ``expected`` the ``(service, service_version)`` of the ``Expect`` that
    was refused (None where the client could not tell)."""

    code = 16
    name = "WrongService"

    def __init__(self, message: str = "", id: Optional[int] = None,  # noqa: A002
                 code: Optional[int] = None) -> None:
        KeyholeError.__init__(self, message, id, code)
        self.service: Optional[str] = None  # type: ignore[assignment]
        self.service_version: Optional[int] = None  # type: ignore[assignment]
        self.expected: Optional[Tuple[str, int]] = None  # type: ignore[assignment]

    def name_services(self, service: Optional[str], service_version: Optional[int],
                      expected: Optional[Tuple[str, int]]) -> None:
        """Fill in what the client knows: the daemon's service (from
        ``Welcome``) and the one its ``Expect`` named."""
        self.service, self.service_version, self.expected = service, service_version, expected
        ours = f"`{expected[0]}` version {expected[1]}" if expected is not None else "the service we expected"
        theirs = f"`{service}` version {service_version}" if service is not None else "another service"
        text = f"{self.name} ({self.code}): the daemon serves {theirs}, not {ours}"
        self.args = (text + (f" (daemon: {self.message})" if self.message else ""),)


ERROR_CLASSES: Dict[ErrorCode, Type[KeyholeError]] = {code: _error_class(code) for code in ErrorCode}
"""One ``KeyholeError`` subclass per transport code."""
ERROR_CLASSES[ErrorCode.WrongService] = WrongServiceDaemonError

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
BadRequestError = ERROR_CLASSES[ErrorCode.BadRequest]
NotPermittedError = ERROR_CLASSES[ErrorCode.NotPermitted]
ShuttingDownError = ERROR_CLASSES[ErrorCode.ShuttingDown]
InternalError = ERROR_CLASSES[ErrorCode.Internal]
OverBudgetError = ERROR_CLASSES[ErrorCode.OverBudget]
DescriptorsNotAcceptedError = ERROR_CLASSES[ErrorCode.DescriptorsNotAccepted]
DescriptorMismatchError = ERROR_CLASSES[ErrorCode.DescriptorMismatch]
TooManyDescriptorsError = ERROR_CLASSES[ErrorCode.TooManyDescriptors]
"""``Error OverBudget`` (15): the daemon's memory budget was used up and this
connection held the most of it; the events queued for it were discarded, and
the connection is closed (section 9, "Memory budget")."""

class RequestError(KeyholeException):
    """A hub ``Request`` that got no reply. One subclass per outcome:
    refused at once by the hub (:class:`NoRespondersError` 1004,
    :class:`BusyError` 1005), or ended by its ``Response`` event
    (:class:`ResponderGoneError`, :class:`RequestTimeout`,
    :class:`ReplyTooLargeError`, :class:`RequestFailed`). ``request_id`` is
    the id of the ``Call`` and ``requested_name`` the name requested, when
    known (``name`` stays the error's name, as on every :class:`KeyholeError`)."""

    request_id: Optional[int] = None
    requested_name: Optional[str] = None


class InvalidTopicError(ServiceError):
    """Hub error 1000 ``InvalidTopic``: a topic, pattern or name is not a
    valid subject (section 14); nothing changed."""

    code = SERVICE_CODE_BASE + HubErrorCode.InvalidTopic
    name = "InvalidTopic"


class HubShuttingDownError(ServiceError):
    """Hub error 1001 ``ShuttingDown``: a ``Publish`` or ``Request`` handled
    after shutdown began; nothing was published or sent, and
    ``Closing{Shutdown}`` follows."""

    code = SERVICE_CODE_BASE + HubErrorCode.ShuttingDown
    name = "ShuttingDown"


class TooManySubscriptionsError(ServiceError):
    """Hub error 1002 ``TooManySubscriptions``: a ``Subscribe`` while the
    connection holds 4096 subscriptions; nothing changed and the connection
    stays open."""

    code = SERVICE_CODE_BASE + HubErrorCode.TooManySubscriptions
    name = "TooManySubscriptions"


class SidInUseError(ServiceError):
    """Hub error 1003 ``SidInUse``: a ``Subscribe`` whose ``sid`` is 0 or the
    id of one of this connection's subscriptions; nothing changed."""

    code = SERVICE_CODE_BASE + HubErrorCode.SidInUse
    name = "SidInUse"


class NoRespondersError(ServiceError, RequestError):
    """Hub error 1004 ``NoResponders``: nobody serves the name (answered at once)."""

    code = SERVICE_CODE_BASE + HubErrorCode.NoResponders
    name = "NoResponders"


class BusyError(ServiceError, RequestError):
    """Hub error 1005 ``Busy``: every responder of the name has 256 requests in flight."""

    code = SERVICE_CODE_BASE + HubErrorCode.Busy
    name = "Busy"


class TooManyNamesError(ServiceError):
    """Hub error 1006 ``TooManyNames``: a ``Serve`` while this connection serves 256 names."""

    code = SERVICE_CODE_BASE + HubErrorCode.TooManyNames
    name = "TooManyNames"


class TooLargeError(ServiceError):
    """Hub error 1007 ``TooLarge``: the event a ``Publish``, ``Request`` or
    ``Respond`` would cause is over the frame limit (8, 12 and 4 bytes more
    than the request); nothing was published or sent (for a ``Respond``, the
    requester gets ``ReplyTooLarge``)."""

    code = SERVICE_CODE_BASE + HubErrorCode.TooLarge
    name = "TooLarge"


class BadMemfdError(ServiceError):
    """Hub error 1008 ``BadMemfd``: a ``PublishMemfd`` whose descriptor is not
    a memfd sealed against writing, shrinking and growing, or is over 1 GiB,
    or that carried other than one descriptor; or another hub request that
    carried descriptors (section 19.5). Nothing was published."""

    code = SERVICE_CODE_BASE + HubErrorCode.BadMemfd
    name = "BadMemfd"


class _OutcomeError(RequestError):
    """Base of the outcomes that end a request with a ``Response`` event."""

    outcome_name = "?"

    def __init__(self, detail: str = "", request_id: Optional[int] = None, name: Optional[str] = None) -> None:
        what = f"request {request_id}" if request_id is not None else "request"
        if name is not None:
            what += f" to {name!r}"
        super().__init__(f"{what}: {self.outcome_name}" + (f": {detail}" if detail else ""))
        self.request_id = request_id
        self.requested_name = name


class ResponderGoneError(_OutcomeError):
    """Outcome ``ResponderGone``: the responder's connection ended before it answered."""

    outcome_name = "the responder's connection ended before it answered (ResponderGone)"


class RequestTimeout(_OutcomeError):
    """Outcome ``Timeout``: the request's ``timeout_ms`` passed before an answer.
    (Not :class:`KeyholeTimeout`, which is this client giving up on the daemon.)"""

    outcome_name = "no answer within its timeout (Timeout)"


class ReplyTooLargeError(_OutcomeError):
    """Outcome ``ReplyTooLarge``: the reply (``len`` bytes of payload) would
    not fit in a frame: the responder said so with ``Fail``, or its
    ``Respond`` was too large for its ``Response``."""

    outcome_name = "the reply does not fit in a frame (ReplyTooLarge)"

    def __init__(self, length: int, request_id: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__(f"{length} bytes", request_id, name)
        self.len = length


class RequestFailed(_OutcomeError):
    """Outcome ``Failed``: the responder answered with ``Fail``; ``message`` is its text."""

    outcome_name = "the responder failed it (Failed)"

    def __init__(self, message: str, request_id: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__(message, request_id, name)
        self.message = message


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


def _bool(value: bool) -> bytes:
    """A ``bool`` (section 5): one byte, ``01`` for true and ``00`` for false."""
    return b"\x01" if value else b"\x00"


def _string_counts(entries: Sequence[Tuple[str, int]]) -> bytes:
    """A ``Vec<(String, u64)>``: its ``u64`` count, then each string and number."""
    return _u64(len(entries)) + b"".join(_string(text) + _u64(n) for text, n in entries)


def _bytes_field(value: Union[bytes, bytearray, memoryview]) -> bytes:
    return _u64(len(value)) + bytes(value)


def _string(value: str) -> bytes:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not encodable as UTF-8: {err.reason}") from None
    return _bytes_field(raw)


def frame(payload: Union[bytes, bytearray]) -> bytes:
    """Prefix ``payload`` with its length as a little-endian u32 (section 3).

    The prefix counts the payload only, not its own 4 bytes.
    """
    return _LEN.pack(len(payload)) + bytes(payload)


def wipe(buffer: Union[bytearray, memoryview]) -> None:
    """Overwrite a mutable buffer with zeros (for every copy of the token)."""
    buffer[:] = bytes(len(buffer))


# --------------------------------------------------------------------------
# File descriptors (section 19): the socket calls and the hub's memfds
# --------------------------------------------------------------------------

_INT_SIZE = array.array("i").itemsize
RECV_CONTROL_LEN: int = socket.CMSG_SPACE(RECV_FDS_ROOM * _INT_SIZE)
"""The control buffer of every ``recvmsg``: ``CMSG_SPACE(9 * sizeof(int))`` (section 19.3)."""


def recv_with_fds(sock: socket.socket, bufsize: int) -> Tuple[bytes, List[int], int]:
    """One ``recvmsg`` with room for 9 descriptors and ``MSG_CMSG_CLOEXEC``
    (section 19.3): returns the bytes, the descriptors that came with them
    (every ``SCM_RIGHTS`` control message's, in order) and the returned
    flags, for the caller to check ``MSG_CTRUNC`` and the count. Control
    messages of other types are ignored."""
    data, ancdata, flags, _addr = sock.recvmsg(bufsize, RECV_CONTROL_LEN, socket.MSG_CMSG_CLOEXEC)
    fds: List[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(cdata[:len(cdata) - len(cdata) % _INT_SIZE])
            fds.extend(ints)
    return data, fds, flags


def send_with_fds(sock: socket.socket, data: Union[bytes, bytearray, memoryview], fds: Sequence[int],
                  flags: int = _NOSIGNAL) -> int:
    """One ``sendmsg`` whose data starts at a frame's first byte and whose
    control data is one ``SCM_RIGHTS`` message of ``fds`` (section 19.2;
    what ``socket.send_fds`` does). Returns the bytes sent (the descriptors
    went with the first one); the caller writes the rest with plain writes."""
    return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], flags)


def close_fds(fds: Sequence[int]) -> None:
    """Close descriptors, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_memfd(fd: int, length: int, offset: int = 0) -> bytes:
    """``length`` bytes of ``fd`` from ``offset``, with ``os.pread`` (a
    memfd's file offset is shared by everyone holding it: never ``os.read``,
    section 19.5). Raises ``ValueError`` if the file holds fewer."""
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, min(length - len(out), 1 << 20), offset + len(out))
        if not chunk:
            raise ValueError(f"the memfd ends after {offset + len(out)} bytes; {offset + length} were announced")
        out += chunk
    return bytes(out)


def memfd_seals(fd: int) -> int:
    """The seals on ``fd`` (``fcntl(F_GET_SEALS)``)."""
    return int(fcntl.fcntl(fd, fcntl.F_GET_SEALS))


MemfdSource = Union[bytes, bytearray, memoryview, BinaryIO]
"""What :func:`sealed_memfd` copies into a memfd: bytes, or a binary file
object read to its end (``read``)."""


def sealed_memfd(source: MemfdSource, name: str = "keyhole", *, seal_seal: bool = True) -> int:
    """A sealed memfd holding ``source`` (section 19.5): made with
    ``memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)``, filled, then
    sealed with ``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW`` (and
    ``F_SEAL_SEAL`` unless ``seal_seal`` is False). Returns the descriptor
    (close it once published: the subscribers hold their own). More than
    1 GiB raises ``ValueError``: the hub would refuse it with ``BadMemfd``."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        total = 0

        def put(chunk: Union[bytes, bytearray, memoryview]) -> None:
            nonlocal total
            view = memoryview(chunk).cast("B")
            if total + len(view) > MAX_MEMFD_LEN:
                raise ValueError(f"a published memfd holds at most {MAX_MEMFD_LEN} bytes (1 GiB)")
            while view:
                n = os.write(fd, view)
                view = view[n:]
                total += n

        if isinstance(source, (bytes, bytearray, memoryview)):
            put(source)
        else:
            while True:
                chunk = source.read(1 << 20)
                if not chunk:
                    break
                put(chunk)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS | (fcntl.F_SEAL_SEAL if seal_seal else 0))
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Reader:
    """Reads the section 5 types from one payload, refusing to run past its end."""

    def __init__(self, payload: Union[bytes, bytearray, memoryview]) -> None:
        self._buf = memoryview(payload)
        self._pos = 0

    @property
    def left(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int, what: str) -> memoryview:
        if n > self.left:
            raise DecodeError(f"{what}: needs {n} bytes, {self.left} left")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self._take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self._take(8, what))[0])

    def boolean(self, what: str) -> bool:
        value = self.u8(what)
        if value > 1:
            raise DecodeError(f"{what}: bool byte {value} (only 0 and 1 are valid)")
        return value == 1

    def string_counts(self, what: str) -> Tuple[Tuple[str, int], ...]:
        """A ``Vec<(String, u64)>``. The count is checked against the bytes
        left (each entry takes at least 16) before anything is allocated."""
        n = self.u64(what + " count")
        if n > self.left // 16:
            raise DecodeError(f"{what}: {n} entries announced, {self.left} bytes left")
        return tuple((self.string(what + " entry"), self.u64(what + " entry count")) for _ in range(n))

    def option_u64(self, what: str) -> Optional[int]:
        presence = self.u8(what + " presence")
        if presence == 0:
            return None
        if presence == 1:
            return self.u64(what)
        raise DecodeError(f"{what}: option presence byte {presence} (only 0 and 1 are valid)")

    def raw_bytes(self, what: str) -> bytes:
        n = self.u64(what + " length")
        # _take checks the length against the bytes left before anything is copied.
        return bytes(self._take(n, what))

    def string(self, what: str) -> str:
        raw = self.raw_bytes(what)
        try:
            # Python's "utf-8" codec keeps a leading EF BB BF as U+FEFF (part of the text).
            return raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as err:
            raise DecodeError(f"{what}: not valid UTF-8 ({err.reason})") from None

    def tag(self, kind: Type[enum.IntEnum], what: str) -> Any:
        value = self.u32(what)
        try:
            return kind(value)
        except ValueError:
            raise DecodeError(f"{what}: unknown tag {value}") from None

    def rest(self) -> memoryview:
        return self._take(self.left, "rest")

    def finish(self) -> None:
        if self.left:
            raise DecodeError(f"{self.left} byte(s) left over after the message")


# --------------------------------------------------------------------------
# Services: the hub (Part II), and a raw service for generic clients
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusRequest:
    """Hub request ``Status`` (tag 0): answered with the :class:`Status` reply."""


@dataclass(frozen=True)
class Subscribe:
    """Hub request ``Subscribe`` (tag 1): open the connection's event stream
    ``sid`` (not 0, not in use) for every topic ``pattern`` matches, with the
    lag policy ``lag``; answered :class:`Subscribed`."""

    sid: int
    pattern: str
    lag: Lag = Lag.Disconnect


@dataclass(frozen=True)
class Unsubscribe:
    """Hub request ``Unsubscribe`` (tag 2): end subscription ``sid``; answered
    :class:`Unsubscribed` (also for an unknown ``sid``)."""

    sid: int


@dataclass(frozen=True)
class Publish:
    """Hub request ``Publish`` (tag 3): answered :class:`Published` once the
    event is queued for every subscription whose pattern matches ``topic``."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Serve:
    """Hub request ``Serve`` (tag 4): join the group of responders of ``name``;
    answered :class:`Serving`."""

    name: str


@dataclass(frozen=True)
class Unserve:
    """Hub request ``Unserve`` (tag 5): leave the group of ``name``; answered
    :class:`Unserved` (also for a name not served)."""

    name: str


@dataclass(frozen=True)
class RequestTo:
    """Hub request ``Request`` (tag 6): send ``payload`` to one responder of
    ``name``, waiting ``timeout_ms`` for its answer (0: 30 s; at most one
    hour). Answered :class:`Requested` at once (or an error); the answer
    comes later as the event :class:`Response`."""

    name: str
    timeout_ms: int
    payload: bytes


@dataclass(frozen=True)
class FailureReplyTooLarge:
    """``Failure`` variant 0: the reply, ``len`` bytes of payload, would not fit."""

    len: int


@dataclass(frozen=True)
class FailureFailed:
    """``Failure`` variant 1: the responder cannot answer; ``message`` says why
    (at most 512 bytes; the hub cuts a longer one)."""

    message: str


Failure = Union[FailureReplyTooLarge, FailureFailed]


@dataclass(frozen=True)
class Respond:
    """Hub request ``Respond`` (tag 7): answer the request ``token`` with
    ``payload``; answered :class:`Responded`."""

    token: int
    payload: bytes


@dataclass(frozen=True)
class Fail:
    """Hub request ``Fail`` (tag 8): answer the request ``token`` with a
    ``failure``; answered :class:`Responded`."""

    token: int
    failure: Failure


@dataclass(frozen=True)
class TopicsRequest:
    """Hub request ``Topics`` (tag 9): answered with the :class:`TopicList` reply."""


@dataclass(frozen=True)
class PublishMemfd:
    """Hub request ``PublishMemfd`` (tag 10): publish the bytes of the sealed
    memfd sent with it on ``topic``; sent as a ``CallFds`` carrying that one
    descriptor (section 19.5); answered :class:`Published`."""

    topic: str


HubRequest = Union[StatusRequest, Subscribe, Unsubscribe, Publish, Serve, Unserve, RequestTo, Respond, Fail,
                   TopicsRequest, PublishMemfd]


@dataclass(frozen=True)
class Status:
    """Hub reply ``Status`` (tag 0): the daemon's figures."""

    authenticated: int
    """Connections that completed the handshake and are open."""
    pending: int
    """Connections that have not completed the handshake (waiting for a slot included)."""
    topics: int
    """Distinct patterns with at least one subscription (the field keeps its version-1 name)."""
    subscriptions: int
    """Subscriptions over all patterns."""
    names: int
    """Names with at least one responder."""
    requests_in_flight: int
    """Requests given to a responder and not answered yet."""
    uptime_ms: int
    """Milliseconds since the daemon started."""
    version: str
    """The daemon's software version (the same text as ``Welcome.software_version``)."""


@dataclass(frozen=True)
class Subscribed:
    """Hub reply ``Subscribed`` (tag 1)."""


@dataclass(frozen=True)
class Unsubscribed:
    """Hub reply ``Unsubscribed`` (tag 2)."""


@dataclass(frozen=True)
class Published:
    """Hub reply ``Published`` (tag 3): ``receivers`` is how many
    subscriptions the event was queued for."""

    receivers: int


@dataclass(frozen=True)
class Serving:
    """Hub reply ``Serving`` (tag 4)."""


@dataclass(frozen=True)
class Unserved:
    """Hub reply ``Unserved`` (tag 5)."""


@dataclass(frozen=True)
class Requested:
    """Hub reply ``Requested`` (tag 6): the request is on its way; its
    :class:`Response` event follows."""


@dataclass(frozen=True)
class Responded:
    """Hub reply ``Responded`` (tag 7) to a ``Respond`` or ``Fail``:
    ``delivered`` is false when the request no longer waits or was never
    given to this connection."""

    delivered: bool


@dataclass(frozen=True)
class TopicList:
    """Hub reply ``Topics`` (tag 8): every pattern subscribed with its number
    of subscriptions and every name served with its number of responders,
    each sorted by text; ``truncated`` when the lists were cut to fit a frame."""

    patterns: Tuple[Tuple[str, int], ...]
    names: Tuple[Tuple[str, int], ...]
    truncated: bool


HubReply = Union[Status, Subscribed, Unsubscribed, Published, Serving, Unserved, Requested, Responded, TopicList]


@dataclass(frozen=True)
class Message:
    """Hub event ``Message`` (tag 0), on the stream of the subscription whose
    pattern matched: ``payload`` was published on ``topic``; ``sequence``
    numbers the topic's publishes (consecutive within a subscription, except
    across a ``Lagged``)."""

    topic: str
    sequence: int
    payload: bytes


@dataclass(frozen=True)
class IncomingRequest:
    """Hub event ``Request`` (tag 1), on stream 0, for a responder: answer it
    with ``Respond`` or ``Fail`` and its ``token``. ``uid`` and ``pid`` are the
    requester's, as the daemon saw them (pid 0 if it could not)."""

    token: int
    name: str
    uid: int
    pid: int
    payload: bytes


@dataclass(frozen=True)
class OutcomeReply:
    """``Outcome`` variant 0: the responder's reply."""

    payload: bytes


@dataclass(frozen=True)
class OutcomeResponderGone:
    """``Outcome`` variant 1: the responder's connection ended before it answered."""


@dataclass(frozen=True)
class OutcomeTimeout:
    """``Outcome`` variant 2: the request's timeout passed first."""


@dataclass(frozen=True)
class OutcomeReplyTooLarge:
    """``Outcome`` variant 3: the reply, ``len`` bytes of payload, would not fit."""

    len: int


@dataclass(frozen=True)
class OutcomeFailed:
    """``Outcome`` variant 4: the responder failed the request with ``message``."""

    message: str


Outcome = Union[OutcomeReply, OutcomeResponderGone, OutcomeTimeout, OutcomeReplyTooLarge, OutcomeFailed]


@dataclass(frozen=True)
class Response:
    """Hub event ``Response`` (tag 2), on stream 0, for a requester: how its
    request ``request`` (the id of its ``Call``) ended."""

    request: int
    outcome: Outcome


@dataclass(eq=False)
class MessageMemfd:
    """Hub event ``MessageMemfd`` (tag 3), on the stream of the subscription
    whose pattern matched, on a connection that sent ``AcceptFds``: a publish
    of a sealed memfd (section 19.5), numbered like a :class:`Message`. The
    payload is the first ``len`` bytes of the memfd ``fd`` (close-on-exec,
    sealed, the same open file as the publisher's).

    The descriptor is the application's once it took the event: read the
    payload with :meth:`read` (``os.pread``: the file offset is shared by the
    publisher, the daemon and every subscriber, so ``os.read`` and
    ``lseek`` must never be used on it), or map it read-only
    (``mmap.mmap(ev.fileno(), ev.len, prot=mmap.PROT_READ)``); then
    :meth:`close` it (or use ``with``), or :meth:`detach` it to keep it.
    ``fd`` is -1 once closed or detached, and in an event decoded from bytes
    alone (before its descriptor was attributed)."""

    topic: str
    sequence: int
    len: int
    fd: int = -1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageMemfd):
            return NotImplemented
        return (self.topic, self.sequence, self.len) == (other.topic, other.sequence, other.len)

    __hash__ = None  # type: ignore[assignment]

    def fileno(self) -> int:
        """The memfd (raises ``ValueError`` once closed or detached)."""
        if self.fd < 0:
            raise ValueError("the memfd of this MessageMemfd is closed or detached")
        return self.fd

    def read(self, offset: int = 0, size: Optional[int] = None) -> bytes:
        """Bytes ``offset`` to ``offset + size`` of the payload (default: all
        of it, from ``offset``), read with ``os.pread`` (never ``os.read``:
        the file offset is shared, section 19.5)."""
        if offset < 0 or offset > self.len:
            raise ValueError(f"offset {offset} is outside the payload of {self.len} bytes")
        end = self.len if size is None else min(self.len, offset + max(0, size))
        return read_memfd(self.fileno(), end - offset, offset)

    @property
    def payload(self) -> bytes:
        """The whole payload (:meth:`read`)."""
        return self.read()

    def detach(self) -> int:
        """Hand the descriptor over: returns it; this event no longer closes it."""
        fd = self.fileno()
        self.fd = -1
        return fd

    def close(self) -> None:
        """Close the descriptor (once; later calls do nothing)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> "MessageMemfd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MessageMemfd(topic={self.topic!r}, sequence={self.sequence}, len={self.len}, fd={self.fd})"


HubEvent = Union[Message, IncomingRequest, Response, MessageMemfd]


def outcome_result(response: Response, name: Optional[str] = None) -> bytes:
    """The reply payload of a ``Response``, or the outcome's
    :class:`RequestError` raised."""
    o = response.outcome
    rid = response.request
    if isinstance(o, OutcomeReply):
        return o.payload
    if isinstance(o, OutcomeResponderGone):
        raise ResponderGoneError("", rid, name)
    if isinstance(o, OutcomeTimeout):
        raise RequestTimeout("", rid, name)
    if isinstance(o, OutcomeReplyTooLarge):
        raise ReplyTooLargeError(o.len, rid, name)
    if isinstance(o, OutcomeFailed):
        raise RequestFailed(o.message, rid, name)
    raise TypeError(f"not an outcome: {o!r}")


class Service:
    """What a client knows about one service: its name and version (checked
    against ``Welcome``), the codecs of its requests, replies and events, and
    its error classes (codes 1000 + n).

    Subclass it to speak another service over the same transport. A service
    whose ``name`` is None accepts any daemon (a generic client: ``Ping`` and
    ``Shutdown`` work with every keyhole daemon); its bodies stay raw bytes.
    """

    name: Optional[str] = None
    version: Optional[int] = None
    error_classes: Dict[int, Type[ServiceError]] = {}

    def encode_request(self, request: Any) -> bytes:
        """The body of a ``Call``. The raw service takes bytes as they are."""
        return bytes(request)

    def decode_request(self, body: memoryview) -> Any:
        return bytes(body)

    def encode_reply(self, reply: Any) -> bytes:
        return bytes(reply)

    def decode_reply(self, body: memoryview) -> Any:
        """Decode the body of a ``Reply`` (the whole rest of the frame) or raise :class:`DecodeError`."""
        return bytes(body)

    def encode_event(self, event: Any) -> bytes:
        return bytes(event)

    def decode_event(self, body: memoryview) -> Any:
        """Decode the body of an ``Event`` (after its ``stream``) or raise :class:`DecodeError`."""
        return bytes(body)

    def check_event_stream(self, stream: int, event: Any) -> None:
        """Raise :class:`ProtocolError` if ``event`` cannot belong to ``stream``."""

    def reply_answers(self, request: Any, reply: Any) -> bool:
        """Whether ``reply`` is a possible answer to ``request``."""
        return True

    def check_reply_fds(self, reply: Any, fds: int) -> None:
        """Raise :class:`ProtocolError` if ``reply`` cannot come in a frame
        announcing ``fds`` descriptors (0: a plain ``Reply``). Any service
        reply may come in a ``ReplyFds`` by default."""

    def check_event_fds(self, event: Any, fds: int) -> None:
        """Raise :class:`ProtocolError` if ``event`` cannot come in a frame
        announcing ``fds`` descriptors (0: a plain ``Event``)."""

    def attach_fds(self, event: Any, fds: Tuple[int, ...]) -> Any:
        """The event of an ``EventFds`` once its descriptors arrived: the
        service may put them in the event (the hub: the memfd of a
        :class:`MessageMemfd`). By default they stay on the frame
        (``EventFds.descriptors``)."""
        return event

    def __repr__(self) -> str:
        return f"<service {self.name or '(any)'} v{self.version}>"


RAW = Service()
"""A generic service: accepts any daemon, keeps bodies as bytes."""


SUBJECT_KINDS = ("topic", "pattern", "name")


def check_subject(text: str, kind: str = "topic") -> None:
    """Raise :class:`TopicError` unless ``text`` is a valid ``kind`` (one of
    ``"topic"``, ``"pattern"``, ``"name"``) by section 14: 1 to 255 bytes of
    UTF-8, tokens separated by ``.``, no token empty; in a pattern a token may
    be ``*`` and the last token may be ``>``; ``*`` and ``>`` appear nowhere
    else (not inside a longer token, ``>`` not before the last token, neither
    in a topic or a name)."""
    if kind not in SUBJECT_KINDS:
        raise ValueError(f"a subject is a topic, a pattern or a name, not {kind!r}")
    if not isinstance(text, str):
        raise TopicError(f"a {kind} is a str")
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise TopicError(f"a {kind} must be valid UTF-8") from None
    if not 1 <= n <= MAX_SUBJECT_LEN:
        raise TopicError(f"a {kind} is 1 to {MAX_SUBJECT_LEN} bytes of UTF-8; this one is {n} bytes")
    tokens = text.split(".")
    if "" in tokens:
        raise TopicError(f"the {kind} {text[:64]!r} has an empty token (a leading, trailing or doubled '.')")
    for i, token in enumerate(tokens):
        if "*" not in token and ">" not in token:
            continue
        if kind != "pattern":
            raise TopicError(f"the {kind} {text[:64]!r} holds a wildcard ('*' or '>'); only a pattern may")
        if token == "*":
            continue
        if token == ">":
            if i != len(tokens) - 1:
                raise TopicError(f"the pattern {text[:64]!r} has '>' before its last token")
            continue
        raise TopicError(f"the pattern {text[:64]!r} has '*' or '>' inside the token {token[:32]!r}")


def check_topic(topic: str) -> None:
    """Raise :class:`TopicError` unless ``topic`` is a valid topic (see :func:`check_subject`)."""
    check_subject(topic, "topic")


def timeout_ms_for(timeout: Optional[float]) -> int:
    """The ``timeout_ms`` to send for a timeout in seconds: None is 0 (the
    hub's default, 30 s); anything else is rounded up to whole milliseconds,
    at least 1 (0 would mean 30 s) and at most one hour (the hub's cap)."""
    if timeout is None:
        return 0
    if timeout < 0:
        raise ValueError("a timeout is not negative")
    return max(1, min(MAX_REQUEST_TIMEOUT_MS, math.ceil(timeout * 1000)))


def effective_timeout_ms(timeout_ms: int) -> int:
    """How long the hub lets a request wait for its answer (section 14)."""
    if timeout_ms == 0:
        return DEFAULT_REQUEST_TIMEOUT_MS
    return min(timeout_ms, MAX_REQUEST_TIMEOUT_MS)


class HubService(Service):
    """The hub, service ``hub`` version 2 (sections 13 and 14)."""

    name = "hub"
    version = 2
    error_classes = {HubErrorCode.InvalidTopic: InvalidTopicError,
                     HubErrorCode.ShuttingDown: HubShuttingDownError,
                     HubErrorCode.TooManySubscriptions: TooManySubscriptionsError,
                     HubErrorCode.SidInUse: SidInUseError,
                     HubErrorCode.NoResponders: NoRespondersError,
                     HubErrorCode.Busy: BusyError,
                     HubErrorCode.TooManyNames: TooManyNamesError,
                     HubErrorCode.TooLarge: TooLargeError,
                     HubErrorCode.BadMemfd: BadMemfdError}

    _ANSWERS = {StatusRequest: Status, Subscribe: Subscribed, Unsubscribe: Unsubscribed, Publish: Published,
                Serve: Serving, Unserve: Unserved, RequestTo: Requested, Respond: Responded, Fail: Responded,
                TopicsRequest: TopicList, PublishMemfd: Published}

    @staticmethod
    def _encode_failure(f: Failure) -> bytes:
        if isinstance(f, FailureReplyTooLarge):
            return _u32(FailureTag.ReplyTooLarge) + _u64(f.len)
        if isinstance(f, FailureFailed):
            return _u32(FailureTag.Failed) + _string(f.message)
        raise TypeError(f"not a failure: {f!r}")

    def encode_request(self, request: Any) -> bytes:
        if isinstance(request, StatusRequest):
            return _u32(HubRequestTag.Status)
        if isinstance(request, Subscribe):
            return (_u32(HubRequestTag.Subscribe) + _u64(request.sid) + _string(request.pattern)
                    + _u32(int(request.lag)))
        if isinstance(request, Unsubscribe):
            return _u32(HubRequestTag.Unsubscribe) + _u64(request.sid)
        if isinstance(request, Publish):
            return _u32(HubRequestTag.Publish) + _string(request.topic) + _bytes_field(request.payload)
        if isinstance(request, Serve):
            return _u32(HubRequestTag.Serve) + _string(request.name)
        if isinstance(request, Unserve):
            return _u32(HubRequestTag.Unserve) + _string(request.name)
        if isinstance(request, RequestTo):
            return (_u32(HubRequestTag.Request) + _string(request.name) + _u32(request.timeout_ms)
                    + _bytes_field(request.payload))
        if isinstance(request, Respond):
            return _u32(HubRequestTag.Respond) + _u64(request.token) + _bytes_field(request.payload)
        if isinstance(request, Fail):
            return _u32(HubRequestTag.Fail) + _u64(request.token) + self._encode_failure(request.failure)
        if isinstance(request, TopicsRequest):
            return _u32(HubRequestTag.Topics)
        if isinstance(request, PublishMemfd):
            return _u32(HubRequestTag.PublishMemfd) + _string(request.topic)
        raise TypeError(f"not a hub request: {request!r}")

    def decode_request(self, body: memoryview) -> HubRequest:
        r = _Reader(body)
        tag = r.tag(HubRequestTag, "hub request tag")
        request: HubRequest
        if tag == HubRequestTag.Status:
            request = StatusRequest()
        elif tag == HubRequestTag.Subscribe:
            request = Subscribe(r.u64("sid"), r.string("pattern"), r.tag(Lag, "lag"))
        elif tag == HubRequestTag.Unsubscribe:
            request = Unsubscribe(r.u64("sid"))
        elif tag == HubRequestTag.Publish:
            request = Publish(r.string("topic"), r.raw_bytes("payload"))
        elif tag == HubRequestTag.Serve:
            request = Serve(r.string("name"))
        elif tag == HubRequestTag.Unserve:
            request = Unserve(r.string("name"))
        elif tag == HubRequestTag.Request:
            request = RequestTo(r.string("name"), r.u32("timeout_ms"), r.raw_bytes("payload"))
        elif tag == HubRequestTag.Respond:
            request = Respond(r.u64("token"), r.raw_bytes("payload"))
        elif tag == HubRequestTag.Fail:
            token = r.u64("token")
            ftag = r.tag(FailureTag, "failure tag")
            failure: Failure = (FailureReplyTooLarge(r.u64("len")) if ftag == FailureTag.ReplyTooLarge
                                else FailureFailed(r.string("message")))
            request = Fail(token, failure)
        elif tag == HubRequestTag.PublishMemfd:
            request = PublishMemfd(r.string("topic"))
        else:
            request = TopicsRequest()
        r.finish()
        return request

    def encode_reply(self, reply: Any) -> bytes:
        if isinstance(reply, Status):
            return (_u32(HubReplyTag.Status) + _u64(reply.authenticated) + _u64(reply.pending)
                    + _u64(reply.topics) + _u64(reply.subscriptions) + _u64(reply.names)
                    + _u64(reply.requests_in_flight) + _u64(reply.uptime_ms) + _string(reply.version))
        if isinstance(reply, Published):
            return _u32(HubReplyTag.Published) + _u64(reply.receivers)
        if isinstance(reply, Responded):
            return _u32(HubReplyTag.Responded) + _bool(reply.delivered)
        if isinstance(reply, TopicList):
            return (_u32(HubReplyTag.Topics) + _string_counts(reply.patterns) + _string_counts(reply.names)
                    + _bool(reply.truncated))
        for cls, tag in ((Subscribed, HubReplyTag.Subscribed), (Unsubscribed, HubReplyTag.Unsubscribed),
                         (Serving, HubReplyTag.Serving), (Unserved, HubReplyTag.Unserved),
                         (Requested, HubReplyTag.Requested)):
            if isinstance(reply, cls):
                return _u32(tag)
        raise TypeError(f"not a hub reply: {reply!r}")

    def decode_reply(self, body: memoryview) -> HubReply:
        r = _Reader(body)
        tag = r.tag(HubReplyTag, "hub reply tag")
        reply: HubReply
        if tag == HubReplyTag.Status:
            reply = Status(r.u64("authenticated"), r.u64("pending"), r.u64("topics"), r.u64("subscriptions"),
                           r.u64("names"), r.u64("requests_in_flight"), r.u64("uptime_ms"), r.string("version"))
        elif tag == HubReplyTag.Subscribed:
            reply = Subscribed()
        elif tag == HubReplyTag.Unsubscribed:
            reply = Unsubscribed()
        elif tag == HubReplyTag.Published:
            reply = Published(r.u64("receivers"))
        elif tag == HubReplyTag.Serving:
            reply = Serving()
        elif tag == HubReplyTag.Unserved:
            reply = Unserved()
        elif tag == HubReplyTag.Requested:
            reply = Requested()
        elif tag == HubReplyTag.Responded:
            reply = Responded(r.boolean("delivered"))
        else:
            reply = TopicList(r.string_counts("patterns"), r.string_counts("names"), r.boolean("truncated"))
        r.finish()
        return reply

    def encode_event(self, event: Any) -> bytes:
        if isinstance(event, Message):
            return (_u32(HubEventTag.Message) + _string(event.topic) + _u64(event.sequence)
                    + _bytes_field(event.payload))
        if isinstance(event, IncomingRequest):
            return (_u32(HubEventTag.Request) + _u64(event.token) + _string(event.name) + _u32(event.uid)
                    + _u32(event.pid) + _bytes_field(event.payload))
        if isinstance(event, Response):
            o = event.outcome
            head = _u32(HubEventTag.Response) + _u64(event.request)
            if isinstance(o, OutcomeReply):
                return head + _u32(OutcomeTag.Reply) + _bytes_field(o.payload)
            if isinstance(o, OutcomeResponderGone):
                return head + _u32(OutcomeTag.ResponderGone)
            if isinstance(o, OutcomeTimeout):
                return head + _u32(OutcomeTag.Timeout)
            if isinstance(o, OutcomeReplyTooLarge):
                return head + _u32(OutcomeTag.ReplyTooLarge) + _u64(o.len)
            if isinstance(o, OutcomeFailed):
                return head + _u32(OutcomeTag.Failed) + _string(o.message)
        if isinstance(event, MessageMemfd):
            return _u32(HubEventTag.MessageMemfd) + _string(event.topic) + _u64(event.sequence) + _u64(event.len)
        raise TypeError(f"not a hub event: {event!r}")

    def decode_event(self, body: memoryview) -> HubEvent:
        r = _Reader(body)
        tag = r.tag(HubEventTag, "hub event tag")
        event: HubEvent
        if tag == HubEventTag.Message:
            event = Message(r.string("topic"), r.u64("sequence"), r.raw_bytes("payload"))
        elif tag == HubEventTag.Request:
            event = IncomingRequest(r.u64("token"), r.string("name"), r.u32("uid"), r.u32("pid"),
                                    r.raw_bytes("payload"))
        elif tag == HubEventTag.MessageMemfd:
            event = MessageMemfd(r.string("topic"), r.u64("sequence"), r.u64("len"))
        else:
            rid = r.u64("request")
            otag = r.tag(OutcomeTag, "outcome tag")
            outcome: Outcome
            if otag == OutcomeTag.Reply:
                outcome = OutcomeReply(r.raw_bytes("payload"))
            elif otag == OutcomeTag.ResponderGone:
                outcome = OutcomeResponderGone()
            elif otag == OutcomeTag.Timeout:
                outcome = OutcomeTimeout()
            elif otag == OutcomeTag.ReplyTooLarge:
                outcome = OutcomeReplyTooLarge(r.u64("len"))
            else:
                outcome = OutcomeFailed(r.string("message"))
            event = Response(rid, outcome)
        r.finish()
        return event

    def check_event_stream(self, stream: int, event: Any) -> None:
        """Section 13's event table: a ``Message`` comes on its subscription's
        stream (a sid, never 0), a ``Request`` or ``Response`` on stream 0."""
        if isinstance(event, (Message, MessageMemfd)) and stream == 0:
            raise ProtocolError(f"a {type(event).__name__} event on stream 0 (a subscription's sid is never 0)")
        if isinstance(event, (IncomingRequest, Response)) and stream != 0:
            raise ProtocolError(f"a {type(event).__name__} event on stream {stream} (it belongs to stream 0)")

    def reply_answers(self, request: Any, reply: Any) -> bool:
        return self._ANSWERS.get(type(request)) is type(reply)

    def check_reply_fds(self, reply: Any, fds: int) -> None:
        """No hub reply carries descriptors (section 13's reply table): a
        ``ReplyFds`` is a protocol error for a hub client."""
        if fds:
            raise ProtocolError(f"a ReplyFds with {fds} descriptor(s) carrying the hub reply "
                                f"{type(reply).__name__}: no hub reply carries descriptors")

    def check_event_fds(self, event: Any, fds: int) -> None:
        """Section 19.5: a ``MessageMemfd`` is always an ``EventFds`` carrying
        one descriptor; every other hub event is a plain ``Event``."""
        if isinstance(event, MessageMemfd):
            if fds != 1:
                raise ProtocolError("a MessageMemfd in a plain Event frame" if fds == 0 else
                                    f"a MessageMemfd in an EventFds announcing {fds} descriptors, not 1")
        elif fds:
            raise ProtocolError(f"an EventFds whose event is a {type(event).__name__}, not a MessageMemfd")

    def attach_fds(self, event: Any, fds: Tuple[int, ...]) -> Any:
        if isinstance(event, MessageMemfd) and len(fds) == 1:
            return MessageMemfd(event.topic, event.sequence, event.len, fds[0])
        return event


HUB = HubService()
"""The hub service, the default of :class:`KeyholeClient`."""


# --------------------------------------------------------------------------
# Transport frames (sections 4, 6, 7)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """The body of an ``Expect`` request (kind 3, section 6): the service,
    and its version, that the requests after it are written for. The daemon
    answers ``Ack`` if it serves exactly that (the ``service`` and
    ``service_version`` of its ``Welcome``), else ``Error WrongService``
    (:class:`WrongServiceDaemonError`) and closes, reading nothing after it."""

    service: str
    service_version: int


@dataclass(frozen=True)
class Request:
    """A request (section 6): the client's ``id``, its ``kind`` and, for a
    ``Call``, the service's request (``call``), for an ``Expect`` its
    :class:`Expect` (``expect``). ``extra`` is raw bytes appended after the
    body: only the tests use it, to send what the daemon must refuse."""

    id: int
    kind: int
    call: Any = None
    extra: bytes = b""
    expect: Optional[Expect] = None
    fds: Tuple[int, ...] = ()
    """The descriptors sent with the frame's first byte (section 19.2): a
    ``CallFds``'s. (The tests also send them with other kinds, to see them refused.)"""
    announced: Optional[int] = None
    """The ``fds`` field of a ``CallFds``; default: how many ``fds`` there are."""


@dataclass(frozen=True)
class Welcome:
    """Daemon frame ``Welcome`` (tag 0): the first frame of an authenticated connection."""

    protocol_version: int
    service: str
    service_version: int
    software_version: str
    instance_id: int
    connection_id: int
    max_frame_len: int


@dataclass(frozen=True)
class Reply:
    """Daemon frame ``Reply`` (tag 1): answers the ``Call`` with this id."""

    id: int
    reply: Any


@dataclass(frozen=True)
class Event:
    """Daemon frame ``Event`` (tag 2): an event of the service (a hub
    :class:`Message`, :class:`IncomingRequest` or :class:`Response`) and the
    ``stream`` it belongs to (the hub: a subscription's sid, or 0 for an event
    of no stream)."""

    stream: int
    event: Any


@dataclass(frozen=True)
class Ack:
    """Daemon frame ``Ack`` (tag 3): answers the ``Ping``, ``Shutdown`` or ``Expect`` with this id."""

    id: int


@dataclass(frozen=True)
class Error:
    """Daemon frame ``Error`` (tag 4). ``code`` is the ``u32`` on the wire."""

    id: Optional[int]
    code: int
    message: str

    @property
    def closes(self) -> bool:
        """Whether the daemon closes the connection after it (section 8)."""
        return self.code < SERVICE_CODE_BASE and self.code not in TRANSPORT_ERRORS_WITH_ID


@dataclass(frozen=True)
class Closing:
    """Daemon frame ``Closing`` (tag 5): the daemon is closing; no frame follows."""

    reason: CloseReason


@dataclass(frozen=True)
class Lagged:
    """Daemon frame ``Lagged`` (tag 6): ``missed`` (at least 1) events of
    ``stream`` were dropped from this connection's queue under the stream's
    ``DropOldest`` policy; the stream's events after it follow the dropped
    ones. A loss the application must be told about, never a silent one."""

    stream: int
    missed: int


@dataclass(frozen=True)
class ReplyFds(Reply):
    """Daemon frame ``ReplyFds`` (tag 7): a :class:`Reply` that carries
    ``fds`` (1 to 8) descriptors, sent only to a connection that sent
    ``AcceptFds`` (section 19). ``descriptors`` holds them once they arrived
    (they are the application's once it took the frame: close them)."""

    fds: int = 0
    descriptors: Tuple[int, ...] = ()


@dataclass(frozen=True)
class EventFds(Event):
    """Daemon frame ``EventFds`` (tag 8): an :class:`Event` that carries
    ``fds`` (1 to 8) descriptors, sent only to a connection that sent
    ``AcceptFds`` (section 19). ``descriptors`` holds them once they arrived;
    for the hub the one descriptor is also in the event, a :class:`MessageMemfd`."""

    fds: int = 0
    descriptors: Tuple[int, ...] = ()


DaemonFrame = Union[Welcome, Reply, Event, Ack, Error, Closing, Lagged, ReplyFds, EventFds]


def frame_fds(f: Any) -> int:
    """How many descriptors a daemon frame announces (0 but for ``ReplyFds`` and ``EventFds``)."""
    return f.fds if isinstance(f, (ReplyFds, EventFds)) else 0


def encode_handshake(token: Union[bytes, bytearray, memoryview], version: int = PROTOCOL_VERSION) -> bytearray:
    """Build the 44-byte handshake frame (section 4) in a ``bytearray``.

    The caller should :func:`wipe` the result once it has been sent.
    ``version`` is for tests (a version-1 handshake must be refused).
    """
    if len(token) != TOKEN_LEN:
        raise ValueError(f"a token is {TOKEN_LEN} bytes")
    out = bytearray(HANDSHAKE_FRAME_LEN)
    _LEN.pack_into(out, 0, HANDSHAKE_PAYLOAD_LEN)
    out[4:8] = MAGIC
    _U32.pack_into(out, 8, version)
    out[12:44] = token
    return out


def encode_request_payload(request: Request, service: Service = HUB) -> bytes:
    """Encode a request's payload (no length prefix): 12-byte header, then for
    a ``Call`` the service's request to the end of the payload."""
    head = _u64(request.id) + _u32(int(request.kind))
    if request.kind == RequestKind.CallFds:
        head += _u32(len(request.fds) if request.announced is None else request.announced)
    body = b""
    if request.call is not None:
        body = service.encode_request(request.call)
    elif request.expect is not None:
        body = _string(request.expect.service) + _u32(request.expect.service_version)
    elif request.kind == RequestKind.Expect:
        raise ValueError("an Expect needs its body: Request(id, RequestKind.Expect, expect=Expect(service, version))")
    return head + body + bytes(request.extra)


def encode_request(request: Request, service: Service = HUB) -> bytes:
    """Encode a request as a complete frame, length prefix included."""
    return frame(encode_request_payload(request, service))


class RequestRejected(Exception):
    """What the daemon answers a request payload with, according to section 6
    (see :func:`decode_request`): ``code`` and ``id`` of the ``Error``."""

    def __init__(self, code: ErrorCode, id: Optional[int], why: str) -> None:  # noqa: A002
        super().__init__(f"{code.name} (id {id}): {why}")
        self.code = code
        self.id = id
        self.closes = code not in TRANSPORT_ERRORS_WITH_ID


def decode_request(payload: Union[bytes, bytearray, memoryview], service: Service = HUB) -> Request:
    """Decode a request payload (no length prefix) the way section 6 says the
    daemon does, or raise :class:`RequestRejected` with the code and id of the
    ``Error`` it answers with. A client does not need this; the tests use it to
    check the encoders and the spec's negative vectors against each other."""
    if len(payload) < REQUEST_HEADER_LEN:
        raise RequestRejected(ErrorCode.Malformed, None, f"{len(payload)} bytes: shorter than the header")
    rid, kind = struct.unpack_from("<QI", payload, 0)
    body = memoryview(payload)[REQUEST_HEADER_LEN:]
    if kind == RequestKind.Call:
        try:
            call = service.decode_request(body)
        except DecodeError as err:
            raise RequestRejected(ErrorCode.BadRequest, rid, str(err)) from None
        return Request(rid, RequestKind.Call, call)
    if kind in (RequestKind.Ping, RequestKind.Shutdown):
        if len(body):
            raise RequestRejected(ErrorCode.BadRequest, rid, f"{len(body)} byte(s) after the header")
        return Request(rid, RequestKind(kind))
    if kind == RequestKind.Expect:
        # A String and a u32 (section 5), nothing left over; else BadRequest
        # with the id, and the connection stays open (section 6).
        try:
            r = _Reader(body)
            expect = Expect(r.string("service"), r.u32("service_version"))
            r.finish()
        except DecodeError as err:
            raise RequestRejected(ErrorCode.BadRequest, rid, f"Expect: {err}") from None
        return Request(rid, RequestKind.Expect, expect=expect)
    if kind == RequestKind.AcceptFds:
        if len(body):
            raise RequestRejected(ErrorCode.BadRequest, rid, f"AcceptFds with {len(body)} byte(s) after the header")
        return Request(rid, RequestKind.AcceptFds)
    if kind == RequestKind.CallFds:
        # The fds field first (section 19.4: 0 or over 8 is TooManyDescriptors
        # and closes), then the service's request, as for a Call. (Whether the
        # descriptors arrived, and AcceptFds, the payload cannot say.)
        if len(body) < 4:
            raise RequestRejected(ErrorCode.BadRequest, rid, "CallFds without its fds field")
        (nfds,) = _U32.unpack_from(body, 0)
        if not 1 <= nfds <= MAX_FDS_PER_FRAME:
            raise RequestRejected(ErrorCode.TooManyDescriptors, None, f"CallFds announcing {nfds} descriptors")
        try:
            call = service.decode_request(body[4:])
        except DecodeError as err:
            raise RequestRejected(ErrorCode.BadRequest, rid, str(err)) from None
        return Request(rid, RequestKind.CallFds, call, announced=nfds)
    raise RequestRejected(ErrorCode.UnknownRequest, rid, f"kind {kind}")


def check_error_frame(err: Error) -> None:
    """Raise :class:`ProtocolError` if an ``Error``'s code or id presence is
    not one section 8 allows: an unknown transport code, or an id present on
    an error that closes (or absent on one that does not, service errors
    included, which always carry the id)."""
    if err.code < SERVICE_CODE_BASE:
        try:
            code = ErrorCode(err.code)
        except ValueError:
            raise ProtocolError(f"Error with transport code {err.code}, which section 8 does not define") from None
        wants_id = code in TRANSPORT_ERRORS_WITH_ID
        name = code.name
    else:
        wants_id = True
        name = f"service code {err.code}"
    if wants_id and err.id is None:
        raise ProtocolError(f"Error {name} without the id of the request it answers")
    if not wants_id and err.id is not None:
        raise ProtocolError(f"Error {name} carries id {err.id}, but errors that close have the id absent")


def decode_daemon_frame(payload: Union[bytes, bytearray, memoryview], service: Service = HUB) -> DaemonFrame:
    """Decode one daemon payload (no length prefix) strictly, or raise
    :class:`ProtocolError` (:class:`DecodeError` for section 5 violations).

    ``Reply`` and ``Event`` bodies are decoded by ``service`` and must use
    exactly the rest of the payload. ``Error`` frames are checked with
    :func:`check_error_frame`.
    """
    r = _Reader(payload)
    tag = r.tag(FrameTag, "frame tag")
    out: DaemonFrame
    if tag == FrameTag.Welcome:
        out = Welcome(r.u32("protocol_version"), r.string("service"), r.u32("service_version"),
                      r.string("software_version"), r.u64("instance_id"), r.u64("connection_id"),
                      r.u32("max_frame_len"))
        r.finish()
    elif tag == FrameTag.Reply:
        rid = r.u64("id")
        reply = service.decode_reply(r.rest())
        service.check_reply_fds(reply, 0)
        out = Reply(rid, reply)
    elif tag == FrameTag.Event:
        stream = r.u64("stream")
        event = service.decode_event(r.rest())
        service.check_event_stream(stream, event)
        service.check_event_fds(event, 0)
        out = Event(stream, event)
    elif tag in (FrameTag.ReplyFds, FrameTag.EventFds):
        head = r.u64("id" if tag == FrameTag.ReplyFds else "stream")
        nfds = r.u32("fds")
        if not 1 <= nfds <= MAX_FDS_PER_FRAME:
            raise ProtocolError(f"{tag.name} announcing {nfds} descriptors (1 to {MAX_FDS_PER_FRAME}, section 19.2)")
        if tag == FrameTag.ReplyFds:
            reply = service.decode_reply(r.rest())
            service.check_reply_fds(reply, nfds)
            out = ReplyFds(head, reply, nfds)
        else:
            event = service.decode_event(r.rest())
            service.check_event_stream(head, event)
            service.check_event_fds(event, nfds)
            out = EventFds(head, event, nfds)
    elif tag == FrameTag.Ack:
        out = Ack(r.u64("id"))
        r.finish()
    elif tag == FrameTag.Error:
        out = Error(r.option_u64("id"), r.u32("code"), r.string("message"))
        r.finish()
        check_error_frame(out)
    elif tag == FrameTag.Closing:
        out = Closing(r.tag(CloseReason, "close reason"))
        r.finish()
    else:
        out = Lagged(r.u64("stream"), r.u64("missed"))
        r.finish()
        if out.stream == 0:
            raise ProtocolError("Lagged for stream 0, whose events are never dropped (policy Disconnect)")
        if out.missed == 0:
            raise ProtocolError(f"Lagged for stream {out.stream} with missed 0 (it is at least 1)")
    return out


def encode_daemon_frame_payload(f: DaemonFrame, service: Service = HUB) -> bytes:
    """Encode a daemon frame's payload (the tests use it to round-trip vectors
    and to play a fake daemon)."""
    if isinstance(f, Welcome):
        return (_u32(FrameTag.Welcome) + _u32(f.protocol_version) + _string(f.service) + _u32(f.service_version)
                + _string(f.software_version) + _u64(f.instance_id) + _u64(f.connection_id)
                + _u32(f.max_frame_len))
    if isinstance(f, ReplyFds):
        return _u32(FrameTag.ReplyFds) + _u64(f.id) + _u32(f.fds) + service.encode_reply(f.reply)
    if isinstance(f, EventFds):
        return _u32(FrameTag.EventFds) + _u64(f.stream) + _u32(f.fds) + service.encode_event(f.event)
    if isinstance(f, Reply):
        return _u32(FrameTag.Reply) + _u64(f.id) + service.encode_reply(f.reply)
    if isinstance(f, Event):
        return _u32(FrameTag.Event) + _u64(f.stream) + service.encode_event(f.event)
    if isinstance(f, Ack):
        return _u32(FrameTag.Ack) + _u64(f.id)
    if isinstance(f, Error):
        return _u32(FrameTag.Error) + _option_u64(f.id) + _u32(f.code) + _string(f.message)
    if isinstance(f, Closing):
        return _u32(FrameTag.Closing) + _u32(f.reason)
    if isinstance(f, Lagged):
        return _u32(FrameTag.Lagged) + _u64(f.stream) + _u64(f.missed)
    raise TypeError(f"not a daemon frame: {f!r}")


def encode_daemon_frame(f: DaemonFrame, service: Service = HUB) -> bytes:
    """Encode a daemon frame, length prefix included."""
    return frame(encode_daemon_frame_payload(f, service))


def split_frame(data: Union[bytes, bytearray], limit: int = PROTOCOL_MAX_FRAME_LEN) -> Tuple[bytes, bytes]:
    """Split one complete frame off ``data``: returns (payload, rest).

    Raises :class:`FrameTooLargeError` if the prefix is over ``limit`` (before
    looking at anything after it) and :class:`DecodeError` if the frame is
    incomplete.
    """
    if len(data) < 4:
        raise DecodeError("incomplete length prefix")
    (length,) = _LEN.unpack_from(data, 0)
    if length > limit:
        raise FrameTooLargeError(f"frame of {length} bytes is over the limit of {limit}")
    if len(data) < 4 + length:
        raise DecodeError("incomplete frame")
    return bytes(data[4:4 + length]), bytes(data[4 + length:])


def take_payload(rbuf: bytearray, limit: int, fill: Callable[[], None]) -> bytes:
    """Take one frame's payload off the front of ``rbuf``.

    ``fill`` is called whenever more bytes are needed; it appends to ``rbuf``
    or raises. The length prefix is checked against ``limit`` before the
    payload is awaited or room is made for it, and bytes after the frame stay
    in ``rbuf`` for the next one.
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
    return payload


def read_frame(rbuf: bytearray, limit: int, fill: Callable[[], None], service: Service = HUB) -> DaemonFrame:
    """Take one frame off the front of ``rbuf`` (see :func:`take_payload`) and decode it."""
    return decode_daemon_frame(take_payload(rbuf, limit, fill), service)


def check_welcome(welcome: Welcome, service: Service = HUB) -> None:
    """The checks of section 7 / section 16 step 6 on ``Welcome``: protocol
    version 2 and ``max_frame_len`` in 1024..16777216 (else
    :class:`ProtocolError`), then the service's name and version (else
    :class:`WrongServiceError`, naming both), unless ``service`` accepts any."""
    if welcome.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(f"Welcome for protocol version {welcome.protocol_version}, "
                            f"not {PROTOCOL_VERSION}")
    if not MIN_MAX_FRAME_LEN <= welcome.max_frame_len <= PROTOCOL_MAX_FRAME_LEN:
        raise ProtocolError(f"Welcome announces max_frame_len {welcome.max_frame_len}, "
                            f"outside {MIN_MAX_FRAME_LEN}..{PROTOCOL_MAX_FRAME_LEN}")
    if service.name is not None and (welcome.service, welcome.service_version) != (service.name, service.version):
        raise WrongServiceError(welcome.service, welcome.service_version, (service.name, service.version or 0))


# --------------------------------------------------------------------------
# Locating the daemon and the token (section 11)
# --------------------------------------------------------------------------


def _env_value(env: Mapping[str, str], name: str) -> Optional[str]:
    """A variable set to the empty string counts as unset."""
    value = env.get(name)
    return value if value else None


def runtime_dir(env: Optional[Mapping[str, str]] = None) -> str:
    """The runtime directory: ``$KEYHOLE_DIR``, else ``$XDG_RUNTIME_DIR/keyhole``,
    else ``$HOME/.keyhole`` (first match wins; empty counts as unset; no
    fallback to the password database)."""
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
    raise NoRuntimeDirectory("no runtime directory: set KEYHOLE_DIR (or XDG_RUNTIME_DIR or HOME), "
                      "or give both KEYHOLE_SOCKET and the token (KEYHOLE_TOKEN or KEYHOLE_TOKEN_FILE)")


def socket_path(env: Optional[Mapping[str, str]] = None) -> str:
    """``$KEYHOLE_SOCKET``, else ``<runtime directory>/keyhole.sock``."""
    env = os.environ if env is None else env
    return _env_value(env, "KEYHOLE_SOCKET") or os.path.join(runtime_dir(env), SOCKET_NAME)


def token_file_path(env: Optional[Mapping[str, str]] = None) -> str:
    """``$KEYHOLE_TOKEN_FILE``, else ``<runtime directory>/session-token``."""
    env = os.environ if env is None else env
    return _env_value(env, "KEYHOLE_TOKEN_FILE") or os.path.join(runtime_dir(env), TOKEN_FILE_NAME)


_UID_RE = re.compile(r"[0-9]+", re.ASCII)


def daemon_uid(env: Optional[Mapping[str, str]] = None) -> int:
    """The uid the daemon must run as (section 11, check 3):
    ``$KEYHOLE_DAEMON_UID`` if set (a decimal number with no sign), else our
    effective uid. Any other text raises :class:`ConfigError` naming the
    variable."""
    env = os.environ if env is None else env
    text = _env_value(env, "KEYHOLE_DAEMON_UID")
    if text is None:
        return os.geteuid()
    if not _UID_RE.fullmatch(text) or int(text) > 0xFFFF_FFFF:  # a uid is a u32 (struct ucred)
        raise DaemonUidError(f"KEYHOLE_DAEMON_UID must be a uid as a decimal number with no sign, "
                          f"such as 1000; got {text[:40]!r}")
    return int(text)


_HEX_DIGITS = b"0123456789abcdef"


def parse_token_text(text: Union[bytes, bytearray]) -> bytearray:
    """Parse the token's text form: exactly 64 lowercase hex digits, optionally
    followed by one ``\\n``, nothing else. Returns the 32 raw bytes in a
    ``bytearray`` (wipe it when done).

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

    The file is opened with ``O_NONBLOCK`` (a FIFO planted at the path cannot
    hang us) and checked with ``fstat`` on the open descriptor (the file
    checked is the file read): after following symbolic links it must be a
    regular file owned by our effective uid with ``mode & 0o077 == 0``, holding
    one token. At most a few hundred bytes are read; the text is wiped.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise TokenNotFoundError(f"no token file at {path}") from None
    except OSError as err:
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
        chunk = bytearray(MAX_TOKEN_FILE_READ + 1)
        try:
            while len(text) <= MAX_TOKEN_FILE_READ:
                n = os.readv(fd, [memoryview(chunk)[:MAX_TOKEN_FILE_READ + 1 - len(text)]])
                if not n:
                    break
                text += chunk[:n]
        finally:
            wipe(chunk)
        return parse_token_text(text)
    finally:
        os.close(fd)
        wipe(text)


def load_token(env: Optional[Mapping[str, str]] = None) -> bytearray:
    """The raw token (section 11): ``$KEYHOLE_TOKEN`` if set, else
    ``$KEYHOLE_TOKEN_FILE``, else ``<runtime directory>/session-token``.

    (A token the user gives explicitly is passed to
    :meth:`KeyholeClient.connect` instead.) The ``str`` of an environment
    variable cannot be wiped; the bytes parsed from it are returned in a
    ``bytearray``.
    """
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
    try:
        path = token_file_path(env)
    except NoRuntimeDirectory:
        raise TokenNotFoundError("no token: KEYHOLE_TOKEN and KEYHOLE_TOKEN_FILE are unset and there is no "
                                 "runtime directory (KEYHOLE_DIR, XDG_RUNTIME_DIR, HOME) to find "
                                 "session-token in") from None
    return read_token_file(path)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket
    (``SO_PEERCRED``: ``struct ucred``, three 32-bit integers in native order)."""
    if not hasattr(socket, "SO_PEERCRED"):
        raise PeerCredentialsError("SO_PEERCRED is not available on this platform; the token was not sent")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("=iII"))
    except OSError as err:
        raise PeerCredentialsError(f"cannot read the peer's credentials: {err}; the token was not sent") from None
    if len(raw) != struct.calcsize("=iII"):
        raise PeerCredentialsError("short SO_PEERCRED answer; the token was not sent")
    _pid, uid, _gid = struct.unpack("=iII", raw)
    return int(uid)


def check_peer(sock: socket.socket, expected_uid: Optional[int] = None) -> None:
    """Section 11, check 3: raise :class:`PeerCredentialsError` unless the
    peer runs as ``expected_uid`` (default: :func:`daemon_uid` of the
    process environment)."""
    expected = daemon_uid() if expected_uid is None else expected_uid
    uid = peer_uid(sock)
    if uid != expected:
        raise PeerCredentialsError(
            f"the socket's peer runs as uid {uid}, not {expected}; the token was not sent")


def open_checked_socket(path: str, timeout: float = DEFAULT_TIMEOUT,
                        expected_uid: Optional[int] = None) -> socket.socket:
    """Connect to the pathname socket ``path`` and check the peer's uid.

    Nothing is sent. Raises :class:`DaemonNotRunning` (no socket, or nobody
    listening), :class:`DaemonBusy` (``EAGAIN``: the socket's listen queue
    is full; one attempt only, :meth:`KeyholeClient.connect` retries),
    :class:`ConfigError` (a path that cannot be a pathname socket) or
    :class:`PeerCredentialsError` (after closing the socket).
    """
    if not path or "\0" in path:
        raise ConfigError("the socket must be a pathname socket (no NUL byte, never the abstract namespace)")
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise ConfigError(f"socket path of {len(os.fsencode(path))} bytes: sun_path holds at most "
                          f"{SUN_PATH_MAX - 1} (plus the terminating NUL)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise DaemonNotRunning(f"daemon not running: {path}: {err.strerror}") from None
        except socket.timeout:
            raise KeyholeTimeout(f"timed out connecting to {path}") from None
        except BlockingIOError as err:
            # The socket is non-blocking (it has a timeout): a full listen
            # queue is EAGAIN, which section 9 says to treat as "busy".
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            raise DaemonBusy(f"the daemon is busy: {path}: its listen queue is full (EAGAIN)") from None
        check_peer(sock, expected_uid)
    except BaseException:
        sock.close()
        raise
    return sock


def welcome_from_first_frame(first: DaemonFrame, service: Service = HUB) -> Welcome:
    """Judge the daemon's first frame (section 16 step 6): ``Welcome``
    (returned once :func:`check_welcome` passed), an ``Error`` a pending
    connection can get (id absent, a code of 0 to 7 or 13: raised as its
    :class:`KeyholeError`, a :class:`HandshakeRefused`), anything else a
    :class:`ProtocolError`."""
    if isinstance(first, Welcome):
        check_welcome(first, service)
        return first
    if isinstance(first, Error) and first.id is None and first.code in HANDSHAKE_PHASE_ERRORS:
        raise KeyholeError.from_frame(first, service)
    raise ProtocolError(f"expected Welcome or an Error as the daemon's first frame, got {first!r}")


def ended_before_welcome(received: int, reset: bool) -> KeyholeException:
    """What the end of the connection before the first frame is: a refusal
    (:class:`RefusedWithoutFrame`) if nothing came, a :class:`ProtocolError`
    if it ended inside the frame."""
    if received:
        return ProtocolError("the connection ended inside the daemon's first frame")
    return RefusedWithoutFrame("the connection ended before Welcome: the handshake was refused", reset=reset)


def kind_name(kind: int) -> str:
    """A request kind's name for messages."""
    try:
        return RequestKind(kind).name
    except ValueError:
        return f"request of kind {kind}"


__all__ = ["MAGIC", "PROTOCOL_VERSION", "TOKEN_LEN", "HANDSHAKE_PAYLOAD_LEN", "HANDSHAKE_FRAME_LEN",
           "REQUEST_HEADER_LEN", "PROTOCOL_MAX_FRAME_LEN", "MIN_MAX_FRAME_LEN", "SERVICE_CODE_BASE",
           "MAX_ERROR_MESSAGE_LEN", "MAX_SUBJECT_LEN", "MAX_TOPIC_LEN", "MAX_SUBSCRIPTIONS", "MAX_NAMES",
           "MAX_IN_FLIGHT_PER_RESPONDER", "MAX_FAILURE_MESSAGE_LEN", "DEFAULT_REQUEST_TIMEOUT_MS",
           "MAX_REQUEST_TIMEOUT_MS", "MESSAGE_EVENT_OVERHEAD", "REQUEST_EVENT_OVERHEAD",
           "RESPONSE_EVENT_OVERHEAD", "MAX_TOKEN_FILE_READ", "SUN_PATH_MAX", "SOCKET_NAME",
           "TOKEN_FILE_NAME", "DEFAULT_TIMEOUT", "RETRY_FIRST_DELAY", "RETRY_MAX_DELAY",
           "DEFAULT_MAX_QUEUED_EVENT_BYTES", "MAX_FDS_PER_FRAME", "RECV_FDS_ROOM", "MAX_QUEUED_FDS_AT_DAEMON",
           "DEFAULT_MAX_QUEUED_FDS", "MAX_MEMFD_LEN", "MEMFD_SEALS", "RECV_CONTROL_LEN", "recv_with_fds",
           "send_with_fds", "close_fds", "read_memfd", "memfd_seals", "MemfdSource", "sealed_memfd",
           "PublishMemfd", "MessageMemfd", "ReplyFds", "EventFds", "frame_fds", "BadMemfdError",
           "DescriptorsNotAcceptedError", "DescriptorMismatchError", "TooManyDescriptorsError", "RequestKind", "FrameTag", "ErrorCode",
           "TRANSPORT_ERRORS_WITH_ID", "HANDSHAKE_PHASE_ERRORS", "BUSY_ERRORS", "CloseReason",
           "HubRequestTag", "HubReplyTag", "HubEventTag", "Lag", "FailureTag", "OutcomeTag", "HubErrorCode",
           "KeyholeException", "ConfigError", "NoRuntimeDirectory", "DaemonUidError", "TokenError",
           "TokenNotFoundError", "TokenPermissionError", "TokenFormatError", "DaemonNotRunning",
           "PeerCredentialsError", "KeyholeTimeout", "DaemonBusy", "ProtocolError", "DecodeError",
           "FrameTooLargeError", "WrongServiceError", "WrongServiceDaemonError", "RequestTooLarge", "TopicError", "SidError",
           "EventQueueFull", "ConnectionClosed", "DaemonClosing", "HandshakeRefused", "RefusedWithoutFrame",
           "KeyholeError", "ServiceError", "ERROR_CLASSES", "HandshakeExpectedError", "BadMagicError",
           "UnsupportedVersionError", "BadTokenError", "AuthTimeoutError", "PeerNotAllowedError",
           "TooManyUnauthenticatedError", "TooManyConnectionsError", "FrameTooLargeDaemonError",
           "MalformedError", "UnknownRequestError", "BadRequestError", "NotPermittedError",
           "ShuttingDownError", "InternalError", "OverBudgetError", "RequestError", "InvalidTopicError",
           "HubShuttingDownError", "TooManySubscriptionsError", "SidInUseError", "NoRespondersError",
           "BusyError", "TooManyNamesError", "TooLargeError", "ResponderGoneError", "RequestTimeout",
           "ReplyTooLargeError", "RequestFailed", "frame", "wipe", "StatusRequest", "Subscribe",
           "Unsubscribe", "Publish", "Serve", "Unserve", "RequestTo", "FailureReplyTooLarge",
           "FailureFailed", "Failure", "Respond", "Fail", "TopicsRequest", "HubRequest", "Status",
           "Subscribed", "Unsubscribed", "Published", "Serving", "Unserved", "Requested", "Responded",
           "TopicList", "HubReply", "Message", "IncomingRequest", "OutcomeReply", "OutcomeResponderGone",
           "OutcomeTimeout", "OutcomeReplyTooLarge", "OutcomeFailed", "Outcome", "Response", "HubEvent",
           "outcome_result", "Service", "RAW", "SUBJECT_KINDS", "check_subject", "check_topic",
           "timeout_ms_for", "effective_timeout_ms", "HubService", "HUB", "Request", "Welcome", "Reply",
           "Event", "Ack", "Error", "Closing", "Lagged", "DaemonFrame", "Expect", "encode_handshake",
           "encode_request_payload", "encode_request", "RequestRejected", "decode_request",
           "check_error_frame", "decode_daemon_frame", "encode_daemon_frame_payload", "encode_daemon_frame",
           "split_frame", "take_payload", "read_frame", "check_welcome", "runtime_dir", "socket_path",
           "token_file_path", "daemon_uid", "parse_token_text", "read_token_file", "load_token", "peer_uid",
           "check_peer", "open_checked_socket", "welcome_from_first_frame", "ended_before_welcome",
           "kind_name"]
