//! `Config::from_args`'s unit tests: mode selection (dev, manual certificates, plain HTTP) and its
//! errors, and `--mesh-with` peer entries.

use super::*;
use args::tests::args;

/// `--certmode letsencrypt`: the hostname it needs, `--acme-ip-certs`' rules, the challenges
/// the CA can reach, the `--acme-*` flags.
#[test]
fn letsencrypt_mode() {
    let cfg = |v: &[&str]| Config::from_args(&args(v).unwrap());
    let dns = cfg(&[
        "-c",
        "/k",
        "--hostname",
        "derp.example.com",
        "--certdir",
        "/d",
    ])
    .unwrap();
    let tls = dns.tls.unwrap();
    assert_eq!(tls.certdir, PathBuf::from("/d"));
    let acme = tls.acme.unwrap();
    assert_eq!(acme.directory, crate::acme::LETS_ENCRYPT);
    assert!(!acme.ip_certs && acme.ca_file.is_none() && acme.email.is_none());
    assert_eq!(
        acme.challenges,
        [ChallengeKind::TlsAlpn01, ChallengeKind::Http01]
    );
    assert_eq!(acme.timing, AcmeTiming::default());
    // Behind a port forward (443 → 3443, 80 → 8080), as on OpenWrt.
    let fwd = cfg(&[
        "-c",
        "/k",
        "-a",
        ":3443",
        "--public-port=443",
        "--http-port=8080",
        "--hostname=203.0.113.7",
        "--acme-ip-certs",
        "--acme-directory=https://127.0.0.1:14000/dir",
        "--acme-ca-file=/ca.pem",
        "--acme-email=me@example.com",
    ])
    .unwrap();
    let acme = fwd.tls.unwrap().acme.unwrap();
    assert!(acme.ip_certs);
    assert_eq!(acme.ips, ["203.0.113.7".parse::<IpAddr>().unwrap()]);
    assert_eq!(acme.directory, "https://127.0.0.1:14000/dir");
    assert_eq!(acme.ca_file, Some(PathBuf::from("/ca.pem")));
    assert_eq!(acme.email.as_deref(), Some("me@example.com"));
    // --acme-ip-certs means TLS on any port; the CA reaches only port 80 there.
    let ip = cfg(&[
        "-c",
        "/k",
        "-a",
        ":8443",
        "--hostname",
        "2001:db8::1",
        "-acme-ip-certs",
    ]);
    assert_eq!(
        ip.unwrap().tls.unwrap().acme.unwrap().challenges,
        [ChallengeKind::Http01]
    );
    // Both address families: one certificate for both, the first is the hostname.
    let both = cfg(&[
        "-c",
        "/k",
        "--hostname",
        "[2001:db8::1],192.0.2.1",
        "-acme-ip-certs",
    ]);
    let tls = both.unwrap().tls.unwrap();
    assert_eq!(tls.hostname, "2001:db8::1");
    assert_eq!(tls.acme.unwrap().ips.len(), 2);
    for (flags, want) in [
        (&["--hostname", "192.0.2.1"][..], "needs --acme-ip-certs"),
        (
            &["--hostname", "192.0.2.1,192.0.2.2", "--acme-ip-certs"],
            "give the public IP",
        ),
        (
            &["--hostname", "192.0.2.1,", "--acme-ip-certs"],
            "give the public IP",
        ),
        (
            &["--hostname", "d.example", "--acme-ip-certs"],
            "give the public IP",
        ),
        (
            &[
                "--hostname",
                "d.example",
                "--certmode",
                "manual",
                "--acme-ip-certs",
            ],
            "requires --certmode=letsencrypt",
        ),
        (&["--certmode", "gcp"], "not supported"),
        (
            &[
                "--hostname",
                "d.example",
                "-a",
                ":8443",
                "--public-port=8443",
                "--acme-ip-certs",
            ],
            "give the public IP",
        ),
        (
            &[
                "--hostname",
                "192.0.2.1",
                "-a",
                ":8443",
                "--acme-ip-certs",
                "--http-port=-1",
            ],
            "neither on port 443",
        ),
    ] {
        let mut v = vec!["-c", "/k"];
        v.extend_from_slice(flags);
        let e = cfg(&v).unwrap_err();
        assert!(e.contains(want), "{flags:?}: {e}");
    }
}

