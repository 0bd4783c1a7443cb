//! `/debug/`: the pages derper serves there that derpd implements (the index, `varz`, `check`),
//! derpd's own `derpmap` (this node's DERPMap entry as JSON, for the LuCI page), and derper's
//! access rule for them (tsweb's `AllowDebugAccess`), which trusts a Tailscale peer here only
//! on a connection to a Tailscale address of derpd's (100.64.0.0/10 is also CGNAT).
//!
//! `varz` is Prometheus text under derper's names: Tailscale's expvar conversion turns the
//! `derp` metrics set's `gauge_x`/`counter_x`/`x` keys into `derp_x` with that `# TYPE` (plain
//! keys are counters), label maps into one series per label value, and publishes
//! `process_start_unix_time` and `version` without a `# TYPE` line. [`VARS`] lists what derpd
//! publishes, one line per metric.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::State;
use crate::admission::{Check, ControllerStats};
use crate::config::Config;
use crate::derpmap::Node;
use crate::http::{self, Request};
use crate::limits::RateConfig;
use crate::metrics::{DropReason, Metrics};
use crate::pool::PoolStats;

/// Browser headers of derper's debug sub-pages: its usual ones, with inline styles allowed.
const DEBUG_HEADERS: &str = "Strict-Transport-Security: max-age=63072000; includeSubDomains\r\n\
Content-Security-Policy: default-src 'self'; frame-ancestors 'none'; form-action 'self'; \
base-uri 'self'; block-all-mixed-content; object-src 'none'; style-src 'self' 'unsafe-inline'\r\n\
X-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\n";
const TEXT: &str = "Content-Type: text/plain; charset=utf-8\r\n";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the debug pages need beyond the server state, fixed at start.
#[derive(Debug)]
pub(crate) struct DebugState {
    access: Access,
    started: Instant,
    start_unix: u64,
    /// Resident memory at start: published as derper's `memstats_sys0` (the Go runtime's
    /// memory obtained from the OS at start), the nearest thing a Rust process has.
    rss0: u64,
    tls_hostname: Option<String>,
    /// This node's DERPMap entry (TLS modes only), for `/debug/derpmap`.
    derp_map: Option<Node>,
}

impl DebugState {
    /// Reads the access rule from the environment (once: derper reads it per request, but it
    /// does not change). A bad `TS_DEBUG_TRUSTED_CIDRS` is a start-up error, where derper
    /// exits at the first request that needs it.
    pub(crate) fn new(cfg: &Config, derp_map: Option<Node>) -> Result<Self, String> {
        let env = |k| std::env::var(k).unwrap_or_default();
        let access = Access::parse(
            &env("TS_ALLOW_DEBUG_IP"),
            &env("TS_DEBUG_TRUSTED_CIDRS"),
            &env("TS_DEBUG_KEY_PATH"),
        )?;
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Self {
            access,
            started: Instant::now(),
            start_unix,
            rss0: rss_bytes(),
            tls_hostname: cfg.tls.as_ref().map(|t| t.hostname.clone()),
            derp_map,
        })
    }

    /// This node's DERPMap entry, in TLS modes.
    pub(crate) fn derp_map(&self) -> Option<&Node> {
        self.derp_map.as_ref()
    }
}

/// Who may see `/debug/`.
#[derive(Debug, Default)]
struct Access {
    /// `TS_ALLOW_DEBUG_IP`.
    allow_ip: Option<IpAddr>,
    /// `TS_DEBUG_TRUSTED_CIDRS`: comma-separated prefixes.
    trusted: Vec<(IpAddr, u8)>,
    /// `TS_DEBUG_KEY_PATH`: a file holding the `?debugkey=` secret, read per request.
    key_path: Option<PathBuf>,
}

