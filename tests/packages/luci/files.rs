//! The plugin without derpd and in plain HTTP mode, the Makefile against the stage script,
//! and the menu and ACL against the view.

use super::rpcd::*;
use super::*;

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
