//! Tier 3, the real thing against derpd: Tailscale's Go code (the harness, `tests/interop/`, a
//! Go module pinned to a `tailscale.com` version; `support::go`) as DERP clients, whole
//! Tailscale nodes in a network namespace, and regions of derpd (and derper) nodes meshed; and
//! derpd's ACME client against Pebble, Let's Encrypt's test CA (`acme`). The modules are under
//! `tests/interop_tests/` (`tests/interop/` is the Go module).
//!
//! Without Go the tests print `SKIPPED` and pass, except under `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "interop_tests/acme/mod.rs"]
mod acme;
#[path = "interop_tests/mesh.rs"]
mod mesh;
#[path = "interop_tests/tailscale.rs"]
mod tailscale;
