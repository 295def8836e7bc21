//! The `keyhole` CLI's scriptable output, through the real binaries against
//! a real daemon: each `--json` document parsed and checked against what
//! the daemon and the library client see; `sub --format` with a payload
//! that would break a line (newline, `\xff`, `\x00`); the readiness line on
//! a piped stderr.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStderr, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::DaemonProcess;
use futures_util::StreamExt;
use keyhole::client::hub::Received;
use serde_json::Value;

/// The JSON document a successful command printed on stdout.
fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "stdout is not one JSON document ({err}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn run(daemon: &DaemonProcess, args: &[&str]) -> Output {
    daemon.cli().args(args).output().unwrap()
}

/// Waits for `line` on a child's stderr (piped, not a terminal) and
/// returns the reader, so the rest can be read later.
fn wait_for_stderr_line(stderr: ChildStderr, want: &str) -> BufReader<ChildStderr> {
    let mut reader = BufReader::new(stderr);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "stderr ended without {want:?}");
        if line.trim_end() == want {
            return reader;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_gives_the_daemons_figures_and_lists() {
    let daemon = DaemonProcess::start(&[]);
    let client = daemon.client().await;
    let _temps = client.subscribe("sensors.*.temp").await.unwrap();
    let _more = client.subscribe("sensors.*.temp").await.unwrap();
    let _all = client.subscribe("logs.>").await.unwrap();
    let _served = client.serve("svc.clock").await.unwrap();

    let doc = json_of(&run(&daemon, &["status", "--json"]));
    let truth = client.status().await.unwrap();
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["version"], truth.version.as_str());
    // This client and the CLI's own connection.
    assert_eq!(doc["authenticated"], 2);
    assert_eq!(doc["topics"], 2);
    assert_eq!(doc["subscriptions"], 3);
    assert_eq!(doc["names"], 1);
    assert_eq!(doc["requests_in_flight"], 0);
    assert!(doc["pending"].is_u64());
    let uptime = doc["uptime_ms"].as_u64().unwrap();
    assert!(uptime <= truth.uptime_ms, "{uptime} > {}", truth.uptime_ms);
    // The lists only with --topics.
    assert!(doc.get("patterns").is_none() && doc.get("served").is_none());

    let doc = json_of(&run(&daemon, &["status", "--topics", "--json"]));
    let mut patterns = doc["patterns"].as_array().unwrap().clone();
    patterns.sort_by_key(|p| p["pattern"].as_str().unwrap().to_string());
    assert_eq!(
        Value::Array(patterns),
        serde_json::json!([
            {"pattern": "logs.>", "subscriptions": 1},
            {"pattern": "sensors.*.temp", "subscriptions": 2},
        ])
    );
    assert_eq!(
        doc["served"],
        serde_json::json!([{"name": "svc.clock", "responders": 1}])
    );
    assert_eq!(doc["truncated"], false);
}

