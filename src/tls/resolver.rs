//! The rustls server side of `--certmode manual`: the `ServerConfig`, the certificate resolver
//! (derper's SNI rule; `[leaf, intermediates…, meta-cert]`, the meta-cert renewed before it
//! expires) and the reloader that swaps in renewed certificate files without a restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};

use super::acme::Challenges;
use super::error::rustls_err;
use super::files::cert_paths;
use super::meta::{generate_meta_cert, meta_cert_at, MetaCert};
use super::{load, ServerCert, TlsError};
use crate::config::TlsCiphers;

/// We regenerate the meta-cert this long before it expires (derper never does).
const META_RENEW_BEFORE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// After a failed regeneration, wait this long before trying (and warning) again.
const META_RETRY: Duration = Duration::from_secs(60 * 60);
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
    config_with(resolver, TlsCiphers::Auto)
}

/// [`server_config`] plus a handle that swaps in renewed certificate files without a restart.
pub fn reloadable_server_config(
    cert: &ServerCert,
    hostname: &str,
    certdir: &Path,
    server_public_key: [u8; 32],
    with_meta_cert: bool,
    ciphers: TlsCiphers,
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
    Ok((config_with(resolver, ciphers)?, reloader))
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
        *crate::sync::lock(&self.stamp) = files_stamp(&self.crt, &self.key);
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
        if *crate::sync::lock(&self.stamp) == now {
            return None;
        }
        Some(self.reload())
    }
}

/// The client offers only `acme-tls/1`: an ACME CA validating TLS-ALPN-01.
fn is_acme_validation(hello: &ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut p| p.any(|p| p == crate::acme::ACME_TLS_ALPN))
}

