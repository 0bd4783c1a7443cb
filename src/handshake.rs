//! The DERP login: ServerKey out, ClientInfo in (NaCl box from the client), ServerInfo out.
//! No I/O: the connection code moves these bytes; this file seals, opens and parses them.

use std::fmt;

use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{Nonce, PublicKey, SalsaBox};

use crate::frame::{self, FrameType, HEADER_LEN, MAGIC, NONCE_LEN};
use crate::key::{parse_hex32, NodePrivate, NodePublic, KEY_LEN};

/// What the client told us in its ClientInfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's node key (its DERP address).
    pub key: NodePublic,
    /// The mesh key it presented, if any (never all zeros).
    pub mesh_key: Option<[u8; KEY_LEN]>,
    /// The client's protocol version; stored, not used (as derper).
    pub version: i64,
    /// Whether the client answers pings; stored, not used.
    pub can_ack_pings: bool,
    /// A prober: flagged in PeerPresent.
    pub is_prober: bool,
    /// Free-form client name, for logs.
    pub app_name: String,
}

impl Default for NodePublic {
    fn default() -> Self {
        NodePublic([0; KEY_LEN])
    }
}

/// Largest ClientInfo frame payload derpd reads (derper takes up to 256 KiB). Tailscale's
/// largest is about 200 bytes: key (32) + nonce (24) + box tag (16) + JSON of ~125 bytes
/// (`{"meshKey":"<64 hex>","version":2,"CanAckPings":true,"IsProber":true}`); 1 KiB leaves
/// room for new fields. It is read into a buffer of this size held only during the login.
pub const CLIENT_INFO_ACCEPT_MAX: usize = 1024;

/// Why a login was refused. No frame is sent for any of these: the connection is closed.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    /// The first frame was not ClientInfo.
    BadFrameType(u8),
    /// ClientInfo shorter than key + nonce, or over 256 KiB.
    BadLength(u32),
    /// ClientInfo within derper's limit but over [`CLIENT_INFO_ACCEPT_MAX`].
    TooLong(u32),
    /// The client key is all zeros.
    ZeroKey,
    /// The box did not open with the claimed client key.
    BoxOpen,
    /// The JSON inside did not parse, or a field had the wrong type or value.
    Json(String),
}

impl fmt::Display for LoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadFrameType(t) => write!(f, "bad frame type {t:#04x}, want ClientInfo"),
            Self::BadLength(n) => write!(f, "ClientInfo length {n} out of range"),
            Self::TooLong(n) => write!(
                f,
                "ClientInfo of {n} bytes is over derpd's {CLIENT_INFO_ACCEPT_MAX} \
                 (real clients send under 200)"
            ),
            Self::ZeroKey => f.write_str("all-zero client key"),
            Self::BoxOpen => f.write_str("ClientInfo box did not open"),
            Self::Json(e) => write!(f, "ClientInfo JSON: {e}"),
        }
    }
}

impl std::error::Error for LoginError {}

/// The ServerKey frame: header, magic, server public key (45 bytes).
pub fn server_key_frame(server: &NodePublic) -> [u8; HEADER_LEN + 8 + KEY_LEN] {
    let mut out = [0u8; HEADER_LEN + 8 + KEY_LEN];
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(&mut h, FrameType::ServerKey, (8 + KEY_LEN) as u32);
    out[..HEADER_LEN].copy_from_slice(&h);
    out[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&MAGIC);
    out[HEADER_LEN + 8..].copy_from_slice(&server.0);
    out
}

/// Checks a ClientInfo frame's type and length before its payload is read.
pub fn check_client_info_header(frame_type: u8, len: u32) -> Result<(), LoginError> {
    if frame_type != FrameType::ClientInfo as u8 {
        return Err(LoginError::BadFrameType(frame_type));
    }
    let n = len as usize;
    if !(frame::CLIENT_INFO_MIN..=frame::CLIENT_INFO_MAX).contains(&n) {
        return Err(LoginError::BadLength(len));
    }
    Ok(())
}

/// The NaCl box between the server and one client: one X25519 agreement serves both the
/// ClientInfo it opens and the ServerInfo it seals (the agreement is most of a login's cost).
pub struct SessionBox(SalsaBox);

impl fmt::Debug for SessionBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionBox")
    }
}

