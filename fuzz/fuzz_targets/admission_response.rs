//! The admission controller's answer (`--verify-client-url`), read as a check reads it
//! (`admission::parse_admit_response`): the response head (1xx skipped, 16 KiB at most), the
//! framing (Content-Length, chunked, until close), the body's first 4 KiB and its JSON, over an
//! in-memory stream that delivers the fuzzer's bytes and then EOF. The first byte picks the
//! read size (bits 0-2: everything at once, or 1, 2, 3, 5, 8, 64, 1000 bytes) and whether the
//! stream is not ready before each read (bit 3).
//!
//! Checks: the answer ends without a panic, and only a 200 admits.
#![no_main]

mod common;

use common::Feed;
use derpd::admission::parse_admit_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let res = smol::block_on(parse_admit_response(Feed::new(
        rest,
        mode,
        mode & 0x08 != 0,
    )));
    if res == Ok(true) {
        let s = String::from_utf8_lossy(rest);
        assert!(s.contains(" 200"), "admitted without a 200");
    }
});
