//! `keyhole-conformance`: the conformance kit for keyhole clients
//! (`keyhole::conformance`). Takes a runtime directory as keyholed does,
//! waits for one driver, plays the run, prints the report and exits 0 if
//! every step passed.
//!
//! A binary of its own rather than `keyholed --conformance`: it shares
//! none of keyholed's options (socket group, allowed uids, socket
//! activation, limits), serves a single run and exits with its verdict, and
//! keeps the script out of the daemon people run.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keyhole::conformance::{self, Kit, KitOptions};
use keyhole::paths::RuntimePaths;

/// The keyhole conformance kit: a scripted hub daemon that a client's
/// driver program connects to (proto-spec.md Part IV).
///
/// Start it, then run the driver with the same runtime directory
/// (KEYHOLE_DIR=DIR). The kit prints the report on stdout when the run
/// ends. Exit codes: 0 every step passed; 1 a step failed (or no driver
/// came); 2 bad usage; 3 the kit could not start.
#[derive(Debug, Parser)]
#[command(name = "keyhole-conformance", version)]
struct Args {
    /// Runtime directory [default: $KEYHOLE_DIR, else $XDG_RUNTIME_DIR/keyhole, else ~/.keyhole]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seconds each step waits for the driver's report
    #[arg(long, value_name = "SECS", default_value_t = conformance::DEFAULT_STEP_TIMEOUT.as_secs())]
    step_timeout: u64,
    /// Seconds the kit waits for a driver to connect
    #[arg(long, value_name = "SECS", default_value_t = conformance::DEFAULT_CONNECT_TIMEOUT.as_secs())]
    connect_timeout: u64,
    /// Do not run this step (repeatable); the report lists it as skipped
    #[arg(long, value_name = "STEP")]
    skip: Vec<String>,
    /// Run only this step (repeatable; `hello` always runs)
    #[arg(long, value_name = "STEP")]
    only: Vec<String>,
    /// Frame limit of the main connection (16384 to 16777216: below 16 KiB
    /// the instructions and reports of the frame-limit steps, which carry up
    /// to 4 KiB of payload as hex, would not fit in a frame)
    #[arg(long, value_name = "BYTES", default_value_t = keyhole::limits::MAX_FRAME_LEN,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(MIN_KIT_FRAME_LEN..=keyhole::limits::MAX_FRAME_LEN as u64))]
    max_frame_len: usize,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
    /// List the steps and exit
    #[arg(long)]
    list: bool,
}

/// The smallest frame limit every step can pass at (found by the Python
/// driver: at 1024 the frame-limit steps' reports did not fit).
const MIN_KIT_FRAME_LEN: u64 = 16 * 1024;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        let mut out = std::io::stdout().lock();
        for (name, about) in conformance::steps() {
            if writeln!(out, "{name:32} {about}").is_err() {
                break;
            }
        }
        return ExitCode::SUCCESS;
    }
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "keyhole-conformance: {err:#}");
            ExitCode::from(3)
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => RuntimePaths::default_dir().context(
            "cannot locate the runtime directory: set KEYHOLE_DIR, XDG_RUNTIME_DIR or HOME, or pass --dir",
        )?,
    };
    let mut options = KitOptions::new(dir)
        .step_timeout(Duration::from_secs(args.step_timeout))
        .connect_timeout(Duration::from_secs(args.connect_timeout));
    options.max_frame_len = args.max_frame_len;
    for step in args.skip {
        options = options.skip(step);
    }
    if !args.only.is_empty() {
        options = options.only(args.only);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let kit = Kit::start(options)?;
    let _ = writeln!(
        std::io::stderr(),
        "keyhole-conformance: listening on {}; run the driver with KEYHOLE_DIR={}",
        kit.paths().socket.display(),
        kit.paths().dir.display()
    );
    let report = runtime.block_on(kit.run())?;
    runtime.shutdown_timeout(Duration::from_millis(100));
    let text = if args.json {
        report.to_json().to_string()
    } else {
        report.to_string()
    };
    // A reader that has gone is not a reason to hide the verdict.
    let _ = writeln!(std::io::stdout(), "{text}");
    Ok(report.passed())
}
