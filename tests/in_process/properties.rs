//! Property tests of the protocol core: every encoder's output decodes back to what it was
//! given (frame headers, SmallFrames, the login's boxes, STUN, keys), and `http::parse_head`
//! reads any valid request head, in any header order and case, to the request it describes.
//! `PROPTEST_CASES=N` runs more cases; a failure is saved under `proptest-regressions/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use derpd::frame::{
    decode_header, encode_header, FrameType, PeerGoneReason, SmallFrame, HEADER_LEN,
    PEER_PRESENT_LEN,
};
use derpd::handshake::{
    check_client_info_header, client_info_frame, open_client_info, open_server_info,
    parse_client_info_json, server_info_frame, ClientInfo,
};
use derpd::http::{parse_head, Request};
use derpd::key::{hex, parse_hex32, NodePrivate, NodePublic, KEY_LEN};
use derpd::stun::{
    parse_binding_request, tailscale_request, write_response, TxId, MAGIC_COOKIE, MAX_RESPONSE_LEN,
};
use proptest::prelude::*;

/// Every frame type, from `derp.go`.
const TYPES: [FrameType; 16] = [
    FrameType::ServerKey,
    FrameType::ClientInfo,
    FrameType::ServerInfo,
    FrameType::SendPacket,
    FrameType::RecvPacket,
    FrameType::KeepAlive,
    FrameType::NotePreferred,
    FrameType::PeerGone,
    FrameType::PeerPresent,
    FrameType::ForwardPacket,
    FrameType::WatchConns,
    FrameType::ClosePeer,
    FrameType::Ping,
    FrameType::Pong,
    FrameType::Health,
    FrameType::Restarting,
];

fn frame_type() -> impl Strategy<Value = FrameType> {
    proptest::sample::select(&TYPES[..])
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        // v4-mapped IPv6, which STUN answers as IPv4.
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| {
            let v4 = std::net::Ipv4Addr::from(ip);
            SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), p)
        }),
    ]
}

/// The payload of `f` after checking its header's type and length.
fn payload(f: &SmallFrame, t: FrameType) -> Vec<u8> {
    let b = f.as_bytes();
    let (ty, len) = decode_header(b[..HEADER_LEN].try_into().unwrap());
    assert_eq!(ty, t as u8);
    assert_eq!(len as usize, b.len() - HEADER_LEN);
    b[HEADER_LEN..].to_vec()
}

