//! A DNS responder for Pebble on loopback: every name has the address 127.0.0.1 (A), and no
//! other records (an empty NOERROR answer to AAAA, CAA and the rest), so Pebble validates a DNS
//! name on 127.0.0.1 and finds no CAA record forbidding it. Over UDP and over TCP (Pebble's
//! resolver asks over TCP), on one port.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};

/// Starts the responder on a free loopback port; it answers until the test process ends.
pub(super) fn start() -> u16 {
    // A UDP port whose TCP twin is free too.
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            break (udp, tcp);
        }
    };
    let port = udp.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            if let Some(reply) = answer(&buf[..n]) {
                let _ = udp.send_to(&reply, from);
            }
        }
    });
    std::thread::spawn(move || {
        for conn in tcp.incoming().flatten() {
            std::thread::spawn(move || serve_tcp(conn));
        }
    });
    port
}

/// DNS over TCP: each message after its 2-byte length, until the client closes.
fn serve_tcp(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut q).is_err() {
            return;
        }
        let Some(reply) = answer(&q) else { return };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if conn.write_all(&framed).is_err() {
            return;
        }
    }
}

/// The reply to one query: its question echoed, and an A record for 127.0.0.1 if it asked
/// for one. `None` for what is not a query with one question.
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || q[4..6] != [0, 1] {
        return None;
    }
    // The question: the name's labels up to the root, then type and class.
    let mut i = 12;
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1 + len;
        if len == 0 {
            break;
        }
    }
    let end = i + 4;
    let question = q.get(12..end)?;
    let is_a = question[question.len() - 4..question.len() - 2] == [0, 1];
    let mut r = Vec::with_capacity(end + 16);
    r.extend_from_slice(&q[..2]); // ID
    r.extend_from_slice(&[0x81, 0x80]); // a response, recursion desired and available, NOERROR
    r.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if is_a {
        // The name by pointer to the question, A, IN, TTL 60, 4 bytes: 127.0.0.1.
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    Some(r)
}

#[test]
fn answers_a_queries_only() {
    // ID 0x1234, one question: derp.test A IN.
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x04derp\x04test\x00\x00\x01\x00\x01");
    let r = answer(&q).unwrap();
    assert_eq!(&r[..2], &[0x12, 0x34]);
    assert_eq!(&r[6..8], &[0, 1], "one answer");
    assert_eq!(&r[r.len() - 4..], &[127, 0, 0, 1]);
    // CAA (257): no answer.
    let n = q.len();
    q[n - 4..n - 2].copy_from_slice(&[1, 1]);
    let r = answer(&q).unwrap();
    assert_eq!(&r[6..8], &[0, 0]);
    assert_eq!(r.len(), q.len());
    assert!(answer(&q[..14]).is_none(), "a cut question");
}
