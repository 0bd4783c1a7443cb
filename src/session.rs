//! One DERP session, the server's side of a DERP connection after its HTTP upgrade: the login,
//! then a reader (frames from the client → pooled buffers → destination queues) and a writer
//! (queues → batched frames → one flush).

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::listener;
use log::{debug, info};
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::Timer;

use crate::frame::{self, peer_flags, Body, FrameType, PeerGoneReason, SmallFrame, HEADER_LEN};
use crate::handshake::{self, ClientInfo, LoginError, SessionBox};
use crate::key::{NodePublic, KEY_LEN};
use crate::limits::TokenBucket;
use crate::lograte::{limited, CONN_ERRORS, LOGINS};
use crate::metrics::{DropReason, Metrics};
use crate::net::{discard, write_all_vectored, Metered};
use crate::pool::PacketBuf;
use crate::registry::{ClientHandle, Route, RouteCache};
use crate::relay::Relay;

/// KeepAlive period; each connection adds a jitter in [0, 5 s) drawn once (as derper).
pub const KEEPALIVE: Duration = Duration::from_secs(60);
const KEEPALIVE_JITTER_MS: u64 = 5000;
/// Most frames written in one flush.
const MAX_BATCH: usize = 32;
/// A batch stops growing past this many bytes, so the write deadline bounds about one
/// maximum-size frame, as derper's per-frame deadline does.
const MAX_BATCH_BYTES: usize = 64 << 10;
/// A reader gives the thread to other tasks after this many frames read without waiting: a
/// client that never stops sending must not starve the other connections (or its own writer).
const READ_BURST: u32 = 32;
/// Write timeout for mesh peers (derper's `privilegedWriteTimeout`), unless timeouts are off.
pub const PRIVILEGED_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// NotHere PeerGone frames: one per second per connection, burst of three (as derper).
const NOT_HERE_BURST: f64 = 3.0;

