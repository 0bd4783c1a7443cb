//! The packages: the OpenWrt init script, the built `.ipk` and `.deb` files, and installing the
//! `.deb` on this machine.
//!
//! - `init_*`: `openwrt/files/derpd.init` run by a POSIX shell (dash, and busybox ash as on
//!   OpenWrt) against `tests/packaging/openwrt-stub.sh`, a stand-in for rc.common, the UCI
//!   functions and procd. Each UCI config must become the right procd instance, and its
//!   command line must be one derpd itself accepts (parsed by derpd's own `config` module, and
//!   in one test run as a relay that Tailscale's client uses).
//! - `ipk_*`, `deb_*` (ignored by plain `cargo test`: they need the packages):
//!   `scripts/build-packages.sh` builds them from the release binaries and runs these with
//!   `--include-ignored` on `DERPD_PACKAGES_DIR` (default `dist/`). `deb_installs_*` runs
//!   `dpkg -i` for real and needs root; under `CI=true` nothing here may be skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{
    ci, fresh_path, makefile_define, makefile_var, packages_dir, run_bounded, s, skip, Derpd,
};
use argh::FromArgs;
use derpd::config::{normalize_args, Args, Config};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SHIPPED_UCI: &str = include_str!("../../openwrt/files/derpd.config");
const SHELL_DEADLINE: Duration = Duration::from_secs(20);

fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

fn cargo_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

// ---------------------------------------------------------------------------------------------
// The init script under a stub of OpenWrt's shell environment.

/// The shells to run the init script with: dash (POSIX), and busybox ash (OpenWrt's own shell)
/// when installed (`.ci/run` installs it; under CI it must be there).
fn shells() -> Vec<Vec<String>> {
    let mut out = vec![vec![s("dash")]];
    if Command::new("busybox").arg("true").output().is_ok() {
        out.push(vec![s("busybox"), s("sh")]);
    } else {
        assert!(
            !ci(),
            "busybox is missing, and CI=true: the init script must be run by busybox ash"
        );
        eprintln!("NOTE: busybox not installed; the init script ran under dash only");
    }
    out
}

/// The shipped `/etc/config/derpd` with `uci set` edits and `uci add_list` entries applied.
fn uci(set: &[(&str, &str)], lists: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = SHIPPED_UCI.lines().map(str::to_string).collect();
    for (name, value) in set {
        let line = format!("\toption {name} '{value}'");
        let prefix = format!("\toption {name} ");
        match lines.iter_mut().find(|l| l.starts_with(&prefix)) {
            Some(l) => *l = line,
            None => lines.push(line),
        }
    }
    for (name, value) in lists {
        lines.push(format!("\tlist {name} '{value}'"));
    }
    lines.join("\n") + "\n"
}

#[derive(Debug)]
struct InitRun {
    shell: String,
    status: i32,
    /// procd's instance command.
    argv: Vec<String>,
    /// Every other record of the stub (see openwrt-stub.sh).
    records: Vec<String>,
    /// What the script sent to logger.
    log: String,
    stderr: String,
}

impl InitRun {
    fn has(&self, record: &str) -> bool {
        self.records.iter().any(|r| r == record)
    }

    fn expect(&self, record: &str) {
        assert!(
            self.has(record),
            "{}: no record {record:?} in {self:#?}",
            self.shell
        );
    }

    fn config(&self) -> Config {
        derpd_config(&self.argv).unwrap_or_else(|e| {
            panic!(
                "{}: derpd refuses the init script's command line: {e}\n{self:#?}",
                self.shell
            )
        })
    }
}

