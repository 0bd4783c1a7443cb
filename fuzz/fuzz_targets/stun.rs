//! STUN: `stun::parse_binding_request` on arbitrary packets, and `stun::write_response` for
//! every accepted transaction ID with fuzzer-chosen IPv4, IPv6 and v4-mapped addresses; each
//! response must parse back as a binding success for that ID and address.
//!
//! The first byte picks the mode. Odd: the rest is the whole packet. Even: the rest is the
//! attributes of a binding request whose header and FINGERPRINT the target writes itself, so
//! the fuzzer gets past the CRC and explores the attribute walk.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use derpd::stun::{
    fingerprint, parse_binding_request, tailscale_request, write_response, TxId, MAGIC_COOKIE,
    MAX_RESPONSE_LEN,
};
use libfuzzer_sys::fuzz_target;

const SOFTWARE: u16 = 0x8022;
const FINGERPRINT: u16 = 0x8028;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (pkt, attrs) = if mode & 1 == 1 {
        (rest.to_vec(), None)
    } else {
        let (tx, attrs) = rest.split_at(rest.len().min(12));
        let mut t: TxId = [0; 12];
        t[..tx.len()].copy_from_slice(tx);
        (fingerprinted(&t, attrs), Some(attrs))
    };
    let got = parse_binding_request(&pkt);
    if let Some(tx) = got {
        assert!(pkt.len() >= 20 && pkt[..2] == [0, 1] && pkt[4..8] == MAGIC_COOKIE);
        assert_eq!(tx, pkt[8..20]);
        respond(&tx, rest);
        // The client's own request for this ID is accepted too.
        assert_eq!(parse_binding_request(&tailscale_request(&tx)), Some(tx));
    }
    if let Some(attrs) = attrs {
        // With a well-formed attribute list (and the FINGERPRINT written last), the request
        // is answered exactly when it carries SOFTWARE "tailnode", as Tailscale's are.
        match walk(attrs) {
            Some(true) => assert_eq!(got, Some(pkt[8..20].try_into().unwrap_or_default())),
            Some(false) => assert_eq!(got, None, "answered without SOFTWARE tailnode"),
            None => {}
        }
    }
});

/// A binding request: header (length field from the attributes), `attrs`, then FINGERPRINT.
fn fingerprinted(tx: &TxId, attrs: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(28 + attrs.len());
    p.extend_from_slice(&[0x00, 0x01]);
    p.extend_from_slice(&((attrs.len() + 8) as u16).to_be_bytes());
    p.extend_from_slice(&MAGIC_COOKIE);
    p.extend_from_slice(tx);
    p.extend_from_slice(attrs);
    let fp = fingerprint(&p);
    p.extend_from_slice(&FINGERPRINT.to_be_bytes());
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(&fp.to_be_bytes());
    p
}

/// An independent walk of an attribute list that ends exactly at its end (each value padded
/// to 4 bytes): `Some(has SOFTWARE "tailnode")`, or `None` when it is not well-formed.
fn walk(mut attrs: &[u8]) -> Option<bool> {
    let mut software = false;
    while !attrs.is_empty() {
        let typ = u16::from_be_bytes([*attrs.first()?, *attrs.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*attrs.get(2)?, *attrs.get(3)?]));
        let padded = len.div_ceil(4) * 4;
        if attrs.len() < 4 + padded {
            return None;
        }
        software |= typ == SOFTWARE && &attrs[4..4 + len] == b"tailnode";
        attrs = &attrs[4 + padded..];
    }
    Some(software)
}

/// Answers `tx` for a v4, a v6 and a v4-mapped v6 address drawn from `seed`; each response
/// parses back to the same ID and address (mapped addresses come back as IPv4).
fn respond(tx: &TxId, seed: &[u8]) {
    let mut b = [0u8; 22];
    for (i, x) in seed.iter().rev().take(22).enumerate() {
        b[i] = *x;
    }
    let port = u16::from_be_bytes([b[20], b[21]]);
    let v4 = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(&b[4..20]).unwrap_or([0; 16]));
    for (addr, want) in [
        (IpAddr::V4(v4), IpAddr::V4(v4)),
        (
            IpAddr::V6(v6),
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        ),
        (IpAddr::V6(v4.to_ipv6_mapped()), IpAddr::V4(v4)),
    ] {
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let n = write_response(&mut out, tx, SocketAddr::new(addr, port));
        assert!(n <= MAX_RESPONSE_LEN);
        assert_eq!(
            parse_response(&out[..n]),
            Some((*tx, SocketAddr::new(want, port)))
        );
    }
}

/// An RFC 5389 binding success with exactly one XOR-MAPPED-ADDRESS: its ID and address.
fn parse_response(r: &[u8]) -> Option<(TxId, SocketAddr)> {
    if r.len() < 20 || r[..2] != [0x01, 0x01] || r[4..8] != MAGIC_COOKIE {
        return None;
    }
    if usize::from(u16::from_be_bytes([r[2], r[3]])) != r.len() - 20 {
        return None;
    }
    let tx: TxId = r[8..20].try_into().ok()?;
    let a = &r[20..];
    if a.len() < 8 || a[..2] != [0x00, 0x20] {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([a[2], a[3]]));
    if len != a.len() - 4 || a[4] != 0 {
        return None;
    }
    let port = u16::from_be_bytes([a[6], a[7]]) ^ 0x2112;
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&tx);
    let x: Vec<u8> = a[8..].iter().zip(key).map(|(b, k)| b ^ k).collect();
    let ip = match (a[5], len) {
        (0x01, 8) => IpAddr::from(<[u8; 4]>::try_from(&x[..]).ok()?),
        (0x02, 20) => IpAddr::from(<[u8; 16]>::try_from(&x[..]).ok()?),
        _ => return None,
    };
    Some((tx, SocketAddr::new(ip, port)))
}
