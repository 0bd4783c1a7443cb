//! Go's `x509.Certificate.VerifyHostname`, which a loaded certificate must pass for
//! `--hostname` (derper refuses to start otherwise).

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::TlsError;

/// Go's `x509.Certificate.VerifyHostname`: IP hostnames match IP SANs only, DNS hostnames match
/// DNS SANs (a leading `*.` covers one label, ASCII case-insensitive); no CommonName fallback.
pub(super) fn verify_hostname(
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::tls::load_or_create;
    use crate::tls::testutil::{write_dns_cert, TempDir};
    use rustls::pki_types::PrivateKeyDer;

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
}
