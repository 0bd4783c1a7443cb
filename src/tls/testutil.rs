//! What the TLS unit tests share: a temporary directory, certificate files for a DNS name,
//! X.509 field readers, and an in-memory handshake with a client that accepts any certificate
//! ([`Trust::AnyCertificate`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConnection};
use x509_parser::certificate::X509Certificate;

use crate::trust::{self, Trust};

pub(super) const SERVER_KEY: [u8; 32] = [0xab; 32];

/// A unique directory under the system temp dir, removed on drop.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("derpd-tls-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(super) fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

pub(super) fn cn(cert: &X509Certificate<'_>) -> String {
    let cn = cert.subject().iter_common_name().next().unwrap();
    cn.as_str().unwrap().to_owned()
}

pub(super) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

pub(super) fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Writes a self-signed certificate for `names` (PKCS#8 key) as `<stem>.crt/.key`.
pub(super) fn write_dns_cert(dir: &Path, stem: &str, names: &[&str]) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    fs::write(dir.join(format!("{stem}.crt")), cert.pem()).unwrap();
    fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
}

/// Runs an in-memory handshake; returns the certificates the client saw.
pub(super) fn handshake(
    server: Arc<rustls::ServerConfig>,
    tls12: bool,
    name: &str,
    sni: bool,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let (client, _) = connected(server, tls12, name, sni)?;
    let certs = client.peer_certificates().unwrap();
    Ok(certs.iter().map(|c| c.clone().into_owned()).collect())
}

/// Both ends of an in-memory handshake, once it has finished.
pub(super) fn connected(
    server: Arc<rustls::ServerConfig>,
    tls12: bool,
    name: &str,
    sni: bool,
) -> Result<(ClientConnection, ServerConnection), String> {
    connected_trusting(server, tls12, name, sni, Trust::AnyCertificate)
}

/// A client of TLS 1.2 only, or 1.3 only, that trusts as `trust` says.
pub(super) fn client_config(tls12: bool, trust: Trust) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    Ok(ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(trust::verifier(trust, &provider)?)
        .with_no_client_auth())
}

/// [`connected`] for a client that trusts as `trust` says.
pub(super) fn connected_trusting(
    server: Arc<rustls::ServerConfig>,
    tls12: bool,
    name: &str,
    sni: bool,
    trust: Trust,
) -> Result<(ClientConnection, ServerConnection), String> {
    let mut client_cfg = client_config(tls12, trust)?;
    client_cfg.enable_sni = sni;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut client = ClientConnection::new(Arc::new(client_cfg), name).unwrap();
    let mut server = ServerConnection::new(server).unwrap();
    let err = |e: &dyn fmt::Display| e.to_string();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).map_err(|e| err(&e))?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).map_err(|e| err(&e))?;
        }
        server.process_new_packets().map_err(|e| err(&e))?;
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).map_err(|e| err(&e))?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).map_err(|e| err(&e))?;
        }
        client.process_new_packets().map_err(|e| err(&e))?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let want = if tls12 {
                rustls::ProtocolVersion::TLSv1_2
            } else {
                rustls::ProtocolVersion::TLSv1_3
            };
            assert_eq!(client.protocol_version(), Some(want));
            return Ok((client, server));
        }
    }
    Err("handshake did not finish".to_owned())
}
