//! The self-signed certificate for an IP `--hostname`, as derper's (`createSelfSignedIPCert`)
//! but for its key: Ed25519 instead of P-256, written as Go writes one (PKCS#8 `PRIVATE KEY`
//! and `CERTIFICATE` PEM) into a private directory, crash-safely.
//!
//! Why Ed25519: every login signs the TLS handshake with this key, and on a router's CPU an
//! Ed25519 signature costs far less than a P-256 one: 12.2 M → 9.5 M guest instructions per
//! login on mipsel (`bench/router.sh --cert-key`). Go's TLS client (Tailscale's) accepts
//! Ed25519 certificates (TLS 1.3 and 1.2), and a pinned (`sha256-raw:`) client checks nothing
//! about the key. Certificates already on disk are loaded as they are, P-256 ones included.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::PrivateKeyDer;

use super::error::io_err;
use super::template::{common_name, no_ca_only_basic_constraints, set_validity};
use super::{ServerCert, TlsError};
use crate::p256::pem_encode;

/// "expires in 1 year; a bit over that is rejected by macOS etc" (derper).
const IP_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// derper's `createSelfSignedIPCert`, then writes the files.
pub(super) fn create_self_signed_ip_cert(
    ip: IpAddr,
    hostname: &str,
    certdir: &Path,
    crt_path: &Path,
    key_path: &Path,
) -> Result<ServerCert, TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let cert = ip_cert_params(ip, hostname, &random_serial()?).self_signed(&key)?;
    let pkcs8 = key.serialize_der();
    let key_pem = pem_encode("PRIVATE KEY", &pkcs8);
    let key_der = PrivateKeyDer::Pkcs8(pkcs8.into());
    let cert_pem = pem_encode("CERTIFICATE", cert.der());
    write_pair(certdir, crt_path, &cert_pem, key_path, &key_pem)?;
    Ok(ServerCert {
        chain: vec![cert.der().clone()],
        key: key_der,
        generated: true,
        hostname_is_ip: true,
        replaced: None,
    })
}

/// Go's `rand.Int(rand.Reader, 2^128)`, i.e. a random non-negative 128-bit serial.
fn random_serial() -> Result<[u8; 16], TlsError> {
    let mut serial = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|e| TlsError::Rustls {
            context: "cannot generate a random serial number".to_owned(),
            source: e.into(),
        })?;
    if serial.iter().all(|b| *b == 0) {
        serial[15] = 1; // RFC 5280 wants a positive serial.
    }
    Ok(serial)
}

/// derper's template: CN and IP SAN the address, valid for a year from now, a server key
/// (digital signature only: an Ed25519 key enciphers nothing, where derper's P-256 template
/// also says key encipherment).
fn ip_cert_params(ip: IpAddr, hostname: &str, serial: &[u8]) -> CertificateParams {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.distinguished_name = common_name(hostname);
    params.subject_alt_names = vec![SanType::IpAddress(ip)];
    set_validity(
        &mut params,
        now,
        now.checked_add(IP_CERT_VALIDITY).unwrap_or(now),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    no_ca_only_basic_constraints(&mut params);
    params
}

/// Writes the pair into `certdir` (made private if it is new).
fn write_pair(
    certdir: &Path,
    crt_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<(), TlsError> {
    create_private_dir(certdir)?;
    // The pair counts as complete once the certificate exists, so the certificate is removed
    // first and written last: a crash at any point leaves at worst a key without a certificate
    // (replaced at the next start), never a certificate beside a key that is not its own. Each
    // write is crash-safe (temporary file, fsync, rename, directory fsync), and the key is
    // 0600 from its first byte.
    crate::fsutil::remove_file_durably(crt_path)
        .map_err(io_err("remove the old certificate file", crt_path))?;
    crate::fsutil::write_file_atomic(key_path, key_pem.as_bytes(), 0o600)
        .map_err(io_err("write the key file", key_path))?;
    crate::fsutil::write_file_atomic(crt_path, cert_pem.as_bytes(), 0o644)
        .map_err(io_err("write the certificate file", crt_path))
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let existed = dir.is_dir();
    crate::fsutil::create_dir_all_durably(dir, 0o700)
        .map_err(io_err("create the certificate directory", dir))?;
    if !existed {
        // Exactly 0700 whatever the umask: only derpd's user may list or replace the key.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("set permissions on", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::tls::load_or_create;
    use crate::tls::testutil::{cn, mode, parse, unix, TempDir};
    use sha2::{Digest, Sha256};
    use std::net::Ipv6Addr;
    use x509_parser::extensions::GeneralName;

    #[test]
    fn generated_ip_cert_is_like_derpers_and_reused() {
        let tmp = TempDir::new();
        let certdir = tmp.0.join("sub").join("certs");
        let before = SystemTime::now();
        let cert = load_or_create("192.0.2.7", &certdir).unwrap();
        assert!(cert.generated);
        assert!(cert.hostname_is_ip);
        assert_eq!(cert.chain.len(), 1);
        assert!(matches!(cert.key, PrivateKeyDer::Pkcs8(_)));

        let x = parse(&cert.chain[0]);
        assert_eq!(cn(&x), "192.0.2.7");
        assert_eq!(x.subject().as_raw(), x.issuer().as_raw());
        // Ed25519 (RFC 8410), key and signature.
        assert_eq!(
            x.signature_algorithm.algorithm.to_id_string(),
            "1.3.101.112"
        );
        assert_eq!(
            x.public_key().algorithm.algorithm.to_id_string(),
            "1.3.101.112"
        );
        assert!(x.raw_serial().len() >= 15 && x.raw_serial().len() <= 17);
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::IPAddress(&[192, 0, 2, 7])]
        );
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_encipherment());
        assert_eq!(ku.flags, 0b1);
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth && eku.other.is_empty());
        let bc = x.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        assert_eq!(x.extensions().len(), 4, "SAN, KU, EKU, BC; no SKI/AKI");
        let v = x.validity();
        assert!((v.not_before.timestamp() - unix(before)).abs() <= 2);
        assert!((v.not_after.timestamp() - unix(before) - 365 * 24 * 3600).abs() <= 2);

        let crt = certdir.join("192.0.2.7.crt");
        let key = certdir.join("192.0.2.7.key");
        assert_eq!(mode(&certdir), 0o700);
        assert_eq!(mode(&tmp.0.join("sub")), 0o700);
        assert_eq!(mode(&key), 0o600);
        assert!(mode(&crt) & 0o077 <= 0o044);
        assert!(fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(fs::read_to_string(&crt)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\n"));

        let again = load_or_create("192.0.2.7", &certdir).unwrap();
        assert!(!again.generated);
        assert!(again.hostname_is_ip);
        assert_eq!(again.leaf_sha256_hex(), cert.leaf_sha256_hex());
        assert_eq!(again.chain, cert.chain);
        assert_eq!(again.key.secret_der(), cert.key.secret_der());
        let hex = cert.leaf_sha256_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, crate::key::hex(&Sha256::digest(&cert.chain[0])));
        assert!(hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn generated_ipv6_cert() {
        let tmp = TempDir::new();
        let cert = load_or_create("2001:db8::1", &tmp.0).unwrap();
        assert!(cert.generated);
        assert!(tmp.0.join("2001db81.crt").exists());
        let x = parse(&cert.chain[0]);
        assert_eq!(cn(&x), "2001:db8::1");
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::IPAddress(&ip.octets())]
        );
        // An existing directory keeps its permissions.
        assert_eq!(
            mode(&tmp.0),
            fs::metadata(&tmp.0).unwrap().permissions().mode() & 0o777
        );
    }
}
