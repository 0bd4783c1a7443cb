//! The command line: derper's flag names and defaults (Go-style `-flag=value` accepted), turned
//! once into a validated [`Config`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

mod args;

pub use args::{normalize_args, parse_go_duration, Args};

use crate::acme::client::ChallengeKind;
use crate::http::Home;
use crate::httpc::split_host_port;
use crate::key::{parse_hex32, NodePrivate};

/// derper's default hostname.
pub const DEFAULT_HOSTNAME: &str = "derp.tailscale.com";
/// Where `--dev` listens unless `-a` is given (derper: `:3340` on every interface; we keep dev
/// mode on loopback).
pub const DEV_ADDR: &str = "127.0.0.1:3340";
/// Default STUN port.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// derper's key file for root when `-c` is not given.
pub const ROOT_KEY_PATH: &str = "/var/lib/derper/derper.key";
/// Default `--max-clients`. An idle TLS client costs tens of KiB (README, "Memory"): 2048 of
/// them fit a router with 128 MB of RAM.
pub const DEFAULT_MAX_CLIENTS: usize = 2048;
/// Default `--max-handshakes`: connections not yet logged in, at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default `--first-byte-timeout`: a client sends its TLS ClientHello or request head at once;
/// a connection silent this long is an idle socket holding a handshake slot.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often `--certmode manual` files are checked for a renewal (SIGHUP reloads at once).
pub const CERT_POLL: Duration = Duration::from_secs(30);
/// tailscaled's LocalAPI socket on Linux (derper's default for `--verify-clients`).
pub const DEFAULT_TAILSCALED_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";

/// Where the server's key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A fresh key per start (`--dev`).
    Ephemeral,
    /// A key given directly (tests).
    Given(NodePrivate),
    /// derper's JSON key file, created when missing.
    File(PathBuf),
}

/// `--tls-ciphers`: which cipher suite derpd picks when a client offers several
/// (`tls::ciphers` decides `Auto` for the CPU and builds the order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsCiphers {
    /// What this CPU is fast at: AES-GCM where ring uses AES instructions (x86_64, aarch64
    /// with the AES extension), ChaCha20-Poly1305 elsewhere (MIPS, 32-bit ARM, a Raspberry Pi
    /// 3 or 4).
    #[default]
    Auto,
    /// AES-GCM first.
    Aes,
    /// ChaCha20-Poly1305 first.
    ChaCha,
    /// The client's own order (rustls's default; for experiments).
    Client,
}

impl TlsCiphers {
    /// Each choice and its name in `--tls-ciphers`.
    const NAMES: [(Self, &'static str); 4] = [
        (Self::Auto, "auto"),
        (Self::Aes, "aes"),
        (Self::ChaCha, "chacha"),
        (Self::Client, "client"),
    ];

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(_, name)| *name == s)
            .map(|(c, _)| *c)
            .ok_or_else(|| format!("--tls-ciphers {s:?}: want auto, aes, chacha or client"))
    }
}

impl std::fmt::Display for TlsCiphers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(c, _)| c == self)
            .map_or("", |(_, n)| n);
        f.write_str(name)
    }
}

/// TLS settings of the main listener.
#[derive(Debug, Clone)]
pub struct TlsMode {
    /// `--hostname`: SNI to require, or an IP (any SNI then).
    pub hostname: String,
    /// `--certdir`.
    pub certdir: PathBuf,
    /// `--certmode letsencrypt`: certificates from an ACME CA; `None` for `--certmode manual`
    /// (files in `certdir`, or a self-signed certificate for an IP).
    pub acme: Option<AcmeConfig>,
    /// `--tls-ciphers`.
    pub ciphers: TlsCiphers,
}

impl TlsMode {
    /// `--certmode manual` for `hostname`, certificates in `certdir`.
    pub fn manual(hostname: &str, certdir: PathBuf) -> Self {
        Self {
            hostname: hostname.to_string(),
            certdir,
            acme: None,
            ciphers: TlsCiphers::Auto,
        }
    }
}

