//! Runs the TypeScript client's tests (clients/typescript, written from proto-spec.md alone)
//! against the real daemon and the conformance kit (keyhole-conformance, proto-spec.md
//! Part IV, driven by clients/typescript/src/conformance.ts): `npm ci` when node_modules
//! is missing, then `npm test`.
use std::path::Path;
use std::process::Command;

fn run(dir: &Path, program: &str, args: &[&str]) -> std::process::Output {
    match Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("KEYHOLED_BIN", env!("CARGO_BIN_EXE_keyholed"))
        .env("KEYHOLE_BIN", env!("CARGO_BIN_EXE_keyhole"))
        .env(
            "KEYHOLE_CONFORMANCE_BIN",
            env!("CARGO_BIN_EXE_keyhole-conformance"),
        )
        .output()
    {
        Ok(output) => output,
        Err(err) => panic!(
            "{program} is required for this test (Node.js 20 or later with npm) and could not be run: {err}"
        ),
    }
}

fn check(what: &str, output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    stdout
}

#[test]
fn typescript_client_written_from_the_spec_passes_against_the_real_daemon() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/typescript"));
    check("node --version", &run(dir, "node", &["--version"]));
    if !dir.join("node_modules/.bin/tsc").exists() {
        check(
            "npm ci",
            &run(dir, "npm", &["ci", "--no-audit", "--no-fund"]),
        );
    }
    let stdout = check("npm test", &run(dir, "npm", &["test"]));
    assert!(stdout.contains("\n# fail 0"), "no summary line\n{stdout}");
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed >= 100, "only {passed} tests passed\n{stdout}");
}
