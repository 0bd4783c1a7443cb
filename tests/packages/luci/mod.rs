#![allow(clippy::unwrap_used, clippy::expect_used)]
//! luci-app-derpd (openwrt/luci-app-derpd) in a real browser: headless Chromium loads the view
//! into a stand-in of LuCI's JavaScript runtime (tests/luci/luci.js) and a script
//! (tests/luci/driver.js) uses the page as a person would. This test answers the page's
//! JSON-RPC calls to `/ubus/` as rpcd would: `uci get/set/delete/commit` on a config read from
//! openwrt/files/derpd.config, `service list`, and `luci.derpd status` by running the app's own
//! rpcd plugin, which fetches the metrics and DERPMap entry from a real derpd started here
//! (TLS, self-signed IP certificate, two DERP clients relaying). It fails on a JavaScript error,
//! a UCI option without a field (or a field without an option), a status or DERPMap value that
//! differs from derpd's, and any UCI write other than those LuCI makes for the edits (the
//! stand-in follows LuCI's rules for which fields it writes and removes). The page's screenshot is
//! kept as target/luci-test/derpd-luci.png.
//!
//! Needs `chromium` (scripts/ensure-chromium.sh installs Debian's package), `sh` and `wget`;
//! without them it prints SKIPPED and passes, except under `CI=true`, where it fails.
//! Chromium reaches nothing but loopback: the page test runs in a network namespace of its own
//! with only `lo` up (`unshare --net`, as root; elsewhere in the caller's), and Chromium runs
//! with a dead proxy for every other address, every host name unresolvable and background
//! networking off.
//!
//! Files: `uci` (the shipped config as rpcd returns it), `rpcd` (the stand-in of uhttpd and
//! rpcd, and the app's plugin), `page` (Chromium and the page test), `checks` (validation and
//! UCI writes against LuCI's rules), `files` (the plugin without derpd, the Makefile against
//! the stage script, the menu and ACL against the view).

use crate::support;
use crate::support::inproc;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::inproc::DerpClient;
use crate::support::{find_program, run_bounded, s, skip_test};

pub(super) const ROOT: &str = env!("CARGO_MANIFEST_DIR");
pub(super) const APP: &str = "openwrt/luci-app-derpd";
pub(super) const PLUGIN: &str = "root/usr/libexec/rpcd/luci.derpd";
/// How long the page may take from start to its report (Chromium's start included).
pub(super) const PAGE_DEADLINE: Duration = Duration::from_secs(90);

pub(super) fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

mod checks;
mod files;
mod page;
mod rpcd;
mod uci;
