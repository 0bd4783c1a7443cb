//! `--certmode letsencrypt`: the certificate keeper. It loads the certificate a previous run
//! (of derpd or derper) stored in `--certdir`, orders one from the ACME CA when there is none
//! or a third of its lifetime is left (looking hourly), retries failures with back-off (1 to
//! 30 minutes, never a hot loop against the CA), stores what it gets and serves it to new
//! connections through the resolver, meta-cert appended. While the CA validates, it answers
//! TLS-ALPN-01 in the resolver and HTTP-01 through the port-80 listener ([`Challenges`]).
//!
//! derper's `--certdir` layout, read and written: for a DNS name autocert's cache, the file
//! `<hostname>` (the `EC PRIVATE KEY`, then the chain) and the account key `acme_account+key`;
//! for an IP address (`--acme-ip-certs`) `<ip>.crt` and `<ip>.key` (`:` → `.`) and the account
//! key `acme-account.key`.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::files::check_cert;
use super::resolver::DerpCertResolver;
use super::{ServerCert, TlsError};
use crate::acme::client::{AcmeClient, ChallengeKind, Proof, Solver};
use crate::acme::{AccountKey, Backoff, Identifier, PemFile, SHORTLIVED};
use crate::config::{AcmeConfig, TlsMode};
use crate::sync::lock;

/// The proofs served while the CA validates: HTTP-01 key authorizations by token, TLS-ALPN-01
/// certificates by SNI. One or two at a time, so kept in a list.
#[derive(Default)]
pub struct Challenges {
    kinds: Vec<ChallengeKind>,
    served: Mutex<Vec<(ChallengeKind, String, Served)>>,
}

/// A proof as it is served.
#[derive(Clone)]
enum Served {
    /// The body of the HTTP-01 answer.
    Http(String),
    /// The TLS-ALPN-01 certificate.
    Alpn(Arc<CertifiedKey>),
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Challenges({} served)", self.pending())
    }
}

impl Challenges {
    /// Answers the challenge types in `kinds`, the preferred first.
    pub fn new(kinds: Vec<ChallengeKind>) -> Self {
        Self {
            kinds,
            ..Self::default()
        }
    }

    /// What is served for `kind` and `key` (a token, or a lowercased SNI).
    fn find(&self, kind: ChallengeKind, key: &str) -> Option<Served> {
        let served = lock(&self.served);
        let found = served.iter().find(|(k, name, _)| *k == kind && name == key);
        found.map(|(_, _, s)| s.clone())
    }

    /// Serves `what` for `kind` and `key` from now on (`None`: stops serving it).
    fn set(&self, kind: ChallengeKind, key: &str, what: Option<Served>) {
        let mut served = lock(&self.served);
        served.retain(|(k, name, _)| !(*k == kind && name == key));
        served.extend(what.map(|s| (kind, key.to_string(), s)));
    }

    /// The body for `GET /.well-known/acme-challenge/<token>`, while the CA validates.
    pub fn http01(&self, token: &str) -> Option<String> {
        match self.find(ChallengeKind::Http01, token)? {
            Served::Http(body) => Some(body),
            Served::Alpn(_) => None,
        }
    }

    /// Proofs being served now.
    pub fn pending(&self) -> usize {
        lock(&self.served).len()
    }

    /// The TLS-ALPN-01 certificate for `sni`, while the CA validates.
    pub fn alpn_cert(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        match self.find(ChallengeKind::TlsAlpn01, &sni.to_ascii_lowercase())? {
            Served::Alpn(cert) => Some(cert),
            Served::Http(_) => None,
        }
    }
}

impl Solver for Challenges {
    fn kinds(&self) -> &[ChallengeKind] {
        &self.kinds
    }

    fn present(&self, _id: &Identifier, proof: &Proof) -> Result<(), String> {
        match proof {
            Proof::Http01 {
                token,
                key_authorization,
            } => {
                let body = Served::Http(key_authorization.clone());
                self.set(ChallengeKind::Http01, token, Some(body));
            }
            Proof::TlsAlpn01 {
                sni,
                cert_der,
                key_pkcs8,
            } => {
                let key = PrivateKeyDer::Pkcs8(key_pkcs8.clone().into());
                let key = rustls::crypto::ring::sign::any_supported_type(&key)
                    .map_err(|e| format!("the challenge key: {e}"))?;
                let ck = CertifiedKey::new(vec![cert_der.clone().into()], key);
                let sni = sni.to_ascii_lowercase();
                self.set(
                    ChallengeKind::TlsAlpn01,
                    &sni,
                    Some(Served::Alpn(Arc::new(ck))),
                );
            }
        }
        Ok(())
    }

