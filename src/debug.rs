//! `/debug/`: the pages derper serves there that derpd implements, and derper's access rule.

use std::net::SocketAddr;

use crate::http::Request;
use crate::server::State;

/// The response to a request under `/debug`.
pub(crate) fn respond(state: &State, req: &Request, remote: SocketAddr) -> Vec<u8> {
    let _ = (state, req, remote);
    crate::http::text_error(404, "Not Found", "not found")
}
