//! derpd as a process: starting it (through the cross runner when set), reading its log, and
//! the log lines that are the contract with these tests:
//! - `serving on <addr> (TLS)` or `serving on <addr> (plain HTTP)`
//! - `STUN listening on <addr>`
//! - with a generated certificate: the `DERPMap` node JSON containing `"CertName":"sha256-raw:<64 hex>"`,
//!   then [`HEADSCALE_HEADER`] and the YAML file's lines (`regions:` and indented lines), then
//!   [`POLICY_HEADER`] and the policy file snippet's lines (up to a line `}`)
//! - per DERP login, at debug level: `fast-start: true` or `fast-start: false`, and
//!   `websocket: true` or `websocket: false`

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::go::HARNESS_DEADLINE;
use super::host::{run_bounded, s, spawn_line_reader, through_runner};

/// How long derpd may take to print its start-up lines.
pub(crate) const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// How long derpd's login log lines may lag behind the harness finishing.
pub(crate) const LOG_LAG_DEADLINE: Duration = Duration::from_secs(5);

/// Whether the serving address was announced as TLS or plain HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Tls,
    PlainHttp,
}

/// What derpd announced at start-up.
#[derive(Debug)]
pub(crate) struct Startup {
    pub(crate) addr: SocketAddr,
    pub(crate) mode: Mode,
    pub(crate) stun: SocketAddr,
    pub(crate) pin: Option<String>,
}

/// A running derpd, killed on drop, with its output (stderr and stdout) read line by line.
pub(crate) struct Derpd {
    pub(crate) child: Child,
    pub(crate) lines: Receiver<String>,
    /// Every line read so far.
    pub(crate) log: Vec<String>,
    /// Transcript of harness runs, for failure messages.
    pub(crate) transcript: String,
}

impl Drop for Derpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The derpd binary (`DERPD_TEST_BIN` if set, else this build's), run through `DERPD_TEST_RUNNER`
/// when that is set (a command and its arguments, split at whitespace). `scripts/cross-test.sh`
/// sets the runner to qemu-user, so the cross-built derpd runs under QEMU while Tailscale's client
/// (the Go harness) runs natively; `scripts/build-release.sh` also points `DERPD_TEST_BIN` at the
/// release binary it is about to ship.
pub(crate) fn derpd_command() -> Command {
    let exe =
        std::env::var_os("DERPD_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_derpd").into());
    through_runner(exe)
}

impl Derpd {
    pub(crate) fn start(args: &[String]) -> Derpd {
        Self::start_command(derpd_command(), args)
    }

