"""The blocking client: :class:`KeyholeClient` and its :class:`Subscription`,
over a plain socket. Everything but the I/O is in :mod:`._core` and
:mod:`._protocol`, shared with the asyncio client."""

from __future__ import annotations

import math
import os
import select
import socket
import time
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ._core import BUSY_EXCEPTIONS, CallWithFds, Connection, Connector, RequestSpec, SubscriptionBase
from ._protocol import (DEFAULT_MAX_QUEUED_EVENT_BYTES, DEFAULT_TIMEOUT, HUB, MIN_MAX_FRAME_LEN, PROTOCOL_MAX_FRAME_LEN,
                        PROTOCOL_VERSION, Ack, ConnectionClosed, Error, Event,
                        Fail, FailureFailed, FailureReplyTooLarge, HubRequest, IncomingRequest,
                        KeyholeTimeout, Lag, Lagged, Message, Reply, RequestError, RequestKind, Response, Service,
                        Status, TopicList, TopicsRequest, StatusRequest, Unsubscribe, Publish, Welcome, _NOSIGNAL,
                        check_subject, ended_before_welcome, open_checked_socket, outcome_result, split_frame,
                        welcome_from_first_frame, wipe, _LEN, decode_daemon_frame, MemfdSource, MessageMemfd,
                        recv_with_fds, sealed_memfd, send_with_fds)



def read_welcome(sock: socket.socket, service: Service = HUB,
                 rbuf: Optional[bytearray] = None) -> Tuple[Welcome, bytearray]:
    """Read the daemon's first frame after the handshake (section 16 step 6).

    Returns ``Welcome`` (checked with :func:`check_welcome`) and any bytes
    already received after it. An ``Error`` raises the matching
    :class:`KeyholeError` (a :class:`HandshakeRefused`) if its code is one a
    pending connection can get (0 to 7 and 13, section 4); any other first
    frame, an ``Error`` with another code or with an id included, is a
    :class:`ProtocolError`. The end of the connection with no frame raises
    :class:`RefusedWithoutFrame`. The socket is closed on any failure.
    """
    buf = bytearray() if rbuf is None else rbuf
    try:
        while True:
            if len(buf) >= 4:
                (length,) = _LEN.unpack_from(buf, 0)
                if length > PROTOCOL_MAX_FRAME_LEN or len(buf) >= 4 + length:
                    payload, rest = split_frame(buf, PROTOCOL_MAX_FRAME_LEN)
                    welcome = welcome_from_first_frame(decode_daemon_frame(payload, service), service)
                    return welcome, bytearray(rest)
            reset = False
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                chunk, reset = b"", True
            except socket.timeout:
                raise KeyholeTimeout("timed out waiting for the daemon's first frame") from None
            if not chunk:
                raise ended_before_welcome(len(buf), reset)
            buf.extend(chunk)
    except BaseException:
        sock.close()
        raise


class Subscription(SubscriptionBase):
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

    client: "KeyholeClient"

    def next(self, timeout: Optional[float] = None) -> Union[Message, MessageMemfd, Lagged]:
        """The subscription's next item: a :class:`Message` (a
        :class:`MessageMemfd` on a connection that called
        :meth:`KeyholeClient.accept_fds`: its memfd is yours to close) or a
        :class:`Lagged`. Waits at most ``timeout`` seconds (default: the
        connection's timeout) and raises :class:`KeyholeTimeout` if nothing
        came; raises :class:`ConnectionClosed` (or the final ``Error``'s
        exception) at the end of the connection, once every item received
        before it was taken."""
        self._check_next()
        self.client._wait(self._ready, self._wanted, timeout)
        return self._take_next()

    def __iter__(self) -> Iterator[Union[Message, MessageMemfd, Lagged]]:
        while True:
            yield self.next()

    def unsubscribe(self) -> None:
        """End the subscription (see :meth:`KeyholeClient.unsubscribe`)."""
        self.client.unsubscribe(self)


