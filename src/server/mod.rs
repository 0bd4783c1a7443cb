//! Listeners and the life of a connection up to the DERP hand-off: TCP accept → optional TLS →
//! one bounded HTTP request head → a response, or the DERP upgrade. Also the STUN UDP loop and
//! the executor threads that run it all.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt, Cursor};
use smol::{Async, Executor, Timer};

mod debug;

use crate::client::{self, Upgrade};
use crate::config::{Config, KeySource};
use crate::derpmap;
use crate::frame::SmallFrame;
use crate::holder;
use crate::http::{self, Home, Request};
use crate::key::NodePrivate;
use crate::limits::{AcceptLimiter, Progress, RateConfig, Refused, Slot, Slots};
use crate::lograte::{limited, HEADS};
use crate::net::{LockedStream, Stream, TcpOptions};
use crate::relay::{log_rate_config, Relay};
use crate::stun;
use crate::tls;

/// The front door's state, one per running server: the listeners' settings, TLS, the
/// connections still logging in, the stop flag, the certificate reloader and the debug pages;
/// and the [`Relay`] that DERP sessions share.
pub struct State {
    /// What every DERP session shares.
    pub relay: Arc<Relay>,
    /// `--derp`: serve `/derp` at all.
    derp_enabled: bool,
    /// `--home`.
    home: Home,
    /// TCP options for accepted connections.
    tcp: TcpOptions,
    /// TLS for the main listener, if it uses TLS.
    tls: Option<futures_rustls::TlsAcceptor>,
    /// Connections not logged in yet (`--max-handshakes`, `--max-handshakes-per-ip`).
    pub handshakes: Arc<Slots>,
    /// The `--rate-config` file, re-read on SIGHUP.
    pub(crate) rate_config: Option<std::path::PathBuf>,
    /// Set on SIGTERM/SIGINT: the listeners stop accepting.
    stopping: Stop,
    /// Swaps in renewed `--certmode manual` files.
    certs: Option<tls::CertReloader>,
    /// `/debug/` access rule and start-time facts.
    pub(crate) debug: debug::DebugState,
}

impl State {
    /// The state of a server for `cfg`, without its listeners and threads: the relay
    /// ([`Relay::new`]) and the `/debug/` access rule are made here.
    fn new(
        cfg: &Config,
        private_key: NodePrivate,
        tls: Option<futures_rustls::TlsAcceptor>,
        certs: Option<tls::CertReloader>,
        derp_map: Option<derpmap::Node>,
    ) -> Result<Self, StartError> {
        let relay = Relay::new(cfg, private_key).map_err(StartError::Config)?;
        let debug = debug::DebugState::new(cfg, derp_map).map_err(StartError::Config)?;
        Ok(Self {
            relay: Arc::new(relay),
            derp_enabled: cfg.derp,
            home: cfg.home.clone(),
            tcp: TcpOptions {
                keepalive: cfg.timeouts.tcp_keepalive,
                user_timeout: cfg.timeouts.tcp_user,
            },
            tls,
            handshakes: Slots::new(cfg.limits.max_handshakes, cfg.limits.max_handshakes_per_ip),
            rate_config: cfg.rate_config.clone(),
            stopping: Stop::default(),
            certs,
            debug,
        })
    }

