//! The HTTP front: `http::parse_head` on arbitrary bytes, as the server calls it on a buffer
//! that grows one read at a time, then every response built from a parsed request (port 80,
//! `/generate_204`, the WebSocket accept or refusal), which must be well-formed HTTP.
#![no_main]

use derpd::http::{self, parse_head, Request, MAX_HEAD_LEN};
use derpd::ws;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let res = parse_head(data);
    match &res {
        Ok(Some((req, n))) => {
            let n = *n;
            assert!(n > 0 && n <= data.len() && n <= MAX_HEAD_LEN, "n={n}");
            // The head alone parses to the same request: bytes after it are not looked at.
            assert_eq!(parse_head(&data[..n]), res);
            // A shorter read of the same head is "need more bytes", never an error or a
            // different request, wherever the read stopped.
            for k in cut_points(n) {
                assert_eq!(
                    parse_head(&data[..k]),
                    Ok(None),
                    "prefix of {k} of {n} bytes"
                );
            }
            responses(req);
        }
        Ok(None) => assert!(data.len() < MAX_HEAD_LEN),
        // The refusal is well-formed too.
        Err(e) => check_response(&http::head_error(e)),
    }
});

/// Up to ~64 prefix lengths below `n`: all of them for a short head, else the last 32 and a
/// spread of the rest (checking every one would be quadratic in the head's size).
fn cut_points(n: usize) -> impl Iterator<Item = usize> {
    let step = (n / 32).max(1);
    (0..n)
        .step_by(step)
        .chain(n.saturating_sub(32)..n)
        .filter(move |&k| k < n)
}

/// Every response the server may build from `req` parses back as one response head.
fn responses(req: &Request) {
    check_response(&http::port80(req));
    check_response(&http::no_content(req.challenge.as_deref()));
    check_response(&http::probe(&req.method));
    let remote = "192.0.2.1:41641".parse().unwrap_or_else(|_| unreachable!());
    match ws::accept(req, remote) {
        // The 101 itself is private to ws.rs; it is only sent for a request that passed.
        Ok(_) => assert!(
            req.method == "GET"
                && req.ws_version == "13"
                && req.ws_key.as_ref().is_some_and(|k| k.len() == 24)
        ),
        Err(resp) => check_response(&resp),
    }
}

/// `resp` is one complete HTTP/1.1 response: its head parses, every header line is a real
/// header (no CR or LF smuggled in from the request), and Content-Length matches the body.
fn check_response(resp: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(resp) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "bad response head ({other:?}): {:?}",
            String::from_utf8_lossy(resp)
        ),
    };
    let head = &resp[..n];
    let lines = head.split(|&b| b == b'\n').count();
    // Status line + headers + the empty line, each ended by CRLF: one more piece after split.
    assert_eq!(
        lines,
        r.headers.len() + 3,
        "{:?}",
        String::from_utf8_lossy(head)
    );
    assert_eq!(head.iter().filter(|&&b| b == b'\r').count(), lines - 1);
    let body = resp.len() - n;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            assert_eq!(h.value, body.to_string().as_bytes());
        }
    }
    if r.code == Some(204) {
        assert_eq!(body, 0);
    }
}
