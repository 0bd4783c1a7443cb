//! The regional mesh, outbound side: one [`Link`] per `--mesh-with` peer. Each link dials the
//! peer's `https://<host>/derp` with this server's own key and the mesh key, sends WatchConns,
//! and turns the peer's PeerPresent/PeerGone into forwarders in the [`Registry`]; packets for
//! those keys are queued on the link and written as ForwardPacket frames. A broken link clears
//! its forwarders and redials after [`RETRY_INTERVAL`]; a link that reaches this server itself
//! stops. (The inbound side, serving mesh peers, is in [`crate::client`].)
//!
//! Certificates: a peer entry may pin the peer's leaf certificate with `sha256-raw:<hex>` (what
//! a self-signed IP certificate needs, and what derper prints for one); otherwise the peer must
//! chain to a CA in `SSL_CERT_FILE` or the system bundle, as Go's derper does.
//!
//! [`Registry`]: crate::registry::Registry

use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::{listener, Event};
use log::{debug, info, warn};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Cursor};
use smol::{Async, Timer};

use crate::frame::{self, FrameType, HEADER_LEN, MAGIC};
use crate::handshake::SessionBox;
use crate::key::{hex, parse_hex32, NodePublic, KEY_LEN};
use crate::metrics::{DropReason, Metrics};
use crate::pool::PacketBuf;
use crate::server::{Shared, State, Stream};
use crate::sync::lock;

/// Wait between a broken or failed connection and the next dial (derper: 5 s).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on dial + TLS + upgrade + login (derphttp: 10 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to a peer that takes longer closes the link (derp client: 5 s).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// No frame for this long means the peer is gone: it sends a KeepAlive every 60 s (Go's
/// client uses the same 120 s read deadline).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Packets waiting for a link; more are dropped (`mesh_forward`), never waited for, so a slow
/// peer cannot stall the readers of local clients.
pub const QUEUE_DEPTH: usize = 256;
/// Largest frame accepted from a peer (Go's client: 1 MiB).
const MAX_FRAME: u32 = 1 << 20;
/// Most packets per write.
const MAX_BATCH: usize = 32;
/// ForwardPacket header: frame header, source key, destination key.
const FWD_PREFIX: usize = HEADER_LEN + 2 * KEY_LEN;

/// One `--mesh-with` entry: `host[/dialhost][/sha256-raw:<64 hex>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    /// As given: the URL host (`https://<host>/derp`), with its port if any.
    pub host: String,
    /// TLS server name / IP: `host` without port or brackets.
    pub name: String,
    /// Where to connect: `dialhost` (default `name`).
    pub dial_host: String,
    /// Port from `host`, default 443.
    pub port: u16,
    /// Pinned SHA-256 of the peer's leaf certificate.
    pub pin: Option<[u8; 32]>,
}

impl MeshPeer {
    /// Parses the comma-separated `--mesh-with` value.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(Self::parse)
            .collect()
    }

    /// Parses one entry.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid --mesh-with entry {entry:?}: {why}");
        let mut pin = None;
        let mut parts = Vec::new();
        for p in entry.split('/') {
            if let Some(h) = p.strip_prefix("sha256-raw:") {
                if pin.is_some() {
                    return Err(bad("more than one sha256-raw pin"));
                }
                pin = Some(parse_hex32(h).ok_or_else(|| bad("the pin must be 64 hex digits"))?);
            } else {
                parts.push(p);
            }
        }
        let (host, dial) = match parts.as_slice() {
            [h] => (*h, None),
            [h, d] => (*h, Some(*d)),
            _ => return Err(bad("want host[/dialhost][/sha256-raw:<hex>]")),
        };
        let (name, port) = split_host_port(host).ok_or_else(|| bad("bad host or port"))?;
        let dial_host = match dial {
            None => name.clone(),
            Some(d) => {
                let d = d.trim_start_matches('[').trim_end_matches(']');
                if d.is_empty() || (d.contains(':') && d.parse::<IpAddr>().is_err()) {
                    return Err(bad("the dial host takes no port (the host's port is used)"));
                }
                d.to_string()
            }
        };
        Ok(Self {
            host: host.to_string(),
            name,
            dial_host,
            port,
            pin,
        })
    }
}