proptest! {
    #[test]
    fn header_round_trip(t in frame_type(), len in any::<u32>()) {
        let mut h = [0u8; HEADER_LEN];
        encode_header(&mut h, t, len);
        prop_assert_eq!(decode_header(&h), (t as u8, len));
        prop_assert_eq!(FrameType::from_u8(h[0]), Some(t));
    }

    #[test]
    fn any_header_decodes_and_known_types_re_encode(h in any::<[u8; HEADER_LEN]>()) {
        let (t, len) = decode_header(&h);
        prop_assert_eq!(t, h[0]);
        prop_assert_eq!(&len.to_be_bytes()[..], &h[1..]);
        match FrameType::from_u8(t) {
            Some(ft) => {
                let mut again = [0u8; HEADER_LEN];
                encode_header(&mut again, ft, len);
                prop_assert_eq!(again, h);
            }
            None => prop_assert!(!TYPES.iter().any(|&k| k as u8 == t)),
        }
    }

    #[test]
    fn small_frames_decode_to_their_fields(
        ping in any::<[u8; 8]>(),
        key in any::<[u8; KEY_LEN]>(),
        not_here in any::<bool>(),
        addr in proptest::option::of(socket_addr()),
        flags in any::<u8>(),
        (reconnect, try_for) in any::<(u32, u32)>(),
    ) {
        let ka = SmallFrame::keep_alive();
        prop_assert_eq!(ka.as_bytes(), [0x06, 0, 0, 0, 0]);
        prop_assert_eq!(payload(&SmallFrame::pong(ping), FrameType::Pong), ping);

        let key = NodePublic(key);
        let reason = if not_here { PeerGoneReason::NotHere } else { PeerGoneReason::Disconnected };
        let p = payload(&SmallFrame::peer_gone(&key, reason), FrameType::PeerGone);
        prop_assert_eq!(&p[..KEY_LEN], &key.0[..]);
        prop_assert_eq!(&p[KEY_LEN..], &[reason as u8][..]);

        let p = payload(&SmallFrame::restarting(reconnect, try_for), FrameType::Restarting);
        prop_assert_eq!(&p[..4], &reconnect.to_be_bytes()[..]);
        prop_assert_eq!(&p[4..], &try_for.to_be_bytes()[..]);

        let p = payload(&SmallFrame::peer_present(&key, addr, flags), FrameType::PeerPresent);
        prop_assert_eq!(p.len(), PEER_PRESENT_LEN);
        prop_assert_eq!(&p[..KEY_LEN], &key.0[..]);
        let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&p[KEY_LEN..KEY_LEN + 16]).unwrap());
        let port = u16::from_be_bytes([p[KEY_LEN + 16], p[KEY_LEN + 17]]);
        let want = addr.map_or((Ipv6Addr::UNSPECIFIED, 0), |a| match a.ip() {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), a.port()),
            IpAddr::V6(v6) => (v6, a.port()),
        });
        prop_assert_eq!((ip, port), want);
        prop_assert_eq!(p[PEER_PRESENT_LEN - 1], flags);
    }

    #[test]
    fn hex32_round_trip(b in any::<[u8; KEY_LEN]>(), upper in any::<u64>()) {
        let h = hex(&b);
        prop_assert_eq!(h.len(), 2 * KEY_LEN);
        prop_assert!(h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        prop_assert_eq!(parse_hex32(&h), Some(b));
        // Either case, in any mix.
        let mixed: String = h
            .chars()
            .enumerate()
            .map(|(i, c)| if upper >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
            .collect();
        prop_assert_eq!(parse_hex32(&mixed), Some(b));
        // Not 64 digits, or one non-hex character: refused.
        prop_assert_eq!(parse_hex32(&h[1..]), None);
        prop_assert_eq!(parse_hex32(&format!("{h}0")), None);
        let i = (upper % 64) as usize;
        for bad in ['g', 'G', ' ', 'x', '\u{e9}'] {
            let mut s = h.clone();
            s.replace_range(i..=i, &bad.to_string());
            prop_assert_eq!(parse_hex32(&s), None, "{}", s);
        }
    }

    #[test]
    fn node_key_text_round_trip(b in any::<[u8; KEY_LEN]>()) {
        let public = NodePublic(b);
        let text = public.to_string();
        prop_assert_eq!(text.strip_prefix("nodekey:"), Some(&*public.untyped_hex()));
        prop_assert_eq!(NodePublic::parse(&text), Some(public));
        prop_assert_eq!(NodePublic::parse(&text.to_ascii_uppercase()), None);
        prop_assert_eq!(NodePublic::parse(&public.untyped_hex()), None);

        // (That the parsed private key has the same public key is checked in login_round_trip:
        // X25519 is slow in a debug build.)
        let text = NodePrivate::from_bytes(b).to_text();
        prop_assert_eq!(text.strip_prefix("privkey:"), Some(&*hex(&b)));
        let back = NodePrivate::parse(&text).unwrap();
        prop_assert_eq!(&back.to_text(), &text);
        prop_assert!(NodePrivate::parse(&text.replace("privkey:", "nodekey:")).is_none());
    }

    #[test]
    fn stun_request_response_round_trip(tx in any::<TxId>(), addr in socket_addr()) {
        let req = tailscale_request(&tx);
        prop_assert_eq!(parse_binding_request(&req), Some(tx));
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let n = write_response(&mut out, &tx, addr);
        let want_ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        prop_assert_eq!(
            parse_stun_response(&out[..n]),
            Some((tx, SocketAddr::new(want_ip, addr.port())))
        );
    }

    #[test]
    fn stun_truncated_or_corrupted_requests_are_refused(
        tx in any::<TxId>(),
        cut in 0usize..40,
        at in 0usize..36,
        bit in 0u8..8,
    ) {
        let req = tailscale_request(&tx);
        prop_assert_eq!(parse_binding_request(&req[..cut]), None);
        let mut bad = req;
        bad[at] ^= 1 << bit;
        prop_assert_eq!(parse_binding_request(&bad), None);
    }

    #[test]
    fn stun_garbage_does_not_panic(pkt in proptest::collection::vec(any::<u8>(), 0..128)) {
        if let Some(tx) = parse_binding_request(&pkt) {
            prop_assert_eq!(&tx[..], &pkt[8..20]);
        }
    }
}

/// A binding success with one XOR-MAPPED-ADDRESS: its transaction ID and address.
fn parse_stun_response(r: &[u8]) -> Option<(TxId, SocketAddr)> {
    if r.len() < 28 || r[..2] != [0x01, 0x01] || r[4..8] != MAGIC_COOKIE {
        return None;
    }
    if usize::from(u16::from_be_bytes([r[2], r[3]])) != r.len() - 20 || r[20..22] != [0, 0x20] {
        return None;
    }
    let tx: TxId = r[8..20].try_into().ok()?;
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&tx);
    let port = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
    let x: Vec<u8> = r[28..].iter().zip(key).map(|(b, k)| b ^ k).collect();
    let ip = match (r[25], u16::from_be_bytes([r[22], r[23]]), x.len()) {
        (1, 8, 4) => IpAddr::from(<[u8; 4]>::try_from(&x[..]).ok()?),
        (2, 20, 16) => IpAddr::from(<[u8; 16]>::try_from(&x[..]).ok()?),
        _ => return None,
    };
    Some((tx, SocketAddr::new(ip, port)))
}

