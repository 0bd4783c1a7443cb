//! Limits against floods and slow clients: the accept rate, connections still logging in,
//! logged-in clients, the handshake and login deadlines, and the per-client receive rate.
//! Each test checks that the offending connection is closed and that logged-in clients keep
//! relaying.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::support::inproc::*;
use derpd::config::Config;
use derpd::limits::RateConfig;

fn relays(a: &mut DerpClient, b: &mut DerpClient, tag: &str) {
    let bk = b.public();
    a.send(&bk, tag.as_bytes());
    assert_eq!(b.recv_packet().1, tag.as_bytes(), "relay after {tag}");
}

/// True when the server closes `s` (EOF or reset) before `IO_TIMEOUT`.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// True while the server has neither closed `s` nor sent anything on it.
fn still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let open =
        matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

#[test]
fn max_handshakes_evicts_the_least_advanced_oldest_first() {
    let _turn = support::exclusive("limits");
    let mut cfg = Config::dev_loopback();
    cfg.limits.max_handshakes = 4;
    let srv = start(cfg);
    let st = srv.state().clone();
    let m = &st.relay.metrics;
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    // The oldest pending connection is talking (half a request head), three are silent.
    let mut talking = TcpStream::connect(srv.addr()).unwrap();
    talking.write_all(b"GET /derp HTTP/1.1\r\n").unwrap();
    wait_until("a talking handshake", || {
        st.handshakes.by_progress() == [0, 1, 0]
    });
    let mut silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(srv.addr()).unwrap())
        .collect();
    wait_until("4 handshakes pending", || {
        st.handshakes.by_progress() == [3, 1, 0]
    });
    // A newcomer takes the slot of the oldest silent one, not the older talking one.
    let newcomer = TcpStream::connect(srv.addr()).unwrap();
    assert!(closed_by_server(&mut silent[0]), "oldest silent evicted");
    // Counted by the accept loop after it evicted: the victim may close first.
    wait_until("the first eviction counted", || {
        m.handshakes_evicted[0].load(Relaxed) == 1
    });
    assert!(still_open(&talking) && still_open(&silent[1]) && still_open(&newcomer));
    assert_eq!(st.handshakes.in_use(), 4);
    relays(&mut a, &mut b, "handshakes full");
    // A login gets through too, evicting the next silent one.
    let mut c = DerpClient::connect(srv.addr());
    assert!(
        closed_by_server(&mut silent[1]),
        "next oldest silent evicted"
    );
    relays(&mut c, &mut a, "login while handshakes are full");
    // Counted by the accept loop after it evicted: the victim may close first.
    wait_until("the second eviction counted", || {
        m.handshakes_evicted[0].load(Relaxed) == 2
    });
    assert_eq!(
        st.handshakes.in_use(),
        3,
        "a logged-in client holds no slot"
    );
    assert!(still_open(&talking));
    // When nobody is silent, the oldest talking one goes.
    drop(silent);
    drop(newcomer);
    wait_until("only the talking one pending", || {
        st.handshakes.in_use() == 1
    });
    let more: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(srv.addr()).unwrap();
            s.write_all(b"G").unwrap();
            s
        })
        .collect();
    wait_until("4 talking", || st.handshakes.by_progress() == [0, 4, 0]);
    let _d = DerpClient::connect(srv.addr());
    assert!(closed_by_server(&mut talking), "oldest talking evicted");
    // Counted by the accept loop after it evicted: the victim may close first.
    wait_until("the talking eviction counted", || {
        m.handshakes_evicted[1].load(Relaxed) == 1
    });
    assert!(more.iter().all(still_open));
}

#[test]
fn max_handshakes_per_ip_closes_the_excess_from_one_address() {
    let mut cfg = Config::dev_loopback();
    cfg.limits.max_handshakes_per_ip = 2;
    let srv = start(cfg);
    let st = srv.state().clone();
    let from = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| connect_from(from, srv.addr()).unwrap())
        .collect();
    wait_until("2 handshakes pending", || st.handshakes.in_use() == 2);
    let mut third = connect_from(from, srv.addr()).unwrap();
    assert!(closed_by_server(&mut third), "third from 127.0.0.2 closed");
    assert_eq!(st.relay.metrics.handshakes_ip_full.load(Relaxed), 1);
    assert!(held.iter().all(still_open));
    // Other addresses log in.
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    relays(&mut a, &mut b, "one address at its limit");
    assert_eq!(st.handshakes.in_use(), 2);
    assert_eq!(st.relay.metrics.handshakes_evicted[0].load(Relaxed), 0);
}

