//! Limits that keep the relay up under floods: the accept rate (`--accept-connection-limit`),
//! the connections still logging in (`--max-handshakes` in all, `--max-handshakes-per-ip` from
//! one source, the least advanced evicted for a newcomer), and derper's per-client receive
//! rate (`--rate-config`, backpressure rather than drops).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{
    AtomicU32, AtomicU8, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// derper's `minRateLimitTokenBucketSize`: one maximum-size frame (64 KiB + 32).
pub const MIN_RATE_BURST: u64 = (64 << 10) + 32;

/// A token bucket: `rate` tokens per second, at most `burst` saved up. The one bucket behind
/// the accept limit, the per-client receive rate and the NotHere replies.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket. As in Go's x/time/rate, a burst of 0 allows nothing (and the accept
    /// limit's burst of u64::MAX is "unlimited").
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Adds what the time since the last call earned, up to the burst.
    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.at = now;
        self.tokens = (self.tokens + earned).min(self.burst);
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if need be (a reservation, as x/time/rate makes it),
    /// and says how long the debt takes to repay; `None`: no debt.
    pub fn reserve(&mut self, n: f64) -> Option<Duration> {
        self.refill();
        self.tokens -= n;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Default `--max-handshakes-per-ip`: connections from one address (IPv6: one /64) that may be
/// logging in at once. A whole office behind one NAT logs in a few at a time (each login takes
/// milliseconds); an attacker from one address holds no more than this.
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 16;

/// How far a connection not yet logged in has come; the least advanced is evicted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Progress {
    /// Accepted, nothing received.
    Silent = 0,
    /// Bytes arrived: TLS handshake or request head under way.
    Talking = 1,
    /// The request head is complete: an answer is being written or the DERP login runs.
    Upgraded = 2,
}

/// Where a connection comes from, for `--max-handshakes-per-ip`: an IPv4 address (an
/// IPv4-mapped IPv6 address counts as IPv4), or an IPv6 /64, what one subscriber gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// One IPv4 address.
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => Self::V4(a.to_bits()),
            IpAddr::V6(a) => Self::V6((a.to_bits() >> 64) as u64),
        }
    }
}

/// The state of a pending connection.
const PENDING: u8 = 0;
const EVICTED: u8 = 1;
const DONE: u8 = 2;

/// One connection not logged in yet.
#[derive(Debug)]
struct Entry {
    /// Its place in [`Table::entries`].
    index: usize,
    source: Source,
    since: Instant,
    /// A [`Progress`], raised by the connection's task without taking the lock.
    progress: AtomicU8,
    /// [`PENDING`], then [`EVICTED`] (by [`Slots::take`]) or [`DONE`] (its [`Slot`] dropped).
    state: AtomicU8,
    /// Wakes [`Slot::evicted`] when `state` leaves [`PENDING`].
    event: event_listener::Event,
}

#[derive(Debug, Default)]
struct Table {
    /// Pending connections; `None` where a slot is free.
    entries: Vec<Option<Arc<Entry>>>,
    /// Free indexes into `entries`.
    free: Vec<usize>,
    /// Pending connections per source (no entry for none).
    per_source: HashMap<Source, usize>,
}

impl Table {
    /// Takes `e` out of the table (the caller has set its state).
    fn remove(&mut self, e: &Entry) {
        self.entries[e.index] = None;
        self.free.push(e.index);
        if let Some(n) = self.per_source.get_mut(&e.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&e.source);
            }
        }
    }
}

/// The connections that have not logged in yet: at most `--max-handshakes` in all and
/// `--max-handshakes-per-ip` from one source. When all are taken, a newcomer evicts the one
/// that has come least far (the oldest among the silent ones first), so that a flood of idle
/// connections cannot lock real clients out; from a source at its own limit, a newcomer is
/// refused. The lock is held for a few instructions per connection (and a scan of at most
/// `--max-handshakes` entries when every slot is taken); progress is marked without it.
#[derive(Debug)]
pub struct Slots {
    table: Mutex<Table>,
    /// Entries in the table, readable without the lock.
    used: AtomicUsize,
    max: usize,
    max_per_source: usize,
}

/// A taken slot; dropping it gives the slot back (the connection logged in or ended).
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    entry: Arc<Entry>,
}

/// Why [`Slots::take`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source already has `--max-handshakes-per-ip` connections logging in.
    SourceFull,
}

