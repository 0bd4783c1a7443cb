//! The per-frame length rules (`frame::check_len`) that a session's reader and a mesh link's
//! watcher follow: for any header, from either reader, no panic, and an answer within the
//! published bounds: a packet fits a large pool buffer, a control payload kept fits
//! `CONTROL_MAX`, the parts add up to the header's length, and only the frame types each reader
//! acts on are read (the mesh ones only with the mesh key). Each input is a list of 5-byte
//! headers: the type byte and a big-endian length, as on the wire.
#![no_main]

use derpd::frame::{
    check_len, decode_header, Body, FrameError, FrameType, Reader, CONTROL_MAX, HEADER_LEN,
    LINK_FRAME_MAX, MAX_PACKET_SIZE, PING_MAX, RECV_PREFIX,
};
use derpd::key::KEY_LEN;
use derpd::pool::LARGE_BUF;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for h in data.chunks_exact(HEADER_LEN) {
        let (t, len) = decode_header(h.try_into().unwrap());
        for reader in [
            Reader::Session { mesh: false },
            Reader::Session { mesh: true },
            Reader::MeshLink,
        ] {
            match check_len(reader, t, len) {
                Ok(body) => check_body(reader, t, len, body),
                Err(e) => check_error(reader, t, len, e),
            }
        }
    }
});

/// An answer: within the bounds, adding up to `len`, for a frame type this reader reads.
fn check_body(reader: Reader, t: u8, len: u32, body: Body) {
    let len = u64::from(len);
    match body {
        Body::Packet { t: ft, keys, len: n } => {
            assert_eq!(ft as u8, t);
            assert!(n <= MAX_PACKET_SIZE && RECV_PREFIX + n <= LARGE_BUF, "{n}");
            assert_eq!((keys + n) as u64, len);
            match ft {
                FrameType::SendPacket => assert_eq!(keys, KEY_LEN),
                FrameType::ForwardPacket => {
                    assert_eq!(keys, 2 * KEY_LEN);
                    assert_eq!(reader, Reader::Session { mesh: true });
                }
                _ => panic!("a packet from {ft:?}"),
            }
            assert!(matches!(reader, Reader::Session { .. }));
        }
        Body::Control { t: ft, len: n, skip } => {
            assert_eq!(ft as u8, t);
            assert!(n <= CONTROL_MAX, "{n}");
            assert_eq!(n as u64 + u64::from(skip), len);
            let (want, mesh_only) = match ft {
                FrameType::NotePreferred => (1, false),
                FrameType::Ping => (8, false),
                FrameType::WatchConns => (0, true),
                FrameType::ClosePeer => (KEY_LEN, true),
                FrameType::PeerPresent => (KEY_LEN, false),
                FrameType::PeerGone => (KEY_LEN + usize::from(len > KEY_LEN as u64), false),
                _ => panic!("a control frame from {ft:?}"),
            };
            assert_eq!(n, want, "{ft:?}");
            let link_frame = matches!(ft, FrameType::PeerPresent | FrameType::PeerGone);
            match reader {
                Reader::MeshLink => assert!(link_frame && len <= u64::from(LINK_FRAME_MAX)),
                Reader::Session { mesh } => {
                    assert!(!link_frame && (mesh || !mesh_only));
                    assert!(len <= PING_MAX as u64);
                }
            }
        }
        Body::Skip(n) => {
            assert_eq!(u64::from(n), len);
            let acted_on: &[FrameType] = match reader {
                Reader::MeshLink => {
                    assert!(n <= LINK_FRAME_MAX);
                    // Those two are skipped only when shorter than a key.
                    if len >= KEY_LEN as u64 {
                        &[FrameType::PeerPresent, FrameType::PeerGone]
                    } else {
                        &[]
                    }
                }
                Reader::Session { .. } => &[
                    FrameType::SendPacket,
                    FrameType::ForwardPacket,
                    FrameType::NotePreferred,
                    FrameType::Ping,
                    FrameType::WatchConns,
                    FrameType::ClosePeer,
                ],
            };
            assert!(!acted_on.iter().any(|f| *f as u8 == t), "{t:#04x} skipped");
        }
    }
}

/// A refusal: only for a length or a type the reader must not take, and it says which.
fn check_error(reader: Reader, t: u8, len: u32, e: FrameError) {
    assert!(!e.to_string().is_empty());
    match (reader, e) {
        (Reader::MeshLink, FrameError::TooLarge { t: et, len: el }) => {
            assert_eq!((et, el), (t, len));
            assert!(len > LINK_FRAME_MAX);
        }
        (Reader::MeshLink, e) => panic!("a mesh link refused with {e:?}"),
        (Reader::Session { mesh }, FrameError::NeedsMeshKey(et)) => {
            assert!(et == t && !mesh);
            let mesh_only = [0x10, 0x11, 0x0a];
            assert!(mesh_only.contains(&t));
        }
        (Reader::Session { .. }, FrameError::Short { t: ft, len: el }) => {
            assert_eq!((ft as u8, el), (t, len));
            let keys = if ft == FrameType::ForwardPacket { 2 } else { 1 } * KEY_LEN;
            assert!((len as usize) < keys);
        }
        (Reader::Session { .. }, FrameError::PacketTooLarge { t: ft, packet }) => {
            assert_eq!(ft as u8, t);
            let keys = if ft == FrameType::ForwardPacket { 2 } else { 1 } * KEY_LEN;
            assert_eq!(u64::from(packet) + keys as u64, u64::from(len));
            assert!(packet as usize > MAX_PACKET_SIZE);
        }
        (Reader::Session { .. }, FrameError::BadLength { t: ft, len: el }) => {
            assert_eq!((ft as u8, el), (t, len));
            let ok = match ft {
                FrameType::NotePreferred => len == 1,
                FrameType::Ping => (8..=PING_MAX as u32).contains(&len),
                FrameType::WatchConns => len == 0,
                FrameType::ClosePeer => len == KEY_LEN as u32,
                _ => panic!("{ft:?} has no fixed length"),
            };
            assert!(!ok, "{ft:?} of {len} refused");
        }
        (Reader::Session { .. }, e) => panic!("a session refused with {e:?}"),
    }
}
