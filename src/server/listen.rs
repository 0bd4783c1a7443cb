//! The listeners: binding each socket (a busy port's error names who holds it and the option
//! to change), the accept loop that lets a new connection in or refuses it (the accept limit,
//! the `--max-handshakes` slots, eviction of the least advanced), and the STUN socket's loop.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use smol::future::FutureExt;
use smol::{Async, Executor, Timer};

use super::front::{handle_conn, FrontError};
use super::{StartError, State};
use crate::holder;
use crate::limits::{Refused, TokenBucket};
use crate::lograte::{limited, HEADS};
use crate::stun;

pub(super) fn bind_tcp(
    addr: SocketAddr,
    which: Listener,
) -> Result<Async<TcpListener>, StartError> {
    let failed = |a: SocketAddr, e: io::Error| {
        let (flag, uci) = match which {
            Listener::Main => ("--addr", "addr"),
            Listener::Port80 => ("--http-port", "http_port"),
        };
        let hint = bind_hint(holder::Proto::Tcp, a.port(), &e, flag, uci);
        StartError::Bind(a, e, hint)
    };
    match listen_tcp(addr) {
        Ok(l) => Ok(l),
        // `[::]` fails on hosts with IPv6 disabled: fall back to IPv4 only.
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            listen_tcp(v4).map_err(|e4| match e.kind() {
                // IPv6 is there, and the port is taken: say so, not the fallback's error.
                io::ErrorKind::AddrInUse => failed(addr, e),
                _ => failed(v4, e4),
            })
        }
        Err(e) => Err(failed(addr, e)),
    }
}

/// Set by OpenWrt's init script to the UCI section its options come from (`derpd.main`): a
/// failed bind then names the UCI option to change as well as the flag.
pub const UCI_SECTION_ENV: &str = "DERPD_UCI_SECTION";

/// What follows "cannot listen on ADDR: ERROR" in the log: who holds the port (when it is in
/// use and /proc tells), then the flag (and, under OpenWrt's init script, the UCI option) that
/// moves the listener.
pub(super) fn bind_hint(
    proto: holder::Proto,
    port: u16,
    e: &io::Error,
    flag: &str,
    uci: &str,
) -> String {
    let mut hint = String::new();
    if e.kind() == io::ErrorKind::AddrInUse {
        let who = holder::describe(proto, port)
            .unwrap_or_else(|| "another program (not found in /proc/net)".into());
        hint = format!("; port {port} is held by {who}");
    }
    match std::env::var(UCI_SECTION_ENV) {
        Ok(section) if !section.is_empty() => {
            hint +=
                &format!("; choose another port with UCI option {section}.{uci} (derpd {flag})");
        }
        _ => hint += &format!("; choose another port with {flag}"),
    }
    hint
}

