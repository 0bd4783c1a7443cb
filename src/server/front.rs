//! One accepted connection up to the DERP hand-off: optional TLS, one bounded HTTP request
//! head, then a response, or the upgrade to DERP (plain or inside a WebSocket).
//!
//! Only [`handle_conn`] and [`setup`] need a socket: reading the head ([`read_head`]),
//! routing it ([`route`], a pure function) and writing a response ([`respond`]) work on any
//! stream, and the tests (`front/tests.rs`) drive them over in-memory pipes.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use log::debug;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Cursor};
use smol::{Async, Timer};

use super::listen::Listener;
use super::State;
use crate::http::{self, Home, Request};
use crate::limits::{Progress, Slot};
use crate::net::{LockedStream, Stream};
use crate::session::{self, Handoff};
use crate::tls;

/// A connection failed before or instead of a DERP session.
#[derive(Debug)]
pub(super) enum FrontError {
    Io(io::Error),
    Timeout(&'static str),
    /// Closed to make room for a new connection (`--max-handshakes`).
    Evicted,
    Head(http::HeadError),
    Derp(session::SessionError),
    /// A TLS-ALPN-01 validation connection, closed after its handshake.
    AcmeValidated,
}

impl std::fmt::Display for FrontError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Timeout(what) => write!(f, "{what} timed out"),
            Self::Evicted => f.write_str(
                "evicted before its login to make room for a new connection (--max-handshakes)",
            ),
            Self::Head(e) => write!(f, "{e}"),
            Self::Derp(e) => write!(f, "{e}"),
            Self::AcmeValidated => f.write_str("ACME TLS-ALPN-01 validation answered"),
        }
    }
}

impl From<io::Error> for FrontError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

pub(super) async fn handle_conn(
    state: &Arc<State>,
    tcp: Async<TcpStream>,
    remote: SocketAddr,
    which: Listener,
    slot: Slot,
) -> Result<(), FrontError> {
    state.tcp.apply(tcp.get_ref());
    // What the connection becomes is decided in its own scope: the request head and the
    // routing are gone before the long part, and the connection's task (as large as its
    // largest state, for its whole life) holds only the stream and the hand-off.
    let next = {
        // Boxed: the TLS handshake and head reading are large and short-lived; unboxed they
        // would be part of every connection's task for its whole life.
        let (stream, req, leftover) = Box::pin(setup(state, tcp, remote, which, &slot))
            .or(async {
                Timer::after(state.relay.timeouts.handshake).await;
                Err(FrontError::Timeout("TLS handshake and request head"))
            })
            .await?;
        slot.progress(Progress::Upgraded);
        match route(&req, remote, which, state.derp_enabled, &state.home) {
            Action::Respond(resp) => Next::Respond(stream, resp),
            Action::Debug => {
                let resp = super::debug::respond(state, &req, remote, stream.local_addr());
                Next::Respond(stream, resp)
            }
            Action::AcmeHttp01(token) => {
                let resp = match &state.acme {
                    Some(ch) => {
                        http::acme_challenge(ch.http01(&token).as_deref(), req.method == "HEAD")
                    }
                    None => http::port80(&req),
                };
                Next::Respond(stream, resp)
            }
            Action::Derp => {
                let up = Handoff {
                    remote,
                    fast_start: req.fast_start,
                    not_ideal: req.not_ideal,
                    websocket: false,
                    slot: None,
                };
                Next::Derp(stream, leftover, up)
            }
            Action::WebSocket(acc) => Next::WebSocket(stream, leftover, acc),
        }
    };
    match next {
        Next::Respond(mut stream, resp) => {
            respond(&mut stream, &resp, state.relay.timeouts.handshake).await?;
            Ok(())
        }
        Next::Derp(stream, leftover, mut up) => {
            up.slot = Some(slot);
            let shared = LockedStream::new(stream);
            let rd = Cursor::new(leftover).chain(shared.clone());
            session::serve(state.relay.clone(), rd, shared, up)
                .await
                .map_err(FrontError::Derp)
        }
        Next::WebSocket(stream, leftover, acc) => {
            let timeout = state.relay.timeouts.handshake;
            // Boxed: a WebSocket session is larger than a plain one, and every connection's
            // task would otherwise be that large.
            let ws = crate::ws::serve(&state.relay, timeout, stream, leftover, acc, remote, slot);
            Box::pin(ws).await.map_err(FrontError::Derp)
        }
    }
}

/// What a connection becomes once its request head is routed.
enum Next {
    /// A whole response, then close.
    Respond(Stream, Vec<u8>),
    /// A DERP session on the stream (after the bytes that followed the head).
    Derp(Stream, Vec<u8>, Handoff),
    /// DERP inside an accepted WebSocket.
    WebSocket(Stream, Vec<u8>, crate::ws::Accept),
}

