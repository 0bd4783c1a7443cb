//! The module graph, derived from the sources: no cycle, and no edge that points up.
//!
//! Each file or directory directly under `src/` is a node; every `crate::a…` path in it
//! (`use crate::{a, b}` included, comments left out) is an edge to node `a` (`super::` stays
//! inside a node). The check fails on a node missing from `LAYERS`, an edge into a higher
//! layer or to an earlier module of the same layer, and any cycle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the bottom up. A module may use those in lower layers and, within its own
/// layer, only those listed after it (so a layer is a small ordered chain, never a cycle).
const LAYERS: &[&[&str]] = &[
    // Leaves: the protocol core and small utilities that do no DERP I/O.
    &[
        "acme",
        "handshake",
        "frame",
        "key",
        "fsutil",
        // P-256 key files as Go writes them (the ACME account key, the self-signed key).
        "p256",
        "http",
        "stun",
        "holder",
        "lograte",
        "derpmap",
        "sync",
        // The HTTP/1.1 client (no DERP I/O; below `config`, which splits host and port with it).
        "httpc",
    ],
    // Relay state: buffers, limits, counters, who is connected.
    &["registry", "link", "metrics", "pool", "limits"],
    // Settings as plain data.
    &["config"],
    // Network plumbing: the admission checks, streams (`net`, whose accepted TLS stream is
    // `tls::stream`), TLS (`src/tls/`), whom the TLS client trusts.
    &["admission", "allowlist", "net", "tls", "trust"],
    // DERP sessions and transports, and the relay state they share.
    &["mesh", "dialer", "ws", "session", "relay"],
    // The process: listeners, routing, debug pages (`src/server/`).
    &["server"],
];

fn layer_of(module: &str) -> Option<(usize, usize)> {
    LAYERS
        .iter()
        .enumerate()
        .find_map(|(l, ms)| ms.iter().position(|m| *m == module).map(|i| (l, i)))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The node a file belongs to: its first path component under `src/`, without `.rs`.
fn node_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Module names a file refers to with `crate::name`, comments left out.
fn references(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
        // `use crate::{a, b::c}`.
        if let Some(i) = code.find("crate::{") {
            let inner = &code[i + "crate::{".len()..];
            for part in inner.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    refs.insert(name);
                }
            }
        }
    }
    refs
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let nodes: BTreeSet<String> = files.iter().map(|f| node_of(&src, f)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = node_of(&src, f);
        if from == "main" || from == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let to = g.entry(from.clone()).or_default();
        for r in references(&text) {
            if r != from && nodes.contains(&r) {
                to.insert(r);
            }
        }
    }
    g
}

/// One cycle, if the graph has any (depth-first search, colouring nodes).
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == m).unwrap();
                    let mut c = path[start..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut path = Vec::new();
            if let Some(c) = visit(n, g, &mut state, &mut path) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle_and_points_down() {
    let g = graph();
    let mut problems = Vec::new();
    for (from, tos) in &g {
        let Some(lf) = layer_of(from) else {
            problems.push(format!("{from}: not in LAYERS (add it where it belongs)"));
            continue;
        };
        for to in tos {
            let Some(lt) = layer_of(to) else { continue };
            if lt.0 > lf.0 || (lt.0 == lf.0 && lt.1 < lf.1) {
                problems.push(format!("{from} -> {to}: points up"));
            }
        }
    }
    if let Some(c) = find_cycle(&g) {
        problems.push(format!("cycle: {}", c.join(" -> ")));
    }
    for (from, tos) in &g {
        println!(
            "{from} -> {}",
            tos.iter().cloned().collect::<Vec<_>>().join(" ")
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_a_cycle_and_an_upward_edge() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "a"]);
    assert_eq!(
        references("use crate::{frame::X, key};\nlet x = crate::pool::get(); // crate::server"),
        BTreeSet::from(["frame".into(), "key".into(), "pool".into()])
    );
    let up = layer_of("frame").unwrap().0 < layer_of("server").unwrap().0;
    assert!(up);
}