impl Access {
    /// Empty strings mean unset. An `allow_ip` that is not an IP matches nothing (derper
    /// compares strings); a bad CIDR is an error.
    fn parse(allow_ip: &str, trusted: &str, key_path: &str) -> Result<Self, String> {
        let mut a = Self {
            allow_ip: allow_ip
                .trim()
                .parse::<IpAddr>()
                .ok()
                .map(|ip| ip.to_canonical()),
            key_path: (!key_path.is_empty()).then(|| PathBuf::from(key_path)),
            ..Self::default()
        };
        for s in trusted.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let p = parse_prefix(s)
                .ok_or_else(|| format!("invalid CIDR in TS_DEBUG_TRUSTED_CIDRS: {s:?}"))?;
            a.trusted.push(p);
        }
        Ok(a)
    }

    /// derper's rule: a GET with the right `?debugkey=`; otherwise, without `X-Forwarded-For`,
    /// a loopback or Tailscale peer, `TS_ALLOW_DEBUG_IP`, or one in `TS_DEBUG_TRUSTED_CIDRS`.
    /// Unlike derper, a Tailscale peer only when the connection also arrived on a Tailscale
    /// address (`local`, derpd's own end of it): 100.64.0.0/10 is also ISP carrier-grade NAT
    /// (RFC 6598), whose other subscribers are not the owner's tailnet. IPv4 addresses on a
    /// dual-stack listener (`::ffff:a.b.c.d`) are judged as IPv4.
    fn allows(&self, req: &Request, remote: IpAddr, local: Option<IpAddr>) -> bool {
        if req.method == "GET" && self.key_matches(&req.target) {
            return true;
        }
        if req.forwarded {
            return false;
        }
        let ip = remote.to_canonical();
        let on_tailscale = local.is_some_and(|l| is_tailscale_ip(l.to_canonical()));
        ip.is_loopback()
            || (is_tailscale_ip(ip) && on_tailscale)
            || self.allow_ip == Some(ip)
            || self
                .trusted
                .iter()
                .any(|&(net, bits)| in_prefix(ip, net, bits))
    }

    fn key_matches(&self, target: &str) -> bool {
        let Some(path) = &self.key_path else {
            return false;
        };
        let Some(given) = query_value(target, "debugkey").filter(|k| !k.is_empty()) else {
            return false;
        };
        std::fs::read(path).is_ok_and(|want| {
            let want = want.trim_ascii();
            // Length leaks; the contents do not.
            want.len() == given.len()
                && want.iter().zip(&given).fold(0, |d, (a, b)| d | (a ^ b)) == 0
        })
    }
}

/// `100.64.0.0/10` except ChromeOS's `100.115.92.0/23`, or `fd7a:115c:a1e0::/48`
/// (Tailscale's `tsaddr.IsTailscaleIP`).
fn is_tailscale_ip(ip: IpAddr) -> bool {
    const CGNAT: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0));
    const CHROMEOS: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 115, 92, 0));
    const ULA: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0));
    (in_prefix(ip, CGNAT, 10) && !in_prefix(ip, CHROMEOS, 23)) || in_prefix(ip, ULA, 48)
}

/// `addr/bits` as Go's `netip.ParsePrefix` takes it (no zone, bits in decimal without a
/// leading zero, at most the address width).
fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    let width = if ip.is_ipv4() { 32 } else { 128 };
    let ok = bits.bytes().all(|b| b.is_ascii_digit()) && (bits == "0" || !bits.starts_with('0'));
    let bits = leading_number(bits.as_bytes()).filter(|&b| ok && b <= width)?;
    Some((ip, bits as u8))
}

/// Whether `ip` is in `net/bits` (same family only, as `netip.Prefix.Contains`).
fn in_prefix(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (a, n, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u128::from(u32::from(a)), u128::from(u32::from(n)), 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    a.checked_shr(shift) == n.checked_shr(shift)
}

/// The first decodable value of `name` in the target's query, as Go's `FormValue` finds it
/// (`+` is a space; pairs with `;` or a bad escape are skipped).
fn query_value(target: &str, name: &str) -> Option<Vec<u8>> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .filter(|p| !p.contains(';'))
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k)? == name.as_bytes()).then_some(())?;
            unescape(v)
        })
        .next()
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| char::from(c).to_digit(16);
                let v = hex(*b.get(i + 1)?)? << 4 | hex(*b.get(i + 2)?)?;
                out.push(v as u8);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    Some(out)
}