/// `/etc/init.d/derpd start` with `uci_text` as /etc/config/derpd; `ujail` says whether
/// procd-ujail is installed.
fn run_init(shell: &[String], uci_text: &str, ujail: bool) -> InitRun {
    let dir = fresh_path("init", "run");
    let uci_dir = dir.join("uci");
    let out = dir.join("out");
    std::fs::create_dir_all(&uci_dir).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(uci_dir.join("derpd"), uci_text).unwrap();
    let ujail_path = dir.join("ujail");
    if ujail {
        std::fs::write(&ujail_path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&ujail_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let stub = repo("tests/packaging/openwrt-stub.sh");
    let init = repo("openwrt/files/derpd.init");
    let script = r#". "$STUB" && . "$INIT" && rc_procd_start"#;
    let mut args: Vec<String> = shell[1..].to_vec();
    args.extend([s("-c"), s(script)]);
    let env = [
        ("STUB", stub.to_str().unwrap()),
        ("INIT", init.to_str().unwrap()),
        ("STUB_OUT", out.to_str().unwrap()),
        ("UCI_DIR", uci_dir.to_str().unwrap()),
        ("UJAIL", ujail_path.to_str().unwrap()),
        // The router's address on the network `lan` (network_get_ipaddr).
        ("STUB_NET_lan", "192.168.1.1"),
    ];
    let (status, _stdout, stderr) = run_bounded(Path::new(&shell[0]), &args, &env, SHELL_DEADLINE);
    let status = status.and_then(|s| s.code()).unwrap_or(-1);
    let procd = std::fs::read_to_string(out.join("procd")).unwrap_or_default();
    let mut argv = Vec::new();
    let mut records = Vec::new();
    for line in procd.lines() {
        match line.strip_prefix("command ") {
            Some(arg) => argv.push(arg.to_string()),
            None => records.push(line.to_string()),
        }
    }
    InitRun {
        shell: shell.join(" "),
        status,
        argv,
        records,
        log: std::fs::read_to_string(out.join("log")).unwrap_or_default(),
        stderr,
    }
}

/// [`run_init`] under every shell, each run expected to succeed.
fn started(uci_text: &str, ujail: bool) -> Vec<InitRun> {
    shells()
        .iter()
        .map(|shell| {
            let run = run_init(shell, uci_text, ujail);
            assert_eq!(run.status, 0, "{run:#?}");
            run
        })
        .collect()
}

/// derpd's own parsing of a command line (`argv[0]` is the program).
fn derpd_config(argv: &[String]) -> Result<Config, String> {
    let rest = argv.get(1..).ok_or("empty command")?;
    let normalized = normalize_args(rest)?;
    let refs: Vec<&str> = normalized.iter().map(String::as_str).collect();
    let args = Args::from_args(&["derpd"], &refs).map_err(|e| e.output)?;
    Config::from_args(&args)
}

fn enabled_with(set: &[(&str, &str)], lists: &[(&str, &str)]) -> String {
    let mut all = vec![("enabled", "1")];
    all.extend_from_slice(set);
    uci(&all, lists)
}

#[test]
fn init_plain_config_becomes_a_jailed_derpd_with_derpers_defaults() {
    let text = enabled_with(&[("hostname", "derp.example.com")], &[]);
    for run in started(&text, true) {
        let want: Vec<String> = [
            "/usr/sbin/derpd",
            "--config=/etc/derpd/derper.key",
            "--certdir=/etc/derpd/certs",
            "--hostname=derp.example.com",
            "--certmode=manual",
            "--addr=:3443",
            "--http-port=3080",
            "--public-port=443",
            "--stun-port=3478",
            "--log-level=info",
            "--buffer-budget-mib=16",
            "--threads=0",
            "--max-clients=512",
            "--max-handshakes=256",
            "--max-handshakes-per-ip=16",
            "--first-byte-timeout=3s",
            "--handshake-timeout=10s",
            "--login-timeout=10s",
            "--frame-timeout=10s",
            "--tcp-write-timeout=2s",
            "--tcp-keepalive-time=10m",
            "--tcp-user-timeout=15s",
            "--stun=true",
            "--derp=true",
            "--meta-cert=true",
            "--verify-clients=false",
            "--verify-client-url-fail-open=true",
        ]
        .map(s)
        .to_vec();
        assert_eq!(run.argv, want, "{}", run.shell);
        // The other values the shipped config spells out are derpd's defaults: the same Config
        // as a command line with only what the init script must give, the ports (beside
        // uhttpd's 80 and 443, dialled at 443 through the firewall's redirect) and the one
        // router-sized limit (--max-clients 512: 42 MiB at worst, README "Memory: a budget").
        let minimal = [
            "/usr/sbin/derpd",
            "--config=/etc/derpd/derper.key",
            "--certdir=/etc/derpd/certs",
            "--hostname=derp.example.com",
            "--certmode=manual",
            "--addr=:3443",
            "--http-port=3080",
            "--public-port=443",
            "--max-clients=512",
        ]
        .map(s);
        assert_eq!(
            format!("{:?}", run.config()),
            format!("{:?}", derpd_config(&minimal).unwrap()),
            "the shipped UCI values differ from derpd's defaults"
        );
        let tls = run.config().tls.expect("TLS");
        assert_eq!(tls.hostname, "derp.example.com");
        assert_eq!(tls.certdir, Path::new("/etc/derpd/certs"));
        for record in [
            "instance instance1",
            "mkdir -p /etc/derpd /etc/derpd/certs",
            "chmod 0700 /etc/derpd /etc/derpd/certs",
            "chown derpd:derpd /etc/derpd /etc/derpd/certs",
            "set respawn ",
            "set stdout 1",
            "set stderr 1",
            "set limits nofile=8192 8192",
            // A failed bind names the UCI option to change.
            "set env DERPD_UCI_SECTION=derpd.main",
            "set user derpd",
            "set group derpd",
            "set capabilities /etc/capabilities/derpd.json",
            "set no_new_privs 1",
            "jail derpd log procfs",
            "mount_rw /etc/derpd",
            "mount_rw /etc/derpd/certs",
            "close_instance",
            // `uci commit derpd` (through reload_config or LuCI) reloads the service.
            "trigger derpd",
            // The router's LAN address (for NAT reflection) when the network comes up or changes.
            "reload_interface_trigger lan",
        ] {
            run.expect(record);
        }
        assert!(
            run.has("json open_data"),
            "the firewall redirects are on by default"
        );
        let cfg = run.config();
        assert_eq!(cfg.public_port, Some(443));
        assert_eq!(cfg.listen.port(), 3443);
        assert_eq!(cfg.http_port, Some(3080));
        assert_eq!(run.log, "", "{}", run.shell);
    }
}

#[test]
fn init_self_signed_ip_config() {
    let text = enabled_with(&[("hostname", "192.168.1.1")], &[]);
    for run in started(&text, true) {
        assert!(run.argv.contains(&s("--hostname=192.168.1.1")));
        let tls = run.config().tls.expect("TLS");
        assert_eq!(
            tls.hostname.parse::<std::net::IpAddr>().ok(),
            Some([192, 168, 1, 1].into())
        );
        // derpd writes the self-signed certificate into certdir: it is mounted writable.
        run.expect("mount_rw /etc/derpd/certs");
    }
}

#[test]
fn init_mesh_config() {
    let dir = fresh_path("init-mesh", "keys");
    std::fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("mesh.key");
    std::fs::write(&psk, format!("{}\n", "5a".repeat(32))).unwrap();
    let text = enabled_with(
        &[
            ("hostname", "derp1.example.com"),
            ("mesh_psk_file", psk.to_str().unwrap()),
            // The mesh key beside the relay's key: the init script makes it derpd's.
            ("key_file", dir.join("derper.key").to_str().unwrap()),
        ],
        &[
            ("mesh_with", "derp2.example.com"),
            ("mesh_with", "derp3.example.com/10.0.0.3"),
        ],
    );
    for run in started(&text, true) {
        assert!(run.argv.contains(&s(
            "--mesh-with=derp2.example.com,derp3.example.com/10.0.0.3"
        )));
        assert!(run
            .argv
            .contains(&format!("--mesh-psk-file={}", psk.display())));
        let cfg = run.config();
        assert_eq!(cfg.mesh_key, Some([0x5a; 32]));
        let peers: Vec<(&str, &str)> = cfg
            .mesh_with
            .iter()
            .map(|p| (p.name.as_str(), p.dial_host.as_str()))
            .collect();
        assert_eq!(
            peers,
            [
                ("derp2.example.com", "derp2.example.com"),
                ("derp3.example.com", "10.0.0.3")
            ]
        );
        // The mesh key beside the relay's key: derpd's user owns it, and the jail shows it
        // through that directory (no second mount for the file).
        run.expect(&format!("chown derpd:derpd {}", psk.display()));
        run.expect(&format!("mount_rw {}", dir.display()));
        assert!(!run.has(&format!("mount_ro {}", psk.display())), "{run:#?}");
    }
}

#[test]
fn init_admission_config() {
    let dir = fresh_path("init-admission", "files");
    let ts = dir.join("tailscale");
    std::fs::create_dir_all(&ts).unwrap();
    let allow = dir.join("allow-keys");
    std::fs::write(&allow, "# none yet\n").unwrap();
    let socket = ts.join("tailscaled.sock");
    let text = enabled_with(
        &[
            ("hostname", "derp.example.com"),
            ("verify_clients", "1"),
            ("socket", socket.to_str().unwrap()),
            ("verify_client_url", "https://admission.example.com/check"),
            ("verify_client_url_fail_open", "0"),
            ("allow_keys_file", allow.to_str().unwrap()),
        ],
        &[],
    );
    for run in started(&text, true) {
        for flag in [
            s("--verify-clients=true"),
            format!("--socket={}", socket.display()),
            s("--verify-client-url=https://admission.example.com/check"),
            s("--verify-client-url-fail-open=false"),
            format!("--allow-keys-file={}", allow.display()),
        ] {
            assert!(
                run.argv.contains(&flag),
                "{}: no {flag} in {:?}",
                run.shell,
                run.argv
            );
        }
        let adm = run.config().admission;
        assert_eq!(adm.tailscaled_socket.as_deref(), Some(socket.as_path()));
        assert_eq!(
            adm.url.as_deref(),
            Some("https://admission.example.com/check")
        );
        assert!(!adm.fail_open);
        assert_eq!(adm.allow_keys_file.as_deref(), Some(allow.as_path()));
        // tailscaled's socket directory and the allow-keys file are visible in the jail.
        run.expect(&format!("mount_ro {}", ts.display()));
        run.expect(&format!("mount_ro {}", allow.display()));
        // Outside derpd's own directories, the admin's file keeps its owner.
        assert!(!run.has(&format!("chown derpd:derpd {}", allow.display())));
    }
}

/// A firewall rule the init script asks fw4 for through procd's data, as the stub records it.
fn fw_rule(name: &str, proto: &str, port: &str) -> Vec<String> {
    vec![
        s("json add_object "),
        s("json add_string type rule"),
        format!("json add_string name {name}"),
        s("json add_string src wan"),
        format!("json add_string proto {proto}"),
        format!("json add_string dest_port {port}"),
        s("json add_string target ACCEPT"),
        s("json close_object"),
    ]
}

/// A redirect from the wan zone: `public` to `port` on the router, at its address `lanip` in
/// zone `lan` (fw4 then reflects it for LAN clients) or, without one, to the router itself.
fn fw_redirect(name: &str, public: &str, port: &str, lanip: Option<&str>) -> Vec<String> {
    let mut r = vec![
        s("json add_object "),
        s("json add_string type redirect"),
        format!("json add_string name {name}"),
        s("json add_string src wan"),
        s("json add_string proto tcp"),
        format!("json add_string src_dport {public}"),
    ];
    if let Some(ip) = lanip {
        r.push(s("json add_string dest lan"));
        r.push(format!("json add_string dest_ip {ip}"));
    }
    r.extend([
        format!("json add_string dest_port {port}"),
        s("json add_string target DNAT"),
        s("json close_object"),
    ]);
    r
}

/// The stub's `json` records of a run.
fn json_records(run: &InitRun) -> Vec<String> {
    run.records
        .iter()
        .filter(|r| r.starts_with("json "))
        .cloned()
        .collect()
}

#[test]
fn init_firewall_rules_follow_the_ports() {
    let lan = Some("192.168.1.1");
    // (UCI edits, the firewall rules and redirects they must give, a warning in the log)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<Vec<String>>, &'a str);
    let cases: [Case<'_>; 7] = [
        // As shipped: beside uhttpd, the public ports redirected, reflected for the LAN.
        (
            vec![],
            vec![
                fw_redirect("derpd-derp", "443", "3443", lan),
                fw_redirect("derpd-http", "80", "3080", lan),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "",
        ),
        // uhttpd moved away: derpd on the public ports itself, ACCEPT rules.
        (
            vec![
                ("addr", ":443"),
                ("http_port", "80"),
                ("public_port", ""),
                ("public_http_port", ""),
            ],
            vec![
                fw_rule("derpd-derp", "tcp", "443"),
                fw_rule("derpd-http", "tcp", "80"),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "",
        ),
        // A public port equal to the listening port needs no redirect.
        (
            vec![
                ("addr", ":8443"),
                ("public_port", "8443"),
                ("http_port", "-1"),
                ("stun_port", "3479"),
            ],
            vec![
                fw_rule("derpd-derp", "tcp", "8443"),
                fw_rule("derpd-stun", "udp", "3479"),
            ],
            "",
        ),
        (
            vec![("stun", "0")],
            vec![
                fw_redirect("derpd-derp", "443", "3443", lan),
                fw_redirect("derpd-http", "80", "3080", lan),
            ],
            "",
        ),
        // No reflection: redirects to the router itself.
        (
            vec![("reflection_zone", "")],
            vec![
                fw_redirect("derpd-derp", "443", "3443", None),
                fw_redirect("derpd-http", "80", "3080", None),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "",
        ),
        // A reflection network without an address (yet): the same, and a warning.
        (
            vec![("reflection_zone", "guest")],
            vec![
                fw_redirect("derpd-derp", "443", "3443", None),
                fw_redirect("derpd-http", "80", "3080", None),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "no IPv4 address on network guest",
        ),
        // Firewall off: nothing asked for.
        (vec![("firewall", "0")], vec![], ""),
    ];
    for (extra, rules, warning) in cases {
        let mut set = vec![("hostname", "derp.example.com")];
        set.extend(extra.iter().copied());
        let text = enabled_with(&set, &[]);
        let want = if rules.is_empty() {
            vec![]
        } else {
            let mut w = vec![s("json open_data"), s("json add_array firewall")];
            w.extend(rules.into_iter().flatten());
            w.extend([s("json close_array"), s("json close_data")]);
            w
        };
        for run in started(&text, true) {
            assert_eq!(json_records(&run), want, "{}: {extra:?}", run.shell);
            // A reload when the reflection network changes, where there is one.
            let trigger =
                !extra.contains(&("firewall", "0")) && !extra.contains(&("reflection_zone", ""));
            let triggers: Vec<&String> = run
                .records
                .iter()
                .filter(|r| r.starts_with("reload_interface_trigger"))
                .collect();
            assert_eq!(triggers.len(), usize::from(trigger), "{run:#?}");
            assert_eq!(run.log.is_empty(), warning.is_empty(), "{run:#?}");
            assert!(run.log.contains(warning), "{run:#?}");
            run.config();
        }
    }
}

#[test]
fn init_refuses_what_cannot_run() {
    // Shipped as is: disabled, no instance.
    for shell in shells() {
        let run = run_init(&shell, SHIPPED_UCI, true);
        assert_eq!(run.status, 0, "{run:#?}");
        assert!(!run.has("instance instance1"), "{run:#?}");
        assert!(run.stderr.contains("derpd.main.enabled=1"), "{run:#?}");
        run.expect("trigger derpd");
    }
    let cases = [
        (enabled_with(&[], &[]), "set option hostname"),
        (
            enabled_with(&[("hostname", "derp.example.com"), ("stun", "maybe")], &[]),
            "option stun 'maybe' is not a boolean",
        ),
        (
            enabled_with(
                &[
                    ("hostname", "derp.example.com"),
                    ("key_file", "/etc/derper.key"),
                ],
                &[],
            ),
            "must be a directory of its own, not /etc",
        ),
        (
            enabled_with(
                &[("hostname", "derp.example.com"), ("certdir", "/tmp")],
                &[],
            ),
            "certdir must be a directory of its own, not /tmp",
        ),
    ];
    for (text, why) in cases {
        for shell in shells() {
            let run = run_init(&shell, &text, true);
            assert_eq!(run.status, 1, "{why}: {run:#?}");
            assert!(run.log.contains(why), "{why}: {run:#?}");
            assert!(run.stderr.contains(why), "{why}: {run:#?}");
            assert!(!run.has("close_instance"), "{why}: {run:#?}");
            assert!(
                !run.records.iter().any(|r| r.starts_with("chown")),
                "{run:#?}"
            );
        }
    }
}

#[test]
fn init_without_ujail_runs_as_root_and_says_so() {
    let text = enabled_with(&[("hostname", "derp.example.com")], &[]);
    for run in started(&text, false) {
        assert!(!run.records.iter().any(|r| r.starts_with("set user")
            || r.starts_with("jail ")
            || r.starts_with("chown")));
        assert!(run.log.contains("procd-ujail"), "{run:#?}");
        run.config();
    }
}

/// The command line the init script builds (paths moved to a scratch directory, the ports to
/// loopback) runs a relay that Tailscale's own client uses, over TLS with the self-signed
/// certificate's pin that derpd prints for the derpMap.
#[test]
fn init_command_line_runs_a_relay_for_tailscale_clients() {
    let Some(harness) = support::harness() else {
        return;
    };
    let dir = fresh_path("init-relay", "etc");
    let key = dir.join("derpd/derper.key");
    let certdir = dir.join("derpd/certs");
    std::fs::create_dir_all(&certdir).unwrap();
    let text = enabled_with(
        &[
            ("hostname", "127.0.0.1"),
            ("addr", "127.0.0.1:0"),
            ("http_port", "-1"),
            ("stun_port", "0"),
            ("key_file", key.to_str().unwrap()),
            ("certdir", certdir.to_str().unwrap()),
        ],
        &[],
    );
    let run = run_init(&shells()[0], &text, true);
    assert_eq!(run.status, 0, "{run:#?}");
    let mut d = Derpd::start(&run.argv[1..]);
    let up = d.startup(true);
    let pin = up.pin.clone().unwrap();
    d.run_harness(
        &harness,
        &support::pinned_relay_args(2, up.addr.port(), pin),
    );
    assert!(key.exists(), "derpd made its key at the init script's path");
    assert!(certdir.join("127.0.0.1.crt").exists());
    d.expect_running();
}

// ---------------------------------------------------------------------------------------------
// Beside uhttpd: a router as it ships, in network namespaces the test makes.

/// The router's WAN and LAN addresses (as in tests/packaging/fw4-ruleset.sh) and the two
/// clients' addresses: the documentation and private ranges, inside namespaces of the test's
/// own.
const WAN_IP: &str = "203.0.113.1";
const INTERNET_IP: &str = "203.0.113.2";
const LAN_IP: &str = "192.168.1.1";
const LAN_CLIENT_IP: &str = "192.168.1.2";
const COEXIST_DEADLINE: Duration = Duration::from_secs(150);

/// On a router as it ships (uhttpd on 0.0.0.0:80, [::]:80, 0.0.0.0:443, [::]:443), the shipped
/// UCI config with a hostname and `enabled 1` gives a relay that Tailscale's client reaches at
/// the public address on port 443, from the internet and, through NAT reflection, from the LAN,
/// while uhttpd keeps its ports for the LAN. The firewall is fw4's own ruleset for the data the
/// init script gives procd ([`FW4_RULESET`]): the DNAT of 443 and 80 from wan to the router's
/// LAN address, and fw4's NAT reflection of it in the lan zone. With derpd's old defaults
/// (`addr ':443'`, `http_port '80'`), the start fails naming uhttpd and the UCI option.
#[test]
fn init_beside_uhttpd_relays_on_the_public_ports() {
    let Some(harness) = support::harness() else {
        return;
    };
    let missing: Vec<&str> = ["nft", "nsenter", "unshare", "ip"]
        .into_iter()
        .filter(|t| support::find_program(t).is_none())
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{} missing (apt-get install nftables util-linux iproute2; .ci/run installs nftables)",
            missing.join(", ")
        );
        assert!(
            !ci(),
            "{why}, and CI=true: the coexistence test must run in CI"
        );
        support::skip_test(&why, "the coexistence test");
        return;
    }
    support::run_in_netns(
        "init_beside_uhttpd",
        &support::child_test(module_path!(), "beside_uhttpd_child"),
        "router",
        &harness,
        COEXIST_DEADLINE,
    );
}

/// A process killed (and reaped) on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A shell command that must succeed (set-up inside the namespace).
fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-ec", script])
        .env("PATH", sbin_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sbin_path() -> String {
    format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A network namespace of its own (a sleeping process holds it), joined to the router's by a
/// veth pair: `router_dev` here with `router_cidr`, `eth0` there with `cidr` and a default
/// route through the router.
fn peer_netns(router_dev: &str, router_cidr: &str, cidr: &str, gateway: &str) -> Killed {
    let child = Command::new("unshare")
        .args(["--net", "--", "sleep", "600"])
        .env("PATH", sbin_path())
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let ns = Killed(child);
    // unshare runs before the exec of sleep: wait (bounded) until the process is in its own
    // namespace, or the veth would stay here.
    let here = std::fs::read_link("/proc/self/ns/net").unwrap();
    let deadline = std::time::Instant::now() + support::STARTUP_DEADLINE;
    while std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .as_ref()
        == Some(&here)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "unshare --net did not make a namespace"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    sh(&format!(
        "ip link add {router_dev} type veth peer name eth0 netns {pid}
         ip addr add {router_cidr} dev {router_dev}
         ip link set {router_dev} up
         nsenter -t {pid} -n ip link set lo up
         nsenter -t {pid} -n ip addr add {cidr} dev eth0
         nsenter -t {pid} -n ip link set eth0 up
         nsenter -t {pid} -n ip route add default via {gateway}"
    ));
    ns
}

/// The init script's firewall data (the stub's `json` records) as objects of strings.
fn firewall_data(run: &InitRun) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur: Option<BTreeMap<String, String>> = None;
    for r in json_records(run) {
        if r == "json add_object " {
            cur = Some(BTreeMap::new());
        } else if r == "json close_object" {
            out.push(cur.take().unwrap());
        } else if let (Some(o), Some(kv)) = (cur.as_mut(), r.strip_prefix("json add_string ")) {
            let (k, v) = kv.split_once(' ').unwrap();
            o.insert(k.to_string(), v.to_string());
        }
    }
    out
}

/// `tests/packaging/fw4-derpd.nft`: what fw4 itself makes of the firewall data below on the
/// test's router (made by `tests/packaging/fw4-ruleset.sh`, running fw4 as its own tests do).
const FW4_RULESET: &str = "tests/packaging/fw4-derpd.nft";

/// The init script's firewall data as fw4 reads it (`ubus call service get_data
/// '{"type":"firewall"}'`): service, instance, then the rules and redirects.
fn fw4_data_json(data: &[BTreeMap<String, String>]) -> String {
    serde_json::json!({ "derpd": { "instance1": { "firewall": data } } }).to_string()
}

/// This test binary again (through the cross runner if it needs one), run as `program`'s
/// ignored test `child`.
fn test_child(child: &str) -> (String, Vec<String>) {
    let cmd = support::this_test_binary();
    let mut args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let child = support::child_test(module_path!(), child);
    args.extend(
        [
            "--exact",
            child.as_str(),
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]
        .map(String::from),
    );
    (cmd.get_program().to_string_lossy().into_owned(), args)
}

/// `GET /generate_204` to each address from the namespace of `pid` (or here): the first line of
/// each answer.
fn probe_from(pid: Option<u32>, addrs: &[String]) -> Vec<String> {
    let (prog, child_args) = test_child("probe_child");
    let mut args: Vec<String> = Vec::new();
    if let Some(pid) = pid {
        args.extend([s("-t"), pid.to_string(), s("-n"), s("--")]);
    }
    args.push(prog.clone());
    args.extend(child_args);
    let cmd = if pid.is_some() { "nsenter" } else { &prog };
    let args = if pid.is_some() {
        args
    } else {
        args[1..].to_vec()
    };
    let joined = addrs.join(",");
    let (status, stdout, stderr) = run_bounded(
        Path::new(cmd),
        &args,
        &[("DERPD_PROBE", &joined), ("PATH", &sbin_path())],
        SHELL_DEADLINE,
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "probe {joined}: {status:?}\n{stdout}\n{stderr}"
    );
    addrs
        .iter()
        .map(|a| {
            let prefix = format!("PROBE {a} ");
            stdout
                .lines()
                // The first one after libtest's `test probe_child ... `.
                .find_map(|l| Some(&l[l.find(&prefix)? + prefix.len()..]))
                .unwrap_or_else(|| panic!("no answer from {a}:\n{stdout}\n{stderr}"))
                .to_string()
        })
        .collect()
}

/// Run by [`probe_from`]: for each address in `DERPD_PROBE`, a request and the answer's first
/// line (`PROBE <addr> <line>`, or `PROBE <addr> error: ...`).
#[test]
#[ignore = "run by init_beside_uhttpd_relays_on_the_public_ports, in a namespace"]
fn probe_child() {
    use std::io::{Read, Write};
    let Ok(addrs) = std::env::var("DERPD_PROBE") else {
        return;
    };
    for a in addrs.split(',') {
        let answer = (|| -> std::io::Result<String> {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                c,
                "GET /generate_204 HTTP/1.1\r\nHost: {WAN_IP}\r\nConnection: close\r\n\r\n"
            )?;
            let mut buf = Vec::new();
            c.read_to_end(&mut buf)?;
            let text = String::from_utf8_lossy(&buf);
            Ok(text.lines().next().unwrap_or("").to_string())
        })();
        match answer {
            Ok(line) => println!("PROBE {a} {line}"),
            Err(e) => println!("PROBE {a} error: {e}"),
        }
    }
}

/// The answer of the uhttpd stand-in.
const UHTTPD_ANSWER: &str = "HTTP/1.0 403 uhttpd stand-in";

/// A stand-in for uhttpd as OpenWrt ships it: this test binary, through a link named `uhttpd`
/// (its process name), holding uhttpd's four sockets; it answers every connection with
/// [`UHTTPD_ANSWER`] and exits when its stdin closes.
fn start_uhttpd(dir: &Path) -> (Killed, u32) {
    let (prog, args) = test_child("uhttpd_standin_child");
    let exe = std::env::current_exe().unwrap();
    let link = dir.join("uhttpd");
    std::os::unix::fs::symlink(&exe, &link).unwrap();
    let swap = |p: String| {
        if Path::new(&p) == exe {
            link.to_string_lossy().into_owned()
        } else {
            p
        }
    };
    let mut child = Command::new(swap(prog))
        .args(args.into_iter().map(swap))
        .env("DERPD_UHTTPD_STANDIN", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let guard = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    support::spawn_line_reader(stdout, tx);
    loop {
        match rx.recv_timeout(support::STARTUP_DEADLINE) {
            // After libtest's `test uhttpd_standin_child ... `.
            Ok(l) if l.ends_with("UHTTPD READY") => break,
            Ok(l) => println!("uhttpd stand-in: {l}"),
            Err(e) => panic!("the uhttpd stand-in did not start: {e}"),
        }
    }
    (guard, pid)
}

#[test]
#[ignore = "run by init_beside_uhttpd_relays_on_the_public_ports, as the uhttpd stand-in"]
fn uhttpd_standin_child() {
    use rustix::net::{self as rn, AddressFamily, SocketFlags, SocketType};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    if std::env::var("DERPD_UHTTPD_STANDIN").as_deref() != Ok("1") {
        return;
    }
    let mut listeners = Vec::new();
    // uhttpd.config: listen_http 0.0.0.0:80 and [::]:80, listen_https 0.0.0.0:443 and [::]:443;
    // uhttpd sets IPV6_V6ONLY on its IPv6 sockets.
    for a in ["0.0.0.0:80", "[::]:80", "0.0.0.0:443", "[::]:443"] {
        let addr: SocketAddr = a.parse().unwrap();
        let family = if addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = rn::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap();
        rn::sockopt::set_socket_reuseaddr(&fd, true).unwrap();
        if addr.is_ipv6() {
            rn::sockopt::set_ipv6_v6only(&fd, true).unwrap();
        }
        rn::bind(&fd, &addr).unwrap_or_else(|e| panic!("uhttpd stand-in: bind {a}: {e}"));
        rn::listen(&fd, 64).unwrap();
        listeners.push(TcpListener::from(fd));
    }
    for l in listeners {
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                // The request first: closing with it unread would reset the connection.
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(c, "{UHTTPD_ANSWER}\r\nServer: uhttpd\r\n\r\n");
            }
        });
    }
    println!("UHTTPD READY");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Inside [`init_beside_uhttpd_relays_on_the_public_ports`]'s namespace: the router.
#[test]
#[ignore = "run by init_beside_uhttpd_relays_on_the_public_ports, inside a network namespace"]
fn beside_uhttpd_child() {
    let Some((_, harness)) = support::netns_child() else {
        return;
    };
    let dir = fresh_path("beside-uhttpd", "etc");
    std::fs::create_dir_all(&dir).unwrap();
    // The router: WAN and LAN links to a client on the internet and one on the LAN.
    let internet = peer_netns(
        "wan0",
        &format!("{WAN_IP}/24"),
        &format!("{INTERNET_IP}/24"),
        WAN_IP,
    );
    let lan = peer_netns(
        "br-lan",
        &format!("{LAN_IP}/24"),
        &format!("{LAN_CLIENT_IP}/24"),
        LAN_IP,
    );
    let (uhttpd, uhttpd_pid) = start_uhttpd(&dir);

    // install, uci set derpd.main.hostname=..., uci set derpd.main.enabled=1, uci commit.
    let key = dir.join("derpd/derper.key");
    let certdir = dir.join("derpd/certs");
    let base = vec![
        ("hostname", WAN_IP),
        ("key_file", key.to_str().unwrap()),
        ("certdir", certdir.to_str().unwrap()),
    ];
    let run = run_init(&shells()[0], &enabled_with(&base, &[]), true);
    assert_eq!(run.status, 0, "{run:#?}");
    // The firewall: fw4's own ruleset for the data the init script asks for.
    let data = fw4_data_json(&firewall_data(&run));
    let ruleset = std::fs::read_to_string(repo(FW4_RULESET)).unwrap_or_default();
    let made_from = ruleset.lines().find_map(|l| l.strip_prefix("# data: "));
    assert_eq!(
        made_from,
        Some(data.as_str()),
        "{FW4_RULESET} was made from other firewall data: run tests/packaging/fw4-ruleset.sh \
         with this data:\n{data}"
    );
    // Without fw4's hook for the admin's own files (`include "/etc/nftables.d/*.nft"`, none on
    // a stock router): this machine's would be read.
    let rules = dir.join("fw4.nft");
    let own: String = ruleset
        .lines()
        .filter(|l| !l.trim_start().starts_with("include "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&rules, own).unwrap();
    sh(&format!("nft -f {}", rules.display()));
    let env: Vec<(String, String)> = run
        .records
        .iter()
        .filter_map(|r| r.strip_prefix("set env ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(env, [(s("DERPD_UCI_SECTION"), s("derpd.main"))], "{run:#?}");

    let mut cmd = support::derpd_command();
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let mut d = Derpd::start_command(cmd, &run.argv[1..]);
    let up = d.startup(true);
    let pin = up.pin.clone().unwrap();
    assert_eq!(up.addr.port(), 3443, "{:?}", d.log);
    // The derpMap names the port clients dial: 443, Tailscale's default, left out.
    let node: serde_json::Value = serde_json::from_str(&d.derp_map_snippets().node_json).unwrap();
    assert_eq!(node["HostName"], WAN_IP, "{node}");
    assert!(node.get("DERPPort").is_none(), "{node}");
    let dport = node["DERPPort"].as_u64().unwrap_or(443).to_string();

    // Tailscale's clients on the internet, and on the LAN dialling the public address.
    let relay = |pid: u32| {
        let mut a = vec![s("-t"), pid.to_string(), s("-n"), s("--")];
        a.push(harness.to_string_lossy().into_owned());
        a.extend(
            [
                "relay", "-clients", "2", "-host", WAN_IP, "-port", &dport, "-pin", &pin,
            ]
            .map(String::from),
        );
        a
    };
    d.run_harness(Path::new("nsenter"), &relay(internet.0.id()));
    d.run_harness(Path::new("nsenter"), &relay(lan.0.id()));
    let stun = [
        s("-t"),
        internet.0.id().to_string(),
        s("-n"),
        s("--"),
        harness.to_string_lossy().into_owned(),
        s("stun"),
        s("-addr"),
        format!("{WAN_IP}:3478"),
        s("-bind"),
        s(INTERNET_IP),
    ];
    d.run_harness(Path::new("nsenter"), &stun);

    // Port 80 reaches derpd's plain-HTTP listener from outside; uhttpd keeps 80 and 443 on the
    // router's LAN address and here.
    let derpd_204 = "HTTP/1.1 204 No Content";
    let from_internet = probe_from(Some(internet.0.id()), &[format!("{WAN_IP}:80")]);
    assert_eq!(from_internet, [derpd_204]);
    let from_lan = probe_from(
        Some(lan.0.id()),
        &[
            format!("{WAN_IP}:80"),
            format!("{LAN_IP}:80"),
            format!("{LAN_IP}:443"),
        ],
    );
    assert_eq!(from_lan, [derpd_204, UHTTPD_ANSWER, UHTTPD_ANSWER]);
    let here = probe_from(
        None,
        &["127.0.0.1:80", "[::1]:80", "127.0.0.1:443", "[::1]:443"].map(String::from),
    );
    assert_eq!(here, [UHTTPD_ANSWER; 4]);
    d.expect_running();
    drop(d);

    // uhttpd's ports in the UCI config (derpd's old defaults): the start fails, and the log
    // line names the port, uhttpd and the UCI option to change.
    let taken = |option: &str, value: &str| {
        let port = value.trim_start_matches(':');
        let mut set = base.clone();
        set.push((option, value));
        let run = run_init(&shells()[0], &enabled_with(&set, &[]), true);
        assert_eq!(run.status, 0, "{run:#?}");
        let mut cmd = support::derpd_command();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut d = Derpd::start_command(cmd, &run.argv[1..]);
        d.wait_until("the bind error", support::STARTUP_DEADLINE, |log| {
            log.iter().any(|l| l.contains("cannot listen on"))
        });
        let st = d.wait_exit(support::STARTUP_DEADLINE);
        let log = d.log.join("\n");
        assert!(!st.success(), "{log}");
        // EADDRINUSE is "Address already in use" in glibc's words, "Address in use" in musl's,
        // and errno 98, or 125 on MIPS.
        let mut want = vec![
            format!("cannot listen on [::]:{port}: Address "),
            s("in use (os error "),
            format!("choose another port with UCI option derpd.main.{option}"),
        ];
        // Under a cross runner the stand-in's process name is the runner's (qemu-…).
        if std::env::var("DERPD_TEST_RUNNER")
            .unwrap_or_default()
            .is_empty()
        {
            want.push(format!("port {port} is held by uhttpd (pid {uhttpd_pid})"));
        } else {
            want.push(format!("port {port} is held by "));
            want.push(format!(" (pid {uhttpd_pid})"));
        }
        for w in want {
            assert!(log.contains(&w), "no {w:?} in:\n{log}");
        }
    };
    taken("addr", ":443");
    taken("http_port", "80");
    drop(uhttpd);
}

#[test]
fn capabilities_file_grants_only_net_bind_service() {
    let text = std::fs::read_to_string(repo("openwrt/files/derpd.json")).unwrap();
    let caps: BTreeMap<String, Vec<String>> = serde_json::from_str(&text).unwrap();
    let sets: Vec<&str> = caps.keys().map(String::as_str).collect();
    assert_eq!(
        sets,
        [
            "ambient",
            "bounding",
            "effective",
            "inheritable",
            "permitted"
        ]
    );
    for (set, list) in &caps {
        assert_eq!(list, &[s("CAP_NET_BIND_SERVICE")], "{set}");
    }
}

// ---------------------------------------------------------------------------------------------
// The built packages.

/// What a static binary for a target must look like.
#[derive(Clone, Copy, Debug)]
struct Elf {
    class64: bool,
    big_endian: bool,
    machine: u16,
    /// (mask, value) on e_flags.
    flags: (u32, u32),
}

const fn elf(class64: bool, big_endian: bool, machine: u16, flags: (u32, u32)) -> Elf {
    Elf {
        class64,
        big_endian,
        machine,
        flags,
    }
}

const AARCH64: Elf = elf(true, false, 183, (0, 0));
/// ARM EABI5, hard-float (EF_ARM_ABI_FLOAT_HARD).
const ARMV7: Elf = elf(false, false, 40, (0xff00_0400, 0x0500_0400));
/// MIPS32 release 2 (the 24Kc): EF_MIPS_ARCH_32R2.
const MIPSEL: Elf = elf(false, false, 8, (0xf000_0000, 0x7000_0000));
const MIPS: Elf = elf(false, true, 8, (0xf000_0000, 0x7000_0000));
const X86_64: Elf = elf(true, false, 62, (0, 0));

const IPKS: [(&str, Elf); 8] = [
    ("aarch64_cortex-a53", AARCH64),
    ("aarch64_cortex-a72", AARCH64),
    ("aarch64_cortex-a76", AARCH64),
    ("aarch64_generic", AARCH64),
    ("arm_cortex-a7_neon-vfpv4", ARMV7),
    ("mipsel_24kc", MIPSEL),
    ("mips_24kc", MIPS),
    ("x86_64", X86_64),
];
const DEBS: [(&str, Elf); 3] = [("arm64", AARCH64), ("armhf", ARMV7), ("amd64", X86_64)];

/// Checks an ELF header: class, byte order, machine, flags, and no PT_INTERP (static).
fn check_elf(bytes: &[u8], want: Elf, what: &str) {
    assert_eq!(&bytes[..4], b"\x7fELF", "{what}: not ELF");
    assert_eq!(bytes[4] == 2, want.class64, "{what}: ELF class");
    assert_eq!(bytes[5] == 2, want.big_endian, "{what}: byte order");
    let u16_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1]];
        if want.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    };
    let u32_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]];
        if want.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let u64_at = |o: usize| {
        let b: [u8; 8] = bytes[o..o + 8].try_into().unwrap();
        if want.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        }
    };
    assert_eq!(u16_at(18), want.machine, "{what}: e_machine");
    let (flags, phoff, phentsize, phnum) = if want.class64 {
        (
            u32_at(48),
            u64_at(32) as usize,
            u16_at(54) as usize,
            u16_at(56) as usize,
        )
    } else {
        (
            u32_at(36),
            u32_at(28) as usize,
            u16_at(42) as usize,
            u16_at(44) as usize,
        )
    };
    assert_eq!(
        flags & want.flags.0,
        want.flags.1,
        "{what}: e_flags {flags:#x}"
    );
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize);
        assert_ne!(p_type, 3, "{what}: has PT_INTERP: not a static binary");
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `gzip -n`: no name and no timestamp in the header, so the same input gives the same bytes.
fn check_gzip(bytes: &[u8], what: &str) {
    assert_eq!(&bytes[..3], b"\x1f\x8b\x08", "{what}: not gzip");
    assert_eq!(
        bytes[3] & 0x08,
        0,
        "{what}: gzip header has a file name (not gzip -n)"
    );
    assert_eq!(
        &bytes[4..8],
        &[0, 0, 0, 0],
        "{what}: gzip header has a time (not gzip -n)"
    );
}

/// `tar -tv` of a tar(.gz) file: (mode string, owner, name) per entry, in archive order.
fn tar_listing(file: &Path) -> Vec<(String, String, String)> {
    let text = run("tar", &["--numeric-owner", "-tvf", file.to_str().unwrap()]);
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), f[5..].join(" "))
        })
        .collect()
}

