//! Listeners and the life of a connection up to the DERP hand-off: TCP accept → optional TLS →
//! one bounded HTTP request head → a response, or the DERP upgrade. Also the STUN UDP loop and
//! the executor threads that run it all.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use smol::{Executor, Timer};

mod debug;
mod front;
mod listen;

pub use listen::UCI_SECTION_ENV;
use listen::{accept_loop, bind_hint, bind_tcp, bind_udp, stun_loop, Listener};

use crate::config::{Config, KeySource, TlsMode};
use crate::derpmap;
use crate::frame::SmallFrame;
use crate::holder;
use crate::http::Home;
use crate::key::NodePrivate;
use crate::limits::{RateConfig, Slots};
use crate::net::TcpOptions;
use crate::relay::{log_rate_config, Relay};
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
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections not logged in yet (`--max-handshakes`, `--max-handshakes-per-ip`).
    pub handshakes: Arc<Slots>,
    /// The `--rate-config` file, re-read on SIGHUP.
    pub(crate) rate_config: Option<std::path::PathBuf>,
    /// Set on SIGTERM/SIGINT: the listeners stop accepting.
    stopping: Stop,
    /// Swaps in renewed `--certmode manual` files.
    certs: Option<tls::CertReloader>,
    /// `--certmode letsencrypt`: the proofs served while the CA validates (HTTP-01 on port 80).
    acme: Option<Arc<tls::Challenges>>,
    /// `/debug/` access rule and start-time facts.
    pub(crate) debug: debug::DebugState,
}

