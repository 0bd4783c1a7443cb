//! Hostile input on the TLS listener: garbage for a ClientHello, silence, garbage inside TLS,
//! a forged record after login.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Instant;

use crate::support;
use crate::support::inproc::IO_TIMEOUT;
use crate::support::Derpd;

use super::rig::*;

#[test]
fn hostile_input_tls() {
    let _turn = support::exclusive("attacks");
    support::raise_nofile();
    let tls = tls_args("attacks-tls");
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let d = Derpd::start(&derpd_args(BUDGET_MIB, &tls));
    let mut rig = Rig::new(d, BUDGET_MIB, true, tls_login);
    let addr = rig.addr;

    // Garbage where a ClientHello should be.
    let garbage = random_bytes(0x9e37_79b9, 4096);
    let mut huge_record = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    huge_record.extend([0u8; 100]);
    let mut short_hello = vec![
        0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00, 0xfc, 0x03, 0x03,
    ];
    short_hello.extend([0x11; 30]);
    for (name, bytes, half_close) in [
        (
            "4 KiB of random bytes to the TLS listener",
            garbage.clone(),
            false,
        ),
        (
            "a plain HTTP request to the TLS listener",
            b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n".to_vec(),
            false,
        ),
        ("a TLS record header declaring 64 KiB", huge_record, false),
        ("half a ClientHello, then EOF", short_hello, true),
    ] {
        let mut at = rig.begin(name);
        let mut c = tcp(addr);
        let local = c.local_addr().unwrap();
        let _ = c.write_all(&bytes);
        if half_close {
            c.shutdown(Shutdown::Write).unwrap();
        }
        at.closed = must_close(&mut c, IO_TIMEOUT, name);
        rig.expect_line(&mut at, local, "closed: TLS handshake:");
        drop(c);
        rig.finish(at);
    }

    // A ClientHello, then nothing: the handshake deadline closes it.
    {
        let mut at = rig.begin("a ClientHello, then silence");
        let mut c = tcp(addr);
        let local = c.local_addr().unwrap();
        let mut conn = tls_conn();
        conn.write_tls(&mut c).unwrap();
        let t0 = Instant::now();
        let closed = closed_by_server(&mut c, DEADLINE + CLOSE_SLACK)
            .unwrap_or_else(|e| panic!("silent TLS client: {e}"));
        assert!(
            closed >= DEADLINE.mul_f32(0.9),
            "closed after {closed:?}, before the deadline"
        );
        at.closed = format!("yes, after {} ms", t0.elapsed().as_millis());
        rig.expect_line(
            &mut at,
            local,
            "closed: TLS handshake and request head timed out",
        );
        drop(c);
        rig.finish(at);
    }

    // After a good handshake: a garbage request head inside TLS.
    {
        let mut at = rig.begin("random bytes as the request head, inside TLS");
        let mut s = tls_connect(addr);
        let local = s.sock.local_addr().unwrap();
        s.write_all(&garbage[..1024]).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let reply = String::from_utf8_lossy(&out);
        assert!(
            reply.starts_with("HTTP/1.1 400 Bad Request"),
            "reply {reply:?}"
        );
        at.closed = must_close(&mut s.sock, IO_TIMEOUT, &at.name) + ", after `HTTP/1.1 400`";
        rig.expect_line(&mut at, local, "refused: malformed request head");
        drop(s);
        rig.finish(at);
    }

    // A logged-in TLS client whose next record is forged (not encrypted with the session key).
    {
        let mut at = rig.begin("forged TLS record after login");
        let mut c = tls_login(addr);
        let local = c.s.sock.local_addr().unwrap();
        let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        rec.extend([0x5a; 0x40]);
        c.s.sock.write_all(&rec).unwrap();
        at.closed = must_close(&mut c.s.sock, IO_TIMEOUT, &at.name);
        rig.expect_line(&mut at, local, "cannot decrypt peer's message");
        drop(c);
        rig.finish(at);
    }

    rig.print("TLS listener");
}
