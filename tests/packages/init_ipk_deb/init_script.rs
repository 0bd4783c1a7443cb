//! The init script under a stub of OpenWrt's shell environment: each UCI config becomes the
//! right procd instance (jail, firewall rules and redirects, refusals), with a command line
//! derpd accepts; and the procd jail's capabilities file.

use super::SHIPPED_UCI;
use super::{derpd_config, enabled_with, json_records, repo, run_init, shells, started};
use crate::support::{self, fresh_path, s, Derpd};
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn init_plain_config_becomes_a_jailed_derpd_with_derpers_defaults() {
    let text = enabled_with(&[("hostname", "derp.example.com")], &[]);
    for run in started(&text, true) {
        let want: Vec<String> = [
            "/usr/sbin/derpd",
            "--config=/etc/derpd/derper.key",
            "--certdir=/etc/derpd/certs",
            "--hostname=derp.example.com",
            "--certmode=manual",
            "--addr=:3443",
            "--http-port=3080",
            "--public-port=443",
            "--stun-port=3478",
            "--log-level=info",
            "--buffer-budget-mib=16",
            "--threads=0",
            "--max-clients=512",
            "--max-handshakes=256",
            "--max-handshakes-per-ip=16",
            "--first-byte-timeout=3s",
            "--handshake-timeout=10s",
            "--login-timeout=10s",
            "--frame-timeout=10s",
            "--tcp-write-timeout=2s",
            "--tcp-keepalive-time=10m",
            "--tcp-user-timeout=15s",
            "--stun=true",
            "--derp=true",
            "--meta-cert=true",
            "--verify-clients=false",
            "--verify-client-url-fail-open=true",
            "--acme-ip-certs=false",
        ]
        .map(s)
        .to_vec();
        assert_eq!(run.argv, want, "{}", run.shell);
        // The other values the shipped config spells out are derpd's defaults: the same Config
        // as a command line with only what the init script must give, the ports (beside
        // uhttpd's 80 and 443, dialled at 443 through the firewall's redirect) and the one
        // router-sized limit (--max-clients 512: 42 MiB at worst, README "Memory: a budget").
        let minimal = [
            "/usr/sbin/derpd",
            "--config=/etc/derpd/derper.key",
            "--certdir=/etc/derpd/certs",
            "--hostname=derp.example.com",
            "--certmode=manual",
            "--addr=:3443",
            "--http-port=3080",
            "--public-port=443",
            "--max-clients=512",
        ]
        .map(s);
        assert_eq!(
            format!("{:?}", run.config()),
            format!("{:?}", derpd_config(&minimal).unwrap()),
            "the shipped UCI values differ from derpd's defaults"
        );
        let tls = run.config().tls.expect("TLS");
        assert_eq!(tls.hostname, "derp.example.com");
        assert_eq!(tls.certdir, Path::new("/etc/derpd/certs"));
        for record in [
            "instance instance1",
            "mkdir -p /etc/derpd /etc/derpd/certs",
            "chmod 0700 /etc/derpd /etc/derpd/certs",
            "chown derpd:derpd /etc/derpd /etc/derpd/certs",
            "set respawn ",
            "set stdout 1",
            "set stderr 1",
            "set limits nofile=8192 8192",
            // A failed bind names the UCI option to change.
            "set env DERPD_UCI_SECTION=derpd.main",
            "set user derpd",
            "set group derpd",
            "set capabilities /etc/capabilities/derpd.json",
            "set no_new_privs 1",
            "jail derpd log procfs",
            "mount_rw /etc/derpd",
            "mount_rw /etc/derpd/certs",
            "close_instance",
            // `uci commit derpd` (through reload_config or LuCI) reloads the service.
            "trigger derpd",
            // The router's LAN address (for NAT reflection) when the network comes up or changes.
            "reload_interface_trigger lan",
        ] {
            run.expect(record);
        }
        assert!(
            run.has("json open_data"),
            "the firewall redirects are on by default"
        );
        let cfg = run.config();
        assert_eq!(cfg.public_port, Some(443));
        assert_eq!(cfg.listen.port(), 3443);
        assert_eq!(cfg.http_port, Some(3080));
        assert_eq!(run.log, "", "{}", run.shell);
    }
}

