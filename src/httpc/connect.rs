//! Resolve and connect (TCP, then TLS for https with the caller's trust), each step bounded by
//! a deadline.

use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite};
use smol::{Async, Timer};

use super::Url;

/// A connection's byte stream: TCP, TLS over TCP, a unix socket, or an in-memory stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Resolves `host` (off the executor, unless it is an IP address) and connects to its
/// addresses in order; the error is the last address's (or the resolver's).
pub async fn connect_tcp(host: &str, port: u16) -> Result<Async<TcpStream>, String> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            let h = host.to_string();
            smol::unblock(move || (h.as_str(), port).to_socket_addrs().map(Vec::from_iter))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
        }
    };
    let mut last = format!("resolving {host}: no address");
    for a in addrs {
        match Async::<TcpStream>::connect(a).await {
            Ok(t) => return Ok(t),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

/// Runs `f` until `deadline`; past it, the error says how long the whole exchange had
/// (`budget`).
pub async fn within<T>(
    deadline: Instant,
    budget: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    f.or(async {
        Timer::at(deadline).await;
        Err(format!("timed out after {budget:?}"))
    })
    .await
}

impl Url {
    /// Resolves and connects to the URL's host, then for https runs the TLS handshake with
    /// `tls` (the caller's trust: an https URL without it is an error). Bound it with
    /// [`within`].
    pub async fn connect(
        &self,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Box<dyn Io>, String> {
        let tls = match (self.https, tls) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => return Err("https without a TLS configuration".into()),
        };
        let tcp = connect_tcp(&self.host, self.port).await?;
        let Some(tls) = tls else {
            return Ok(Box::new(tcp));
        };
        let name = match self.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(self.host.clone())
                .map_err(|_| format!("invalid TLS host name {:?}", self.host))?,
        };
        let s = futures_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(Box::new(s))
    }
}
