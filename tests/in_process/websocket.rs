//! DERP over WebSocket on `/derp`, with raw sockets against an in-process server: the 101, a
//! whole DERP session inside binary messages, the refusals, and derper's quirks (no `derp`
//! subprotocol: raw DERP; another spelling of it: close 1008).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;

use crate::support::inproc::*;
use derpd::handshake;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn ws_request(extra: &str) -> String {
    format!(
        "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Protocol: derp\r\n{extra}\r\n"
    )
}

/// A blocking WebSocket client stream: each write is one masked binary message; reads return
/// the payloads of the server's data frames and check that they are unmasked.
struct WsClient {
    s: TcpStream,
    pending: Vec<u8>,
    pos: usize,
}

impl WsClient {
    fn connect(addr: SocketAddr) -> (Self, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let req = ws_request(&format!(
            "Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        ));
        s.write_all(req.as_bytes()).unwrap();
        let head = read_http_head(&mut s).unwrap();
        let c = WsClient {
            s,
            pending: Vec::new(),
            pos: 0,
        };
        (c, head)
    }

    /// (opcode with FIN, payload) of the next frame from the server.
    fn read_ws_frame(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h)?;
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.s.read_exact(&mut b)?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                self.s.read_exact(&mut b)?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        assert!(len <= 1 << 20, "frame too large: {len}");
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload)?;
        Ok((h[0], payload))
    }
}