/// A ClientInfo as a client may write it: every field optional, keys in any case.
#[derive(Debug, Clone)]
struct Info {
    version: Option<i64>,
    can_ack_pings: Option<bool>,
    is_prober: Option<bool>,
    app_name: Option<String>,
    mesh_key: Option<[u8; KEY_LEN]>,
    /// Which letters of each key are uppercased.
    case: u64,
    /// An unknown key, which is ignored.
    extra: bool,
}

fn info() -> impl Strategy<Value = Info> {
    (
        proptest::option::of(any::<i64>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of("\\PC{0,80}"),
        proptest::option::of(prop_oneof![Just([0u8; KEY_LEN]), any::<[u8; KEY_LEN]>()]),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(version, can_ack_pings, is_prober, app_name, mesh_key, case, extra)| Info {
                version,
                can_ack_pings,
                is_prober,
                app_name,
                mesh_key,
                case,
                extra,
            },
        )
}

impl Info {
    fn key(&self, k: &str) -> String {
        k.chars()
            .enumerate()
            .map(|(i, c)| {
                if self.case >> (i % 64) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    }

    fn json(&self) -> Vec<u8> {
        let mut m = serde_json::Map::new();
        if let Some(v) = self.version {
            m.insert(self.key("version"), v.into());
        }
        if let Some(v) = self.can_ack_pings {
            m.insert(self.key("CanAckPings"), v.into());
        }
        if let Some(v) = self.is_prober {
            m.insert(self.key("IsProber"), v.into());
        }
        if let Some(v) = &self.app_name {
            m.insert(self.key("AppName"), v.clone().into());
        }
        if let Some(k) = &self.mesh_key {
            m.insert(self.key("meshKey"), hex(k).into());
        }
        if self.extra {
            m.insert("futureField".into(), serde_json::json!({"a": [1, null]}));
        }
        serde_json::to_vec(&serde_json::Value::Object(m)).unwrap()
    }

    /// `got` is what this ClientInfo says: absent fields at their defaults, the app name cut
    /// to 64 characters, an all-zero mesh key as none.
    fn check(&self, got: &ClientInfo) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.version, self.version.unwrap_or(0));
        prop_assert_eq!(got.can_ack_pings, self.can_ack_pings.unwrap_or(false));
        prop_assert_eq!(got.is_prober, self.is_prober.unwrap_or(false));
        let name: String = self
            .app_name
            .clone()
            .unwrap_or_default()
            .chars()
            .take(64)
            .collect();
        prop_assert_eq!(&got.app_name, &name);
        prop_assert_eq!(got.mesh_key, self.mesh_key.filter(|k| *k != [0; KEY_LEN]));
        Ok(())
    }
}

proptest! {
    #[test]
    fn client_info_json_is_read_as_go_reads_it(info in info()) {
        let got = parse_client_info_json(&info.json()).unwrap();
        info.check(&got)?;
    }
}

proptest! {
    // Each case does seven X25519 operations: slow in a debug build, slower under QEMU. The
    // JSON's variety is covered by the test above.
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn login_round_trip(
        server in any::<[u8; KEY_LEN]>(),
        client in any::<[u8; KEY_LEN]>(),
        info in info(),
    ) {
        let server = NodePrivate::from_bytes(server);
        let client = NodePrivate::from_bytes(client);
        let f = client_info_frame(&client, &server.public(), &info.json());
        let (t, len) = decode_header(f[..HEADER_LEN].try_into().unwrap());
        prop_assert_eq!(len as usize, f.len() - HEADER_LEN);
        prop_assert_eq!(check_client_info_header(t, len), Ok(()));
        let (got, bx) = open_client_info(&server, &f[HEADER_LEN..]).unwrap();
        prop_assert_eq!(got.key, client.public());
        info.check(&got)?;
        // The private key's text form parses back to a key with the same public key.
        prop_assert_eq!(NodePrivate::parse(&client.to_text()).unwrap().public(), got.key);

        let si = server_info_frame(&bx);
        let (t, len) = decode_header(si[..HEADER_LEN].try_into().unwrap());
        prop_assert_eq!((t, len as usize), (FrameType::ServerInfo as u8, si.len() - HEADER_LEN));
        let json = open_server_info(&client, &server.public(), &si[HEADER_LEN..]);
        prop_assert_eq!(json.as_deref(), Some(&br#"{"version":2}"#[..]));
        // Another server cannot open the client's box.
        let other = NodePrivate::from_bytes([0x5a; KEY_LEN]);
        prop_assume!(other.public() != server.public());
        prop_assert!(open_client_info(&other, &f[HEADER_LEN..]).is_err());
    }
}

/// A request head as a client may write it, and the request it means.
#[derive(Debug, Clone)]
struct Head {
    bytes: Vec<u8>,
    want: Request,
}

/// One header line's name (in any case), value, and how the value is padded.
type Field = (String, String, String, String);

/// Header values: visible ASCII with inner spaces and tabs, possibly empty.
const VALUE: &str = "([!-~]([ \t!-~]{0,20}[!-~])?)?";
/// Padding around a value, which the parser trims.
const PAD: &str = "[ \t]{0,2}";

fn field(name: &'static str) -> impl Strategy<Value = Option<Field>> {
    proptest::option::of(
        (any::<u64>(), VALUE, PAD, PAD).prop_map(move |(case, v, l, r)| {
            let name = name
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if case >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect();
            (name, v, l, r)
        }),
    )
}

fn head() -> impl Strategy<Value = Head> {
    let known = (
        field("Host"),
        field("Upgrade"),
        (
            field("Derp-Fast-Start"),
            prop_oneof![Just("1".to_string()), VALUE.prop_map(|s| s)],
        ),
        field("Ideal-Node"),
        field("X-Tailscale-Challenge"),
        field("Sec-WebSocket-Protocol"),
        field("Sec-WebSocket-Key"),
        field("Sec-WebSocket-Version"),
        field("Connection"),
    );
    let filler = proptest::collection::vec(("X-[A-Za-z0-9-]{1,12}", VALUE), 0..6);
    (
        prop_oneof![
            Just("GET".to_string()),
            Just("HEAD".to_string()),
            "[A-Z]{1,8}"
        ],
        "/[A-Za-z0-9._~!$&'()*+,;=:@/%-]{0,30}",
        proptest::option::of("[A-Za-z0-9=&%/?.-]{0,12}"),
        prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")],
        known,
        filler,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(method, path, query, version, known, filler, seed, lf)| {
            let (host, upgrade, (fast, fast_value), ideal, challenge, proto, key, wsv, conn) =
                known;
            // Derp-Fast-Start is "1" half the time, the only value that counts.
            let fast = fast.map(|(n, v, l, r)| {
                let v = if seed & 1 == 1 { fast_value } else { v };
                (n, v, l, r)
            });
            let target = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let mut want = Request {
                method: method.clone(),
                path,
                target: target.clone(),
                ..Request::default()
            };
            let mut lines: Vec<(String, String)> = Vec::new();
            let mut add = |f: &Option<Field>| -> Option<String> {
                let (n, v, l, r) = f.as_ref()?;
                lines.push((n.clone(), format!("{l}{v}{r}")));
                Some(v.clone())
            };
            if let Some(v) = add(&host) {
                want.host = v;
            }
            if let Some(v) = add(&upgrade) {
                want.upgrade = v.to_ascii_lowercase();
            }
            if let Some(v) = add(&fast) {
                want.fast_start = v == "1";
            }
            if let Some(v) = add(&ideal) {
                want.not_ideal = !v.is_empty();
            }
            want.challenge = add(&challenge);
            if let Some(v) = add(&proto) {
                want.ws_protocol = v;
            }
            want.ws_key = add(&key);
            if let Some(v) = add(&wsv) {
                want.ws_version = v;
            }
            if let Some(v) = add(&conn) {
                want.connection = v;
            }
            lines.extend(filler);
            // Any order: a Fisher-Yates shuffle driven by the seed.
            let mut s = seed;
            for i in (1..lines.len()).rev() {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lines.swap(i, (s >> 33) as usize % (i + 1));
            }
            let eol = if lf { "\n" } else { "\r\n" };
            let mut text = format!("{method} {target} {version}{eol}");
            for (n, v) in &lines {
                text.push_str(&format!("{n}:{v}{eol}"));
            }
            text.push_str(eol);
            Head {
                bytes: text.into_bytes(),
                want,
            }
        })
}

proptest! {
    #[test]
    fn parse_head_reads_valid_heads(
        h in head(),
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut buf = h.bytes.clone();
        buf.extend_from_slice(&rest);
        let (req, n) = parse_head(&buf).unwrap().unwrap();
        prop_assert_eq!(n, h.bytes.len());
        // Pipelined bytes after the head (Derp-Fast-Start's login) are left as they were.
        prop_assert_eq!(&buf[n..], &rest[..]);
        prop_assert_eq!(req, h.want);
        // Every shorter read of the head asks for more bytes.
        for k in 0..n {
            prop_assert_eq!(parse_head(&buf[..k]), Ok(None), "prefix {}", k);
        }
    }
}
