//! The command line as derper takes it: its flag names and defaults ([`Args`]), Go-style
//! spellings (`-flag=value`, a bare boolean flag) normalised for argh, and Go durations.
//!
//! The doc comments of [`Args`] are the `--help` text, written for a terminal, not rustdoc.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::time::Duration;

use argh::FromArgs;

use super::{DEFAULT_HOSTNAME, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_HANDSHAKES};

/// derpd: a small DERP relay and STUN server for Tailscale, a drop-in for derper. Flags take
/// derper's names; `-flag=value`, `--flag=value` and `-flag value` all work, and boolean flags
/// take `=true`/`=false`.
#[derive(FromArgs, Debug)]
pub struct Args {
    /// listen address; TLS if the port is 443, --public-port is 443, --certmode manual or
    /// --acme-ip-certs (default ":443")
    #[argh(option, short = 'a', default = "String::from(\":443\")")]
    pub addr: String,
    /// plain-HTTP port in TLS mode (/generate_204, redirects to https); -1 disables (default 80)
    #[argh(option, default = "80")]
    pub http_port: i32,
    /// the TCP port clients dial when a firewall redirect forwards it to -a's port (OpenWrt's
    /// init script: 443 to 3443); the derpMap printed for an IP --hostname gives it as DERPPort;
    /// 0 = -a's port (default 0)
    #[argh(option, default = "0")]
    pub public_port: u16,
    /// run the STUN server (default true)
    #[argh(option, default = "true")]
    pub stun: bool,
    /// UDP port of the STUN server; 0 picks a free port (default 3478)
    #[argh(option, default = "3478")]
    pub stun_port: i32,
    /// JSON key file {"PrivateKey":"privkey:<hex>"}, created 0600 if missing
    /// (default /var/lib/derper/derper.key for root)
    #[argh(option, short = 'c', default = "String::new()")]
    pub config: String,
    /// certificate mode: letsencrypt (an ACME CA, Let's Encrypt unless --acme-directory;
    /// TLS-ALPN-01 on the TLS port, HTTP-01 on --http-port) or manual (files in --certdir)
    /// (default letsencrypt)
    #[argh(option, default = "String::from(\"letsencrypt\")")]
    pub certmode: String,
    /// directory of the certificates: <hostname>.crt and <hostname>.key (manual), the ACME
    /// account key and the certificates it got (letsencrypt)
    /// (default $XDG_CACHE_HOME or ~/.cache, then tailscale/derper-certs)
    #[argh(option, default = "String::new()")]
    pub certdir: String,
    /// TLS hostname; an IP address gets a self-signed certificate with --certmode manual, and a
    /// short-lived certificate from the CA with --acme-ip-certs
    #[argh(option, default = "String::from(DEFAULT_HOSTNAME)")]
    pub hostname: String,
    /// letsencrypt mode: certificates for the IP address in --hostname (the public one, also
    /// behind a port forward), profile "shortlived" (default false)
    #[argh(option, default = "false")]
    pub acme_ip_certs: bool,
    /// derpd only: the TLS cipher suite picked when a client offers several: auto (what this
    /// CPU is fast at: AES-GCM with AES instructions, ChaCha20-Poly1305 without, as on MIPS and
    /// 32-bit ARM), aes, chacha, or client (the client's own order) (default auto)
    #[argh(option, default = "String::from(\"auto\")")]
    pub tls_ciphers: String,
    /// ACME directory URL (default Let's Encrypt's production directory)
    #[argh(option, default = "String::from(crate::acme::LETS_ENCRYPT)")]
    pub acme_directory: String,
    /// PEM file of the CA certificates to trust for the ACME server (default the system's)
    #[argh(option, default = "String::new()")]
    pub acme_ca_file: String,
    /// contact email for the ACME account
    #[argh(option, default = "String::new()")]
    pub acme_email: String,
    /// home page: "" (default page), "blank", or an http(s) URL to redirect to
    #[argh(option, default = "String::new()")]
    pub home: String,
    /// serve DERP on /derp (default true)
    #[argh(option, default = "true")]
    pub derp: bool,
    /// development mode: plain HTTP on 127.0.0.1:3340 (unless -a), ephemeral key
    #[argh(option, default = "false")]
    pub dev: bool,
    /// deadline for each write batch to a client, Go duration; 0 = none (default 2s)
    #[argh(option, default = "String::from(\"2s\")")]
    pub tcp_write_timeout: String,
    /// TCP keepalive idle time, Go duration; 0 = off (default 10m)
    #[argh(option, default = "String::from(\"10m\")")]
    pub tcp_keepalive_time: String,
    /// TCP_USER_TIMEOUT, Go duration; 0 = kernel default (default 15s)
    #[argh(option, default = "String::from(\"15s\")")]
    pub tcp_user_timeout: String,
    /// print the version and exit
    #[argh(option, default = "false")]
    pub version: bool,
    /// append the meta-certificate (DERP key, fast start) to the TLS chain (default true)
    #[argh(option, default = "true")]
    pub meta_cert: bool,
    /// memory for packet buffers in MiB; readers wait when it is used up (default 16)
    #[argh(option, default = "crate::pool::DEFAULT_BUDGET_MIB")]
    pub buffer_budget_mib: usize,
    /// worker threads; 0 = one per CPU, at most 4 (default 0)
    #[argh(option, default = "0")]
    pub threads: usize,
    /// file with the region's mesh key (64 hex digits); default /home/derp/keys/derp-mesh.key
    /// or ~/keys/derp-mesh.key if present; --dev reads $TAILSCALE_DERPER_MESH_KEY instead
    #[argh(option)]
    pub mesh_psk_file: Option<String>,
    /// mesh with the other nodes of the region: comma-separated host[/dialhost][/sha256-raw:HEX]
    /// (HEX pins the peer's certificate; otherwise SSL_CERT_FILE or the system CAs)
    #[argh(option, default = "String::new()")]
    pub mesh_with: String,
    /// verify clients with the local tailscaled: LocalAPI whois over its unix socket (default
    /// false)
    #[argh(option, default = "false")]
    pub verify_clients: bool,
    /// tailscaled's LocalAPI socket for --verify-clients
    /// (default /var/run/tailscale/tailscaled.sock)
    #[argh(option, default = "String::new()")]
    pub socket: String,
    /// admission controller: POST {"NodePublic","Source"} to this URL, expect {"Allow":true}
    #[argh(option, default = "String::new()")]
    pub verify_client_url: String,
    /// allow clients when the admission controller is unreachable (default true)
    #[argh(option, default = "true")]
    pub verify_client_url_fail_open: bool,
    /// file of allowed node keys, one nodekey:<hex> per line, # comments; reloaded on SIGHUP
    /// and when it changes
    #[argh(option, default = "String::new()")]
    pub allow_keys_file: String,
    /// new connections per second on the main listener; the excess is closed (default inf)
    #[argh(option, default = "f64::INFINITY")]
    pub accept_connection_limit: f64,
    /// burst for --accept-connection-limit (default unlimited)
    #[argh(option, default = "u64::MAX")]
    pub accept_connection_burst: u64,
    /// most logged-in DERP connections; more are refused at login (default 2048)
    #[argh(option, default = "DEFAULT_MAX_CLIENTS")]
    pub max_clients: usize,
    /// most connections not yet logged in (TLS handshake, request head, login); when all are
    /// taken, a new one evicts the one that has come least far, oldest first (default 256)
    #[argh(option, default = "DEFAULT_MAX_HANDSHAKES")]
    pub max_handshakes: usize,
    /// most connections not yet logged in from one address (IPv6: one /64); more from it are
    /// closed at accept (default 16)
    #[argh(option, default = "crate::limits::DEFAULT_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: usize,
    /// per-client receive rate limit, derper's JSON {"PerClientRateLimitBytesPerSec":N,
    /// "PerClientRateBurstBytes":M}; reloaded on SIGHUP
    #[argh(option, default = "String::new()")]
    pub rate_config: String,
    /// deadline for a new connection's first byte, Go duration (default 3s)
    #[argh(option, default = "String::from(\"3s\")")]
    pub first_byte_timeout: String,
    /// deadline for the TLS handshake plus the HTTP request head, Go duration (default 10s)
    #[argh(option, default = "String::from(\"10s\")")]
    pub handshake_timeout: String,
    /// deadline from the DERP upgrade to a complete login, Go duration (default 10s)
    #[argh(option, default = "String::from(\"10s\")")]
    pub login_timeout: String,
    /// deadline for the rest of a packet once its header has arrived and a buffer was taken,
    /// Go duration (default 10s)
    #[argh(option, default = "String::from(\"10s\")")]
    pub frame_timeout: String,
    /// log level: error, warn, info, debug, trace; RUST_LOG overrides (default info)
    #[argh(option, default = "String::from(\"info\")")]
    pub log_level: String,
}

