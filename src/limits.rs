//! Limits that keep the relay up under floods: the accept rate (`--accept-connection-limit`),
//! the number of connections still logging in (`--max-handshakes`), and derper's per-client
//! receive rate (`--rate-config`, backpressure rather than drops).

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// derper's `minRateLimitTokenBucketSize`: one maximum-size frame (64 KiB + 32).
pub const MIN_RATE_BURST: u64 = (64 << 10) + 32;

/// A token bucket for accepted connections: `rate` per second, at most `burst` saved up.
#[derive(Debug)]
pub struct AcceptLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl AcceptLimiter {
    /// A full bucket.
    pub fn new(rate: f64, burst: u64) -> Self {
        // Go's x/time/rate: a burst of 0 allows nothing; u64::MAX is "unlimited burst".
        let burst = burst as f64;
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes a token for a new connection; false: close it.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.at = now;
        self.tokens = (self.tokens + refill).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts connections that have not logged in yet, against `--max-handshakes`.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: usize,
}

/// A taken slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    /// `max` slots.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Takes a slot, or `None` when all are taken.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.used.load(Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Relaxed);
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

/// One connection's token bucket.
#[derive(Debug)]
pub struct Bucket {
    generation: u32,
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            generation: 0,
            rate: 0.0,
            burst: 0.0,
            tokens: 0.0,
            at: Instant::now(),
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
            self.rate = rc.bytes_per_sec as f64;
            self.burst = rc.burst_bytes as f64;
            // A new config starts with a full bucket, as in derper, whose setRateLimit gives
            // every connection a new x/time/rate limiter (and those start full).
            self.tokens = self.burst;
            self.at = Instant::now();
        }
        if self.rate <= 0.0 {
            return None;
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        // A reservation as x/time/rate makes it: tokens may go negative; the wait repays them.
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            return None;
        }
        limits.waited.fetch_add(1, Relaxed);
        Some(Duration::from_secs_f64(-self.tokens / self.rate))
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

    #[test]
    fn accept_limiter_allows_the_burst_then_the_rate() {
        let mut l = AcceptLimiter::new(1.0, 3);
        assert!(l.allow() && l.allow() && l.allow());
        assert!(!l.allow(), "burst used up");
        l.at -= Duration::from_millis(1100);
        assert!(l.allow(), "one token back after a second");
        assert!(!l.allow());
        let mut none = AcceptLimiter::new(10.0, 0);
        assert!(!none.allow(), "burst 0 allows nothing");
    }

    #[test]
    fn slots_are_given_back() {
        let s = Slots::new(2);
        let a = s.try_take().unwrap();
        let _b = s.try_take().unwrap();
        assert!(s.try_take().is_none());
        drop(a);
        assert_eq!(s.in_use(), 1);
        assert!(s.try_take().is_some());
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
