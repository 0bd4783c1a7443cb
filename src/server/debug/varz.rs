//! `/debug/varz`: Prometheus text under derper's names. Tailscale's expvar conversion turns the
//! `derp` metrics set's `gauge_x`/`counter_x`/`x` keys into `derp_x` with that `# TYPE` (plain
//! keys are counters), label maps into one series per label value, and publishes
//! `process_start_unix_time` and `version` without a `# TYPE` line. [`VARS`] lists what derpd
//! publishes, one line per metric.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use std::time::Duration;

use super::{leading_number, State, VERSION};
use crate::admission::{Check, ControllerStats};
use crate::limits::RateConfig;
use crate::metrics::{DropReason, Metrics};
use crate::pool::PoolStats;

/// Everything a scrape reads, gathered once so each metric is a plain field access.
pub(super) struct Scrape<'a> {
    m: &'a Metrics,
    pool: PoolStats,
    budget: usize,
    /// Registry: (local keys, keys only on other nodes, watchers).
    clients: (usize, usize, usize),
    /// Registry: (sender, receiver) pairs owed a PeerGone when the sender leaves.
    gone_interests: usize,
    fds: usize,
    rss: u64,
    rss0: u64,
    uptime: u64,
    start_unix: u64,
    /// `--rate-config` in force (derper publishes its metrics only when the flag is set).
    rate: Option<RateConfig>,
    rate_waited: u64,
    /// The main listener uses TLS (derper's `tls_listener` set exists only then).
    tls: bool,
    /// Connections not logged in yet.
    handshakes: usize,
    /// Admission refusals by check (in `Check::ALL` order), and fail-open admissions.
    refused: [u64; 3],
    fail_open: u64,
    /// The admission controller client, and reads of the allow-keys file.
    controller: ControllerStats,
    allow_keys_reads: u64,
}

impl<'a> Scrape<'a> {
    pub(super) fn new(state: &'a State) -> Self {
        let d = &state.debug;
        Self {
            m: &state.relay.metrics,
            pool: state.relay.pool.stats(),
            budget: state.relay.pool.budget_bytes(),
            clients: state.relay.registry.varz_counts(),
            gone_interests: state.relay.registry.peer_gone_interests(),
            // Counts the directory's own descriptor too, as derper does.
            fds: std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count),
            rss: rss_bytes(),
            rss0: d.rss0,
            uptime: (d.started.elapsed() + Duration::from_millis(500)).as_secs(),
            start_unix: d.start_unix,
            rate: state.rate_config.is_some().then(|| state.relay.rate.get()),
            rate_waited: state.relay.rate.waited.load(Relaxed) as u64,
            tls: state.is_tls(),
            handshakes: state.handshakes.in_use(),
            refused: Check::ALL.map(|c| state.relay.admission.rejections_by(c)),
            fail_open: state.relay.admission.fail_open_admits(),
            controller: state.relay.admission.controller_stats(),
            allow_keys_reads: state.relay.admission.allow_keys_reads(),
        }
    }
}

/// Resident memory, bytes (`VmRSS` of /proc/self/status: /proc/self/statm counts pages, and
/// the page size varies between routers); 0 when unknown.
pub(super) fn rss_bytes() -> u64 {
    let status = std::fs::read("/proc/self/status").unwrap_or_default();
    status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"VmRSS:"))
        .and_then(leading_number)
        .map_or(0, |kb| kb << 10)
}

#[derive(Clone, Copy)]
enum Type {
    Counter,
    Gauge,
    /// No `# TYPE` line.
    Untyped,
}

