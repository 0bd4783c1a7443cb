#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `/debug/`: varz names and types against Tailscale's real derper, counters moving, and
//! derper's access rule over loopback and, in a network namespace the test makes, from other
//! addresses (environment set only in spawned derpd processes).

use crate::support;
use crate::support::inproc;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::inproc::{http_exchange, start_dev, wait_until, DerpClient};
use crate::support::{derpd_command, derper, fresh_path, reserve_port, s, wait_listening, Derpd};

/// derper's metric names that derpd publishes with the same `# TYPE` and label names.
const IMPLEMENTED: &[&str] = &[
    "derp_accepts",
    "derp_bytes_dropped",
    "derp_bytes_received",
    "derp_bytes_sent",
    "derp_clients_local",
    "derp_clients_remote",
    "derp_clients_total",
    "derp_current_connections",
    "derp_current_dup_client_conns",
    "derp_current_dup_client_keys",
    "derp_current_file_descriptors",
    "derp_current_home_connections",
    "derp_current_notideal_connections",
    "derp_got_ping",
    "derp_home_moves_in",
    "derp_home_moves_out",
    "derp_memstats_sys0",
    "derp_multiforwarder_created",
    "derp_multiforwarder_deleted",
    "derp_packet_forwarder_delete_other_value",
    "derp_packets_dropped",
    "derp_packets_forwarded_in",
    "derp_packets_forwarded_out",
    "derp_packets_received",
    "derp_packets_received_kind",
    "derp_packets_sent",
    "derp_peer_gone_disconnected_frames",
    "derp_peer_gone_not_here_frames",
    "derp_rate_limit_per_client_burst_bytes",
    "derp_rate_limit_per_client_bytes_per_second",
    "derp_rate_limit_per_client_waited",
    "derp_sclient_write_timeouts",
    "derp_sent_pong",
    "derp_total_dup_client_conns",
    "derp_unknown_frames",
    "derp_watchers",
    "derp_websocket_accepts",
    "process_resident_memory_bytes",
    "process_start_unix_time",
    "stun_addrfamily",
    "stun_requests",
    "uptime_sec",
    "version",
];

/// Label values that differ by nature (the version string, the binary's name).
const FREE_LABELS: &[&str] = &["version", "binary"];
/// Series derpd has beyond derper's: its own drop reasons.
const EXTRA_LABELS: &[(&str, &str)] = &[("reason", "mesh_forward"), ("reason", "queue_large")];

// ---------------------------------------------------------------------------------------------
// Prometheus text parsing

type Labels = Vec<(String, String)>;

/// One metric family: its `# TYPE`, `# HELP` and samples.
#[derive(Debug, Default)]
struct Family {
    ty: Option<String>,
    help: Option<String>,
    samples: BTreeMap<Labels, f64>,
}

impl Family {
    fn label_names(&self) -> BTreeSet<Vec<String>> {
        let names = |l: &Labels| l.iter().map(|(k, _)| k.clone()).collect();
        self.samples.keys().map(names).collect()
    }
}

/// Parses the text exposition format: `# TYPE`/`# HELP` lines, other comments, and samples
/// `name{label="value",...} value [timestamp]`. Histogram and summary samples (`_bucket`,
/// `_sum`, `_count`) belong to their family. Panics on anything malformed, a second TYPE or
/// HELP for a name, a TYPE after the name's samples, or a repeated series.
fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let ctx = || format!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix('#') {
            let mut w = rest.trim_start().splitn(3, ' ');
            let (kind, name, arg) = (w.next(), w.next(), w.next());
            match (kind, name, arg) {
                (Some("TYPE"), Some(name), Some(ty)) => {
                    assert!(valid_name(name), "{}", ctx());
                    let known = ["counter", "gauge", "histogram", "summary", "untyped"];
                    assert!(known.contains(&ty), "{}", ctx());
                    let f = fams.entry(name.to_string()).or_default();
                    assert!(f.ty.is_none() && f.samples.is_empty(), "{}", ctx());
                    f.ty = Some(ty.to_string());
                }
                (Some("HELP"), Some(name), help) => {
                    let f = fams.entry(name.to_string()).or_default();
                    assert!(f.help.is_none(), "{}", ctx());
                    f.help = Some(help.unwrap_or("").to_string());
                }
                _ => {} // other comments, e.g. derper's "# skipping expvar ..."
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (name, labels, value) = parse_sample(line).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suf| name.strip_suffix(suf))
            .find(|base| {
                fams.get(*base)
                    .and_then(|f| f.ty.as_deref())
                    .is_some_and(|t| t == "histogram" || t == "summary")
            })
            .unwrap_or(&name)
            .to_string();
        let mut labels = labels;
        if family != name {
            labels.insert(0, ("__name__".into(), name.clone()));
        }
        let f = fams.entry(family).or_default();
        assert!(
            f.samples.insert(labels, value).is_none(),
            "repeated series: {}",
            ctx()
        );
    }
    fams
}

