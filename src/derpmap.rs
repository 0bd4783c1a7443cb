//! The DERP map entry derpd logs for a self-signed IP certificate, in the forms people paste:
//! the node as one JSON line (what derper logs), a tailnet policy file snippet (Tailscale's
//! control server: JSON with `tailcfg`'s CamelCase field names) and a headscale `derp.paths`
//! file (YAML). `/debug/derpmap` serves all of them as one JSON document ([`Node::page_json`],
//! read by the LuCI page through its rpcd plugin), for a DNS name as well (without a pin).
//!
//! headscale reads `derp.paths` files with `yaml.Unmarshal` (gopkg.in/yaml.v3) straight into
//! `tailcfg.DERPMap` (`loadDERPMapFromPath` in hscontrol/derp/derp.go). `tailcfg` has no `yaml`
//! tags, so yaml.v3 matches each field by its name lower-cased (`hostname`, `certname`, ...),
//! case-sensitively: the CamelCase JSON parses there without error into a node with an empty
//! host name and no pin. All three forms come from one [`Node`], its fields named as in
//! `tailcfg.DERPNode`; the YAML keys are those names lower-cased, as yaml.v3 derives them.

use std::fmt::Write as _;
use std::net::IpAddr;

use serde_json::{json, Map, Value};

/// The region derpd suggests: 900, the ID headscale's derp-example.yaml gives a custom region.
const REGION_ID: u16 = 900;
const REGION_CODE: &str = "derpd";
const REGION_NAME: &str = "derpd";

/// One `tailcfg.DERPNode`: (Go field name, value) in the struct's field order, zero values left
/// out as `json:",omitempty"` leaves them out.
#[derive(Debug)]
pub(crate) struct Node {
    fields: Vec<(&'static str, Scalar)>,
}

/// A field's value: every `DERPNode` field derpd fills is a number or a string.
#[derive(Debug)]
enum Scalar {
    Int(i32),
    Str(String),
}

impl Node {
    /// The node for derpd serving TLS for `hostname` on TCP `derp_port`: with `pin_hex`, a
    /// self-signed certificate (`CertName` is the pin; an IP hostname fills `IPv4`/`IPv6`),
    /// without, a certificate clients verify by name. `stun_port` is the first STUN listener's
    /// port, `stun_on` whether STUN runs. Ports at Tailscale's defaults (443, 3478) are left
    /// out; STUN off is `STUNPort: -1`.
    pub(crate) fn new(
        hostname: &str,
        derp_port: u16,
        stun_port: Option<u16>,
        stun_on: bool,
        pin_hex: Option<&str>,
    ) -> Node {
        use Scalar::{Int, Str};
        let mut fields = vec![
            ("Name", Str("900a".into())),
            ("RegionID", Int(REGION_ID.into())),
            ("HostName", Str(hostname.into())),
        ];
        if let Some(pin) = pin_hex {
            fields.push(("CertName", Str(format!("sha256-raw:{pin}"))));
        }
        match hostname.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => fields.push(("IPv4", Str(hostname.into()))),
            Ok(IpAddr::V6(_)) => fields.push(("IPv6", Str(hostname.into()))),
            Err(_) => {}
        }
        if !stun_on {
            fields.push(("STUNPort", Int(-1)));
        } else if let Some(p) = stun_port.filter(|&p| p != 3478) {
            fields.push(("STUNPort", Int(p.into())));
        }
        if derp_port != 443 {
            fields.push(("DERPPort", Int(derp_port.into())));
        }
        Node { fields }
    }

    /// The node with a second address clients may dial (an IPv6 beside an IPv4 hostname, or
    /// the other way round): its `IPv4` or `IPv6` field, in the struct's field order.
    pub(crate) fn with_address(mut self, ip: IpAddr) -> Node {
        let (name, after) = match ip {
            IpAddr::V4(_) => ("IPv4", &["Name", "RegionID", "HostName", "CertName"][..]),
            IpAddr::V6(_) => (
                "IPv6",
                &["Name", "RegionID", "HostName", "CertName", "IPv4"][..],
            ),
        };
        self.fields.retain(|(k, _)| *k != name);
        let at = self
            .fields
            .iter()
            .take_while(|(k, _)| after.contains(k))
            .count();
        self.fields.insert(at, (name, Scalar::Str(ip.to_string())));
        self
    }

