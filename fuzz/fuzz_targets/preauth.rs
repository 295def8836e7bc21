#![no_main]
// Logic and invariants: keyhole::fuzzing::preauth (src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole::fuzzing::preauth(data));
