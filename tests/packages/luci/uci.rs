//! UCI: the shipped config, as rpcd's `uci get` returns it.

use super::*;

/// Options of one section, in file order: a string, or a list of strings.
pub(super) type Section = BTreeMap<String, Value>;

/// `config derpd 'main'` of openwrt/files/derpd.config: options (`option`, `list`) in order.
pub(super) fn shipped_config() -> (Vec<String>, Section) {
    let text = std::fs::read_to_string(path("openwrt/files/derpd.config")).unwrap();
    let mut order = Vec::new();
    let mut sec = Section::new();
    let mut in_main = false;
    for line in text.lines().map(str::trim) {
        let words = uci_words(line);
        match words.first().map(String::as_str) {
            Some("config") => in_main = words.get(2).map(String::as_str) == Some("main"),
            Some("option") if in_main => {
                order.push(words[1].clone());
                sec.insert(
                    words[1].clone(),
                    json!(words.get(2).cloned().unwrap_or_default()),
                );
            }
            Some("list") if in_main => {
                if !order.contains(&words[1]) {
                    order.push(words[1].clone());
                }
                let e = sec.entry(words[1].clone()).or_insert_with(|| json!([]));
                e.as_array_mut().unwrap().push(json!(words[2]));
            }
            _ => {}
        }
    }
    // Commented-out lists are options too (`#list mesh_with '...'`): the page must offer them.
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("#list ").or(line.strip_prefix("# list ")) {
            let name = rest.split_whitespace().next().unwrap().to_string();
            if !order.contains(&name) {
                order.push(name);
            }
        }
    }
    (order, sec)
}

/// A UCI line's words, quotes removed (enough for the shipped file: no escapes).
pub(super) fn uci_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() || rest.starts_with('#') {
            return out;
        }
        if let Some(r) = rest.strip_prefix('\'') {
            let end = r.find('\'').unwrap();
            out.push(r[..end].to_string());
            rest = &r[end + 1..];
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
}
