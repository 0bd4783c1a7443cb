//! Network plumbing below the DERP code: one stream type for plain TCP and TLS (server and
//! client side), a stream shared by a connection's reader and writer, and the TCP options
//! derpd sets on its connections.

use std::io::{self, IoSlice};
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
    /// TLS, accepted: rustls's handshake, derpd's records ([`crate::tls::stream`]).
    Tls(Box<crate::tls::stream::TlsStream>),
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
            Self::Tls(s) => s.get_ref(),
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
        bufs: &[IoSlice<'_>],
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
        bufs: &[IoSlice<'_>],
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

/// The rate limit of a frame being skipped: its first `prepaid` bytes are charged already.
pub(crate) struct Metered<'a> {
    pub bucket: &'a mut crate::limits::Bucket,
    pub limits: &'a crate::limits::RateLimits,
    pub prepaid: u64,
}

/// Skips `n` payload bytes of a frame we ignore. With `rate`, every byte past the prepaid ones
/// is charged (in pieces of one maximum frame) before it is read.
pub(crate) async fn discard<R: AsyncRead + Unpin>(
    rd: &mut R,
    n: u64,
    rate: Option<Metered<'_>>,
) -> io::Result<()> {
    let Some(Metered {
        bucket,
        limits,
        prepaid,
    }) = rate
    else {
        return skip(rd, n).await;
    };
    let mut paid = prepaid.min(n);
    let mut left = n;
    loop {
        skip(rd, paid).await?;
        left -= paid;
        if left == 0 {
            return Ok(());
        }
        paid = left.min(crate::limits::MIN_RATE_BURST);
        bucket.pay(limits, paid).await;
    }
}

/// Bytes one read takes while skipping.
const SKIP_BUF: usize = 16 << 10;
/// Reads of a skip between two yields: about one maximum frame, as one frame read is.
const SKIP_BURST: u32 = 4;

std::thread_local! {
    /// Where skipped bytes go: one buffer per executor thread, not per connection. Nothing
    /// needs them after the read, so it is never held across a wait.
    static SKIP_SINK: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SKIP_BUF].into_boxed_slice());
}

/// Reads and drops `n` bytes: one read per [`SKIP_BUF`] bytes that are there, no buffer held
/// while waiting for more.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> io::Result<()> {
    std::future::poll_fn(|cx| {
        // A frame may declare 4 GiB: while its bytes keep coming, the reads never wait, so
        // give the thread to the other connections after every SKIP_BURST reads.
        let mut reads = 0u32;
        let mut step = |buf: &mut [u8]| {
            while n > 0 {
                if reads == SKIP_BURST {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let k = n.min(buf.len() as u64) as usize;
                match Pin::new(&mut *rd).poll_read(cx, &mut buf[..k]) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
                    }
                    Poll::Ready(Ok(got)) => n -= got as u64,
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                }
                reads += 1;
            }
            Poll::Ready(Ok(()))
        };
        SKIP_SINK.with(|sink| match sink.try_borrow_mut() {
            Ok(mut buf) => step(&mut buf),
            // Only if a reader's own poll_read skipped a frame too (none does): a small one.
            Err(_) => step(&mut [0u8; 256]),
        })
    })
    .await
}

/// Most parts one vectored write passes on (a session's batch is at most 34 frames, a mesh
/// link's 2 slices a packet); the rest go in the next write.
const WRITE_PARTS: usize = 64;

/// Writes every part with vectored writes, then flushes once. A future of its own, not an
/// `async fn`: the `IoSlice`s are made anew in each poll (on the stack) instead of being kept
/// in the caller's task, which every connection holds for its whole life.
pub(crate) fn write_all_vectored<'a, W, B>(wr: &'a mut W, parts: &'a [B]) -> WriteAll<'a, W, B>
where
    W: AsyncWrite + Unpin,
    B: AsRef<[u8]>,
{
    WriteAll {
        wr,
        parts,
        written: 0,
    }
}

