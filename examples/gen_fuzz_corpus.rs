//! Writes the committed fuzz seed corpus: `fuzz/corpus/<target>/<name>` for
//! every seed of `keyhole::fuzzing::seeds`.
//!
//! Run from anywhere: `cargo run --example gen_fuzz_corpus`. Existing seeds
//! are overwritten; files the generator does not make (inputs merged in from
//! fuzzing runs) are listed and left alone. `tests/fuzz_corpus.rs` fails when
//! a seed is missing or differs, so rerun this after changing the seeds.

use std::fs;
use std::io;
use std::path::Path;

use keyhole::fuzzing::seeds;

fn main() -> io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus");
    for (target, seeds) in [
        ("preauth", seeds::preauth()),
        ("frame", seeds::frame()),
        ("session", seeds::session()),
        ("subjects", seeds::subjects()),
    ] {
        if seeds.is_empty() {
            continue;
        }
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            fs::write(dir.join(name), bytes)?;
        }
        let mut others = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !seeds.iter().any(|(seed, _)| *seed == name) {
                others.push(name);
            }
        }
        others.sort();
        println!(
            "{target}: {} seeds written to {}",
            seeds.len(),
            dir.display()
        );
        if !others.is_empty() {
            println!("{target}: {} other files kept: {others:?}", others.len());
        }
    }
    Ok(())
}