    fn remove(&self, _id: &Identifier, proof: &Proof) {
        match proof {
            Proof::Http01 { token, .. } => self.set(ChallengeKind::Http01, token, None),
            Proof::TlsAlpn01 { sni, .. } => {
                self.set(ChallengeKind::TlsAlpn01, &sni.to_ascii_lowercase(), None)
            }
        }
    }
}

/// Where the certificate and the account key live in `--certdir` (derper's names).
#[derive(Debug, Clone)]
enum Layout {
    /// autocert's cache entry: key and chain in one file.
    Autocert(PathBuf),
    /// derper's IP certificate manager: chain and key apart.
    IpPair { crt: PathBuf, key: PathBuf },
}

impl Layout {
    fn for_mode(mode: &TlsMode, ip: Option<IpAddr>) -> (Self, PathBuf) {
        let dir = &mode.certdir;
        match ip {
            Some(ip) => {
                let stem = crate::acme::ip_cert_file_stem(ip);
                let pair = Self::IpPair {
                    crt: dir.join(format!("{stem}.crt")),
                    key: dir.join(format!("{stem}.key")),
                };
                (pair, dir.join("acme-account.key"))
            }
            None => (
                Self::Autocert(dir.join(mode.hostname.to_ascii_lowercase())),
                dir.join("acme_account+key"),
            ),
        }
    }

    /// The file named in messages.
    fn crt(&self) -> &Path {
        match self {
            Self::Autocert(p) => p,
            Self::IpPair { crt, .. } => crt,
        }
    }

    fn read(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        // autocert's entry holds the key too: it is read once.
        let (chain_pem, key_pem) = match self {
            Self::Autocert(p) => (read(p)?, None),
            Self::IpPair { crt, key } => (read(crt)?, Some(read(key)?)),
        };
        let pem = |text: &[u8]| {
            PemFile::parse(text).map_err(|e| format!("{}: {e}", self.crt().display()))
        };
        let mut chain = pem(&chain_pem)?;
        let key = match key_pem {
            Some(k) => pem(&k)?.key,
            None => chain.key.take(),
        };
        let key = key.ok_or_else(|| format!("{}: no private key", self.crt().display()))?;
        Ok((chain.certs, key))
    }

    /// Writes the chain (PEM, leaf first) and its key (SEC1 `EC PRIVATE KEY`, 0600), each file
    /// crash-safe.
    fn write(&self, chain_pem: &str, key_sec1: &[u8]) -> std::io::Result<()> {
        let key_pem = crate::p256::pem_encode("EC PRIVATE KEY", key_sec1);
        let write = crate::fsutil::write_file_atomic;
        match self {
            Self::Autocert(p) => write(p, format!("{key_pem}{chain_pem}").as_bytes(), 0o600),
            Self::IpPair { crt, key } => {
                write(key, key_pem.as_bytes(), 0o600)?;
                write(crt, chain_pem.as_bytes(), 0o644)
            }
        }
    }
}

/// Gets and renews the certificate; [`CertKeeper::run`] is its task.
#[derive(Debug)]
pub struct CertKeeper {
    acme: AcmeConfig,
    hostname: String,
    ids: Vec<Identifier>,
    layout: Layout,
    account_key: Arc<AccountKey>,
    resolver: Arc<DerpCertResolver>,
    challenges: Arc<Challenges>,
    ca_tls: Arc<rustls::ClientConfig>,
    /// When to order a new certificate; `None` until there is one.
    renew_at: Mutex<Option<SystemTime>>,
}

