#![allow(clippy::unwrap_used, clippy::expect_used)]
//! luci-app-derpd (openwrt/luci-app-derpd) in a real browser: headless Chromium loads the view
//! into a stand-in of LuCI's JavaScript runtime (tests/luci/luci.js) and a script
//! (tests/luci/driver.js) uses the page as a person would. This test answers the page's
//! JSON-RPC calls to `/ubus/` as rpcd would: `uci get/set/delete/commit` on a config read from
//! openwrt/files/derpd.config, `service list`, and `luci.derpd status` by running the app's own
//! rpcd plugin, which fetches the metrics and DERPMap entry from a real derpd started here
//! (TLS, self-signed IP certificate, two DERP clients relaying). It fails on a JavaScript error,
//! a UCI option without a field (or a field without an option), a status or DERPMap value that
//! differs from derpd's, and any UCI write other than those LuCI makes for the edits (the
//! stand-in follows LuCI's rules for which fields it writes and removes). The page's screenshot is
//! kept as target/luci-test/derpd-luci.png.
//!
//! Needs `chromium` (scripts/ensure-chromium.sh installs Debian's package), `sh` and `wget`;
//! without them it prints SKIPPED and passes, except under `CI=true`, where it fails.
//! Chromium reaches nothing but loopback: the page test runs in a network namespace of its own
//! with only `lo` up (`unshare --net`, as root; elsewhere in the caller's), and Chromium runs
//! with a dead proxy for every other address, every host name unresolvable and background
//! networking off.

use crate::support;
use crate::support::inproc;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::inproc::DerpClient;
use crate::support::{find_program, run_bounded, s, skip_test};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const APP: &str = "openwrt/luci-app-derpd";
const PLUGIN: &str = "root/usr/libexec/rpcd/luci.derpd";
/// How long the page may take from start to its report (Chromium's start included).
const PAGE_DEADLINE: Duration = Duration::from_secs(90);

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

// ---------------------------------------------------------------------------------------------
// UCI: the shipped config, as rpcd's `uci get` returns it

/// Options of one section, in file order: a string, or a list of strings.
type Section = BTreeMap<String, Value>;

/// `config derpd 'main'` of openwrt/files/derpd.config: options (`option`, `list`) in order.
fn shipped_config() -> (Vec<String>, Section) {
    let text = std::fs::read_to_string(path("openwrt/files/derpd.config")).unwrap();
    let mut order = Vec::new();
    let mut sec = Section::new();
    let mut in_main = false;
    for line in text.lines().map(str::trim) {
        let words = uci_words(line);
        match words.first().map(String::as_str) {
            Some("config") => in_main = words.get(2).map(String::as_str) == Some("main"),
            Some("option") if in_main => {
                order.push(words[1].clone());
                sec.insert(
                    words[1].clone(),
                    json!(words.get(2).cloned().unwrap_or_default()),
                );
            }
            Some("list") if in_main => {
                if !order.contains(&words[1]) {
                    order.push(words[1].clone());
                }
                let e = sec.entry(words[1].clone()).or_insert_with(|| json!([]));
                e.as_array_mut().unwrap().push(json!(words[2]));
            }
            _ => {}
        }
    }
    // Commented-out lists are options too (`#list mesh_with '...'`): the page must offer them.
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("#list ").or(line.strip_prefix("# list ")) {
            let name = rest.split_whitespace().next().unwrap().to_string();
            if !order.contains(&name) {
                order.push(name);
            }
        }
    }
    (order, sec)
}

/// A UCI line's words, quotes removed (enough for the shipped file: no escapes).
fn uci_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() || rest.starts_with('#') {
            return out;
        }
        if let Some(r) = rest.strip_prefix('\'') {
            let end = r.find('\'').unwrap();
            out.push(r[..end].to_string());
            rest = &r[end + 1..];
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in of uhttpd + rpcd

#[derive(Debug, Default)]
struct Rpcd {
    /// Every ubus call the page made, in order: (object, method, args); marks from the driver
    /// as ("mark", name, null).
    calls: Vec<(String, String, Value)>,
    /// The config with this session's changes (what `uci get` returns) and the committed one.
    staged: Section,
    committed: Section,
    js_errors: Vec<String>,
    plugin_errors: Vec<String>,
    report: Option<Value>,
}

struct Env {
    rpcd: Mutex<Rpcd>,
    plugin: Plugin,
    derpd_pid: u32,
    done: Mutex<Option<mpsc::Sender<()>>>,
}

fn serve(listener: TcpListener, env: Arc<Env>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let env = env.clone();
        std::thread::spawn(move || {
            let _ = handle(conn, &env);
        });
    }
}

