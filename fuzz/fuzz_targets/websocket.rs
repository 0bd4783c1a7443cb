//! The WebSocket transport (`ws::transport`: RFC 6455 frames from a client in, DERP bytes out,
//! and back) over an in-memory stream that delivers the fuzzer's bytes and then EOF. The first
//! byte picks the mode:
//! - bits 0-2: the read size (everything at once, or 1, 2, 3, 5, 8, 64, 1000 bytes);
//! - bit 3: the stream is not ready before each read;
//! - bits 4-5: how many of the following bytes are `leftover` (bytes read with the request
//!   head): none, 2, 16 or 256 (fewer if the input is shorter);
//! - bit 6: a vectored write (a DERP writer's batch) goes out after the stream ends;
//! - bit 7: DERP reads of 5 bytes (a frame header) instead of 4 KiB.
//!
//! Checks: reading ends, at EOF or with an error (a protocol error, or EOF inside a frame),
//! without a panic; a Text frame is refused;
//! no more DERP bytes come out than binary payload went in; what the server wrote is unmasked
//! frames that parse.
#![no_main]

mod common;

use std::io::IoSlice;

use common::Feed;
use derpd::ws;
use libfuzzer_sys::fuzz_target;
use smol::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let lead = [0, 2, 16, 256][usize::from((mode >> 4) & 3)].min(rest.len());
    let (leftover, wire) = rest.split_at(lead);
    let total_in = leftover.len() + wire.len();
    let feed = Feed::new(wire, mode, mode & 0x08 != 0);
    let step = if mode & 0x80 != 0 { 5 } else { 4096 };
    smol::block_on(async {
        let (mut rd, mut wr) = ws::transport(feed, leftover.to_vec()).await;
        let mut got = 0usize;
        let mut buf = vec![0u8; step];
        let end = loop {
            match rd.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) => break Err(e),
            }
            // Masked frames carry at most their own length in payload.
            assert!(
                got <= total_in,
                "{got} DERP bytes from {total_in} input bytes"
            );
        };
        // A protocol error, or the stream ending inside a frame.
        if let Err(e) = &end {
            use std::io::ErrorKind::{InvalidData, UnexpectedEof};
            assert!(matches!(e.kind(), InvalidData | UnexpectedEof), "{e}");
        }
        // After the end, reads stay ended and writes fail or go out as frames: never a panic.
        let _ = rd.read(&mut buf).await;
        if mode & 0x40 != 0 {
            let bufs = [
                IoSlice::new(b"\x06\0\0\0\0"),
                IoSlice::new(&[0x13, 0, 0, 0, 8]),
            ];
            let _ = wr.write_vectored(&bufs).await;
            let _ = wr.flush().await;
        }
    });
});
