//! A flood of bad connections writes a bounded number of log lines (issue 17, point 7): the
//! logger writes synchronously into logd/journald, so one line per failed login would let a
//! stranger fill the pipe and block executor threads.

use crate::support;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use crate::support::inproc::*;
use derpd::config::Config;
use derpd::handshake;
use derpd::key::NodePrivate;
use derpd::lograte::{LINES_PER_WINDOW, WINDOW};

/// Counts the lines written for each kind of event.
struct Counter;

/// (substring of the line, its kind's metric label, lines seen).
static SEEN: [(&str, &str, AtomicUsize); 3] = [
    ("login refused", "login", AtomicUsize::new(0)),
    (": refused: ", "head", AtomicUsize::new(0)),
    ("websocket refused", "websocket", AtomicUsize::new(0)),
];

impl log::Log for Counter {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        let line = r.args().to_string();
        for (what, _, n) in &SEEN {
            if line.contains(what) {
                n.fetch_add(1, Relaxed);
            }
        }
    }
    fn flush(&self) {}
}

static LOGGER: Counter = Counter;

const FLOOD: usize = 100;

/// Runs [`flood_child`] in a process of its own (this test binary again): it installs the
/// process's logger and counts every line the process logs, so no other test may run beside it.
#[test]
fn a_flood_of_bad_connections_writes_a_few_lines_per_kind() {
    let _turn = support::exclusive("logflood");
    // Through qemu-user when cross-testing: the test binary is the target's.
    let (status, text) = support::run_child_test(
        module_path!(),
        "flood_child",
        &[("DERPD_LOGFLOOD_CHILD", "1".as_ref())],
    );
    println!("{text}");
    assert!(status.success(), "{text}");
    assert!(text.contains("test result: ok. 1 passed"), "{text}");
}

#[test]
#[ignore = "run by a_flood_of_bad_connections_writes_a_few_lines_per_kind, in a process of its own"]
fn flood_child() {
    if std::env::var_os("DERPD_LOGFLOOD_CHILD").is_none() {
        return;
    }
    log::set_logger(&LOGGER).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let srv = derpd::server::Server::start(Config::dev_loopback()).unwrap();
    let sk = srv.relay().public_key;
    let addr = srv.addr();
    let started = Instant::now();

    let not_json = handshake::client_info_frame(&NodePrivate::generate(), &sk, b"hello");
    for _ in 0..FLOOD {
        // A login with a ClientInfo that is not JSON: refused, and logged before the close.
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut c = DerpClient::new_raw(s);
        c.s.write_all(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
            .unwrap();
        c.s.write_all(&not_json).unwrap();
        c.read_server_key().unwrap();
        assert!(c.is_closed_by_server());
        // A request head that is not HTTP.
        assert!(http_exchange(addr, b"HELLO\r\n\r\n").contains("400"));
        // A WebSocket upgrade without a key.
        let ws = "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n\r\n";
        assert!(http_exchange(addr, ws.as_bytes()).contains("400"));
    }
    // Lines are written before the server closes, so every one is in by now.
    let windows = started.elapsed().as_secs() / WINDOW.as_secs() + 1;
    // Each window: its share, and from the second on a summary line ("… and N more").
    let most = windows as usize * LINES_PER_WINDOW as usize;
    let mut held = 0;
    for (what, label, n) in &SEEN {
        let n = n.load(Relaxed);
        println!("{what:?}: {n} lines for {FLOOD} connections in {windows} window(s)");
        assert!(
            (1..=most).contains(&n),
            "{what:?}: {n} lines for {FLOOD} connections (at most {most})"
        );
        assert!(derpd::lograte::KIND_LABELS.contains(label));
        let name = format!("derpd_log_lines_suppressed{{kind=\"{label}\"}}");
        let s = varz_value(addr, &name).unwrap_or_else(|| panic!("{name} missing"));
        held += s;
        assert_eq!(
            n + s as usize,
            FLOOD,
            "{name}: every line is written or counted"
        );
    }
    assert!(held > 0);
    srv.shutdown(std::time::Duration::from_secs(1));
}