fn handle(conn: TcpStream, env: &Env) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let file = |rel: &str, ctype: &str| (200, ctype.to_string(), std::fs::read(path(rel)));
    let (status, ctype, content) = match (method.as_str(), target.as_str()) {
        ("GET", "/") => file("tests/luci/index.html", "text/html; charset=utf-8"),
        ("GET", "/test/luci.js") => file("tests/luci/luci.js", "application/javascript"),
        ("GET", "/test/driver.js") => file("tests/luci/driver.js", "application/javascript"),
        ("GET", "/test/style.css") => file("tests/luci/style.css", "text/css"),
        ("GET", t) if t.starts_with("/luci-static/resources/") => {
            let rel = format!("{APP}/htdocs{t}");
            if t.contains("..") || !path(&rel).is_file() {
                (404, "text/plain".into(), Ok(b"not found".to_vec()))
            } else {
                file(&rel, "application/javascript")
            }
        }
        ("GET", "/test/cases") => (
            200,
            "application/json".into(),
            Ok(validation_cases().to_string().into_bytes()),
        ),
        ("POST", "/ubus/") => {
            let reply = ubus(env, &body);
            (
                200,
                "application/json".into(),
                Ok(reply.to_string().into_bytes()),
            )
        }
        ("POST", "/test/error") => {
            env.rpcd.lock().unwrap().js_errors.push(body.to_string());
            (200, "text/plain".into(), Ok(Vec::new()))
        }
        ("POST", "/test/mark") => {
            let name = body["name"].as_str().unwrap_or("").to_string();
            let mut rpcd = env.rpcd.lock().unwrap();
            rpcd.calls.push(("mark".into(), name, Value::Null));
            (200, "text/plain".into(), Ok(Vec::new()))
        }
        ("POST", "/test/report") => {
            env.rpcd.lock().unwrap().report = Some(body);
            if let Some(tx) = env.done.lock().unwrap().take() {
                let _ = tx.send(());
            }
            (200, "text/plain".into(), Ok(Vec::new()))
        }
        _ => (404, "text/plain".into(), Ok(b"not found".to_vec())),
    };
    let content = content.unwrap_or_else(|e| e.to_string().into_bytes());
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        content.len()
    )?;
    w.write_all(&content)?;
    w.flush()
}

/// One JSON-RPC 2.0 request (or a batch) to ubus, answered as rpcd does: `[0, data]`, or
/// `[status]` on failure.
fn ubus(env: &Env, req: &Value) -> Value {
    if let Some(batch) = req.as_array() {
        return Value::Array(batch.iter().map(|r| ubus(env, r)).collect());
    }
    let p = &req["params"];
    let (object, method, args) = (
        p[1].as_str().unwrap_or(""),
        p[2].as_str().unwrap_or(""),
        p[3].clone(),
    );
    let result = call(env, object, method, &args);
    env.rpcd
        .lock()
        .unwrap()
        .calls
        .push((object.into(), method.into(), args));
    json!({"jsonrpc": "2.0", "id": req["id"], "result": result})
}

fn call(env: &Env, object: &str, method: &str, args: &Value) -> Value {
    const NOT_FOUND: i64 = 4;
    const INVALID: i64 = 2;
    let derpd_only = args["config"] == "derpd";
    match (object, method) {
        ("uci", "get") if derpd_only => {
            let rpcd = env.rpcd.lock().unwrap();
            let mut main = serde_json::Map::new();
            main.insert(".anonymous".into(), json!(false));
            main.insert(".type".into(), json!("derpd"));
            main.insert(".name".into(), json!("main"));
            main.insert(".index".into(), json!(0));
            for (k, v) in &rpcd.staged {
                main.insert(k.clone(), v.clone());
            }
            json!([0, {"values": {"main": main}}])
        }
        ("uci", "set") if derpd_only && args["section"] == "main" => {
            let mut rpcd = env.rpcd.lock().unwrap();
            for (k, v) in args["values"].as_object().into_iter().flatten() {
                let ok =
                    v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
                if !ok {
                    return json!([INVALID]);
                }
                rpcd.staged.insert(k.clone(), v.clone());
            }
            json!([0])
        }
        ("uci", "delete") if derpd_only && args["section"] == "main" => {
            let mut rpcd = env.rpcd.lock().unwrap();
            let mut names: Vec<&Value> = args["options"].as_array().into_iter().flatten().collect();
            names.extend(args.get("option"));
            for n in names {
                rpcd.staged.remove(n.as_str().unwrap_or(""));
            }
            json!([0])
        }
        ("uci", "commit") if derpd_only => {
            let mut rpcd = env.rpcd.lock().unwrap();
            rpcd.committed = rpcd.staged.clone();
            json!([0])
        }
        ("service", "list") => {
            if args["name"] != "derpd" {
                return json!([0, {}]);
            }
            json!([0, {"derpd": {"instances": {"instance1": {
                "running": true,
                "pid": env.derpd_pid,
                "command": ["/usr/sbin/derpd", "--config=/etc/derpd/derper.key"],
                "respawn": {"threshold": 3600, "timeout": 5, "retry": 5}
            }}}}])
        }
        ("luci.derpd", "status") => match env.plugin.run(&["call", "status"]) {
            Ok(v) => json!([0, v]),
            Err(e) => {
                env.rpcd.lock().unwrap().plugin_errors.push(e);
                json!([INVALID])
            }
        },
        _ => json!([NOT_FOUND]),
    }
}

