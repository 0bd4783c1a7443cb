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
//!
//! Here the policy (the checks' order, the counters); `whois.rs` asks tailscaled;
//! `controller.rs` is the admission URL's client (slots, kept-alive connections, refused keys,
//! fail-open).

mod controller;
mod whois;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use portable_atomic::AtomicU64;

use crate::allowlist::{AllowList, RECHECK_INTERVAL};
pub use crate::config::AdmissionConfig;
use crate::key::NodePublic;

#[doc(hidden)]
pub use controller::parse_admit_response;
use controller::Controller;

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
}