impl SessionBox {
    /// The box between `me` and `peer` (the same box from either side).
    pub fn new(me: &NodePrivate, peer: &NodePublic) -> Self {
        Self(SalsaBox::new(&PublicKey::from_bytes(peer.0), me.secret()))
    }

    /// Client side, for tests and the load generator: the ClientInfo frame from `client`
    /// (this box's own key).
    pub fn client_info_frame(&self, client: &NodePublic, json: &[u8]) -> Vec<u8> {
        let nonce = SalsaBox::generate_nonce(&mut OsRng);
        let sealed = self.0.encrypt(&nonce, json).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + KEY_LEN + NONCE_LEN + sealed.len());
        let mut h = [0u8; HEADER_LEN];
        let len = KEY_LEN + NONCE_LEN + sealed.len();
        frame::encode_header(&mut h, FrameType::ClientInfo, len as u32);
        out.extend_from_slice(&h);
        out.extend_from_slice(&client.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Client side: opens a ServerInfo payload and returns its JSON bytes.
    pub fn open_server_info(&self, payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = payload.split_at(NONCE_LEN);
        self.0.decrypt(Nonce::from_slice(nonce), sealed).ok()
    }
}

/// Opens a ClientInfo payload (`client key ‖ nonce ‖ box(json)`) and parses its JSON. Returns
/// the box for [`server_info_frame`].
pub fn open_client_info(
    server: &NodePrivate,
    payload: &[u8],
) -> Result<(ClientInfo, SessionBox), LoginError> {
    if payload.len() < frame::CLIENT_INFO_MIN || payload.len() > frame::CLIENT_INFO_MAX {
        return Err(LoginError::BadLength(payload.len() as u32));
    }
    let (key_bytes, rest) = payload.split_at(KEY_LEN);
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(key_bytes);
    let key = NodePublic(key);
    if key.is_zero() {
        return Err(LoginError::ZeroKey);
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let bx = SessionBox::new(server, &key);
    let json =
        bx.0.decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| LoginError::BoxOpen)?;
    let mut info = parse_client_info_json(&json)?;
    info.key = key;
    Ok((info, bx))
}

/// Parses ClientInfo JSON the way Go's encoding/json does for derp.ClientInfo: keys match
/// case-insensitively, unknown keys are ignored, `null` leaves the default, a wrong type fails,
/// and a meshKey that is not exactly 64 hex digits fails the login.
pub fn parse_client_info_json(json: &[u8]) -> Result<ClientInfo, LoginError> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| LoginError::Json(e.to_string()))?;
    let serde_json::Value::Object(map) = v else {
        return Err(LoginError::Json("not an object".into()));
    };
    let mut info = ClientInfo::default();
    let wrong = |k: &str| LoginError::Json(format!("wrong type for {k}"));
    for (k, val) in &map {
        if val.is_null() {
            continue;
        }
        if k.eq_ignore_ascii_case("meshKey") {
            let s = val.as_str().ok_or_else(|| wrong(k))?;
            let mk = parse_hex32(s).ok_or_else(|| LoginError::Json("invalid mesh key".into()))?;
            info.mesh_key = (mk != [0; KEY_LEN]).then_some(mk);
        } else if k.eq_ignore_ascii_case("version") {
            info.version = val.as_i64().ok_or_else(|| wrong(k))?;
        } else if k.eq_ignore_ascii_case("CanAckPings") {
            info.can_ack_pings = val.as_bool().ok_or_else(|| wrong(k))?;
        } else if k.eq_ignore_ascii_case("IsProber") {
            info.is_prober = val.as_bool().ok_or_else(|| wrong(k))?;
        } else if k.eq_ignore_ascii_case("AppName") {
            info.app_name = val
                .as_str()
                .ok_or_else(|| wrong(k))?
                .chars()
                .take(64)
                .collect();
        }
    }
    Ok(info)
}

/// The ServerInfo frame: `nonce ‖ box({"version":2})`, header included.
pub fn server_info_frame(bx: &SessionBox) -> Vec<u8> {
    let bx = &bx.0;
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    let json = br#"{"version":2}"#;
    // Encrypting into a Vec cannot fail for a 13-byte message; an empty box would only make
    // the client drop the connection, never this process.
    let sealed = bx.encrypt(&nonce, &json[..]).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(
        &mut h,
        FrameType::ServerInfo,
        (NONCE_LEN + sealed.len()) as u32,
    );
    out.extend_from_slice(&h);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Why a client did not accept the server's side of a login. The client side of the login is
/// here once, for every DERP client in the project: mesh links ([`crate::mesh`]), the tests'
/// client and the benchmark's load generator.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerLoginError {
    /// The first frame was not a ServerKey frame (its type and length).
    NotServerKey(u8, usize),
    /// The ServerKey frame did not start with the DERP magic.
    BadMagic,
    /// The frame after ClientInfo was not ServerInfo (its type).
    NotServerInfo(u8),
    /// The ServerInfo box did not open with the server's key.
    BoxOpen,
}

