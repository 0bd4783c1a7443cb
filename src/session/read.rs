//! A session's reader: frames from the client → pool buffers → destination queues, with the
//! per-frame rules.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt};
use smol::Timer;

use crate::frame::{self, Body, FrameType, PeerGoneReason, SmallFrame, HEADER_LEN};
use crate::key::{NodePublic, KEY_LEN};
use crate::limits::TokenBucket;
use crate::metrics::{DropReason, Metrics};
use crate::net::{discard, Metered};
use crate::pool::PacketBuf;
use crate::registry::{ClientHandle, Route, RouteCache};
use crate::relay::Relay;

use super::SessionError;

/// A reader gives the thread to other tasks after this many frames read without waiting: a
/// client that never stops sending must not starve the other connections (or its own writer).
const READ_BURST: u32 = 32;
/// NotHere PeerGone frames: one per second per connection, burst of three (as derper).
const NOT_HERE_BURST: f64 = 3.0;

/// What a session's reader keeps between frames.
struct ReadState {
    not_here: TokenBucket,
    routes: RouteCache,
    connected_at: Instant,
}

/// Reads the client's frames until it closes: each header is charged to the rate limit, judged
/// by [`frame::check_len`], then its packet relayed, its control payload acted on, or skipped.
pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    state: &Relay,
    client: &Arc<ClientHandle>,
    rd: &mut R,
) -> Result<(), SessionError> {
    let mut rs = ReadState {
        not_here: TokenBucket::new(1.0, NOT_HERE_BURST),
        routes: RouteCache::default(),
        connected_at: Instant::now(),
    };
    let reader = frame::Reader::Session {
        mesh: client.is_mesh,
    };
    let mut burst = 0u32;
    let mut bucket = crate::limits::Bucket::default();
    loop {
        burst += 1;
        if burst == READ_BURST {
            burst = 0;
            smol::future::yield_now().await;
        }
        let Some(h) = read_header(rd).await? else {
            return Ok(());
        };
        let (t, len) = frame::decode_header(&h);
        state.registry.note_activity(client);
        // --rate-config, mesh peers exempt: every byte read is charged before it is read (TCP
        // backpressure). The header and up to one maximum frame now: that is all of every
        // frame derpd reads (longer ones close the connection); the rest of a longer frame
        // of a type it skips is charged piece by piece as it is skipped.
        let rate = (!client.is_mesh).then_some(&state.rate);
        let prepaid = u64::from(len).min(crate::limits::MIN_RATE_BURST);
        if let Some(limits) = rate {
            bucket.pay(limits, HEADER_LEN as u64 + prepaid).await;
        }
        let body =
            frame::check_len(reader, t, len).map_err(|e| SessionError::Protocol(e.to_string()))?;
        match body {
            Body::Packet {
                t: FrameType::ForwardPacket,
                len,
                ..
            } => {
                let mut keys = [0u8; 2 * KEY_LEN];
                rd.read_exact(&mut keys).await?;
                let (src, dst) = keys.split_at(KEY_LEN);
                let src = NodePublic(src.try_into().unwrap_or_default());
                let dst = NodePublic(dst.try_into().unwrap_or_default());
                let buf = read_packet(state, rd, &src, len).await?;
                deliver_forwarded(state, client, &dst, buf, &mut rs.not_here);
            }
            // SendPacket.
            Body::Packet { len, .. } => {
                let mut dst = [0u8; KEY_LEN];
                rd.read_exact(&mut dst).await?;
                let buf = read_packet(state, rd, &client.key, len).await?;
                relay(state, client, &NodePublic(dst), buf, &mut rs);
            }
            Body::Control { t, len, skip } => {
                let mut b = [0u8; frame::CONTROL_MAX];
                rd.read_exact(&mut b[..len]).await?;
                // A Ping's bytes past the 8 it echoes (as derper); within the prepaid ones.
                discard(rd, u64::from(skip), None).await?;
                control(state, client, &rs, t, &b);
            }
            Body::Skip(n) => {
                state.metrics.unknown_frames.fetch_add(1, Relaxed);
                let rate = rate.map(|limits| Metered {
                    bucket: &mut bucket,
                    limits,
                    prepaid,
                });
                discard(rd, u64::from(n), rate).await?;
            }
        }
    }
}

/// Reads a frame header; `None` at a clean close before it.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<Option<[u8; HEADER_LEN]>, SessionError> {
    let mut h = [0u8; HEADER_LEN];
    // A close between frames is a normal end; one inside a header is not. Over TLS,
    // Tailscale's client closes the socket without a close_notify, which rustls reports as
    // UnexpectedEof: at a frame boundary that is the same clean close as on plain TCP.
    let got = match rd.read(&mut h).await {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
        Err(e) => return Err(e.into()),
    };
    if got == 0 {
        return Ok(None);
    }
    rd.read_exact(&mut h[got..]).await?;
    Ok(Some(h))
}

