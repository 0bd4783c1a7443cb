//! `--certmode manual`'s certificate files, as derper's `NewManualCertManager` reads them:
//! `<certdir>/<stem>.crt` and `.key`, checked (key matches leaf, leaf matches `--hostname`);
//! for an IP `--hostname`, generated when missing and replaced when a crash left them broken.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use super::error::io_err;
use super::hostname::verify_hostname;
use super::selfsigned::create_self_signed_ip_cert;
use super::TlsError;

/// derper's certificate file stem for `--certmode manual`: the hostname with every character
/// outside `[a-zA-Z0-9-.]` removed (so IPv6 colons vanish: `::1` → `1`).
pub fn cert_file_stem(hostname: &str) -> String {
    hostname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect()
}

/// A certificate chain and key for `--certmode manual`.
#[derive(Debug)]
pub struct ServerCert {
    /// The chain as in the `.crt` file, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key for the leaf.
    pub key: PrivateKeyDer<'static>,
    /// True if we just generated a self-signed certificate (IP hostname, no files).
    pub generated: bool,
    /// True if `--hostname` is an IP address (the caller then prints a DERPNode with a
    /// `sha256-raw:` CertName, and any SNI is accepted).
    pub hostname_is_ip: bool,
    /// Set when the generated certificate replaced a broken self-signed pair (a half missing or
    /// empty, or a key that does not match): what was wrong, and the old pin when known. The
    /// certificate's pin has changed, so the DERPMap's `CertName` must be updated.
    pub replaced: Option<String>,
}

impl ServerCert {
    /// Lowercase hex SHA-256 of the leaf certificate's DER, as used in `CertName: "sha256-raw:…"`.
    pub fn leaf_sha256_hex(&self) -> String {
        let leaf = self.chain.first().map(|c| c.as_ref()).unwrap_or_default();
        crate::key::hex(&Sha256::digest(leaf))
    }
}

/// Loads `<certdir>/<stem>.crt` and `<certdir>/<stem>.key` (see [`cert_file_stem`]), like
/// derper's `NewManualCertManager`.
///
/// If `hostname` is an IP address and both files are missing, a self-signed certificate for it
/// is generated and written there (like derper's `createSelfSignedIPCert`). A loaded certificate
/// must match `hostname` by Go's `VerifyHostname` rules and its key must match the leaf.
///
/// For an IP address, a broken self-signed pair is replaced by a new one (with
/// [`ServerCert::replaced`] saying why): a half missing or empty, or a key that does not belong
/// to the certificate. That is what a power cut while the pair was written can leave (derper
/// writes the certificate and then the key, derpd before its writes were crash-safe the key and
/// then the certificate, neither making the names durable); refusing would fail every respawn.
/// A certificate that is not self-signed came from a CA through the administrator and is never
/// replaced, nor is anything for a DNS hostname: those errors are returned.
pub fn load_or_create(hostname: &str, certdir: &Path) -> Result<ServerCert, TlsError> {
    let Ok(ip) = hostname.parse::<IpAddr>() else {
        return load(hostname, certdir);
    };
    let (crt, key) = cert_paths(hostname, certdir);
    for path in [&crt, &key] {
        crate::fsutil::remove_temp_files(path);
    }
    let replaced = match files_exist(&crt, &key)? {
        (false, false) => None,
        _ => match load(hostname, certdir) {
            Ok(cert) => return Ok(cert),
            Err(e) => Some(broken_self_signed_pair(e, &crt, &key)?),
        },
    };
    let mut cert = create_self_signed_ip_cert(ip, hostname, certdir, &crt, &key)?;
    check_cert(&cert, hostname, &crt, &key)?;
    cert.replaced = replaced;
    Ok(cert)
}

