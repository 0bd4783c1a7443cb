//! Shared by the test binaries that run derpd as a process against Tailscale's Go code
//! (`tests/interop.rs`, `tests/mesh.rs`): building the Go harness, starting derpd (or derper) and
//! reading its log, running the harness with a deadline; and, for whole Tailscale nodes, running
//! a test in a network namespace of its own with a detector for anything sent beyond loopback
//! (`run_in_netns`, `Strays`).
//!
//! The log lines derpd prints are the contract with this file:
//! - `serving on <addr> (TLS)` or `serving on <addr> (plain HTTP)`
//! - `STUN listening on <addr>`
//! - with a generated certificate: the `DERPMap` node JSON containing `"CertName":"sha256-raw:<64 hex>"`,
//!   then [`HEADSCALE_HEADER`] and the YAML file's lines (`regions:` and indented lines), then
//!   [`POLICY_HEADER`] and the policy file snippet's lines (up to a line `}`)
//! - per DERP login, at debug level: `fast-start: true` or `fast-start: false`, and
//!   `websocket: true` or `websocket: false`
//!
//! Without Go the tests print `SKIPPED` and pass, except under `CI=true`, where they fail.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long derpd may take to print its start-up lines.
pub(crate) const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// How long one harness run may take (the harness has its own 28 s watchdog).
pub(crate) const HARNESS_DEADLINE: Duration = Duration::from_secs(45);
/// How long derpd's login log lines may lag behind the harness finishing.
pub(crate) const LOG_LAG_DEADLINE: Duration = Duration::from_secs(5);

pub(crate) fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Prints a SKIPPED line where a person will see it (captured or not), or fails under CI.
pub(crate) fn skip(reason: &str) {
    assert!(
        !ci(),
        "{reason}, and CI=true: the interop tests must run in CI"
    );
    let line = format!("SKIPPED: {reason}; interop tests did not run");
    println!("{line}");
    // Straight to fd 2, not eprintln!: libtest captures the print macros, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// [`skip`] for a test that needs something other than Go from the host: a SKIPPED line
/// saying that `what` did not run, or a failure under CI.
pub(crate) fn skip_test(reason: &str, what: &str) {
    assert!(!ci(), "{reason}, and CI=true: {what} must run in CI");
    let line = format!("SKIPPED: {reason}; {what} did not run");
    println!("{line}");
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A program from PATH, or from the sbin and bin directories (often not on a user's PATH).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    let Ok(meta) = p.metadata() else { return false };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// `go` from PATH, then /usr/local/go/bin/go.
pub(crate) fn find_go() -> Option<PathBuf> {
    let name = if cfg!(windows) { "go.exe" } else { "go" };
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p));
    from_path.or_else(|| {
        let p = PathBuf::from("/usr/local/go/bin/go");
        is_executable(&p).then_some(p)
    })
}

/// Builds the harness once per test process. `None` means "skip" (no Go, not under CI).
pub(crate) fn harness() -> Option<PathBuf> {
    static HARNESS: OnceLock<Option<Result<PathBuf, String>>> = OnceLock::new();
    let built = HARNESS.get_or_init(|| {
        let go = find_go()?;
        Some(build_harness(&go))
    });
    match built {
        None => {
            skip("go not found");
            None
        }
        Some(Ok(p)) => Some(p.clone()),
        Some(Err(e)) => panic!("building the Go interop harness failed:\n{e}"),
    }
}

pub(crate) fn build_harness(go: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("derp-interop");
    let mut cmd = Command::new(go);
    // ts_debug_websockets compiles in derphttp's WebSocket dialer; it is only used when
    // TS_DEBUG_DERP_WS_CLIENT=1 is set (run_harness_env), so the other tests are unaffected.
    cmd.args([
        "build",
        "-buildvcs=false",
        "-tags",
        "ts_debug_websockets",
        "-o",
    ])
    .arg(&out)
    .arg(".")
    .current_dir(&src)
    // Use the installed Go; never download a toolchain.
    .env("GOTOOLCHAIN", "local")
    .stdin(Stdio::null());
    let no_home =
        std::env::var_os("HOME").is_none() && std::env::var_os("XDG_CACHE_HOME").is_none();
    if no_home && std::env::var_os("GOCACHE").is_none() {
        cmd.env(
            "GOCACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-build-cache"),
        );
    }
    // The first build fetches tailscale.com from the module proxy: just wait for it.
    let output = cmd
        .output()
        .map_err(|e| format!("running {} build: {e}", go.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} build -o {} . (in {}) exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            go.display(),
            out.display(),
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    Ok(out)
}

/// A fresh, not yet existing path under the Cargo test tmp dir.
pub(crate) fn fresh_path(test: &str, leaf: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("interop-{test}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    base.join(leaf)
}

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

pub(crate) fn spawn_line_reader(r: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
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

/// A command that runs this test binary again (a child test): through `DERPD_TEST_RUNNER` when
/// the binary is the target's (`scripts/cross-test.sh` runs the test binaries themselves under
/// qemu-user), directly when it is native (`scripts/build-release.sh` runs native test binaries
/// against a cross-built derpd, with the runner set for derpd alone). Native means: the same
/// ELF machine as `/bin/sh`.
pub(crate) fn this_test_binary() -> Command {
    fn machine(p: &Path) -> Option<[u8; 2]> {
        let mut head = [0u8; 20];
        std::fs::File::open(p).ok()?.read_exact(&mut head).ok()?;
        Some([head[18], head[19]])
    }
    let exe = std::env::current_exe().unwrap();
    if machine(&exe).is_some() && machine(&exe) == machine(Path::new("/bin/sh")) {
        Command::new(exe)
    } else {
        through_runner(exe)
    }
}

/// A command for a target binary (derpd, or this test binary itself), run through
/// `DERPD_TEST_RUNNER` (qemu-user for cross builds) when that is set.
pub(crate) fn through_runner(exe: impl AsRef<std::ffi::OsStr>) -> Command {
    let runner = std::env::var("DERPD_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let Some(first) = words.next() else {
        return Command::new(exe);
    };
    let mut cmd = Command::new(first);
    cmd.args(words).arg(exe);
    cmd
}

/// `cmd` in a network namespace of its own with only `lo` up (`unshare --net`; needs root), where
/// it may bind fixed ports such as 443 without touching the host's. `nsenter -t <pid> -n` runs
/// a client beside it.
pub(crate) fn in_new_netns(cmd: &Command) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$@\"",
        "sh",
    ])
    .arg(cmd.get_program())
    .args(cmd.get_args());
    c
}

