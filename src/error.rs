//! Typed errors of the library. Every variant says what was expected and what
//! arrived, and names the path or value that is wrong; none is a bare string.

use std::io;
use std::path::PathBuf;

use crate::message::ErrorCode;

/// Errors of the frame layer: the length prefix and the bincode payload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A length prefix (received, or of a frame about to be sent) is over the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// Payload length the prefix announced (or the encoder produced).
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid bincode encoding of the expected message.
    #[error("undecodable message: {0}")]
    Malformed(#[from] MalformedMessage),
    /// bincode could not encode a message (not expected for keyhole's types).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Why a frame's payload is not a message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MalformedMessage {
    /// bincode rejected the bytes (bad tag, truncated field, invalid UTF-8, ...).
    #[error("{0}")]
    Decode(String),
    /// A message decoded but bytes were left over after it.
    #[error("{extra} bytes left over after a {used}-byte message")]
    TrailingBytes {
        /// Bytes the message used.
        used: usize,
        /// Bytes left over.
        extra: usize,
    },
    /// A request frame is too short to carry a request id and a tag.
    #[error("request frame of {len} bytes is shorter than the 12-byte id and tag")]
    TooShort {
        /// Payload length.
        len: usize,
    },
}

/// A request decoded only as far as its id: the tag names no request this
/// daemon knows. The daemon answers `Error UnknownRequest` with the id and
/// keeps the connection open.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("unknown request tag {tag} (request id {id})")]
pub struct UnknownRequest {
    /// The request id the client chose.
    pub id: u64,
    /// The tag that was sent.
    pub tag: u32,
}

/// Errors decoding a request frame on the daemon side.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// See [`UnknownRequest`].
    #[error(transparent)]
    Unknown(#[from] UnknownRequest),
    /// The frame is not a request at all; the connection is closed.
    #[error(transparent)]
    Malformed(#[from] MalformedMessage),
}

/// Errors parsing the text form of a token (`KEYHOLE_TOKEN`, the token file).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenParseError {
    /// Not 64 characters (after at most one trailing newline).
    #[error("expected 64 lowercase hex characters, found {len} characters")]
    WrongLength {
        /// Characters found.
        len: usize,
    },
    /// A character outside `0-9a-f`. The character itself is not reported:
    /// it is part of a secret.
    #[error("character {position} is not a lowercase hex digit")]
    NotHex {
        /// 0-based position of the first bad character.
        position: usize,
    },
}

/// Errors of the runtime directory and the token file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileError {
    /// The OS random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Rng(String),
    /// The runtime directory is not owned by this user.
    #[error("{path}: directory is owned by uid {owner}, not by this user (uid {expected})")]
    DirWrongOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        expected: u32,
    },
    /// The runtime directory grants group or other permissions.
    #[error(
        "{path}: directory mode is {mode:04o}; it must grant nothing to group or others (chmod 700)"
    )]
    DirInsecureMode {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The runtime directory path is not a directory (or is a symlink).
    #[error("{path}: not a directory (symlinks are refused)")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The token path is a symbolic link; it is left untouched.
    #[error("{path}: is a symbolic link; refusing to write or read a token through it")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// No token file at the path.
    #[error("{path}: no token file")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The token file grants group or other permissions.
    #[error("{path}: token file mode is {mode:04o}; it must be readable by its owner only (0600)")]
    FileInsecureMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file belongs to another user.
    #[error("{path}: token file is owned by uid {owner}, not by this user (uid {expected})")]
    FileWrongOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        expected: u32,
    },
    /// The token file is not a regular file.
    #[error("{path}: not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The content is not exactly one token.
    #[error("{path}: does not hold exactly one token: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with the content.
        reason: TokenParseError,
    },
    /// Any other I/O failure, with the operation that failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done (`create`, `write`, `fsync`, `rename`, ...).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// An `Error` frame received from the daemon, as a Rust error.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("daemon error {code:?}: {message}")]
pub struct DaemonError {
    /// The request it answers, if any.
    pub id: Option<u64>,
    /// The machine-readable code.
    pub code: ErrorCode,
    /// The daemon's human-readable text.
    pub message: String,
}
