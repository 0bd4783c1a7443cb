//! Who may log in: derpd's own allow list (`--allow-keys-file`), the local tailscaled
//! (`--verify-clients`), and an admission controller (`--verify-client-url`), asked in that
//! order; a client must pass every check that is configured. Mesh peers are never checked.
//! Runs after ClientInfo is opened and before the client is registered.
//!
//! The two remote checks make the requests derper makes (`derpserver.verifyClient`):
//! - tailscaled: `GET /localapi/v0/whois?addr=nodekey%3A<hex>` over its unix socket, with
//!   `Host: local-tailscaled.sock` and `Tailscale-Cap: <capability version>`. 200 admits, 404
//!   refuses.
//! - the admission controller: `POST <url>` with the body
//!   `{"NodePublic":"nodekey:<hex>","Source":"<client IP>"}` and no `Content-Type`; a 200 whose
//!   body (first 4 KiB) is a JSON object with `"Allow": true` admits. When the controller cannot
//!   be reached, `--verify-client-url-fail-open` (default true) admits.
//!
//! Each check has [`TIMEOUT`] (derper's 5 s) for the whole exchange. Responses are read with a
//! bounded head and a bounded body (`Content-Length`, chunked, or until close).
//!
//! The admission controller cannot be overloaded into failing open:
//! - at most [`MAX_CHECKS`] requests are in flight to it; further logins wait for a slot (up to
//!   the check's timeout) and are refused, never admitted, when none frees in time;
//! - its connections are kept alive (HTTP/1.1, up to [`MAX_CHECKS`] idle ones, each resolved
//!   and connected once, closed after [`IDLE_TIMEOUT`], on `Connection: close` or on any
//!   malformed reply), so a flood of logins does not become a flood of connects;
//! - a key it refused is refused again without asking for [`REFUSED_TTL`] (up to
//!   [`REFUSED_CACHE_MAX`] keys, the oldest dropped first), even while it is unreachable;
//! - only "unreachable" (not a byte of a response: connect, DNS, TLS, timeout, closed) fails
//!   open (a malformed or cut response head refuses, where derper fails open), and each
//!   fail-open admission is logged (`fail-open admitted <key>: <reason>`, at most
//!   [`crate::lograte::LINES_PER_WINDOW`] lines per 10 s, then a count).
//!
//! The allow list is [`crate::allowlist`]'s.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_atomic::AtomicU64;
use rustls::pki_types::ServerName;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::lock::Semaphore;
use smol::{Async, Timer};

use crate::allowlist::{AllowList, RECHECK_INTERVAL};
pub use crate::config::AdmissionConfig;
use crate::key::NodePublic;
use crate::sync::lock;

/// How long one remote check may take, as derper's `verifyClient`: connect, request, response.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The most requests in flight to the admission controller at once (and the most idle
/// connections kept to it). Further logins wait for a slot.
pub const MAX_CHECKS: usize = 16;
/// An idle connection to the admission controller is closed after this long unused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a key the admission controller refused is refused without asking it again.
pub const REFUSED_TTL: Duration = Duration::from_secs(15);
/// The most refused keys remembered; the oldest goes first. With the map and the queue that
/// is about 200 KiB at most.
pub const REFUSED_CACHE_MAX: usize = 1024;
/// The capability version (`tailcfg.CurrentCapabilityVersion`) of the Tailscale release derpd
/// is tested against (v1.102.5), sent as `Tailscale-Cap` as Tailscale's LocalAPI client does.
pub const TAILSCALE_CAP: u32 = 142;

/// The LocalAPI's fixed host name (Tailscale's `apitype.LocalAPIHost`).
const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// derper decodes at most this much of the admission controller's answer.
const ADMIT_BODY_MAX: usize = 4 << 10;
/// A whois answer is read to its end (as derper does) but no further than this.
const WHOIS_BODY_MAX: u64 = 1 << 20;
/// How much of an error response's body goes into the rejection reason.
const ERROR_BODY_KEEP: usize = 1 << 10;
/// The longest response head accepted.
const HEAD_MAX: usize = 16 << 10;
/// The longest chunk-size line accepted.
const CHUNK_LINE_MAX: usize = 1 << 10;

