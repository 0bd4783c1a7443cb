//! derpd with `--certmode letsencrypt` against Pebble: an IP certificate (profile `shortlived`)
//! by HTTP-01 on the port-80 listener, got once the CA, down at start, comes up, and renewed
//! when a third of its lifetime is left; a DNS name by TLS-ALPN-01 on the TLS listener (Pebble
//! resolving it through the test's DNS responder), stored in autocert's layout and served
//! again after a restart with the CA gone; and the binary, with Tailscale's own client (the Go
//! harness) verifying the certificate as any other, no pin.
//!
//! derpd starts first on free ports and Pebble validates on them; in-process servers wait for
//! the CA with short intervals (`AcmeTiming`), the binary with derper's.

use super::Validation;
use super::{dns, pebble_install, root_file, start_pebble_with, verify_chain, Options, Pebble};
use crate::support::{self, fresh_path, s, Derpd};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use derpd::acme::client::ChallengeKind;
use derpd::config::{AcmeConfig, AcmeTiming, Config, TlsCiphers, TlsMode};
use derpd::server::Server;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

/// Waits for the CA in a test: a look twice a second, retries after 0.2 s to 1 s.
const QUICK: AcmeTiming = AcmeTiming {
    check_every: Duration::from_millis(500),
    retry_first: Duration::from_millis(200),
    retry_max: Duration::from_secs(1),
    order_timeout: Duration::from_secs(30),
};

/// How long a certificate may take to appear or change.
const CERT_DEADLINE: Duration = Duration::from_secs(40);

/// `pebble.minica.pem`, what derpd trusts for Pebble's own TLS (`--acme-ca-file`); `None`: skip.
fn minica() -> Option<PathBuf> {
    Some(pebble_install()?.1.join("pebble.minica.pem"))
}

/// An in-process derpd with `--certmode letsencrypt` for `hostname`, the CA at `directory`.
fn acme_server(hostname: &str, directory: String, kinds: &[ChallengeKind], dir: &Path) -> Server {
    let mut cfg = Config::dev_loopback();
    cfg.http_port = Some(0);
    cfg.tls = Some(TlsMode {
        hostname: hostname.into(),
        certdir: dir.to_path_buf(),
        acme: Some(AcmeConfig {
            directory,
            ca_file: minica(),
            email: Some("ops@example.net".into()),
            ip_certs: hostname.parse::<IpAddr>().is_ok(),
            ips: hostname.parse::<IpAddr>().into_iter().collect(),
            challenges: kinds.to_vec(),
            timing: QUICK,
        }),
        ciphers: TlsCiphers::Auto,
    });
    support::inproc::start(cfg)
}

/// Pebble validating on `srv`'s listeners, its directory on `listen`.
fn pebble_for(test: &str, srv: &Server, listen: u16, opts: Options) -> Option<Pebble> {
    let validation = Validation::At {
        http: srv.http_addr().unwrap().port(),
        tls: srv.addr().port(),
    };
    start_pebble_with(
        test,
        Options {
            validation,
            listen: Some(listen),
            ..opts
        },
    )
}

/// The chain `addr` serves to a client that verifies it with `trust` for `name` (any
/// certificate when `None`), as an ordinary TLS client does.
fn served_chain(
    addr: SocketAddr,
    name: &str,
    trust: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let cfg = match trust {
        Some(root) => derpd::trust::ca_file_client_config(root)?,
        None => derpd::trust::client_config(derpd::trust::Trust::AnyCertificate)?,
    };
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(conn.peer_certificates().unwrap_or_default().to_vec())
}

