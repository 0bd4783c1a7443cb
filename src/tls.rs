//! TLS for derpd: derper's DERP meta-certificate, `--certmode manual` certificate loading (with
//! self-signed certificates generated for IP hostnames) and a rustls `ServerConfig` that enforces
//! derper's SNI rule and serves `[leaf, intermediates…, meta-cert]`.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

/// The DERP protocol version, which derper uses as the meta-cert's serial number.
const PROTOCOL_VERSION: u8 = 2;
/// Most bytes of TLS records rustls queues for one client that reads slowly (its default is
/// 64 KiB per connection, outside the packet pool). A write past it waits for the socket, as
/// on plain TCP; a 64 KiB packet still goes, in records of at most this size.
pub const SEND_BUFFER_LIMIT: usize = 4 << 10;

/// Applies [`SEND_BUFFER_LIMIT`] to an accepted connection (rustls queues up to 64 KiB of
/// records for a slow reader by default).
pub fn limit_send_buffer(c: &mut rustls::ServerConnection) {
    c.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
}
/// derper's meta-cert is valid from now − 30 days to now + 30 days.
const META_VALIDITY: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// We regenerate the meta-cert this long before it expires (derper never does).
const META_RENEW_BEFORE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// After a failed regeneration, wait this long before trying (and warning) again.
const META_RETRY: Duration = Duration::from_secs(60 * 60);
/// "expires in 1 year; a bit over that is rejected by macOS etc" (derper).
const IP_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
/// DER of the ECPrivateKey `parameters` field for P-256: `[0] { OID 1.2.840.10045.3.1.7 }`.
const SEC1_P256_PARAMS: &[u8] = &[
    0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
];

/// Errors from loading, generating or serving TLS certificates. The messages are meant for the
/// administrator: they name the file involved and say what to do.
#[derive(Debug)]
pub enum TlsError {
    /// A file or directory operation (`action`, e.g. "read the key file") failed.
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A DNS `--hostname` has neither a `.crt` nor a `.key` file in the certificate directory.
    CertFilesMissing {
        hostname: String,
        crt: PathBuf,
        key: PathBuf,
    },
    /// Only one of the `.crt` / `.key` pair exists.
    IncompleteFiles { present: PathBuf, missing: PathBuf },
    /// A file is not valid PEM.
    BadPem { path: PathBuf, detail: String },
    /// The certificate file has no `CERTIFICATE` block.
    NoCertificate { path: PathBuf },
    /// The key file has no private key block.
    NoKey { path: PathBuf },
    /// The first certificate in the file is not a valid X.509 certificate.
    BadCertificate { path: PathBuf, detail: String },
    /// The private key does not belong to the leaf certificate.
    KeyMismatch { crt: PathBuf, key: PathBuf },
    /// The leaf is not valid for `--hostname` by Go's `VerifyHostname` rules; `names` are the
    /// DNS and IP SANs it does cover.
    HostnameMismatch {
        path: PathBuf,
        hostname: String,
        names: Vec<String>,
    },
    /// Certificate generation failed.
    Rcgen(rcgen::Error),
    /// rustls rejected a key or the configuration.
    Rustls {
        context: String,
        source: rustls::Error,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            TlsError::CertFilesMissing { hostname, crt, key } => write!(
                f,
                "no certificate for --hostname {hostname:?}: {} and {} do not exist; put the PEM \
                 certificate chain and its private key there (only an IP address --hostname gets \
                 a self-signed certificate generated automatically)",
                crt.display(),
                key.display()
            ),
            TlsError::IncompleteFiles { present, missing } => write!(
                f,
                "{} exists but {} does not; provide both the certificate and its key, or remove \
                 {} (for an IP address --hostname a new self-signed pair is then generated)",
                present.display(),
                missing.display(),
                present.display()
            ),
            TlsError::BadPem { path, detail } => {
                write!(f, "{} is not a valid PEM file: {detail}", path.display())
            }
            TlsError::NoCertificate { path } => write!(
                f,
                "{} contains no PEM \"CERTIFICATE\" block; it must hold the certificate chain, \
                 leaf first",
                path.display()
            ),
            TlsError::NoKey { path } => write!(
                f,
                "{} contains no PEM private key (expected \"PRIVATE KEY\", \"EC PRIVATE KEY\" or \
                 \"RSA PRIVATE KEY\")",
                path.display()
            ),
            TlsError::BadCertificate { path, detail } => write!(
                f,
                "the first certificate in {} cannot be parsed: {detail}",
                path.display()
            ),
            TlsError::KeyMismatch { crt, key } => write!(
                f,
                "the private key in {} does not belong to the certificate in {}; install the \
                 matching pair",
                key.display(),
                crt.display()
            ),
            TlsError::HostnameMismatch {
                path,
                hostname,
                names,
            } => {
                let names = if names.is_empty() {
                    "no DNS or IP subject alternative names".to_owned()
                } else {
                    names.join(", ")
                };
                write!(
                    f,
                    "the certificate in {} is not valid for --hostname {hostname:?} (it covers: \
                     {names}); fix --hostname or install a certificate for that name",
                    path.display()
                )
            }
            TlsError::Rcgen(e) => write!(f, "cannot generate a certificate: {e}"),
            TlsError::Rustls { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Io { source, .. } => Some(source),
            TlsError::Rcgen(e) => Some(e),
            TlsError::Rustls { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> Self {
        TlsError::Rcgen(e)
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn rustls_err(context: impl Into<String>) -> impl FnOnce(rustls::Error) -> TlsError {
    let context = context.into();
    move |source| TlsError::Rustls { context, source }
}

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

fn meta_cert_at(server_public_key: &[u8; 32], now: SystemTime) -> Result<MetaCert, TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let not_before = now.checked_sub(META_VALIDITY).unwrap_or(UNIX_EPOCH);
    let not_after = now.checked_add(META_VALIDITY).unwrap_or(now);

    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&[PROTOCOL_VERSION]));
    params.distinguished_name = common_name(&format!("derpkey{}", hex_lower(server_public_key)));
    set_validity(&mut params, not_before, not_after);
    no_ca_only_basic_constraints(&mut params);
    let cert = params.self_signed(&key)?;
    Ok(MetaCert {
        der: cert.der().clone(),
        not_after,
    })
}

/// Makes BasicConstraints(CA=false) the only CA-related extension, as Go writes it for a non-CA
/// template with `BasicConstraintsValid`. rcgen's `IsCa::ExplicitNoCa` would also add a
/// SubjectKeyIdentifier, which Go only adds for CAs, so we write the extension ourselves:
/// critical, value `SEQUENCE {}` (Go omits the default `cA FALSE` and `pathLen -1`).
fn no_ca_only_basic_constraints(params: &mut CertificateParams) {
    params.is_ca = IsCa::NoCa;
    params.use_authority_key_identifier_extension = false;
    let mut bc = CustomExtension::from_oid_content(OID_BASIC_CONSTRAINTS, vec![0x30, 0x00]);
    bc.set_criticality(true);
    params.custom_extensions.push(bc);
}

/// A Subject with only a CommonName, encoded as PrintableString when possible like Go does.
fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    match cn.try_into() {
        Ok(printable) => dn.push(DnType::CommonName, DnValue::PrintableString(printable)),
        Err(_) => dn.push(DnType::CommonName, DnValue::Utf8String(cn.to_owned())),
    }
    dn
}

fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    // Epoch-plus-duration avoids depending on the `time` crate's optional `std` feature.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + not_before.duration_since(UNIX_EPOCH).unwrap_or_default();
    params.not_after = epoch + not_after.duration_since(UNIX_EPOCH).unwrap_or_default();
}

