//! The pages over loopback and on port 80, the debug key from the environment, a bad
//! `TS_DEBUG_TRUSTED_CIDRS`, and `/debug/derpmap` against the log.

use super::*;

/// The pages and derper's rule for a loopback peer, in process (no environment knobs).
#[test]
fn debug_pages_over_loopback() {
    let srv = start_dev();
    let addr = srv.addr();

    let r = request(addr, "GET", "/debug/", "");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.head.contains("Content-Type: text/html; charset=utf-8"),
        "{}",
        r.head
    );
    assert!(r.head.contains("X-Frame-Options: DENY"), "{}", r.head);
    for want in [
        "<b>Uptime:</b>",
        "<b>Version:</b>",
        "<b>Mesh key:</b> false",
        "/debug/varz",
        "/debug/check",
    ] {
        assert!(r.body.contains(want), "{want} in {}", r.body);
    }
    let h = request(addr, "HEAD", "/debug/", "");
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty(), "HEAD has no body: {:?}", h.body);
    assert!(
        h.head
            .contains(&format!("Content-Length: {}", r.body.len())),
        "{}",
        h.head
    );

    let v = request(addr, "HEAD", "/debug/varz", "");
    assert!(v.status == 200 && v.body.is_empty(), "{}", v.head);
    let c = request(addr, "GET", "/debug/check", "");
    assert_eq!(
        (c.status, c.body.as_str()),
        (200, "derp.Server ConsistencyCheck okay")
    );
    let n = request(addr, "GET", "/debug/pprof/", "");
    assert_eq!((n.status, n.body.as_str()), (404, "404 page not found\n"));
    let d = request(addr, "GET", "/debug?x=1", "");
    assert_eq!(d.status, 307, "{}", d.head);
    assert!(d.head.contains("\r\nLocation: /debug/?x=1"), "{}", d.head);

    // Behind a proxy the peer address proves nothing: denied, even from loopback.
    for path in ["/debug/", "/debug/varz", "/debug/nope"] {
        let f = request(addr, "GET", path, "X-Forwarded-For: 127.0.0.1\r\n");
        assert_eq!(
            (f.status, f.body.as_str()),
            (403, "debug access denied\n"),
            "{path}"
        );
    }
}

