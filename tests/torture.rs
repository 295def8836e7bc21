//! The torture harness against a real `keyholed` (see
//! `tests/torture_harness/mod.rs`). A custom test binary (`harness = false`):
//!
//! - `cargo test` runs the quick mode (well under 60 s) and fails on any
//!   lost, corrupted or duplicated valid operation, any hostile connection
//!   answered otherwise than specified or closed late, leaked descriptors,
//!   or RSS growth over 16 MiB;
//! - `cargo test --release --test torture -- --full` runs the full mode
//!   (60 s under attack) and prints the table of `README.md`'s
//!   "Reliability" section, enforcing the latency target too.
//!
//! The same binary, run with `--attacker CONFIG`, is an attacker process.

mod common;
mod torture_harness;

fn main() -> std::process::ExitCode {
    torture_harness::main()
}
