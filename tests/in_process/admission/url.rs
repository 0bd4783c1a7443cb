//! `--verify-client-url`: the admission controller's client against a fake controller (plain
//! HTTP and https): the request, the answers, unreachable and too slow, the refused-key cache,
//! kept-alive connections, the fail-open log rate, bad URLs.

use super::{admission, check, check_from, closed_port, fake_tcp, handle, hang, http, login};
use super::{new_key, recv, responder, serve_each, tcp_accept, temp_dir};
use super::{Reply, Req, Responder, CLIENT_JSON};
use crate::support;
use derpd::admission::{Admission, AdmissionConfig, Check};
use derpd::key::{NodePrivate, NodePublic};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The admission checks for a URL, failing open or not.
fn url_admission(url: String, fail_open: bool) -> Admission {
    admission(AdmissionConfig {
        url: Some(url),
        fail_open,
        ..Default::default()
    })
}

/// One admission request, from `remote`, answered with `reply`.
fn admit_from(
    remote: &str,
    fail_open: bool,
    reply: impl Fn() -> Reply + Send + Sync + 'static,
) -> (NodePublic, Result<(), String>, Req, Admission) {
    let (addr, rx) = fake_tcp(responder(move |_| reply()));
    let a = url_admission(
        format!("http://{addr}/derp/admit?region=home&x=%2F"),
        fail_open,
    );
    let key = new_key();
    let res = check_from(&a, &key, remote);
    (key, res, recv(&rx), a)
}

fn admit(
    reply: impl Fn() -> Reply + Send + Sync + 'static,
) -> (NodePublic, Result<(), String>, Req) {
    let (k, r, q, _) = admit_from("192.0.2.7:41641", false, reply);
    (k, r, q)
}