#[test]
fn mode_selection() {
    let cfg = |v: &[&str]| Config::from_args(&args(v).unwrap());
    let dev = cfg(&["--dev"]).unwrap();
    assert_eq!(dev.listen, "127.0.0.1:3340".parse().unwrap());
    assert!(dev.tls.is_none() && matches!(dev.key, KeySource::Ephemeral));
    // derper's defaults: letsencrypt on :443 for derp.tailscale.com, which is not ours.
    let e = cfg(&["-c", "/tmp/x"]).unwrap_err();
    assert!(
        e.contains("needs --hostname") && e.contains("--certmode manual"),
        "{e}"
    );
    let plain = cfg(&["-a", ":8443", "-c", "/tmp/x"]).unwrap();
    assert!(
        plain.tls.is_none(),
        "derper serves plain HTTP off port 443 without manual mode"
    );
    // --public-port: 0 (the default) is the listening port; it changes nothing else.
    assert_eq!(plain.public_port, None);
    let public = cfg(&["-a", ":8443", "-c", "/tmp/x", "-public-port=8443"]).unwrap();
    assert_eq!(public.public_port, Some(8443));
    assert_eq!(public.listen, plain.listen);
    assert!(public.tls.is_none());
    // Clients dialling 443 through a port forward want TLS.
    let e = cfg(&["-a", ":3443", "-c", "/tmp/x", "-public-port=443"]).unwrap_err();
    assert!(e.contains("needs --hostname"), "{e}");
    assert!(args(&["--public-port=65536"]).is_err());
    let man = cfg(&[
        "-a",
        "127.0.0.1:0",
        "--certmode",
        "manual",
        "--hostname",
        "127.0.0.1",
        "--certdir",
        "/tmp/d",
        "-c",
        "/tmp/k",
    ])
    .unwrap();
    assert_eq!(man.tls.unwrap().certdir, PathBuf::from("/tmp/d"));
    assert_eq!(
        cfg(&["--dev", "--tcp-write-timeout=0"])
            .unwrap()
            .timeouts
            .write,
        None
    );
    assert_eq!(cfg(&["--dev", "--stun=false"]).unwrap().stun_port, None);
    assert!(cfg(&["--dev", "--home", "gopher://x"]).is_err());
    assert_eq!(
        cfg(&["--dev", "--buffer-budget-mib", "2047"])
            .unwrap()
            .limits
            .buffer_budget,
        2047 << 20
    );
    // 4096 MiB is 2^32 bytes: refused on 32-bit (where it would wrap to 0), fine on 64-bit.
    let big = cfg(&["--dev", "--buffer-budget-mib", "4096"]);
    if usize::BITS == 32 {
        let e = big.unwrap_err();
        assert!(e.contains("must be 1 to 2047"), "{e}");
    } else {
        assert_eq!(big.unwrap().limits.buffer_budget, 4096 << 20);
    }
    assert!(cfg(&["--dev", "--buffer-budget-mib", "0"]).is_err());
    assert_eq!(parse_listen(":443").unwrap().port(), 443);
    // Mesh: a peer list needs a key; the key file is 64 hex digits, whitespace trimmed.
    let e = cfg(&["--dev", "--mesh-with", "derp2.lan"]).unwrap_err();
    assert_eq!(e, "--mesh-with requires --mesh-psk-file");
    let dir = std::env::temp_dir().join(format!("derpd-meshkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kf = dir.join("derp-mesh.key");
    std::fs::write(&kf, format!("\n {}  \n", "Ab".repeat(32))).unwrap();
    let kfs = kf.display().to_string();
    let c = cfg(&[
        "-a",
        ":8443",
        "-c",
        "/tmp/x",
        "--mesh-psk-file",
        &kfs,
        "--mesh-with",
        "a,b:8443/10.0.0.2",
    ])
    .unwrap();
    assert_eq!(c.mesh_key, Some([0xab; 32]));
    assert_eq!(c.mesh_with.len(), 2);
    assert_eq!(c.mesh_with[1].dial_host, "10.0.0.2");
    std::fs::write(&kf, "abc").unwrap();
    let e = cfg(&["-a", ":8443", "-c", "/tmp/x", "--mesh-psk-file", &kfs]).unwrap_err();
    assert!(e.contains("64 hexadecimal digits"), "{e}");
    let e = cfg(&[
        "-a",
        ":8443",
        "-c",
        "/tmp/x",
        "--mesh-psk-file",
        "/nonexistent/k",
    ])
    .unwrap_err();
    assert!(
        e.contains("cannot read mesh key file /nonexistent/k"),
        "{e}"
    );
    assert_eq!(
        cfg(&["-a", ":8443", "-c", "/tmp/x", "--mesh-psk-file", ""])
            .unwrap()
            .mesh_key,
        None
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(parse_mesh_key(&"00".repeat(32)).is_err());
    assert_eq!(parse_listen("[::1]:5").unwrap(), "[::1]:5".parse().unwrap());
}

#[test]
fn peer_entries() {
    let p = MeshPeer::parse("derp2.lan").unwrap();
    assert_eq!(
        (p.name.as_str(), p.dial_host.as_str(), p.port, p.pin),
        ("derp2.lan", "derp2.lan", 443, None)
    );
    let p = MeshPeer::parse("derp2.lan:8443/192.168.1.2").unwrap();
    assert_eq!(
        (
            p.host.as_str(),
            p.name.as_str(),
            p.dial_host.as_str(),
            p.port
        ),
        ("derp2.lan:8443", "derp2.lan", "192.168.1.2", 8443)
    );
    let hex64 = "ab".repeat(32);
    let p = MeshPeer::parse(&format!("192.168.1.2:443/sha256-raw:{hex64}")).unwrap();
    assert_eq!(p.pin, Some([0xab; 32]));
    assert_eq!(p.dial_host, "192.168.1.2");
    let p = MeshPeer::parse(&format!("[fd00::2]:8443/[fd00::3]/sha256-raw:{hex64}")).unwrap();
    assert_eq!(
        (p.name.as_str(), p.dial_host.as_str(), p.port),
        ("fd00::2", "fd00::3", 8443)
    );
    for bad in [
        "",
        "a/b/c",
        "fd00::2",
        "h:0",
        "h:99999",
        "h/sha256-raw:12",
        "h/d:1",
        "[nope]:1",
    ] {
        assert!(MeshPeer::parse(bad).is_err(), "{bad:?}");
    }
    let list = MeshPeer::parse_list("a, b:444 ,").unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].port, 444);
}