/// Polls (bounded by [`CERT_DEADLINE`]) until `f` gives a value.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CERT_DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The leaf's lifetime.
fn lifetime(leaf: &CertificateDer<'_>) -> Duration {
    let (_, c) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let v = c.validity();
    Duration::from_secs((v.not_after.timestamp() - v.not_before.timestamp()) as u64)
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ip_certificate_once_the_ca_is_up_then_renewed() {
    let Some(_) = minica() else { return };
    let dir = fresh_path("acme-renew", "certs");
    let listen = support::reserve_port();
    let srv = acme_server(
        "127.0.0.1",
        format!("https://127.0.0.1:{listen}/dir"),
        &[ChallengeKind::Http01],
        &dir,
    );
    // The CA is down: TLS clients are refused, and derpd keeps trying.
    let refused = served_chain(srv.addr(), "127.0.0.1", None).unwrap_err();
    println!("[before the CA: {refused}]");
    // Certificates of 12 s: renewed when 4 s are left.
    let opts = Options {
        shortlived: Duration::from_secs(12),
        ..Options::default()
    };
    let Some(p) = pebble_for("renew", &srv, listen, opts) else {
        return;
    };
    let root = root_file(&p);
    let started = Instant::now();
    let first = wait_for("the first certificate", || {
        served_chain(srv.addr(), "127.0.0.1", Some(&root)).ok()
    });
    println!("[first certificate {:?} after Pebble]", started.elapsed());
    let ip = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    // The chain, then derper's meta-cert last.
    verify_chain(&p, &first[..first.len() - 1], ip.clone());
    assert!(
        lifetime(&first[0]) <= Duration::from_secs(12),
        "profile shortlived"
    );
    assert_eq!(mode(&dir.join("acme-account.key")), 0o600);
    assert_eq!(mode(&dir.join("127.0.0.1.key")), 0o600);
    let stored = std::fs::read(dir.join("127.0.0.1.crt")).unwrap();
    let stored: Vec<_> = CertificateDer::pem_slice_iter(&stored)
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        stored[0], first[0],
        "the served certificate is the stored one"
    );

    let renewed = wait_for("a renewed certificate", || {
        served_chain(srv.addr(), "127.0.0.1", Some(&root))
            .ok()
            .filter(|c| c[0] != first[0])
    });
    println!("[renewed {:?} after the first]", started.elapsed());
    verify_chain(&p, &renewed[..renewed.len() - 1], ip);
    drop(srv);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn dns_name_by_tls_alpn01_kept_across_a_restart() {
    let Some(_) = minica() else { return };
    const NAME: &str = "derp.test";
    let dir = fresh_path("acme-dns", "certs");
    let listen = support::reserve_port();
    let directory = format!("https://127.0.0.1:{listen}/dir");
    let kinds = [ChallengeKind::TlsAlpn01];
    let srv = acme_server(NAME, directory.clone(), &kinds, &dir);
    let opts = Options {
        dns: Some(dns::start()),
        ..Options::default()
    };
    let Some(p) = pebble_for("dns", &srv, listen, opts) else {
        return;
    };
    let root = root_file(&p);
    let first = wait_for("the certificate", || {
        served_chain(srv.addr(), NAME, Some(&root)).ok()
    });
    let name = ServerName::try_from(NAME).unwrap();
    verify_chain(&p, &first[..first.len() - 1], name);
    // autocert's cache entry: the key first, then the chain; and its account key.
    let entry = std::fs::read_to_string(dir.join(NAME)).unwrap();
    assert!(
        entry.starts_with("-----BEGIN EC PRIVATE KEY-----\n"),
        "{entry}"
    );
    assert_eq!(entry.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert_eq!(mode(&dir.join(NAME)), 0o600);
    assert!(dir.join("acme_account+key").is_file());
    // Another SNI is refused, as derper refuses it.
    assert!(served_chain(srv.addr(), "other.test", None).is_err());

    // A restart with the CA gone serves the stored certificate at once: no new order.
    let kept_root = dir.with_file_name("root.pem");
    std::fs::copy(&root, &kept_root).unwrap();
    let root = kept_root;
    drop(srv);
    drop(p);
    let srv = acme_server(NAME, directory, &kinds, &dir);
    let again = served_chain(srv.addr(), NAME, Some(&root)).unwrap();
    assert_eq!(again[0], first[0]);
    drop(srv);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// The binary as an administrator runs it, and Tailscale's client verifying the certificate
/// with the system's roots (`SSL_CERT_FILE`: Pebble's root) and no `CertName`.
#[test]
fn tailscale_clients_verify_the_ca_issued_ip_certificate() {
    let Some(harness) = support::harness() else {
        return;
    };
    let Some(minica) = minica() else { return };
    let (port, http_port) = (support::reserve_port(), support::reserve_port());
    let Some(p) = start_pebble_with(
        "binary",
        Options {
            validation: Validation::At {
                http: http_port,
                tls: port,
            },
            ..Options::default()
        },
    ) else {
        return;
    };
    let root = root_file(&p);
    let dir = fresh_path("acme-binary", "certs");
    let args = vec![
        s("-a"),
        format!("127.0.0.1:{port}"),
        s("--http-port"),
        http_port.to_string(),
        s("--stun-port=0"),
        s("-c"),
        dir.with_file_name("derper.key").display().to_string(),
        s("--certmode=letsencrypt"),
        s("--acme-ip-certs"),
        s("--hostname=127.0.0.1"),
        format!("--certdir={}", dir.display()),
        format!("--acme-directory={}", p.directory),
        format!("--acme-ca-file={}", minica.display()),
    ];
    let mut d = Derpd::start(&args);
    d.wait_until("the certificate", CERT_DEADLINE, |log| {
        log.iter()
            .any(|l| l.contains("certificate for 127.0.0.1: valid until"))
    });
    // The DERPMap node, without a pin.
    d.drain();
    let node = d
        .log
        .iter()
        .find(|l| l.contains("\"HostName\":\"127.0.0.1\""));
    let Some(node) = node.cloned() else {
        d.fail("no DERPMap node logged")
    };
    if node.contains("CertName") || !d.log.iter().any(|l| l.contains("from the ACME CA")) {
        d.fail(&format!("want a node without CertName: {node}"));
    }
    let relay = [
        s("relay"),
        s("-clients"),
        s("2"),
        s("-host"),
        s("127.0.0.1"),
        s("-port"),
        port.to_string(),
    ];
    let root_env = root.display().to_string();
    d.run_harness_env(&harness, &relay, &[("SSL_CERT_FILE", &root_env)]);
    d.expect_running();
    drop(d);

    // Started again, it serves the stored certificate and orders none.
    let mut d = Derpd::start(&args);
    d.wait_until("the stored certificate", CERT_DEADLINE, |log| {
        log.iter()
            .any(|l| l.contains("using the stored certificate"))
    });
    d.run_harness_env(&harness, &relay, &[("SSL_CERT_FILE", &root_env)]);
    d.drain();
    if d.log.iter().any(|l| l.contains("ordering a certificate")) {
        d.fail("a restart ordered a new certificate");
    }
    drop(d);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}
