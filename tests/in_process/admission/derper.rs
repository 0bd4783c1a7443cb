//! Tailscale's derper, same fakes: the requests must be the same, and so must the refusals.

use super::{admission, check, fake_tcp, fake_unix, http, login, recv, responder, start_with};
use super::{temp_dir, Req, CLIENT_JSON};
use crate::support;
use derpd::admission::AdmissionConfig;
use derpd::key::NodePrivate;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Headers in which derpd's request may differ from Go's `http.Client`: the product name,
/// Go's transparent gzip (derpd does not decode gzip, so it does not ask for it), and derpd's
/// one-request connections.
const MAY_DIFFER: [&str; 3] = ["user-agent", "accept-encoding", "connection"];

fn assert_same_request(what: &str, go: &Req, ours: &Req) {
    let filtered = |r: &Req| {
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(n, _)| !MAY_DIFFER.contains(&n.as_str()))
            .cloned()
            .collect();
        h.sort();
        h
    };
    assert_eq!(
        (&ours.method, &ours.target, &ours.body, filtered(ours)),
        (&go.method, &go.target, &go.body, filtered(go)),
        "{what}: derper sent\n{}{}\nderpd sent\n{}{}",
        go.head,
        go.body_text(),
        ours.head,
        ours.body_text()
    );
}

/// A real derper asking both fakes: tailscaled's LocalAPI on `sock` and the admission URL,
/// failing closed. Returns it once it listens, and its address.
fn start_derper_verifying(
    derper: &Path,
    dir: &Path,
    sock: &Path,
    url: &str,
) -> (support::Derpd, SocketAddr) {
    let listen = SocketAddr::from(([127, 0, 0, 1], support::reserve_port()));
    let args = [
        "-a".to_string(),
        listen.to_string(),
        "-c".into(),
        dir.join("derper.key").display().to_string(),
        "-stun=false".into(),
        "-http-port".into(),
        "-1".into(),
        "-verify-clients".into(),
        "-socket".into(),
        sock.display().to_string(),
        "-verify-client-url".into(),
        url.to_string(),
        "-verify-client-url-fail-open=false".into(),
    ];
    let mut d = support::Derpd::start_command(Command::new(derper), &args);
    if let Err(e) = support::wait_listening(listen, support::STARTUP_DEADLINE) {
        d.fail(&format!("derper: {e}"));
    }
    (d, listen)
}

/// derpd's admission with the same two checks as [`start_derper_verifying`].
fn verifying(sock: PathBuf, url: String) -> AdmissionConfig {
    AdmissionConfig {
        tailscaled_socket: Some(sock),
        url: Some(url),
        fail_open: false,
        allow_keys_file: None,
    }
}

#[test]
fn derper_sends_the_same_requests() {
    let Some(derper) = support::derper() else {
        return;
    };
    let dir = temp_dir();
    let sock = dir.join("ts.sock");
    let whois_rx = fake_unix(&sock, responder(|_| http("200 OK", "{}\n")));
    let (admit_addr, admit_rx) = fake_tcp(responder(|_| http("200 OK", r#"{"Allow":true}"#)));
    // With user information: Go's client turns it into Basic authorization.
    let url = format!("http://derp:s%40cret@{admit_addr}/derp/admit?region=home");
    let key = NodePrivate::generate();

    let (mut d, listen) = start_derper_verifying(&derper, &dir, &sock, &url);
    if let Err(e) = login(listen, key.clone(), CLIENT_JSON) {
        d.fail(&format!("derper refused the client: {e}"));
    }
    let (go_whois, go_admit) = (recv(&whois_rx), recv(&admit_rx));
    drop(d);

    let srv = start_with(verifying(sock, url), None);
    login(srv.addr(), key, CLIENT_JSON).unwrap();
    let (our_whois, our_admit) = (recv(&whois_rx), recv(&admit_rx));
    for (what, go, ours) in [
        ("whois", &go_whois, &our_whois),
        ("admission", &go_admit, &our_admit),
    ] {
        println!(
            "--- {what}: derper\n{}{}\n--- {what}: derpd\n{}{}\n",
            go.head,
            go.body_text(),
            ours.head,
            ours.body_text()
        );
        assert_same_request(what, go, ours);
    }
    // What the comparison relies on, spelled out.
    assert_eq!(go_admit.header("content-type"), None);
    assert!(go_admit.header("authorization").is_some());
    assert_eq!(go_whois.header("tailscale-cap"), Some("142"));
}

/// The same refusals, for the same reasons: derper's log line `client <key> rejected: <why>`
/// against derpd's reason, key by key, with fakes that answer each key differently.
#[test]
fn derper_refuses_for_the_same_reasons() {
    let Some(derper) = support::derper() else {
        return;
    };
    let dir = temp_dir();
    let keys: Vec<NodePrivate> = (0..6).map(|_| NodePrivate::generate()).collect();
    let hex: Vec<String> = keys.iter().map(|k| k.public().untyped_hex()).collect();
    let h = hex.clone();
    let sock = dir.join("ts.sock");
    let _whois_rx = fake_unix(
        &sock,
        responder(move |r| {
            if r.target.ends_with(&h[0]) {
                http("404 Not Found", "no match for IP:port\n")
            } else if r.target.ends_with(&h[1]) {
                http("400 Bad Request", "invalid 'addr' parameter\n")
            } else if r.target.ends_with(&h[2]) {
                http("500 Internal Server Error", "boom\n")
            } else {
                http("200 OK", "{}\n")
            }
        }),
    );
    let h = hex.clone();
    let (admit_addr, _admit_rx) = fake_tcp(responder(move |r| {
        let body = r.body_text();
        if body.contains(&h[3]) {
            http("200 OK", r#"{"Allow":false}"#)
        } else if body.contains(&h[4]) {
            http("403 Forbidden", r#"{"Allow":true}"#)
        } else {
            http("200 OK", r#"{"Allow":true}"#)
        }
    }));
    let url = format!("http://{admit_addr}/admit");
    let (mut d, listen) = start_derper_verifying(&derper, &dir, &sock, &url);
    let ours = admission(verifying(sock, url));
    for (i, key) in keys.iter().enumerate() {
        let public = key.public();
        let res = login(listen, key.clone(), CLIENT_JSON);
        let mine = check(&ours, &public);
        if i == 5 {
            if let Err(e) = res {
                d.fail(&format!("derper refused the last key: {e}"));
            }
            assert_eq!(mine, Ok(()));
            continue;
        }
        match res {
            Ok(_) => d.fail(&format!("derper admitted key {i}")),
            Err(e) if !e.starts_with("reading ServerInfo: ") => {
                d.fail(&format!("derper: key {i}: {e}"))
            }
            Err(_) => {}
        }
        let marker = format!("client {public} rejected: ");
        d.wait_until(&marker, support::LOG_LAG_DEADLINE, |log| {
            log.iter().any(|l| l.contains(&marker))
        });
        let line = d.log.iter().find(|l| l.contains(&marker)).unwrap();
        let theirs = &line[line.find(&marker).unwrap() + marker.len()..];
        println!(
            "key {i}: derper: {theirs}\n       derpd:  {}",
            mine.as_ref().unwrap_err()
        );
        assert_eq!(mine, Err(theirs.to_string()), "key {i}");
    }
}
