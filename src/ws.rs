//! DERP over WebSocket on `/derp` (spec §3.2), as derper serves browsers (js/wasm clients) and
//! Tailscale clients built with `ts_debug_websockets`: the RFC 6455 handshake answer, then DERP
//! as a byte stream over binary messages (frame and message boundaries independent of DERP's),
//! handed to [`session::serve`].

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use smol::Timer;

use crate::http::{self, Request};
use crate::lograte::{limited, WEBSOCKETS};
use crate::relay::Relay;
use crate::session::{self, Handoff, SessionError};

/// RFC 6455's GUID, appended to the client's key for `Sec-WebSocket-Accept`.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest frame accepted from a client: one maximum packet plus slack (72 KiB), not derper's
/// 1 MiB frame limit. Tailscale's clients send one message per write through a 4 KiB buffer,
/// so their largest frame is one packet written past the buffer: at most 64 KiB. Payloads
/// stream through (nothing of a frame or message is buffered), so this bounds no memory; a
/// message may have any number of frames.
pub const MAX_WS_FRAME: u64 = 72 << 10;

/// A handshake the server accepts: the 101 to send, and whether the client speaks `derp`.
#[derive(Debug)]
pub struct Accept {
    head: String,
    derp: bool,
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut input = Vec::with_capacity(key.len() + GUID.len());
    input.extend_from_slice(key.as_bytes());
    input.extend_from_slice(GUID.as_bytes());
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(d)
}

/// True when `key` is standard base64 of exactly 16 bytes (what Go's `base64.StdEncoding`
/// decodes to 16 bytes: 22 alphabet characters and `==`).
fn key_ok(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[..22]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
        && &b[22..] == b"=="
}

/// True when the comma-separated header `value` has `token` (any case).
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks a `/derp` WebSocket upgrade as derper's websocket library does (same checks, order
/// and status codes). `Err` is the complete refusal to send before closing.
pub fn accept(req: &Request, remote: SocketAddr) -> Result<Accept, Vec<u8>> {
    let upgrade_hdrs = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    let (status, reason, extra, msg) = if !has_token(&req.connection, "upgrade") {
        let msg = format!(
            "WebSocket protocol violation: Connection header {:?} does not contain Upgrade",
            req.connection
        );
        (426, "Upgrade Required", upgrade_hdrs, msg)
    } else if req.method != "GET" {
        let msg = format!(
            "WebSocket protocol violation: handshake request method is not GET but {:?}",
            req.method
        );
        (405, "Method Not Allowed", "", msg)
    } else if req.ws_version != "13" {
        let msg = format!(
            "unsupported WebSocket protocol version (only 13 is supported): {:?}",
            req.ws_version
        );
        (400, "Bad Request", "Sec-WebSocket-Version: 13\r\n", msg)
    } else {
        match req.ws_key.as_deref() {
            None => {
                let msg = "WebSocket protocol violation: missing Sec-WebSocket-Key".to_string();
                (400, "Bad Request", "", msg)
            }
            Some(k) if !key_ok(k) => {
                let msg = format!(
                    "WebSocket protocol violation: invalid Sec-WebSocket-Key {k:?}, \
                     must be a 16 byte base64 encoded string"
                );
                (400, "Bad Request", "", msg)
            }
            Some(k) => {
                // The first offered protocol equal to `derp` in any case is chosen, but only
                // exactly `derp` is served (derper closes with 1008 otherwise).
                let chosen = req
                    .ws_protocol
                    .split(',')
                    .map(str::trim)
                    .find(|t| t.eq_ignore_ascii_case("derp"));
                let mut head = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                    accept_key(k)
                );
                if let Some(p) = chosen {
                    head.push_str("Sec-WebSocket-Protocol: ");
                    head.push_str(p);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                return Ok(Accept {
                    head,
                    derp: chosen == Some("derp"),
                });
            }
        }
    };
    limited!(info, WEBSOCKETS, "{remote}: websocket refused: {msg}");
    let mut resp = http::text_error(status, reason, &msg);
    if !extra.is_empty() {
        // After the status line, like the other headers.
        if let Some(at) = resp.windows(2).position(|w| w == b"\r\n") {
            let at = at + 2;
            resp.splice(at..at, extra.bytes());
        }
    }
    Err(resp)
}

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
    let rd = WsRead {
        conn: conn.clone(),
        leftover: Leftover {
            bytes: leftover,
            pos: 0,
        },
        hdr: [0; 14],
        hdr_have: 0,
        frame: None,
        in_message: false,
        ctl_payload: [0; 125],
        ctl_have: 0,
        closing: false,
        failed: false,
    };
    (rd, WsWrite { conn })
}