/// std's `TcpListener::bind`, but with the kernel's largest backlog (`somaxconn`, 4096 on
/// current Linux) as Go's listeners have: std's 128 overflows in a burst of connections, and
/// every SYN dropped then costs its client a retry 1 s later.
pub(super) fn listen_tcp(addr: SocketAddr) -> io::Result<Async<TcpListener>> {
    use rustix::net::{self as rn, AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rn::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    rn::sockopt::set_socket_reuseaddr(&fd, true)?;
    rn::bind(&fd, &addr)?;
    // The kernel caps the backlog at somaxconn.
    rn::listen(&fd, i32::MAX)?;
    Async::new(TcpListener::from(fd))
}

pub(super) fn bind_udp(addr: SocketAddr) -> io::Result<Async<UdpSocket>> {
    match Async::<UdpSocket>::bind(addr) {
        Ok(s) => Ok(s),
        Err(_) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => Async::<UdpSocket>::bind(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()),
        ),
        Err(e) => Err(e),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listener {
    /// `-a`: DERP and the web endpoints, TLS or plain.
    Main,
    /// `--http-port` in TLS mode.
    Port80,
}

pub(super) async fn accept_loop(
    ex: Arc<Executor<'static>>,
    state: Arc<State>,
    listener: Async<TcpListener>,
    which: Listener,
) {
    let mut backoff = Duration::from_millis(5);
    let m = &state.relay.metrics;
    let mut limiter = match which {
        Listener::Main => state
            .relay
            .limits
            .accept
            .map(|(r, b)| TokenBucket::new(r, b as f64)),
        Listener::Port80 => None,
    };
    let mut refusals = Refusals::new("refusing connections", "refused");
    let mut evictions = Refusals::new(
        "evicting connections not logged in yet for new ones",
        "evicted",
    );
    loop {
        let accepted = async { Some(listener.accept().await) }
            .or(async {
                state.stopping.wait().await;
                None
            })
            .await;
        let Some(accepted) = accepted else {
            debug!("{which:?} listener closed");
            return;
        };
        match accepted {
            Ok((tcp, remote)) => {
                // Stopping: the `or` above looks at the listener first, so a connection that
                // arrived after the flag was set can still be accepted; it is not served, and
                // the listener closes now.
                if state.stopping.is_set() {
                    debug!("{which:?} listener closed");
                    return;
                }
                backoff = Duration::from_millis(5);
                m.tcp_accepts.fetch_add(1, Relaxed);
                // Over a limit: close at once and keep accepting (derper's listener may exit).
                if limiter.as_mut().is_some_and(|l| !l.allow()) {
                    m.accept_rejected.fetch_add(1, Relaxed);
                    refusals.note(remote, "--accept-connection-limit");
                    continue;
                }
                if which == Listener::Main {
                    m.main_accepted.fetch_add(1, Relaxed);
                }
                // A source at its own limit is refused; when every slot is taken, the
                // connection that has come least far makes room for this one.
                let taken = match state.handshakes.take(remote.ip()) {
                    Ok(t) => t,
                    Err(Refused::SourceFull) => {
                        m.handshakes_ip_full.fetch_add(1, Relaxed);
                        refusals.note(remote, "--max-handshakes-per-ip");
                        continue;
                    }
                };
                if let Some(p) = taken.evicted {
                    m.handshakes_evicted[p as usize].fetch_add(1, Relaxed);
                    evictions.count("--max-handshakes");
                }
                let slot = taken.slot;
                let st = state.clone();
                ex.spawn(async move {
                    // Evicted: the task ends here, which closes the connection.
                    let evicted = slot.evicted();
                    let conn = handle_conn(&st, tcp, remote, which, slot).or(async {
                        evicted.await;
                        Err(FrontError::Evicted)
                    });
                    let e = match conn.await {
                        Ok(()) => return,
                        Err(e @ FrontError::AcmeValidated) => return debug!("{remote}: {e}"),
                        Err(e) => e,
                    };
                    st.relay.metrics.failed_logins.fetch_add(1, Relaxed);
                    match e {
                        // DERP errors were logged with the client's key by the client code.
                        FrontError::Derp(_) => {}
                        FrontError::Head(_) => limited!(info, HEADS, "{remote}: refused: {e}"),
                        // Scanners and dropped TLS handshakes: common, so only at debug.
                        _ => debug!("{remote}: closed: {e}"),
                    }
                })
                .detach();
                // Let the new task run before the next accept: a client whose first bytes are
                // already here is marked as talking before a burst of later connections could
                // evict it (a ready listener would otherwise keep this loop busy).
                smol::future::yield_now().await;
            }
            Err(e) => {
                m.accept_errors.fetch_add(1, Relaxed);
                // Out of file descriptors and similar: wait and keep accepting, never exit.
                warn!("accept: {e}; retrying in {backoff:?}");
                Timer::after(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Logs refused (or evicted) connections at most every 10 s, so a flood does not flood the log.
struct Refusals {
    /// "refusing connections".
    doing: &'static str,
    /// "refused".
    done: &'static str,
    since_log: u64,
    last_log: Option<std::time::Instant>,
}

impl Refusals {
    fn new(doing: &'static str, done: &'static str) -> Self {
        Self {
            doing,
            done,
            since_log: 0,
            last_log: None,
        }
    }

    /// `remote` was refused because of `limit`.
    fn note(&mut self, remote: SocketAddr, limit: &str) {
        debug!("{remote}: {} by {limit}", self.done);
        self.count(limit);
    }

    /// One more connection refused or evicted because of `limit`.
    fn count(&mut self, limit: &str) {
        self.since_log += 1;
        let done = self.done;
        let now = std::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            warn!(
                "{}: {limit} reached ({} {done} since the last report)",
                self.doing, self.since_log
            );
            self.since_log = 0;
            self.last_log = Some(now);
        }
    }
}

pub(super) async fn stun_loop(state: Arc<State>, sock: Async<UdpSocket>) {
    let m = &state.relay.metrics;
    let mut buf = [0u8; 2048];
    let mut out = [0u8; stun::MAX_RESPONSE_LEN];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!("STUN read: {e}");
                m.stun_read_error.fetch_add(1, Relaxed);
                Timer::after(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(tx) = stun::parse_binding_request(&buf[..n]) else {
            m.stun_not_stun.fetch_add(1, Relaxed);
            continue;
        };
        let v6 = from.ip().to_canonical().is_ipv6();
        m.stun_addrfamily[usize::from(v6)].fetch_add(1, Relaxed);
        let len = stun::write_response(&mut out, &tx, from);
        match sock.send_to(&out[..len], from).await {
            Ok(_) => {
                m.stun_success.fetch_add(1, Relaxed);
            }
            Err(e) => {
                m.stun_write_error.fetch_add(1, Relaxed);
                debug!("STUN write to {from}: {e}");
            }
        }
    }
}