impl Read for WsClient {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.pending.len() {
            let (op, payload) = self.read_ws_frame()?;
            match op & 0x0f {
                0x0 | 0x2 => {
                    self.pending = payload;
                    self.pos = 0;
                }
                0x8 => return Ok(0),
                op => panic!("unexpected opcode {op:#x} from the server"),
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for WsClient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mask = [0xa1, 0x02, 0xc3, 0x74];
        let mut f = ws_client_header(true, buf.len(), mask);
        f.extend(buf.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

#[test]
fn websocket_101_then_a_derp_session_in_binary_messages() {
    let srv = start_dev();
    let (mut ws, head) = WsClient::connect(srv.addr());
    assert_eq!(
        head,
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
        )
    );
    // No DERP 101 inside: the first message is the ServerKey frame.
    let (op, first) = ws.read_ws_frame().unwrap();
    assert_eq!(op, 0x82, "a final binary frame");
    assert_eq!(&first[..5], &[0x01, 0, 0, 0, 40]);
    assert_eq!(&first[5..13], &derpd::frame::MAGIC);
    assert_eq!(&first[13..], &srv.relay().public_key.0);
    ws.pending = first;

    let mut c = DerpClient::new_raw(ws);
    c.read_server_key().unwrap();
    let ci = handshake::client_info_frame(&c.key, &c.server_key, br#"{"version":2}"#);
    // The login split across two messages.
    c.s.write_all(&ci[..7]).unwrap();
    c.s.write_all(&ci[7..]).unwrap();
    c.expect_server_info().unwrap();
    let me = c.public();
    c.send(&me, b"over websocket");
    assert_eq!(c.recv_packet(), (me, b"over websocket".to_vec()));
    // A maximum-size packet, and two packets in one message.
    let big = vec![0x5a; derpd::frame::MAX_PACKET_SIZE];
    c.send(&me, &big);
    assert_eq!(c.recv_packet().1, big);
    let mut two = Vec::new();
    for p in [&b"one"[..], b"two"] {
        two.push(0x04);
        two.extend_from_slice(&(32 + p.len() as u32).to_be_bytes());
        two.extend_from_slice(&me.0);
        two.extend_from_slice(p);
    }
    c.s.write_all(&two).unwrap();
    assert_eq!(c.recv_packet().1, b"one");
    assert_eq!(c.recv_packet().1, b"two");
    assert_eq!(srv.relay().metrics.websocket_accepts.load(Relaxed), 1);
}

#[test]
fn websocket_ping_and_close_through_the_server() {
    let srv = start_dev();
    let (mut ws, head) = WsClient::connect(srv.addr());
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_, server_key) = ws.read_ws_frame().unwrap();
    assert_eq!(server_key[0], 0x01);
    // Masked ping "hi" → unmasked pong "hi"; masked close 1000 → close 1000, then EOF.
    ws.s.write_all(&[0x89, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
        .unwrap();
    assert_eq!(ws.read_ws_frame().unwrap(), (0x8a, b"hi".to_vec()));
    let code = 1000u16.to_be_bytes();
    ws.s.write_all(&[0x88, 0x82, 9, 9, 9, 9, code[0] ^ 9, code[1] ^ 9])
        .unwrap();
    assert_eq!(ws.read_ws_frame().unwrap(), (0x88, code.to_vec()));
    let mut c = DerpClient::new_raw(ws.s);
    assert!(c.is_closed_by_server(), "closed after the close handshake");
}

#[test]
fn websocket_text_frame_closes_the_connection() {
    let srv = start_dev();
    let (mut ws, _) = WsClient::connect(srv.addr());
    ws.read_ws_frame().unwrap();
    ws.s.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i'])
        .unwrap();
    let mut c = DerpClient::new_raw(ws.s);
    assert!(c.is_closed_by_server());
    wait_until("the failed login is counted", || {
        srv.relay().metrics.failed_logins.load(Relaxed) == 1
    });
}

#[test]
fn websocket_bad_key_or_version_is_400() {
    let srv = start_dev();
    for extra in [
        "Sec-WebSocket-Version: 13\r\n".to_string(),
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n".to_string(),
        format!(
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n"
        ),
        format!("Sec-WebSocket-Version: 12\r\nSec-WebSocket-Key: {KEY}\r\n"),
        format!("Sec-WebSocket-Key: {KEY}\r\n"),
    ] {
        let r = http_exchange(srv.addr(), ws_request(&extra).as_bytes());
        assert!(
            r.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{extra}: {r}"
        );
        assert!(r.contains("Connection: close\r\n"), "{r}");
    }
    let no_conn = format!("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n");
    let req = ws_request(&no_conn).replace("Connection: Upgrade\r\n", "");
    let r = http_exchange(srv.addr(), req.as_bytes());
    assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{r}");
    assert_eq!(srv.relay().metrics.websocket_accepts.load(Relaxed), 0);
}

#[test]
fn websocket_without_derp_subprotocol_is_raw_derp() {
    // derper's quirk for very old clients: `Upgrade: websocket` alone is a DERP upgrade.
    let srv = start_dev();
    let mut s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let req = format!(
        "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = read_http_head(&mut s).unwrap();
    assert_eq!(
        head,
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
             Derp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
            srv.relay().public_key.untyped_hex()
        )
    );
    let mut c = DerpClient::new_raw(s);
    c.read_server_key().unwrap();
    assert_eq!(srv.relay().metrics.websocket_accepts.load(Relaxed), 0);
}

#[test]
fn websocket_other_spelling_of_derp_is_closed_with_1008() {
    let srv = start_dev();
    let mut s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let req = ws_request(&format!(
        "Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    ))
    // Contains `derp` (case-sensitively, as derper checks), but no token is exactly `derp`.
    .replace("Protocol: derp", "Protocol: DERP, xderp");
    s.write_all(req.as_bytes()).unwrap();
    let head = read_http_head(&mut s).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Sec-WebSocket-Protocol: DERP\r\n"), "{head}");
    let mut ws = WsClient {
        s,
        pending: Vec::new(),
        pos: 0,
    };
    let (op, payload) = ws.read_ws_frame().unwrap();
    assert_eq!(op, 0x88);
    assert_eq!(&payload[..2], &1008u16.to_be_bytes());
    assert_eq!(&payload[2..], b"client must speak the derp subprotocol");
    assert_eq!(srv.relay().metrics.websocket_accepts.load(Relaxed), 0);
}