/// The app's rpcd plugin, run as rpcd runs it, with stand-ins first on PATH: `uci` answering
/// `uci -q get derpd.main.OPTION` from a fixed list, and busybox's `awk` (OpenWrt's shell and
/// awk are busybox's; without a busybox, /bin/sh and the host's awk).
struct Plugin {
    shim_dir: PathBuf,
    busybox: Option<PathBuf>,
}

impl Plugin {
    fn new(dir: &Path, uci: &[(&str, String)]) -> Plugin {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let mut script = String::from(
            "#!/bin/sh\n# uci -q get derpd.main.OPTION, for the rpcd plugin under test\ncase \"$3\" in\n",
        );
        for (k, v) in uci {
            script.push_str(&format!("derpd.main.{k}) echo '{v}' ;;\n"));
        }
        script.push_str("*) exit 1 ;;\nesac\n");
        let shim = dir.join("uci");
        std::fs::write(&shim, script).unwrap();
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let busybox = find_program("busybox");
        if let Some(b) = &busybox {
            let awk = dir.join("awk");
            std::fs::write(
                &awk,
                format!("#!/bin/sh\nexec {} awk \"$@\"\n", b.display()),
            )
            .unwrap();
            std::fs::set_permissions(&awk, std::fs::Permissions::from_mode(0o755)).unwrap();
        } else {
            skip_test(
                "busybox not found",
                "the rpcd plugin under busybox sh and awk",
            );
        }
        Plugin {
            shim_dir: dir.to_path_buf(),
            busybox,
        }
    }

