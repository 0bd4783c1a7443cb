//! Network namespaces: a command in one of its own with only loopback up, and whole Tailscale
//! nodes in one with a detector for anything sent beyond loopback (`run_in_netns`, `Strays`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use super::derpd::STARTUP_DEADLINE;
use super::host::{
    fresh_path, is_executable, run_bounded, s, skip, spawn_line_reader, this_test_binary,
};

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

/// Runs this test binary's ignored test `child` (its full name: [`super::child_test`]) inside
/// new user, network and mount namespaces set up by [`NETNS_SETUP`], with `variant` in
/// `DERPD_NETNS_CHILD` and the harness's path in `DERPD_NETNS_HARNESS` (built out here: there
/// is no module proxy in there). Prints and returns
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
