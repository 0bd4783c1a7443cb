//! The DERP frame layer: header decode/encode, frame types, the ClientInfo header check, the
//! disco test, and every SmallFrame builder decoded back to the fields it was given.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use derpd::frame::{
    self, decode_header, encode_header, looks_like_disco, FrameType, PeerGoneReason, SmallFrame,
    DISCO_MAGIC, DISCO_MIN_LEN, HEADER_LEN, PEER_PRESENT_LEN,
};
use derpd::handshake::{check_client_info_header, LoginError};
use derpd::key::{NodePublic, KEY_LEN};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// The wire bytes of every frame type, from `derp.go`.
const KNOWN: [u8; 16] = [
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
];

fuzz_target!(|data: &[u8]| {
    headers(data);
    assert_eq!(
        looks_like_disco(data),
        data.len() >= DISCO_MIN_LEN && data[..6] == DISCO_MAGIC
    );
    let _ = small_frames(&mut Unstructured::new(data));
});

/// Walks `data` as a stream of frames, as a reader would, checking each header.
fn headers(mut data: &[u8]) {
    while let Some((h, rest)) = data.split_first_chunk::<HEADER_LEN>() {
        let (t, len) = decode_header(h);
        assert_eq!(t, h[0]);
        assert_eq!(len.to_be_bytes(), h[1..]);
        match FrameType::from_u8(t) {
            Some(ft) => {
                assert_eq!(ft as u8, t);
                let mut again = [0u8; HEADER_LEN];
                encode_header(&mut again, ft, len);
                assert_eq!(&again, h);
            }
            None => assert!(!KNOWN.contains(&t), "{t:#04x} is a frame type"),
        }
        let n = len as usize;
        match check_client_info_header(t, len) {
            Ok(()) => {
                assert!(t == 0x02 && (frame::CLIENT_INFO_MIN..=frame::CLIENT_INFO_MAX).contains(&n))
            }
            Err(LoginError::BadFrameType(b)) => assert!(b == t && t != 0x02),
            Err(LoginError::BadLength(l)) => assert!(
                l == len
                    && t == 0x02
                    && !(frame::CLIENT_INFO_MIN..=frame::CLIENT_INFO_MAX).contains(&n)
            ),
            Err(e) => panic!("header check gave {e:?}"),
        }
        data = &rest[n.min(rest.len())..];
    }
}

/// Builds one of each SmallFrame from fuzzer-chosen fields and decodes it back.
fn small_frames(u: &mut Unstructured<'_>) -> Result<()> {
    assert_eq!(SmallFrame::keep_alive().as_bytes(), [0x06, 0, 0, 0, 0]);

    let ping: [u8; 8] = u.arbitrary()?;
    let p = payload(&SmallFrame::pong(ping), FrameType::Pong);
    assert_eq!(p, ping);

    let key = NodePublic(u.arbitrary()?);
    let reason = if u.arbitrary()? {
        PeerGoneReason::NotHere
    } else {
        PeerGoneReason::Disconnected
    };
    let p = payload(&SmallFrame::peer_gone(&key, reason), FrameType::PeerGone);
    assert_eq!(p.len(), KEY_LEN + 1);
    assert_eq!(p[..KEY_LEN], key.0);
    assert_eq!(p[KEY_LEN], reason as u8);

    let (a, b): (u32, u32) = u.arbitrary()?;
    let p = payload(&SmallFrame::restarting(a, b), FrameType::Restarting);
    assert_eq!(p[..4], a.to_be_bytes());
    assert_eq!(p[4..], b.to_be_bytes());

    let flags: u8 = u.arbitrary()?;
    let addr: Option<SocketAddr> = match u.int_in_range(0..=2)? {
        0 => None,
        1 => Some(SocketAddr::new(
            IpAddr::from(u.arbitrary::<[u8; 4]>()?),
            u.arbitrary()?,
        )),
        _ => Some(SocketAddr::new(
            IpAddr::from(u.arbitrary::<[u8; 16]>()?),
            u.arbitrary()?,
        )),
    };
    let p = payload(
        &SmallFrame::peer_present(&key, addr, flags),
        FrameType::PeerPresent,
    );
    assert_eq!(p.len(), PEER_PRESENT_LEN);
    assert_eq!(p[..KEY_LEN], key.0);
    let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&p[KEY_LEN..KEY_LEN + 16]).unwrap());
    let port = u16::from_be_bytes([p[KEY_LEN + 16], p[KEY_LEN + 17]]);
    match addr {
        None => assert!(ip.is_unspecified() && port == 0),
        Some(a) => {
            let want = match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            assert_eq!((ip, port), (want, a.port()));
        }
    }
    assert_eq!(p[PEER_PRESENT_LEN - 1], flags);
    Ok(())
}

/// The payload of `f`, after checking that its header says type `t` and the right length.
fn payload(f: &SmallFrame, t: FrameType) -> Vec<u8> {
    let b = f.as_bytes();
    let h: &[u8; HEADER_LEN] = b[..HEADER_LEN].try_into().unwrap();
    let (ty, len) = decode_header(h);
    assert_eq!(ty, t as u8);
    assert_eq!(len as usize, b.len() - HEADER_LEN);
    b[HEADER_LEN..].to_vec()
}
