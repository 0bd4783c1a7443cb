//! The login: `handshake::open_client_info` with a fixed server key, and the ClientInfo JSON
//! rules behind it. The first byte picks the mode:
//! - 0: the rest is a raw ClientInfo payload (key ‖ nonce ‖ box), as a client may send it;
//! - 1: the rest is JSON, sealed in a valid box from a fixed client key, so the fuzzer gets
//!   through the crypto to `parse_client_info_json` the way a real login does;
//! - other: the rest is JSON for `parse_client_info_json` alone (fast: no X25519 per input).
#![no_main]

use derpd::frame::{self, HEADER_LEN};
use derpd::handshake::{
    check_client_info_header, client_info_frame, open_client_info, open_server_info,
    parse_client_info_json, server_info_frame, ClientInfo, LoginError,
};
use derpd::key::{NodePrivate, KEY_LEN};
use libfuzzer_sys::fuzz_target;

const SERVER_KEY: [u8; KEY_LEN] = [0x11; KEY_LEN];
const CLIENT_KEY: [u8; KEY_LEN] = [0x22; KEY_LEN];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let server = NodePrivate::from_bytes(SERVER_KEY);
    match mode {
        0 => raw(&server, rest),
        1 => sealed(&server, rest),
        _ => {
            if let Ok(info) = parse_client_info_json(rest) {
                check_info(&info);
            }
        }
    }
});

/// A raw payload: refused for its length or zero key before any crypto, and otherwise opens
/// only if the box is genuine (the fuzzer cannot forge one).
fn raw(server: &NodePrivate, payload: &[u8]) {
    let res = open_client_info(server, payload);
    let n = payload.len();
    if !(frame::CLIENT_INFO_MIN..=frame::CLIENT_INFO_MAX).contains(&n) {
        assert_eq!(res.err(), Some(LoginError::BadLength(n as u32)));
        return;
    }
    if payload[..KEY_LEN] == [0; KEY_LEN] {
        assert_eq!(res.err(), Some(LoginError::ZeroKey));
        return;
    }
    match res {
        Ok((info, _)) => {
            assert_eq!(info.key.0, payload[..KEY_LEN]);
            check_info(&info);
        }
        Err(e) => assert!(
            matches!(e, LoginError::BoxOpen | LoginError::Json(_)),
            "{e:?}"
        ),
    }
}

/// Fuzzer JSON in a genuine box: the frame passes the header check and opens to exactly what
/// `parse_client_info_json` says of the same bytes; a login that succeeds gets a ServerInfo
/// the client can open.
fn sealed(server: &NodePrivate, json: &[u8]) {
    let client = NodePrivate::from_bytes(CLIENT_KEY);
    let f = client_info_frame(&client, &server.public(), json);
    let h: &[u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap_or(&[0; HEADER_LEN]);
    let (t, len) = frame::decode_header(h);
    assert_eq!(len as usize, f.len() - HEADER_LEN);
    let header = check_client_info_header(t, len);
    let opened = open_client_info(server, &f[HEADER_LEN..]);
    if header.is_err() {
        // Only too much JSON can fail the header check, and then the payload fails too.
        assert_eq!(header, Err(LoginError::BadLength(len)));
        assert_eq!(opened.err(), Some(LoginError::BadLength(len)));
        return;
    }
    let direct = parse_client_info_json(json);
    match (opened, direct) {
        (Ok((info, bx)), Ok(want)) => {
            assert_eq!(info.key, client.public());
            assert_eq!(
                info,
                ClientInfo {
                    key: client.public(),
                    ..want
                }
            );
            check_info(&info);
            let si = server_info_frame(&bx);
            let body = open_server_info(&client, &server.public(), &si[HEADER_LEN..]);
            assert_eq!(body.as_deref(), Some(&br#"{"version":2}"#[..]));
        }
        (Err(e), Err(want)) => assert_eq!(e, want),
        (a, b) => panic!("sealed {:?} vs direct {b:?}", a.map(|(i, _)| i)),
    }
}

/// What any accepted ClientInfo satisfies.
fn check_info(info: &ClientInfo) {
    assert!(info.app_name.chars().count() <= 64);
    assert_ne!(info.mesh_key, Some([0; KEY_LEN]));
}