fn hex_lower(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

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
        hex_lower(&Sha256::digest(leaf))
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
                    hex_lower(&Sha256::digest(old))
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
fn cert_paths(hostname: &str, certdir: &Path) -> (PathBuf, PathBuf) {
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
fn check_cert(cert: &ServerCert, hostname: &str, crt: &Path, key: &Path) -> Result<(), TlsError> {
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

/// Go's `x509.Certificate.VerifyHostname`: IP hostnames match IP SANs only, DNS hostnames match
/// DNS SANs (a leading `*.` covers one label, ASCII case-insensitive); no CommonName fallback.
fn verify_hostname(
    chain: &[CertificateDer<'static>],
    hostname: &str,
    path: &Path,
) -> Result<(), TlsError> {
    let leaf = chain.first().map(|c| c.as_ref()).unwrap_or_default();
    let bad = |detail: String| TlsError::BadCertificate {
        path: path.to_owned(),
        detail,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?;
    let general_names = san.map(|s| s.value.general_names.as_slice()).unwrap_or(&[]);

    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    for name in general_names {
        match name {
            GeneralName::DNSName(d) => dns_names.push(*d),
            GeneralName::IPAddress(b) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                    ips.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                    ips.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
    let candidate = hostname
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .filter(|h| !h.is_empty())
        .unwrap_or(hostname);
    let ok = match candidate.parse::<IpAddr>() {
        Ok(ip) => ips.iter().any(|c| same_ip(*c, ip)),
        Err(_) => dns_names.iter().any(|p| dns_name_matches(p, hostname)),
    };
    if ok {
        return Ok(());
    }
    let names = dns_names
        .iter()
        .map(|d| d.to_string())
        .chain(ips.iter().map(|i| i.to_string()))
        .collect();
    Err(TlsError::HostnameMismatch {
        path: path.to_owned(),
        hostname: hostname.to_owned(),
        names,
    })
}

/// Go's `net.IP.Equal`: an IPv4 address equals its IPv4-mapped IPv6 form.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let v6 = |ip: IpAddr| -> Ipv6Addr {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        }
    };
    v6(a) == v6(b)
}

/// Go's per-SAN check in `VerifyHostname` (`validHostname*`, `matchHostnames`, `matchExactly`).
fn dns_name_matches(pattern: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if !(valid_hostname(&host, false) && valid_hostname(pattern, true)) {
        return !matches!(host.as_str(), "" | ".")
            && !matches!(pattern, "" | ".")
            && host == pattern.to_ascii_lowercase();
    }
    let pattern = pattern.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    if pattern.is_empty() || host.is_empty() {
        return false;
    }
    let (p, h): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), host.split('.').collect());
    p.len() == h.len()
        && p.iter()
            .zip(&h)
            .enumerate()
            .all(|(i, (p, h))| (i == 0 && *p == "*") || p == h)
}

fn valid_hostname(host: &str, is_pattern: bool) -> bool {
    let host = if is_pattern {
        host
    } else {
        host.strip_suffix('.').unwrap_or(host)
    };
    if host.is_empty() || host == "*" {
        return false;
    }
    host.split('.').enumerate().all(|(i, label)| {
        !label.is_empty()
            && ((is_pattern && i == 0 && label == "*")
                || label
                    .char_indices()
                    .all(|(j, c)| c.is_ascii_alphanumeric() || (c == '-' && j != 0) || c == '_'))
    })
}

/// derper's `createSelfSignedIPCert`, then writes the files.
fn create_self_signed_ip_cert(
    ip: IpAddr,
    hostname: &str,
    certdir: &Path,
    crt_path: &Path,
    key_path: &Path,
) -> Result<ServerCert, TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let provider = rustls::crypto::ring::default_provider();
    // Go: rand.Int(rand.Reader, 2^128), i.e. a random non-negative 128-bit serial.
    let mut serial = [0u8; 16];
    provider
        .secure_random
        .fill(&mut serial)
        .map_err(|e| TlsError::Rustls {
            context: "cannot generate a random serial number".to_owned(),
            source: e.into(),
        })?;
    if serial.iter().all(|b| *b == 0) {
        serial[15] = 1; // RFC 5280 wants a positive serial.
    }

    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.distinguished_name = common_name(hostname);
    params.subject_alt_names = vec![SanType::IpAddress(ip)];
    set_validity(
        &mut params,
        now,
        now.checked_add(IP_CERT_VALIDITY).unwrap_or(now),
    );
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    no_ca_only_basic_constraints(&mut params);
    let cert = params.self_signed(&key)?;

    // Go writes SEC1 "EC PRIVATE KEY"; rcgen only gives PKCS#8, so we convert. Should the
    // conversion ever fail we write the PKCS#8 "PRIVATE KEY", which loads just as well.
    let pkcs8 = key.serialize_der();
    let (key_pem, key_der) = match p256_pkcs8_to_sec1(&pkcs8) {
        Some(sec1) => (
            pem_encode("EC PRIVATE KEY", &sec1),
            PrivateKeyDer::Sec1(sec1.into()),
        ),
        None => (
            pem_encode("PRIVATE KEY", &pkcs8),
            PrivateKeyDer::Pkcs8(pkcs8.into()),
        ),
    };
    let cert_pem = pem_encode("CERTIFICATE", cert.der());

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
        .map_err(io_err("write the certificate file", crt_path))?;
    Ok(ServerCert {
        chain: vec![cert.der().clone()],
        key: key_der,
        generated: true,
        hostname_is_ip: true,
        replaced: None,
    })
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

/// Reads one DER TLV with the expected tag (short or one/two-byte long length); returns
/// (contents, rest).
fn der_take(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
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
    (t == tag && rest.len() >= len).then(|| rest.split_at(len))
}

/// PKCS#8 (RFC 5208) → SEC1 `ECPrivateKey` (RFC 5915) with the P-256 curve parameters, as Go's
/// `x509.MarshalECPrivateKey` writes it. ring's PKCS#8 embeds an ECPrivateKey without the
/// parameters, so we rebuild it; all lengths are fixed for P-256.
fn p256_pkcs8_to_sec1(pkcs8: &[u8]) -> Option<Vec<u8>> {
    let (body, _) = der_take(pkcs8, 0x30)?;
    let (_version, rest) = der_take(body, 0x02)?;
    let (_algorithm, rest) = der_take(rest, 0x30)?;
    let (ec_key, _) = der_take(rest, 0x04)?;
    let (ec_body, _) = der_take(ec_key, 0x30)?;
    let (_ec_version, rest) = der_take(ec_body, 0x02)?;
    let (secret, rest) = der_take(rest, 0x04)?;
    let rest = der_take(rest, 0xa0).map_or(rest, |(_, r)| r);
    let (public_key, _) = der_take(rest, 0xa1)?; // BIT STRING, 0x03 0x42 0x00 <65 bytes>
    if secret.len() != 32 || public_key.len() != 68 {
        return None;
    }
    let mut out = vec![0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20];
    out.extend_from_slice(secret);
    out.extend_from_slice(SEC1_P256_PARAMS);
    out.extend_from_slice(&[0xa1, 0x44]);
    out.extend_from_slice(public_key);
    Some(out)
}

/// PEM with 64-column base64 lines, as Go's `pem.Encode` writes it.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n =
            (chunk.iter().enumerate()).fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            let sextet = usize::try_from(n >> (18 - 6 * i) & 0x3f).unwrap_or_default();
            b64.push(if i <= chunk.len() { B64[sextet] } else { b'=' });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|c| char::from(*c)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Builds the rustls server configuration for `--certmode manual`: ring, TLS 1.3 and 1.2,
/// ALPN `http/1.1`, no client authentication, and a certificate resolver that enforces
/// derper's SNI rule and (if `with_meta_cert`) appends the meta-cert, renewing it a week before
/// it expires.
pub fn server_config(
    cert: &ServerCert,
    hostname: &str,
    server_public_key: [u8; 32],
    with_meta_cert: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = Arc::new(DerpCertResolver::new(
        cert,
        hostname,
        with_meta_cert.then_some(server_public_key),
    )?);
    config_with(resolver)
}

/// [`server_config`] plus a handle that swaps in renewed certificate files without a restart.
pub fn reloadable_server_config(
    cert: &ServerCert,
    hostname: &str,
    certdir: &Path,
    server_public_key: [u8; 32],
    with_meta_cert: bool,
) -> Result<(Arc<rustls::ServerConfig>, CertReloader), TlsError> {
    let resolver = Arc::new(DerpCertResolver::new(
        cert,
        hostname,
        with_meta_cert.then_some(server_public_key),
    )?);
    let (crt, key) = cert_paths(hostname, certdir);
    let reloader = CertReloader {
        stamp: Mutex::new(files_stamp(&crt, &key)),
        resolver: resolver.clone(),
        hostname: hostname.to_string(),
        certdir: certdir.to_path_buf(),
        crt,
        key,
    };
    Ok((config_with(resolver)?, reloader))
}

/// Reloads `--certmode manual` certificates: on demand (SIGHUP) or when the files change.
/// Connections already up keep the certificate they were handshaken with.
#[derive(Debug)]
pub struct CertReloader {
    resolver: Arc<DerpCertResolver>,
    hostname: String,
    certdir: PathBuf,
    crt: PathBuf,
    key: PathBuf,
    /// The files as last looked at.
    stamp: Mutex<FilesStamp>,
}

/// (modified, length, inode) of the certificate and key files; `None` for a missing file.
type FilesStamp = [Option<(SystemTime, u64, u64)>; 2];

fn files_stamp(crt: &Path, key: &Path) -> FilesStamp {
    use std::os::unix::fs::MetadataExt;
    [crt, key].map(|p| {
        let m = fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    })
}

impl CertReloader {
    /// Reads the files and serves them to new connections. On error the old certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = files_stamp(&self.crt, &self.key);
        let cert = load(&self.hostname, &self.certdir)?;
        self.resolver.replace(&cert)?;
        log::info!(
            "loaded certificate {} (leaf sha256 {})",
            self.crt.display(),
            cert.leaf_sha256_hex()
        );
        Ok(())
    }

    /// Reloads if either file changed since the last look. `None`: nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = files_stamp(&self.crt, &self.key);
        if *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) == now {
            return None;
        }
        Some(self.reload())
    }
}

