//! The torture harness against a real `keyholed` (see
//! `tests/torture_harness/mod.rs`). A custom test binary (`harness = false`):
//!
//! - `cargo test` runs the quick mode (under 40 s) and fails on any lost,
//!   corrupted or duplicated valid operation (request/reply between
//!   clients included: a reply lost, duplicated, crossed to another
//!   requester or forged by a third party), any hostile connection
//!   answered otherwise than specified or closed late, leaked descriptors,
//!   RSS growth over 16 MiB, a flood that did not fill the pending slots, a
//!   failed `keyhole ping` during the connect storm, or a daemon holding
//!   more descriptors than its connection cap + 32;
//! - `cargo test --release --test torture -- --full` runs the full mode
//!   (60 s under attack, then the many-process flood, the fd-passing flood
//!   and the connect storm; under 4 minutes) and prints the tables of
//!   `README.md`'s "Reliability" section, enforcing the latency-like
//!   targets too (latency ratio, real clients getting in through a flood,
//!   the daemon's CPU during a flood).
//!
//! The same binary is also every other process of the run: `--attacker
//! CONFIG` an attacker process, `--real-client CONFIG` a real client of the
//! floods, `--fd-child SOCKET` a child of the fd-passing flood.

mod common;
mod torture_harness;

fn main() -> std::process::ExitCode {
    torture_harness::main()
}