/// A new connection up to its request head: the first byte within `--first-byte-timeout`, TLS
/// on the main listener in TLS mode, then one bounded head (a malformed one is answered with
/// its error, as Go's server does). Returns the stream, the request and the bytes after it.
async fn setup(
    state: &State,
    tcp: Async<TcpStream>,
    remote: SocketAddr,
    which: Listener,
    slot: &Slot,
) -> Result<(Stream, Request, Vec<u8>), FrontError> {
    // Clients speak first (ClientHello or request head), at once: a silent connection is
    // closed early instead of holding its slot for the whole handshake deadline.
    async { tcp.readable().await.map_err(FrontError::Io) }
        .or(async {
            Timer::after(state.relay.timeouts.first_byte).await;
            let m = &state.relay.metrics;
            m.first_byte_timeouts.fetch_add(1, Relaxed);
            Err(FrontError::Timeout("first byte"))
        })
        .await?;
    slot.progress(Progress::Talking);
    let mut stream = match (&state.tls, which) {
        (Some(acc), Listener::Main) => {
            let tls = tls::stream::accept(acc.clone(), tcp).await.map_err(|e| {
                FrontError::Io(io::Error::new(e.kind(), format!("TLS handshake: {e}")))
            })?;
            debug!("{remote}: TLS handshake: {tls:?}");
            let aead = tls::ciphers::aead_index(tls.negotiated_suite());
            state.relay.metrics.tls_aead[aead].fetch_add(1, Relaxed);
            if tls.is_acme_validation() {
                // An ACME CA's TLS-ALPN-01 validation: the handshake was all of it (RFC 8737).
                return Err(FrontError::AcmeValidated);
            }
            Stream::Tls(Box::new(tls))
        }
        _ => Stream::Plain(tcp),
    };
    // The head (and the reply to a refused one) runs under the caller's handshake deadline.
    let (req, leftover) = read_head(&mut stream).await?;
    Ok((stream, req, leftover))
}

/// What a request head leads to.
#[derive(Debug)]
enum Action {
    /// A whole response, then close.
    Respond(Vec<u8>),
    /// The DERP upgrade (plain, or a WebSocket client asking for it without the WebSocket
    /// handshake, as derper allows).
    Derp,
    /// DERP inside an accepted WebSocket.
    WebSocket(crate::ws::Accept),
    /// `/debug` or `/debug/…`: answered by the caller, which has what the pages and their
    /// access rule need (the relay state, the connection's own address).
    Debug,
    /// An ACME HTTP-01 validation on port 80 (`/.well-known/acme-challenge/<token>`): answered
    /// by the caller from the certificate keeper's challenges, or redirected as any other
    /// port-80 request when there is no keeper (`--certmode manual`).
    AcmeHttp01(String),
}

/// Routes a request as derper's mux does: a pure function of the request, the listener it
/// came on and two settings (`--derp`, `--home`). `remote` only names the client in log
/// lines.
fn route(
    req: &Request,
    remote: SocketAddr,
    which: Listener,
    derp_enabled: bool,
    home: &Home,
) -> Action {
    let head = req.method == "HEAD";
    // derper's port 80 hands `/debug…` to the main mux (access rules apply); all else redirects.
    if which == Listener::Port80 && !req.target.starts_with("/debug") {
        if let Some(token) = req.path.strip_prefix(http::ACME_CHALLENGE_PREFIX) {
            return Action::AcmeHttp01(token.to_string());
        }
        return Action::Respond(http::port80(req));
    }
    Action::Respond(match req.path.as_str() {
        "/derp/probe" | "/derp/latency-check" => http::probe(&req.method),
        "/derp" if !derp_enabled => http::text_error(404, "Not Found", "derp server disabled"),
        "/derp" => match req.upgrade.as_str() {
            "websocket" if req.ws_protocol.contains("derp") => {
                match crate::ws::accept(req, remote) {
                    Ok(acc) => return Action::WebSocket(acc),
                    Err(refusal) => refusal,
                }
            }
            "derp" | "websocket" => return Action::Derp,
            other => {
                if !other.is_empty() {
                    debug!("{remote}: weird upgrade {other:?}");
                }
                http::text_error(426, "Upgrade Required", "DERP requires connection upgrade")
            }
        },
        p if p == "/debug" || p.starts_with("/debug/") => return Action::Debug,
        "/generate_204" => http::no_content(req.challenge.as_deref()),
        "/robots.txt" => http::robots(head),
        _ => http::home(home, derp_enabled, head),
    })
}

/// Writes a whole response, flushes and closes, within `timeout`.
async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    resp: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let write = async {
        stream.write_all(resp).await?;
        stream.flush().await?;
        stream.close().await
    };
    write
        .or(async {
            Timer::after(timeout).await;
            Err(io::ErrorKind::TimedOut.into())
        })
        .await
}

/// Reads one request head. Returns it and the bytes that followed it (fast-start login). A
/// refused head (too large, malformed) is answered with its error, as Go's server does, and
/// the error returned: the caller then closes.
async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<(Request, Vec<u8>), FrontError> {
    match read_head_only(stream).await {
        Err(FrontError::Head(e)) => {
            // Tell an HTTP client what was wrong; it is closed after.
            let _ = stream.write_all(&http::head_error(&e)).await;
            Err(FrontError::Head(e))
        }
        r => r,
    }
}

/// [`read_head`] without the reply to a refused head.
async fn read_head_only<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Request, Vec<u8>), FrontError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let start = buf.len();
        let room = (http::MAX_HEAD_LEN + 1 - start).min(4096);
        buf.resize(start + room, 0);
        let n = stream.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(FrontError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if let Some((req, used)) = http::parse_head(&buf).map_err(FrontError::Head)? {
            // Copy the rest out so the head buffer is freed for the connection's lifetime.
            return Ok((req, buf[used..].to_vec()));
        }
    }
}

#[cfg(test)]
mod tests;
