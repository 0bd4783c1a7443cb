//! A small HTTP/1.1 client, one exchange at a time on a connection that may be kept alive:
//! - [`Url`]: `http[s]://[user[:password]@]host[:port][/path][?query]`, parsed as Go's
//!   `net/url` and `http.Client` use it (the `Host` header as written, `Authorization: Basic`
//!   from the user information); [`split_host_port`] is its host and port splitter.
//! - resolve and connect ([`connect_tcp`], [`Url::connect`]: TCP, then TLS for https with the
//!   caller's trust), each step bounded by a deadline ([`within`]);
//! - [`Request`]: a request written as Go's client writes it (`Host`, `User-Agent`,
//!   `Content-Length` for a body, then the caller's headers);
//! - [`Conn`]: the response head read with httparse ([`parse_head`], at most [`HEAD_MAX`]
//!   bytes, 1xx skipped), the body by `Content-Length`, chunked, or until close, read up to a
//!   limit; and whether the connection can carry the next request ([`Conn::reusable`]).
//!
//! Nothing here panics on what the server sends. Used by the admission controller client;
//! mesh links read their upgrade response with [`parse_head`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::ServerName;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::{Async, Timer};

/// The longest response head accepted.
pub const HEAD_MAX: usize = 16 << 10;
/// The most header lines a response head may have.
const MAX_HEADERS: usize = 64;
/// The longest chunk-size line accepted.
const CHUNK_LINE_MAX: usize = 1 << 10;

// ---------------------------------------------------------------------------------------------
// URLs

/// A parsed `http[s]://[user[:password]@]host[:port][/path][?query]` (a `#fragment` is
/// dropped).
#[derive(Debug)]
pub struct Url {
    /// `https`: connect with TLS.
    pub https: bool,
    /// Host to dial (an IPv6 literal without brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` header: the URL's host and port as written.
    pub authority: String,
    /// The request target: path and query (`/` when the URL has no path).
    pub target: String,
    /// The `Authorization` value (`Basic …`) from the URL's user information, as Go's client
    /// sends it.
    auth: Option<Secret>,
}

/// A credential that `Debug` does not print.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Url {
    /// Parses `url`; the error says what is wrong with it (never its password). An https
    /// host must be an IP address or a valid TLS host name.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(b) = url.bytes().find(|&b| b <= b' ' || b >= 0x7f) {
            return Err(format!(
                "the URL contains the byte {b:#04x}; percent-encode it"
            ));
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("want an http:// or https:// URL")?;
        let (https, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "http" => (false, 80),
            "https" => (true, 443),
            _ => return Err(format!("unsupported scheme {scheme:?}: want http or https")),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)?;
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("invalid port {p:?}"))?,
        };
        let auth = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let plain = format!("{}:{}", percent_decode(user)?, percent_decode(pass)?);
                let b64 = base64::engine::general_purpose::STANDARD.encode(plain);
                Some(Secret(format!("Basic {b64}")))
            }
            None => None,
        };
        let target = if target.starts_with('/') {
            target.to_string()
        } else {
            format!("/{target}")
        };
        if https && host.parse::<IpAddr>().is_err() {
            ServerName::try_from(host.to_string())
                .map_err(|_| format!("invalid TLS host name {host:?}"))?;
        }
        Ok(Self {
            https,
            host: host.to_string(),
            port,
            // Go drops an empty port (`host:`) from the Host header.
            authority: hostport.strip_suffix(':').unwrap_or(hostport).to_string(),
            target,
            auth,
        })
    }

    /// A request for this URL: its target, its `Host`, and `Authorization: Basic` when the
    /// URL has user information.
    pub fn request<'a>(&'a self, method: &'a str) -> Request<'a> {
        let req = Request::new(method, &self.authority, &self.target);
        match &self.auth {
            Some(a) => req.header("Authorization", &a.0),
            None => req,
        }
    }

    /// Resolves and connects to the URL's host, then for https runs the TLS handshake with
    /// `tls` (the caller's trust: an https URL without it is an error). Bound it with
    /// [`within`].
    pub async fn connect(
        &self,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Box<dyn Io>, String> {
        let tls = match (self.https, tls) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => return Err("https without a TLS configuration".into()),
        };
        let tcp = connect_tcp(&self.host, self.port).await?;
        let Some(tls) = tls else {
            return Ok(Box::new(tcp));
        };
        let name = match self.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(self.host.clone())
                .map_err(|_| format!("invalid TLS host name {:?}", self.host))?,
        };
        let s = futures_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(Box::new(s))
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → (host without brackets, port text as
/// written: `host:` gives `Some("")`). A second `:` outside brackets is an error (an IPv6
/// address needs them); neither part is checked further.
pub fn split_host_port(hp: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = hp.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("invalid host {hp:?}"))?;
        return match after {
            "" => Ok((h, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((h, Some(p))),
                None => Err(format!("invalid host {hp:?}")),
            },
        };
    }
    match hp.split_once(':') {
        Some((_, p)) if p.contains(':') => Err(format!(
            "invalid host {hp:?} (an IPv6 address needs brackets)"
        )),
        Some((h, p)) => Ok((h, Some(p))),
        None => Ok((hp, None)),
    }
}

