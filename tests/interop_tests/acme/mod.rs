//! derpd and Let's Encrypt's test CA, Pebble, on loopback: the ACME client alone
//! (`client.rs`: HTTP-01, TLS-ALPN-01, `badNonce`, problem documents) and derpd with
//! `--certmode letsencrypt` (`server.rs`). Each test runs its own Pebble on free ports
//! (`scripts/ensure-pebble.sh` installs it) and checks what it gets against Pebble's root
//! (`/roots/0` on the management port).
//!
//! Hermetic: Pebble resolves names through the test's own DNS responder on loopback (or, for IP
//! identifiers, a closed loopback port); everything it dials is 127.0.0.1.
//! Without Go the tests print `SKIPPED` and pass, except under `CI=true`, where they fail.

use crate::support;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

mod client;
mod dns;
mod server;

// ---------------------------------------------------------------------------------------------
// Pebble

/// A SKIPPED line, or a failure under CI.
pub(super) fn skip_pebble(reason: &str) {
    support::skip_test(reason, "the Pebble tests");
}

/// Pebble's binary and its test certificates, once per test process; `None`: skip.
pub(super) fn pebble_install() -> Option<&'static (PathBuf, PathBuf)> {
    static INSTALL: std::sync::OnceLock<Option<(PathBuf, PathBuf)>> = std::sync::OnceLock::new();
    INSTALL
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ensure-pebble.sh");
            let out = match Command::new(&script).stderr(Stdio::inherit()).output() {
                Ok(o) if o.status.success() => o,
                Ok(o) => {
                    skip_pebble(&format!("scripts/ensure-pebble.sh failed ({})", o.status));
                    return None;
                }
                Err(e) => {
                    skip_pebble(&format!("cannot run scripts/ensure-pebble.sh: {e}"));
                    return None;
                }
            };
            let bin = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
            let certs = bin.parent().unwrap().parent().unwrap().join("certs");
            Some((bin, certs))
        })
        .as_ref()
}

/// A running Pebble, killed on drop.
pub(super) struct Pebble {
    child: Child,
    pub(super) dir: PathBuf,
    listen: u16,
    /// The directory URL.
    pub(super) directory: String,
    management: u16,
    /// Where Pebble validates HTTP-01 and TLS-ALPN-01, when the test serves them itself: bound
    /// before Pebble starts, so no other test can take the ports in between.
    pub(super) http01: Option<TcpListener>,
    pub(super) tls_alpn01: Option<TcpListener>,
    /// Trust for Pebble's own listeners (`pebble.minica.pem`).
    pub(super) tls: Arc<rustls::ClientConfig>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default();
            eprintln!("--- pebble.log ---\n{log}");
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Where Pebble validates challenges.
#[derive(Debug, Clone, Copy)]
pub(super) enum Validation {
    /// On listeners the test binds (and serves, [`Pebble::http01`]).
    OwnListeners,
    /// On derpd's port-80 listener and its TLS listener.
    At { http: u16, tls: u16 },
}

/// How to run Pebble.
#[derive(Debug, Clone, Copy)]
pub(super) struct Options {
    /// Per cent of good nonces refused with badNonce.
    pub(super) nonce_reject: u32,
    pub(super) validation: Validation,
    /// The `shortlived` profile's lifetime.
    pub(super) shortlived: Duration,
    /// Its directory port, when the test must know it before Pebble runs (derpd started
    /// first); otherwise free ports are taken.
    pub(super) listen: Option<u16>,
    /// Its DNS resolver (`-dnsserver`); `None`: a closed port (IP identifiers need none).
    pub(super) dns: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nonce_reject: 0,
            validation: Validation::OwnListeners,
            shortlived: Duration::from_secs(518_400),
            listen: None,
            dns: None,
        }
    }
}

/// Pebble serving challenges on listeners of the test's own.
pub(super) fn start_pebble(test: &str, nonce_reject: u32) -> Option<Pebble> {
    start_pebble_with(
        test,
        Options {
            nonce_reject,
            ..Options::default()
        },
    )
}