#[test]
fn init_self_signed_ip_config() {
    let text = enabled_with(&[("hostname", "192.168.1.1")], &[]);
    for run in started(&text, true) {
        assert!(run.argv.contains(&s("--hostname=192.168.1.1")));
        let tls = run.config().tls.expect("TLS");
        assert_eq!(
            tls.hostname.parse::<std::net::IpAddr>().ok(),
            Some([192, 168, 1, 1].into())
        );
        // derpd writes the self-signed certificate into certdir: it is mounted writable.
        run.expect("mount_rw /etc/derpd/certs");
    }
}

/// `certmode letsencrypt` for the router's public IP: TLS behind the redirects, both challenge
/// ports forwarded, the ACME options on derpd's command line, the CA roots file in the jail.
#[test]
fn init_letsencrypt_ip_config() {
    let text = enabled_with(
        &[
            ("hostname", "203.0.113.7"),
            ("certmode", "letsencrypt"),
            ("acme_ip_certs", "1"),
            ("acme_email", "ops@example.net"),
            ("acme_directory", "https://ca.example.net/dir"),
            ("acme_ca_file", "/etc/ssl/certs/ca-certificates.crt"),
        ],
        &[],
    );
    for run in started(&text, true) {
        for flag in [
            "--certmode=letsencrypt",
            "--acme-ip-certs=true",
            "--acme-email=ops@example.net",
            "--acme-directory=https://ca.example.net/dir",
            "--acme-ca-file=/etc/ssl/certs/ca-certificates.crt",
        ] {
            assert!(run.argv.contains(&s(flag)), "{flag}: {:?}", run.argv);
        }
        let tls = run.config().tls.expect("TLS");
        let acme = tls.acme.expect("letsencrypt");
        assert!(acme.ip_certs);
        use derpd::acme::client::ChallengeKind;
        // Clients (and the CA) dial 443, redirected to 3443; 80 to 3080.
        assert_eq!(
            acme.challenges,
            [ChallengeKind::TlsAlpn01, ChallengeKind::Http01]
        );
        run.expect("mount_rw /etc/derpd/certs");
        for rule in [
            fw_redirect("derpd-derp", "443", "3443", Some("192.168.1.1")),
            fw_redirect("derpd-http", "80", "3080", Some("192.168.1.1")),
        ] {
            let records = json_records(&run);
            assert!(
                records.windows(rule.len()).any(|w| w == rule.as_slice()),
                "{rule:?} in {records:#?}"
            );
        }
        assert_eq!(run.log, "", "{}", run.shell);
    }
    // A DNS name, certmode letsencrypt, the shipped ports: TLS through public_port 443.
    let text = enabled_with(
        &[
            ("hostname", "derp.example.com"),
            ("certmode", "letsencrypt"),
        ],
        &[],
    );
    for run in started(&text, true) {
        let acme = run.config().tls.expect("TLS").acme.expect("letsencrypt");
        assert!(!acme.ip_certs && acme.email.is_none());
        assert_eq!(acme.directory, derpd::acme::LETS_ENCRYPT);
    }
}