#[test]
fn first_byte_deadline_closes_silent_connections_only() {
    let _turn = support::exclusive("limits");
    let mut cfg = Config::dev_loopback();
    cfg.timeouts.first_byte = Duration::from_millis(300);
    let srv = start(cfg);
    let st = srv.state().clone();
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(srv.addr()).unwrap();
    let mut talking = TcpStream::connect(srv.addr()).unwrap();
    talking.write_all(b"GET").unwrap();
    assert!(closed_by_server(&mut silent), "silent connection closed");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(t0.elapsed() < IO_TIMEOUT, "by the first-byte deadline");
    wait_until("the talking one still pending", || {
        st.relay.metrics.first_byte_timeouts.load(Relaxed) == 1 && st.handshakes.in_use() == 1
    });
    assert!(
        still_open(&talking),
        "a connection that spoke is not held to it"
    );
    talking
        .write_all(b" /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    talking.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = talking.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 204"), "{out:?}");
}

#[test]
fn handshake_and_login_deadlines_close_slow_clients() {
    let _turn = support::exclusive("limits");
    let mut cfg = Config::dev_loopback();
    cfg.timeouts.handshake = Duration::from_millis(300);
    cfg.timeouts.login = Duration::from_millis(300);
    let srv = start(cfg);
    let st = srv.state().clone();
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    // Slowloris: half a request head, then nothing.
    let mut slow_head = TcpStream::connect(srv.addr()).unwrap();
    slow_head
        .write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Upgraded, then no ClientInfo.
    let mut slow_login = TcpStream::connect(srv.addr()).unwrap();
    slow_login
        .write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
        .unwrap();
    let t0 = Instant::now();
    assert!(closed_by_server(&mut slow_head), "head deadline");
    assert!(closed_by_server(&mut slow_login), "login deadline");
    // Closed by the deadlines, not by the 5 s read timeout of the test socket.
    assert!(t0.elapsed() < IO_TIMEOUT);
    wait_until("slots given back", || st.handshakes.in_use() == 0);
    relays(&mut a, &mut b, "deadlines");
}

#[test]
fn accept_rate_limit_closes_the_excess_and_keeps_accepting() {
    let _turn = support::exclusive("limits");
    let mut cfg = Config::dev_loopback();
    // One connection, then one every 50 ms.
    cfg.limits.accept = Some((20.0, 1));
    let srv = start(cfg);
    let m = srv.relay().metrics.clone();
    let mut a = DerpClient::connect(srv.addr());
    // Connections as fast as we can: the bucket is empty, so some are closed at once.
    let mut refused = 0;
    for _ in 0..10 {
        let mut s = TcpStream::connect(srv.addr()).unwrap();
        s.write_all(b"GET /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = s.read_to_end(&mut out);
        if out.is_empty() {
            refused += 1;
        }
    }
    assert!(refused > 0, "no connection refused");
    assert_eq!(m.accept_rejected.load(Relaxed), refused);
    // The listener keeps accepting: a later login gets through once the bucket refills.
    let mut b = None;
    wait_until("a login after the refusals", || {
        let key = derpd::key::NodePrivate::generate();
        b = DerpClient::try_connect_with(srv.addr(), key, br#"{"version":2}"#).ok();
        b.is_some()
    });
    let mut b = b.unwrap();
    let bk = b.public();
    a.send(&bk, b"after the flood");
    assert_eq!(b.recv_packet().1, b"after the flood");
}

#[test]
fn max_clients_refuses_logins_but_not_mesh_peers() {
    let mut cfg = Config::dev_loopback();
    cfg.limits.max_clients = 2;
    cfg.mesh_key = Some([7; 32]);
    let srv = start(cfg);
    let m = srv.relay().metrics.clone();
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    let s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut third = DerpClient::new_raw(s);
    let e = third.login_upgrade(br#"{"version":2}"#).unwrap_err();
    assert!(
        !e.contains("upgrade refused"),
        "refused after ClientInfo: {e}"
    );
    assert_eq!(m.clients_full.load(Relaxed), 1);
    relays(&mut a, &mut b, "server full");
    // The mesh key gets in regardless.
    let mesh_json = format!(r#"{{"version":2,"meshKey":"{}"}}"#, "07".repeat(32));
    let mut mesh = DerpClient::connect_with(
        srv.addr(),
        derpd::key::NodePrivate::generate(),
        mesh_json.as_bytes(),
    );
    relays(&mut mesh, &mut a, "mesh peer over the limit");
    // Mesh peers count towards the limit but are never refused. Two leaving make room.
    drop(b);
    drop(mesh);
    wait_until("two connections gone", || {
        m.current_connections.load(Relaxed) == 1
    });
    let mut c = DerpClient::connect(srv.addr());
    relays(&mut a, &mut c, "room again");
}

#[test]
fn rate_config_is_backpressure_not_drops() {
    let _turn = support::exclusive("limits");
    let srv = start_dev();
    let st = srv.state().clone();
    // 1 MB/s with the minimum burst (one 64 KiB frame).
    st.relay.rate.set(RateConfig {
        bytes_per_sec: 1_000_000,
        burst_bytes: 0,
    });
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    let bk = b.public();
    let pkt = vec![0x5a; 60 << 10];
    let n = 24; // 1.5 MB: the reader must wait about 1.4 s in all
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        for _ in 0..n {
            a.send(&bk, &pkt);
        }
        a
    });
    for i in 0..n {
        let (_, p) = b.recv_packet();
        assert_eq!(p.len(), 60 << 10, "packet {i}");
    }
    let elapsed = t0.elapsed();
    let _a = writer.join().unwrap();
    let frame = 32 + (60 << 10);
    // A lower bound only: the limit cannot be beaten, however fast the machine.
    let owed = n * frame - derpd::limits::MIN_RATE_BURST as usize;
    let min = Duration::from_secs_f64(owed as f64 / 1_000_000.0 * 0.9);
    assert!(
        elapsed >= min,
        "{elapsed:?} < {min:?}: the limit was not applied"
    );
    assert!(st.relay.rate.waited.load(Relaxed) > 0);
    let drops: u64 = derpd::metrics::DropReason::ALL
        .iter()
        .map(|r| st.relay.metrics.dropped(*r))
        .sum();
    assert_eq!(drops, 0, "rate limiting must not drop");
}

/// The packet size of the rate tests: one frame is 32 + 60 KiB bytes on the wire after its
/// 5-byte header (the bucket counts both; the bounds below count the frame only).
const PKT: usize = 60 << 10;

/// Sends `n` packets of [`PKT`] bytes from `from` to `to` (from a thread, so that the
/// writer's backpressure cannot stall the reader) and returns `from` and the time until `to`
/// had them all.
fn send_timed(from: DerpClient, to: &mut DerpClient, n: usize) -> (DerpClient, Duration) {
    let tk = to.public();
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut from = from;
        let pkt = vec![0xa5; PKT];
        for _ in 0..n {
            from.send(&tk, &pkt);
        }
        from
    });
    for i in 0..n {
        let (_, p) = to.recv_packet();
        assert_eq!(p.len(), PKT, "packet {i}");
    }
    let elapsed = t0.elapsed();
    (writer.join().unwrap(), elapsed)
}

