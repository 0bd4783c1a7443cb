//! The WebSocket connection both halves share, the control frames queued for the writer, and
//! the write half: the server's unmasked binary messages, each straight from the caller's
//! buffers.

use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};

use super::read::WsRead;

/// The server side of an accepted WebSocket (the 101 already sent) as a DERP byte stream.
/// `leftover` holds the bytes the client sent after its request head.
///
/// Payload bytes stream through: a frame's payload is unmasked straight into the reader's
/// buffer (a pool buffer for packets), and a written message goes to the socket from the
/// writer's buffers. What a connection holds of its own is fixed and small ([`Conn`],
/// [`WsRead`]: under 1 KiB), whatever the client sends or leaves unfinished. Public only
/// for the `websocket` fuzz target; not a stable API.
#[doc(hidden)]
pub async fn transport<S>(stream: S, leftover: Vec<u8>) -> (WsRead<S>, WsWrite<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = Arc::new(Mutex::new(Conn {
        stream,
        ctl: [0; CTL_CAP],
        ctl_len: 0,
        ctl_pos: 0,
        out_hdr: [0; 10],
        out_hdr_len: 0,
        out_hdr_pos: 0,
        out_left: 0,
    }));
    let rd = WsRead::new(conn.clone(), leftover);
    (rd, WsWrite { conn })
}

/// Room for queued control frames (a pong and a close reply: 2 + 125 bytes each at most).
const CTL_CAP: usize = 256;

/// The socket, shared by the reader and the writer (which run in one task), and the write
/// side's state: the data frame being written and the control frames waiting for its end.
pub(super) struct Conn<S> {
    pub(super) stream: S,
    ctl: [u8; CTL_CAP],
    pub(super) ctl_len: usize,
    ctl_pos: usize,
    out_hdr: [u8; 10],
    out_hdr_len: usize,
    out_hdr_pos: usize,
    /// Payload bytes of the data frame being written still to go (0: at a frame boundary).
    pub(super) out_left: usize,
}

pub(super) fn lock<S>(conn: &Mutex<Conn<S>>) -> MutexGuard<'_, Conn<S>> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A server frame header (unmasked) for `len` payload bytes; returns its length.
fn server_header(out: &mut [u8; 10], op: u8, len: usize) -> usize {
    out[0] = 0x80 | op;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(l) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&l.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Queues a control frame; dropped when there is no room (pongs to a ping flood the
    /// client does not read).
    pub(super) fn queue_ctl(&mut self, op: u8, payload: &[u8]) {
        let mut h = [0u8; 10];
        let hl = server_header(&mut h, op, payload.len());
        let end = self.ctl_len + hl + payload.len();
        if end <= CTL_CAP {
            self.ctl[self.ctl_len..self.ctl_len + hl].copy_from_slice(&h[..hl]);
            self.ctl[self.ctl_len + hl..end].copy_from_slice(payload);
            self.ctl_len = end;
        }
    }

    /// Writes the queued control frames; only between data frames.
    pub(super) fn poll_ctl(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.out_left > 0 {
            return Poll::Ready(Ok(()));
        }
        while self.ctl_pos < self.ctl_len {
            let n =
                ready!(Pin::new(&mut self.stream)
                    .poll_write(cx, &self.ctl[self.ctl_pos..self.ctl_len]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.ctl_pos += n;
        }
        self.ctl_pos = 0;
        self.ctl_len = 0;
        Poll::Ready(Ok(()))
    }
}

/// Writes as binary messages: one per write call, a vectored write (the DERP writer's batch)
/// as one message of at most [`MAX_GATHER`] bytes, each straight from the caller's buffers.
#[doc(hidden)]
pub struct WsWrite<S> {
    conn: Arc<Mutex<Conn<S>>>,
}

/// Largest message a write starts.
const MAX_GATHER: usize = 64 << 10;
/// Most slices one vectored write passes on (the DERP writer's batch is at most 34).
const MAX_SLICES: usize = 40;

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsWrite<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut c = lock(&self.conn);
        let c = &mut *c;
        loop {
            if c.out_left == 0 {
                ready!(c.poll_ctl(cx))?;
                let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_GATHER);
                if total == 0 {
                    return Poll::Ready(Ok(0));
                }
                c.out_hdr_len = server_header(&mut c.out_hdr, 0x2, total);
                c.out_hdr_pos = 0;
                c.out_left = total;
            }
            // The rest of the header, then the payload up to the frame's end, in one write.
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let hdr_left = c.out_hdr_len - c.out_hdr_pos;
            slices[0] = IoSlice::new(&c.out_hdr[c.out_hdr_pos..c.out_hdr_len]);
            let mut n = 1;
            let mut room = c.out_left;
            for b in bufs.iter().filter(|b| !b.is_empty()) {
                if room == 0 || n == MAX_SLICES {
                    break;
                }
                let k = b.len().min(room);
                slices[n] = IoSlice::new(&b[..k]);
                room -= k;
                n += 1;
            }
            let first = usize::from(hdr_left == 0);
            let w = ready!(Pin::new(&mut c.stream).poll_write_vectored(cx, &slices[first..n]))?;
            if w == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if w <= hdr_left {
                c.out_hdr_pos += w;
                continue;
            }
            c.out_hdr_pos = c.out_hdr_len;
            let payload = w - hdr_left;
            c.out_left -= payload;
            return Poll::Ready(Ok(payload));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut c = lock(&self.conn);
        ready!(c.poll_ctl(cx))?;
        Pin::new(&mut c.stream).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut c = lock(&self.conn);
        ready!(c.poll_ctl(cx))?;
        Pin::new(&mut c.stream).poll_close(cx)
    }
}

impl<S> fmt::Debug for WsWrite<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsWrite").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use smol::io::AsyncWriteExt;

    use super::super::read::tests::{client_reads, pair};

    #[test]
    fn writes_are_unmasked_binary_messages() {
        let (server, mut client) = pair();
        smol::block_on(async {
            let (_rd, mut wr) = transport(server, Vec::new()).await;
            let bufs = [IoSlice::new(b"abc"), IoSlice::new(b""), IoSlice::new(b"de")];
            let n = wr.write_vectored(&bufs).await.unwrap();
            assert_eq!(n, 5);
            wr.write_all(b"f").await.unwrap();
            wr.flush().await.unwrap();
        });
        let want = [&[0x82, 5][..], b"abcde", &[0x82, 1], b"f"].concat();
        assert_eq!(client_reads(&mut client, want.len()), want);
    }
}