/// [`write_all_vectored`]'s future.
pub(crate) struct WriteAll<'a, W, B> {
    wr: &'a mut W,
    parts: &'a [B],
    /// Bytes of the parts written so far.
    written: usize,
}

impl<W: AsyncWrite + Unpin, B: AsRef<[u8]>> std::future::Future for WriteAll<'_, W, B> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut slices = [IoSlice::new(&[]); WRITE_PARTS];
            let (mut n, mut skip) = (0, this.written);
            for part in this.parts {
                let b = part.as_ref();
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                let Some(s) = slices.get_mut(n) else { break };
                *s = IoSlice::new(&b[skip..]);
                skip = 0;
                n += 1;
            }
            if n == 0 {
                return Pin::new(&mut *this.wr).poll_flush(cx);
            }
            match Pin::new(&mut *this.wr).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => this.written += w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;

    /// A stream of `left` bytes that counts its reads and, with `stall`, is not ready every
    /// other time it is asked.
    pub(crate) struct Source {
        pub(crate) left: u64,
        pub(crate) reads: u32,
        stall: bool,
        stalled: bool,
    }

    impl AsyncRead for Source {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            if self.stall {
                self.stalled = !self.stalled;
                if self.stalled {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            self.reads += 1;
            let k = self.left.min(buf.len() as u64);
            self.left -= k;
            Poll::Ready(Ok(k as usize))
        }
    }

    pub(crate) fn source(left: u64, stall: bool) -> Source {
        Source {
            left,
            reads: 0,
            stall,
            stalled: false,
        }
    }

    #[test]
    fn discard_reads_in_large_pieces() {
        // 1 MiB skipped: 64 reads of 16 KiB, not 16,384 of 64 bytes (one syscall each on TCP).
        let mut s = source(10 << 20, false);
        smol::block_on(discard(&mut s, 1 << 20, None)).unwrap();
        assert_eq!(s.left, 9 << 20, "exactly the frame's bytes are taken");
        assert!(s.reads <= 64, "{} reads for 1 MiB", s.reads);
        // Not ready half the time: every byte still skipped once, then EOF is an error.
        let mut s = source(3 << 20, true);
        smol::block_on(discard(&mut s, (2 << 20) + 5, None)).unwrap();
        assert_eq!(s.left, (1 << 20) - 5);
        let e = smol::block_on(discard(&mut s, 2 << 20, None)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(s.left, 0);
    }

    #[test]
    fn discard_charges_every_byte_past_the_prepaid_ones() {
        let limits = crate::limits::RateLimits::default();
        // 1 MB/s: the nine pieces past the prepaid one cost 590 ms of waiting in all.
        limits.set(crate::limits::RateConfig {
            bytes_per_sec: 1_000_000,
            burst_bytes: 0,
        });
        let mut bucket = crate::limits::Bucket::default();
        // The reader took the header and one maximum frame off the full bucket.
        let burst = crate::limits::MIN_RATE_BURST;
        assert_eq!(bucket.delay(&limits, burst), None);
        let mut s = source(u64::MAX, false);
        let rate = Metered {
            bucket: &mut bucket,
            limits: &limits,
            prepaid: burst,
        };
        let t0 = Instant::now();
        smol::block_on(discard(&mut s, 10 * burst, Some(rate))).unwrap();
        let took = t0.elapsed();
        assert_eq!(u64::MAX - s.left, 10 * burst);
        // Nine more pieces charged (the bucket was empty): at least 590 ms at 1 MB/s, however
        // the time is split. (How many of the charges waited depends on how long each skip
        // took: a skip slower than a piece's 66 ms, as under QEMU on a loaded machine, refills
        // the bucket by that piece, so the count is only bounded below.)
        assert!(limits.waited.load(Relaxed) >= 1);
        assert!(took >= Duration::from_millis(550), "{took:?}");
    }
}
