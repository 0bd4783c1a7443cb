//! A request as Go's `http.Client` writes it.

/// A request as Go's `http.Client` writes it: the request line, `Host`, `User-Agent`,
/// `Content-Length` when there is a body, the caller's headers in order, the body. Header
/// values are written as given: they must not contain CR or LF.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    method: &'a str,
    host: &'a str,
    target: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
    /// `method target` for `host` (the `Host` header), without a body.
    pub fn new(method: &'a str, host: &'a str, target: &'a str) -> Self {
        Self {
            method,
            host,
            target,
            headers: Vec::new(),
            body: None,
        }
    }

    /// Adds a header line after those added before it.
    pub fn header(mut self, name: &'a str, value: &'a str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Sends `body` with its `Content-Length`.
    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = Some(body);
        self
    }

    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpd/{}\r\n",
            self.method,
            self.target,
            self.host,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(b) = self.body {
            let _ = write!(head, "Content-Length: {}\r\n", b.len());
        }
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.unwrap_or_default());
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::httpc::Url;

    #[test]
    fn request_texts() {
        let v = env!("CARGO_PKG_VERSION");
        let get = Request::new("GET", "local-tailscaled.sock", "/x?y")
            .header("Connection", "close")
            .encode();
        assert_eq!(
            String::from_utf8(get).unwrap(),
            format!(
                "GET /x?y HTTP/1.1\r\nHost: local-tailscaled.sock\r\nUser-Agent: derpd/{v}\r\n\
                 Connection: close\r\n\r\n"
            )
        );
        let u = Url::parse("http://u:p@a.b:1/x?y").unwrap();
        let post = u.request("POST").body(b"{}").encode();
        assert_eq!(
            String::from_utf8(post).unwrap(),
            format!(
                "POST /x?y HTTP/1.1\r\nHost: a.b:1\r\nUser-Agent: derpd/{v}\r\n\
                 Content-Length: 2\r\nAuthorization: Basic dTpw\r\n\r\n{{}}"
            )
        );
    }
}
