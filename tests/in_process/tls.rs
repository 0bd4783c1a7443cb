//! TLS mode: a generated self-signed IP certificate, the meta-cert appended last, the
//! `sha256-raw:` pin, TLS 1.2 and 1.3, fast start over TLS, and the port-80 listener.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use crate::support::inproc::*;
use derpd::config::{Config, TlsMode};
use derpd::trust::{self, Trust};
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::Digest;

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tls_server(name: &str, meta_cert: bool) -> (derpd::server::Server, std::path::PathBuf) {
    let dir = tmpdir(name);
    let mut cfg = Config::dev_loopback();
    cfg.tls = Some(TlsMode::manual("127.0.0.1", dir.clone()));
    cfg.http_port = Some(0);
    cfg.meta_cert = meta_cert;
    (start(cfg), dir)
}

type TlsConn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection that accepts any certificate, and the chain the server sent.
fn connect(addr: std::net::SocketAddr, v12: bool) -> (TlsConn, Vec<Vec<u8>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if v12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let verifier = trust::verifier(Trust::AnyCertificate, &provider).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("127.0.0.1").unwrap())
            .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.flush().unwrap();
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    let chain = s.conn.peer_certificates().unwrap();
    let chain = chain.iter().map(|c| c.to_vec()).collect();
    (s, chain)
}

fn cn(der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    let name = c
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    name
}

#[test]
fn ip_certificate_chain_pin_and_fast_start() {
    let (srv, dir) = tls_server("tls-meta", true);
    let leaf_pem = std::fs::read_to_string(dir.join("127.0.0.1.crt")).unwrap();
    use rustls::pki_types::pem::PemObject;
    let leaf_der = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).unwrap();
    let pin = derpd::key::hex(&sha2::Sha256::digest(&leaf_der));

    for v12 in [false, true] {
        let (s, chain) = connect(srv.addr(), v12);
        assert_eq!(
            chain.len(),
            2,
            "leaf + meta-cert (TLS 1.{})",
            if v12 { 2 } else { 3 }
        );
        assert_eq!(
            derpd::key::hex(&sha2::Sha256::digest(&chain[0])),
            pin,
            "the pinned leaf is served first"
        );
        assert_eq!(cn(&chain[0]), "127.0.0.1");
        assert_eq!(
            cn(&chain[1]),
            format!("derpkey{}", srv.relay().public_key.untyped_hex())
        );
        drop(s);
    }

    // Fast start over TLS 1.3, as a Tailscale client does after seeing the meta-cert.
    let (mut s, _) = connect(srv.addr(), false);
    let mut c = DerpClient::new_raw(&mut s);
    c.server_key = srv.relay().public_key;
    let mut req = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n".to_vec();
    let server_key = c.server_key;
    req.extend(derpd::handshake::client_info_frame(
        &c.key,
        &server_key,
        b"{}",
    ));
    c.s.write_all(&req).unwrap();
    c.read_server_key().unwrap();
    c.expect_server_info().unwrap();
    let me = c.public();
    c.send(&me, b"over tls");
    assert_eq!(c.recv_packet().1, b"over tls");
    let _ = std::fs::remove_dir_all(dir);
}

