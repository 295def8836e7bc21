#![no_main]
// Logic and invariants: keyhole::fuzzing::session (src/fuzzing/session.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole::fuzzing::session(data));
