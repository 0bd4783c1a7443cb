//! `derpd-load`: the load generator of `bench/compare.sh`. It speaks DERP over TLS, pinned to
//! one certificate, to any DERP server (derpd or Tailscale's derper) and prints one JSON line of
//! results. Packages never install it: it builds only with `--features bench`.
//!
//! Modes:
//! - `throughput`: `--pairs` sender→receiver pairs of 1400-byte packets for `--seconds` after
//!   `--warmup`. Each sender keeps at most `--window` packets in flight to its receiver (a
//!   closed loop: the relay's capacity without overrunning its queues); `--window 0` floods
//!   (open loop: what the relay delivers, and drops, when offered more than it can carry);
//!   `--rate` paces all senders together at that many packets per second. `--fight N` adds
//!   a duplicate-key fight: two more connections with one key that send N frames a second
//!   between them, alternately (a NotePreferred each: any frame makes its connection the
//!   key's active one), so that `cpu_us_per_packet` of the pairs with and without it shows
//!   what a fight costs everyone else. The server's CPU includes the fighters' own frames:
//!   `--fight-control` sends the same frames from one of the two connections only (no
//!   switches), and the difference between the two runs is what the switching costs.
//! - `latency`: the same paced background load, plus a probe: A sends 64-byte packets at
//!   `--probe-rate` to B, B echoes each one to C; the round trip A → relay → B → relay → C is
//!   measured on one clock (p50/p99/p999).
//! - `idle`: `--clients` clients log in and are held; the server's RSS before and after.
//! - `logins`: `--concurrency` loops of connect, TLS, DERP login, close, for `--seconds`.
//!
//! With `--pid` the server's CPU time (`/proc/<pid>/stat`) and memory (`/proc/<pid>/status`) are
//! read at the start and end of the measured window; the generator's own CPU time is read the
//! same way, so a run says when the generator, not the server, was the bottleneck.
//!
//! One thread, one executor: pin it to a CPU with `taskset`. Each packet is its own TLS record
//! (as Tailscale's client writes them), but a sender hands the kernel a batch of records in one
//! write, and a reader takes up to 64 KiB per read, so the generator costs less per packet than
//! the relay it drives.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argh::FromArgs;
use derpd::frame::{self, FrameType, HEADER_LEN};
use derpd::handshake::{self, SessionBox};
use derpd::httpc;
use derpd::key::{NodePrivate, NodePublic, KEY_LEN};
use derpd::trust::{self, Trust};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use smol::future::FutureExt;
use smol::{Async, LocalExecutor, Timer};

/// Frames a sender encrypts (one TLS record each) before one write to the socket.
const SEND_BATCH: usize = 16;
/// Socket read size of senders, receivers and probes.
const BIG_READ: usize = 64 << 10;
/// Socket read size of idle and login connections.
const SMALL_READ: usize = 4 << 10;
/// Size of the latency probe packets.
const PROBE_SIZE: usize = 64;

/// derpd-load: DERP load generator for bench/compare.sh (one JSON line on stdout)
#[derive(FromArgs, Debug)]
struct Args {
    /// throughput, latency, idle or logins
    #[argh(positional)]
    mode: String,
    /// server address (host:port, TLS)
    #[argh(option)]
    addr: SocketAddr,
    /// the server's certificate (PEM); the connection is pinned to its first certificate
    #[argh(option)]
    cert: String,
    /// server process id, for CPU time and RSS from /proc
    #[argh(option)]
    pid: Option<u32>,
    /// sender/receiver pairs (throughput, latency background)
    #[argh(option, default = "8")]
    pairs: usize,
    /// packet size in bytes (throughput, latency background)
    #[argh(option, default = "1400")]
    size: usize,
    /// packets per second over all pairs; 0 = as fast as the window allows
    #[argh(option, default = "0.0")]
    rate: f64,
    /// packets each sender may have in flight to its receiver; 0 = no limit (flood)
    #[argh(option, default = "32")]
    window: u64,
    /// duplicate-key fight (throughput, latency): frames per second that two connections of
    /// one key send alternately; 0 = no fight
    #[argh(option, default = "0.0")]
    fight: f64,
    /// with --fight: every frame from the same one of the two connections (the control run)
    #[argh(switch)]
    fight_control: bool,
    /// latency probes per second
    #[argh(option, default = "500.0")]
    probe_rate: f64,
    /// measured seconds
    #[argh(option, default = "5.0")]
    seconds: f64,
    /// seconds of load before the measured window
    #[argh(option, default = "1.0")]
    warmup: f64,
    /// clients to hold (idle)
    #[argh(option, default = "1000")]
    clients: usize,
    /// connections in flight at once (idle, logins)
    #[argh(option, default = "16")]
    concurrency: usize,
    /// a JSON object whose fields are added to the output (e.g. the server's name)
    #[argh(option, default = "String::from(\"{}\")")]
    label: String,
}