fn valid_name(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn parse_sample(line: &str) -> Result<(String, Labels, f64), String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[end..];
    let mut labels = Labels::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let lname = rest[..eq].trim();
            if !valid_name(lname) || lname.contains(':') {
                return Err(format!("bad label name {lname:?}"));
            }
            let mut chars = rest[eq + 1..].char_indices();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut val = String::new();
            let close = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("bad escape")?.1 {
                        'n' => val.push('\n'),
                        c @ ('\\' | '"') => val.push(c),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, c) => val.push(c),
                }
            };
            if labels.iter().any(|(k, _)| k == lname) {
                return Err(format!("label {lname} repeated"));
            }
            labels.push((lname.to_string(), val));
            rest = &rest[eq + 1 + close + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let mut words = rest.split_whitespace();
    let v = words.next().ok_or("no value")?;
    let value = v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?;
    if words.next().is_some_and(|ts| ts.parse::<i64>().is_err()) || words.next().is_some() {
        return Err("junk after the value".into());
    }
    Ok((name.to_string(), labels, value))
}

// ---------------------------------------------------------------------------------------------
// HTTP over loopback

struct Resp {
    status: u16,
    head: String,
    body: String,
}

fn request(addr: SocketAddr, method: &str, target: &str, headers: &str) -> Resp {
    let raw = http_exchange(
        addr,
        format!("{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n")
            .as_bytes(),
    );
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Resp {
        status,
        head: head.to_string(),
        body: if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    }
}

/// A chunked body (Go's server streams large responses): `<hex len>\r\n<data>\r\n`…`0\r\n\r\n`.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, tail) = rest.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
}

fn varz(addr: SocketAddr) -> BTreeMap<String, Family> {
    let r = request(addr, "GET", "/debug/varz", "");
    assert_eq!(r.status, 200, "{}", r.head);
    parse(&r.body)
}

