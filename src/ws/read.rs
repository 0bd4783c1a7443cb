//! The read half of the WebSocket: client frame headers checked, payloads unmasked into the
//! reader's buffer, pings and closes answered, binary messages as one DERP byte stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};

use super::stream::{lock, Conn};

/// Largest frame accepted from a client: one maximum packet plus slack (72 KiB), not derper's
/// 1 MiB frame limit. Tailscale's clients send one message per write through a 4 KiB buffer,
/// so their largest frame is one packet written past the buffer: at most 64 KiB. Payloads
/// stream through (nothing of a frame or message is buffered), so this bounds no memory; a
/// message may have any number of frames.
pub const MAX_WS_FRAME: u64 = 72 << 10;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("websocket: {}", msg.into()),
    )
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

impl<S> WsRead<S> {
    /// The reader of `conn`, which reads `leftover` (the bytes after the request head) first.
    pub(super) fn new(conn: Arc<Mutex<Conn<S>>>, leftover: Vec<u8>) -> Self {
        Self {
            conn,
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
        }
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

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use smol::future::FutureExt;
    use smol::io::AsyncReadExt;
    use smol::Async;
    use smol::Timer;

    use crate::frame::{encode_header, FrameType, HEADER_LEN};
    use crate::ws::transport;

    /// A safety net against a hung test, not synchronisation.
    const IO_TIMEOUT: Duration = Duration::from_secs(5);

    /// The server's end of a loopback connection (async) and the client's (blocking).
    pub(in crate::ws) fn pair() -> (Async<TcpStream>, TcpStream) {
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
    pub(in crate::ws) fn client_reads(client: &mut TcpStream, n: usize) -> Vec<u8> {
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
}
