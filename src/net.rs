//! Network plumbing below the DERP code: one stream type for plain TCP and TLS (server and
//! client side), a stream shared by a connection's reader and writer, and the TCP options
//! derpd sets on its connections.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use smol::io::{AsyncRead, AsyncWrite};
use smol::Async;

use crate::sync::lock;

/// TCP options for a connection: derper's keep-alive (`--tcp-keepalive-time`) and
/// `--tcp-user-timeout`; TCP_NODELAY always.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpOptions {
    /// Keep-alive idle time and probe interval; `None` = off.
    pub keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`; `None` = the kernel's.
    pub user_timeout: Option<Duration>,
}

impl TcpOptions {
    /// Sets them on `tcp` (errors ignored: an option the kernel lacks is not fatal).
    pub fn apply(&self, tcp: &TcpStream) {
        use rustix::net::sockopt;
        // Go sets TCP_NODELAY on every connection; we batch writes ourselves.
        let _ = sockopt::set_tcp_nodelay(tcp, true);
        if let Some(d) = self.keepalive {
            let _ = sockopt::set_socket_keepalive(tcp, true);
            let _ = sockopt::set_tcp_keepidle(tcp, d);
            let _ = sockopt::set_tcp_keepintvl(tcp, d);
        }
        if let Some(d) = self.user_timeout {
            let ms = u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
            let _ = sockopt::set_tcp_user_timeout(tcp, ms);
        }
    }
}

/// A connection, plain or TLS (accepted, or dialled to a mesh peer), behind one type so the
/// DERP code is compiled once.
pub enum Stream {
    /// Plain TCP.
    Plain(Async<TcpStream>),
    /// TLS, accepted.
    Tls(Box<futures_rustls::server::TlsStream<Async<TcpStream>>>),
    /// TLS, dialled (a mesh link).
    TlsClient(Box<futures_rustls::client::TlsStream<Async<TcpStream>>>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::Plain(_) => "Plain",
            Self::Tls(_) => "Tls",
            Self::TlsClient(_) => "TlsClient",
        };
        write!(f, "Stream::{kind}({:?})", self.local_addr())
    }
}

impl Stream {
    /// derpd's own address of the connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        let tcp = match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
            Self::TlsClient(s) => s.get_ref().0,
        };
        tcp.get_ref().local_addr().ok()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_close(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// The stream shared by a connection's reader and writer. Each poll holds the lock only for
/// its own duration. (futures-lite's `split` would lose vectored writes.)
#[derive(Clone, Debug)]
pub struct LockedStream(Arc<Mutex<Stream>>);

impl LockedStream {
    pub fn new(s: Stream) -> Self {
        Self(Arc::new(Mutex::new(s)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stream> {
        lock(&self.0)
    }
}

impl AsyncRead for LockedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl AsyncWrite for LockedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_close(cx)
    }
}
