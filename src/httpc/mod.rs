//! A small HTTP/1.1 client, one exchange at a time on a connection that may be kept alive,
//! a file per concept:
//! - `url.rs`: [`Url`]: `http[s]://[user[:password]@]host[:port][/path][?query]`, parsed as
//!   Go's `net/url` and `http.Client` use it (the `Host` header as written,
//!   `Authorization: Basic` from the user information); [`split_host_port`] is its host and
//!   port splitter.
//! - `connect.rs`: resolve and connect ([`connect_tcp`], [`Url::connect`]: TCP, then TLS for
//!   https with the caller's trust), each step bounded by a deadline ([`within`]);
//! - `request.rs`: [`Request`]: a request written as Go's client writes it (`Host`,
//!   `User-Agent`, `Content-Length` for a body, then the caller's headers);
//! - `conn.rs`: [`Conn`]: the response head read with httparse ([`parse_head`], at most
//!   [`HEAD_MAX`] bytes, 1xx skipped), the body by `Content-Length`, chunked, or until close,
//!   read up to a limit; and whether the connection can carry the next request
//!   ([`Conn::reusable`]).
//!
//! Nothing here panics on what the server sends. Used by the admission controller client;
//! the DERP client login ([`crate::dialer`]) reads the upgrade response with [`parse_head`].

mod conn;
mod connect;
mod request;
mod url;

pub use conn::{parse_head, Body, Conn, Framing, Head, HEAD_MAX};
pub use connect::{connect_tcp, within, Io};
pub use request::Request;
pub use url::{split_host_port, Url};
