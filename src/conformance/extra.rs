//! The kit's extra connections: a [`Script`] of raw bytes played against a
//! client, to drive the checks only a client can make (a refused
//! handshake, a bad `Welcome`, replies that break the rules, the end of a
//! connection). Every frame the client sends on them is checked byte for
//! byte, as on the main connection; each read takes only the bytes it
//! needs, so that what the kit leaves unread stays in the socket (which is
//! what turns a close into `ECONNRESET`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::run::Run;
use super::script::{Act, Script};
use super::service::lock;
use super::wire::{self, Mismatch};
use crate::limits::{HANDSHAKE_FRAME_LEN, LENGTH_PREFIX_LEN};
use crate::token::SessionToken;

/// How long the kit waits for each frame a script reads.
const READ_WAIT: Duration = Duration::from_secs(5);
/// How long a script's connection stays open after its acts, for the
/// client to read what it was sent and close its end.
const LINGER: Duration = Duration::from_secs(5);
/// The pause between the bytes of [`Act::WriteSplit`].
const SPLIT_PAUSE: Duration = Duration::from_millis(1);
/// Bytes read of a frame whose length prefix is already wrong, to show.
const SHOWN_AFTER_BAD_PREFIX: usize = 64;

/// Plays `script` on `stream`; `done` is set once its checks are over.
pub(crate) async fn play(
    mut stream: UnixStream,
    script: Script,
    run: Arc<Mutex<Run>>,
    token: Arc<SessionToken>,
    done: watch::Sender<bool>,
) {
    let mut expect_allowed = true;
    let mut linger = true;
    for act in script.acts {
        let outcome = match act {
            Act::Handshake => handshake(&mut stream, &token).await,
            Act::Read(spec) => {
                let pattern = spec(&lock(&run).captures);
                read_frame(&mut stream, &pattern, None, &mut expect_allowed)
                    .await
                    .map(|frame| pattern.capture(&frame, &mut lock(&run).captures))
            }
            Act::ReadStart(spec, len) => {
                let pattern = spec(&lock(&run).captures);
                read_frame(&mut stream, &pattern, Some(len), &mut expect_allowed)
                    .await
                    .map(|frame| pattern.capture(&frame, &mut lock(&run).captures))
            }
            Act::Stamp => {
                lock(&run).stamp(Instant::now());
                Ok(())
            }
            Act::Write(bytes) => {
                let bytes = bytes(&lock(&run).captures);
                // A client that already closed is judged by its report.
                let _ = stream.write_all(&bytes).await;
                Ok(())
            }
            Act::WriteSplit(bytes) => {
                let bytes = bytes(&lock(&run).captures);
                for byte in bytes {
                    if stream.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(SPLIT_PAUSE).await;
                }
                Ok(())
            }
            Act::WaitUnread => match tokio::time::timeout(READ_WAIT, stream.readable()).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(("the client sent nothing".to_owned(), None)),
            },
            Act::Eof => {
                let _ = stream.shutdown().await;
                Ok(())
            }
            Act::Reset => {
                linger = false;
                break;
            }
        };
        if let Err((why, mismatch)) = outcome {
            lock(&run).fail(format!("on a new connection: {why}"), mismatch);
            linger = false;
            break;
        }
    }
    let _ = done.send(true);
    if linger {
        // Whatever else the client sends is not checked; wait for its end.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
    // Dropped here: with bytes unread (Act::Reset) the kernel resets.
}

type Outcome<T> = Result<T, (String, Option<Mismatch>)>;

async fn read_some(stream: &mut UnixStream, buf: &mut [u8]) -> Outcome<()> {
    match tokio::time::timeout(READ_WAIT, stream.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(("the client closed the connection".into(), None)),
        Err(_) => Err((format!("nothing more arrived within {READ_WAIT:?}"), None)),
    }
}

