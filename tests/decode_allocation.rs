//! A length inside a message must not make the decoder allocate what the
//! frame does not carry, for keyhole's own messages and for any user type:
//! strings, byte arrays, sequences, maps, nested. A 24-byte frame that
//! announces a 16 MiB string used to allocate 16 MiB (bincode's own serde
//! decoder sizes `String`s and containers from the announced length).
//!
//! This test binary installs a counting global allocator, which needs
//! `unsafe impl GlobalAlloc`; the library itself stays `forbid(unsafe_code)`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use keyhole::encoding::{self, Payload};
use keyhole::hub::{HubEvent, HubRequest};
use serde::{Deserialize, Serialize};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);
/// One measurement at a time (the tests of this binary run in parallel).
static WINDOW: Mutex<()> = Mutex::new(());

thread_local! {
    /// Only the measuring thread's allocations count (the test harness's
    /// other threads allocate meanwhile).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn record(size: usize) {
    if COUNTING.with(Cell::get) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
        TOTAL.fetch_add(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same layout, forwarded to System.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same layout, forwarded to System.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded to System, which allocated ptr.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// (largest single allocation, total bytes allocated) while `f` runs.
fn allocations_while(f: impl FnOnce()) -> (usize, usize) {
    let _one = WINDOW.lock().unwrap_or_else(|p| p.into_inner());
    LARGEST.store(0, Ordering::Relaxed);
    TOTAL.store(0, Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    (
        LARGEST.load(Ordering::Relaxed),
        TOTAL.load(Ordering::Relaxed),
    )
}

const HUGE: u64 = (16 << 20) - 100;

/// A daemon author's own message type: every kind of field that allocates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserMessage {
    name: String,
    blob: Vec<u8>,
    items: Vec<Item>,
    index: HashMap<String, u64>,
    sorted: BTreeMap<u32, Vec<String>>,
    nested: Option<Box<UserMessage>>,
    payload: Payload,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    label: String,
    weight: f64,
    tags: Vec<String>,
}

fn le(n: u64) -> [u8; 8] {
    n.to_le_bytes()
}

/// Frames that announce 16 MiB somewhere and carry a few bytes.
fn hostile_user_frames() -> Vec<(&'static str, Vec<u8>)> {
    let empty_tail = |mut v: Vec<u8>| {
        v.extend(le(0)); // items
        v.extend(le(0)); // index
        v.extend(le(0)); // sorted
        v.push(0); // nested: None
        v.extend(le(0)); // payload
        v
    };
    let mut name = le(HUGE).to_vec();
    name.extend(b"abcd");
    let mut blob = le(1).to_vec();
    blob.push(b'x');
    blob.extend(le(HUGE));
    blob.extend([1, 2, 3, 4]);
    let mut items = le(0).to_vec();
    items.extend(le(0));
    items.extend(le(HUGE));
    items.extend(le(0));
    let mut index = [le(0), le(0), le(0)].concat();
    index.extend(le(HUGE));
    index.extend(le(1));
    index.push(b'k');
    let mut sorted = [le(0), le(0), le(0), le(0)].concat();
    sorted.extend(le(HUGE));
    let mut tags = [le(0), le(0), le(1), le(0)].concat();
    tags.extend(0f64.to_le_bytes());
    tags.extend(le(HUGE));
    let mut deep = Vec::new();
    for _ in 0..64 {
        deep.extend([le(0), le(0), le(0), le(0), le(0)].concat());
        deep.push(1); // nested: Some, and again, ...
    }
    deep.extend(le(HUGE));
    let mut payload = [le(0), le(0), le(0), le(0), le(0)].concat();
    payload.push(0);
    payload.extend(le(HUGE));
    payload.extend(b"pay");
    vec![
        ("a 16 MiB name", name),
        ("a 16 MiB blob", blob),
        ("16 Mi items", items),
        ("16 Mi index entries", index),
        ("16 Mi sorted entries", sorted),
        ("16 Mi tags in an item", tags),
        ("a 16 MiB name 64 levels deep", deep),
        ("a 16 MiB payload", payload),
    ]
    .into_iter()
    .map(|(n, v)| (n, if v.len() < 8 { empty_tail(v) } else { v }))
    .collect()
}

#[test]
fn a_user_type_never_allocates_for_lengths_the_frame_does_not_hold() {
    for (name, frame) in hostile_user_frames() {
        let (largest, total) = allocations_while(|| {
            assert!(
                encoding::decode::<UserMessage>(&frame).is_err(),
                "{name}: decoded"
            );
        });
        assert!(
            total < 16 * 1024,
            "{name}: decoding a {}-byte frame allocated {total} bytes (largest {largest})",
            frame.len()
        );
    }
}

#[test]
fn an_honest_user_message_costs_memory_in_proportion_to_its_bytes() {
    let item = |i: u32| Item {
        label: format!("item {i}"),
        weight: f64::from(i) / 3.0,
        tags: vec!["a".into(), "bc".into()],
    };
    let inner = UserMessage {
        name: "inner".into(),
        blob: vec![7; 300],
        items: (0..20).map(item).collect(),
        index: (0..20).map(|i| (format!("k{i}"), i)).collect(),
        sorted: (0..10).map(|i| (i, vec![format!("v{i}")])).collect(),
        nested: None,
        payload: Payload::from(vec![1u8; 1000]),
    };
    let message = UserMessage {
        nested: Some(Box::new(inner.clone())),
        ..inner
    };
    let frame = encoding::encode(&message).unwrap();
    let mut decoded = None;
    let (_, total) = allocations_while(|| decoded = Some(encoding::decode::<UserMessage>(&frame)));
    assert_eq!(decoded.unwrap().unwrap(), message);
    // Strings and vectors are sized from the bytes present; a map's table
    // and the records' in-memory layout cost a few times their encoding.
    assert!(
        total < 8 * frame.len(),
        "a {}-byte message took {total} bytes to decode",
        frame.len()
    );
}

#[test]
fn the_hub_messages_never_allocate_for_lengths_the_frame_does_not_hold() {
    // Subscribe{topic} announcing a 16 MiB topic, 4 bytes present.
    let mut subscribe = 1u32.to_le_bytes().to_vec();
    subscribe.extend(le(HUGE));
    subscribe.extend(b"news");
    // Publish{topic "t", payload announcing 16 MiB}.
    let mut publish = 3u32.to_le_bytes().to_vec();
    publish.extend(le(1));
    publish.push(b't');
    publish.extend(le(HUGE));
    // An event from a hostile daemon, client side.
    let mut event = 0u32.to_le_bytes().to_vec();
    event.extend(le(HUGE));
    for (name, largest) in [
        (
            "subscribe",
            allocations_while(|| assert!(encoding::decode::<HubRequest>(&subscribe).is_err())).1,
        ),
        (
            "publish",
            allocations_while(|| assert!(encoding::decode::<HubRequest>(&publish).is_err())).1,
        ),
        (
            "event",
            allocations_while(|| assert!(encoding::decode::<HubEvent>(&event).is_err())).1,
        ),
    ] {
        assert!(
            largest < 4 * 1024,
            "{name}: decoding a short frame allocated {largest} bytes"
        );
    }
}
