//! The page's report checked: validation cases against derpd's own parser, and every UCI
//! write against LuCI's rules.

use super::rpcd::*;
use super::uci::*;
use super::*;

/// Values to type into fields whose checks mirror derpd's own parsers (no host names in
/// `addr`: derpd would resolve them).
pub(super) fn validation_cases() -> Value {
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
pub(super) fn derpd_accepts(option: &str, value: &str) -> bool {
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
pub(super) fn check_validation(report: &Value, context: &dyn Fn() -> String) {
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
pub(super) fn check_writes(rpcd: &Rpcd, shipped: &Section, context: &dyn Fn() -> String) {
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
