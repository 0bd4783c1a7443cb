//! The CSR (PKCS#10, RFC 2986) a finalize request carries, built by hand: an empty subject, the
//! P-256 public key, one extensionRequest with the subjectAltName of the identifiers, signed
//! ECDSA with SHA-256 by ring. rcgen's general writer cost about 15 KB on mipsel for this one
//! fixed shape.

use std::net::IpAddr;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};

use super::{err, AcmeError, Identifier};
use crate::p256::{EC_PUBLIC_KEY_OID, P256_OID};

/// SEQUENCE { ecdsa-with-SHA256 }, DER.
const ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// OID 1.2.840.113549.1.9.14 (PKCS#9 extensionRequest), DER.
const EXTENSION_REQUEST: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e,
];
/// OID 2.5.29.17 (subjectAltName), DER.
const SUBJECT_ALT_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11];

/// One DER TLV (definite length; lengths here are far below 64 KiB).
fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + 4);
    out.push(tag);
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend([0x81, len as u8]),
        _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// A GeneralName: dNSName [2] or iPAddress [7].
fn general_name(id: &Identifier) -> Result<Vec<u8>, AcmeError> {
    match id.as_ip() {
        Some(IpAddr::V4(v4)) => Ok(tlv(0x87, &[&v4.octets()])),
        Some(IpAddr::V6(v6)) => Ok(tlv(0x87, &[&v6.octets()])),
        None if !id.value.is_empty() && id.value.is_ascii() => {
            Ok(tlv(0x82, &[id.value.as_bytes()]))
        }
        None => Err(err(format!("{:?} is not a DNS name", id.value))),
    }
}

/// A CSR for the identifiers, signed by the certificate's key (PKCS#8 DER, P-256).
pub fn csr(ids: &[Identifier], cert_key_pkcs8: &[u8]) -> Result<Vec<u8>, AcmeError> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, cert_key_pkcs8, &rng)
        .map_err(|e| err(format!("certificate key: {e}")))?;
    let mut names = Vec::new();
    for id in ids {
        names.extend(general_name(id)?);
    }
    let san = tlv(0x04, &[&tlv(0x30, &[&names])]);
    let extensions = tlv(0x30, &[&tlv(0x30, &[SUBJECT_ALT_NAME, &san])]);
    let attribute = tlv(0x30, &[EXTENSION_REQUEST, &tlv(0x31, &[&extensions])]);
    let spki = tlv(
        0x30,
        &[
            &tlv(0x30, &[EC_PUBLIC_KEY_OID, P256_OID]),
            &tlv(0x03, &[&[0], key.public_key().as_ref()]),
        ],
    );
    let info = tlv(
        0x30,
        &[
            &[0x02, 0x01, 0x00], // version 1
            &[0x30, 0x00],       // an empty subject: the names are in the SAN
            &spki,
            &tlv(0xa0, &[&attribute]),
        ],
    );
    let sig = key
        .sign(&rng, &info)
        .map_err(|_| err("cannot sign the CSR"))?;
    Ok(tlv(
        0x30,
        &[&info, ECDSA_SHA256, &tlv(0x03, &[&[0], sig.as_ref()])],
    ))
}
