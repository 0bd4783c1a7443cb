//! The stand-in of uhttpd and rpcd: `/ubus/` JSON-RPC, `uci`, `service list`, and the app's
//! own rpcd plugin run for `luci.derpd status`.

use super::checks::validation_cases;
use super::uci::*;
use super::*;

#[derive(Debug, Default)]
pub(super) struct Rpcd {
    /// Every ubus call the page made, in order: (object, method, args); marks from the driver
    /// as ("mark", name, null).
    pub(super) calls: Vec<(String, String, Value)>,
    /// The config with this session's changes (what `uci get` returns) and the committed one.
    pub(super) staged: Section,
    pub(super) committed: Section,
    pub(super) js_errors: Vec<String>,
    pub(super) plugin_errors: Vec<String>,
    pub(super) report: Option<Value>,
}

pub(super) struct Env {
    pub(super) rpcd: Mutex<Rpcd>,
    pub(super) plugin: Plugin,
    pub(super) derpd_pid: u32,
    pub(super) done: Mutex<Option<mpsc::Sender<()>>>,
}

pub(super) fn serve(listener: TcpListener, env: Arc<Env>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let env = env.clone();
        std::thread::spawn(move || {
            let _ = handle(conn, &env);
        });
    }
}

pub(super) fn handle(conn: TcpStream, env: &Env) -> std::io::Result<()> {
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
pub(super) fn ubus(env: &Env, req: &Value) -> Value {
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

pub(super) fn call(env: &Env, object: &str, method: &str, args: &Value) -> Value {
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
pub(super) struct Plugin {
    pub(super) shim_dir: PathBuf,
    pub(super) busybox: Option<PathBuf>,
}

impl Plugin {
    pub(super) fn new(dir: &Path, uci: &[(&str, String)]) -> Plugin {
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
    pub(super) fn run(&self, args: &[&str]) -> Result<Value, String> {
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
