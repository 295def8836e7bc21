//! keyhole: authenticated local IPC over a Unix domain socket, as a
//! framework for any Rust daemon's own messages, and keyholed, a local
//! message bus built on it.
//!
//! A local socket without authentication lets any process that can reach it
//! drive the daemon. A keyhole daemon draws a fresh 32-byte session token at
//! every start and writes it to a 0600 file in a 0700 directory; a client's
//! first frame must carry that token, compared in constant time, before the
//! daemon serves anything. The wire format is specified in `proto-spec.md`.
//!
//! A daemon author implements [`Service`] for their own request, reply and
//! event types ([`Interface`]) and hands it to [`daemon::serve`] (or
//! [`Server`]); clients use [`Client`]. Everything else (peer check,
//! admission, handshake, limits, pipelining, bounded outboxes, push,
//! shutdown) is the framework's. keyholed's hub is one such service
//! ([`hub`]).
//!
//! # Layout
//! - [`limits`]: every limit and timeout, each with the reason for its value.
//! - [`error`]: the wire layers' and the token files' typed errors.
//! - [`token`]: [`SessionToken`], the redacted, zeroizing, constant-time secret.
//! - [`token_file`]: the private runtime directory and the token file on disk.
//! - [`paths`]: where the socket, token and lock live; environment overrides.
//! - [`handshake`]: the handshake frame's layout and the client's side of it.
//! - [`codec`]: length-prefixed frames, limits checked before allocation.
//! - [`encoding`]: messages as bincode bytes; the allocation-safe decoder
//!   ([`encoding::de`]) and [`Payload`], shared instead of copied when large.
//! - [`transport`]: protocol v2's frames: request headers, `Welcome`,
//!   `Reply`, `Event`, `Ack`, `Error`, `Closing`, and the error codes.
//! - [`service`]: the service API ([`Interface`], [`Service`]).
//! - [`server`]: the accept loop and shutdown; `server/admission.rs`, the
//!   connection cap and the pending slots; `server/preauth.rs`, everything an
//!   unauthenticated peer's bytes reach; `server/session.rs`, an
//!   authenticated connection; `server/outbox.rs` and
//!   `server/connection.rs`, bounded event queues and
//!   [`server::Connection`], the handle services push through.
//! - [`hub`]: keyholed's service: topics, fan-out, runs of publishes.
//! - [`daemon`]: start-up in a safe order (lock, stale socket, bind under
//!   umask 077, fresh token), signals, clean-up; [`daemon::serve`].
//! - [`activation`]: the socket a service manager passes (systemd socket
//!   activation).
//! - [`notify`]: readiness and stopping notifications to a service manager
//!   (`sd_notify`).
//! - [`client`]: the async client: `client/connect.rs` (socket, token, peer
//!   check, handshake), `client/mux.rs` (pipelining, bounded events),
//!   [`client::hub`] ([`HubClient`]).
//! - [`conformance`] (feature `cli`): the conformance kit of
//!   `keyhole-conformance`, a scripted hub that checks a client's bytes
//!   and what it reports (proto-spec.md Part IV).
//! - `loadgen` (feature `cli`): the load generator of `keyhole bench` and
//!   `cargo bench --bench compare`.
//! - `fuzzing` (feature `fuzzing`, hidden): the logic of the fuzz targets
//!   in `fuzz/`, run over the committed corpus by `tests/fuzz_corpus.rs`.
//!
//! The binaries (feature `cli`, on by default) are `keyholed`
//! (`src/bin/keyholed.rs`, the daemon) and `keyhole` (`src/bin/keyhole/`,
//! the CLI). A library user who wants none of their dependencies (clap,
//! anyhow, tracing-subscriber, serde_json, base64, clap_complete,
//! clap_mangen) turns default features off.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod activation;
pub mod client;
pub mod codec;
#[cfg(feature = "cli")]
pub mod conformance;
pub mod daemon;
pub mod encoding;
pub mod error;
pub mod fds;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod hub;
pub mod limits;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod loadgen;
pub mod memfd;
pub mod notify;
pub mod paths;
pub mod server;
pub mod service;
mod timer;
pub mod token;
pub mod token_file;
pub mod transport;

pub use client::{Client, ClientError, ConnectOptions, HubClient, RawClient};
pub use codec::FrameCodec;
pub use encoding::Payload;
pub use paths::RuntimePaths;
pub use server::{Server, ServerConfig, ServerHandle};
pub use service::{Interface, Service, ServiceError};
pub use token::SessionToken;
