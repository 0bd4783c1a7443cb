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
//! Each check has [`TIMEOUT`] (derper's 5 s) for the whole exchange. Requests and responses
//! go through [`crate::httpc`] (a bounded head and a bounded body: `Content-Length`, chunked,
//! or until close).
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
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_atomic::AtomicU64;
use smol::io::{AsyncRead, AsyncWrite};
use smol::lock::Semaphore;
use smol::Async;

use crate::allowlist::{AllowList, RECHECK_INTERVAL};
pub use crate::config::AdmissionConfig;
use crate::httpc::{within, Conn, Head, Request, Url};
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
            Some(u) => Some(Controller::new(u).map_err(|e| format!("--verify-client-url: {e}"))?),
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
        conn.write_all(&whois_request(key)).await.map_err(failed)?;
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
        let request = admit_request(&ctl.url, key, &source);
        match self.exchange(ctl, &request).await {
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
                    let io = within(deadline, self.timeout, ctl.url.connect(ctl.tls.as_ref()));
                    let io = io.await;
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
                Err(_) if was_reused && !conn.received() && Instant::now() < deadline => continue,
                // Nothing came back: "unreachable" (fail-open applies), as for derper's
                // http.Client.Do.
                Err(e) if !conn.received() => return Answer::Unreachable(e),
                // Something that is not an answer (derper would fail open): refused, so that
                // a broken controller or a proxy in front of it does not let everyone in.
                Err(e) => {
                    return Answer::Refused(format!("admission controller: bad response: {e}"))
                }
            };
            let (answer, reusable) = read_answer(&mut conn, &head).await;
            if reusable {
                // An idle connection keeps no read buffer.
                conn.idle();
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

/// The admission controller: its URL (and the CA bundle's trust, for https), the check
/// slots, idle connections, refused keys.
struct Controller {
    url: Url,
    tls: Option<Arc<rustls::ClientConfig>>,
    slots: Semaphore,
    /// Idle kept-alive connections and when each became idle, oldest first.
    idle: Mutex<VecDeque<(Conn, Instant)>>,
    refused: Mutex<RefusedCache>,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.url.fmt(f)
    }
}

impl Controller {
    /// The controller at `url`: `http[s]://[user[:password]@]host[:port][/path][?query]`.
    fn new(url: &str) -> Result<Self, String> {
        let url = Url::parse(url)?;
        let tls = match url.https {
            true => Some(crate::trust::client_config(crate::trust::Trust::CaBundle)?),
            false => None,
        };
        Ok(Self {
            url,
            tls,
            slots: Semaphore::new(MAX_CHECKS),
            idle: Mutex::new(VecDeque::new()),
            refused: Mutex::new(RefusedCache::default()),
        })
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
fn whois_request(key: &NodePublic) -> Vec<u8> {
    let target = format!("/localapi/v0/whois?addr=nodekey%3A{}", key.untyped_hex());
    let cap = TAILSCALE_CAP.to_string();
    Request::new("GET", LOCALAPI_HOST, &target)
        .header("Tailscale-Cap", &cap)
        .header("Connection", "close")
        .encode()
}

/// Derper's request: Go's `http.Client` POST of the JSON, with no `Content-Type`, on a
/// kept-alive connection.
fn admit_request(url: &Url, key: &NodePublic, source: &str) -> Vec<u8> {
    let body = format!(r#"{{"NodePublic":"{key}","Source":"{source}"}}"#);
    url.request("POST").body(body.as_bytes()).encode()
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
    let reusable = conn.reusable(head, &body);
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
    fn controller_url() {
        let a = Admission::new(AdmissionConfig {
            url: Some("http://user:hunter2@h/".into()),
            ..Default::default()
        })
        .unwrap();
        // Neither the password nor its base64 (`user:hunter2`) is shown.
        let shown = format!("{a:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("dXNlcjpodW50ZXIy"));
        let bad = Admission::new(AdmissionConfig {
            url: Some("ftp://h/".into()),
            ..Default::default()
        });
        assert!(bad.unwrap_err().starts_with("--verify-client-url: "));
    }

    #[test]
    fn request_texts() {
        let k = key(0xab);
        let hex = "ab".repeat(32);
        assert_eq!(
            String::from_utf8(whois_request(&k)).unwrap(),
            format!(
                "GET /localapi/v0/whois?addr=nodekey%3A{hex} HTTP/1.1\r\n\
                 Host: local-tailscaled.sock\r\nUser-Agent: derpd/{v}\r\n\
                 Tailscale-Cap: 142\r\nConnection: close\r\n\r\n",
                v = env!("CARGO_PKG_VERSION")
            )
        );
        let url = Url::parse("http://u:p@a.b:1/x?y").unwrap();
        let body = format!(r#"{{"NodePublic":"nodekey:{hex}","Source":"10.0.0.1"}}"#);
        assert_eq!(
            String::from_utf8(admit_request(&url, &k, "10.0.0.1")).unwrap(),
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
}