/// The response to a request under `/debug` from `remote` that arrived on `local` (derpd's
/// address of the connection; `None` if unknown: then no Tailscale peer is let in by address).
pub(crate) fn respond(
    state: &State,
    req: &Request,
    remote: SocketAddr,
    local: Option<SocketAddr>,
) -> Vec<u8> {
    let head = req.method == "HEAD";
    if req.path == "/debug" {
        // Go's ServeMux sends a subtree's root to its slashed form before any handler runs.
        let query = req.target.split_once('?').map_or("", |(_, q)| q);
        let sep = if query.is_empty() { "" } else { "?" };
        let loc = format!("/debug/{sep}{query}");
        let body = if req.method == "GET" {
            format!("<a href=\"{}\">Temporary Redirect</a>.\n\n", escape(&loc))
        } else {
            String::new()
        };
        let extra = format!("Content-Type: text/html; charset=utf-8\r\nLocation: {loc}\r\n");
        return http::response(307, "Temporary Redirect", &extra, body.as_bytes(), head);
    }
    if !state
        .debug
        .access
        .allows(req, remote.ip(), local.map(|l| l.ip()))
    {
        return error(403, "Forbidden", "debug access denied", head);
    }
    match req.path.get("/debug/".len()..).unwrap_or("") {
        "" => index(state, head),
        "varz" => {
            let mut body = String::with_capacity(12 << 10);
            render(&Scrape::new(state), &mut body);
            let extra = format!("{DEBUG_HEADERS}{TEXT}");
            http::response(200, "OK", &extra, body.as_bytes(), head)
        }
        // derpd's own: the DERPMap entry the log shows, for the LuCI page (rpcd plugin).
        "derpmap" => match &state.debug.derp_map {
            Some(node) => {
                let extra = format!("{DEBUG_HEADERS}Content-Type: application/json\r\n");
                http::response(200, "OK", &extra, node.page_json().as_bytes(), head)
            }
            None => error(404, "Not Found", "no DERPMap entry: plain HTTP mode", head),
        },
        // derper checks its maps against each other; derpd keeps one map per purpose, so
        // those invariants hold by construction.
        "check" => {
            let extra = format!("{DEBUG_HEADERS}{TEXT}");
            let body = b"derp.Server ConsistencyCheck okay";
            http::response(200, "OK", &extra, body, head)
        }
        _ => error(404, "Not Found", "404 page not found", head),
    }
}

/// Go's `http.Error`.
fn error(status: u16, reason: &str, msg: &str, head: bool) -> Vec<u8> {
    let extra = format!("{TEXT}X-Content-Type-Options: nosniff\r\n");
    http::response(status, reason, &extra, format!("{msg}\n").as_bytes(), head)
}

/// The index: derper's layout (key/value items, then links).
fn index(state: &State, head: bool) -> Vec<u8> {
    let d = &state.debug;
    let mut b = String::with_capacity(1024);
    b.push_str("<html><body><h1>derpd debug</h1><ul>");
    let mut kv = |k: &str, v: &str| {
        let _ = write!(b, "<li><b>{k}:</b> {}</li>", escape(v));
    };
    kv("Uptime", &go_duration(d.started.elapsed()));
    kv("Version", VERSION);
    if let Ok(h) = std::fs::read("/proc/sys/kernel/hostname") {
        kv("Machine", String::from_utf8_lossy(&h).trim());
    }
    if let Some(h) = &d.tls_hostname {
        kv("TLS hostname", h);
    }
    kv(
        "Mesh key",
        if state.relay.mesh_key.is_some() {
            "true"
        } else {
            "false"
        },
    );
    for (slug, desc) in [
        ("varz", "Metrics (Prometheus)"),
        ("check", "Consistency check"),
        ("derpmap", "DERPMap entry (JSON)"),
    ] {
        let _ = write!(
            b,
            "<li><a href=\"/debug/{slug}\">/debug/{slug}</a> ({desc})</li>"
        );
    }
    b.push_str("</ul></body></html>\n");
    let extra = format!(
        "{}Content-Type: text/html; charset=utf-8\r\n",
        http::BROWSER_HEADERS
    );
    http::response(200, "OK", &extra, b.as_bytes(), head)
}

/// A duration in whole seconds as Go prints it: `54s`, `3m4s`, `2h0m5s`.
fn go_duration(d: Duration) -> String {
    let s = (d + Duration::from_millis(500)).as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// varz

/// Everything a scrape reads, gathered once so each metric is a plain field access.
struct Scrape<'a> {
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
    fn new(state: &'a State) -> Self {
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
fn rss_bytes() -> u64 {
    let status = std::fs::read("/proc/self/status").unwrap_or_default();
    status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"VmRSS:"))
        .and_then(leading_number)
        .map_or(0, |kb| kb << 10)
}

