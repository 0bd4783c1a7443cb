//! No lockout before login: floods of connections that never log in (silent ones, slowloris,
//! from one address or from many) do not keep a client at another address from logging in.
//!
//! Each test runs a derpd *process* with its default limits (`--max-handshakes` 256,
//! `--max-handshakes-per-ip` 16, `--first-byte-timeout` 3s, `--handshake-timeout` 10s) and one
//! worker thread, as on a single-core router. An attacker thread binds its sockets to other
//! loopback addresses (127.0.0.2, 127.0.1.x: Linux routes all of 127.0.0.0/8 to `lo`), opens
//! its connections, and keeps them up for the whole test: it re-opens those the server closed
//! (up to 500 a second), and the slowloris attacker sends a byte on each every 2 s. Meanwhile
//! a client from 127.0.0.1 logs in 20 times, one every 200 ms (past the first-byte deadline
//! and two slowloris rounds); every login must complete (101, ServerKey, ClientInfo,
//! ServerInfo) within 1 s (5 s when derpd runs under qemu-user).
//!
//! Before per-source limits and eviction, each attack locked every login out: a pending slot
//! was held for up to 10 s, and once 256 were taken every new connection was closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::inproc::{connect_from, varz_value, DerpClient};
use crate::support::{s, Derpd};

/// Logins tried while an attack is on; all must succeed.
const LOGINS: usize = 20;
/// One login every 200 ms.
const LOGIN_SPACING: Duration = Duration::from_millis(200);

/// How long one login may take while the attack is on. Under QEMU (a debug derpd on one
/// emulated thread, the three tests at once, on a CI machine that also builds) 15 s: there
/// the test shows that logins get through at all (before the fix none did), not how fast;
/// 5 s was missed by 1 of 20 logins with 200 attacking addresses on mipsel.
fn login_bound() -> Duration {
    if support::under_qemu() {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(1)
    }
}

/// `want` connections, or fewer if RLIMIT_NOFILE is low: the three tests of this file may run
/// at once, each with its attack's sockets in this process.
fn attack_size(want: usize) -> usize {
    let room = (support::raise_nofile().saturating_sub(300) / 3) as usize;
    let n = want.min(room);
    assert!(
        n >= want.min(600),
        "RLIMIT_NOFILE allows only {n} attack connections per test; need at least 600"
    );
    if n < want {
        println!("RLIMIT_NOFILE: {n} attack connections instead of {want}");
    }
    n
}

fn start_derpd() -> (Derpd, SocketAddr) {
    support::raise_nofile();
    let mut d = Derpd::start(&[
        s("--dev"),
        s("-a"),
        s("127.0.0.1:0"),
        s("--stun-port"),
        s("0"),
        s("--threads"),
        s("1"),
    ]);
    let addr = d.startup(false).addr;
    (d, addr)
}

/// How the attacker treats its connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Never sends a byte.
    Silent,
    /// Sends one byte of an endless request head on each connection every 2 s.
    Slowloris,
}

/// What the slowloris attacker sends, a byte at a time (then `a`s).
const HEAD: &[u8] = b"GET /derp HTTP/1.1\r\nHost: x\r\nX-Pad: ";

/// Connections the attacker re-opens per 100 ms round (the server closes many at once): 500
/// a second natively. Under QEMU derpd runs 10 to 50 times slower than natively while the
/// attacker does not, so the attack is scaled down with it to 50 a second (at 500, a debug
/// mipsel derpd on one emulated thread beside a loaded CI spent its time accepting and
/// closing, and 2 of 20 logins, 11 of 20 with 200 addresses, missed 5 s).
fn redials_per_round() -> usize {
    if support::under_qemu() {
        5
    } else {
        50
    }
}

