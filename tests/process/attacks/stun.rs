//! Garbage on the STUN socket.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::support;
use crate::support::inproc::IO_TIMEOUT;

use super::rig::*;

/// Garbage datagrams to the STUN socket, then a real request.
#[test]
fn hostile_stun_datagrams() {
    let _turn = support::exclusive("attacks");
    support::raise_nofile();
    let mut rig = plain_rig();

    let garbage = random_bytes(0x2545_f491, 4096);
    {
        let mut at = rig.begin("1000 garbage STUN datagrams, then a real request");
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let tx = [0x42u8; 12];
        let real = derpd::stun::tailscale_request(&tx);
        let mut bad_cookie = real;
        bad_cookie[4] ^= 0xff;
        let mut long_attr = real;
        long_attr[3] = 0xff; // message length far beyond the datagram
        let fixed: [&[u8]; 5] = [&[], &real[..19], &bad_cookie, &long_attr, &[0xff; 1500]];
        for i in 0..1000 {
            let n = (i * 37) % 1400;
            let d: &[u8] = if i < fixed.len() {
                fixed[i]
            } else {
                &garbage[..n]
            };
            sock.send_to(d, rig.stun).unwrap();
        }
        // A datagram larger than derpd's 2 KiB receive buffer (truncated by the kernel).
        sock.send_to(&vec![0u8; 9000], rig.stun).unwrap();
        // The burst can overflow the socket's receive buffer, so the real request is resent
        // (as STUN clients do) until it is answered.
        let mut buf = [0u8; 256];
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut tries = 0;
        let (n, from) = loop {
            assert!(
                Instant::now() < deadline,
                "no STUN answer after garbage ({tries} tries)"
            );
            sock.send_to(&real, rig.stun).unwrap();
            tries += 1;
            if let Ok(x) = sock.recv_from(&mut buf) {
                break x;
            }
        };
        assert_eq!(from, rig.stun);
        let mut want = [0u8; derpd::stun::MAX_RESPONSE_LEN];
        let wn = derpd::stun::write_response(&mut want, &tx, sock.local_addr().unwrap());
        assert_eq!(
            &buf[..n],
            &want[..wn],
            "the real request is answered exactly"
        );
        at.closed = format!("n/a (UDP); the real request is answered (try {tries})");
        at.log = "(none: counted as stun_not_stun, not logged)".into();
        rig.finish(at);
    }

    rig.print("STUN socket");
}
