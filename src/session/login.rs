//! The login: the 101 (unless fast-start or WebSocket), ServerKey, the client's ClientInfo,
//! then whether it may stay (mesh key, admission, `--max-clients`) and its PeerPresent flags.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, peer_flags, HEADER_LEN};
use crate::handshake::{self, ClientInfo, LoginError, SessionBox};
use crate::key::KEY_LEN;
use crate::lograte::{limited, LOGINS};
use crate::relay::Relay;

use super::{Handoff, SessionError};

/// The login, up to an opened ClientInfo: the 101 (unless fast-start or WebSocket), ServerKey,
/// then the client's ClientInfo, read into a small buffer of the login's own.
pub(super) async fn login<R, W>(
    state: &Relay,
    rd: &mut R,
    wr: &mut W,
    up: &Handoff,
) -> Result<(ClientInfo, SessionBox), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(256);
    if !up.fast_start && !up.websocket {
        hello.extend_from_slice(
            crate::http::switching_protocols(&state.public_key.untyped_hex()).as_bytes(),
        );
    }
    // Fast-start clients already know the key, but derper sends it anyway and they skip it.
    hello.extend_from_slice(&handshake::server_key_frame(&state.public_key));
    wr.write_all(&hello).await?;
    wr.flush().await?;
    let mut h = [0u8; HEADER_LEN];
    rd.read_exact(&mut h).await?;
    let (t, len) = frame::decode_header(&h);
    handshake::check_client_info_header(t, len).map_err(SessionError::Login)?;
    let n = len as usize;
    // derper takes up to 256 KiB; real ClientInfos are under 200 bytes. Read into a small
    // buffer of the login's own, not a pool buffer that half-logins could pin.
    if n > handshake::CLIENT_INFO_ACCEPT_MAX {
        return Err(SessionError::Login(LoginError::TooLong(len)));
    }
    let mut buf = [0u8; handshake::CLIENT_INFO_ACCEPT_MAX];
    rd.read_exact(&mut buf[..n]).await?;
    handshake::open_client_info(&state.private_key, &buf[..n]).map_err(SessionError::Login)
}

/// Whether the logged-in client may stay, and whether it is a mesh peer (the region's mesh key:
/// never checked, as in derper). Others pass the admission checks and `--max-clients`; a
/// refused client sees EOF, no error frame.
pub(super) async fn admit(
    state: &Relay,
    info: &ClientInfo,
    remote: SocketAddr,
) -> Result<bool, SessionError> {
    let is_mesh = match (&state.mesh_key, &info.mesh_key) {
        (Some(ours), Some(theirs)) => ct_eq(ours, theirs),
        _ => false,
    };
    if is_mesh {
        return Ok(true);
    }
    let mut verdict = state.admission.check(&info.key, remote).await;
    let m = &state.metrics;
    if verdict.is_ok() && m.current_connections.load(Relaxed) >= state.limits.max_clients {
        m.clients_full.fetch_add(1, Relaxed);
        verdict = Err(format!(
            "server full (--max-clients {})",
            state.limits.max_clients
        ));
    }
    match verdict {
        Ok(()) => Ok(false),
        Err(why) => {
            limited!(
                info,
                LOGINS,
                "derp: {remote}: client {} rejected: {why}",
                info.key
            );
            Err(SessionError::Rejected(why))
        }
    }
}

/// The PeerPresent flags of a logged-in client.
pub(super) fn flags_of(is_mesh: bool, info: &ClientInfo, up: &Handoff) -> u8 {
    let mut flags = 0;
    if is_mesh {
        flags |= peer_flags::IS_MESH_PEER;
    }
    if info.is_prober {
        flags |= peer_flags::IS_PROBER;
    }
    if up.not_ideal {
        flags |= peer_flags::NOT_IDEAL;
    }
    if flags == 0 {
        flags = peer_flags::IS_REGULAR;
    }
    flags
}

/// Constant-time comparison of two mesh keys.
fn ct_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}
