#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Admission (`--allow-keys-file`, `--verify-clients`, `--verify-client-url`), against fake
//! servers: a LocalAPI on a unix socket in a temp dir and an admission controller on
//! 127.0.0.1:0 (plain HTTP and https), each recording the exact requests it receives. This file
//! holds the fakes and the helpers the subjects share; one module per subject:
//!
//! - [`whois`] and [`url`]: the checks on their own ([`Admission`], with a short timeout and no
//!   delay between looks at the allow-keys file): the requests, every kind of answer, timeouts,
//!   fail-open, counters; the refused-key cache, kept-alive connections, the fail-open log line
//!   and its rate (a derpd process), bad URLs, https.
//! - [`under_load`]: 500 logins at once against a slow controller, to [`Admission`] and through
//!   an in-process server (the cap on checks in flight, kept-alive connections, no fail-open
//!   admission of a refused key).
//! - [`allow_keys`]: the allow-keys file followed, read off the executor, and not re-read at
//!   every look when its modification time is in the future; the order of the checks.
//! - [`end_to_end`], in process: a refused client sees EOF after ClientInfo (no ServerInfo)
//!   while admitted ones relay; mesh peers are not checked; the allow-keys file is followed.
//! - [`derper`]: against Tailscale's real derper (installed at the pinned version): derper and
//!   derpd, with the same flags and the same fakes, admit the same client; their requests must
//!   match.

mod allow_keys;
mod derper;
mod end_to_end;
mod under_load;
mod url;
mod whois;

use crate::support::inproc;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::support::inproc::{DerpClient, IO_TIMEOUT};
use derpd::admission::{Admission, AdmissionConfig};
use derpd::config::Config;
use derpd::key::{NodePrivate, NodePublic};

/// The remote checks' timeout in the tests that call [`Admission`] directly.
const SHORT: Duration = Duration::from_millis(300);
/// The ClientInfo JSON of a regular client.
const CLIENT_JSON: &[u8] = br#"{"version":2,"CanAckPings":true}"#;

// ---------------------------------------------------------------------------------------------
// Fake HTTP servers

/// A request as a fake server received it.
#[derive(Debug, Clone)]
struct Req {
    /// The head, exactly as received.
    head: String,
    method: String,
    target: String,
    /// (lowercased name, value), in the order received.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a fake server does with a request.
enum Reply {
    /// Sends these bytes, then closes.
    Send(Vec<u8>),
    /// Sends these bytes, then holds the connection until the client closes it.
    SendAndHang(Vec<u8>),
}

type Responder = Arc<dyn Fn(&Req) -> Reply + Send + Sync>;

fn responder(f: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Responder {
    Arc::new(f)
}

/// A response with a Content-Length.
fn http(status: &str, body: &str) -> Reply {
    Reply::Send(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn hang() -> Reply {
    Reply::SendAndHang(Vec::new())
}

fn read_request<S: Read>(s: &mut S) -> Option<Req> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(buf.len() < 64 << 10, "request head too long");
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap().split(' ');
    let (method, target) = (first.next().unwrap(), first.next().unwrap());
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&b[..n]);
    }
    Some(Req {
        method: method.into(),
        target: target.into(),
        head,
        headers,
        body,
    })
}

fn handle<S: Read + Write>(mut s: S, respond: &Responder, tx: &Sender<Req>) {
    let Some(req) = read_request(&mut s) else {
        return;
    };
    let reply = respond(&req);
    let _ = tx.send(req);
    let (bytes, hang) = match reply {
        Reply::Send(b) => (b, false),
        Reply::SendAndHang(b) => (b, true),
    };
    let _ = s.write_all(&bytes);
    let _ = s.flush();
    if hang {
        // Until the client gives up (the accepted socket's read timeout bounds this).
        let mut sink = [0u8; 256];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// How long a fake server waits for a request's bytes.
const FAKE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A fake server's accept loop, on its own thread: each accepted connection (from `accept`,
/// which also sets its read timeout) is served by `serve` on a thread of its own.
fn serve_each<S: Send + 'static>(
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    serve: impl Fn(S) + Clone + Send + 'static,
) {
    thread::spawn(move || loop {
        let Ok(s) = accept() else { continue };
        let serve = serve.clone();
        thread::spawn(move || serve(s));
    });
}

fn tcp_accept(l: TcpListener) -> impl FnMut() -> std::io::Result<std::net::TcpStream> + Send {
    move || {
        let (s, _) = l.accept()?;
        s.set_read_timeout(Some(FAKE_READ_TIMEOUT)).unwrap();
        Ok(s)
    }
}

/// A fake HTTP server on 127.0.0.1:0; the receiver gets each request as it arrives.
fn fake_tcp(respond: Responder) -> (SocketAddr, Receiver<Req>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    serve_each(tcp_accept(l), move |s| handle(s, &respond, &tx));
    (addr, rx)
}

/// A fake LocalAPI on a unix socket at `path`.
fn fake_unix(path: &Path, respond: Responder) -> Receiver<Req> {
    let l = UnixListener::bind(path).unwrap();
    let (tx, rx) = mpsc::channel();
    serve_each(
        move || {
            let (s, _) = l.accept()?;
            s.set_read_timeout(Some(FAKE_READ_TIMEOUT)).unwrap();
            Ok(s)
        },
        move |s| handle(s, &respond, &tx),
    );
    rx
}

/// A fresh directory under the Cargo test tmp dir, with a short path (unix socket paths are
/// limited to 107 bytes); removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

fn temp_dir() -> TempDir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "adm-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn new_key() -> NodePublic {
    NodePrivate::generate().public()
}

/// The admission checks with [`SHORT`] timeouts and no delay between looks at the file.
fn admission(cfg: AdmissionConfig) -> Admission {
    Admission::with_timing(cfg, SHORT, Duration::ZERO).unwrap()
}

fn check_from(a: &Admission, key: &NodePublic, remote: &str) -> Result<(), String> {
    smol::block_on(a.check(key, remote.parse().unwrap()))
}

fn check(a: &Admission, key: &NodePublic) -> Result<(), String> {
    check_from(a, key, "127.0.0.1:41641")
}

fn recv(rx: &Receiver<Req>) -> Req {
    rx.recv_timeout(IO_TIMEOUT)
        .expect("the fake server got a request")
}

/// Writes the allow-keys file `path` listing `keys`.
fn write_keys(path: &Path, keys: &[NodePublic]) {
    let mut text = String::from("# who may connect\n\n");
    for (i, k) in keys.iter().enumerate() {
        text.push_str(&format!("{k}  # device {i}\n"));
    }
    // Written whole and renamed into place, as editors and config tools do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Logs in over plain HTTP as `key`; `Err` if the login does not complete.
fn login(addr: SocketAddr, key: NodePrivate, json: &[u8]) -> Result<DerpClient, String> {
    DerpClient::try_connect_with(addr, key, json)
}

/// An in-process server with these admission checks and, if given, a mesh key.
fn start_with(admission: AdmissionConfig, mesh_key: Option<[u8; 32]>) -> derpd::server::Server {
    let mut cfg = Config::dev_loopback();
    cfg.admission = admission;
    cfg.mesh_key = mesh_key;
    inproc::start(cfg)
}
