//! Bad input closes the offending connection and nothing else: size limits of every frame,
//! mesh-only frames from ordinary clients, broken logins, and STUN garbage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::Ordering::Relaxed;

use crate::support::inproc::*;
use derpd::handshake;
use derpd::key::{NodePrivate, NodePublic};

fn bystanders_still_relay(a: &mut DerpClient, b: &mut DerpClient, tag: &str) {
    let bk = b.public();
    a.send(&bk, tag.as_bytes());
    assert_eq!(b.recv_packet().1, tag.as_bytes(), "bystanders after {tag}");
}

#[test]
fn frame_limits_close_the_connection() {
    let srv = start_dev();
    let m = srv.relay().metrics.clone();
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    let dst = b.public().0;
    let big = [&dst[..], &vec![0u8; 65537]].concat();
    let cases: Vec<(&str, u8, Vec<u8>)> = vec![
        ("SendPacket over 64 KiB", 0x04, big),
        ("SendPacket shorter than a key", 0x04, vec![0; 31]),
        ("Ping of 7 bytes", 0x12, vec![0; 7]),
        ("Ping of 1001 bytes", 0x12, vec![0; 1001]),
        ("NotePreferred of 2 bytes", 0x07, vec![1, 1]),
        ("WatchConns without the mesh key", 0x10, vec![]),
        ("ClosePeer without the mesh key", 0x11, vec![0; 32]),
        ("ForwardPacket without the mesh key", 0x0a, vec![0; 70]),
    ];
    for (what, t, payload) in cases {
        let mut c = DerpClient::connect(srv.addr());
        let _ = c.write_frame(t, &payload);
        assert!(c.is_closed_by_server(), "{what}: connection must be closed");
        bystanders_still_relay(&mut a, &mut b, what);
    }
    wait_until("only the bystanders left", || {
        m.current_connections.load(Relaxed) == 2
    });
}

#[test]
fn unknown_frames_are_skipped() {
    let srv = start_dev();
    let mut c = DerpClient::connect(srv.addr());
    c.write_frame(0x7f, &vec![0xee; 3000]).unwrap();
    c.write_frame(0x01, &[0; 40]).unwrap(); // a server-to-client type sent by a client
    c.write_frame(0x12, &[5; 8]).unwrap();
    assert_eq!(c.recv().payload, [5; 8]);
    assert_eq!(srv.relay().metrics.unknown_frames.load(Relaxed), 2);
}

/// Sends the upgrade request and the given first frame; returns whether a ServerInfo came back.
fn try_login(srv: &derpd::server::Server, first_frame: &[u8]) -> bool {
    let s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut c = DerpClient::new_raw(s);
    c.s.write_all(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
        .unwrap();
    c.s.write_all(first_frame).unwrap();
    c.read_server_key().unwrap();
    match c.read_frame() {
        Ok(f) => f.t == 0x03,
        Err(_) => false,
    }
}

#[test]
fn broken_logins_are_refused() {
    let srv = start_dev();
    let sk = srv.relay().public_key;
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    let client = NodePrivate::generate();
    // Control: a good login works this way.
    assert!(try_login(
        &srv,
        &handshake::client_info_frame(&client, &sk, b"{}")
    ));

    let mut zero = handshake::client_info_frame(&client, &sk, b"{}");
    zero[5..37].fill(0);
    let bad_mesh = handshake::client_info_frame(&client, &sk, br#"{"meshKey":"badf00d"}"#);
    let wrong_server =
        handshake::client_info_frame(&client, &NodePrivate::generate().public(), b"{}");
    let not_json = handshake::client_info_frame(&client, &sk, b"hello");
    let mut short = vec![0x02, 0, 0, 0, 55];
    short.extend([1u8; 55]);
    let mut first_is_send = vec![0x04, 0, 0, 0, 40];
    first_is_send.extend([1u8; 40]);
    let mut huge = vec![0x02];
    huge.extend(((256u32 << 10) + 1).to_be_bytes());
    for (what, f) in [
        ("all-zero client key", zero),
        ("meshKey that is not 64 hex", bad_mesh),
        ("box for another server", wrong_server),
        ("ClientInfo that is not JSON", not_json),
        ("ClientInfo shorter than key+nonce", short),
        ("first frame not ClientInfo", first_is_send),
        ("ClientInfo over 256 KiB", huge),
    ] {
        assert!(!try_login(&srv, &f), "{what} must not log in");
        bystanders_still_relay(&mut a, &mut b, what);
    }
    assert_eq!(srv.relay().registry.key_count(), 2);
}

#[test]
fn stun_answers_tailscale_requests_only() {
    let srv = start_dev();
    let stun_addr = srv.stun_addrs()[0];
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let tx = [7u8; 12];
    // Garbage first; the server must keep answering afterwards.
    sock.send_to(b"\x00\x01garbage", stun_addr).unwrap();
    sock.send_to(&derpd::stun::tailscale_request(&tx)[..20], stun_addr)
        .unwrap();
    sock.send_to(&derpd::stun::tailscale_request(&tx), stun_addr)
        .unwrap();
    let mut buf = [0u8; 128];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let mut want = [0u8; derpd::stun::MAX_RESPONSE_LEN];
    let wn = derpd::stun::write_response(&mut want, &tx, sock.local_addr().unwrap());
    assert_eq!(
        &buf[..n],
        &want[..wn],
        "exactly one XOR-MAPPED-ADDRESS with our address"
    );
    let m = &srv.relay().metrics;
    wait_until("stun counters", || {
        m.stun_success.load(Relaxed) == 1 && m.stun_not_stun.load(Relaxed) == 2
    });
    let _ = NodePublic([0; 32]);
}
