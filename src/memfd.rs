//! Sealed memfds: how a large payload is published without its bytes
//! crossing the socket (section 19 of proto-spec.md).
//!
//! A publisher writes the payload into a `memfd_create` file and seals it
//! against writing, shrinking and growing before sending it; the daemon
//! refuses a descriptor without those seals ([`check_sealed`]), so the bytes
//! a subscriber maps or reads are the bytes that were published.

use std::os::fd::{AsFd, OwnedFd};

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};

/// The seals a published memfd must carry.
pub const REQUIRED_SEALS: SealFlags = SealFlags::WRITE
    .union(SealFlags::SHRINK)
    .union(SealFlags::GROW);

/// Why a descriptor is not a sealed memfd the hub takes.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    /// `F_GET_SEALS` failed: not a memfd (or one created without
    /// `MFD_ALLOW_SEALING`).
    #[error("the descriptor is not a sealable memfd: {0}")]
    NotMemfd(#[source] std::io::Error),
    /// Some required seal is missing.
    #[error("the memfd is not sealed against writing, shrinking and growing (it has {have:?})")]
    NotSealed {
        /// The seals it has.
        have: SealFlags,
    },
    /// Larger than may be published.
    #[error("the memfd holds {len} bytes, over the limit of {max}")]
    TooLarge {
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> MemfdError {
    move |errno| MemfdError::Io {
        what,
        source: errno.into(),
    }
}

/// Creates a memfd holding `bytes`, sealed against writing, shrinking and
/// growing (and against further seals), close-on-exec.
pub fn create_sealed(name: &str, bytes: &[u8]) -> Result<OwnedFd, MemfdError> {
    create_sealed_from(name, &mut &bytes[..])
}

/// Creates a sealed memfd holding everything `source` yields (a file, say),
/// copied kernel-side where the platform can (`copy_file_range`/`sendfile`,
/// through `std::io::copy`).
pub fn create_sealed_from(
    name: &str,
    source: &mut impl std::io::Read,
) -> Result<OwnedFd, MemfdError> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(io("memfd_create"))?;
    let mut file = std::fs::File::from(fd);
    std::io::copy(source, &mut file).map_err(|source| MemfdError::Io {
        what: "copying into the memfd",
        source,
    })?;
    let fd = OwnedFd::from(file);
    rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS | SealFlags::SEAL)
        .map_err(io("sealing the memfd"))?;
    Ok(fd)
}

/// The size of a sealed memfd, or why it is refused.
pub fn check_sealed(fd: impl AsFd, max: u64) -> Result<u64, MemfdError> {
    let fd = fd.as_fd();
    let have = rustix::fs::fcntl_get_seals(fd).map_err(|e| MemfdError::NotMemfd(e.into()))?;
    if !have.contains(REQUIRED_SEALS) {
        return Err(MemfdError::NotSealed { have });
    }
    let len = rustix::fs::fstat(fd)
        .map_err(io("fstat of the memfd"))?
        .st_size as u64;
    if len > max {
        return Err(MemfdError::TooLarge { len, max });
    }
    Ok(len)
}

/// Reads the first `len` bytes of a (sealed) memfd.
pub fn read_all(fd: impl AsFd, len: usize) -> Result<Bytes, MemfdError> {
    let fd = fd.as_fd();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let offset = out.len() as u64;
        rustix::io::pread(fd, rustix::buffer::spare_capacity(&mut out), offset)
            .map_err(io("reading the memfd"))?;
        if out.len() as u64 == offset {
            return Err(MemfdError::Io {
                what: "reading the memfd",
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("it ended after {offset} of {len} bytes"),
                ),
            });
        }
    }
    Ok(Bytes::from(out))
}

/// A payload published by memfd, as a subscriber that accepts descriptors
/// receives it: the sealed memfd and the payload's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemfdPayload {
    fd: crate::fds::Descriptors,
    len: u64,
}

impl MemfdPayload {
    /// `fds` holds the memfd (one descriptor).
    pub fn new(fd: crate::fds::Descriptors, len: u64) -> Self {
        Self { fd, len }
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd (map it, read it, pass it on).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fd.first()
    }

    /// Reads the payload's bytes, after checking that the memfd is still
    /// sealed (it cannot change after the check).
    pub fn read(&self) -> Result<Bytes, MemfdError> {
        let Some(fd) = self.fd.first() else {
            return Err(MemfdError::Io {
                what: "reading the memfd",
                source: std::io::Error::other("no descriptor"),
            });
        };
        let size = check_sealed(fd, u64::MAX)?;
        if size < self.len {
            return Err(MemfdError::TooLarge {
                len: self.len,
                max: size,
            });
        }
        let len = usize::try_from(self.len).map_err(|_| MemfdError::TooLarge {
            len: self.len,
            max: usize::MAX as u64,
        })?;
        read_all(fd, len)
    }
}
