//! The server's life: a graceful shutdown (Restarting to every client, a bounded flush, exit
//! 0 on SIGTERM/SIGINT) and SIGHUP reloads of the rate config and the certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{start_dev, DerpClient, Frame, IO_TIMEOUT};
use derpd::server::{ShutdownReport, RECONNECT_SPREAD, RESTART_TRY_FOR};
use rustix::process::{kill_process, Pid, Signal};
use support::{s, Derpd};

/// Reads frames until the Restarting frame; returns (reconnect-in, try-for) in ms.
fn expect_restarting(c: &mut DerpClient) -> (u32, u32) {
    loop {
        let f: Frame = c.read_frame().expect("a Restarting frame before the close");
        if f.t == 0x15 {
            assert_eq!(f.payload.len(), 8);
            let ms = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
            return (ms(&f.payload[..4]), ms(&f.payload[4..]));
        }
    }
}

fn check_restarting(c: &mut DerpClient) {
    let (reconnect_in, try_for) = expect_restarting(c);
    assert!(u128::from(reconnect_in) < RECONNECT_SPREAD.as_millis());
    assert_eq!(u128::from(try_for), RESTART_TRY_FOR.as_millis());
    assert!(c.is_closed_by_server(), "closed after Restarting");
}

#[test]
fn shutdown_tells_every_client_and_flushes_their_queues() {
    let srv = start_dev();
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    let bk = b.public();
    a.send(&bk, b"queued before the shutdown");
    assert_eq!(b.recv_packet().1, b"queued before the shutdown");
    let report = srv.shutdown(Duration::from_secs(5));
    assert_eq!(
        report,
        ShutdownReport {
            notified: 2,
            left: 0
        }
    );
    check_restarting(&mut a);
    check_restarting(&mut b);
    // The listener is closed: nothing new gets in.
    match TcpStream::connect(srv.addr()) {
        Err(_) => {}
        Ok(s) => {
            let mut c = DerpClient::new_raw(s);
            c.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            assert!(c.login_upgrade(b"{}").is_err(), "login after shutdown");
        }
    }
}

fn start_derpd(extra: &[String]) -> (Derpd, std::net::SocketAddr) {
    let mut args = vec![
        s("--dev"),
        s("-a"),
        s("127.0.0.1:0"),
        s("--stun-port"),
        s("0"),
    ];
    args.extend_from_slice(extra);
    let mut d = Derpd::start(&args);
    let addr = d.startup(false).addr;
    (d, addr)
}

fn signal(d: &Derpd, sig: Signal) {
    kill_process(Pid::from_child(&d.child), sig).unwrap();
}

#[test]
fn sigterm_and_sigint_restart_clients_and_exit_zero() {
    for sig in [Signal::TERM, Signal::INT] {
        let (mut d, addr) = start_derpd(&[]);
        let mut a = DerpClient::connect(addr);
        let mut b = DerpClient::connect(addr);
        signal(&d, sig);
        check_restarting(&mut a);
        check_restarting(&mut b);
        let status = d.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "{sig:?}: exit status {status}");
        d.wait_until("the shutdown report", IO_TIMEOUT, |log| {
            log.iter()
                .any(|l| l.contains("shutdown: 2 clients told to reconnect, 0 still connected"))
        });
    }
}

#[test]
fn sighup_reloads_the_rate_config() {
    let dir = support::fresh_path("sighup-rate", "d");
    std::fs::create_dir_all(&dir).unwrap();
    let rc = dir.join("rate.json");
    std::fs::write(&rc, r#"{"PerClientRateLimitBytesPerSec": 1000000}"#).unwrap();
    let (mut d, addr) = start_derpd(&[s("--rate-config"), rc.display().to_string()]);
    d.wait_until("the rate config at start", IO_TIMEOUT, |log| {
        log.iter().any(|l| {
            l.contains(
                "rate config applied: client-rate=1000000 bytes/sec, client-burst=65568 bytes",
            )
        })
    });
    std::fs::write(
        &rc,
        r#"{"PerClientRateLimitBytesPerSec": 2000000, "PerClientRateBurstBytes": 100000}"#,
    )
    .unwrap();
    signal(&d, Signal::HUP);
    d.wait_until("the reloaded rate config", IO_TIMEOUT, |log| {
        log.iter().any(|l| {
            l.contains(
                "rate config applied: client-rate=2000000 bytes/sec, client-burst=100000 bytes",
            )
        })
    });
    std::fs::write(&rc, "{not json").unwrap();
    signal(&d, Signal::HUP);
    d.wait_until("the failed reload", IO_TIMEOUT, |log| {
        log.iter()
            .any(|l| l.contains("rate config reload failed, keeping the old one"))
    });
    // Still serving.
    let mut a = DerpClient::connect(addr);
    let mut b = DerpClient::connect(addr);
    let bk = b.public();
    a.send(&bk, b"after reloads");
    assert_eq!(b.recv_packet().1, b"after reloads");
}

#[test]
fn sighup_reloads_the_certificate() {
    let dir = support::fresh_path("sighup-cert", "certs");
    let other = support::fresh_path("sighup-cert", "renewed");
    let args = [
        s("-a"),
        s("127.0.0.1:0"),
        s("--stun-port"),
        s("0"),
        s("--http-port"),
        s("-1"),
        s("--certmode"),
        s("manual"),
        s("--hostname"),
        s("127.0.0.1"),
        s("--certdir"),
        dir.display().to_string(),
        s("-c"),
        dir.join("derper.key").display().to_string(),
    ];
    let mut d = Derpd::start(&args);
    let first_pin = d.startup(true).pin.unwrap();
    let renewed = derpd::tls::load_or_create("127.0.0.1", &other).unwrap();
    for ext in ["crt", "key"] {
        std::fs::copy(
            other.join(format!("127.0.0.1.{ext}")),
            dir.join(format!("127.0.0.1.{ext}")),
        )
        .unwrap();
    }
    signal(&d, Signal::HUP);
    let new_pin = renewed.leaf_sha256_hex();
    assert_ne!(new_pin, first_pin);
    d.wait_until("the reloaded certificate", IO_TIMEOUT, |log| {
        log.iter()
            .any(|l| l.contains("loaded certificate") && l.contains(&new_pin))
    });
}

#[test]
fn shutdown_report_counts_only_clients() {
    // A server with nobody connected shuts down at once.
    let srv = start_dev();
    let t0 = Instant::now();
    let report = srv.shutdown(Duration::from_secs(5));
    assert_eq!(
        report,
        ShutdownReport {
            notified: 0,
            left: 0
        }
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "did not wait out the grace"
    );
}
