//! The wire format's unit tests: golden headers, magic bytes and frames (PeerPresent among
//! them), `check_len`'s rules for a session's reader and a mesh link, and the error texts.

use super::*;

#[test]
fn header_golden() {
    let mut h = [0u8; 5];
    encode_header(&mut h, FrameType::SendPacket, 1024);
    assert_eq!(h, [0x04, 0, 0, 0x04, 0]);
    assert_eq!(
        decode_header(&[0x12, 0xff, 0xff, 0xff, 0xff]),
        (0x12, u32::MAX)
    );
    assert_eq!(decode_header(&[0x06, 0, 0, 0, 0]), (0x06, 0));
    for b in 0..=255u8 {
        if let Some(t) = FrameType::from_u8(b) {
            assert_eq!(t as u8, b);
        }
    }
}

#[test]
fn magic_and_disco_magic_bytes() {
    assert_eq!(MAGIC, [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91]);
    assert_eq!(DISCO_MAGIC, [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC]);
    assert_eq!(DISCO_MIN_LEN, 62);
    let mut p = vec![0u8; 62];
    p[..6].copy_from_slice(&DISCO_MAGIC);
    assert!(looks_like_disco(&p));
    assert!(!looks_like_disco(&p[..61]));
    p[0] = b'X';
    assert!(!looks_like_disco(&p));
}

#[test]
fn small_frames_golden() {
    assert_eq!(SmallFrame::keep_alive().as_bytes(), [6, 0, 0, 0, 0]);
    assert_eq!(
        SmallFrame::pong([1, 2, 3, 4, 5, 6, 7, 8]).as_bytes(),
        [0x13, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]
    );
    let k = NodePublic([0xab; 32]);
    let g = SmallFrame::peer_gone(&k, PeerGoneReason::NotHere);
    let b = g.as_bytes();
    assert_eq!(b.len(), 5 + 33);
    assert_eq!(&b[..5], [0x08, 0, 0, 0, 33]);
    assert_eq!(&b[5..37], [0xab; 32]);
    assert_eq!(b[37], 0x01);
    let r = SmallFrame::restarting(1, 2);
    assert_eq!(r.as_bytes(), [0x15, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 2]);
}

/// Every frame type a session reads, at and around each boundary length.
#[test]
fn session_length_rules() {
    use FrameType as F;
    let user = Reader::Session { mesh: false };
    let mesh = Reader::Session { mesh: true };
    let max = MAX_PACKET_SIZE as u32;
    let key = KEY_LEN as u32;
    for r in [user, mesh] {
        let send = |len| check_len(r, F::SendPacket as u8, len);
        let short = |len| {
            Err(FrameError::Short {
                t: F::SendPacket,
                len,
            })
        };
        assert_eq!(send(0), short(0));
        assert_eq!(send(key - 1), short(key - 1));
        let pkt = |len| {
            Ok(Body::Packet {
                t: F::SendPacket,
                keys: KEY_LEN,
                len,
            })
        };
        assert_eq!(send(key), pkt(0));
        assert_eq!(send(key + max), pkt(MAX_PACKET_SIZE));
        let big = |packet| {
            Err(FrameError::PacketTooLarge {
                t: F::SendPacket,
                packet,
            })
        };
        assert_eq!(send(key + max + 1), big(max + 1));
        assert_eq!(send(u32::MAX), big(u32::MAX - key));

        let pref = |len| check_len(r, F::NotePreferred as u8, len);
        let ctl = |t, len, skip| Ok(Body::Control { t, len, skip });
        let bad = |t, len| Err(FrameError::BadLength { t, len });
        assert_eq!(pref(1), ctl(F::NotePreferred, 1, 0));
        for n in [0, 2, u32::MAX] {
            assert_eq!(pref(n), bad(F::NotePreferred, n));
        }

        let ping = |len| check_len(r, F::Ping as u8, len);
        assert_eq!(ping(8), ctl(F::Ping, 8, 0));
        assert_eq!(ping(PING_MAX as u32), ctl(F::Ping, 8, PING_MAX as u32 - 8));
        for n in [0, 7, PING_MAX as u32 + 1, u32::MAX] {
            assert_eq!(ping(n), bad(F::Ping, n));
        }

        // Types a client does not send, and unknown ones: skipped, whatever their length.
        for t in [
            0x00, 0x01, 0x02, 0x03, 0x05, 0x06, 0x08, 0x09, 0x0b, 0x0f, 0x13, 0x14,
        ]
        .into_iter()
        .chain([0x15, 0x16, 0x7f, 0xff])
        {
            for n in [0, 1, max + 100, u32::MAX] {
                assert_eq!(check_len(r, t, n), Ok(Body::Skip(n)), "{t:#04x} {n}");
            }
        }
    }

    // The mesh frames: refused without the mesh key, at any length.
    for t in [F::WatchConns, F::ClosePeer, F::ForwardPacket] {
        for n in [0, key, 2 * key + 1, u32::MAX] {
            assert_eq!(
                check_len(user, t as u8, n),
                Err(FrameError::NeedsMeshKey(t as u8))
            );
        }
    }
    let watch = |len| check_len(mesh, F::WatchConns as u8, len);
    assert_eq!(
        watch(0),
        Ok(Body::Control {
            t: F::WatchConns,
            len: 0,
            skip: 0
        })
    );
    for n in [1, u32::MAX] {
        assert_eq!(
            watch(n),
            Err(FrameError::BadLength {
                t: F::WatchConns,
                len: n
            })
        );
    }
    let close = |len| check_len(mesh, F::ClosePeer as u8, len);
    assert_eq!(
        close(key),
        Ok(Body::Control {
            t: F::ClosePeer,
            len: KEY_LEN,
            skip: 0
        })
    );
    for n in [0, key - 1, key + 1, u32::MAX] {
        assert_eq!(
            close(n),
            Err(FrameError::BadLength {
                t: F::ClosePeer,
                len: n
            })
        );
    }
    let fwd = |len| check_len(mesh, F::ForwardPacket as u8, len);
    for n in [0, key, 2 * key - 1] {
        assert_eq!(
            fwd(n),
            Err(FrameError::Short {
                t: F::ForwardPacket,
                len: n
            })
        );
    }
    let pkt = |len| {
        Ok(Body::Packet {
            t: F::ForwardPacket,
            keys: 2 * KEY_LEN,
            len,
        })
    };
    assert_eq!(fwd(2 * key), pkt(0));
    assert_eq!(fwd(2 * key + max), pkt(MAX_PACKET_SIZE));
    assert_eq!(
        fwd(2 * key + max + 1),
        Err(FrameError::PacketTooLarge {
            t: F::ForwardPacket,
            packet: max + 1
        })
    );
}

