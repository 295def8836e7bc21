//! The handshake frame's layout (section 4 of proto-spec.md) and the
//! client's side of it: the 44 bytes a client sends first.
//!
//! ```text
//! offset 0   4 bytes  length prefix: 40 (u32 LE)
//! offset 4   4 bytes  magic "KYHL"
//! offset 8   4 bytes  protocol version (u32 LE), 2
//! offset 12 32 bytes  the raw session token
//! ```
//!
//! The daemon's side, the parser that unauthenticated bytes reach, is in
//! `server/preauth.rs`, with the rest of the pre-authentication path.

use zeroize::Zeroize;

use crate::limits::{HANDSHAKE_FRAME_LEN, HANDSHAKE_PAYLOAD_LEN, LENGTH_PREFIX_LEN, TOKEN_LEN};
use crate::token::SessionToken;
use crate::transport::PROTOCOL_VERSION;

/// The 4 magic bytes after the length prefix: ASCII `KYHL`.
pub const MAGIC: [u8; 4] = *b"KYHL";

/// Protocol versions this build accepts in a handshake.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// Offset of the magic in the frame.
pub const MAGIC_AT: usize = LENGTH_PREFIX_LEN;
/// Offset of the protocol version in the frame.
pub const VERSION_AT: usize = MAGIC_AT + 4;
/// Offset of the token in the frame.
pub const TOKEN_AT: usize = VERSION_AT + 4;

const _: () = assert!(TOKEN_AT + TOKEN_LEN == HANDSHAKE_FRAME_LEN);

/// A client's handshake frame. It holds the token, so it lives in one heap
/// allocation (moving it moves a pointer) and is zeroized on drop: write it
/// and let it go.
pub struct HandshakeFrame(Box<[u8; HANDSHAKE_FRAME_LEN]>);

impl HandshakeFrame {
    /// The handshake for `token` in the current protocol version.
    pub fn new(token: &SessionToken) -> Self {
        Self::with_version(PROTOCOL_VERSION, token)
    }

    /// The handshake with an explicit version (tests of version refusal).
    pub fn with_version(version: u32, token: &SessionToken) -> Self {
        let mut frame = Box::new([0u8; HANDSHAKE_FRAME_LEN]);
        frame[..LENGTH_PREFIX_LEN].copy_from_slice(&(HANDSHAKE_PAYLOAD_LEN as u32).to_le_bytes());
        frame[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(&MAGIC);
        frame[VERSION_AT..VERSION_AT + 4].copy_from_slice(&version.to_le_bytes());
        frame[TOKEN_AT..].copy_from_slice(token.as_bytes());
        Self(frame)
    }

    /// The 44 bytes.
    pub fn as_bytes(&self) -> &[u8; HANDSHAKE_FRAME_LEN] {
        &self.0
    }
}

impl std::ops::Deref for HandshakeFrame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0[..]
    }
}

impl Drop for HandshakeFrame {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for HandshakeFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandshakeFrame(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let token = SessionToken::from_bytes(std::array::from_fn(|i| i as u8));
        let frame = HandshakeFrame::new(&token);
        assert_eq!(&frame[..4], &[40, 0, 0, 0]);
        assert_eq!(&frame[4..8], b"KYHL");
        assert_eq!(&frame[8..12], &[2, 0, 0, 0]);
        assert_eq!(&frame[12..], token.as_bytes());
        assert_eq!(format!("{frame:?}"), "HandshakeFrame(<redacted>)");
    }
}