/// Whether the pair that failed to load with `e` is a broken self-signed pair that may be
/// replaced: `Ok(what was wrong)`, or `Err(e)` to refuse.
fn broken_self_signed_pair(e: TlsError, crt: &Path, key: &Path) -> Result<String, TlsError> {
    let describe = |path: &Path| match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Some(format!("{} is missing", path.display()))
        }
        _ if holds_nothing(path) => Some(format!("{} is empty", path.display())),
        _ => None,
    };
    let crt_problem = describe(crt);
    let mut problems: Vec<String> = crt_problem.iter().chain(&describe(key)).cloned().collect();
    if problems.is_empty() {
        match e {
            TlsError::KeyMismatch { .. } => problems.push(format!(
                "the key in {} does not belong to the certificate in {}",
                key.display(),
                crt.display()
            )),
            e => return Err(e),
        }
    }
    let mut why = format!(
        "the self-signed certificate pair was broken ({}), as a power cut while it was being \
         written can leave it",
        problems.join("; ")
    );
    if crt_problem.is_none() {
        // Only a certificate derpd could have made (self-signed, alone) is replaced.
        match read_chain(crt).ok().filter(|c| is_self_signed(c)) {
            Some(chain) => {
                let old = chain.first().map(|c| c.as_ref()).unwrap_or_default();
                why.push_str(&format!(
                    "; the old certificate's pin was sha256-raw:{}",
                    crate::key::hex(&Sha256::digest(old))
                ));
            }
            None => return Err(e),
        }
    }
    Ok(why)
}

/// True for a file with nothing in it: zero bytes, or only NUL bytes (what some filesystems
/// show for data that never reached the disk). False if it cannot be read.
fn holds_nothing(path: &Path) -> bool {
    fs::read(path).is_ok_and(|b| b.iter().all(|&x| x == 0))
}

/// One certificate whose issuer is its subject, as derpd (and derper) generate for an IP.
fn is_self_signed(chain: &[CertificateDer<'static>]) -> bool {
    match chain {
        [leaf] => x509_parser::parse_x509_certificate(leaf)
            .is_ok_and(|(_, c)| c.subject().as_raw() == c.issuer().as_raw()),
        _ => false,
    }
}

/// Whether the certificate and the key file exist.
fn files_exist(crt: &Path, key: &Path) -> Result<(bool, bool), TlsError> {
    Ok((
        crt.try_exists()
            .map_err(io_err("check the certificate file", crt))?,
        key.try_exists()
            .map_err(io_err("check the key file", key))?,
    ))
}

/// `<certdir>/<stem>.crt` and `.key`.
pub(super) fn cert_paths(hostname: &str, certdir: &Path) -> (PathBuf, PathBuf) {
    let stem = cert_file_stem(hostname);
    (
        certdir.join(format!("{stem}.crt")),
        certdir.join(format!("{stem}.key")),
    )
}

/// Loads and checks the certificate files; never creates them (a reload uses this).
pub fn load(hostname: &str, certdir: &Path) -> Result<ServerCert, TlsError> {
    let (crt, key) = cert_paths(hostname, certdir);
    let cert = match files_exist(&crt, &key)? {
        (true, true) => ServerCert {
            chain: read_chain(&crt)?,
            key: read_key(&key)?,
            generated: false,
            hostname_is_ip: hostname.parse::<IpAddr>().is_ok(),
            replaced: None,
        },
        (false, false) => {
            return Err(TlsError::CertFilesMissing {
                hostname: hostname.to_owned(),
                crt,
                key,
            })
        }
        (true, false) => {
            return Err(TlsError::IncompleteFiles {
                present: crt,
                missing: key,
            })
        }
        (false, true) => {
            return Err(TlsError::IncompleteFiles {
                present: key,
                missing: crt,
            })
        }
    };
    check_cert(&cert, hostname, &crt, &key)?;
    Ok(cert)
}

/// The key must match the leaf, and the leaf the hostname.
pub(super) fn check_cert(
    cert: &ServerCert,
    hostname: &str,
    crt: &Path,
    key: &Path,
) -> Result<(), TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &provider).map_err(
        |source| match source {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                crt: crt.to_path_buf(),
                key: key.to_path_buf(),
            },
            source => TlsError::Rustls {
                context: format!("cannot use the private key in {}", key.display()),
                source,
            },
        },
    )?;
    verify_hostname(&cert.chain, hostname, crt)
}

