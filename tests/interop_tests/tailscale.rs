#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Interop tests: derpd driven by Tailscale's own client code.
//!
//! `tests/interop/` is a Go module pinned to a `tailscale.com` release. It builds `derp-interop`,
//! which uses `derphttp` (DERP client, TLS pinning, fast start) and `net/stun` against a running
//! derpd. Each test here starts its own derpd, reads its log for the addresses (and the certificate
//! pin), runs the harness and checks its exit status and derpd's log.
//!
//! The helpers (and the log lines they rely on) are in `tests/support/` (the log lines: `derpd.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

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

/// TLS with a self-signed certificate for an IP hostname, pinned by the client (`sha256-raw:`);
/// `ciphers` for `--tls-ciphers` (the suite Tailscale's client negotiates is checked).
fn tls_pinned(test: &str, meta_cert: bool, ciphers: &str) {
    let Some(harness) = harness() else { return };
    let certdir = fresh_path(test, "certs"); // does not exist yet: derpd creates it
    let mut args = tls_args(&certdir);
    if !meta_cert {
        args.push(s("--meta-cert=false"));
    }
    args.push(format!("--tls-ciphers={ciphers}"));
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
    d.expect_tls_suite(3);

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
    tls_pinned("tls_pinned_meta_cert", true, "auto");
}