/// Control-file fields in order (continuation lines joined to their field).
fn control_fields(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with(' ') {
            let last = out.last_mut().expect("continuation without field");
            last.1.push('\n');
            last.1.push_str(line);
        } else {
            let (k, v) = line.split_once(':').expect("field");
            out.push((k.to_string(), v.trim_start().to_string()));
        }
    }
    out
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} field in {fields:?}"))
}

/// Expected `tar -tv` entries, all owned by 0/0.
fn root_owned(entries: &[(&str, &str)]) -> Vec<(String, String, String)> {
    entries
        .iter()
        .map(|(mode, name)| (s(mode), s("0/0"), s(name)))
        .collect()
}

fn untar(archive: &Path, into: &Path) {
    run(
        "tar",
        &[
            "-xzf",
            archive.to_str().unwrap(),
            "-C",
            into.to_str().unwrap(),
        ],
    );
}

/// Files of an unpacked package that must be the repository's own, byte for byte.
fn same_as_repo(unpacked: &Path, pairs: &[(&str, &str)], what: &str) {
    for (inside, source) in pairs {
        assert_eq!(
            read(&unpacked.join(inside)),
            read(&repo(source)),
            "{what}: {inside}"
        );
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn require_package(p: &Path) {
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-packages.sh (after scripts/build-release.sh)",
        p.display()
    );
}

/// The control fields opkg (opkg-lede, `libopkg/pkg_parse.c`) knows, in the order it tries
/// them: it takes a line as the first of these whose name the line starts with, so
/// `SourceName:` and `SourceDateEpoch:` are read as `Source`, and ignores the rest.
const OPKG_FIELDS: &[&str] = &[
    "ABIVersion",
    "Alternatives",
    "Architecture",
    "Auto-Installed",
    "Conffiles",
    "Conflicts",
    "Description",
    "Depends",
    "Essential",
    "Filename",
    "Installed-Size",
    "Installed-Time",
    "MD5sum:",
    "MD5Sum:",
    "Maintainer",
    "Package",
    "Priority",
    "Provides",
    "Pre-Depends",
    "Recommends",
    "Replaces",
    "Section",
    "SHA256sum",
    "Size",
    "Source",
    "Status",
    "Suggests",
    "Tags",
    "Version",
];

/// What opkg makes of a control file: each field it stores is stored under its own name, and
/// no value is cut. opkg keeps a field's first value in a buffer of that value's size, copies
/// a later value of the same field into it, and prints "ERROR: truncating field" when the
/// later one is longer (`pkg_set_raw` in `libopkg/pkg.c`): with `SourceName:` and
/// `SourceDateEpoch:` read as Source, a short or missing `Source:` before them does that.
fn opkg_reads_as_written(control: &str, what: &str) {
    let mut stored: Vec<(&str, usize)> = Vec::new(); // opkg field, buffer size
    for line in control.lines().filter(|l| !l.starts_with(' ')) {
        let Some(name) = OPKG_FIELDS.iter().find(|f| line.starts_with(*f)) else {
            continue;
        };
        let written = line.split(':').next().unwrap();
        let value = &line[name.trim_end_matches(':').len() + 1..];
        let size = value.len() + 1;
        match stored.iter().find(|(f, _)| f == name) {
            None => {
                assert!(
                    written == *name || *name == "Source",
                    "{what}: opkg reads {written}: as {name}"
                );
                stored.push((name, size));
            }
            Some((_, first)) => assert!(
                size <= *first,
                "{what}: opkg would truncate {written}: ({size} bytes) into {name}'s \
                 {first}-byte buffer and print ERROR: truncating field"
            ),
        }
    }
    for want in [
        "Package",
        "Version",
        "Source",
        "Section",
        "Architecture",
        "Maintainer",
    ] {
        assert!(
            stored.iter().any(|(f, _)| *f == want),
            "{what}: no {want} for opkg in {control}"
        );
    }
}

#[test]
fn opkg_reads_as_written_catches_a_missing_or_short_source_field() {
    let control = |source: Option<&str>| {
        let source = source.map(|v| format!("Source: {v}\n")).unwrap_or_default();
        format!(
            "Package: derpd\nVersion: 0.1.0-r1\n{source}SourceName: derpd\nSection: net\n\
             SourceDateEpoch: 1796197046\nMaintainer: m\nArchitecture: all\n"
        )
    };
    opkg_reads_as_written(&control(Some("twenty characters...")), "long enough");
    for (source, what) in [
        (None, "no Source"),
        (Some("package/derpd"), "a short Source"),
    ] {
        let text = control(source);
        let caught = std::panic::catch_unwind(|| opkg_reads_as_written(&text, what));
        assert!(caught.is_err(), "{what} passed");
    }
}

#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn ipk_structure() {
    let version = format!("{}-r{}", cargo_version(), makefile_var("PKG_RELEASE"));
    for (arch, elf) in IPKS {
        let ipk = packages_dir().join(format!("derpd_{version}_{arch}.ipk"));
        require_package(&ipk);
        let what = ipk.file_name().unwrap().to_string_lossy().into_owned();
        check_gzip(&read(&ipk), &what);
        // The outer archive: a gzip'd tar (not ar) of exactly these three, in this order.
        let outer = tar_listing(&ipk);
        let names: Vec<&str> = outer.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(
            names,
            ["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
            "{what}"
        );
        let dir = fresh_path("ipk", arch);
        std::fs::create_dir_all(dir.join("control")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        run(
            "tar",
            &["-xzf", ipk.to_str().unwrap(), "-C", dir.to_str().unwrap()],
        );
        assert_eq!(read(&dir.join("debian-binary")), b"2.0\n", "{what}");
        for inner in ["data.tar.gz", "control.tar.gz"] {
            check_gzip(&read(&dir.join(inner)), &format!("{what}/{inner}"));
        }
        let data = tar_listing(&dir.join("data.tar.gz"));
        let want = root_owned(&[
            ("drwxr-xr-x", "./"),
            ("drwxr-xr-x", "./etc/"),
            ("drwxr-xr-x", "./etc/capabilities/"),
            ("-rw-------", "./etc/capabilities/derpd.json"),
            ("drwxr-xr-x", "./etc/config/"),
            ("-rw-------", "./etc/config/derpd"),
            ("drwxr-xr-x", "./etc/init.d/"),
            ("-rwxr-xr-x", "./etc/init.d/derpd"),
            ("drwxr-xr-x", "./lib/"),
            ("drwxr-xr-x", "./lib/upgrade/"),
            ("drwxr-xr-x", "./lib/upgrade/keep.d/"),
            ("-rw-r--r--", "./lib/upgrade/keep.d/derpd"),
            ("drwxr-xr-x", "./usr/"),
            ("drwxr-xr-x", "./usr/sbin/"),
            ("-rwxr-xr-x", "./usr/sbin/derpd"),
        ]);
        assert_eq!(data, want, "{what}: data.tar.gz");
        let control = tar_listing(&dir.join("control.tar.gz"));
        let want = root_owned(&[
            ("drwxr-xr-x", "./"),
            ("-rw-r--r--", "./conffiles"),
            ("-rw-r--r--", "./control"),
            ("-rwxr-xr-x", "./postinst"),
            ("-rwxr-xr-x", "./prerm"),
        ]);
        assert_eq!(control, want, "{what}: control.tar.gz");
        let (d, c) = (dir.join("data"), dir.join("control"));
        untar(&dir.join("data.tar.gz"), &d);
        untar(&dir.join("control.tar.gz"), &c);

        let text = String::from_utf8(read(&c.join("control"))).unwrap();
        let fields = control_fields(&text);
        // package-pack.mk's order of the fields.
        let order = [
            "Package",
            "Version",
            "Source",
            "SourceName",
            "License",
            "LicenseFiles",
            "Section",
            "Require-User",
            "SourceDateEpoch",
            "Maintainer",
            "Architecture",
            "Installed-Size",
            "Description",
        ];
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, order, "{what}: control fields");
        assert_eq!(field(&fields, "Package"), "derpd");
        assert_eq!(field(&fields, "Version"), version);
        assert_eq!(field(&fields, "Architecture"), arch);
        // No Depends: an offline router without procd-ujail must be able to install it (opkg
        // drops a package with an unresolved dependency even with --force-depends); the init
        // script runs derpd without ujail and says so in the log.
        opkg_reads_as_written(&text, &what);
        assert_eq!(field(&fields, "License"), makefile_var("PKG_LICENSE"));
        assert_eq!(field(&fields, "Section"), makefile_var("SECTION"));
        assert_eq!(field(&fields, "Require-User"), makefile_var("USERID"));
        assert_eq!(field(&fields, "Maintainer"), makefile_var("PKG_MAINTAINER"));
        // ipkg-build: the size of the uncompressed data tar.
        let unpacked = run(
            "sh",
            &[
                "-c",
                &format!("zcat < '{}' | wc -c", dir.join("data.tar.gz").display()),
            ],
        );
        assert_eq!(field(&fields, "Installed-Size"), unpacked.trim(), "{what}");
        assert!(
            text.contains("Description:  A small, wire-compatible"),
            "{what}: {text}"
        );

        assert_eq!(read(&c.join("conffiles")), b"/etc/config/derpd\n", "{what}");
        // opkg records each conffile's hash at install, and on an upgrade keeps the user's
        // edited file and puts the new one beside it as <name>-opkg: each entry must be a
        // regular file of the package.
        for conf in String::from_utf8(read(&c.join("conffiles")))
            .unwrap()
            .lines()
        {
            let rel = conf.strip_prefix('/').expect("absolute conffile");
            let meta = std::fs::symlink_metadata(d.join(rel)).unwrap();
            assert!(
                meta.is_file(),
                "{what}: conffile {conf} is not a regular file"
            );
        }
        assert_eq!(
            read(&d.join("lib/upgrade/keep.d/derpd")),
            b"/etc/derpd/\n",
            "{what}"
        );
        assert_eq!(
            String::from_utf8(read(&c.join("postinst"))).unwrap(),
            "#!/bin/sh\n[ \"${IPKG_NO_SCRIPT}\" = \"1\" ] && exit 0\n\
             [ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
             . ${IPKG_INSTROOT}/lib/functions.sh\ndefault_postinst $0 $@\n"
        );
        assert_eq!(
            String::from_utf8(read(&c.join("prerm"))).unwrap(),
            "#!/bin/sh\n[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
             . ${IPKG_INSTROOT}/lib/functions.sh\ndefault_prerm $0 $@\n"
        );
        same_as_repo(
            &d,
            &[
                ("etc/init.d/derpd", "openwrt/files/derpd.init"),
                ("etc/config/derpd", "openwrt/files/derpd.config"),
                ("etc/capabilities/derpd.json", "openwrt/files/derpd.json"),
            ],
            &what,
        );
        check_elf(
            &read(&d.join("usr/sbin/derpd")),
            elf,
            &format!("{what}: /usr/sbin/derpd"),
        );
    }
}

/// `scripts/stage-luci-app.sh --list`: (mode, installed path) of luci-app-derpd's files.
fn luci_app_files() -> Vec<(String, String)> {
    run(
        "bash",
        &[
            repo("scripts/stage-luci-app.sh").to_str().unwrap(),
            "--list",
        ],
    )
    .lines()
    .map(|l| {
        let (mode, path) = l.split_once(' ').unwrap();
        (mode.to_string(), path.to_string())
    })
    .collect()
}

/// A `define Package/<what>` body of openwrt/Makefile, as the SDK writes it (make's `$$` is
/// `$`).
fn makefile_body(what: &str) -> String {
    format!("{}\n", makefile_define(what).join("\n").replace("$$", "$"))
}

#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn luci_ipk_structure() {
    let version = format!("{}-r{}", cargo_version(), makefile_var("PKG_RELEASE"));
    let ipk = packages_dir().join(format!("luci-app-derpd_{version}_all.ipk"));
    require_package(&ipk);
    let what = "luci-app-derpd .ipk";
    check_gzip(&read(&ipk), what);
    let dir = fresh_path("luci-ipk", "all");
    std::fs::create_dir_all(dir.join("control")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    run(
        "tar",
        &["-xzf", ipk.to_str().unwrap(), "-C", dir.to_str().unwrap()],
    );
    let (d, c) = (dir.join("data"), dir.join("control"));
    untar(&dir.join("data.tar.gz"), &d);
    untar(&dir.join("control.tar.gz"), &c);
    // Every file of stage-luci-app.sh with its mode, root-owned, and nothing else.
    let files: Vec<(String, String)> = tar_listing(&dir.join("data.tar.gz"))
        .into_iter()
        .filter(|(mode, owner, _)| !mode.starts_with('d') && owner == "0/0")
        .map(|(mode, _, name)| (mode, name[1..].to_string()))
        .collect();
    let want: Vec<(String, String)> = luci_app_files()
        .into_iter()
        .map(|(mode, path)| {
            let m = if mode == "0755" {
                "-rwxr-xr-x"
            } else {
                "-rw-r--r--"
            };
            (m.to_string(), path)
        })
        .collect();
    assert_eq!(files, want, "{what}: data.tar.gz");
    for (_, path) in &want {
        let source = if let Some(rest) = path.strip_prefix("/www/") {
            format!("openwrt/luci-app-derpd/htdocs/{rest}")
        } else {
            format!("openwrt/luci-app-derpd/root{path}")
        };
        assert_eq!(
            read(&d.join(&path[1..])),
            read(&repo(&source)),
            "{what}: {path}"
        );
    }
    let control = tar_listing(&dir.join("control.tar.gz"));
    let names: Vec<&str> = control.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(
        names,
        [
            "./",
            "./control",
            "./postinst",
            "./postinst-pkg",
            "./postrm",
            "./prerm"
        ],
        "{what}"
    );
    let text = String::from_utf8(read(&c.join("control"))).unwrap();
    let fields = control_fields(&text);
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "Package",
            "Version",
            "Depends",
            "Source",
            "SourceName",
            "License",
            "LicenseFiles",
            "Section",
            "SourceDateEpoch",
            "Maintainer",
            "Architecture",
            "Installed-Size",
            "Description"
        ],
        "{what}"
    );
    opkg_reads_as_written(&text, what);
    assert_eq!(field(&fields, "Package"), "luci-app-derpd");
    assert_eq!(field(&fields, "Version"), version);
    assert_eq!(field(&fields, "Architecture"), "all");
    assert_eq!(field(&fields, "Section"), "luci");
    assert_eq!(field(&fields, "Depends"), "libc, derpd, luci-base");
    // The package's own scripts are the Makefile's, stored as package-pack.mk stores them.
    assert_eq!(
        String::from_utf8(read(&c.join("postinst-pkg"))).unwrap(),
        makefile_body("luci-app-derpd/postinst")
    );
    assert_eq!(
        String::from_utf8(read(&c.join("postrm"))).unwrap(),
        makefile_body("luci-app-derpd/postrm")
    );
}