/// One of the admission checks, for counting rejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `--allow-keys-file`.
    AllowKeys = 0,
    /// `--verify-clients`.
    Tailscaled = 1,
    /// `--verify-client-url`.
    Url = 2,
}

impl Check {
    /// All checks, in the order they run.
    pub const ALL: [Check; 3] = [Check::AllowKeys, Check::Tailscaled, Check::Url];

    /// A short name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Check::AllowKeys => "allow_keys",
            Check::Tailscaled => "tailscaled",
            Check::Url => "url",
        }
    }
}

/// The admission checks of a running server.
pub struct Admission {
    cfg: AdmissionConfig,
    timeout: Duration,
    url: Option<Controller>,
    allow: Option<AllowList>,
    rejected: [AtomicU64; 3],
    fail_open_admits: AtomicU64,
    stats: ControllerCounters,
}

/// The admission controller client's counters (see [`Admission::controller_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControllerStats {
    /// Requests in flight to the controller now (at most [`MAX_CHECKS`]).
    pub in_flight: usize,
    /// Logins waiting for a slot now.
    pub waiting: usize,
    /// Logins refused from the refused-key cache, without asking.
    pub cache_hits: u64,
    /// Connections opened to the controller.
    pub connects: u64,
    /// Logins refused because no slot freed within the check's timeout.
    pub wait_timeouts: u64,
}

#[derive(Debug, Default)]
struct ControllerCounters {
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    cache_hits: AtomicU64,
    connects: AtomicU64,
    wait_timeouts: AtomicU64,
}