/// The rustls configuration of `--certmode letsencrypt` and its keeper, with the certificate
/// stored in `--certdir` already served when it is still good.
pub fn acme_server_config(
    mode: &TlsMode,
    acme: &AcmeConfig,
    server_public_key: [u8; 32],
    with_meta_cert: bool,
) -> Result<(Arc<rustls::ServerConfig>, CertKeeper), TlsError> {
    let challenges = Arc::new(Challenges::new(acme.challenges.clone()));
    let resolver = Arc::new(DerpCertResolver::empty(
        &mode.hostname,
        with_meta_cert.then_some(server_public_key),
        Some(challenges.clone()),
    )?);
    let ca_tls = match &acme.ca_file {
        Some(p) => crate::trust::ca_file_client_config(p),
        None => crate::trust::client_config(crate::trust::Trust::CaBundle),
    }
    .map_err(|detail| TlsError::Acme(format!("the ACME CA's TLS trust: {detail}")))?;
    let ids: Vec<Identifier> = if acme.ips.is_empty() {
        vec![Identifier::for_host(&mode.hostname)]
    } else {
        acme.ips.iter().map(|ip| Identifier::ip(*ip)).collect()
    };
    let (layout, key_path) = Layout::for_mode(mode, ids[0].as_ip());
    let account_key = Arc::new(account_key(&mode.certdir, &key_path).map_err(TlsError::Acme)?);
    let keeper = CertKeeper {
        acme: acme.clone(),
        hostname: mode.hostname.clone(),
        ids,
        layout,
        account_key,
        resolver: resolver.clone(),
        challenges,
        ca_tls,
        renew_at: Mutex::new(None),
    };
    keeper.load_stored();
    Ok((
        super::resolver::config_with(resolver, mode.ciphers)?,
        keeper,
    ))
}

/// The ACME account key in `--certdir` (`path`), made (and the directory created) on the
/// first start. Read at start, so that a `--certdir` that cannot be written stops derpd with
/// the reason rather than failing every order.
fn account_key(certdir: &Path, path: &Path) -> Result<AccountKey, String> {
    crate::fsutil::create_dir_all_durably(certdir, 0o700)
        .map_err(|e| format!("cannot create {}: {e}", certdir.display()))?;
    let (key, created) = AccountKey::load_or_create(path).map_err(|e| e.to_string())?;
    if created {
        log::info!("created the ACME account key {}", path.display());
    }
    Ok(key)
}

impl CertKeeper {
    /// The proofs to serve while the CA validates (the port-80 listener answers HTTP-01).
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// A certificate is being served.
    pub fn has_certificate(&self) -> bool {
        lock(&self.renew_at).is_some()
    }

    /// A CA-issued chain and its key, as the resolver takes them.
    fn server_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> ServerCert {
        ServerCert {
            chain,
            key,
            generated: false,
            hostname_is_ip: self.ids[0].as_ip().is_some(),
            replaced: None,
        }
    }

    /// Serves the stored certificate if it is for `--hostname`, matches its key and has not
    /// expired; says in the log why not otherwise.
    fn load_stored(&self) {
        let path = self.layout.crt();
        let cert = match self.layout.read() {
            Ok((chain, key)) => self.server_cert(chain, key),
            Err(e) if !path.exists() => {
                log::info!("no stored certificate for {} ({e})", self.hostname);
                return;
            }
            Err(e) => {
                log::warn!("the stored certificate cannot be used: {e}; ordering a new one");
                return;
            }
        };
        if let Err(e) = self.install(&cert, path) {
            log::warn!("the stored certificate cannot be used: {e}; ordering a new one");
        } else {
            log::info!("using the stored certificate {}", path.display());
        }
    }

    /// Checks `cert` (key, name, dates), serves it and notes when to renew it.
    fn install(&self, cert: &ServerCert, path: &Path) -> Result<(), String> {
        check_cert(cert, &self.hostname, path, path).map_err(|e| e.to_string())?;
        let (not_before, not_after) = validity(&cert.chain[0])?;
        let now = unix_now();
        if now >= not_after {
            return Err(format!("it expired at {}", format_time(not_after)));
        }
        self.resolver.replace(cert).map_err(|e| e.to_string())?;
        let at = crate::acme::renew_at(not_before, not_after);
        *lock(&self.renew_at) = Some(UNIX_EPOCH + Duration::from_secs(at.max(0) as u64));
        log::info!(
            "certificate for {}: valid until {}, renewal from {}",
            self.hostname,
            format_time(not_after),
            format_time(at)
        );
        Ok(())
    }

