//! Tier 2, derpd as a process: tests that start the derpd binary (`support::Derpd`, through the
//! cross runner under QEMU) and watch it from outside: its lifecycle (signals, restarts,
//! shutdown), the lockout of a single executor by silent connections, and the attack matrix with
//! its RSS and descriptor bounds. One module per subject, under `tests/process/`.
//!
//! Every test here measures time, memory or file descriptors, or floods the machine, so every
//! one takes [`support::exclusive`] with its module's name (`"attacks"`, `"lifecycle"`,
//! `"lockout"`): tests of one module run 2 at a time, as when each module was a test binary,
//! never beside another module's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "process/attacks/mod.rs"]
mod attacks;
#[path = "process/lifecycle.rs"]
mod lifecycle;
#[path = "process/lockout.rs"]
mod lockout;
