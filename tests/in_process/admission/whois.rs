//! `--verify-clients`: tailscaled's LocalAPI whois, against a fake on a unix socket.

use super::{admission, check, fake_unix, hang, http, new_key, recv, responder, temp_dir};
use super::{Reply, Req, SHORT};
use derpd::admission::{Admission, AdmissionConfig, Check};
use derpd::key::NodePublic;
use std::time::Instant;

/// One whois against a fake LocalAPI answering `reply`: the result and the request.
fn whois(
    reply: impl Fn() -> Reply + Send + Sync + 'static,
) -> (NodePublic, Result<(), String>, Req, Admission) {
    let dir = temp_dir();
    let sock = dir.join("ts.sock");
    let rx = fake_unix(&sock, responder(move |_| reply()));
    let a = admission(AdmissionConfig {
        tailscaled_socket: Some(sock),
        ..Default::default()
    });
    let key = new_key();
    let res = check(&a, &key);
    (key, res, recv(&rx), a)
}

#[test]
fn whois_request_is_tailscales() {
    let (key, res, req, a) = whois(|| http("200 OK", r#"{"Node":{"ID":1},"UserProfile":{}}"#));
    assert_eq!(res, Ok(()));
    assert_eq!(req.method, "GET");
    // Go's url.QueryEscape escapes the colon.
    assert_eq!(
        req.target,
        format!("/localapi/v0/whois?addr=nodekey%3A{}", key.untyped_hex())
    );
    assert_eq!(req.header("host"), Some("local-tailscaled.sock"));
    assert_eq!(req.header("tailscale-cap"), Some("142"));
    assert_eq!(req.header("content-length"), None);
    assert!(req.body.is_empty());
    assert_eq!(a.rejections(), 0);
}

#[test]
fn whois_answers() {
    // A big answer, chunked (tailscaled's Go server chunks answers over 2 KiB).
    let (_, res, _, _) = whois(|| {
        let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..40 {
            r.extend_from_slice(format!("1000\r\n{}\r\n", "x".repeat(4096)).as_bytes());
        }
        r.extend_from_slice(b"0\r\n\r\n");
        Reply::Send(r)
    });
    assert_eq!(res, Ok(()));

    let (key, res, _, a) = whois(|| http("404 Not Found", "no match for IP:port\n"));
    assert_eq!(
        res,
        Err(format!(
            "peer {key} not authorized (not found in local tailscaled)"
        ))
    );
    assert_eq!((a.rejections(), a.rejections_by(Check::Tailscaled)), (1, 1));

    // What a tailscaled older than whois-by-node-key says (Tailscale issue 12617).
    let (_, res, _, _) = whois(|| http("400 Bad Request", "invalid 'addr' parameter\n"));
    assert_eq!(
        res,
        Err("tailscaled version is too old (out of sync with derper binary)".into())
    );

    let failed = |key: &NodePublic, rest: &str| {
        Err(format!(
            "failed to query local tailscaled status for {key}: {rest}"
        ))
    };
    let (key, res, _, _) =
        whois(|| http("400 Bad Request", "invalid nodekey in 'addr' parameter\n"));
    assert_eq!(
        res,
        failed(&key, "400 Bad Request: invalid nodekey in 'addr' parameter")
    );
    let (key, res, _, _) = whois(|| http("500 Internal Server Error", "boom\n"));
    assert_eq!(res, failed(&key, "500 Internal Server Error: boom"));
    let (key, res, _, _) = whois(|| http("403 Forbidden", "whois access denied\n"));
    assert_eq!(res, failed(&key, "403 Forbidden: whois access denied"));
    // A 200 cut short.
    let (key, res, _, _) =
        whois(|| Reply::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"Node\":".to_vec()));
    assert_eq!(
        res,
        failed(
            &key,
            "reading the whois response: connection closed in the response body"
        )
    );
    // Not HTTP.
    let (key, res, _, _) = whois(|| Reply::Send(b"SSH-2.0-nope\r\n\r\n".to_vec()));
    assert!(
        res.as_ref().unwrap_err().starts_with(&format!(
            "failed to query local tailscaled status for {key}: malformed HTTP response"
        )),
        "{res:?}"
    );
}

#[test]
fn whois_times_out() {
    let t0 = Instant::now();
    let (key, res, _, _) = whois(hang);
    let took = t0.elapsed();
    assert_eq!(
        res,
        Err(format!(
            "failed to query local tailscaled status for {key}: timed out after 300ms"
        ))
    );
    assert!(took >= SHORT && took < SHORT * 10, "{took:?}");
    // A head with no end also runs into the deadline.
    let (_, res, _, _) = whois(|| Reply::SendAndHang(b"HTTP/1.1 200 OK\r\n".to_vec()));
    assert!(res.unwrap_err().ends_with("timed out after 300ms"));
}

#[test]
fn whois_without_tailscaled() {
    let dir = temp_dir();
    let sock = dir.join("absent.sock");
    let a = admission(AdmissionConfig {
        tailscaled_socket: Some(sock.clone()),
        ..Default::default()
    });
    let key = new_key();
    let why = check(&a, &key).unwrap_err();
    let want = format!(
        "failed to query local tailscaled status for {key}: connecting to {}: ",
        sock.display()
    );
    assert!(why.starts_with(&want), "{why}");
}
