//! The main connection's relay: the driver's connection is passed, byte for
//! byte and unchanged in both directions, to the kit's hub served by the
//! framework (its own handshake check, `Welcome`, framing, `Ping`, errors),
//! while a copy of every byte the client sends is checked by the run. The
//! kit's hub sees decoded requests only; the relay is what sees the bytes,
//! a handshake or a length prefix that no decoder would accept included.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::run::Run;
use super::service::lock;
use crate::limits::READ_CHUNK;

/// Relays `client` to the kit's hub at `upstream` until either side ends.
pub(crate) async fn relay(client: UnixStream, upstream: PathBuf, run: Arc<Mutex<Run>>) {
    let upstream = match UnixStream::connect(&upstream).await {
        Ok(stream) => stream,
        Err(err) => {
            lock(&run).fail(format!("the kit cannot reach its own hub: {err}"), None);
            return;
        }
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_hub, mut to_hub) = upstream.into_split();
    let down = async move {
        let _ = tokio::io::copy(&mut from_hub, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    let up = async move {
        let mut checked = BytesMut::new();
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let n = match from_client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Checked before it is passed on: the hub handles a frame
            // only after the run has seen it.
            checked.extend_from_slice(&chunk[..n]);
            lock(&run).main_input(&mut checked);
            if to_hub.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_hub.shutdown().await;
    };
    tokio::join!(down, up);
}