fn pem_err(path: &Path, action: &'static str, e: pem::Error) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Io {
            action,
            path: path.to_owned(),
            source,
        },
        other => TlsError::BadPem {
            path: path.to_owned(),
            detail: other.to_string(),
        },
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    const ACTION: &str = "read the certificate file";
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, ACTION, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, ACTION, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => pem_err(path, "read the key file", e),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::tls::template::common_name;
    use crate::tls::testutil::{mode, write_dns_cert, TempDir};
    use rcgen::{CertificateParams, IsCa, KeyPair, SanType};

    #[test]
    fn file_stems() {
        assert_eq!(cert_file_stem("::1"), "1");
        assert_eq!(cert_file_stem("fd7a:115c::1"), "fd7a115c1");
        assert_eq!(cert_file_stem("derp.example.com"), "derp.example.com");
        assert_eq!(cert_file_stem("10.0.0.1"), "10.0.0.1");
        assert_eq!(cert_file_stem("a_b/../c d*"), "ab..cd");
    }

    #[test]
    fn dns_hostname_without_files_fails() {
        let tmp = TempDir::new();
        let err = load_or_create("derp.example.com", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::CertFilesMissing { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("derp.example.com.crt") && msg.contains("derp.example.com.key"));
        assert!(!tmp.0.join("derp.example.com.crt").exists());
    }

    /// A self-signed pair for an IP that a crash left broken is replaced, saying why and that
    /// the pin changed; the new pair is then what every later start loads.
    #[test]
    fn broken_self_signed_pair_is_replaced() {
        const IP: &str = "192.0.2.9";
        type Break = fn(&Path, &Path);
        let cases: [(&str, Break, &str); 5] = [
            (
                "crt missing",
                |crt, _| fs::remove_file(crt).unwrap(),
                "192.0.2.9.crt is missing",
            ),
            (
                "key missing",
                |_, key| fs::remove_file(key).unwrap(),
                "192.0.2.9.key is missing",
            ),
            (
                "key empty",
                |_, key| fs::write(key, "").unwrap(),
                "192.0.2.9.key is empty",
            ),
            (
                "crt empty",
                |crt, _| fs::write(crt, "").unwrap(),
                "192.0.2.9.crt is empty",
            ),
            (
                "pair mismatched",
                |_, key| {
                    let other = TempDir::new();
                    load_or_create(IP, &other.0).unwrap();
                    fs::copy(other.0.join("192.0.2.9.key"), key).unwrap();
                },
                "does not belong to the certificate",
            ),
        ];
        for (case, break_it, want) in cases {
            let tmp = TempDir::new();
            let (crt, key) = (tmp.0.join("192.0.2.9.crt"), tmp.0.join("192.0.2.9.key"));
            let first = load_or_create(IP, &tmp.0).unwrap();
            assert!(first.generated && first.replaced.is_none());
            let old_pin = first.leaf_sha256_hex();
            break_it(&crt, &key);
            // A temporary file left by an interrupted write is cleaned up too.
            fs::write(tmp.0.join(".192.0.2.9.key.derpd-tmp.1"), "half").unwrap();

            let new = load_or_create(IP, &tmp.0).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(new.generated, "{case}");
            let why = new.replaced.as_deref().unwrap_or_else(|| panic!("{case}"));
            assert!(why.contains(want), "{case}: {why}");
            assert_ne!(new.leaf_sha256_hex(), old_pin, "{case}");
            // The old pin is named when the old certificate is still there to read.
            let crt_survived = case != "crt missing" && case != "crt empty";
            assert_eq!(why.contains(&old_pin), crt_survived, "{case}: {why}");

            let again = load_or_create(IP, &tmp.0).unwrap();
            assert!(!again.generated && again.replaced.is_none(), "{case}");
            assert_eq!(again.leaf_sha256_hex(), new.leaf_sha256_hex(), "{case}");
            assert_eq!(mode(&key), 0o600, "{case}");
            let mut names: Vec<_> = fs::read_dir(&tmp.0)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["192.0.2.9.crt", "192.0.2.9.key"], "{case}");
        }
    }

    /// A regeneration that stops half-way (here: the certificate cannot be written) leaves a
    /// key without a certificate, never a certificate beside a key that is not its own.
    #[test]
    fn interrupted_regeneration_leaves_no_mismatched_pair() {
        let tmp = TempDir::new();
        let (crt, key) = (tmp.0.join("192.0.2.12.crt"), tmp.0.join("192.0.2.12.key"));
        let first = load_or_create("192.0.2.12", &tmp.0).unwrap();
        fs::write(&key, "").unwrap();
        let blocker = tmp
            .0
            .join(format!(".192.0.2.12.crt.derpd-tmp.{}", std::process::id()));
        fs::create_dir(&blocker).unwrap();
        let err = load_or_create("192.0.2.12", &tmp.0).unwrap_err();
        assert!(
            err.to_string().contains("write the certificate file"),
            "{err}"
        );
        assert!(!crt.exists(), "the old certificate went first");
        assert!(
            fs::metadata(&key).unwrap().len() > 0,
            "the new key was written"
        );
        fs::remove_dir(&blocker).unwrap();
        let next = load_or_create("192.0.2.12", &tmp.0).unwrap();
        assert!(next
            .replaced
            .as_deref()
            .unwrap()
            .contains("192.0.2.12.crt is missing"));
        assert_ne!(next.leaf_sha256_hex(), first.leaf_sha256_hex());
    }

    /// What derpd did not make is never replaced: a DNS name's files, a CA-issued certificate
    /// for an IP, a key file with something in it that is not a key.
    #[test]
    fn files_derpd_did_not_make_are_refused_not_replaced() {
        let tmp = TempDir::new();
        write_dns_cert(&tmp.0, "derp.example.com", &["derp.example.com"]);
        let dns_crt = tmp.0.join("derp.example.com.crt");
        let before = fs::read(&dns_crt).unwrap();
        fs::remove_file(tmp.0.join("derp.example.com.key")).unwrap();
        let err = load_or_create("derp.example.com", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::IncompleteFiles { .. }), "{err}");
        assert!(err.to_string().contains("derp.example.com.key"), "{err}");
        assert_eq!(fs::read(&dns_crt).unwrap(), before);
        assert!(!tmp.0.join("derp.example.com.key").exists());

        // A certificate for the IP issued by a CA, its key lost or empty.
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name = common_name("Test CA");
        let ca = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf_params.subject_alt_names = vec![SanType::IpAddress("192.0.2.10".parse().unwrap())];
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let crt = tmp.0.join("192.0.2.10.crt");
        let key = tmp.0.join("192.0.2.10.key");
        fs::write(&crt, leaf.pem()).unwrap();
        fs::write(&key, leaf_key.serialize_pem()).unwrap();
        assert!(!load_or_create("192.0.2.10", &tmp.0).unwrap().generated);
        fs::remove_file(&key).unwrap();
        let err = load_or_create("192.0.2.10", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::IncompleteFiles { .. }), "{err}");
        fs::write(&key, "").unwrap();
        let err = load_or_create("192.0.2.10", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        assert_eq!(fs::read_to_string(&crt).unwrap(), leaf.pem());

        // Garbage in the key of a self-signed pair: not a crash (each file is written whole).
        let ip_key = tmp.0.join("192.0.2.11.key");
        load_or_create("192.0.2.11", &tmp.0).unwrap();
        fs::write(&ip_key, "not a key\n").unwrap();
        let err = load_or_create("192.0.2.11", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        assert_eq!(fs::read_to_string(&ip_key).unwrap(), "not a key\n");
    }

    #[test]
    fn bad_files_fail_clearly() {
        let tmp = TempDir::new();
        write_dns_cert(&tmp.0, "derp.example.com", &["derp.example.com"]);
        let crt = tmp.0.join("derp.example.com.crt");
        let key = tmp.0.join("derp.example.com.key");

        // Key from another certificate.
        write_dns_cert(&tmp.0, "x", &["derp.example.com"]);
        fs::copy(tmp.0.join("x.key"), &key).unwrap();
        let err = load_or_create("derp.example.com", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");

        fs::write(&key, "not a key\n").unwrap();
        let err = load_or_create("derp.example.com", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");

        fs::write(&crt, "").unwrap();
        let err = load_or_create("derp.example.com", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

        fs::write(
            &crt,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_or_create("derp.example.com", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::BadPem { .. }), "{err}");
    }
}