/// Adds one to a gauge for as long as it lives (also when the check is dropped half-way).
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn up(g: &'a AtomicUsize) -> Self {
        g.fetch_add(1, Relaxed);
        Self(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl fmt::Debug for Admission {
    // Not derived: the URL may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("tailscaled_socket", &self.cfg.tailscaled_socket)
            .field("url", &self.url)
            .field("fail_open", &self.cfg.fail_open)
            .field("allow", &self.allow)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Loads what the checks need (the allow list, the URL, its CA bundle for https); errors
    /// are start-up errors.
    pub fn new(cfg: AdmissionConfig) -> Result<Self, String> {
        Self::with_timing(cfg, TIMEOUT, RECHECK_INTERVAL)
    }

    /// [`Admission::new`] with another timeout for the remote checks and another interval
    /// between looks at the allow-keys file (tests).
    pub fn with_timing(
        cfg: AdmissionConfig,
        timeout: Duration,
        recheck: Duration,
    ) -> Result<Self, String> {
        let url = match &cfg.url {
            Some(u) => Some(Controller::new(
                Endpoint::parse(u).map_err(|e| format!("--verify-client-url: {e}"))?,
            )),
            None => None,
        };
        let allow = match &cfg.allow_keys_file {
            Some(p) => Some(AllowList::load(p.clone(), recheck)?),
            None => None,
        };
        Ok(Self {
            cfg,
            timeout,
            url,
            allow,
            rejected: Default::default(),
            fail_open_admits: AtomicU64::new(0),
            stats: ControllerCounters::default(),
        })
    }

    /// True when no check is configured: every client is admitted.
    pub fn is_open(&self) -> bool {
        self.cfg.tailscaled_socket.is_none()
            && self.cfg.url.is_none()
            && self.cfg.allow_keys_file.is_none()
    }

    /// Decides whether `key`, connecting from `remote`, may log in. `Err` is the reason,
    /// logged as derper does: `client <key> rejected: <reason>`.
    pub async fn check(&self, key: &NodePublic, remote: SocketAddr) -> Result<(), String> {
        let res = self.decide(key, remote).await;
        res.map_err(|(check, why)| {
            self.rejected[check as usize].fetch_add(1, Relaxed);
            why
        })
    }

    async fn decide(&self, key: &NodePublic, remote: SocketAddr) -> Result<(), (Check, String)> {
        if let Some(list) = &self.allow {
            list.check(key).await.map_err(|e| (Check::AllowKeys, e))?;
        }
        if let Some(socket) = &self.cfg.tailscaled_socket {
            self.whois(socket, key)
                .await
                .map_err(|e| (Check::Tailscaled, e))?;
        }
        if let Some(url) = &self.url {
            self.admit(url, key, remote)
                .await
                .map_err(|e| (Check::Url, e))?;
        }
        Ok(())
    }

    /// Re-reads the allow list (SIGHUP). Keeps the old list when the file is unreadable.
    /// This reads the file (up to 16 MiB) on the calling thread: call it off the executor
    /// (`smol::unblock`).
    pub fn reload(&self) {
        if let Some(list) = &self.allow {
            list.reload();
        }
    }

    /// Clients refused, all checks together.
    pub fn rejections(&self) -> u64 {
        self.rejected.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Clients refused by one check.
    pub fn rejections_by(&self, check: Check) -> u64 {
        self.rejected[check as usize].load(Relaxed)
    }

    /// Clients admitted because the admission controller could not be reached
    /// (`--verify-client-url-fail-open`).
    pub fn fail_open_admits(&self) -> u64 {
        self.fail_open_admits.load(Relaxed)
    }

    /// The admission controller client's gauges and counters.
    pub fn controller_stats(&self) -> ControllerStats {
        let c = &self.stats;
        ControllerStats {
            in_flight: c.in_flight.load(Relaxed),
            waiting: c.waiting.load(Relaxed),
            cache_hits: c.cache_hits.load(Relaxed),
            connects: c.connects.load(Relaxed),
            wait_timeouts: c.wait_timeouts.load(Relaxed),
        }
    }

    /// How many times the allow-keys file was read (start-up, reloads, changes seen).
    pub fn allow_keys_reads(&self) -> u64 {
        self.allow.as_ref().map_or(0, |l| l.reads())
    }

    /// `--verify-clients`: asks tailscaled whether it knows the node key.
    async fn whois(&self, socket: &Path, key: &NodePublic) -> Result<(), String> {
        let failed = |e: String| format!("failed to query local tailscaled status for {key}: {e}");
        let deadline = Instant::now() + self.timeout;
        let io = within(deadline, self.timeout, async {
            Async::<UnixStream>::connect(socket)
                .await
                .map_err(|e| format!("connecting to {}: {e}", socket.display()))
        })
        .await
        .map_err(failed)?;
        let mut conn = Conn::new(Box::new(io), deadline, self.timeout);
        conn.write_all(whois_request(key).as_bytes())
            .await
            .map_err(failed)?;
        let head = conn.read_head().await.map_err(failed)?;
        match head.status {
            200 => {
                // derper reads the whole answer (and decodes it); its content is not used.
                let body = conn.read_body(head.framing, 0, WHOIS_BODY_MAX).await;
                match body.end {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(failed(format!(
                        "whois response larger than {WHOIS_BODY_MAX} bytes"
                    ))),
                    Err(e) => Err(failed(format!("reading the whois response: {e}"))),
                }
            }
            404 => Err(format!(
                "peer {key} not authorized (not found in local tailscaled)"
            )),
            _ => {
                let body = conn
                    .read_body(head.framing, ERROR_BODY_KEEP, ERROR_BODY_KEEP as u64)
                    .await;
                let text = String::from_utf8_lossy(&body.data);
                if text.contains("invalid 'addr' parameter") {
                    // Tailscale issue 12617: a tailscaled that predates whois by node key.
                    return Err(
                        "tailscaled version is too old (out of sync with derper binary)".into(),
                    );
                }
                Err(failed(format!("{}: {}", head.status_line, text.trim())))
            }
        }
    }

    /// `--verify-client-url`: asks the admission controller.
    async fn admit(
        &self,
        ctl: &Controller,
        key: &NodePublic,
        remote: SocketAddr,
    ) -> Result<(), String> {
        let source = source_ip(remote);
        let not_allowed = || format!("admission controller: {key}/{source} not allowed");
        if ctl.refused_recently(key, remote.ip()) {
            self.stats.cache_hits.fetch_add(1, Relaxed);
            return Err(not_allowed());
        }
        // A slot, within the check's timeout; none in time refuses (it is not "unreachable").
        let permit = {
            let _waiting = Gauge::up(&self.stats.waiting);
            let wait = async { Ok(ctl.slots.acquire().await) };
            within(Instant::now() + self.timeout, self.timeout, wait).await
        };
        let Ok(_permit) = permit else {
            self.stats.wait_timeouts.fetch_add(1, Relaxed);
            return Err(format!(
                "admission controller busy: no check slot free within {:?} ({MAX_CHECKS} in flight)",
                self.timeout
            ));
        };
        // Refused while this login waited.
        if ctl.refused_recently(key, remote.ip()) {
            self.stats.cache_hits.fetch_add(1, Relaxed);
            return Err(not_allowed());
        }
        let _in_flight = Gauge::up(&self.stats.in_flight);
        let request = ctl.ep.admit_request(key, &source);
        match self.exchange(ctl, request.as_bytes()).await {
            Answer::Allowed => Ok(()),
            Answer::NotAllowed => {
                ctl.remember_refused(*key, remote.ip());
                Err(not_allowed())
            }
            Answer::Refused(why) => Err(why),
            Answer::Unreachable(e) if self.cfg.fail_open => {
                self.fail_open_admits.fetch_add(1, Relaxed);
                crate::lograte::limited!(
                    warn,
                    crate::lograte::FAIL_OPEN,
                    "fail-open admitted {key}: admission controller unreachable: {e}"
                );
                Ok(())
            }
            Answer::Unreachable(e) => Err(format!("admission controller unreachable: {e}")),
        }
    }

    /// One request and its answer, on an idle connection if there is one (retried once on a
    /// new connection when the idle one turns out closed before any byte of an answer).
    async fn exchange(&self, ctl: &Controller, request: &[u8]) -> Answer {
        let deadline = Instant::now() + self.timeout;
        let mut reused = ctl.take_idle();
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => {
                    let io = within(deadline, self.timeout, ctl.ep.connect()).await;
                    match io {
                        Ok(io) => {
                            self.stats.connects.fetch_add(1, Relaxed);
                            Conn::new(io, deadline, self.timeout)
                        }
                        Err(e) => return Answer::Unreachable(e),
                    }
                }
            };
            conn.start(deadline, self.timeout);
            let head = match conn.write_all(request).await {
                Ok(()) => conn.read_head().await,
                Err(e) => Err(e),
            };
            let head = match head {
                Ok(h) => h,
                // A kept-alive connection the controller closed meanwhile (Go retries too).
                Err(_) if was_reused && !conn.received && Instant::now() < deadline => continue,
                // Nothing came back: "unreachable" (fail-open applies), as for derper's
                // http.Client.Do.
                Err(e) if !conn.received => return Answer::Unreachable(e),
                // Something that is not an answer (derper would fail open): refused, so that
                // a broken controller or a proxy in front of it does not let everyone in.
                Err(e) => {
                    return Answer::Refused(format!("admission controller: bad response: {e}"))
                }
            };
            let (answer, reusable) = read_answer(&mut conn, &head).await;
            if reusable {
                // An idle connection keeps no read buffer.
                conn.buf = Vec::new();
                ctl.put_idle(conn);
            }
            return answer;
        }
    }
}

/// What the admission controller said.
enum Answer {
    Allowed,
    /// `{"Allow": false}`: remembered for [`REFUSED_TTL`].
    NotAllowed,
    /// Refused for another reason (not 200, a bad or cut body).
    Refused(String),
    /// Not a byte of a response: not connected, closed, or timed out (fail-open applies).
    Unreachable(String),
}

/// The admission controller: its URL, the check slots, idle connections, refused keys.
struct Controller {
    ep: Endpoint,
    slots: Semaphore,
    /// Idle kept-alive connections and when each became idle, oldest first.
    idle: Mutex<VecDeque<(Conn, Instant)>>,
    refused: Mutex<RefusedCache>,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ep.fmt(f)
    }
}