/// Flags that are booleans: Go lets them stand alone (`-dev`) or take `=value`.
const BOOL_FLAGS: &[&str] = &[
    "stun",
    "derp",
    "dev",
    "version",
    "meta-cert",
    "acme-ip-certs",
    "verify-clients",
    "verify-client-url-fail-open",
];

/// Rewrites Go-style arguments into the form argh parses: `-flag` → `--flag`, `=value` split
/// off, and boolean flags given an explicit value. Single-letter flags (`-a`, `-c`) keep one
/// dash.
pub fn normalize_args(args: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(args.len() + 4);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            out.push(arg.clone());
            out.extend(iter.by_ref().cloned());
            break;
        }
        let Some(body) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            out.push(arg.clone());
            continue;
        };
        if body.is_empty() || body.starts_with(|c: char| c.is_ascii_digit()) {
            out.push(arg.clone());
            continue;
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let name = name.replace('_', "-");
        let flag = if name.len() == 1 {
            format!("-{name}")
        } else {
            format!("--{name}")
        };
        if BOOL_FLAGS.contains(&name.as_str()) {
            let v = match value {
                None => "true".to_string(),
                Some(v) => go_bool(v)
                    .ok_or_else(|| format!("invalid boolean value {v:?} for -{name}"))?
                    .to_string(),
            };
            out.push(flag);
            out.push(v);
        } else {
            out.push(flag);
            if let Some(v) = value {
                out.push(v.to_string());
            }
        }
    }
    Ok(out)
}

fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Parses a Go duration: `2s`, `10m`, `1h30m`, `250ms`, `1.5s`, `0`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (use e.g. 2s, 10m, 1h30m)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn args(v: &[&str]) -> Result<Args, String> {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        let n = normalize_args(&v)?;
        let refs: Vec<&str> = n.iter().map(String::as_str).collect();
        Args::from_args(&["derpd"], &refs).map_err(|e| e.output)
    }

    #[test]
    fn go_style_flags() {
        let a = args(&[
            "-a=:8443",
            "-stun=false",
            "-dev",
            "--http-port",
            "-1",
            "-hostname",
            "h",
            "--meta-cert=0",
        ])
        .unwrap();
        assert_eq!(a.addr, ":8443");
        assert!(!a.stun && a.dev && !a.meta_cert);
        assert_eq!(a.http_port, -1);
        assert_eq!(a.hostname, "h");
        let b = args(&["-c", "/tmp/k", "--certmode=manual", "-http_port=8080"]).unwrap();
        assert_eq!(b.config, "/tmp/k");
        assert_eq!(b.certmode, "manual");
        assert_eq!(b.http_port, 8080);
        assert!(args(&["-stun=maybe"]).is_err());
        assert!(args(&["--nope"]).is_err());
        let d = args(&[]).unwrap();
        assert_eq!(
            (d.addr.as_str(), d.http_port, d.stun, d.stun_port),
            (":443", 80, true, 3478)
        );
        assert!(d.derp && !d.dev && d.meta_cert);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_go_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_go_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "s", "1x", "-1s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}