/// Decodes `%XX` escapes; the result must be UTF-8 (the URL's user information).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let v = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("invalid percent-encoding in the URL's user information")?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's user information is not UTF-8".to_string())
}

// ---------------------------------------------------------------------------------------------
// Connecting

/// A connection's byte stream: TCP, TLS over TCP, a unix socket, or an in-memory stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Resolves `host` (off the executor, unless it is an IP address) and connects to its
/// addresses in order; the error is the last address's (or the resolver's).
pub async fn connect_tcp(host: &str, port: u16) -> Result<Async<TcpStream>, String> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            let h = host.to_string();
            smol::unblock(move || (h.as_str(), port).to_socket_addrs().map(Vec::from_iter))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
        }
    };
    let mut last = format!("resolving {host}: no address");
    for a in addrs {
        match Async::<TcpStream>::connect(a).await {
            Ok(t) => return Ok(t),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

/// Runs `f` until `deadline`; past it, the error says how long the whole exchange had
/// (`budget`).
pub async fn within<T>(
    deadline: Instant,
    budget: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    f.or(async {
        Timer::at(deadline).await;
        Err(format!("timed out after {budget:?}"))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Requests

/// A request as Go's `http.Client` writes it: the request line, `Host`, `User-Agent`,
/// `Content-Length` when there is a body, the caller's headers in order, the body. Header
/// values are written as given: they must not contain CR or LF.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    method: &'a str,
    host: &'a str,
    target: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
    /// `method target` for `host` (the `Host` header), without a body.
    pub fn new(method: &'a str, host: &'a str, target: &'a str) -> Self {
        Self {
            method,
            host,
            target,
            headers: Vec::new(),
            body: None,
        }
    }

    /// Adds a header line after those added before it.
    pub fn header(mut self, name: &'a str, value: &'a str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Sends `body` with its `Content-Length`.
    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = Some(body);
        self
    }

    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpd/{}\r\n",
            self.method,
            self.target,
            self.host,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(b) = self.body {
            let _ = write!(head, "Content-Length: {}\r\n", b.len());
        }
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.unwrap_or_default());
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes.
    Close,
}

/// A response head.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    /// `200 OK`: the code and the reason phrase, as Go's `Response.Status`.
    pub status_line: String,
    pub framing: Framing,
    /// The server closes the connection after this response (`Connection: close`, or
    /// HTTP/1.0 without `Connection: keep-alive`).
    pub close: bool,
    /// Every header line, names as sent, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// The first header called `name` (any case), when its value is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// A body read: up to `keep` bytes of it, and how reading ended: `Ok(true)` at its end,
/// `Ok(false)` at the reading limit.
#[derive(Debug)]
pub struct Body {
    pub data: Vec<u8>,
    pub end: Result<bool, String>,
}

/// One HTTP/1.1 connection: requests are written and their responses read one at a time,
/// every read and write before the exchange's deadline.
pub struct Conn {
    io: Box<dyn Io>,
    /// Read but not yet consumed.
    buf: Vec<u8>,
    deadline: Instant,
    budget: Duration,
    /// Bytes came in since [`Conn::start`].
    received: bool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A connection over `io` whose first exchange ends by `deadline` (`budget` after its
    /// start, for the timeout's message).
    pub fn new(io: Box<dyn Io>, deadline: Instant, budget: Duration) -> Self {
        Self {
            io,
            buf: Vec::new(),
            deadline,
            budget,
            received: false,
        }
    }

    /// Starts an exchange on a (possibly reused) connection.
    pub fn start(&mut self, deadline: Instant, budget: Duration) {
        self.deadline = deadline;
        self.budget = budget;
        self.received = false;
    }

    /// Writes `req` and flushes it.
    pub async fn send(&mut self, req: &Request<'_>) -> Result<(), String> {
        self.write_all(&req.encode()).await
    }

    /// Writes `b` and flushes it.
    pub async fn write_all(&mut self, b: &[u8]) -> Result<(), String> {
        let io = &mut self.io;
        within(self.deadline, self.budget, async {
            io.write_all(b).await.map_err(|e| e.to_string())?;
            io.flush().await.map_err(|e| e.to_string())
        })
        .await
    }

    /// Reads more into `buf`; 0 at EOF.
    async fn fill(&mut self) -> Result<usize, String> {
        let old = self.buf.len();
        self.buf.resize(old + 4096, 0);
        let (io, buf) = (&mut self.io, &mut self.buf[old..]);
        let r = within(self.deadline, self.budget, async {
            io.read(buf).await.map_err(|e| e.to_string())
        })
        .await;
        let n = *r.as_ref().unwrap_or(&0);
        self.buf.truncate(old + n);
        self.received |= n > 0;
        r
    }

    /// Bytes came in since [`Conn::start`] (an exchange that failed without them found the
    /// server gone, not a bad answer).
    pub fn received(&self) -> bool {
        self.received
    }

    /// The final response head (1xx heads other than 101 are skipped, as Go's client does).
    pub async fn read_head(&mut self) -> Result<Head, String> {
        let mut informational = 0;
        loop {
            if let Some((head, n)) = parse_head(&self.buf)? {
                self.buf.drain(..n);
                if (100..200).contains(&head.status) && head.status != 101 {
                    informational += 1;
                    if informational > 5 {
                        return Err("too many 1xx responses".into());
                    }
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() >= HEAD_MAX {
                return Err("HTTP response head too long".into());
            }
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    "connection closed without a response".into()
                } else {
                    "connection closed in the response head".into()
                });
            }
        }
    }

    /// Reads the body, keeping its first `keep` bytes, consuming at most `limit`. (The
    /// answer to a `HEAD` request has none, whatever its head says: read it with
    /// [`Framing::Empty`].)
    pub async fn read_body(&mut self, framing: Framing, keep: usize, limit: u64) -> Body {
        let mut sink = Sink {
            data: Vec::new(),
            keep,
            seen: 0,
            limit,
        };
        let end = match framing {
            Framing::Empty => Ok(true),
            Framing::Length(n) => self.copy(Some(n), &mut sink).await,
            Framing::Close => self.copy(None, &mut sink).await,
            Framing::Chunked => self.chunked(&mut sink).await,
        };
        Body {
            data: sink.data,
            end,
        }
    }

    /// Whether the connection can carry the next request after `head` and `body`: the server
    /// keeps it open, the body ended where its framing said, and nothing more was sent.
    pub fn reusable(&self, head: &Head, body: &Body) -> bool {
        !head.close && head.framing != Framing::Close && body.end == Ok(true) && self.buf.is_empty()
    }

    /// Lets go of the read buffer while the connection waits idle for its next request.
    pub fn idle(&mut self) {
        self.buf = Vec::new();
    }

    async fn chunked(&mut self, sink: &mut Sink) -> Result<bool, String> {
        loop {
            let line = self.read_line().await?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = parse_hex_u64(size.trim_ascii()).ok_or("invalid chunk size")?;
            if size == 0 {
                // The trailers are not needed.
                return Ok(true);
            }
            if !self.copy(Some(size), sink).await? {
                return Ok(false);
            }
            if !self.read_line().await?.is_empty() {
                return Err("no CRLF after a chunk".into());
            }
        }
    }

    /// One line (without CRLF) of at most [`CHUNK_LINE_MAX`] bytes.
    async fn read_line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > CHUNK_LINE_MAX {
                return Err("chunk header too long".into());
            }
            if self.fill().await? == 0 {
                return Err("connection closed in the chunked body".into());
            }
        }
    }

    /// Moves `want` bytes (`None`: up to EOF) into `sink`; `Ok(false)` when its limit comes
    /// first.
    async fn copy(&mut self, mut want: Option<u64>, sink: &mut Sink) -> Result<bool, String> {
        loop {
            if want == Some(0) {
                return Ok(true);
            }
            if sink.seen >= sink.limit {
                return Ok(false);
            }
            if self.buf.is_empty() && self.fill().await? == 0 {
                return match want {
                    None => Ok(true),
                    Some(_) => Err("connection closed in the response body".into()),
                };
            }
            let mut n = self.buf.len() as u64;
            if let Some(w) = want {
                n = n.min(w);
            }
            n = n.min(sink.limit - sink.seen);
            let n = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
            let k = n.min(sink.keep.saturating_sub(sink.data.len()));
            sink.data.extend_from_slice(&self.buf[..k]);
            self.buf.drain(..n);
            sink.seen += n as u64;
            want = want.map(|w| w - n as u64);
        }
    }
}

struct Sink {
    data: Vec<u8>,
    keep: usize,
    seen: u64,
    limit: u64,
}

/// Reads one response head (1xx included) from the start of `buf`: the head and its length in
/// bytes, `None` while it is incomplete, or why it is malformed. The caller bounds `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((head_of(&resp)?, n))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("malformed HTTP response: {e}")),
    }
}