    /// `luci.derpd ARGS` (`list`, `call status`); its output must be one JSON object.
    fn run(&self, args: &[&str]) -> Result<Value, String> {
        let path_var = format!(
            "{}:{}",
            self.shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (sh, mut argv) = match &self.busybox {
            Some(b) => (b.clone(), vec![s("sh")]),
            None => (PathBuf::from("/bin/sh"), vec![]),
        };
        argv.push(path(&format!("{APP}/{PLUGIN}")).display().to_string());
        argv.extend(args.iter().map(|s| s.to_string()));
        let (status, out, err) =
            run_bounded(&sh, &argv, &[("PATH", &path_var)], Duration::from_secs(20));
        if status.is_none_or(|s| !s.success()) {
            return Err(format!("plugin {args:?}: {status:?}, stderr {err:?}"));
        }
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| format!("plugin {args:?} printed no JSON ({e}): {out:?}"))?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(format!("plugin {args:?}: not an object: {out}"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// derpd with two clients, over TLS

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_client(addr: SocketAddr) -> DerpClient<Tls> {
    let conn = inproc::tls_client_conn();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(inproc::IO_TIMEOUT)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    let mut c = DerpClient::new_raw(s);
    c.login_upgrade(br#"{"version":2}"#).unwrap();
    c
}

/// The body of a GET on derpd's port-80 listener.
fn http_get(addr: SocketAddr, target: &str) -> String {
    let raw = inproc::http_exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
    body.to_string()
}

// ---------------------------------------------------------------------------------------------

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DERPD_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| support::is_executable(p));
    }
    find_program("chromium").or_else(|| find_program("chromium-browser"))
}

/// Runs [`page_test`] in a network namespace of its own where only loopback is up (so that
/// Chromium cannot reach anything else whatever it tries), or, where namespaces cannot be made
/// (not root), here, with Chromium's flags alone keeping it to loopback.
#[test]
fn luci_page_in_chromium() {
    if !prerequisites() {
        return;
    }
    match support::can_unshare_net() {
        Ok(()) => {
            let mut inner = support::this_test_binary();
            inner.args([
                "--exact",
                support::child_test(module_path!(), "luci_page_child").as_str(),
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ]);
            let cmd = support::in_new_netns(&inner);
            let args: Vec<String> = cmd
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let (status, out, err) = run_bounded(
                Path::new(cmd.get_program()),
                &args,
                &[("DERPD_LUCI_CHILD", "1")],
                PAGE_DEADLINE * 2,
            );
            println!("{out}\n{err}");
            assert!(
                status.is_some_and(|s| s.success()) && out.contains("test result: ok. 1 passed"),
                "the page test in its network namespace failed ({status:?}):\n{out}\n{err}"
            );
        }
        Err(why) => {
            println!("note: {why}: the page test runs in this network namespace");
            page_test();
        }
    }
}

#[test]
#[ignore = "run by luci_page_in_chromium, in a network namespace of its own"]
fn luci_page_child() {
    if std::env::var_os("DERPD_LUCI_CHILD").is_some() {
        page_test();
    }
}

/// Chromium and a fetcher for the rpcd plugin; without them a SKIPPED line (a failure under
/// `CI=true`).
fn prerequisites() -> bool {
    let what = "the LuCI page test (tests/packages/luci.rs)";
    if chromium().is_none() {
        skip_test(
            "chromium not found (scripts/ensure-chromium.sh installs Debian's package)",
            what,
        );
        return false;
    }
    if find_program("wget").is_none() && find_program("uclient-fetch").is_none() {
        skip_test(
            "neither wget nor uclient-fetch found (the rpcd plugin fetches with them)",
            what,
        );
        return false;
    }
    true
}

/// The page in Chromium: see the file's head.
fn page_test() {
    assert!(prerequisites(), "checked by luci_page_in_chromium");
    let chromium = chromium().unwrap();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../luci-test");
    std::fs::create_dir_all(&out_dir).unwrap();
    let work = support::fresh_path("luci", "work");
    std::fs::create_dir_all(&work).unwrap();

    // derpd: TLS with a self-signed certificate for 127.0.0.1, a port-80 listener, STUN.
    let mut cfg = derpd::config::Config::dev_loopback();
    cfg.tls = Some(derpd::config::TlsMode {
        hostname: "127.0.0.1".into(),
        certdir: work.join("certs"),
    });
    cfg.http_port = Some(0);
    let srv = inproc::start(cfg);
    let (main, http) = (srv.addr(), srv.http_addr().unwrap());
    let mut a = tls_client(main);
    let mut b = tls_client(main);
    let payload = vec![7u8; 1000];
    for _ in 0..3 {
        a.send(&b.public(), &payload);
        assert_eq!(b.recv_packet().1, payload);
    }
    let derp_map: Value = serde_json::from_str(&http_get(http, "/debug/derpmap")).unwrap();

    // The `uci` the plugin calls: derpd's listeners as UCI options.
    let plugin = Plugin::new(
        &work.join("bin"),
        &[
            ("addr", format!("127.0.0.1:{}", main.port())),
            ("certmode", s("manual")),
            ("http_port", http.port().to_string()),
        ],
    );

    let (options, shipped) = shipped_config();
    let (tx, rx) = mpsc::channel();
    let env = Arc::new(Env {
        rpcd: Mutex::new(Rpcd {
            staged: shipped.clone(),
            committed: shipped.clone(),
            ..Rpcd::default()
        }),
        plugin,
        derpd_pid: std::process::id(),
        done: Mutex::new(Some(tx)),
    });

    // The plugin on its own: `list` names its method, `status` reads derpd.
    let list = env.plugin.run(&["list"]).unwrap();
    assert_eq!(list, json!({"status": {}}));
    let st = env.plugin.run(&["call", "status"]).unwrap();
    assert_eq!(st["url"], format!("http://127.0.0.1:{}", http.port()));
    assert_eq!(st["metrics"]["derp_clients_local"], 2, "{st}");
    assert_eq!(st["metrics"]["derp_packets_received_kind/other"], 3, "{st}");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["derpmap"], derp_map);
    assert!(st.get("error").is_none(), "{st}");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let e2 = env.clone();
    std::thread::spawn(move || serve(listener, e2));

    let shot = out_dir.join("derpd-luci.png");
    let _ = std::fs::remove_file(&shot);
    let mut child = Command::new(&chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-domain-reliability",
            "--no-pings",
            "--metrics-recording-only",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--hide-scrollbars",
            "--window-size=1000,1700",
            "--virtual-time-budget=60000",
            // The page's console messages, for the failure report.
            "--enable-logging=stderr",
            "--log-level=0",
        ])
        .arg(format!(
            "--user-data-dir={}",
            work.join("chromium").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut chromium_log = String::new();
    let mut errs = child.stderr.take().unwrap();
    let log_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = errs.read_to_string(&mut s);
        s
    });
    let got = rx.recv_timeout(PAGE_DEADLINE);
    // Chromium writes the screenshot when its virtual time budget is spent, then exits.
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = loop {
        match child.try_wait().unwrap() {
            Some(s) => break Some(s),
            None if Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Ok(s) = log_reader.join() {
        chromium_log = s;
    }
    drop(srv);

    let rpcd = env.rpcd.lock().unwrap();
    let context = || {
        format!(
            "\n== JavaScript errors ==\n{:#?}\n== plugin errors ==\n{:#?}\n== ubus calls ==\n{:#?}\n== report ==\n{:#}\n== chromium ({exited:?}) ==\n{}",
            rpcd.js_errors,
            rpcd.plugin_errors,
            rpcd.calls,
            rpcd.report.clone().unwrap_or_default(),
            chromium_log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    assert!(
        got.is_ok(),
        "the page sent no report within {PAGE_DEADLINE:?}{}",
        context()
    );
    assert!(rpcd.js_errors.is_empty(), "JavaScript errors{}", context());
    assert!(
        rpcd.plugin_errors.is_empty(),
        "rpcd plugin errors{}",
        context()
    );
    let report = rpcd.report.clone().unwrap();
    assert!(
        report.get("driver_error").is_none(),
        "driver failed{}",
        context()
    );

    check_page(&report, &options, &shipped, &derp_map, &context);
    check_writes(&rpcd, &shipped, &context);
    check_validation(&report, &context);

    assert!(
        exited.is_some_and(|s| s.success()),
        "chromium did not exit cleanly{}",
        context()
    );
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "no screenshot at {}{}",
        shot.display(),
        context()
    );
    println!("screenshot: {} ({} bytes)", shot.display(), png.len());
}

/// What the page showed: tabs, a field for every option with the shipped value, status and
/// DERPMap from derpd, validation of bad input.
fn check_page(
    report: &Value,
    options: &[String],
    shipped: &Section,
    derp_map: &Value,
    context: &dyn Fn() -> String,
) {
    let tabs: Vec<&str> = report["tabs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        tabs,
        ["Relay", "Certificates", "Mesh", "Who may connect", "Limits"],
        "{}",
        context()
    );
    let fields = report["initial"]["fields"].as_array().unwrap();
    let names: Vec<&str> = fields.iter().filter_map(|f| f["name"].as_str()).collect();
    for o in options {
        assert!(
            names.contains(&o.as_str()),
            "UCI option {o} has no field on the page{}",
            context()
        );
    }
    for n in &names {
        assert!(
            options.iter().any(|o| o == n),
            "field {n} is no option of derpd.config{}",
            context()
        );
    }
    assert_eq!(names.len(), options.len(), "a field twice?{}", context());
    for f in fields {
        let name = f["name"].as_str().unwrap();
        let want = shipped.get(name).cloned();
        let shown = &f["value"];
        match f["widget"].as_str().unwrap() {
            "CBI.DynamicList" => assert_eq!(shown, &want.unwrap_or(json!([]))),
            _ => assert_eq!(
                shown,
                &want.unwrap_or(json!("")),
                "field {name} shows {shown}{}",
                context()
            ),
        }
    }
    let tab_of = |n: &str| {
        fields.iter().find(|f| f["name"] == n).unwrap()["tab"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(tab_of("hostname"), "relay");
    assert_eq!(tab_of("certdir"), "certs");
    assert_eq!(tab_of("mesh_with"), "mesh");
    assert_eq!(tab_of("allow_keys_file"), "access");
    assert_eq!(tab_of("max_clients"), "limits");

    let st = &report["initial"]["status"];
    assert_eq!(
        st["running"],
        format!("running (PID {})", std::process::id()),
        "{}",
        context()
    );
    assert!(
        st["version"]
            .as_str()
            .unwrap()
            .starts_with(env!("CARGO_PKG_VERSION")),
        "{}",
        context()
    );
    assert_eq!(st["clients"], "2", "{}", context());
    assert!(st["error"].is_null(), "{}", context());
    assert_eq!(st["policy"], derp_map["policy_file"], "{}", context());
    assert_eq!(st["headscale"], derp_map["headscale_yaml"], "{}", context());
    let node: Value = serde_json::from_str(st["node"].as_str().unwrap()).unwrap();
    assert_eq!(node, derp_map["node"]);
    assert!(node["CertName"]
        .as_str()
        .unwrap()
        .starts_with("sha256-raw:"));
    let region: Value = serde_json::from_str(st["region"].as_str().unwrap()).unwrap();
    assert_eq!(region, derp_map["region"]);
    let fin = &report["final_status"];
    assert!(
        fin["traffic"].as_str().unwrap().contains("/s"),
        "no rates after a poll{}",
        context()
    );

    let steps = report["steps"].as_array().unwrap();
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no step {name}{}", context()))
    };
    let inv = step("invalid");
    assert_eq!(inv["action"], "cbi-button-save:failed", "{}", context());
    let mut invalid: Vec<&str> = inv["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    invalid.sort_unstable();
    assert_eq!(
        invalid,
        ["handshake_timeout", "hostname", "http_port"],
        "{}",
        context()
    );
    assert!(
        inv["notification"]
            .as_str()
            .unwrap_or("")
            .contains("invalid"),
        "{}",
        context()
    );
    let edited = step("edited");
    assert_eq!(
        edited["bad_list_items"],
        0,
        "an invalid mesh_with entry was added{}",
        context()
    );
    let visible = |fs: &Value, n: &str| {
        fs.as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == n)
            .unwrap()["visible"]
            .clone()
    };
    assert_eq!(
        visible(&edited["fields"], "socket"),
        json!(true),
        "socket hidden with verify_clients on"
    );
    assert_eq!(
        visible(&edited["fields"], "stun_port"),
        json!(false),
        "stun_port shown with STUN off"
    );
    let saved = step("saved");
    assert_eq!(saved["action"], "cbi-button-apply:ok", "{}", context());
    let after = saved["fields"].as_array().unwrap();
    let value = |n: &str| after.iter().find(|f| f["name"] == n).unwrap()["value"].clone();
    assert_eq!(
        value("hostname"),
        "192.0.2.10",
        "the page does not show the saved value"
    );
    assert_eq!(value("certdir"), "");
}

/// Values to type into fields whose checks mirror derpd's own parsers (no host names in
/// `addr`: derpd would resolve them).
fn validation_cases() -> Value {
    let pin = "ab".repeat(32);
    json!({
        "addr": [":443", "127.0.0.1:3340", "[::1]:443", "[2001:db8::1]:8443",
            "[::ffff:1.2.3.4]:80", ":0", ":99999", "443", "1.2.3.4", ":", "[::1]",
            "[1:2:3:4:5:6:7:8:9]:1", "1.2.3.4:65536"],
        "http_port": ["80", "-1", "0", "65535", "08", "65536", "-2", "eighty", " 80"],
        "handshake_timeout": ["10s", "1m30s", "500ms", "1.5h", "0", ".5s", "5.s", "250us",
            "10", "10 s", "-1s", "1d", "s", "."],
        "mesh_with": ["derp2.example.com", "derp2.example.com:8443",
            "derp2.example.com/203.0.113.9", format!("[2001:db8::1]:443/sha256-raw:{pin}"),
            "d.example.com/[2001:db8::2]", "d.example.com/2001:db8::2",
            format!("d.example.com/sha256-raw:{pin}/10.0.0.2"),
            "a/b/c", "host/sha256-raw:12", "bad peer!", "d.example.com/10.0.0.1:443",
            "d.example.com:0", "2001:db8::1",
            format!("d.example.com/sha256-raw:{pin}/sha256-raw:{pin}")],
    })
}

/// Whether derpd itself takes `value` for the UCI option (what the init script passes on).
fn derpd_accepts(option: &str, value: &str) -> bool {
    use derpd::config::{parse_go_duration, parse_listen};
    match option {
        "addr" => parse_listen(value).is_ok(),
        "http_port" => value
            .parse::<i32>()
            .is_ok_and(|p| p == -1 || u16::try_from(p).is_ok()),
        "handshake_timeout" => parse_go_duration(value).is_ok(),
        "mesh_with" => derpd::config::MeshPeer::parse(value).is_ok(),
        _ => unreachable!("{option}"),
    }
}

/// The page accepts exactly the values derpd accepts, for every case.
fn check_validation(report: &Value, context: &dyn Fn() -> String) {
    let probes = report["probes"]
        .as_object()
        .unwrap_or_else(|| panic!("no probes{}", context()));
    let cases = validation_cases();
    for (opt, values) in cases.as_object().unwrap() {
        let got = probes[opt].as_array().unwrap();
        assert_eq!(got.len(), values.as_array().unwrap().len(), "{opt}");
        for p in got {
            let (v, page) = (p[0].as_str().unwrap(), p[1].as_bool().unwrap());
            assert_eq!(
                page,
                derpd_accepts(opt, v),
                "{opt} {v:?}: the page {} it, derpd {}",
                if page { "accepts" } else { "refuses" },
                if page { "does not" } else { "does" },
            );
        }
    }
}

/// The UCI writes: none for the invalid attempt; for Save & Apply, as LuCI's form and uci
/// modules make them, one `set` with the edited values and every flag (LuCI writes an active
/// flag whether or not it changed), one `delete` of the cleared option and of the options
/// the shipped config has empty (LuCI removes empty fields), and a commit.
fn check_writes(rpcd: &Rpcd, shipped: &Section, context: &dyn Fn() -> String) {
    let mark = |n: &str| {
        rpcd.calls
            .iter()
            .position(|c| c.0 == "mark" && c.1 == n)
            .unwrap_or_else(|| panic!("no mark {n}{}", context()))
    };
    let (m1, m2) = (mark("invalid-save"), mark("save-apply"));
    let writes = |calls: &[(String, String, Value)]| -> Vec<(String, Value)> {
        calls
            .iter()
            .filter(|c| c.0 == "uci" && c.1 != "get")
            .map(|c| (c.1.clone(), c.2.clone()))
            .collect()
    };
    assert!(
        rpcd.calls[..m1]
            .iter()
            .all(|c| c.0 != "uci" || c.1 == "get"),
        "writes before any edit{}",
        context()
    );
    assert_eq!(
        writes(&rpcd.calls[m1..m2]),
        [],
        "the invalid form was written{}",
        context()
    );
    let peer = format!(
        "derp2.example.com/203.0.113.9/sha256-raw:{}",
        "ab".repeat(32)
    );
    let set = json!({"config": "derpd", "section": "main", "values": {
        // edited
        "hostname": "192.0.2.10",
        "http_port": "8080",
        "stun": "0",
        "log_level": "debug",
        "mesh_with": [peer],
        "verify_clients": "1",
        "max_clients": "100",
        "handshake_timeout": "30s",
        // the other flags, unchanged
        "enabled": "0",
        "derp": "1",
        "meta_cert": "1",
        "firewall": "1",
        "verify_client_url_fail_open": "1",
    }});
    let mut deleted = vec![
        "certdir", // cleared
        "home",
        "verify_client_url",
        "allow_keys_file",
        "mesh_psk_file",
        "accept_connection_limit",
        "accept_connection_burst",
        "rate_config",
    ];
    deleted.sort_unstable();
    // `set` and `delete` go out together (in either order), then the commit.
    let mut got = writes(&rpcd.calls[m2..]);
    got.sort_by_key(|(m, _)| match m.as_str() {
        "set" => 0,
        "delete" => 1,
        _ => 2,
    });
    if let Some(opts) = got
        .get_mut(1)
        .and_then(|d| d.1.get_mut("options"))
        .and_then(Value::as_array_mut)
    {
        opts.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
    let want = vec![
        ("set".to_string(), set.clone()),
        (
            "delete".to_string(),
            json!({"config": "derpd", "section": "main", "options": deleted}),
        ),
        ("commit".to_string(), json!({"config": "derpd"})),
    ];
    assert_eq!(got, want, "{}", context());
    let commit = rpcd.calls.iter().rposition(|c| c.1 == "commit").unwrap();
    assert!(
        rpcd.calls[commit + 1..]
            .iter()
            .all(|c| c.0 != "uci" || c.1 == "get"),
        "writes after the commit{}",
        context()
    );
    let mut expect = shipped.clone();
    for (k, v) in set["values"].as_object().unwrap() {
        expect.insert(k.clone(), v.clone());
    }
    for k in &deleted {
        expect.remove(*k);
    }
    assert_eq!(rpcd.committed, expect);
}

/// The rpcd plugin against derpd in plain HTTP mode (metrics, no DERPMap entry: the page
/// says how to get one) and against a port where nothing listens (an error the page shows).
#[test]
fn plugin_in_plain_http_mode_and_without_derpd() {
    if find_program("wget").is_none() && find_program("uclient-fetch").is_none() {
        skip_test(
            "neither wget nor uclient-fetch found",
            "the rpcd plugin test",
        );
        return;
    }
    let work = support::fresh_path("luci-plugin", "work");
    let srv = inproc::start_dev();
    let plain = Plugin::new(
        &work.join("plain"),
        &[
            ("addr", format!("127.0.0.1:{}", srv.addr().port())),
            ("certmode", s("")),
            ("http_port", s("-1")),
        ],
    );
    let st = plain.run(&["call", "status"]).unwrap();
    assert_eq!(st["url"], format!("http://127.0.0.1:{}", srv.addr().port()));
    assert_eq!(st["metrics"]["derp_clients_local"], 0, "{st}");
    assert!(st["metrics"]["uptime_sec"].is_u64(), "{st}");
    assert_eq!(st["derpmap"], Value::Null);
    assert!(st.get("error").is_none(), "{st}");

    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let down = Plugin::new(
        &work.join("down"),
        &[("addr", format!(":{port}")), ("http_port", s("-1"))],
    );
    let st = down.run(&["call", "status"]).unwrap();
    // No certmode, no port 443: plain HTTP on every address, asked over loopback.
    assert_eq!(st["url"], format!("http://127.0.0.1:{port}"));
    assert_eq!(st["metrics"], json!({}));
    assert_eq!(st["derpmap"], Value::Null);
    assert!(
        st["error"].as_str().unwrap().contains("does not answer"),
        "{st}"
    );
}

/// The feed Makefile's `Package/luci-app-derpd/install` (run by make against a minimal stand-in
/// of the SDK's rules.mk and package.mk) and scripts/stage-luci-app.sh, which the packers use
/// without an SDK, install the same files with the same modes: every file of the app.
#[test]
fn makefile_and_stage_script_install_the_same_files() {
    let what = "the luci-app-derpd Makefile check";
    let Some(make) = find_program("make") else {
        skip_test("make not found", what);
        return;
    };
    let Some(bash) = find_program("bash") else {
        skip_test("bash not found", what);
        return;
    };
    let work = support::fresh_path("luci-make", "work");
    let top = work.join("top");
    std::fs::create_dir_all(top.join("include")).unwrap();
    std::fs::write(
        top.join("rules.mk"),
        "INSTALL_DIR:=install -d -m0755\nINSTALL_BIN:=install -m0755\n\
         INSTALL_DATA:=install -m0644\nINSTALL_CONF:=install -m0600\n",
    )
    .unwrap();
    std::fs::write(
        top.join("include/package.mk"),
        "define BuildPackage\ninstall-$(1):\n\t$$(call Package/$(1)/install,$$(DEST))\nendef\n",
    )
    .unwrap();
    let (by_make, by_script) = (work.join("make"), work.join("script"));
    let args = [
        s("-s"),
        s("-C"),
        path("openwrt").display().to_string(),
        format!("TOPDIR={}", top.display()),
        format!("INCLUDE_DIR={}", top.join("include").display()),
        format!("DEST={}", by_make.display()),
        s("install-luci-app-derpd"),
    ];
    let (st, out, err) = run_bounded(&make, &args, &[], Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "make: {out}{err}");
    let script = path("scripts/stage-luci-app.sh").display().to_string();
    let (st, out, err) = run_bounded(
        &bash,
        &[script.clone(), by_script.display().to_string()],
        &[],
        Duration::from_secs(30),
    );
    assert!(
        st.is_some_and(|s| s.success()),
        "stage-luci-app.sh: {out}{err}"
    );
    let listed = run_bounded(&bash, &[script, s("--list")], &[], Duration::from_secs(30)).1;

    let tree = |root: &Path| {
        let mut files = BTreeMap::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
                if meta.is_dir() {
                    assert_eq!(mode, 0o755, "{rel}");
                    dirs.push(p);
                } else {
                    files.insert(rel, (format!("{mode:04o}"), std::fs::read(&p).unwrap()));
                }
            }
        }
        files
    };
    let (m, sc) = (tree(&by_make), tree(&by_script));
    let names = |t: &BTreeMap<String, (String, Vec<u8>)>| {
        t.iter()
            .map(|(k, v)| format!("{} {k}", v.0))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&m), names(&sc));
    assert_eq!(m, sc);
    assert_eq!(listed.lines().collect::<Vec<_>>(), names(&sc));
    // Every file of the app is installed.
    let mut n = 0;
    let mut dirs = vec![path(APP)];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                n += 1;
            }
        }
    }
    assert_eq!(
        m.len(),
        n,
        "a file of {APP} is not installed: {:?}",
        names(&m)
    );
    assert_eq!(m["/usr/libexec/rpcd/luci.derpd"].0, "0755");
}