#[test]
fn init_mesh_config() {
    let dir = fresh_path("init-mesh", "keys");
    std::fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("mesh.key");
    std::fs::write(&psk, format!("{}\n", "5a".repeat(32))).unwrap();
    let text = enabled_with(
        &[
            ("hostname", "derp1.example.com"),
            ("mesh_psk_file", psk.to_str().unwrap()),
            // The mesh key beside the relay's key: the init script makes it derpd's.
            ("key_file", dir.join("derper.key").to_str().unwrap()),
        ],
        &[
            ("mesh_with", "derp2.example.com"),
            ("mesh_with", "derp3.example.com/10.0.0.3"),
        ],
    );
    for run in started(&text, true) {
        assert!(run.argv.contains(&s(
            "--mesh-with=derp2.example.com,derp3.example.com/10.0.0.3"
        )));
        assert!(run
            .argv
            .contains(&format!("--mesh-psk-file={}", psk.display())));
        let cfg = run.config();
        assert_eq!(cfg.mesh_key, Some([0x5a; 32]));
        let peers: Vec<(&str, &str)> = cfg
            .mesh_with
            .iter()
            .map(|p| (p.name.as_str(), p.dial_host.as_str()))
            .collect();
        assert_eq!(
            peers,
            [
                ("derp2.example.com", "derp2.example.com"),
                ("derp3.example.com", "10.0.0.3")
            ]
        );
        // The mesh key beside the relay's key: derpd's user owns it, and the jail shows it
        // through that directory (no second mount for the file).
        run.expect(&format!("chown derpd:derpd {}", psk.display()));
        run.expect(&format!("mount_rw {}", dir.display()));
        assert!(!run.has(&format!("mount_ro {}", psk.display())), "{run:#?}");
    }
}

#[test]
fn init_admission_config() {
    let dir = fresh_path("init-admission", "files");
    let ts = dir.join("tailscale");
    std::fs::create_dir_all(&ts).unwrap();
    let allow = dir.join("allow-keys");
    std::fs::write(&allow, "# none yet\n").unwrap();
    let socket = ts.join("tailscaled.sock");
    let text = enabled_with(
        &[
            ("hostname", "derp.example.com"),
            ("verify_clients", "1"),
            ("socket", socket.to_str().unwrap()),
            ("verify_client_url", "https://admission.example.com/check"),
            ("verify_client_url_fail_open", "0"),
            ("allow_keys_file", allow.to_str().unwrap()),
        ],
        &[],
    );
    for run in started(&text, true) {
        for flag in [
            s("--verify-clients=true"),
            format!("--socket={}", socket.display()),
            s("--verify-client-url=https://admission.example.com/check"),
            s("--verify-client-url-fail-open=false"),
            format!("--allow-keys-file={}", allow.display()),
        ] {
            assert!(
                run.argv.contains(&flag),
                "{}: no {flag} in {:?}",
                run.shell,
                run.argv
            );
        }
        let adm = run.config().admission;
        assert_eq!(adm.tailscaled_socket.as_deref(), Some(socket.as_path()));
        assert_eq!(
            adm.url.as_deref(),
            Some("https://admission.example.com/check")
        );
        assert!(!adm.fail_open);
        assert_eq!(adm.allow_keys_file.as_deref(), Some(allow.as_path()));
        // tailscaled's socket directory and the allow-keys file are visible in the jail.
        run.expect(&format!("mount_ro {}", ts.display()));
        run.expect(&format!("mount_ro {}", allow.display()));
        // Outside derpd's own directories, the admin's file keeps its owner.
        assert!(!run.has(&format!("chown derpd:derpd {}", allow.display())));
    }
}

/// A firewall rule the init script asks fw4 for through procd's data, as the stub records it.
fn fw_rule(name: &str, proto: &str, port: &str) -> Vec<String> {
    vec![
        s("json add_object "),
        s("json add_string type rule"),
        format!("json add_string name {name}"),
        s("json add_string src wan"),
        format!("json add_string proto {proto}"),
        format!("json add_string dest_port {port}"),
        s("json add_string target ACCEPT"),
        s("json close_object"),
    ]
}

/// A redirect from the wan zone: `public` to `port` on the router, at its address `lanip` in
/// zone `lan` (fw4 then reflects it for LAN clients) or, without one, to the router itself.
fn fw_redirect(name: &str, public: &str, port: &str, lanip: Option<&str>) -> Vec<String> {
    let mut r = vec![
        s("json add_object "),
        s("json add_string type redirect"),
        format!("json add_string name {name}"),
        s("json add_string src wan"),
        s("json add_string proto tcp"),
        format!("json add_string src_dport {public}"),
    ];
    if let Some(ip) = lanip {
        r.push(s("json add_string dest lan"));
        r.push(format!("json add_string dest_ip {ip}"));
    }
    r.extend([
        format!("json add_string dest_port {port}"),
        s("json add_string target DNAT"),
        s("json close_object"),
    ]);
    r
}

