//! DERP over WebSocket on `/derp` (spec §3.2), as derper serves browsers (js/wasm clients) and
//! Tailscale clients built with `ts_debug_websockets`: the RFC 6455 handshake answer, then DERP
//! as a byte stream over binary messages (frame and message boundaries independent of DERP's),
//! handed to [`client::serve`].

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Bytes, Message};
use async_tungstenite::{ByteWriter, WebSocketReceiver, WebSocketSender, WebSocketStream};
use log::info;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use smol::Timer;

use crate::client::{self, ConnError, Upgrade};
use crate::http::{self, Request};
use crate::server::State;

/// RFC 6455's GUID, appended to the client's key for `Sec-WebSocket-Accept`.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest frame, and message, accepted from a client. tungstenite assembles each message
/// before handing it over, so this is also the most a connection holds in its read buffers
/// outside the packet pool: kept to one maximum packet plus slack (72 KiB), not derper's 1 MiB
/// frame limit. Tailscale's clients send one message per write through a 4 KiB buffer, so
/// their largest message is one packet written past the buffer: at most 64 KiB.
pub const MAX_FRAME: u64 = 72 << 10;

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
    base64(d.as_ref())
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
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
    info!("{remote}: websocket refused: {msg}");
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
    state: &Arc<State>,
    mut stream: S,
    leftover: Vec<u8>,
    acc: Accept,
    remote: SocketAddr,
    slot: crate::limits::Slot,
) -> Result<(), ConnError>
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
        Timer::after(state.handshake_timeout).await;
        Err(io::ErrorKind::TimedOut.into())
    })
    .await?;
    if !acc.derp {
        let e = "websocket: client must speak the derp subprotocol";
        info!("{remote}: {e}");
        return Err(ConnError::Protocol(e.into()));
    }
    drop(acc);
    state.metrics.websocket_accepts.fetch_add(1, Relaxed);
    let (rd, wr) = transport(stream, leftover).await;
    let up = Upgrade {
        remote,
        fast_start: false,
        not_ideal: false,
        websocket: true,
        slot: Some(slot),
    };
    client::serve(state.clone(), rd, wr, up).await
}

/// The server side of an accepted WebSocket (the 101 already sent) as a DERP byte stream.
/// `leftover` holds the bytes the client sent after its request head. Public only for the
/// `websocket` fuzz target; not a stable API.
#[doc(hidden)]
pub async fn transport<S>(stream: S, leftover: Vec<u8>) -> (WsRead<S>, WsWrite<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        // tungstenite reads in chunks of this size (default 128 KiB per connection).
        .read_buffer_size(4096)
        // Each message goes to the socket when sent; the DERP writer batches and flushes.
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME as usize))
        .max_frame_size(Some(MAX_FRAME as usize));
    let ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
    let (tx, rx) = ws.split();
    let rd = WsRead {
        rx,
        cur: Bytes::new(),
    };
    (rd, WsWrite(ByteWriter::new(tx)))
}

/// The binary messages of a WebSocket as one byte stream.
#[doc(hidden)]
pub struct WsRead<S> {
    rx: WebSocketReceiver<S>,
    cur: Bytes,
}

impl<S> std::fmt::Debug for WsRead<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsRead")
            .field("buffered", &self.cur.len())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        loop {
            if !me.cur.is_empty() {
                let n = buf.len().min(me.cur.len());
                buf[..n].copy_from_slice(&me.cur.split_to(n));
                return Poll::Ready(Ok(n));
            }
            // Each poll also writes what the library queued: pongs and the close reply.
            let next = ready!(smol::stream::StreamExt::poll_next(&mut me.rx, cx));
            match next {
                Some(Ok(Message::Binary(b))) => me.cur = b,
                // Control frames carry no DERP bytes. After a close, polling on sends the
                // reply and then ends the stream (`None`).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) => {}
                None => return Poll::Ready(Ok(0)),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "websocket: text message (DERP needs binary)",
                    )))
                }
                Some(Err(e)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("websocket: {e}"),
                    )))
                }
            }
        }
    }
}

/// Writes as binary messages: one per write call, a vectored write (the DERP writer's batch)
/// as one message.
#[doc(hidden)]
pub struct WsWrite<S>(ByteWriter<WebSocketSender<S>>);

impl<S> std::fmt::Debug for WsWrite<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WsWrite")
    }
}

/// Largest message a vectored write gathers.
const MAX_GATHER: usize = 64 << 10;

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsWrite<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        match (nonempty.next(), nonempty.next()) {
            (None, _) => Poll::Ready(Ok(0)),
            (Some(b), None) => self.poll_write(cx, b),
            _ => {
                let total: usize = bufs.iter().map(|b| b.len()).sum();
                let mut msg = Vec::with_capacity(total.min(MAX_GATHER));
                for b in bufs {
                    let room = MAX_GATHER.saturating_sub(msg.len());
                    if room == 0 {
                        break;
                    }
                    msg.extend_from_slice(&b[..b.len().min(room)]);
                }
                self.poll_write(cx, &msg)
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
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

    /// RFC 6455 §1.3's example (the value is also what Python's hashlib/base64 give).
    #[test]
    fn accept_key_rfc6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
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
