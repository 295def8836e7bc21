#![no_main]
// Logic and invariants: keyhole::fuzzing::subjects (src/fuzzing/subjects.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole::fuzzing::subjects(data));
