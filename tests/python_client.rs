//! Runs the Python client's tests (written from proto-spec.md alone) against the real daemon,
//! and its conformance driver against the conformance kit (proto-spec.md Part IV).
use std::process::Command;

#[test]
fn python_client_written_from_the_spec_passes_against_the_real_daemon() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/python/tests/test_client.py"
    );
    let output = match Command::new("python3")
        .arg(script)
        .env("KEYHOLED_BIN", env!("CARGO_BIN_EXE_keyholed"))
        .env("KEYHOLE_BIN", env!("CARGO_BIN_EXE_keyhole"))
        .env(
            "KEYHOLE_CONFORMANCE_BIN",
            env!("CARGO_BIN_EXE_keyhole-conformance"),
        )
        .output()
    {
        Ok(output) => output,
        Err(err) => panic!("python3 is required for this test and could not be run: {err}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client tests failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        stdout.contains(" passed, 0 failed") || stderr.contains(" passed, 0 failed"),
        "no summary line\n{stdout}\n{stderr}"
    );
}