/// A slot, and whether another connection was evicted to make room for it.
#[derive(Debug)]
pub struct Taken {
    /// The newcomer's slot.
    pub slot: Slot,
    /// How far the evicted connection had come, if one was.
    pub evicted: Option<Progress>,
}

impl Slots {
    /// `max` slots in all, `max_per_source` for one source.
    pub fn new(max: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            used: AtomicUsize::new(0),
            max: max.max(1),
            max_per_source: max_per_source.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a connection from `ip`, evicting the least advanced pending connection
    /// when every slot is taken. Refused only when `ip`'s source is at its own limit.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Taken, Refused> {
        let source = Source::from(ip);
        let mut t = self.lock();
        let n = t.per_source.get(&source).copied().unwrap_or(0);
        if n >= self.max_per_source {
            return Err(Refused::SourceFull);
        }
        let mut evicted = None;
        if self.used.load(Relaxed) >= self.max {
            // Least progress first, then the oldest. Every entry is PENDING while in the table.
            let victim = t
                .entries
                .iter()
                .flatten()
                .min_by_key(|e| (e.progress.load(Relaxed), e.since))
                .cloned();
            if let Some(v) = victim {
                v.state.store(EVICTED, Release);
                t.remove(&v);
                self.used.fetch_sub(1, Relaxed);
                v.event.notify(usize::MAX);
                evicted = Some(match v.progress.load(Relaxed) {
                    0 => Progress::Silent,
                    1 => Progress::Talking,
                    _ => Progress::Upgraded,
                });
            }
        }
        let index = match t.free.pop() {
            Some(i) => i,
            None => {
                t.entries.push(None);
                t.entries.len() - 1
            }
        };
        let entry = Arc::new(Entry {
            index,
            source,
            since: Instant::now(),
            progress: AtomicU8::new(Progress::Silent as u8),
            state: AtomicU8::new(PENDING),
            event: event_listener::Event::new(),
        });
        t.entries[index] = Some(entry.clone());
        *t.per_source.entry(source).or_insert(0) += 1;
        self.used.fetch_add(1, Relaxed);
        Ok(Taken {
            slot: Slot {
                slots: self.clone(),
                entry,
            },
            evicted,
        })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Slots in use by [`Progress`] (silent, talking, upgraded); takes the lock.
    pub fn by_progress(&self) -> [usize; 3] {
        let mut n = [0; 3];
        for e in self.lock().entries.iter().flatten() {
            n[usize::from(e.progress.load(Relaxed).min(2))] += 1;
        }
        n
    }
}

impl Slot {
    /// Records that the connection has come as far as `p` (never lowers it).
    pub fn progress(&self, p: Progress) {
        self.entry.progress.fetch_max(p as u8, Relaxed);
    }

    /// Completes when the connection is evicted; never while it holds the slot or after the
    /// slot is given back (then it holds nothing: no waker, no reference to the slot).
    pub fn evicted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let entry = self.entry.clone();
        async move {
            loop {
                match entry.state.load(Acquire) {
                    EVICTED => return,
                    DONE => break,
                    _ => {}
                }
                event_listener::listener!(entry.event => l);
                if entry.state.load(Acquire) == PENDING {
                    l.await;
                }
            }
            drop(entry);
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let e = &self.entry;
        // Evicted: already out of the table.
        if e.state.load(Relaxed) != PENDING {
            return;
        }
        let mut t = self.slots.lock();
        // Decided under the lock, as eviction is.
        if e.state.load(Relaxed) == PENDING {
            e.state.store(DONE, Release);
            t.remove(e);
            self.slots.used.fetch_sub(1, Relaxed);
            drop(t);
            e.event.notify(usize::MAX);
        }
    }
}

/// derper's `RateConfig` file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RateConfig {
    /// Bytes per second per client; 0 turns limiting off.
    #[serde(rename = "PerClientRateLimitBytesPerSec", default)]
    pub bytes_per_sec: u64,
    /// Bucket depth in bytes; raised to [`MIN_RATE_BURST`].
    #[serde(rename = "PerClientRateBurstBytes", default)]
    pub burst_bytes: u64,
}

