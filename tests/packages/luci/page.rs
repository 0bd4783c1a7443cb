//! The page in headless Chromium, in a network namespace of its own.

use super::checks::*;
use super::rpcd::*;
use super::uci::*;
use super::*;

pub(super) type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

pub(super) fn tls_client(addr: SocketAddr) -> DerpClient<Tls> {
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
pub(super) fn http_get(addr: SocketAddr, target: &str) -> String {
    let raw = inproc::http_exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
    body.to_string()
}

// ---------------------------------------------------------------------------------------------

pub(super) fn chromium() -> Option<PathBuf> {
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
pub(super) fn prerequisites() -> bool {
    let what = "the LuCI page test (tests/packages/luci/)";
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
pub(super) fn page_test() {
    assert!(prerequisites(), "checked by luci_page_in_chromium");
    let chromium = chromium().unwrap();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../luci-test");
    std::fs::create_dir_all(&out_dir).unwrap();
    let work = support::fresh_path("luci", "work");
    std::fs::create_dir_all(&work).unwrap();

    // derpd: TLS with a self-signed certificate for 127.0.0.1, a port-80 listener, STUN.
    let mut cfg = derpd::config::Config::dev_loopback();
    cfg.tls = Some(derpd::config::TlsMode::manual(
        "127.0.0.1",
        work.join("certs"),
    ));
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
pub(super) fn check_page(
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