/// `name`, `name:port`, `1.2.3.4:port`, `[v6]`, `[v6]:port` → (name, port or 443).
fn split_host_port(h: &str) -> Option<(String, u16)> {
    let (name, port) = if let Some(rest) = h.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        ip.parse::<std::net::Ipv6Addr>().ok()?;
        match tail {
            "" => (ip, None),
            t => (ip, Some(t.strip_prefix(':')?)),
        }
    } else {
        match h.split_once(':') {
            None => (h, None),
            Some((n, p)) if !p.contains(':') => (n, Some(p)),
            // A bare IPv6 address is not a URL host (Go wants brackets).
            Some(_) => return None,
        }
    };
    if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
        return None;
    }
    let port = match port {
        None => 443,
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
    };
    Some((name.to_string(), port))
}

/// A mesh peer as a packet forwarder. Its identity (the `Arc`'s address) is what the registry
/// stores per key; it outlives reconnections.
#[derive(Debug)]
pub struct Link {
    /// Which peer.
    pub peer: MeshPeer,
    queue: Mutex<Queue>,
    wake: Event,
}

#[derive(Debug, Default)]
struct Queue {
    /// Connected and logged in: packets are accepted.
    up: bool,
    /// (destination, packet framed as RecvPacket from its source).
    pkts: VecDeque<(NodePublic, PacketBuf)>,
}

impl Link {
    /// A link, not connected.
    pub fn new(peer: MeshPeer) -> Arc<Self> {
        Arc::new(Self {
            peer,
            queue: Mutex::new(Queue::default()),
            wake: Event::new(),
        })
    }

    /// Queues a packet (a RecvPacket frame from its source) for `dst` on the peer. Never waits:
    /// when the link is down or its queue full the packet is dropped as `mesh_forward`.
    pub fn forward(&self, dst: NodePublic, pkt: PacketBuf, disco: bool, m: &Metrics) {
        let rejected = {
            let mut q = lock(&self.queue);
            if q.up && q.pkts.len() < QUEUE_DEPTH {
                q.pkts.push_back((dst, pkt));
                None
            } else {
                Some(pkt)
            }
        };
        match rejected {
            None => {
                m.packets_forwarded_out.fetch_add(1, Relaxed);
                self.wake.notify(1);
            }
            Some(p) => m.drop_packet(
                DropReason::MeshForward,
                disco,
                p.len() - HEADER_LEN - KEY_LEN,
            ),
        }
    }

    fn set_up(&self, up: bool, m: &Metrics) {
        let dropped: Vec<_> = {
            let mut q = lock(&self.queue);
            q.up = up;
            if up {
                Vec::new()
            } else {
                q.pkts.drain(..).collect()
            }
        };
        for (_, p) in dropped {
            let data = &p.as_slice()[HEADER_LEN + KEY_LEN..];
            m.drop_packet(
                DropReason::MeshForward,
                frame::looks_like_disco(data),
                data.len(),
            );
        }
        self.wake.notify(usize::MAX);
    }