    /// Starts any server command (derpd, or derper for the mixed-region tests).
    pub(crate) fn start_command(mut cmd: Command, args: &[String]) -> Derpd {
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawning {shown}: {e} (a cross-built derpd needs DERPD_TEST_RUNNER, \
                     e.g. qemu-mipsel-static; scripts/cross-test.sh sets it)"
                )
            });
        let (tx, rx) = mpsc::channel();
        spawn_line_reader(child.stderr.take().unwrap(), tx.clone());
        spawn_line_reader(child.stdout.take().unwrap(), tx);
        Derpd {
            child,
            lines: rx,
            log: Vec::new(),
            transcript: format!("{shown} {}\n", args.join(" ")),
        }
    }

    /// Panics with everything known: the reason, the harness transcript and derpd's log.
    pub(crate) fn fail(&mut self, reason: &str) -> ! {
        self.drain();
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("derpd exited: {s}"),
            Ok(None) => "derpd still running".to_string(),
            Err(e) => format!("derpd status unknown: {e}"),
        };
        panic!(
            "{reason}\n\n===== harness transcript =====\n{}\n===== derpd log ({status}, {} lines) =====\n{}\n",
            self.transcript,
            self.log.len(),
            self.log.join("\n")
        );
    }

    /// Reads whatever lines are already available.
    pub(crate) fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    /// Reads lines until `done(&log)` is true or the deadline passes.
    pub(crate) fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[String]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        self.drain();
        while !done(&self.log) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Timeout) => self.fail(&format!(
                    "derpd: timed out after {timeout:?} waiting for {what}"
                )),
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    self.fail(&format!(
                        "derpd: output closed (process exited?) while waiting for {what}"
                    ))
                }
            }
        }
    }

    pub(crate) fn startup(&mut self, want_pin: bool) -> Startup {
        let what = if want_pin {
            "the `serving on`, `STUN listening on` and `\"CertName\":\"sha256-raw:` lines"
        } else {
            "the `serving on` and `STUN listening on` lines"
        };
        self.wait_until(what, STARTUP_DEADLINE, |log| {
            log.iter().any(|l| l.contains("serving on "))
                && log.iter().any(|l| l.contains("STUN listening on "))
                && (!want_pin || log.iter().any(|l| l.contains("\"CertName\":\"sha256-raw:")))
        });
        let serving = self.log.iter().find_map(|l| parse_serving(l));
        let Some((addr, mode)) = serving.clone().and_then(Result::ok) else {
            let why = match serving {
                Some(Err(e)) => e,
                _ => "no `serving on` line".into(),
            };
            self.fail(&format!("derpd: bad `serving on` line: {why}"))
        };
        let stun = self.log.iter().find_map(|l| parse_stun(l));
        let Some(stun) = stun.clone().and_then(Result::ok) else {
            let why = match stun {
                Some(Err(e)) => e,
                _ => "no `STUN listening on` line".into(),
            };
            self.fail(&format!("derpd: bad `STUN listening on` line: {why}"))
        };
        let pin = if want_pin {
            let pin = self.log.iter().find_map(|l| parse_pin(l));
            match pin {
                Some(Ok(p)) => Some(p),
                Some(Err(e)) => self.fail(&format!("derpd: bad CertName line: {e}")),
                None => self.fail("derpd: no CertName line"),
            }
        } else {
            None
        };
        Startup {
            addr,
            mode,
            stun,
            pin,
        }
    }

    /// Runs the harness with `args`; fails unless it exits 0. Returns its stdout.
    pub(crate) fn run_harness(&mut self, harness: &Path, args: &[String]) -> String {
        self.run_harness_env(harness, args, &[])
    }

    /// [`Derpd::run_harness`] with extra environment variables for the harness.
    pub(crate) fn run_harness_env(
        &mut self,
        harness: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> String {
        let (status, stdout, stderr) = run_bounded(harness, args, env, HARNESS_DEADLINE);
        let shown_env: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        let record = format!(
            "$ {shown_env}derp-interop {}\n--- exit: {}\n--- stdout\n{}\n--- stderr\n{}\n",
            args.join(" "),
            status.map_or("killed after timeout".to_string(), |s| s.to_string()),
            stdout,
            stderr
        );
        println!("{record}");
        self.transcript.push_str(&record);
        if status.is_none_or(|s| !s.success()) {
            self.fail(&format!("derp-interop {} failed", args.join(" ")));
        }
        stdout
    }

    /// Checks the harness's own view (its `INFO` lines) of whether each client fast-started.
    pub(crate) fn expect_client_fast_start(
        &mut self,
        relay_stdout: &str,
        expected: bool,
        clients: usize,
    ) {
        let want = format!("client fast start: {expected}");
        let n = relay_stdout.lines().filter(|l| l.contains(&want)).count();
        if n != clients {
            self.fail(&format!(
                "harness reported `{want}` for {n} clients, want {clients}"
            ));
        }
    }

    /// Counts `fast-start: true` / `fast-start: false` lines, waiting (bounded) for at least
    /// `want` of the expected kind, then asserts none of the other kind.
    pub(crate) fn expect_fast_start(&mut self, expected: bool, want: usize) {
        self.expect_login_flag("fast-start", expected, want);
    }

    /// Counts `websocket: true` / `websocket: false` login lines, waiting (bounded) for at least
    /// `want` of the expected kind, then asserts none of the other kind.
    pub(crate) fn expect_websocket(&mut self, expected: bool, want: usize) {
        self.expect_login_flag("websocket", expected, want);
    }

    /// Counts `<flag>: true` / `<flag>: false` lines of derpd's login log, waiting (bounded) for
    /// at least `want` of the expected kind, then asserts none of the other kind.
    fn expect_login_flag(&mut self, flag: &str, expected: bool, want: usize) {
        let yes = format!("{flag}: {expected}");
        let no = format!("{flag}: {}", !expected);
        let (yes, no) = (yes.as_str(), no.as_str());
        // Stops early on a line of the wrong kind, which fails below.
        self.wait_until(&format!("{want} `{yes}` lines"), LOG_LAG_DEADLINE, |log| {
            log.iter().filter(|l| l.contains(yes)).count() >= want
                || log.iter().any(|l| l.contains(no))
        });
        self.drain();
        let wrong = self.log.iter().filter(|l| l.contains(no)).count();
        if wrong != 0 {
            self.fail(&format!("derpd logged {wrong} `{no}` lines, want none"));
        }
    }

    /// Waits (bounded) for derpd to exit and returns its status.
    /// `--tls-ciphers` as Tailscale's client met it: derpd's start-up line says which suites
    /// it puts first (`TLS cipher suites: … first`), and each of the first `want` TLS
    /// handshakes it logs (at debug level) must have negotiated one of those.
    pub(crate) fn expect_tls_suite(&mut self, want: usize) {
        let first = |log: &[String]| {
            log.iter().find_map(|l| {
                let (_, rest) = l.split_once("TLS cipher suites: ")?;
                Some(if rest.starts_with("ChaCha20") {
                    "CHACHA20_POLY1305"
                } else if rest.starts_with("AES-GCM") {
                    "AES_128_GCM"
                } else {
                    "client's order"
                })
            })
        };
        let shakes = |log: &[String]| log.iter().filter(|l| l.contains("TLS handshake: ")).count();
        self.wait_until(
            &format!("{want} TLS handshake lines"),
            LOG_LAG_DEADLINE,
            |log| first(log).is_some() && shakes(log) >= want,
        );
        let fragment = first(&self.log).unwrap_or_default();
        let bad: Vec<String> = self
            .log
            .iter()
            .filter(|l| l.contains("TLS handshake: ") && !l.contains(fragment))
            .cloned()
            .collect();
        if !bad.is_empty() {
            self.fail(&format!("TLS handshakes without {fragment}: {bad:?}"));
        }
    }

    pub(crate) fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return st,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => self.fail(&format!("derpd still running after {within:?}")),
                Err(e) => self.fail(&format!("derpd status: {e}")),
            }
        }
    }

    pub(crate) fn expect_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.fail(&format!("derpd exited during the test: {status}"));
        }
    }
}

