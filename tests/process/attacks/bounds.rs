//! Issue 17 point 2: every connection in its worst state at once, at `--max-clients`, and
//! derpd's RSS within the bound the README states.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::support;
use crate::support::inproc::{self, DerpClient, IO_TIMEOUT};
use crate::support::{s, Derpd};
use derpd::handshake;
use derpd::key::{NodePrivate, NodePublic};

use super::rig::*;

/// `--max-clients` of the bounds test; each kind opens this many connections less one (the
/// slow readers' sender is a client too).
const BOUND_CLIENTS: usize = 256;
/// `--buffer-budget-mib` of the bounds test: the pool's share of the bound, all of it.
const BOUND_BUDGET_MIB: u64 = 4;
/// Length the half-logins declare for their ClientInfo (the most derpd reads), of which they
/// send all but the last byte.
const HALF_LOGIN_LEN: usize = handshake::CLIENT_INFO_ACCEPT_MAX;
/// An unfinished WebSocket fragment: a non-final binary frame declaring this many bytes, of
/// which all but the last are sent.
const WS_FRAGMENT: usize = 70_000;
/// Large packets sent to each slow reader: more than its small socket buffers and rustls's
/// take (the rest waits in pool buffers or is dropped by its queue's cap).
const SLOW_READER_PACKETS: usize = 12;

/// The worst states one connection can put derpd in (issue 17, point 2).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Worst {
    /// Logged in over a WebSocket, then most of a 70 KB non-final fragment.
    WsFragment,
    /// Logged in, reads nothing while 64 KiB packets are sent to it (no write timeout).
    SlowReader,
    /// ServerKey read, a ClientInfo header of the largest accepted length, body stalled.
    HalfLogin,
    /// Logged in, a SendPacket header of a 64 KiB packet and part of its body, then nothing.
    StalledFrame,
}

fn ws_frame(fin: bool, payload: &[u8], declared: usize) -> Vec<u8> {
    // An all-zero masking key: the payload goes as it is.
    let mut f = inproc::ws_client_header(fin, declared, [0; 4]);
    f.extend_from_slice(payload);
    f
}

/// Reads one (unmasked) server WebSocket frame's payload.
fn ws_read_frame<S: Read>(s: &mut S) -> Vec<u8> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            usize::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => usize::from(n),
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    p
}