/// In TLS mode the port-80 listener serves `/debug…` like the main one (derper's
/// `Port80Handler`), and still redirects everything else.
#[test]
fn debug_on_port_80() {
    let dir = fresh_path("debug_port80", "certs");
    let mut cfg = derpd::config::Config::dev_loopback();
    cfg.tls = Some(derpd::config::TlsMode::manual("127.0.0.1", dir.clone()));
    cfg.http_port = Some(0);
    let srv = inproc::start(cfg);
    let a = srv.http_addr().unwrap();
    let r = request(a, "GET", "/debug/", "");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.body.contains("<b>TLS hostname:</b> 127.0.0.1"),
        "{}",
        r.body
    );
    assert_eq!(request(a, "GET", "/debug/varz", "").status, 200);
    let f = request(a, "GET", "/debug/varz", "X-Forwarded-For: 1.2.3.4\r\n");
    assert_eq!(f.status, 403);
    assert_eq!(request(a, "GET", "/debug", "").status, 307);
    let d = request(a, "GET", "/derp", "");
    assert!(
        d.head
            .starts_with("HTTP/1.1 302 Found\r\nLocation: https://x/derp\r\n"),
        "{}",
        d.head
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// `TS_DEBUG_KEY_PATH`: the right `?debugkey=` opens `/debug/` even behind a proxy.
#[test]
fn debug_key_from_env() {
    let keyfile = fresh_path("debug_key", "debug.key");
    std::fs::write(&keyfile, "  k3y/with space \n").unwrap();
    let mut cmd = derpd_command();
    cmd.env("TS_DEBUG_KEY_PATH", &keyfile)
        .env("TS_DEBUG_TRUSTED_CIDRS", "192.0.2.0/24")
        .env_remove("TS_ALLOW_DEBUG_IP");
    let mut d = Derpd::start_command(
        cmd,
        &[
            s("--dev"),
            s("-a"),
            s("127.0.0.1:0"),
            s("--stun-port"),
            s("0"),
        ],
    );
    let addr = d.startup(false).addr;
    let xff = "X-Forwarded-For: 203.0.113.1\r\n";
    let cases = [
        ("GET", "/debug/varz", "", 200),
        ("GET", "/debug/varz", xff, 403),
        ("GET", "/debug/varz?debugkey=k3y%2Fwith+space", xff, 200),
        ("GET", "/debug/?debugkey=k3y%2Fwith%20space", xff, 200),
        ("GET", "/debug/varz?debugkey=k3y", xff, 403),
        ("HEAD", "/debug/varz?debugkey=k3y%2Fwith+space", xff, 403),
    ];
    for (method, target, headers, want) in cases {
        let r = request(addr, method, target, headers);
        if r.status != want {
            d.fail(&format!(
                "{method} {target} {headers:?}: {} want {want}",
                r.head
            ));
        }
    }
    d.expect_running();
    drop(d);
    let _ = std::fs::remove_dir_all(keyfile.parent().unwrap());
}

/// A bad `TS_DEBUG_TRUSTED_CIDRS` stops derpd at start (derper exits at the first request
/// that needs it).
#[test]
fn debug_bad_trusted_cidrs_is_a_start_error() {
    let mut cmd = derpd_command();
    cmd.env("TS_DEBUG_TRUSTED_CIDRS", "10.0.0.0/8,bogus");
    let args = [
        s("--dev"),
        s("-a"),
        s("127.0.0.1:0"),
        s("--stun-port"),
        s("0"),
    ];
    let mut d = Derpd::start_command(cmd, &args);
    d.wait_until("the CIDR error", support::STARTUP_DEADLINE, |log| {
        log.iter()
            .any(|l| l.contains("invalid CIDR in TS_DEBUG_TRUSTED_CIDRS: \"bogus\""))
    });
    let deadline = Instant::now() + support::STARTUP_DEADLINE;
    loop {
        match d.child.try_wait().unwrap() {
            Some(status) => {
                assert!(!status.success());
                break;
            }
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => d.fail("derpd still running after a start error"),
        }
    }
}

/// `/debug/derpmap` (derpd's own page, read by the LuCI page's rpcd plugin) holds the DERPMap
/// entry the log shows, in the same three forms, under the same access rule; plain HTTP mode
/// has none.
#[test]
fn derpmap_page_matches_the_log() {
    let dir = fresh_path("debug_derpmap", "files");
    std::fs::create_dir_all(&dir).unwrap();
    let args = [
        s("--hostname=127.0.0.1"),
        s("--certmode=manual"),
        format!("--certdir={}", dir.join("certs").display()),
        format!("-c={}", dir.join("derpd.key").display()),
        s("-a=127.0.0.1:0"),
        s("--http-port=0"),
        s("--stun-port=0"),
    ];
    let mut d = Derpd::start(&args);
    let snippets = d.derp_map_snippets();
    d.wait_until("the port-80 listener line", Duration::from_secs(5), |log| {
        log.iter().any(|l| l.contains("port-80 listener on "))
    });
    let http = d
        .log
        .iter()
        .find_map(|l| {
            let rest = &l[l.find("port-80 listener on ")? + "port-80 listener on ".len()..];
            rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
        })
        .unwrap();
    let r = request(http, "GET", "/debug/derpmap", "");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.head.contains("Content-Type: application/json"),
        "{}",
        r.head
    );
    let page: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let node: serde_json::Value = serde_json::from_str(&snippets.node_json).unwrap();
    assert_eq!(page["node"], node);
    assert_eq!(page["region"]["Nodes"][0], node);
    assert_eq!(
        format!("{}\n", page["policy_file"].as_str().unwrap()),
        snippets.policy
    );
    assert_eq!(
        format!("{}\n", page["headscale_yaml"].as_str().unwrap()),
        snippets.headscale_yaml
    );
    let f = request(
        http,
        "GET",
        "/debug/derpmap",
        "X-Forwarded-For: 1.2.3.4\r\n",
    );
    assert_eq!(f.status, 403);

    let plain = start_dev();
    let r = request(plain.addr(), "GET", "/debug/derpmap", "");
    assert_eq!(r.status, 404, "{}", r.head);
}