impl State {
    /// The state of a server for `cfg`, without its listeners and threads: the relay
    /// ([`Relay::new`]) and the `/debug/` access rule are made here.
    fn new(
        cfg: &Config,
        private_key: NodePrivate,
        tls: Option<Arc<rustls::ServerConfig>>,
        certs: Option<tls::CertReloader>,
        acme: Option<Arc<tls::Challenges>>,
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
            acme,
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
        let private_key = load_key(&cfg.key)?;
        let tcp = bind_tcp(cfg.listen, Listener::Main)?;
        let addr = tcp.get_ref().local_addr().map_err(StartError::Io)?;
        let tls = match &cfg.tls {
            Some(mode) => Some(ServerTls::start(mode, &private_key, cfg.meta_cert)?),
            None => None,
        };
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
        let stun_socks = bind_stun(&cfg);
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
        let pin = tls.as_ref().and_then(|t| t.pin.clone());
        // The DERPMap entry for this node: logged below for a self-signed IP certificate,
        // served on `/debug/derpmap` in every TLS mode.
        let derp_map = cfg.tls.as_ref().map(|mode| {
            let node = derpmap::Node::new(
                &mode.hostname,
                cfg.public_port.unwrap_or(addr.port()),
                stun_addrs.first().map(|a| a.port()),
                cfg.stun_port.is_some(),
                pin.as_deref(),
            );
            // `--acme-ip-certs` with an IPv4 and an IPv6 address: the second one too.
            let more = mode.acme.iter().flat_map(|a| a.ips.iter().skip(1));
            more.fold(node, |n, ip| n.with_address(*ip))
        });
        let (acceptor, reloader, keeper) = match tls {
            Some(t) => (Some(t.acceptor), t.reloader, t.keeper),
            None => (None, None, None),
        };
        let challenges = keeper.as_ref().map(|k| k.challenges());
        let state = State::new(&cfg, private_key, acceptor, reloader, challenges, derp_map)?;
        let state = Arc::new(state);
        log_start(&cfg, &state, addr, http_addr, &stun_addrs);
        if let (Some(mode), Some(node)) = (&cfg.tls, state.debug.derp_map()) {
            if pin.is_some() {
                // With a pin (a self-signed IP certificate), as derper logs it.
                print_derp_map(&mode.hostname, node, true);
            } else if mode.acme.as_ref().is_some_and(|a| a.ip_certs) {
                // A CA-issued IP certificate: clients verify it as any other, no pin.
                print_derp_map(&mode.hostname, node, false);
            }
        }

        let ex = Arc::new(Executor::new());
        ex.spawn(accept_loop(ex.clone(), state.clone(), tcp, Listener::Main))
            .detach();
        if let Some(l) = http80 {
            ex.spawn(accept_loop(ex.clone(), state.clone(), l, Listener::Port80))
                .detach();
        }
        if state.certs.is_some() {
            ex.spawn(watch_certs(state.clone(), cfg.cert_poll)).detach();
        }
        if let Some(k) = keeper {
            ex.spawn(k.run()).detach();
        }
        for s in stun_socks {
            ex.spawn(stun_loop(state.clone(), s)).detach();
        }
        for (peer, tls) in mesh_links {
            let link = crate::link::Link::new(peer.host.clone());
            let relay = state.relay.clone();
            ex.spawn(crate::mesh::run_link(relay, state.tcp, link, peer, tls))
                .detach();
        }
        let stop = Arc::new(Stop::default());
        let threads = start_threads(cfg.threads.max(1), &ex, &stop)?;
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

/// The server's key: made for this run, given, or read from (or first written to) its file.
fn load_key(source: &KeySource) -> Result<NodePrivate, StartError> {
    Ok(match source {
        KeySource::Ephemeral => NodePrivate::generate(),
        KeySource::Given(k) => k.clone(),
        KeySource::File(p) => {
            let (k, created) = crate::key::load_or_create_key_file(p).map_err(StartError::Key)?;
            if created {
                info!("created key file {}", p.display());
            }
            k
        }
    })
}

/// The main listener's TLS: the acceptor; the reloader that swaps in renewed files
/// (`--certmode manual`) or the keeper that gets certificates from the CA (`letsencrypt`); and
/// the certificate's pin when it is a self-signed IP certificate (clients need it in the
/// DERPMap).
struct ServerTls {
    acceptor: Arc<rustls::ServerConfig>,
    reloader: Option<tls::CertReloader>,
    keeper: Option<tls::CertKeeper>,
    pin: Option<String>,
}

impl ServerTls {
    /// The certificates of `mode`, with the meta-certificate for `key` appended when
    /// `meta_cert`.
    fn start(mode: &TlsMode, key: &NodePrivate, meta_cert: bool) -> Result<Self, StartError> {
        info!(
            "TLS cipher suites: {} (--tls-ciphers {})",
            tls::ciphers::describe(mode.ciphers),
            mode.ciphers
        );
        if let Some(acme) = &mode.acme {
            let (config, keeper) = tls::acme_server_config(mode, acme, key.public().0, meta_cert)
                .map_err(StartError::Tls)?;
            if !keeper.has_certificate() {
                info!(
                    "no certificate for {} yet: TLS clients are refused until the ACME CA \
                     issues one",
                    mode.hostname
                );
            }
            return Ok(Self {
                acceptor: config,
                reloader: None,
                keeper: Some(keeper),
                pin: None,
            });
        }
        Self::manual(mode, key, meta_cert)
    }

    /// `--certmode manual`: loads the certificate (creating a self-signed one for an IP
    /// hostname).
    fn manual(mode: &TlsMode, key: &NodePrivate, meta_cert: bool) -> Result<Self, StartError> {
        let cert = tls::load_or_create(&mode.hostname, &mode.certdir).map_err(StartError::Tls)?;
        if let Some(why) = &cert.replaced {
            warn!(
                "{why}. Generated a new self-signed certificate for {} in {}: THE CERTIFICATE PIN \
                 CHANGED to sha256-raw:{}. Clients reach this node only after CertName is \
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
        let pin = cert.hostname_is_ip.then(|| cert.leaf_sha256_hex());
        let (config, reloader) = tls::reloadable_server_config(
            &cert,
            &mode.hostname,
            &mode.certdir,
            key.public().0,
            meta_cert,
            mode.ciphers,
        )
        .map_err(StartError::Tls)?;
        Ok(Self {
            acceptor: config,
            reloader: Some(reloader),
            keeper: None,
            pin,
        })
    }
}

/// The STUN socket, if STUN runs. Its errors are not fatal (as in derper): logged, and the
/// relay runs without STUN.
fn bind_stun(cfg: &Config) -> Vec<smol::Async<std::net::UdpSocket>> {
    let Some(port) = cfg.stun_port else {
        return Vec::new();
    };
    match bind_udp(SocketAddr::new(cfg.listen.ip(), port)) {
        Ok(s) => vec![s],
        Err(e) => {
            warn!(
                "STUN disabled: cannot listen on udp port {port}: {e}{}",
                bind_hint(holder::Proto::Udp, port, &e, "--stun-port", "stun_port")
            );
            Vec::new()
        }
    }
}

/// The start-up lines: key, listeners, STUN, the buffer budget, the public port.
fn log_start(
    cfg: &Config,
    state: &State,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    stun_addrs: &[SocketAddr],
) {
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
    for a in stun_addrs {
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
}

/// `n` executor threads, each running `ex` until `stop`.
fn start_threads(
    n: usize,
    ex: &Arc<Executor<'static>>,
    stop: &Arc<Stop>,
) -> Result<Vec<std::thread::JoinHandle<()>>, StartError> {
    let mut threads = Vec::new();
    for i in 0..n {
        let (ex, stop) = (ex.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name(format!("derpd-{i}"))
            .spawn(move || smol::block_on(ex.run(stop.wait())))
            .map_err(StartError::Io)?;
        threads.push(t);
    }
    Ok(threads)
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

/// Logs the DERPMap node for an IP address (the line derper logs), then a headscale
/// `derp.paths` file and a tailnet policy file snippet, all from one [`derpmap::Node`]:
/// with the pin of a self-signed certificate, or without one for a CA-issued certificate.
fn print_derp_map(hostname: &str, node: &derpmap::Node, self_signed: bool) {
    if self_signed {
        info!(
            "Using self-signed certificate for IP address {hostname:?}. Configure it in DERPMap \
             using: (https://tailscale.com/s/custom-derp)"
        );
    } else {
        info!(
            "Using a certificate from the ACME CA for IP address {hostname:?}. Configure it in \
             DERPMap using: (https://tailscale.com/s/custom-derp)"
        );
    }
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
