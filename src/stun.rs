//! STUN as Tailscale uses it: only binding requests carrying SOFTWARE `tailnode` and a valid
//! FINGERPRINT are answered, with exactly one XOR-MAPPED-ADDRESS. Pure parse/encode.

use std::net::{IpAddr, SocketAddr};

/// RFC 5389 magic cookie.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const HEADER_LEN: usize = 20;
const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Largest response: header + XOR-MAPPED-ADDRESS for IPv6.
pub const MAX_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20;

/// A STUN transaction ID.
pub type TxId = [u8; 12];

/// Returns the transaction ID when `pkt` is a Tailscale binding request, `None` for anything
/// else (which gets no reply). The header's length field is ignored, as Tailscale does.
pub fn parse_binding_request(pkt: &[u8]) -> Option<TxId> {
    if pkt.len() < HEADER_LEN || pkt[0] & 0xC0 != 0 || pkt[4..8] != MAGIC_COOKIE {
        return None;
    }
    if pkt[0..2] != BINDING_REQUEST {
        return None;
    }
    let mut software_ok = false;
    let mut last: Option<(u16, usize, usize)> = None;
    let mut off = HEADER_LEN;
    while off < pkt.len() {
        let hdr = pkt.get(off..off + 4)?;
        let typ = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        let val_start = off + 4;
        let val_end = val_start.checked_add(len)?;
        if val_end > pkt.len() {
            return None;
        }
        if typ == ATTR_SOFTWARE && &pkt[val_start..val_end] == b"tailnode" {
            software_ok = true;
        }
        last = Some((typ, off, val_end));
        // Values are padded to a multiple of 4 bytes.
        off = val_end + (4 - len % 4) % 4;
    }
    let (typ, attr_off, val_end) = last?;
    if !software_ok || typ != ATTR_FINGERPRINT || val_end - attr_off != 8 {
        return None;
    }
    let got = u32::from_be_bytes([
        pkt[attr_off + 4],
        pkt[attr_off + 5],
        pkt[attr_off + 6],
        pkt[attr_off + 7],
    ]);
    if got != fingerprint(&pkt[..attr_off]) {
        return None;
    }
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&pkt[8..20]);
    Some(tx)
}

/// Writes the binding response for `tx` and the client's address into `out`; returns its length.
/// IPv4-mapped IPv6 sources are answered as IPv4.
pub fn write_response(out: &mut [u8; MAX_RESPONSE_LEN], tx: &TxId, addr: SocketAddr) -> usize {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (family, addr_len) = match ip {
        IpAddr::V4(_) => (0x01u8, 4usize),
        IpAddr::V6(_) => (0x02u8, 16usize),
    };
    let attr_len = 4 + addr_len;
    out[0..2].copy_from_slice(&BINDING_SUCCESS);
    out[2..4].copy_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(tx);
    out[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(attr_len as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    let port = addr.port() ^ 0x2112;
    out[26..28].copy_from_slice(&port.to_be_bytes());
    // The address is XORed with the cookie followed by the transaction ID.
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(tx);
    let octets: [u8; 16] = match ip {
        IpAddr::V4(v4) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v4.octets());
            o
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    for i in 0..addr_len {
        out[28 + i] = octets[i] ^ key[i];
    }
    28 + addr_len
}

/// The FINGERPRINT attribute's value for a message whose bytes before the attribute are
/// `data` (with the header's length already counting the attribute): RFC 5389 15.5.
pub fn fingerprint(data: &[u8]) -> u32 {
    crc32(data) ^ FINGERPRINT_XOR
}

/// CRC-32 (IEEE), bitwise: STUN packets are tiny, a table would cost 1 KiB of binary.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Builds a Tailscale-style binding request (for tests and the load generator).
pub fn tailscale_request(tx: &TxId) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0..2].copy_from_slice(&BINDING_REQUEST);
    p[2..4].copy_from_slice(&20u16.to_be_bytes());
    p[4..8].copy_from_slice(&MAGIC_COOKIE);
    p[8..20].copy_from_slice(tx);
    p[20..22].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    p[22..24].copy_from_slice(&8u16.to_be_bytes());
    p[24..32].copy_from_slice(b"tailnode");
    p[32..34].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    p[34..36].copy_from_slice(&4u16.to_be_bytes());
    let fp = fingerprint(&p[..32]);
    p[36..40].copy_from_slice(&fp.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const TX: TxId = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn tailscale_request_is_accepted() {
        let req = tailscale_request(&TX);
        assert_eq!(parse_binding_request(&req), Some(TX));
        // Any corruption of the fingerprinted part is rejected.
        for i in 0..36 {
            let mut bad = req;
            bad[i] ^= 0x01;
            assert_eq!(parse_binding_request(&bad), None, "byte {i}");
        }
    }

    #[test]
    fn non_tailscale_requests_are_dropped() {
        // RFC 5769 2.1 sample request: SOFTWARE "STUN test client", not tailnode.
        let rfc5769: [u8; 108] = [
            0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34,
            0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e,
            0x20, 0x74, 0x65, 0x73, 0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24,
            0x00, 0x04, 0x6e, 0x00, 0x01, 0xff, 0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1,
            0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68,
            0x36, 0x76, 0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c,
            0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5,
            0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
        ];
        assert_eq!(parse_binding_request(&rfc5769), None);
        // Header only, wrong type, truncated attribute, short packet.
        let req = tailscale_request(&TX);
        assert_eq!(parse_binding_request(&req[..20]), None);
        let mut ind = req;
        ind[1] = 0x11;
        assert_eq!(parse_binding_request(&ind), None);
        assert_eq!(parse_binding_request(&req[..38]), None);
        assert_eq!(parse_binding_request(&[0u8; 4]), None);
    }

    #[test]
    fn response_v4_golden() {
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let n = write_response(&mut out, &TX, "192.0.2.1:32853".parse().unwrap());
        assert_eq!(n, 32);
        assert_eq!(
            &out[..n],
            [
                0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                12, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
            ]
        );
        // A v4-mapped source is answered as IPv4.
        let n2 = write_response(&mut out, &TX, "[::ffff:192.0.2.1]:32853".parse().unwrap());
        assert_eq!(n2, 32);
    }

    #[test]
    fn response_v6_golden() {
        // RFC 5769 2.3 values: 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
        let tx = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let addr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap();
        let n = write_response(&mut out, &tx, addr);
        assert_eq!(n, 44);
        assert_eq!(&out[2..4], [0, 24]);
        assert_eq!(
            &out[20..44],
            [
                0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3,
                0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
            ]
        );
    }
}