/// A connection whose receive buffer (and so its TCP window) is 4 KiB.
fn small_window(addr: SocketAddr) -> TcpStream {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    sockopt::set_socket_recv_buffer_size(&fd, 4096).unwrap();
    rustix::net::connect(&fd, &addr).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Puts one new connection into `kind`'s worst state; `sender` feeds the slow readers.
fn worst_state(addr: SocketAddr, kind: Worst, sender: &mut DerpClient<Tls>) -> Tls {
    match kind {
        Worst::WsFragment => {
            let mut s = tls_connect(addr);
            s.write_all(
                b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Protocol: derp\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            .unwrap();
            let head = inproc::read_http_head(&mut s).unwrap();
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let sk = ws_read_frame(&mut s);
            let server = NodePublic(sk[13..45].try_into().unwrap());
            let key = NodePrivate::generate();
            let ci = handshake::client_info_frame(&key, &server, br#"{"version":2}"#);
            s.write_all(&ws_frame(true, &ci, ci.len())).unwrap();
            let si = ws_read_frame(&mut s);
            assert_eq!(si[0], 0x03, "ServerInfo");
            // Inside: an unknown DERP frame that declares more than follows.
            let mut payload = header(0x7f, u32::MAX);
            payload.resize(WS_FRAGMENT - 1, 0);
            s.write_all(&ws_frame(false, &payload, WS_FRAGMENT))
                .unwrap();
            s
        }
        Worst::SlowReader => {
            // A small receive window, so that loopback's socket buffers fill quickly and
            // what derpd still has to send waits in rustls and the pool.
            let mut c = DerpClient::new_raw(tls_over(small_window(addr)));
            c.login_upgrade(br#"{"version":2}"#).unwrap();
            let dst = c.public();
            let pkt = random_bytes(0x5eed, derpd::frame::MAX_PACKET_SIZE);
            for _ in 0..SLOW_READER_PACKETS {
                sender.send(&dst, &pkt);
            }
            c.s
        }
        Worst::HalfLogin => {
            let mut c = DerpClient::new_raw(tls_connect(addr));
            c.s.write_all(
                b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n",
            )
            .unwrap();
            c.read_server_key().unwrap();
            let mut f = header(0x02, HALF_LOGIN_LEN as u32);
            f.resize(5 + HALF_LOGIN_LEN - 1, 0x11);
            c.s.write_all(&f).unwrap();
            c.s
        }
        Worst::StalledFrame => {
            let mut c = tls_login(addr);
            let n = 32 + derpd::frame::MAX_PACKET_SIZE;
            let mut f = header(0x04, n as u32);
            f.extend_from_slice(&c.public().0);
            f.resize(5 + n - 1, 0x22);
            c.s.write_all(&f).unwrap();
            c.s
        }
    }
}

/// Waits (bounded) until derpd's RSS has not grown for 500 ms: every connection's bytes have
/// been taken in. Returns the highest RSS seen.
fn settled_rss(pid: u32, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut peak = rss_kib(pid);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(500) {
        assert!(Instant::now() < deadline, "{what}: RSS still growing");
        // Sampling cadence, not synchronisation.
        thread::sleep(Duration::from_millis(20));
        let now = rss_kib(pid);
        if now > peak {
            peak = now;
            since = Instant::now();
        }
    }
    peak
}

/// A fresh derpd for one bounds run (TLS, `--max-clients` [`BOUND_CLIENTS`], the worst states
/// kept while measured), warmed up (TLS, login, relay, WebSocket, half-login once each).
/// Returns it, its address and its idle RSS.
fn bounds_derpd(run: &str) -> (Derpd, SocketAddr, u64) {
    let (budget, clients) = (BOUND_BUDGET_MIB.to_string(), BOUND_CLIENTS.to_string());
    let pending = (2 * BOUND_CLIENTS).to_string();
    let mut args: Vec<String> = [
        "-a",
        "127.0.0.1:0",
        "--stun-port",
        "0",
        "--buffer-budget-mib",
        &budget,
        "--max-clients",
        &clients,
        "--max-handshakes",
        &pending,
        "--max-handshakes-per-ip",
        &pending,
        "--threads",
        "1",
        // The worst states last while they are measured.
        "--login-timeout",
        "60s",
        "--frame-timeout",
        "60s",
        "--tcp-write-timeout",
        "0",
    ]
    .iter()
    .map(|x| s(x))
    .collect();
    args.extend(tls_args(&format!("attacks-bounds-{run}")));
    let mut d = Derpd::start(&args);
    let addr = d.startup(true).addr;
    {
        let mut a = tls_login(addr);
        let mut b = tls_login(addr);
        relay_both(&mut a, &mut b, "warm-up");
        for kind in [Worst::WsFragment, Worst::HalfLogin] {
            drop(worst_state(addr, kind, &mut a));
        }
    }
    let idle = settled_rss(d.child.id(), "idle");
    (d, addr, idle)
}

/// Issue 17, point 2: `--max-clients` connections in the worst state of each kind, then mixed,
/// each run in a fresh derpd: RSS ≤ idle + pool budget + max_clients × W
/// ([`derpd::pool::CONN_WORST_BYTES`]).
#[test]
fn every_connection_in_its_worst_state() {
    let _turn = support::exclusive("attacks");
    support::raise_nofile();
    let w_kib = (derpd::pool::CONN_WORST_BYTES as u64).div_ceil(1024);
    let pool_kib = BOUND_BUDGET_MIB << 10;
    let qemu = if std::env::var_os("DERPD_TEST_RUNNER").is_some() {
        QEMU_SLACK_KIB
    } else {
        0
    };
    let n = BOUND_CLIENTS - 1;
    let all = [
        Worst::WsFragment,
        Worst::SlowReader,
        Worst::HalfLogin,
        Worst::StalledFrame,
    ];
    // A quarter of each, in this order: the slow readers' packets go before the stalled
    // frames hold the large buffers (for --frame-timeout).
    let mixed: Vec<Worst> = (0..n).map(|i| all[i * all.len() / n]).collect();
    let runs: Vec<(String, Vec<Worst>)> = all
        .iter()
        .map(|k| (format!("{k:?}"), vec![*k; n]))
        .chain([("mixed".to_string(), mixed)])
        .collect();
    println!("\n| state | connections | idle RSS KiB | peak RSS KiB | (peak - idle) / connections, pool use included | limit KiB |");
    println!("|---|---|---|---|---|---|");
    let mut over = Vec::new();
    for (name, kinds) in runs {
        let (mut d, addr, idle) = bounds_derpd(&name);
        let limit = idle + pool_kib + BOUND_CLIENTS as u64 * w_kib + qemu;
        let mut sender = tls_login(addr);
        let conns: Vec<Tls> = kinds
            .iter()
            .map(|k| worst_state(addr, *k, &mut sender))
            .collect();
        let peak = settled_rss(d.child.id(), &name);
        let per = peak.saturating_sub(idle) as f64 / n as f64;
        println!("| {name} | {n} | {idle} | {peak} | {per:.1} KiB | {limit} |");
        d.expect_running();
        drop(conns);
        if peak > limit {
            over.push(format!(
                "{name}: RSS {peak} KiB, over idle {idle} + pool {pool_kib} + {BOUND_CLIENTS} x W \
                 {w_kib} = {limit} KiB"
            ));
        }
    }
    assert!(over.is_empty(), "{over:#?}");
}
