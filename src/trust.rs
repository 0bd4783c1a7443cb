//! Whom derpd trusts when it is the TLS client (mesh links, the admission controller, the ACME
//! CA): a pinned leaf certificate (`sha256-raw:<hex>`, what a self-signed IP certificate needs),
//! or the CA bundle (`SSL_CERT_FILE`, else the first of Go's Linux paths), as Go's derper does,
//! or the CA certificates of one file ([`ca_file_client_config`], `--acme-ca-file`); and, for
//! the tests and the benchmark only, any certificate. One verifier per rule: the pin (and no
//! pin) in `LeafVerifier`, the CA bundle and a CA file in rustls's webpki verifier.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Whom a TLS client trusts: one rule per variant, each checked by one verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the leaf certificate whose SHA-256 is this (Tailscale's `sha256-raw:`
    /// CertName): name and dates are not checked, as Tailscale's clients do not.
    Pin([u8; 32]),
    /// A chain to the CA bundle (`SSL_CERT_FILE`, else the first of Go's Linux paths), as Go's
    /// `http.DefaultClient` does.
    CaBundle,
    /// Any certificate. Only for the tests and the benchmark's load generator, which talk to
    /// a server they started and check its certificate by other means.
    AnyCertificate,
}

impl Trust {
    /// A pin where there is one, else the CA bundle: a mesh peer's rule.
    pub fn pin_or_ca(pin: Option<[u8; 32]>) -> Self {
        pin.map_or(Self::CaBundle, Self::Pin)
    }
}

/// The verifier for `trust`, on `provider`'s signature algorithms. Every rule still verifies
/// the handshake signature with the certificate's key.
pub fn verifier(
    trust: Trust,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let algs = provider.signature_verification_algorithms;
    Ok(match trust {
        Trust::Pin(pin) => Arc::new(LeafVerifier {
            pin: Some(pin),
            algs,
        }),
        Trust::AnyCertificate => Arc::new(LeafVerifier { pin: None, algs }),
        Trust::CaBundle => ca_verifier(provider)?,
    })
}

/// A TLS 1.3/1.2 client configuration on the ring provider that trusts as `trust` says.
pub fn client_config(trust: Trust) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = verifier(trust, &provider)?;
    config_with(provider, verifier)
}

/// [`client_config`] trusting only the CA certificates in the PEM file at `path`
/// (`--acme-ca-file`: a private or test CA, instead of the bundle).
pub fn ca_file_client_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = webpki_verifier(path, roots_from(path)?, &provider)?;
    config_with(provider, verifier)
}

fn config_with(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn ca_verifier(
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let path = ca_bundle_path()?;
    webpki_verifier(&path, roots_from(&path)?, provider)
}

fn webpki_verifier(
    path: &Path,
    roots: rustls::RootCertStore,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    Ok(v)
}

/// Where Go (and so derper) looks for CA certificates on Linux, after `SSL_CERT_FILE`.
const CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn ca_bundle_path() -> Result<PathBuf, String> {
    match std::env::var_os("SSL_CERT_FILE") {
        Some(p) => Ok(PathBuf::from(p)),
        None => CA_FILES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| "no CA bundle found (set SSL_CERT_FILE or install ca-bundle)".into()),
    }
}

/// The certificates of the PEM file at `path` (at least one usable).
fn roots_from(path: &Path) -> Result<rustls::RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("CA bundle {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "CA bundle {}: no usable certificate",
            path.display()
        ));
    }
    Ok(roots)
}

/// [`Trust::Pin`] (`pin`) and [`Trust::AnyCertificate`] (no pin): the leaf is compared with
/// the pin, if any; handshake signatures are verified either way.
#[derive(Debug)]
struct LeafVerifier {
    pin: Option<[u8; 32]>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for LeafVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        if Sha256::digest(end_entity.as_ref()).as_slice() == pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "certificate does not match the sha256-raw pin".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