/// The value of an unlabelled sample.
fn value(v: &BTreeMap<String, Family>, name: &str) -> f64 {
    *v.get(name)
        .and_then(|f| f.samples.get(&Labels::new()))
        .unwrap_or_else(|| panic!("no {name} sample"))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Every name derpd claims is printed by the real derper, with the same TYPE, HELP and label
/// names, and derpd has at least derper's series (plus its own drop reason only).
#[test]
fn debug_varz_names_match_derper() {
    let Some(derper) = derper() else { return };
    let port = reserve_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let key = fresh_path("debug_varz", "derper.key");
    // Both with --rate-config, which adds derper's rate_limit_* metrics.
    let rate = key.with_file_name("rate.json");
    std::fs::write(&rate, r#"{"PerClientRateLimitBytesPerSec": 1000}"#).unwrap();
    let rate = rate.display().to_string();
    let args = [
        s("--rate-config"),
        rate.clone(),
        s("-a"),
        addr.to_string(),
        s("-c"),
        key.display().to_string(),
        s("-http-port"),
        s("-1"),
        s("-stun=false"),
    ];
    let mut dp = Derpd::start_command(Command::new(derper), &args);
    if let Err(e) = wait_listening(addr, support::STARTUP_DEADLINE) {
        dp.fail(&format!("derper: {e}"));
    }
    let theirs = varz(addr);
    let mut dd = Derpd::start(&[
        s("--rate-config"),
        rate.clone(),
        s("--dev"),
        s("-a"),
        s("127.0.0.1:0"),
        s("--stun-port"),
        s("0"),
    ]);
    let ours = varz(dd.startup(false).addr);

    let mut problems = Vec::new();
    for &name in IMPLEMENTED {
        let (Some(t), Some(o)) = (theirs.get(name), ours.get(name)) else {
            problems.push(format!(
                "{name}: derper has it: {}, derpd has it: {}",
                theirs.contains_key(name),
                ours.contains_key(name)
            ));
            continue;
        };
        if t.samples.is_empty() {
            problems.push(format!("{name}: derper prints no sample"));
        }
        if t.ty != o.ty {
            problems.push(format!("{name}: TYPE {:?} (derper) vs {:?}", t.ty, o.ty));
        }
        if t.help.is_some() && t.help != o.help {
            problems.push(format!(
                "{name}: HELP {:?} (derper) vs {:?}",
                t.help, o.help
            ));
        }
        if t.label_names() != o.label_names() {
            problems.push(format!(
                "{name}: label names {:?} (derper) vs {:?}",
                t.label_names(),
                o.label_names()
            ));
        }
        let fixed = |f: &Family| -> BTreeSet<Labels> {
            let keep = |l: &Labels| {
                l.iter()
                    .filter(|(k, _)| !FREE_LABELS.contains(&k.as_str()))
                    .cloned()
                    .collect()
            };
            f.samples.keys().map(keep).collect()
        };
        let (ts, os) = (fixed(t), fixed(o));
        for missing in ts.difference(&os) {
            problems.push(format!("{name}: derpd lacks the series {missing:?}"));
        }
        for extra in os.difference(&ts) {
            if !extra
                .iter()
                .any(|(k, v)| EXTRA_LABELS.contains(&(k.as_str(), v.as_str())))
            {
                problems.push(format!("{name}: derpd has an unexpected series {extra:?}"));
            }
        }
    }
    // Nothing derpd prints under derper's prefixes escapes the comparison above.
    for name in ours.keys() {
        if !name.starts_with("derpd_") && !IMPLEMENTED.contains(&name.as_str()) {
            problems.push(format!("{name}: printed by derpd but not in IMPLEMENTED"));
        }
    }
    let drops = ours["derp_packets_dropped"].samples.len();
    if drops != 18 {
        problems.push(format!(
            "derp_packets_dropped: {drops} series, want 9 reasons x 2 kinds"
        ));
    }
    if !problems.is_empty() {
        dd.fail(&format!(
            "varz differs from derper's:\n{}",
            problems.join("\n")
        ));
    }
    drop(dp);
    let _ = std::fs::remove_dir_all(key.parent().unwrap());
}

/// Counters and gauges move with traffic; derpd's own gauges are there.
#[test]
fn debug_varz_counters_move() {
    let srv = start_dev();
    let before = varz(srv.addr());
    assert_eq!(value(&before, "derp_current_connections"), 0.0);
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    a.send(&b.public(), b"hello");
    assert_eq!(b.recv_packet(), (a.public(), b"hello".to_vec()));

    let mut now = BTreeMap::new();
    wait_until("varz to count the relayed packet", || {
        now = varz(srv.addr());
        value(&now, "derp_packets_sent") >= 1.0
    });
    assert_eq!(value(&before, "derp_packets_sent"), 0.0);
    assert_eq!(value(&now, "derp_packets_sent"), 1.0);
    assert_eq!(value(&now, "derp_packets_received"), 1.0);
    assert_eq!(value(&now, "derp_bytes_sent"), 5.0);
    assert_eq!(value(&now, "derp_current_connections"), 2.0);
    assert_eq!(value(&now, "derp_clients_local"), 2.0);
    assert_eq!(value(&now, "derp_clients_total"), 2.0);
    // derper's meaning: DERP connections only; the scrapes are TCP accepts.
    assert_eq!(value(&now, "derp_accepts"), 2.0, "two DERP clients");
    assert!(
        value(&now, "derpd_tcp_accepts") >= 4.0,
        "two clients and two scrapes"
    );
    assert!(value(&now, "derp_current_file_descriptors") >= 3.0);
    let kind = &now["derp_packets_received_kind"].samples;
    assert_eq!(kind[&vec![("kind".into(), "other".into())]], 1.0);
    let allocated = &now["derpd_pool_buffers_allocated"].samples;
    assert!(allocated[&vec![("class".into(), "small".into())]] >= 1.0);
    assert!(value(&now, "derpd_pool_budget_bytes") > 0.0);

    drop(a);
    wait_until("derp_current_connections to fall to 1", || {
        value(&varz(srv.addr()), "derp_current_connections") == 1.0
    });
}

/// The pages and derper's rule for a loopback peer, in process (no environment knobs).
#[test]
fn debug_pages_over_loopback() {
    let srv = start_dev();
    let addr = srv.addr();

    let r = request(addr, "GET", "/debug/", "");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.head.contains("Content-Type: text/html; charset=utf-8"),
        "{}",
        r.head
    );
    assert!(r.head.contains("X-Frame-Options: DENY"), "{}", r.head);
    for want in [
        "<b>Uptime:</b>",
        "<b>Version:</b>",
        "<b>Mesh key:</b> false",
        "/debug/varz",
        "/debug/check",
    ] {
        assert!(r.body.contains(want), "{want} in {}", r.body);
    }
    let h = request(addr, "HEAD", "/debug/", "");
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty(), "HEAD has no body: {:?}", h.body);
    assert!(
        h.head
            .contains(&format!("Content-Length: {}", r.body.len())),
        "{}",
        h.head
    );

    let v = request(addr, "HEAD", "/debug/varz", "");
    assert!(v.status == 200 && v.body.is_empty(), "{}", v.head);
    let c = request(addr, "GET", "/debug/check", "");
    assert_eq!(
        (c.status, c.body.as_str()),
        (200, "derp.Server ConsistencyCheck okay")
    );
    let n = request(addr, "GET", "/debug/pprof/", "");
    assert_eq!((n.status, n.body.as_str()), (404, "404 page not found\n"));
    let d = request(addr, "GET", "/debug?x=1", "");
    assert_eq!(d.status, 307, "{}", d.head);
    assert!(d.head.contains("\r\nLocation: /debug/?x=1"), "{}", d.head);

    // Behind a proxy the peer address proves nothing: denied, even from loopback.
    for path in ["/debug/", "/debug/varz", "/debug/nope"] {
        let f = request(addr, "GET", path, "X-Forwarded-For: 127.0.0.1\r\n");
        assert_eq!(
            (f.status, f.body.as_str()),
            (403, "debug access denied\n"),
            "{path}"
        );
    }
}