    fn take_batch(&self, out: &mut Vec<(NodePublic, PacketBuf)>) {
        let mut q = lock(&self.queue);
        while out.len() < MAX_BATCH {
            let Some(x) = q.pkts.pop_front() else { break };
            out.push(x);
        }
    }
}

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
pub async fn run_link(state: Arc<State>, link: Arc<Link>, tls: Arc<rustls::ClientConfig>) {
    let host = &link.peer.host;
    let m = &state.metrics;
    info!(
        "mesh({host}): will dial {}:{}",
        link.peer.dial_host, link.peer.port
    );
    loop {
        let conn = connect(&state, &link.peer, &tls)
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

type Reader = smol::io::Chain<Cursor<Vec<u8>>, Shared>;

/// Dials, upgrades and logs in as a mesh client, then subscribes with WatchConns.
async fn connect(
    state: &State,
    peer: &MeshPeer,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(Reader, Shared, NodePublic), LinkError> {
    let (dial, port) = (peer.dial_host.clone(), peer.port);
    let addrs: Vec<SocketAddr> = smol::unblock(move || (dial.as_str(), port).to_socket_addrs())
        .await?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut tcp = None;
    for a in addrs {
        match Async::<TcpStream>::connect(a).await {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or(last)?;
    crate::server::set_tcp_options(state, tcp.get_ref());
    let name = match peer.name.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(peer.name.clone())
            .map_err(|_| LinkError::Protocol(format!("invalid TLS name {:?}", peer.name)))?,
    };
    let tls = futures_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("TLS: {e}")))?;
    let shared = Shared::new(Stream::TlsClient(Box::new(tls)));
    let mut wr = shared.clone();
    let req = format!(
        "GET /derp HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpd/{}\r\nConnection: Upgrade\r\n\
         Upgrade: DERP\r\n\r\n",
        peer.host,
        env!("CARGO_PKG_VERSION")
    );
    wr.write_all(req.as_bytes()).await?;
    wr.flush().await?;
    let mut rd0 = shared.clone();
    let leftover = read_response_head(&mut rd0).await?;
    let mut rd = Cursor::new(leftover).chain(rd0);

    let (t, payload) = read_frame(&mut rd, 1024).await?;
    if t != FrameType::ServerKey as u8 || payload.len() < MAGIC.len() + KEY_LEN {
        return Err(LinkError::Protocol(format!(
            "want ServerKey, got frame {t:#04x} of {} bytes",
            payload.len()
        )));
    }
    if payload[..MAGIC.len()] != MAGIC {
        return Err(LinkError::Protocol("bad ServerKey magic".into()));
    }
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&payload[MAGIC.len()..MAGIC.len() + KEY_LEN]);
    let server_key = NodePublic(k);
    if server_key == state.public_key {
        return Err(LinkError::SelfConnect);
    }
    let Some(mesh_key) = state.mesh_key else {
        return Err(LinkError::Protocol("no mesh key".into()));
    };
    let bx = SessionBox::new(&state.private_key, &server_key);
    let json = format!(
        r#"{{"meshKey":"{}","version":{},"CanAckPings":false}}"#,
        hex(&mesh_key),
        frame::PROTOCOL_VERSION
    );
    wr.write_all(&bx.client_info_frame(&state.public_key, json.as_bytes()))
        .await?;
    wr.flush().await?;
    let (t, payload) = read_frame(&mut rd, MAX_FRAME).await?;
    if t != FrameType::ServerInfo as u8 {
        return Err(LinkError::Protocol(format!(
            "want ServerInfo, got frame {t:#04x}"
        )));
    }
    if bx.open_server_info(&payload).is_none() {
        return Err(LinkError::Protocol("ServerInfo did not open".into()));
    }
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(&mut h, FrameType::WatchConns, 0);
    wr.write_all(&h).await?;
    wr.flush().await?;
    Ok((rd, wr, server_key))
}

/// Reads the HTTP response head; wants `101`. Returns the bytes after it.
async fn read_response_head<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Vec<u8>, LinkError> {
    const MAX: usize = 8 << 10;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Err(LinkError::Protocol(
                "connection closed before the HTTP response".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = buf.split(|&b| b == b' ').nth(1).unwrap_or_default();
            if status != b"101" {
                let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
                return Err(LinkError::Protocol(format!(
                    "upgrade refused: {:?}",
                    String::from_utf8_lossy(line)
                )));
            }
            return Ok(buf.split_off(end + 4));
        }
        if buf.len() > MAX {
            return Err(LinkError::Protocol("HTTP response head too long".into()));
        }
    }
}

/// Reads one whole frame of at most `max` bytes.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: u32,
) -> Result<(u8, Vec<u8>), LinkError> {
    let mut h = [0u8; HEADER_LEN];
    rd.read_exact(&mut h).await?;
    let (t, len) = frame::decode_header(&h);
    if len > max {
        return Err(LinkError::Protocol(format!(
            "frame {t:#04x} of {len} bytes is too large"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    rd.read_exact(&mut payload).await?;
    Ok((t, payload))
}

/// Reads the peer's PeerPresent/PeerGone stream into forwarders. `present` collects the keys
/// added, for the caller to remove when the connection ends.
async fn watch<R: AsyncRead + Unpin>(
    state: &State,
    link: &Arc<Link>,
    mut rd: R,
    present: &mut HashSet<NodePublic>,
) -> Result<(), LinkError> {
    let host = &link.peer.host;
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
        if len > MAX_FRAME {
            return Err(LinkError::Protocol(format!(
                "frame {t:#04x} of {len} bytes is too large"
            )));
        }
        let is_present = t == FrameType::PeerPresent as u8;
        let is_gone = t == FrameType::PeerGone as u8;
        if (is_present || is_gone) && len as usize >= KEY_LEN {
            let mut k = [0u8; KEY_LEN];
            rd.read_exact(&mut k).await?;
            let mut rest = [0u8; 1];
            let mut extra = len as usize - KEY_LEN;
            if is_gone && extra > 0 {
                rd.read_exact(&mut rest).await?;
                extra -= 1;
            }
            crate::client::discard(&mut rd, extra as u64, None).await?;
            let key = NodePublic(k);
            if is_present {
                debug!("mesh({host}): peer {} present", key.short());
                state.registry.add_forwarder(key, link);
                present.insert(key);
            } else {
                if rest[0] == frame::PeerGoneReason::NotHere as u8 {
                    debug!("mesh({host}): peer {} not connected there", key.short());
                } else {
                    debug!("mesh({host}): peer {} gone", key.short());
                }
                state.registry.remove_forwarder(&key, link);
                present.remove(&key);
            }
        } else {
            // KeepAlive, packets to this server's key, pings: nothing to do.
            crate::client::discard(&mut rd, u64::from(len), None).await?;
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
                if !lock(&link.queue).up {
                    return Ok(());
                }
                woken.await;
                continue;
            }
        }
        prefixes.clear();
        for (dst, p) in &batch {
            let raw = p.as_slice();
            let data_len = raw.len() - HEADER_LEN - KEY_LEN;
            let mut pre = [0u8; FWD_PREFIX];
            let mut h = [0u8; HEADER_LEN];
            frame::encode_header(
                &mut h,
                FrameType::ForwardPacket,
                (2 * KEY_LEN + data_len) as u32,
            );
            pre[..HEADER_LEN].copy_from_slice(&h);
            pre[HEADER_LEN..HEADER_LEN + KEY_LEN]
                .copy_from_slice(&raw[HEADER_LEN..HEADER_LEN + KEY_LEN]);
            pre[HEADER_LEN + KEY_LEN..].copy_from_slice(&dst.0);
            prefixes.push(pre);
        }
        let mut slices = Vec::with_capacity(2 * batch.len());
        for (pre, (_, p)) in prefixes.iter().zip(&batch) {
            slices.push(IoSlice::new(pre));
            slices.push(IoSlice::new(&p.as_slice()[HEADER_LEN + KEY_LEN..]));
        }
        let write = crate::client::write_all_vectored(&mut wr, &mut slices);
        async { write.await.map_err(LinkError::Io) }
            .or(async {
                Timer::after(WRITE_TIMEOUT).await;
                Err(LinkError::Timeout("write"))
            })
            .await?;
        drop(slices);
        batch.clear();
    }
}

/// The TLS client configuration for a peer: its pin, or the CA bundle.
pub fn client_config(peer: &MeshPeer) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match peer.pin {
        Some(pin) => Arc::new(PinVerifier {
            pin,
            algs: provider.signature_verification_algorithms,
        }),
        None => ca_verifier(&provider)
            .map_err(|e| format!("{e}; or pin the peer with /sha256-raw:<hex> in --mesh-with"))?,
    };
    tls_client(provider, verifier)
}

/// A TLS client configuration that trusts the CA bundle (`SSL_CERT_FILE`, else the first of
/// Go's Linux paths), as Go's `http.DefaultClient` does: derper's admission-controller URL.
pub(crate) fn ca_client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = ca_verifier(&provider)?;
    tls_client(provider, verifier)
}

