//! The HTTP/1.1 front: parse one bounded request head (httparse), decide what it asks for, and
//! build the byte-exact responses derper gives. No I/O here.

use std::fmt::Write as _;

/// Largest request head accepted (request line + headers). Tailscale clients send ~200 bytes;
/// browsers a few KiB. Anything larger gets 431 and a closed connection.
pub const MAX_HEAD_LEN: usize = 16 << 10;
/// Most headers accepted in one request head.
const MAX_HEADERS: usize = 48;

/// The parts of a request head this server looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// The full request target, for redirects.
    pub target: String,
    /// `Host` header.
    pub host: String,
    /// `Upgrade` header, lowercased.
    pub upgrade: String,
    /// `Derp-Fast-Start: 1`: the client sends its login right after the head; no 101 wanted.
    pub fast_start: bool,
    /// A non-empty `Ideal-Node` header: the client would rather be on another node.
    pub not_ideal: bool,
    /// `X-Tailscale-Challenge` header, for `/generate_204`.
    pub challenge: Option<String>,
    /// `Sec-WebSocket-Protocol` header.
    pub ws_protocol: String,
    /// `Sec-WebSocket-Key` header, trimmed; `None` when absent. A repeated header makes it
    /// empty (invalid), as Go's websocket server refuses several keys.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version` header.
    pub ws_version: String,
    /// `Connection` header.
    pub connection: String,
    /// A non-empty `X-Forwarded-For` header: the request came through a proxy, so the peer
    /// address says nothing about the client (`/debug` access).
    pub forwarded: bool,
}

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Over [`MAX_HEAD_LEN`] or too many headers.
    TooLarge,
    /// Not HTTP/1.x.
    Malformed(String),
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge => f.write_str("request head too large"),
            Self::Malformed(e) => write!(f, "malformed request head: {e}"),
        }
    }
}

impl std::error::Error for HeadError {}

/// Parses a request head from the start of `buf`. `Ok(None)`: need more bytes.
/// `Ok(Some((req, n)))`: the head is `buf[..n]`; bytes after it belong to the next protocol.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if n > MAX_HEAD_LEN {
        return Err(HeadError::TooLarge);
    }
    let target = r.path.unwrap_or("/").to_string();
    let mut req = Request {
        method: r.method.unwrap_or("").to_string(),
        path: target.split('?').next().unwrap_or("").to_string(),
        target,
        ..Request::default()
    };
    for h in r.headers.iter() {
        let v = String::from_utf8_lossy(h.value).trim().to_string();
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            req.host = v;
        } else if name.eq_ignore_ascii_case("upgrade") {
            req.upgrade = v.to_ascii_lowercase();
        } else if name.eq_ignore_ascii_case("derp-fast-start") {
            req.fast_start = v == "1";
        } else if name.eq_ignore_ascii_case("ideal-node") {
            req.not_ideal = !v.is_empty();
        } else if name.eq_ignore_ascii_case("x-tailscale-challenge") {
            req.challenge = Some(v);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            req.ws_protocol = v;
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            req.ws_key = Some(if req.ws_key.is_some() {
                String::new()
            } else {
                v
            });
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            req.ws_version = v;
        } else if name.eq_ignore_ascii_case("connection") {
            req.connection = v;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            // Any non-empty one counts (Go looks at the first only; stricter is safer here).
            req.forwarded |= !v.is_empty();
        }
    }
    Ok(Some((req, n)))
}

/// What `--home` asks the home page to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Home {
    /// derpd's short HTML page.
    Default,
    /// An empty 200 page.
    Blank,
    /// A 302 to this http(s) URL.
    Redirect(String),
}

impl Home {
    /// Parses the `--home` flag as derper does: "", "blank", or an http(s) URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" => Ok(Self::Default),
            "blank" => Ok(Self::Blank),
            u if u.starts_with("http://") || u.starts_with("https://") => {
                Ok(Self::Redirect(u.to_string()))
            }
            other => Err(format!(
                "unsupported --home value {other:?}: use \"\", \"blank\" or an http(s) URL"
            )),
        }
    }
}

/// The exact 101 derper sends to switch to DERP.
pub fn switching_protocols(server_key_hex: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
         Derp-Version: 2\r\nDerp-Public-Key: {server_key_hex}\r\n\r\n"
    )
}

/// Security headers derper adds to pages a browser may render.
pub(crate) const BROWSER_HEADERS: &str =
    "Strict-Transport-Security: max-age=63072000; includeSubDomains\r\n\
Content-Security-Policy: default-src 'self'; frame-ancestors 'none'; form-action 'self'; \
base-uri 'self'; block-all-mixed-content; object-src 'none'\r\n\
X-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\n";