/// Why a DERP connection ended.
#[derive(Debug)]
pub enum SessionError {
    /// Socket error.
    Io(io::Error),
    /// The login failed.
    Login(LoginError),
    /// The client broke a protocol rule; the string says which.
    Protocol(String),
    /// A write did not finish within `--tcp-write-timeout`.
    WriteTimeout,
    /// Admission refused the client; the string says why.
    Rejected(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // read_exact's own text ("failed to fill whole buffer") says nothing to an admin.
            Self::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("EOF before the end of a frame")
            }
            Self::Io(e) => write!(f, "{e}"),
            Self::Login(e) => write!(f, "login: {e}"),
            Self::Protocol(s) => f.write_str(s),
            Self::WriteTimeout => f.write_str("write timeout"),
            Self::Rejected(s) => write!(f, "rejected: {s}"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<io::Error> for SessionError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// What the front door hands a DERP session: the facts it learned about the connection
/// (address, request headers, transport) and its handshake slot.
#[derive(Debug)]
pub struct Handoff {
    /// Peer address.
    pub remote: SocketAddr,
    /// `Derp-Fast-Start: 1`: no 101; the login follows the request head.
    pub fast_start: bool,
    /// `Ideal-Node` was present.
    pub not_ideal: bool,
    /// DERP runs inside a WebSocket ([`crate::ws`]), which already sent its own 101.
    pub websocket: bool,
    /// The connection's `--max-handshakes` slot, given back once the login is done.
    pub slot: Option<crate::limits::Slot>,
}

/// Runs a DERP connection to the end. `rd` must yield, first, any bytes the client pipelined
/// after its request head; `wr` is the same stream's write side.
pub async fn serve<R, W>(
    state: Arc<Relay>,
    mut rd: R,
    mut wr: W,
    mut up: Handoff,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // derper's `accepts`: every DERP connection, counted before its login.
    state.metrics.accepts.fetch_add(1, Relaxed);
    // Boxed, so that the login's buffers are not part of the connection's task for its life.
    let (info, session) = match Box::pin(login(&state, &mut rd, &mut wr, &up))
        .or(async {
            Timer::after(state.timeouts.login).await;
            Err(SessionError::Protocol("login timed out".into()))
        })
        .await
    {
        Ok(i) => i,
        Err(e) => {
            limited!(info, LOGINS, "derp: {}: login refused: {e}", up.remote);
            return Err(e);
        }
    };
    let is_mesh = admit(&state, &info, up.remote).await?;
    // Logged in: the connection no longer counts against --max-handshakes.
    drop(up.slot.take());
    let flags = flags_of(is_mesh, &info, &up);
    let conn_id = state.next_conn_id.fetch_add(1, Relaxed);
    let client = ClientHandle::with_mesh(conn_id, info.key, up.remote, flags, is_mesh);
    // Mesh peers get derper's privileged write timeout.
    let write_timeout = if is_mesh {
        state.timeouts.write.map(|_| PRIVILEGED_WRITE_TIMEOUT)
    } else {
        state.timeouts.write
    };
    let m = &state.metrics;
    if up.fast_start {
        m.fast_start_logins.fetch_add(1, Relaxed);
    }
    if up.not_ideal {
        m.notideal_connections.fetch_add(1, Relaxed);
    }
    debug!(
        "derp: {}: accepted {} {} (fast-start: {}, websocket: {}, mesh: {is_mesh}, app {:?})",
        up.remote,
        info.key,
        info.key.short(),
        up.fast_start,
        up.websocket,
        info.app_name
    );
    state.registry.register(&client);
    let _guard = Unregister {
        state: &state,
        client: &client,
        not_ideal: up.not_ideal,
    };
    let res = async {
        // The frame is dropped once written, not kept for the connection's life.
        let si = handshake::server_info_frame(&session);
        write_deadline(write_timeout, async {
            wr.write_all(&si).await?;
            wr.flush().await
        })
        .await?;
        drop(si);
        let reader = read_loop(&state, &client, &mut rd);
        let writer = write_loop(&state, &client, &mut wr, write_timeout);
        // Either side ending ends the connection; the other is dropped mid-operation, which
        // only abandons I/O on a socket about to be closed.
        reader.or(writer).await
    }
    .await;
    match &res {
        Ok(()) => debug!("derp: {}: {} disconnected", up.remote, info.key.short()),
        Err(e) => {
            limited!(
                info,
                CONN_ERRORS,
                "derp client {}{}: {e}",
                up.remote,
                info.key.short()
            );
        }
    }
    res
}

/// The login, up to an opened ClientInfo: the 101 (unless fast-start or WebSocket), ServerKey,
/// then the client's ClientInfo, read into a small buffer of the login's own.
async fn login<R, W>(
    state: &Relay,
    rd: &mut R,
    wr: &mut W,
    up: &Handoff,
) -> Result<(ClientInfo, SessionBox), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(256);
    if !up.fast_start && !up.websocket {
        hello.extend_from_slice(
            crate::http::switching_protocols(&state.public_key.untyped_hex()).as_bytes(),
        );
    }
    // Fast-start clients already know the key, but derper sends it anyway and they skip it.
    hello.extend_from_slice(&handshake::server_key_frame(&state.public_key));
    wr.write_all(&hello).await?;
    wr.flush().await?;
    let mut h = [0u8; HEADER_LEN];
    rd.read_exact(&mut h).await?;
    let (t, len) = frame::decode_header(&h);
    handshake::check_client_info_header(t, len).map_err(SessionError::Login)?;
    let n = len as usize;
    // derper takes up to 256 KiB; real ClientInfos are under 200 bytes. Read into a small
    // buffer of the login's own, not a pool buffer that half-logins could pin.
    if n > handshake::CLIENT_INFO_ACCEPT_MAX {
        return Err(SessionError::Login(LoginError::TooLong(len)));
    }
    let mut buf = [0u8; handshake::CLIENT_INFO_ACCEPT_MAX];
    rd.read_exact(&mut buf[..n]).await?;
    handshake::open_client_info(&state.private_key, &buf[..n]).map_err(SessionError::Login)
}

/// Whether the logged-in client may stay, and whether it is a mesh peer (the region's mesh key:
/// never checked, as in derper). Others pass the admission checks and `--max-clients`; a
/// refused client sees EOF, no error frame.
async fn admit(state: &Relay, info: &ClientInfo, remote: SocketAddr) -> Result<bool, SessionError> {
    let is_mesh = match (&state.mesh_key, &info.mesh_key) {
        (Some(ours), Some(theirs)) => ct_eq(ours, theirs),
        _ => false,
    };
    if is_mesh {
        return Ok(true);
    }
    let mut verdict = state.admission.check(&info.key, remote).await;
    let m = &state.metrics;
    if verdict.is_ok() && m.current_connections.load(Relaxed) >= state.limits.max_clients {
        m.clients_full.fetch_add(1, Relaxed);
        verdict = Err(format!(
            "server full (--max-clients {})",
            state.limits.max_clients
        ));
    }
    match verdict {
        Ok(()) => Ok(false),
        Err(why) => {
            limited!(
                info,
                LOGINS,
                "derp: {remote}: client {} rejected: {why}",
                info.key
            );
            Err(SessionError::Rejected(why))
        }
    }
}

/// The PeerPresent flags of a logged-in client.
fn flags_of(is_mesh: bool, info: &ClientInfo, up: &Handoff) -> u8 {
    let mut flags = 0;
    if is_mesh {
        flags |= peer_flags::IS_MESH_PEER;
    }
    if info.is_prober {
        flags |= peer_flags::IS_PROBER;
    }
    if up.not_ideal {
        flags |= peer_flags::NOT_IDEAL;
    }
    if flags == 0 {
        flags = peer_flags::IS_REGULAR;
    }
    flags
}

/// Unregisters the client on every exit path.
struct Unregister<'a> {
    state: &'a Relay,
    client: &'a Arc<ClientHandle>,
    not_ideal: bool,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.client.close();
        self.state.registry.unregister(self.client);
        self.client.drain_on_close(&self.state.metrics);
        if self.not_ideal {
            self.state
                .metrics
                .notideal_connections
                .fetch_sub(1, Relaxed);
        }
    }
}

