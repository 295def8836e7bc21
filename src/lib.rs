//! keyhole: an authenticated local message hub over a Unix domain socket.
//!
//! A local socket without authentication lets any process that can reach it
//! drive the daemon. keyhole's daemon draws a fresh 32-byte session token at
//! every start and writes it to a 0600 file in a 0700 directory; a client's
//! first frame must carry that token, compared in constant time, before the
//! daemon serves anything. The wire format is specified in `proto-spec.md`.
//!
//! # Layout
//! - [`limits`]: every limit and timeout, each with the reason for its value.
//! - [`error`]: the library's typed errors.
//! - [`token`]: [`SessionToken`], the redacted, zeroizing, constant-time secret.
//! - [`token_file`]: the private runtime directory and the token file on disk.
//! - [`paths`]: where the socket, token and lock live; environment overrides.
//! - [`handshake`]: the sans-IO pre-auth parser, the only code that
//!   unauthenticated bytes reach.
//! - [`message`]: the request, reply and event types of the protocol.
//! - [`codec`]: length-prefixed frames and bincode, limits checked before
//!   allocation.
//! - [`server`]: the accept loop, admission ([`server::admission`]), one
//!   task per connection ([`server::connection`]), the hub of topics and
//!   bounded outboxes ([`server::hub`]), graceful shutdown.
//! - [`daemon`]: start-up in a safe order (lock, stale socket, bind under
//!   umask 077, fresh token) and clean-up.
//! - [`client`]: the async client: connect, peer check, handshake,
//!   pipelined requests, subscriptions.
//! - `fuzzing` (hidden): the logic of the fuzz targets in `fuzz/`, run over
//!   the committed corpus by `tests/fuzz_corpus.rs`.
//!
//! The binaries are `keyholed` (`src/bin/keyholed.rs`, the daemon) and
//! `keyhole` (`src/bin/keyhole/`, the CLI).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod daemon;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod limits;
pub mod message;
pub mod paths;
pub mod server;
pub mod token;
pub mod token_file;

pub use codec::FrameCodec;
pub use error::{DaemonError, FrameError, TokenFileError};
pub use handshake::{HandshakeParser, Rejection};
pub use message::{CloseReason, ErrorCode, Request, RequestBody, ServerMessage, Status};
pub use paths::RuntimePaths;
pub use token::SessionToken;