/// Acts on a control frame a session read: `b` starts with the bytes [`frame::check_len`]
/// kept of its payload.
fn control(
    state: &Relay,
    client: &Arc<ClientHandle>,
    rs: &ReadState,
    t: FrameType,
    b: &[u8; frame::CONTROL_MAX],
) {
    let m = &state.metrics;
    match t {
        FrameType::NotePreferred => {
            let pref = b[0] != 0;
            if client.preferred.swap(pref, Relaxed) != pref {
                if pref {
                    m.home_connections.fetch_add(1, Relaxed);
                } else {
                    m.home_connections.fetch_sub(1, Relaxed);
                }
                if rs.connected_at.elapsed() > Duration::from_secs(5) {
                    let c = if pref {
                        &m.home_moves_in
                    } else {
                        &m.home_moves_out
                    };
                    c.fetch_add(1, Relaxed);
                }
            }
        }
        FrameType::Ping => {
            let mut data = [0u8; 8];
            data.copy_from_slice(&b[..8]);
            m.got_ping.fetch_add(1, Relaxed);
            client.enqueue_pong(data);
        }
        // A node that lists itself in --mesh-with reaches itself: nothing to watch.
        FrameType::WatchConns if client.key != state.public_key => {
            state.registry.add_watcher(client);
        }
        FrameType::ClosePeer => {
            let mut k = [0u8; KEY_LEN];
            k.copy_from_slice(&b[..KEY_LEN]);
            let target = NodePublic(k);
            match state.registry.close_key(&target) {
                0 => info!("derp: mesh {}: ClosePeer: no peer {target}", client.remote),
                n => info!(
                    "derp: mesh {}: ClosePeer: closing peer {target} ({n} connections)",
                    client.remote
                ),
            }
        }
        // Its own WatchConns; check_len gives a session no other control frame.
        _ => {}
    }
}

/// Reads a `len`-byte packet into a pooled buffer laid out as a ready RecvPacket frame from
/// `src`. Waits for a buffer when the pool is empty: TCP backpressure, not allocation.
async fn read_packet<R: AsyncRead + Unpin>(
    state: &Relay,
    rd: &mut R,
    src: &NodePublic,
    len: usize,
) -> Result<PacketBuf, SessionError> {
    let mut buf = state.pool.get(frame::RECV_PREFIX + len).await;
    let space = buf.packet_space(len);
    // The buffer is the pool's: a client that stalls mid-frame must give it back in bounded
    // time, or a few such clients would hold every large buffer (--frame-timeout).
    async { rd.read_exact(space).await.map_err(SessionError::from) }
        .or(async {
            Timer::after(state.timeouts.frame).await;
            Err(SessionError::Protocol(format!(
                "frame body of {len} bytes not received within {:?} (--frame-timeout)",
                state.timeouts.frame
            )))
        })
        .await?;
    buf.frame_recv_packet(src, len);
    Ok(buf)
}

/// Routes one packet (already framed as RecvPacket) to `dst`.
fn relay(
    state: &Relay,
    src: &Arc<ClientHandle>,
    dst: &NodePublic,
    buf: PacketBuf,
    rs: &mut ReadState,
) {
    let m = &state.metrics;
    let pkt = buf.payload();
    let disco = frame::looks_like_disco(pkt);
    let pkt_len = pkt.len();
    m.packets_received.fetch_add(1, Relaxed);
    m.bytes_received.fetch_add(pkt_len as u64, Relaxed);
    m.packets_received_kind[usize::from(!disco)].fetch_add(1, Relaxed);
    match state.registry.route_cached(&mut rs.routes, dst) {
        Route::Local(c) => c.enqueue_packet(buf, disco, m),
        Route::Forward(link) => link.forward(*dst, buf, disco, m),
        Route::NoActive => m.drop_packet(DropReason::DupClient, disco, pkt_len),
        Route::Unknown => {
            m.drop_packet(DropReason::UnknownDest, disco, pkt_len);
            tell_not_here(m, src, dst, disco, &mut rs.not_here);
        }
    }
}

/// Delivers a packet a mesh peer forwarded: local connections only, never forwarded again.
fn deliver_forwarded(
    state: &Relay,
    from: &Arc<ClientHandle>,
    dst: &NodePublic,
    buf: PacketBuf,
    not_here: &mut TokenBucket,
) {
    let m = &state.metrics;
    m.packets_forwarded_in.fetch_add(1, Relaxed);
    let pkt = buf.payload();
    let disco = frame::looks_like_disco(pkt);
    let pkt_len = pkt.len();
    match state.registry.route_local(dst) {
        Route::Local(c) => c.enqueue_packet(buf, disco, m),
        Route::NoActive => m.drop_packet(DropReason::DupClient, disco, pkt_len),
        Route::Forward(_) | Route::Unknown => {
            m.drop_packet(DropReason::UnknownDestOnFwd, disco, pkt_len);
            // Tells the forwarding node to drop its forwarder for the key.
            tell_not_here(m, from, dst, disco, not_here);
        }
    }
}

/// Answers a disco packet for a key that is not here with PeerGone(NotHere), as often as the
/// sender's NotHere bucket allows (derper: 1 per second, burst 3).
fn tell_not_here(
    m: &Metrics,
    to: &ClientHandle,
    dst: &NodePublic,
    disco: bool,
    bucket: &mut TokenBucket,
) {
    if disco
        && bucket.allow()
        && to.enqueue_control(SmallFrame::peer_gone(dst, PeerGoneReason::NotHere))
    {
        m.peer_gone_not_here_frames.fetch_add(1, Relaxed);
    }
}