/// In TLS mode the port-80 listener serves `/debug…` like the main one (derper's
/// `Port80Handler`), and still redirects everything else.
#[test]
fn debug_on_port_80() {
    let dir = fresh_path("debug_port80", "certs");
    let mut cfg = derpd::config::Config::dev_loopback();
    cfg.tls = Some(derpd::config::TlsMode {
        hostname: "127.0.0.1".into(),
        certdir: dir.clone(),
    });
    cfg.http_port = Some(0);
    let srv = inproc::start(cfg);
    let a = srv.http_addr().unwrap();
    let r = request(a, "GET", "/debug/", "");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.body.contains("<b>TLS hostname:</b> 127.0.0.1"),
        "{}",
        r.body
    );
    assert_eq!(request(a, "GET", "/debug/varz", "").status, 200);
    let f = request(a, "GET", "/debug/varz", "X-Forwarded-For: 1.2.3.4\r\n");
    assert_eq!(f.status, 403);
    assert_eq!(request(a, "GET", "/debug", "").status, 307);
    let d = request(a, "GET", "/derp", "");
    assert!(
        d.head
            .starts_with("HTTP/1.1 302 Found\r\nLocation: https://x/derp\r\n"),
        "{}",
        d.head
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// `TS_DEBUG_KEY_PATH`: the right `?debugkey=` opens `/debug/` even behind a proxy.
#[test]
fn debug_key_from_env() {
    let keyfile = fresh_path("debug_key", "debug.key");
    std::fs::write(&keyfile, "  k3y/with space \n").unwrap();
    let mut cmd = derpd_command();
    cmd.env("TS_DEBUG_KEY_PATH", &keyfile)
        .env("TS_DEBUG_TRUSTED_CIDRS", "192.0.2.0/24")
        .env_remove("TS_ALLOW_DEBUG_IP");
    let mut d = Derpd::start_command(
        cmd,
        &[
            s("--dev"),
            s("-a"),
            s("127.0.0.1:0"),
            s("--stun-port"),
            s("0"),
        ],
    );
    let addr = d.startup(false).addr;
    let xff = "X-Forwarded-For: 203.0.113.1\r\n";
    let cases = [
        ("GET", "/debug/varz", "", 200),
        ("GET", "/debug/varz", xff, 403),
        ("GET", "/debug/varz?debugkey=k3y%2Fwith+space", xff, 200),
        ("GET", "/debug/?debugkey=k3y%2Fwith%20space", xff, 200),
        ("GET", "/debug/varz?debugkey=k3y", xff, 403),
        ("HEAD", "/debug/varz?debugkey=k3y%2Fwith+space", xff, 403),
    ];
    for (method, target, headers, want) in cases {
        let r = request(addr, method, target, headers);
        if r.status != want {
            d.fail(&format!(
                "{method} {target} {headers:?}: {} want {want}",
                r.head
            ));
        }
    }
    d.expect_running();
    drop(d);
    let _ = std::fs::remove_dir_all(keyfile.parent().unwrap());
}

/// A bad `TS_DEBUG_TRUSTED_CIDRS` stops derpd at start (derper exits at the first request
/// that needs it).
#[test]
fn debug_bad_trusted_cidrs_is_a_start_error() {
    let mut cmd = derpd_command();
    cmd.env("TS_DEBUG_TRUSTED_CIDRS", "10.0.0.0/8,bogus");
    let args = [
        s("--dev"),
        s("-a"),
        s("127.0.0.1:0"),
        s("--stun-port"),
        s("0"),
    ];
    let mut d = Derpd::start_command(cmd, &args);
    d.wait_until("the CIDR error", support::STARTUP_DEADLINE, |log| {
        log.iter()
            .any(|l| l.contains("invalid CIDR in TS_DEBUG_TRUSTED_CIDRS: \"bogus\""))
    });
    let deadline = Instant::now() + support::STARTUP_DEADLINE;
    loop {
        match d.child.try_wait().unwrap() {
            Some(status) => {
                assert!(!status.success());
                break;
            }
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => d.fail("derpd still running after a start error"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The access rule from addresses other than loopback, in a network namespace

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

/// `/debug/derpmap` (derpd's own page, read by the LuCI page's rpcd plugin) holds the DERPMap
/// entry the log shows, in the same three forms, under the same access rule; plain HTTP mode
/// has none.
#[test]
fn derpmap_page_matches_the_log() {
    let dir = fresh_path("debug_derpmap", "files");
    std::fs::create_dir_all(&dir).unwrap();
    let args = [
        s("--hostname=127.0.0.1"),
        s("--certmode=manual"),
        format!("--certdir={}", dir.join("certs").display()),
        format!("-c={}", dir.join("derpd.key").display()),
        s("-a=127.0.0.1:0"),
        s("--http-port=0"),
        s("--stun-port=0"),
    ];
    let mut d = Derpd::start(&args);
    let snippets = d.derp_map_snippets();
    d.wait_until("the port-80 listener line", Duration::from_secs(5), |log| {
        log.iter().any(|l| l.contains("port-80 listener on "))
    });
    let http = d
        .log
        .iter()
        .find_map(|l| {
            let rest = &l[l.find("port-80 listener on ")? + "port-80 listener on ".len()..];
            rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
        })
        .unwrap();
    let r = request(http, "GET", "/debug/derpmap", "");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.head.contains("Content-Type: application/json"),
        "{}",
        r.head
    );
    let page: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let node: serde_json::Value = serde_json::from_str(&snippets.node_json).unwrap();
    assert_eq!(page["node"], node);
    assert_eq!(page["region"]["Nodes"][0], node);
    assert_eq!(
        format!("{}\n", page["policy_file"].as_str().unwrap()),
        snippets.policy
    );
    assert_eq!(
        format!("{}\n", page["headscale_yaml"].as_str().unwrap()),
        snippets.headscale_yaml
    );
    let f = request(
        http,
        "GET",
        "/debug/derpmap",
        "X-Forwarded-For: 1.2.3.4\r\n",
    );
    assert_eq!(f.status, 403);

    let plain = start_dev();
    let r = request(plain.addr(), "GET", "/debug/derpmap", "");
    assert_eq!(r.status, 404, "{}", r.head);
}
