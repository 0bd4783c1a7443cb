//! varz: derper's names, types and labels, and counters that move.

use super::*;

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
