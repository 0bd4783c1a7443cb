//! The relay: what every DERP session shares, whatever listener or transport it came in on (TLS,
//! plain HTTP, WebSocket, a mesh peer): the server's key, the registry of connected keys, the
//! packet pool, the counters, who may log in, and the per-session limits and deadlines. The
//! front door (listeners, TLS, request heads, the debug pages) is [`crate::server`]'s.

use std::sync::Arc;

use log::info;
use portable_atomic::AtomicU64;

use crate::admission::Admission;
use crate::config::{Config, Limits, Timeouts};
use crate::key::{NodePrivate, NodePublic};
use crate::limits::{RateConfig, RateLimits};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::registry::Registry;

/// The shared state of DERP sessions, one per running server.
pub struct Relay {
    /// The server's DERP identity.
    pub private_key: NodePrivate,
    /// Its public half.
    pub public_key: NodePublic,
    /// Connected clients.
    pub registry: Registry,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Packet buffers.
    pub pool: Arc<Pool>,
    /// Deadlines, as configured (the front door's too: it reads them here).
    pub timeouts: Timeouts,
    /// Sizes and counts, as configured (`--max-clients` is the sessions'; the rest the front
    /// door's, read here).
    pub limits: Limits,
    /// Next connection number.
    pub next_conn_id: AtomicU64,
    /// The region's mesh key: clients presenting it get mesh privileges.
    pub mesh_key: Option<[u8; 32]>,
    /// Who may log in.
    pub admission: Admission,
    /// `--rate-config`: the per-client receive limit.
    pub rate: RateLimits,
}

impl Relay {
    /// The relay for `cfg` with the key `private_key`: the admission checks and the
    /// `--rate-config` file are read here (their errors are start-up errors). `cfg.key`, the
    /// listeners, TLS and `--mesh-with` are not this type's.
    pub fn new(cfg: &Config, private_key: NodePrivate) -> Result<Self, String> {
        let admission = Admission::new(cfg.admission.clone())?;
        let rate = RateLimits::default();
        if let Some(p) = &cfg.rate_config {
            let rc = RateConfig::load(p)?;
            rate.set(rc);
            log_rate_config(rc);
        }
        let metrics = Arc::new(Metrics::default());
        Ok(Self {
            public_key: private_key.public(),
            private_key,
            registry: Registry::new(metrics.clone()),
            metrics,
            pool: Pool::with_budget(cfg.limits.buffer_budget),
            timeouts: cfg.timeouts,
            limits: cfg.limits,
            next_conn_id: AtomicU64::new(1),
            mesh_key: cfg.mesh_key,
            admission,
            rate,
        })
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// Logs the per-client rate in force (at start and after each reload).
pub fn log_rate_config(rc: RateConfig) {
    info!(
        "rate config applied: client-rate={} bytes/sec, client-burst={} bytes",
        rc.bytes_per_sec, rc.burst_bytes
    );
}
