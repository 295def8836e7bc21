//! How `keyhole` writes what it received: the formats of `sub --format`
//! (`line`, `raw`, `hex`, `json`) and the payload fields of every `--json`
//! document. The README's "Scriptable output" section documents each, and
//! `tests/cli_output.rs` checks them against real events.
//!
//! The `line` escaping keeps one event on one line whatever its bytes are,
//! and loses nothing: valid UTF-8 is printed as it is, except
//! - `\` as `\\`, newline as `\n`, carriage return as `\r`, tab as `\t`;
//! - every other ASCII control byte (0x00 to 0x1f, 0x7f) as `\xHH`;
//! - C1 controls (U+0080 to U+009F) and the line and paragraph separators
//!   (U+2028, U+2029) as `\u{HHHH}`;
//! - each byte that is not part of valid UTF-8 as `\xHH` (so `\x80` to
//!   `\xff` always stand for single raw bytes);
//! - in the topic only, a space as `\x20`, so that the first two spaces of
//!   a line always end the topic and the sequence number.

use std::fmt::Write as _;

use base64::Engine as _;
use clap::ValueEnum;
use serde::Serialize;

/// `keyhole sub --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// TOPIC SEQUENCE PAYLOAD, one line per event: topic and payload
    /// escaped so that no byte of theirs can break the line (see the README)
    Line,
    /// The payload's bytes exactly, nothing else (for `-c 1` into a program)
    Raw,
    /// TOPIC SEQUENCE HEX, one line per event: the payload in lowercase hex
    Hex,
    /// One JSON object per line: pattern, topic, sequence, payload, encoding
    Json,
}

/// A payload in a JSON document: UTF-8 text when it is valid UTF-8, else
/// standard base64 (with padding); `encoding` says which.
#[derive(Debug, Serialize)]
pub struct Payload<'a> {
    /// The text, or the base64 of the bytes.
    pub payload: std::borrow::Cow<'a, str>,
    /// `"utf8"` or `"base64"`.
    pub encoding: &'static str,
}

impl<'a> Payload<'a> {
    pub fn of(bytes: &'a [u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Payload {
                payload: text.into(),
                encoding: "utf8",
            },
            Err(_) => Payload {
                payload: base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into(),
                encoding: "base64",
            },
        }
    }
}

/// One event of `sub --format json`.
#[derive(Debug, Serialize)]
pub struct EventLine<'a> {
    /// The pattern of the subscription it came through.
    pub pattern: &'a str,
    /// The topic it was published on.
    pub topic: &'a str,
    /// Its sequence number on that topic.
    pub sequence: u64,
    #[serde(flatten)]
    pub payload: Payload<'a>,
}

/// One event in `format` (with its newline, except for `raw`).
pub fn event(format: Format, pattern: &str, topic: &str, sequence: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + payload.len() + 24);
    match format {
        Format::Raw => out.extend_from_slice(payload),
        Format::Line | Format::Hex => {
            escape_into(topic.as_bytes(), true, &mut out);
            out.extend_from_slice(format!(" {sequence} ").as_bytes());
            if format == Format::Line {
                escape_into(payload, false, &mut out);
            } else {
                out.extend_from_slice(hex::encode(payload).as_bytes());
            }
            out.push(b'\n');
        }
        Format::Json => {
            let line = EventLine {
                pattern,
                topic,
                sequence,
                payload: Payload::of(payload),
            };
            // Serializing strings and integers cannot fail.
            if serde_json::to_writer(&mut out, &line).is_ok() {
                out.push(b'\n');
            }
        }
    }
    out
}

/// `bytes` escaped for the `line` format (see the module doc); with
/// `space`, a space is escaped too (for the topic).
pub fn escape_into(bytes: &[u8], space: bool, out: &mut Vec<u8>) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                ' ' if space => out.extend_from_slice(b"\\x20"),
                '\0'..='\x1f' | '\x7f' => {
                    out.extend_from_slice(format!("\\x{:02x}", c as u32).as_bytes())
                }
                '\u{80}'..='\u{9f}' | '\u{2028}' | '\u{2029}' => {
                    out.extend_from_slice(format!("\\u{{{:04x}}}", c as u32).as_bytes())
                }
                _ => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        for b in chunk.invalid() {
            let mut s = String::with_capacity(4);
            let _ = write!(s, "\\x{b:02x}");
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// A JSON document and its newline on stdout; false when stdout is gone.
pub fn print_json(value: &impl Serialize) -> bool {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).is_ok()
        && out.write_all(b"\n").is_ok()
        && out.flush().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(bytes: &[u8], space: bool) -> String {
        let mut out = Vec::new();
        escape_into(bytes, space, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_line_escaping_keeps_text_and_escapes_what_would_break_a_line() {
        assert_eq!(esc(b"21.5 degrees", false), "21.5 degrees");
        assert_eq!(esc("h\u{e9}llo".as_bytes(), false), "h\u{e9}llo");
        assert_eq!(esc(b"a\nb\r\tc\\d", false), "a\\nb\\r\\tc\\\\d");
        assert_eq!(esc(b"\x00\x1b[31m\x7f", false), "\\x00\\x1b[31m\\x7f");
        assert_eq!(esc(b"\xff\xfe ok", false), "\\xff\\xfe ok");
        assert_eq!(
            esc("\u{85}\u{2028}\u{2029}".as_bytes(), false),
            "\\u{0085}\\u{2028}\\u{2029}"
        );
        assert_eq!(esc(b"a b", true), "a\\x20b");
    }
}