impl Controller {
    fn new(ep: Endpoint) -> Self {
        Self {
            ep,
            slots: Semaphore::new(MAX_CHECKS),
            idle: Mutex::new(VecDeque::new()),
            refused: Mutex::new(RefusedCache::default()),
        }
    }

    /// The most recently used idle connection; those idle too long are closed.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = lock(&self.idle);
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        idle.pop_back().map(|(c, _)| c)
    }

    fn put_idle(&self, conn: Conn) {
        let mut idle = lock(&self.idle);
        if idle.len() >= MAX_CHECKS {
            idle.pop_front();
        }
        idle.push_back((conn, Instant::now()));
    }

    fn refused_recently(&self, key: &NodePublic, ip: IpAddr) -> bool {
        lock(&self.refused).contains(&(*key, ip.to_canonical()), Instant::now())
    }

    fn remember_refused(&self, key: NodePublic, ip: IpAddr) {
        lock(&self.refused).insert((key, ip.to_canonical()), Instant::now());
    }
}

/// (key, client IP) pairs the controller refused, for [`REFUSED_TTL`], at most
/// [`REFUSED_CACHE_MAX`] (the oldest dropped first). The IP is part of it because the
/// controller is told the client's address and may decide by it.
#[derive(Default)]
struct RefusedCache {
    /// When each was refused.
    at: HashMap<(NodePublic, IpAddr), Instant>,
    /// The same entries, oldest first.
    order: VecDeque<((NodePublic, IpAddr), Instant)>,
}