impl fmt::Display for ServerLoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotServerKey(t, n) => {
                write!(f, "want ServerKey, got frame {t:#04x} of {n} bytes")
            }
            Self::BadMagic => f.write_str("bad ServerKey magic"),
            Self::NotServerInfo(t) => write!(f, "want ServerInfo, got frame {t:#04x}"),
            Self::BoxOpen => f.write_str("ServerInfo did not open"),
        }
    }
}

impl std::error::Error for ServerLoginError {}

/// The HTTP request a DERP client opens with (the classic upgrade, not fast-start).
pub fn upgrade_request(host: &str, user_agent: &str) -> String {
    format!(
        "GET /derp HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\n\
         Connection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
    )
}

/// The server's key from the first frame after the upgrade (type and payload). As Go's
/// client, a longer payload is accepted and its rest ignored.
pub fn parse_server_key(frame_type: u8, payload: &[u8]) -> Result<NodePublic, ServerLoginError> {
    if frame_type != FrameType::ServerKey as u8 || payload.len() < MAGIC.len() + KEY_LEN {
        return Err(ServerLoginError::NotServerKey(frame_type, payload.len()));
    }
    if payload[..MAGIC.len()] != MAGIC {
        return Err(ServerLoginError::BadMagic);
    }
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&payload[MAGIC.len()..MAGIC.len() + KEY_LEN]);
    Ok(NodePublic(k))
}

/// The ServerInfo frame's JSON, opened with the login's box.
pub fn read_server_info(
    bx: &SessionBox,
    frame_type: u8,
    payload: &[u8],
) -> Result<Vec<u8>, ServerLoginError> {
    if frame_type != FrameType::ServerInfo as u8 {
        return Err(ServerLoginError::NotServerInfo(frame_type));
    }
    bx.open_server_info(payload)
        .ok_or(ServerLoginError::BoxOpen)
}

/// Client side of the login in one call: the ClientInfo frame.
pub fn client_info_frame(client: &NodePrivate, server: &NodePublic, json: &[u8]) -> Vec<u8> {
    SessionBox::new(client, server).client_info_frame(&client.public(), json)
}

