//! TLS for derpd: derper's DERP meta-certificate, `--certmode manual` certificate loading (with
//! self-signed certificates generated for IP hostnames) and a rustls `ServerConfig` that enforces
//! derper's SNI rule and serves `[leaf, intermediates…, meta-cert]`.
//!
//! One concept a file:
//! - `error`: [`TlsError`], the administrator's messages;
//! - `meta`: the meta-certificate ([`generate_meta_cert`]);
//! - `files`: the `.crt`/`.key` files ([`load`], [`load_or_create`], [`ServerCert`]);
//! - `hostname`: Go's `VerifyHostname`, which a loaded certificate must pass;
//! - `selfsigned`: the self-signed IP certificate, its SEC1 key and PEM files;
//! - `template`: rcgen parameters written as Go's `crypto/x509` writes them;
//! - `resolver`: the rustls `ServerConfig`, the certificate resolver and the [`CertReloader`];
//! - [`ciphers`]: `--tls-ciphers`, the suite order for what this CPU is fast at;
//! - `acme`: `--certmode letsencrypt`'s [`CertKeeper`] (stored certificate, orders, renewal)
//!   and the [`Challenges`] it serves while the CA validates;
//! - [`record`]: the TLS record layer in place, for the traffic after rustls's handshake;
//! - [`stream`]: an accepted TLS connection: rustls's handshake, then [`record`]'s records.

mod acme;
pub mod ciphers;
mod error;
mod files;
mod hostname;
mod meta;
pub mod record;
mod resolver;
mod selfsigned;
pub mod stream;
mod template;
#[cfg(test)]
mod testutil;

pub use acme::{acme_server_config, CertKeeper, Challenges};
pub use error::TlsError;
pub use files::{cert_file_stem, load, load_or_create, ServerCert};
pub use meta::{generate_meta_cert, MetaCert};
pub use resolver::{reloadable_server_config, server_config, CertReloader};
