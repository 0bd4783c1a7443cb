//! Relaying among in-process clients: the DERP conformance items of derper's TestSendRecv,
//! TestSendFreeze, TestServerRepliesToPing and TestServerDupClients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use crate::support::inproc::*;
use derpd::key::{NodePrivate, NodePublic};
use derpd::metrics::DropReason;

#[test]
fn send_recv_among_three_clients() {
    let srv = start_dev();
    let m = srv.relay().metrics.clone();
    let mut c: Vec<_> = (0..3).map(|_| DerpClient::connect(srv.addr())).collect();
    wait_until("3 connections", || m.current_connections.load(Relaxed) == 3);
    let keys: Vec<NodePublic> = c.iter().map(|x| x.public()).collect();
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let msg = format!("hello {i}->{j}").into_bytes();
                c[i].send(&keys[j], &msg);
                let (src, got) = c[j].recv_packet();
                assert_eq!(src, keys[i]);
                assert_eq!(got, msg);
            }
        }
    }
    // Sending to yourself works.
    c[0].send(&keys[0], b"me");
    assert_eq!(c[0].recv_packet(), (keys[0], b"me".to_vec()));

    // A non-disco packet to an unknown key: dropped, no PeerGone. A disco one: NotHere,
    // rate limited to a burst of 3 (plus one per second of test time).
    let unknown = NodePrivate::generate().public();
    c[0].send(&unknown, b"not disco");
    let t0 = Instant::now();
    for _ in 0..6 {
        c[0].send(&unknown, &disco_packet());
    }
    c[0].send(&keys[0], b"marker");
    let mut not_here = 0;
    loop {
        let f = c[0].recv();
        if f.t == 0x05 {
            assert_eq!(&f.payload[32..], b"marker");
            break;
        }
        assert_eq!(f.t, 0x08);
        assert_eq!(f.payload.len(), 33);
        assert_eq!(&f.payload[..32], &unknown.0);
        assert_eq!(f.payload[32], 0x01, "NotHere");
        not_here += 1;
    }
    let allowed = 3 + t0.elapsed().as_secs() as usize + 1;
    assert!(
        (3..=allowed).contains(&not_here),
        "{not_here} NotHere frames"
    );
    assert_eq!(m.dropped(DropReason::UnknownDest), 7);
    assert_eq!(m.peer_gone_not_here_frames.load(Relaxed), not_here as u64);

    // NotePreferred moves the home gauge and is idempotent.
    c[1].write_frame(0x07, &[1]).unwrap();
    c[1].write_frame(0x07, &[1]).unwrap();
    wait_until("home connection", || m.home_connections.load(Relaxed) == 1);
    c[1].write_frame(0x07, &[0]).unwrap();
    wait_until("no home connection", || {
        m.home_connections.load(Relaxed) == 0
    });

    // Client 2 only received from 0 and 1 (and sent). Closing client 0: clients 1 and 2
    // received from it, so each gets exactly one PeerGone(Disconnected).
    let c0 = c.remove(0);
    drop(c0);
    wait_until("2 connections", || m.current_connections.load(Relaxed) == 2);
    for x in c.iter_mut() {
        let f = x.recv();
        assert_eq!(f.t, 0x08);
        assert_eq!(f.payload, [&keys[0].0[..], &[0x00]].concat());
    }
    // No second PeerGone: the next frame is a packet.
    c[0].send(&keys[2], b"after");
    assert_eq!(c[1].recv_packet().1, b"after");
    c[1].send(&keys[1], b"after2");
    assert_eq!(c[0].recv_packet().1, b"after2");
    assert_eq!(m.peer_gone_disconnected_frames.load(Relaxed), 2);
}

#[test]
fn fast_start_keeps_pipelined_login() {
    let srv = start_dev();
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let key = NodePrivate::generate();
    let server_key = srv.relay().public_key;
    let mut req = b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n".to_vec();
    req.extend(derpd::handshake::client_info_frame(
        &key,
        &server_key,
        b"{}",
    ));
    std::io::Write::write_all(&mut s, &req).unwrap();
    let mut c = DerpClient {
        key,
        server_key: NodePublic([0; 32]),
        s,
    };
    // No 101: the first bytes are the ServerKey frame, then ServerInfo.
    c.read_server_key().unwrap();
    assert_eq!(c.server_key, server_key);
    c.expect_server_info().unwrap();
    assert_eq!(srv.relay().metrics.fast_start_logins.load(Relaxed), 1);
    let me = c.public();
    c.send(&me, b"loop");
    assert_eq!(c.recv_packet().1, b"loop");
}