    fn json_value(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.fields {
            let v = match v {
                Scalar::Int(i) => Value::from(*i),
                Scalar::Str(s) => Value::from(s.as_str()),
            };
            m.insert((*k).into(), v);
        }
        Value::Object(m)
    }

    /// The node as one line of JSON (serde_json sorts the keys).
    pub(crate) fn json_line(&self) -> String {
        self.json_value().to_string()
    }

    /// The `tailcfg.DERPRegion` holding this node.
    fn region_value(&self) -> Value {
        json!({
            "RegionID": REGION_ID,
            "RegionCode": REGION_CODE,
            "RegionName": REGION_NAME,
            "Nodes": [self.json_value()],
        })
    }

    /// `"derpMap": {...}` inside an object, to paste into the top level of a tailnet policy file.
    pub(crate) fn policy_file_snippet(&self) -> String {
        let region = json!({
            "derpMap": {
                "OmitDefaultRegions": false,
                "Regions": { REGION_ID.to_string(): self.region_value() }
            }
        });
        serde_json::to_string_pretty(&region).unwrap_or_default()
    }

    /// `/debug/derpmap`: `{"node", "region", "policy_file", "headscale_yaml"}`, the first two
    /// as JSON objects, the last two as the texts [`Node::policy_file_snippet`] and
    /// [`Node::headscale_yaml`] give (what the log shows).
    pub(crate) fn page_json(&self) -> String {
        let page = json!({
            "node": self.json_value(),
            "region": self.region_value(),
            "policy_file": self.policy_file_snippet(),
            "headscale_yaml": self.headscale_yaml(),
        });
        let mut s = serde_json::to_string_pretty(&page).unwrap_or_default();
        s.push('\n');
        s
    }

    /// A whole headscale `derp.paths` file: one region with this node. Written by hand (block
    /// style, every string double-quoted); no trailing newline.
    pub(crate) fn headscale_yaml(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "regions:\n  {REGION_ID}:\n    regionid: {REGION_ID}\n    regioncode: {}\n    \
             regionname: {}\n    nodes:",
            yaml_string(REGION_CODE),
            yaml_string(REGION_NAME),
        );
        for (i, (name, value)) in self.fields.iter().enumerate() {
            let lead = if i == 0 { "      - " } else { "        " };
            let key = name.to_ascii_lowercase();
            let _ = match value {
                Scalar::Int(n) => write!(y, "\n{lead}{key}: {n}"),
                Scalar::Str(s) => write!(y, "\n{lead}{key}: {}", yaml_string(s)),
            };
        }
        y
    }
}

