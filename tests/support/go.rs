//! Tailscale's Go code: finding Go, building the harness (`tests/interop/`, `derp-interop`) and
//! installing the real `derper` at the pinned version. Without Go the tests print `SKIPPED` and
//! pass, except under `CI=true`, where they fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::host::{is_executable, s, skip};

/// How long one harness run may take (the harness has its own 28 s watchdog).
pub(crate) const HARNESS_DEADLINE: Duration = Duration::from_secs(45);

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