/// The log line before the headscale `derp.paths` YAML file.
pub(crate) const HEADSCALE_HEADER: &str = "headscale: save as a YAML file listed in derp.paths:";

/// The log line before the tailnet policy file snippet.
pub(crate) const POLICY_HEADER: &str =
    "tailnet policy file (Tailscale SaaS): paste into its top-level object:";

/// The DERP map entry derpd logs for a self-signed IP certificate, in its three forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DerpMapSnippets {
    /// The node as one line of JSON (`{...}`, without the log prefix).
    pub(crate) node_json: String,
    /// The headscale YAML file, lines joined with `\n`, with a final newline.
    pub(crate) headscale_yaml: String,
    /// The tailnet policy file snippet (`{` ... `}`), with a final newline.
    pub(crate) policy: String,
}

/// The three forms from derpd's log; `None` until all of them are complete (the YAML ends at
/// the first line after it that is neither `regions:` nor indented, the policy snippet at a
/// line `}`).
pub(crate) fn parse_derp_map_snippets(log: &[String]) -> Option<DerpMapSnippets> {
    let node_line = log
        .iter()
        .find(|l| l.contains("\"CertName\":\"sha256-raw:"))?;
    let node_json = node_line[node_line.find('{')?..].to_string();
    let after = |header: &str| {
        let at = log.iter().position(|l| l.contains(header))?;
        Some(&log[at + 1..])
    };
    let rest = after(HEADSCALE_HEADER)?;
    let n = rest
        .iter()
        .position(|l| l != "regions:" && !l.starts_with(' '))?;
    let rest_p = after(POLICY_HEADER)?;
    let end = rest_p.iter().position(|l| l == "}")?;
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    Some(DerpMapSnippets {
        node_json,
        headscale_yaml: join(&rest[..n]),
        policy: join(&rest_p[..=end]),
    })
}