/// Every frame type a mesh link reads, at and around each boundary length.
#[test]
fn mesh_link_length_rules() {
    use FrameType as F;
    let r = Reader::MeshLink;
    let key = KEY_LEN as u32;
    for t in 0..=255u8 {
        assert_eq!(
            check_len(r, t, LINK_FRAME_MAX + 1),
            Err(FrameError::TooLarge {
                t,
                len: LINK_FRAME_MAX + 1
            })
        );
        assert!(check_len(r, t, u32::MAX).is_err());
        let ours = [F::PeerPresent as u8, F::PeerGone as u8].contains(&t);
        for n in [0, 1, key - 1, key, key + 1, LINK_FRAME_MAX] {
            if !ours || n < key {
                assert_eq!(check_len(r, t, n), Ok(Body::Skip(n)), "{t:#04x} {n}");
            }
        }
    }
    let present = |len| check_len(r, F::PeerPresent as u8, len);
    let ctl = |t, len, skip| Ok(Body::Control { t, len, skip });
    assert_eq!(present(key), ctl(F::PeerPresent, KEY_LEN, 0));
    assert_eq!(
        present(PEER_PRESENT_LEN as u32),
        ctl(F::PeerPresent, KEY_LEN, PEER_PRESENT_LEN as u32 - key)
    );
    assert_eq!(
        present(LINK_FRAME_MAX),
        ctl(F::PeerPresent, KEY_LEN, LINK_FRAME_MAX - key)
    );
    let gone = |len| check_len(r, F::PeerGone as u8, len);
    assert_eq!(gone(key), ctl(F::PeerGone, KEY_LEN, 0));
    assert_eq!(gone(key + 1), ctl(F::PeerGone, KEY_LEN + 1, 0));
    assert_eq!(gone(key + 2), ctl(F::PeerGone, KEY_LEN + 1, 1));
    assert_eq!(
        gone(LINK_FRAME_MAX),
        ctl(F::PeerGone, CONTROL_MAX, LINK_FRAME_MAX - key - 1)
    );
}

/// The error texts connections are closed with (logs and tests/process/attacks/ read them).
#[test]
fn frame_error_texts() {
    let text = |r, t, len| check_len(r, t, len).unwrap_err().to_string();
    let user = Reader::Session { mesh: false };
    let mesh = Reader::Session { mesh: true };
    assert_eq!(text(user, 0x04, 31), "short SendPacket: 31 bytes");
    assert_eq!(
        text(user, 0x04, u32::MAX),
        "SendPacket too large: 4294967263"
    );
    assert_eq!(text(mesh, 0x0a, 63), "short ForwardPacket: 63 bytes");
    assert_eq!(text(mesh, 0x0a, 65_601), "ForwardPacket too large: 65537");
    assert_eq!(text(user, 0x07, 2), "NotePreferred length 2");
    assert_eq!(text(user, 0x12, 7), "Ping length 7");
    assert_eq!(text(mesh, 0x10, 1), "WatchConns length 1");
    assert_eq!(text(mesh, 0x11, 31), "ClosePeer length 31");
    assert_eq!(
        text(user, 0x11, 32),
        "insufficient permissions for frame type 0x11 (mesh key required)"
    );
    assert_eq!(
        text(Reader::MeshLink, 0x09, 1_048_577),
        "frame 0x09 of 1048577 bytes is too large"
    );
}

#[test]
fn peer_present_golden() {
    let k = NodePublic([7; 32]);
    let a: std::net::SocketAddr = "1.2.3.4:258".parse().unwrap();
    let f = SmallFrame::peer_present(&k, Some(a), peer_flags::IS_REGULAR);
    let b = f.as_bytes();
    assert_eq!(b.len(), 5 + 51);
    assert_eq!(&b[..5], [0x09, 0, 0, 0, 51]);
    assert_eq!(
        &b[37..53],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]
    );
    assert_eq!(&b[53..55], [1, 2]);
    assert_eq!(b[55], 0x01);
    let z = SmallFrame::peer_present(&k, None, 0x06);
    assert_eq!(&z.as_bytes()[37..55], [0u8; 18]);
    assert_eq!(z.as_bytes()[55], 0x06);
}