impl RateConfig {
    /// Reads and applies derper's rules: rate 0 → all off; burst at least one full frame.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("error reading rate config {}: {e}", path.display()))?;
        let rc: Self = serde_json::from_slice(&text)
            .map_err(|e| format!("error parsing rate config {}: {e}", path.display()))?;
        Ok(rc.normalized())
    }

    /// derper's `UpdateRateLimits`.
    pub fn normalized(self) -> Self {
        if self.bytes_per_sec == 0 {
            Self::default()
        } else {
            Self {
                bytes_per_sec: self.bytes_per_sec,
                burst_bytes: self.burst_bytes.max(MIN_RATE_BURST),
            }
        }
    }
}

/// The rate limit every non-mesh reader applies; a reload reaches existing connections at
/// their next frame.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// Bumped on every change, so readers copy the config only when it changed.
    generation: AtomicU32,
    config: Mutex<RateConfig>,
    /// Frames that had to wait (`rate_limit_per_client_waited`).
    pub waited: AtomicUsize,
}

impl RateLimits {
    /// Installs a new config.
    pub fn set(&self, rc: RateConfig) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = rc.normalized();
        self.generation.fetch_add(1, Relaxed);
    }

    /// The config in force.
    pub fn get(&self) -> RateConfig {
        *self.config.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's receive-rate bucket: the [`RateLimits`] in force, applied.
#[derive(Debug)]
pub struct Bucket {
    generation: u32,
    bucket: TokenBucket,
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            generation: 0,
            bucket: TokenBucket::new(0.0, 0.0),
        }
    }
}

impl Bucket {
    /// Charges `bytes` about to be read and says how long the reader must wait before reading
    /// them. `None`: go on at once. Every byte read is charged, headers included (derper
    /// charges a frame's length, capped at one maximum frame, once, so that a longer frame or
    /// a flood of empty ones got through unmetered); callers charge a long frame piece by
    /// piece, so that the wait is spread over it.
    pub fn delay(&mut self, limits: &RateLimits, bytes: u64) -> Option<Duration> {
        let g = limits.generation.load(Relaxed);
        if g != self.generation {
            self.generation = g;
            let rc = limits.get();
            // A new config starts with a full bucket, as in derper, whose setRateLimit gives
            // every connection a new x/time/rate limiter (and those start full).
            self.bucket = TokenBucket::new(rc.bytes_per_sec as f64, rc.burst_bytes as f64);
        }
        if self.bucket.rate <= 0.0 {
            return None;
        }
        let wait = self.bucket.reserve(bytes as f64);
        if wait.is_some() {
            limits.waited.fetch_add(1, Relaxed);
        }
        wait
    }