/// Whether [`in_new_netns`] works here.
pub(crate) fn can_unshare_net() -> Result<(), String> {
    let out = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", "ip link set lo up"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "unshare --net: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
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

/// Runs a command (with `env` added to its environment) to completion, killing it after
/// `timeout`. Returns (status or None if killed, stdout, stderr).
pub(crate) fn run_bounded(
    cmd: &Path,
    args: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<ExitStatus>, String, String) {
    let mut child = Command::new(cmd)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", cmd.display()));
    let (tx, rx) = mpsc::channel();
    for (i, mut r) in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send((i, String::from_utf8_lossy(&buf).into_owned()));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut out = [String::new(), String::new()];
    let mut killed = false;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((i, s)) = rx.recv_timeout(left) else {
            killed = true;
            let _ = child.kill();
            break;
        };
        out[i] = s;
    }
    let status = child.wait().ok();
    let [stdout, stderr] = out;
    if killed {
        let stderr = format!("{stderr}\n[killed: still running after {timeout:?}]");
        return (None, stdout, stderr);
    }
    (status, stdout, stderr)
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

/// `derp-interop relay` arguments: `clients` Tailscale clients to 127.0.0.1:`port` over TLS,
/// trusting the certificate through its `sha256-raw:` pin.
pub(crate) fn pinned_relay_args(clients: usize, port: u16, pin: String) -> Vec<String> {
    vec![
        s("relay"),
        s("-clients"),
        clients.to_string(),
        s("-host"),
        s("127.0.0.1"),
        s("-port"),
        port.to_string(),
        s("-pin"),
        pin,
    ]
}

pub(crate) fn s(v: &str) -> String {
    v.to_string()
}

/// derpd's arguments for a plain-HTTP dev server on 127.0.0.1:0 without STUN, then `extra`.
pub(crate) fn dev_loopback_args(extra: &[String]) -> Vec<String> {
    let mut args = ["--dev", "-a", "127.0.0.1:0", "--stun-port", "0"]
        .map(s)
        .to_vec();
    args.extend_from_slice(extra);
    args
}

/// The `tailscale.com` version `tests/interop/go.mod` pins.
pub(crate) fn pinned_tailscale_version() -> String {
    let gomod = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/go.mod");
    let text = std::fs::read_to_string(&gomod).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("tailscale.com "))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no tailscale.com requirement in {}", gomod.display()))
}

