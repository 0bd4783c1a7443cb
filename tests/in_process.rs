//! Tier 1, in process: tests that run derpd's library in the test process (`Server::start` on
//! 127.0.0.1:0, `support::inproc`) and talk to it with raw clients, plus the proptest round trips
//! of the wire formats (`properties`). One module per subject, under `tests/in_process/`.
//!
//! Exceptions (a derpd or derper process, where most of the module is in process):
//! `admission` (a few comparisons with derper, the HTTPS child), `debug` (the `/debug/` pages of
//! a derpd process and derper's varz names), `churn` (the memory test watches a derpd process's
//! RSS), `limits` (the rate file skipped by a derpd process).
//!
//! Tests that measure time, memory or file descriptors or flood the machine take
//! [`support::exclusive`] with their module's name, so that they never run beside another
//! module's (only beside their own, as when each module was a test binary): `churn`'s memory
//! test, `logflood`, the deadline, eviction and rate tests in `limits`, and `admission`'s two
//! 500-login tests (they raise the descriptor limit).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "in_process/admission/mod.rs"]
mod admission;
#[path = "in_process/bad_input.rs"]
mod bad_input;
#[path = "in_process/churn.rs"]
mod churn;
#[path = "in_process/debug/mod.rs"]
mod debug;
#[path = "in_process/http.rs"]
mod http;
#[path = "in_process/limits.rs"]
mod limits;
#[path = "in_process/logflood.rs"]
mod logflood;
#[path = "in_process/platform.rs"]
mod platform;
#[path = "in_process/properties.rs"]
mod properties;
#[path = "in_process/relay.rs"]
mod relay;
#[path = "in_process/tls.rs"]
mod tls;
#[path = "in_process/websocket.rs"]
mod websocket;
