//! The DERP wire format: a 1-byte frame type, a big-endian u32 payload length, the payload.
//! Pure encode/decode over byte slices; the source of truth is Tailscale's `derp/derp.go`.

use crate::key::{NodePublic, KEY_LEN};

/// Frame header length: type (1) + big-endian u32 payload length (4).
pub const HEADER_LEN: usize = 5;
/// The DERP protocol version this server speaks (v2: RecvPacket starts with the source key).
pub const PROTOCOL_VERSION: u32 = 2;
/// `"DERP🔑"`, the start of the ServerKey payload.
pub const MAGIC: [u8; 8] = *b"DERP\xF0\x9F\x94\x91";
/// Largest packet carried in a SendPacket/RecvPacket/ForwardPacket, not counting keys.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Smallest and largest ClientInfo payload the server accepts: key + nonce, up to 256 KiB.
pub const CLIENT_INFO_MIN: usize = KEY_LEN + NONCE_LEN;
/// See [`CLIENT_INFO_MIN`].
pub const CLIENT_INFO_MAX: usize = 256 << 10;
/// NaCl box nonce length.
pub const NONCE_LEN: usize = 24;
/// Ping payloads are 8 bytes; the server accepts up to this many and echoes the first 8.
pub const PING_MAX: usize = 1000;
/// Length of a PeerPresent payload: key, 16-byte IP, port, flags.
pub const PEER_PRESENT_LEN: usize = KEY_LEN + 16 + 2 + 1;
/// `"TS💬"`: the start of every disco message.
pub const DISCO_MAGIC: [u8; 6] = *b"TS\xF0\x9F\x92\xAC";
/// A packet "looks like disco" when it has the magic and room for a key and a nonce.
pub const DISCO_MIN_LEN: usize = DISCO_MAGIC.len() + KEY_LEN + NONCE_LEN;

/// Frame types. The payload layout of each is given on the variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// S→C: MAGIC(8) ‖ server public key(32) [‖ ignored future bytes].
    ServerKey = 0x01,
    /// C→S: client public key(32) ‖ nonce(24) ‖ box(JSON ClientInfo).
    ClientInfo = 0x02,
    /// S→C: nonce(24) ‖ box(JSON ServerInfo).
    ServerInfo = 0x03,
    /// C→S: destination key(32) ‖ packet.
    SendPacket = 0x04,
    /// S→C: source key(32) ‖ packet.
    RecvPacket = 0x05,
    /// S→C: empty; sent every 60 s plus jitter so clients see the connection is alive.
    KeepAlive = 0x06,
    /// C→S: one byte, non-zero = this is the client's home (preferred) region.
    NotePreferred = 0x07,
    /// S→C: peer key(32) ‖ reason(1).
    PeerGone = 0x08,
    /// S→C (mesh watchers): key(32) ‖ IP(16) ‖ port(2, BE) ‖ flags(1).
    PeerPresent = 0x09,
    /// Mesh C→S: source key(32) ‖ destination key(32) ‖ packet.
    ForwardPacket = 0x0a,
    /// Mesh C→S: empty; subscribe to PeerPresent/PeerGone.
    WatchConns = 0x10,
    /// Mesh C→S: target key(32); close every connection of that key.
    ClosePeer = 0x11,
    /// Both ways: 8 opaque bytes.
    Ping = 0x12,
    /// Both ways: the 8 bytes of the Ping being answered.
    Pong = 0x13,
    /// S→C: UTF-8 problem text, empty = healthy.
    Health = 0x14,
    /// S→C: reconnect-in ms(4, BE) ‖ try-for ms(4, BE).
    Restarting = 0x15,
}

impl FrameType {
    /// The frame type for a wire byte, or `None` for types this server ignores.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::ServerKey,
            0x02 => Self::ClientInfo,
            0x03 => Self::ServerInfo,
            0x04 => Self::SendPacket,
            0x05 => Self::RecvPacket,
            0x06 => Self::KeepAlive,
            0x07 => Self::NotePreferred,
            0x08 => Self::PeerGone,
            0x09 => Self::PeerPresent,
            0x0a => Self::ForwardPacket,
            0x10 => Self::WatchConns,
            0x11 => Self::ClosePeer,
            0x12 => Self::Ping,
            0x13 => Self::Pong,
            0x14 => Self::Health,
            0x15 => Self::Restarting,
            _ => return None,
        })
    }
}