/// The decimal number at the start of `b` (after blanks), saturating; `None` without digits.
fn leading_number(b: &[u8]) -> Option<u64> {
    let b = b.trim_ascii_start();
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let v = b[..n].iter().fold(0u64, |v, &d| {
        v.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    (n > 0).then_some(v)
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
fn render(s: &Scrape<'_>, out: &mut String) {
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

    fn req(method: &str, target: &str, forwarded: bool) -> Request {
        Request {
            method: method.into(),
            path: target.split('?').next().unwrap().into(),
            target: target.into(),
            forwarded,
            ..Request::default()
        }
    }

    /// From `ip`, on a connection that arrived on a Tailscale address of derpd's.
    fn allowed(a: &Access, ip: &str) -> bool {
        allowed_on(a, ip, Some("100.100.1.1"))
    }

    /// From `ip`, on a connection that arrived on `local`.
    fn allowed_on(a: &Access, ip: &str, local: Option<&str>) -> bool {
        let local = local.map(|l| l.parse().unwrap());
        a.allows(&req("GET", "/debug/", false), ip.parse().unwrap(), local)
    }

    #[test]
    fn debug_access_loopback_and_tailscale_ips() {
        let a = Access::default();
        for ip in ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"] {
            assert!(allowed(&a, ip), "{ip}");
        }
        for (ip, ok) in [
            ("100.63.255.255", false),
            ("100.64.0.0", true),
            ("100.101.102.103", true),
            ("100.127.255.255", true),
            ("100.128.0.0", false),
            ("::ffff:100.64.0.1", true),
            ("100.115.92.1", false), // ChromeOS VM range, not Tailscale's
            ("100.115.94.1", true),
            ("fd7a:115c:a1e0::1", true),
            ("fd7a:115c:a1e0:ffff::1", true),
            ("fd7a:115c:a1e1::1", false),
            ("10.0.0.1", false),
            ("2001:db8::1", false),
            ("::ffff:10.0.0.1", false),
        ] {
            assert_eq!(allowed(&a, ip), ok, "{ip}");
        }
    }

    /// 100.64.0.0/10 is also carrier-grade NAT: a Tailscale peer is trusted only on a
    /// connection that arrived on a Tailscale address of derpd's (a router behind CGNAT has
    /// its WAN address in that range too; see the README).
    #[test]
    fn debug_access_tailscale_peers_only_on_a_tailscale_address() {
        let a = Access::parse("", "", "").unwrap();
        for (remote, local, ok) in [
            // Tailscale to Tailscale, both families, mapped IPv4 as IPv4.
            ("100.101.102.103", Some("100.64.0.1"), true),
            (
                "::ffff:100.101.102.103",
                Some("::ffff:100.127.255.254"),
                true,
            ),
            ("fd7a:115c:a1e0::5", Some("fd7a:115c:a1e0:ab12::1"), true),
            ("100.101.102.103", Some("fd7a:115c:a1e0::1"), true),
            // A CGNAT neighbour, or a Tailscale address, reaching a non-Tailscale address.
            ("100.101.102.103", Some("192.168.1.1"), false),
            ("100.101.102.103", Some("203.0.113.1"), false),
            ("100.101.102.103", Some("127.0.0.1"), false),
            ("::ffff:100.64.0.9", Some("::ffff:10.0.0.1"), false),
            ("fd7a:115c:a1e0::5", Some("2001:db8::1"), false),
            ("fd7a:115c:a1e0::5", Some("::1"), false),
            // ChromeOS's VM range is not Tailscale's, on either end.
            ("100.101.102.103", Some("100.115.92.1"), false),
            ("100.115.92.9", Some("100.64.0.1"), false),
            // Local address unknown: no trust by a Tailscale address.
            ("100.101.102.103", None, false),
            // Neither end decides anything else: loopback, others.
            ("127.0.0.1", None, true),
            ("::1", Some("::1"), true),
            ("192.168.1.5", Some("100.64.0.1"), false),
            ("203.0.113.9", Some("fd7a:115c:a1e0::1"), false),
        ] {
            assert_eq!(allowed_on(&a, remote, local), ok, "{remote} on {local:?}");
        }
        // TS_ALLOW_DEBUG_IP and TS_DEBUG_TRUSTED_CIDRS take a CGNAT address on any local one.
        let t = Access::parse("100.70.0.9", "100.80.0.0/16", "").unwrap();
        for remote in ["100.70.0.9", "100.80.3.4"] {
            assert!(allowed_on(&t, remote, Some("192.168.1.1")), "{remote}");
            assert!(allowed_on(&t, remote, None), "{remote}");
        }
        assert!(!allowed_on(&t, "100.70.0.10", Some("192.168.1.1")));
    }

    #[test]
    fn debug_access_forwarded_is_denied() {
        let a = Access::parse("10.1.1.1", "", "").unwrap();
        for ip in ["127.0.0.1", "100.64.0.1", "10.1.1.1"] {
            let local = Some("100.100.1.1".parse().unwrap());
            assert!(!a.allows(&req("GET", "/debug/", true), ip.parse().unwrap(), local));
        }
        let (r, _) = http::parse_head(
            b"GET /debug/varz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(r.forwarded);
        let (r, _) = http::parse_head(b"GET /debug/varz HTTP/1.1\r\nX-Forwarded-For:\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.forwarded, "an empty header is no header, as in Go");
    }

    #[test]
    fn debug_access_allow_ip_and_trusted_cidrs() {
        let a = Access::parse(
            " 192.0.2.7 ",
            "10.0.0.0/8, 2001:db8::/32,,192.168.1.5/32",
            "",
        )
        .unwrap();
        for (ip, ok) in [
            ("192.0.2.7", true),
            ("::ffff:192.0.2.7", true),
            ("192.0.2.8", false),
            ("10.255.1.2", true),
            ("::ffff:10.0.0.1", true),
            ("11.0.0.1", false),
            ("2001:db8:1::1", true),
            ("2001:db9::1", false),
            ("192.168.1.5", true),
            ("192.168.1.6", false),
        ] {
            assert_eq!(allowed(&a, ip), ok, "{ip}");
        }
        let all = Access::parse("", "0.0.0.0/0", "").unwrap();
        assert!(allowed(&all, "203.0.113.1") && !allowed(&all, "2001:db8::1"));
        let v6 = Access::parse("2001:db8::5", "::/0", "").unwrap();
        assert!(allowed(&v6, "2001:db8::1"));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/08",
            "10.0.0.0/",
            "x/8",
            "fe80::1%eth0/64",
            "::/129",
        ] {
            assert!(Access::parse("", bad, "").is_err(), "{bad}");
        }
        assert!(Access::parse("not-an-ip", "", "")
            .unwrap()
            .allow_ip
            .is_none());
    }

    #[test]
    fn debug_access_with_key() {
        let dir = std::env::temp_dir().join(format!("derpd-debugkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, " s3cret+x \n").unwrap();
        let a = Access::parse("", "", path.to_str().unwrap()).unwrap();
        let public: IpAddr = "203.0.113.9".parse().unwrap();
        let ok = |method: &str, target: &str, fwd: bool| {
            a.allows(&req(method, target, fwd), public, None)
        };
        assert!(ok("GET", "/debug/varz?debugkey=s3cret%2Bx", true));
        assert!(ok(
            "GET",
            "/debug/?a=1&debugkey=s3cret%2bx&debugkey=no",
            false
        ));
        assert!(
            !ok("GET", "/debug/varz?debugkey=s3cret+x", false),
            "+ is a space"
        );
        assert!(!ok("GET", "/debug/varz?debugkey=s3cre", false));
        assert!(!ok("GET", "/debug/varz?debugkey=", false));
        assert!(!ok("GET", "/debug/varz", false));
        assert!(
            !ok("HEAD", "/debug/varz?debugkey=s3cret%2Bx", false),
            "GET only"
        );
        // No key file configured: the parameter means nothing.
        assert!(!Access::default().allows(
            &req("GET", "/debug/?debugkey=s3cret%2Bx", false),
            public,
            None
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_query_decoding() {
        assert_eq!(query_value("/x?k=a%20b+c", "k").unwrap(), b"a b c");
        assert_eq!(query_value("/x?k=%zz&k=2", "k").unwrap(), b"2");
        assert_eq!(query_value("/x?k=1;j=2&k=3", "k").unwrap(), b"3");
        assert_eq!(query_value("/x?%6B=4", "k").unwrap(), b"4");
        assert_eq!(query_value("/x?k", "k").unwrap(), b"");
        assert!(query_value("/x", "k").is_none() && query_value("/x?k=%4", "k").is_none());
    }

    #[test]
    fn debug_proc_numbers() {
        assert_eq!(leading_number(b"\t  1234 kB"), Some(1234));
        assert_eq!(leading_number(b"kB"), None);
        assert_eq!(leading_number(b"99999999999999999999999"), Some(u64::MAX));
        #[cfg(target_os = "linux")]
        assert!(rss_bytes() > 0);
    }

    #[test]
    fn debug_go_duration() {
        assert_eq!(go_duration(Duration::from_millis(400)), "0s");
        assert_eq!(go_duration(Duration::from_secs(54)), "54s");
        assert_eq!(go_duration(Duration::from_secs(184)), "3m4s");
        assert_eq!(go_duration(Duration::from_secs(7205)), "2h0m5s");
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
