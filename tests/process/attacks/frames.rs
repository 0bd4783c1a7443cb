//! Hostile frames after a login, on the plain HTTP listener.

use std::io::Write;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support;
use crate::support::inproc::{self, DerpClient, IO_TIMEOUT};
use derpd::key::NodePublic;

use super::rig::*;

/// Frames after a login: too large, truncated, of unknown types (skipped, as derper does),
/// and packets to the all-zero key.
#[test]
fn hostile_frames() {
    let _turn = support::exclusive("attacks");
    support::raise_nofile();
    let mut rig = plain_rig();
    let addr = rig.addr;

    for (name, len, expect) in [
        (
            "SendPacket length 0xFFFFFFFF",
            u32::MAX,
            "SendPacket too large: 4294967263",
        ),
        (
            "SendPacket of 64 KiB + 1",
            32 + 65537,
            "SendPacket too large: 65537",
        ),
    ] {
        let mut at = rig.begin(name);
        let mut c = DerpClient::connect(addr);
        let local = c.s.local_addr().unwrap();
        let mut f = header(0x04, len);
        f.extend(rig.b.public().0);
        f.extend(vec![0x55; 65537]);
        let _ = c.s.write_all(&f);
        at.closed = must_close(&mut c.s, IO_TIMEOUT, name);
        rig.expect_line(&mut at, local, expect);
        drop(c);
        rig.finish(at);
    }

    // Truncated frames: the client half-closes in the middle of a frame.
    for (name, bytes) in [
        ("truncated: 3 bytes of a header, then EOF", vec![0x04, 0, 0]),
        ("truncated: SendPacket header, then EOF", header(0x04, 132)),
        ("truncated: half a SendPacket payload, then EOF", {
            let mut f = header(0x04, 132);
            f.extend([1u8; 32 + 50]);
            f
        }),
    ] {
        let mut at = rig.begin(name);
        let mut c = DerpClient::connect(addr);
        let local = c.s.local_addr().unwrap();
        c.s.write_all(&bytes).unwrap();
        c.s.shutdown(Shutdown::Write).unwrap();
        at.closed = must_close(&mut c.s, IO_TIMEOUT, name);
        rig.expect_line(&mut at, local, "EOF before the end of a frame");
        drop(c);
        rig.finish(at);
    }

    // Unknown frame types are skipped, as derper does (handleUnknownFrame discards any
    // length): the connection stays usable.
    {
        let mut at = rig.begin("unknown frame type 0x7f, 3000 bytes");
        let mut c = DerpClient::connect(addr);
        c.write_frame(0x7f, &[0xee; 3000]).unwrap();
        c.write_frame(0x12, &[9; 8]).unwrap();
        let pong = c.recv();
        assert_eq!(
            (pong.t, pong.payload),
            (0x13, vec![9; 8]),
            "Pong after skip"
        );
        at.closed = "no: skipped, as derper; the next Ping is answered".into();
        at.log = "(none: skipped frames are not logged, as derper)".into();
        drop(c);
        rig.finish(at);
    }
    {
        // A 4 GiB frame of an unknown type, streamed as fast as the test can write, with one
        // worker thread: the skipping reader must not starve the other connections.
        let mut at = rig.begin("unknown frame type 0x7f, length 0xFFFFFFFF, streamed");
        let mut c = DerpClient::connect(addr);
        let local = c.s.local_addr().unwrap();
        c.s.write_all(&header(0x7f, u32::MAX)).unwrap();
        let mut w = c.s.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let streamer = thread::spawn(move || {
            let chunk = vec![0xabu8; 64 << 10];
            let mut sent = 0u64;
            while !st.load(Relaxed) && w.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
            }
            sent
        });
        let mut worst = Duration::ZERO;
        for i in 0..20 {
            let t0 = Instant::now();
            relay_both(
                &mut rig.a,
                &mut rig.b,
                &format!("during the 4 GiB frame #{i}"),
            );
            worst = worst.max(t0.elapsed());
        }
        stop.store(true, Relaxed);
        let sent = streamer.join().unwrap();
        c.s.shutdown(Shutdown::Write).unwrap();
        must_close(&mut c.s, IO_TIMEOUT, &at.name);
        at.closed = format!(
            "at its EOF ({} MiB streamed; bystander round trip ≤ {} ms meanwhile)",
            sent >> 20,
            worst.as_millis()
        );
        assert!(
            worst < Duration::from_secs(2),
            "bystanders starved while a 4 GiB unknown frame was skipped: a round trip took {worst:?}"
        );
        rig.expect_line(&mut at, local, "EOF before the end of a frame");
        drop(c);
        rig.finish(at);
    }

    {
        let mut at = rig.begin("SendPacket to the zero key (plain and disco)");
        let mut c = DerpClient::connect(addr);
        let zero = NodePublic([0; 32]);
        c.send(&zero, b"to nobody");
        c.send(&zero, &inproc::disco_packet());
        // The disco packet earns a PeerGone(NotHere) for the zero key, as in derper.
        let f = c.recv();
        assert_eq!(f.t, 0x08, "PeerGone");
        assert_eq!(f.payload[..32], [0; 32]);
        assert_eq!(f.payload[32], 1, "reason NotHere");
        c.write_frame(0x12, &[3; 8]).unwrap();
        assert_eq!(c.recv().t, 0x13);
        at.closed = "no: dropped as unknown_dest, PeerGone(NotHere) for disco, as derper".into();
        at.log = "(none: an unknown destination is not an error)".into();
        drop(c);
        rig.finish(at);
    }

    rig.print("plain HTTP listener: frames after login");
}
