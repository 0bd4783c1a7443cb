//! One connection's exchanges: the request written, the response head (httparse, bounded)
//! and body (length, chunked, or until close) read, and whether the connection can be reused.

use std::time::{Duration, Instant};

use smol::io::{AsyncReadExt, AsyncWriteExt};

use super::{within, Io, Request};

/// The longest response head accepted.
pub const HEAD_MAX: usize = 16 << 10;
/// The most header lines a response head may have.
const MAX_HEADERS: usize = 64;
/// The longest chunk-size line accepted.
const CHUNK_LINE_MAX: usize = 1 << 10;

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
