"""The asyncio client: :class:`AsyncKeyholeClient` and its
:class:`AsyncSubscription`, over asyncio streams (``StreamReader`` /
``StreamWriter``). The same checks and the same state as the blocking client
(:mod:`._core`, :mod:`._protocol`); only the waiting differs.

Several tasks may use one connection at once: requests are written in the
order they are sent, replies are matched in that order (section 9), and
whichever task waits reads frames for all of them (one reader at a time),
so events are routed and queued while requests are in flight."""

from __future__ import annotations

import asyncio
import math
import os
import socket
from typing import (Any, AsyncIterator, Awaitable, Callable, List, Mapping, Optional, Sequence, Tuple, TypeVar,
                    Union)

from ._core import BUSY_EXCEPTIONS, CallWithFds, Connection, Connector, RequestSpec, SubscriptionBase
from ._protocol import (DEFAULT_MAX_QUEUED_EVENT_BYTES, DEFAULT_TIMEOUT, HUB, _LEN,
                        MIN_MAX_FRAME_LEN, PROTOCOL_MAX_FRAME_LEN, PROTOCOL_VERSION, Ack, ConnectionClosed,
                        Error, Event, Fail, FailureFailed, FailureReplyTooLarge, HubRequest,
                        IncomingRequest, KeyholeTimeout, Lag, Lagged, Message, Publish, Reply, RequestError,
                        RequestKind, Response, Service, Status, StatusRequest, TopicList, TopicsRequest, Unsubscribe,
                        Welcome, check_subject, decode_daemon_frame, ended_before_welcome, open_checked_socket,
                        outcome_result, split_frame, welcome_from_first_frame, wipe, _NOSIGNAL, MemfdSource,
                        MessageMemfd, recv_with_fds, sealed_memfd, send_with_fds)

_T = TypeVar("_T")


_READ_SIZE = 1 << 16


class _StreamReader(asyncio.StreamReader):
    """An ``asyncio.StreamReader`` that reports ``ECONNRESET`` (and ``EPIPE``)
    as the end of the stream, *after* the bytes already received: section 9
    says both ends mean the same, and the daemon's final frame (an ``Error``
    that says why) usually precedes a reset. The stock reader raises the
    error at the next ``read`` and the buffered bytes are lost."""

    reset = False

    def set_exception(self, exc: Exception) -> None:
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            self.reset = True
            self.feed_eof()
        else:
            super().set_exception(exc)

    def take_buffered(self) -> bytes:
        """Take every byte received and not read yet (the client goes on
        reading from the socket itself: :meth:`AsyncKeyholeClient._enter_raw`)."""
        buffer: bytearray = getattr(self, "_buffer")
        data = bytes(buffer)
        buffer.clear()
        return data


