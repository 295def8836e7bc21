//! Typed errors of the wire layers and the token files. Every variant says
//! what was expected and what arrived, and names the path or value that is
//! wrong; none is a bare string.
//!
//! One convention throughout the crate: an error that wraps another returns
//! it from [`std::error::Error::source`] and does **not** repeat it in its
//! own message, so that printing the chain (`{:#}` with anyhow, or
//! [`Report`]) shows every cause exactly once.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Errors of the frame layer: the length prefix.
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
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The socket failed.
    #[error("i/o error on the connection")]
    Io(#[source] io::Error),
}

impl From<io::Error> for FrameError {
    fn from(err: io::Error) -> Self {
        FrameError::Io(err)
    }
}

/// Why a payload is not the message it should be.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// A field runs past the end of the payload.
    #[error("payload ends early: {needed} more bytes needed, {left} left")]
    UnexpectedEnd {
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left.
        left: usize,
    },
    /// A string, byte array, sequence or map announces more than is left.
    #[error("a length of {len} runs past the end of the payload ({left} bytes left)")]
    LengthPastEnd {
        /// The announced length.
        len: u64,
        /// Bytes left.
        left: usize,
    },
    /// The message ended before the payload did.
    #[error("{extra} bytes left over after a {used}-byte message")]
    TrailingBytes {
        /// Bytes the message used.
        used: usize,
        /// Bytes left over.
        extra: usize,
    },
    /// A frame is shorter than its fixed header.
    #[error("{what} of {len} bytes is shorter than its {min}-byte header")]
    TooShort {
        /// What was being decoded.
        what: &'static str,
        /// Payload length.
        len: usize,
        /// The header's length.
        min: usize,
    },
    /// An enum tag this version does not define.
    #[error("unknown {what} tag {tag}")]
    UnknownTag {
        /// Which enum.
        what: &'static str,
        /// The tag that was sent.
        tag: u32,
    },
    /// A boolean byte other than 0 or 1.
    #[error("invalid boolean byte {got}")]
    InvalidBool {
        /// The byte.
        got: u8,
    },
    /// An option presence byte other than 0 or 1.
    #[error("invalid option presence byte {got}")]
    InvalidOption {
        /// The byte.
        got: u8,
    },
    /// A `char` that is not one UTF-8 scalar value.
    #[error("invalid char encoding")]
    InvalidChar,
    /// A string that is not UTF-8.
    #[error("string is not UTF-8 (valid up to byte {valid_up_to})")]
    InvalidUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// Nesting deeper than the decoder allows.
    #[error("value nested deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// The type asked for a self-describing format (`deserialize_any`).
    #[error("the type needs a self-describing format; the wire is not one")]
    NotSelfDescribing,
    /// The type's own `Deserialize` refused the value (an unknown variant
    /// index, say).
    #[error("{0}")]
    Invalid(String),
}

impl serde::de::Error for DecodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DecodeError::Invalid(msg.to_string())
    }
}

/// A value could not be encoded (a sequence without a known length, say;
/// none of keyhole's own types can fail).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("cannot encode the message: {0}")]
pub struct EncodeError(pub String);

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
    /// An ancestor of the runtime directory could be changed by another uid.
    #[error(
        "{path}: an ancestor of the runtime directory {dir} is owned by uid {owner} with mode {mode:04o}; another user could replace the directory (every ancestor must be owned by root or you, and not writable by group or others unless sticky)"
    )]
    AncestorInsecure {
        /// The ancestor.
        path: PathBuf,
        /// The runtime directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
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
    /// The token path is not a regular file (a directory, a FIFO, a device).
    #[error("{path}: not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The content is not exactly one token.
    #[error("{path}: does not hold exactly one token")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with the content.
        #[source]
        reason: TokenParseError,
    },
    /// Any other I/O failure, with the operation that failed.
    #[error("{path}: {op}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done (`create`, `write`, `fsync`, `rename`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Prints an error and its chain of causes, each once, joined by `": "`.
///
/// ```
/// use keyhole::error::{Report, TokenFileError};
/// let err = TokenFileError::Io {
///     path: "/run/x".into(),
///     op: "open",
///     source: std::io::Error::from(std::io::ErrorKind::NotFound),
/// };
/// assert_eq!(Report(&err).to_string(), "/run/x: open: entity not found");
/// ```
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}