/// A YAML double-quoted string (IPv6 addresses and `sha256-raw:` pins hold colons) with
/// everything outside printable ASCII escaped, as both YAML 1.1 and 1.2 read it.
fn yaml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08x}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const PIN: &str = "5c1e000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn ipv4_at_default_ports() {
        let n = Node::new("203.0.113.7", 443, Some(3478), true, Some(PIN));
        assert_eq!(
            n.json_line(),
            format!(
                r#"{{"CertName":"sha256-raw:{PIN}","HostName":"203.0.113.7","IPv4":"203.0.113.7","Name":"900a","RegionID":900}}"#
            )
        );
        assert_eq!(
            n.headscale_yaml(),
            format!(
                r#"regions:
  900:
    regionid: 900
    regioncode: "derpd"
    regionname: "derpd"
    nodes:
      - name: "900a"
        regionid: 900
        hostname: "203.0.113.7"
        certname: "sha256-raw:{PIN}"
        ipv4: "203.0.113.7""#
            )
        );
    }

    #[test]
    fn dual_stack_node_has_both_addresses() {
        let n = Node::new("203.0.113.7", 443, Some(3478), true, None)
            .with_address("2001:db8::7".parse().unwrap());
        assert_eq!(
            n.json_line(),
            r#"{"HostName":"203.0.113.7","IPv4":"203.0.113.7","IPv6":"2001:db8::7","Name":"900a","RegionID":900}"#
        );
        let order: Vec<&str> = n.fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(order, ["Name", "RegionID", "HostName", "IPv4", "IPv6"]);
        let n = Node::new("2001:db8::7", 8443, Some(3478), true, None)
            .with_address("203.0.113.7".parse().unwrap());
        let order: Vec<&str> = n.fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            order,
            ["Name", "RegionID", "HostName", "IPv4", "IPv6", "DERPPort"]
        );
    }

    #[test]
    fn ipv6_other_ports_stun_off() {
        let n = Node::new("2001:db8::1", 8443, Some(3479), false, Some(PIN));
        let y = n.headscale_yaml();
        assert!(
            y.ends_with(&format!(
                "\n      - name: \"900a\"\n        regionid: 900\n        hostname: \"2001:db8::1\"\n        \
                 certname: \"sha256-raw:{PIN}\"\n        ipv6: \"2001:db8::1\"\n        \
                 stunport: -1\n        derpport: 8443"
            )),
            "{y}"
        );
        let j: Value = serde_json::from_str(&n.json_line()).unwrap();
        assert_eq!(j["STUNPort"], -1);
        assert_eq!(j["DERPPort"], 8443);
        assert_eq!(j["IPv6"], "2001:db8::1");
        assert!(j.get("IPv4").is_none());
        // STUN on, on a port of its own.
        let n = Node::new("2001:db8::1", 8443, Some(3479), true, Some(PIN));
        assert!(n.headscale_yaml().contains("\n        stunport: 3479\n"));
        // STUN on at the default port: left out.
        let n = Node::new("2001:db8::1", 443, Some(3478), true, Some(PIN));
        assert!(!n.headscale_yaml().contains("port"));
    }

    /// The three forms say the same: every YAML node key is a JSON key lower-cased, with the
    /// same value, and the policy file's node is the JSON line's.
    #[test]
    fn forms_agree() {
        for n in [
            Node::new("192.0.2.1", 443, None, true, Some(PIN)),
            Node::new("::1", 40001, Some(40002), true, Some(PIN)),
            Node::new("::ffff:192.0.2.1", 1, None, false, Some(PIN)),
        ] {
            let line: Value = serde_json::from_str(&n.json_line()).unwrap();
            let policy: Value = serde_json::from_str(&n.policy_file_snippet()).unwrap();
            let region = &policy["derpMap"]["Regions"]["900"];
            assert_eq!(region["Nodes"][0], line);
            assert_eq!(region["RegionID"], 900);
            let yaml = n.headscale_yaml();
            let node_lines: Vec<&str> = yaml
                .lines()
                .skip_while(|l| !l.starts_with("      - "))
                .collect();
            let obj = line.as_object().unwrap();
            assert_eq!(node_lines.len(), obj.len(), "{yaml}");
            for l in node_lines {
                let (k, v) = l[8..].split_once(": ").unwrap();
                let (jk, jv) = obj
                    .iter()
                    .find(|(jk, _)| jk.to_ascii_lowercase() == k)
                    .unwrap();
                assert_eq!(k, jk.to_ascii_lowercase());
                // The quoted ASCII strings here read the same as JSON.
                assert_eq!(&serde_json::from_str::<Value>(v).unwrap(), jv, "{l}");
            }
        }
    }

    /// The page holds the same node, region and texts; a DNS name has no pin.
    #[test]
    fn page_json() {
        let n = Node::new("192.0.2.1", 8443, Some(3478), true, Some(PIN));
        let page: Value = serde_json::from_str(&n.page_json()).unwrap();
        let line: Value = serde_json::from_str(&n.json_line()).unwrap();
        assert_eq!(page["node"], line);
        assert_eq!(page["region"]["Nodes"][0], line);
        assert_eq!(page["region"]["RegionID"], 900);
        assert_eq!(page["policy_file"], n.policy_file_snippet());
        assert_eq!(page["headscale_yaml"], n.headscale_yaml());
        let dns = Node::new("derp.example.com", 443, Some(3478), true, None);
        assert_eq!(
            dns.json_line(),
            r#"{"HostName":"derp.example.com","Name":"900a","RegionID":900}"#
        );
    }

    #[test]
    fn yaml_strings_are_quoted_and_escaped() {
        let q = yaml_string;
        assert_eq!(q("2001:db8::1"), r#""2001:db8::1""#);
        assert_eq!(q("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(q("#x: y"), r##""#x: y""##);
        assert_eq!(q("tab\there\n"), r#""tab\u0009here\u000a""#);
        assert_eq!(q("\u{7f}\u{85}\u{2028}é"), r#""\u007f\u0085\u2028\u00e9""#);
        assert_eq!(q("\u{1f600}"), r#""\U0001f600""#);
    }
}