    /// Charges `bytes` and waits as [`Bucket::delay`] says (TCP backpressure).
    pub async fn pay(&mut self, limits: &RateLimits, bytes: u64) {
        if let Some(d) = self.delay(limits, bytes) {
            smol::Timer::after(d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::future::Future;
    use std::pin::Pin;

    #[test]
    fn accept_limiter_allows_the_burst_then_the_rate() {
        let mut l = TokenBucket::new(1.0, 3.0);
        assert!(l.allow() && l.allow() && l.allow());
        assert!(!l.allow(), "burst used up");
        l.at -= Duration::from_millis(1100);
        assert!(l.allow(), "one token back after a second");
        assert!(!l.allow());
        let mut none = TokenBucket::new(10.0, 0.0);
        assert!(!none.allow(), "burst 0 allows nothing");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    type Watch = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn watch(s: &Slot) -> Watch {
        Box::pin(s.evicted())
    }

    /// Polls `f` once.
    fn ready(f: &mut Watch) -> bool {
        let waker = std::task::Waker::noop();
        f.as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn slots_are_given_back() {
        let s = Slots::new(2, 2);
        let a = s.take(ip("192.0.2.1")).unwrap();
        let b = s.take(ip("192.0.2.2")).unwrap();
        assert!(a.evicted.is_none() && b.evicted.is_none());
        assert_eq!(s.in_use(), 2);
        drop(a);
        assert_eq!(s.in_use(), 1);
        let c = s.take(ip("192.0.2.3")).unwrap();
        assert!(c.evicted.is_none(), "a free slot: nobody evicted");
        drop((b, c));
        assert_eq!(s.in_use(), 0);
        let t = s.lock();
        assert!(t.per_source.is_empty() && t.entries.iter().all(Option::is_none));
    }

    #[test]
    fn one_source_is_capped_ipv6_by_64() {
        let s = Slots::new(100, 2);
        let _a = s.take(ip("192.0.2.1")).unwrap();
        let _b = s.take(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(
            s.take(ip("192.0.2.1")).unwrap_err(),
            Refused::SourceFull,
            "an IPv4-mapped address is the same IPv4 source"
        );
        let _c = s.take(ip("192.0.2.2")).unwrap();
        let _d = s.take(ip("2001:db8:0:1::1")).unwrap();
        let _e = s.take(ip("2001:db8:0:1:ffff::2")).unwrap();
        assert!(s.take(ip("2001:db8:0:1::3")).is_err(), "one /64");
        let _f = s.take(ip("2001:db8:0:2::1")).unwrap();
        assert_eq!(s.in_use(), 6);
    }

    #[test]
    fn a_newcomer_evicts_the_least_advanced_oldest_first() {
        let s = Slots::new(3, 3);
        let a = s.take(ip("192.0.2.1")).unwrap().slot;
        let b = s.take(ip("192.0.2.2")).unwrap().slot;
        let c = s.take(ip("192.0.2.3")).unwrap().slot;
        a.progress(Progress::Upgraded);
        let (mut ea, mut eb, mut ec) = (watch(&a), watch(&b), watch(&c));
        assert!(!ready(&mut ea) && !ready(&mut eb) && !ready(&mut ec));
        // b and c are silent; b is older.
        let d = s.take(ip("192.0.2.4")).unwrap();
        assert_eq!(d.evicted, Some(Progress::Silent));
        assert!(ready(&mut eb), "b evicted");
        assert!(!ready(&mut ea) && !ready(&mut ec));
        assert_eq!(s.in_use(), 3);
        drop(b);
        assert_eq!(
            s.in_use(),
            3,
            "an evicted slot is given back once, at eviction"
        );
        c.progress(Progress::Talking);
        c.progress(Progress::Silent);
        // d is silent now, c talking, a upgraded.
        let e = s.take(ip("192.0.2.5")).unwrap();
        assert_eq!(e.evicted, Some(Progress::Silent));
        let mut ed = watch(&d.slot);
        assert!(ready(&mut ed), "d evicted");
        e.slot.progress(Progress::Upgraded);
        let f = s.take(ip("192.0.2.6")).unwrap();
        assert_eq!(
            f.evicted,
            Some(Progress::Talking),
            "progress never goes back"
        );
        assert!(ready(&mut ec));
        // a logged in: it is never evicted, and its watcher holds nothing.
        drop(a);
        assert!(!ready(&mut ea));
        assert!(!ready(&mut ea));
        let g = s.take(ip("192.0.2.7")).unwrap();
        assert_eq!(g.evicted, None, "a's slot was free");
        assert_eq!(s.in_use(), 3);
    }

    #[test]
    fn rate_config_as_derper() {
        let rc: RateConfig =
            serde_json::from_str(r#"{"PerClientRateLimitBytesPerSec":1000,"Other":1}"#).unwrap();
        assert_eq!(
            rc.normalized(),
            RateConfig {
                bytes_per_sec: 1000,
                burst_bytes: MIN_RATE_BURST
            }
        );
        let off: RateConfig =
            serde_json::from_str(r#"{"PerClientRateBurstBytes":99999999}"#).unwrap();
        assert_eq!(off.normalized(), RateConfig::default());
        assert!(
            serde_json::from_str::<RateConfig>("{\"PerClientRateLimitBytesPerSec\":-1}").is_err()
        );
    }

    #[test]
    fn bucket_waits_for_what_it_owes() {
        let limits = RateLimits::default();
        let mut b = Bucket::default();
        assert_eq!(b.delay(&limits, 1 << 20), None, "no config: no limit");
        limits.set(RateConfig {
            bytes_per_sec: 100_000,
            burst_bytes: 0,
        });
        // The full burst (65568) passes, then the next 65568 bytes owe ~0.66 s.
        assert_eq!(b.delay(&limits, 65_568), None);
        let d = b.delay(&limits, 65_568).unwrap();
        assert!(
            d > Duration::from_millis(600) && d < Duration::from_millis(700),
            "{d:?}"
        );
        assert_eq!(limits.waited.load(Relaxed), 1);
        // Every byte is owed, not one maximum frame's worth: 1 MiB more owes ~10.5 s more.
        let d = b.delay(&limits, 1 << 20).unwrap();
        assert!(
            d > Duration::from_millis(11_000) && d < Duration::from_millis(11_400),
            "{d:?}"
        );
        limits.set(RateConfig::default());
        assert_eq!(b.delay(&limits, 1 << 20), None, "reload turned it off");
    }
}