/// Client side in one call: opens a ServerInfo payload and returns its JSON bytes.
pub fn open_server_info(
    client: &NodePrivate,
    server: &NodePublic,
    payload: &[u8],
) -> Option<Vec<u8>> {
    SessionBox::new(client, server).open_server_info(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_side_of_a_login() {
        let server = NodePrivate::generate();
        let client = NodePrivate::generate();
        let sk = server_key_frame(&server.public());
        assert_eq!(
            parse_server_key(sk[0], &sk[HEADER_LEN..]),
            Ok(server.public())
        );
        let mut longer = sk[HEADER_LEN..].to_vec();
        longer.push(0);
        assert_eq!(parse_server_key(sk[0], &longer), Ok(server.public()));
        assert_eq!(
            parse_server_key(sk[0], &sk[HEADER_LEN..sk.len() - 1]),
            Err(ServerLoginError::NotServerKey(sk[0], 39))
        );
        assert_eq!(
            parse_server_key(FrameType::ServerInfo as u8, &sk[HEADER_LEN..]),
            Err(ServerLoginError::NotServerKey(
                FrameType::ServerInfo as u8,
                40
            ))
        );
        let mut bad = sk[HEADER_LEN..].to_vec();
        bad[0] ^= 1;
        assert_eq!(
            parse_server_key(sk[0], &bad),
            Err(ServerLoginError::BadMagic)
        );
        // ServerInfo as the server seals it opens with the client's box; not with another's.
        let si = server_info_frame(&SessionBox::new(&server, &client.public()));
        let bx = SessionBox::new(&client, &server.public());
        assert_eq!(
            read_server_info(&bx, si[0], &si[HEADER_LEN..]).unwrap(),
            br#"{"version":2}"#
        );
        let other = SessionBox::new(&NodePrivate::generate(), &server.public());
        assert_eq!(
            read_server_info(&other, si[0], &si[HEADER_LEN..]),
            Err(ServerLoginError::BoxOpen)
        );
        assert_eq!(
            read_server_info(&bx, 0x04, &si[HEADER_LEN..]),
            Err(ServerLoginError::NotServerInfo(0x04))
        );
        assert_eq!(
            upgrade_request("h", "ua"),
            "GET /derp HTTP/1.1\r\nHost: h\r\nUser-Agent: ua\r\nConnection: Upgrade\r\n\
             Upgrade: DERP\r\n\r\n"
        );
    }

    #[test]
    fn client_info_json_is_case_insensitive() {
        let hex = "ab".repeat(32);
        let a = parse_client_info_json(format!(r#"{{"Version":5,"MeshKey":"{hex}"}}"#).as_bytes())
            .unwrap();
        assert_eq!(a.version, 5);
        assert_eq!(a.mesh_key, Some([0xab; 32]));
        let b = parse_client_info_json(
            format!(r#"{{"version":2,"meshKey":"{hex}","canackpings":true,"isprober":true}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert!(b.can_ack_pings && b.is_prober);
        assert_eq!(
            parse_client_info_json(b"{}").unwrap(),
            ClientInfo::default()
        );
        assert_eq!(
            parse_client_info_json(br#"{"meshKey":"badf00d"}"#),
            Err(LoginError::Json("invalid mesh key".into()))
        );
        assert!(parse_client_info_json(br#"{"version":"2"}"#).is_err());
        assert!(parse_client_info_json(b"[]").is_err());
        assert!(parse_client_info_json(b"{").is_err());
        let z = parse_client_info_json(format!(r#"{{"meshKey":"{}"}}"#, "0".repeat(64)).as_bytes());
        assert_eq!(z.unwrap().mesh_key, None);
    }

    #[test]
    fn login_round_trip() {
        let server = NodePrivate::generate();
        let client = NodePrivate::generate();
        let f = client_info_frame(
            &client,
            &server.public(),
            br#"{"version":2,"CanAckPings":true}"#,
        );
        let (t, len) = frame::decode_header(f[..5].try_into().unwrap());
        check_client_info_header(t, len).unwrap();
        let (info, bx) = open_client_info(&server, &f[5..]).unwrap();
        assert_eq!(info.key, client.public());
        assert!(info.can_ack_pings);
        let si = server_info_frame(&bx);
        assert_eq!(si[0], 0x03);
        assert_eq!(si.len(), 5 + 24 + 16 + 13);
        let json = open_server_info(&client, &server.public(), &si[5..]).unwrap();
        assert_eq!(json, br#"{"version":2}"#);
    }

    #[test]
    fn login_rejects_bad_input() {
        let server = NodePrivate::generate();
        let client = NodePrivate::generate();
        assert_eq!(
            check_client_info_header(0x04, 100),
            Err(LoginError::BadFrameType(4))
        );
        assert_eq!(
            check_client_info_header(0x02, 55),
            Err(LoginError::BadLength(55))
        );
        assert_eq!(
            check_client_info_header(0x02, 256 * 1024 + 1),
            Err(LoginError::BadLength(262145))
        );
        let mut f = client_info_frame(&client, &server.public(), b"{}");
        // Wrong server key: the box must not open.
        let other = NodePrivate::generate();
        assert_eq!(
            open_client_info(&other, &f[5..]).err(),
            Some(LoginError::BoxOpen)
        );
        // Zero client key.
        f[5..37].fill(0);
        assert_eq!(
            open_client_info(&server, &f[5..]).err(),
            Some(LoginError::ZeroKey)
        );
        assert_eq!(
            open_client_info(&server, &[1u8; 40]).err(),
            Some(LoginError::BadLength(40))
        );
        let bad = client_info_frame(&client, &server.public(), b"not json");
        assert!(matches!(
            open_client_info(&server, &bad[5..]),
            Err(LoginError::Json(_))
        ));
    }

    #[test]
    fn server_key_golden() {
        let k = NodePublic([0x11; 32]);
        let f = server_key_frame(&k);
        assert_eq!(
            &f[..13],
            [1, 0, 0, 0, 40, 0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91]
        );
        assert_eq!(&f[13..], [0x11; 32]);
    }
}