impl Derpd {
    /// Waits (bounded) for the DERP map entry's three forms and returns them.
    pub(crate) fn derp_map_snippets(&mut self) -> DerpMapSnippets {
        self.wait_until(
            "the node JSON line, the headscale YAML and the policy file snippet",
            STARTUP_DEADLINE,
            |log| parse_derp_map_snippets(log).is_some(),
        );
        let Some(s) = parse_derp_map_snippets(&self.log) else {
            unreachable!("waited for it")
        };
        if !s.headscale_yaml.starts_with("regions:\n") {
            self.fail(&format!(
                "derpd: the headscale YAML does not start with `regions:`: {:?}",
                s.headscale_yaml
            ));
        }
        s
    }
}

/// `... serving on 127.0.0.1:41234 (TLS)` → (addr, Tls).
pub(crate) fn parse_serving(line: &str) -> Option<Result<(SocketAddr, Mode), String>> {
    let rest = &line[line.find("serving on ")? + "serving on ".len()..];
    let Some((addr, tail)) = rest.split_once(' ') else {
        return Some(Err(format!(
            "no ` (TLS)`/` (plain HTTP)` after the address: {line:?}"
        )));
    };
    let mode = if tail.starts_with("(TLS)") {
        Mode::Tls
    } else if tail.starts_with("(plain HTTP)") {
        Mode::PlainHttp
    } else {
        return Some(Err(format!(
            "want ` (TLS)` or ` (plain HTTP)` after the address: {line:?}"
        )));
    };
    Some(
        addr.parse::<SocketAddr>()
            .map(|a| (a, mode))
            .map_err(|e| format!("address {addr:?}: {e}: {line:?}")),
    )
}

/// `... STUN listening on 127.0.0.1:39876` → addr.
pub(crate) fn parse_stun(line: &str) -> Option<Result<SocketAddr, String>> {
    let rest = &line[line.find("STUN listening on ")? + "STUN listening on ".len()..];
    let addr = rest.split_whitespace().next().unwrap_or("");
    Some(
        addr.parse::<SocketAddr>()
            .map_err(|e| format!("address {addr:?}: {e}: {line:?}")),
    )
}

/// `{"Name":...,"CertName":"sha256-raw:<64 hex>"}` → `sha256-raw:<64 hex>`.
pub(crate) fn parse_pin(line: &str) -> Option<Result<String, String>> {
    const KEY: &str = "\"CertName\":\"sha256-raw:";
    let rest = &line[line.find(KEY)? + KEY.len()..];
    let hex = rest.get(..64).unwrap_or("");
    let ok = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && rest[64..].starts_with('"');
    Some(if ok {
        Ok(format!("sha256-raw:{hex}"))
    } else {
        Err(format!("want 64 lowercase hex digits and `\"`: {line:?}"))
    })
}

/// The address to dial for a listening address: an unspecified IP becomes the loopback of the
/// wanted family.
pub(crate) fn dial_addr(listen: SocketAddr, v6: bool) -> SocketAddr {
    if listen.ip().is_unspecified() {
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        SocketAddr::new(ip, listen.port())
    } else {
        listen
    }
}

/// derpd's arguments for a plain-HTTP dev server on 127.0.0.1:0 without STUN, then `extra`.
pub(crate) fn dev_loopback_args(extra: &[String]) -> Vec<String> {
    let mut args = ["--dev", "-a", "127.0.0.1:0", "--stun-port", "0"]
        .map(s)
        .to_vec();
    args.extend_from_slice(extra);
    args
}