/// Whatever arrives within a short wait, up to `max` bytes (for a report).
async fn read_what_comes(stream: &mut UnixStream, max: usize) -> Vec<u8> {
    let mut more = vec![0u8; max];
    let mut got = 0;
    while got < max {
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut more[got..])).await
        {
            Ok(Ok(n)) if n > 0 => got += n,
            _ => break,
        }
    }
    more.truncate(got);
    more
}

async fn handshake(stream: &mut UnixStream, token: &SessionToken) -> Outcome<()> {
    let pattern = wire::handshake(token);
    let mut got = vec![0u8; LENGTH_PREFIX_LEN];
    read_some(stream, &mut got).await.map_err(|(why, _)| {
        (
            format!("expected the handshake: {why}"),
            pattern.compare(&[]).err(),
        )
    })?;
    if got[..] != pattern.bytes[..LENGTH_PREFIX_LEN] {
        got.extend(read_what_comes(stream, HANDSHAKE_FRAME_LEN).await);
        got.truncate(HANDSHAKE_FRAME_LEN);
        return Err((
            "the handshake's length prefix is not 40".into(),
            pattern.compare(&got).err(),
        ));
    }
    got.resize(HANDSHAKE_FRAME_LEN, 0);
    read_some(stream, &mut got[LENGTH_PREFIX_LEN..]).await?;
    pattern
        .compare(&got)
        .map_err(|m| ("the handshake differs".into(), Some(m)))
}

/// Reads the next frame and checks it against `pattern`; an `Expect` of
/// the hub before the first checked frame is answered with `Ack`. With
/// `only`, just that many bytes of the frame (length prefix included) are
/// read and checked, and the rest is left in the socket.
async fn read_frame(
    stream: &mut UnixStream,
    pattern: &wire::Pattern,
    only: Option<usize>,
    expect_allowed: &mut bool,
) -> Outcome<Vec<u8>> {
    loop {
        let mut frame = vec![0u8; LENGTH_PREFIX_LEN];
        read_some(stream, &mut frame)
            .await
            .map_err(|(why, _)| (format!("expected {}: {why}", pattern.what), None))?;
        let len = wire::read_u32(&frame, 0).unwrap_or(0) as usize;
        let expect = wire::expect("hub", 2);
        let maybe_expect = *expect_allowed && len == expect.payload_len();
        if len != pattern.payload_len() && !maybe_expect {
            let want = len
                .min(pattern.payload_len() + 16)
                .min(SHOWN_AFTER_BAD_PREFIX);
            frame.extend(read_what_comes(stream, want).await);
            return Err((
                format!(
                    "expected {}; the frame's length prefix says {len} bytes, not {}",
                    pattern.what,
                    pattern.payload_len()
                ),
                pattern.compare(&frame).err(),
            ));
        }
        let is_expect = maybe_expect && len != pattern.payload_len();
        if let (Some(only), false) = (only, is_expect) {
            let only = only.clamp(LENGTH_PREFIX_LEN, LENGTH_PREFIX_LEN + len);
            frame.resize(only, 0);
            read_some(stream, &mut frame[LENGTH_PREFIX_LEN..]).await?;
            *expect_allowed = false;
            let start = pattern.start(only);
            return start
                .compare(&frame)
                .map(|()| frame)
                .map_err(|m| (format!("expected {}", start.what), Some(m)));
        }
        frame.resize(LENGTH_PREFIX_LEN + len, 0);
        read_some(stream, &mut frame[LENGTH_PREFIX_LEN..]).await?;
        if maybe_expect && expect.compare(&frame).is_ok() {
            *expect_allowed = false;
            let id = wire::read_u64(&frame, 4).unwrap_or(0);
            let _ = stream.write_all(&wire::ack(id)).await;
            continue;
        }
        *expect_allowed = false;
        return pattern
            .compare(&frame)
            .map(|()| frame)
            .map_err(|m| (format!("expected {}", pattern.what), Some(m)));
    }
}
