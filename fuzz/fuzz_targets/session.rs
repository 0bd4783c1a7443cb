//! A whole DERP connection: `session::serve` on a server state built in-process
//! (`Relay::new`), over an in-memory stream that delivers the fuzzer's bytes and then
//! EOF. The first byte picks the mode:
//! - bits 0-1: 0: the rest is everything the client sends (the ClientInfo frame included);
//!   1: a valid ClientInfo from a fixed client key comes first, then the rest (frames after the
//!   login); 2: the same as a mesh peer (the region's mesh key: WatchConns, ClosePeer and
//!   ForwardPacket are allowed); 3: as 1, with a sealed ClientInfo that says nothing (`{}`);
//! - bits 2-4: the read size (everything at once, or 1, 2, 3, 5, 8, 64, 1000 bytes);
//! - bit 5: the stream is not ready before each read;
//! - bit 6: `Derp-Fast-Start` (no 101 first); bit 7: `Ideal-Node` was sent.
//!
//! Checks: the connection ends when the input does (EOF) at the latest, without a panic; what the server
//! wrote is whole frames of server types after its 101; and nothing stays behind: no
//! registered client, watcher or PeerGone interest, no pool buffer in use or waited for.
#![no_main]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use common::Feed;
use derpd::session::{self, Handoff};
use derpd::config::Config;
use derpd::frame::FrameType;
use derpd::handshake::client_info_frame;
use derpd::key::NodePrivate;
use derpd::relay::Relay;
use libfuzzer_sys::fuzz_target;

const SERVER_KEY: [u8; 32] = [0x11; 32];
const CLIENT_KEY: [u8; 32] = [0x22; 32];
const MESH_KEY: [u8; 32] = [0x33; 32];

struct Fixture {
    state: Arc<Relay>,
    /// ClientInfo frames: regular, mesh, empty JSON.
    logins: [Vec<u8>; 3],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut cfg = Config::dev_loopback();
        cfg.mesh_key = Some(MESH_KEY);
        // A small pool (MIN_PER_CLASS of each class), so that readers wait for buffers too.
        cfg.limits.buffer_budget = 1 << 20;
        let server = NodePrivate::from_bytes(SERVER_KEY);
        let state = Arc::new(Relay::new(&cfg, server.clone()).expect("in-process relay"));
        let client = NodePrivate::from_bytes(CLIENT_KEY);
        let mesh_hex: String = MESH_KEY.iter().map(|b| format!("{b:02x}")).collect();
        let mesh_json = format!(r#"{{"version":2,"meshKey":"{mesh_hex}"}}"#);
        let login = |json: &[u8]| client_info_frame(&client, &server.public(), json);
        Fixture {
            state,
            logins: [
                login(br#"{"version":2,"canAckPings":true}"#),
                login(mesh_json.as_bytes()),
                login(b"{}"),
            ],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let input = match mode & 3 {
        0 => rest.to_vec(),
        i => [&f.logins[usize::from(i - 1)][..], rest].concat(),
    };
    let fast_start = mode & 0x40 != 0;
    let mut rd = Feed::new(&input, mode >> 2, mode & 0x20 != 0);
    let mut wr = Feed::new(&[], 0, false);
    let up = Handoff {
        remote: SocketAddr::from(([192, 0, 2, 1], 41641)),
        fast_start,
        not_ideal: mode & 0x80 != 0,
        websocket: false,
        slot: None,
    };
    let state = &f.state;
    // It ends at EOF at the latest: an error, or the client closed (ClosePeer of itself), may
    // end it sooner.
    let _ = smol::block_on(session::serve(state.clone(), &mut rd, &mut wr, up));
    check_output(&wr.out, fast_start);
    assert_eq!(wr.out.len(), wr.written, "output over the cap");

    // Nothing outlives the connection.
    let m = &state.metrics;
    assert_eq!(m.current_connections.load(Relaxed), 0);
    assert_eq!(m.home_connections.load(Relaxed), 0);
    assert_eq!(m.notideal_connections.load(Relaxed), 0);
    assert_eq!(state.registry.key_count(), 0);
    assert_eq!(state.registry.peer_gone_interests(), 0);
    assert_eq!(state.registry.varz_counts(), (0, 0, 0));
    let p = state.pool.stats();
    assert_eq!((p.small.2, p.large.2, p.waiting), (0, 0, (0, 0)), "{p:?}");
});

/// The server's side: a 101 (unless fast-start), then whole frames of types a server sends,
/// ServerKey first.
fn check_output(out: &[u8], fast_start: bool) {
    let mut b = out;
    if !fast_start {
        assert!(b.starts_with(b"HTTP/1.1 101 "), "no 101");
        let end = b
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("101 head end");
        b = &b[end + 4..];
    }
    let frames = common::frames(b).expect("output ends inside a frame");
    assert_eq!(
        frames.first().map(|f| f.0),
        Some(FrameType::ServerKey as u8)
    );
    for (i, &(t, payload)) in frames.iter().enumerate() {
        let t = FrameType::from_u8(t).expect("unknown frame type written");
        match t {
            FrameType::ServerKey => assert_eq!(i, 0),
            FrameType::ServerInfo => assert_eq!(i, 1),
            FrameType::RecvPacket => {
                assert!(payload.len() >= 32 && payload.len() <= 32 + (64 << 10))
            }
            FrameType::KeepAlive => assert!(payload.is_empty()),
            FrameType::Pong => assert_eq!(payload.len(), 8),
            FrameType::PeerGone => assert_eq!(payload.len(), 33),
            FrameType::PeerPresent => assert_eq!(payload.len(), derpd::frame::PEER_PRESENT_LEN),
            _ => panic!("{t:?} written to a client"),
        }
    }
}