/// Room for queued control frames (a pong and a close reply: 2 + 125 bytes each at most).
const CTL_CAP: usize = 256;

/// The socket, shared by the reader and the writer (which run in one task), and the write
/// side's state: the data frame being written and the control frames waiting for its end.
struct Conn<S> {
    stream: S,
    ctl: [u8; CTL_CAP],
    ctl_len: usize,
    ctl_pos: usize,
    out_hdr: [u8; 10],
    out_hdr_len: usize,
    out_hdr_pos: usize,
    /// Payload bytes of the data frame being written still to go (0: at a frame boundary).
    out_left: usize,
}

fn lock<S>(conn: &Mutex<Conn<S>>) -> MutexGuard<'_, Conn<S>> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("websocket: {}", msg.into()),
    )
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
    fn queue_ctl(&mut self, op: u8, payload: &[u8]) {
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
    fn poll_ctl(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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

/// The frame being read.
#[derive(Clone, Copy)]
struct Frame {
    op: u8,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes read so far (the masking key's phase).
    done: u64,
    len: u64,
}

/// The binary messages of a WebSocket as one byte stream.
#[doc(hidden)]
pub struct WsRead<S> {
    conn: Arc<Mutex<Conn<S>>>,
    leftover: Leftover,
    hdr: [u8; 14],
    hdr_have: usize,
    frame: Option<Frame>,
    /// A fragmented binary message is unfinished (its continuations may follow).
    in_message: bool,
    ctl_payload: [u8; 125],
    ctl_have: usize,
    /// A close arrived: send the reply, then end the stream.
    closing: bool,
    /// A read failed: the stream is in an unknown state, and every later read fails too.
    failed: bool,
}

/// What the HTTP layer read past the request head; released once consumed.
struct Leftover {
    bytes: Vec<u8>,
    pos: usize,
}

impl Leftover {
    /// Reads raw bytes: first these, then the socket.
    fn read<S: AsyncRead + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.pos < self.bytes.len() {
            let n = buf.len().min(self.bytes.len() - self.pos);
            buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.bytes.len() {
                *self = Self {
                    bytes: Vec::new(),
                    pos: 0,
                };
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut conn.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsRead<S> {
    /// Header bytes needed so far (2 until the length byte is known).
    fn header_len(&self) -> usize {
        if self.hdr_have < 2 {
            return 2;
        }
        let ext = match self.hdr[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + 4
    }

    /// Checks the first two header bytes as soon as they are in, so a bad frame is refused
    /// before its length or payload arrives.
    fn check_start(&self) -> io::Result<()> {
        let (b0, b1) = (self.hdr[0], self.hdr[1]);
        let op = b0 & 0x0f;
        if b0 & 0x70 != 0 {
            return Err(invalid("reserved bits are set (no extension was agreed)"));
        }
        if b1 & 0x80 == 0 {
            return Err(invalid("received an unmasked frame from the client"));
        }
        match op {
            0 if !self.in_message => Err(invalid("continuation frame without a message")),
            1 => Err(invalid("text message (DERP needs binary)")),
            2 if self.in_message => Err(invalid("new message inside a fragmented message")),
            0 | 2 => Ok(()),
            8..=10 if b0 & 0x80 == 0 => Err(invalid("fragmented control frame")),
            8..=10 if b1 & 0x7f > 125 => Err(invalid("control frame longer than 125 bytes")),
            8..=10 => Ok(()),
            _ => Err(invalid(format!("unknown opcode {op:#x}"))),
        }
    }

    /// The complete header as a frame.
    fn parse(&self) -> io::Result<Frame> {
        let h = &self.hdr;
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        if len > MAX_WS_FRAME {
            return Err(invalid(format!(
                "frame of {len} bytes is too long (most {MAX_WS_FRAME})"
            )));
        }
        if h[0] & 0x08 != 0 && len > 125 {
            return Err(invalid("control frame longer than 125 bytes"));
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&h[at..at + 4]);
        Ok(Frame {
            op: h[0] & 0x0f,
            fin: h[0] & 0x80 != 0,
            mask,
            done: 0,
            len,
        })
    }
}

fn unmask(buf: &mut [u8], mask: [u8; 4], phase: u64) {
    let p = (phase % 4) as usize;
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(p + i) % 4];
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.failed {
            return Poll::Ready(Err(invalid("the WebSocket stream already failed")));
        }
        let r = me.read_frames(cx, buf);
        if let Poll::Ready(Err(_)) = r {
            me.failed = true;
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsRead<S> {
    /// [`AsyncRead::poll_read`] until the first error.
    fn read_frames(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let me = self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let conn = me.conn.clone();
        let mut c = lock(&conn);
        loop {
            // Pongs and the close reply go out between the writer's data frames.
            if let Poll::Ready(Err(e)) = c.poll_ctl(cx) {
                return Poll::Ready(Err(e));
            }
            if me.closing {
                if c.ctl_len > 0 && c.out_left == 0 {
                    return Poll::Pending; // woken when the socket takes the reply
                }
                ready!(Pin::new(&mut c.stream).poll_flush(cx))?;
                return Poll::Ready(Ok(0));
            }
            let Some(mut f) = me.frame else {
                let need = me.header_len();
                let n = ready!(me.leftover.read(&mut c, cx, &mut me.hdr[me.hdr_have..need]))?;
                if n == 0 {
                    if me.hdr_have == 0 && !me.in_message {
                        return Poll::Ready(Ok(0));
                    }
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                let before = me.hdr_have;
                me.hdr_have += n;
                if before < 2 && me.hdr_have >= 2 {
                    me.check_start()?;
                }
                if me.hdr_have == me.header_len() {
                    me.frame = Some(me.parse()?);
                    me.hdr_have = 0;
                    me.ctl_have = 0;
                }
                continue;
            };
            if f.op < 8 {
                if f.done == f.len {
                    me.in_message = !f.fin;
                    me.frame = None;
                    continue;
                }
                me.in_message = true;
                let k = (f.len - f.done).min(buf.len() as u64) as usize;
                let n = ready!(me.leftover.read(&mut c, cx, &mut buf[..k]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                unmask(&mut buf[..n], f.mask, f.done);
                f.done += n as u64;
                me.frame = Some(f);
                return Poll::Ready(Ok(n));
            }
            // A control frame: its payload (at most 125 bytes) is read whole.
            let len = f.len as usize;
            if me.ctl_have < len {
                let buf = &mut me.ctl_payload[me.ctl_have..len];
                let n = ready!(me.leftover.read(&mut c, cx, buf))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                me.ctl_have += n;
                continue;
            }
            let payload = &mut me.ctl_payload[..len];
            unmask(payload, f.mask, 0);
            match f.op {
                9 => c.queue_ctl(0xa, payload),
                8 => {
                    // The reply echoes the status code (RFC 6455 §5.5.1).
                    let code = if len >= 2 { &payload[..2] } else { &[][..] };
                    c.queue_ctl(0x8, code);
                    me.closing = true;
                }
                _ => {}
            }
            me.frame = None;
        }
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

impl<S> fmt::Debug for WsRead<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsRead")
            .field("in_message", &self.in_message)
            .field("closing", &self.closing)
            .finish_non_exhaustive()
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

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use smol::io::AsyncReadExt;
    use smol::Async;

    use crate::frame::{encode_header, FrameType, HEADER_LEN};

    /// A safety net against a hung test, not synchronisation.
    const IO_TIMEOUT: Duration = Duration::from_secs(5);

    /// The server's end of a loopback connection (async) and the client's (blocking).
    fn pair() -> (Async<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (server, _) = l.accept().unwrap();
        (Async::new(server).unwrap(), client)
    }

    /// A client frame: `op` with FIN as given, masked with `mask` unless it is `None`.
    fn frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 | op } else { op }];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

    fn binary(payload: &[u8]) -> Vec<u8> {
        frame(true, 0x2, payload, MASK)
    }

    fn derp_frame(t: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut h = [0u8; HEADER_LEN];
        encode_header(&mut h, t, payload.len() as u32);
        [&h[..], payload].concat()
    }

    /// Sends `wire` from the client, then reads `n` DERP bytes on the server.
    fn exchange(wire: &[u8], n: usize) -> (io::Result<Vec<u8>>, TcpStream) {
        let (server, mut client) = pair();
        client.write_all(wire).unwrap();
        let got = smol::block_on(async {
            let (mut rd, _wr) = transport(server, Vec::new()).await;
            let mut buf = vec![0u8; n];
            rd.read_exact(&mut buf).await.map(|()| buf)
        });
        (got, client)
    }

    /// Reads exactly `n` bytes the server sent to the client.
    fn client_reads(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        client.read_exact(&mut buf).unwrap();
        buf
    }

    fn expect_err(wire: &[u8], what: &str) -> io::Error {
        let (got, _client) = exchange(wire, 1);
        match got {
            Ok(b) => panic!("{what}: read {b:?}, want an error"),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
                e
            }
        }
    }

    /// After a refused frame the stream stays failed: a second read neither goes on parsing
    /// the refused header (a Ping that claimed 65,278 bytes panicked slicing its 125-byte
    /// buffer; found by the websocket fuzz target) nor returns data.
    #[test]
    fn reads_after_an_error_fail_too() {
        let mut wire = vec![0x89, 0x80 | 126, 0xfe, 0xfe, 1, 2, 3, 4];
        wire.extend([0u8; 64]);
        let (server, mut client) = pair();
        client.write_all(&wire).unwrap();
        smol::block_on(async {
            let (mut rd, _wr) = transport(server, Vec::new()).await;
            let mut buf = [0u8; 16];
            for i in 0..3 {
                let e = rd.read(&mut buf).await.unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "read {i}: {e}");
            }
        });
    }

    /// RFC 6455 §1.3's example (the value is also what Python's hashlib/base64 give).
    #[test]
    fn accept_key_rfc6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn ws_request() -> Request {
        Request {
            method: "GET".into(),
            path: "/derp".into(),
            upgrade: "websocket".into(),
            connection: "keep-alive, Upgrade".into(),
            ws_protocol: "derp".into(),
            ws_version: "13".into(),
            ws_key: Some("dGhlIHNhbXBsZSBub25jZQ==".into()),
            ..Request::default()
        }
    }

    fn status(r: Result<Accept, Vec<u8>>) -> String {
        let resp = r.unwrap_err();
        let resp = String::from_utf8(resp).unwrap();
        resp.lines().next().unwrap().to_string()
    }

    #[test]
    fn handshake_checks() {
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let acc = accept(&ws_request(), remote).unwrap();
        assert!(acc.derp);
        assert_eq!(
            acc.head,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Protocol: derp\r\n\r\n"
        );
        let with = |f: &dyn Fn(&mut Request)| {
            let mut r = ws_request();
            f(&mut r);
            accept(&r, remote)
        };
        for (p, derp) in [("chat, derp", true), ("DERP", false), ("xderp", false)] {
            let acc = with(&|r| r.ws_protocol = p.into()).unwrap();
            assert_eq!(acc.derp, derp, "{p}");
            assert_eq!(acc.head.contains("Sec-WebSocket-Protocol"), p != "xderp");
        }
        let r = with(&|r| r.connection = "keep-alive".into());
        assert_eq!(status(r), "HTTP/1.1 426 Upgrade Required");
        assert_eq!(
            status(with(&|r| r.method = "POST".into())),
            "HTTP/1.1 405 Method Not Allowed"
        );
        let r = with(&|r| r.ws_version = "8".into()).unwrap_err();
        let r = String::from_utf8(r).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(r.ends_with("(only 13 is supported): \"8\"\n"), "{r}");
        for key in [
            None,
            Some(""),
            Some("dGhlIHNhbXBsZSBub25jZQ="),
            Some("c2hvcnQ="),
        ] {
            let r = with(&|r| r.ws_key = key.map(String::from));
            assert_eq!(status(r), "HTTP/1.1 400 Bad Request", "{key:?}");
        }
        assert!(with(&|r| r.ws_key = Some("AAAAAAAAAAAAAAAAAAAAAA==".into())).is_ok());
        assert!(with(&|r| r.ws_key = Some("AAAAAAAAAAAAAAAAAAAAA*==".into())).is_err());
    }

    #[test]
    fn masked_frames_of_every_length_encoding() {
        let a = vec![1u8; 125];
        let b: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let c: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = binary(&a);
        wire.extend(frame(true, 0x2, &b, Some([1, 2, 3, 4])));
        wire.extend(frame(true, 0x2, &c, Some([0xff, 0, 0x80, 9])));
        let (got, _) = exchange(&wire, a.len() + b.len() + c.len());
        assert_eq!(got.unwrap(), [a, b, c].concat());
    }

    #[test]
    fn fragmented_message_with_a_ping_inside() {
        let mut wire = frame(false, 0x2, b"he", MASK);
        wire.extend(frame(false, 0x0, b"ll", MASK));
        wire.extend(frame(true, 0x9, b"", MASK));
        wire.extend(frame(true, 0x0, b"o", MASK));
        let (got, mut client) = exchange(&wire, 5);
        assert_eq!(got.unwrap(), b"hello");
        assert_eq!(client_reads(&mut client, 2), [0x8a, 0x00], "pong");
    }

    #[test]
    fn derp_frames_split_across_and_joined_in_messages() {
        let a = derp_frame(FrameType::SendPacket, &[7u8; 100]);
        let b = derp_frame(FrameType::Ping, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let c = derp_frame(FrameType::NotePreferred, &[1]);
        let mut wire = binary(&a[..3]);
        wire.extend(binary(&[&a[3..], &b[..], &c[..]].concat()));
        let all = [a, b, c].concat();
        let (got, _) = exchange(&wire, all.len());
        assert_eq!(got.unwrap(), all);
    }

    #[test]
    fn pipelined_frames_after_the_head_are_kept() {
        let (server, _client) = pair();
        let got = smol::block_on(async {
            let (mut rd, _wr) = transport(server, binary(b"early")).await;
            let mut buf = [0u8; 5];
            rd.read_exact(&mut buf).await.map(|()| buf)
        });
        assert_eq!(&got.unwrap(), b"early");
    }

    #[test]
    fn payload_streams_before_its_frame_ends() {
        // Most of a 70,000-byte non-final frame: its bytes are read as they come, nothing
        // waits for (or holds) the rest of the frame or message.
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 13) as u8).collect();
        let whole = frame(false, 0x2, &payload, MASK);
        let (server, mut client) = pair();
        client.write_all(&whole[..whole.len() - 1]).unwrap();
        let got = smol::block_on(
            async {
                let (mut rd, _wr) = transport(server, Vec::new()).await;
                let mut buf = vec![0u8; payload.len() - 1];
                rd.read_exact(&mut buf).await.map(|()| buf)
            }
            .or(async {
                Timer::after(IO_TIMEOUT).await;
                Err(io::ErrorKind::TimedOut.into())
            }),
        );
        assert_eq!(got.unwrap(), payload[..payload.len() - 1]);
    }

    #[test]
    fn ping_gets_pong() {
        let mut wire = frame(true, 0x9, b"p1", MASK);
        wire.extend(binary(b"x"));
        let (got, mut client) = exchange(&wire, 1);
        assert_eq!(got.unwrap(), b"x");
        assert_eq!(client_reads(&mut client, 4), [0x8a, 0x02, b'p', b'1']);
    }

    #[test]
    fn close_is_answered_and_ends_the_stream() {
        let (server, mut client) = pair();
        let mut wire = binary(b"ab");
        wire.extend(frame(true, 0x8, &1000u16.to_be_bytes(), MASK));
        client.write_all(&wire).unwrap();
        let (got, rest) = smol::block_on(async {
            let (mut rd, _wr) = transport(server, Vec::new()).await;
            let mut buf = [0u8; 2];
            rd.read_exact(&mut buf).await.unwrap();
            let mut rest = Vec::new();
            let r = rd.read_to_end(&mut rest).await;
            (buf, r.map(|_| rest))
        });
        assert_eq!(&got, b"ab");
        assert_eq!(rest.unwrap(), b"", "EOF after close");
        assert_eq!(client_reads(&mut client, 4), [0x88, 0x02, 0x03, 0xe8]);
    }

    #[test]
    fn oversize_frame_is_rejected_from_its_header() {
        // Only the header is sent: the server must not wait for 2 MiB to refuse it.
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&(2u64 << 20).to_be_bytes());
        wire.extend_from_slice(&[1, 2, 3, 4]);
        let e = expect_err(&wire, "oversize frame");
        assert!(e.to_string().contains("too long"), "{e}");
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&u64::MAX.to_be_bytes());
        wire.extend_from_slice(&[1, 2, 3, 4]);
        expect_err(&wire, "2^64-1 length");
    }

    #[test]
    fn unmasked_client_frame_is_rejected() {
        let e = expect_err(&frame(true, 0x2, b"abc", None), "unmasked frame");
        assert!(e.to_string().contains("unmasked"), "{e}");
    }

    #[test]
    fn text_frame_is_rejected() {
        let e = expect_err(&frame(true, 0x1, b"hi", MASK), "text frame");
        assert!(e.to_string().contains("text"), "{e}");
    }

    #[test]
    fn other_protocol_errors_are_rejected() {
        expect_err(
            &frame(true, 0x0, b"x", MASK),
            "continuation without a start",
        );
        expect_err(&frame(true, 0x3, b"x", MASK), "reserved opcode");
        expect_err(&frame(false, 0x9, b"x", MASK), "fragmented ping");
        let mut rsv = binary(b"x");
        rsv[0] |= 0x40;
        expect_err(&rsv, "RSV1 without an extension");
    }

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
