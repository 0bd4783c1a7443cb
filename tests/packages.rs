//! Tier 4, the packages: the OpenWrt init script, the `.ipk`, `.deb` and `.apk` files
//! (`scripts/build-packages.sh` builds them and runs `init_ipk_deb` and `apk` on them with
//! `--include-ignored`), and the LuCI page in headless Chromium. The modules are under
//! `tests/packages/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "packages/apk/mod.rs"]
mod apk;
#[path = "packages/init_ipk_deb/mod.rs"]
mod init_ipk_deb;
#[path = "packages/luci/mod.rs"]
mod luci;
