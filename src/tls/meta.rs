//! derper's DERP meta-certificate: a throwaway self-signed certificate whose Subject names the
//! server's DERP key, served last in every chain so that a client learns the key during the TLS
//! handshake.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, SerialNumber};
use rustls::pki_types::CertificateDer;

use super::template::{common_name, no_ca_only_basic_constraints, set_validity};
use super::TlsError;

/// The meta-cert's serial number: the DERP protocol version, as derper writes it.
const SERIAL: [u8; 1] = [crate::frame::PROTOCOL_VERSION as u8];
// One DER byte, positive.
const _: () = assert!(crate::frame::PROTOCOL_VERSION < 0x80);
/// derper's meta-cert is valid from now − 30 days to now + 30 days.
const META_VALIDITY: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// derper's "meta certificate": a self-signed certificate whose Subject CN is
/// `derpkey<hex of the server's DERP public key>`, appended last to every served chain.
#[derive(Debug, Clone)]
pub struct MetaCert {
    /// The DER certificate.
    pub der: CertificateDer<'static>,
    /// When it expires.
    pub not_after: SystemTime,
}

/// Generates a meta-cert exactly like derper's `initMetacert`.
///
/// Under TLS 1.3 the certificates are encrypted, so a DERP client that sees a certificate with
/// CN `derpkey<hex>` learns the server's DERP key during the handshake and can send its login
/// right after its HTTP request ("fast start"), saving a round trip. ALPN is not used for this
/// because it travels in the clear.
///
/// The certificate has a fresh (discarded) Ed25519 key, serial 2 (the protocol version),
/// Subject = Issuer = `CN=derpkey<64 lowercase hex>`, validity now ± 30 days and exactly one
/// extension: a critical BasicConstraints with CA=false (macOS wants it when subject == issuer).
pub fn generate_meta_cert(server_public_key: &[u8; 32]) -> Result<MetaCert, TlsError> {
    meta_cert_at(server_public_key, SystemTime::now())
}

pub(super) fn meta_cert_at(
    server_public_key: &[u8; 32],
    now: SystemTime,
) -> Result<MetaCert, TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let not_before = now.checked_sub(META_VALIDITY).unwrap_or(UNIX_EPOCH);
    let not_after = now.checked_add(META_VALIDITY).unwrap_or(now);

    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&SERIAL));
    params.distinguished_name =
        common_name(&format!("derpkey{}", crate::key::hex(server_public_key)));
    set_validity(&mut params, not_before, not_after);
    no_ca_only_basic_constraints(&mut params);
    let cert = params.self_signed(&key)?;
    Ok(MetaCert {
        der: cert.der().clone(),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::tls::testutil::{cn, parse, unix, SERVER_KEY};
    use x509_parser::extensions::ParsedExtension;

    #[test]
    fn meta_cert_fields() {
        let before = SystemTime::now();
        let meta = generate_meta_cert(&SERVER_KEY).unwrap();
        let cert = parse(&meta.der);
        assert_eq!(cert.raw_serial(), &[2]);
        assert_eq!(cn(&cert), format!("derpkey{}", "ab".repeat(32)));
        assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw());
        assert_eq!(
            cert.signature_algorithm.algorithm.to_id_string(),
            "1.3.101.112"
        );
        let exts = cert.extensions();
        assert_eq!(exts.len(), 1);
        assert_eq!(exts[0].oid.to_id_string(), "2.5.29.19");
        assert!(exts[0].critical);
        match exts[0].parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                assert!(!bc.ca);
                assert!(bc.path_len_constraint.is_none());
            }
            other => panic!("unexpected extension {other:?}"),
        }
        let v = cert.validity();
        let now = unix(before);
        let month = 30 * 24 * 3600;
        assert!((v.not_before.timestamp() - (now - month)).abs() <= 2);
        assert!((v.not_after.timestamp() - (now + month)).abs() <= 2);
        assert!((unix(meta.not_after) - (now + month)).abs() <= 2);
    }
}