pub(super) fn config_with(
    resolver: Arc<DerpCertResolver>,
    ciphers: TlsCiphers,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let acme = resolver.challenges.is_some();
    let (provider, ours) = super::ciphers::provider(ciphers);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rustls_err("cannot configure TLS versions"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // --tls-ciphers: the suite this CPU is fast at, not the one the client's CPU is.
    config.ignore_client_order = ours;
    // After the handshake derpd protects the records itself (`tls::stream`).
    config.enable_secret_extraction = true;
    if acme {
        config
            .alpn_protocols
            .push(crate::acme::ACME_TLS_ALPN.to_vec());
    }
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
    /// `None` until the ACME CA issued the first certificate: handshakes are refused.
    served: Option<Served>,
}

#[derive(Debug)]
pub(super) struct DerpCertResolver {
    /// Lowercased: rustls hands us the SNI lowercased, so we compare exactly after lowercasing
    /// (derper compares the raw strings; Go clients send the hostname as configured).
    hostname: String,
    hostname_is_ip: bool,
    /// The server's DERP key, when the meta-cert is enabled.
    meta_key: Option<[u8; 32]>,
    /// The only lock of the resolver.
    state: Mutex<ResolverState>,
    /// `--certmode letsencrypt`: the TLS-ALPN-01 certificates being validated.
    challenges: Option<Arc<Challenges>>,
}

impl DerpCertResolver {
    fn new(
        cert: &ServerCert,
        hostname: &str,
        meta_key: Option<[u8; 32]>,
    ) -> Result<Self, TlsError> {
        let r = Self::empty(hostname, meta_key, None)?;
        r.replace(cert)?;
        Ok(r)
    }

    /// A resolver with no certificate yet (the ACME CA has not issued one), answering
    /// TLS-ALPN-01 validations from `challenges` if given.
    pub(super) fn empty(
        hostname: &str,
        meta_key: Option<[u8; 32]>,
        challenges: Option<Arc<Challenges>>,
    ) -> Result<Self, TlsError> {
        let meta = meta_key.as_ref().map(generate_meta_cert).transpose()?;
        Ok(DerpCertResolver {
            hostname: hostname.to_ascii_lowercase(),
            hostname_is_ip: crate::acme::host_ip(hostname).is_some(),
            meta_key,
            state: Mutex::new(ResolverState { meta, served: None }),
            challenges,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResolverState> {
        crate::sync::lock(&self.state)
    }

    /// Serves `cert` to new connections from now on, with the current meta-cert.
    pub(super) fn replace(&self, cert: &ServerCert) -> Result<(), TlsError> {
        let signing_key = signing_key(cert)?;
        let mut st = self.lock();
        st.served = Some(build_served(
            cert.chain.clone(),
            signing_key,
            st.meta.as_ref(),
        ));
        Ok(())
    }

    /// derper's rule: a DNS hostname requires SNI == hostname; an IP hostname accepts anything.
    fn sni_allowed(&self, sni: Option<&str>) -> bool {
        self.hostname_is_ip || sni == Some(self.hostname.as_str())
    }

    /// The key to serve at `now`, regenerating the meta-cert if it is due; `None` before the
    /// first certificate.
    fn resolve_at(&self, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        let mut st = self.lock();
        let st = &mut *st;
        let served = st.served.as_mut()?;
        if let (Some(server_key), Some(renew_after)) = (self.meta_key, served.renew_after) {
            if now > renew_after {
                match meta_cert_at(&server_key, now) {
                    Ok(meta) => {
                        log::info!("renewed the DERP meta-certificate");
                        let chain = std::mem::take(&mut served.chain);
                        let key = Arc::clone(&served.signing_key);
                        *served = build_served(chain, key, Some(&meta));
                        st.meta = Some(meta);
                    }
                    Err(e) => {
                        log::warn!(
                            "cannot renew the DERP meta-certificate, keeping the old one: {e}"
                        );
                        served.renew_after = now.checked_add(META_RETRY);
                    }
                }
            }
        }
        Some(Arc::clone(&served.key))
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
        if let Some(ch) = &self.challenges {
            if is_acme_validation(&client_hello) {
                // RFC 8737: the CA's validation connection, answered with the challenge
                // certificate for its SNI (the name, or an address's reverse-DNS name).
                return sni.and_then(|sni| ch.alpn_cert(sni));
            }
        }
        if !self.sni_allowed(sni) {
            log::debug!(
                "TLS handshake rejected: SNI {sni:?} is not {:?}",
                self.hostname
            );
            return None;
        }
        let key = self.resolve_at(SystemTime::now());
        if key.is_none() {
            crate::lograte::limited!(
                warn,
                crate::lograte::HEADS,
                "TLS handshake refused: no certificate for {} yet (waiting for the ACME CA)",
                self.hostname
            );
        }
        key
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::tls::load_or_create;
    use crate::tls::testutil::{
        cn, connected_trusting, handshake, parse, unix, write_dns_cert, TempDir, SERVER_KEY,
    };
    use crate::trust::Trust;
    use sha2::{Digest, Sha256};

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn assert_meta_last(certs: &[CertificateDer<'static>], leaf: &CertificateDer<'static>) {
        assert_eq!(certs.len(), 2);
        assert_eq!(&certs[0], leaf);
        assert_eq!(
            cn(&parse(&certs[1])),
            format!("derpkey{}", crate::key::hex(&SERVER_KEY))
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

    /// A client with a `sha256-raw:` pin ([`Trust::Pin`]) accepts the pinned leaf, with or
    /// without the meta-cert after it, over TLS 1.3 and 1.2, and refuses any other.
    #[test]
    fn pinned_clients_accept_only_the_pinned_leaf() {
        let tmp = TempDir::new();
        let cert = load_or_create("127.0.0.1", &tmp.0).unwrap();
        let pin: [u8; 32] = Sha256::digest(&cert.chain[0]).into();
        let mut other = pin;
        other[0] ^= 1;
        for meta in [true, false] {
            let cfg = server_config(&cert, "127.0.0.1", SERVER_KEY, meta).unwrap();
            for tls12 in [false, true] {
                let ok =
                    |trust| connected_trusting(Arc::clone(&cfg), tls12, "127.0.0.1", true, trust);
                ok(Trust::Pin(pin)).unwrap();
                ok(Trust::AnyCertificate).unwrap();
                let e = ok(Trust::Pin(other)).map(|_| ()).unwrap_err();
                assert!(e.contains("does not match the sha256-raw pin"), "{e}");
            }
        }
    }

    /// `--tls-ciphers`: the server's order wins over the client's (rustls's client lists
    /// AES-256-GCM first, then AES-128 and ChaCha20), TLS 1.3 and 1.2 alike, unless the choice
    /// is the client's order.
    #[test]
    fn cipher_choice_wins_over_the_client_order() {
        use rustls::CipherSuite as S;
        let tmp = TempDir::new();
        let cert = load_or_create("127.0.0.1", &tmp.0).unwrap();
        let suite = |choice, tls12| {
            let resolver =
                Arc::new(DerpCertResolver::new(&cert, "127.0.0.1", Some(SERVER_KEY)).unwrap());
            let cfg = config_with(resolver, choice).unwrap();
            let (client, _) =
                connected_trusting(cfg, tls12, "127.0.0.1", true, Trust::AnyCertificate).unwrap();
            client.negotiated_cipher_suite().unwrap().suite()
        };
        let chacha13 = S::TLS13_CHACHA20_POLY1305_SHA256;
        let chacha12 = S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256;
        assert_eq!(suite(TlsCiphers::ChaCha, false), chacha13);
        assert_eq!(suite(TlsCiphers::ChaCha, true), chacha12);
        assert_eq!(suite(TlsCiphers::Aes, false), S::TLS13_AES_128_GCM_SHA256);
        assert_eq!(
            suite(TlsCiphers::Client, false),
            S::TLS13_AES_256_GCM_SHA384
        );
        let auto = suite(TlsCiphers::Auto, false);
        match super::super::ciphers::resolved(TlsCiphers::Auto) {
            TlsCiphers::ChaCha => assert_eq!(auto, chacha13),
            _ => assert_eq!(auto, S::TLS13_AES_128_GCM_SHA256),
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
        let key = r.resolve_at(SystemTime::now()).unwrap();
        assert_meta_last(&key.cert, &cert.chain[0]);
        key.keys_match().unwrap();

        let (cert, r) = resolver(false);
        let key = r.resolve_at(SystemTime::now() + 365 * DAY).unwrap();
        assert_eq!(key.cert, cert.chain);
    }

    #[test]
    fn reloader_swaps_in_renewed_files_and_keeps_the_old_on_error() {
        let tmp = TempDir::new();
        let cert = load_or_create("192.0.2.3", &tmp.0).unwrap();
        let (_, reloader) = reloadable_server_config(
            &cert,
            "192.0.2.3",
            &tmp.0,
            SERVER_KEY,
            true,
            TlsCiphers::Auto,
        )
        .unwrap();
        let served = |r: &CertReloader| r.resolver.resolve_at(SystemTime::now()).unwrap();
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
        let first = r.resolve_at(now).unwrap();
        let meta_der = |k: &CertifiedKey| k.cert.last().unwrap().clone();

        // Not yet due: the same key is served.
        let later = r.resolve_at(now + 22 * DAY).unwrap();
        assert!(Arc::ptr_eq(&first, &later));

        // Due: a fresh meta-cert with the same CN, leaf unchanged.
        let renewed = r.resolve_at(now + 24 * DAY).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(renewed.cert.len(), 2);
        assert_eq!(renewed.cert[0], first.cert[0]);
        assert_ne!(meta_der(&renewed), meta_der(&first));
        let (old, new) = (meta_der(&first), meta_der(&renewed));
        assert_eq!(cn(&parse(&old)), cn(&parse(&new)));

        // The new one is valid from the (injected) renewal time and is kept until 23 days later.
        let nb = parse(&new).validity().not_before.timestamp();
        assert!((nb - unix(now + 24 * DAY - 30 * DAY)).abs() <= 2);
        let again = r.resolve_at(now + 46 * DAY).unwrap();
        assert!(Arc::ptr_eq(&renewed, &again));
        let renew_after = r.lock().served.as_ref().unwrap().renew_after.unwrap();
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
                    r.resolve_at(now + i * 30 * DAY).unwrap();
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
        assert_eq!(
            st.served.as_ref().unwrap().key.cert.last().unwrap(),
            &meta.der
        );
    }
}
