"""The state of one connection, without its I/O (sans-IO), shared by
:class:`~keyhole_client.KeyholeClient` (blocking) and
:class:`~keyhole_client.AsyncKeyholeClient` (asyncio).

:class:`Connection` holds everything a connection knows: the FIFO of
outstanding requests, the replies not taken yet, the event queue and its
routes (subscriptions, responses, incoming requests), the receive buffer.
The two clients only move bytes: they append what they read to ``_rbuf``,
hand each complete frame to :meth:`Connection._handle_payload`, and write
what :meth:`Connection._prepare_send` encoded. Everything a reply, an event
or the end of the connection does to that state is decided here, once.
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

from ._protocol import (BUSY_ERRORS, DEFAULT_MAX_QUEUED_EVENT_BYTES, ERROR_CLASSES, DaemonBusy, ErrorCode, RETRY_FIRST_DELAY, RETRY_MAX_DELAY, daemon_uid,
                        socket_path, load_token, encode_handshake, wipe, DEFAULT_TIMEOUT, RESPONSE_EVENT_OVERHEAD, Ack, Closing,
                        ConnectionClosed, DaemonClosing, DaemonFrame, Error, Event, EventQueueFull, Expect, Fail,
                        FailureReplyTooLarge, FrameTooLargeError, HubService,
                        IncomingRequest, KeyholeError, KeyholeTimeout, Lag, Lagged, Message,
                        ProtocolError, Reply, Request, RequestKind, RequestTo, RequestTooLarge, Respond,
                        Response, Serve, Service, SidError, Subscribe, Unserve, Unsubscribe, Welcome,
                        WrongServiceDaemonError, HUB,
                        _LEN, check_subject, decode_daemon_frame, effective_timeout_ms, encode_request_payload,
                        kind_name, timeout_ms_for, DEFAULT_MAX_QUEUED_FDS, MAX_FDS_PER_FRAME, EventFds,
                        MessageMemfd, PublishMemfd, ReplyFds, close_fds, frame_fds)

@dataclass(frozen=True)
class CallWithFds:
    """A service request sent in a ``CallFds`` carrying ``fds`` (1 to 8
    descriptors, section 19.2), as a :data:`RequestSpec`: the id comes from
    the counter as for any other. The descriptors stay open in the sender."""

    call: Any
    fds: Tuple[int, ...]


RequestSpec = Union[RequestKind, Expect, Request, CallWithFds, Any]
"""What :meth:`KeyholeClient.send` takes: ``RequestKind.Ping`` or
``RequestKind.Shutdown``, an :class:`Expect` (``RequestKind.Expect``: one
naming the connection's own service), a service request (sent in a
``Call``), or a complete :class:`Request` (its id and kind are used as they
are)."""

EXPECT_ID = 0
"""The id of the ``Expect`` that ``connect`` puts between the handshake and
the early requests (the vector ``expect`` of section 15.2 has it too): the
counter of the other requests starts at 1 by default
(:data:`DEFAULT_NEXT_REQUEST_ID`), and the ``Expect`` is outside that count
(section 17.3): it never moves the counter.

With ``next_request_id`` set, the counter may reach 0 too (it wraps from
2^64 - 1 to 0, section 6): the replies still match, since they come in
request order and each is checked against the oldest outstanding request."""

U64_LIMIT = 1 << 64
"""Request ids and sids are ``u64``: every value below this."""

DEFAULT_NEXT_REQUEST_ID = 1
"""The id of a connection's first request by default (the ``Expect`` sent
with the handshake takes :data:`EXPECT_ID`, outside the count)."""

DEFAULT_NEXT_SUBSCRIPTION_ID = 1
"""The sid of a connection's first subscription by default."""


def check_next_request_id(value: int) -> int:
    """``next_request_id`` as ``connect`` takes it: any ``u64``, 0 and
    2^64 - 1 included (section 6)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < U64_LIMIT:
        raise ValueError(f"next_request_id must be an integer from 0 to 2^64 - 1, not {value!r}")
    return value


def check_next_subscription_id(value: int) -> int:
    """``next_subscription_id`` as ``connect`` takes it: 1 to 2^64 - 1 (0 is
    never a sid, sections 14 and 16)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < U64_LIMIT:
        raise ValueError(f"next_subscription_id must be an integer from 1 to 2^64 - 1, not {value!r}")
    return value


@dataclass
class _Outstanding:
    id: int
    kind: int
    call: Any
    route: Any = None
    """What the request put in place before it was sent (a hub
    :class:`Subscription`, or True for a ``Request``'s response route), that
    an ``Error`` in answer takes back."""
    internal: bool = False
    """The ``Expect`` that ``connect`` sent on its own: nobody waits for
    its reply (kept in :attr:`Connection.expect_reply`)."""


class _FdGroup:
    """Descriptors received with one ``recvmsg`` that returned the bytes
    ``[start, end)`` of the connection (section 19.3); ``taken`` once the
    frame they belong to claimed them."""

    __slots__ = ("start", "end", "fds", "taken")

    def __init__(self, start: int, end: int, fds: List[int]) -> None:
        self.start = start
        self.end = end
        self.fds = fds
        self.taken = False


def _frame_descriptors(f: Any) -> Tuple[int, ...]:
    """The descriptors a received frame holds (its own, and a hub memfd's)."""
    if isinstance(f, (ReplyFds, EventFds)):
        return f.descriptors
    return ()


class _Entry:
    """One queued ``Event`` or ``Lagged`` frame: the key of its route, the
    frame, its size in bytes on the wire; ``taken`` once delivered."""

    __slots__ = ("key", "frame", "size", "taken")

    def __init__(self, key: Tuple[Any, ...], frame: Union["Event", "Lagged"], size: int) -> None:
        self.key = key
        self.frame = frame
        self.size = size
        self.taken = False