/// Why a peer is gone, the last byte of a PeerGone frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerGoneReason {
    /// The peer was connected to this region and has left.
    Disconnected = 0x00,
    /// The server has no record of the destination (sent for disco-looking packets only).
    NotHere = 0x01,
}

/// PeerPresent flag bits.
pub mod peer_flags {
    /// An ordinary client (used only when no other bit is set).
    pub const IS_REGULAR: u8 = 0x01;
    /// The client presented the mesh key.
    pub const IS_MESH_PEER: u8 = 0x02;
    /// The client said `IsProber` in its ClientInfo.
    pub const IS_PROBER: u8 = 0x04;
    /// The client's request carried a non-empty `Ideal-Node` header.
    pub const NOT_IDEAL: u8 = 0x08;
}

/// Decodes a frame header: the raw type byte and the payload length. Any length is returned;
/// each reader applies its own limit.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> (u8, u32) {
    (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
}

/// Encodes a frame header into `out`.
pub fn encode_header(out: &mut [u8; HEADER_LEN], t: FrameType, len: u32) {
    out[0] = t as u8;
    out[1..].copy_from_slice(&len.to_be_bytes());
}

/// True when `pkt` is a disco message (the only packets that earn a NotHere PeerGone).
pub fn looks_like_disco(pkt: &[u8]) -> bool {
    pkt.len() >= DISCO_MIN_LEN && pkt.starts_with(&DISCO_MAGIC)
}

/// A small control frame built in place: no allocation, at most a PeerPresent (56 bytes).
#[derive(Clone, Copy)]
pub struct SmallFrame {
    buf: [u8; HEADER_LEN + PEER_PRESENT_LEN],
    len: u8,
}

impl std::fmt::Debug for SmallFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SmallFrame({:02x?})", self.as_bytes())
    }
}

impl SmallFrame {
    fn new(t: FrameType, payload: &[&[u8]]) -> Self {
        let mut buf = [0u8; HEADER_LEN + PEER_PRESENT_LEN];
        let mut n = HEADER_LEN;
        for p in payload {
            buf[n..n + p.len()].copy_from_slice(p);
            n += p.len();
        }
        let mut h = [0u8; HEADER_LEN];
        encode_header(&mut h, t, (n - HEADER_LEN) as u32);
        buf[..HEADER_LEN].copy_from_slice(&h);
        Self { buf, len: n as u8 }
    }

    /// The encoded frame, header included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// KeepAlive: header only.
    pub fn keep_alive() -> Self {
        Self::new(FrameType::KeepAlive, &[])
    }

    /// Pong echoing `data`.
    pub fn pong(data: [u8; 8]) -> Self {
        Self::new(FrameType::Pong, &[&data])
    }

    /// PeerGone: 32-byte key and a reason byte (33 bytes of payload).
    pub fn peer_gone(peer: &NodePublic, reason: PeerGoneReason) -> Self {
        Self::new(FrameType::PeerGone, &[&peer.0, &[reason as u8]])
    }

    /// PeerPresent: 51 bytes. IPv4 addresses are sent v4-mapped; no address → zeros.
    pub fn peer_present(peer: &NodePublic, addr: Option<std::net::SocketAddr>, flags: u8) -> Self {
        let (ip, port) = match addr {
            Some(a) => {
                let ip = match a.ip() {
                    std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    std::net::IpAddr::V6(v6) => v6.octets(),
                };
                (ip, a.port())
            }
            None => ([0; 16], 0),
        };
        Self::new(
            FrameType::PeerPresent,
            &[&peer.0, &ip, &port.to_be_bytes(), &[flags]],
        )
    }

    /// Restarting: reconnect-in and try-for, in milliseconds.
    pub fn restarting(reconnect_in_ms: u32, try_for_ms: u32) -> Self {
        Self::new(
            FrameType::Restarting,
            &[&reconnect_in_ms.to_be_bytes(), &try_for_ms.to_be_bytes()],
        )
    }
}

#[cfg(test)]
mod tests {
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
}