    /// Orders, stores and serves a new certificate.
    async fn renew(&self) -> Result<(), String> {
        let t = &self.acme.timing;
        let deadline = Instant::now() + t.order_timeout;
        let profile = self.acme.ip_certs.then_some(SHORTLIVED);
        let key = self.account_key.clone();
        let order = async {
            let mut c = boxed(AcmeClient::new(
                &self.acme.directory,
                self.ca_tls.clone(),
                key,
            ))
            .await?;
            let email = self.acme.email.as_deref();
            boxed(c.issue(&self.ids, profile, email, &*self.challenges, deadline)).await
        };
        let issued = order.await.map_err(|e| e.to_string())?;
        let key_sec1 = crate::p256::pkcs8_to_sec1(&issued.key_pkcs8)
            .ok_or("the CA's certificate key is not P-256")?;
        let chain = PemFile::parse(issued.chain_pem.as_bytes())
            .map_err(|e| format!("the CA's chain: {e}"))?
            .certs;
        let cert = self.server_cert(chain, PrivateKeyDer::Pkcs8(issued.key_pkcs8.into()));
        // Written here, in the keeper's task: a few KB once per renewal (handing it to a
        // blocking thread cost 2.8 KB on mipsel).
        self.layout
            .write(&issued.chain_pem, &key_sec1)
            .map_err(|e| format!("cannot store {}: {e}", self.layout.crt().display()))?;
        self.install(&cert, self.layout.crt())
    }

    /// Keeps a certificate served: orders one when there is none or it is due, looks again
    /// every `check_every`, waits with back-off after a failure. Runs until the server stops.
    pub async fn run(self) {
        let t = self.acme.timing;
        let mut backoff = Backoff::with(t.retry_first, t.retry_max);
        loop {
            let due = *lock(&self.renew_at);
            let now = SystemTime::now();
            let wait = match due.map(|at| at.duration_since(now)) {
                Some(Ok(left)) if !left.is_zero() => left.min(t.check_every),
                _ => self.order(&mut backoff).await,
            };
            smol::Timer::after(wait).await;
        }
    }

    /// Orders a certificate now; how long to wait before looking again (none after a
    /// success, the back-off after a failure).
    async fn order(&self, backoff: &mut Backoff) -> Duration {
        log::info!(
            "ordering a certificate for {} from {}",
            self.hostname,
            self.acme.directory
        );
        let result = boxed(self.renew()).await;
        if result.is_ok() && lock(&self.renew_at).is_some_and(|at| at > SystemTime::now()) {
            backoff.reset();
            return Duration::ZERO;
        }
        let w = backoff.next_wait();
        match result {
            // Due again at once (a lifetime shorter than the clock's error): wait as after a
            // failure rather than order in a loop.
            Ok(()) => log::warn!(
                "the new certificate for {} is already due for renewal (is the clock right?); \
                 next order in {w:?}",
                self.hostname
            ),
            Err(e) => log::warn!(
                "cannot get a certificate for {} from the ACME CA: {e}; next try in {w:?}",
                self.hostname
            ),
        }
        w
    }
}

/// `f` behind a pointer: its state machine is polled through one call instead of being
/// inlined into the caller's (on mipsel the keeper's four steps cost 600 bytes less so).
fn boxed<'a, T>(
    f: impl Future<Output = T> + Send + 'a,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