#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn deb_structure() {
    let version = format!("{}-1", cargo_version());
    for (arch, elf) in DEBS {
        let deb = packages_dir().join(format!("derpd_{version}_{arch}.deb"));
        require_package(&deb);
        let what = deb.file_name().unwrap().to_string_lossy().into_owned();
        let p = deb.to_str().unwrap();
        let fields = control_fields(&run("dpkg-deb", &["-f", p]));
        assert_eq!(field(&fields, "Package"), "derpd");
        assert_eq!(field(&fields, "Version"), version);
        assert_eq!(field(&fields, "Architecture"), arch);
        assert_eq!(field(&fields, "Depends"), "adduser");
        assert_eq!(field(&fields, "Section"), "net");
        assert!(field(&fields, "Description").starts_with("DERP relay"));
        let listing: Vec<(String, String)> = run("dpkg-deb", &["-c", p])
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (format!("{} {}", f[0], f[1]), f[5..].join(" "))
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("drwxr-xr-x", "./"),
            ("drwxr-xr-x", "./etc/"),
            ("drwxr-xr-x", "./etc/default/"),
            ("-rw-r--r--", "./etc/default/derpd"),
            ("drwxr-xr-x", "./usr/"),
            ("drwxr-xr-x", "./usr/lib/"),
            ("drwxr-xr-x", "./usr/lib/systemd/"),
            ("drwxr-xr-x", "./usr/lib/systemd/system/"),
            ("-rw-r--r--", "./usr/lib/systemd/system/derpd.service"),
            ("drwxr-xr-x", "./usr/sbin/"),
            ("-rwxr-xr-x", "./usr/sbin/derpd"),
            ("drwxr-xr-x", "./usr/share/"),
            ("drwxr-xr-x", "./usr/share/doc/"),
            ("drwxr-xr-x", "./usr/share/doc/derpd/"),
            ("-rw-r--r--", "./usr/share/doc/derpd/README.Debian"),
            ("-rw-r--r--", "./usr/share/doc/derpd/changelog.Debian.gz"),
            ("-rw-r--r--", "./usr/share/doc/derpd/copyright"),
            ("drwxr-xr-x", "./usr/share/lintian/"),
            ("drwxr-xr-x", "./usr/share/lintian/overrides/"),
            ("-rw-r--r--", "./usr/share/lintian/overrides/derpd"),
            ("drwxr-xr-x", "./usr/share/man/"),
            ("drwxr-xr-x", "./usr/share/man/man8/"),
            ("-rw-r--r--", "./usr/share/man/man8/derpd.8.gz"),
        ]
        .iter()
        .map(|(m, n)| (format!("{m} root/root"), s(n)))
        .collect();
        assert_eq!(listing, want, "{what}");
        let dir = fresh_path("deb", arch);
        std::fs::create_dir_all(&dir).unwrap();
        let (d, c) = (dir.join("data"), dir.join("DEBIAN"));
        run("dpkg-deb", &["-x", p, d.to_str().unwrap()]);
        run("dpkg-deb", &["-e", p, c.to_str().unwrap()]);
        assert_eq!(read(&c.join("conffiles")), b"/etc/default/derpd\n");
        for script in ["postinst", "prerm", "postrm"] {
            assert_eq!(
                read(&c.join(script)),
                read(&repo(&format!("debian/{script}"))),
                "{what}"
            );
            let mode = std::fs::metadata(c.join(script)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o755, "{what}: {script}");
        }
        same_as_repo(
            &d,
            &[
                (
                    "usr/lib/systemd/system/derpd.service",
                    "debian/derpd.service",
                ),
                ("etc/default/derpd", "debian/derpd.default"),
                ("usr/share/doc/derpd/README.Debian", "debian/README.Debian"),
            ],
            &what,
        );
        let copyright = String::from_utf8(read(&d.join("usr/share/doc/derpd/copyright"))).unwrap();
        assert!(copyright.starts_with(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
        ));
        assert!(copyright.contains("License: BSD-3-Clause\n Redistribution and use"));
        // md5sums matches the files.
        let sums = run(
            "sh",
            &[
                "-c",
                &format!(
                    "cd '{}' && md5sum -c --quiet '{}/md5sums'",
                    d.display(),
                    c.display()
                ),
            ],
        );
        assert_eq!(sums, "", "{what}: md5sums");
        check_elf(
            &read(&d.join("usr/sbin/derpd")),
            elf,
            &format!("{what}: /usr/sbin/derpd"),
        );
        lintian(&deb);
    }
}