/// A complete response with `Connection: close`. `extra` holds full header lines.
/// For HEAD the body is left out but its length is still announced.
pub fn response(status: u16, reason: &str, extra: &str, body: &[u8], head: bool) -> Vec<u8> {
    let mut s = String::with_capacity(160 + extra.len());
    let _ = write!(
        s,
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = s.into_bytes();
    if !head {
        out.extend_from_slice(body);
    }
    out
}

/// A plain-text error page like Go's `http.Error`.
pub fn text_error(status: u16, reason: &str, msg: &str) -> Vec<u8> {
    let body = format!("{msg}\n");
    response(
        status,
        reason,
        "Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n",
        body.as_bytes(),
        false,
    )
}

/// The response to a refused request head: 431 when too large, 400 otherwise.
pub fn head_error(e: &HeadError) -> Vec<u8> {
    match e {
        HeadError::TooLarge => text_error(
            431,
            "Request Header Fields Too Large",
            "request head too large",
        ),
        HeadError::Malformed(_) => text_error(400, "Bad Request", "malformed request"),
    }
}

/// `/derp/probe` and `/derp/latency-check`: GET/HEAD → 200 with CORS `*`, else 405.
pub fn probe(method: &str) -> Vec<u8> {
    match method {
        "GET" | "HEAD" => response(200, "OK", "Access-Control-Allow-Origin: *\r\n", b"", false),
        _ => text_error(405, "Method Not Allowed", "bogus probe method"),
    }
}

/// True when a captive-portal challenge may be echoed: ≤64 chars of `[A-Za-z0-9._:-]`.
pub fn challenge_ok(c: &str) -> bool {
    c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
}

/// `/generate_204`: 204, no caching, and the challenge echoed when it is well-formed.
pub fn no_content(challenge: Option<&str>) -> Vec<u8> {
    let mut extra = String::from(
        "Cache-Control: no-cache, no-store, must-revalidate, no-transform, max-age=0\r\n",
    );
    if let Some(c) = challenge.filter(|c| !c.is_empty() && challenge_ok(c)) {
        let _ = write!(extra, "X-Tailscale-Response: response {c}\r\n");
    }
    // 204 carries no body and, per RFC 9110, no Content-Length.
    format!("HTTP/1.1 204 No Content\r\n{extra}Connection: close\r\n\r\n").into_bytes()
}

/// `/robots.txt`: disallow everything.
pub fn robots(head: bool) -> Vec<u8> {
    let extra = format!("{BROWSER_HEADERS}Content-Type: text/plain; charset=utf-8\r\n");
    response(200, "OK", &extra, b"User-agent: *\nDisallow: /\n", head)
}

/// The home page (`/` and every unmatched path), per `--home`.
pub fn home(home: &Home, derp_enabled: bool, head: bool) -> Vec<u8> {
    match home {
        Home::Redirect(url) => response(302, "Found", &format!("Location: {url}\r\n"), b"", head),
        Home::Blank => {
            let extra = format!("{BROWSER_HEADERS}Content-Type: text/html; charset=utf-8\r\n");
            response(200, "OK", &extra, b"", head)
        }
        Home::Default => {
            let status = if derp_enabled {
                ""
            } else {
                "<p>Status: disabled</p>\n"
            };
            let body = format!(
                "<html><head><title>DERP</title></head><body>\n\
                 <h1>DERP</h1>\n<p>This is a <a href=\"https://tailscale.com/\">Tailscale</a> \
                 DERP server, run by derpd {}.</p>\n\
                 <p>It relays encrypted packets for Tailscale clients. It is not a web \
                 site.</p>\n{status}</body></html>\n",
                env!("CARGO_PKG_VERSION")
            );
            let extra = format!("{BROWSER_HEADERS}Content-Type: text/html; charset=utf-8\r\n");
            response(200, "OK", &extra, body.as_bytes(), head)
        }
    }
}

/// Port 80 in TLS mode: `/generate_204` is served; GET/HEAD redirect to https; others get 400.
pub fn port80(req: &Request) -> Vec<u8> {
    if req.path == "/generate_204" {
        return no_content(req.challenge.as_deref());
    }
    match req.method.as_str() {
        "GET" | "HEAD" if !req.host.is_empty() && host_ok(&req.host) => {
            let loc = format!("Location: https://{}{}\r\n", req.host, req.target);
            response(302, "Found", &loc, b"", req.method == "HEAD")
        }
        _ => text_error(400, "Bad Request", "Use HTTPS"),
    }
}

/// Where an ACME CA fetches an HTTP-01 proof: `/.well-known/acme-challenge/<token>`.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The answer to an HTTP-01 validation: the key authorization, or 404 for a token that is not
/// being validated.
pub fn acme_challenge(key_authorization: Option<&str>, head: bool) -> Vec<u8> {
    match key_authorization {
        Some(ka) => response(
            200,
            "OK",
            "Content-Type: text/plain\r\n",
            ka.as_bytes(),
            head,
        ),
        None => text_error(404, "Not Found", "no such ACME challenge"),
    }
}

/// A Host header safe to put in a Location: no whitespace or control characters.
fn host_ok(h: &str) -> bool {
    h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_HEAD: &[u8] = b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\n\
User-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\
Ideal-Node: 1a\r\nUpgrade: DERP\r\n\r\n";

    #[test]
    fn parses_derp_upgrade_and_keeps_pipelined_bytes() {
        let mut buf = CLIENT_HEAD.to_vec();
        buf.extend_from_slice(&[0x02, 0, 0, 0, 9]);
        let (req, n) = parse_head(&buf).unwrap().unwrap();
        assert_eq!(n, CLIENT_HEAD.len());
        assert_eq!(&buf[n..], [0x02, 0, 0, 0, 9]);
        assert_eq!(req.path, "/derp");
        assert_eq!(req.upgrade, "derp");
        assert!(req.fast_start && req.not_ideal);
        assert_eq!(req.host, "derp.example.com");
        assert_eq!(parse_head(&CLIENT_HEAD[..40]).unwrap(), None);
    }

    #[test]
    fn head_limits() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_LEN + 1, b'a');
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many), Err(HeadError::TooLarge));
        assert!(matches!(
            parse_head(b"\x16\x03\x01\x02\x00\x01"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn switching_protocols_is_byte_exact() {
        let hex = "ab".repeat(32);
        assert_eq!(
            switching_protocols(&hex),
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
                 Derp-Version: 2\r\nDerp-Public-Key: {hex}\r\n\r\n"
            )
        );
    }

    #[test]
    fn generate_204_challenge_rules() {
        let ok = String::from_utf8(no_content(Some("ts_1.2.3.4"))).unwrap();
        assert!(ok.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(ok.contains("X-Tailscale-Response: response ts_1.2.3.4\r\n"));
        for bad in ["has space", "nul\0", &"a".repeat(65), "semi;colon"] {
            let r = String::from_utf8(no_content(Some(bad))).unwrap();
            assert!(!r.contains("X-Tailscale-Response"), "{bad:?}");
        }
        assert!(String::from_utf8(no_content(Some(&"a".repeat(64))))
            .unwrap()
            .contains("response aaa"));
        assert!(!String::from_utf8(no_content(None))
            .unwrap()
            .contains("X-Tailscale-Response"));
    }

    #[test]
    fn probe_and_home() {
        let p = String::from_utf8(probe("HEAD")).unwrap();
        assert!(
            p.starts_with("HTTP/1.1 200 OK\r\n") && p.contains("Access-Control-Allow-Origin: *")
        );
        assert!(String::from_utf8(probe("POST"))
            .unwrap()
            .starts_with("HTTP/1.1 405"));
        assert_eq!(Home::parse(""), Ok(Home::Default));
        assert_eq!(Home::parse("blank"), Ok(Home::Blank));
        assert!(Home::parse("ftp://x").is_err());
        let r = String::from_utf8(home(
            &Home::Redirect("https://example.com/".into()),
            true,
            false,
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 302 Found\r\nLocation: https://example.com/\r\n"));
        let b = String::from_utf8(home(&Home::Blank, true, false)).unwrap();
        assert!(b.ends_with("Content-Length: 0\r\nConnection: close\r\n\r\n"));
        assert!(b.contains("X-Frame-Options: DENY"));
    }

    #[test]
    fn port80_rules() {
        let (req, _) = parse_head(b"GET /x?y=1 HTTP/1.1\r\nHost: d.example\r\n\r\n")
            .unwrap()
            .unwrap();
        let r = String::from_utf8(port80(&req)).unwrap();
        assert!(r.starts_with("HTTP/1.1 302 Found\r\nLocation: https://d.example/x?y=1\r\n"));
        let (req, _) = parse_head(b"POST /derp HTTP/1.1\r\nHost: d.example\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(String::from_utf8(port80(&req))
            .unwrap()
            .starts_with("HTTP/1.1 400 Bad Request"));
        let (req, _) =
            parse_head(b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: ts_a\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(String::from_utf8(port80(&req))
            .unwrap()
            .contains("response ts_a"));
    }
}
