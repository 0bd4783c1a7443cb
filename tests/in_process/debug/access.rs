//! derper's access rule from addresses other than loopback, in a network namespace.

use super::*;

/// In the environment of [`debug_access_netns_child`]: the path of `ip`. Only set by
/// [`debug_access_judges_the_remote_address`], which runs the child in a network namespace.
const NETNS_ENV: &str = "DERPD_TEST_DEBUG_NETNS_IP";

/// The namespace's addresses (all on its loopback interface, so any two of them can talk):
/// documentation ranges in and out of `TS_DEBUG_TRUSTED_CIDRS`, Tailscale addresses, and
/// `TS_ALLOW_DEBUG_IP` with a neighbour.
const NETNS_ADDRS: &[&str] = &[
    "192.0.2.1",
    "192.0.2.2",
    "198.51.100.1",
    "198.51.100.2",
    "100.64.0.1",
    "100.64.0.2",
    "203.0.113.7",
    "203.0.113.8",
    "2001:db8:1::1",
    "2001:db8:1::2",
    "2001:db8:2::1",
    "2001:db8:2::2",
    "fd7a:115c:a1e0::1",
    "fd7a:115c:a1e0::2",
];

/// derper's rule judges the peer's address, also from addresses other than loopback, and
/// `TS_DEBUG_TRUSTED_CIDRS` and `TS_ALLOW_DEBUG_IP` let peers in; a Tailscale address only
/// on a connection to one of derpd's Tailscale addresses (100.64.0.0/10 is also CGNAT). Runs
/// [`debug_access_netns_child`] in a network namespace of its own (`unshare --net`, with a
/// user namespace when not root), where derpd and the requests' sources have the addresses
/// of [`NETNS_ADDRS`]. Without a way to make one it prints SKIPPED, or fails under CI.
#[test]
fn debug_access_judges_the_remote_address() {
    const WHAT: &str = "the debug access test from addresses other than loopback";
    let (Some(unshare), Some(ip)) = (
        support::find_program("unshare"),
        support::find_program("ip"),
    ) else {
        return support::skip_test("no unshare (util-linux) or no ip (iproute2)", WHAT);
    };
    // As root a network namespace is enough; otherwise a user namespace maps us to root in it.
    let works = |flags: &[&str]| {
        Command::new(&unshare)
            .args(flags)
            .arg("--")
            .arg(&ip)
            .args(["link", "set", "lo", "up"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let Some(flags) = [&["--net"][..], &["--net", "--map-root-user"]]
        .into_iter()
        .find(|f| works(f))
    else {
        return support::skip_test(
            "cannot make a network namespace (unshare --net, with or without --map-root-user)",
            WHAT,
        );
    };
    // The child is this test binary, through qemu-user when cross-testing (derpd too).
    let inner = support::this_test_binary();
    let mut args: Vec<String> = flags.iter().map(|f| s(f)).collect();
    args.push(s("--"));
    args.push(inner.get_program().to_string_lossy().into_owned());
    args.extend(inner.get_args().map(|a| a.to_string_lossy().into_owned()));
    let child = support::child_test(module_path!(), "debug_access_netns_child");
    args.extend(["--exact", child.as_str(), "--ignored", "--nocapture"].map(s));
    let ip = ip.to_string_lossy();
    let (status, stdout, stderr) = support::run_bounded(
        &unshare,
        &args,
        &[(NETNS_ENV, &ip)],
        support::STARTUP_DEADLINE + Duration::from_secs(60),
    );
    let text = format!("unshare {}\n{stdout}\n{stderr}", args.join(" "));
    assert!(status.is_some_and(|s| s.success()), "{text}");
    assert!(text.contains("netns child: all checks passed"), "{text}");
}

/// A GET of `/debug/` from `src` to `dst`: the status code.
fn debug_status_from(src: IpAddr, dst: SocketAddr) -> u16 {
    use rustix::net::{self as rn, AddressFamily, SocketType};
    let family = if dst.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rn::socket(family, SocketType::STREAM, None).unwrap();
    rn::bind(&fd, &SocketAddr::new(src, 0)).unwrap();
    rn::connect(&fd, &dst).unwrap();
    let mut c = TcpStream::from(fd);
    assert_eq!(c.local_addr().unwrap().ip(), src);
    c.set_read_timeout(Some(inproc::IO_TIMEOUT)).unwrap();
    c.write_all(b"GET /debug/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let head = String::from_utf8_lossy(&out);
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{src} -> {dst}: no status line in {head:?}"))
}

/// Inside the namespace: gives loopback the addresses, starts derpd on `[::]` (IPv4 peers
/// arrive as `::ffff:a.b.c.d`) with `TS_DEBUG_TRUSTED_CIDRS` and `TS_ALLOW_DEBUG_IP`, and
/// asks for `/debug/` from each source to each destination of a table. The refusals include
/// sources outside every rule that reach an address the rule would let in (in the trusted
/// range, loopback, Tailscale's, `TS_ALLOW_DEBUG_IP`), so judging derpd's own address of the
/// connection instead of the peer's fails; the trusted range is reached from outside it. A
/// Tailscale source is let in on derpd's Tailscale addresses only.
#[test]
#[ignore = "run by debug_access_judges_the_remote_address, inside a network namespace"]
fn debug_access_netns_child() {
    let Some(ip) = std::env::var_os(NETNS_ENV) else {
        println!("{NETNS_ENV} unset: nothing to do outside the namespace");
        return;
    };
    // Never change a network that is not a fresh namespace's, where `lo` is all there is.
    let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap();
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "not in a fresh network namespace:\n{dev}");
    let ip_cmd = |args: &[&str]| {
        let st = Command::new(&ip).args(args).status().unwrap();
        assert!(st.success(), "ip {}: {st}", args.join(" "));
    };
    ip_cmd(&["link", "set", "lo", "up"]);
    for a in NETNS_ADDRS {
        let a: IpAddr = a.parse().unwrap();
        match a {
            IpAddr::V4(_) => ip_cmd(&["addr", "add", &format!("{a}/32"), "dev", "lo"]),
            IpAddr::V6(_) => ip_cmd(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "lo",
                "nodad",
            ]),
        }
    }
    let mut cmd = derpd_command();
    cmd.env("TS_DEBUG_TRUSTED_CIDRS", "192.0.2.0/24, 2001:db8:1::/48")
        .env("TS_ALLOW_DEBUG_IP", "203.0.113.7")
        .env_remove("TS_DEBUG_KEY_PATH");
    let args = [s("--dev"), s("-a"), s("[::]:0"), s("--stun-port"), s("0")];
    let mut d = Derpd::start_command(cmd, &args);
    let port = d.startup(false).addr.port();
    // (source, destination, status, why)
    let cases = [
        (
            "192.0.2.2",
            "198.51.100.1",
            200,
            "in TS_DEBUG_TRUSTED_CIDRS, to outside it",
        ),
        (
            "2001:db8:1::2",
            "2001:db8:2::1",
            200,
            "in TS_DEBUG_TRUSTED_CIDRS (IPv6)",
        ),
        ("203.0.113.7", "198.51.100.1", 200, "TS_ALLOW_DEBUG_IP"),
        (
            "100.64.0.1",
            "100.64.0.2",
            200,
            "a Tailscale address, to one",
        ),
        (
            "fd7a:115c:a1e0::1",
            "fd7a:115c:a1e0::2",
            200,
            "a Tailscale IPv6 address, to one",
        ),
        (
            "100.64.0.1",
            "198.51.100.1",
            403,
            "a Tailscale (or CGNAT) address, to another kind",
        ),
        (
            "fd7a:115c:a1e0::1",
            "2001:db8:2::1",
            403,
            "a Tailscale IPv6 address, to another kind",
        ),
        (
            "100.64.0.1",
            "127.0.0.1",
            403,
            "a Tailscale address, to loopback",
        ),
        ("198.51.100.2", "198.51.100.1", 403, "outside every rule"),
        (
            "203.0.113.8",
            "198.51.100.1",
            403,
            "next to TS_ALLOW_DEBUG_IP",
        ),
        (
            "198.51.100.2",
            "192.0.2.1",
            403,
            "outside, to TS_DEBUG_TRUSTED_CIDRS",
        ),
        (
            "2001:db8:2::2",
            "2001:db8:1::1",
            403,
            "outside, to TS_DEBUG_TRUSTED_CIDRS (IPv6)",
        ),
        ("198.51.100.2", "127.0.0.1", 403, "outside, to loopback"),
        ("2001:db8:2::2", "::1", 403, "outside, to loopback (IPv6)"),
        (
            "198.51.100.2",
            "100.64.0.1",
            403,
            "outside, to a Tailscale address",
        ),
        (
            "198.51.100.2",
            "203.0.113.7",
            403,
            "outside, to TS_ALLOW_DEBUG_IP",
        ),
        ("127.0.0.1", "127.0.0.1", 200, "loopback"),
    ];
    let mut wrong = Vec::new();
    for (src, dst, want, why) in cases {
        let dst = SocketAddr::new(dst.parse().unwrap(), port);
        let got = debug_status_from(src.parse().unwrap(), dst);
        if got != want {
            wrong.push(format!("{src} -> {dst} ({why}): {got}, want {want}"));
        }
    }
    if !wrong.is_empty() {
        d.fail(&format!("debug access:\n{}", wrong.join("\n")));
    }
    d.expect_running();
    println!("netns child: all checks passed");
}
