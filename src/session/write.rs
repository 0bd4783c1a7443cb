//! A session's writer: what is queued for the client → one batch → one vectored write and
//! one flush, with KeepAlives between.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use event_listener::listener;
use smol::future::FutureExt;
use smol::io::AsyncWrite;
use smol::Timer;

use crate::frame::{self, FrameType, SmallFrame};
use crate::metrics::DropReason;
use crate::net::write_all_vectored;
use crate::pool::PacketBuf;
use crate::registry::ClientHandle;
use crate::relay::Relay;

use super::{write_deadline, SessionError, KEEPALIVE};

/// Each connection adds a jitter in [0, 5 s) to [`KEEPALIVE`], drawn once (as derper).
const KEEPALIVE_JITTER_MS: u64 = 5000;
/// Most frames written in one flush.
const MAX_BATCH: usize = 32;
/// A batch stops growing past this many bytes, so the write deadline bounds about one
/// maximum-size frame, as derper's per-frame deadline does.
const MAX_BATCH_BYTES: usize = 64 << 10;

/// One frame waiting in a writer batch.
enum Out {
    Packet(PacketBuf),
    Small(SmallFrame),
}

impl AsRef<[u8]> for Out {
    fn as_ref(&self) -> &[u8] {
        match self {
            Self::Packet(p) => p.as_slice(),
            Self::Small(s) => s.as_bytes(),
        }
    }
}

/// Takes what is ready from the outbox into `batch`: pong, control frames, then packets,
/// alternating disco and other so neither starves.
fn fill_batch(client: &ClientHandle, batch: &mut Vec<Out>) {
    client.with_outbox(|o| {
        let mut bytes = 0;
        if let Some(p) = o.pong.take() {
            batch.push(Out::Small(SmallFrame::pong(p)));
        }
        while batch.len() < MAX_BATCH {
            let Some(f) = o.control.pop_front() else {
                break;
            };
            batch.push(Out::Small(f));
        }
        while batch.len() < MAX_BATCH && (bytes < MAX_BATCH_BYTES || batch.is_empty()) {
            let mut took = false;
            for q in [&mut o.disco, &mut o.other] {
                if batch.len() >= MAX_BATCH || (bytes >= MAX_BATCH_BYTES && !batch.is_empty()) {
                    break;
                }
                if let Some(p) = q.pop() {
                    o.large -= usize::from(p.is_large());
                    bytes += p.len();
                    batch.push(Out::Packet(p));
                    took = true;
                }
            }
            if !took {
                break;
            }
        }
    });
}

pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    state: &Relay,
    client: &Arc<ClientHandle>,
    wr: &mut W,
    write_timeout: Option<Duration>,
) -> Result<(), SessionError> {
    let m = &state.metrics;
    let jitter = Duration::from_millis(fastrand::u64(0..KEEPALIVE_JITTER_MS));
    let period = KEEPALIVE + jitter;
    let mut keepalive = Timer::after(period);
    let mut batch: Vec<Out> = Vec::new();
    // Batches usually come from one source: skip the registry's check for a repeat. (The
    // registry keeps the set of sources this connection must hear PeerGone for; an entry
    // goes when its source leaves, so the next packet from a returning key registers again.)
    let mut last_src = None;
    loop {
        fill_batch(client, &mut batch);
        if batch.is_empty() {
            if client.is_closed() {
                return Ok(());
            }
            listener!(client.wake_event() => woken);
            fill_batch(client, &mut batch);
            if batch.is_empty() {
                if client.is_closed() {
                    return Ok(());
                }
                let tick = async {
                    (&mut keepalive).await;
                    true
                };
                let woke = async {
                    woken.await;
                    false
                };
                if woke.or(tick).await {
                    batch.push(Out::Small(SmallFrame::keep_alive()));
                    keepalive.set_after(period);
                }
                continue;
            }
        }
        let res = write_deadline(write_timeout, write_all_vectored(wr, &batch)).await;
        if let Err(e) = res {
            for o in batch.drain(..) {
                if let Out::Packet(p) = o {
                    let disco = frame::looks_like_disco(p.payload());
                    m.drop_packet(DropReason::WriteError, disco, p.len());
                }
            }
            if matches!(e, SessionError::WriteTimeout) {
                m.write_timeouts.fetch_add(1, Relaxed);
            }
            return Err(e);
        }
        for o in batch.drain(..) {
            match o {
                Out::Packet(p) => {
                    m.packets_sent.fetch_add(1, Relaxed);
                    m.bytes_sent.fetch_add(p.payload().len() as u64, Relaxed);
                    let src = p.src();
                    if last_src != Some(src) {
                        // A source already gone gets its PeerGone now: no repeat cache then.
                        let registered = state.registry.add_gone_watcher(src, client);
                        last_src = registered.then_some(src);
                    }
                }
                Out::Small(f) => match f.as_bytes()[0] {
                    t if t == FrameType::Pong as u8 => {
                        m.sent_pong.fetch_add(1, Relaxed);
                    }
                    // A source left (its interest is gone from the registry): a later packet
                    // from a new connection of that key must register again. The PeerGone is
                    // queued before that connection exists, and control frames come first in a
                    // batch, so this runs before that packet is looked at.
                    t if t == FrameType::PeerGone as u8 => last_src = None,
                    _ => {}
                },
            }
        }
    }
}
