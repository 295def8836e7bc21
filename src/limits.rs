//! Every limit and timeout keyhole enforces, in one place, each with the reason
//! for its value and what happens when it is reached.
//!
//! The daemon's flags override the `DEFAULT_*` values; the `MAX_*`/`MIN_*`
//! values are protocol bounds that no flag can move.

use std::time::Duration;

/// Length of the session token in bytes (256 bits from the OS RNG).
pub const TOKEN_LEN: usize = 32;

/// Size of the length prefix in front of every frame: a `u32`, little-endian,
/// counting the payload bytes that follow (not itself).
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Payload length of the handshake frame: 4 magic bytes, a `u32` protocol
/// version and the 32 raw token bytes. A first frame whose length prefix is
/// anything else is rejected before a single payload byte is read.
pub const HANDSHAKE_PAYLOAD_LEN: usize = 4 + 4 + TOKEN_LEN;

/// Whole handshake frame on the wire (prefix + payload): the most the pre-auth
/// parser ever buffers for one connection.
pub const HANDSHAKE_FRAME_LEN: usize = LENGTH_PREFIX_LEN + HANDSHAKE_PAYLOAD_LEN;

/// Protocol ceiling for one frame's payload after authentication (16 MiB).
/// It is also the default, and the bincode decode limit, so a length inside a
/// message can never make the decoder allocate more than a frame may carry.
/// A frame over the configured limit gets `Error FrameTooLarge` and the
/// connection is closed; the encoder refuses to emit one.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Smallest configurable frame limit: every reply the daemon sends (Welcome,
/// StatusReport, an Error with its message) fits in it.
pub const MIN_FRAME_LEN: usize = 1024;

/// Default post-auth frame limit.
pub const DEFAULT_MAX_FRAME_LEN: usize = MAX_FRAME_LEN;

/// Longest topic, pattern or served name in bytes (UTF-8). Longer ones, and
/// the empty one, are answered with the hub's error `InvalidTopic` carrying
/// the request id; the connection stays open.
pub const MAX_TOPIC_LEN: usize = 255;

/// Longest message text the daemon puts in an `Error` frame. Error texts are
/// written by the daemon, never copied from peer bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 512;

/// Time a new connection has to complete the handshake. After it the peer is
/// sent `Error AuthTimeout` and closed, so a silent or dribbling peer holds a
/// pending slot for at most this long.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Unauthenticated connections read from at once (pending slots). When every
/// slot is taken, new connections wait for one, unread, round-robin by peer
/// process; while any waits, a slot holder past [`DEFAULT_PENDING_GRACE`]
/// gives its slot up (`Error TooManyUnauthenticated`). A real client waits at
/// most about (connections ahead of it) x grace / slots: with the default
/// connection cap, (4096 - 256) x 0.2 s / 256 = 3 s, inside the handshake
/// deadline, even when every peer looks like one process (a forwarder, a
/// pid namespace). A pending connection costs under 2 KiB.
pub const DEFAULT_MAX_PENDING: usize = 256;

/// While connections wait for a pending slot, the time a slot holder has to
/// complete its handshake before it gives the slot up. A real client sends
/// its 44 bytes at once, or within tens of milliseconds; a silent or
/// dribbling connection gets no longer than this.
pub const DEFAULT_PENDING_GRACE: Duration = Duration::from_millis(200);

/// Connections (pending + authenticated) held at once. One more is sent
/// `Error TooManyConnections` and closed. Keeps the daemon inside its file
/// descriptor limit with room to spare.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Bytes of encoded events that may wait for one subscriber. A subscriber
/// whose queue would go past this is sent `Closing SlowConsumer` and
/// disconnected; the publisher and the other subscribers are never slowed.
/// It must be at least one frame, so it is never below the frame limit.
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// Bytes a connection reads from its socket in one go after authentication.
/// Read buffers are released while a connection is idle.
pub const READ_CHUNK: usize = 8 * 1024;

/// Bytes of replies a connection gathers before it writes, even if more
/// requests are already buffered: bounds the memory a pipelining client can
/// make the daemon hold for it.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// How long a connection that is being closed (slow consumer, shutdown,
/// protocol error) may take to accept its final frames before it is dropped.
pub const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause after `accept` fails for lack of file descriptors, so the daemon
/// neither spins nor gives up; existing connections keep being served.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Subscriptions one hub connection may hold. One more is answered with the
/// hub's error `TooManySubscriptions` (1002) and the connection stays open.
/// Bounds what one connection makes the daemon hold (a subscription costs a
/// few hundred bytes with its topic).
pub const MAX_SUBSCRIPTIONS: usize = 4096;

/// Bytes of inbound frames being received and events queued that the daemon
/// holds over all its connections (256 MiB: a desktop's worth). Past it, the
/// connection holding the most is sent `Error OverBudget` and closed, its
/// queued events dropped. Each connection is also bounded on its own (one
/// frame in, [`DEFAULT_OUTBOUND_QUEUE_BYTES`] out); this bounds their sum,
/// which the connection cap alone would let reach tens of GiB.
pub const DEFAULT_MEMORY_BUDGET: usize = 256 * 1024 * 1024;

/// The smallest memory budget: a connection's read buffer alone can hold
/// tens of KiB while requests arrive, so a smaller budget would cut
/// ordinary clients. (It is also never below two frames.)
pub const MIN_MEMORY_BUDGET: usize = 1024 * 1024;

/// Names one hub connection may serve. One more is answered with the hub's
/// error `TooManyNames` (1006).
pub const MAX_SERVED_NAMES: usize = 256;

/// Requests one responder connection may have in flight (given to it and
/// not answered). A request to a name whose responders all have this many
/// is answered with the hub's error `Busy` (1005) at once, so a stuck
/// responder makes the daemon hold at most this many requests for it.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 256;

/// How long a request waits for its response when it names no timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest timeout a request may name; a longer one is cut to it.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// Topics whose sequence numbers the hub keeps. A topic is numbered while
/// its publishes reach subscriptions and forgotten when one reaches none;
/// past this many, the numbering of an arbitrary other topic is forgotten
/// (its subscribers see its sequence start again at 1).
pub const MAX_NUMBERED_TOPICS: usize = 65_536;

/// File descriptors one frame may carry (section 19 of proto-spec.md). The
/// daemon's ancillary buffer has room for one more, so a frame with more is
/// seen, closed and answered `TooManyDescriptors` (19), never cut silently.
/// Eight covers a request's handful of files and keeps the buffer on the
/// stack; the kernel's own ceiling (253) would let one frame pin a
/// connection's worth of descriptors at once.
pub const MAX_FDS_PER_FRAME: usize = 8;

/// Descriptors queued for one connection (events and replies waiting to be
/// written). A queue that would pass it is full, exactly as when its bytes
/// would pass [`DEFAULT_OUTBOUND_QUEUE_BYTES`]: the stream's lag policy
/// decides (drop the oldest, or `Closing{SlowConsumer}`). With the
/// connection cap this bounds the descriptors the daemon holds for its
/// queues (a descriptor shared by many queues is one descriptor).
pub const MAX_QUEUED_FDS: usize = 64;

/// Largest sealed memfd the hub takes in a publish (1 GiB). Its pages are
/// the publisher's (tmpfs, charged to its memory cgroup); the daemon holds
/// a descriptor, and reads the bytes only for subscribers that take them
/// inline, which is possible only when they fit a frame.
pub const MAX_MEMFD_LEN: u64 = 1 << 30;
