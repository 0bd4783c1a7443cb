#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Interop tests: derpd driven by Tailscale's own client code.
//!
//! `tests/interop/` is a Go module pinned to a `tailscale.com` release. It builds `derp-interop`,
//! which uses `derphttp` (DERP client, TLS pinning, fast start) and `net/stun` against a running
//! derpd. Each test here starts its own derpd, reads its log for the addresses (and the certificate
//! pin), runs the harness and checks its exit status and derpd's log.
//!
//! The helpers (and the log lines they rely on) are in `tests/support/mod.rs`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::*;

// ---------------------------------------------------------------------------------------------
// Test cases

/// derpd's arguments for TLS on a free loopback port with a self-signed certificate for
/// 127.0.0.1 made in `certdir` (which must not exist yet), its key file beside it; STUN on a free
/// port.
fn tls_args(certdir: &Path) -> Vec<String> {
    let keyfile = certdir.with_file_name("derpd.key");
    vec![
        s("--hostname"),
        s("127.0.0.1"),
        s("--certmode"),
        s("manual"),
        s("--certdir"),
        certdir.display().to_string(),
        // Keep the server key out of /var/lib/derper (derper's default without -c).
        s("-c"),
        keyfile.display().to_string(),
        s("-a"),
        s("127.0.0.1:0"),
        s("--http-port"),
        s("-1"),
        s("--stun-port"),
        s("0"),
        s("--log-level"),
        s("debug"),
    ]
}

/// TLS with a self-signed certificate for an IP hostname, pinned by the client (`sha256-raw:`).
fn tls_pinned(test: &str, meta_cert: bool) {
    let Some(harness) = harness() else { return };
    let certdir = fresh_path(test, "certs"); // does not exist yet: derpd creates it
    let mut args = tls_args(&certdir);
    if !meta_cert {
        args.push(s("--meta-cert=false"));
    }
    let mut d = Derpd::start(&args);
    let st = d.startup(true);
    if st.mode != Mode::Tls {
        d.fail(&format!("derpd serves {:?}, want TLS", st.mode));
    }
    let addr = dial_addr(st.addr, false);
    let stun = dial_addr(st.stun, false);
    let pin = st.pin.clone().unwrap();

    let relay = d.run_harness(&harness, &pinned_relay_args(3, addr.port(), pin));
    d.run_harness(&harness, &[s("stun"), s("-addr"), stun.to_string()]);
    d.expect_client_fast_start(&relay, meta_cert, 3);
    d.expect_fast_start(meta_cert, 3);
    d.expect_websocket(false, 3);

    for f in ["127.0.0.1.crt", "127.0.0.1.key"] {
        if !certdir.join(f).is_file() {
            d.fail(&format!("{} missing", certdir.join(f).display()));
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let key_mode = mode(&certdir.join("127.0.0.1.key"));
        let dir_mode = mode(&certdir);
        if key_mode != 0o600 || dir_mode != 0o700 {
            d.fail(&format!(
                "cert dir mode {dir_mode:o} (want 700), key file mode {key_mode:o} (want 600)"
            ));
        }
    }
    d.expect_running();
    drop(d);
    let _ = std::fs::remove_dir_all(certdir.parent().unwrap());
}

/// derpd's arguments for plain-HTTP dev mode on `listen`, STUN on a free port.
fn dev_args(listen: &str) -> [String; 7] {
    [
        s("--dev"),
        s("-a"),
        s(listen),
        s("--stun-port"),
        s("0"),
        s("--log-level"),
        s("debug"),
    ]
}

/// Plain-HTTP dev mode on one loopback address.
fn dev_mode(listen: &str, v6: bool) {
    let Some(harness) = harness() else { return };
    let mut d = Derpd::start(&dev_args(listen));
    let st = d.startup(false);
    if st.mode != Mode::PlainHttp {
        d.fail(&format!("derpd serves {:?}, want plain HTTP", st.mode));
    }
    let addr = dial_addr(st.addr, v6);
    let stun = dial_addr(st.stun, v6);
    if addr.is_ipv6() != v6 || stun.is_ipv6() != v6 {
        d.fail(&format!(
            "derpd listens on {addr} and STUN {stun}; want IPv{} for both",
            if v6 { 6 } else { 4 }
        ));
    }
    let relay = d.run_harness(
        &harness,
        &[
            s("relay"),
            s("-clients"),
            s("3"),
            s("-url"),
            format!("http://{addr}/derp"),
        ],
    );
    d.run_harness(&harness, &[s("stun"), s("-addr"), stun.to_string()]);
    // Plain HTTP has no meta cert, so no client can fast-start.
    d.expect_client_fast_start(&relay, false, 3);
    d.expect_fast_start(false, 3);
    d.expect_websocket(false, 3);
    d.expect_running();
}

/// DERP over WebSocket on `/derp`: Tailscale's derphttp dials a WebSocket when built with
/// `ts_debug_websockets` (the harness is) and run with `TS_DEBUG_DERP_WS_CLIENT=1`.
#[test]
fn websocket_dev_mode() {
    let Some(harness) = harness() else { return };
    let mut d = Derpd::start(&dev_args("127.0.0.1:0"));
    let st = d.startup(false);
    let addr = dial_addr(st.addr, false);
    let relay = d.run_harness_env(
        &harness,
        &[
            s("relay"),
            s("-clients"),
            s("3"),
            s("-url"),
            format!("http://{addr}/derp"),
        ],
        &[("TS_DEBUG_DERP_WS_CLIENT", "1")],
    );
    d.expect_client_fast_start(&relay, false, 3);
    d.expect_websocket(true, 3);
    d.expect_fast_start(false, 3);
    d.expect_running();
}

#[test]
fn tls_pinned_meta_cert() {
    tls_pinned("tls_pinned_meta_cert", true);
}

#[test]
fn tls_pinned_without_meta_cert() {
    tls_pinned("tls_pinned_without_meta_cert", false);
}

#[test]
fn dev_mode_plain_http() {
    dev_mode("127.0.0.1:0", false);
}

#[test]
fn dev_mode_ipv6() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        skip(&format!("no IPv6 loopback (binding [::1]:0: {e})"));
        return;
    }
    dev_mode("[::1]:0", true);
}

