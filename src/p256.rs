//! P-256 private keys in the forms Go reads and writes: SEC1 `ECPrivateKey` (RFC 5915,
//! `EC PRIVATE KEY`, what `x509.MarshalECPrivateKey` writes: derper's key files) and PKCS#8
//! (RFC 5208, what ring and rcgen give), walked and built by hand (all lengths are small and
//! fixed for P-256); and PEM as Go's `pem.Encode` writes it. Nothing here panics on bad input.

/// id-ecPublicKey, DER.
pub(crate) const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 (P-256), DER.
pub(crate) const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the ECPrivateKey `parameters` field for P-256: `[0] { OID 1.2.840.10045.3.1.7 }`.
const SEC1_P256_PARAMS: &[u8] = &[
    0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
];

/// A P-256 key's two halves, borrowed from a key file's DER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parts<'a> {
    /// The private scalar, 32 bytes.
    pub(crate) private: &'a [u8],
    /// The public point, uncompressed: 0x04, x, y (65 bytes).
    pub(crate) public: &'a [u8],
}

impl<'a> Parts<'a> {
    /// From a SEC1 `ECPrivateKey` that names P-256 (or no curve) and holds its public key (Go
    /// and OpenSSL write it).
    pub(crate) fn from_sec1(der: &'a [u8]) -> Option<Self> {
        let (body, _) = der_take(der, 0x30)?;
        let (version, rest) = der_take(body, 0x02)?;
        if version != [1] {
            return None;
        }
        let (private, mut rest) = der_take(rest, 0x04)?;
        let mut public = None;
        while let Some((tag, value, next)) = der_next(rest) {
            match tag {
                0xa0 if value != P256_OID => return None,
                // BIT STRING, 0x03 0x42 0x00 <65 bytes>
                0xa1 => public = der_take(value, 0x03)?.0.strip_prefix(&[0]),
                _ => {}
            }
            rest = next;
        }
        let public = public?;
        (private.len() == 32 && public.len() == 65 && public.first() == Some(&4))
            .then_some(Self { private, public })
    }

    /// From a PKCS#8 `PrivateKeyInfo` for an EC key on P-256.
    pub(crate) fn from_pkcs8(der: &'a [u8]) -> Option<Self> {
        let (body, _) = der_take(der, 0x30)?;
        let (_version, rest) = der_take(body, 0x02)?;
        let (algorithm, rest) = der_take(rest, 0x30)?;
        if algorithm != [EC_PUBLIC_KEY_OID, P256_OID].concat() {
            return None;
        }
        let (ec_key, _) = der_take(rest, 0x04)?;
        Self::from_sec1(ec_key)
    }

    /// SEC1 DER with the curve named, as Go's `x509.MarshalECPrivateKey` writes it.
    pub(crate) fn sec1(&self) -> Vec<u8> {
        self.ec_private_key(true)
    }

    /// PKCS#8 DER, as ring writes it (the inner key without the curve: the algorithm names it).
    pub(crate) fn pkcs8(&self) -> Vec<u8> {
        let mut out = vec![0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13];
        out.extend_from_slice(EC_PUBLIC_KEY_OID);
        out.extend_from_slice(P256_OID);
        out.extend_from_slice(&[0x04, 0x6d]);
        out.extend(self.ec_private_key(false));
        out
    }

    fn ec_private_key(&self, curve: bool) -> Vec<u8> {
        let len = if curve { 0x77 } else { 0x6b };
        let mut out = vec![0x30, len, 0x02, 0x01, 0x01, 0x04, 0x20];
        out.extend_from_slice(self.private);
        if curve {
            out.extend_from_slice(SEC1_P256_PARAMS);
        }
        out.extend_from_slice(&[0xa1, 0x44, 0x03, 0x42, 0x00]);
        out.extend_from_slice(self.public);
        out
    }
}

/// PKCS#8 (RFC 5208) → SEC1 `ECPrivateKey` (RFC 5915) with the P-256 curve parameters, as Go's
/// `x509.MarshalECPrivateKey` writes it.
pub(crate) fn pkcs8_to_sec1(pkcs8: &[u8]) -> Option<Vec<u8>> {
    Parts::from_pkcs8(pkcs8).map(|p| p.sec1())
}

/// PEM with 64-column base64 lines and `\n` line ends, as Go's `pem.Encode` writes it.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), lf)
}

/// One DER element: (tag, value, the rest). Lengths up to 2 bytes (keys are small).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&[t, first], rest) = input.split_first_chunk::<2>()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(u16::from_be_bytes(*rest.first_chunk()?)),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    (rest.len() >= len).then(|| {
        let (value, rest) = rest.split_at(len);
        (t, value, rest)
    })
}

/// One DER element with tag `tag`: (value, the rest).
fn der_take(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    der_next(input)
        .filter(|(t, _, _)| *t == tag)
        .map(|(_, v, r)| (v, r))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rcgen::KeyPair;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    #[test]
    fn pem_encoding_round_trips() {
        for len in [0, 1, 2, 3, 47, 48, 49, 100] {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &data);
            assert!(pem.lines().all(|l| l.len() <= 64));
            if len > 0 {
                let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
                assert_eq!(back.as_ref(), &data[..]);
            }
        }
    }

    /// Byte for byte what Go's `pem.Encode` (and derpd's hand-written encoder before the `pem`
    /// crate) writes: `\n` line ends, 64 columns, padding, nothing for no data.
    #[test]
    fn pem_encoding_is_gos() {
        let data: Vec<u8> = (0..49).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(
            pem_encode("EC PRIVATE KEY", &data),
            "-----BEGIN EC PRIVATE KEY-----\n\
             CzBVep/E6Q4zWH2ix+wRNluApcrvFDleg6jN8hc8YYar0PUaP2SJrtP4HUJnjLHW\n\
             +w==\n\
             -----END EC PRIVATE KEY-----\n"
        );
        assert_eq!(
            pem_encode("CERTIFICATE", &[]),
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"
        );
    }

    #[test]
    fn sec1_conversion_matches_go_layout() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let sec1 = pkcs8_to_sec1(key.serialized_der()).unwrap();
        assert_eq!(sec1.len(), 121);
        assert_eq!(&sec1[..7], &[0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]);
        assert_eq!(&sec1[39..51], SEC1_P256_PARAMS);
        assert_eq!(&sec1[51..56], &[0xa1, 0x44, 0x03, 0x42, 0x00]);
        assert_eq!(&sec1[56..], key.public_key_raw());
        assert!(pkcs8_to_sec1(b"\x30\x03\x02\x01").is_none());
        // And back: the PKCS#8 built from the parts is the one rcgen (ring) wrote.
        let parts = Parts::from_sec1(&sec1).unwrap();
        assert_eq!(parts.pkcs8(), key.serialized_der());
        assert_eq!(Parts::from_pkcs8(&parts.pkcs8()), Some(parts));
    }

    #[test]
    fn bad_der_is_none() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let sec1 = pkcs8_to_sec1(key.serialized_der()).unwrap();
        for cut in 0..sec1.len() {
            assert!(Parts::from_sec1(&sec1[..cut]).is_none(), "cut at {cut}");
        }
        let mut other_curve = sec1.clone();
        other_curve[50] ^= 1; // the curve OID's last byte
        assert!(Parts::from_sec1(&other_curve).is_none());
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x82\xff",
            b"\x30\x84\0\0\0\x01\x02",
        ] {
            assert!(Parts::from_sec1(bad).is_none());
            assert!(Parts::from_pkcs8(bad).is_none());
        }
    }
}
