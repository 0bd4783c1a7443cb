//! Which cipher suite derpd picks when a client offers several (`--tls-ciphers`).
//!
//! A router's CPU decides: ring's AES-GCM uses AES instructions where the CPU has them (x86_64
//! with AES-NI and CLMUL, aarch64 with AES and PMULL); elsewhere (MIPS, 32-bit ARM, a
//! Raspberry Pi 3 or 4) it is a constant-time software AES, far dearer than ChaCha20-Poly1305.
//! Yet a Tailscale client on a laptop with AES lists AES-GCM first (Go's crypto/tls orders its
//! suites by *its* CPU), and rustls follows the client's order by default. So by default derpd
//! orders the suites by what its own CPU is fast at and ignores the client's order; Go's client
//! takes any suite it offered.

use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, SupportedCipherSuite};

use crate::config::TlsCiphers;

/// `choice` decided for this CPU: `Auto` becomes `Aes` where it has AES instructions ring
/// uses, `ChaCha` elsewhere; the others stay as they are.
pub fn resolved(choice: TlsCiphers) -> TlsCiphers {
    match choice {
        TlsCiphers::Auto if cpu_has_aes() => TlsCiphers::Aes,
        TlsCiphers::Auto => TlsCiphers::ChaCha,
        other => other,
    }
}

/// What `choice` means on this CPU, for the start-up log.
pub fn describe(choice: TlsCiphers) -> &'static str {
    match resolved(choice) {
        TlsCiphers::Aes => "AES-GCM first",
        TlsCiphers::ChaCha => "ChaCha20-Poly1305 first",
        _ => "in the client's order",
    }
}

/// ring's provider with its suites in `choice`'s order, and whether the server's order wins
/// over the client's.
pub(super) fn provider(choice: TlsCiphers) -> (CryptoProvider, bool) {
    let mut p = rustls::crypto::ring::default_provider();
    let choice = resolved(choice);
    let chacha_first = choice == TlsCiphers::ChaCha;
    // TLS 1.3 before TLS 1.2 (as ring lists them), the chosen family first, and AES-128
    // before AES-256 (as Go orders them: 10 rounds instead of 14, for the same purpose).
    p.cipher_suites
        .sort_by_key(|s| (is_tls12(s), is_chacha(s) != chacha_first, is_aes256(s)));
    (p, choice != TlsCiphers::Client)
}

fn is_tls12(s: &SupportedCipherSuite) -> bool {
    matches!(s, SupportedCipherSuite::Tls12(_))
}

fn is_aes256(s: &SupportedCipherSuite) -> bool {
    aead_index(*s) == 1
}

fn is_chacha(s: &SupportedCipherSuite) -> bool {
    aead_index(*s) == 2
}

/// The AEADs derpd counts its TLS connections by (`derpd_tls_handshakes{aead}`).
pub const AEADS: [&str; 3] = ["aes_128_gcm", "aes_256_gcm", "chacha20_poly1305"];

/// Index into [`AEADS`] of a negotiated suite.
pub fn aead_index(s: SupportedCipherSuite) -> usize {
    match s.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 2,
        // ring's other suites: AES-256-GCM, TLS 1.3 and 1.2.
        _ => 1,
    }
}

/// Whether ring uses AES instructions on this CPU (its AES-GCM is software elsewhere).
fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    // 32-bit ARM and MIPS: ring has no AES instructions there.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn first(choice: TlsCiphers) -> CipherSuite {
        provider(choice).0.cipher_suites[0].suite()
    }

    #[test]
    fn orders_suites_by_choice() {
        assert_eq!(
            first(TlsCiphers::ChaCha),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        assert_eq!(
            first(TlsCiphers::Aes),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let (p, ours) = provider(TlsCiphers::ChaCha);
        assert!(ours && !provider(TlsCiphers::Client).1);
        // Every suite is still there, TLS 1.3 ones first.
        assert_eq!(
            p.cipher_suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        let tls12_from = p.cipher_suites.iter().position(is_tls12).unwrap();
        assert!(p.cipher_suites[tls12_from..].iter().all(is_tls12));
        assert!(is_chacha(&p.cipher_suites[tls12_from]));
        assert_ne!(resolved(TlsCiphers::Auto), TlsCiphers::Auto);
    }
}
