//! `/debug/`: the pages derper serves there that derpd implements (the index, `varz`, `check`)
//! and derpd's own `derpmap` (this node's DERPMap entry as JSON, for the LuCI page). Who may see
//! them is [`access`]'s; the `varz` metrics table is [`varz`]'s.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod access;
mod varz;

use access::Access;
use varz::{render, rss_bytes, Scrape};

use super::State;
use crate::config::Config;
use crate::derpmap::Node;
use crate::http::{self, Request};

/// Browser headers of derper's debug sub-pages: its usual ones, with inline styles allowed.
const DEBUG_HEADERS: &str = "Strict-Transport-Security: max-age=63072000; includeSubDomains\r\n\
Content-Security-Policy: default-src 'self'; frame-ancestors 'none'; form-action 'self'; \
base-uri 'self'; block-all-mixed-content; object-src 'none'; style-src 'self' 'unsafe-inline'\r\n\
X-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\n";
const TEXT: &str = "Content-Type: text/plain; charset=utf-8\r\n";
pub(super) const VERSION: &str = env!("CARGO_PKG_VERSION");

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

/// The decimal number at the start of `b` (after blanks), saturating; `None` without digits.
pub(super) fn leading_number(b: &[u8]) -> Option<u64> {
    let b = b.trim_ascii_start();
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let v = b[..n].iter().fold(0u64, |v, &d| {
        v.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    (n > 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_go_duration() {
        assert_eq!(go_duration(Duration::from_millis(400)), "0s");
        assert_eq!(go_duration(Duration::from_secs(54)), "54s");
        assert_eq!(go_duration(Duration::from_secs(184)), "3m4s");
        assert_eq!(go_duration(Duration::from_secs(7205)), "2h0m5s");
    }
}
