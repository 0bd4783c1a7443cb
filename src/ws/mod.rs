//! DERP over WebSocket on `/derp` (spec §3.2), as derper serves browsers (js/wasm clients) and
//! Tailscale clients built with `ts_debug_websockets`: the RFC 6455 handshake answer, then DERP
//! as a byte stream over binary messages (frame and message boundaries independent of DERP's),
//! handed to [`session::serve`].
//!
//! - `accept.rs`: [`accept()`]: the RFC 6455 upgrade checks, as derper's
//!   websocket library makes them, and the 101 with `Sec-WebSocket-Accept`.
//! - `read.rs`: the read half ([`WsRead`]): client frame headers checked, payloads unmasked
//!   into the reader's buffer, pings and closes answered, binary messages as one byte stream.
//! - `stream.rs`: [`transport`], the connection both halves share (with the control frames
//!   queued for the writer), and the write half ([`WsWrite`]): unmasked binary messages.
//! - here: [`serve`], which sends the 101 and hands the stream to [`session::serve`].

mod accept;
mod read;
mod stream;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use smol::Timer;

use crate::lograte::{limited, WEBSOCKETS};
use crate::relay::Relay;
use crate::session::{self, Handoff, SessionError};

pub use accept::{accept, accept_key, Accept};
pub use read::{WsRead, MAX_WS_FRAME};
#[doc(hidden)]
pub use stream::transport;
pub use stream::WsWrite;

/// Sends the 101 and runs DERP over the WebSocket to the end of the connection.
pub async fn serve<S>(
    relay: &Arc<Relay>,
    handshake_timeout: Duration,
    mut stream: S,
    leftover: Vec<u8>,
    acc: Accept,
    remote: SocketAddr,
    slot: crate::limits::Slot,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async {
        stream.write_all(acc.head.as_bytes()).await?;
        if !acc.derp {
            // Close 1008 (policy violation), as derper does.
            let reason = b"client must speak the derp subprotocol";
            let mut f = vec![0x88, 2 + reason.len() as u8, 0x03, 0xf0];
            f.extend_from_slice(reason);
            stream.write_all(&f).await?;
        }
        stream.flush().await
    }
    .or(async {
        Timer::after(handshake_timeout).await;
        Err(io::ErrorKind::TimedOut.into())
    })
    .await?;
    if !acc.derp {
        let e = "websocket: client must speak the derp subprotocol";
        limited!(info, WEBSOCKETS, "{remote}: {e}");
        return Err(SessionError::Protocol(e.into()));
    }
    drop(acc);
    relay.metrics.websocket_accepts.fetch_add(1, Relaxed);
    let (rd, wr) = transport(stream, leftover).await;
    let up = Handoff {
        remote,
        fast_start: false,
        not_ideal: false,
        websocket: true,
        slot: Some(slot),
    };
    session::serve(relay.clone(), rd, wr, up).await
}
