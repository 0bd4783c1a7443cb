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
//! With `--alloc-counter` (the server preloaded with `bench/alloc-count.c`) the server's heap
//! allocations in the window are counted too: `allocs_per_packet`, `allocs_per_login`.
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

#[path = "load/conn.rs"]
mod conn;
#[path = "load/modes.rs"]
mod modes;
#[path = "load/proc.rs"]
mod proc;

use conn::*;
use modes::*;
use proc::*;

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
    /// the server's allocation counter file (bench/alloc-count.c, preloaded into the server):
    /// adds allocations per packet or per login
    #[argh(option)]
    alloc_counter: Option<String>,
    /// the server's guest-instruction counter (bench/qemu-insn.c, the server under qemu-user):
    /// its control FIFO and output file, as FIFO,FILE; adds guest instructions per packet or
    /// per login
    #[argh(option)]
    insn_counter: Option<String>,
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
        alloc_counter: args.alloc_counter.clone(),
        insn_counter: match &args.insn_counter {
            Some(v) => {
                let (ctl, out) = v.split_once(',').ok_or("--insn-counter takes FIFO,FILE")?;
                Some((ctl.to_string(), out.to_string()))
            }
            None => None,
        },
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
    /// bench/alloc-count.c's counter file, when the server runs with it.
    alloc_counter: Option<String>,
    /// bench/qemu-insn.c's control FIFO and output file, when the server runs under it.
    insn_counter: Option<(String, String)>,
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