    /// The main listener uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("public_key", &self.relay.public_key)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// Binding a listener failed: the address, the error, and the hint for the admin (who holds
    /// the port, which option to change).
    Bind(SocketAddr, io::Error, String),
    /// The key file could not be used.
    Key(crate::key::KeyFileError),
    /// Certificates could not be loaded or created.
    Tls(tls::TlsError),
    /// Starting threads failed.
    Io(io::Error),
    /// A mesh peer's TLS settings are unusable.
    Mesh(String),
    /// A file named by a flag is unusable.
    Config(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bind(a, e, hint) => write!(f, "cannot listen on {a}: {e}{hint}"),
            Self::Key(e) => write!(f, "{e}"),
            Self::Tls(e) => write!(f, "{e}"),
            Self::Io(e) => write!(f, "{e}"),
            Self::Mesh(e) | Self::Config(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for StartError {}

/// A running server. Dropping it stops the listeners and closes every connection.
#[derive(Debug)]
pub struct Server {
    state: Arc<State>,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    stun_addrs: Vec<SocketAddr>,
    stop: Arc<Stop>,
    threads: Vec<std::thread::JoinHandle<()>>,
    ex: Arc<Executor<'static>>,
}

/// A one-way flag that tasks can wait on.
#[derive(Debug, Default)]
struct Stop {
    flag: AtomicBool,
    event: event_listener::Event,
}

impl Stop {
    fn set(&self) {
        self.flag.store(true, Release);
        self.event.notify(usize::MAX);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Acquire)
    }

    async fn wait(&self) {
        loop {
            if self.flag.load(Relaxed) {
                return;
            }
            event_listener::listener!(self.event => l);
            if self.flag.load(Relaxed) {
                return;
            }
            l.await;
        }
    }
}

impl Server {
    /// Binds every listener, prints where it serves, and starts the worker threads.
    pub fn start(cfg: Config) -> Result<Self, StartError> {
        let private_key = match &cfg.key {
            KeySource::Ephemeral => NodePrivate::generate(),
            KeySource::Given(k) => k.clone(),
            KeySource::File(p) => {
                let (k, created) =
                    crate::key::load_or_create_key_file(p).map_err(StartError::Key)?;
                if created {
                    info!("created key file {}", p.display());
                }
                k
            }
        };
        let public_key = private_key.public();
        let tcp = bind_tcp(cfg.listen, Listener::Main)?;
        let addr = tcp.get_ref().local_addr().map_err(StartError::Io)?;

        let mut tls_acceptor = None;
        let mut cert_reloader = None;
        let mut node_pin = None;
        if let Some(mode) = &cfg.tls {
            let cert =
                tls::load_or_create(&mode.hostname, &mode.certdir).map_err(StartError::Tls)?;
            if let Some(why) = &cert.replaced {
                warn!(
                    "{why}. Generated a new self-signed certificate for {} in {}: THE CERTIFICATE \
                     PIN CHANGED to sha256-raw:{}. Clients reach this node only after CertName is \
                     updated in the DERPMap (the new node and region are logged below)",
                    mode.hostname,
                    mode.certdir.display(),
                    cert.leaf_sha256_hex()
                );
            } else if cert.generated {
                info!(
                    "generated a self-signed certificate for {} in {}",
                    mode.hostname,
                    mode.certdir.display()
                );
            }
            if cert.hostname_is_ip {
                node_pin = Some(cert.leaf_sha256_hex());
            }
            let (sc, reloader) = tls::reloadable_server_config(
                &cert,
                &mode.hostname,
                &mode.certdir,
                public_key.0,
                cfg.meta_cert,
            )
            .map_err(StartError::Tls)?;
            tls_acceptor = Some(futures_rustls::TlsAcceptor::from(sc));
            cert_reloader = Some(reloader);
        }

        let http80 = match (cfg.tls.is_some(), cfg.http_port) {
            (true, Some(port)) => Some(bind_tcp(
                SocketAddr::new(addr.ip(), port),
                Listener::Port80,
            )?),
            _ => None,
        };
        let http_addr = match &http80 {
            Some(l) => Some(l.get_ref().local_addr().map_err(StartError::Io)?),
            None => None,
        };
        let mut stun_socks = Vec::new();
        if let Some(port) = cfg.stun_port {
            // STUN errors are not fatal in derper; we log them and keep relaying.
            match bind_udp(SocketAddr::new(cfg.listen.ip(), port)) {
                Ok(s) => stun_socks.push(s),
                Err(e) => warn!(
                    "STUN disabled: cannot listen on udp port {port}: {e}{}",
                    bind_hint(holder::Proto::Udp, port, &e, "--stun-port", "stun_port")
                ),
            }
        }
        let stun_addrs: Vec<SocketAddr> = stun_socks
            .iter()
            .filter_map(|s| s.get_ref().local_addr().ok())
            .collect();

        // Mesh TLS settings are checked before anything runs: a bad CA bundle is a start-up error.
        let mut mesh_links = Vec::new();
        for peer in &cfg.mesh_with {
            let tls = crate::mesh::client_config(peer)
                .map_err(|e| StartError::Mesh(format!("mesh peer {}: {e}", peer.host)))?;
            mesh_links.push((peer.clone(), tls));
        }
        // The DERPMap entry for this node: logged below for a self-signed IP certificate,
        // served on `/debug/derpmap` in every TLS mode.
        let derp_map = cfg.tls.as_ref().map(|mode| {
            derpmap::Node::new(
                &mode.hostname,
                cfg.public_port.unwrap_or(addr.port()),
                stun_addrs.first().map(|a| a.port()),
                cfg.stun_port.is_some(),
                node_pin.as_deref(),
            )
        });
        let state = Arc::new(State::new(
            &cfg,
            private_key,
            tls_acceptor,
            cert_reloader,
            derp_map,
        )?);

        info!(
            "derpd {} server key {}",
            env!("CARGO_PKG_VERSION"),
            state.relay.public_key
        );
        let mode = if state.tls.is_some() {
            "TLS"
        } else {
            "plain HTTP"
        };
        info!("serving on {addr} ({mode})");
        if let Some(a) = http_addr {
            info!("port-80 listener on {a} (plain HTTP: /generate_204 and redirects to https)");
        }
        for a in &stun_addrs {
            info!("STUN listening on {a}");
        }
        info!(
            "packet buffer budget {} KiB ({:?})",
            state.relay.pool.budget_bytes() >> 10,
            state.relay.pool.stats()
        );
        if let Some(p) = cfg.public_port.filter(|&p| p != addr.port()) {
            info!("clients dial port {p} (--public-port), forwarded here by the firewall");
        }
        // Logged only with a pin (a self-signed IP certificate), as derper does.
        if let (Some(_), Some(mode), Some(node)) = (&node_pin, &cfg.tls, state.debug.derp_map()) {
            print_derp_map(&mode.hostname, node);
        }

        let ex = Arc::new(Executor::new());
        let stop = Arc::new(Stop::default());
        ex.spawn(accept_loop(ex.clone(), state.clone(), tcp, Listener::Main))
            .detach();
        if let Some(l) = http80 {
            ex.spawn(accept_loop(ex.clone(), state.clone(), l, Listener::Port80))
                .detach();
        }
        if state.certs.is_some() {
            ex.spawn(watch_certs(state.clone(), cfg.cert_poll)).detach();
        }
        for s in stun_socks {
            ex.spawn(stun_loop(state.clone(), s)).detach();
        }
        for (peer, tls) in mesh_links {
            let link = crate::link::Link::new(peer.host.clone());
            ex.spawn(crate::mesh::run_link(
                state.relay.clone(),
                state.tcp,
                link,
                peer,
                tls,
            ))
            .detach();
        }
        let mut threads = Vec::new();
        for i in 0..cfg.threads.max(1) {
            let (ex, stop) = (ex.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("derpd-{i}"))
                .spawn(move || smol::block_on(ex.run(stop.wait())))
                .map_err(StartError::Io)?;
            threads.push(t);
        }
        Ok(Self {
            state,
            addr,
            http_addr,
            stun_addrs,
            stop,
            threads,
            ex,
        })
    }

    /// The main listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port-80 listener's address, in TLS mode.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// STUN sockets' addresses.
    pub fn stun_addrs(&self) -> &[SocketAddr] {
        &self.stun_addrs
    }

    /// The front door's state (handshake slots, timeouts), for tests.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// What DERP sessions share (key, metrics, registry, pool, admission), for tests.
    pub fn relay(&self) -> &Arc<Relay> {
        &self.state.relay
    }

    /// Re-reads every file that can change under a running server, as SIGHUP does in
    /// [`Server::run_until_signalled`]: the allow-keys file, the rate config and the
    /// certificate. For tests and embedders that handle signals themselves.
    pub fn reload(&self) {
        reload(&self.state);
    }

    /// Blocks until the server stops (it does not stop on its own).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully ([`Server::shutdown`]).
    /// SIGHUP reloads the allow-keys file, the rate config and the certificate. `signals`
    /// comes from [`catch_signals`], called before [`Server::start`] so that a signal sent
    /// as soon as the server announces itself is not lost (or fatal). For the binary; tests
    /// call [`Server::shutdown`] instead.
    pub fn run_until_signalled(mut self, mut signals: Signals) -> ShutdownReport {
        use async_signal::Signal;
        use smol::stream::StreamExt;
        let state = self.state.clone();
        let task = self.ex.spawn(async move {
            while let Some(sig) = signals.next().await {
                match sig {
                    Ok(Signal::Hup) => {
                        // File I/O (a 16 MiB allow-keys file, certificates on slow flash)
                        // on a blocking-pool thread, not on an executor thread.
                        let state = state.clone();
                        smol::unblock(move || reload(&state)).await;
                    }
                    Ok(sig) => {
                        let name = if sig == Signal::Int {
                            "SIGINT"
                        } else {
                            "SIGTERM"
                        };
                        info!("received {name}: shutting down");
                        return;
                    }
                    Err(e) => warn!("signal handling: {e}"),
                }
            }
        });
        smol::block_on(task);
        let report = self.shutdown(SHUTDOWN_GRACE);
        self.stop_threads();
        report
    }

    /// Stops accepting, tells every client the server is restarting (frame 0x15, with a
    /// reconnect delay spread over [`RECONNECT_SPREAD`] so they do not all return at once),
    /// lets each writer flush what it has queued, and waits up to `grace` for the connections
    /// to end. Blocks the calling thread (not an executor thread): the wait is plain polling,
    /// so it ends on time whatever the executor is doing.
    pub fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let state = &self.state;
        state.stopping.set();
        let notified = state.relay.registry.restart_all(|| {
            let spread = RECONNECT_SPREAD.as_millis() as u32;
            SmallFrame::restarting(fastrand::u32(0..spread), RESTART_TRY_FOR.as_millis() as u32)
        });
        let deadline = std::time::Instant::now() + grace;
        let m = &state.relay.metrics;
        while m.current_connections.load(Relaxed) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = m.current_connections.load(Relaxed);
        info!("shutdown: {notified} clients told to reconnect, {left} still connected");
        ShutdownReport { notified, left }
    }

    fn stop_threads(&mut self) {
        self.stop.set();
        self.state.relay.registry.close_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub use async_signal::Signals;

/// Catches SIGTERM, SIGINT and SIGHUP from now on, for [`Server::run_until_signalled`].
pub fn catch_signals() -> io::Result<Signals> {
    use async_signal::Signal;
    Signals::new([Signal::Term, Signal::Int, Signal::Hup])
}

/// How long a graceful shutdown waits for clients to take their Restarting frame.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Clients are asked to reconnect after a delay drawn from `[0, RECONNECT_SPREAD)`.
pub const RECONNECT_SPREAD: Duration = Duration::from_secs(2);
/// The Restarting frame's try-for: "not more than a few seconds" (Tailscale's derp client).
pub const RESTART_TRY_FOR: Duration = Duration::from_secs(5);

/// What a graceful shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Clients sent a Restarting frame.
    pub notified: usize,
    /// Connections still open when the grace period ended.
    pub left: usize,
}

/// SIGHUP: re-read every file that can change under a running server.
fn reload(state: &State) {
    info!("received SIGHUP: reloading");
    state.relay.admission.reload();
    if let Some(certs) = &state.certs {
        if let Err(e) = certs.reload() {
            warn!("certificate reload failed, keeping the old certificate: {e}");
        }
    }
    if let Some(p) = &state.rate_config {
        match RateConfig::load(p) {
            Ok(rc) => {
                state.relay.rate.set(rc);
                log_rate_config(rc);
            }
            Err(e) => warn!("rate config reload failed, keeping the old one: {e}"),
        }
    }
}

/// Reloads the certificate when its files change (acme.sh and similar renew in place).
async fn watch_certs(state: Arc<State>, every: Duration) {
    if state.certs.is_none() {
        return;
    }
    loop {
        Timer::after(every).await;
        // Off the executor: a stat of each file, and a read when they changed.
        let st = state.clone();
        let changed = smol::unblock(move || st.certs.as_ref()?.reload_if_changed()).await;
        if let Some(Err(e)) = changed {
            warn!("certificate files changed but cannot be used, keeping the old certificate: {e}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.set();
        self.state.relay.registry.close_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Logs the DERPMap node for a self-signed IP certificate (the line derper logs), then a
/// headscale `derp.paths` file and a tailnet policy file snippet, all from one [`derpmap::Node`].
fn print_derp_map(hostname: &str, node: &derpmap::Node) {
    info!(
        "Using self-signed certificate for IP address {hostname:?}. Configure it in DERPMap using: \
         (https://tailscale.com/s/custom-derp)"
    );
    info!("  {}", node.json_line());
    info!(
        "headscale: save as a YAML file listed in derp.paths:\n{}",
        node.headscale_yaml()
    );
    info!(
        "tailnet policy file (Tailscale SaaS): paste into its top-level object:\n{}",
        node.policy_file_snippet()
    );
}

fn bind_tcp(addr: SocketAddr, which: Listener) -> Result<Async<TcpListener>, StartError> {
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
fn bind_hint(proto: holder::Proto, port: u16, e: &io::Error, flag: &str, uci: &str) -> String {
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
fn listen_tcp(addr: SocketAddr) -> io::Result<Async<TcpListener>> {
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

fn bind_udp(addr: SocketAddr) -> io::Result<Async<UdpSocket>> {
    match Async::<UdpSocket>::bind(addr) {
        Ok(s) => Ok(s),
        Err(_) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => Async::<UdpSocket>::bind(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()),
        ),
        Err(e) => Err(e),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    /// `-a`: DERP and the web endpoints, TLS or plain.
    Main,
    /// `--http-port` in TLS mode.
    Port80,
}

async fn accept_loop(
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
            .map(|(r, b)| AcceptLimiter::new(r, b)),
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
                        Err(ConnFail::Evicted)
                    });
                    let Err(e) = conn.await else {
                        return;
                    };
                    st.relay.metrics.failed_logins.fetch_add(1, Relaxed);
                    match e {
                        // DERP errors were logged with the client's key by the client code.
                        ConnFail::Derp(_) => {}
                        ConnFail::Head(_) => limited!(info, HEADS, "{remote}: refused: {e}"),
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

/// A connection failed before or instead of a DERP session.
#[derive(Debug)]
enum ConnFail {
    Io(io::Error),
    Timeout(&'static str),
    /// Closed to make room for a new connection (`--max-handshakes`).
    Evicted,
    Head(http::HeadError),
    Derp(client::ConnError),
}

impl std::fmt::Display for ConnFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Timeout(what) => write!(f, "{what} timed out"),
            Self::Evicted => f.write_str(
                "evicted before its login to make room for a new connection (--max-handshakes)",
            ),
            Self::Head(e) => write!(f, "{e}"),
            Self::Derp(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for ConnFail {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

async fn handle_conn(
    state: &Arc<State>,
    tcp: Async<TcpStream>,
    remote: SocketAddr,
    which: Listener,
    slot: Slot,
) -> Result<(), ConnFail> {
    state.tcp.apply(tcp.get_ref());
    // Boxed: the TLS handshake and head reading are large and short-lived; unboxed they would
    // be part of every connection's task for its whole life.
    let setup = Box::pin(async {
        // Clients speak first (ClientHello or request head), at once: a silent connection is
        // closed early instead of holding its slot for the whole handshake deadline.
        async { tcp.readable().await.map_err(ConnFail::Io) }
            .or(async {
                Timer::after(state.relay.timeouts.first_byte).await;
                state
                    .relay
                    .metrics
                    .first_byte_timeouts
                    .fetch_add(1, Relaxed);
                Err(ConnFail::Timeout("first byte"))
            })
            .await?;
        slot.progress(Progress::Talking);
        let mut stream = match (&state.tls, which) {
            (Some(acc), Listener::Main) => Stream::Tls(Box::new(
                acc.accept_with(tcp, tls::limit_send_buffer)
                    .await
                    .map_err(|e| {
                        ConnFail::Io(io::Error::new(e.kind(), format!("TLS handshake: {e}")))
                    })?,
            )),
            _ => Stream::Plain(tcp),
        };
        match read_head(&mut stream).await {
            Ok((req, leftover)) => Ok((stream, req, leftover)),
            Err(ConnFail::Head(e)) => {
                // Tell an HTTP client what was wrong, as Go's server does, then close. The
                // write runs under the same head deadline.
                let _ = stream.write_all(&http::head_error(&e)).await;
                Err(ConnFail::Head(e))
            }
            Err(e) => Err(e),
        }
    });
    let (mut stream, req, leftover) = setup
        .or(async {
            Timer::after(state.relay.timeouts.handshake).await;
            Err(ConnFail::Timeout("TLS handshake and request head"))
        })
        .await?;
    slot.progress(Progress::Upgraded);
    let head = req.method == "HEAD";
    // derper's port 80 hands `/debug…` to the main mux (access rules apply); all else redirects.
    let resp = if which == Listener::Port80 && !req.target.starts_with("/debug") {
        http::port80(&req)
    } else {
        match req.path.as_str() {
            "/derp/probe" | "/derp/latency-check" => http::probe(&req.method),
            "/derp" if !state.derp_enabled => {
                http::text_error(404, "Not Found", "derp server disabled")
            }
            "/derp" => match req.upgrade.as_str() {
                "websocket" if req.ws_protocol.contains("derp") => {
                    match crate::ws::accept(&req, remote) {
                        Ok(acc) => {
                            drop(req);
                            let ws = crate::ws::serve(
                                &state.relay,
                                state.relay.timeouts.handshake,
                                stream,
                                leftover,
                                acc,
                                remote,
                                slot,
                            );
                            return ws.await.map_err(ConnFail::Derp);
                        }
                        Err(refusal) => refusal,
                    }
                }
                "derp" | "websocket" => {
                    return serve_derp(state, stream, leftover, req, remote, slot).await;
                }
                other => {
                    if !other.is_empty() {
                        debug!("{remote}: weird upgrade {other:?}");
                    }
                    http::text_error(426, "Upgrade Required", "DERP requires connection upgrade")
                }
            },
            p if p == "/debug" || p.starts_with("/debug/") => {
                debug::respond(state, &req, remote, stream.local_addr())
            }
            "/generate_204" => http::no_content(req.challenge.as_deref()),
            "/robots.txt" => http::robots(head),
            _ => http::home(&state.home, state.derp_enabled, head),
        }
    };
    let write = async {
        stream.write_all(&resp).await?;
        stream.flush().await?;
        stream.close().await
    };
    write
        .or(async {
            Timer::after(state.relay.timeouts.handshake).await;
            Err(io::ErrorKind::TimedOut.into())
        })
        .await?;
    Ok(())
}

async fn serve_derp(
    state: &Arc<State>,
    stream: Stream,
    leftover: Vec<u8>,
    req: Request,
    remote: SocketAddr,
    slot: Slot,
) -> Result<(), ConnFail> {
    let shared = LockedStream::new(stream);
    let rd = Cursor::new(leftover).chain(shared.clone());
    let up = Upgrade {
        remote,
        fast_start: req.fast_start,
        not_ideal: req.not_ideal,
        websocket: false,
        slot: Some(slot),
    };
    // The request's strings are not needed for the connection's life.
    drop(req);
    client::serve(state.relay.clone(), rd, shared, up)
        .await
        .map_err(ConnFail::Derp)
}

/// Reads one request head. Returns it and the bytes that followed it (fast-start login).
async fn read_head(stream: &mut Stream) -> Result<(Request, Vec<u8>), ConnFail> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let start = buf.len();
        let room = (http::MAX_HEAD_LEN + 1 - start).min(4096);
        buf.resize(start + room, 0);
        let n = stream.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(ConnFail::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if let Some((req, used)) = http::parse_head(&buf).map_err(ConnFail::Head)? {
            // Copy the rest out so the head buffer is freed for the connection's lifetime.
            return Ok((req, buf[used..].to_vec()));
        }
    }
}

async fn stun_loop(state: Arc<State>, sock: Async<UdpSocket>) {
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
