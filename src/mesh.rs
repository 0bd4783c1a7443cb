//! The regional mesh, outbound side: one [`Link`] per `--mesh-with` peer. Each link dials the
//! peer's `https://<host>/derp` with this server's own key and the mesh key, sends WatchConns,
//! and turns the peer's PeerPresent/PeerGone into forwarders in the [`Registry`]; packets for
//! those keys are queued on the link and written as ForwardPacket frames. A broken link clears
//! its forwarders and redials after [`RETRY_INTERVAL`]; a link that reaches this server itself
//! stops. (The inbound side, serving mesh peers, is in [`crate::session`].)
//!
//! Certificates: a peer entry may pin the peer's leaf certificate with `sha256-raw:<hex>` (what
//! a self-signed IP certificate needs, and what derper prints for one); otherwise the peer must
//! chain to a CA in `SSL_CERT_FILE` or the system bundle, as Go's derper does.
//!
//! [`Registry`]: crate::registry::Registry

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use event_listener::listener;
use log::{debug, info, warn};
use rustls::pki_types::ServerName;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Cursor};
use smol::Timer;

use crate::config::MeshPeer;
use crate::dialer::{self, DialError};
use crate::frame::{self, FrameType, HEADER_LEN};
use crate::httpc;
use crate::key::{hex, NodePublic, KEY_LEN};
use crate::link::{Link, MAX_BATCH};
use crate::net::{LockedStream, Stream, TcpOptions};
use crate::relay::Relay;

/// Wait between a broken or failed connection and the next dial (derper: 5 s).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on dial + TLS + upgrade + login (derphttp: 10 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to a peer that takes longer closes the link (derp client: 5 s).
pub const LINK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// No frame for this long means the peer is gone: it sends a KeepAlive every 60 s (Go's
/// client uses the same 120 s read deadline).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// ForwardPacket header: frame header, source key, destination key.
const FWD_PREFIX: usize = HEADER_LEN + 2 * KEY_LEN;