#[test]
fn ping_json_counts_every_pong_with_its_time() {
    let daemon = DaemonProcess::start(&[]);
    let doc = json_of(&run(&daemon, &["ping", "-c", "3", "--json"]));
    assert_eq!(doc["transmitted"], 3);
    assert_eq!(doc["received"], 3);
    assert_eq!(doc["interrupted"], false);
    assert_eq!(doc["service"], "hub");
    assert_eq!(doc["software_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        doc["service_version"],
        <keyhole::hub::Hub as keyhole::service::Interface>::VERSION
    );
    assert_eq!(doc["socket"], daemon.paths.socket.to_str().unwrap());
    let times: Vec<f64> = doc["times_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 3);
    let (min, avg, max) = (
        doc["min_ms"].as_f64().unwrap(),
        doc["avg_ms"].as_f64().unwrap(),
        doc["max_ms"].as_f64().unwrap(),
    );
    assert!(times.iter().all(|&t| t > 0.0 && t >= min && t <= max));
    assert!(min <= avg && avg <= max, "{min} {avg} {max}");
    assert!((avg - times.iter().sum::<f64>() / 3.0).abs() < 1e-5);
    assert!(doc["mdev_ms"].as_f64().unwrap() >= 0.0);
    // Nothing but the document on stdout.
    let out = run(&daemon, &["ping", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_json_says_how_many_live_subscriptions_it_reached() {
    let daemon = DaemonProcess::start(&[]);
    let client = daemon.client().await;
    let mut one = client.subscribe("news.*").await.unwrap();
    let mut two = client.subscribe("news.>").await.unwrap();
    let _other = client.subscribe("weather.>").await.unwrap();

    let doc = json_of(&run(&daemon, &["pub", "news.local", "hello", "--json"]));
    assert_eq!(
        doc,
        serde_json::json!({"topic": "news.local", "bytes": 5, "reached": 2})
    );
    for sub in [&mut one, &mut two] {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(Received::Event(e)))) => {
                assert_eq!(
                    (e.topic.as_str(), &e.payload[..]),
                    ("news.local", &b"hello"[..])
                )
            }
            other => panic!("expected the event, got {other:?}"),
        }
    }
    let doc = json_of(&run(&daemon, &["pub", "nobody.here", "--json"]));
    assert_eq!(
        doc,
        serde_json::json!({"topic": "nobody.here", "bytes": 0, "reached": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_json_gives_the_reply_as_utf8_or_base64() {
    let daemon = DaemonProcess::start(&[]);
    let client = daemon.client().await;
    let mut requests = client.serve("svc.echo").await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let mut reply = b"got ".to_vec();
            reply.extend_from_slice(request.payload());
            let _ = request.reply(reply).await;
        }
    });

    let text = daemon
        .cli()
        .args(["req", "svc.echo", "hi", "--json"])
        .output();
    let doc = json_of(&text.unwrap());
    assert_eq!(
        doc,
        serde_json::json!({"name": "svc.echo", "payload": "got hi", "encoding": "utf8"})
    );

    let mut child = daemon
        .cli()
        .args(["req", "svc.echo", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    let binary = b"\xff\x00\nend";
    child.stdin.take().unwrap().write_all(binary).unwrap();
    let doc = json_of(&child.wait_with_output().unwrap());
    assert_eq!(doc["encoding"], "base64");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(doc["payload"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, [&b"got "[..], binary].concat());

    // Without --json: exactly the reply's bytes.
    let out = run(&daemon, &["req", "svc.echo", "x"]);
    assert_eq!(out.stdout, b"got x");
}

#[test]
fn bench_json_gives_every_figure_of_the_report() {
    let daemon = DaemonProcess::start(&[]);
    let args = [
        "bench",
        "ping",
        "publish",
        "fanout",
        "-n",
        "300",
        "-c",
        "2",
        "-P",
        "3",
        "-S",
        "2",
        "--payload",
        "32",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let doc = json_of(&run(&daemon, &json_args));
    let rows = doc["workloads"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["workload"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ping", "publish", "fanout"]);
    for row in rows {
        let ops = row["ops"].as_u64().unwrap();
        let elapsed = row["elapsed_s"].as_f64().unwrap();
        let rate = row["ops_per_s"].as_f64().unwrap();
        assert!(elapsed > 0.0, "{row}");
        assert!((rate - ops as f64 / elapsed).abs() <= rate * 1e-6, "{row}");
        let q: Vec<u64> = ["p50_ns", "p99_ns", "p999_ns", "max_ns"]
            .iter()
            .map(|k| row[*k].as_u64().unwrap_or_else(|| panic!("{k} in {row}")))
            .collect();
        assert!(q[0] > 0 && q.windows(2).all(|w| w[0] <= w[1]), "{row}");
        assert!(row["shape"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(row["in_flight"], 3);
    }
    // -n counts requests for ping and publish, publishes for fanout (each
    // delivered to both subscribers).
    assert_eq!(rows[0]["ops"], 300);
    assert_eq!(rows[0]["unit"], "requests");
    assert_eq!(rows[0]["connections"], 2);
    assert_eq!(rows[0]["payload_bytes"], Value::Null);
    assert_eq!(rows[0]["bytes"], 0);
    assert_eq!(rows[1]["ops"], 300);
    assert_eq!(rows[1]["payload_bytes"], 32);
    assert_eq!(rows[2]["unit"], "deliveries");
    assert_eq!(rows[2]["ops"], 600);
    assert_eq!(rows[2]["subscribers"], 2);
    assert_eq!(rows[2]["bytes"], 600 * 32);
    let bytes_rate = rows[2]["bytes_per_s"].as_f64().unwrap();
    let elapsed = rows[2]["elapsed_s"].as_f64().unwrap();
    assert!((bytes_rate - 600.0 * 32.0 / elapsed).abs() <= bytes_rate * 1e-6);

    // The text report has a figure for each field: the same workloads, and
    // every line the JSON replaces.
    let out = run(&daemon, &args);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in names {
        assert!(text.contains(&format!("====== {name} ======")), "{text}");
    }
    for figure in [
        "throughput:",
        "payload:",
        "p50",
        "p99",
        "p99.9",
        "max",
        "verified",
    ] {
        assert!(text.contains(figure), "{figure} in {text}");
    }
}

/// The inverse of the `line` escaping (README, "Scriptable output").
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('\\') => out.push(b'\\'),
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap());
            }
            Some('u') => {
                assert_eq!(chars.next(), Some('{'));
                let hex: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let c = char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap();
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            other => panic!("unknown escape \\{other:?} in {text:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_formats_keep_every_byte_of_a_payload_that_would_break_a_line() {
    let daemon = DaemonProcess::start(&[]);
    let payload: &[u8] = b"two\nlines\r\n\xff\x00 tab\t\\ \x1b[31m red \xc2\x85 caf\xc3\xa9";
    let topic = "t.with space";
    let formats = ["line", "raw", "hex", "json"];
    let mut subs: Vec<(Child, BufReader<ChildStderr>)> = formats
        .iter()
        .map(|format| {
            let mut child = daemon
                .cli()
                .args(["sub", "t.>", "-c", "1", "--format", format])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The readiness line, with stderr a pipe: the subscription is
            // live, so the publish below cannot be missed.
            let stderr =
                wait_for_stderr_line(child.stderr.take().unwrap(), "keyhole: subscribed to t.>");
            (child, stderr)
        })
        .collect();
    let client = daemon.client().await;
    let reached = client
        .publish(topic, bytes::Bytes::from_static(payload))
        .await
        .unwrap();
    assert_eq!(reached, 4);

    let mut outputs = Vec::new();
    for (child, mut stderr) in subs.drain(..) {
        let out = child.wait_with_output().unwrap();
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        assert!(out.status.success(), "{}: {rest}", out.status);
        assert_eq!(rest, "", "nothing else on stderr");
        outputs.push(out.stdout);
    }
    let [line, raw, hex, json] = [&outputs[0], &outputs[1], &outputs[2], &outputs[3]];

    // raw: the bytes, exactly.
    assert_eq!(raw.as_slice(), payload);

    // line: one line, valid UTF-8 with no control character, that gives
    // the topic and the payload back.
    let line = String::from_utf8(line.clone()).expect("the line is UTF-8");
    assert!(line.ends_with('\n'), "{line:?}");
    let body = &line[..line.len() - 1];
    assert!(!body.chars().any(char::is_control), "{body:?}");
    let mut parts = body.splitn(3, ' ');
    let (t, seq, p) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    assert_eq!(unescape(t), topic.as_bytes());
    assert_eq!(seq, "1");
    assert_eq!(unescape(p), payload);
    assert!(p.contains("caf\u{e9}"), "text stays as it is: {p:?}");

    // hex: the payload in hex after topic and sequence.
    let hex = String::from_utf8(hex.clone()).unwrap();
    let fields: Vec<&str> = hex.trim_end_matches('\n').split(' ').collect();
    assert_eq!(fields.len(), 3, "{hex:?}");
    assert_eq!(unescape(fields[0]), topic.as_bytes());
    assert_eq!(fields[1], "1");
    assert_eq!(hex::decode(fields[2]).unwrap(), payload);

    // json: one object per line, the payload in base64 (it is not UTF-8).
    let text = String::from_utf8(json.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "{text:?}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["pattern"], "t.>");
    assert_eq!(doc["topic"], topic);
    assert_eq!(doc["sequence"], 1);
    assert_eq!(doc["encoding"], "base64");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(doc["payload"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, payload);
}

#[test]
fn sub_json_gives_text_payloads_as_utf8_one_line_per_event() {
    let daemon = DaemonProcess::start(&[]);
    let mut child = daemon
        .cli()
        .args(["sub", "a", "b.*", "-c", "3", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stderr = wait_for_stderr_line(
        child.stderr.take().unwrap(),
        "keyhole: subscribed to a, b.*",
    );
    for (topic, message) in [("a", "first\nline"), ("b.x", "caf\u{e9}"), ("a", "")] {
        let out = run(&daemon, &["pub", topic, message]);
        assert!(out.status.success());
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let docs: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        docs,
        [
            serde_json::json!({"pattern": "a", "topic": "a", "sequence": 1, "payload": "first\nline", "encoding": "utf8"}),
            serde_json::json!({"pattern": "b.*", "topic": "b.x", "sequence": 1, "payload": "caf\u{e9}", "encoding": "utf8"}),
            serde_json::json!({"pattern": "a", "topic": "a", "sequence": 2, "payload": "", "encoding": "utf8"}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_says_it_serves_on_a_piped_stderr() {
    let daemon = DaemonProcess::start(&[]);
    let mut child = daemon
        .cli()
        .args(["reply", "svc.cat", "-c", "1", "--", "cat"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stderr = wait_for_stderr_line(
        child.stderr.take().unwrap(),
        "keyhole: serving svc.cat with cat",
    );
    // Served from the moment the line appeared: no wait, no retry.
    let client = daemon.client().await;
    let reply = client.request("svc.cat", "meow").await.unwrap();
    assert_eq!(&reply[..], b"meow");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(Instant::now() < deadline, "reply -c 1 did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}
