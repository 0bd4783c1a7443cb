//! The packages: `openwrt/Makefile`'s variables and package definitions, and where
//! `scripts/build-packages.sh` left the built packages.

use std::path::{Path, PathBuf};

/// A variable of `openwrt/Makefile` (`NAME:=value`, indented or not).
pub(crate) fn makefile_var(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openwrt/Makefile");
    let text = std::fs::read_to_string(path).unwrap();
    let prefix = format!("{name}:=");
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("openwrt/Makefile has no {name}"))
        .to_string()
}

/// The lines of a `define Package/<what>` … `endef` block of `openwrt/Makefile`.
pub(crate) fn makefile_define(what: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openwrt/Makefile");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip_while(|l| *l != format!("define Package/{what}"))
        .skip(1)
        .take_while(|l| *l != "endef")
        .map(str::to_string)
        .collect()
}

/// Where `scripts/build-packages.sh` left the packages (`DERPD_PACKAGES_DIR`, else `dist/`).
pub(crate) fn packages_dir() -> PathBuf {
    std::env::var_os("DERPD_PACKAGES_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("dist"),
        PathBuf::from,
    )
}