/// How long the certificate keeper waits for the CA (`--certmode letsencrypt`). The defaults
/// are derper's; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcmeTiming {
    /// Between looks at the certificate's age (derper: hourly).
    pub check_every: Duration,
    /// The first wait after a failed order; it doubles up to `retry_max`.
    pub retry_first: Duration,
    /// The longest wait between failed orders.
    pub retry_max: Duration,
    /// The most one order may take, polls included.
    pub order_timeout: Duration,
}

impl Default for AcmeTiming {
    fn default() -> Self {
        Self {
            check_every: Duration::from_secs(60 * 60),
            retry_first: crate::acme::Backoff::FIRST,
            retry_max: crate::acme::Backoff::MAX,
            order_timeout: Duration::from_secs(5 * 60),
        }
    }
}

/// `--certmode letsencrypt`: where certificates come from.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// `--acme-directory`.
    pub directory: String,
    /// `--acme-ca-file`: roots for the CA's TLS certificate; `None` = the system's.
    pub ca_file: Option<PathBuf>,
    /// `--acme-email`.
    pub email: Option<String>,
    /// `--acme-ip-certs`: the hostname is the public IP; profile `shortlived`.
    pub ip_certs: bool,
    /// With `ip_certs`, the public addresses from `--hostname`: one, or an IPv4 and an IPv6
    /// (the first is [`TlsMode::hostname`]); one certificate covers them all.
    pub ips: Vec<IpAddr>,
    /// The challenges to answer, the preferred first: TLS-ALPN-01 when clients dial port 443,
    /// HTTP-01 when there is a port-80 listener.
    pub challenges: Vec<ChallengeKind>,
    /// Check and retry intervals.
    pub timing: AcmeTiming,
}

/// Deadlines and TCP socket options, as configured (`--*-timeout`, `--tcp-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `--first-byte-timeout`: a new connection's first byte.
    pub first_byte: Duration,
    /// `--handshake-timeout`: the TLS handshake plus the request head (slowloris guard).
    pub handshake: Duration,
    /// `--login-timeout`: from the upgrade to a complete ClientInfo.
    pub login: Duration,
    /// `--frame-timeout`: a packet's body once its pool buffer is taken.
    pub frame: Duration,
    /// `--tcp-write-timeout`: per write batch; `None` = no deadline.
    pub write: Option<Duration>,
    /// `--tcp-keepalive-time`: TCP keepalive idle time; `None` = off.
    pub tcp_keepalive: Option<Duration>,
    /// `--tcp-user-timeout`: TCP_USER_TIMEOUT; `None` = the kernel's.
    pub tcp_user: Option<Duration>,
}

/// Sizes and counts, as configured (`--max-*`, `--buffer-budget-mib`, `--accept-connection-*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// `--max-clients`: most logged-in DERP connections.
    pub max_clients: usize,
    /// `--max-handshakes`: most connections not yet logged in.
    pub max_handshakes: usize,
    /// `--max-handshakes-per-ip`: most of those from one address (IPv6: one /64).
    pub max_handshakes_per_ip: usize,
    /// `--buffer-budget-mib`, in bytes: the packet pool's budget.
    pub buffer_budget: usize,
    /// `--accept-connection-limit` and `-burst`: (connections per second, burst); `None` =
    /// unlimited.
    pub accept: Option<(f64, u64)>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Main listener address.
    pub listen: SocketAddr,
    /// TLS for the main listener, or plain HTTP.
    pub tls: Option<TlsMode>,
    /// Port-80 listener in TLS mode.
    pub http_port: Option<u16>,
    /// `--public-port`: the port clients dial, when a firewall forwards it to `listen`.
    pub public_port: Option<u16>,
    /// STUN port, if STUN runs (0 = any free port).
    pub stun_port: Option<u16>,
    /// Serve `/derp`.
    pub derp: bool,
    /// The home page.
    pub home: Home,
    /// The server key.
    pub key: KeySource,
    /// Append the meta-cert.
    pub meta_cert: bool,
    /// Deadlines and TCP socket options.
    pub timeouts: Timeouts,
    /// Sizes and counts: clients, connections logging in, the packet buffer budget, accepts.
    pub limits: Limits,
    /// Executor threads.
    pub threads: usize,
    /// The region's mesh key.
    pub mesh_key: Option<[u8; 32]>,
    /// Mesh peers to dial.
    pub mesh_with: Vec<MeshPeer>,
    /// Who may log in (mesh peers are always admitted).
    pub admission: AdmissionConfig,
    /// `--rate-config` file.
    pub rate_config: Option<PathBuf>,
    /// How often the certificate files are checked for changes.
    pub cert_poll: Duration,
}