fn main() {
    let args: Args = argh::from_env();
    let label: Value = match serde_json::from_str(&args.label) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            eprintln!("derpd-load: --label must be a JSON object");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(v) => println!("{}", merge(label, v)),
        Err(e) => {
            eprintln!("derpd-load {}: {e}", args.mode);
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<Value, String> {
    let pem = std::fs::read(&args.cert).map_err(|e| format!("{}: {e}", args.cert))?;
    let leaf = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| format!("{}: no certificate", args.cert))?
        .map_err(|e| format!("{}: {e}", args.cert))?;
    let ctx = Rc::new(Ctx {
        addr: args.addr,
        tls: tls_config(leaf.as_ref().to_vec())?,
        pid: args.pid,
        stats: Stats::default(),
        stop: Cell::new(false),
        t0: Instant::now(),
    });
    let ex = Rc::new(LocalExecutor::new());
    let fut = async {
        match args.mode.as_str() {
            "throughput" => traffic(&ex, &ctx, args, false).await,
            "latency" => traffic(&ex, &ctx, args, true).await,
            "idle" => idle(&ex, &ctx, args).await,
            "logins" => logins(&ex, &ctx, args).await,
            m => Err(format!("unknown mode {m:?}")),
        }
    };
    let res = smol::block_on(ex.run(fut));
    ctx.stop.set(true);
    res
}

/// Shared by every task of the (single-threaded) run.
struct Ctx {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    pid: Option<u32>,
    stats: Stats,
    stop: Cell<bool>,
    /// The clock of probe timestamps.
    t0: Instant,
}

#[derive(Default)]
struct Stats {
    sent: Cell<u64>,
    received: Cell<u64>,
    received_bytes: Cell<u64>,
    logins: Cell<u64>,
    /// Frames the two fighting connections sent.
    fight_frames: Cell<u64>,
    failures: Cell<u64>,
    probes_sent: Cell<u64>,
    /// (sequence number, round trip in ns) of each probe that came back.
    probes: RefCell<Vec<(u64, u64)>>,
    errors: RefCell<Vec<String>>,
}

impl Stats {
    fn add(c: &Cell<u64>, n: u64) {
        c.set(c.get() + n);
    }

    fn error(&self, e: String) {
        let mut errs = self.errors.borrow_mut();
        if errs.len() < 5 {
            errs.push(e);
        }
        Self::add(&self.failures, 1);
    }
}

// ---- TLS ----

fn tls_config(leaf: Vec<u8>) -> Result<Arc<ClientConfig>, String> {
    // The server's own certificate, pinned as a Tailscale client pins it (`sha256-raw:`).
    let pin = Trust::Pin(Sha256::digest(&leaf).into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Offer cipher suites in Go's order (Tailscale clients are Go): AES-128-GCM first.
    let mut provider = (*provider).clone();
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    });
    let provider = Arc::new(provider);
    let verifier = trust::verifier(pin, &provider)?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // Every login is a full handshake, as for a client that has never seen the server.
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

// ---- one DERP connection, rustls driven by hand ----

struct Conn {
    tcp: Async<TcpStream>,
    tls: ClientConnection,
    /// Socket reads land here, then go through rustls.
    raw: Vec<u8>,
    /// Decrypted bytes; `buf[start..]` is not yet consumed.
    buf: Vec<u8>,
    start: usize,
    fills: u32,
    key: NodePublic,
}

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Conn {
    /// Writes every TLS record rustls has ready.
    async fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            let tls = &mut self.tls;
            self.tcp.write_with(|mut s| tls.write_tls(&mut s)).await?;
        }
        Ok(())
    }

    /// One socket read, decrypted into `buf`. EOF is an error.
    async fn fill(&mut self) -> io::Result<()> {
        let raw = &mut self.raw;
        let n = self.tcp.read_with(|mut s| s.read(raw)).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > BIG_READ {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let mut src = &self.raw[..n];
        while !src.is_empty() {
            self.tls.read_tls(&mut src)?;
            let st = self.tls.process_new_packets().map_err(bad)?;
            let want = st.plaintext_bytes_to_read();
            let old = self.buf.len();
            self.buf.resize(old + want, 0);
            self.tls.reader().read_exact(&mut self.buf[old..])?;
        }
        self.flush().await
    }

    /// The next complete frame already decrypted: its type and payload range in `buf`.
    fn frame(&mut self) -> Option<(u8, Range<usize>)> {
        let avail = &self.buf[self.start..];
        let (t, len) = frame::decode_header(avail.get(..HEADER_LEN)?.try_into().ok()?);
        let end = HEADER_LEN + len as usize;
        if avail.len() < end {
            return None;
        }
        let r = self.start + HEADER_LEN..self.start + end;
        self.start += end;
        Some((t, r))
    }

    async fn next_frame(&mut self) -> io::Result<(u8, Range<usize>)> {
        loop {
            if let Some(f) = self.frame() {
                return Ok(f);
            }
            self.fill().await?;
            // A socket that always has data never makes the read wait: let others run.
            self.fills += 1;
            if self.fills.is_multiple_of(8) {
                smol::future::yield_now().await;
            }
        }
    }

    fn queue(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(bytes)
    }
}