/// An attack running in its own thread until dropped.
struct Attack {
    stop: Arc<AtomicBool>,
    /// Connections opened so far in the first sweep (then `n`).
    open: Arc<AtomicUsize>,
    /// Connections made in all.
    made: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Attack {
    /// Opens `n` connections to `addr`, from `sources` in turn, and keeps them up: every
    /// 100 ms it re-opens (up to [`redials_per_round`]) those the server closed; a slowloris
    /// attacker also sends a byte on each every 2 s.
    fn start(addr: SocketAddr, sources: Vec<Ipv4Addr>, n: usize, kind: Kind) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let made = Arc::new(AtomicUsize::new(0));
        let (st, op, md) = (stop.clone(), open.clone(), made.clone());
        let thread = thread::spawn(move || {
            let mut next = 0usize;
            let mut dial = || {
                let src = sources[next % sources.len()];
                next += 1;
                md.fetch_add(1, Relaxed);
                let c = connect_from(src, addr)
                    .unwrap_or_else(|e| panic!("attack connect from {src}: {e}"));
                c.set_nonblocking(true).unwrap();
                // Slowloris starts at once: its connections are never silent.
                let sent = usize::from(kind == Kind::Slowloris && (&c).write(&HEAD[..1]).is_ok());
                (c, sent)
            };
            let mut conns = Vec::with_capacity(n);
            while conns.len() < n && !st.load(Relaxed) {
                conns.push(dial());
                op.store(conns.len(), Relaxed);
            }
            let mut last_bytes = Instant::now();
            let mut buf = [0u8; 512];
            while !st.load(Relaxed) {
                let round = Instant::now();
                let send = kind == Kind::Slowloris
                    && round.duration_since(last_bytes) >= Duration::from_secs(2);
                if send {
                    last_bytes = round;
                }
                let mut redials = 0;
                for (c, sent) in conns.iter_mut() {
                    let closed = match c.read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => e.kind() != ErrorKind::WouldBlock,
                    };
                    let closed = closed
                        || (send && {
                            let b = HEAD.get(*sent).copied().unwrap_or(b'a');
                            *sent += 1;
                            c.write(&[b]).is_err()
                        });
                    if closed && redials < redials_per_round() {
                        redials += 1;
                        (*c, *sent) = dial();
                    }
                }
                // The attack's pace, not synchronisation.
                while round.elapsed() < Duration::from_millis(100) && !st.load(Relaxed) {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Self {
            stop,
            open,
            made,
            thread: Some(thread),
        }
    }

    /// Waits until all `n` connections are open.
    fn wait_open(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.open.load(Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "the attacker opened only {} of {n} connections in 60 s",
                self.open.load(Relaxed)
            );
            assert!(
                !self.thread.as_ref().unwrap().is_finished(),
                "the attacker failed"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if r.is_err() && !thread::panicking() {
                panic!("the attacker failed");
            }
        }
    }
}

/// One login from 127.0.0.1: how long it took, or why it failed.
fn login(addr: SocketAddr, bound: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&addr, bound).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(bound)).unwrap();
    s.set_write_timeout(Some(bound)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut c = DerpClient::new_raw(s);
    c.login_upgrade(br#"{"version":2}"#)?;
    let took = t0.elapsed();
    if took > bound {
        return Err(format!("took {took:?}"));
    }
    Ok(took)
}

/// Runs the attack, logs in [`LOGINS`] times from 127.0.0.1 while it is on, and asserts that
/// every login completed within [`login_bound`].
fn logins_during(name: &str, sources: Vec<Ipv4Addr>, n: usize, kind: Kind) {
    let (mut d, addr) = start_derpd();
    let bound = login_bound();
    // The relay works before the attack.
    login(addr, bound).unwrap_or_else(|e| d.fail(&format!("login before the attack: {e}")));
    let t0 = Instant::now();
    let attack = Attack::start(addr, sources, n, kind);
    attack.wait_open(n);
    let ramp = t0.elapsed();
    let mut ok = 0;
    let mut worst = Duration::ZERO;
    let mut errors = Vec::new();
    for i in 0..LOGINS {
        // Spread over 4 s, past the first-byte deadline and two slowloris rounds: the
        // attack's timeline, not synchronisation.
        let at = t0 + ramp + LOGIN_SPACING * i as u32;
        thread::sleep(at.saturating_duration_since(Instant::now()));
        match login(addr, bound) {
            Ok(took) => {
                ok += 1;
                worst = worst.max(took);
            }
            Err(e) => errors.push(e),
        }
    }
    let made = attack.made.load(Relaxed);
    let during = t0.elapsed();
    drop(attack);
    d.expect_running();
    let counters: Vec<String> = [
        "derpd_handshakes_ip_full",
        "derpd_handshakes_evicted",
        "derpd_first_byte_timeouts",
    ]
    .iter()
    .map(|c| format!("{c} {:?}", varz_value(addr, c)))
    .collect();
    println!(
        "{name}: {ok} of {LOGINS} logins from 127.0.0.1 within {bound:?} (slowest {} ms); \
         {n} attack connections open after {} ms, {made} made in {} ms; {}",
        worst.as_millis(),
        ramp.as_millis(),
        during.as_millis(),
        counters.join(", ")
    );
    if ok < LOGINS {
        errors.sort();
        errors.dedup();
        d.fail(&format!(
            "{name}: only {ok} of {LOGINS} logins within {bound:?}; errors: {errors:?}"
        ));
    }
}

/// 127.0.0.`last`.
fn lo(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

#[test]
fn silent_connections_from_one_address() {
    let _turn = support::exclusive("lockout");
    let n = attack_size(2000);
    logins_during("2000 silent from 127.0.0.2", vec![lo(2)], n, Kind::Silent);
}

#[test]
fn slowloris_from_one_address() {
    let _turn = support::exclusive("lockout");
    let n = attack_size(500);
    logins_during(
        "500 slowloris from 127.0.0.3",
        vec![lo(3)],
        n,
        Kind::Slowloris,
    );
}

#[test]
fn silent_connections_from_200_addresses() {
    let _turn = support::exclusive("lockout");
    let n = attack_size(2000);
    let sources = (1..=200).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
    logins_during("2000 silent from 127.0.1.1-200", sources, n, Kind::Silent);
}