/// A leaf's notBefore and notAfter, seconds since the epoch.
fn validity(leaf: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, c) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let v = c.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `2026-12-03 04:05:06 UTC`. By hand (days to a civil date, as in Howard Hinnant's
/// `civil_from_days`): the `time` crate's formatter cost about 20 KB on mipsel for two log lines.
fn format_time(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::config::AcmeTiming;
    use crate::tls::testutil::{handshake, TempDir};
    use rcgen::{CertificateParams, KeyPair};

    const NAME: &str = "derp.example.com";

    #[test]
    fn times_in_the_log_are_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(1_796_094_306), "2026-12-01 03:05:06 UTC");
        assert_eq!(format_time(4_107_542_399), "2100-02-28 23:59:59 UTC");
        assert_eq!(format_time(-1), "1969-12-31 23:59:59 UTC");
    }

    /// A keeper for `NAME` in `dir`, the stored certificate (if any) loaded.
    fn keeper(dir: &Path) -> (Arc<rustls::ServerConfig>, CertKeeper) {
        // Any PEM certificate will do as the CA's roots: nothing is ordered here.
        let roots = dir.join("ca-roots.pem");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca = CertificateParams::new(vec!["ca.test".into()]).unwrap();
        std::fs::write(&roots, ca.self_signed(&key).unwrap().pem()).unwrap();
        let mode = TlsMode::manual(NAME, dir.to_path_buf());
        let acme = AcmeConfig {
            directory: "https://ca.test/dir".into(),
            ca_file: Some(roots),
            email: None,
            ip_certs: false,
            ips: Vec::new(),
            challenges: vec![ChallengeKind::TlsAlpn01],
            timing: AcmeTiming::default(),
        };
        acme_server_config(&mode, &acme, [7; 32], true).unwrap()
    }

    /// autocert's cache entry for `NAME`, valid `days_before` days ago to `days_after` from now.
    fn store(dir: &Path, name: &str, days_before: i64, days_after: i64) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec![name.into()]).unwrap();
        let day = |n: i64| Duration::from_secs(n.unsigned_abs() * 24 * 60 * 60);
        let now = SystemTime::now();
        let after = if days_after < 0 {
            now - day(days_after)
        } else {
            now + day(days_after)
        };
        crate::tls::template::set_validity(&mut p, now - day(days_before), after);
        let cert = p.self_signed(&key).unwrap();
        let key_sec1 = crate::p256::pkcs8_to_sec1(&key.serialize_der()).unwrap();
        Layout::Autocert(dir.join(NAME))
            .write(&cert.pem(), &key_sec1)
            .unwrap();
        cert.der().to_vec()
    }

    #[test]
    fn a_good_stored_certificate_is_served_at_start() {
        let tmp = TempDir::new();
        let leaf = store(&tmp.0, NAME, 30, 60);
        let (cfg, k) = keeper(&tmp.0);
        assert!(k.has_certificate());
        // Renewal when a third of the 90 days is left: 30 days from now.
        let at = lock(&k.renew_at).unwrap();
        let left = at.duration_since(SystemTime::now()).unwrap().as_secs() / 86_400;
        assert!((29..=30).contains(&left), "{left}");
        // Served with the meta-cert after it, and TLS-ALPN-01 offered beside http/1.1.
        let certs = handshake(cfg.clone(), false, NAME, true).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].as_ref(), leaf.as_slice());
        assert_eq!(
            cfg.alpn_protocols,
            [b"http/1.1".to_vec(), crate::acme::ACME_TLS_ALPN.to_vec()]
        );
    }

    #[test]
    fn unusable_stored_certificates_are_not_served() {
        for (name, before, after) in [(NAME, 90, -1), ("other.example.com", 1, 60)] {
            let tmp = TempDir::new();
            store(&tmp.0, name, before, after);
            let (cfg, k) = keeper(&tmp.0);
            assert!(!k.has_certificate(), "{name} {after}");
            // No certificate: the handshake is refused.
            handshake(cfg, false, NAME, true).unwrap_err();
        }
        let tmp = TempDir::new();
        let (_, k) = keeper(&tmp.0);
        assert!(!k.has_certificate(), "nothing stored");
    }

    #[test]
    fn challenges_are_served_while_presented() {
        let ch = Challenges::new(vec![ChallengeKind::Http01]);
        let id = Identifier::dns(NAME);
        let proof = Proof::Http01 {
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
        };
        ch.present(&id, &proof).unwrap();
        assert_eq!(ch.http01("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(ch.http01("other"), None);
        ch.remove(&id, &proof);
        assert_eq!(ch.http01("tok"), None);
        let (cert_der, key_pkcs8) = crate::acme::alpn_challenge_cert(&id, "ka").unwrap();
        let proof = Proof::TlsAlpn01 {
            sni: NAME.into(),
            cert_der,
            key_pkcs8,
        };
        ch.present(&id, &proof).unwrap();
        assert!(ch.alpn_cert("DERP.example.com").is_some());
        ch.remove(&id, &proof);
        assert!(ch.alpn_cert(NAME).is_none());
    }
}
