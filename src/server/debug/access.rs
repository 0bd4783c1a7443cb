//! Who may see `/debug/`: derper's rule (tsweb's `AllowDebugAccess`): the `?debugkey=`
//! secret, loopback, `TS_ALLOW_DEBUG_IP`, `TS_DEBUG_TRUSTED_CIDRS`, and a Tailscale peer, which
//! derpd trusts only on a connection to a Tailscale address of its own (100.64.0.0/10 is also
//! carrier-grade NAT).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::leading_number;
use crate::http::Request;

/// Who may see `/debug/`.
#[derive(Debug, Default)]
pub(super) struct Access {
    /// `TS_ALLOW_DEBUG_IP`.
    allow_ip: Option<IpAddr>,
    /// `TS_DEBUG_TRUSTED_CIDRS`: comma-separated prefixes.
    trusted: Vec<(IpAddr, u8)>,
    /// `TS_DEBUG_KEY_PATH`: a file holding the `?debugkey=` secret, read per request.
    key_path: Option<PathBuf>,
}

impl Access {
    /// Empty strings mean unset. An `allow_ip` that is not an IP matches nothing (derper
    /// compares strings); a bad CIDR is an error.
    pub(super) fn parse(allow_ip: &str, trusted: &str, key_path: &str) -> Result<Self, String> {
        let mut a = Self {
            allow_ip: allow_ip
                .trim()
                .parse::<IpAddr>()
                .ok()
                .map(|ip| ip.to_canonical()),
            key_path: (!key_path.is_empty()).then(|| PathBuf::from(key_path)),
            ..Self::default()
        };
        for s in trusted.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let p = parse_prefix(s)
                .ok_or_else(|| format!("invalid CIDR in TS_DEBUG_TRUSTED_CIDRS: {s:?}"))?;
            a.trusted.push(p);
        }
        Ok(a)
    }

    /// derper's rule: a GET with the right `?debugkey=`; otherwise, without `X-Forwarded-For`,
    /// a loopback or Tailscale peer, `TS_ALLOW_DEBUG_IP`, or one in `TS_DEBUG_TRUSTED_CIDRS`.
    /// Unlike derper, a Tailscale peer only when the connection also arrived on a Tailscale
    /// address (`local`, derpd's own end of it): 100.64.0.0/10 is also ISP carrier-grade NAT
    /// (RFC 6598), whose other subscribers are not the owner's tailnet. IPv4 addresses on a
    /// dual-stack listener (`::ffff:a.b.c.d`) are judged as IPv4.
    pub(super) fn allows(&self, req: &Request, remote: IpAddr, local: Option<IpAddr>) -> bool {
        if req.method == "GET" && self.key_matches(&req.target) {
            return true;
        }
        if req.forwarded {
            return false;
        }
        let ip = remote.to_canonical();
        let on_tailscale = local.is_some_and(|l| is_tailscale_ip(l.to_canonical()));
        ip.is_loopback()
            || (is_tailscale_ip(ip) && on_tailscale)
            || self.allow_ip == Some(ip)
            || self
                .trusted
                .iter()
                .any(|&(net, bits)| in_prefix(ip, net, bits))
    }

    fn key_matches(&self, target: &str) -> bool {
        let Some(path) = &self.key_path else {
            return false;
        };
        let Some(given) = query_value(target, "debugkey").filter(|k| !k.is_empty()) else {
            return false;
        };
        std::fs::read(path).is_ok_and(|want| {
            let want = want.trim_ascii();
            // Length leaks; the contents do not.
            want.len() == given.len()
                && want.iter().zip(&given).fold(0, |d, (a, b)| d | (a ^ b)) == 0
        })
    }
}

/// `100.64.0.0/10` except ChromeOS's `100.115.92.0/23`, or `fd7a:115c:a1e0::/48`
/// (Tailscale's `tsaddr.IsTailscaleIP`).
fn is_tailscale_ip(ip: IpAddr) -> bool {
    const CGNAT: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0));
    const CHROMEOS: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 115, 92, 0));
    const ULA: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0));
    (in_prefix(ip, CGNAT, 10) && !in_prefix(ip, CHROMEOS, 23)) || in_prefix(ip, ULA, 48)
}

/// `addr/bits` as Go's `netip.ParsePrefix` takes it (no zone, bits in decimal without a
/// leading zero, at most the address width).
fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    let width = if ip.is_ipv4() { 32 } else { 128 };
    let ok = bits.bytes().all(|b| b.is_ascii_digit()) && (bits == "0" || !bits.starts_with('0'));
    let bits = leading_number(bits.as_bytes()).filter(|&b| ok && b <= width)?;
    Some((ip, bits as u8))
}