impl Config {
    /// A plain-HTTP loopback server with an ephemeral key on free ports (tests).
    pub fn dev_loopback() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            http_port: None,
            public_port: None,
            stun_port: Some(0),
            derp: true,
            home: Home::Default,
            key: KeySource::Ephemeral,
            timeouts: Timeouts {
                first_byte: DEFAULT_FIRST_BYTE_TIMEOUT,
                handshake: Duration::from_secs(10),
                login: Duration::from_secs(10),
                frame: Duration::from_secs(10),
                write: Some(Duration::from_secs(2)),
                tcp_keepalive: Some(Duration::from_secs(600)),
                tcp_user: Some(Duration::from_secs(15)),
            },
            meta_cert: true,
            limits: Limits {
                max_clients: DEFAULT_MAX_CLIENTS,
                max_handshakes: DEFAULT_MAX_HANDSHAKES,
                max_handshakes_per_ip: crate::limits::DEFAULT_MAX_HANDSHAKES_PER_IP,
                buffer_budget: crate::pool::DEFAULT_BUDGET_MIB << 20,
                accept: None,
            },
            threads: 2,
            mesh_key: None,
            mesh_with: Vec::new(),
            admission: AdmissionConfig::default(),
            rate_config: None,
            cert_poll: CERT_POLL,
        }
    }

    /// Validates the flags. Errors are one-line messages for the admin.
    pub fn from_args(a: &Args) -> Result<Self, String> {
        let addr_text = if a.dev && a.addr == ":443" {
            DEV_ADDR
        } else {
            a.addr.as_str()
        };
        let listen = parse_listen(addr_text)?;
        let tls = tls_mode(a, listen.port())?;
        let http_port = match a.http_port {
            -1 => None,
            p => Some(u16::try_from(p).map_err(|_| format!("invalid --http-port {p}"))?),
        };
        let stun_port = if a.stun {
            Some(
                u16::try_from(a.stun_port)
                    .map_err(|_| format!("invalid --stun-port {}", a.stun_port))?,
            )
        } else {
            None
        };
        let key = if a.dev {
            KeySource::Ephemeral
        } else if !a.config.is_empty() {
            KeySource::File(PathBuf::from(&a.config))
        } else if rustix::process::geteuid().is_root() {
            KeySource::File(PathBuf::from(ROOT_KEY_PATH))
        } else {
            return Err(
                "-c <key file path> not specified (derper's rule for non-root users)".into(),
            );
        };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        let threads = if a.threads == 0 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4)
        } else {
            a.threads
        };
        // At most 1 TiB, and what fits the address space: 2047 MiB on 32-bit routers.
        let max_mib = (1 << 20).min(isize::MAX.unsigned_abs() >> 20);
        if a.buffer_budget_mib == 0 || a.buffer_budget_mib > max_mib {
            return Err(format!(
                "invalid --buffer-budget-mib {}: must be 1 to {max_mib} on this system",
                a.buffer_budget_mib
            ));
        }
        let mesh_key = load_mesh_key(a)?;
        let mesh_with = MeshPeer::parse_list(&a.mesh_with)?;
        if !mesh_with.is_empty() && mesh_key.is_none() {
            return Err("--mesh-with requires --mesh-psk-file".into());
        }
        Ok(Self {
            listen,
            tls,
            http_port,
            public_port: (a.public_port != 0).then_some(a.public_port),
            stun_port,
            derp: a.derp,
            home: Home::parse(&a.home)?,
            key,
            timeouts: Timeouts {
                first_byte: deadline("--first-byte-timeout", &a.first_byte_timeout)?,
                handshake: deadline("--handshake-timeout", &a.handshake_timeout)?,
                login: deadline("--login-timeout", &a.login_timeout)?,
                frame: deadline("--frame-timeout", &a.frame_timeout)?,
                write: nonzero(parse_go_duration(&a.tcp_write_timeout)?),
                tcp_keepalive: nonzero(parse_go_duration(&a.tcp_keepalive_time)?),
                tcp_user: nonzero(parse_go_duration(&a.tcp_user_timeout)?),
            },
            meta_cert: a.meta_cert,
            limits: Limits {
                max_clients: positive("--max-clients", a.max_clients)?,
                max_handshakes: positive("--max-handshakes", a.max_handshakes)?,
                max_handshakes_per_ip: positive(
                    "--max-handshakes-per-ip",
                    a.max_handshakes_per_ip,
                )?,
                buffer_budget: a.buffer_budget_mib << 20,
                accept: accept_limit(a.accept_connection_limit, a.accept_connection_burst)?,
            },
            threads,
            mesh_key,
            mesh_with,
            admission: AdmissionConfig {
                tailscaled_socket: a.verify_clients.then(|| {
                    PathBuf::from(non_empty(&a.socket).unwrap_or(DEFAULT_TAILSCALED_SOCKET))
                }),
                url: non_empty(&a.verify_client_url).map(str::to_string),
                fail_open: a.verify_client_url_fail_open,
                allow_keys_file: non_empty(&a.allow_keys_file).map(PathBuf::from),
            },
            rate_config: non_empty(&a.rate_config).map(PathBuf::from),
            cert_poll: CERT_POLL,
        })
    }
}