/// A reload of the `--rate-config` file (what SIGHUP does) reaches the connections already
/// up at their next frame, and new ones. Each check sends well beyond the burst, so that the
/// old config would show: a slower rate is checked with a lower bound on the time taken
/// (which no machine can beat, however fast, and a slow one only passes more easily) that is
/// 20 times what the old rate needs; "off" is checked with derpd's own count of waits, which
/// the old rate would raise. Neither depends on the machine's speed.
#[test]
fn rate_config_reload_reaches_existing_and_new_connections() {
    let _turn = support::exclusive("limits");
    const FAST: u64 = 2_000_000;
    const SLOW: u64 = 100_000;
    let file = support::fresh_path("rate_reload", "rate.json");
    let write = |json: &str| std::fs::write(&file, json).unwrap();
    write(&format!(r#"{{"PerClientRateLimitBytesPerSec": {FAST}}}"#));
    let mut cfg = Config::dev_loopback();
    cfg.rate_config = Some(file.clone());
    // Bursts of 8 packets of 60 KiB to one receiver: a budget whose large buffers let one
    // receiver queue them all (the default's share is 3, and the rest would be dropped).
    cfg.limits.buffer_budget = 64 << 20;
    let srv = start(cfg);
    let st = srv.state().clone();
    assert!(st.relay.pool.large_per_receiver() >= 8);
    assert_eq!(st.relay.rate.get().bytes_per_sec, FAST);
    let a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    // `a` takes the first config with its first frame.
    let (a, _) = send_timed(a, &mut b, 1);

    // Slower: 3 frames after the reload's fresh bucket (one burst) owe (3 * frame - burst)
    // bytes at SLOW, about 1.2 s; at FAST they would take 0.06 s.
    write(&format!(r#"{{"PerClientRateLimitBytesPerSec": {SLOW}}}"#));
    srv.reload();
    assert_eq!(
        st.relay.rate.get().bytes_per_sec,
        SLOW,
        "the reload read the file"
    );
    let frame = (32 + PKT) as f64;
    let owed = 3.0 * frame - derpd::limits::MIN_RATE_BURST as f64;
    let min = Duration::from_secs_f64(owed / SLOW as f64 * 0.9);
    let (a, took) = send_timed(a, &mut b, 3);
    assert!(
        took >= min,
        "the connection already up: {took:?} < {min:?}, the reload did not reach it"
    );
    let (c, took) = send_timed(DerpClient::connect(srv.addr()), &mut b, 3);
    assert!(
        took >= min,
        "a new connection: {took:?} < {min:?}, it did not get the reloaded rate"
    );

    // Off: about 0.5 MB from each of them, and from a new one, and not one wait. At SLOW the
    // first frame past the burst would wait.
    write("{}");
    srv.reload();
    assert_eq!(
        st.relay.rate.get(),
        RateConfig::default(),
        "the reload read the file"
    );
    let waited = st.relay.rate.waited.load(Relaxed);
    let (_a, _) = send_timed(a, &mut b, 8);
    assert_eq!(
        st.relay.rate.waited.load(Relaxed),
        waited,
        "the connection already up still waits"
    );
    let (_c, _) = send_timed(c, &mut b, 8);
    let (_d, _) = send_timed(DerpClient::connect(srv.addr()), &mut b, 8);
    assert_eq!(
        st.relay.rate.waited.load(Relaxed),
        waited,
        "limiting turned off, yet a connection waited"
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// Writes `bytes` and then a Ping from a thread, and returns the time until the Pong came:
/// derpd reads a connection in order, so by then it has read (and charged) every byte.
fn until_pong(c: &mut DerpClient, bytes: Vec<u8>) -> Duration {
    let mut w = c.s.try_clone().unwrap();
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        w.write_all(&bytes).unwrap();
        w.write_all(&[0x12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
    });
    c.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let f = c.recv();
    let took = t0.elapsed();
    writer.join().unwrap();
    assert_eq!((f.t, f.payload), (0x13, vec![1, 2, 3, 4, 5, 6, 7, 8]));
    took
}

/// `--rate-config` meters every byte a client sends, against a derpd process: a frame of a
/// type derpd skips, however long, and a flood of empty frames go no faster than the rate
/// after the burst. (derper charges a frame's length once, capped at one maximum frame, so
/// both went through at the speed of the machine: 44 MiB/s for a 200 MiB frame under a
/// 10 KB/s limit.) Lower bounds on time only, which no machine can beat however fast (the
/// unit test `discard_charges_every_byte_past_the_prepaid_ones` in `src/net.rs` checks that each
/// byte is charged once).
#[test]
fn rate_config_meters_skipped_frames_and_headers() {
    let _turn = support::exclusive("limits");
    const RATE: u64 = 1_000_000;
    let file = support::fresh_path("rate_skipped", "rate.json");
    std::fs::write(
        &file,
        format!(r#"{{"PerClientRateLimitBytesPerSec": {RATE}}}"#),
    )
    .unwrap();
    let mut d = support::Derpd::start(
        &[
            "--dev",
            "-a",
            "127.0.0.1:0",
            "--stun-port",
            "0",
            "--rate-config",
            file.to_str().unwrap(),
        ]
        .map(support::s),
    );
    let addr = d.startup(false).addr;
    let burst = derpd::limits::MIN_RATE_BURST as f64;
    let ping = 5.0 + 8.0;
    // The bucket may hold up to one burst at the start of each part (it refills between them).
    let check = |what: &str, took: Duration, charged: f64| {
        let owed = charged - burst;
        let min = owed / RATE as f64 * 0.95;
        let rate = charged / took.as_secs_f64();
        println!("{what}: {charged} bytes in {took:?} ({rate:.0} B/s; limit {RATE} B/s + burst)");
        assert!(
            took.as_secs_f64() >= min,
            "{what}: {took:?} < {min:.2} s: {rate:.0} B/s, faster than the limit"
        );
    };

    // One frame of an unknown type, 2 MiB: ~2 s at 1 MB/s after the burst.
    let mut c = DerpClient::connect(addr);
    let len = 2 << 20;
    let mut frame = vec![0x7f, 0, 0, 0, 0];
    frame[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    frame.resize(5 + len, 0xee);
    let took = until_pong(&mut c, frame);
    check("a 2 MiB unknown frame", took, (5 + len) as f64 + ping);

    // 50,000 empty frames (KeepAlive, which a client has no reason to send): 250 KB of
    // headers, ~0.25 s on the same connection, its bucket about empty.
    let n = 50_000;
    let took = until_pong(&mut c, [6, 0, 0, 0, 0].repeat(n));
    check("50,000 empty frames", took, (5 * n) as f64 + ping);
    drop(d);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}
