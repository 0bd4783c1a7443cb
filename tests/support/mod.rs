//! Helpers shared by the test tiers (`tests/in_process.rs`, `tests/process.rs`,
//! `tests/interop.rs`, `tests/packages.rs`), one concept a file:
//! - [`inproc`]: derpd's library in the test process (`Server::start` on 127.0.0.1:0) and a raw,
//!   blocking DERP client.
//! - [`host`]: CI or not and skipping, programs, fresh paths, commands with a deadline, this test
//!   binary again (a child test, [`child_test`]), ports, rlimits, QEMU.
//! - [`derpd`]: derpd as a process and the log lines that are its contract with the tests.
//! - [`go`]: Go, the harness (`tests/interop/`), Tailscale's `derper`.
//! - [`netns`]: network namespaces, whole Tailscale nodes in one, the stray-packet detector.
//! - [`pkg`]: `openwrt/Makefile` and the built packages.
//!
//! Everything but [`inproc`] is re-exported here, so call sites read `support::Derpd`.
//! [`exclusive`] keeps tests that measure time, memory or file descriptors (or flood the
//! machine) from running beside another module's in one test binary.
#![allow(dead_code)]

pub(crate) mod derpd;
pub(crate) mod go;
pub(crate) mod host;
pub(crate) mod inproc;
pub(crate) mod netns;
pub(crate) mod pkg;

// Not every tier uses every file.
#[allow(unused_imports)]
pub(crate) use derpd::*;
#[allow(unused_imports)]
pub(crate) use go::*;
#[allow(unused_imports)]
pub(crate) use host::*;
#[allow(unused_imports)]
pub(crate) use netns::*;
#[allow(unused_imports)]
pub(crate) use pkg::*;

use std::sync::{Condvar, Mutex, MutexGuard};

/// Who is in the room: a group and how many of its tests.
static ROOM: Mutex<(Option<&'static str>, usize)> = Mutex::new((None, 0));
static ROOM_FREED: Condvar = Condvar::new();

fn room() -> MutexGuard<'static, (Option<&'static str>, usize)> {
    ROOM.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test's turn in the room; leaving it lets the next group in.
pub(crate) struct Turn;

impl Drop for Turn {
    fn drop(&mut self) {
        let mut r = room();
        r.1 -= 1;
        if r.1 == 0 {
            r.0 = None;
            ROOM_FREED.notify_all();
        }
    }
}

/// Held by a test that measures time, memory or file descriptors, or floods the machine.
/// Tests of one `group` (those that were one test binary before the tiers: `"attacks"`,
/// `"lockout"`, `"limits"`…) run beside each other, 2 at a time as libtest runs them here;
/// a test of another group waits until the room is empty. A test that panicked leaves the
/// room usable (its turn is dropped while unwinding; poison is ignored).
pub(crate) fn exclusive(group: &'static str) -> Turn {
    let mut r = room();
    while r.0.is_some_and(|g| g != group) {
        r = ROOM_FREED.wait(r).unwrap_or_else(|e| e.into_inner());
    }
    r.0 = Some(group);
    r.1 += 1;
    Turn
}

/// The name libtest knows a test by, for running it again as a child test (`--exact`): `module`
/// is the caller's `module_path!()` (`in_process::admission`), without the crate's name.
pub(crate) fn child_test(module: &str, test: &str) -> String {
    match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{test}"),
        None => test.to_string(),
    }
}
