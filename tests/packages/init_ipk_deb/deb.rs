//! The built `.deb` files, and `dpkg -i` of the amd64 one on this machine.

use super::{cargo_version, check_elf, control_fields, field, read, repo, require_package, run};
use super::{same_as_repo, DEBS};
use crate::support::{self, ci, fresh_path, packages_dir, run_bounded, s, skip, Derpd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
