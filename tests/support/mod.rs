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
//! machine) from running beside each other in one test binary.
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

use std::sync::{Mutex, MutexGuard};

/// Held by a test that measures time, memory or file descriptors, or floods the machine: such
/// tests take turns instead of running 2 at a time (libtest's default here) in one binary.
/// A test that panicked while holding it leaves it usable (poison is ignored).
pub(crate) fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The name libtest knows a test by, for running it again as a child test (`--exact`): `module`
/// is the caller's `module_path!()` (`in_process::admission`), without the crate's name.
pub(crate) fn child_test(module: &str, test: &str) -> String {
    match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{test}"),
        None => test.to_string(),
    }
}
