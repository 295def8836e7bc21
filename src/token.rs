//! [`SessionToken`]: the 32-byte secret a client must present, drawn fresh from
//! the OS RNG at every daemon start.
//!
//! The type never shows its bytes by accident: `Debug` and `Display` print
//! `<redacted>`, it is zeroized on drop, and equality is only the
//! constant-time comparison of [`subtle`]. Its text form (the token file,
//! `KEYHOLE_TOKEN`) is 64 lowercase hex characters.
//!
//! The bytes live in one heap allocation for the token's whole life: moving
//! a `SessionToken` moves a pointer, so no stale copy of the secret is left
//! in a stack frame it passed through. Share one token with `Arc` rather
//! than cloning it.

use std::fmt;

use rand::TryRngCore;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{TokenFileError, TokenParseError};
use crate::limits::TOKEN_LEN;

/// The session secret. Cloning copies the secret into a new allocation;
/// every copy zeroizes itself on drop.
#[derive(Clone)]
pub struct SessionToken(Box<[u8; TOKEN_LEN]>);

impl Drop for SessionToken {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for SessionToken {}

impl SessionToken {
    /// Draws 32 fresh bytes from the OS random number generator, straight
    /// into the token's own allocation.
    pub fn generate() -> Result<Self, TokenFileError> {
        let mut token = Self(Box::new([0u8; TOKEN_LEN]));
        rand::rngs::OsRng
            .try_fill_bytes(&mut token.0[..])
            .map_err(|err| TokenFileError::Rng(err.to_string()))?;
        Ok(token)
    }

    /// Copies raw bytes into a token; the caller should zeroize its own copy.
    pub fn from_bytes(bytes: [u8; TOKEN_LEN]) -> Self {
        let mut token = Self(Box::new([0u8; TOKEN_LEN]));
        token.0.copy_from_slice(&bytes);
        token
    }

    /// The raw bytes, as sent in the handshake.
    pub fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    /// The text form: 64 lowercase hex characters, no newline. The returned
    /// string zeroizes itself on drop.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut buf = Zeroizing::new([0u8; TOKEN_LEN * 2]);
        // Cannot fail: the output buffer is exactly twice the input.
        let _ = hex::encode_to_slice(&self.0[..], &mut buf[..]);
        let mut out = Zeroizing::new(String::with_capacity(TOKEN_LEN * 2));
        for &b in buf.iter() {
            out.push(b as char);
        }
        out
    }

    /// Parses the text form: exactly 64 lowercase hex characters, optionally
    /// followed by one `\n`. Errors never quote the input.
    pub fn from_hex(text: &str) -> Result<Self, TokenParseError> {
        let text = text.strip_suffix('\n').unwrap_or(text);
        let raw = text.as_bytes();
        if raw.len() != TOKEN_LEN * 2 {
            return Err(TokenParseError::WrongLength {
                len: text.chars().count(),
            });
        }
        if let Some(position) = raw
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(TokenParseError::NotHex { position });
        }
        let mut token = Self(Box::new([0u8; TOKEN_LEN]));
        hex::decode_to_slice(raw, &mut token.0[..])
            .map_err(|_| TokenParseError::NotHex { position: 0 })?;
        Ok(token)
    }

    /// Constant-time comparison with raw bytes of any length (a length
    /// mismatch is simply unequal: lengths are not secret).
    ///
    /// ```
    /// use keyhole::token::SessionToken;
    /// let token = SessionToken::from_bytes([7; 32]);
    /// assert!(token.matches(&[7; 32]));
    /// assert!(!token.matches(&[7; 31]));
    /// ```
    pub fn matches(&self, candidate: &[u8]) -> bool {
        if candidate.len() != TOKEN_LEN {
            return false;
        }
        // Eight bytes at a time (`subtle`'s `u64` comparison): the slice
        // comparison goes byte by byte, each through an optimisation
        // barrier, ~300 instructions of every connection's handshake.
        let mut equal = subtle::Choice::from(1);
        for (ours, theirs) in self.0.chunks_exact(8).zip(candidate.chunks_exact(8)) {
            equal &= word(ours).ct_eq(&word(theirs));
        }
        bool::from(equal)
    }
}

impl ConstantTimeEq for SessionToken {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        subtle::Choice::from(u8::from(self.matches(&other.0[..])))
    }
}

/// Eight bytes of a token as one word (for [`SessionToken::matches`]; it
/// lives in a register, not in memory that would need zeroizing).
#[inline(always)]
fn word(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    u64::from_le_bytes(word)
}

impl PartialEq for SessionToken {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.ct_eq(other))
    }
}

impl Eq for SessionToken {}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

impl fmt::Display for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_bytes() {
        let token = SessionToken::from_bytes([0xab; TOKEN_LEN]);
        assert_eq!(format!("{token}"), "<redacted>");
        assert_eq!(format!("{token:?}"), "SessionToken(<redacted>)");
        assert!(!format!("{token:?}{token}").contains("ab"));
    }

    #[test]
    fn generated_tokens_differ() {
        let a = SessionToken::generate().unwrap();
        let b = SessionToken::generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.as_bytes(), &[0u8; TOKEN_LEN]);
    }

    #[test]
    fn hex_round_trip_and_strictness() {
        let token = SessionToken::generate().unwrap();
        let text = token.to_hex();
        assert_eq!(text.len(), 64);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(SessionToken::from_hex(&text).unwrap(), token);
        assert_eq!(
            SessionToken::from_hex(&format!("{}\n", &*text)).unwrap(),
            token
        );
        assert_eq!(
            SessionToken::from_hex(&text.to_uppercase()),
            Err(TokenParseError::NotHex {
                position: text.find(|c: char| c.is_ascii_alphabetic()).unwrap()
            })
        );
        assert_eq!(
            SessionToken::from_hex(&format!("{}\n\n", &*text)),
            Err(TokenParseError::WrongLength { len: 65 })
        );
        assert_eq!(
            SessionToken::from_hex(""),
            Err(TokenParseError::WrongLength { len: 0 })
        );
        assert_eq!(
            SessionToken::from_hex(&text[..63]),
            Err(TokenParseError::WrongLength { len: 63 })
        );
    }

    #[test]
    fn matches_is_exact() {
        let token = SessionToken::from_bytes([7; TOKEN_LEN]);
        assert!(token.matches(&[7; TOKEN_LEN]));
        assert!(!token.matches(&[7; TOKEN_LEN - 1]));
        let mut other = [7; TOKEN_LEN];
        other[31] ^= 1;
        assert!(!token.matches(&other));
        // Every bit of every byte counts (the comparison goes by words).
        let bytes: [u8; TOKEN_LEN] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let token = SessionToken::from_bytes(bytes);
        assert!(token.matches(&bytes));
        assert_eq!(token, SessionToken::from_bytes(bytes));
        for at in 0..TOKEN_LEN {
            for bit in 0..8 {
                let mut other = bytes;
                other[at] ^= 1 << bit;
                assert!(!token.matches(&other), "byte {at} bit {bit}");
                assert_ne!(
                    token,
                    SessionToken::from_bytes(other),
                    "byte {at} bit {bit}"
                );
            }
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(!token.matches(&longer));
    }
}
