//! A length inside a message must not make the decoder allocate what the
//! frame does not carry: a 20-byte frame that announces a 16 MiB topic is
//! rejected without a 16 MiB allocation.
//!
//! This test binary installs a counting global allocator, which needs
//! `unsafe impl GlobalAlloc`; the library itself stays `forbid(unsafe_code)`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use keyhole::codec::{decode_request, decode_server_message};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only records the largest size requested.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout, forwarded to System.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout, forwarded to System.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded to System, which allocated ptr.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn largest_allocation_while(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    f();
    LARGEST.load(Ordering::Relaxed)
}

#[test]
fn announced_lengths_are_checked_before_allocating() {
    let huge = (16u64 << 20) - 100;
    // Subscribe{topic} announcing a 16 MiB topic, 4 bytes present.
    let mut subscribe = 1u64.to_le_bytes().to_vec();
    subscribe.extend_from_slice(&2u32.to_le_bytes());
    subscribe.extend_from_slice(&huge.to_le_bytes());
    subscribe.extend_from_slice(b"news");
    // Publish{topic "t", payload announcing 16 MiB}.
    let mut publish = 1u64.to_le_bytes().to_vec();
    publish.extend_from_slice(&4u32.to_le_bytes());
    publish.extend_from_slice(&1u64.to_le_bytes());
    publish.push(b't');
    publish.extend_from_slice(&huge.to_le_bytes());
    // Event{topic announcing 16 MiB} from a hostile daemon, client side.
    let mut event = 4u32.to_le_bytes().to_vec();
    event.extend_from_slice(&huge.to_le_bytes());

    for (name, largest) in [
        (
            "subscribe",
            largest_allocation_while(|| assert!(decode_request(&subscribe).is_err())),
        ),
        (
            "publish",
            largest_allocation_while(|| assert!(decode_request(&publish).is_err())),
        ),
        (
            "event",
            largest_allocation_while(|| assert!(decode_server_message(&event).is_err())),
        ),
    ] {
        assert!(
            largest < 64 * 1024,
            "{name}: decoding a short frame allocated {largest} bytes"
        );
    }
}