/// The menu entry opens the view, and the ACL grants what the view calls, no more: the ubus
/// methods it declares and the derpd UCI config.
#[test]
fn menu_and_acl_match_the_view() {
    let read = |rel: &str| std::fs::read_to_string(path(&format!("{APP}/{rel}"))).unwrap();
    let menu: Value =
        serde_json::from_str(&read("root/usr/share/luci/menu.d/luci-app-derpd.json")).unwrap();
    let entry = &menu["admin/services/derpd"];
    assert_eq!(entry["title"], "DERP relay");
    assert_eq!(entry["action"]["type"], "view");
    let view_path = entry["action"]["path"].as_str().unwrap();
    let view = read(&format!("htdocs/luci-static/resources/view/{view_path}.js"));
    assert_eq!(entry["depends"]["acl"], json!(["luci-app-derpd"]));
    assert_eq!(entry["depends"]["uci"], json!({"derpd": true}));

    let acl: Value =
        serde_json::from_str(&read("root/usr/share/rpcd/acl.d/luci-app-derpd.json")).unwrap();
    let acl = &acl["luci-app-derpd"];
    assert_eq!(acl["read"]["uci"], json!(["derpd"]));
    assert_eq!(acl["write"]["uci"], json!(["derpd"]));
    assert!(acl["write"].get("ubus").is_none());
    // rpc.declare({ object: 'x', method: 'y', ... }) in the view.
    let mut declared: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for decl in view.split("rpc.declare({").skip(1) {
        let field = |name: &str| {
            let at = decl.find(&format!("{name}: '")).unwrap() + name.len() + 3;
            decl[at..at + decl[at..].find('\'').unwrap()].to_string()
        };
        declared
            .entry(field("object"))
            .or_default()
            .push(field("method"));
    }
    let granted: BTreeMap<String, Vec<String>> =
        serde_json::from_value(acl["read"]["ubus"].clone()).unwrap();
    assert_eq!(declared, granted);
    // The plugin's object is the ubus name rpcd gives it: its file name.
    assert!(path(&format!("{APP}/{PLUGIN}")).ends_with("luci.derpd"));
    assert!(granted.contains_key("luci.derpd"));
}