impl RefusedCache {
    fn contains(&mut self, k: &(NodePublic, IpAddr), now: Instant) -> bool {
        self.expire(now);
        self.at.contains_key(k)
    }

    fn insert(&mut self, k: (NodePublic, IpAddr), now: Instant) {
        self.expire(now);
        if self.at.contains_key(&k) {
            // Refused by two checks at once: remembered from the first.
            return;
        }
        self.at.insert(k, now);
        self.order.push_back((k, now));
        while self.at.len() > REFUSED_CACHE_MAX {
            self.pop_oldest();
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) >= REFUSED_TTL)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((k, _)) = self.order.pop_front() {
            self.at.remove(&k);
        }
    }
}

/// The LocalAPI request of Tailscale's `local.Client.WhoIsNodeKey` (the `:` of the key is
/// query-escaped, as Go's `url.QueryEscape` does).
fn whois_request(key: &NodePublic) -> String {
    format!(
        "GET /localapi/v0/whois?addr=nodekey%3A{} HTTP/1.1\r\nHost: {LOCALAPI_HOST}\r\n\
         User-Agent: derpd/{}\r\nTailscale-Cap: {TAILSCALE_CAP}\r\nConnection: close\r\n\r\n",
        key.untyped_hex(),
        env!("CARGO_PKG_VERSION")
    )
}

/// The client's IP as derper puts it in `Source`: Go's `netip.Addr` text of its
/// `RemoteAddr`, where an IPv4 client of a dual-stack listener is plain IPv4.
fn source_ip(remote: SocketAddr) -> String {
    let ip = remote.ip().to_canonical();
    match remote {
        // Go prints the zone by interface name; derpd only knows its index.
        SocketAddr::V6(a) if ip.is_ipv6() && a.scope_id() != 0 => {
            format!("{ip}%{}", a.scope_id())
        }
        _ => ip.to_string(),
    }
}

/// Decodes derper's `DERPAdmitClientResponse` as Go's `json.Decoder` would: the first JSON value
/// (trailing bytes ignored) must be an object (or null); its `Allow` member, matched without
/// regard to case, must be a boolean (or null); other members are ignored.
fn decode_admit(body: &[u8]) -> Result<bool, String> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<AdmitResponse>();
    match values.next() {
        Some(Ok(r)) => Ok(r.0),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("empty body".into()),
    }
}

/// `{"Allow": bool}`.
struct AdmitResponse(bool);

