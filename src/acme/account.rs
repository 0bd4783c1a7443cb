//! The ACME account key: ECDSA P-256 signing ES256 JWS, its JWK and thumbprint, and its file.
//!
//! The file is derper's `acme-account.key` (`cmd/derper/ipcert.go`, `--acme-ip-certs`): PEM
//! `EC PRIVATE KEY`, the SEC1 form Go's `x509.MarshalECPrivateKey` writes (curve named, public
//! key included), mode 0600. derpd reads that, or a PKCS#8 `PRIVATE KEY`, and writes derper's
//! form, so an account moves between the two either way.

use std::fmt;
use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::pem::{PemObject as _, SectionKind};
use sha2::{Digest, Sha256};

use super::{b64, err, json_str, AcmeError};
use crate::p256::{pem_encode, Parts};

/// The account key: ECDSA P-256, signing with ES256.
pub struct AccountKey {
    pair: EcdsaKeyPair,
    /// The private scalar (32 bytes).
    private: Vec<u8>,
    /// The public JWK in RFC 7638's canonical form (members in order, no spaces).
    jwk: String,
}

impl fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountKey({})", self.thumbprint())
    }
}

impl AccountKey {
    /// A new key.
    pub fn generate() -> Result<Self, AcmeError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| err("cannot generate an account key"))?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// A key from its PKCS#8 DER (`PRIVATE KEY`).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, AcmeError> {
        let parts =
            Parts::from_pkcs8(der).ok_or_else(|| err("account key is not a PKCS#8 P-256 key"))?;
        Self::from_parts(parts)
    }

    /// A key from its SEC1 DER (`EC PRIVATE KEY`, RFC 5915), with its public key in it (Go and
    /// OpenSSL write it).
    pub fn from_sec1(der: &[u8]) -> Result<Self, AcmeError> {
        let parts =
            Parts::from_sec1(der).ok_or_else(|| err("account key is not a SEC1 P-256 key"))?;
        Self::from_parts(parts)
    }

    fn from_parts(parts: Parts<'_>) -> Result<Self, AcmeError> {
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            parts.private,
            parts.public,
            &SystemRandom::new(),
        )
        .map_err(|e| err(format!("account key: {e}")))?;
        let jwk = jwk_of(pair.public_key().as_ref())?;
        Ok(Self {
            pair,
            private: parts.private.to_vec(),
            jwk,
        })
    }

    /// A key from a PEM file's text: `EC PRIVATE KEY` (derper's) or `PRIVATE KEY` (PKCS#8).
    pub fn from_pem(text: &[u8]) -> Result<Self, AcmeError> {
        // rustls's PEM reader (the binary has it for the certificate files), first section.
        match <(SectionKind, Vec<u8>)>::from_pem_slice(text) {
            Ok((SectionKind::EcPrivateKey, der)) => Self::from_sec1(&der),
            Ok((SectionKind::PrivateKey, der)) => Self::from_pkcs8(&der),
            Ok((kind, _)) => Err(err(format!(
                "account key: a PEM {kind:?} section, not a private key"
            ))),
            Err(e) => Err(err(format!("account key: {e}"))),
        }
    }

    fn parts(&self) -> Parts<'_> {
        Parts {
            private: &self.private,
            public: self.pair.public_key().as_ref(),
        }
    }

    /// The key as PKCS#8 DER.
    pub fn pkcs8(&self) -> Vec<u8> {
        self.parts().pkcs8()
    }

    /// The key as SEC1 DER, as Go's `x509.MarshalECPrivateKey` writes it.
    pub fn sec1(&self) -> Vec<u8> {
        self.parts().sec1()
    }

    /// The key file's text, derper's form: PEM `EC PRIVATE KEY`.
    pub fn to_pem(&self) -> String {
        pem_encode("EC PRIVATE KEY", &self.sec1())
    }

    /// Reads the account key file at `path`, or makes a new key and writes it there (crash-safe,
    /// mode 0600). The flag says whether the key is new.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), AcmeError> {
        match std::fs::read(path) {
            Ok(text) => Self::from_pem(&text)
                .map(|k| (k, false))
                .map_err(|e| err(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = Self::generate()?;
                crate::fsutil::write_file_atomic(path, k.to_pem().as_bytes(), 0o600)
                    .map_err(|e| err(format!("writing {}: {e}", path.display())))?;
                Ok((k, true))
            }
            Err(e) => Err(err(format!("reading {}: {e}", path.display()))),
        }
    }

    /// The public key as a JWK (canonical JSON).
    pub fn jwk(&self) -> &str {
        &self.jwk
    }

    /// The JWK thumbprint (RFC 7638), base64url.
    pub fn thumbprint(&self) -> String {
        b64(&Sha256::digest(self.jwk.as_bytes()))
    }

    /// The key authorization for a challenge token (RFC 8555 section 8.1).
    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.thumbprint())
    }

    /// A JWS in the flattened JSON serialization, the body of every ACME POST. `kid` is the
    /// account URL once there is one (before, the JWK goes in the header: newAccount);
    /// `payload` None is a POST-as-GET (an empty payload).
    pub fn sign(
        &self,
        url: &str,
        nonce: &str,
        kid: Option<&str>,
        payload: Option<&str>,
    ) -> Result<String, AcmeError> {
        let key = match kid {
            Some(k) => format!(r#""kid":{}"#, json_str(k)),
            None => format!(r#""jwk":{}"#, self.jwk),
        };
        let protected = format!(
            r#"{{"alg":"ES256",{key},"nonce":{},"url":{}}}"#,
            json_str(nonce),
            json_str(url)
        );
        let protected = b64(protected.as_bytes());
        let payload = payload.map(|p| b64(p.as_bytes())).unwrap_or_default();
        let signing_input = format!("{protected}.{payload}");
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| err("cannot sign an ACME request"))?;
        Ok(format!(
            r#"{{"protected":"{protected}","payload":"{payload}","signature":"{}"}}"#,
            b64(sig.as_ref())
        ))
    }
}