class SubscriptionBase:
    """A hub subscription: the event stream ``sid`` of its connection, fed by
    every topic ``pattern`` matches, with the lag policy ``lag``.

    :meth:`next` (and iteration) returns the subscription's items in the
    order they arrived: a :class:`Message`, or a :class:`Lagged` saying how
    many of its messages the daemon dropped just before the next one (only
    under ``Lag.DropOldest``). A loss is therefore always in the application's
    hands, never swallowed. ``received`` counts the messages routed to it,
    ``missed`` the sum of its ``Lagged`` counts, ``lagged`` its ``Lagged``
    frames; ``received + missed`` is every event the stream was sent.
    ``confirmed`` once its ``Subscribed`` reply came; ``active`` is False
    once it has ended: at its ``Unsubscribed`` reply (after which nothing of
    its sid arrives, section 14, so the sid may serve a new subscription at
    once), or when the hub refused it."""

    _serials = 0

    _serials = 0

    def __init__(self, client: "Connection", sid: int, pattern: str, lag: Lag) -> None:
        self.client = client
        self.sid = sid
        self.pattern = pattern
        self.lag = Lag(lag)
        self.active = True
        self.confirmed = False
        self.received = 0
        self.missed = 0
        self.lagged = 0
        SubscriptionBase._serials += 1
        self._key: Tuple[Any, ...] = ("sub", sid, SubscriptionBase._serials)

    @property
    def key(self) -> Tuple[Any, ...]:
        """The key of its route: one per subscription, not per sid, since a
        sid may be used again by the next subscription."""
        return self._key

    def _check_next(self) -> None:
        if not self.active and self.client._head(self.key) is None:
            raise ValueError(f"subscription {self.sid} ({self.pattern!r}) has ended")

    def _ready(self) -> bool:
        return self.client._head(self.key) is not None

    def _wanted(self, f: Event) -> bool:
        """Whether an event read while the queue is full is this subscription's."""
        return f.stream == self.sid and self.client._stream_target(self.sid) is self

    def _take_next(self) -> Union[Message, Lagged]:
        f = self.client._take(self.client._head(self.key))  # type: ignore[arg-type]
        return f.event if isinstance(f, Event) else f

    @property
    def queued(self) -> int:
        """Items of this subscription waiting to be taken."""
        q = self.client._queues.get(self.key)
        return sum(not e.taken for e in q) if q else 0

    def __repr__(self) -> str:
        return (f"<Subscription {self.sid} {self.pattern!r} {self.lag.name}"
                f"{'' if self.active else ' ended'}: {self.received} received, {self.missed} missed>")


