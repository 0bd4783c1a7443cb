//! derpd: a wire-compatible replacement for Tailscale's DERP relay (`derper`) and its STUN
//! server, sized for routers.
//!
//! # Layout (follow a packet)
//! - [`config`]: derper's command line → a validated [`config::Config`].
//! - [`server`]: binds the listeners, runs the executor threads; per TCP connection: TLS
//!   ([`tls`], with the meta-cert), one bounded HTTP request head ([`http`]), then a response or
//!   the DERP upgrade. Also the STUN loop ([`stun`]).
//! - [`admission`]: who may log in (tailscaled whois, an admission URL, an allow-keys file),
//!   asked between ClientInfo and registration.
//! - `debug`: the `/debug/` pages (Prometheus `varz`, and `derpmap` for the LuCI page) and
//!   derper's access rule for them.
//! - `derpmap`: the DERP map entry logged for a self-signed IP certificate: the node JSON, a
//!   tailnet policy file snippet and a headscale `derp.paths` YAML file, from one description
//!   (also served as JSON on `/debug/derpmap`).
//! - [`client`]: one DERP connection: the login ([`handshake`]: ServerKey → ClientInfo →
//!   ServerInfo), a reader that puts each packet into a [`pool`] buffer already framed as
//!   RecvPacket and queues it on the destination, and a writer that drains queues into one
//!   vectored write and one flush.
//! - [`ws`]: DERP over WebSocket on `/derp` (browsers): the RFC 6455 accept, then binary
//!   messages as the byte stream that [`client`] serves.
//! - [`limits`]: the accept rate, connections still logging in, and the per-client receive
//!   rate (`--rate-config`).
//! - [`registry`]: key → connections, duplicate-key policy, PeerGone bookkeeping, and the
//!   mesh: keys on other nodes → the [`mesh`] link that forwards to them, and the watchers.
//! - [`mesh`]: the outbound side of the regional mesh: one link per `--mesh-with` peer (dial,
//!   login with the mesh key, WatchConns → forwarders, ForwardPacket writer, redial).
//! - [`frame`]: the wire format; [`key`]: node keys and derper's key file;
//!   [`metrics`]: counters named after derper's.
//! - `holder`: who holds a port a listener cannot bind (`/proc/net/tcp*` and `/proc/*/fd`), for
//!   the start-up error.
//! - `fsutil`: crash-safe writes (temporary file, fsync, rename, directory fsync) for the files
//!   derpd makes: the key file and the self-signed certificate pair.
//!
//! The protocol core ([`frame`], [`handshake`], [`http`], [`stun`]) does no I/O.
//!
//! For the fuzz targets that read the network (`fuzz/`), three `#[doc(hidden)]` items, not a
//! stable API: `server::State::in_process` (a server's state without listeners or threads, to
//! run [`client::serve`] over an in-memory stream), `ws::transport` and
//! `admission::parse_admit_response`.
//!
//! Outside the library: `src/main.rs` (the `derpd` binary) and `bench/load.rs` (`derpd-load`,
//! the benchmark's load generator, built only with `--features bench`), a DERP client made of
//! [`frame`] and [`handshake`].

pub mod admission;
pub mod client;
pub mod config;
mod debug;
mod derpmap;
pub mod frame;
mod fsutil;
pub mod handshake;
mod holder;
pub mod http;
pub mod key;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod server;
pub mod stun;
pub mod tls;
pub mod ws;