#[derive(Clone, Copy)]
enum Get {
    One(fn(&Scrape<'_>) -> u64),
    /// One series per label value: `name{label="value"}`.
    By(
        &'static str,
        &'static [&'static str],
        fn(&Scrape<'_>, usize) -> u64,
    ),
    /// `{reason,kind}` drops: packets (false) or bytes (true).
    Drops(bool),
    /// `name{version="…",binary="derpd"} 1`.
    Version,
}

#[derive(Clone, Copy)]
struct Var {
    name: &'static str,
    ty: Type,
    help: &'static str,
    get: Get,
    /// Published only when this holds (derper publishes some sets only with their flag).
    when: fn(&Scrape<'_>) -> bool,
}

impl Var {
    const fn help(mut self, help: &'static str) -> Self {
        self.help = help;
        self
    }

    const fn when(mut self, when: fn(&Scrape<'_>) -> bool) -> Self {
        self.when = when;
        self
    }
}

fn always(_: &Scrape<'_>) -> bool {
    true
}

fn rate_limited(s: &Scrape<'_>) -> bool {
    s.rate.is_some()
}

fn tls_listener(s: &Scrape<'_>) -> bool {
    s.tls
}

const fn c(name: &'static str, f: fn(&Scrape<'_>) -> u64) -> Var {
    Var {
        name,
        ty: Type::Counter,
        help: "",
        get: Get::One(f),
        when: always,
    }
}

const fn g(name: &'static str, f: fn(&Scrape<'_>) -> u64) -> Var {
    Var {
        ty: Type::Gauge,
        ..c(name, f)
    }
}

const fn by(
    ty: Type,
    name: &'static str,
    label: &'static str,
    values: &'static [&'static str],
    f: fn(&Scrape<'_>, usize) -> u64,
) -> Var {
    Var {
        name,
        ty,
        help: "",
        get: Get::By(label, values, f),
        when: always,
    }
}

const fn special(ty: Type, name: &'static str, get: Get) -> Var {
    Var {
        name,
        ty,
        help: "",
        get,
        when: always,
    }
}

const CLASSES: &[&str] = &["small", "large"];

/// Size class `i` (0 small, 1 large): (capacity, allocated, in use, free).
fn class(p: &PoolStats, i: usize) -> (usize, usize, usize, usize) {
    let (cap, allocated, used) = if i == 0 { p.small } else { p.large };
    (cap, allocated, used, cap.saturating_sub(used))
}

// The help texts of the admission controller metrics state these numbers.
const _: () = assert!(crate::admission::MAX_CHECKS == 16);
const _: () = assert!(crate::admission::REFUSED_TTL.as_secs() == 15);

/// What `/debug/varz` publishes, in order. derper's names first (`derp_` is its `derp` set),
/// then derpd's own (`derpd_`).
#[rustfmt::skip]
static VARS: &[Var] = &[
    c("derp_accepts", |s| s.m.accepts.load(Relaxed)),
    c("derp_bytes_received", |s| s.m.bytes_received.load(Relaxed)),
    c("derp_bytes_sent", |s| s.m.bytes_sent.load(Relaxed)),
    by(Type::Counter, "derp_packets_received_kind", "kind", &["disco", "other"],
        |s, i| s.m.packets_received_kind[i].load(Relaxed)),
    c("derp_total_dup_client_conns", |s| s.m.total_dup_client_conns.load(Relaxed)),
    g("derp_clients_local", |s| s.clients.0 as u64),
    g("derp_clients_remote", |s| s.clients.1 as u64),
    g("derp_clients_total", |s| (s.clients.0 + s.clients.1) as u64),
    g("derp_current_connections", |s| s.m.current_connections.load(Relaxed) as u64),
    g("derp_current_dup_client_conns", |s| s.m.dup_client_conns.load(Relaxed) as u64),
    g("derp_current_dup_client_keys", |s| s.m.dup_client_keys.load(Relaxed) as u64),
    g("derp_current_file_descriptors", |s| s.fds as u64),
    g("derp_current_home_connections", |s| s.m.home_connections.load(Relaxed) as u64),
    g("derp_current_notideal_connections", |s| s.m.notideal_connections.load(Relaxed) as u64),
    g("derp_memstats_sys0", |s| s.rss0),
    g("derp_watchers", |s| s.clients.2 as u64),
    c("derp_got_ping", |s| s.m.got_ping.load(Relaxed)),
    c("derp_home_moves_in", |s| s.m.home_moves_in.load(Relaxed)),
    c("derp_home_moves_out", |s| s.m.home_moves_out.load(Relaxed)),
    c("derp_multiforwarder_created", |s| s.m.multiforwarder_created.load(Relaxed)),
    c("derp_multiforwarder_deleted", |s| s.m.multiforwarder_deleted.load(Relaxed)),
    c("derp_packet_forwarder_delete_other_value", |s| s.m.packet_forwarder_delete_other_value.load(Relaxed)),
    c("derp_packets_forwarded_in", |s| s.m.packets_forwarded_in.load(Relaxed)),
    c("derp_packets_forwarded_out", |s| s.m.packets_forwarded_out.load(Relaxed)),
    c("derp_packets_received", |s| s.m.packets_received.load(Relaxed)),
    c("derp_packets_sent", |s| s.m.packets_sent.load(Relaxed)),
    c("derp_peer_gone_disconnected_frames", |s| s.m.peer_gone_disconnected_frames.load(Relaxed)),
    c("derp_peer_gone_not_here_frames", |s| s.m.peer_gone_not_here_frames.load(Relaxed)),
    c("derp_sclient_write_timeouts", |s| s.m.write_timeouts.load(Relaxed)),
    c("derp_sent_pong", |s| s.m.sent_pong.load(Relaxed)),
    c("derp_unknown_frames", |s| s.m.unknown_frames.load(Relaxed)),
    special(Type::Counter, "derp_bytes_dropped", Get::Drops(true))
        .help("DERP bytes dropped by reason and by kind"),
    special(Type::Counter, "derp_packets_dropped", Get::Drops(false))
        .help("DERP packets dropped by reason and by kind"),
    special(Type::Untyped, "derp_rate_limit_per_client_burst_bytes",
        Get::One(|s| s.rate.map_or(0, |r| r.burst_bytes))).when(rate_limited),
    special(Type::Untyped, "derp_rate_limit_per_client_bytes_per_second",
        Get::One(|s| s.rate.map_or(0, |r| r.bytes_per_sec))).when(rate_limited),
    c("derp_rate_limit_per_client_waited", |s| s.rate_waited).when(rate_limited),
    c("derp_websocket_accepts", |s| s.m.websocket_accepts.load(Relaxed)),
    g("process_resident_memory_bytes", |s| s.rss).help("Resident memory size in bytes."),
    special(Type::Untyped, "process_start_unix_time", Get::One(|s| s.start_unix)),
    by(Type::Counter, "stun_addrfamily", "family", &["ipv4", "ipv6"],
        |s, i| s.m.stun_addrfamily[i].load(Relaxed)),
    by(Type::Counter, "stun_requests", "disposition", &["not_stun", "read_error", "success", "write_error"],
        |s, i| [&s.m.stun_not_stun, &s.m.stun_read_error, &s.m.stun_success, &s.m.stun_write_error][i].load(Relaxed)),
    c("tls_listener_accepted_connections", |s| s.m.main_accepted.load(Relaxed)).when(tls_listener),
    c("tls_listener_rejected_connections", |s| s.m.accept_rejected.load(Relaxed)).when(tls_listener),
    c("uptime_sec", |s| s.uptime),
    special(Type::Untyped, "version", Get::Version),
    // derpd's own.
    c("derpd_tcp_accepts", |s| s.m.tcp_accepts.load(Relaxed))
        .help("TCP connections accepted on any listener: DERP, probes, scrapes, failed TLS."),
    c("derpd_failed_logins", |s| s.m.failed_logins.load(Relaxed))
        .help("Connections that ended with an error: bad request head, TLS, login, deadline, protocol or I/O."),
    c("derpd_fast_start_logins", |s| s.m.fast_start_logins.load(Relaxed))
        .help("DERP logins that used fast start (no 101 response)."),
    c("derpd_accept_rejected", |s| s.m.accept_rejected.load(Relaxed))
        .help("Connections closed at accept by --accept-connection-limit (any listener mode)."),
    c("derpd_accept_errors", |s| s.m.accept_errors.load(Relaxed))
        .help("Failed accept calls (out of file descriptors and the like)."),
    g("derpd_handshakes", |s| s.handshakes as u64)
        .help("Connections not logged in yet (TLS handshake, request head, login)."),
    c("derpd_handshakes_ip_full", |s| s.m.handshakes_ip_full.load(Relaxed))
        .help("Connections closed at accept: their address (IPv6: /64) was at --max-handshakes-per-ip."),
    by(Type::Counter, "derpd_handshakes_evicted", "stage", &["silent", "talking", "upgraded"],
        |s, i| s.m.handshakes_evicted[i].load(Relaxed))
        .help("Connections not logged in yet, closed for a newcomer when --max-handshakes were taken, by how far they had come."),
    by(Type::Counter, "derpd_tls_handshakes", "aead", &crate::tls::ciphers::AEADS,
        |s, i| s.m.tls_aead[i].load(Relaxed))
        .help("TLS handshakes completed on the main listener, by the AEAD of the suite negotiated (--tls-ciphers)."),
    c("derpd_first_byte_timeouts", |s| s.m.first_byte_timeouts.load(Relaxed))
        .help("Connections closed for sending nothing within --first-byte-timeout."),
    c("derpd_clients_full", |s| s.m.clients_full.load(Relaxed))
        .help("Logins refused because --max-clients were connected."),
    by(Type::Counter, "derpd_admission_rejections", "check", &["allow_keys", "tailscaled", "url"],
        |s, i| s.refused[i])
        .help("Logins refused by --allow-keys-file, --verify-clients or --verify-client-url."),
    c("derpd_admission_fail_open_admits", |s| s.fail_open)
        .help("Logins let in because the admission controller could not be reached (fail-open)."),
    by(Type::Counter, "derpd_log_lines_suppressed", "kind", crate::lograte::KIND_LABELS,
        |_, i| u64::from(crate::lograte::KINDS[i].suppressed()))
        .help("Log lines held back by the per-kind limit (5 lines per 10 s each): failed logins, connection errors, refused heads and WebSockets, fail-open admissions."),
    g("derpd_admission_checks_in_flight", |s| s.controller.in_flight as u64)
        .help("Requests in flight to the admission controller now (at most 16)."),
    g("derpd_admission_checks_waiting", |s| s.controller.waiting as u64)
        .help("Logins waiting for an admission controller slot now (all 16 in flight)."),
    c("derpd_admission_check_wait_timeouts", |s| s.controller.wait_timeouts)
        .help("Logins refused because no admission controller slot freed within the check timeout."),
    c("derpd_admission_refused_cache_hits", |s| s.controller.cache_hits)
        .help("Logins refused without asking: the admission controller refused the key (from that IP) in the last 15 s."),
    c("derpd_admission_controller_connects", |s| s.controller.connects)
        .help("Connections opened to the admission controller (they are kept alive)."),
    c("derpd_allow_keys_reads", |s| s.allow_keys_reads)
        .help("Reads of the --allow-keys-file (start-up, SIGHUP, changes seen)."),
    g("derpd_peer_gone_interests", |s| s.gone_interests as u64)
        .help("(sender, receiver) pairs of connected keys owed a PeerGone when the sender leaves."),
    g("derpd_mesh_links_up", |s| s.m.mesh_links_up.load(Relaxed) as u64)
        .help("Mesh links to other nodes of the region now connected."),
    g("derpd_pool_budget_bytes", |s| s.budget as u64)
        .help("Most bytes the packet buffer pool may hold."),
    by(Type::Gauge, "derpd_pool_buffers_allocated", "class", CLASSES, |s, i| class(&s.pool, i).1 as u64)
        .help("Packet buffers allocated so far (they are recycled, never freed)."),
    by(Type::Gauge, "derpd_pool_buffers_in_use", "class", CLASSES, |s, i| class(&s.pool, i).2 as u64)
        .help("Packet buffers holding a packet now."),
    by(Type::Gauge, "derpd_pool_buffers_free", "class", CLASSES, |s, i| class(&s.pool, i).3 as u64)
        .help("Packet buffers that can still be handed out before readers wait."),
    by(Type::Gauge, "derpd_pool_waiting_readers", "class", CLASSES,
        |s, i| (if i == 0 { s.pool.waiting.0 } else { s.pool.waiting.1 }) as u64)
        .help("Readers waiting for a free packet buffer now (TCP backpressure)."),
];

/// Writes every metric in Prometheus text format.
pub(super) fn render(s: &Scrape<'_>, out: &mut String) {
    for v in VARS.iter().filter(|v| (v.when)(s)) {
        let name = v.name;
        let ty = match v.ty {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Untyped => "",
        };
        if !ty.is_empty() {
            let _ = writeln!(out, "# TYPE {name} {ty}");
        }
        if !v.help.is_empty() {
            let _ = writeln!(out, "# HELP {name} {}", v.help);
        }
        let _ = match v.get {
            Get::One(f) => writeln!(out, "{name} {}", f(s)),
            Get::By(label, values, f) => values
                .iter()
                .enumerate()
                .try_for_each(|(i, val)| writeln!(out, "{name}{{{label}=\"{val}\"}} {}", f(s, i))),
            Get::Drops(bytes) => DropReason::ALL.iter().try_for_each(|&r| {
                let t = if bytes {
                    &s.m.bytes_dropped
                } else {
                    &s.m.packets_dropped
                };
                ["disco", "other"]
                    .iter()
                    .enumerate()
                    .try_for_each(|(k, kind)| {
                        let n = t[r as usize][k].load(Relaxed);
                        writeln!(
                            out,
                            "{name}{{reason=\"{}\",kind=\"{kind}\"}} {n}",
                            r.label()
                        )
                    })
            }),
            Get::Version => writeln!(out, "{name}{{version=\"{VERSION}\",binary=\"derpd\"}} 1"),
        };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::pool::Pool;
    use crate::registry::Registry;
    use std::sync::Arc;

    #[test]
    fn debug_proc_numbers() {
        assert_eq!(leading_number(b"\t  1234 kB"), Some(1234));
        assert_eq!(leading_number(b"kB"), None);
        assert_eq!(leading_number(b"99999999999999999999999"), Some(u64::MAX));
        #[cfg(target_os = "linux")]
        assert!(rss_bytes() > 0);
    }

    fn scrape(m: &Metrics) -> String {
        let pool = Pool::with_counts(10, 2);
        let _held = pool.try_get(100).unwrap();
        let reg = Registry::new(Arc::new(Metrics::default()));
        let s = Scrape {
            m,
            pool: pool.stats(),
            budget: pool.budget_bytes(),
            clients: reg.varz_counts(),
            gone_interests: 4,
            fds: 7,
            rss: 1 << 20,
            rss0: 1 << 19,
            uptime: 3,
            start_unix: 1_700_000_000,
            // Every conditional set on, so that every metric is rendered.
            rate: Some(RateConfig {
                bytes_per_sec: 1000,
                burst_bytes: 65568,
            }),
            rate_waited: 2,
            tls: true,
            handshakes: 0,
            refused: [1, 2, 3],
            fail_open: 4,
            controller: ControllerStats {
                in_flight: 5,
                waiting: 6,
                cache_hits: 7,
                connects: 8,
                wait_timeouts: 9,
            },
            allow_keys_reads: 10,
        };
        let mut out = String::new();
        render(&s, &mut out);
        out
    }

    #[test]
    fn debug_varz_text() {
        let m = Metrics::default();
        m.accepts.fetch_add(3, Relaxed);
        m.current_connections.fetch_add(2, Relaxed);
        m.drop_packet(DropReason::MeshForward, true, 40);
        m.stun_addrfamily[1].fetch_add(1, Relaxed);
        m.stun_read_error.fetch_add(4, Relaxed);
        m.packets_received_kind[1].fetch_add(9, Relaxed);
        let out = scrape(&m);
        for want in [
            "# TYPE derp_accepts counter\nderp_accepts 3\n",
            "# TYPE derp_current_connections gauge\nderp_current_connections 2\n",
            "# TYPE derp_packets_received_kind counter\nderp_packets_received_kind{kind=\"disco\"} 0\n\
             derp_packets_received_kind{kind=\"other\"} 9\n",
            "# TYPE derp_packets_dropped counter\n\
             # HELP derp_packets_dropped DERP packets dropped by reason and by kind\n\
             derp_packets_dropped{reason=\"unknown_dest\",kind=\"disco\"} 0\n",
            "derp_packets_dropped{reason=\"mesh_forward\",kind=\"disco\"} 1\n",
            "derp_bytes_dropped{reason=\"mesh_forward\",kind=\"disco\"} 40\n",
            "stun_addrfamily{family=\"ipv6\"} 1\n",
            "stun_requests{disposition=\"read_error\"} 4\n",
            "\nprocess_start_unix_time 1700000000\n",
            "\nversion{version=\"",
            "# TYPE uptime_sec counter\nuptime_sec 3\n",
            "derp_rate_limit_per_client_bytes_per_second 1000\n",
            "# TYPE derp_rate_limit_per_client_waited counter\nderp_rate_limit_per_client_waited 2\n",
            "# TYPE tls_listener_rejected_connections counter\n",
            "derpd_admission_rejections{check=\"tailscaled\"} 2\n",
            "derpd_admission_fail_open_admits 4\n",
            "# TYPE derpd_admission_checks_in_flight gauge\n",
            "\nderpd_admission_checks_in_flight 5\n",
            "derpd_admission_checks_waiting 6\n",
            "# TYPE derpd_admission_refused_cache_hits counter\n",
            "\nderpd_admission_refused_cache_hits 7\n",
            "derpd_admission_controller_connects 8\n",
            "derpd_admission_check_wait_timeouts 9\n",
            "derpd_allow_keys_reads 10\n",
            "derp_memstats_sys0 524288\n",
            "derpd_pool_buffers_in_use{class=\"small\"} 1\n",
            "derpd_pool_buffers_free{class=\"small\"} 9\n",
            "derpd_pool_buffers_free{class=\"large\"} 2\n",
            "derpd_pool_waiting_readers{class=\"small\"} 0\n",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        // Every drop series, derper's 7 reasons and derpd's mesh_forward and queue_large, by
        // both kinds.
        assert_eq!(
            out.lines()
                .filter(|l| l.starts_with("derp_packets_dropped{"))
                .count(),
            18
        );
        // Well-formed: each typed name has one TYPE line, before its samples; names unique.
        let mut seen = std::collections::HashSet::new();
        for l in out.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(seen.insert(l.split(' ').nth(2).unwrap()), "{l}");
        }
        assert_eq!(
            seen.len(),
            VARS.iter()
                .filter(|v| !matches!(v.ty, Type::Untyped))
                .count()
        );
        assert!(
            out.len() < 12 << 10,
            "the buffer's initial capacity is enough"
        );
    }
}
