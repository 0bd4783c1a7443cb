//! Beside uhttpd: a router as it ships, in network namespaces the test makes.

use super::{enabled_with, json_records, repo, run_init, shells, InitRun, SHELL_DEADLINE};
use crate::support::{self, ci, fresh_path, run_bounded, s, Derpd};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