#[test]
fn admission_request_is_derpers() {
    // An IPv4 client of a dual-stack listener: Source is plain IPv4, as derper sends it.
    let (key, res, req, a) = admit_from("[::ffff:192.0.2.7]:41641", false, || {
        http("200 OK", r#"{"Allow":true}"#)
    });
    assert_eq!(res, Ok(()));
    assert_eq!(req.method, "POST");
    assert_eq!(req.target, "/derp/admit?region=home&x=%2F");
    let body = format!(r#"{{"NodePublic":"{key}","Source":"192.0.2.7"}}"#);
    assert_eq!(req.body_text(), body);
    assert_eq!(
        req.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    // Go's http.NewRequest with a bytes.Reader sets no Content-Type.
    assert_eq!(req.header("content-type"), None);
    assert_eq!(req.header("authorization"), None);
    let host = req.header("host").unwrap();
    assert!(host.starts_with("127.0.0.1:"), "{host}");
    assert_eq!((a.rejections(), a.fail_open_admits()), (0, 0));

    let (key, _, req, _) = admit_from("[2001:db8::1]:1", false, || {
        http("200 OK", r#"{"Allow":true}"#)
    });
    assert_eq!(
        req.body_text(),
        format!(r#"{{"NodePublic":"{key}","Source":"2001:db8::1"}}"#)
    );
}

#[test]
fn admission_answers() {
    let allow = || http("200 OK", r#"{"Allow":true}"#);
    assert_eq!(admit(allow).1, Ok(()));
    // Go's json.Decoder: case-insensitive member names, extra members and trailing bytes.
    let (_, res, _) = admit(|| http("200 OK", "{\"allow\":true,\"Limit\":[1]}\nmore"));
    assert_eq!(res, Ok(()));
    // Chunked, and until close.
    let (_, res, _) = admit(|| {
        Reply::Send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"Al\r\na\r\nlow\":true}\r\n0\r\n\r\n"
                .to_vec(),
        )
    });
    assert_eq!(res, Ok(()));
    let (_, res, _) = admit(|| Reply::Send(b"HTTP/1.0 200 OK\r\n\r\n{\"Allow\":true}".to_vec()));
    assert_eq!(res, Ok(()));

    let (key, res, _) = admit(|| http("200 OK", r#"{"Allow":false}"#));
    assert_eq!(
        res,
        Err(format!("admission controller: {key}/192.0.2.7 not allowed"))
    );
    let (key, res, _) = admit(|| http("200 OK", "{}"));
    assert_eq!(
        res,
        Err(format!("admission controller: {key}/192.0.2.7 not allowed"))
    );
    // Not 200: refused whatever the body says, even when failing open.
    let (_, res, _, a) = admit_from("192.0.2.7:1", true, || {
        http("403 Forbidden", r#"{"Allow":true}"#)
    });
    assert_eq!(res, Err("admission controller: 403 Forbidden".into()));
    assert_eq!((a.rejections_by(Check::Url), a.fail_open_admits()), (1, 0));
    let (_, res, _) = admit(|| http("302 Found", ""));
    assert_eq!(res, Err("admission controller: 302 Found".into()));
    // Bad JSON, and JSON of the wrong shape.
    for body in [
        "Allow",
        r#"{"Allow":"true"}"#,
        "[true]",
        "",
        r#"{"Allow":tr"#,
    ] {
        let (_, res, _) = admit(move || http("200 OK", body));
        let why = res.unwrap_err();
        assert!(
            why.starts_with("admission controller: bad response: "),
            "{body:?}: {why}"
        );
    }
    // Only the first 4 KiB are read.
    let (_, res, _) = admit(|| {
        http(
            "200 OK",
            &format!(r#"{{"Pad":"{}","Allow":true}}"#, "x".repeat(4096)),
        )
    });
    assert!(res
        .unwrap_err()
        .starts_with("admission controller: bad response: "));
}

#[test]
fn admission_controller_unreachable() {
    let url = format!("http://{}/", closed_port());
    for fail_open in [true, false] {
        let a = url_admission(url.clone(), fail_open);
        let key = new_key();
        let res = check(&a, &key);
        if fail_open {
            assert_eq!(res, Ok(()));
            assert_eq!((a.fail_open_admits(), a.rejections()), (1, 0));
        } else {
            let why = res.unwrap_err();
            assert!(
                why.starts_with("admission controller unreachable: connecting to 127.0.0.1:"),
                "{why}"
            );
            assert_eq!((a.fail_open_admits(), a.rejections_by(Check::Url)), (0, 1));
        }
    }
    // Closed without an answer: unreachable, as for Go's http.Client.
    let (_, res, _, a) = admit_from("192.0.2.7:1", true, || Reply::Send(Vec::new()));
    assert_eq!((res, a.fail_open_admits()), (Ok(()), 1));
    let (_, res, _, _) = admit_from("192.0.2.7:1", false, || Reply::Send(Vec::new()));
    assert_eq!(
        res,
        Err("admission controller unreachable: connection closed without a response".into())
    );
    // Something that is not an answer, or a head cut short: refused, even failing open.
    for (reply, why) in [
        (&b"garbage\r\n\r\n"[..], "malformed HTTP response: "),
        (
            b"HTTP/1.1 200 OK\r\nContent-Le",
            "connection closed in the response head",
        ),
    ] {
        let (_, res, _, a) = admit_from("192.0.2.7:1", true, move || Reply::Send(reply.to_vec()));
        let res = res.unwrap_err();
        assert!(
            res.starts_with(&format!("admission controller: bad response: {why}")),
            "{res}"
        );
        assert_eq!((a.fail_open_admits(), a.rejections()), (0, 1));
    }
}

#[test]
fn admission_controller_too_slow() {
    // No answer in time: unreachable (fail-open applies, as for derper's ctx deadline in Do).
    let t0 = Instant::now();
    let (_, res, _, a) = admit_from("192.0.2.7:1", true, hang);
    assert_eq!((res, a.fail_open_admits()), (Ok(()), 1));
    let (_, res, _, _) = admit_from("192.0.2.7:1", false, hang);
    assert_eq!(
        res,
        Err("admission controller unreachable: timed out after 300ms".into())
    );
    // A 200 whose body does not come in time: refused, failing open or not.
    let slow_body =
        || Reply::SendAndHang(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"Allow\":".to_vec());
    let (_, res, _, a) = admit_from("192.0.2.7:1", true, slow_body);
    assert_eq!(
        res,
        Err("admission controller: reading the response: timed out after 300ms".into())
    );
    assert_eq!((a.fail_open_admits(), a.rejections()), (0, 1));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn refused_keys_are_remembered_and_fail_open_still_admits_when_down() {
    let refused = new_key();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let is_down = down.clone();
    let bad = refused.to_string();
    let (addr, rx) = fake_tcp(responder(move |r| {
        if is_down.load(Ordering::Relaxed) {
            // Closed without an answer: unreachable.
            Reply::Send(Vec::new())
        } else {
            let allow = !r.body_text().contains(&bad);
            http("200 OK", &format!(r#"{{"Allow":{allow}}}"#))
        }
    }));
    let a = url_admission(format!("http://{addr}/"), true);
    let not_allowed = format!("admission controller: {refused}/192.0.2.7 not allowed");
    assert_eq!(
        check_from(&a, &refused, "192.0.2.7:1"),
        Err(not_allowed.clone())
    );
    recv(&rx);
    // Again: refused without asking.
    assert_eq!(
        check_from(&a, &refused, "192.0.2.7:2"),
        Err(not_allowed.clone())
    );
    assert!(rx.try_recv().is_err(), "the controller was asked again");
    assert_eq!(a.controller_stats().cache_hits, 1);
    // From another address the controller is asked (it is told the address).
    assert!(check_from(&a, &refused, "192.0.2.8:1").is_err());
    recv(&rx);
    // Down: a refused key stays refused; others fail open.
    down.store(true, Ordering::Relaxed);
    assert_eq!(check_from(&a, &refused, "192.0.2.7:3"), Err(not_allowed));
    let fresh = new_key();
    assert_eq!(check_from(&a, &fresh, "192.0.2.7:4"), Ok(()));
    assert_eq!(a.fail_open_admits(), 1);
    assert_eq!(a.controller_stats().cache_hits, 2);
}

/// A kept-alive connection is not reused after `Connection: close`, and one the controller
/// closed while idle is replaced without failing the check (or failing it open).
#[test]
fn kept_alive_connections_follow_the_controller() {
    let allow = |close: bool| {
        let head = if close { "Connection: close\r\n" } else { "" };
        let body = r#"{"Allow":true}"#;
        format!(
            "HTTP/1.1 200 OK\r\n{head}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    // Says close but keeps the socket open: reusing it would time out.
    let (addr, rx) = fake_tcp(responder(move |_| Reply::SendAndHang(allow(true))));
    let a = url_admission(format!("http://{addr}/"), false);
    for _ in 0..3 {
        assert_eq!(check(&a, &new_key()), Ok(()));
        recv(&rx);
    }
    assert_eq!(a.controller_stats().connects, 3);
    // Closes after each answer without saying so: the next check finds the idle connection
    // closed and sends its request on a new one.
    let (addr, rx) = fake_tcp(responder(move |_| Reply::Send(allow(false))));
    let a = url_admission(format!("http://{addr}/"), false);
    for _ in 0..3 {
        assert_eq!(check(&a, &new_key()), Ok(()));
        recv(&rx);
    }
    assert!(rx.try_recv().is_err());
    assert_eq!(a.controller_stats().connects, 3);
}

/// derpd with a controller that is down, failing open: logins are admitted and logged, at
/// most [`derpd::lograte::LINES_PER_WINDOW`] lines per 10 s.
#[test]
fn fail_open_admissions_are_logged_within_a_rate() {
    const LOGINS: usize = 20;
    let closed = closed_port();
    let mut d = support::Derpd::start(&support::dev_loopback_args(&[
        support::s("--verify-client-url"),
        format!("http://{closed}/admit"),
    ]));
    let addr = d.startup(false).addr;
    let t0 = Instant::now();
    let mut first = None;
    for _ in 0..LOGINS {
        let key = NodePrivate::generate();
        first.get_or_insert(key.public());
        if let Err(e) = login(addr, key, CLIENT_JSON) {
            d.fail(&format!("not admitted: {e}"));
        }
    }
    let took = t0.elapsed();
    // SIGHUP's log line comes after every line the logins wrote.
    use rustix::process::{kill_process, Pid, Signal};
    kill_process(Pid::from_child(&d.child), Signal::HUP).unwrap();
    d.wait_until("the SIGHUP line", support::LOG_LAG_DEADLINE, |log| {
        log.iter().any(|l| l.contains("received SIGHUP"))
    });
    let want = format!(
        "fail-open admitted {}: admission controller unreachable: ",
        first.unwrap()
    );
    if !d.log.iter().any(|l| l.contains(&want)) {
        d.fail(&format!("no line {want:?}"));
    }
    let lines = d
        .log
        .iter()
        .filter(|l| l.contains("fail-open admitted "))
        .count();
    // A window starts at the first fail-open admission.
    let windows = 1 + (took.as_secs_f64() / derpd::lograte::WINDOW.as_secs_f64()) as usize;
    println!("{LOGINS} fail-open logins in {took:?}: {lines} log lines");
    if lines > derpd::lograte::LINES_PER_WINDOW as usize * windows {
        d.fail(&format!(
            "{lines} fail-open lines for {LOGINS} logins in {took:?}"
        ));
    }
}

#[test]
fn bad_urls_are_startup_errors() {
    for url in [
        "",
        "localhost:8080",
        "ftp://x/",
        "http://h:99999/",
        "http://a b/",
    ] {
        let e = Admission::new(AdmissionConfig {
            url: Some(url.into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.starts_with("--verify-client-url: "), "{url:?}: {e}");
    }
}

/// https: a fake controller with a certificate for 127.0.0.1, trusted through SSL_CERT_FILE.
/// The environment is the process's, so the checks run in a child test process (below).
#[test]
fn admission_over_https() {
    let dir = temp_dir();
    let cert = derpd::tls::load_or_create("127.0.0.1", &dir.join("trusted")).unwrap();
    assert!(cert.generated);
    // Through qemu-user when cross-testing: the test binary is the target's.
    let cert_file = dir.join("trusted").join("127.0.0.1.crt");
    let (status, text) = support::run_child_test(
        module_path!(),
        "https_child",
        &[
            ("SSL_CERT_FILE", cert_file.as_os_str()),
            ("DERPD_ADMISSION_HTTPS_DIR", dir.as_os_str()),
        ],
    );
    assert!(status.success(), "{text}");
    assert!(text.contains("https child: all checks passed"), "{text}");
}

/// A fake https controller serving `cert`.
fn fake_https(cert: &derpd::tls::ServerCert, respond: Responder) -> (SocketAddr, Receiver<Req>) {
    let cfg = derpd::tls::server_config(cert, "127.0.0.1", [7; 32], false).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    serve_each(tcp_accept(l), move |s| {
        let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
        handle(rustls::StreamOwned::new(conn, s), &respond, &tx);
    });
    (addr, rx)
}

/// The real timeout: a TLS handshake under qemu-user (cross tests) takes longer than
/// [`SHORT`](super::SHORT).
fn https_admission(url: String) -> Admission {
    let cfg = AdmissionConfig {
        url: Some(url),
        ..Default::default()
    };
    Admission::with_timing(cfg, derpd::admission::TIMEOUT, Duration::ZERO).unwrap()
}

#[test]
#[ignore = "run by admission_over_https, with SSL_CERT_FILE set"]
fn https_child() {
    let Some(dir) = std::env::var_os("DERPD_ADMISSION_HTTPS_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let trusted = derpd::tls::load_or_create("127.0.0.1", &dir.join("trusted")).unwrap();
    let (addr, rx) = fake_https(&trusted, responder(|_| http("200 OK", r#"{"Allow":true}"#)));
    let a = https_admission(format!("https://{addr}/admit"));
    let key = new_key();
    assert_eq!(check(&a, &key), Ok(()));
    let req = recv(&rx);
    assert_eq!(
        (req.method.as_str(), req.target.as_str()),
        ("POST", "/admit")
    );
    assert_eq!(
        req.body_text(),
        format!(r#"{{"NodePublic":"{key}","Source":"127.0.0.1"}}"#)
    );
    // A certificate that does not chain to SSL_CERT_FILE: unreachable.
    let other = derpd::tls::load_or_create("127.0.0.1", &dir.join("other")).unwrap();
    let (addr, _rx) = fake_https(&other, responder(|_| http("200 OK", r#"{"Allow":true}"#)));
    let why = check(&https_admission(format!("https://{addr}/admit")), &key).unwrap_err();
    assert!(
        why.starts_with("admission controller unreachable: TLS: "),
        "{why}"
    );
    println!("https child: all checks passed");
}