/// Whether `ip` is in `net/bits` (same family only, as `netip.Prefix.Contains`).
fn in_prefix(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (a, n, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u128::from(u32::from(a)), u128::from(u32::from(n)), 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    a.checked_shr(shift) == n.checked_shr(shift)
}

/// The first decodable value of `name` in the target's query, as Go's `FormValue` finds it
/// (`+` is a space; pairs with `;` or a bad escape are skipped).
fn query_value(target: &str, name: &str) -> Option<Vec<u8>> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .filter(|p| !p.contains(';'))
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k)? == name.as_bytes()).then_some(())?;
            unescape(v)
        })
        .next()
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| char::from(c).to_digit(16);
                let v = hex(*b.get(i + 1)?)? << 4 | hex(*b.get(i + 2)?)?;
                out.push(v as u8);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::http;

    fn req(method: &str, target: &str, forwarded: bool) -> Request {
        Request {
            method: method.into(),
            path: target.split('?').next().unwrap().into(),
            target: target.into(),
            forwarded,
            ..Request::default()
        }
    }

    /// From `ip`, on a connection that arrived on a Tailscale address of derpd's.
    fn allowed(a: &Access, ip: &str) -> bool {
        allowed_on(a, ip, Some("100.100.1.1"))
    }

    /// From `ip`, on a connection that arrived on `local`.
    fn allowed_on(a: &Access, ip: &str, local: Option<&str>) -> bool {
        let local = local.map(|l| l.parse().unwrap());
        a.allows(&req("GET", "/debug/", false), ip.parse().unwrap(), local)
    }

    #[test]
    fn debug_access_loopback_and_tailscale_ips() {
        let a = Access::default();
        for ip in ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"] {
            assert!(allowed(&a, ip), "{ip}");
        }
        for (ip, ok) in [
            ("100.63.255.255", false),
            ("100.64.0.0", true),
            ("100.101.102.103", true),
            ("100.127.255.255", true),
            ("100.128.0.0", false),
            ("::ffff:100.64.0.1", true),
            ("100.115.92.1", false), // ChromeOS VM range, not Tailscale's
            ("100.115.94.1", true),
            ("fd7a:115c:a1e0::1", true),
            ("fd7a:115c:a1e0:ffff::1", true),
            ("fd7a:115c:a1e1::1", false),
            ("10.0.0.1", false),
            ("2001:db8::1", false),
            ("::ffff:10.0.0.1", false),
        ] {
            assert_eq!(allowed(&a, ip), ok, "{ip}");
        }
    }

    /// 100.64.0.0/10 is also carrier-grade NAT: a Tailscale peer is trusted only on a
    /// connection that arrived on a Tailscale address of derpd's (a router behind CGNAT has
    /// its WAN address in that range too; see the README).
    #[test]
    fn debug_access_tailscale_peers_only_on_a_tailscale_address() {
        let a = Access::parse("", "", "").unwrap();
        for (remote, local, ok) in [
            // Tailscale to Tailscale, both families, mapped IPv4 as IPv4.
            ("100.101.102.103", Some("100.64.0.1"), true),
            (
                "::ffff:100.101.102.103",
                Some("::ffff:100.127.255.254"),
                true,
            ),
            ("fd7a:115c:a1e0::5", Some("fd7a:115c:a1e0:ab12::1"), true),
            ("100.101.102.103", Some("fd7a:115c:a1e0::1"), true),
            // A CGNAT neighbour, or a Tailscale address, reaching a non-Tailscale address.
            ("100.101.102.103", Some("192.168.1.1"), false),
            ("100.101.102.103", Some("203.0.113.1"), false),
            ("100.101.102.103", Some("127.0.0.1"), false),
            ("::ffff:100.64.0.9", Some("::ffff:10.0.0.1"), false),
            ("fd7a:115c:a1e0::5", Some("2001:db8::1"), false),
            ("fd7a:115c:a1e0::5", Some("::1"), false),
            // ChromeOS's VM range is not Tailscale's, on either end.
            ("100.101.102.103", Some("100.115.92.1"), false),
            ("100.115.92.9", Some("100.64.0.1"), false),
            // Local address unknown: no trust by a Tailscale address.
            ("100.101.102.103", None, false),
            // Neither end decides anything else: loopback, others.
            ("127.0.0.1", None, true),
            ("::1", Some("::1"), true),
            ("192.168.1.5", Some("100.64.0.1"), false),
            ("203.0.113.9", Some("fd7a:115c:a1e0::1"), false),
        ] {
            assert_eq!(allowed_on(&a, remote, local), ok, "{remote} on {local:?}");
        }
        // TS_ALLOW_DEBUG_IP and TS_DEBUG_TRUSTED_CIDRS take a CGNAT address on any local one.
        let t = Access::parse("100.70.0.9", "100.80.0.0/16", "").unwrap();
        for remote in ["100.70.0.9", "100.80.3.4"] {
            assert!(allowed_on(&t, remote, Some("192.168.1.1")), "{remote}");
            assert!(allowed_on(&t, remote, None), "{remote}");
        }
        assert!(!allowed_on(&t, "100.70.0.10", Some("192.168.1.1")));
    }

    #[test]
    fn debug_access_forwarded_is_denied() {
        let a = Access::parse("10.1.1.1", "", "").unwrap();
        for ip in ["127.0.0.1", "100.64.0.1", "10.1.1.1"] {
            let local = Some("100.100.1.1".parse().unwrap());
            assert!(!a.allows(&req("GET", "/debug/", true), ip.parse().unwrap(), local));
        }
        let (r, _) = http::parse_head(
            b"GET /debug/varz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(r.forwarded);
        let (r, _) = http::parse_head(b"GET /debug/varz HTTP/1.1\r\nX-Forwarded-For:\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.forwarded, "an empty header is no header, as in Go");
    }

    #[test]
    fn debug_access_allow_ip_and_trusted_cidrs() {
        let a = Access::parse(
            " 192.0.2.7 ",
            "10.0.0.0/8, 2001:db8::/32,,192.168.1.5/32",
            "",
        )
        .unwrap();
        for (ip, ok) in [
            ("192.0.2.7", true),
            ("::ffff:192.0.2.7", true),
            ("192.0.2.8", false),
            ("10.255.1.2", true),
            ("::ffff:10.0.0.1", true),
            ("11.0.0.1", false),
            ("2001:db8:1::1", true),
            ("2001:db9::1", false),
            ("192.168.1.5", true),
            ("192.168.1.6", false),
        ] {
            assert_eq!(allowed(&a, ip), ok, "{ip}");
        }
        let all = Access::parse("", "0.0.0.0/0", "").unwrap();
        assert!(allowed(&all, "203.0.113.1") && !allowed(&all, "2001:db8::1"));
        let v6 = Access::parse("2001:db8::5", "::/0", "").unwrap();
        assert!(allowed(&v6, "2001:db8::1"));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/08",
            "10.0.0.0/",
            "x/8",
            "fe80::1%eth0/64",
            "::/129",
        ] {
            assert!(Access::parse("", bad, "").is_err(), "{bad}");
        }
        assert!(Access::parse("not-an-ip", "", "")
            .unwrap()
            .allow_ip
            .is_none());
    }

    #[test]
    fn debug_access_with_key() {
        let dir = std::env::temp_dir().join(format!("derpd-debugkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, " s3cret+x \n").unwrap();
        let a = Access::parse("", "", path.to_str().unwrap()).unwrap();
        let public: IpAddr = "203.0.113.9".parse().unwrap();
        let ok = |method: &str, target: &str, fwd: bool| {
            a.allows(&req(method, target, fwd), public, None)
        };
        assert!(ok("GET", "/debug/varz?debugkey=s3cret%2Bx", true));
        assert!(ok(
            "GET",
            "/debug/?a=1&debugkey=s3cret%2bx&debugkey=no",
            false
        ));
        assert!(
            !ok("GET", "/debug/varz?debugkey=s3cret+x", false),
            "+ is a space"
        );
        assert!(!ok("GET", "/debug/varz?debugkey=s3cre", false));
        assert!(!ok("GET", "/debug/varz?debugkey=", false));
        assert!(!ok("GET", "/debug/varz", false));
        assert!(
            !ok("HEAD", "/debug/varz?debugkey=s3cret%2Bx", false),
            "GET only"
        );
        // No key file configured: the parameter means nothing.
        assert!(!Access::default().allows(
            &req("GET", "/debug/?debugkey=s3cret%2Bx", false),
            public,
            None
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_query_decoding() {
        assert_eq!(query_value("/x?k=a%20b+c", "k").unwrap(), b"a b c");
        assert_eq!(query_value("/x?k=%zz&k=2", "k").unwrap(), b"2");
        assert_eq!(query_value("/x?k=1;j=2&k=3", "k").unwrap(), b"3");
        assert_eq!(query_value("/x?%6B=4", "k").unwrap(), b"4");
        assert_eq!(query_value("/x?k", "k").unwrap(), b"");
        assert!(query_value("/x", "k").is_none() && query_value("/x?k=%4", "k").is_none());
    }
}