#[test]
fn tls_pinned_without_meta_cert() {
    tls_pinned("tls_pinned_without_meta_cert", false, "chacha");
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

/// The headscale `derp.paths` file derpd logs, read by the harness as headscale reads it
/// (gopkg.in/yaml.v3 into `tailcfg.DERPMap`) with every field checked; the CamelCase node JSON
/// and the policy file snippet must hold the same node and, read as headscale YAML, lose it; then
/// a Tailscale client logs in with the region headscale would serve.
fn headscale_yaml(test: &str, hostname: &str, listen: &str, ports: Ports) {
    let Some(harness) = harness() else { return };
    let stun = ports != Ports::StunOff;
    let dir = fresh_path(test, "files");
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec![
        s("--hostname"),
        s(hostname),
        s("--certmode"),
        s("manual"),
        s("--certdir"),
        dir.join("certs").display().to_string(),
        s("-c"),
        dir.join("derpd.key").display().to_string(),
        s("-a"),
        s(listen),
        s("--http-port"),
        s("-1"),
    ];
    match ports {
        Ports::Free => args.extend([s("--stun-port"), s("0")]),
        Ports::StunOff => args.push(s("--stun=false")),
        Ports::Defaults => {} // 3478
    }
    let mut d = if ports == Ports::Defaults {
        Derpd::start_command(in_new_netns(&derpd_command()), &args)
    } else {
        Derpd::start(&args)
    };
    let snippets = d.derp_map_snippets();
    let serving = d.log.iter().find_map(|l| parse_serving(l));
    let Some(Ok((addr, Mode::Tls))) = serving else {
        d.fail(&format!(
            "want a `serving on ... (TLS)` line, got {serving:?}"
        ));
    };
    // What the file must say: Tailscale's defaults (443, 3478) are left out (zero), STUN off is -1.
    let stun_port = match d.log.iter().find_map(|l| parse_stun(l)) {
        Some(Ok(a)) if stun && a.port() == 3478 => 0,
        Some(Ok(a)) if stun => i32::from(a.port()),
        None if !stun => -1,
        other => d.fail(&format!("STUN {stun}, but STUN line {other:?}")),
    };
    let derp_port = match addr.port() {
        443 => 0,
        p => p,
    };
    let Some(Ok(pin)) = parse_pin(&snippets.node_json) else {
        d.fail("no pin in the node JSON line");
    };
    for (name, text) in [
        ("derp.yaml", &snippets.headscale_yaml),
        ("node.json", &snippets.node_json),
        ("policy.json", &snippets.policy),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let path = |name: &str| dir.join(name).display().to_string();
    // In derpd's network namespace when it has one.
    let (program, mut harness_args) = if ports == Ports::Defaults {
        let pid = d.child.id().to_string();
        let ns = [s("-t"), pid, s("-n"), harness.display().to_string()];
        (PathBuf::from("nsenter"), ns.to_vec())
    } else {
        (harness.clone(), vec![])
    };
    harness_args.extend([
        s("headscale-yaml"),
        s("-file"),
        path("derp.yaml"),
        s("-host"),
        s(hostname),
        s("-pin"),
        pin,
        s("-derp-port"),
        derp_port.to_string(),
        s("-stun-port"),
        stun_port.to_string(),
        s("-node-json"),
        path("node.json"),
        s("-policy"),
        path("policy.json"),
        s("-connect"),
    ]);
    let out = d.run_harness(&program, &harness_args);
    if !out.contains("PASS headscale-yaml: all checks") {
        d.fail("the harness did not finish its checks");
    }
    d.expect_running();
    drop(d);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// Which ports derpd gets in [`headscale_yaml`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ports {
    /// Free ports for DERP and STUN: `derpport` and `stunport` in the file.
    Free,
    /// A free DERP port, `--stun=false`: `stunport: -1`.
    StunOff,
    /// 443 and 3478, in a network namespace of derpd's own: neither port in the file.
    Defaults,
}

#[test]
fn headscale_yaml_ipv4() {
    headscale_yaml(
        "headscale_yaml_ipv4",
        "127.0.0.1",
        "127.0.0.1:0",
        Ports::Free,
    );
}

#[test]
fn headscale_yaml_default_ports_in_netns() {
    if let Err(e) = can_unshare_net() {
        skip(&format!("no network namespace for 443/3478 ({e})"));
        return;
    }
    headscale_yaml(
        "headscale_yaml_default_ports_in_netns",
        "127.0.0.1",
        "127.0.0.1:443",
        Ports::Defaults,
    );
}

#[test]
fn headscale_yaml_ipv6_stun_off() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        skip(&format!("no IPv6 loopback (binding [::1]:0: {e})"));
        return;
    }
    headscale_yaml(
        "headscale_yaml_ipv6_stun_off",
        "::1",
        "[::1]:0",
        Ports::StunOff,
    );
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
    let log: Vec<String> = [
        "INFO  [derpd::server]   {\"CertName\":\"sha256-raw:ab\",\"Name\":\"900a\"}",
        "INFO  [derpd::server] headscale: save as a YAML file listed in derp.paths:",
        "regions:",
        "  900:",
        "    regionid: 900",
        "INFO  [derpd::server] tailnet policy file (Tailscale SaaS): paste into its top-level object:",
        "{",
        "  \"derpMap\": {}",
        "}",
        "INFO  [derpd::server] later",
    ]
    .map(String::from)
    .to_vec();
    let got = parse_derp_map_snippets(&log).unwrap();
    assert_eq!(
        got.node_json,
        r#"{"CertName":"sha256-raw:ab","Name":"900a"}"#
    );
    assert_eq!(got.headscale_yaml, "regions:\n  900:\n    regionid: 900\n");
    assert_eq!(got.policy, "{\n  \"derpMap\": {}\n}\n");
    // Incomplete until each part has ended.
    for n in [1, 4, 5, 8] {
        assert_eq!(parse_derp_map_snippets(&log[..n]), None, "{n} lines");
    }
    assert_eq!(parse_derp_map_snippets(&log[..9]).unwrap(), got);
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
    run_in_netns(
        t,
        &child_test(module_path!(), "nodes_child"),
        "tls",
        &harness,
        NODES_DEADLINE,
    );
}

/// The same over DERP over WebSocket (plain HTTP: the client's WebSocket dialer has no pins).
#[test]
fn nodes_through_derpd_websocket() {
    let Some(harness) = harness() else { return };
    let t = "nodes_through_derpd_websocket";
    run_in_netns(
        t,
        &child_test(module_path!(), "nodes_child"),
        "ws",
        &harness,
        NODES_DEADLINE,
    );
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
