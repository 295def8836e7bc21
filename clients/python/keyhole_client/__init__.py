"""A keyhole client written from ``proto-spec.md`` (protocol version 2) alone.

keyhole is an authenticated local IPC protocol over a Unix domain socket: a
client must prove that it holds the daemon's session token before anything is
served. Version 2 splits the protocol in two:

* **the transport** (Part I of the spec), spoken by every keyhole daemon
  whatever it serves: framing, the handshake, ``Welcome``, requests with a
  12-byte header (``id``, ``kind``: ``Call``, ``Ping``, ``Shutdown``,
  ``Expect``: the service the requests after it are written for), daemon
  frames (``Welcome``, ``Reply``, ``Event`` with its ``stream``, ``Ack``,
  ``Error``, ``Closing``, ``Lagged``), the transport's error codes (below
  1000), event streams with their lag policies, and the life of a connection;
* **the hub** (Part II), service ``hub`` version 2, the service of
  ``keyholed``: a local message bus. Publish/subscribe: ``Subscribe{sid,
  pattern, lag}`` opens the connection's event stream ``sid`` (chosen by the
  client) for every topic the pattern matches (``*`` one token, a final ``>``
  one or more), ``Unsubscribe{sid}`` ends it, ``Publish`` answers how many
  subscriptions it reached; a ``DropOldest`` subscription that falls behind
  loses its oldest events and is told so with ``Lagged``. Request/reply:
  ``Serve``/``Unserve`` a name, ``Request`` a name (one responder of its
  group, round robin), ``Respond``/``Fail`` as a responder; the requester
  gets ``Response{request, outcome}``. Plus ``Status`` and ``Topics``. Its
  errors are sent as codes 1000 + n (1000 to 1007).

This package implements both, standard library only (typed: ``py.typed``):

* locating the socket and the token (section 11): ``KEYHOLE_SOCKET``,
  ``KEYHOLE_TOKEN``, ``KEYHOLE_TOKEN_FILE``, ``KEYHOLE_DIR``,
  ``$XDG_RUNTIME_DIR/keyhole``, ``$HOME/.keyhole``, ``KEYHOLE_DAEMON_UID``;
* the token file checks (opened with ``O_NONBLOCK``, checked with ``fstat``:
  regular file, ours, no group/other bits, exactly one token) and the peer uid
  check (``SO_PEERCRED``) before a single byte is sent; every buffer that
  held the token is wiped;
* the handshake, ``Welcome`` and its checks (protocol version 2,
  ``max_frame_len`` between 1024 and 16777216, the service name and version);
* the first requests in the handshake's write (``connect(early=[...])``),
  behind an ``Expect`` of the service when one of them is a ``Call``, so
  that a daemon of another service never acts on them (section 4); a
  refusal is still reported as the handshake's;
* strict decoding (section 5) and every protocol-error rule of section 7,
  after which the connection is closed;
* pipelining with ids: a FIFO of outstanding requests, each reply checked
  against the oldest one's id and kind;
* events interleaved anywhere, in a bounded queue (section 16 step 10),
  routed by stream: each subscription (:class:`Subscription`) gets its own
  messages and its ``Lagged`` losses, in order; ``Response`` events go to the
  request that awaits them, ``Request`` events to the responder's queue;
* the hub's subjects checked before sending (section 14, :func:`check_subject`);
* file descriptors (Part V, section 19): ``accept_fds()`` (``AcceptFds``;
  from then on every read is a ``recvmsg`` with room for 9 descriptors and
  ``MSG_CMSG_CLOEXEC``, each descriptor attributed to its frame by section
  19.3's rule), ``send_fds``/``call_fds`` (``CallFds``, one ``sendmsg`` from
  the frame's first byte), the hub's ``publish_memfd`` and
  ``publish_memfd_data`` (a sealed memfd, :func:`sealed_memfd`), and
  :class:`MessageMemfd` events carrying the memfd (read with ``os.pread``);
* "busy" answers retried within the connect timeout (section 9,
  "Admission"): ``EAGAIN`` from a non-blocking ``connect`` (the listen queue
  is full), ``TooManyUnauthenticated`` and ``TooManyConnections``, each on a
  new connection, with the token kept (and wiped) only until ``connect``
  returns.

Use it as a library::

    with KeyholeClient.connect() as hub:
        news = hub.subscribe("news.*")                      # Lag.Disconnect
        sensors = hub.subscribe("sensors.>", lag=Lag.DropOldest)
        print(hub.publish("news.local", b"hello"), "subscriptions reached")
        for item in news:                                   # Message or Lagged
            print(item.topic, item.sequence, item.payload)

    with KeyholeClient.connect() as responder:              # request/reply
        responder.serve("svc.clock")
        incoming = responder.next_request()
        responder.respond(incoming.token, b"12:00")

    with KeyholeClient.connect() as requester:
        try:
            print(requester.request("svc.clock", b"now?", timeout=2.0))
        except RequestError as err:   # NoResponders, Busy, ResponderGone,
            print(err)                # Timeout, ReplyTooLarge, Failed

or with asyncio (:class:`AsyncKeyholeClient`: the same API, every call
awaited, subscriptions iterated with ``async for``)::

    async with await AsyncKeyholeClient.connect() as hub:
        news = await hub.subscribe("news.*")
        print(await hub.publish("news.local", b"hello"))
        message = await news.next()

or from the command line: ``python3 -m keyhole_client --help``.

The package is organised as a sans-IO core shared by both APIs
(:mod:`._protocol`: codecs, checks, token and socket location;
:mod:`._core`: the state of a connection, its FIFO, event queue and routes)
and two thin I/O layers (:mod:`._blocking`, :mod:`._asyncio`).
"""


from ._protocol import *  # noqa: F401,F403
from ._protocol import __all__ as _protocol_all
from ._protocol import _LEN, _U32, _U64, _option_u64, _string, _u32, _u64  # noqa: F401  (the tests use them)
from ._core import CallWithFds, RequestSpec
from ._blocking import KeyholeClient, Subscription, read_welcome
from ._asyncio import AsyncKeyholeClient, AsyncSubscription
from ._cli import main

__version__ = "0.1.0"

__all__ = list(_protocol_all) + ["CallWithFds", "RequestSpec", "KeyholeClient", "Subscription", "read_welcome",
                                 "AsyncKeyholeClient", "AsyncSubscription", "main"]