fn ca_verifier(
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let (path, roots) = ca_roots()?;
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    Ok(v)
}

fn tls_client(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Where Go (and so derper) looks for CA certificates on Linux, after `SSL_CERT_FILE`.
const CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn ca_roots() -> Result<(PathBuf, rustls::RootCertStore), String> {
    let path = match std::env::var_os("SSL_CERT_FILE") {
        Some(p) => PathBuf::from(p),
        None => CA_FILES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                "no CA bundle found (set SSL_CERT_FILE or install ca-bundle)".to_string()
            })?,
    };
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| format!("CA bundle {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "CA bundle {}: no usable certificate",
            path.display()
        ));
    }
    Ok((path, roots))
}

/// Accepts exactly the pinned leaf certificate (name and dates are not checked, as Tailscale's
/// `sha256-raw:` CertName); handshake signatures are still verified.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "certificate does not match the sha256-raw pin".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_entries() {
        let p = MeshPeer::parse("derp2.lan").unwrap();
        assert_eq!(
            (p.name.as_str(), p.dial_host.as_str(), p.port, p.pin),
            ("derp2.lan", "derp2.lan", 443, None)
        );
        let p = MeshPeer::parse("derp2.lan:8443/192.168.1.2").unwrap();
        assert_eq!(
            (
                p.host.as_str(),
                p.name.as_str(),
                p.dial_host.as_str(),
                p.port
            ),
            ("derp2.lan:8443", "derp2.lan", "192.168.1.2", 8443)
        );
        let hex64 = "ab".repeat(32);
        let p = MeshPeer::parse(&format!("192.168.1.2:443/sha256-raw:{hex64}")).unwrap();
        assert_eq!(p.pin, Some([0xab; 32]));
        assert_eq!(p.dial_host, "192.168.1.2");
        let p = MeshPeer::parse(&format!("[fd00::2]:8443/[fd00::3]/sha256-raw:{hex64}")).unwrap();
        assert_eq!(
            (p.name.as_str(), p.dial_host.as_str(), p.port),
            ("fd00::2", "fd00::3", 8443)
        );
        for bad in [
            "",
            "a/b/c",
            "fd00::2",
            "h:0",
            "h:99999",
            "h/sha256-raw:12",
            "h/d:1",
            "[nope]:1",
        ] {
            assert!(MeshPeer::parse(bad).is_err(), "{bad:?}");
        }
        let list = MeshPeer::parse_list("a, b:444 ,").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].port, 444);
    }

    #[test]
    fn link_queue_is_bounded_and_down_drops() {
        let m = Metrics::default();
        let pool = crate::pool::Pool::with_counts(QUEUE_DEPTH + 8, 1);
        let link = Link::new(MeshPeer::parse("peer").unwrap());
        let pkt = || {
            let mut p = pool.try_get(HEADER_LEN + KEY_LEN + 10).unwrap();
            p.set_len(HEADER_LEN + KEY_LEN + 10);
            p
        };
        link.forward(NodePublic([1; 32]), pkt(), false, &m);
        assert_eq!(m.dropped(DropReason::MeshForward), 1, "down: dropped");
        link.set_up(true, &m);
        for _ in 0..QUEUE_DEPTH + 2 {
            link.forward(NodePublic([1; 32]), pkt(), false, &m);
        }
        assert_eq!(m.dropped(DropReason::MeshForward), 3, "full: dropped");
        assert_eq!(m.packets_forwarded_out.load(Relaxed), QUEUE_DEPTH as u64);
        link.set_up(false, &m);
        assert_eq!(m.dropped(DropReason::MeshForward), 3 + QUEUE_DEPTH as u64);
        assert_eq!(pool.stats().small.2, 0, "buffers returned");
    }
}