/// The main listener's TLS, derper's rule: TLS on port 443 or with `--certmode manual`; also
/// with `--acme-ip-certs` and when clients dial 443 (`--public-port`), where plain HTTP could
/// only be a mistake. `None`: plain HTTP.
fn tls_mode(a: &Args, port: u16) -> Result<Option<TlsMode>, String> {
    let manual = match a.certmode.as_str() {
        "manual" => true,
        "letsencrypt" => false,
        "gcp" => return Err("--certmode gcp is not supported (use letsencrypt or manual)".into()),
        other => {
            return Err(format!(
                "unknown --certmode {other:?} (supported: letsencrypt, manual)"
            ))
        }
    };
    if a.acme_ip_certs && manual {
        return Err("--acme-ip-certs requires --certmode=letsencrypt".into());
    }
    let tls_wanted = manual || port == 443 || a.public_port == 443 || a.acme_ip_certs;
    if !tls_wanted {
        return Ok(None);
    }
    let certdir = match non_empty(&a.certdir) {
        Some(d) => PathBuf::from(d),
        None => default_certdir(),
    };
    let ciphers = TlsCiphers::parse(&a.tls_ciphers)?;
    if manual {
        if a.hostname.is_empty() {
            return Err("--certmode manual needs --hostname".into());
        }
        return Ok(Some(TlsMode {
            ciphers,
            ..TlsMode::manual(&a.hostname, certdir)
        }));
    }
    // --acme-ip-certs: one public address, or an IPv4 and an IPv6 one, comma-separated.
    let ips = if a.acme_ip_certs {
        public_ips(&a.hostname)?
    } else {
        Vec::new()
    };
    let hostname = match ips.first() {
        Some(ip) => ip.to_string(),
        None => a.hostname.clone(),
    };
    let is_ip = crate::acme::host_ip(&hostname).is_some();
    if a.hostname.is_empty() || a.hostname == DEFAULT_HOSTNAME {
        return Err(format!(
            "TLS on port {port} with --certmode letsencrypt needs --hostname: the DNS name \
             clients dial (or, with --acme-ip-certs, the public IP address); or use --certmode \
             manual with certificate files in --certdir (an IP --hostname gets a self-signed \
             certificate), or listen on another port with -a for plain HTTP"
        ));
    }
    if is_ip && !a.acme_ip_certs {
        return Err(format!(
            "--hostname {} is an IP address: --certmode letsencrypt needs --acme-ip-certs for \
             it (or --certmode manual, for a self-signed certificate)",
            a.hostname
        ));
    }
    // A CA validates TLS-ALPN-01 on port 443 and HTTP-01 on port 80, whatever the flags say:
    // what reaches those ports must be derpd.
    let public = if a.public_port != 0 {
        a.public_port
    } else {
        port
    };
    let mut challenges = Vec::new();
    if public == 443 {
        challenges.push(ChallengeKind::TlsAlpn01);
    }
    if a.http_port != -1 {
        challenges.push(ChallengeKind::Http01);
    }
    if challenges.is_empty() {
        return Err(format!(
            "--certmode letsencrypt: the CA can reach this relay neither on port 443 (clients \
             dial {public}) nor on port 80 (--http-port -1); give --http-port (port 80, \
             forwarded here) or serve on 443"
        ));
    }
    Ok(Some(TlsMode {
        hostname,
        certdir,
        acme: Some(AcmeConfig {
            directory: a.acme_directory.clone(),
            ca_file: non_empty(&a.acme_ca_file).map(PathBuf::from),
            email: non_empty(&a.acme_email).map(str::to_string),
            ip_certs: a.acme_ip_certs,
            ips,
            challenges,
            timing: AcmeTiming::default(),
        }),
        ciphers,
    }))
}

