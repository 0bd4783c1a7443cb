//! Hostile input against a derpd *process*, so that its memory (`VmRSS`) and open descriptors
//! (`/proc/<pid>/fd`) can be watched: malformed frames and logins, garbage on the TLS, HTTP
//! and STUN sockets, floods of silent connections, slowloris, and a receiver that never reads.
//!
//! derpd runs with small limits (`--buffer-budget-mib 4 --max-handshakes 64
//! --handshake-timeout 2s --login-timeout 2s`, one worker thread as on a single-core router).
//! Two bystander clients stay logged in for each test. After every attack:
//! 1. the offending connection was closed by the server within a bound (or, where derper keeps
//!    it open, e.g. unknown frame types, it is shown to still work);
//! 2. derpd logged why (the line is found in its output);
//! 3. the bystanders relay a packet both ways;
//! 4. RSS stayed under `baseline + buffer budget + RSS_SLACK_KIB` (plus `QEMU_SLACK_KIB` under
//!    QEMU; sampled every 5 ms) and the open descriptors went back to the baseline once the
//!    attack's connections were gone.
//!
//! Run with `--nocapture` to see the table of results.
//!
//! One test per surface, each with a derpd of its own (`rig`): `frames`, `login`, `http`, `stun`,
//! `floods` (silent connections), `buffers` (stuck receivers, stalled frames), `tls`, `bounds`
//! (every connection in its worst state). Each takes `support::exclusive("attacks")`: they
//! run 2 at a time among themselves, as in one test binary before, never beside another
//! group's; the three that measure gaps between a bystander pair's packets (`buffers`) run
//! alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bounds;
mod buffers;
mod floods;
mod frames;
mod http;
mod login;
mod rig;
mod stun;
mod tls;