/// Tailscale's real `derper` at the pinned version (`go install`, once per test process).
/// `None` means skip (no Go, not under CI).
pub(crate) fn derper() -> Option<PathBuf> {
    static DERPER: OnceLock<Option<Result<PathBuf, String>>> = OnceLock::new();
    let built = DERPER.get_or_init(|| {
        let go = find_go()?;
        let bindir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gobin");
        let version = pinned_tailscale_version();
        let out = Command::new(&go)
            .args(["install", &format!("tailscale.com/cmd/derper@{version}")])
            .env("GOBIN", &bindir)
            .env("GOTOOLCHAIN", "local")
            .stdin(Stdio::null())
            .output();
        Some(match out {
            Ok(o) if o.status.success() => Ok(bindir.join("derper")),
            Ok(o) => Err(format!(
                "go install tailscale.com/cmd/derper@{version}: {}\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!("running {}: {e}", go.display())),
        })
    });
    match built {
        None => {
            skip("go not found");
            None
        }
        Some(Ok(p)) => Some(p.clone()),
        Some(Err(e)) => panic!("installing derper failed:\n{e}"),
    }
}

/// A free loopback TCP port: bound to port 0, then released. For servers that must know each
/// other's address before either starts (a mesh), or that restart on the same address.
pub(crate) fn reserve_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Waits (bounded) until something accepts TCP connections on `addr`. derper logs "serving on"
/// before it listens, so its log cannot tell.
pub(crate) fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "nothing listening on {addr} after {timeout:?}: {e}"
                ))
            }
            // Refused at once: the listener is not up yet; try again shortly.
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Whole Tailscale nodes in a network namespace of the test's own, with a stray-packet detector.

/// The tun device in [`run_in_netns`]'s namespace that everything beyond loopback is routed to.
pub(crate) const STRAYS_DEV: &str = "strays";

/// Set-up of the namespace, run by `sh` as root of a new user namespace (the caller mapped to
/// root) that owns new network and mount namespaces. Only loopback is up, plus `strays`: a tun
/// device that the default routes (IPv4 and, where the kernel has it, IPv6; no gateway, so
/// Tailscale's port mapper finds no router to probe) and the resolver (a bind-mounted
/// resolv.conf naming 192.0.2.53, one try per query: the detector's own DNS probe must not be
/// sent again after its self-test) point at. A packet for anywhere but loopback ends up there,
/// where `derp-interop strays` reads it, rather than failing unseen with "network
/// unreachable". No link-local address on it, so the kernel sends nothing there by itself.
const NETNS_SETUP: &str = r#"set -eu
ip link set lo up
ip tuntap add dev strays mode tun
ip addr add 192.0.2.2/32 dev strays
if [ -d /proc/sys/net/ipv6/conf/strays ]; then
  echo 1 > /proc/sys/net/ipv6/conf/strays/addr_gen_mode
  ip -6 addr add 2001:db8::2/128 dev strays nodad
fi
ip link set strays up
ip route add default dev strays
if [ -d /proc/sys/net/ipv6/conf/strays ]; then ip -6 route add default dev strays; fi
printf 'nameserver 192.0.2.53\noptions timeout:1 attempts:1\n' > "$DERPD_NETNS_RESOLV"
mount --bind "$DERPD_NETNS_RESOLV" /etc/resolv.conf
exec "$@"
"#;

/// Whether `name` is an executable on PATH.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| is_executable(&dir.join(name))))
}

/// Why [`run_in_netns`] cannot run here, if it cannot.
fn netns_unavailable() -> Option<String> {
    for tool in ["unshare", "ip", "mount"] {
        if !on_path(tool) {
            return Some(format!("no `{tool}` on PATH (util-linux, iproute2)"));
        }
    }
    // The namespace's root is the caller's own uid outside: the same access to the device.
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    if let Err(e) = tun {
        return Some(format!("cannot open /dev/net/tun: {e}"));
    }
    let probe = Command::new("unshare")
        .args(["--map-root-user", "--net", "--mount", "--", "true"])
        .stdin(Stdio::null())
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "cannot make namespaces (unshare --map-root-user --net --mount: {}: {})",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("running unshare: {e}")),
    }
}