impl<'de> serde::Deserialize<'de> for AdmitResponse {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AdmitResponse;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_unit<E>(self) -> Result<AdmitResponse, E> {
                Ok(AdmitResponse(false))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<AdmitResponse, A::Error> {
                let mut allow = false;
                while let Some(k) = m.next_key::<String>()? {
                    if k.eq_ignore_ascii_case("allow") {
                        if let Some(v) = m.next_value::<Option<bool>>()? {
                            allow = v;
                        }
                    } else {
                        m.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(AdmitResponse(allow))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// The admission controller's URL

/// A parsed `--verify-client-url`: `http[s]://[user[:password]@]host[:port][/path][?query]`.
#[derive(Debug)]
struct Endpoint {
    /// TLS configuration, for https.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Host to dial (an IPv6 literal without brackets).
    host: String,
    port: u16,
    /// The `Host` header: the URL's host and port as written.
    authority: String,
    /// The request target: path and query (`/` when the URL has no path).
    target: String,
    /// `Authorization: Basic …` from the URL's user information, as Go's client sends it.
    auth: Option<Secret>,
}

/// A credential that `Debug` does not print.
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, String> {
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
                Some(Secret(base64(plain.as_bytes())))
            }
            None => None,
        };
        let target = if target.starts_with('/') {
            target.to_string()
        } else {
            format!("/{target}")
        };
        let tls = if https {
            if host.parse::<IpAddr>().is_err() {
                ServerName::try_from(host.to_string())
                    .map_err(|_| format!("invalid TLS host name {host:?}"))?;
            }
            Some(crate::trust::ca_client_config()?)
        } else {
            None
        };
        Ok(Self {
            tls,
            host: host.to_string(),
            port,
            // Go drops an empty port (`host:`) from the Host header.
            authority: hostport.strip_suffix(':').unwrap_or(hostport).to_string(),
            target,
            auth,
        })
    }

    /// Derper's request: Go's `http.Client` POST of the JSON, with no `Content-Type`, on a
    /// kept-alive connection.
    fn admit_request(&self, key: &NodePublic, source: &str) -> String {
        let body = format!(r#"{{"NodePublic":"{key}","Source":"{source}"}}"#);
        let auth = match &self.auth {
            Some(a) => format!("Authorization: Basic {}\r\n", a.0),
            None => String::new(),
        };
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpd/{}\r\nContent-Length: {}\r\n\
             {auth}\r\n{body}",
            self.target,
            self.authority,
            env!("CARGO_PKG_VERSION"),
            body.len()
        )
    }

    async fn connect(&self) -> Result<Box<dyn Io>, String> {
        let tcp = connect_tcp(&self.host, self.port).await?;
        let Some(tls) = &self.tls else {
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

/// `host`, `host:port`, `[v6]` or `[v6]:port` → (host without brackets, port text).
fn split_host_port(hp: &str) -> Result<(&str, Option<&str>), String> {
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

/// Standard base64 with padding (`Authorization: Basic`).
fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

async fn connect_tcp(host: &str, port: u16) -> Result<Async<TcpStream>, String> {
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

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client exchange: a request, its response; the connection may be kept.

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Runs `f` until `deadline`; past it, the error says how long the whole check had.
async fn within<T>(
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

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes.
    Close,
}

#[derive(Debug)]
struct Head {
    status: u16,
    /// `200 OK`: the code and the reason phrase, as Go's `Response.Status`.
    status_line: String,
    framing: Framing,
    /// The server closes the connection after this response (`Connection: close`, or
    /// HTTP/1.0 without `Connection: keep-alive`).
    close: bool,
}

/// A body read: up to `keep` bytes of it, and how reading ended: `Ok(true)` at its end,
/// `Ok(false)` at the reading limit.
#[derive(Debug)]
struct Body {
    data: Vec<u8>,
    end: Result<bool, String>,
}

struct Conn {
    io: Box<dyn Io>,
    /// Read but not yet consumed.
    buf: Vec<u8>,
    deadline: Instant,
    budget: Duration,
    /// Bytes came in since [`Conn::start`].
    received: bool,
}

impl Conn {
    fn new(io: Box<dyn Io>, deadline: Instant, budget: Duration) -> Self {
        Self {
            io,
            buf: Vec::new(),
            deadline,
            budget,
            received: false,
        }
    }

    /// Starts an exchange on a (possibly reused) connection.
    fn start(&mut self, deadline: Instant, budget: Duration) {
        self.deadline = deadline;
        self.budget = budget;
        self.received = false;
    }

    async fn write_all(&mut self, b: &[u8]) -> Result<(), String> {
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

    /// The final response head (1xx heads other than 101 are skipped, as Go's client does).
    async fn read_head(&mut self) -> Result<Head, String> {
        let mut informational = 0;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = head_of(&resp)?;
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
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(format!("malformed HTTP response: {e}")),
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

    /// Reads the body, keeping its first `keep` bytes, consuming at most `limit`.
    async fn read_body(&mut self, framing: Framing, keep: usize, limit: u64) -> Body {
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
    })
}

/// Reads the admission controller's answer from `io` as a check does once its request is
/// sent: the response head (1xx skipped), then for a 200 the body's first 4 KiB decoded as
/// `DERPAdmitClientResponse`. `Ok(allow)`, or why the answer refuses. Public only for the
/// `admission_response` fuzz target; not a stable API.
#[doc(hidden)]
pub async fn parse_admit_response<S>(io: S) -> Result<bool, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn::new(Box::new(io), Instant::now() + TIMEOUT, TIMEOUT);
    let head = conn.read_head().await?;
    match read_answer(&mut conn, &head).await.0 {
        Answer::Allowed => Ok(true),
        Answer::NotAllowed => Ok(false),
        Answer::Refused(e) | Answer::Unreachable(e) => Err(e),
    }
}

/// Reads the body of the controller's answer to `head` and judges it: only a 200 whose body
/// (first 4 KiB) decodes as `{"Allow": …}` decides. Also whether the connection can be kept
/// for the next check (the answer ended where its framing said, nothing more was sent).
async fn read_answer(conn: &mut Conn, head: &Head) -> (Answer, bool) {
    let body = conn
        .read_body(head.framing, ADMIT_BODY_MAX, ADMIT_BODY_MAX as u64)
        .await;
    let reusable = !head.close
        && head.framing != Framing::Close
        && body.end == Ok(true)
        && conn.buf.is_empty();
    if head.status != 200 {
        let answer = Answer::Refused(format!("admission controller: {}", head.status_line));
        return (answer, reusable);
    }
    let answer = match decode_admit(&body.data) {
        Ok(true) => Answer::Allowed,
        Ok(false) => Answer::NotAllowed,
        Err(e) => Answer::Refused(match body.end {
            Err(read) => format!("admission controller: reading the response: {read}"),
            Ok(_) => format!("admission controller: bad response: {e}"),
        }),
    };
    (answer, reusable)
}

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

    fn key(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    #[test]
    fn source_is_go_netip_text() {
        // Expected strings are Go's netip.Addr text (json.Marshal) of derper's RemoteAddr.
        for (remote, want) in [
            ("1.2.3.4:5", "1.2.3.4"),
            ("[::ffff:1.2.3.4]:5", "1.2.3.4"),
            ("[::1]:5", "::1"),
            ("[2001:db8::1:0:0:1]:5", "2001:db8::1:0:0:1"),
            ("[2001:db8:0:1:1:1:1:1]:5", "2001:db8:0:1:1:1:1:1"),
            ("[2001:0:0:1::1]:5", "2001:0:0:1::1"),
            ("[::1.2.3.4]:5", "::102:304"),
            ("[0:0:1::]:1", "0:0:1::"),
        ] {
            assert_eq!(source_ip(remote.parse().unwrap()), want, "{remote}");
        }
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            5,
            0,
            3,
        ));
        assert_eq!(source_ip(scoped), "fe80::1%3");
    }

    #[test]
    fn admit_response_as_go_decodes_it() {
        for (body, want) in [
            (&br#"{"Allow":true}"#[..], true),
            (br#"{"allow":true}"#, true),
            (br#"{"ALLOW":true}"#, true),
            (br#" {"Other":[1,{"x":2}],"Allow":true} "#, true),
            (br#"{"Allow":true}trailing garbage"#, true),
            (br#"{"Allow":true}{"Allow":false}"#, true),
            (br#"{"Allow":true,"Allow":false}"#, false),
            (br#"{"Allow":true,"Allow":null}"#, true),
            (br#"{"Allow":false}"#, false),
            (br#"{}"#, false),
            (b"null", false),
        ] {
            assert_eq!(
                decode_admit(body),
                Ok(want),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        for bad in [
            &b""[..],
            b"  ",
            b"true",
            b"[true]",
            br#"{"Allow":"true"}"#,
            br#"{"Allow":1}"#,
            br#"{"Allow":tru"#,
            br#"{"Allow":true"#,
        ] {
            assert!(
                decode_admit(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn urls() {
        let ep = Endpoint::parse("http://127.0.0.1:8080/admit?x=1&y=2#frag").unwrap();
        assert_eq!(
            (
                ep.host.as_str(),
                ep.port,
                ep.authority.as_str(),
                ep.target.as_str()
            ),
            ("127.0.0.1", 8080, "127.0.0.1:8080", "/admit?x=1&y=2")
        );
        assert!(ep.tls.is_none() && ep.auth.is_none());
        let ep = Endpoint::parse("HTTP://Admit.Example").unwrap();
        assert_eq!(
            (
                ep.host.as_str(),
                ep.port,
                ep.authority.as_str(),
                ep.target.as_str()
            ),
            ("Admit.Example", 80, "Admit.Example", "/")
        );
        let ep = Endpoint::parse("http://[::1]:9/?q").unwrap();
        assert_eq!(
            (
                ep.host.as_str(),
                ep.port,
                ep.authority.as_str(),
                ep.target.as_str()
            ),
            ("::1", 9, "[::1]:9", "/?q")
        );
        let ep = Endpoint::parse("http://h:?q").unwrap();
        assert_eq!(
            (ep.port, ep.authority.as_str(), ep.target.as_str()),
            (80, "h", "/?q")
        );
        let ep = Endpoint::parse("http://us%40er:p%3Ass@h/").unwrap();
        assert_eq!(ep.auth.as_ref().unwrap().0, base64(b"us@er:p:ss"));
        assert_eq!(ep.authority, "h");
        assert!(!format!("{ep:?}").contains(&base64(b"us@er:p:ss")));
        let a = Admission::new(AdmissionConfig {
            url: Some("http://user:hunter2@h/".into()),
            ..Default::default()
        })
        .unwrap();
        let shown = format!("{a:?}");
        assert!(!shown.contains("hunter2") && !shown.contains(&base64(b"user:hunter2")));
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
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn request_texts() {
        let k = key(0xab);
        let hex = "ab".repeat(32);
        assert_eq!(
            whois_request(&k),
            format!(
                "GET /localapi/v0/whois?addr=nodekey%3A{hex} HTTP/1.1\r\n\
                 Host: local-tailscaled.sock\r\nUser-Agent: derpd/{v}\r\n\
                 Tailscale-Cap: 142\r\nConnection: close\r\n\r\n",
                v = env!("CARGO_PKG_VERSION")
            )
        );
        let ep = Endpoint::parse("http://u:p@a.b:1/x?y").unwrap();
        let body = format!(r#"{{"NodePublic":"nodekey:{hex}","Source":"10.0.0.1"}}"#);
        assert_eq!(
            ep.admit_request(&k, "10.0.0.1"),
            format!(
                "POST /x?y HTTP/1.1\r\nHost: a.b:1\r\nUser-Agent: derpd/{v}\r\n\
                 Content-Length: {}\r\nAuthorization: Basic dTpw\r\n\r\n\
                 {body}",
                body.len(),
                v = env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn refused_cache_expires_and_drops_the_oldest() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut c = RefusedCache::default();
        let t = Instant::now();
        c.insert((key(1), ip), t);
        assert!(c.contains(&(key(1), ip), t + REFUSED_TTL - Duration::from_millis(1)));
        assert!(!c.contains(&(key(1), "192.0.2.2".parse().unwrap()), t));
        assert!(!c.contains(&(key(1), ip), t + REFUSED_TTL));
        assert!(c.at.is_empty() && c.order.is_empty());
        let keys: Vec<NodePublic> = (0..=REFUSED_CACHE_MAX as u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_le_bytes());
                NodePublic(k)
            })
            .collect();
        for k in &keys {
            c.insert((*k, ip), t);
            c.insert((*k, ip), t);
        }
        assert_eq!(
            (c.at.len(), c.order.len()),
            (REFUSED_CACHE_MAX, REFUSED_CACHE_MAX)
        );
        assert!(!c.contains(&(keys[0], ip), t));
        assert!(c.contains(&(keys[1], ip), t));
        assert!(c.contains(&(keys[REFUSED_CACHE_MAX], ip), t));
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