#[test]
fn log_line_parsers() {
    let (a, m) = parse_serving("2026/01/01 derpd: serving on 127.0.0.1:41234 (TLS)")
        .unwrap()
        .unwrap();
    assert_eq!((a, m), ("127.0.0.1:41234".parse().unwrap(), Mode::Tls));
    let (a, m) = parse_serving("INFO serving on [::1]:3340 (plain HTTP)")
        .unwrap()
        .unwrap();
    assert_eq!((a, m), ("[::1]:3340".parse().unwrap(), Mode::PlainHttp));
    assert!(parse_serving("serving on 127.0.0.1:1 with TLS")
        .unwrap()
        .is_err());
    assert!(parse_serving("nothing here").is_none());
    assert_eq!(
        parse_stun("x STUN listening on 127.0.0.1:39876")
            .unwrap()
            .unwrap(),
        "127.0.0.1:39876".parse::<SocketAddr>().unwrap()
    );
    let hex = "a103b418616de7a9cd8e6ef98d7eb413e6f7e98581ed035263c3e620d5bb7fdb";
    let line = format!(
        r#"  {{"Name":"custom","RegionID":900,"HostName":"127.0.0.1","CertName":"sha256-raw:{hex}"}}"#
    );
    assert_eq!(
        parse_pin(&line).unwrap().unwrap(),
        format!("sha256-raw:{hex}")
    );
    let upper = line.replace(hex, &hex.to_uppercase());
    assert!(parse_pin(&upper).unwrap().is_err());
    assert!(parse_pin(r#""CertName":"sha256-raw:abc""#)
        .unwrap()
        .is_err());
    assert_eq!(
        dial_addr("[::]:5".parse().unwrap(), true),
        "[::1]:5".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        dial_addr("0.0.0.0:5".parse().unwrap(), false),
        "127.0.0.1:5".parse::<SocketAddr>().unwrap()
    );
}

/// SIGTERM, seen by Tailscale's client: every client gets a Restarting message (ReconnectIn
/// under 2 s, TryFor 5 s) and then its connection closes; derpd exits 0.
#[test]
fn graceful_restart_seen_by_tailscale_clients() {
    use rustix::process::{kill_process, Pid, Signal};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Instant;

    let Some(harness) = harness() else { return };
    let mut d = Derpd::start(&dev_args("127.0.0.1:0"));
    let addr = d.startup(false).addr;
    let url = format!("http://{addr}/derp");
    let mut h = Command::new(&harness)
        .args(["restart", "-url", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    spawn_line_reader(h.stdout.take().unwrap(), tx.clone());
    spawn_line_reader(h.stderr.take().unwrap(), tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    let read_until = |out: &mut Vec<String>, stop: &dyn Fn(&str) -> bool| -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = stop(&l);
                    out.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    };
    if !read_until(&mut out, &|l| {
        l.contains("INFO READY") || l.starts_with("FAIL")
    }) {
        let _ = h.kill();
        d.fail(&format!("harness never got READY:\n{}", out.join("\n")));
    }
    kill_process(Pid::from_child(&d.child), Signal::TERM).unwrap();
    // The harness's output ends when it exits.
    read_until(&mut out, &|_| false);
    let status = h.wait().unwrap();
    let transcript = out.join("\n");
    println!("{transcript}");
    if !status.success() || !transcript.contains("PASS restart: all checks (3 clients)") {
        d.fail(&format!("derp-interop restart: {status}\n{transcript}"));
    }
    let exited = d.wait_exit(Duration::from_secs(20));
    assert!(exited.success(), "derpd exit status {exited}");
}

// ---------------------------------------------------------------------------------------------
// Whole Tailscale nodes through derpd

/// How long one namespaced run of two nodes may take, derpd's start and the detector included
/// (a passing run takes about 5 s natively).
const NODES_DEADLINE: Duration = Duration::from_secs(90);

/// Two real Tailscale nodes (`tsnet` under `testcontrol`, direct paths off) move 4 MiB over TCP
/// through derpd over TLS with the pin; see `nodes_child`.
#[test]
fn nodes_through_derpd_tls_pinned() {
    let Some(harness) = harness() else { return };
    let t = "nodes_through_derpd_tls_pinned";
    run_in_netns(t, "nodes_child", "tls", &harness, NODES_DEADLINE);
}

/// The same over DERP over WebSocket (plain HTTP: the client's WebSocket dialer has no pins).
#[test]
fn nodes_through_derpd_websocket() {
    let Some(harness) = harness() else { return };
    let t = "nodes_through_derpd_websocket";
    run_in_netns(t, "nodes_child", "ws", &harness, NODES_DEADLINE);
}

/// Inside the namespace that `run_in_netns` made: the stray-packet detector, then derpd, then
/// `derp-interop nodes` (which checks the data's hash, derpd's varz byte counters and that the
/// path is DERP), then the detector's verdict.
#[test]
#[ignore = "run by the nodes_through_derpd_* tests, inside a network namespace of their own"]
fn nodes_child() {
    let Some((variant, harness)) = netns_child() else {
        return;
    };
    let strays = Strays::start(&harness);
    let (mut d, derp, extra) = match variant.as_str() {
        "tls" => {
            let mut d = Derpd::start(&tls_args(&fresh_path("nodes_child", "certs")));
            let st = d.startup(true);
            let pin = st.pin.clone().unwrap();
            (d, format!("{}/{pin}", dial_addr(st.addr, false)), None)
        }
        "ws" => {
            let mut d = Derpd::start(&dev_args("127.0.0.1:0"));
            let st = d.startup(false);
            (
                d,
                format!("http://{}", dial_addr(st.addr, false)),
                Some(s("-ws")),
            )
        }
        other => panic!("unknown DERPD_NETNS_CHILD {other:?}"),
    };
    let mut args = vec![s("nodes"), s("-derp"), derp];
    args.extend(extra.clone());
    let out = d.run_harness(&harness, &args);
    if !out.contains("PASS nodes: all checks") {
        d.fail("the nodes harness did not report `PASS nodes: all checks`");
    }
    // Both nodes logged in over WebSocket, or both not.
    d.expect_websocket(extra.is_some(), 2);
    d.expect_running();
    match strays.finish() {
        Ok(out) => println!("{out}"),
        Err(e) => d.fail(&format!("traffic beyond loopback:\n{e}")),
    }
}