fn config_with(resolver: Arc<DerpCertResolver>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rustls_err("cannot configure TLS versions"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // DERP clients never resume (Go's client has no session cache), and a resumed TLS 1.3
    // session would carry no meta-cert anyway; don't spend router memory on a session cache.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct Served {
    /// The certificate chain from the files, leaf first.
    chain: Vec<CertificateDer<'static>>,
    signing_key: Arc<dyn SigningKey>,
    /// `chain` plus the meta-cert, as served.
    key: Arc<CertifiedKey>,
    /// When to regenerate the meta-cert; None when there is none.
    renew_after: Option<SystemTime>,
}

/// What the resolver serves and regenerates. One lock guards both halves, so a reload
/// (`replace`) and a meta-cert renewal (`resolve_at`) on two executor threads can never wait on
/// each other in opposite orders.
#[derive(Debug)]
struct ResolverState {
    /// The current meta-cert, kept to serve it again with a reloaded chain.
    meta: Option<MetaCert>,
    served: Served,
}

#[derive(Debug)]
struct DerpCertResolver {
    /// Lowercased: rustls hands us the SNI lowercased, so we compare exactly after lowercasing
    /// (derper compares the raw strings; Go clients send the hostname as configured).
    hostname: String,
    hostname_is_ip: bool,
    /// The server's DERP key, when the meta-cert is enabled.
    meta_key: Option<[u8; 32]>,
    /// The only lock of the resolver.
    state: Mutex<ResolverState>,
}

impl DerpCertResolver {
    fn new(
        cert: &ServerCert,
        hostname: &str,
        meta_key: Option<[u8; 32]>,
    ) -> Result<Self, TlsError> {
        let signing_key = signing_key(cert)?;
        let meta = meta_key.as_ref().map(generate_meta_cert).transpose()?;
        let served = build_served(cert.chain.clone(), signing_key, meta.as_ref());
        Ok(DerpCertResolver {
            hostname: hostname.to_ascii_lowercase(),
            hostname_is_ip: hostname.parse::<IpAddr>().is_ok(),
            meta_key,
            state: Mutex::new(ResolverState { meta, served }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResolverState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `cert` to new connections from now on, with the current meta-cert.
    fn replace(&self, cert: &ServerCert) -> Result<(), TlsError> {
        let signing_key = signing_key(cert)?;
        let mut st = self.lock();
        st.served = build_served(cert.chain.clone(), signing_key, st.meta.as_ref());
        Ok(())
    }

    /// derper's rule: a DNS hostname requires SNI == hostname; an IP hostname accepts anything.
    fn sni_allowed(&self, sni: Option<&str>) -> bool {
        self.hostname_is_ip || sni == Some(self.hostname.as_str())
    }

    /// The key to serve at `now`, regenerating the meta-cert if it is due.
    fn resolve_at(&self, now: SystemTime) -> Arc<CertifiedKey> {
        let mut st = self.lock();
        if let (Some(server_key), Some(renew_after)) = (self.meta_key, st.served.renew_after) {
            if now > renew_after {
                match meta_cert_at(&server_key, now) {
                    Ok(meta) => {
                        log::info!("renewed the DERP meta-certificate");
                        let chain = std::mem::take(&mut st.served.chain);
                        let key = Arc::clone(&st.served.signing_key);
                        st.served = build_served(chain, key, Some(&meta));
                        st.meta = Some(meta);
                    }
                    Err(e) => {
                        log::warn!(
                            "cannot renew the DERP meta-certificate, keeping the old one: {e}"
                        );
                        st.served.renew_after = now.checked_add(META_RETRY);
                    }
                }
            }
        }
        Arc::clone(&st.served.key)
    }
}

fn signing_key(cert: &ServerCert) -> Result<Arc<dyn SigningKey>, TlsError> {
    rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(cert.key.clone_key())
        .map_err(rustls_err("cannot use the certificate's private key"))
}

/// The chain followed by the meta-cert (last, as derper does), and when to renew the latter.
fn build_served(
    chain: Vec<CertificateDer<'static>>,
    signing_key: Arc<dyn SigningKey>,
    meta: Option<&MetaCert>,
) -> Served {
    let mut served = chain.clone();
    served.extend(meta.map(|m| m.der.clone()));
    Served {
        key: Arc::new(CertifiedKey::new(served, Arc::clone(&signing_key))),
        chain,
        signing_key,
        renew_after: meta.map(|m| {
            m.not_after
                .checked_sub(META_RENEW_BEFORE)
                .unwrap_or(UNIX_EPOCH)
        }),
    }
}

impl ResolvesServerCert for DerpCertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = client_hello.server_name();
        if !self.sni_allowed(sni) {
            log::debug!(
                "TLS handshake rejected: SNI {sni:?} is not {:?}",
                self.hostname
            );
            return None;
        }
        Some(self.resolve_at(SystemTime::now()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, ServerConnection};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::ParsedExtension;

    const SERVER_KEY: [u8; 32] = [0xab; 32];
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
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

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    fn cn(cert: &X509Certificate<'_>) -> String {
        let cn = cert.subject().iter_common_name().next().unwrap();
        cn.as_str().unwrap().to_owned()
    }

    fn unix(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Writes a self-signed certificate for `names` (PKCS#8 key) as `<stem>.crt/.key`.
    fn write_dns_cert(dir: &Path, stem: &str, names: &[&str]) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        fs::write(dir.join(format!("{stem}.crt")), cert.pem()).unwrap();
        fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }

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

    #[test]
    fn file_stems() {
        assert_eq!(cert_file_stem("::1"), "1");
        assert_eq!(cert_file_stem("fd7a:115c::1"), "fd7a115c1");
        assert_eq!(cert_file_stem("derp.example.com"), "derp.example.com");
        assert_eq!(cert_file_stem("10.0.0.1"), "10.0.0.1");
        assert_eq!(cert_file_stem("a_b/../c d*"), "ab..cd");
    }

    #[test]
    fn hostname_matching() {
        assert!(dns_name_matches("derp.example.com", "derp.example.com"));
        assert!(dns_name_matches("DERP.example.com", "derp.EXAMPLE.com."));
        assert!(dns_name_matches("*.example.com", "derp.example.com"));
        assert!(!dns_name_matches("*.example.com", "a.derp.example.com"));
        assert!(!dns_name_matches("*.example.com", "example.com"));
        assert!(!dns_name_matches("d*.example.com", "derp.example.com"));
        assert!(!dns_name_matches("other.example.com", "derp.example.com"));
        assert!(same_ip(
            "1.2.3.4".parse().unwrap(),
            "::ffff:1.2.3.4".parse().unwrap()
        ));
        assert!(!same_ip(
            "1.2.3.4".parse().unwrap(),
            "1.2.3.5".parse().unwrap()
        ));
    }

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

    #[test]
    fn generated_ip_cert_is_like_derpers_and_reused() {
        let tmp = TempDir::new();
        let certdir = tmp.0.join("sub").join("certs");
        let before = SystemTime::now();
        let cert = load_or_create("192.0.2.7", &certdir).unwrap();
        assert!(cert.generated);
        assert!(cert.hostname_is_ip);
        assert_eq!(cert.chain.len(), 1);
        assert!(matches!(cert.key, PrivateKeyDer::Sec1(_)));

        let x = parse(&cert.chain[0]);
        assert_eq!(cn(&x), "192.0.2.7");
        assert_eq!(x.subject().as_raw(), x.issuer().as_raw());
        assert_eq!(
            x.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.2"
        );
        match x.public_key().parsed().unwrap() {
            x509_parser::public_key::PublicKey::EC(ec) => assert_eq!(ec.key_size(), 256),
            other => panic!("not EC: {other:?}"),
        }
        assert!(x.raw_serial().len() >= 15 && x.raw_serial().len() <= 17);
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::IPAddress(&[192, 0, 2, 7])]
        );
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());
        assert_eq!(ku.flags, 0b101);
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
            .starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
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
        assert_eq!(hex, hex_lower(&Sha256::digest(&cert.chain[0])));
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
    fn loaded_cert_must_match_hostname() {
        let tmp = TempDir::new();
        write_dns_cert(&tmp.0, "derp.example.com", &["other.example.com"]);
        let err = load_or_create("derp.example.com", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::HostnameMismatch { .. }), "{err}");
        assert!(err.to_string().contains("other.example.com"), "{err}");

        // A wildcard covers one label; PKCS#8 keys load.
        write_dns_cert(&tmp.0, "a.example.net", &["*.example.net"]);
        let ok = load_or_create("a.example.net", &tmp.0).unwrap();
        assert!(!ok.generated && !ok.hostname_is_ip);
        assert!(matches!(ok.key, PrivateKeyDer::Pkcs8(_)));

        // An IP hostname needs an IP SAN, not a DNS SAN or CN.
        write_dns_cert(&tmp.0, "192.0.2.1", &["192.0.2.2", "foo.example"]);
        let err = load_or_create("192.0.2.1", &tmp.0).unwrap_err();
        assert!(matches!(err, TlsError::HostnameMismatch { .. }), "{err}");
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

    #[derive(Debug)]
    struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.0.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.0.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// Runs an in-memory handshake; returns the certificates the client saw.
    fn handshake(
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
    fn connected(
        server: Arc<rustls::ServerConfig>,
        tls12: bool,
        name: &str,
        sni: bool,
    ) -> Result<(ClientConnection, ServerConnection), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let mut client_cfg = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_no_client_auth();
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

    fn assert_meta_last(certs: &[CertificateDer<'static>], leaf: &CertificateDer<'static>) {
        assert_eq!(certs.len(), 2);
        assert_eq!(&certs[0], leaf);
        assert_eq!(
            cn(&parse(&certs[1])),
            format!("derpkey{}", hex_lower(&SERVER_KEY))
        );
    }

    #[test]
    fn handshake_dns_hostname_enforces_sni() {
        let tmp = TempDir::new();
        write_dns_cert(&tmp.0, "derp.example.com", &["derp.example.com"]);
        let cert = load_or_create("derp.example.com", &tmp.0).unwrap();
        let cfg = server_config(&cert, "derp.example.com", SERVER_KEY, true).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
        for tls12 in [false, true] {
            let certs = handshake(Arc::clone(&cfg), tls12, "derp.example.com", true).unwrap();
            assert_meta_last(&certs, &cert.chain[0]);
            // rustls lowercases the SNI; we compare case-insensitively.
            handshake(Arc::clone(&cfg), tls12, "DERP.example.com", true).unwrap();
            handshake(Arc::clone(&cfg), tls12, "other.example.com", true).unwrap_err();
            handshake(Arc::clone(&cfg), tls12, "derp.example.com", false).unwrap_err();
            handshake(Arc::clone(&cfg), tls12, "192.0.2.1", true).unwrap_err();
        }

        let plain = server_config(&cert, "derp.example.com", SERVER_KEY, false).unwrap();
        let certs = handshake(plain, false, "derp.example.com", true).unwrap();
        assert_eq!(certs, cert.chain);
    }

    /// A slow reader's connection queues at most [`SEND_BUFFER_LIMIT`] of records: a 64 KiB
    /// packet is taken in pieces as the socket drains, not all at once (rustls's default).
    #[test]
    fn send_buffer_is_limited() {
        use std::io::Write as _;
        let tmp = TempDir::new();
        let cert = load_or_create("127.0.0.1", &tmp.0).unwrap();
        let cfg = server_config(&cert, "127.0.0.1", SERVER_KEY, true).unwrap();
        let packet = vec![0x5a; 64 << 10];
        for (limited, most) in [(false, packet.len()), (true, SEND_BUFFER_LIMIT)] {
            let (_client, mut server) =
                connected(Arc::clone(&cfg), false, "127.0.0.1", true).unwrap();
            if limited {
                limit_send_buffer(&mut server);
            }
            // Nothing is written to a socket: everything taken stays queued in rustls.
            let mut taken = 0;
            while taken < packet.len() {
                match server.writer().write(&packet[taken..]).unwrap() {
                    0 => break,
                    n => taken += n,
                }
            }
            assert!(
                taken <= most,
                "limited {limited}: {taken} bytes queued, most {most}"
            );
            if !limited {
                assert_eq!(taken, packet.len());
            }
        }
    }

    #[test]
    fn handshake_ip_hostname_accepts_any_sni() {
        let tmp = TempDir::new();
        let cert = load_or_create("127.0.0.1", &tmp.0).unwrap();
        let cfg = server_config(&cert, "127.0.0.1", SERVER_KEY, true).unwrap();
        for tls12 in [false, true] {
            // An IP server name means no SNI at all.
            let certs = handshake(Arc::clone(&cfg), tls12, "127.0.0.1", true).unwrap();
            assert_meta_last(&certs, &cert.chain[0]);
            handshake(Arc::clone(&cfg), tls12, "anything.example", true).unwrap();
            handshake(Arc::clone(&cfg), tls12, "anything.example", false).unwrap();
        }
    }

    fn resolver(with_meta: bool) -> (ServerCert, DerpCertResolver) {
        let tmp = TempDir::new();
        let cert = load_or_create("192.0.2.3", &tmp.0).unwrap();
        let meta_key = with_meta.then_some(SERVER_KEY);
        let r = DerpCertResolver::new(&cert, "192.0.2.3", meta_key).unwrap();
        (cert, r)
    }

    #[test]
    fn resolver_appends_meta_cert_last_or_not_at_all() {
        let (cert, r) = resolver(true);
        let key = r.resolve_at(SystemTime::now());
        assert_meta_last(&key.cert, &cert.chain[0]);
        key.keys_match().unwrap();

        let (cert, r) = resolver(false);
        let key = r.resolve_at(SystemTime::now() + 365 * DAY);
        assert_eq!(key.cert, cert.chain);
    }

    #[test]
    fn reloader_swaps_in_renewed_files_and_keeps_the_old_on_error() {
        let tmp = TempDir::new();
        let cert = load_or_create("192.0.2.3", &tmp.0).unwrap();
        let (_, reloader) =
            reloadable_server_config(&cert, "192.0.2.3", &tmp.0, SERVER_KEY, true).unwrap();
        let served = |r: &CertReloader| r.resolver.resolve_at(SystemTime::now());
        assert!(reloader.reload_if_changed().is_none(), "nothing changed");
        // A renewal: another certificate for the same IP, written over the files.
        let other = TempDir::new();
        let renewed = load_or_create("192.0.2.3", &other.0).unwrap();
        for ext in ["crt", "key"] {
            fs::copy(
                other.0.join(format!("192.0.2.3.{ext}")),
                tmp.0.join(format!("192.0.2.3.{ext}")),
            )
            .unwrap();
        }
        reloader.reload_if_changed().unwrap().unwrap();
        let key = served(&reloader);
        assert_eq!(key.cert[0], renewed.chain[0]);
        assert_meta_last(&key.cert, &renewed.chain[0]);
        key.keys_match().unwrap();
        // A half-written renewal (certificate without its key) is refused; the last good
        // certificate stays, and the change is reported once, not at every poll.
        let third = TempDir::new();
        load_or_create("192.0.2.3", &third.0).unwrap();
        fs::copy(third.0.join("192.0.2.3.crt"), tmp.0.join("192.0.2.3.crt")).unwrap();
        let e = reloader.reload_if_changed().unwrap().unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(reloader.reload_if_changed().is_none());
        assert_eq!(served(&reloader).cert[0], renewed.chain[0]);
        fs::write(tmp.0.join("192.0.2.3.key"), "garbage").unwrap();
        assert!(reloader.reload().is_err());
        fs::remove_file(tmp.0.join("192.0.2.3.key")).unwrap();
        assert!(
            reloader.reload().is_err(),
            "a missing file is never regenerated"
        );
        assert!(!tmp.0.join("192.0.2.3.key").exists());
        assert_eq!(served(&reloader).cert[0], renewed.chain[0]);
    }

    #[test]
    fn sni_rule() {
        let (_, ip) = resolver(false);
        assert!(ip.sni_allowed(None));
        assert!(ip.sni_allowed(Some("whatever.example")));
        let dns = DerpCertResolver {
            hostname: "derp.example.com".to_owned(),
            hostname_is_ip: false,
            ..ip
        };
        assert!(dns.sni_allowed(Some("derp.example.com")));
        assert!(!dns.sni_allowed(Some("evil.example.com")));
        assert!(!dns.sni_allowed(None));
    }

    #[test]
    fn meta_cert_is_renewed_a_week_before_expiry() {
        let (_, r) = resolver(true);
        let now = SystemTime::now();
        let first = r.resolve_at(now);
        let meta_der = |k: &CertifiedKey| k.cert.last().unwrap().clone();

        // Not yet due: the same key is served.
        let later = r.resolve_at(now + 22 * DAY);
        assert!(Arc::ptr_eq(&first, &later));

        // Due: a fresh meta-cert with the same CN, leaf unchanged.
        let renewed = r.resolve_at(now + 24 * DAY);
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(renewed.cert.len(), 2);
        assert_eq!(renewed.cert[0], first.cert[0]);
        assert_ne!(meta_der(&renewed), meta_der(&first));
        let (old, new) = (meta_der(&first), meta_der(&renewed));
        assert_eq!(cn(&parse(&old)), cn(&parse(&new)));

        // The new one is valid from the (injected) renewal time and is kept until 23 days later.
        let nb = parse(&new).validity().not_before.timestamp();
        assert!((nb - unix(now + 24 * DAY - 30 * DAY)).abs() <= 2);
        let again = r.resolve_at(now + 46 * DAY);
        assert!(Arc::ptr_eq(&renewed, &again));
        let renew_after = r.lock().served.renew_after.unwrap();
        assert!((unix(renew_after) - unix(now + 47 * DAY)).abs() <= 2);
    }

    /// A reload on one thread and a meta-cert renewal on another, over and over: with the two
    /// halves under two locks taken in opposite orders this hung within a few rounds.
    #[test]
    fn reload_and_renewal_on_two_threads_do_not_deadlock() {
        let (cert, r) = resolver(true);
        let r = Arc::new(r);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        const ROUNDS: u32 = 100;
        let renewer = {
            let (r, tx) = (Arc::clone(&r), done_tx.clone());
            std::thread::spawn(move || {
                let now = SystemTime::now();
                // Every call is past the previous renewal point, so every call renews.
                for i in 1..=ROUNDS {
                    r.resolve_at(now + i * 30 * DAY);
                }
                tx.send("renewer").unwrap();
            })
        };
        let reloader = {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    r.replace(&cert).unwrap();
                }
                done_tx.send("reloader").unwrap();
            })
        };
        for _ in 0..2 {
            let who = done_rx.recv_timeout(Duration::from_secs(60));
            assert!(who.is_ok(), "replace() and resolve_at() deadlocked");
        }
        renewer.join().unwrap();
        reloader.join().unwrap();
        // Both halves still agree: the served chain ends with the kept meta-cert.
        let st = r.lock();
        let meta = st.meta.as_ref().unwrap();
        assert_eq!(st.served.key.cert.last().unwrap(), &meta.der);
    }

    #[test]
    fn sec1_conversion_matches_go_layout() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let sec1 = p256_pkcs8_to_sec1(key.serialized_der()).unwrap();
        assert_eq!(sec1.len(), 121);
        assert_eq!(&sec1[..7], &[0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]);
        assert_eq!(&sec1[39..51], SEC1_P256_PARAMS);
        assert_eq!(&sec1[51..56], &[0xa1, 0x44, 0x03, 0x42, 0x00]);
        assert_eq!(&sec1[56..], key.public_key_raw());
        assert!(p256_pkcs8_to_sec1(b"\x30\x03\x02\x01").is_none());
    }

    #[test]
    fn error_messages_name_the_file() {
        let err = TlsError::Io {
            action: "read the key file",
            path: PathBuf::from("/etc/derp/x.key"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot read the key file /etc/derp/x.key: "),
            "{msg}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}