/// Pebble on fresh ports. Its own two listeners take ports that were free a moment before; should
/// another test take one in between, Pebble exits and starts again on others (unless the test
/// chose the directory's port).
pub(super) fn start_pebble_with(test: &str, opts: Options) -> Option<Pebble> {
    let attempts = if opts.listen.is_some() { 1 } else { 3 };
    for attempt in 1..=attempts {
        let mut p = spawn_pebble(test, opts)?;
        match wait_ready(&mut p) {
            Ok(()) => return Some(p),
            Err(e) if attempt < attempts => eprintln!("Pebble did not start ({e}); again"),
            Err(e) => panic!("Pebble did not start in {attempts} attempts: {e}"),
        }
    }
    unreachable!()
}

fn spawn_pebble(test: &str, opts: Options) -> Option<Pebble> {
    let (bin, certs) = pebble_install()?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "acme-{test}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (http01, tls_alpn01, http_port, tls_port) = match opts.validation {
        Validation::OwnListeners => {
            let h = TcpListener::bind("127.0.0.1:0").unwrap();
            let t = TcpListener::bind("127.0.0.1:0").unwrap();
            let (hp, tp) = (
                h.local_addr().unwrap().port(),
                t.local_addr().unwrap().port(),
            );
            (Some(h), Some(t), hp, tp)
        }
        Validation::At { http, tls } => (None, None, http, tls),
    };
    let listen = opts.listen.unwrap_or_else(support::reserve_port);
    let management = support::reserve_port();
    let dns = opts.dns.unwrap_or_else(support::reserve_port);
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{listen}"),
        "managementListenAddress": format!("127.0.0.1:{management}"),
        "certificate": certs.join("localhost/cert.pem"),
        "privateKey": certs.join("localhost/key.pem"),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
        "retryAfter": {"authz": 1, "order": 1},
        "keyAlgorithm": "ecdsa",
        "profiles": {
            "default": {"description": "90 days", "validityPeriod": 7_776_000},
            "shortlived": {"description": "short", "validityPeriod": opts.shortlived.as_secs()}
        }
    }});
    let config_path = dir.join("pebble-config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
    let child = Command::new(bin)
        .arg("-config")
        .arg(&config_path)
        // Names are resolved by the test's own DNS responder on loopback, or (IP identifiers)
        // not at all: a closed loopback port, never the host's resolver.
        .arg("-dnsserver")
        .arg(format!("127.0.0.1:{dns}"))
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", opts.nonce_reject.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let tls = derpd::trust::ca_file_client_config(&certs.join("pebble.minica.pem")).unwrap();
    Some(Pebble {
        child,
        dir,
        listen,
        directory: format!("https://127.0.0.1:{listen}/dir"),
        management,
        http01,
        tls_alpn01,
        tls,
    })
}

/// Until Pebble accepts on both its ports (bounded), or has exited.
fn wait_ready(p: &mut Pebble) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in [p.listen, p.management] {
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = p.child.try_wait().map_err(|e| e.to_string())? {
                let log = std::fs::read_to_string(p.dir.join("pebble.log")).unwrap_or_default();
                return Err(format!("exited ({status}):\n{log}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("nothing listening on {port} after 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checks

/// GET over https from Pebble's management port.
pub(super) fn get(p: &Pebble, path: &str) -> Vec<u8> {
    let url =
        derpd::httpc::Url::parse(&format!("https://127.0.0.1:{}{path}", p.management)).unwrap();
    smol::block_on(async {
        let io = url.connect(Some(&p.tls)).await.unwrap();
        let t = Duration::from_secs(10);
        let mut conn = derpd::httpc::Conn::new(io, Instant::now() + t, t);
        conn.send(&url.request("GET")).await.unwrap();
        let head = conn.read_head().await.unwrap();
        assert_eq!(head.status, 200, "GET {path}");
        conn.read_body(head.framing, 1 << 20, 1 << 20).await.data
    })
}

/// Pebble's issuing root, PEM, written to a file in its directory (for `SSL_CERT_FILE`).
pub(super) fn root_file(p: &Pebble) -> PathBuf {
    let path = p.dir.join("root.pem");
    std::fs::write(&path, get(p, "/roots/0")).unwrap();
    path
}

/// The chain (leaf first) verifies to Pebble's root for `name`; panics otherwise.
pub(super) fn verify_chain(p: &Pebble, chain: &[CertificateDer<'static>], name: ServerName<'_>) {
    let root = get(p, "/roots/0");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&root) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .unwrap_or_else(|e| panic!("the chain does not verify to Pebble's root for {name:?}: {e}"));
}