/// Why a mesh connection ended or could not start.
#[derive(Debug)]
enum LinkError {
    Io(io::Error),
    Protocol(String),
    Timeout(&'static str),
    /// The peer is this server (it is allowed to list itself).
    SelfConnect,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Protocol(s) => f.write_str(s),
            Self::Timeout(what) => write!(f, "{what} timed out"),
            Self::SelfConnect => f.write_str("self-connect"),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Runs one link for the life of the server: connect, watch, forward, and redial.
pub async fn run_link(
    state: Arc<Relay>,
    tcp_options: TcpOptions,
    link: Arc<Link>,
    peer: MeshPeer,
    tls: Arc<rustls::ClientConfig>,
) {
    let host = &peer.host;
    let m = &state.metrics;
    info!("mesh({host}): will dial {}:{}", peer.dial_host, peer.port);
    loop {
        let conn = connect(&state, tcp_options, &peer, &tls)
            .or(async {
                Timer::after(CONNECT_TIMEOUT).await;
                Err(LinkError::Timeout("connect"))
            })
            .await;
        match conn {
            Err(LinkError::SelfConnect) => {
                info!("mesh({host}): detected self-connect; ignoring host");
                return;
            }
            Err(e) => warn!("mesh({host}): connect: {e}; retrying in {RETRY_INTERVAL:?}"),
            Ok((rd, wr, server_key)) => {
                info!("mesh({host}): connected to {server_key}");
                link.set_up(true, m);
                m.mesh_links_up.fetch_add(1, Relaxed);
                let mut present = HashSet::new();
                let res = watch(&state, &link, rd, &mut present)
                    .or(write_loop(&link, wr))
                    .await;
                m.mesh_links_up.fetch_sub(1, Relaxed);
                link.set_up(false, m);
                for k in &present {
                    state.registry.remove_forwarder(k, &link);
                }
                let why = match res {
                    Ok(()) => "closed by peer".to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(
                    "mesh({host}): connection lost: {why}; cleared {} forwarding mappings; \
                     reconnecting in {RETRY_INTERVAL:?}",
                    present.len()
                );
            }
        }
        Timer::after(RETRY_INTERVAL).await;
    }
}

type Reader = smol::io::Chain<Cursor<Vec<u8>>, LockedStream>;

impl From<DialError> for LinkError {
    fn from(e: DialError) -> Self {
        match e {
            DialError::Io(e) => Self::Io(e),
            e => Self::Protocol(e.to_string()),
        }
    }
}

/// Dials, upgrades and logs in as a mesh client, then subscribes with WatchConns.
async fn connect(
    state: &Relay,
    tcp_options: TcpOptions,
    peer: &MeshPeer,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(Reader, LockedStream, NodePublic), LinkError> {
    let tcp = httpc::connect_tcp(&peer.dial_host, peer.port)
        .await
        .map_err(LinkError::Protocol)?;
    tcp_options.apply(tcp.get_ref());
    let name = match peer.name.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(peer.name.clone())
            .map_err(|_| LinkError::Protocol(format!("invalid TLS name {:?}", peer.name)))?,
    };
    let tls = futures_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("TLS: {e}")))?;
    let mut shared = LockedStream::new(Stream::TlsClient(Box::new(tls)));
    let Some(mesh_key) = state.mesh_key else {
        return Err(LinkError::Protocol("no mesh key".into()));
    };
    let client = dialer::Client {
        host: &peer.host,
        user_agent: concat!("derpd/", env!("CARGO_PKG_VERSION")),
        key: &state.private_key,
        max_server_info: frame::LINK_FRAME_MAX,
    };
    let login = dialer::login(&mut shared, client, |server_key| {
        if *server_key == state.public_key {
            return Err(LinkError::SelfConnect);
        }
        let json = format!(
            r#"{{"meshKey":"{}","version":{},"CanAckPings":false}}"#,
            hex(&mesh_key),
            frame::PROTOCOL_VERSION
        );
        Ok(json.into_bytes())
    })
    .await?;
    let rd = Cursor::new(login.leftover).chain(shared.clone());
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(&mut h, FrameType::WatchConns, 0);
    shared.write_all(&h).await?;
    shared.flush().await?;
    Ok((rd, shared, login.server_key))
}

/// Reads the peer's PeerPresent/PeerGone stream into forwarders. `present` collects the keys
/// added, for the caller to remove when the connection ends.
async fn watch<R: AsyncRead + Unpin>(
    state: &Relay,
    link: &Arc<Link>,
    mut rd: R,
    present: &mut HashSet<NodePublic>,
) -> Result<(), LinkError> {
    let host = &link.name;
    loop {
        let mut h = [0u8; HEADER_LEN];
        let got = async { rd.read_exact(&mut h).await.map_err(LinkError::Io) }
            .or(async {
                Timer::after(READ_TIMEOUT).await;
                Err(LinkError::Timeout("read (no KeepAlive from the peer)"))
            })
            .await;
        match got {
            Ok(()) => {}
            Err(LinkError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let (t, len) = frame::decode_header(&h);
        let body = frame::check_len(frame::Reader::MeshLink, t, len)
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let frame::Body::Control { t, len: keep, skip } = body else {
            // KeepAlive, packets to this server's key, pings: nothing to do.
            crate::net::discard(&mut rd, u64::from(len), None).await?;
            continue;
        };
        let mut b = [0u8; frame::CONTROL_MAX];
        rd.read_exact(&mut b[..keep]).await?;
        crate::net::discard(&mut rd, u64::from(skip), None).await?;
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&b[..KEY_LEN]);
        let key = NodePublic(k);
        if t == FrameType::PeerPresent {
            debug!("mesh({host}): peer {} present", key.short());
            state.registry.add_forwarder(key, link);
            present.insert(key);
        } else {
            // PeerGone; its reason byte, when it has one, follows the key (else 0).
            if b[KEY_LEN] == frame::PeerGoneReason::NotHere as u8 {
                debug!("mesh({host}): peer {} not connected there", key.short());
            } else {
                debug!("mesh({host}): peer {} gone", key.short());
            }
            state.registry.remove_forwarder(&key, link);
            present.remove(&key);
        }
    }
}

/// Writes queued packets as ForwardPacket frames, a batch per write and flush.
async fn write_loop<W: AsyncWrite + Unpin>(link: &Link, mut wr: W) -> Result<(), LinkError> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut prefixes = Vec::with_capacity(MAX_BATCH);
    loop {
        link.take_batch(&mut batch);
        if batch.is_empty() {
            listener!(link.wake => woken);
            link.take_batch(&mut batch);
            if batch.is_empty() {
                if !link.is_up() {
                    return Ok(());
                }
                woken.await;
                continue;
            }
        }
        prefixes.clear();
        for (dst, p) in &batch {
            let data_len = p.payload().len();
            let mut pre = [0u8; FWD_PREFIX];
            let mut h = [0u8; HEADER_LEN];
            frame::encode_header(
                &mut h,
                FrameType::ForwardPacket,
                (2 * KEY_LEN + data_len) as u32,
            );
            let (src_at, dst_at) = (HEADER_LEN, HEADER_LEN + KEY_LEN);
            pre[..src_at].copy_from_slice(&h);
            pre[src_at..dst_at].copy_from_slice(&p.src().0);
            pre[dst_at..].copy_from_slice(&dst.0);
            prefixes.push(pre);
        }
        let mut slices: Vec<&[u8]> = Vec::with_capacity(2 * batch.len());
        for (pre, (_, p)) in prefixes.iter().zip(&batch) {
            slices.push(pre);
            slices.push(p.payload());
        }
        let write = crate::net::write_all_vectored(&mut wr, &slices);
        async { write.await.map_err(LinkError::Io) }
            .or(async {
                Timer::after(LINK_WRITE_TIMEOUT).await;
                Err(LinkError::Timeout("write"))
            })
            .await?;
        drop(slices);
        batch.clear();
    }
}

/// The TLS client configuration for a peer: its pin, or the CA bundle.
pub fn client_config(peer: &MeshPeer) -> Result<Arc<rustls::ClientConfig>, String> {
    crate::trust::client_config(crate::trust::Trust::pin_or_ca(peer.pin)).map_err(|e| {
        match peer.pin {
            Some(_) => e,
            None => format!("{e}; or pin the peer with /sha256-raw:<hex> in --mesh-with"),
        }
    })
}