async def _open_streams(sock: socket.socket, limit: int) -> Tuple[_StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_unix_connection(sock=...)``, with :class:`_StreamReader`
    (the same four lines as the standard function)."""
    loop = asyncio.get_running_loop()
    reader = _StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_unix_connection(lambda: protocol, sock=sock)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def _until(aw: Awaitable[_T], deadline: Optional[float], what: str) -> _T:
    """Await ``aw`` by the loop-time ``deadline`` (None: no deadline), else :class:`KeyholeTimeout`."""
    if deadline is None:
        return await aw
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        if asyncio.iscoroutine(aw):
            aw.close()
        raise KeyholeTimeout(f"timed out {what}")
    try:
        return await asyncio.wait_for(aw, left)
    except asyncio.TimeoutError:
        raise KeyholeTimeout(f"timed out {what}") from None


def _deadline(seconds: Optional[float]) -> Optional[float]:
    if seconds is None or math.isinf(seconds):
        return None
    return asyncio.get_running_loop().time() + seconds


async def _read_welcome(reader: _StreamReader, service: Service,
                        deadline: Optional[float]) -> Tuple[Welcome, bytearray]:
    """The daemon's first frame (section 16 step 6), as :func:`read_welcome` does it."""
    buf = bytearray()
    while True:
        if len(buf) >= 4:
            (length,) = _LEN.unpack_from(buf, 0)
            if length > PROTOCOL_MAX_FRAME_LEN or len(buf) >= 4 + length:
                payload, rest = split_frame(buf, PROTOCOL_MAX_FRAME_LEN)
                return welcome_from_first_frame(decode_daemon_frame(payload, service), service), bytearray(rest)
        chunk = await _until(reader.read(_READ_SIZE), deadline, "waiting for the daemon's first frame")
        if not chunk:
            raise ended_before_welcome(len(buf), reader.reset)
        buf += chunk


class AsyncSubscription(SubscriptionBase):
    """A hub subscription of an :class:`AsyncKeyholeClient` (see
    :class:`Subscription`): ``await sub.next()`` or ``async for item in sub``
    gives its items in order, each a :class:`Message` or a :class:`Lagged`."""

    client: "AsyncKeyholeClient"

    async def next(self, timeout: Optional[float] = None) -> Union[Message, MessageMemfd, Lagged]:
        """The subscription's next item (a :class:`Message`, a
        :class:`MessageMemfd` after ``accept_fds``, or a :class:`Lagged`),
        waiting at most ``timeout`` seconds (default: the connection's;
        ``math.inf``: for ever), else :class:`KeyholeTimeout`."""
        self._check_next()
        await self.client._wait(self._ready, self._wanted, timeout)
        return self._take_next()

    def __aiter__(self) -> "AsyncSubscription":
        return self

    async def __anext__(self) -> Union[Message, MessageMemfd, Lagged]:
        """The next item, waiting for ever: the end of the connection ends
        the iteration with its exception."""
        return await self.next(math.inf)

    async def unsubscribe(self) -> None:
        """End the subscription (see :meth:`AsyncKeyholeClient.unsubscribe`)."""
        await self.client.unsubscribe(self)


class AsyncKeyholeClient(Connection):
    """An authenticated connection to a keyhole daemon, for asyncio: the API
    of :class:`KeyholeClient` with every call that waits on the daemon a
    coroutine (``await client.ping()``, ``await client.subscribe(...)``, ...),
    ``async with`` to close it, ``async for`` over a subscription or
    :meth:`events`. The same rules apply (replies in request order, events
    routed by stream and queued in a bounded queue, every wait bounded by
    ``timeout``), from the same code (:class:`Connection`).

    Any number of tasks may wait at once; one of them reads for all. Not
    thread-safe (use it from its event loop)."""

    _subscription_class = AsyncSubscription

    def __init__(self, welcome: Welcome, *, service: Service = HUB,
                 max_queued_event_bytes: int = DEFAULT_MAX_QUEUED_EVENT_BYTES) -> None:
        super().__init__(welcome, service=service, max_queued_event_bytes=max_queued_event_bytes)
        self.sock: Optional[socket.socket] = None
        self._reader: Optional[_StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reading = False  # one task reads at a time
        self._reader_eof = False
        self._tick: Optional[asyncio.Event] = None  # set (and replaced) after every frame a task read
        # Once descriptors are involved (AcceptFds sent, or a frame carrying
        # some), every read and write goes to the socket itself: recvmsg and
        # sendmsg, which asyncio's transports do not offer (section 19).
        self._raw = False
        self._wlock: Optional[asyncio.Lock] = None

    # -- connecting -------------------------------------------------------

    @classmethod
    async def connect(cls, path: Optional[str] = None,
                      token: Optional[Union[bytearray, bytes]] = None, *,
                      env: Optional[Mapping[str, str]] = None, timeout: float = DEFAULT_TIMEOUT,
                      connect_timeout: Optional[float] = None,
                      service: Service = HUB, early: Sequence[RequestSpec] = (),
                      expect: Optional[bool] = None,
                      max_queued_event_bytes: int = DEFAULT_MAX_QUEUED_EVENT_BYTES,
                      next_request_id: Optional[int] = None,
                      next_subscription_id: Optional[int] = None) -> "AsyncKeyholeClient":
        """Find the daemon, check everything, authenticate and wait for
        ``Welcome``: :meth:`KeyholeClient.connect`, step for step (the peer's
        uid is checked with ``SO_PEERCRED`` before a byte is sent, the token
        read after that check and wiped when this returns or raises, "busy"
        retried with section 9's pauses until ``connect_timeout``, the same
        bytes written on every attempt: the handshake, the ``Expect`` and the
        ``early`` requests, in one write before ``Welcome`` is read; the
        options ``next_request_id``, ``next_subscription_id`` and
        ``connect_timeout`` as there). The handshake is written on the
        socket itself before the streams are made, so that no copy of the
        token is left in a transport's buffer."""
        env = os.environ if env is None else env
        connector = Connector(cls(Welcome(PROTOCOL_VERSION, "", 0, "", 0, 0, MIN_MAX_FRAME_LEN),
                                  service=service, max_queued_event_bytes=max_queued_event_bytes),
                              path, token, env, early, timeout, connect_timeout, expect,
                              next_request_id=next_request_id, next_subscription_id=next_subscription_id)
        client: AsyncKeyholeClient = connector.client  # type: ignore[assignment]
        client.timeout = timeout
        try:
            while True:
                connector.attempts += 1
                try:
                    await client._attempt(connector, timeout, service)
                    break
                except BUSY_EXCEPTIONS as err:
                    await asyncio.sleep(connector.retry_delay(err))
                    connector.give_up_if_due()
        finally:
            connector.wipe()
        return client

    @classmethod
    async def from_socket(cls, sock: socket.socket, welcome: Welcome, rbuf: Optional[bytearray] = None, *,
                          timeout: Optional[float] = DEFAULT_TIMEOUT, service: Service = HUB,
                          max_queued_event_bytes: int = DEFAULT_MAX_QUEUED_EVENT_BYTES) -> "AsyncKeyholeClient":
        """A client on a socket that is past its ``Welcome`` already (the
        tests use it with a scripted daemon on a socketpair); it takes the
        socket over."""
        client = cls(welcome, service=service, max_queued_event_bytes=max_queued_event_bytes)
        client.timeout = timeout
        sock.setblocking(False)
        client._reader, client._writer = await _open_streams(sock.dup(), limit=max(1 << 16, welcome.max_frame_len))
        client.sock = sock
        if rbuf:
            client._rbuf += rbuf
        return client

    async def _attempt(self, connector: Connector, timeout: float, service: Service) -> None:
        """One connection: connect and check the peer (shared with the
        blocking client), read the token, write the handshake and the early
        requests, open the streams, read ``Welcome``."""
        loop = asyncio.get_running_loop()
        deadline = _deadline(timeout)
        sock = open_checked_socket(connector.path, timeout=timeout, expected_uid=connector.expected_uid)
        writer: Optional[asyncio.StreamWriter] = None
        try:
            sock.setblocking(False)
            hs = connector.handshake()
            try:
                await _until(loop.sock_sendall(sock, hs), deadline, "sending the handshake")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon closed already: its Error, if any, is waiting to be read
            finally:
                wipe(hs)
            # The transport gets its own descriptor of the socket: after a
            # failed write asyncio closes its transport without reading what
            # is left, and that (the daemon's last frame) is read from ours.
            reader, writer = await _open_streams(sock.dup(), limit=max(1 << 16, self.welcome.max_frame_len))
            welcome, rbuf = await _read_welcome(reader, service, deadline)
        except BaseException:
            if writer is not None:
                writer.close()
            sock.close()
            raise
        self.sock = sock
        self._reader = reader
        self._writer = writer
        connector.finish(welcome, rbuf)

    # -- low-level I/O ----------------------------------------------------

    def _close_transport(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except RuntimeError:  # its event loop is closed already: nothing is left to close
                pass
        if self.sock is not None:
            self.sock.close()

    def _notify(self) -> None:
        """Wake the tasks waiting for the reader."""
        if self._tick is not None:
            self._tick.set()
            self._tick = None

    async def _fill(self, deadline: Optional[float]) -> None:
        """Read more bytes into the receive buffer by ``deadline``. End of
        stream and ECONNRESET both mean the daemon ended the connection
        (section 9); after the stream's end, what the socket still holds is
        read from our own descriptor (see :meth:`_attempt`)."""
        assert self._reader is not None and self.sock is not None
        try:
            if not self._reader_eof and not self._raw:
                chunk = await _until(self._reader.read(_READ_SIZE), deadline, "waiting for the daemon")
                if chunk:
                    self._feed(chunk)
                    return
                self._reader_eof = True
            reset = self._reader.reset
            try:
                n = await self._recv_raw(deadline)
            except ConnectionResetError:
                n, reset = 0, True
        except KeyholeTimeout:
            raise
        except (OSError, ValueError) as err:
            if self._closed:
                raise ConnectionClosed("the connection is closed") from None
            raise ConnectionClosed(f"reading failed: {err}") from None
        if not n:
            raise self._ended_at_eof(reset)

    def _enter_raw(self) -> None:
        """From now on read and write on the socket itself (before the first
        ``AcceptFds`` or frame with descriptors is written: section 19.1, read
        with an ancillary buffer from the moment ``AcceptFds`` is sent). The
        transport stops reading; what it had read and nobody took goes to the
        receive buffer first; a task waiting on it sees its end and goes on
        on the socket (:meth:`_fill`)."""
        if self._raw or self._reader is None or self._writer is None:
            self._raw = True
            return
        self._raw = True
        transport = self._writer.transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()
        self._feed(self._reader.take_buffered())
        if not self._reader.at_eof():
            self._reader.feed_eof()

    async def _io_ready(self, read: bool, write: bool, deadline: Optional[float]) -> str:
        """Wait until the socket is readable (``"r"``) or writable (``"w"``)."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[str]" = loop.create_future()
        fd = self.sock.fileno()

        def ready(kind: str) -> None:
            if not fut.done():
                fut.set_result(kind)

        if read:
            loop.add_reader(fd, ready, "r")
        if write:
            loop.add_writer(fd, ready, "w")
        try:
            return await _until(fut, deadline, "waiting for the daemon")
        finally:
            if read:
                loop.remove_reader(fd)
            if write:
                loop.remove_writer(fd)

    def _recv_now(self) -> int:
        """One non-blocking read on the socket into the receive buffer:
        ``recvmsg`` with room for 9 descriptors once ``AcceptFds`` was sent
        (section 19.3). Raises ``BlockingIOError`` when nothing is there."""
        assert self.sock is not None
        if self.fds_requested:
            data, fds, flags = recv_with_fds(self.sock, _READ_SIZE)
            self._feed(data, fds, flags)
            return len(data)
        chunk = self.sock.recv(_READ_SIZE)
        self._feed(chunk)
        return len(chunk)

    async def _recv_raw(self, deadline: Optional[float]) -> int:
        """Read from the socket itself (0: the end of the stream)."""
        while True:
            try:
                return self._recv_now()
            except (BlockingIOError, InterruptedError):
                await self._io_ready(True, False, deadline)

    async def _read_one(self, deadline: Optional[float]) -> None:
        """Read one frame and dispatch it (:meth:`Connection._handle_payload`)."""
        self._check_open()
        payload = self._take_payload()
        while payload is None:
            await self._fill(deadline)
            payload = self._take_payload()
        self._handle_payload(payload)

    async def _wait(self, ready: Callable[[], bool], wanted: Callable[[Event], bool],
                    timeout: Optional[float]) -> None:
        """Read frames until ``ready()``, by the deadline ``timeout`` (default:
        the connection's; ``math.inf`` waits for ever). While another task
        reads, wait for each frame it reads. While the event queue is full, an
        ``Event`` is only read if ``wanted``; any other raises
        :class:`EventQueueFull` and stays unread (as the blocking client)."""
        if ready():
            return
        deadline = _deadline(self.timeout if timeout is None else timeout)
        while not ready():
            if self._reading:
                if self._tick is None:
                    self._tick = asyncio.Event()
                await _until(self._tick.wait(), deadline, "waiting for the daemon")
                continue
            self._reading = True
            try:
                if self._queue_full():
                    self._check_open()
                    while self._frame_len() is None:
                        await self._fill(deadline)
                    self._check_queue(wanted)
                await self._read_one(deadline)
            finally:
                self._reading = False
                self._notify()

    async def _raw_write(self, data: bytes, marks: Sequence[Tuple[int, Tuple[int, ...]]]) -> None:
        """:meth:`_write` on the socket itself, in the order the writes were
        asked for (one at a time), after whatever the transport still holds:
        each frame with descriptors with one ``sendmsg`` that starts at its
        first byte and stops before the next such frame (section 19.2).
        While the socket is full, read (when no other task does)."""
        assert self._writer is not None and self.sock is not None
        if self._wlock is None:
            self._wlock = asyncio.Lock()
        deadline = _deadline(self.timeout)
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        pending = list(marks)
        pos = 0
        try:
            async with self._wlock:
                transport = self._writer.transport
                while transport.get_write_buffer_size() and not transport.is_closing():
                    if deadline is not None and loop.time() >= deadline:
                        raise asyncio.TimeoutError()
                    await asyncio.sleep(0.001)
                while pos < len(view):
                    self._check_open()
                    try:
                        if pending and pending[0][0] == pos:
                            end = pending[1][0] if len(pending) > 1 else len(view)
                            sent = send_with_fds(self.sock, view[pos:end], pending[0][1], _NOSIGNAL)
                            del pending[0]  # the descriptors went with the first byte
                        else:
                            end = pending[0][0] if pending else len(view)
                            sent = self.sock.send(view[pos:end], _NOSIGNAL)
                        pos += sent
                        continue
                    except (BlockingIOError, InterruptedError):
                        pass
                    if self._reading:
                        await self._io_ready(False, True, deadline)
                        continue
                    self._reading = True
                    try:
                        if await self._io_ready(True, True, deadline) == "r":
                            try:
                                n = self._recv_now()
                            except (BlockingIOError, InterruptedError):
                                n = -1
                            except ConnectionResetError:
                                n = 0
                            if n == 0:
                                raise BrokenPipeError("the daemon closed the connection while we were writing")
                    finally:
                        self._reading = False
                        self._notify()
        except (KeyholeTimeout, asyncio.TimeoutError):
            # A frame may be half written: the stream cannot be resumed.
            self._end(ConnectionClosed("closed after a write timed out"))
            raise KeyholeTimeout("timed out writing to the daemon; the connection was closed") from None
        except asyncio.CancelledError:
            if pos or pending != list(marks):
                self._end(ConnectionClosed("closed after a write was cancelled half way"))
            raise
        except (BrokenPipeError, ConnectionResetError):
            # Read what the daemon sent before closing: replies go to their
            # waiters, and its final frame (if any) is raised.
            while True:
                await self._wait(lambda: False, lambda f: True, None)

    async def _write(self, data: bytes, marks: Sequence[Tuple[int, Tuple[int, ...]]] = ()) -> None:
        """Write ``data`` and wait until the transport took it, reading
        meanwhile (into the receive buffer, undecoded) when no other task
        reads, so that a long pipeline cannot block both sides (section 16
        step 9). A write that fails because the daemon closed raises the
        reason the daemon sent, if it sent one (section 16 step 12)."""
        assert self._writer is not None and self._reader is not None
        if self._raw:
            await self._raw_write(data, marks)
            return
        deadline = _deadline(self.timeout)
        try:
            self._writer.write(data)
            drain = asyncio.ensure_future(self._writer.drain())
            try:
                while not drain.done():
                    if self._reading or self._reader_eof:
                        waiting: List["asyncio.Future[Any]"] = [drain]
                        read = None
                    else:
                        self._reading = True
                        read = asyncio.ensure_future(self._reader.read(_READ_SIZE))
                        waiting = [drain, read]
                    try:
                        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                        await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                        if read is not None:
                            if not read.done():
                                read.cancel()
                            try:
                                chunk = await read
                            except asyncio.CancelledError:
                                chunk = None
                            if chunk:
                                self._rbuf += chunk
                            elif chunk is not None:
                                self._reader_eof = True
                    finally:
                        if read is not None:
                            self._reading = False
                            self._notify()
                    if not drain.done() and deadline is not None \
                            and asyncio.get_running_loop().time() >= deadline:
                        # A frame may be half written: the stream cannot be resumed.
                        self._end(ConnectionClosed("closed after a write timed out"))
                        raise KeyholeTimeout("timed out writing to the daemon; the connection was closed")
                drain.result()
            finally:
                if not drain.done():
                    drain.cancel()
        except (BrokenPipeError, ConnectionResetError):
            # Read what the daemon sent before closing: replies go to their
            # waiters, and its final frame (if any) is raised.
            while True:
                await self._wait(lambda: False, lambda f: True, None)

    # -- sending ----------------------------------------------------------

    async def send(self, spec: RequestSpec, id: Optional[int] = None) -> int:  # noqa: A002
        """Send one request without waiting for its reply; returns its id."""
        return (await self.send_many([spec], None if id is None else [id]))[0]

    async def send_many(self, specs: Sequence[RequestSpec], ids: Optional[Sequence[int]] = None) -> List[int]:
        """Send several requests in one write (pipelining); returns their ids
        (see :meth:`KeyholeClient.send_many`). Requests are in the FIFO, in
        order, before this first awaits: tasks that send at once get their
        replies matched in the order they sent."""
        accept, carries = self._fd_kinds(specs)
        if accept or carries:
            self._enter_raw()
        if carries and self._accept_fds_outstanding():
            # Section 19.1: no frame with descriptors before the Ack of AcceptFds.
            await self._wait(lambda: not self._accept_fds_outstanding(), lambda f: False, None)
        data, rids, marks = self._prepare_send_fds(specs, ids)
        await self._write(data, marks)
        return rids

    async def send_fds(self, spec: Any, fds: Sequence[int], id: Optional[int] = None) -> int:  # noqa: A002
        """Send ``spec`` as a ``CallFds`` carrying ``fds`` (see :meth:`KeyholeClient.send_fds`)."""
        return await self.send(CallWithFds(spec, tuple(fds)), id)

    async def call_fds(self, spec: Any, fds: Sequence[int]) -> Any:
        """:meth:`send_fds`, then :meth:`result` for it."""
        return await self.result(await self.send_fds(spec, fds))

    # -- receiving --------------------------------------------------------

    async def wait_reply(self, rid: int, timeout: Optional[float] = None) -> Union[Reply, Ack, Error]:
        """Wait for the reply frame to request ``rid`` (see :meth:`KeyholeClient.wait_reply`)."""
        self._check_reply_awaited(rid)
        await self._wait(lambda: self._reply_ready(rid), lambda f: False, timeout)
        return self._pop_reply(rid)

    async def result(self, rid: int, timeout: Optional[float] = None) -> Any:
        """The content of the reply to ``rid``; an ``Error`` raises its :class:`KeyholeError`."""
        return self._reply_result(await self.wait_reply(rid, timeout))

    async def call(self, spec: RequestSpec) -> Any:
        """Send one request and return :meth:`result` for it."""
        return await self.result(await self.send(spec))

    async def pipeline(self, specs: Sequence[RequestSpec]) -> List[Union[Reply, Ack, Error]]:
        """Send every request in one write and return their reply frames, in order."""
        return [await self.wait_reply(rid) for rid in await self.send_many(specs)]

    async def next_event(self, timeout: Optional[float] = None) -> Union[Event, Lagged]:
        """The oldest queued item of any route, else the next to arrive (see
        :meth:`KeyholeClient.next_event`)."""
        await self._wait(self._event_ready, lambda f: True, timeout)
        return self._take_event()

    async def events(self) -> AsyncIterator[Union[Event, Lagged]]:
        """Every item in arrival order, waiting for ever; the end of the
        connection ends the iteration with its exception."""
        while True:
            yield await self.next_event(math.inf)

    # -- transport requests -------------------------------------------------

    async def ping(self) -> float:
        """``Ping`` (answered by every keyhole daemon); returns the round trip in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self.call(RequestKind.Ping)
        return loop.time() - start

    async def shutdown(self) -> None:
        """Ask the daemon to shut down gracefully; returns after its ``Ack``
        (see :meth:`KeyholeClient.shutdown`)."""
        await self.call(RequestKind.Shutdown)

    async def accept_fds(self) -> None:
        """Opt in to file descriptors and return at the ``Ack`` (see :meth:`KeyholeClient.accept_fds`)."""
        await self.call(RequestKind.AcceptFds)

    async def expect(self, service: Optional[str] = None, service_version: Optional[int] = None) -> None:
        """Send ``Expect`` and return at its ``Ack`` (see :meth:`KeyholeClient.expect`)."""
        await self.call(self._expect_spec(service, service_version))

    # -- the hub ------------------------------------------------------------

    async def _hub(self, request: HubRequest) -> Any:
        self._check_hub()
        return await self.call(request)

    async def status(self) -> Status:
        """The daemon's figures (hub ``Status``)."""
        return await self._hub(StatusRequest())  # type: ignore[no-any-return]

    async def topics(self) -> TopicList:
        """Every pattern subscribed and every name served, with their counts."""
        return await self._hub(TopicsRequest())  # type: ignore[no-any-return]

    async def subscribe(self, pattern: str, lag: Lag = Lag.Disconnect,
                        sid: Optional[int] = None) -> AsyncSubscription:
        """Subscribe to every topic ``pattern`` matches; returns the
        :class:`AsyncSubscription` once it is in place (see :meth:`KeyholeClient.subscribe`)."""
        request = self._subscribe_request(pattern, lag, sid)
        rid = await self.send(request)
        sub = self._new_subscription(request.sid)
        await self.result(rid)
        return sub  # type: ignore[return-value]

    async def unsubscribe(self, subscription: Union[AsyncSubscription, int]) -> None:
        """End a subscription (or the one with this sid); returns at its ``Unsubscribed`` reply."""
        sid = subscription.sid if isinstance(subscription, SubscriptionBase) else int(subscription)
        await self._hub(Unsubscribe(sid))

    async def publish(self, topic: str, payload: Union[bytes, bytearray, memoryview] = b"") -> int:
        """Publish ``payload`` on ``topic``; returns how many subscriptions it reached."""
        self._check_hub()
        check_subject(topic, "topic")
        return (await self._hub(Publish(topic, bytes(payload)))).receivers  # type: ignore[no-any-return]

    async def publish_memfd(self, topic: str, fd: int) -> int:
        """Publish the bytes of the sealed memfd ``fd`` on ``topic``; returns
        ``receivers`` (see :meth:`KeyholeClient.publish_memfd`)."""
        return (await self.call(self._publish_memfd_spec(topic, fd))).receivers  # type: ignore[no-any-return]

    async def publish_memfd_data(self, topic: str, source: MemfdSource, name: str = "keyhole") -> int:
        """Copy ``source`` into a new sealed memfd, publish it and close it
        (see :meth:`KeyholeClient.publish_memfd_data`)."""
        check_subject(topic, "topic")
        fd = sealed_memfd(source, name)
        try:
            return await self.publish_memfd(topic, fd)
        finally:
            os.close(fd)

    async def request(self, name: str, payload: Union[bytes, bytearray, memoryview] = b"",
                      timeout: Optional[float] = None) -> bytes:
        """Send ``payload`` to one responder of ``name`` and return its reply;
        each outcome that is not a reply raises its :class:`RequestError`
        (see :meth:`KeyholeClient.request`). Requests from several tasks run
        at once, told apart by their ``Call`` id."""
        call = self._request_to(name, payload, timeout)
        rid = await self.send(call)
        try:
            await self.result(rid)
        except RequestError as err:
            err.request_id = rid
            err.requested_name = name
            raise
        wait, margin = self._response_deadline(call)
        try:
            response = await self.wait_response(rid, wait)
        except KeyholeTimeout:
            raise self._gave_up(rid, call, margin) from None
        return outcome_result(response, name)

    async def wait_response(self, rid: int, timeout: Optional[float] = None) -> Response:
        """Wait for the :class:`Response` event that ends the ``Request`` sent with id ``rid``."""
        self._check_response_awaited(rid)
        await self._wait(lambda: self._response_ready(rid),
                         lambda f: isinstance(f.event, Response) and f.event.request == rid, timeout)
        return self._take_response(rid)

    async def serve(self, name: str) -> None:
        """Become a responder of ``name``: ``Request`` events for it then arrive (:meth:`next_request`)."""
        await self._hub(self._serve_request(name))

    async def unserve(self, name: str) -> None:
        """Stop serving ``name`` (requests already given are still this connection's to answer)."""
        await self._hub(self._serve_request(name, unserve=True))

    async def next_request(self, timeout: Optional[float] = None) -> IncomingRequest:
        """The next request given to this connection as a responder."""
        await self._wait(self._requests_ready, lambda f: isinstance(f.event, IncomingRequest), timeout)
        return self._take_request()

    async def respond(self, token: int, payload: Union[bytes, bytearray, memoryview] = b"") -> bool:
        """Answer the request ``token`` with ``payload`` (``Fail{ReplyTooLarge}``
        if it does not fit); returns ``delivered``."""
        return (await self._hub(self._respond_request(token, payload))).delivered  # type: ignore[no-any-return]

    async def fail(self, token: int, message: str) -> bool:
        """Answer the request ``token`` with ``Fail{Failed{message}}``; returns ``delivered``."""
        return (await self._hub(Fail(token, FailureFailed(message)))).delivered  # type: ignore[no-any-return]

    async def fail_reply_too_large(self, token: int, length: int) -> bool:
        """Answer the request ``token`` with ``Fail{ReplyTooLarge{len}}``; returns ``delivered``."""
        return (await self._hub(Fail(token, FailureReplyTooLarge(length)))).delivered  # type: ignore[no-any-return]

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Close our end (allowed at any time; tasks waiting get
        :class:`ConnectionClosed`). Descriptors received and not handed to
        the application are closed."""
        self._closed = True
        self._release_fds()
        self._close_transport()

    async def wait_closed(self) -> None:
        """Wait until the transport is closed."""
        if self._writer is not None:
            try:
                await self._writer.wait_closed()
            except (OSError, ConnectionError):
                pass

    async def __aenter__(self) -> "AsyncKeyholeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()