#[test]
fn ping_gets_pong() {
    let srv = start_dev();
    let mut c = DerpClient::connect(srv.addr());
    c.write_frame(0x12, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let f = c.recv();
    assert_eq!(
        (f.t, f.payload.as_slice()),
        (0x13, &[1, 2, 3, 4, 5, 6, 7, 8][..])
    );
    // Extra bytes are ignored: the first 8 are echoed.
    let mut long = vec![9u8; 1000];
    long[0] = 42;
    c.write_frame(0x12, &long).unwrap();
    let f = c.recv();
    assert_eq!(f.payload, [42, 9, 9, 9, 9, 9, 9, 9]);
}

#[test]
fn receiver_that_stops_reading_does_not_stall_others() {
    let srv = start_dev();
    let m = srv.relay().metrics.clone();
    let mut sender = DerpClient::connect(srv.addr());
    let frozen = DerpClient::connect(srv.addr());
    let mut live = DerpClient::connect(srv.addr());
    let (fk, lk) = (frozen.public(), live.public());
    let pkt = vec![0xa5u8; 1400];
    // Enough to fill the frozen client's socket buffers and queue many times over.
    for i in 0..3000u32 {
        sender.send(&fk, &pkt);
        if i % 100 == 0 {
            sender.send(&lk, &i.to_be_bytes());
            assert_eq!(live.recv_packet().1, i.to_be_bytes());
        }
    }
    // The frozen one loses packets (queue head drops, then the write timeout closes it).
    wait_until("drops for the frozen receiver", || {
        m.dropped(DropReason::QueueHead)
            + m.dropped(DropReason::WriteError)
            + m.dropped(DropReason::GoneDisconnected)
            > 0
    });
    sender.send(&lk, b"still flowing");
    assert_eq!(live.recv_packet().1, b"still flowing");
    drop(frozen);
}

#[test]
fn duplicate_keys_newest_then_last_writer() {
    let srv = start_dev();
    let m = srv.relay().metrics.clone();
    let key = NodePrivate::generate();
    let json = br#"{"version":2}"#;
    let mut old = DerpClient::connect_with(srv.addr(), key.clone(), json);
    let mut new = DerpClient::connect_with(srv.addr(), key.clone(), json);
    let mut peer = DerpClient::connect(srv.addr());
    wait_until("dup gauges", || {
        m.dup_client_keys.load(Relaxed) == 1 && m.dup_client_conns.load(Relaxed) == 2
    });
    let k = key.public();
    peer.send(&k, b"to newest");
    assert_eq!(new.recv_packet().1, b"to newest");
    // The old connection speaks (a ping): it becomes active.
    old.write_frame(0x12, &[0; 8]).unwrap();
    assert_eq!(old.recv().t, 0x13);
    peer.send(&k, b"to last writer");
    assert_eq!(old.recv_packet().1, b"to last writer");
    // The old one leaves: no PeerGone for the key (another connection remains).
    drop(old);
    wait_until("single again", || m.dup_client_keys.load(Relaxed) == 0);
    peer.send(&k, b"to remaining");
    assert_eq!(new.recv_packet().1, b"to remaining");
    let me = peer.public();
    new.send(&me, b"ping back");
    let f = peer.recv();
    assert_eq!(f.t, 0x05, "no PeerGone before the packet: {f:?}");
    assert_eq!(m.total_dup_client_conns.load(Relaxed), 1);
}

#[test]
fn pool_budget_is_never_exceeded() {
    let mut cfg = derpd::config::Config::dev_loopback();
    cfg.limits.buffer_budget = 0; // the minimum: 4 small + 4 large buffers
    let srv = start(cfg);
    let mut a = DerpClient::connect(srv.addr());
    let mut b = DerpClient::connect(srv.addr());
    let bk = b.public();
    let reader = std::thread::spawn(move || {
        let mut sum = 0u64;
        for _ in 0..2000 {
            sum += b.recv_packet().1.len() as u64;
        }
        sum
    });
    let mut sent = 0u64;
    for i in 0..2000usize {
        let len = if i % 10 == 0 { 20_000 } else { 1000 };
        a.send(&bk, &vec![1; len]);
        sent += len as u64;
    }
    // With only 8 buffers the sender is slowed down (backpressure), but nothing is lost while
    // the receiver keeps reading, and the pool never grows.
    let got = reader.join().unwrap();
    assert_eq!(got, sent);
    let st = srv.relay().pool.stats();
    assert!(st.small.1 <= 4 && st.large.1 <= 4, "{st:?}");
}

/// Mesh-key privileges (derper §2.8/2.9): WatchConns, ForwardPacket and ClosePeer need the
/// mesh key; a watcher gets PeerPresent (51 bytes, flags) and PeerGone; a forwarded packet
/// keeps its source; a forwarded disco packet for an unknown key earns the peer a NotHere.
#[test]
fn mesh_key_privileges() {
    let mesh_key = [0x5e_u8; 32];
    let mut cfg = derpd::config::Config::dev_loopback();
    cfg.mesh_key = Some(mesh_key);
    let srv = start(cfg);
    let m = srv.relay().metrics.clone();
    let addr = srv.addr();
    let mesh_json = |k: &[u8; 32]| {
        format!(r#"{{"version":2,"meshKey":"{}"}}"#, derpd::key::hex(k)).into_bytes()
    };

    // Without the key (or with a wrong one) every mesh frame closes the connection.
    for (t, payload) in [(0x10, vec![]), (0x11, vec![0; 32]), (0x0a, vec![1; 70])] {
        let mut plain = DerpClient::connect(addr);
        plain.write_frame(t, &payload).unwrap();
        assert!(plain.is_closed_by_server(), "frame {t:#x} without mesh key");
    }
    let mut wrong = DerpClient::connect_with(addr, NodePrivate::generate(), &mesh_json(&[1; 32]));
    wrong.write_frame(0x10, &[]).unwrap();
    assert!(wrong.is_closed_by_server(), "wrong mesh key");

    let mut target = DerpClient::connect(addr);
    let mut w = DerpClient::connect_with(addr, NodePrivate::generate(), &mesh_json(&mesh_key));
    wait_until("2 connections", || m.current_connections.load(Relaxed) == 2);
    w.write_frame(0x10, &[]).unwrap();
    let mut present = Vec::new();
    for _ in 0..2 {
        let f = w.recv();
        assert_eq!((f.t, f.payload.len()), (0x09, 51), "PeerPresent");
        present.push((
            NodePublic(f.payload[..32].try_into().unwrap()),
            f.payload[50],
        ));
        // IPv4 remote, sent v4-mapped.
        assert_eq!(
            &f.payload[32..48],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
    }
    present.sort_by_key(|(k, _)| *k == w.public());
    assert_eq!(present, vec![(target.public(), 0x01), (w.public(), 0x02)]);

    // ForwardPacket: delivered with the original source.
    let src = NodePrivate::generate().public();
    let fwd = [&src.0[..], &target.public().0[..], b"forwarded"].concat();
    w.write_frame(0x0a, &fwd).unwrap();
    assert_eq!(target.recv_packet(), (src, b"forwarded".to_vec()));
    assert_eq!(m.packets_forwarded_in.load(Relaxed), 1);
    // To an unknown key: dropped; disco earns the forwarding peer a NotHere.
    let unknown = NodePrivate::generate().public();
    let fwd = [&src.0[..], &unknown.0[..], &disco_packet()[..]].concat();
    w.write_frame(0x0a, &fwd).unwrap();
    let f = w.recv();
    assert_eq!(
        (f.t, &f.payload[..32], f.payload[32]),
        (0x08, &unknown.0[..], 0x01)
    );
    assert_eq!(m.dropped(DropReason::UnknownDestOnFwd), 1);

    // Later arrivals and departures reach the watcher.
    let newcomer = DerpClient::connect(addr);
    let nk = newcomer.public();
    let f = w.recv();
    assert_eq!((f.t, &f.payload[..32]), (0x09, &nk.0[..]));
    drop(newcomer);
    let f = w.recv();
    assert_eq!((f.t, f.payload), (0x08, [&nk.0[..], &[0x00]].concat()));

    // ClosePeer closes every connection of the key; the watcher hears it leave.
    w.write_frame(0x11, &target.public().0).unwrap();
    assert!(target.is_closed_by_server(), "ClosePeer");
    let f = w.recv();
    assert_eq!(f.payload, [&target.public().0[..], &[0x00]].concat());
    // A ClosePeer for nobody is only logged; the mesh connection stays.
    w.write_frame(0x11, &[9; 32]).unwrap();
    let me = w.public();
    w.send(&me, b"still here");
    assert_eq!(w.recv_packet().1, b"still here");
}
