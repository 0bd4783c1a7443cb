#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `/debug/`: varz names and types against Tailscale's real derper, counters moving, and
//! derper's access rule over loopback and, in a network namespace the test makes, from other
//! addresses (environment set only in spawned derpd processes).
//!
//! `varz`: names against derper, counters moving; `pages`: the pages over loopback and port
//! 80, the key from the environment, `/debug/derpmap`; `access`: the access rule from other
//! addresses in a network namespace. This file: Prometheus text parsing and HTTP over loopback.

use crate::support;
use crate::support::inproc;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::inproc::{http_exchange, start_dev, wait_until, DerpClient};
use crate::support::{derpd_command, derper, fresh_path, reserve_port, s, wait_listening, Derpd};

mod access;
mod pages;
mod varz;

// ---------------------------------------------------------------------------------------------
// Prometheus text parsing

pub(super) type Labels = Vec<(String, String)>;

/// One metric family: its `# TYPE`, `# HELP` and samples.
#[derive(Debug, Default)]
pub(super) struct Family {
    pub(super) ty: Option<String>,
    pub(super) help: Option<String>,
    pub(super) samples: BTreeMap<Labels, f64>,
}

impl Family {
    fn label_names(&self) -> BTreeSet<Vec<String>> {
        let names = |l: &Labels| l.iter().map(|(k, _)| k.clone()).collect();
        self.samples.keys().map(names).collect()
    }
}

/// Parses the text exposition format: `# TYPE`/`# HELP` lines, other comments, and samples
/// `name{label="value",...} value [timestamp]`. Histogram and summary samples (`_bucket`,
/// `_sum`, `_count`) belong to their family. Panics on anything malformed, a second TYPE or
/// HELP for a name, a TYPE after the name's samples, or a repeated series.
pub(super) fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let ctx = || format!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix('#') {
            let mut w = rest.trim_start().splitn(3, ' ');
            let (kind, name, arg) = (w.next(), w.next(), w.next());
            match (kind, name, arg) {
                (Some("TYPE"), Some(name), Some(ty)) => {
                    assert!(valid_name(name), "{}", ctx());
                    let known = ["counter", "gauge", "histogram", "summary", "untyped"];
                    assert!(known.contains(&ty), "{}", ctx());
                    let f = fams.entry(name.to_string()).or_default();
                    assert!(f.ty.is_none() && f.samples.is_empty(), "{}", ctx());
                    f.ty = Some(ty.to_string());
                }
                (Some("HELP"), Some(name), help) => {
                    let f = fams.entry(name.to_string()).or_default();
                    assert!(f.help.is_none(), "{}", ctx());
                    f.help = Some(help.unwrap_or("").to_string());
                }
                _ => {} // other comments, e.g. derper's "# skipping expvar ..."
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (name, labels, value) = parse_sample(line).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suf| name.strip_suffix(suf))
            .find(|base| {
                fams.get(*base)
                    .and_then(|f| f.ty.as_deref())
                    .is_some_and(|t| t == "histogram" || t == "summary")
            })
            .unwrap_or(&name)
            .to_string();
        let mut labels = labels;
        if family != name {
            labels.insert(0, ("__name__".into(), name.clone()));
        }
        let f = fams.entry(family).or_default();
        assert!(
            f.samples.insert(labels, value).is_none(),
            "repeated series: {}",
            ctx()
        );
    }
    fams
}

pub(super) fn valid_name(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

pub(super) fn parse_sample(line: &str) -> Result<(String, Labels, f64), String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[end..];
    let mut labels = Labels::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let lname = rest[..eq].trim();
            if !valid_name(lname) || lname.contains(':') {
                return Err(format!("bad label name {lname:?}"));
            }
            let mut chars = rest[eq + 1..].char_indices();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut val = String::new();
            let close = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("bad escape")?.1 {
                        'n' => val.push('\n'),
                        c @ ('\\' | '"') => val.push(c),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, c) => val.push(c),
                }
            };
            if labels.iter().any(|(k, _)| k == lname) {
                return Err(format!("label {lname} repeated"));
            }
            labels.push((lname.to_string(), val));
            rest = &rest[eq + 1 + close + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let mut words = rest.split_whitespace();
    let v = words.next().ok_or("no value")?;
    let value = v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?;
    if words.next().is_some_and(|ts| ts.parse::<i64>().is_err()) || words.next().is_some() {
        return Err("junk after the value".into());
    }
    Ok((name.to_string(), labels, value))
}

// ---------------------------------------------------------------------------------------------
// HTTP over loopback

pub(super) struct Resp {
    pub(super) status: u16,
    pub(super) head: String,
    pub(super) body: String,
}

pub(super) fn request(addr: SocketAddr, method: &str, target: &str, headers: &str) -> Resp {
    let raw = http_exchange(
        addr,
        format!("{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n")
            .as_bytes(),
    );
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Resp {
        status,
        head: head.to_string(),
        body: if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    }
}

/// A chunked body (Go's server streams large responses): `<hex len>\r\n<data>\r\n`…`0\r\n\r\n`.
pub(super) fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, tail) = rest.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
}

pub(super) fn varz(addr: SocketAddr) -> BTreeMap<String, Family> {
    let r = request(addr, "GET", "/debug/varz", "");
    assert_eq!(r.status, 200, "{}", r.head);
    parse(&r.body)
}

/// The value of an unlabelled sample.
pub(super) fn value(v: &BTreeMap<String, Family>, name: &str) -> f64 {
    *v.get(name)
        .and_then(|f| f.samples.get(&Labels::new()))
        .unwrap_or_else(|| panic!("no {name} sample"))
}