/// Runs this test binary's ignored test `child` inside new user, network and mount namespaces
/// set up by [`NETNS_SETUP`], with `variant` in `DERPD_NETNS_CHILD` and the harness's path in
/// `DERPD_NETNS_HARNESS` (built out here: there is no module proxy in there). Prints and returns
/// the child's output; panics if it failed or ran past `timeout`. `None`: skipped (no
/// namespaces here, not under CI).
pub(crate) fn run_in_netns(
    test: &str,
    child: &str,
    variant: &str,
    harness: &Path,
    timeout: Duration,
) -> Option<String> {
    if let Some(why) = netns_unavailable() {
        skip(&why);
        return None;
    }
    let resolv = fresh_path(test, "resolv.conf");
    // Through qemu-user when cross-testing: the test binary is the target's.
    let inner = this_test_binary();
    let mut args: Vec<String> = [
        "--map-root-user",
        "--net",
        "--mount",
        "--",
        "sh",
        "-c",
        NETNS_SETUP,
        "sh",
    ]
    .map(s)
    .into();
    args.push(inner.get_program().to_string_lossy().into_owned());
    args.extend(inner.get_args().map(|a| a.to_string_lossy().into_owned()));
    args.extend(
        [
            "--exact",
            child,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]
        .map(s),
    );
    let started = Instant::now();
    let (status, stdout, stderr) = run_bounded(
        Path::new("unshare"),
        &args,
        &[
            ("DERPD_NETNS_CHILD", variant),
            ("DERPD_NETNS_HARNESS", &harness.display().to_string()),
            ("DERPD_NETNS_RESOLV", &resolv.display().to_string()),
        ],
        timeout,
    );
    let out = format!("{stdout}\n{stderr}");
    println!(
        "{out}\n[{test}: the namespaced child took {:?}]",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(resolv.parent().unwrap());
    match status {
        Some(st) if st.success() => {}
        Some(st) => panic!("{test}: the child test in its namespace failed ({st}):\n{out}"),
        None => panic!("{test}: the child test in its namespace ran past {timeout:?}:\n{out}"),
    }
    assert!(
        out.contains("test result: ok. 1 passed"),
        "{test}: the child test did not run:\n{out}"
    );
    Some(out)
}

/// In a [`run_in_netns`] child: (variant, harness), or `None` when run any other way.
pub(crate) fn netns_child() -> Option<(String, PathBuf)> {
    let variant = std::env::var("DERPD_NETNS_CHILD").ok()?;
    let harness = std::env::var_os("DERPD_NETNS_HARNESS")?;
    Some((variant, PathBuf::from(harness)))
}

/// `derp-interop strays`, started first in a [`run_in_netns`] child: it checks that it sees
/// probes sent beyond loopback, then watches [`STRAYS_DEV`] until [`Strays::finish`].
pub(crate) struct Strays {
    child: Child,
    lines: Receiver<String>,
    out: Vec<String>,
}

impl Drop for Strays {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Strays {
    pub(crate) fn start(harness: &Path) -> Strays {
        let mut child = Command::new(harness)
            .args(["strays", "-strays", STRAYS_DEV])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        spawn_line_reader(child.stdout.take().unwrap(), tx.clone());
        spawn_line_reader(child.stderr.take().unwrap(), tx);
        let mut w = Strays {
            child,
            lines: rx,
            out: Vec::new(),
        };
        if !w.read_until(STARTUP_DEADLINE, |l| l == "INFO strays: watching") {
            panic!(
                "derp-interop strays did not start watching:\n{}",
                w.out.join("\n")
            );
        }
        w
    }

    /// Reads lines until one satisfies `stop` (true) or the output ends or `within` passes
    /// (false).
    fn read_until(&mut self, within: Duration, stop: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                return false;
            };
            let hit = stop(&line);
            self.out.push(line);
            if hit {
                return true;
            }
        }
    }

    /// Ends the watch: `Err` with the detector's output if anything left loopback meanwhile.
    pub(crate) fn finish(mut self) -> Result<String, String> {
        drop(self.child.stdin.take()); // EOF: the detector reads what is queued and reports
        self.read_until(STARTUP_DEADLINE, |_| false);
        let status = self.child.wait();
        let out = self.out.join("\n");
        match status {
            Ok(st) if st.success() && out.contains("PASS strays: nothing left loopback") => Ok(out),
            Ok(st) => Err(format!("derp-interop strays: {st}\n{out}")),
            Err(e) => Err(format!("derp-interop strays: {e}\n{out}")),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub(crate) fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// A variable of `openwrt/Makefile` (`NAME:=value`, indented or not).
pub(crate) fn makefile_var(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openwrt/Makefile");
    let text = std::fs::read_to_string(path).unwrap();
    let prefix = format!("{name}:=");
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("openwrt/Makefile has no {name}"))
        .to_string()
}

/// The lines of a `define Package/<what>` … `endef` block of `openwrt/Makefile`.
pub(crate) fn makefile_define(what: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openwrt/Makefile");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip_while(|l| *l != format!("define Package/{what}"))
        .skip(1)
        .take_while(|l| *l != "endef")
        .map(str::to_string)
        .collect()
}

/// Where `scripts/build-packages.sh` left the packages (`DERPD_PACKAGES_DIR`, else `dist/`).
pub(crate) fn packages_dir() -> PathBuf {
    std::env::var_os("DERPD_PACKAGES_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("dist"),
        PathBuf::from,
    )
}

/// True when derpd (and this test binary) run under qemu-user (scripts/cross-test.sh sets
/// `DERPD_TEST_RUNNER`): everything is tens of times slower there.
pub(crate) fn under_qemu() -> bool {
    std::env::var_os("DERPD_TEST_RUNNER").is_some()
}