/// `--hostname` with `--acme-ip-certs`: the public address clients dial, or an IPv4 and an IPv6
/// address, comma-separated.
fn public_ips(hostname: &str) -> Result<Vec<IpAddr>, String> {
    let bad = || {
        format!(
            "--acme-ip-certs takes the address from --hostname: give the public IP address \
             clients dial (or an IPv4 and an IPv6 address, comma-separated), not {hostname:?}"
        )
    };
    let ips = hostname
        .split(',')
        .map(|h| crate::acme::host_ip(h.trim()).map(|ip| ip.to_canonical()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    if ips.is_empty() || v4 > 1 || ips.len() - v4 > 1 {
        return Err(bad());
    }
    Ok(ips)
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn positive(flag: &str, n: usize) -> Result<usize, String> {
    if n == 0 {
        return Err(format!("{flag} must be at least 1"));
    }
    Ok(n)
}

/// A deadline flag: a Go duration that is not zero.
fn deadline(flag: &str, s: &str) -> Result<Duration, String> {
    let d = parse_go_duration(s)?;
    if d.is_zero() {
        return Err(format!("{flag} must be more than 0"));
    }
    Ok(d)
}

/// `--accept-connection-limit`/`-burst`: `None` when unlimited (derper's defaults).
fn accept_limit(per_sec: f64, burst: u64) -> Result<Option<(f64, u64)>, String> {
    if per_sec.is_nan() || per_sec < 0.0 {
        return Err(format!("invalid --accept-connection-limit {per_sec}"));
    }
    if per_sec.is_infinite() {
        return Ok(None);
    }
    Ok(Some((per_sec, burst)))
}

/// derper's default mesh key files, the first that exists wins.
fn default_mesh_psk_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join("keys/derp-mesh.key"));
    [Some(PathBuf::from("/home/derp/keys/derp-mesh.key")), home]
        .into_iter()
        .flatten()
        .find(|p| p.exists())
}

/// The mesh key: `$TAILSCALE_DERPER_MESH_KEY` with `--dev`, else the key file.
fn load_mesh_key(a: &Args) -> Result<Option<[u8; 32]>, String> {
    let (text, from) = if a.dev {
        match std::env::var("TAILSCALE_DERPER_MESH_KEY") {
            Ok(v) if !v.is_empty() => (v, "$TAILSCALE_DERPER_MESH_KEY".to_string()),
            _ => return Ok(None),
        }
    } else {
        let path = match &a.mesh_psk_file {
            Some(p) if p.is_empty() => return Ok(None),
            Some(p) => PathBuf::from(p),
            None => match default_mesh_psk_file() {
                Some(p) => p,
                None => return Ok(None),
            },
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read mesh key file {}: {e}", path.display()))?;
        (text, path.display().to_string())
    };
    parse_mesh_key(&text)
        .map(Some)
        .map_err(|e| format!("mesh key from {from}: {e}"))
}

/// derper's `ParseDERPMesh`: 64 hex digits, surrounding whitespace ignored. All zeros is refused
/// (derper would accept it and then never recognise a peer).
pub fn parse_mesh_key(text: &str) -> Result<[u8; 32], String> {
    let k = parse_hex32(text.trim()).ok_or_else(|| "must be 64 hexadecimal digits".to_string())?;
    if k == [0; 32] {
        return Err("must not be all zeros".into());
    }
    Ok(k)
}

/// Parses Go's listen syntax: `:443` (every interface), `1.2.3.4:443`, `[::1]:443`,
/// `localhost:3340`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let bad = || format!("invalid listen address {s:?} (use e.g. :443 or 127.0.0.1:3340)");
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        // Dual-stack: IPv4 clients arrive as v4-mapped addresses (falls back to 0.0.0.0).
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

fn default_certdir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("tailscale/derper-certs")
}

/// The admission flags.
#[derive(Debug, Clone, Default)]
pub struct AdmissionConfig {
    /// `--verify-clients`: tailscaled's LocalAPI socket to ask.
    pub tailscaled_socket: Option<PathBuf>,
    /// `--verify-client-url`.
    pub url: Option<String>,
    /// `--verify-client-url-fail-open`.
    pub fail_open: bool,
    /// `--allow-keys-file`.
    pub allow_keys_file: Option<PathBuf>,
}

/// One `--mesh-with` entry: `host[/dialhost][/sha256-raw:<64 hex>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    /// As given: the URL host (`https://<host>/derp`), with its port if any.
    pub host: String,
    /// TLS server name / IP: `host` without port or brackets.
    pub name: String,
    /// Where to connect: `dialhost` (default `name`).
    pub dial_host: String,
    /// Port from `host`, default 443.
    pub port: u16,
    /// Pinned SHA-256 of the peer's leaf certificate.
    pub pin: Option<[u8; 32]>,
}

