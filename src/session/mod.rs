//! One DERP session, the server's side of a DERP connection after its HTTP upgrade: the login,
//! then a reader (frames from the client → pooled buffers → destination queues) and a writer
//! (queues → batched frames → one flush).
//!
//! - here: [`serve`] (one connection from login to close), [`Handoff`] (what the front door
//!   hands it), [`SessionError`] (why it ended), and the write deadline both sides use.
//! - `login.rs`: ServerKey → ClientInfo, the admission checks and `--max-clients`, the
//!   PeerPresent flags.
//! - `read.rs`: the reader: frames → pool buffers → destination queues, and the per-frame
//!   rules.
//! - `write.rs`: the writer: queues → one batch → one vectored write and one flush.

mod login;
mod read;
mod write;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use log::debug;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite};
use smol::Timer;

use crate::handshake::{self, LoginError};
use crate::lograte::{limited, CONN_ERRORS, LOGINS};
use crate::registry::ClientHandle;
use crate::relay::Relay;

use login::{admit, flags_of, login};
use read::read_loop;
use write::write_loop;

/// KeepAlive period; each connection adds a jitter in [0, 5 s) drawn once (as derper).
pub const KEEPALIVE: Duration = Duration::from_secs(60);
/// Write timeout for mesh peers (derper's `privilegedWriteTimeout`), unless timeouts are off.
pub const PRIVILEGED_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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
    // The login in its own scope: what it learnt (the client's info, the session's keys) is
    // gone before the long part; the connection's task keeps only the client.
    let (client, si, write_timeout, not_ideal) = {
        // Boxed, so that the login's buffers are not part of the connection's task for its
        // life.
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
        // Boxed too: admission (its HTTP client included) is large and runs once.
        let is_mesh = Box::pin(admit(&state, &info, up.remote)).await?;
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
        let si = handshake::server_info_frame(&session);
        (client, si, write_timeout, up.not_ideal)
    };
    state.registry.register(&client);
    let _guard = Unregister {
        state: &state,
        client: &client,
        not_ideal,
    };
    let res = async {
        let one = std::slice::from_ref(&si);
        write_deadline(write_timeout, crate::net::write_all_vectored(&mut wr, one)).await?;
        // The frame is dropped once written, not kept for the connection's life.
        drop(si);
        let reader = read_loop(&state, &client, &mut rd);
        let writer = write_loop(&state, &client, &mut wr, write_timeout);
        // Either side ending ends the connection; the other is dropped mid-operation, which
        // only abandons I/O on a socket about to be closed.
        reader.or(writer).await
    }
    .await;
    let (remote, key) = (client.remote, client.key.short());
    match &res {
        Ok(()) => debug!("derp: {remote}: {key} disconnected"),
        Err(e) => limited!(info, CONN_ERRORS, "derp client {remote}{key}: {e}"),
    }
    res
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

/// A write under the connection's write timeout (`None`: no timeout). The timer is armed
/// only once the write has to wait (most batches go out at once, and an idle connection holds
/// none), and the write is kept once: an `async fn` doing this kept its argument twice, for
/// the connection's life (every connection's task is as large as its largest state).
pub(super) struct WriteDeadline<F> {
    write: F,
    timeout: Option<Duration>,
    timer: Option<Timer>,
}

pub(super) fn write_deadline<F>(timeout: Option<Duration>, write: F) -> WriteDeadline<F> {
    WriteDeadline {
        write,
        timeout,
        timer: None,
    }
}

impl<T, F: Future<Output = io::Result<T>> + Unpin> Future for WriteDeadline<F> {
    type Output = Result<T, SessionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut this.write).poll(cx) {
            return Poll::Ready(r.map_err(SessionError::Io));
        }
        let Some(d) = this.timeout else {
            return Poll::Pending;
        };
        let timer = this.timer.get_or_insert_with(|| Timer::after(d));
        match Pin::new(timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(Err(SessionError::WriteTimeout)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use smol::io::{AsyncReadExt, AsyncWriteExt};

    use crate::frame::{self, FrameType, PeerGoneReason, HEADER_LEN};
    use crate::handshake::SessionBox;
    use crate::key::KEY_LEN;

    /// A whole session over in-memory streams, as the `session` fuzz target runs it: the login,
    /// a Ping, a packet to itself, then EOF ends the connection and nothing stays behind.
    /// A fast-start, non-WebSocket connection from a documentation address.
    fn fast_start_handoff() -> Handoff {
        Handoff {
            remote: "192.0.2.1:41641".parse().unwrap(),
            fast_start: true,
            not_ideal: false,
            websocket: false,
            slot: None,
        }
    }

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
        let up = fast_start_handoff();
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
        let up = fast_start_handoff();
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