/// Debian's own package checker: no error and no warning (the overrides shipped in
/// debian/lintian-overrides say why each is wrong for a static binary).
fn lintian(deb: &Path) {
    if Command::new("lintian").arg("--version").output().is_err() {
        assert!(
            !ci(),
            "lintian is missing, and CI=true (.ci/run installs it)"
        );
        eprintln!(
            "NOTE: lintian not installed; {} not checked by it",
            deb.display()
        );
        return;
    }
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lintian {}:\n{}{}",
        deb.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The systemd unit's ExecStart, split into words (the unit has no quoting).
fn exec_start(unit: &str) -> Vec<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn getent(db: &str, key: &str) -> Option<Vec<String>> {
    let out = Command::new("getent").args([db, key]).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(':')
            .map(str::to_string)
            .collect()
    })
}

/// `dpkg -i` of the amd64 package on this machine, then derpd run the way its unit runs it
/// (the derpd user, only CAP_NET_BIND_SERVICE, the state directory), in a network namespace of
/// the test's own so that it binds 443, 80 and 3478 as shipped; Tailscale's client relays
/// through it. Then `dpkg -r` and `dpkg --purge`.
#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn deb_installs_and_runs_as_the_derpd_user() {
    let deb = packages_dir().join(format!("derpd_{}-1_amd64.deb", cargo_version()));
    require_package(&deb);
    if !rustix::process::geteuid().is_root() {
        assert!(!ci(), "dpkg -i needs root, and CI=true: it must run in CI");
        eprintln!("SKIPPED: dpkg -i needs root");
        return;
    }
    let Some(harness) = support::harness() else {
        return skip("no Go for Tailscale's client");
    };
    // A derpd from an earlier, interrupted run goes first.
    let _ = Command::new("dpkg").args(["--purge", "derpd"]).output();
    run("dpkg", &["-i", deb.to_str().unwrap()]);
    let status = run("dpkg-query", &["-W", "-f=${Status} ${Version}", "derpd"]);
    assert_eq!(
        status,
        format!("install ok installed {}-1", cargo_version())
    );

    let user = getent("passwd", "derpd").expect("postinst made the derpd user");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "derpd is a system user: {user:?}");
    assert_eq!(user[5], "/var/lib/derpd");
    assert!(user[6].ends_with("nologin"), "{user:?}");
    let group = getent("group", "derpd").expect("derpd group");
    assert_eq!(group[2], user[3], "derpd's primary group");

    for (path, mode) in [
        ("/usr/sbin/derpd", 0o755),
        ("/etc/default/derpd", 0o644),
        ("/usr/lib/systemd/system/derpd.service", 0o644),
    ] {
        let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (mode, 0, 0),
            "{path}"
        );
    }
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", "derpd"]);
    assert!(conffiles.contains("/etc/default/derpd"), "{conffiles}");
    assert!(
        run("/usr/sbin/derpd", &["--version"]).starts_with(&format!("derpd {} ", cargo_version()))
    );
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/derpd.service").unwrap();
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = Command::new("systemd-analyze")
            .args(["verify", "/usr/lib/systemd/system/derpd.service"])
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(!ci(), "systemd-analyze is missing, and CI=true");
    }

    // What systemd does for StateDirectory=derpd, StateDirectoryMode=0700.
    run(
        "install",
        &[
            "-d",
            "-m",
            "0700",
            "-o",
            "derpd",
            "-g",
            "derpd",
            "/var/lib/derpd",
        ],
    );
    let mut argv = exec_start(&unit);
    assert_eq!(argv.pop().as_deref(), Some("$DERPD_FLAGS"));
    // /etc/default/derpd's first example: a self-signed certificate for an IP address.
    argv.extend([s("--certmode=manual"), s("--hostname=127.0.0.1")]);
    let caps = "-all,+net_bind_service";
    let mut setpriv = Command::new("setpriv");
    setpriv
        .args(["--reuid=derpd", "--regid=derpd", "--init-groups"])
        .args([
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
        ])
        .args([&format!("--bounding-set={caps}"), "--no-new-privs", "--"]);
    let mut d = Derpd::start_command(support::in_new_netns(&setpriv), &argv);
    let up = d.startup(true);
    assert_eq!(
        up.addr.port(),
        443,
        "the shipped port, bound by the derpd user"
    );
    let pid = d.child.id().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .to_string()
    };
    assert!(
        line("Uid:")
            .split_whitespace()
            .skip(1)
            .all(|u| u == uid.to_string()),
        "{status}"
    );
    assert_eq!(
        line("CapEff:"),
        "CapEff:\t0000000000000400",
        "only CAP_NET_BIND_SERVICE"
    );
    let nsenter = |args: &[String]| {
        let mut all = vec![s("-t"), pid.clone(), s("-n"), harness.display().to_string()];
        all.extend_from_slice(args);
        let (st, out, err) =
            run_bounded(Path::new("nsenter"), &all, &[], support::HARNESS_DEADLINE);
        println!("$ nsenter derp-interop {}\n{out}{err}", args.join(" "));
        assert!(
            st.is_some_and(|s| s.success()),
            "derp-interop {args:?}: {out}\n{err}"
        );
    };
    let pin = up.pin.clone().unwrap();
    nsenter(&support::pinned_relay_args(2, 443, pin));
    nsenter(&[s("stun"), s("-addr"), s("127.0.0.1:3478")]);
    d.expect_running();
    let key = std::fs::metadata("/var/lib/derpd/derper.key").unwrap();
    assert_eq!(
        (key.uid(), key.mode() & 0o777),
        (uid, 0o600),
        "the key, made by derpd"
    );
    let cert = std::fs::metadata("/var/lib/derpd/certs/127.0.0.1.crt").unwrap();
    assert_eq!(cert.uid(), uid);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&d.child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(
        d.wait_exit(Duration::from_secs(10)).success(),
        "SIGTERM: exit 0"
    );

    run("dpkg", &["-r", "derpd"]);
    assert!(!Path::new("/usr/sbin/derpd").exists());
    assert!(
        Path::new("/etc/default/derpd").exists(),
        "remove keeps the conffile"
    );
    assert!(
        Path::new("/var/lib/derpd/derper.key").exists(),
        "remove keeps the key"
    );
    run("dpkg", &["--purge", "derpd"]);
    assert!(
        !Path::new("/etc/default/derpd").exists(),
        "purge removes the conffile"
    );
    assert!(
        !Path::new("/var/lib/derpd").exists(),
        "purge removes the state"
    );
}
