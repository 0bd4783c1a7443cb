//! The RFC 6455 accept: the upgrade request's checks (derper's order and status codes) and
//! the 101 with `Sec-WebSocket-Accept`.

use std::net::SocketAddr;

use base64::Engine as _;

use crate::http::{self, Request};
use crate::lograte::{limited, WEBSOCKETS};

/// RFC 6455's GUID, appended to the client's key for `Sec-WebSocket-Accept`.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A handshake the server accepts: the 101 to send, and whether the client speaks `derp`.
#[derive(Debug)]
pub struct Accept {
    pub(super) head: String,
    pub(super) derp: bool,
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut input = Vec::with_capacity(key.len() + GUID.len());
    input.extend_from_slice(key.as_bytes());
    input.extend_from_slice(GUID.as_bytes());
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(d)
}

/// True when `key` is standard base64 of exactly 16 bytes (what Go's `base64.StdEncoding`
/// decodes to 16 bytes: 22 alphabet characters and `==`).
fn key_ok(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[..22]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
        && &b[22..] == b"=="
}

/// True when the comma-separated header `value` has `token` (any case).
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks a `/derp` WebSocket upgrade as derper's websocket library does (same checks, order
/// and status codes). `Err` is the complete refusal to send before closing.
pub fn accept(req: &Request, remote: SocketAddr) -> Result<Accept, Vec<u8>> {
    let upgrade_hdrs = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    let (status, reason, extra, msg) = if !has_token(&req.connection, "upgrade") {
        let msg = format!(
            "WebSocket protocol violation: Connection header {:?} does not contain Upgrade",
            req.connection
        );
        (426, "Upgrade Required", upgrade_hdrs, msg)
    } else if req.method != "GET" {
        let msg = format!(
            "WebSocket protocol violation: handshake request method is not GET but {:?}",
            req.method
        );
        (405, "Method Not Allowed", "", msg)
    } else if req.ws_version != "13" {
        let msg = format!(
            "unsupported WebSocket protocol version (only 13 is supported): {:?}",
            req.ws_version
        );
        (400, "Bad Request", "Sec-WebSocket-Version: 13\r\n", msg)
    } else {
        match req.ws_key.as_deref() {
            None => {
                let msg = "WebSocket protocol violation: missing Sec-WebSocket-Key".to_string();
                (400, "Bad Request", "", msg)
            }
            Some(k) if !key_ok(k) => {
                let msg = format!(
                    "WebSocket protocol violation: invalid Sec-WebSocket-Key {k:?}, \
                     must be a 16 byte base64 encoded string"
                );
                (400, "Bad Request", "", msg)
            }
            Some(k) => {
                // The first offered protocol equal to `derp` in any case is chosen, but only
                // exactly `derp` is served (derper closes with 1008 otherwise).
                let chosen = req
                    .ws_protocol
                    .split(',')
                    .map(str::trim)
                    .find(|t| t.eq_ignore_ascii_case("derp"));
                let mut head = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                    accept_key(k)
                );
                if let Some(p) = chosen {
                    head.push_str("Sec-WebSocket-Protocol: ");
                    head.push_str(p);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                return Ok(Accept {
                    head,
                    derp: chosen == Some("derp"),
                });
            }
        }
    };
    limited!(info, WEBSOCKETS, "{remote}: websocket refused: {msg}");
    let mut resp = http::text_error(status, reason, &msg);
    if !extra.is_empty() {
        // After the status line, like the other headers.
        if let Some(at) = resp.windows(2).position(|w| w == b"\r\n") {
            let at = at + 2;
            resp.splice(at..at, extra.bytes());
        }
    }
    Err(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// RFC 6455 §1.3's example (the value is also what Python's hashlib/base64 give).
    #[test]
    fn accept_key_rfc6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn ws_request() -> Request {
        Request {
            method: "GET".into(),
            path: "/derp".into(),
            upgrade: "websocket".into(),
            connection: "keep-alive, Upgrade".into(),
            ws_protocol: "derp".into(),
            ws_version: "13".into(),
            ws_key: Some("dGhlIHNhbXBsZSBub25jZQ==".into()),
            ..Request::default()
        }
    }

    fn status(r: Result<Accept, Vec<u8>>) -> String {
        let resp = r.unwrap_err();
        let resp = String::from_utf8(resp).unwrap();
        resp.lines().next().unwrap().to_string()
    }

    #[test]
    fn handshake_checks() {
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let acc = accept(&ws_request(), remote).unwrap();
        assert!(acc.derp);
        assert_eq!(
            acc.head,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Protocol: derp\r\n\r\n"
        );
        let with = |f: &dyn Fn(&mut Request)| {
            let mut r = ws_request();
            f(&mut r);
            accept(&r, remote)
        };
        for (p, derp) in [("chat, derp", true), ("DERP", false), ("xderp", false)] {
            let acc = with(&|r| r.ws_protocol = p.into()).unwrap();
            assert_eq!(acc.derp, derp, "{p}");
            assert_eq!(acc.head.contains("Sec-WebSocket-Protocol"), p != "xderp");
        }
        let r = with(&|r| r.connection = "keep-alive".into());
        assert_eq!(status(r), "HTTP/1.1 426 Upgrade Required");
        assert_eq!(
            status(with(&|r| r.method = "POST".into())),
            "HTTP/1.1 405 Method Not Allowed"
        );
        let r = with(&|r| r.ws_version = "8".into()).unwrap_err();
        let r = String::from_utf8(r).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(r.ends_with("(only 13 is supported): \"8\"\n"), "{r}");
        for key in [
            None,
            Some(""),
            Some("dGhlIHNhbXBsZSBub25jZQ="),
            Some("c2hvcnQ="),
        ] {
            let r = with(&|r| r.ws_key = key.map(String::from));
            assert_eq!(status(r), "HTTP/1.1 400 Bad Request", "{key:?}");
        }
        assert!(with(&|r| r.ws_key = Some("AAAAAAAAAAAAAAAAAAAAAA==".into())).is_ok());
        assert!(with(&|r| r.ws_key = Some("AAAAAAAAAAAAAAAAAAAAA*==".into())).is_err());
    }
}
