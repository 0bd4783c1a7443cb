//! `--verify-client-url`: the admission controller's client: at most [`MAX_CHECKS`] checks in
//! flight, kept-alive connections, the refused-key memory, and what fails open.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use smol::io::{AsyncRead, AsyncWrite};
use smol::lock::Semaphore;

use crate::httpc::{within, Conn, Head, Url};
use crate::key::NodePublic;
use crate::sync::lock;

use super::{Admission, IDLE_TIMEOUT, MAX_CHECKS, REFUSED_CACHE_MAX, REFUSED_TTL, TIMEOUT};

/// derper decodes at most this much of the admission controller's answer.
const ADMIT_BODY_MAX: usize = 4 << 10;

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

impl Admission {
    /// `--verify-client-url`: asks the admission controller.
    pub(super) async fn admit(
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
pub(super) struct Controller {
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
    pub(super) fn new(url: &str) -> Result<Self, String> {
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

    use std::time::Duration;

    use crate::admission::AdmissionConfig;

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
    fn request_text() {
        let k = key(0xab);
        let hex = "ab".repeat(32);
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
