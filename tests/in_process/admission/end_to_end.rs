//! End to end, in process: a refused client sees EOF after ClientInfo (no ServerInfo) while
//! admitted ones relay; mesh peers are not checked; the allow-keys file is followed.

use super::{fake_tcp, http, login, recv, responder, start_with, temp_dir, write_keys};
use super::{Req, CLIENT_JSON, IO_TIMEOUT};
use derpd::admission::{AdmissionConfig, Check};
use derpd::key::NodePrivate;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

/// A refused login: ServerKey came, then EOF where ServerInfo would be.
fn expect_refused(addr: SocketAddr, key: NodePrivate) {
    match login(addr, key, CLIENT_JSON) {
        Ok(_) => panic!("admitted, want refused"),
        Err(e) => assert!(e.starts_with("reading ServerInfo: "), "{e}"),
    }
}

#[test]
fn refused_client_sees_eof_admitted_clients_relay() {
    let (a_key, c_key, b_key) = (
        NodePrivate::generate(),
        NodePrivate::generate(),
        NodePrivate::generate(),
    );
    let allowed = [a_key.public(), c_key.public()];
    let (addr, rx) = fake_tcp(responder(move |r| {
        let allow = allowed
            .iter()
            .any(|k| r.body_text().contains(&k.to_string()));
        http("200 OK", &format!(r#"{{"Allow":{allow}}}"#))
    }));
    let srv = start_with(
        AdmissionConfig {
            url: Some(format!("http://{addr}/admit")),
            fail_open: false,
            ..Default::default()
        },
        None,
    );
    let mut a = login(srv.addr(), a_key, CLIENT_JSON).unwrap();
    expect_refused(srv.addr(), b_key.clone());
    let mut c = login(srv.addr(), c_key, CLIENT_JSON).unwrap();
    a.send(&c.public(), b"a to c");
    assert_eq!(c.recv_packet(), (a.public(), b"a to c".to_vec()));
    c.send(&a.public(), b"c to a");
    assert_eq!(a.recv_packet(), (c.public(), b"c to a".to_vec()));
    // The refused key is not registered: a packet for it goes nowhere.
    a.send(&b_key.public(), b"to b");
    a.send(&a.public(), b"marker");
    assert_eq!(a.recv_packet(), (a.public(), b"marker".to_vec()));

    let reqs: Vec<Req> = (0..3).map(|_| recv(&rx)).collect();
    for (r, k) in reqs.iter().zip([a.public(), b_key.public(), c.public()]) {
        assert_eq!(
            r.body_text(),
            format!(r#"{{"NodePublic":"{k}","Source":"127.0.0.1"}}"#)
        );
    }
    let adm = &srv.relay().admission;
    assert_eq!((adm.rejections_by(Check::Url), adm.rejections()), (1, 1));
}

#[test]
fn mesh_peers_are_not_checked() {
    let mesh_key = [0x5e_u8; 32];
    let dir = temp_dir();
    let keys = dir.join("allow-keys");
    let listed = NodePrivate::generate();
    write_keys(&keys, &[listed.public()]);
    let (addr, rx) = fake_tcp(responder(|_| http("200 OK", r#"{"Allow":false}"#)));
    let srv = start_with(
        AdmissionConfig {
            url: Some(format!("http://{addr}/")),
            fail_open: false,
            allow_keys_file: Some(keys),
            ..Default::default()
        },
        Some(mesh_key),
    );
    let mesh_json = |k: &[u8; 32]| format!(r#"{{"version":2,"meshKey":"{}"}}"#, derpd::key::hex(k));
    // The mesh key skips the allow list and the controller.
    let mut peer = login(
        srv.addr(),
        NodePrivate::generate(),
        mesh_json(&mesh_key).as_bytes(),
    )
    .unwrap();
    peer.send(&peer.public(), b"in");
    assert_eq!(peer.recv_packet().1, b"in");
    // A wrong mesh key is a regular client: not listed.
    expect_refused(srv.addr(), NodePrivate::generate());
    let wrong = NodePrivate::generate();
    assert!(login(srv.addr(), wrong, mesh_json(&[1; 32]).as_bytes()).is_err());
    // Listed, then refused by the controller: the only request it got.
    expect_refused(srv.addr(), listed.clone());
    assert!(recv(&rx).body_text().contains(&listed.public().to_string()));
    assert!(rx.try_recv().is_err());
    let adm = &srv.relay().admission;
    assert_eq!(Check::ALL.map(|c| adm.rejections_by(c)), [2, 0, 1]);
}

#[test]
fn allow_keys_file_applies_to_new_logins() {
    let dir = temp_dir();
    let path = dir.join("allow-keys");
    let (a_key, b_key) = (NodePrivate::generate(), NodePrivate::generate());
    write_keys(&path, &[a_key.public()]);
    let srv = start_with(
        AdmissionConfig {
            allow_keys_file: Some(path.clone()),
            ..Default::default()
        },
        None,
    );
    let a = login(srv.addr(), a_key.clone(), CLIENT_JSON).unwrap();
    expect_refused(srv.addr(), b_key.clone());
    // The server looks at the file at most once a second: retry until the edit applies.
    write_keys(&path, &[b_key.public()]);
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut b = loop {
        match login(srv.addr(), b_key.clone(), CLIENT_JSON) {
            Ok(b) => break b,
            Err(e) => assert!(Instant::now() < deadline, "edit not applied: {e}"),
        }
        thread::sleep(Duration::from_millis(50));
    };
    // Logged-in clients stay; new logins follow the file.
    b.send(&a.public(), b"still here");
    expect_refused(srv.addr(), a_key);
    // A broken file on reload (SIGHUP): the list stays.
    std::fs::write(&path, "nodekey:broken\n").unwrap();
    srv.relay().admission.reload();
    login(srv.addr(), b_key, CLIENT_JSON).unwrap();
    drop(a);
}
