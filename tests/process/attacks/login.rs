//! Hostile logins (the ClientInfo frame), on the plain HTTP listener.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support;
use crate::support::inproc::{DerpClient, IO_TIMEOUT};
use derpd::handshake;
use derpd::key::NodePrivate;

use super::rig::*;

/// Logins: from the all-zero key, sealed to another key, broken boxes and JSON, lengths out
/// of range, the wrong first frame, ClientInfo declared and never sent, and a slowloris ClientInfo.
#[test]
fn hostile_logins() {
    let _turn = support::exclusive("attacks");
    support::raise_nofile();
    let mut rig = plain_rig();
    let addr = rig.addr;

    // The all-zero key.
    {
        let mut at = rig.begin("ClientInfo from the all-zero key");
        let mut c = upgraded(addr);
        let local = c.s.local_addr().unwrap();
        let mut f = handshake::client_info_frame(&c.key, &c.server_key, b"{}");
        f[5..37].fill(0);
        c.s.write_all(&f).unwrap();
        at.closed = must_close(&mut c.s, IO_TIMEOUT, &at.name);
        rig.expect_line(&mut at, local, "login refused: login: all-zero client key");
        drop(c);
        rig.finish(at);
    }

    // Broken logins.
    let wrong_server = NodePrivate::generate().public();
    type MakeLogin = Box<dyn Fn(&DerpClient) -> Vec<u8>>;
    let logins: Vec<(&str, MakeLogin, &str)> = vec![
        (
            "ClientInfo sealed to another server key",
            Box::new(move |c: &DerpClient| {
                handshake::client_info_frame(&c.key, &wrong_server, b"{}")
            }),
            "login refused: login: ClientInfo box did not open",
        ),
        (
            "ClientInfo with a corrupted box",
            Box::new(|c: &DerpClient| {
                let mut f = handshake::client_info_frame(&c.key, &c.server_key, b"{\"version\":2}");
                let n = f.len();
                f[n - 3] ^= 0x40;
                f
            }),
            "login refused: login: ClientInfo box did not open",
        ),
        (
            "ClientInfo with bad JSON in a valid box",
            Box::new(|c: &DerpClient| {
                handshake::client_info_frame(&c.key, &c.server_key, b"{\"version\":")
            }),
            "login refused: login: ClientInfo JSON:",
        ),
        (
            "ClientInfo of 256 KiB + 1",
            Box::new(|_: &DerpClient| header(0x02, (256 << 10) + 1)),
            "login refused: login: ClientInfo length 262145 out of range",
        ),
        (
            "ClientInfo of 100,000 bytes (over derpd's 1,024)",
            Box::new(|c: &DerpClient| {
                let mut f = header(0x02, 100_000);
                f.extend(c.public().0);
                f.resize(5 + 100_000, 7);
                f
            }),
            "login refused: login: ClientInfo of 100000 bytes is over derpd's 1024",
        ),
        (
            "first frame a SendPacket, not ClientInfo",
            Box::new(|_: &DerpClient| frame(0x04, &[1; 40])),
            "login refused: login: bad frame type 0x04",
        ),
    ];
    for (name, make, expect) in logins {
        let mut at = rig.begin(name);
        let mut c = upgraded(addr);
        let local = c.s.local_addr().unwrap();
        let f = make(&c);
        let _ = c.s.write_all(&f);
        at.closed = must_close(&mut c.s, IO_TIMEOUT, name);
        rig.expect_line(&mut at, local, expect);
        drop(c);
        rig.finish(at);
    }

    {
        // Logins declaring a 60,000-byte ClientInfo, then silence: refused at once, without
        // taking a pool buffer (they used to hold each of the 15 large ones until the login
        // deadline, and a bystander's packet of more than 2 KiB waited for one).
        let mut at = rig.begin("15 logins declaring a 60 KB ClientInfo, then silence");
        let mut holders: Vec<(DerpClient, SocketAddr)> = (0..15)
            .map(|_| {
                let mut c = upgraded(addr);
                c.s.write_all(&header(0x02, 60_000)).unwrap();
                let local = c.s.local_addr().unwrap();
                (c, local)
            })
            .collect();
        let mut closed = Duration::ZERO;
        for (c, local) in &mut holders {
            let took = closed_by_server(&mut c.s, DEADLINE / 2)
                .unwrap_or_else(|e| panic!("holder {local}: {e}"));
            closed = closed.max(took);
        }
        let (ak, bk) = (rig.a.public(), rig.b.public());
        let big = vec![0x3c; 3000];
        rig.a.send(&bk, &big);
        expect_packet(&mut rig.b, &ak, &big);
        at.closed = format!(
            "yes, at once (all within {} ms; the login deadline is 2 s)",
            closed.as_millis()
        );
        let (_, first) = holders[0];
        rig.expect_line(&mut at, first, "is over derpd's 1024");
        drop(holders);
        rig.finish(at);
    }

    // Slowloris.
    {
        let mut at = rig.begin("slowloris: ClientInfo at 1 byte / 100 ms");
        let mut c = upgraded(addr);
        let local = c.s.local_addr().unwrap();
        let f = handshake::client_info_frame(&c.key, &c.server_key, b"{}");
        let t0 = Instant::now();
        let mut sent = 0;
        let closed = loop {
            if sent < f.len() && c.s.write_all(&f[sent..sent + 1]).is_ok() {
                sent += 1;
            }
            match closed_by_server(&mut c.s, Duration::from_millis(100)) {
                Ok(_) => break t0.elapsed(),
                Err(e) if e.starts_with("still open") => {
                    assert!(
                        t0.elapsed() < DEADLINE + CLOSE_SLACK,
                        "slow login not closed"
                    );
                }
                Err(e) => panic!("slow login: {e}"),
            }
        };
        assert!(sent < f.len(), "the whole ClientInfo got through");
        at.closed = format!("yes, after {} ms and {sent} bytes", closed.as_millis());
        rig.expect_line(&mut at, local, "login refused: login timed out");
        rig.finish(at);
    }

    rig.print("plain HTTP listener: logins");
}
