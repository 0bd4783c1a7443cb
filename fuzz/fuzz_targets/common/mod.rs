//! What the network-facing targets share: an in-memory stream that hands the fuzzer's bytes
//! over in chunks of a chosen size, and may say "not ready" before each one, as a socket does;
//! then EOF. What is written to it is kept (up to a cap) for the target to check.

// Each target uses only some of these.
#![allow(dead_code)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};

/// Read sizes a mode picks from: one read of everything, and short reads that split headers,
/// keys and lengths everywhere.
const CHUNKS: [usize; 8] = [usize::MAX, 1, 2, 3, 5, 8, 64, 1000];

/// Most output kept; the rest is counted, not stored.
const OUT_CAP: usize = 1 << 20;

/// The fuzzer's bytes as a peer's side of a connection.
pub struct Feed {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
    /// Answer `Pending` (and wake at once) before each chunk: every wait path is taken.
    stall: bool,
    stalled: bool,
    /// What the code under test wrote, up to [`OUT_CAP`] bytes.
    pub out: Vec<u8>,
    /// Bytes written in all.
    pub written: usize,
}

impl Feed {
    /// `data` read `CHUNKS[bits & 7]` bytes at a time, not ready before each read if `stall`.
    pub fn new(data: &[u8], bits: u8, stall: bool) -> Self {
        Self {
            data: data.to_vec(),
            pos: 0,
            chunk: CHUNKS[usize::from(bits & 7)],
            stall,
            stalled: false,
            out: Vec::new(),
            written: 0,
        }
    }

    /// Everything was read.
    pub fn exhausted(&self) -> bool {
        self.pos == self.data.len()
    }
}

impl AsyncRead for Feed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.stall && !buf.is_empty() {
            self.stalled = !self.stalled;
            if self.stalled {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let n = buf.len().min(self.chunk).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Feed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let keep = buf.len().min(OUT_CAP.saturating_sub(self.out.len()));
        self.out.extend_from_slice(&buf[..keep]);
        self.written += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Splits a DERP byte stream into whole frames: (type, payload). `None` if it does not end at
/// a frame boundary.
pub fn frames(mut b: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    use derpd::frame::{decode_header, HEADER_LEN};
    let mut out = Vec::new();
    while !b.is_empty() {
        let (h, rest) = b.split_first_chunk::<HEADER_LEN>()?;
        let (t, len) = decode_header(h);
        let n = usize::try_from(len).ok()?;
        if rest.len() < n {
            return None;
        }
        out.push((t, &rest[..n]));
        b = &rest[n..];
    }
    Some(out)
}