/// A client key with its public half and, once the server key is known, the login box: the
/// X25519 work a real client does once per key, not once per connection.
struct ClientKey {
    private: NodePrivate,
    public: NodePublic,
    session: RefCell<Option<(NodePublic, Rc<SessionBox>)>>,
}

impl ClientKey {
    fn generate() -> Self {
        let private = NodePrivate::generate();
        Self {
            public: private.public(),
            private,
            session: RefCell::new(None),
        }
    }

    fn session(&self, server: &NodePublic) -> Rc<SessionBox> {
        let mut s = self.session.borrow_mut();
        match &*s {
            Some((k, bx)) if k == server => bx.clone(),
            _ => {
                let bx = Rc::new(SessionBox::new(&self.private, server));
                *s = Some((*server, bx.clone()));
                bx
            }
        }
    }
}

/// TCP, TLS, the HTTP upgrade and the DERP login (ServerKey → ClientInfo → ServerInfo).
async fn login(ctx: &Ctx, key: &ClientKey, read_size: usize) -> io::Result<Conn> {
    let tcp = Async::<TcpStream>::connect(ctx.addr).await?;
    tcp.get_ref().set_nodelay(true)?;
    let name = ServerName::IpAddress(ctx.addr.ip().into());
    let tls = ClientConnection::new(ctx.tls.clone(), name).map_err(bad)?;
    let mut c = Conn {
        tcp,
        tls,
        raw: vec![0; read_size],
        buf: Vec::new(),
        start: 0,
        fills: 0,
        key: key.public,
    };
    // rustls holds the request until the handshake is done.
    c.queue(handshake::upgrade_request("derp", "derpd-load").as_bytes())?;
    c.flush().await?;
    loop {
        match httpc::parse_head(&c.buf[c.start..]).map_err(bad)? {
            Some((head, n)) if head.status == 101 => {
                c.start += n;
                break;
            }
            Some((head, _)) => return Err(bad(format!("upgrade refused: {}", head.status_line))),
            None if c.buf.len() - c.start > 4096 => return Err(bad("response head too long")),
            None => c.fill().await?,
        }
    }
    let (t, r) = c.next_frame().await?;
    let server = handshake::parse_server_key(t, &c.buf[r]).map_err(bad)?;
    let bx = key.session(&server);
    let ci = bx.client_info_frame(&key.public, br#"{"version":2,"CanAckPings":true}"#);
    c.queue(&ci)?;
    c.flush().await?;
    let (t, r) = c.next_frame().await?;
    handshake::read_server_info(&bx, t, &c.buf[r]).map_err(bad)?;
    Ok(c)
}

/// A SendPacket frame to `dst` carrying `size` bytes (not disco-looking).
fn send_frame(dst: &NodePublic, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN + KEY_LEN + size];
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(&mut h, FrameType::SendPacket, (KEY_LEN + size) as u32);
    f[..HEADER_LEN].copy_from_slice(&h);
    f[HEADER_LEN..HEADER_LEN + KEY_LEN].copy_from_slice(&dst.0);
    for (i, b) in f[HEADER_LEN + KEY_LEN..].iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    f
}

