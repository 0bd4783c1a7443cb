//! The HTTP front: probes, 426, captive-portal 204, home page, robots, port 80, --derp=false.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::inproc::*;
use derpd::config::Config;
use derpd::http::Home;

#[test]
fn probe_endpoints() {
    let srv = start_dev();
    for path in ["/derp/probe", "/derp/latency-check"] {
        for method in ["GET", "HEAD"] {
            let r = http_exchange(
                srv.addr(),
                format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            );
            assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
            assert!(r.contains("Access-Control-Allow-Origin: *\r\n"), "{r}");
        }
        let r = http_exchange(
            srv.addr(),
            format!("POST {path} HTTP/1.1\r\n\r\n").as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    }
}

#[test]
fn derp_without_upgrade_is_426() {
    let srv = start_dev();
    let r = http_exchange(srv.addr(), b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{r}");
    assert!(r.ends_with("DERP requires connection upgrade\n"), "{r}");
    let r = http_exchange(srv.addr(), b"GET /derp HTTP/1.1\r\nUpgrade: h2c\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 426 "), "{r}");
}

#[test]
fn upgrade_response_is_byte_exact() {
    let srv = start_dev();
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n",
    )
    .unwrap();
    let head = read_http_head(&mut s).unwrap();
    let want = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
        srv.relay().public_key.untyped_hex()
    );
    assert_eq!(head, want);
}

#[test]
fn generate_204_rules() {
    let srv = start_dev();
    let r = http_exchange(
        srv.addr(),
        b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: ts_1.2.3.4\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
    assert!(
        r.contains("X-Tailscale-Response: response ts_1.2.3.4\r\n"),
        "{r}"
    );
    assert!(r.contains(
        "Cache-Control: no-cache, no-store, must-revalidate, no-transform, max-age=0\r\n"
    ));
    for bad in ["has space", &"x".repeat(65), "a;b"] {
        let r = http_exchange(
            srv.addr(),
            format!("GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: {bad}\r\n\r\n")
                .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
        assert!(!r.contains("X-Tailscale-Response"), "{bad}: {r}");
    }
}

#[test]
fn home_robots_and_unmatched_paths() {
    let srv = start_dev();
    for path in ["/", "/foo", "/derp/x"] {
        let r = http_exchange(
            srv.addr(),
            format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {r}");
        assert!(r.contains("DERP server"), "{r}");
        assert!(r.contains("X-Frame-Options: DENY\r\n"));
    }
    let r = http_exchange(srv.addr(), b"GET /robots.txt HTTP/1.1\r\n\r\n");
    assert!(r.ends_with("User-agent: *\nDisallow: /\n"), "{r}");

    let mut cfg = Config::dev_loopback();
    cfg.home = Home::Redirect("https://example.com/derp".into());
    let srv = start(cfg);
    let r = http_exchange(srv.addr(), b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 302 Found\r\nLocation: https://example.com/derp\r\n"),
        "{r}"
    );

    let mut cfg = Config::dev_loopback();
    cfg.home = Home::Blank;
    cfg.derp = false;
    let srv = start(cfg);
    let r = http_exchange(srv.addr(), b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
        "{r}"
    );
    let r = http_exchange(srv.addr(), b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 404 ") && r.contains("derp server disabled"),
        "{r}"
    );
    let r = http_exchange(srv.addr(), b"GET /derp/probe HTTP/1.1\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 200 "),
        "probes work with --derp=false: {r}"
    );
}

#[test]
fn bad_heads_are_refused_and_others_keep_working() {
    let srv = start_dev();
    let r = http_exchange(srv.addr(), b"\x16\x03\x01\x00\x05hello\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "garbage gets 400 and a close: {r:?}"
    );
    let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(derpd::http::MAX_HEAD_LEN + 100, b'a');
    let r = http_exchange(srv.addr(), &big);
    // 431, unless the close (with our excess bytes unread) reset the connection first.
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 431 "), "{r:?}");
    let mut c = DerpClient::connect(srv.addr());
    let me = c.public();
    c.send(&me, b"ok");
    assert_eq!(c.recv_packet().1, b"ok");
}