/// The canonical JWK of an uncompressed P-256 point (0x04, x, y).
fn jwk_of(public: &[u8]) -> Result<String, AcmeError> {
    match public {
        [4, xy @ ..] if xy.len() == 64 => {
            let (x, y) = xy.split_at(32);
            Ok(format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                b64(x),
                b64(y)
            ))
        }
        _ => Err(err("account key: not an uncompressed P-256 point")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A key as Go's `x509.MarshalECPrivateKey` and `pem.EncodeToMemory` write it (derper's
    /// `acme-account.key`), made with `openssl ecparam -name prime256v1 -genkey -noout`.
    const GO_STYLE: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIBl9uQYw7pGfZhmsFBQ0equ3h+1jM3itwlTbcflbJdDnoAoGCCqGSM49
AwEHoUQDQgAE28w2buic222qHrMtDpMKMyx1aXLBf8xumJ9p0Eb46A2npGsQ6mTQ
P5yb9khBtt3lQEPl0mmjuQz6pBuR2yKJWA==
-----END EC PRIVATE KEY-----
";

    #[test]
    fn key_file_forms_round_trip() {
        let k = AccountKey::from_pem(GO_STYLE.as_bytes()).unwrap();
        // derper's form is written back byte for byte.
        assert_eq!(k.to_pem(), GO_STYLE);
        let again = AccountKey::from_pkcs8(&k.pkcs8()).unwrap();
        assert_eq!(again.jwk(), k.jwk());
        let pkcs8_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", k.pkcs8()));
        assert_eq!(
            AccountKey::from_pem(pkcs8_pem.as_bytes()).unwrap().jwk(),
            k.jwk()
        );
        // ring takes the PKCS#8 written here.
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &k.pkcs8(),
            &SystemRandom::new(),
        )
        .unwrap();
        let fresh = AccountKey::generate().unwrap();
        let back = AccountKey::from_pem(fresh.to_pem().as_bytes()).unwrap();
        assert_eq!(back.jwk(), fresh.jwk());
        // Garbage is an error, never a panic.
        for bad in [&b""[..], b"\x30", b"\x30\x82\xff", b"\x30\x03\x02\x01\x02"] {
            assert!(AccountKey::from_sec1(bad).is_err());
            assert!(AccountKey::from_pkcs8(bad).is_err());
        }
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2]));
        assert!(AccountKey::from_pem(cert.as_bytes()).is_err());
    }

    #[test]
    fn key_file_is_made_once() {
        let dir = std::env::temp_dir().join(format!("derpd-acme-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acme-account.key");
        let (k, new) = AccountKey::load_or_create(&path).unwrap();
        assert!(new);
        let (k2, new2) = AccountKey::load_or_create(&path).unwrap();
        assert!(!new2);
        assert_eq!(k.jwk(), k2.jwk());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "junk").unwrap();
        assert!(AccountKey::load_or_create(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
