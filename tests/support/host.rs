//! The host the tests run on: CI or not and skipping, programs on PATH, fresh paths, running a
//! command with a deadline, this test binary again (a child test), ports, rlimits, QEMU.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Runs this test binary's ignored test `test` of `module` (the caller's `module_path!()`) as a
/// child test, alone in its process, with `env` added: its exit status and its output (stdout,
/// then stderr).
pub(crate) fn run_child_test(
    module: &str,
    test: &str,
    env: &[(&str, &OsStr)],
) -> (ExitStatus, String) {
    let child = super::child_test(module, test);
    let out = this_test_binary()
        .args(["--exact", child.as_str(), "--ignored", "--nocapture"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// A command for a target binary (derpd, or this test binary itself), run through
/// `DERPD_TEST_RUNNER` (qemu-user for cross builds) when that is set.
pub(crate) fn through_runner(exe: impl AsRef<OsStr>) -> Command {
    let runner = std::env::var("DERPD_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let Some(first) = words.next() else {
        return Command::new(exe);
    };
    let mut cmd = Command::new(first);
    cmd.args(words).arg(exe);
    cmd
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

pub(crate) fn s(v: &str) -> String {
    v.to_string()
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

/// True when derpd (and this test binary) run under qemu-user (scripts/cross-test.sh sets
/// `DERPD_TEST_RUNNER`): everything is tens of times slower there.
pub(crate) fn under_qemu() -> bool {
    std::env::var_os("DERPD_TEST_RUNNER").is_some()
}