/// Tailscale's client ends a TLS connection by closing the socket, without a close_notify.
/// Between frames that is a normal disconnect (derper logs and counts nothing); mid-frame it
/// is still an error.
#[test]
fn tls_close_without_close_notify_is_a_clean_disconnect() {
    use std::sync::atomic::Ordering::Relaxed;
    let (srv, dir) = tls_server("tls-eof", true);
    let m = &srv.relay().metrics;
    let login = || {
        let (mut s, _) = connect(srv.addr(), false);
        let mut c = DerpClient::new_raw(&mut s);
        c.login_upgrade(b"{}").unwrap();
        let me = c.public();
        c.send(&me, b"ping");
        assert_eq!(c.recv_packet().1, b"ping");
        s
    };
    for _ in 0..3 {
        let s = login();
        // No close_notify: shut the TCP socket under the TLS session.
        s.sock.shutdown(std::net::Shutdown::Both).unwrap();
        drop(s);
    }
    wait_until("the three clients to be gone", || {
        m.current_connections.load(Relaxed) == 0
    });
    assert_eq!(
        m.failed_logins.load(Relaxed),
        0,
        "clean closes counted as failures"
    );

    // Mid-frame (a header with no body) the same close is a failure.
    let mut s = login();
    s.write_all(&[0x04, 0, 0, 0, 40]).unwrap(); // SendPacket header, 40 bytes promised
    s.flush().unwrap();
    s.sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    wait_until("the truncated frame to count as a failure", || {
        m.failed_logins.load(Relaxed) == 1
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn meta_cert_off_serves_leaf_only() {
    let (srv, dir) = tls_server("tls-nometa", false);
    let (mut s, chain) = connect(srv.addr(), false);
    assert_eq!(chain.len(), 1);
    s.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200 OK"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn certificate_files_are_private_and_reused() {
    let (srv, dir) = tls_server("tls-files", true);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("127.0.0.1.key")), 0o600);
    let first = std::fs::read(dir.join("127.0.0.1.crt")).unwrap();
    drop(srv);
    let mut cfg = Config::dev_loopback();
    cfg.tls = Some(TlsMode::manual("127.0.0.1", dir.clone()));
    let _srv = start(cfg);
    assert_eq!(
        std::fs::read(dir.join("127.0.0.1.crt")).unwrap(),
        first,
        "restart reuses the certificate"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn port_80_redirects_and_serves_generate_204() {
    let (srv, dir) = tls_server("tls-port80", true);
    let a = srv.http_addr().expect("port-80 listener in TLS mode");
    let r = http_exchange(a, b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1/derp\r\n"),
        "{r}"
    );
    let r = http_exchange(a, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 400 Bad Request\r\n") && r.contains("Use HTTPS"),
        "{r}"
    );
    let r = http_exchange(
        a,
        b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: ts_127.0.0.1\r\n\r\n",
    );
    assert!(
        r.contains("X-Tailscale-Response: response ts_127.0.0.1\r\n"),
        "{r}"
    );
    // Garbage TLS on the main port is refused without hurting the server.
    let r = http_exchange(srv.addr(), b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        !r.starts_with("HTTP/1.1 200"),
        "plain HTTP on the TLS port: {r:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// DERP over WebSocket inside TLS (the path browsers take): 101, then a login and a packet to
/// itself in masked binary frames, answered in unmasked ones.
#[test]
fn websocket_login_over_tls() {
    fn ws_frame(payload: &[u8]) -> Vec<u8> {
        let mask = [9u8, 8, 7, 6];
        let mut f = vec![0x82, 0x80 | 126];
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }
    fn read_ws_payload(s: &mut TlsConn) -> Vec<u8> {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).unwrap();
        assert_eq!(h[0], 0x82, "a final binary frame");
        let len = match h[1] {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).unwrap();
                usize::from(u16::from_be_bytes(b))
            }
            n => {
                assert!(n < 126, "unmasked, short");
                usize::from(n)
            }
        };
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).unwrap();
        p
    }
    let (srv, dir) = tls_server("tls-ws", true);
    let (mut s, _) = connect(srv.addr(), false);
    s.write_all(
        b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Protocol: derp\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let head = read_http_head(&mut s).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    let sk = read_ws_payload(&mut s);
    assert_eq!(sk[0], 0x01);
    let server_key = derpd::key::NodePublic(sk[13..45].try_into().unwrap());
    let me = derpd::key::NodePrivate::generate();
    let ci = derpd::handshake::client_info_frame(&me, &server_key, br#"{"version":2}"#);
    s.write_all(&ws_frame(&ci)).unwrap();
    let si = read_ws_payload(&mut s);
    assert_eq!(si[0], 0x03, "ServerInfo");
    let mut send = vec![0x04, 0, 0, 0, 32 + 3];
    send.extend_from_slice(&me.public().0);
    send.extend_from_slice(b"tls");
    s.write_all(&ws_frame(&send)).unwrap();
    let got = loop {
        let f = read_ws_payload(&mut s);
        if f[0] != 0x06 {
            break f; // not a KeepAlive
        }
    };
    assert_eq!(got[0], 0x05, "RecvPacket");
    assert_eq!(&got[5..37], &me.public().0);
    assert_eq!(&got[37..], b"tls");
    assert_eq!(
        srv.relay()
            .metrics
            .websocket_accepts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(dir);
}

/// acme.sh and friends renew in place: new connections get the new certificate, connected
/// clients stay, and a half-written renewal is ridden out.
#[test]
fn renewed_certificate_is_served_without_dropping_clients() {
    let dir = tmpdir("tls-reload");
    let mut cfg = Config::dev_loopback();
    cfg.tls = Some(TlsMode::manual("127.0.0.1", dir.clone()));
    cfg.cert_poll = std::time::Duration::from_millis(20);
    let srv = start(cfg);
    let login = |s: TlsConn| {
        let mut c = DerpClient::new_raw(s);
        c.login_upgrade(br#"{"version":2}"#).unwrap();
        c
    };
    let (s, chain) = connect(srv.addr(), false);
    let old = chain[0].clone();
    let mut a = login(s);

    let other = tmpdir("tls-reload-new");
    let renewed = derpd::tls::load_or_create("127.0.0.1", &other).unwrap();
    let new = renewed.chain[0].to_vec();
    assert_ne!(new, old);
    // The certificate first: for a moment the files do not match, and the old one stays.
    for ext in ["crt", "key"] {
        std::fs::copy(
            other.join(format!("127.0.0.1.{ext}")),
            dir.join(format!("127.0.0.1.{ext}")),
        )
        .unwrap();
    }
    wait_until("new connections get the renewed certificate", || {
        let (_s, chain) = connect(srv.addr(), false);
        chain[0] == new
    });
    let (s, chain) = connect(srv.addr(), true);
    assert_eq!(chain[0], new, "TLS 1.2 too");
    let mut b = login(s);
    let bk = b.public();
    a.send(&bk, b"from before the renewal");
    assert_eq!(b.recv_packet().1, b"from before the renewal");
    let ak = a.public();
    b.send(&ak, b"back");
    assert_eq!(a.recv_packet().1, b"back");
}

/// `--tls-ciphers chacha`: a client that lists AES-GCM first (rustls's, as Go's on a CPU with
/// AES) gets ChaCha20-Poly1305 over TLS 1.3 and 1.2, and `/debug/varz` counts it by AEAD.
#[test]
fn tls_ciphers_choice_is_negotiated_and_counted() {
    let dir = tmpdir("tls-ciphers");
    let mut cfg = Config::dev_loopback();
    cfg.tls = Some(TlsMode {
        ciphers: derpd::config::TlsCiphers::ChaCha,
        ..TlsMode::manual("127.0.0.1", dir.clone())
    });
    cfg.http_port = Some(0);
    let srv = start(cfg);
    for v12 in [false, true] {
        let (s, _) = connect(srv.addr(), v12);
        let suite = s.conn.negotiated_cipher_suite().unwrap().suite();
        assert!(
            format!("{suite:?}").contains("CHACHA20_POLY1305"),
            "{suite:?}"
        );
    }
    let varz = srv.http_addr().unwrap();
    let count = |aead: &str| varz_value(varz, &format!("derpd_tls_handshakes{{aead=\"{aead}\"}}"));
    assert_eq!(count("chacha20_poly1305"), Some(2));
    assert_eq!(count("aes_256_gcm"), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}
