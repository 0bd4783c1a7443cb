//! `--verify-clients`: the local tailscaled's whois by node key, over its LocalAPI socket.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use smol::Async;

use crate::httpc::{within, Conn, Request};
use crate::key::NodePublic;

use super::{Admission, TAILSCALE_CAP};

/// The LocalAPI's fixed host name (Tailscale's `apitype.LocalAPIHost`).
const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// A whois answer is read to its end (as derper does) but no further than this.
const WHOIS_BODY_MAX: u64 = 1 << 20;
/// How much of an error response's body goes into the rejection reason.
const ERROR_BODY_KEEP: usize = 1 << 10;

impl Admission {
    /// `--verify-clients`: asks tailscaled whether it knows the node key.
    pub(super) async fn whois(&self, socket: &Path, key: &NodePublic) -> Result<(), String> {
        let failed = |e: String| format!("failed to query local tailscaled status for {key}: {e}");
        let deadline = Instant::now() + self.timeout;
        let io = within(deadline, self.timeout, async {
            Async::<UnixStream>::connect(socket)
                .await
                .map_err(|e| format!("connecting to {}: {e}", socket.display()))
        })
        .await
        .map_err(failed)?;
        let mut conn = Conn::new(Box::new(io), deadline, self.timeout);
        conn.write_all(&whois_request(key)).await.map_err(failed)?;
        let head = conn.read_head().await.map_err(failed)?;
        match head.status {
            200 => {
                // derper reads the whole answer (and decodes it); its content is not used.
                let body = conn.read_body(head.framing, 0, WHOIS_BODY_MAX).await;
                match body.end {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(failed(format!(
                        "whois response larger than {WHOIS_BODY_MAX} bytes"
                    ))),
                    Err(e) => Err(failed(format!("reading the whois response: {e}"))),
                }
            }
            404 => Err(format!(
                "peer {key} not authorized (not found in local tailscaled)"
            )),
            _ => {
                let body = conn
                    .read_body(head.framing, ERROR_BODY_KEEP, ERROR_BODY_KEEP as u64)
                    .await;
                let text = String::from_utf8_lossy(&body.data);
                if text.contains("invalid 'addr' parameter") {
                    // Tailscale issue 12617: a tailscaled that predates whois by node key.
                    return Err(
                        "tailscaled version is too old (out of sync with derper binary)".into(),
                    );
                }
                Err(failed(format!("{}: {}", head.status_line, text.trim())))
            }
        }
    }
}

/// The LocalAPI request of Tailscale's `local.Client.WhoIsNodeKey` (the `:` of the key is
/// query-escaped, as Go's `url.QueryEscape` does).
fn whois_request(key: &NodePublic) -> Vec<u8> {
    let target = format!("/localapi/v0/whois?addr=nodekey%3A{}", key.untyped_hex());
    let cap = TAILSCALE_CAP.to_string();
    Request::new("GET", LOCALAPI_HOST, &target)
        .header("Tailscale-Cap", &cap)
        .header("Connection", "close")
        .encode()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn request_text() {
        let hex = "ab".repeat(32);
        assert_eq!(
            String::from_utf8(whois_request(&NodePublic([0xab; 32]))).unwrap(),
            format!(
                "GET /localapi/v0/whois?addr=nodekey%3A{hex} HTTP/1.1\r\n\
                 Host: local-tailscaled.sock\r\nUser-Agent: derpd/{v}\r\n\
                 Tailscale-Cap: 142\r\nConnection: close\r\n\r\n",
                v = env!("CARGO_PKG_VERSION")
            )
        );
    }
}
