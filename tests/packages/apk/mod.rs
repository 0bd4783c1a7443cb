//! The OpenWrt 25.12 `.apk` packages (apk-tools v3, the ADB format), read back by a reader of
//! the format written here from apk-tools' public description of it (`doc/apk-v3.5.scd`,
//! `doc/apk-package.5.scd`), independent of `scripts/apk-pack.py`: CI has no apk-tools.
//!
//! The reader checks the structure as apk-tools writes it (blocks, alignment, every value in
//! bounds, no field outside the schema), the metadata's integrity (the package id,
//! `info.hashes`, is the first 20 bytes of the SHA-256 of the ADB block with the id zeroed, as
//! `apk mkpkg` computes it; apk itself takes it as a unique id and relies on signatures, which
//! these unsigned packages do not have) and every file's SHA-256 against its DATA block, in the
//! order apk reads them (apk checks those on install).
//!
//! - `apk_pack_*`: `scripts/apk-pack.py` on a small tree of every kind of entry, read back; and
//!   damaged copies, which the reader must refuse (a byte of a file, of the metadata, a cut).
//! - `apk_structure` (ignored by plain `cargo test`: it needs the packages, like
//!   `tests/packages/init_ipk_deb/ipk.rs`' `ipk_*`): every `apk/<arch>/derpd-<version>.apk` under
//!   `DERPD_PACKAGES_DIR` (default `dist/`), every field, script, file mode, owner and content
//!   against the repository and the `.ipk` of the same architecture.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{ci, fresh_path, makefile_define, makefile_var, packages_dir, s};
use sha2::{Digest, Sha256};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

mod inflate;
mod pack;
mod reader;
mod structure;
