//! Floods of silent connections.

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::support;

use super::rig::*;

/// Thousands of silent connections from one address.
#[test]
fn half_open_flood() {
    let _turn = support::exclusive("attacks");
    let nofile = support::raise_nofile();
    let mut rig = plain_rig();

    half_open(&mut rig, nofile);

    rig.print("plain HTTP listener: silent connections");
}

/// Thousands of connections from one address that never send a byte, held at once: derpd
/// closes the excess at accept (--max-handshakes-per-ip) and the rest at the handshake
/// deadline, and the bystanders relay meanwhile.
fn half_open(rig: &mut Rig<TcpStream>, nofile: u64) {
    let addr = rig.addr;
    // Leave room for the bystanders, the test harness and derpd's own pipes.
    let room = nofile.saturating_sub(200) as usize;
    let n = HALF_OPEN.min(room);
    assert!(
        n >= 4 * MAX_HANDSHAKES,
        "RLIMIT_NOFILE {nofile} allows only {n} connections; need at least {}",
        4 * MAX_HANDSHAKES
    );
    let name = format!("{n} silent TCP connections held at once");
    if n < HALF_OPEN {
        println!("RLIMIT_NOFILE {nofile}: {n} connections instead of {HALF_OPEN}");
    }
    let mut at = rig.begin(&name);
    let t0 = Instant::now();
    // From 8 threads, as fast as the kernel takes them.
    let per = n.div_ceil(8);
    let connectors: Vec<_> = (0..8)
        .map(|i| {
            let k = per.min(n.saturating_sub(i * per));
            thread::spawn(move || {
                (0..k)
                    .map(|_| {
                        let t = Instant::now();
                        let c = TcpStream::connect(addr).unwrap();
                        (c, t.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let (mut conns, took): (Vec<TcpStream>, Vec<Duration>) = connectors
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .unzip();
    assert_eq!(conns.len(), n);
    let connected_in = t0.elapsed();
    // A SYN dropped because the listen backlog was full is retried after 1 s. derpd listens
    // with the kernel's somaxconn, as Go does; std's backlog of 128 overflowed here.
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let slowest = took.iter().max().copied().unwrap_or_default();
    if somaxconn >= n {
        assert!(
            slowest < Duration::from_millis(900),
            "a connect took {slowest:?}: a SYN was dropped, the listen backlog overflowed \
             (somaxconn {somaxconn})"
        );
    } else {
        println!("somaxconn {somaxconn} < {n}: the backlog may overflow; not checked");
    }
    rig.note_fds(&mut at);
    // While they are held: the bystanders relay, and derpd holds at most one address's
    // handshake slots (plus the connections being accepted and closed right now).
    relay_both(&mut rig.a, &mut rig.b, "while 2000 connections are held");
    rig.note_fds(&mut at);
    assert!(
        at.fd_peak <= rig.fd_base + PER_IP + 4,
        "derpd held {} descriptors with --max-handshakes-per-ip {PER_IP} (baseline {})",
        at.fd_peak,
        rig.fd_base
    );
    // Every connection is closed by the server: the excess at once, the rest by the
    // handshake deadline.
    for (i, s) in conns.iter_mut().enumerate() {
        let left = (DEADLINE + CLOSE_SLACK + connected_in).saturating_sub(t0.elapsed());
        if let Err(e) = closed_by_server(s, left.max(Duration::from_millis(1))) {
            panic!("connection {i} of {n}: {e}");
        }
    }
    drop(conns);
    let elapsed = t0.elapsed();
    rig.expect_log(&mut at, "a --max-handshakes-per-ip refusal report", |l| {
        l.contains("refusing connections: --max-handshakes-per-ip reached")
    });
    let from = at.log_from;
    let deadline_lines = rig.d.log[from..]
        .iter()
        .filter(|l| l.contains("closed: TLS handshake and request head timed out"))
        .count();
    let refusal_lines = rig.d.log[from..]
        .iter()
        .filter(|l| l.contains("refused by --max-handshakes-per-ip"))
        .count();
    // The first 16 hold the address's slots until the deadline; a slot freed by it may be
    // taken by a connection still being made (the connect loop can outlast one deadline).
    let rounds = 1 + (connected_in.as_millis() / DEADLINE.as_millis()) as usize;
    assert!(
        (PER_IP..=PER_IP * rounds).contains(&deadline_lines),
        "{deadline_lines} connections closed by the deadline, want {PER_IP}..={} \
         (connections made in {connected_in:?})",
        PER_IP * rounds
    );
    assert_eq!(
        refusal_lines + deadline_lines,
        n,
        "every connection refused or timed out ({refusal_lines} + {deadline_lines})"
    );
    at.closed = format!(
        "yes: {refusal_lines} refused at accept, {deadline_lines} by the 2 s deadline; \
         all {n} closed {} ms after the first connect (made in {} ms)",
        elapsed.as_millis(),
        connected_in.as_millis()
    );
    at.log = format!(
        "{} + {refusal_lines} × `refused by --max-handshakes-per-ip` + {deadline_lines} × `closed: … timed out`",
        at.log
    );
    rig.finish(at);
}
