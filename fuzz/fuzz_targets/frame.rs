#![no_main]
// Logic and invariants: keyhole::fuzzing::frame (src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole::fuzzing::frame(data));