#[test]
fn init_firewall_rules_follow_the_ports() {
    let lan = Some("192.168.1.1");
    // (UCI edits, the firewall rules and redirects they must give, a warning in the log)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<Vec<String>>, &'a str);
    let cases: [Case<'_>; 7] = [
        // As shipped: beside uhttpd, the public ports redirected, reflected for the LAN.
        (
            vec![],
            vec![
                fw_redirect("derpd-derp", "443", "3443", lan),
                fw_redirect("derpd-http", "80", "3080", lan),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "",
        ),
        // uhttpd moved away: derpd on the public ports itself, ACCEPT rules.
        (
            vec![
                ("addr", ":443"),
                ("http_port", "80"),
                ("public_port", ""),
                ("public_http_port", ""),
            ],
            vec![
                fw_rule("derpd-derp", "tcp", "443"),
                fw_rule("derpd-http", "tcp", "80"),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "",
        ),
        // A public port equal to the listening port needs no redirect.
        (
            vec![
                ("addr", ":8443"),
                ("public_port", "8443"),
                ("http_port", "-1"),
                ("stun_port", "3479"),
            ],
            vec![
                fw_rule("derpd-derp", "tcp", "8443"),
                fw_rule("derpd-stun", "udp", "3479"),
            ],
            "",
        ),
        (
            vec![("stun", "0")],
            vec![
                fw_redirect("derpd-derp", "443", "3443", lan),
                fw_redirect("derpd-http", "80", "3080", lan),
            ],
            "",
        ),
        // No reflection: redirects to the router itself.
        (
            vec![("reflection_zone", "")],
            vec![
                fw_redirect("derpd-derp", "443", "3443", None),
                fw_redirect("derpd-http", "80", "3080", None),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "",
        ),
        // A reflection network without an address (yet): the same, and a warning.
        (
            vec![("reflection_zone", "guest")],
            vec![
                fw_redirect("derpd-derp", "443", "3443", None),
                fw_redirect("derpd-http", "80", "3080", None),
                fw_rule("derpd-stun", "udp", "3478"),
            ],
            "no IPv4 address on network guest",
        ),
        // Firewall off: nothing asked for.
        (vec![("firewall", "0")], vec![], ""),
    ];
    for (extra, rules, warning) in cases {
        let mut set = vec![("hostname", "derp.example.com")];
        set.extend(extra.iter().copied());
        let text = enabled_with(&set, &[]);
        let want = if rules.is_empty() {
            vec![]
        } else {
            let mut w = vec![s("json open_data"), s("json add_array firewall")];
            w.extend(rules.into_iter().flatten());
            w.extend([s("json close_array"), s("json close_data")]);
            w
        };
        for run in started(&text, true) {
            assert_eq!(json_records(&run), want, "{}: {extra:?}", run.shell);
            // A reload when the reflection network changes, where there is one.
            let trigger =
                !extra.contains(&("firewall", "0")) && !extra.contains(&("reflection_zone", ""));
            let triggers: Vec<&String> = run
                .records
                .iter()
                .filter(|r| r.starts_with("reload_interface_trigger"))
                .collect();
            assert_eq!(triggers.len(), usize::from(trigger), "{run:#?}");
            assert_eq!(run.log.is_empty(), warning.is_empty(), "{run:#?}");
            assert!(run.log.contains(warning), "{run:#?}");
            run.config();
        }
    }
}

#[test]
fn init_refuses_what_cannot_run() {
    // Shipped as is: disabled, no instance.
    for shell in shells() {
        let run = run_init(&shell, SHIPPED_UCI, true);
        assert_eq!(run.status, 0, "{run:#?}");
        assert!(!run.has("instance instance1"), "{run:#?}");
        assert!(run.stderr.contains("derpd.main.enabled=1"), "{run:#?}");
        run.expect("trigger derpd");
    }
    let cases = [
        (enabled_with(&[], &[]), "set option hostname"),
        (
            enabled_with(&[("hostname", "derp.example.com"), ("stun", "maybe")], &[]),
            "option stun 'maybe' is not a boolean",
        ),
        (
            enabled_with(
                &[
                    ("hostname", "derp.example.com"),
                    ("key_file", "/etc/derper.key"),
                ],
                &[],
            ),
            "must be a directory of its own, not /etc",
        ),
        (
            enabled_with(
                &[("hostname", "derp.example.com"), ("certdir", "/tmp")],
                &[],
            ),
            "certdir must be a directory of its own, not /tmp",
        ),
    ];
    for (text, why) in cases {
        for shell in shells() {
            let run = run_init(&shell, &text, true);
            assert_eq!(run.status, 1, "{why}: {run:#?}");
            assert!(run.log.contains(why), "{why}: {run:#?}");
            assert!(run.stderr.contains(why), "{why}: {run:#?}");
            assert!(!run.has("close_instance"), "{why}: {run:#?}");
            assert!(
                !run.records.iter().any(|r| r.starts_with("chown")),
                "{run:#?}"
            );
        }
    }
}

#[test]
fn init_without_ujail_runs_as_root_and_says_so() {
    let text = enabled_with(&[("hostname", "derp.example.com")], &[]);
    for run in started(&text, false) {
        assert!(!run.records.iter().any(|r| r.starts_with("set user")
            || r.starts_with("jail ")
            || r.starts_with("chown")));
        assert!(run.log.contains("procd-ujail"), "{run:#?}");
        run.config();
    }
}

/// The command line the init script builds (paths moved to a scratch directory, the ports to
/// loopback) runs a relay that Tailscale's own client uses, over TLS with the self-signed
/// certificate's pin that derpd prints for the derpMap.
#[test]
fn init_command_line_runs_a_relay_for_tailscale_clients() {
    let Some(harness) = support::harness() else {
        return;
    };
    let dir = fresh_path("init-relay", "etc");
    let key = dir.join("derpd/derper.key");
    let certdir = dir.join("derpd/certs");
    std::fs::create_dir_all(&certdir).unwrap();
    let text = enabled_with(
        &[
            ("hostname", "127.0.0.1"),
            ("addr", "127.0.0.1:0"),
            ("http_port", "-1"),
            ("stun_port", "0"),
            ("key_file", key.to_str().unwrap()),
            ("certdir", certdir.to_str().unwrap()),
        ],
        &[],
    );
    let run = run_init(&shells()[0], &text, true);
    assert_eq!(run.status, 0, "{run:#?}");
    let mut d = Derpd::start(&run.argv[1..]);
    let up = d.startup(true);
    let pin = up.pin.clone().unwrap();
    d.run_harness(
        &harness,
        &support::pinned_relay_args(2, up.addr.port(), pin),
    );
    assert!(key.exists(), "derpd made its key at the init script's path");
    assert!(certdir.join("127.0.0.1.crt").exists());
    d.expect_running();
}

#[test]
fn capabilities_file_grants_only_net_bind_service() {
    let text = std::fs::read_to_string(repo("openwrt/files/derpd.json")).unwrap();
    let caps: BTreeMap<String, Vec<String>> = serde_json::from_str(&text).unwrap();
    let sets: Vec<&str> = caps.keys().map(String::as_str).collect();
    assert_eq!(
        sets,
        [
            "ambient",
            "bounding",
            "effective",
            "inheritable",
            "permitted"
        ]
    );
    for (set, list) in &caps {
        assert_eq!(list, &[s("CAP_NET_BIND_SERVICE")], "{set}");
    }
}
