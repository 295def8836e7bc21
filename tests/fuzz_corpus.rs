//! Runs the fuzz targets' logic (`keyhole::fuzzing`) over the committed seed
//! corpus (`fuzz/corpus/<target>/`) and the crash regressions
//! (`fuzz/regressions/<target>/`, optional), so the targets are exercised by
//! every `cargo test` and cannot rot, and a crash once fixed stays fixed.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use keyhole::fuzzing;

/// A fuzz target's logic: libFuzzer's input in, panics on a broken invariant.
type Target = fn(&[u8]);

/// Every fuzz target: its name (the directory names under fuzz/) and its
/// function.
const TARGETS: &[(&str, Target)] = &[
    ("preauth", fuzzing::preauth),
    ("frame", fuzzing::frame),
    ("session", fuzzing::session),
    ("subjects", fuzzing::subjects),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The regular files in `dir`, sorted; none if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` over every file, then fails listing every input that panicked.
fn run_all(name: &str, target: Target, files: &[PathBuf]) {
    let mut failed = Vec::new();
    for file in files {
        let data = fs::read(file).expect("readable input");
        if panic::catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} inputs fail (reproduce with `cargo fuzz run {name} <file>`):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn every_corpus_input_passes() {
    for &(name, target) in TARGETS {
        let files = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(!files.is_empty(), "fuzz/corpus/{name}/ is empty or missing");
        run_all(name, target, &files);
    }
}

#[test]
fn every_regression_input_passes() {
    for &(name, target) in TARGETS {
        run_all(
            name,
            target,
            &inputs(&fuzz_dir().join("regressions").join(name)),
        );
    }
}

#[test]
fn committed_seeds_match_the_generator() {
    for (name, seeds) in [
        ("preauth", fuzzing::seeds::preauth()),
        ("frame", fuzzing::seeds::frame()),
        ("session", fuzzing::seeds::session()),
        ("subjects", fuzzing::seeds::subjects()),
    ] {
        assert!(!seeds.is_empty(), "no seeds for {name}");
        let dir = fuzz_dir().join("corpus").join(name);
        for (file, bytes) in seeds {
            let committed = fs::read(dir.join(&file)).unwrap_or_default();
            assert!(
                committed == bytes,
                "fuzz/corpus/{name}/{file} is missing or stale: run `cargo run --example gen_fuzz_corpus`"
            );
        }
    }
}

#[test]
fn the_empty_input_and_every_short_input_pass() {
    for &(_, target) in TARGETS {
        target(&[]);
        for len in 1..=4 {
            for byte in [0x00, 0x01, 0x28, 0x7f, 0x80, 0xff] {
                target(&vec![byte; len]);
            }
        }
    }
}
