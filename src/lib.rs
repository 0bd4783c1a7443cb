//! derpd: a wire-compatible replacement for Tailscale's DERP relay (`derper`) and its STUN
//! server, sized for routers.
//!
//! # Layout (follow a packet)
//! - [`config`]: derper's command line → a validated [`config::Config`] (plain data, also
//!   the `--mesh-with` entries and the admission flags).
//! - [`server`]: the process and its front door. `server/mod.rs` starts and stops it (signals,
//!   reloads); `server/listen.rs` binds the listeners and runs the accept and STUN ([`stun`])
//!   loops; `server/front.rs` takes one connection through TLS ([`tls`], with the meta-cert)
//!   and one bounded HTTP request head ([`http`]) to a response or the DERP upgrade (its
//!   routing is pure, and its tests run over in-memory pipes);
//!   `server/debug/` serves the `/debug/` pages (the access rule, the `varz` table).
//! - [`relay`]: what every DERP session shares (key, registry, pool, metrics, admission,
//!   session limits); [`net`]: the stream types and TCP options below the DERP code.
//! - [`admission`] (`src/admission/`): who may log in (tailscaled whois, an admission URL, an
//!   allow-keys file), asked between ClientInfo and registration: the policy in `mod.rs`,
//!   tailscaled in `whois.rs`, the URL's client in `controller.rs` (caps checks in flight,
//!   keeps connections alive, remembers refused keys); the file is read on a blocking thread.
//! - [`httpc`] (`src/httpc/`, a file per concept): a small HTTP/1.1 client: URLs (and the one
//!   host/port splitter), resolve and connect (TCP, TLS with the caller's trust) within a
//!   deadline, requests, bounded response heads (httparse) and bodies (length, chunked, until
//!   close), keep-alive; the admission checks use it, the [`dialer`] reads the upgrade
//!   response head with it.
//! - [`allowlist`]: the `--allow-keys-file` list, re-read when the file changes (off the
//!   executor).
//! - `server::debug`: the `/debug/` pages (Prometheus `varz`, and `derpmap` for the LuCI page)
//!   and derper's access rule for them.
//! - `derpmap`: the DERP map entry logged for a self-signed IP certificate: the node JSON, a
//!   tailnet policy file snippet and a headscale `derp.paths` YAML file, from one description
//!   (also served as JSON on `/debug/derpmap`).
//! - [`session`] (`src/session/`): one DERP connection: the login (`login.rs`,
//!   [`handshake`]: ServerKey → ClientInfo → ServerInfo), a reader (`read.rs`) that puts each
//!   packet into a [`pool`] buffer already framed as RecvPacket and queues it on the
//!   destination, and a writer (`write.rs`) that drains queues into one vectored write and one
//!   flush.
//! - [`ws`] (`src/ws/`): DERP over WebSocket on `/derp` (browsers): the RFC 6455 accept
//!   (`accept.rs`), then binary messages as the byte stream that [`session`] serves
//!   (`read.rs`, `stream.rs`; payloads stream through: no frame or message is buffered).
//! - [`limits`]: the accept rate, connections still logging in, and the per-client receive
//!   rate (`--rate-config`).
//! - [`registry`]: key → connections, duplicate-key policy, PeerGone bookkeeping, and the
//!   mesh: keys on other nodes → the [`link`] that forwards to them, and the watchers.
//! - [`link`]: one mesh link's queue of packets for keys on that peer.
//! - [`mesh`]: the outbound side of the regional mesh: runs each [`link`] (dial, login with
//!   the mesh key, WatchConns → forwarders, ForwardPacket writer, redial).
//! - [`dialer`]: the one DERP client login (upgrade, `101`, ServerKey, ClientInfo,
//!   ServerInfo) over any byte stream: mesh links and the tests use it.
//! - [`tls`] (`src/tls/`, a file per concept): the server's certificates: the
//!   `--certmode manual` files and their checks, the self-signed IP certificate, derper's
//!   meta-cert, the rustls resolver (derper's SNI rule) with its reloader, and
//!   `--certmode letsencrypt`'s keeper (`tls/acme.rs`: the stored certificate, orders and
//!   renewals through [`acme::client`], the challenges it serves while the CA validates); and
//!   the accepted TLS connection ([`tls::stream`]): rustls's handshake, then records derpd
//!   opens and seals in place itself ([`tls::record`]), with no allocation per packet.
//! - [`trust`]: whom derpd trusts as a TLS client (mesh peers, the admission controller, an
//!   ACME CA): a pinned leaf certificate, the CA bundle, or the CA certificates of one file.
//! - [`frame`]: the wire format, and the per-frame length rules ([`frame::check_len`]) that
//!   a session's reader and a mesh link follow; [`key`]: node keys and derper's key file;
//!   [`metrics`]: counters named after derper's.
//! - `holder`: who holds a port a listener cannot bind (`/proc/net/tcp*` and `/proc/*/fd`), for
//!   the start-up error.
//! - [`lograte`]: at most a few log lines per kind every 10 s for what strangers can cause
//!   (failed logins, refused heads and WebSockets, connection errors, fail-open admissions),
//!   then a count.
//! - `sync`: the one poison-tolerant mutex lock.
//! - `fsutil`: crash-safe writes (temporary file, fsync, rename, directory fsync) for the files
//!   derpd makes: the key file, the self-signed certificate pair, the ACME account key.
//! - `p256`: P-256 private keys as Go writes them (SEC1 `EC PRIVATE KEY` ↔ PKCS#8, PEM).
//! - [`acme`]: CA-issued certificates: the protocol core (JWS, messages, CA objects read from
//!   JSON in `acme/json.rs`, TLS-ALPN-01 certificate, the CSR in `acme/csr.rs`, renewal rule;
//!   `acme/mod.rs`), the account key and its file (`acme/account.rs`), an order's steps
//!   without I/O ([`acme::order`]), and [`acme::client`], the RFC 8555 client on [`httpc`]
//!   that carries them to a CA (for the keeper in `tls/acme.rs`).
//!
//! The protocol core ([`frame`], [`handshake`], [`http`], [`stun`], [`acme`] but for
//! [`acme::client`]) does no I/O.
//!
//! For the fuzz targets that read the network (`fuzz/`), two `#[doc(hidden)]` items, not a
//! stable API: `ws::transport` and `admission::parse_admit_response`; the `session` target runs
//! [`session::serve`] on a [`relay::Relay`] over an in-memory stream.
//!
//! Arrows point down: the protocol core and small utilities ([`httpc`] among them) ← relay
//! state ([`registry`], [`link`], [`pool`], [`metrics`], [`limits`]) ← [`config`] ← network
//! plumbing ([`admission`], [`allowlist`],
//! [`tls`], [`trust`], [`net`]) ← DERP sessions ([`mesh`], [`dialer`], [`ws`], [`session`],
//! [`relay`]) ←
//! [`server`]; nothing imports the server. `tests/layering.rs` derives the graph from the
//! sources and fails on a cycle or an upward edge.
//!
//! Outside the library: `src/main.rs` (the `derpd` binary) and `bench/load.rs` (`derpd-load`,
//! the benchmark's load generator, built only with `--features bench`), a DERP client made of
//! [`frame`] and [`handshake`].

pub mod acme;
pub mod admission;
pub mod allowlist;
pub mod config;
pub mod dialer;
pub mod session;

mod derpmap;
pub mod frame;
mod fsutil;
pub mod handshake;
mod holder;
pub mod http;
pub mod httpc;
pub mod key;
pub mod limits;
pub mod link;
pub mod lograte;
pub mod mesh;
pub mod metrics;
pub mod net;
mod p256;
pub mod pool;
pub mod registry;
pub mod relay;
pub mod server;
pub mod stun;
mod sync;
pub mod tls;
pub mod trust;
pub mod ws;
