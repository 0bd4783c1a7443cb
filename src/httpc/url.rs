//! URLs as Go's `net/url` and `http.Client` read them, and the one host/port splitter.

use std::net::IpAddr;

use base64::Engine as _;
use rustls::pki_types::ServerName;

use super::Request;

/// A parsed `http[s]://[user[:password]@]host[:port][/path][?query]` (a `#fragment` is
/// dropped).
#[derive(Debug)]
pub struct Url {
    /// `https`: connect with TLS.
    pub https: bool,
    /// Host to dial (an IPv6 literal without brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` header: the URL's host and port as written.
    pub authority: String,
    /// The request target: path and query (`/` when the URL has no path).
    pub target: String,
    /// The `Authorization` value (`Basic …`) from the URL's user information, as Go's client
    /// sends it.
    auth: Option<Secret>,
}

/// A credential that `Debug` does not print.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Url {
    /// Parses `url`; the error says what is wrong with it (never its password). An https
    /// host must be an IP address or a valid TLS host name.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(b) = url.bytes().find(|&b| b <= b' ' || b >= 0x7f) {
            return Err(format!(
                "the URL contains the byte {b:#04x}; percent-encode it"
            ));
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("want an http:// or https:// URL")?;
        let (https, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "http" => (false, 80),
            "https" => (true, 443),
            _ => return Err(format!("unsupported scheme {scheme:?}: want http or https")),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)?;
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("invalid port {p:?}"))?,
        };
        let auth = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let plain = format!("{}:{}", percent_decode(user)?, percent_decode(pass)?);
                let b64 = base64::engine::general_purpose::STANDARD.encode(plain);
                Some(Secret(format!("Basic {b64}")))
            }
            None => None,
        };
        let target = if target.starts_with('/') {
            target.to_string()
        } else {
            format!("/{target}")
        };
        if https && host.parse::<IpAddr>().is_err() {
            ServerName::try_from(host.to_string())
                .map_err(|_| format!("invalid TLS host name {host:?}"))?;
        }
        Ok(Self {
            https,
            host: host.to_string(),
            port,
            // Go drops an empty port (`host:`) from the Host header.
            authority: hostport.strip_suffix(':').unwrap_or(hostport).to_string(),
            target,
            auth,
        })
    }

    /// A request for this URL: its target, its `Host`, and `Authorization: Basic` when the
    /// URL has user information.
    pub fn request<'a>(&'a self, method: &'a str) -> Request<'a> {
        let req = Request::new(method, &self.authority, &self.target);
        match &self.auth {
            Some(a) => req.header("Authorization", &a.0),
            None => req,
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → (host without brackets, port text as
/// written: `host:` gives `Some("")`). A second `:` outside brackets is an error (an IPv6
/// address needs them); neither part is checked further.
pub fn split_host_port(hp: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = hp.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("invalid host {hp:?}"))?;
        return match after {
            "" => Ok((h, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((h, Some(p))),
                None => Err(format!("invalid host {hp:?}")),
            },
        };
    }
    match hp.split_once(':') {
        Some((_, p)) if p.contains(':') => Err(format!(
            "invalid host {hp:?} (an IPv6 address needs brackets)"
        )),
        Some((h, p)) => Ok((h, Some(p))),
        None => Ok((hp, None)),
    }
}

/// Decodes `%XX` escapes; the result must be UTF-8 (the URL's user information).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let v = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("invalid percent-encoding in the URL's user information")?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's user information is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn urls() {
        for (url, want) in [
            (
                "http://127.0.0.1:8080/admit?x=1&y=2#frag",
                (false, "127.0.0.1", 8080, "127.0.0.1:8080", "/admit?x=1&y=2"),
            ),
            (
                "HTTP://Admit.Example",
                (false, "Admit.Example", 80, "Admit.Example", "/"),
            ),
            ("https://[::1]:9/?q", (true, "::1", 9, "[::1]:9", "/?q")),
            ("https://h", (true, "h", 443, "h", "/")),
            // Go drops an empty port from the Host header.
            ("http://h:?q", (false, "h", 80, "h", "/?q")),
        ] {
            let u = Url::parse(url).unwrap();
            let got = (
                u.https,
                u.host.as_str(),
                u.port,
                u.authority.as_str(),
                u.target.as_str(),
            );
            assert_eq!(got, want, "{url}");
            assert!(u.auth.is_none());
        }
        // Standard base64 with padding of `us@er:p:ss`, never shown by Debug.
        let u = Url::parse("http://us%40er:p%3Ass@h/").unwrap();
        assert_eq!(u.auth.as_ref().unwrap().0, "Basic dXNAZXI6cDpzcw==");
        assert_eq!(u.authority, "h");
        assert!(!format!("{u:?}").contains("dXNAZXI6cDpzcw=="));
        for bad in [
            "",
            "127.0.0.1:80",
            "ftp://h/",
            "http:///x",
            "http://h:0/",
            "http://h:65536/",
            "http://h:x/",
            "http://::1/",
            "http://[::1/",
            "http://h/a b",
            "http://h/\u{e9}",
            "http://u%zz@h/",
            "http://u%ff@h/",
            "https://bad_name!/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_and_port_split() {
        for (hp, want) in [
            ("h", Some(("h", None))),
            ("h:1", Some(("h", Some("1")))),
            ("h:", Some(("h", Some("")))),
            ("[::1]", Some(("::1", None))),
            ("[::1]:2", Some(("::1", Some("2")))),
            ("", Some(("", None))),
            ("::1", None),
            ("h:1:2", None),
            ("[::1", None),
            ("[::1]x", None),
        ] {
            assert_eq!(split_host_port(hp).ok(), want, "{hp:?}");
        }
    }
}