impl MeshPeer {
    /// Parses the comma-separated `--mesh-with` value.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(Self::parse)
            .collect()
    }

    /// Parses one entry.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid --mesh-with entry {entry:?}: {why}");
        let mut pin = None;
        let mut parts = Vec::new();
        for p in entry.split('/') {
            if let Some(h) = p.strip_prefix("sha256-raw:") {
                if pin.is_some() {
                    return Err(bad("more than one sha256-raw pin"));
                }
                pin = Some(parse_hex32(h).ok_or_else(|| bad("the pin must be 64 hex digits"))?);
            } else {
                parts.push(p);
            }
        }
        let (host, dial) = match parts.as_slice() {
            [h] => (*h, None),
            [h, d] => (*h, Some(*d)),
            _ => return Err(bad("want host[/dialhost][/sha256-raw:<hex>]")),
        };
        let (name, port) = mesh_host_port(host).ok_or_else(|| bad("bad host or port"))?;
        let dial_host = match dial {
            None => name.clone(),
            Some(d) => {
                let d = d.trim_start_matches('[').trim_end_matches(']');
                if d.is_empty() || (d.contains(':') && d.parse::<IpAddr>().is_err()) {
                    return Err(bad("the dial host takes no port (the host's port is used)"));
                }
                d.to_string()
            }
        };
        Ok(Self {
            host: host.to_string(),
            name,
            dial_host,
            port,
            pin,
        })
    }
}

/// `name`, `name:port`, `1.2.3.4:port`, `[v6]`, `[v6]:port` → (name, port or 443): the
/// split is [`split_host_port`]'s; the name must not be empty or hold white space, a bracketed
/// one must be an IPv6 address, and a port must be 1 to 65535.
fn mesh_host_port(h: &str) -> Option<(String, u16)> {
    let (name, port) = split_host_port(h).ok()?;
    if h.starts_with('[') {
        name.parse::<Ipv6Addr>().ok()?;
    }
    if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
        return None;
    }
    let port = match port {
        None => 443,
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
    };
    Some((name.to_string(), port))
}

#[cfg(test)]
mod tests;
