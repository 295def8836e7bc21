//! [`Payload`]: opaque bytes inside a message, shared rather than copied
//! when they are large.
//!
//! On the wire a `Payload` is a byte array (a `u64` length, then the bytes),
//! exactly like `Vec<u8>` with `serde_bytes`. What differs is what keyhole
//! does with large ones (at least [`SHARE_MIN`] bytes): [`super::decode_shared`]
//! makes them a slice of the received frame, and [`super::encode_sharing`]
//! keeps them as a separate part of the encoding, so the daemon moves a large
//! publish from the publisher's read buffer to every subscriber's socket
//! without copying it. Both hand-offs go through thread-locals that are set
//! only for the duration of one synchronous decode or encode call.

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Sharing;

/// Payloads of at least this many bytes are shared, not copied. Smaller
/// ones are cheaper to copy than to reference-count, and copying them keeps
/// a small message from pinning a large buffer.
pub const SHARE_MIN: usize = 16 * 1024;

thread_local! {
    /// The frame being decoded by [`super::decode_shared`].
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    /// The state of [`super::encode_sharing`].
    pub(super) static SHARING: RefCell<Sharing> = const { RefCell::new(Sharing::Off) };
}

/// Runs `f` with `frame` as the source that large payloads are sliced from.
pub(super) fn with_source<T>(frame: &Bytes, f: impl FnOnce() -> T) -> T {
    let previous = SOURCE.with(|cell| cell.replace(Some(frame.clone())));
    let out = f();
    SOURCE.with(|cell| *cell.borrow_mut() = previous);
    out
}

/// Opaque bytes in a message. Cheap to clone (reference-counted).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Payload(Bytes);

impl Payload {
    /// An empty payload.
    pub const fn new() -> Self {
        Self(Bytes::new())
    }

    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The bytes, owned.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self(Bytes::from(bytes))
    }
}

impl From<&'static [u8]> for Payload {
    fn from(bytes: &'static [u8]) -> Self {
        Self(Bytes::from_static(bytes))
    }
}

impl From<&'static str> for Payload {
    fn from(text: &'static str) -> Self {
        Self(Bytes::from_static(text.as_bytes()))
    }
}

impl From<Payload> for Bytes {
    fn from(payload: Payload) -> Self {
        payload.0
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.len() < SHARE_MIN {
            return serializer.serialize_bytes(&self.0);
        }
        SHARING.with(|cell| {
            let mut state = cell.borrow_mut();
            if matches!(*state, Sharing::Armed) {
                *state = Sharing::Offered(self.0.clone());
            }
        });
        let out = serializer.serialize_bytes(&self.0);
        // Not taken (a serializer other than the sharing one): back to armed.
        SHARING.with(|cell| {
            let mut state = cell.borrow_mut();
            if matches!(*state, Sharing::Offered(_)) {
                *state = Sharing::Armed;
            }
        });
        out
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(PayloadVisitor)
    }
}

struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    type Value = Payload;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte array")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Payload, E> {
        if v.len() >= SHARE_MIN {
            let shared = SOURCE.with(|cell| {
                let source = cell.borrow();
                let frame = source.as_ref()?;
                let start = frame.as_ptr() as usize;
                let at = v.as_ptr() as usize;
                // Only a slice that lies inside the frame is sliced from it.
                (at >= start && at + v.len() <= start + frame.len()).then(|| frame.slice_ref(v))
            });
            if let Some(bytes) = shared {
                return Ok(Payload(bytes));
            }
        }
        Ok(Payload(Bytes::copy_from_slice(v)))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Payload, E> {
        Ok(Payload(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Payload, E> {
        Ok(Payload(Bytes::from(v)))
    }

    // Self-describing formats (the JSON of the golden vectors) give numbers.
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Payload(Bytes::from(out)))
    }
}