class KeyholeClient(Connection):
    """An authenticated connection to a keyhole daemon (by default one that
    serves the hub).

    Use :meth:`connect`. High-level calls: :meth:`ping`, :meth:`shutdown`;
    for the hub :meth:`status`, :meth:`topics`, :meth:`subscribe` (a
    :class:`Subscription`), :meth:`unsubscribe`, :meth:`publish`,
    :meth:`request`, :meth:`serve`, :meth:`unserve`, :meth:`next_request`,
    :meth:`respond`, :meth:`fail`, :meth:`fail_reply_too_large`; every event
    in arrival order with :meth:`next_event` / :meth:`events`. Lower level:
    :meth:`send` / :meth:`send_many` then :meth:`wait_reply` (and
    :meth:`wait_response` for a ``Request``), or :meth:`pipeline`.

    Replies come in request order (section 9): every ``Reply``, ``Ack`` and
    ``Error`` with an id must answer the oldest outstanding request, with a
    matching kind; anything else is a :class:`ProtocolError` and closes the
    connection. Events (and ``Lagged`` frames) that arrive while something
    else is awaited are queued, routed by stream: a ``Message`` or
    ``Lagged`` to its subscription, a ``Response`` to the request it ends, a
    ``Request`` to the responder's queue. A subscription's route lives from
    just before its ``Subscribe`` is sent until its ``Unsubscribed`` reply
    (section 16 step 14): nothing of its sid arrives after that reply
    (section 14), so the sid is free at once, and a ``Message`` or
    ``Lagged`` of a stream that is none of our subscriptions, or a
    ``Lagged`` of a ``Disconnect`` subscription, is a :class:`ProtocolError`
    (section 13 allows it). With ``Unsubscribe`` and ``Subscribe`` of one sid
    pipelined, events of the sid before the ``Unsubscribed`` reply are the
    old subscription's, those after it the new one's. A ``Response`` to a
    request this client gave up is dropped and counted
    (``ignored_events``). The queue holds up to ``max_queued_event_bytes`` bytes of
    frames (at least one event always fits); past that, waiting for anything
    else than the next queued item raises :class:`EventQueueFull` instead of
    reading further (section 16 step 10).

    Every wait takes ``timeout`` seconds at most (default: the connection's
    ``timeout``, that of :meth:`connect`) and raises :class:`KeyholeTimeout`
    after it; the connection stays usable.

    ``welcome`` is the daemon's ``Welcome`` (``instance_id`` tells a restart
    apart); ``final_frame`` its last frame once received. Not thread-safe.
    """

    _subscription_class = Subscription

    def __init__(self, sock: Optional[socket.socket], welcome: Welcome, rbuf: Optional[bytearray] = None, *,
                 service: Service = HUB,
                 max_queued_event_bytes: int = DEFAULT_MAX_QUEUED_EVENT_BYTES) -> None:
        super().__init__(welcome, rbuf, service=service, max_queued_event_bytes=max_queued_event_bytes)
        self.sock: socket.socket = sock  # type: ignore[assignment]  # None only while connect() runs
        self.timeout = sock.gettimeout() if sock is not None else DEFAULT_TIMEOUT
        self._deadline: Optional[float] = None

    # -- connecting -------------------------------------------------------

    @classmethod
    def connect(cls, path: Optional[str] = None,
                token: Optional[Union[bytearray, bytes]] = None, *,
                env: Optional[Mapping[str, str]] = None, timeout: float = DEFAULT_TIMEOUT,
                connect_timeout: Optional[float] = None,
                service: Service = HUB, early: Sequence[RequestSpec] = (),
                expect: Optional[bool] = None,
                max_queued_event_bytes: int = DEFAULT_MAX_QUEUED_EVENT_BYTES,
                next_request_id: Optional[int] = None,
                next_subscription_id: Optional[int] = None) -> "KeyholeClient":
        """Find the daemon, check everything, authenticate and wait for ``Welcome``.

        ``path`` (the socket) and ``token`` (32 raw bytes; an explicit token
        takes precedence) default to what ``env`` (default ``os.environ``)
        says, section 11. In order: ``KEYHOLE_DAEMON_UID`` is parsed, the
        socket path found, the socket connected and its peer's uid checked,
        then the token is read and checked (after connecting, so that a daemon
        that is not running is reported as :class:`DaemonNotRunning` rather
        than as a token problem, as the Rust CLI does; nothing has been sent
        when the token is refused), then the 44-byte handshake is sent, followed in the same write by the ``early``
        requests if any (ids ``next_request_id``, ... unless they are :class:`Request`
        objects; ``early_ids`` on the client lists them; wait for them with
        :meth:`wait_reply` or :meth:`result`), and only then is ``Welcome``
        read: the first requests cost no round trip of their own. Since
        ``Welcome``'s ``max_frame_len`` is not known yet, an early request
        may be at most 1024 bytes, the smallest limit a daemon may
        announce (:class:`RequestTooLarge` before anything is sent). Every
        copy of the token, the one passed in included if it is a
        ``bytearray``, is wiped before this returns or raises.

        ``expect``: whether an ``Expect`` naming ``service`` (id 0) goes
        between the handshake and the early requests, so that a daemon of
        another service closes the connection with ``WrongService`` rather
        than handle them as requests of its own (section 4). None (the
        default): when an early request is a ``Call`` of a named service
        (``Ping`` and ``Shutdown`` need none), unless ``early`` starts with
        an ``Expect`` of its own; True: always (with a named service);
        False: never. Its ``Ack`` is read with the replies that follow
        ``Welcome`` (``expect_reply``); nobody waits for it.

        ``next_request_id`` (default 1; any ``u64``, 0 and 2^64 - 1
        included): the id of the first request sent on the connection with
        an id from the counter (the early requests, then every request sent
        without an explicit id, whatever call sends it: ``ping``, the
        ``Call`` of ``subscribe``, each request of ``send_many``); each
        later one takes the previous id plus 1, 2^64 - 1 being followed by 0
        (section 6: ids wrap, nothing is skipped). The ``Expect`` sent with
        the handshake (id 0) is outside the count and does not move it.

        ``next_subscription_id`` (default 1; 1 to 2^64 - 1): the sid of the
        first subscription made without an explicit ``sid``; each later one
        takes the previous sid plus 1, 2^64 - 1 being followed by 1 (0 is
        never a sid), skipping any sid still live on the connection
        (sections 14 and 16 step 14).

        ``connect_timeout`` (seconds, default ``timeout``): the time this
        call allows for busy retries (section 9, "Admission"). ``EAGAIN``
        from ``connect`` (a full listen queue) and the refusals
        ``TooManyUnauthenticated`` and ``TooManyConnections`` start a new
        attempt on a new connection (the early requests are sent again: the
        refused connection discarded them unread), after a pause from
        :data:`RETRY_FIRST_DELAY`, doubling, to :data:`RETRY_MAX_DELAY`
        (section 9: 1 ms to 1 s, from reading the refusal to the next
        ``connect``). No attempt starts after ``connect_timeout`` seconds
        since the call began: when the next pause would end after that, the
        pause is cut to end there and the last refusal is raised (or
        :class:`DaemonBusy` after ``EAGAIN``). The token is kept for that long
        and no longer. ``timeout`` bounds every single wait, including one
        connection's wait for ``Welcome`` (which includes the time it waits
        for a pending slot; section 9 says to allow at least the 5-second
        handshake deadline there). ``attempts`` on the client (and on the
        exception) counts the connections made.

        Raises :class:`HandshakeRefused` (with the code's
        :class:`KeyholeError` class, e.g. ``BadTokenError``) if the daemon
        refuses the handshake, whatever was pipelined behind it (never as
        failed requests: the daemon discarded them unread; for a busy
        refusal: the last one, once the connect timeout ran out);
        :class:`DaemonBusy` if ``connect`` kept failing with ``EAGAIN``;
        :class:`WrongServiceError` naming both services if ``Welcome`` names
        another service than ``service`` (pass ``service=RAW`` to accept any
        daemon, for ``Ping`` and ``Shutdown``); :class:`ProtocolError` for a
        bad ``Welcome``.
        """
        env = os.environ if env is None else env
        connector = Connector(cls(None, Welcome(PROTOCOL_VERSION, "", 0, "", 0, 0, MIN_MAX_FRAME_LEN),
                                  service=service, max_queued_event_bytes=max_queued_event_bytes),
                              path, token, env, early, timeout, connect_timeout, expect,
                              next_request_id=next_request_id, next_subscription_id=next_subscription_id)
        try:
            while True:
                connector.attempts += 1
                try:
                    sock = cls._attempt(connector, timeout)
                    welcome, rbuf = read_welcome(sock, service)
                    break
                except BUSY_EXCEPTIONS as err:
                    time.sleep(connector.retry_delay(err))
                    connector.give_up_if_due()
        finally:
            connector.wipe()
        client: KeyholeClient = connector.client  # type: ignore[assignment]
        client.sock = sock
        client.timeout = sock.gettimeout()
        connector.finish(welcome, rbuf)
        return client

    @staticmethod
    def _attempt(connector: Connector, timeout: float) -> socket.socket:
        """One connection: connect, check the peer, then (the first time) read
        the token, and send the handshake and the early requests in one write
        (the handshake buffer is wiped)."""
        sock = open_checked_socket(connector.path, timeout=timeout, expected_uid=connector.expected_uid)
        try:
            hs = connector.handshake()
            try:
                try:
                    sock.sendall(hs, _NOSIGNAL)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon closed already: its Error, if any, is waiting to be read
                except socket.timeout:
                    raise KeyholeTimeout("timed out sending the handshake") from None
            finally:
                wipe(hs)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- low-level I/O ----------------------------------------------------

    def _close_transport(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self) -> None:
        """Read more bytes into the receive buffer, by the deadline of the
        current wait if there is one. End of stream and ECONNRESET both mean
        the daemon ended the connection (section 9)."""
        reset = False
        deadline = self._deadline
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KeyholeTimeout("timed out waiting for the daemon")
            self.sock.settimeout(None if math.isinf(left) else left)
        try:
            n = self._recv_chunk()
        except ConnectionResetError:
            n, reset = 0, True
        except socket.timeout:
            raise KeyholeTimeout("timed out waiting for the daemon") from None
        except OSError as err:
            if self._closed:
                raise ConnectionClosed("the connection is closed") from None
            raise ConnectionClosed(f"reading failed: {err}") from None
        finally:
            if deadline is not None and not self._closed:
                try:
                    self.sock.settimeout(self.timeout)
                except OSError:
                    pass
        if not n:
            raise self._ended_at_eof(reset)

    def _recv_chunk(self) -> int:
        """One read into the receive buffer; returns how many bytes came (0:
        the end of the stream). From the moment an ``AcceptFds`` is sent,
        every read is a ``recvmsg`` with room for 9 descriptors and
        ``MSG_CMSG_CLOEXEC``, whose descriptors go to the frame they belong
        to (section 19.3)."""
        if self.fds_requested:
            data, fds, flags = recv_with_fds(self.sock, 1 << 16)
            self._feed(data, fds, flags)
            return len(data)
        chunk = self.sock.recv(1 << 16)
        self._feed(chunk)
        return len(chunk)

    def _complete_frame(self) -> None:
        """Read until the receive buffer holds a complete frame."""
        while self._frame_len() is None:
            self._fill()

    def _read_one(self) -> None:
        """Read one frame and dispatch it (:meth:`Connection._handle_payload`)."""
        self._check_open()
        payload = self._take_payload()
        while payload is None:
            self._fill()
            payload = self._take_payload()
        self._handle_payload(payload)

    def _wait(self, ready: Callable[[], bool], wanted: Callable[[Event], bool],
              timeout: Optional[float]) -> None:
        """Read frames until ``ready()``, by the deadline ``timeout`` (default:
        the connection's; ``math.inf`` waits for ever). While the event queue is full, an ``Event`` is only
        read if ``wanted`` (what this wait is for); any other raises
        :class:`EventQueueFull` and stays unread. Other frames are always read."""
        if ready():
            return
        wait = self.timeout if timeout is None else timeout
        saved = self._deadline
        if wait is not None:
            deadline = time.monotonic() + wait
            self._deadline = deadline if saved is None else min(saved, deadline)
        try:
            while not ready():
                if self._queue_full():
                    self._check_open()
                    self._complete_frame()
                    self._check_queue(wanted)
                self._read_one()
        finally:
            self._deadline = saved

    def _write(self, data: bytes, marks: Sequence[Tuple[int, Tuple[int, ...]]] = ()) -> None:
        """Write everything, handling short writes, and read incoming bytes
        meanwhile (into the receive buffer, undecoded) so that a long pipeline
        cannot block both sides on full socket buffers (section 9 step 4).
        A write that fails because the daemon closed raises the reason the
        daemon sent, if it sent one (section 9, "End of the connection").

        ``marks``: where a frame with descriptors starts, and its
        descriptors. Each such frame goes out with one ``sendmsg`` whose data
        starts at its first byte and stops before the next such frame
        (section 19.2); every byte before it is written first."""
        view = memoryview(data)
        pending = list(marks)
        pos = 0
        timeout = self.sock.gettimeout()
        try:
            while pos < len(view):
                readable, writable, _ = select.select([self.sock], [self.sock], [], timeout)
                if not readable and not writable:
                    # A frame may be half written: the stream cannot be resumed.
                    self._end(ConnectionClosed("closed after a write timed out"))
                    raise KeyholeTimeout("timed out writing to the daemon; the connection was closed")
                if readable:
                    try:
                        chunk = self._recv_chunk()
                    except ConnectionResetError:
                        chunk = 0
                    if not chunk:
                        raise BrokenPipeError("the daemon closed the connection while we were writing")
                if writable:
                    try:
                        if pending and pending[0][0] == pos:
                            end = pending[1][0] if len(pending) > 1 else len(view)
                            sent = send_with_fds(self.sock, view[pos:end], pending[0][1], _NOSIGNAL)
                            del pending[0]  # the descriptors went with the first byte
                        else:
                            end = pending[0][0] if pending else len(view)
                            sent = self.sock.send(view[pos:end], _NOSIGNAL)
                    except (BlockingIOError, socket.timeout):
                        continue
                    pos += sent
        except (BrokenPipeError, ConnectionResetError):
            # Read what the daemon sent before closing: replies go to their
            # waiters, and its final frame (if any) is raised.
            while True:
                self._read_one()

    # -- sending ----------------------------------------------------------

    def send(self, spec: RequestSpec, id: Optional[int] = None) -> int:  # noqa: A002
        """Send one request without waiting; returns its id (see :data:`RequestSpec`)."""
        return self.send_many([spec], None if id is None else [id])[0]

    def send_many(self, specs: Sequence[RequestSpec], ids: Optional[Sequence[int]] = None) -> List[int]:
        """Send several requests in one write (pipelining); returns their ids.

        Ids default to a counter. Ids passed in may repeat (the daemon allows
        it), but distinct ids make the reply check meaningful. Every request is
        checked against ``max_frame_len`` before anything is sent.
        """
        accept, carries = self._fd_kinds(specs)
        if carries and self._accept_fds_outstanding():
            # Section 19.1: no frame with descriptors before the Ack of AcceptFds.
            self._wait(lambda: not self._accept_fds_outstanding(), lambda f: False, None)
        data, rids, marks = self._prepare_send_fds(specs, ids)
        self._write(data, marks)
        return rids

    def send_fds(self, spec: Any, fds: Sequence[int], id: Optional[int] = None) -> int:  # noqa: A002
        """Send the service request ``spec`` as a ``CallFds`` carrying ``fds``
        (1 to 8 open descriptors, which stay open here: the daemon gets its
        own); returns its id. The daemon answers ``DescriptorsNotAccepted``
        (17, :class:`DescriptorsNotAcceptedError`; the descriptors were closed
        unread there) unless this connection called :meth:`accept_fds` first."""
        return self.send(CallWithFds(spec, tuple(fds)), id)

    def call_fds(self, spec: Any, fds: Sequence[int]) -> Any:
        """:meth:`send_fds`, then :meth:`result` for it."""
        return self.result(self.send_fds(spec, fds))

    # -- receiving --------------------------------------------------------

    def wait_reply(self, rid: int, timeout: Optional[float] = None) -> Union[Reply, Ack, Error]:
        """Wait for the reply to request ``rid`` (a ``Reply``, ``Ack`` or
        ``Error`` frame, returned as is), queueing events that arrive first and
        keeping replies to other requests for their own waiters.

        Raises :class:`EventQueueFull` if the event queue is at its bound and
        the next frame is an event, :class:`ConnectionClosed` (or the final
        ``Error``'s exception) if the connection ends first."""
        self._check_reply_awaited(rid)
        self._wait(lambda: self._reply_ready(rid), lambda f: False, timeout)
        return self._pop_reply(rid)

    def result(self, rid: int, timeout: Optional[float] = None) -> Any:
        """Wait for the reply to ``rid`` and return its content: the service's
        reply for a ``Call``, None for an ``Ack``. An ``Error`` raises its
        :class:`KeyholeError`."""
        return self._reply_result(self.wait_reply(rid, timeout))

    def call(self, spec: RequestSpec) -> Any:
        """Send one request and return :meth:`result` for it."""
        return self.result(self.send(spec))

    def pipeline(self, specs: Sequence[RequestSpec]) -> List[Union[Reply, Ack, Error]]:
        """Send every request in one write and return their reply frames, in order."""
        return [self.wait_reply(rid) for rid in self.send_many(specs)]

    def next_event(self, timeout: Optional[float] = None) -> Union[Event, Lagged]:
        """The oldest queued item of any route, else the next one to arrive
        (replies that arrive meanwhile are kept): an :class:`Event` frame
        (its ``stream`` and the service's event: for the hub a
        :class:`Message` of one of our subscriptions, an
        :class:`IncomingRequest` or a :class:`Response`) or a :class:`Lagged`
        frame of one of our subscriptions. Taking an item here takes it from
        its route too. Raises :class:`DaemonClosing` or
        :class:`ConnectionClosed` at the end, :class:`KeyholeTimeout` after
        ``timeout`` seconds (default: the connection's)."""
        self._wait(self._event_ready, lambda f: True, timeout)
        return self._take_event()

    def events(self) -> Iterator[Union[Event, Lagged]]:
        """Iterate over :meth:`next_event` forever; the end of the
        connection ends the iteration with its exception (for the hub:
        :class:`DaemonClosing` with ``Shutdown`` or ``SlowConsumer``)."""
        while True:
            yield self.next_event()

    # -- transport requests -------------------------------------------------

    def ping(self) -> float:
        """``Ping`` (answered by every keyhole daemon); returns the round trip in seconds."""
        start = time.monotonic()
        self.call(RequestKind.Ping)
        return time.monotonic() - start

    def shutdown(self) -> None:
        """Ask the daemon to shut down gracefully; returns after its ``Ack``.
        The connection then ends with ``Closing{Shutdown}`` (the next read
        raises :class:`DaemonClosing`). Raises :class:`NotPermittedError` if
        this peer may not (the connection stays open)."""
        self.call(RequestKind.Shutdown)

    def accept_fds(self) -> None:
        """Opt in to file descriptors (``AcceptFds``, section 19.1); returns at
        its ``Ack``. From the moment it is sent every read takes ancillary
        data, and the daemon may send descriptors: for the hub, every
        subscription of this connection then receives a publish of a memfd as
        a :class:`MessageMemfd` (the memfd itself) instead of a
        :class:`Message`. Needed before :meth:`publish_memfd` too (a frame
        with descriptors is refused with ``DescriptorsNotAccepted`` before).
        Calling it again changes nothing."""
        self.call(RequestKind.AcceptFds)

    def expect(self, service: Optional[str] = None, service_version: Optional[int] = None) -> None:
        """Send ``Expect`` (default: this connection's own service) and
        return at its ``Ack``: the daemon serves exactly that service and
        version. Otherwise the daemon closes the connection, reading nothing
        after the ``Expect``: :class:`WrongServiceDaemonError` (a
        :class:`WrongServiceError`) naming both services, and the requests
        sent after it get no reply."""
        self.call(self._expect_spec(service, service_version))

    # -- the hub: figures -------------------------------------------------------

    def _hub(self, request: HubRequest) -> Any:
        self._check_hub()
        return self.call(request)

    def status(self) -> Status:
        """The daemon's figures (hub ``Status``)."""
        return self._hub(StatusRequest())  # type: ignore[no-any-return]

    def topics(self) -> TopicList:
        """Every pattern subscribed and every name served, with their counts
        (hub ``Topics``); ``truncated`` if the lists did not fit in a frame."""
        return self._hub(TopicsRequest())  # type: ignore[no-any-return]

    # -- the hub: publish/subscribe -------------------------------------------
    def subscribe(self, pattern: str, lag: Lag = Lag.Disconnect, sid: Optional[int] = None) -> Subscription:
        """Subscribe to every topic ``pattern`` matches (``*`` matches one
        token, a final ``>`` one or more) with the lag policy ``lag``; returns
        the :class:`Subscription` once it is in place (every event published
        after it is delivered to it). ``sid`` defaults to the next of the
        connection's sid counter that is not live (``connect``'s
        ``next_subscription_id``; see :meth:`_alloc_sid`).

        Raises :class:`TopicError` before sending a pattern that is not a
        valid subject, :class:`SidError` for a ``sid`` of 0 or in use here,
        :class:`TooManySubscriptionsError` (hub error 1002; the connection
        stays open) while this connection holds :data:`MAX_SUBSCRIPTIONS`."""
        check_subject(pattern, "pattern")
        request = self._subscribe_request(pattern, lag, sid)
        rid = self.send(request)
        sub = self._new_subscription(request.sid)  # put in place by _before_send
        self.result(rid)
        return sub  # type: ignore[return-value]

    def unsubscribe(self, subscription: Union[Subscription, int]) -> None:
        """End a subscription (or the one with this sid); returns at its
        ``Unsubscribed`` reply. Its items not taken yet, those that arrived
        before the reply included, are dropped; nothing of it arrives after
        the reply (section 14), and its sid is free for the next subscription."""
        sid = subscription.sid if isinstance(subscription, SubscriptionBase) else int(subscription)
        self._hub(Unsubscribe(sid))

    def publish(self, topic: str, payload: Union[bytes, bytearray, memoryview] = b"") -> int:
        """Publish ``payload`` on ``topic``; returns once the event is queued
        for every subscription whose pattern matches, with how many it was
        queued for (``Published.receivers``). Raises :class:`TopicError`
        before sending an invalid topic, :class:`TooLargeError` (1007) if the
        event would be over the frame limit (8 bytes more than the
        ``Publish``), :class:`HubShuttingDownError` if the daemon was shutting
        down (nothing was published)."""
        self._check_hub()
        check_subject(topic, "topic")
        return self._hub(Publish(topic, bytes(payload))).receivers  # type: ignore[no-any-return]


    def publish_memfd(self, topic: str, fd: int) -> int:
        """Publish the bytes of the sealed memfd ``fd`` on ``topic``
        (``PublishMemfd`` in a ``CallFds``, section 19.5); returns
        ``Published.receivers``, both kinds of subscriber counted. ``fd``
        stays open here. Subscribers that sent ``AcceptFds`` get the memfd
        (:class:`MessageMemfd`), the others its bytes (:class:`Message`).
        Raises :class:`BadMemfdError` (1008) for a descriptor that is not a
        memfd sealed against writing, shrinking and growing (see
        :func:`sealed_memfd`) or is over 1 GiB, :class:`TooLargeError`
        (1007) when the bytes do not fit the ``Message`` of a subscriber
        that takes them inline, :class:`DescriptorsNotAcceptedError` (17)
        unless :meth:`accept_fds` was called first."""
        return self._hub_fds(self._publish_memfd_spec(topic, fd)).receivers  # type: ignore[no-any-return]

    def publish_memfd_data(self, topic: str, source: MemfdSource, name: str = "keyhole") -> int:
        """Copy ``source`` (bytes, or a binary file read to its end) into a
        new sealed memfd (:func:`sealed_memfd`), publish it
        (:meth:`publish_memfd`) and close it; returns ``receivers``."""
        check_subject(topic, "topic")
        fd = sealed_memfd(source, name)
        try:
            return self.publish_memfd(topic, fd)
        finally:
            os.close(fd)

    def _hub_fds(self, spec: CallWithFds) -> Any:
        self._check_hub()
        return self.call(spec)

    def request(self, name: str, payload: Union[bytes, bytearray, memoryview] = b"",
                timeout: Optional[float] = None) -> bytes:
        """Send ``payload`` to one responder of ``name`` and return its reply.

        ``timeout`` (seconds) is how long the hub lets the request wait for
        its answer: None is the hub's default (30 s), otherwise it is rounded
        up to whole milliseconds and cut to one hour. Raises, per outcome
        (every one a :class:`RequestError`): :class:`NoRespondersError`
        (1004, at once), :class:`BusyError` (1005), :class:`ResponderGoneError`,
        :class:`RequestTimeout`, :class:`ReplyTooLargeError` (``.len``),
        :class:`RequestFailed` (``.message``); also :class:`TopicError`
        before sending an invalid name, :class:`TooLargeError` (1007) if the
        request's event would be over the frame limit (12 bytes more than the
        ``Request``), :class:`HubShuttingDownError`. If the daemon sends no
        ``Response`` within the timeout plus the connection's timeout, the
        request is given up (its late ``Response`` is ignored) and
        :class:`KeyholeTimeout` is raised."""
        call = self._request_to(name, payload, timeout)
        rid = self.send(call)
        try:
            self.result(rid)
        except RequestError as err:
            err.request_id = rid
            err.requested_name = name
            raise
        wait, margin = self._response_deadline(call)
        try:
            response = self.wait_response(rid, wait)
        except KeyholeTimeout:
            raise self._gave_up(rid, call, margin) from None
        return outcome_result(response, name)

    def wait_response(self, rid: int, timeout: Optional[float] = None) -> Response:
        """Wait for the :class:`Response` event that ends the ``Request`` sent
        with id ``rid`` (low level: :meth:`request` does it all)."""
        self._check_response_awaited(rid)
        self._wait(lambda: self._response_ready(rid),
                   lambda f: isinstance(f.event, Response) and f.event.request == rid, timeout)
        return self._take_response(rid)

    # -- the hub: request/reply, as a responder ---------------------------------

    def serve(self, name: str) -> None:
        """Become a responder of ``name`` (hub ``Serve``): ``Request`` events for
        it then arrive (:meth:`next_request`). Raises :class:`TopicError`
        before sending an invalid name, :class:`TooManyNamesError` (1006)
        while this connection serves :data:`MAX_NAMES` names."""
        self._hub(self._serve_request(name))

    def unserve(self, name: str) -> None:
        """Stop serving ``name``. Requests already given to this connection
        are still its to answer: answer every one."""
        self._hub(self._serve_request(name, unserve=True))

    def next_request(self, timeout: Optional[float] = None) -> IncomingRequest:
        """The next request given to this connection as a responder (its
        ``token``, ``name``, the requester's ``uid`` and ``pid``, and the
        ``payload``). Answer it with :meth:`respond`, :meth:`fail` or
        :meth:`fail_reply_too_large`."""
        self._wait(self._requests_ready, lambda f: isinstance(f.event, IncomingRequest), timeout)
        return self._take_request()

    def respond(self, token: int, payload: Union[bytes, bytearray, memoryview] = b"") -> bool:
        """Answer the request ``token`` with ``payload``; returns ``delivered``
        (False when the request no longer waits or was never given to this
        connection). A reply that does not fit (see :meth:`reply_fits`) is
        sent as ``Fail{ReplyTooLarge{len}}`` instead, as section 16 step 14
        says: the requester then gets :class:`ReplyTooLargeError`. (A raw
        ``Respond`` that does not fit, to a request that waits, is answered
        with :class:`TooLargeError`, 1007, and the requester gets
        ``ReplyTooLarge`` all the same, section 14.)"""
        return self._hub(self._respond_request(token, payload)).delivered  # type: ignore[no-any-return]

    def fail(self, token: int, message: str) -> bool:
        """Answer the request ``token`` with ``Fail{Failed{message}}`` (the hub
        cuts a message over 512 bytes); returns ``delivered``. The requester
        gets :class:`RequestFailed`."""
        return self._hub(Fail(token, FailureFailed(message))).delivered  # type: ignore[no-any-return]

    def fail_reply_too_large(self, token: int, length: int) -> bool:
        """Answer the request ``token`` with ``Fail{ReplyTooLarge{len}}``: the
        reply of ``length`` bytes would not fit. Returns ``delivered``."""
        return self._hub(Fail(token, FailureReplyTooLarge(length))).delivered  # type: ignore[no-any-return]

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Close our end (allowed at any time). Descriptors received and not
        handed to the application (events not taken) are closed."""
        self._closed = True
        self._release_fds()
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "KeyholeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