fn head_of(resp: &httparse::Response<'_, '_>) -> Result<Head, String> {
    let status = resp.code.ok_or("malformed HTTP response: no status")?;
    let reason = resp.reason.unwrap_or_default();
    let status_line = format!("{status} {reason}").trim_end().to_string();
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let mut te = Vec::new();
    let mut length: Option<u64> = None;
    let (mut close, mut keep_alive) = (false, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("malformed HTTP response: bad Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("malformed HTTP response: conflicting Content-Length".into());
            }
            length = Some(n);
        }
    }
    let framing = if no_body {
        Framing::Empty
    } else if !te.is_empty() {
        // Go's client knows only `chunked`, alone.
        if te.len() != 1 || !te[0].trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err("malformed HTTP response: unsupported Transfer-Encoding".into());
        }
        Framing::Chunked
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    Ok(Head {
        status,
        status_line,
        framing,
        close: close || (resp.version != Some(1) && !keep_alive),
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
    })
}

/// A chunk size: 1 to 16 hex digits.
fn parse_hex_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let d = char::from(b).to_digit(16)?;
        Some((n << 4) | u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn urls() {
        for (url, want) in [
            (
                "http://127.0.0.1:8080/admit?x=1&y=2#frag",
                (false, "127.0.0.1", 8080, "127.0.0.1:8080", "/admit?x=1&y=2"),
            ),
            (
                "HTTP://Admit.Example",
                (false, "Admit.Example", 80, "Admit.Example", "/"),
            ),
            ("https://[::1]:9/?q", (true, "::1", 9, "[::1]:9", "/?q")),
            ("https://h", (true, "h", 443, "h", "/")),
            // Go drops an empty port from the Host header.
            ("http://h:?q", (false, "h", 80, "h", "/?q")),
        ] {
            let u = Url::parse(url).unwrap();
            let got = (
                u.https,
                u.host.as_str(),
                u.port,
                u.authority.as_str(),
                u.target.as_str(),
            );
            assert_eq!(got, want, "{url}");
            assert!(u.auth.is_none());
        }
        // Standard base64 with padding of `us@er:p:ss`, never shown by Debug.
        let u = Url::parse("http://us%40er:p%3Ass@h/").unwrap();
        assert_eq!(u.auth.as_ref().unwrap().0, "Basic dXNAZXI6cDpzcw==");
        assert_eq!(u.authority, "h");
        assert!(!format!("{u:?}").contains("dXNAZXI6cDpzcw=="));
        for bad in [
            "",
            "127.0.0.1:80",
            "ftp://h/",
            "http:///x",
            "http://h:0/",
            "http://h:65536/",
            "http://h:x/",
            "http://::1/",
            "http://[::1/",
            "http://h/a b",
            "http://h/\u{e9}",
            "http://u%zz@h/",
            "http://u%ff@h/",
            "https://bad_name!/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_and_port_split() {
        for (hp, want) in [
            ("h", Some(("h", None))),
            ("h:1", Some(("h", Some("1")))),
            ("h:", Some(("h", Some("")))),
            ("[::1]", Some(("::1", None))),
            ("[::1]:2", Some(("::1", Some("2")))),
            ("", Some(("", None))),
            ("::1", None),
            ("h:1:2", None),
            ("[::1", None),
            ("[::1]x", None),
        ] {
            assert_eq!(split_host_port(hp).ok(), want, "{hp:?}");
        }
    }

    #[test]
    fn request_texts() {
        let v = env!("CARGO_PKG_VERSION");
        let get = Request::new("GET", "local-tailscaled.sock", "/x?y")
            .header("Connection", "close")
            .encode();
        assert_eq!(
            String::from_utf8(get).unwrap(),
            format!(
                "GET /x?y HTTP/1.1\r\nHost: local-tailscaled.sock\r\nUser-Agent: derpd/{v}\r\n\
                 Connection: close\r\n\r\n"
            )
        );
        let u = Url::parse("http://u:p@a.b:1/x?y").unwrap();
        let post = u.request("POST").body(b"{}").encode();
        assert_eq!(
            String::from_utf8(post).unwrap(),
            format!(
                "POST /x?y HTTP/1.1\r\nHost: a.b:1\r\nUser-Agent: derpd/{v}\r\n\
                 Content-Length: 2\r\nAuthorization: Basic dTpw\r\n\r\n{{}}"
            )
        );
    }

    #[test]
    fn keep_alive_of_responses() {
        let close = |raw: &[u8]| read(raw, 10, 10).unwrap().0.close;
        assert!(!close(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(close(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(close(
            b"HTTP/1.1 200 OK\r\nConnection: Upgrade, Close\r\n\r\n"
        ));
        assert!(close(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!close(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        ));
    }

    #[test]
    fn hex_sizes() {
        assert_eq!(parse_hex_u64(b"0"), Some(0));
        assert_eq!(parse_hex_u64(b"1aF"), Some(0x1af));
        assert_eq!(parse_hex_u64(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_hex_u64(b"10000000000000000"), None);
        assert_eq!(parse_hex_u64(b""), None);
        assert_eq!(parse_hex_u64(b"-1"), None);
        assert_eq!(parse_hex_u64(b"0x1"), None);
    }

    /// Reads `raw` as a response with the given limits.
    fn read(raw: &[u8], keep: usize, limit: u64) -> Result<(Head, Body), String> {
        smol::block_on(async {
            let io = Box::new(smol::io::Cursor::new(raw.to_vec()));
            let mut c = Conn::new(
                io,
                Instant::now() + Duration::from_secs(5),
                Duration::from_secs(5),
            );
            let head = c.read_head().await?;
            let body = c.read_body(head.framing, keep, limit).await;
            Ok((head, body))
        })
    }

    #[test]
    fn heads_and_headers() {
        assert!(parse_head(b"HTTP/1.1 101 Switching").unwrap().is_none());
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\nframes";
        let (h, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!((h.status, &raw[n..]), (101, &b"frames"[..]));
        assert_eq!(h.header("upgrade"), Some("DERP"));
        assert_eq!(h.header("Location"), None);
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
    }

    #[test]
    fn response_framing() {
        // Content-Length: exactly that much, even with more bytes behind it.
        let (h, b) = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
            100,
            100,
        )
        .unwrap();
        assert_eq!((h.status, h.status_line.as_str()), (200, "200 OK"));
        assert_eq!((b.data.as_slice(), b.end), (&b"hello"[..], Ok(true)));
        // Chunked, with extensions and trailers.
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let (_, b) = read(raw, 100, 100).unwrap();
        assert_eq!(
            (b.data.as_slice(), b.end),
            (&b"abc0123456789abcdef"[..], Ok(true))
        );
        // Keep less than the body; the limit stops reading.
        let (_, b) = read(raw, 2, 100).unwrap();
        assert_eq!((b.data.as_slice(), b.end), (&b"ab"[..], Ok(true)));
        let (_, b) = read(raw, 100, 5).unwrap();
        assert_eq!((b.data.as_slice(), b.end), (&b"abc01"[..], Ok(false)));
        // Until close.
        let (_, b) = read(b"HTTP/1.0 404 Not Found\r\n\r\nnope\n", 100, 100).unwrap();
        assert_eq!((b.data.as_slice(), b.end), (&b"nope\n"[..], Ok(true)));
        // 1xx skipped; 204 has no body; no reason phrase.
        let (h, b) = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204\r\n\r\n", 10, 10).unwrap();
        assert_eq!(
            (h.status, h.status_line.as_str(), b.end),
            (204, "204", Ok(true))
        );
        // Truncated bodies and bad framing.
        let (_, b) = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
            100,
            100,
        )
        .unwrap();
        assert_eq!(b.data, b"short");
        assert!(b.end.is_err());
        // Chunked bodies cut short, with a bad size, or with a bad chunk end.
        for cut in [&b"5\r\nab"[..], b"zz\r\n", b"2\r\nabX\r\n"] {
            let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            let (_, b) = read(&[&head[..], cut].concat(), 100, 100).unwrap();
            assert!(b.end.is_err(), "{}", String::from_utf8_lossy(cut));
        }
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert!(
                read(bad, 10, 10).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        long.extend(std::iter::repeat_n(b"X-A: b\r\n".as_slice(), HEAD_MAX / 8).flatten());
        assert!(read(&long, 10, 10).is_err());
    }
}
