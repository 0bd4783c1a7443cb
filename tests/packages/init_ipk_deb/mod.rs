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
//!
//! This file holds what the subjects share (the init script's runs under the stub, the checks of
//! a built package's archives, ELF headers and control files); one module per subject:
//! [`init_script`], [`beside_uhttpd`] (the coexistence test in network namespaces), [`ipk`]
//! (the derpd and luci-app-derpd `.ipk` files, as opkg reads them), [`deb`] (the `.deb` files,
//! and `dpkg -i` for real).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod beside_uhttpd;
mod deb;
mod init_script;
mod ipk;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{ci, fresh_path, run_bounded, s};
use argh::FromArgs;
use derpd::config::{normalize_args, Args, Config};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SHIPPED_UCI: &str = include_str!("../../../openwrt/files/derpd.config");
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

/// The stub's `json` records of a run.
fn json_records(run: &InitRun) -> Vec<String> {
    run.records
        .iter()
        .filter(|r| r.starts_with("json "))
        .cloned()
        .collect()
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
