//! Hostile HTTP request heads, on the plain HTTP listener.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::support;

use super::rig::*;

/// Request heads: random bytes, a malformed header line, heads too large, too many headers,
/// and a slowloris head.
#[test]
fn hostile_request_heads() {
    let _turn = support::exclusive("attacks");
    support::raise_nofile();
    let mut rig = plain_rig();
    let addr = rig.addr;

    let garbage = random_bytes(0x2545_f491, 4096);
    let mut big_head = b"GET /derp HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    big_head.resize(20 << 10, b'a');
    big_head.extend(b"\r\n\r\n");
    for (name, req, status, expect) in [
        (
            "4 KiB of random bytes to the plain listener",
            garbage.clone(),
            "HTTP/1.1 400 Bad Request",
            "refused: malformed request head",
        ),
        (
            "garbage HTTP head (header line without a colon)",
            b"GET /derp HTTP/1.1\r\nHost x\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request",
            "refused: malformed request head",
        ),
        (
            "HTTP head of 20 KiB",
            big_head.clone(),
            "HTTP/1.1 431",
            "refused: request head too large",
        ),
        (
            "100 headers",
            {
                let mut r = b"GET / HTTP/1.1\r\n".to_vec();
                for i in 0..100 {
                    r.extend(format!("X-H{i}: v\r\n").bytes());
                }
                r.extend(b"\r\n");
                r
            },
            "HTTP/1.1 431",
            "refused: request head too large",
        ),
    ] {
        let mut at = rig.begin(name);
        let (reply, closed, local) = exchange(addr, &req);
        assert!(reply.starts_with(status), "{name}: reply {reply:?}");
        let closed = closed.unwrap_or_else(|e| panic!("{name}: not closed: {e}"));
        at.closed = format!("{}, after `{status}`", ms(closed));
        rig.expect_line(&mut at, local, expect);
        rig.finish(at);
    }

    // Slowloris.
    {
        let mut at = rig.begin("slowloris: request head at 1 byte / 100 ms");
        let mut c = tcp(addr);
        let local = c.local_addr().unwrap();
        let head = b"GET /derp HTTP/1.1\r\nHost: example.com\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let t0 = Instant::now();
        let mut sent = 0;
        // One byte, then a 100 ms read: the read both paces the trickle and sees the close.
        let closed = loop {
            if sent < head.len() && c.write_all(&head[sent..sent + 1]).is_ok() {
                sent += 1;
            }
            match closed_by_server(&mut c, Duration::from_millis(100)) {
                Ok(_) => break t0.elapsed(),
                Err(e) if e.starts_with("still open") => {
                    assert!(
                        t0.elapsed() < DEADLINE + CLOSE_SLACK,
                        "slowloris not closed"
                    );
                }
                Err(e) => panic!("slowloris: {e}"),
            }
        };
        assert!(sent < head.len(), "the whole head got through");
        assert!(
            closed >= DEADLINE.mul_f32(0.9),
            "closed after {closed:?}, before the deadline"
        );
        at.closed = format!("yes, after {} ms and {sent} bytes", closed.as_millis());
        rig.expect_line(
            &mut at,
            local,
            "closed: TLS handshake and request head timed out",
        );
        rig.finish(at);
    }

    rig.print("plain HTTP listener: request heads");
}