class Connection:
    """What the blocking and the asyncio clients share: the state of one
    authenticated connection and every rule that changes it (see the
    clients' documentation for the behaviour). Not for direct use."""

    _subscription_class: Type[SubscriptionBase] = SubscriptionBase

    def __init__(self, welcome: Welcome, rbuf: Optional[bytearray] = None, *,
                 service: Service = HUB,
                 max_queued_event_bytes: int = DEFAULT_MAX_QUEUED_EVENT_BYTES) -> None:
        self.welcome = welcome
        self.service = service
        self.max_queued_event_bytes = max_queued_event_bytes
        self.final_frame: Optional[Union[Error, Closing]] = None
        self.timeout: Optional[float] = DEFAULT_TIMEOUT
        self._rbuf = bytearray() if rbuf is None else rbuf
        self._next_id = DEFAULT_NEXT_REQUEST_ID
        self._outstanding: Deque[_Outstanding] = collections.deque()
        self._replies: Dict[int, Deque[Union[Reply, Ack, Error]]] = {}
        # Queued events: in arrival order (_all) and per route (_queues).
        self._all: Deque[_Entry] = collections.deque()
        self._queues: Dict[Tuple[Any, ...], Deque[_Entry]] = {}
        self._event_bytes = 0
        self._queued = 0
        # The hub's routes. Per sid, its subscriptions not ended yet, in the
        # order their Subscribe was sent: the first is the one whose events
        # arrive now; a later one takes over at the first's Unsubscribed.
        self._chains: Dict[int, Deque[SubscriptionBase]] = {}
        self._next_sid = DEFAULT_NEXT_SUBSCRIPTION_ID
        self._awaiting: Dict[int, List[int]] = {}  # Call id -> [Requested awaited, Response awaited]
        self._abandoned: Set[int] = set()
        self.served: Set[str] = set()
        """Names this connection serves (as far as the hub's replies said)."""
        self.ignored_events = 0
        """``Response`` events dropped because their request is not (or no
        longer) awaited: one this client gave up (:meth:`request`'s own
        deadline), or one that is none of ours."""
        self._closed = False
        self._ended: Optional[ConnectionClosed] = None
        self.attempts = 1  # connections connect() made until this one was admitted, this one included
        self.early_ids: List[int] = []
        """The ids of the requests ``connect`` sent in the handshake's write
        (``early``), in order: wait for them with ``wait_reply`` / ``result``."""
        self.expect_reply: Optional[Union[Ack, Error]] = None
        """The answer to the ``Expect`` that ``connect`` sent behind the
        handshake, once read (``Ack``; an ``Error`` with its id would come
        from a daemon that predates ``Expect``: harmless, since ``Welcome``
        named our service and was checked first)."""
        # Descriptors (section 19).
        self.fds_requested = False
        """True once an ``AcceptFds`` was sent: every read since takes ancillary data."""
        self.fds_accepted = False
        """True once the ``Ack`` of an ``AcceptFds`` came: the daemon may send descriptors."""
        self.max_queued_fds = DEFAULT_MAX_QUEUED_FDS
        """Descriptors the event queue may hold before it counts as full."""
        self._queued_fds = 0
        self._rx_base = 0  # the connection's byte count at _rbuf[0] (section 19.3: one count per side)
        self._taken_at = 0  # where the frame _take_payload took last started
        self._fd_groups: Deque[_FdGroup] = collections.deque()
    # -- the end of the connection ------------------------------------------

    def _close_transport(self) -> None:
        """Close the socket (the client's own I/O)."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """True once the connection is over (closed by us, ended by the daemon,
        or after the daemon's final frame)."""
        return self._closed or self._ended is not None

    def _end(self, exc: ConnectionClosed) -> ConnectionClosed:
        """Record the end of the connection; every later read raises ``exc``'s like."""
        exc.unanswered = [o.id for o in self._outstanding]
        self._ended = exc
        self._outstanding.clear()
        self._closed = True
        self._close_pending_fds()
        self._close_transport()
        return exc

    def _close_pending_fds(self) -> None:
        """Close the descriptors received that no frame took (section 19.3:
        a receiver closes every descriptor it does not hand on)."""
        while self._fd_groups:
            g = self._fd_groups.popleft()
            close_fds(g.fds)
            g.fds = []

    def _release_fds(self) -> None:
        """At :meth:`close`: close every descriptor the application was not
        handed: those of no frame yet, of queued events not taken, of replies
        not taken."""
        self._close_pending_fds()
        for entry in self._all:
            if not entry.taken:
                self._close_entry(entry)
        for queue in self._replies.values():
            for f in queue:
                close_fds(_frame_descriptors(f))

    def _protocol_error(self, err: ProtocolError) -> ProtocolError:
        """Close the connection after a protocol error (section 7)."""
        self._end(ConnectionClosed(f"closed after a protocol error: {err}"))
        return err

    def _check_open(self) -> None:
        """Raise if the connection is over: the same kind of exception, with
        the same final frame, as when it ended."""
        e = self._ended
        if isinstance(e, DaemonClosing):
            raise DaemonClosing(e.reason, e.final_frame)
        if e is not None:
            raise ConnectionClosed(str(e), reset=e.reset, final_frame=e.final_frame)
        if self._closed:
            raise ConnectionClosed("the connection is closed")

    # -- frames in the receive buffer ---------------------------------------

    def _frame_len(self) -> Optional[int]:
        """The length of the frame at the front of the receive buffer if it
        is all there, else None. A length prefix over ``max_frame_len`` is a
        protocol error (the connection is closed) before its payload is
        awaited or room made for it (section 16 step 7)."""
        if len(self._rbuf) < 4:
            return None
        (length,) = _LEN.unpack_from(self._rbuf, 0)
        if length > self.welcome.max_frame_len:
            raise self._protocol_error(FrameTooLargeError(
                f"daemon frame of {length} bytes is over the limit of {self.welcome.max_frame_len}"))
        return length if len(self._rbuf) >= 4 + length else None

    def _take_payload(self) -> Optional[bytes]:
        """Take the complete frame at the front of the receive buffer, if any."""
        length = self._frame_len()
        if length is None:
            return None
        payload = bytes(self._rbuf[4:4 + length])
        del self._rbuf[:4 + length]
        self._taken_at = self._rx_base
        self._rx_base += 4 + length
        return payload

    def _feed(self, data: bytes, fds: Sequence[int] = (), flags: int = 0) -> None:
        """Append what one read returned to the receive buffer, with the
        descriptors that came with it (section 19.3): they belong to the
        first frame announcing descriptors whose first byte is among these
        bytes (claimed when that frame is taken). ``MSG_CTRUNC`` or more than
        8 descriptors is a protocol error; the descriptors are closed."""
        start = self._rx_base + len(self._rbuf)
        self._rbuf += data
        if flags & getattr(socket, "MSG_CTRUNC", 0):
            close_fds(fds)
            raise self._protocol_error(ProtocolError(
                "MSG_CTRUNC: the daemon sent more descriptors than the room for 9 (section 19.3)"))
        if not fds:
            return
        if len(fds) > MAX_FDS_PER_FRAME:
            close_fds(fds)
            raise self._protocol_error(ProtocolError(
                f"{len(fds)} descriptors in one read: a frame carries at most {MAX_FDS_PER_FRAME} (section 19.3)"))
        if not data:
            close_fds(fds)
            raise self._protocol_error(ProtocolError("descriptors with no byte of data"))
        if not self.fds_requested:  # pragma: no cover - only read with an ancillary buffer after AcceptFds
            close_fds(fds)
            raise self._protocol_error(ProtocolError("descriptors on a connection that did not send AcceptFds"))
        self._fd_groups.append(_FdGroup(start, start + len(data), list(fds)))

    def _settle_fds(self, next_start: int) -> None:
        """Descriptors whose bytes end at or before ``next_start`` (the first
        byte of the next frame) and that no frame took were announced by no
        frame: a protocol error (section 19.3)."""
        groups = self._fd_groups
        while groups and groups[0].end <= next_start:
            g = groups.popleft()
            if not g.taken:
                n = len(g.fds)
                close_fds(g.fds)
                g.fds = []
                raise ProtocolError(f"{n} descriptor(s) with bytes {g.start} to {g.end} of the connection, "
                                    "which no frame announces (section 19.3)")

    def _claim_fds(self, start: int, announced: int) -> Tuple[int, ...]:
        """The descriptors of the frame whose first byte is ``start`` and
        that announces ``announced`` of them: exactly those that came with
        the read that returned that byte (section 19.3), else a protocol error."""
        self._settle_fds(start)
        groups = self._fd_groups
        g = groups[0] if groups and groups[0].start <= start < groups[0].end else None
        if g is None or g.taken:
            raise ProtocolError(f"a frame announcing {announced} descriptor(s) whose descriptors did not "
                                "arrive with its first byte (section 19.3)")
        if len(g.fds) != announced:
            raise ProtocolError(f"a frame announcing {announced} descriptor(s) arrived with {len(g.fds)} "
                                "(section 19.3)")
        g.taken = True
        fds, g.fds = tuple(g.fds), []
        return fds

    def _peek(self) -> Optional[DaemonFrame]:
        """The complete frame at the front of the receive buffer, decoded but
        left there, if any."""
        length = self._frame_len()
        if length is None:
            return None
        try:
            return decode_daemon_frame(bytes(self._rbuf[4:4 + length]), self.service)
        except ProtocolError as err:
            raise self._protocol_error(err) from None

    def _check_queue(self, wanted: Any) -> None:
        """While the event queue is full, refuse to read an ``Event`` that is
        not what the current wait is for (section 16 step 10); the caller has
        the next frame complete in the buffer."""
        f = self._peek()
        if isinstance(f, Event) and not wanted(f):
            raise EventQueueFull(f"{self._queued} events ({self._event_bytes} bytes) are waiting "
                                 "to be taken; take them before waiting for anything else")

    def _queue_full(self) -> bool:
        return self._queued > 0 and (self._event_bytes >= self.max_queued_event_bytes
                                     or self._queued_fds >= self.max_queued_fds)

    # -- the event queue ----------------------------------------------------

    def _enqueue(self, key: Tuple[Any, ...], f: Union[Event, Lagged], size: int) -> None:
        entry = _Entry(key, f, size)
        self._all.append(entry)
        self._queues.setdefault(key, collections.deque()).append(entry)
        self._event_bytes += size
        self._queued += 1
        self._queued_fds += len(_frame_descriptors(f))

    def _close_entry(self, entry: _Entry) -> None:
        """Close the descriptors of a queued entry that nobody will take."""
        fds = _frame_descriptors(entry.frame)
        close_fds(fds)
        self._queued_fds -= len(fds)
        if isinstance(entry.frame, Event) and isinstance(entry.frame.event, MessageMemfd):
            entry.frame.event.fd = -1

    def _head(self, key: Tuple[Any, ...]) -> Optional[_Entry]:
        """The oldest entry of one route not taken yet, or None."""
        q = self._queues.get(key)
        while q and q[0].taken:
            q.popleft()
        if not q:
            self._queues.pop(key, None)
            return None
        return q[0]

    def _first(self) -> Optional[_Entry]:
        """The oldest entry of all not taken yet, or None."""
        while self._all and self._all[0].taken:
            self._all.popleft()
        return self._all[0] if self._all else None

    def _take(self, entry: _Entry) -> Union[Event, Lagged]:
        """Deliver one entry: the oldest of its route (it is also the oldest
        of all when taken through :meth:`next_event`)."""
        entry.taken = True
        self._event_bytes -= entry.size
        self._queued -= 1
        self._queued_fds -= len(_frame_descriptors(entry.frame))
        self._head(entry.key)
        self._first()
        return entry.frame

    def _discard(self, key: Tuple[Any, ...]) -> None:
        """Drop every entry of one route that was not taken."""
        for entry in self._queues.pop(key, ()):
            if not entry.taken:
                entry.taken = True
                self._event_bytes -= entry.size
                self._queued -= 1
                self._close_entry(entry)
        self._first()

    # -- routing (the hub: sections 13, 14 and 16 step 14) ---------------------

    def _route(self, f: Union[Event, Lagged], size: int) -> None:
        """Queue one ``Event`` or ``Lagged`` on its route (for the hub: a
        ``Message`` or ``Lagged`` of a stream that is none of our
        subscriptions is a protocol error; a ``Response`` to a request not
        awaited is dropped)."""
        hub = isinstance(self.service, HubService)
        if isinstance(f, Lagged):
            if not hub:
                self._enqueue(("stream", f.stream), f, size)
                return
            sub = self._stream_target(f.stream)
            if sub is None:
                raise ProtocolError(f"Lagged for stream {f.stream}, which is none of our subscriptions "
                                    "(section 13: never sent; section 14: nothing of a sid arrives after "
                                    "its Unsubscribed reply)")
            if sub.lag != Lag.DropOldest:
                raise ProtocolError(f"Lagged for stream {f.stream}, a Disconnect subscription "
                                    "(section 13: only DropOldest subscriptions get Lagged)")
            sub.missed += f.missed
            sub.lagged += 1
            self._enqueue(sub.key, f, size)
            return
        ev = f.event
        if hub:
            if isinstance(ev, (Message, MessageMemfd)):
                sub = self._stream_target(f.stream)
                if sub is None:
                    raise ProtocolError(f"Message on stream {f.stream}, which is none of our subscriptions "
                                        "(section 14: nothing of a sid arrives after its Unsubscribed reply)")
                sub.received += 1
                self._enqueue(sub.key, f, size)
                return
            if isinstance(ev, IncomingRequest):
                self._enqueue(("requests",), f, size)
                return
            if isinstance(ev, Response):
                state = self._awaiting.get(ev.request)
                if state is None or state[1] == 0:
                    if state is not None and state[0] > 0:
                        raise ProtocolError(f"Response to request {ev.request} before its Requested reply "
                                            "(section 14: Requested is always sent first)")
                    if ev.request in self._abandoned:
                        self._abandoned.discard(ev.request)
                    self.ignored_events += 1
                    return
                state[1] -= 1
                if state == [0, 0]:
                    del self._awaiting[ev.request]
                self._enqueue(("response", ev.request), f, size)
                return
        self._enqueue(("stream", f.stream), f, size)

    def _before_send(self, o: _Outstanding) -> None:
        """Put a hub request's routes in place before it is sent (section 16
        step 14: a subscription's route before ``Subscribe``, a response's
        before ``Request``). A ``Subscribe`` of a sid whose subscription has
        not ended yet queues behind it (it takes over at that one's
        ``Unsubscribed``, or is refused with ``SidInUse``)."""
        if o.kind != RequestKind.Call or not isinstance(self.service, HubService):
            return
        call = o.call
        if isinstance(call, Subscribe):
            if call.sid != 0:
                o.route = self._subscription_class(self, call.sid, call.pattern, call.lag)
                self._chains.setdefault(call.sid, collections.deque()).append(o.route)
        elif isinstance(call, RequestTo):
            self._awaiting.setdefault(o.id, [0, 0])[0] += 1
            o.route = True

    def _after_reply(self, o: _Outstanding, f: Union[Reply, Ack, Error]) -> None:
        """Settle the routes of a hub request once its reply is in."""
        if o.kind == RequestKind.AcceptFds and isinstance(f, Ack):
            self.fds_accepted = True
        call = o.call
        if isinstance(call, Subscribe) and isinstance(o.route, SubscriptionBase):
            if isinstance(f, Error):
                self._end_subscription(o.route)
            else:
                o.route.confirmed = True
        elif isinstance(call, Unsubscribe) and isinstance(f, Reply):
            # Every request sent before this one has its reply: the first of
            # the sid's chain is the live subscription if it is confirmed
            # (one not confirmed was sent after the Unsubscribe).
            chain = self._chains.get(call.sid)
            if chain and chain[0].confirmed:
                self._end_subscription(chain[0])
        elif isinstance(call, RequestTo) and o.route:
            state = self._awaiting.get(o.id)
            if state is not None:
                state[0] -= 1
                if isinstance(f, Reply):
                    state[1] += 1
                if state == [0, 0]:
                    del self._awaiting[o.id]
        elif isinstance(f, Reply) and isinstance(call, Serve):
            self.served.add(call.name)
        elif isinstance(f, Reply) and isinstance(call, Unserve):
            self.served.discard(call.name)

    def _stream_target(self, sid: int) -> Optional[SubscriptionBase]:
        """The subscription whose events arrive on stream ``sid`` now."""
        chain = self._chains.get(sid)
        return chain[0] if chain else None

    def _end_subscription(self, sub: SubscriptionBase) -> None:
        """End ``sub``'s route (its items not taken are dropped); its sid is
        free again once no subscription of it is left."""
        sub.active = False
        self._discard(sub.key)
        chain = self._chains.get(sub.sid)
        if chain is not None:
            try:
                chain.remove(sub)
            except ValueError:
                pass
            if not chain:
                del self._chains[sub.sid]

    def _handle_payload(self, payload: bytes) -> None:
        """Dispatch one frame: a reply is checked against the oldest
        outstanding request and stored for its waiter, an event or a
        ``Lagged`` is routed, a final frame ends the connection and raises."""
        start = self._taken_at
        fds: Tuple[int, ...] = ()
        try:
            f = decode_daemon_frame(payload, self.service)
            announced = frame_fds(f)
            if announced:
                if not self.fds_requested:
                    raise ProtocolError(f"a frame of tag {7 if isinstance(f, ReplyFds) else 8} "
                                        f"({type(f).__name__}) on a connection that did not send AcceptFds")
                fds = self._claim_fds(start, announced)
                if isinstance(f, EventFds):
                    f = dataclasses.replace(f, event=self.service.attach_fds(f.event, fds), descriptors=fds)
                elif isinstance(f, ReplyFds):
                    f = dataclasses.replace(f, descriptors=fds)
            self._settle_fds(self._rx_base)
            if isinstance(f, (Event, Lagged)):
                self._route(f, 4 + len(payload))
                return
        except ProtocolError as err:
            close_fds(fds)
            raise self._protocol_error(err) from None
        if isinstance(f, Closing):
            self.final_frame = f
            raise self._end(DaemonClosing(f.reason, f))
        if isinstance(f, Welcome):
            raise self._protocol_error(ProtocolError("a second Welcome"))
        if isinstance(f, Error) and f.id is None:
            self.final_frame = f
            exc = KeyholeError.from_frame(f, self.service)
            if isinstance(exc, WrongServiceDaemonError):
                # The Expect refused is the oldest outstanding request: the
                # daemon answered every one before it and reads none after.
                refused = next((o for o in self._outstanding if o.kind == RequestKind.Expect), None)
                expected = None
                if refused is not None and isinstance(refused.call, Expect):
                    expected = (refused.call.service, refused.call.service_version)
                exc.name_services(self.welcome.service, self.welcome.service_version, expected)
            self._end(ConnectionClosed(f"the daemon closed the connection after Error {exc}", final_frame=f))
            raise exc
        # A Reply, Ack or Error with an id.
        if fds:
            try:
                self._check_answer(f)
            except ProtocolError:
                close_fds(fds)
                raise
        else:
            self._check_answer(f)
        oldest = self._outstanding.popleft()
        if oldest.internal:
            self.expect_reply = f  # type: ignore[assignment]
            return
        self._after_reply(oldest, f)
        self._replies.setdefault(oldest.id, collections.deque()).append(f)

    def _check_answer(self, f: Union[Reply, Ack, Error]) -> None:
        """Section 7: a reply answers the oldest outstanding request, with a
        kind that fits it; else a protocol error (the connection is closed)."""
        rid = f.id
        name = type(f).__name__
        if not self._outstanding:
            raise self._protocol_error(ProtocolError(f"{name} with id {rid} while no request is outstanding"))
        oldest = self._outstanding[0]
        if rid != oldest.id:
            raise self._protocol_error(ProtocolError(
                f"{name} with id {rid}, but the oldest outstanding request has id {oldest.id}"))
        if isinstance(f, Reply):
            if oldest.kind not in (RequestKind.Call, RequestKind.CallFds):
                raise self._protocol_error(ProtocolError(f"{name} to a {kind_name(oldest.kind)} (id {rid})"))
            if oldest.call is not None and not self.service.reply_answers(oldest.call, f.reply):
                raise self._protocol_error(ProtocolError(
                    f"Reply {type(f.reply).__name__} to a {type(oldest.call).__name__} (id {rid})"))
        elif isinstance(f, Ack):
            if oldest.kind not in (RequestKind.Ping, RequestKind.Shutdown, RequestKind.Expect,
                                   RequestKind.AcceptFds):
                raise self._protocol_error(ProtocolError(f"Ack to a {kind_name(oldest.kind)} (id {rid})"))

    def _ended_at_eof(self, reset: bool) -> ConnectionClosed:
        """The end of the stream (or ECONNRESET: section 9, the same): end the
        connection and return what to raise."""
        if self._rbuf:
            self._rbuf.clear()
            return self._end(ConnectionClosed("the connection ended inside a frame (dropped by the daemon)",
                                              reset=reset))
        return self._end(ConnectionClosed(
            "the connection ended without a final frame" + (" (ECONNRESET)" if reset else ""), reset=reset))

    # -- sending ----------------------------------------------------------

    def _to_request(self, spec: RequestSpec, rid: int) -> Request:
        if isinstance(spec, Request):
            return spec
        if isinstance(spec, Expect):
            return Request(rid, RequestKind.Expect, expect=spec)
        if isinstance(spec, CallWithFds):
            return Request(rid, RequestKind.CallFds, spec.call, fds=tuple(spec.fds))
        if isinstance(spec, RequestKind):
            if spec in (RequestKind.Call, RequestKind.CallFds):
                raise ValueError("a Call needs the service's request: pass the request itself "
                                 "(a CallFds: CallWithFds(request, fds))")
            if spec == RequestKind.Expect:
                return Request(rid, spec, expect=self._own_expect())
            return Request(rid, spec)
        return Request(rid, RequestKind.Call, spec)

    def _expect_spec(self, service: Optional[str], service_version: Optional[int]) -> Expect:
        if service is None and service_version is None:
            return self._own_expect()
        if service is None or service_version is None:
            raise ValueError("name both the service and its version, or neither")
        return Expect(service, service_version)

    def _own_expect(self) -> Expect:
        """An ``Expect`` of this connection's service."""
        if self.service.name is None or self.service.version is None:
            raise ValueError("this connection speaks no particular service: pass Expect(service, version)")
        return Expect(self.service.name, self.service.version)

    def _encode_many(self, specs: Sequence[RequestSpec],
                     ids: Optional[Sequence[int]] = None) -> Tuple[bytes, List[int]]:
        """Encode requests (ids from the counter unless given); checks each
        against ``max_frame_len`` before anything is sent (section 16 step 8)."""
        data, rids, _marks = self._encode_many_fds(specs, ids)
        return data, rids

    def _encode_many_fds(self, specs: Sequence[RequestSpec], ids: Optional[Sequence[int]] = None
                         ) -> Tuple[bytes, List[int], List[Tuple[int, Tuple[int, ...]]]]:
        """:meth:`_encode_many`, and where each frame that carries
        descriptors starts in the bytes, with its descriptors (the
        ``sendmsg`` of section 19.2 starts there)."""
        marks: List[Tuple[int, Tuple[int, ...]]] = []
        if ids is None:
            ids = [(self._next_id + i) % U64_LIMIT for i in range(len(specs))]
        elif len(ids) != len(specs):
            raise ValueError("one id per request")
        out = bytearray()
        rids = []
        for rid, spec in zip(ids, specs):
            req = self._to_request(spec, rid)
            if req.kind == RequestKind.CallFds and isinstance(spec, CallWithFds) \
                    and not 1 <= len(req.fds) <= MAX_FDS_PER_FRAME:
                raise ValueError(f"a CallFds carries 1 to {MAX_FDS_PER_FRAME} descriptors, not {len(req.fds)}")
            payload = encode_request_payload(req, self.service)
            if len(payload) > self.welcome.max_frame_len:
                raise RequestTooLarge(f"request of {len(payload)} bytes is over the daemon's "
                                      f"limit of {self.welcome.max_frame_len}; nothing was sent")
            if req.fds:
                marks.append((len(out), tuple(req.fds)))
            out += _LEN.pack(len(payload))
            out += payload
            rids.append(req.id)
        return bytes(out), rids, marks

    def _commit(self, specs: Sequence[RequestSpec], ids: Sequence[int], auto_ids: bool) -> None:
        """Append the requests to the FIFO of outstanding requests."""
        for rid, spec in zip(ids, specs):
            req = self._to_request(spec, rid)
            o = _Outstanding(req.id, int(req.kind), req.expect if req.kind == RequestKind.Expect else req.call)
            if req.kind == RequestKind.AcceptFds:
                self.fds_requested = True  # read with an ancillary buffer from now on (section 19.1)
            self._before_send(o)
            self._outstanding.append(o)
        if auto_ids:
            self._next_id = (self._next_id + len(specs)) % U64_LIMIT

    def _prepare_send(self, specs: Sequence[RequestSpec], ids: Optional[Sequence[int]] = None) -> Tuple[bytes, List[int]]:
        """Encode requests and put them in the FIFO (with their routes):
        what ``send_many`` writes next, and their ids."""
        data, rids, _marks = self._prepare_send_fds(specs, ids)
        return data, rids

    def _prepare_send_fds(self, specs: Sequence[RequestSpec], ids: Optional[Sequence[int]] = None
                          ) -> Tuple[bytes, List[int], List[Tuple[int, Tuple[int, ...]]]]:
        """:meth:`_prepare_send` with the marks of :meth:`_encode_many_fds`."""
        self._check_open()
        data, rids, marks = self._encode_many_fds(specs, ids)
        self._commit(specs, rids, auto_ids=ids is None)
        return data, rids, marks

    @staticmethod
    def _fd_kinds(specs: Sequence[RequestSpec]) -> Tuple[bool, bool]:
        """Whether ``specs`` hold an ``AcceptFds``, and a request with descriptors."""
        accept = any(_spec_kind(spec) == RequestKind.AcceptFds for spec in specs)
        carries = any(isinstance(spec, CallWithFds) or (isinstance(spec, Request) and bool(spec.fds))
                      for spec in specs)
        return accept, carries

    def _accept_fds_outstanding(self) -> bool:
        """Whether an ``AcceptFds`` waits for its ``Ack`` (section 19.1: no
        frame with descriptors goes out until it came)."""
        return any(o.kind == RequestKind.AcceptFds for o in self._outstanding)

    def _publish_memfd_spec(self, topic: str, fd: int) -> CallWithFds:
        self._check_hub()
        check_subject(topic, "topic")
        return CallWithFds(PublishMemfd(topic), (fd,))

    # -- replies and events ---------------------------------------------------

    def _check_reply_awaited(self, rid: int) -> None:
        if not self._replies.get(rid) and not any(o.id == rid for o in self._outstanding):
            self._check_open()
            raise ValueError(f"no request with id {rid} is outstanding")

    def _reply_ready(self, rid: int) -> bool:
        return bool(self._replies.get(rid))

    def _pop_reply(self, rid: int) -> Union[Reply, Ack, Error]:
        queue = self._replies[rid]
        f = queue.popleft()
        if not queue:
            del self._replies[rid]
        return f

    def _reply_result(self, f: Union[Reply, Ack, Error]) -> Any:
        """A reply frame's content: the service's reply for a ``Call``, None
        for an ``Ack``; an ``Error`` raises its :class:`KeyholeError`."""
        if isinstance(f, Error):
            raise KeyholeError.from_frame(f, self.service)
        return f.reply if isinstance(f, Reply) else None

    def _check_response_awaited(self, rid: int) -> None:
        if self._head(("response", rid)) is None and rid not in self._awaiting:
            self._check_open()
            raise ValueError(f"no Request with id {rid} awaits its Response")

    def _response_ready(self, rid: int) -> bool:
        return self._head(("response", rid)) is not None

    def _take_response(self, rid: int) -> Response:
        return self._take(self._head(("response", rid))).event  # type: ignore[arg-type,union-attr,no-any-return]

    def _requests_ready(self) -> bool:
        return self._head(("requests",)) is not None

    def _take_request(self) -> IncomingRequest:
        return self._take(self._head(("requests",))).event  # type: ignore[arg-type,union-attr,no-any-return]

    def _event_ready(self) -> bool:
        return self._first() is not None

    def _take_event(self) -> Union[Event, Lagged]:
        return self._take(self._first())  # type: ignore[arg-type]

    @property
    def queued_events(self) -> int:
        """How many events (and ``Lagged`` frames) are waiting in the queue."""
        return self._queued

    @property
    def subscriptions(self) -> Dict[int, SubscriptionBase]:
        """This connection's subscriptions not ended yet, by sid (for a sid
        with an ``Unsubscribe`` and a new ``Subscribe`` in flight: the newest)."""
        return {sid: chain[-1] for sid, chain in self._chains.items()}


    # -- the hub: what both clients check and build before sending ------------

    def _check_hub(self) -> None:
        if not isinstance(self.service, HubService):
            raise TypeError("this connection does not speak the hub")

    def _set_counters(self, next_request_id: Optional[int], next_subscription_id: Optional[int]) -> None:
        """``connect``'s ``next_request_id`` and ``next_subscription_id``
        (None: the defaults), checked."""
        if next_request_id is not None:
            self._next_id = check_next_request_id(next_request_id)
        if next_subscription_id is not None:
            self._next_sid = check_next_subscription_id(next_subscription_id)

    @property
    def next_request_id(self) -> int:
        """The id the next request sent with an id from the counter takes
        (``connect(next_request_id=...)`` sets the first)."""
        return self._next_id

    @property
    def next_subscription_id(self) -> int:
        """Where the sid counter stands: the next subscription made without
        an explicit ``sid`` takes this one, or the first after it that is not
        live (``connect(next_subscription_id=...)`` sets the first)."""
        return self._next_sid

    def _alloc_sid(self) -> int:
        """The next sid of the counter (section 17.3, ``next_sid``; section
        16 step 14): the counter's value, or the first after it that is not
        live on this connection, 2^64 - 1 being followed by 1 (0 is never a
        sid); the counter then stands one past the sid taken. A sid is live
        from its ``Subscribe`` until its ``Unsubscribed`` reply (or the
        refusal of its ``Subscribe``); an ended subscription's sid comes
        round again only when the counter does (reusing it is safe anyway:
        nothing of an ended subscription arrives after its ``Unsubscribed``
        reply, section 14). Sids passed explicitly to ``subscribe`` do not
        move the counter; it skips them while they are live."""
        if len(self._chains) >= U64_LIMIT - 1:  # pragma: no cover - 2^64 - 1 live subscriptions
            raise SidError("every sid is in use on this connection")
        sid = self._next_sid
        while sid == 0 or sid in self._chains:
            sid = (sid + 1) % U64_LIMIT
        nxt = (sid + 1) % U64_LIMIT
        self._next_sid = nxt if nxt != 0 else 1
        return sid

    def _subscribe_request(self, pattern: str, lag: Lag, sid: Optional[int]) -> Subscribe:
        """The ``Subscribe`` to send: the pattern checked, the sid chosen or checked."""
        self._check_hub()
        check_subject(pattern, "pattern")
        if sid is None:
            sid = self._alloc_sid()
        elif sid == 0 or sid in self._chains:
            raise SidError(f"subscription id {sid} is {'0' if sid == 0 else 'in use on this connection'}")
        return Subscribe(sid, pattern, Lag(lag))

    def _new_subscription(self, sid: int) -> SubscriptionBase:
        """The subscription a ``Subscribe`` just sent put in place."""
        return self._chains[sid][-1]

    def _request_to(self, name: str, payload: Union[bytes, bytearray, memoryview],
                    timeout: Optional[float]) -> RequestTo:
        self._check_hub()
        check_subject(name, "name")
        return RequestTo(name, timeout_ms_for(timeout), bytes(payload))

    def _response_deadline(self, call: RequestTo) -> Tuple[float, float]:
        """How long to wait for a ``Response``: the request's own timeout
        plus the connection's (the margin), and that margin."""
        margin = self.timeout if self.timeout is not None else DEFAULT_TIMEOUT
        return effective_timeout_ms(call.timeout_ms) / 1000 + margin, margin

    def _gave_up(self, rid: int, call: RequestTo, margin: float) -> KeyholeTimeout:
        """Give up a request the daemon never ended: its late ``Response`` is ignored."""
        self._abandon(rid)
        return KeyholeTimeout(f"the daemon did not end request {rid} to {call.name!r} within its timeout "
                              f"({effective_timeout_ms(call.timeout_ms)} ms) and {margin} s more; given up")

    def _abandon(self, rid: int) -> None:
        """Stop waiting for a request's ``Response``: if it comes, it is ignored."""
        if self._awaiting.pop(rid, None) is not None:
            self._abandoned.add(rid)
        self._discard(("response", rid))

    # -- the hub: request/reply, as a responder ---------------------------------

    def _respond_request(self, token: int, payload: Union[bytes, bytearray, memoryview]) -> Union[Respond, Fail]:
        """A ``Respond``, or ``Fail{ReplyTooLarge}`` for a reply that does not fit (section 16 step 14)."""
        self._check_hub()
        if not self.reply_fits(len(payload)):
            return Fail(token, FailureReplyTooLarge(len(payload)))
        return Respond(token, bytes(payload))

    def _serve_request(self, name: str, unserve: bool = False) -> Union[Serve, Unserve]:
        self._check_hub()
        check_subject(name, "name")
        return Unserve(name) if unserve else Serve(name)

    @property
    def queued_requests(self) -> int:
        """Requests given to this connection and not taken yet."""
        q = self._queues.get(("requests",))
        return sum(not e.taken for e in q) if q else 0

    def reply_fits(self, length: int) -> bool:
        """Whether a reply of ``length`` payload bytes fits: its ``Respond``
        (32 + length) and the requester's ``Response`` (36 + length) are
        within ``max_frame_len``."""
        return RESPONSE_EVENT_OVERHEAD + 32 + length <= self.welcome.max_frame_len


BUSY_EXCEPTIONS: Tuple[Type[BaseException], ...] = (DaemonBusy,) + tuple(
    ERROR_CLASSES[ErrorCode(code)] for code in sorted(BUSY_ERRORS))
"""What ``connect`` retries (section 9, "Admission"): ``EAGAIN`` and the busy refusals."""


def wants_expect(service: Service, early: Sequence[RequestSpec], expect: Optional[bool]) -> bool:
    """Whether ``connect`` puts an ``Expect`` of ``service`` between the
    handshake and the ``early`` requests. ``expect`` None (the default): when
    the service is a named one and an early request is a ``Call`` (section
    4: a client of one service that pipelines a ``Call`` SHOULD; ``Ping`` and
    ``Shutdown`` mean the same to every daemon and need none), unless the
    first early request is an ``Expect`` already. True: whenever the service
    is a named one; False: never."""
    if service.name is None or service.version is None or expect is False:
        return False
    if expect:
        return True
    kinds = [_spec_kind(spec) for spec in early]
    return bool(kinds) and kinds[0] != RequestKind.Expect and RequestKind.Call in kinds


def _spec_kind(spec: RequestSpec) -> int:
    """The request kind a :data:`RequestSpec` is sent as."""
    if isinstance(spec, Request):
        return int(spec.kind)
    if isinstance(spec, Expect):
        return RequestKind.Expect
    if isinstance(spec, CallWithFds):
        return RequestKind.CallFds
    if isinstance(spec, RequestKind):
        return spec
    return RequestKind.Call


class Connector:
    """The sans-IO part of :meth:`KeyholeClient.connect` and
    :meth:`AsyncKeyholeClient.connect`: where to connect, which uid the peer
    must have, the token (read once, after the first connection's peer
    check, and wiped when connecting ends), the bytes of the handshake's
    write (the handshake, the ``Expect`` if any, the early requests), and
    the "busy" retries (section 9, "Admission"), each of which writes the
    same bytes again on a new connection."""

    def __init__(self, client: Connection, path: Optional[str], token: Optional[Union[bytearray, bytes]],
                 env: Mapping[str, str], early: Sequence[RequestSpec], timeout: float,
                 connect_timeout: Optional[float], expect: Optional[bool] = None, *,
                 next_request_id: Optional[int] = None, next_subscription_id: Optional[int] = None) -> None:
        client._set_counters(next_request_id, next_subscription_id)
        self.client = client
        self.env = env
        self.early = list(early)
        self._token = token
        self.deadline = time.monotonic() + (timeout if connect_timeout is None else connect_timeout)
        self.attempts = 0
        self._delay = RETRY_FIRST_DELAY
        self._give_up: Optional[BaseException] = None
        try:
            self.expected_uid = daemon_uid(env)
            self.path: str = socket_path(env) if path is None else path
            # Requests sent before Welcome: the daemon's limit is not known
            # yet, so each is checked against the smallest, 1024 (section 4).
            self.expect: Optional[Request] = None
            head = b""
            if wants_expect(client.service, self.early, expect):
                self.expect = Request(EXPECT_ID, RequestKind.Expect, expect=client._own_expect())
                head, _ = client._encode_many([self.expect])
            accept, carries = client._fd_kinds(self.early)
            if accept or carries or any(_spec_kind(spec) == RequestKind.CallFds for spec in self.early):
                # The handshake and Welcome are read without an ancillary
                # buffer (section 19.1): descriptors start after connect.
                raise ValueError("AcceptFds and requests with descriptors cannot go in the handshake's write: "
                                 "send them once connect returned (accept_fds(), send_fds())")
            body, self.early_ids = client._encode_many(self.early)
            self.early_bytes = head + body
        except BaseException:
            self.wipe()
            raise

    def handshake(self) -> bytearray:
        """The 44-byte handshake, the ``Expect`` and the early requests, in
        one buffer for one write (wipe it once written); the same bytes on
        every attempt. Reads the token the first time:
        after the socket was connected and its peer checked, so that a
        daemon that is not running is reported as such rather than as a
        token problem; nothing has been sent when the token is refused."""
        if self._token is None:
            self._token = load_token(self.env)
        hs = encode_handshake(self._token)
        hs += self.early_bytes
        return hs

    def retry_delay(self, err: BaseException) -> float:
        """After a "busy" answer (read just now): how long to pause before
        the next ``connect``, or ``err`` raised (with ``attempts``): section
        9, "Admission". The pauses go from :data:`RETRY_FIRST_DELAY`,
        doubling, up to :data:`RETRY_MAX_DELAY`: always between 1 ms and
        1 s. The client gives up, reporting this last refusal (or
        :class:`DaemonBusy` after ``EAGAIN``), when the connect timeout has
        passed or when the next pause would end after it: no pause is cut
        short, so every attempt but the first comes at least 1 ms after the
        refusal before it, and none starts after the connect timeout.
        When the next pause would end after it, the pause returned is cut to
        end at the connect timeout and no attempt follows it:
        :meth:`give_up_if_due`, called after the pause, raises ``err`` then
        (so that ``connect`` gives up at its connect timeout, not up to one
        pause earlier)."""
        err.attempts = self.attempts  # type: ignore[attr-defined]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise err
        delay = self._delay
        if delay > left:
            self._give_up = err
            return left
        self._delay = min(self._delay * 2, RETRY_MAX_DELAY)
        return delay

    def give_up_if_due(self) -> None:
        """After the pause :meth:`retry_delay` returned: raise the last
        refusal if that pause was the last one (cut to end at the connect
        timeout)."""
        err, self._give_up = self._give_up, None
        if err is not None:
            raise err

    def wipe(self) -> None:
        """Wipe the token, the one passed in included if it is a ``bytearray``."""
        if isinstance(self._token, bytearray):
            wipe(self._token)

    def finish(self, welcome: Welcome, rbuf: bytearray) -> None:
        """The connection is admitted: give the client its ``Welcome``."""
        c = self.client
        c.welcome = welcome
        c.attempts = self.attempts
        c._rbuf = rbuf
        if self.expect is not None:
            c._outstanding.append(_Outstanding(self.expect.id, int(RequestKind.Expect), self.expect.expect,
                                               internal=True))
        c._commit(self.early, self.early_ids, auto_ids=True)
        c.early_ids = list(self.early_ids)
