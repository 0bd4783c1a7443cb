//! The server's life: a start after a crash left its files broken, a graceful shutdown
//! (Restarting to every client, a bounded flush, exit 0 on SIGTERM/SIGINT) and SIGHUP reloads of
//! the rate config and the certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::inproc::{start_dev, DerpClient, Frame, IO_TIMEOUT};
use crate::support::{s, Derpd, STARTUP_DEADLINE};
use derpd::server::{ShutdownReport, RECONNECT_SPREAD, RESTART_TRY_FOR};
use rustix::process::{kill_process, Pid, Signal};

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
    let _turn = support::exclusive("lifecycle");
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
    // The listener is closed: nothing new gets in. (The freed port may already belong to a
    // server another test started on port 0: a login there shows that server's key.)
    match TcpStream::connect(srv.addr()) {
        Err(_) => {}
        Ok(s) => {
            let mut c = DerpClient::new_raw(s);
            c.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            if c.login_upgrade(b"{}").is_ok() {
                assert_ne!(c.server_key, srv.relay().public_key, "login after shutdown");
            }
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
    let _turn = support::exclusive("lifecycle");
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
    let _turn = support::exclusive("lifecycle");
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

/// derpd with a self-signed certificate for 127.0.0.1 in `certdir` and its key file `key`.
fn ip_cert_args(certdir: &Path, key: &Path) -> Vec<String> {
    vec![
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
        certdir.display().to_string(),
        s("-c"),
        key.display().to_string(),
    ]
}

/// A power cut soon after the first start (routers lose power) could leave an empty key file
/// and half a self-signed certificate pair (derper, and derpd before its writes were
/// crash-safe, wrote them without fsync and rename). derpd starts anyway, with a new key and a
/// new certificate, and says loudly that the certificate pin changed.
#[test]
fn start_replaces_an_empty_key_file_and_a_half_certificate_pair() {
    let _turn = support::exclusive("lifecycle");
    let dir = support::fresh_path("crash-files", "certs");
    let key_file = dir.with_file_name("derper.key");
    let old = derpd::tls::load_or_create("127.0.0.1", &dir).unwrap();
    std::fs::remove_file(dir.join("127.0.0.1.crt")).unwrap();
    std::fs::write(&key_file, "").unwrap();

    let mut d = Derpd::start(&ip_cert_args(&dir, &key_file));
    let pin = d.startup(true).pin.unwrap();
    assert_ne!(pin, format!("sha256-raw:{}", old.leaf_sha256_hex()));
    let changed = format!("PIN CHANGED to {pin}");
    d.wait_until(
        "the warnings about the lost key and the new pin",
        IO_TIMEOUT,
        |log| {
            log.iter().any(|l| {
                l.contains("WARN") && l.contains("derper.key is empty") && l.contains("new key")
            }) && log.iter().any(|l| {
                l.contains("WARN") && l.contains("127.0.0.1.crt is missing") && l.contains(&changed)
            })
        },
    );
    // The key file now holds the key derpd serves with.
    let (key, created) = derpd::key::load_or_create_key_file(&key_file).unwrap();
    assert!(!created);
    let server_key = format!("server key {}", key.public());
    assert!(d.log.iter().any(|l| l.contains(&server_key)), "{:?}", d.log);
    assert!(
        std::fs::read_to_string(dir.join("127.0.0.1.crt")).is_ok(),
        "the new pair was written"
    );
}

/// A key file with something in it that is not a key may be the real key, damaged: derpd
/// refuses to start and leaves it alone.
#[test]
fn start_refuses_a_key_file_that_is_not_a_key() {
    let _turn = support::exclusive("lifecycle");
    let key_file = support::fresh_path("bad-key", "derper.key");
    let text = "{\"PrivateKey\": \"privkey:12";
    std::fs::write(&key_file, text).unwrap();
    let mut d = Derpd::start(&[
        s("-a"),
        s("127.0.0.1:0"),
        s("--stun-port"),
        s("0"),
        s("-c"),
        key_file.display().to_string(),
    ]);
    let status = d.wait_exit(STARTUP_DEADLINE);
    assert!(!status.success(), "{status}");
    d.wait_until("the refusal", IO_TIMEOUT, |log| {
        log.iter()
            .any(|l| l.contains("derper.key") && l.contains("does not replace a key file"))
    });
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), text);
}

#[test]
fn sighup_reloads_the_certificate() {
    let _turn = support::exclusive("lifecycle");
    let dir = support::fresh_path("sighup-cert", "certs");
    let other = support::fresh_path("sighup-cert", "renewed");
    let mut d = Derpd::start(&ip_cert_args(&dir, &dir.join("derper.key")));
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
    let _turn = support::exclusive("lifecycle");
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

/// A reload reads files off the executor: with one executor thread and a rate config that
/// blocks its reader (a FIFO with no writer yet), clients still log in and relay.
#[test]
fn a_reload_that_blocks_on_a_file_does_not_stop_the_relay() {
    let _turn = support::exclusive("lifecycle");
    let dir = support::fresh_path("sighup-fifo", "d");
    std::fs::create_dir_all(&dir).unwrap();
    let rc = dir.join("rate.json");
    std::fs::write(&rc, r#"{"PerClientRateLimitBytesPerSec": 1000000}"#).unwrap();
    let (mut d, addr) = start_derpd(&[
        s("--threads"),
        s("1"),
        s("--rate-config"),
        rc.display().to_string(),
    ]);
    std::fs::remove_file(&rc).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&rc)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    signal(&d, Signal::HUP);
    d.wait_until("the reload to begin", IO_TIMEOUT, |log| {
        log.iter().any(|l| l.contains("received SIGHUP: reloading"))
    });
    // The reload is now blocked opening the FIFO.
    let mut a = DerpClient::connect(addr);
    let mut b = DerpClient::connect(addr);
    let bk = b.public();
    a.send(&bk, b"during a blocked reload");
    assert_eq!(b.recv_packet().1, b"during a blocked reload");
    // Let it finish.
    std::fs::write(&rc, r#"{"PerClientRateLimitBytesPerSec": 3000000}"#).unwrap();
    d.wait_until("the reloaded rate config", IO_TIMEOUT, |log| {
        log.iter()
            .any(|l| l.contains("rate config applied: client-rate=3000000 bytes/sec"))
    });
}
