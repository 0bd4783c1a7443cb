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

/// Bytes of a RecvPacket frame before its packet: the header and the source key. A pool buffer
/// holds a received packet framed so, ready to write ([`crate::pool::PacketBuf::payload`]).
pub const RECV_PREFIX: usize = HEADER_LEN + KEY_LEN;
/// Largest payload of any frame a mesh link takes from its peer (Go's DERP client: 1 MiB).
pub const LINK_FRAME_MAX: u32 = 1 << 20;
/// Most bytes of a control frame's payload a reader keeps (a PeerGone's key and reason); the
/// rest of the payload is skipped.
pub const CONTROL_MAX: usize = KEY_LEN + 1;

/// Who reads a frame: the length rules of [`check_len`] depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// derpd serving a client's session: the frames a client sends. `mesh`: the client logged
    /// in with the mesh key, so it may send WatchConns, ClosePeer and ForwardPacket.
    Session {
        /// The client presented the mesh key.
        mesh: bool,
    },
    /// A mesh link, derpd as a client of its peer: the frames the peer's server sends.
    MeshLink,
}

/// What a reader does with a frame's payload, decided from its header alone. The parts of
/// every answer add up to the header's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// SendPacket (`keys` = the destination key) or ForwardPacket (`keys` = source and
    /// destination keys): read the keys, then a packet of `len` bytes, at most
    /// [`MAX_PACKET_SIZE`], into a pool buffer.
    Packet {
        /// SendPacket or ForwardPacket.
        t: FrameType,
        /// Key bytes before the packet: [`KEY_LEN`] or twice that.
        keys: usize,
        /// The packet's length.
        len: usize,
    },
    /// A control frame: read its first `len` bytes (at most [`CONTROL_MAX`]), skip `skip` more.
    Control {
        /// The control frame's type.
        t: FrameType,
        /// Bytes read and used.
        len: usize,
        /// Bytes after them, read and dropped.
        skip: u32,
    },
    /// A frame this reader ignores (of a type unknown or not meant for it): skip all of it.
    Skip(u32),
}

/// A frame header a reader refuses; the connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A SendPacket or ForwardPacket shorter than its keys.
    Short {
        /// The frame's type.
        t: FrameType,
        /// The payload length in the header.
        len: u32,
    },
    /// A packet over [`MAX_PACKET_SIZE`].
    PacketTooLarge {
        /// The frame's type.
        t: FrameType,
        /// The packet's length (the payload less its keys).
        packet: u32,
    },
    /// A control frame of a length its type does not allow.
    BadLength {
        /// The frame's type.
        t: FrameType,
        /// The payload length in the header.
        len: u32,
    },
    /// A mesh frame type (WatchConns, ClosePeer, ForwardPacket) from a client without the
    /// mesh key.
    NeedsMeshKey(u8),
    /// A frame over [`LINK_FRAME_MAX`] from a mesh peer.
    TooLarge {
        /// The type byte.
        t: u8,
        /// The payload length in the header.
        len: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Short { t, len } => write!(f, "short {t:?}: {len} bytes"),
            Self::PacketTooLarge { t, packet } => write!(f, "{t:?} too large: {packet}"),
            Self::BadLength { t, len } => write!(f, "{t:?} length {len}"),
            Self::NeedsMeshKey(t) => write!(
                f,
                "insufficient permissions for frame type {t:#04x} (mesh key required)"
            ),
            Self::TooLarge { t, len } => write!(f, "frame {t:#04x} of {len} bytes is too large"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The length rules: what `reader` does with a frame of type `t` and payload length `len`.
///
/// A session: SendPacket is a destination key and a packet of at most [`MAX_PACKET_SIZE`];
/// NotePreferred is 1 byte; Ping 8 to [`PING_MAX`] bytes (the first 8 kept); with the mesh key
/// only, WatchConns is empty, ClosePeer a key, ForwardPacket two keys and a packet; any other
/// type, of any length, is skipped. A mesh link: no frame over [`LINK_FRAME_MAX`]; PeerPresent
/// and PeerGone of at least a key keep the key (and PeerGone's reason byte when there is
/// one); everything else is skipped.
pub fn check_len(reader: Reader, t: u8, len: u32) -> Result<Body, FrameError> {
    match reader {
        Reader::Session { mesh } => session_body(mesh, t, len),
        Reader::MeshLink => link_body(t, len),
    }
}

fn session_body(mesh: bool, t: u8, len: u32) -> Result<Body, FrameError> {
    use FrameType as F;
    let Some(ft) = FrameType::from_u8(t) else {
        return Ok(Body::Skip(len));
    };
    match ft {
        F::SendPacket => packet(ft, KEY_LEN, len),
        F::NotePreferred => control(ft, len, 1..=1, 1),
        F::Ping => control(ft, len, 8..=PING_MAX as u32, 8),
        F::WatchConns | F::ClosePeer | F::ForwardPacket if !mesh => {
            Err(FrameError::NeedsMeshKey(t))
        }
        F::WatchConns => control(ft, len, 0..=0, 0),
        F::ClosePeer => control(ft, len, KEY_LEN as u32..=KEY_LEN as u32, KEY_LEN),
        F::ForwardPacket => packet(ft, 2 * KEY_LEN, len),
        _ => Ok(Body::Skip(len)),
    }
}

fn link_body(t: u8, len: u32) -> Result<Body, FrameError> {
    if len > LINK_FRAME_MAX {
        return Err(FrameError::TooLarge { t, len });
    }
    let key = KEY_LEN as u32;
    Ok(match FrameType::from_u8(t) {
        Some(ft @ FrameType::PeerPresent) if len >= key => Body::Control {
            t: ft,
            len: KEY_LEN,
            skip: len - key,
        },
        // The reason byte came later: a PeerGone without one means Disconnected.
        Some(ft @ FrameType::PeerGone) if len >= key => {
            let keep = if len > key { key + 1 } else { key };
            Body::Control {
                t: ft,
                len: keep as usize,
                skip: len - keep,
            }
        }
        _ => Body::Skip(len),
    })
}

/// A packet frame: `keys` key bytes, then at most [`MAX_PACKET_SIZE`].
fn packet(t: FrameType, keys: usize, len: u32) -> Result<Body, FrameError> {
    let Some(packet) = (len as usize).checked_sub(keys) else {
        return Err(FrameError::Short { t, len });
    };
    if packet > MAX_PACKET_SIZE {
        return Err(FrameError::PacketTooLarge {
            t,
            packet: packet as u32,
        });
    }
    Ok(Body::Packet {
        t,
        keys,
        len: packet,
    })
}

/// A control frame whose length must be in `allowed`; its first `keep` bytes are used.
fn control(
    t: FrameType,
    len: u32,
    allowed: std::ops::RangeInclusive<u32>,
    keep: usize,
) -> Result<Body, FrameError> {
    if !allowed.contains(&len) {
        return Err(FrameError::BadLength { t, len });
    }
    Ok(Body::Control {
        t,
        len: keep,
        skip: len - keep as u32,
    })
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
mod tests;