/// Constant-time comparison of two mesh keys.
fn ct_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

async fn write_deadline<T>(
    timeout: Option<Duration>,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, SessionError> {
    match timeout {
        None => Ok(fut.await?),
        Some(d) => {
            async { fut.await.map_err(SessionError::Io) }
                .or(async {
                    Timer::after(d).await;
                    Err(SessionError::WriteTimeout)
                })
                .await
        }
    }
}

/// What a session's reader keeps between frames.
struct ReadState {
    not_here: TokenBucket,
    routes: RouteCache,
    connected_at: Instant,
}

/// Reads the client's frames until it closes: each header is charged to the rate limit, judged
/// by [`frame::check_len`], then its packet relayed, its control payload acted on, or skipped.
async fn read_loop<R: AsyncRead + Unpin>(
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

/// One frame waiting in a writer batch.
enum Out {
    Packet(PacketBuf),
    Small(SmallFrame),
}

impl Out {
    fn bytes(&self) -> &[u8] {
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

async fn write_loop<W: AsyncWrite + Unpin>(
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
        let res = write_deadline(write_timeout, write_batch(wr, &batch)).await;
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

/// Writes every frame of the batch with vectored writes, then flushes once.
async fn write_batch<W: AsyncWrite + Unpin>(wr: &mut W, batch: &[Out]) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); MAX_BATCH + 2];
    let n = batch.len().min(slices.len());
    for (s, o) in slices.iter_mut().zip(batch) {
        *s = IoSlice::new(o.bytes());
    }
    write_all_vectored(wr, &mut slices[..n]).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A whole session over in-memory streams, as the `session` fuzz target runs it: the login,
    /// a Ping, a packet to itself, then EOF ends the connection and nothing stays behind.
    #[test]
    fn in_memory_session_ends_at_eof_and_leaves_nothing() {
        use crate::key::NodePrivate;
        let mut cfg = crate::config::Config::dev_loopback();
        cfg.limits.buffer_budget = 1 << 20;
        let server = NodePrivate::from_bytes([0x11; KEY_LEN]);
        let state = Arc::new(Relay::new(&cfg, server.clone()).unwrap());
        let client = NodePrivate::from_bytes([0x22; KEY_LEN]);
        let me = client.public();
        let frame = |t: FrameType, payload: &[u8]| {
            let mut h = [0u8; HEADER_LEN];
            frame::encode_header(&mut h, t, payload.len() as u32);
            [&h[..], payload].concat()
        };
        let input = [
            handshake::client_info_frame(&client, &server.public(), br#"{"version":2}"#),
            frame(FrameType::Ping, b"pingpong"),
            frame(FrameType::SendPacket, &[&me.0[..], b"hello"].concat()),
        ]
        .concat();
        let mut out = Vec::new();
        let up = Handoff {
            remote: "192.0.2.1:41641".parse().unwrap(),
            fast_start: true,
            not_ideal: false,
            websocket: false,
            slot: None,
        };
        // Not ready once after the input, so that the writer runs before the EOF ends it all.
        let rd = smol::io::Cursor::new(input).chain(crate::net::tests::source(0, true));
        smol::block_on(serve(state.clone(), rd, &mut out, up)).unwrap();
        // ServerKey, ServerInfo, then the Pong and the packet (in either order).
        let mut types = Vec::new();
        let mut b = &out[..];
        while let Some((h, rest)) = b.split_first_chunk::<HEADER_LEN>() {
            let (t, len) = frame::decode_header(h);
            types.push(t);
            b = &rest[len as usize..];
        }
        types[2..].sort_unstable();
        let want = [
            FrameType::ServerKey,
            FrameType::ServerInfo,
            FrameType::RecvPacket,
            FrameType::Pong,
        ];
        assert_eq!(types, want.map(|t| t as u8));
        assert_eq!(state.metrics.current_connections.load(Relaxed), 0);
        assert_eq!(state.registry.key_count(), 0);
        let p = state.pool.stats();
        assert_eq!((p.small.2, p.large.2), (0, 0), "{p:?}");
    }

    /// A client of the session tests: its side of two in-memory pipes to one session.
    struct PipePeer {
        rd: piper::Reader,
        wr: piper::Writer,
        key: crate::key::NodePrivate,
    }

    impl PipePeer {
        /// Logs in over the pipes, as a client after a fast-start upgrade.
        async fn login(rd: piper::Reader, wr: piper::Writer) -> Self {
            let mut p = Self {
                rd,
                wr,
                key: crate::key::NodePrivate::generate(),
            };
            let (t, payload) = p.frame().await;
            let server = handshake::parse_server_key(t, &payload).unwrap();
            let ci = handshake::client_info_frame(&p.key, &server, br#"{"version":2}"#);
            p.wr.write_all(&ci).await.unwrap();
            let (t, payload) = p.frame().await;
            let bx = SessionBox::new(&p.key, &server);
            handshake::read_server_info(&bx, t, &payload).unwrap();
            p
        }

        async fn frame(&mut self) -> (u8, Vec<u8>) {
            let mut h = [0u8; HEADER_LEN];
            self.rd.read_exact(&mut h).await.unwrap();
            let (t, len) = frame::decode_header(&h);
            let mut payload = vec![0u8; len as usize];
            self.rd.read_exact(&mut payload).await.unwrap();
            (t, payload)
        }

        async fn send(&mut self, t: FrameType, payload: &[u8]) {
            let mut h = [0u8; HEADER_LEN];
            frame::encode_header(&mut h, t, payload.len() as u32);
            self.wr
                .write_all(&[&h[..], payload].concat())
                .await
                .unwrap();
        }
    }

    /// A session on `state` over two in-memory pipes, run on `ex`; the client's ends.
    fn pipe_session<'a>(
        ex: &smol::LocalExecutor<'a>,
        state: &Arc<Relay>,
    ) -> (
        smol::Task<Result<(), SessionError>>,
        piper::Reader,
        piper::Writer,
    ) {
        let (server_rd, client_wr) = piper::pipe(64 << 10);
        let (client_rd, server_wr) = piper::pipe(64 << 10);
        let up = Handoff {
            remote: "192.0.2.1:41641".parse().unwrap(),
            fast_start: true,
            not_ideal: false,
            websocket: false,
            slot: None,
        };
        let task = ex.spawn(serve(state.clone(), server_rd, server_wr, up));
        (task, client_rd, client_wr)
    }

    /// Two sessions on one relay over in-memory pipes, no sockets: a packet from A reaches B as
    /// RecvPacket from A's key; a Ping is answered with its Pong; when A leaves, B, which
    /// received from A, hears PeerGone(A, Disconnected); when both have left nothing stays.
    #[test]
    fn two_sessions_relay_ping_and_peer_gone_over_pipes() {
        let state = Arc::new(
            Relay::new(&crate::config::Config::dev_loopback(), {
                crate::key::NodePrivate::generate()
            })
            .unwrap(),
        );
        let ex = smol::LocalExecutor::new();
        let test = async {
            let (a_task, rd, wr) = pipe_session(&ex, &state);
            let mut a = PipePeer::login(rd, wr).await;
            let (b_task, rd, wr) = pipe_session(&ex, &state);
            let mut b = PipePeer::login(rd, wr).await;
            let (a_key, b_key) = (a.key.public(), b.key.public());

            a.send(
                FrameType::SendPacket,
                &[&b_key.0[..], b"over a pipe"].concat(),
            )
            .await;
            let (t, p) = b.frame().await;
            assert_eq!(t, FrameType::RecvPacket as u8);
            assert_eq!(p, [&a_key.0[..], b"over a pipe"].concat());

            b.send(FrameType::Ping, b"12345678").await;
            assert_eq!(
                b.frame().await,
                (FrameType::Pong as u8, b"12345678".to_vec())
            );

            drop(a);
            a_task.await.unwrap(); // EOF at a frame boundary: a clean close
            let (t, p) = b.frame().await;
            assert_eq!(t, FrameType::PeerGone as u8);
            assert_eq!(
                p,
                [&a_key.0[..], &[PeerGoneReason::Disconnected as u8]].concat()
            );

            drop(b);
            b_task.await.unwrap();
            assert_eq!(state.metrics.current_connections.load(Relaxed), 0);
            assert_eq!(state.registry.key_count(), 0);
            assert_eq!(state.registry.peer_gone_interests(), 0);
            let p = state.pool.stats();
            assert_eq!((p.small.2, p.large.2), (0, 0), "{p:?}");
        };
        let deadline = async {
            Timer::after(Duration::from_secs(20)).await;
            panic!("the sessions did not finish within 20 s");
        };
        smol::block_on(ex.run(test.or(deadline)));
    }
}