// ---- /proc ----

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    server_ticks: u64,
    self_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
    sent: u64,
    received: u64,
    received_bytes: u64,
    logins: u64,
    probes_sent: u64,
    fight_frames: u64,
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name start at field 3 (state).
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Ctx {
    fn sample(&self) -> Sample {
        let s = &self.stats;
        let (server_ticks, rss_kib, hwm_kib) = match self.pid {
            Some(p) => (
                cpu_ticks(&p.to_string()),
                status_kib(p, "VmRSS:"),
                status_kib(p, "VmHWM:"),
            ),
            None => (0, 0, 0),
        };
        Sample {
            at: Instant::now(),
            server_ticks,
            self_ticks: cpu_ticks("self"),
            rss_kib,
            hwm_kib,
            sent: s.sent.get(),
            received: s.received.get(),
            received_bytes: s.received_bytes.get(),
            logins: s.logins.get(),
            probes_sent: s.probes_sent.get(),
            fight_frames: s.fight_frames.get(),
        }
    }

    fn note(&self, what: &str, r: io::Result<()>) {
        if let Err(e) = r {
            if !self.stop.get() {
                self.stats.error(format!("{what}: {e}"));
            }
        }
    }
}

/// Window figures common to every mode: wall time, CPU of both sides, the bottleneck.
/// Returns the wall time and the server's CPU seconds too, for per-packet and per-login figures.
fn window(a: &Sample, b: &Sample) -> (f64, f64, Value) {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let wall = b.at.duration_since(a.at).as_secs_f64();
    let server_s = b.server_ticks.saturating_sub(a.server_ticks) as f64 / hz;
    let self_s = b.self_ticks.saturating_sub(a.self_ticks) as f64 / hz;
    let (su, lu) = (server_s / wall, self_s / wall);
    let bottleneck = if su >= 0.9 {
        "server"
    } else if lu >= 0.9 {
        "loadgen"
    } else {
        "neither"
    };
    let v = json!({
        "seconds": round(wall, 3),
        "server_cpu_s": round(server_s, 3),
        "server_cpu_util": round(su, 3),
        "loadgen_cpu_util": round(lu, 3),
        "bottleneck": bottleneck,
    });
    (wall, server_s, v)
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

// ---- modes ----

async fn traffic(
    ex: &Rc<LocalExecutor<'_>>,
    ctx: &Rc<Ctx>,
    args: &Args,
    probe: bool,
) -> Result<Value, String> {
    if args.size > frame::MAX_PACKET_SIZE {
        return Err(format!("--size is at most {}", frame::MAX_PACKET_SIZE));
    }
    let per_pair = args.rate / args.pairs.max(1) as f64;
    for _ in 0..args.pairs {
        let (sk, rk) = (ClientKey::generate(), ClientKey::generate());
        let s = login(ctx, &sk, BIG_READ).await.map_err(|e| e.to_string())?;
        let r = login(ctx, &rk, BIG_READ).await.map_err(|e| e.to_string())?;
        let f = send_frame(&r.key, args.size);
        let flow = Rc::new(Flow {
            window: args.window,
            ..Flow::default()
        });
        let (c, fl) = (ctx.clone(), flow.clone());
        ex.spawn(async move { c.note("receiver", receive(&c, r, &fl).await) })
            .detach();
        let c = ctx.clone();
        ex.spawn(async move { c.note("sender", send(&c, s, f, per_pair, &flow).await) })
            .detach();
    }
    if args.fight > 0.0 {
        let k = ClientKey::generate();
        let a = login(ctx, &k, SMALL_READ)
            .await
            .map_err(|e| e.to_string())?;
        let b = login(ctx, &k, SMALL_READ)
            .await
            .map_err(|e| e.to_string())?;
        let (c, rate, switch) = (ctx.clone(), args.fight, !args.fight_control);
        ex.spawn(async move { c.note("fighters", fight(&c, [a, b], rate, switch).await) })
            .detach();
    }
    if probe {
        let probe_conn = || async {
            let k = ClientKey::generate();
            login(ctx, &k, BIG_READ).await.map_err(|e| e.to_string())
        };
        let (c1, c2, c3) = (
            probe_conn().await?,
            probe_conn().await?,
            probe_conn().await?,
        );
        let to_b = c2.key;
        let to_c = c3.key;
        let c = ctx.clone();
        ex.spawn(async move { c.note("probe collector", collect(&c, c3).await) })
            .detach();
        let c = ctx.clone();
        ex.spawn(async move { c.note("probe echo", echo(c2, to_c).await) })
            .detach();
        let c = ctx.clone();
        let rate = args.probe_rate;
        ex.spawn(async move { c.note("probe sender", probe_send(&c, c1, to_b, rate).await) })
            .detach();
    }
    Timer::after(Duration::from_secs_f64(args.warmup)).await;
    let a = ctx.sample();
    Timer::after(Duration::from_secs_f64(args.seconds)).await;
    let b = ctx.sample();
    // Probes sent in the window get a moment to come back.
    if probe {
        Timer::after(Duration::from_millis(200)).await;
    }
    ctx.stop.set(true);
    let (wall, server_s, mut v) = window(&a, &b);
    let sent = b.sent - a.sent;
    let received = b.received - a.received;
    let bytes = b.received_bytes - a.received_bytes;
    let drop = if sent > 0 {
        (1.0 - received as f64 / sent as f64).max(0.0) * 100.0
    } else {
        0.0
    };
    let cpu_pp = if received > 0 {
        server_s * 1e6 / received as f64
    } else {
        0.0
    };
    v = merge(
        v,
        json!({
            "pairs": args.pairs,
            "size": args.size,
            "rate_pps": args.rate,
            "sent": sent,
            "received": received,
            "pps": round(received as f64 / wall, 0),
            "mbps": round(bytes as f64 * 8.0 / wall / 1e6, 1),
            "drop_pct": round(drop, 3),
            "cpu_us_per_packet": round(cpu_pp, 3),
            "fight_fps": round((b.fight_frames - a.fight_frames) as f64 / wall, 0),
            "fight_control": args.fight_control,
        }),
    );
    if probe {
        // The probes sent in the window are sequence numbers a.probes_sent..b.probes_sent.
        let sent_in_window = a.probes_sent..b.probes_sent;
        let mut rtts: Vec<u64> = ctx
            .stats
            .probes
            .borrow()
            .iter()
            .filter(|p| sent_in_window.contains(&p.0))
            .map(|p| p.1)
            .collect();
        rtts.sort_unstable();
        let in_window = b.probes_sent - a.probes_sent;
        let pct = |q: f64| -> f64 {
            if rtts.is_empty() {
                return 0.0;
            }
            let i = ((rtts.len() as f64 * q).ceil() as usize).clamp(1, rtts.len()) - 1;
            round(rtts[i] as f64 / 1e3, 1)
        };
        v = merge(
            v,
            json!({
                "probe_rate": args.probe_rate,
                "samples": rtts.len(),
                "lost": in_window.saturating_sub(rtts.len() as u64),
                "p50_us": pct(0.50),
                "p99_us": pct(0.99),
                "p999_us": pct(0.999),
            }),
        );
    }
    Ok(finish(ctx, v))
}

fn finish(ctx: &Ctx, v: Value) -> Value {
    let errs = ctx.stats.errors.borrow();
    merge(
        v,
        json!({"errors": ctx.stats.failures.get(), "first_errors": *errs}),
    )
}

/// One sender/receiver pair's packets in flight.
#[derive(Default)]
struct Flow {
    window: u64,
    sent: Cell<u64>,
    received: Cell<u64>,
    /// Rung by the receiver.
    progress: event_listener::Event,
}

impl Flow {
    fn in_flight(&self) -> u64 {
        self.sent.get().saturating_sub(self.received.get())
    }

    /// Waits until the window has room. A packet the relay dropped never arrives, so after a
    /// quiet spell the missing ones are written off rather than holding the window shut.
    async fn room(&self) {
        while self.window > 0 && self.in_flight() >= self.window {
            event_listener::listener!(self.progress => l);
            if self.in_flight() < self.window {
                return;
            }
            let quiet = async {
                Timer::after(Duration::from_millis(20)).await;
                false
            };
            let woken = async {
                l.await;
                true
            };
            if !woken.or(quiet).await {
                self.received.set(self.sent.get());
            }
        }
    }
}

/// Sends `frame` over and over within the pair's window, paced at `per_sec` packets per second
/// or unpaced at 0.
async fn send(ctx: &Ctx, mut c: Conn, frame: Vec<u8>, per_sec: f64, flow: &Flow) -> io::Result<()> {
    let start = Instant::now();
    let mut total = 0u64;
    while !ctx.stop.get() {
        flow.room().await;
        let room = match flow.window {
            0 => SEND_BATCH as u64,
            w => (w - flow.in_flight()).min(SEND_BATCH as u64),
        };
        let n = if per_sec > 0.0 {
            let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
            if due <= total {
                Timer::after(Duration::from_millis(1)).await;
                continue;
            }
            (due - total).min(room)
        } else {
            room
        };
        for _ in 0..n {
            c.queue(&frame)?;
        }
        flow.sent.set(flow.sent.get() + n);
        c.flush().await?;
        total += n;
        Stats::add(&ctx.stats.sent, n);
        // A writable socket never makes the flush wait: let the receivers run.
        smol::future::yield_now().await;
    }
    Ok(())
}

async fn receive(ctx: &Ctx, mut c: Conn, flow: &Flow) -> io::Result<()> {
    loop {
        let (t, r) = c.next_frame().await?;
        if t == FrameType::RecvPacket as u8 {
            Stats::add(&ctx.stats.received, 1);
            Stats::add(&ctx.stats.received_bytes, (r.len() - KEY_LEN) as u64);
            flow.received.set(flow.received.get() + 1);
            flow.progress.notify(1);
        }
    }
}

/// Two connections of one key: frames alternately from one and the other at `per_sec` in
/// all, each written on its own, so that the server sees the key's active connection change
/// with (nearly) every frame; without `switch`, every frame from the first (no change).
async fn fight(ctx: &Ctx, mut conns: [Conn; 2], per_sec: f64, switch: bool) -> io::Result<()> {
    // NotePreferred(false): no reply, and no change to the home-connection gauge.
    let mut f = [0u8; HEADER_LEN + 1];
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(&mut h, FrameType::NotePreferred, 1);
    f[..HEADER_LEN].copy_from_slice(&h);
    let start = Instant::now();
    let mut sent = 0u64;
    while !ctx.stop.get() {
        let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
        if due <= sent {
            Timer::after(Duration::from_millis(1)).await;
            continue;
        }
        // At most 64 frames between two looks at the clock and the stop flag.
        for _ in 0..(due - sent).min(64) {
            let c = &mut conns[usize::from(switch) * (sent & 1) as usize];
            c.queue(&f)?;
            c.flush().await?;
            sent += 1;
        }
        ctx.stats.fight_frames.set(sent);
    }
    Ok(())
}

/// Probe A: 64-byte packets carrying (sequence, send time in ns since `t0`) at `per_sec`.
async fn probe_send(ctx: &Ctx, mut c: Conn, to: NodePublic, per_sec: f64) -> io::Result<()> {
    let mut f = send_frame(&to, PROBE_SIZE);
    let at = HEADER_LEN + KEY_LEN;
    let start = Instant::now();
    let mut seq = 0u64;
    while !ctx.stop.get() {
        let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
        if due <= seq {
            let next = Duration::from_secs_f64((seq + 1) as f64 / per_sec);
            Timer::at(start + next).await;
            continue;
        }
        f[at..at + 8].copy_from_slice(&seq.to_be_bytes());
        let now = ctx.t0.elapsed().as_nanos() as u64;
        f[at + 8..at + 16].copy_from_slice(&now.to_be_bytes());
        c.queue(&f)?;
        c.flush().await?;
        seq += 1;
        ctx.stats.probes_sent.set(seq);
    }
    Ok(())
}

/// Probe B: sends every packet it receives on to `to`.
async fn echo(mut c: Conn, to: NodePublic) -> io::Result<()> {
    let mut f = send_frame(&to, PROBE_SIZE);
    let at = HEADER_LEN + KEY_LEN;
    loop {
        let (t, r) = c.next_frame().await?;
        let pkt = &c.buf[r.start + KEY_LEN..r.end];
        if t == FrameType::RecvPacket as u8 && pkt.len() == PROBE_SIZE {
            f[at..].copy_from_slice(pkt);
            c.queue(&f)?;
            c.flush().await?;
        }
    }
}

/// Probe C: records each probe's round trip.
async fn collect(ctx: &Ctx, mut c: Conn) -> io::Result<()> {
    loop {
        let (t, r) = c.next_frame().await?;
        let p = &c.buf[r.start + KEY_LEN..r.end];
        if t == FrameType::RecvPacket as u8 && p.len() == PROBE_SIZE {
            let now = ctx.t0.elapsed().as_nanos() as u64;
            let seq = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
            let sent = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
            let mut probes = ctx.stats.probes.borrow_mut();
            probes.push((seq, now.saturating_sub(sent)));
        }
    }
}

async fn idle(ex: &Rc<LocalExecutor<'_>>, ctx: &Rc<Ctx>, args: &Args) -> Result<Value, String> {
    let a = ctx.sample();
    let started = Instant::now();
    let held: Rc<RefCell<Vec<Conn>>> = Rc::default();
    let next = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (c, held, next, n) = (ctx.clone(), held.clone(), next.clone(), args.clients);
        tasks.push(ex.spawn(async move {
            while next.get() < n {
                next.set(next.get() + 1);
                let key = ClientKey::generate();
                match login(&c, &key, SMALL_READ).await {
                    Ok(conn) => held.borrow_mut().push(conn),
                    Err(e) => return Err(format!("client {} of {n}: {e}", next.get())),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await?;
    }
    let connect_s = started.elapsed().as_secs_f64();
    // Let the server finish what the last logins started before reading its memory.
    Timer::after(Duration::from_secs_f64(args.warmup)).await;
    let b = ctx.sample();
    let n = held.borrow().len();
    let per = b.rss_kib.saturating_sub(a.rss_kib) as f64 / n.max(1) as f64;
    Ok(finish(
        ctx,
        json!({
            "clients": n,
            "connect_s": round(connect_s, 3),
            "rss_before_kib": a.rss_kib,
            "rss_after_kib": b.rss_kib,
            "hwm_kib": b.hwm_kib,
            "rss_per_client_kib": round(per, 2),
        }),
    ))
}

async fn logins(ex: &Rc<LocalExecutor<'_>>, ctx: &Rc<Ctx>, args: &Args) -> Result<Value, String> {
    // Keys are made up front (the generator's CPU is for the logins) and reused round robin,
    // far enough apart that a key is never logged in twice at once.
    let keys: Rc<Vec<ClientKey>> = Rc::new(
        (0..args.concurrency.max(1) * 8)
            .map(|_| ClientKey::generate())
            .collect(),
    );
    let next = Rc::new(Cell::new(0usize));
    for _ in 0..args.concurrency.max(1) {
        let (c, keys, next) = (ctx.clone(), keys.clone(), next.clone());
        ex.spawn(async move {
            while !c.stop.get() {
                let i = next.get();
                next.set(i + 1);
                match login(&c, &keys[i % keys.len()], SMALL_READ).await {
                    Ok(conn) => {
                        Stats::add(&c.stats.logins, 1);
                        // Close with a reset: thousands of TIME_WAIT sockets per second would
                        // slow every later connect() and make runs depend on their history.
                        let _ = rustix::net::sockopt::set_socket_linger(
                            conn.tcp.get_ref(),
                            Some(Duration::ZERO),
                        );
                    }
                    Err(e) => c.note("login", Err(e)),
                }
            }
        })
        .detach();
    }
    Timer::after(Duration::from_secs_f64(args.warmup)).await;
    let a = ctx.sample();
    let failures_before = ctx.stats.failures.get();
    Timer::after(Duration::from_secs_f64(args.seconds)).await;
    let b = ctx.sample();
    ctx.stop.set(true);
    let (wall, server_s, v) = window(&a, &b);
    let n = b.logins - a.logins;
    Ok(finish(
        ctx,
        merge(
            v,
            json!({
                "concurrency": args.concurrency,
                "logins": n,
                "failures": ctx.stats.failures.get() - failures_before,
                "logins_per_s": round(n as f64 / wall, 1),
                "cpu_us_per_login": round(if n > 0 { server_s * 1e6 / n as f64 } else { 0.0 }, 1),
            }),
        ),
    ))
}
