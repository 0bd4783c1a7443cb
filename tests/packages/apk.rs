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

// ---------------------------------------------------------------------------------------------
// Inflate (RFC 1951, raw deflate): apk's "ADBd" files are raw deflate after the 4-byte magic.

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u32,
    have: u32,
}

impl Bits<'_> {
    fn bits(&mut self, n: u32) -> Result<u32, String> {
        while self.have < n {
            let b = *self.data.get(self.pos).ok_or("deflate: input ends early")?;
            self.pos += 1;
            self.buf |= u32::from(b) << self.have;
            self.have += 8;
        }
        let v = self.buf & ((1u32 << n) - 1);
        self.buf >>= n;
        self.have -= n;
        Ok(v)
    }
}

/// A canonical Huffman code: how many codes of each length, and the symbols in code order.
struct Huffman {
    count: [u16; 16],
    symbol: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Result<Self, String> {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[usize::from(l)] += 1;
        }
        let mut left: i32 = 1;
        for &c in &count[1..] {
            left = (left << 1) - i32::from(c);
            if left < 0 {
                return Err(s("deflate: over-subscribed code"));
            }
        }
        let mut offs = [0u16; 16];
        for len in 1..15 {
            offs[len + 1] = offs[len] + count[len];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[usize::from(offs[usize::from(l)])] = sym as u16;
                offs[usize::from(l)] += 1;
            }
        }
        count[0] = 0;
        Ok(Self { count, symbol })
    }

    fn decode(&self, bits: &mut Bits<'_>) -> Result<u16, String> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.bits(1)? as i32;
            let count = i32::from(self.count[len]);
            if code - count < first {
                return Ok(self.symbol[(index + code - first) as usize]);
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err(s("deflate: bad code"))
    }
}

const LBASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEXT: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DBASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DEXT: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut bits = Bits {
        data,
        pos: 0,
        buf: 0,
        have: 0,
    };
    let mut out: Vec<u8> = Vec::new();
    loop {
        let last = bits.bits(1)?;
        match bits.bits(2)? {
            0 => {
                bits.buf = 0;
                bits.have = 0;
                let p = bits.pos;
                let hdr = data.get(p..p + 4).ok_or("deflate: stored block cut")?;
                let len = usize::from(u16::from_le_bytes([hdr[0], hdr[1]]));
                let nlen = u16::from_le_bytes([hdr[2], hdr[3]]);
                if nlen != !(len as u16) {
                    return Err(s("deflate: stored block length check"));
                }
                let body = data
                    .get(p + 4..p + 4 + len)
                    .ok_or("deflate: stored block cut")?;
                out.extend_from_slice(body);
                bits.pos = p + 4 + len;
            }
            kind @ (1 | 2) => {
                let (lit, dist) = if kind == 1 {
                    let mut l = [8u8; 288];
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    (Huffman::new(&l)?, Huffman::new(&[5u8; 30])?)
                } else {
                    let nlen = bits.bits(5)? as usize + 257;
                    let ndist = bits.bits(5)? as usize + 1;
                    let ncode = bits.bits(4)? as usize + 4;
                    const ORDER: [usize; 19] = [
                        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
                    ];
                    let mut cl = [0u8; 19];
                    for &o in &ORDER[..ncode] {
                        cl[o] = bits.bits(3)? as u8;
                    }
                    let clh = Huffman::new(&cl)?;
                    let mut lengths = Vec::with_capacity(nlen + ndist);
                    while lengths.len() < nlen + ndist {
                        let sym = clh.decode(&mut bits)?;
                        let (value, times) = match sym {
                            0..=15 => (sym as u8, 1),
                            16 => (
                                *lengths.last().ok_or("deflate: repeat of nothing")?,
                                3 + bits.bits(2)?,
                            ),
                            17 => (0, 3 + bits.bits(3)?),
                            _ => (0, 11 + bits.bits(7)?),
                        };
                        for _ in 0..times {
                            lengths.push(value);
                        }
                    }
                    if lengths.len() != nlen + ndist || lengths[256] == 0 {
                        return Err(s("deflate: bad code lengths"));
                    }
                    (
                        Huffman::new(&lengths[..nlen])?,
                        Huffman::new(&lengths[nlen..])?,
                    )
                };
                loop {
                    let sym = usize::from(lit.decode(&mut bits)?);
                    if sym < 256 {
                        out.push(sym as u8);
                    } else if sym == 256 {
                        break;
                    } else {
                        let i = sym - 257;
                        if i >= 29 {
                            return Err(s("deflate: bad length symbol"));
                        }
                        let len = usize::from(LBASE[i]) + bits.bits(u32::from(LEXT[i]))? as usize;
                        let d = usize::from(dist.decode(&mut bits)?);
                        if d >= 30 {
                            return Err(s("deflate: bad distance symbol"));
                        }
                        let back = usize::from(DBASE[d]) + bits.bits(u32::from(DEXT[d]))? as usize;
                        if back > out.len() {
                            return Err(s("deflate: distance beyond the start"));
                        }
                        let from = out.len() - back;
                        for k in 0..len {
                            out.push(out[from + k]);
                        }
                    }
                }
            }
            _ => return Err(s("deflate: block type 3")),
        }
        if last == 1 {
            break;
        }
    }
    if bits.pos != data.len() {
        return Err(format!(
            "deflate: {} bytes after the end",
            data.len() - bits.pos
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The ADB format.

/// The type codes of a value (its high 4 bits).
const T_SPECIAL: u32 = 0x0;
const T_INT: u32 = 0x1;
const T_INT32: u32 = 0x2;
const T_INT64: u32 = 0x3;
const T_BLOB8: u32 = 0x8;
const T_BLOB16: u32 = 0x9;
const T_BLOB32: u32 = 0xa;
const T_ARRAY: u32 = 0xd;
const T_OBJECT: u32 = 0xe;
const SCHEMA_PACKAGE: u32 = u32::from_le_bytes(*b"pckg");

struct Adb<'a> {
    buf: &'a [u8],
}

impl Adb<'_> {
    fn u32_at(&self, off: usize) -> Result<u32, String> {
        let b = self
            .buf
            .get(off..off + 4)
            .ok_or_else(|| format!("offset {off} beyond the ADB block"))?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()))
    }

    /// A value's data offset, checked for alignment and bounds.
    fn at(&self, v: u32, align: usize, len: usize) -> Result<usize, String> {
        let off = (v & 0x0fff_ffff) as usize;
        if !off.is_multiple_of(align) {
            return Err(format!("value {v:#x}: offset not {align}-aligned"));
        }
        if off < 8 || off + len > self.buf.len() {
            return Err(format!("value {v:#x}: out of the ADB block"));
        }
        Ok(off)
    }

    fn int(&self, v: u32) -> Result<Option<u64>, String> {
        match v >> 28 {
            _ if v == 0 => Ok(None),
            T_INT => Ok(Some(u64::from(v & 0x0fff_ffff))),
            T_INT32 => {
                let n = self.u32_at(self.at(v, 4, 4)?)?;
                if n < 0x1000_0000 {
                    return Err(format!("{n} stored as int32 (apk stores it inline)"));
                }
                Ok(Some(u64::from(n)))
            }
            T_INT64 => {
                let off = self.at(v, 4, 8)?;
                let n = u64::from(self.u32_at(off)?) | u64::from(self.u32_at(off + 4)?) << 32;
                Ok(Some(n))
            }
            t => Err(format!(
                "value {v:#x}: type {t:#x} where an integer belongs"
            )),
        }
    }

    fn blob(&self, v: u32) -> Result<Option<&[u8]>, String> {
        let (align, n) = match v >> 28 {
            _ if v == 0 => return Ok(None),
            T_BLOB8 => (1, usize::from(self.buf[self.at(v, 1, 1)?])),
            T_BLOB16 => {
                let off = self.at(v, 2, 2)?;
                (
                    2,
                    usize::from(u16::from_le_bytes([self.buf[off], self.buf[off + 1]])),
                )
            }
            T_BLOB32 => (4, self.u32_at(self.at(v, 4, 4)?)? as usize),
            t => return Err(format!("value {v:#x}: type {t:#x} where a blob belongs")),
        };
        let off = self.at(v, align, align + n)?;
        if n == 0 {
            return Err(format!("value {v:#x}: empty blob (apk writes null)"));
        }
        let small = match align {
            2 => n <= 0xff,
            4 => n <= 0xffff,
            _ => false,
        };
        if small {
            return Err(format!(
                "value {v:#x}: {n} bytes in a wider blob than apk uses"
            ));
        }
        Ok(Some(&self.buf[off + align..off + align + n]))
    }

    fn string(&self, v: u32, what: &str) -> Result<Option<String>, String> {
        self.blob(v)?
            .map(|b| String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8")))
            .transpose()
    }

    /// An object's or array's slots 1.. (null when the value is null), at most `max` of them.
    fn slots(&self, v: u32, max: usize, what: &str) -> Result<Vec<u32>, String> {
        if v == 0 {
            return Ok(Vec::new());
        }
        if v >> 28 != T_OBJECT && v >> 28 != T_ARRAY {
            return Err(format!("{what}: value {v:#x} is not an object"));
        }
        let off = self.at(v, 4, 4)?;
        let n = self.u32_at(off)? as usize;
        if n < 2 {
            return Err(format!("{what}: object of {n} slots (apk writes null)"));
        }
        self.at(v, 4, 4 * n)?;
        if n - 1 > max {
            return Err(format!("{what}: {} fields, the schema has {max}", n - 1));
        }
        let out: Vec<u32> = (1..n)
            .map(|i| self.u32_at(off + 4 * i))
            .collect::<Result<_, _>>()?;
        if out.last() == Some(&0) {
            return Err(format!("{what}: trailing null field (apk cuts them off)"));
        }
        Ok(out)
    }

    /// An object's fields by index (1-based), nulls for those not stored.
    fn fields(&self, v: u32, max: usize, what: &str) -> Result<Vec<u32>, String> {
        let mut f = self.slots(v, max, what)?;
        f.resize(max, 0);
        Ok(f)
    }

    /// An array's items: none null.
    fn items(&self, v: u32, what: &str) -> Result<Vec<u32>, String> {
        let items = self.slots(v, usize::MAX, what)?;
        if items.contains(&0) || items.iter().any(|&i| i >> 28 == T_SPECIAL) {
            return Err(format!("{what}: a null item"));
        }
        Ok(items)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Dep {
    name: String,
    version: Option<String>,
    op: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Acl {
    mode: u32,
    user: String,
    group: String,
}

#[derive(Debug)]
struct File {
    name: String,
    acl: Acl,
    size: u64,
    mtime: u64,
    sha256: Option<Vec<u8>>,
    /// For a symlink: its target.
    symlink: Option<String>,
    /// A regular file's bytes, from its DATA block (empty files have none).
    content: Vec<u8>,
}

#[derive(Debug)]
struct Dir {
    name: String,
    acl: Acl,
    files: Vec<File>,
}

/// One package, as read.
#[derive(Debug)]
struct Apk {
    compressed: bool,
    /// The pkginfo fields that are strings, by their apk names.
    info: BTreeMap<&'static str, String>,
    id: Vec<u8>,
    installed_size: u64,
    depends: Vec<Dep>,
    provides: Vec<Dep>,
    paths: Vec<Dir>,
    scripts: BTreeMap<&'static str, String>,
}

/// pkginfo's fields by index (apk_adb.h); `None`: not a string.
const PKGINFO: [(&str, bool); 21] = [
    ("name", true),
    ("version", true),
    ("hashes", false),
    ("description", true),
    ("arch", true),
    ("license", true),
    ("origin", true),
    ("maintainer", true),
    ("url", true),
    ("repo-commit", false),
    ("build-time", false),
    ("installed-size", false),
    ("file-size", false),
    ("provider-priority", false),
    ("depends", false),
    ("provides", false),
    ("replaces", false),
    ("install-if", false),
    ("recommends", false),
    ("layer", false),
    ("tags", false),
];
const SCRIPTS: [&str; 7] = [
    "trigger",
    "pre-install",
    "post-install",
    "pre-deinstall",
    "post-deinstall",
    "pre-upgrade",
    "post-upgrade",
];

fn acl(adb: &Adb<'_>, v: u32, what: &str) -> Result<Acl, String> {
    let f = adb.fields(v, 4, &format!("{what}: acl"))?;
    if f[3] != 0 {
        return Err(format!("{what}: has xattrs"));
    }
    let mode = adb.int(f[0])?.ok_or(format!("{what}: no mode"))?;
    if mode > 0o7777 {
        return Err(format!("{what}: mode {mode:o} has file-type bits"));
    }
    Ok(Acl {
        mode: mode as u32,
        user: adb.string(f[1], what)?.ok_or(format!("{what}: no user"))?,
        group: adb.string(f[2], what)?.ok_or(format!("{what}: no group"))?,
    })
}

fn deps(adb: &Adb<'_>, v: u32, what: &str) -> Result<Vec<Dep>, String> {
    let mut out = Vec::new();
    for item in adb.items(v, what)? {
        let f = adb.fields(item, 3, what)?;
        out.push(Dep {
            name: adb.string(f[0], what)?.ok_or(format!("{what}: no name"))?,
            version: adb.string(f[1], what)?,
            op: adb.int(f[2])?,
        });
    }
    let names: Vec<&str> = out.iter().map(|d| d.name.as_str()).collect();
    if !names.windows(2).all(|w| w[0] < w[1]) {
        return Err(format!("{what}: not sorted by name: {names:?}"));
    }
    Ok(out)
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Reads a whole .apk: every block, value and hash; `Err` says what is wrong.
fn read_apk(file: &[u8]) -> Result<Apk, String> {
    let (compressed, body) = match file.get(..4) {
        Some(b"ADBd") => (true, inflate(&file[4..])?),
        Some(b"ADB.") => (false, file.to_vec()),
        _ => return Err(s("not an apk v3 file (no ADB magic)")),
    };
    if body.get(..4) != Some(b"ADB.") {
        return Err(s("no ADB. header inside"));
    }
    if body.len() < 8 || u32::from_le_bytes(body[4..8].try_into().unwrap()) != SCHEMA_PACKAGE {
        return Err(s("schema is not pckg"));
    }
    // Blocks: a 32-bit header (2 bits of type, 30 of size counting the header), padded to 8.
    let mut blocks: Vec<(u32, &[u8])> = Vec::new();
    let mut pos = 8;
    while pos < body.len() {
        let h = u32::from_le_bytes(
            body.get(pos..pos + 4)
                .ok_or("block header cut")?
                .try_into()
                .unwrap(),
        );
        let (kind, size) = (h >> 30, (h & 0x3fff_ffff) as usize);
        if kind == 3 {
            return Err(s("extended block (over 1 GiB): not expected"));
        }
        if size < 4 {
            return Err(format!("block at {pos}: size {size}"));
        }
        let padded = size.div_ceil(8) * 8;
        let end = pos + padded;
        if end > body.len() {
            return Err(format!("block at {pos}: runs past the end"));
        }
        if body[pos + size..end].iter().any(|&b| b != 0) {
            return Err(format!("block at {pos}: padding not zero"));
        }
        blocks.push((kind, &body[pos + 4..pos + size]));
        pos = end;
    }
    let kinds: Vec<u32> = blocks.iter().map(|b| b.0).collect();
    if kinds.first() != Some(&0) || kinds[1..].iter().any(|&k| k != 2) {
        return Err(format!(
            "blocks {kinds:?}: want one ADB block (0) then DATA blocks (2), no SIG (unsigned)"
        ));
    }
    let adb = Adb { buf: blocks[0].1 };
    if adb.buf.len() < 8 || adb.buf[0] != 0 || adb.buf[1] != 0 || adb.buf[2..4] != [0, 0] {
        return Err(s(
            "ADB header: compat version, version and reserved must be 0",
        ));
    }
    let pkg = adb.fields(adb.u32_at(4)?, 5, "package")?;
    if pkg[3] != 0 || pkg[4] != 0 {
        return Err(s("package: triggers or replaces-priority set"));
    }
    let pi = adb.fields(pkg[0], PKGINFO.len(), "info")?;
    let mut info = BTreeMap::new();
    for (i, &(name, is_string)) in PKGINFO.iter().enumerate() {
        if is_string {
            if let Some(v) = adb.string(pi[i], name)? {
                info.insert(name, v);
            }
        } else if pi[i] != 0
            && !matches!(name, "hashes" | "installed-size" | "depends" | "provides")
        {
            return Err(format!("info: {name} is set"));
        }
    }
    // The package id: SHA-256 of the ADB block with the id's bytes zeroed, first 20 bytes.
    let id = adb
        .blob(pi[2])?
        .ok_or("info: no hashes (package id)")?
        .to_vec();
    if pi[2] >> 28 != T_BLOB8 || id.len() != 20 {
        return Err(s("info.hashes: not a 20-byte blob"));
    }
    let off = (pi[2] & 0x0fff_ffff) as usize + 1;
    let mut zeroed = adb.buf.to_vec();
    zeroed[off..off + 20].fill(0);
    if sha256(&zeroed)[..20] != id[..] {
        return Err(s("integrity: info.hashes is not the ADB block's SHA-256"));
    }
    let installed_size = adb.int(pi[11])?.ok_or("info: no installed-size")?;
    let depends = deps(&adb, pi[14], "depends")?;
    let provides = deps(&adb, pi[15], "provides")?;

    let mut paths = Vec::new();
    for (di, d) in adb.items(pkg[1], "paths")?.into_iter().enumerate() {
        let f = adb.fields(d, 3, "path")?;
        let name = adb.string(f[0], "path name")?.unwrap_or_default();
        let what = format!("path {name:?}");
        if (di == 0) != name.is_empty() {
            return Err(format!(
                "{what}: the root path must come first, and only it unnamed"
            ));
        }
        let mut files = Vec::new();
        for fv in adb.items(f[2], &format!("{what} files"))? {
            let ff = adb.fields(fv, 6, &what)?;
            let fname = adb
                .string(ff[0], &what)?
                .ok_or(format!("{what}: file without name"))?;
            let fwhat = format!("{name}/{fname}");
            let sha = adb.blob(ff[4])?.map(<[u8]>::to_vec);
            let symlink = match adb.blob(ff[5])? {
                None => None,
                Some(t) if t.len() > 2 && u16::from_le_bytes([t[0], t[1]]) == 0o120000 => {
                    Some(String::from_utf8(t[2..].to_vec()).map_err(|_| fwhat.clone())?)
                }
                Some(_) => return Err(format!("{fwhat}: target is not a symlink's")),
            };
            if symlink.is_some() == sha.is_some() {
                return Err(format!("{fwhat}: want a hash (file) or a target (symlink)"));
            }
            if sha.as_ref().is_some_and(|h| h.len() != 32) {
                return Err(format!("{fwhat}: hash is not SHA-256"));
            }
            files.push(File {
                name: fname,
                acl: acl(&adb, ff[1], &fwhat)?,
                size: adb.int(ff[2])?.ok_or(format!("{fwhat}: no size"))?,
                mtime: adb.int(ff[3])?.ok_or(format!("{fwhat}: no mtime"))?,
                sha256: sha,
                symlink,
                content: Vec::new(),
            });
        }
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        if !names.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("{what}: files not sorted: {names:?}"));
        }
        paths.push(Dir {
            acl: acl(&adb, f[1], &what)?,
            name,
            files,
        });
    }
    let names: Vec<&str> = paths.iter().map(|d| d.name.as_str()).collect();
    if !names.windows(2).all(|w| w[0] < w[1]) {
        return Err(format!("paths not sorted: {names:?}"));
    }
    let mut scripts = BTreeMap::new();
    for (i, v) in adb.fields(pkg[2], 7, "scripts")?.into_iter().enumerate() {
        if let Some(text) = adb.string(v, SCRIPTS[i])? {
            scripts.insert(SCRIPTS[i], text);
        }
    }

    // DATA blocks: one per regular file with bytes, in path and file order, each headed by
    // its (path, file) indices (1-based), its bytes hashing to the file's hash.
    let mut data = blocks[1..].iter();
    let mut total = 0;
    for (pi, dir) in paths.iter_mut().enumerate() {
        for (fi, f) in dir.files.iter_mut().enumerate() {
            if let Some(target) = &f.symlink {
                if f.size != target.len() as u64 {
                    return Err(format!("{}/{}: symlink size", dir.name, f.name));
                }
                continue;
            }
            total += f.size;
            if f.size == 0 {
                if f.sha256.as_deref() != Some(&sha256(b"")[..]) {
                    return Err(format!("{}/{}: hash of an empty file", dir.name, f.name));
                }
                continue;
            }
            let what = format!("{}/{}", dir.name, f.name);
            let (_, b) = data.next().ok_or(format!("{what}: no DATA block"))?;
            if b.len() < 8 {
                return Err(format!("{what}: DATA block without its header"));
            }
            let idx = (
                u32::from_le_bytes(b[..4].try_into().unwrap()),
                u32::from_le_bytes(b[4..8].try_into().unwrap()),
            );
            if idx != (pi as u32 + 1, fi as u32 + 1) {
                return Err(format!("{what}: DATA block for {idx:?}, out of order"));
            }
            if b.len() - 8 != f.size as usize {
                return Err(format!(
                    "{what}: {} bytes, size says {}",
                    b.len() - 8,
                    f.size
                ));
            }
            if f.sha256.as_deref() != Some(&sha256(&b[8..])[..]) {
                return Err(format!("{what}: content does not match its SHA-256"));
            }
            f.content = b[8..].to_vec();
        }
    }
    if data.next().is_some() {
        return Err(s("a DATA block for no file"));
    }
    if installed_size != total.max(1) {
        return Err(format!(
            "installed-size {installed_size}, the files hold {total}"
        ));
    }
    Ok(Apk {
        compressed,
        info,
        id,
        installed_size,
        depends,
        provides,
        paths,
        scripts,
    })
}

impl Apk {
    /// Every directory (with a trailing "/") and file: (path, octal mode, owner).
    fn listing(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for d in &self.paths {
            let owner = format!("{}:{}", d.acl.user, d.acl.group);
            out.push((
                format!("/{}/", d.name).replace("//", "/"),
                format!("{:o}", d.acl.mode),
                owner,
            ));
            for f in &d.files {
                let p = if d.name.is_empty() {
                    format!("/{}", f.name)
                } else {
                    format!("/{}/{}", d.name, f.name)
                };
                out.push((
                    p,
                    format!("{:o}", f.acl.mode),
                    format!("{}:{}", f.acl.user, f.acl.group),
                ));
            }
        }
        out
    }

    fn file(&self, path: &str) -> &File {
        let rel = path.trim_start_matches('/');
        let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        self.paths
            .iter()
            .find(|d| d.name == dir)
            .and_then(|d| d.files.iter().find(|f| f.name == name))
            .unwrap_or_else(|| panic!("no {path} in the package"))
    }

    fn text(&self, path: &str) -> String {
        String::from_utf8(self.file(path).content.clone()).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The packer, read back.

fn have_python() -> bool {
    let ok = Command::new("python3")
        .arg("-c")
        .arg("import zlib, hashlib")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !ci(),
            "python3 is missing, and CI=true: build-packages.sh needs it"
        );
        println!("SKIPPED: python3 is missing; scripts/apk-pack.py was not run");
    }
    ok
}

fn pack(args: &[&str]) -> std::process::Output {
    Command::new("python3")
        .arg(repo("scripts/apk-pack.py"))
        .args(args)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap()
}

/// A tree with every kind of entry apk-pack.py takes.
fn small_tree() -> PathBuf {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let root = fresh_path("apk-pack", "root");
    let mk = |p: &str, body: &[u8], mode: u32| {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, body).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    mk("usr/bin/tool", &big, 0o755);
    mk("etc/config/tool", b"config tool 'main'\n", 0o600);
    mk("etc/empty", b"", 0o644);
    mk("a", b"at the root\n", 0o640);
    symlink("tool", root.join("usr/bin/tool-link")).unwrap();
    std::fs::create_dir_all(root.join("var/empty-dir")).unwrap();
    std::fs::set_permissions(
        root.join("var/empty-dir"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    root
}

#[test]
fn apk_pack_every_kind_of_entry_reads_back() {
    if !have_python() {
        return;
    }
    let root = small_tree();
    let dir = root.parent().unwrap();
    let script = dir.join("post-install");
    let long_script = format!("#!/bin/sh\n{}", "echo a long script line\n".repeat(20));
    std::fs::write(&script, &long_script).unwrap();
    let out = dir.join("tool.apk");
    let o = pack(&[
        "--info",
        "name:tool",
        "--info",
        "version:1.2.3-r4",
        "--info",
        "arch:noarch",
        "--info",
        "description:A tool",
        "--info",
        "license:MIT",
        "--info",
        "depends:zlib>=1.2 libc",
        "--info",
        "provides:tool-any",
        "--script",
        &format!("post-install:{}", script.display()),
        "--files",
        root.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let apk = read_apk(&std::fs::read(&out).unwrap()).unwrap();
    assert!(apk.compressed);
    let info: Vec<(&str, &str)> = apk.info.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        info,
        [
            ("arch", "noarch"),
            ("description", "A tool"),
            ("license", "MIT"),
            ("name", "tool"),
            ("version", "1.2.3-r4"),
        ]
    );
    assert_eq!(
        apk.depends,
        [
            Dep {
                name: s("libc"),
                version: None,
                op: None
            },
            // ">=": APK_VERSION_GREATER | APK_VERSION_EQUAL.
            Dep {
                name: s("zlib"),
                version: Some(s("1.2")),
                op: Some(5)
            },
        ]
    );
    assert_eq!(apk.provides.len(), 1);
    assert_eq!(apk.scripts.len(), 1);
    assert_eq!(apk.scripts["post-install"], long_script);
    let root_owned = |p: &str, m: u32| (s(p), format!("{m:o}"), s("root:root"));
    assert_eq!(
        apk.listing(),
        [
            root_owned("/", 0o755),
            root_owned("/a", 0o640),
            root_owned("/etc/", 0o755),
            root_owned("/etc/empty", 0o644),
            root_owned("/etc/config/", 0o755),
            root_owned("/etc/config/tool", 0o600),
            root_owned("/usr/", 0o755),
            root_owned("/usr/bin/", 0o755),
            root_owned("/usr/bin/tool", 0o755),
            root_owned("/usr/bin/tool-link", 0o777),
            root_owned("/var/", 0o755),
            root_owned("/var/empty-dir/", 0o700),
        ]
    );
    assert_eq!(
        apk.file("/usr/bin/tool-link").symlink.as_deref(),
        Some("tool")
    );
    assert_eq!(
        apk.file("/usr/bin/tool").content,
        std::fs::read(root.join("usr/bin/tool")).unwrap()
    );
    assert_eq!(apk.file("/a").content, b"at the root\n");
    assert!(apk.file("/etc/empty").content.is_empty());
    for d in &apk.paths {
        for f in &d.files {
            assert_eq!(f.mtime, 1_700_000_000, "{}", f.name);
        }
    }
    assert_eq!(apk.installed_size, 200_000 + 19 + 12);
}

#[test]
fn apk_reader_refuses_damaged_packages() {
    if !have_python() {
        return;
    }
    let root = small_tree();
    let out = root.parent().unwrap().join("plain.apk");
    let o = pack(&[
        "--info",
        "name:tool",
        "--info",
        "version:1-r1",
        "--info",
        "description:Damaged on purpose",
        "--files",
        root.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--compression",
        "none",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let good = std::fs::read(&out).unwrap();
    let apk = read_apk(&good).unwrap();
    assert!(!apk.compressed);
    assert_eq!(apk.info["arch"], "noarch");
    let find = |needle: &[u8]| {
        good.windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    let damaged = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x20;
        read_apk(&b).unwrap_err()
    };
    // A byte of a file's contents: its hash no longer matches.
    let e = damaged(find(b"at the root"));
    assert!(e.contains("/a: content does not match"), "{e}");
    // A byte of the metadata: the package id no longer matches.
    let e = damaged(find(b"Damaged on purpose"));
    assert!(e.contains("integrity"), "{e}");
    // Cut short, or with a stray byte after the last block.
    assert!(read_apk(&good[..good.len() - 9]).is_err());
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 8]);
    assert!(read_apk(&longer).is_err());
    // The deflate reader: the same package compressed, with its last byte changed.
    let o = pack(&[
        "--info",
        "name:tool",
        "--info",
        "version:1-r1",
        "--files",
        root.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let mut z = std::fs::read(&out).unwrap();
    assert!(read_apk(&z).is_ok());
    z.truncate(z.len() - 1);
    assert!(read_apk(&z).is_err());
}

// ---------------------------------------------------------------------------------------------
// The built packages.

/// The architectures of the `.ipk` files (`scripts/build-packages.sh`' `ipk_arches`).
const ARCHES: [&str; 8] = [
    "aarch64_cortex-a53",
    "aarch64_cortex-a72",
    "aarch64_cortex-a76",
    "aarch64_generic",
    "arm_cortex-a7_neon-vfpv4",
    "mipsel_24kc",
    "mips_24kc",
    "x86_64",
];

/// `/usr/sbin/derpd` of the `.ipk` of the same architecture.
fn ipk_binary(ipk: &Path) -> Vec<u8> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("tar -xzOf \"$1\" ./data.tar.gz | tar -xzOf - ./usr/sbin/derpd")
        .arg("sh")
        .arg(ipk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {out:?}", ipk.display());
    out.stdout
}

#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn apk_structure() {
    let version = format!(
        "{}-r{}",
        env!("CARGO_PKG_VERSION"),
        makefile_var("PKG_RELEASE")
    );
    let description = makefile_define("derpd/description")
        .iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" ");
    let conffiles = makefile_define("derpd/conffiles");
    let config = std::fs::read(repo("openwrt/files/derpd.config")).unwrap();
    let pkgname = "derpd";
    let header = format!(
        "[ -s ${{IPKG_INSTROOT}}/lib/functions.sh ] || exit 0\n\
         . ${{IPKG_INSTROOT}}/lib/functions.sh\n\
         export root=\"${{IPKG_INSTROOT}}\"\n\
         export pkgname=\"{pkgname}\"\n"
    );
    let post_install = format!(
        "#!/bin/sh\n[ \"${{IPKG_NO_SCRIPT}}\" = \"1\" ] && exit 0\n{header}\
         add_group_and_user\ndefault_postinst\n"
    );
    let post_upgrade = post_install.replacen("#!/bin/sh\n", "#!/bin/sh\nexport PKG_UPGRADE=1\n", 1);
    let pre_deinstall = format!("#!/bin/sh\n{header}default_prerm\n");
    for arch in ARCHES {
        let path = packages_dir().join(format!("apk/{arch}/derpd-{version}.apk"));
        assert!(
            path.is_file(),
            "{} is missing: run scripts/build-packages.sh",
            path.display()
        );
        let what = format!("apk/{arch}/derpd-{version}.apk");
        let apk =
            read_apk(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            apk.compressed,
            "{what}: deflate, as apk mkpkg writes by default"
        );
        let info: Vec<(&str, &str)> = apk.info.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            info,
            [
                ("arch", arch),
                ("description", description.as_str()),
                ("license", makefile_var("PKG_LICENSE").as_str()),
                ("maintainer", makefile_var("PKG_MAINTAINER").as_str()),
                ("name", "derpd"),
                ("origin", "derpd/openwrt/Makefile"),
                ("version", version.as_str()),
            ],
            "{what}: info"
        );
        let dep = |n: &str| Dep {
            name: s(n),
            version: None,
            op: None,
        };
        assert_eq!(
            apk.depends,
            [],
            "{what}: no dependencies (procd-ujail is optional)"
        );
        assert_eq!(apk.provides, [dep("derpd-any")], "{what}");
        assert_eq!(apk.id.len(), 20);

        // Every path: modes and owners as the .ipk's data.tar.gz has them, plus apk's lists.
        let r = |p: &str, m: u32| (s(p), format!("{m:o}"), s("root:root"));
        assert_eq!(
            apk.listing(),
            [
                r("/", 0o755),
                r("/etc/", 0o755),
                r("/etc/capabilities/", 0o755),
                r("/etc/capabilities/derpd.json", 0o600),
                r("/etc/config/", 0o755),
                r("/etc/config/derpd", 0o600),
                r("/etc/init.d/", 0o755),
                r("/etc/init.d/derpd", 0o755),
                r("/lib/", 0o755),
                r("/lib/apk/", 0o755),
                r("/lib/apk/packages/", 0o755),
                r("/lib/apk/packages/derpd.conffiles", 0o644),
                r("/lib/apk/packages/derpd.conffiles_static", 0o644),
                r("/lib/apk/packages/derpd.list", 0o644),
                r("/lib/apk/packages/derpd.rusers", 0o644),
                r("/lib/upgrade/", 0o755),
                r("/lib/upgrade/keep.d/", 0o755),
                r("/lib/upgrade/keep.d/derpd", 0o644),
                r("/usr/", 0o755),
                r("/usr/sbin/", 0o755),
                r("/usr/sbin/derpd", 0o755),
            ],
            "{what}: paths"
        );
        // One time for every file: SOURCE_DATE_EPOCH's, which build-packages.sh exports.
        let mtimes: Vec<u64> = apk
            .paths
            .iter()
            .flat_map(|d| d.files.iter().map(|f| f.mtime))
            .collect();
        assert!(mtimes.iter().all(|&t| t == mtimes[0] && t > 0), "{what}");
        if let Ok(sde) = std::env::var("SOURCE_DATE_EPOCH") {
            assert_eq!(mtimes[0].to_string(), sde, "{what}: mtime");
        }

        // Contents: the repository's files, the .ipk's binary, and package-pack.mk's lists.
        for (inside, source) in [
            ("/etc/init.d/derpd", "openwrt/files/derpd.init"),
            ("/etc/config/derpd", "openwrt/files/derpd.config"),
            ("/etc/capabilities/derpd.json", "openwrt/files/derpd.json"),
        ] {
            assert_eq!(
                apk.file(inside).content,
                std::fs::read(repo(source)).unwrap(),
                "{what}: {inside}"
            );
        }
        let ipk = packages_dir().join(format!("derpd_{version}_{arch}.ipk"));
        assert_eq!(
            apk.file("/usr/sbin/derpd").content,
            ipk_binary(&ipk),
            "{what}: /usr/sbin/derpd is not the .ipk's"
        );
        assert_eq!(
            apk.text("/lib/apk/packages/derpd.list"),
            "/etc/capabilities/derpd.json\n/etc/config/derpd\n/etc/init.d/derpd\n\
             /lib/apk/packages/derpd.rusers\n/lib/upgrade/keep.d/derpd\n/usr/sbin/derpd\n",
            "{what}: .list (made before the conffiles lists, as package-pack.mk makes it)"
        );
        assert_eq!(
            apk.text("/lib/apk/packages/derpd.conffiles"),
            format!("{}\n", conffiles.join("\n")),
            "{what}: .conffiles (the Makefile's conffiles)"
        );
        assert_eq!(
            apk.text("/lib/apk/packages/derpd.conffiles_static"),
            format!("/etc/config/derpd {}\n", hex(&sha256(&config))),
            "{what}: .conffiles_static (the conffiles that are files, with their SHA-256)"
        );
        assert_eq!(
            apk.text("/lib/apk/packages/derpd.rusers"),
            format!("{}\n", makefile_var("USERID")),
            "{what}: .rusers (Require-User, for add_group_and_user)"
        );
        assert_eq!(
            apk.text("/lib/upgrade/keep.d/derpd"),
            "/etc/derpd/\n",
            "{what}: keep.d"
        );

        let scripts: Vec<(&str, &str)> =
            apk.scripts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            scripts,
            [
                ("post-install", post_install.as_str()),
                ("post-upgrade", post_upgrade.as_str()),
                ("pre-deinstall", pre_deinstall.as_str()),
            ],
            "{what}: scripts"
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// luci-app-derpd's `.apk`: noarch, its dependencies, the files `scripts/stage-luci-app.sh`
/// stages (modes and contents the repository's), the `.list` package-pack.mk makes, and the
/// Makefile's postinst and postrm as the post-install tail and the post-deinstall script.
#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn luci_apk_structure() {
    let version = format!(
        "{}-r{}",
        env!("CARGO_PKG_VERSION"),
        makefile_var("PKG_RELEASE")
    );
    let what = format!("apk/noarch/luci-app-derpd-{version}.apk");
    let path = packages_dir().join(&what);
    let apk = read_apk(&std::fs::read(&path).unwrap_or_else(|e| panic!("{what}: {e}")))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        apk.info.get("name").map(String::as_str),
        Some("luci-app-derpd")
    );
    assert_eq!(apk.info.get("arch").map(String::as_str), Some("noarch"));
    assert_eq!(apk.info.get("version"), Some(&version));
    let names: Vec<&str> = apk.depends.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["derpd", "libc", "luci-base"], "{what}: depends");
    let listed = Command::new("bash")
        .args([
            repo("scripts/stage-luci-app.sh").to_str().unwrap(),
            "--list",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    let mut list = String::new();
    for line in listed.lines() {
        let (mode, file) = line.split_once(' ').unwrap();
        let entry = apk
            .listing()
            .into_iter()
            .find(|(p, _, _)| p == file)
            .unwrap_or_else(|| panic!("{what}: no {file}"));
        assert_eq!(
            (entry.1.as_str(), entry.2.as_str()),
            (mode.trim_start_matches('0'), "root:root"),
            "{what}: {file}"
        );
        let source = match file.strip_prefix("/www/") {
            Some(rest) => format!("openwrt/luci-app-derpd/htdocs/{rest}"),
            None => format!("openwrt/luci-app-derpd/root{file}"),
        };
        assert_eq!(
            apk.file(file).content,
            std::fs::read(repo(&source)).unwrap(),
            "{what}: {file}"
        );
        list.push_str(file);
        list.push('\n');
    }
    let mut sorted: Vec<&str> = list.lines().collect();
    sorted.sort_unstable();
    assert_eq!(
        apk.text("/lib/apk/packages/luci-app-derpd.list"),
        format!("{}\n", sorted.join("\n")),
        "{what}: .list"
    );
    let body = |name: &str| {
        let lines = makefile_define(name);
        lines
            .iter()
            .filter(|l| !l.starts_with("#!"))
            .map(|l| format!("{}\n", l.replace("$$", "$")))
            .collect::<String>()
    };
    let post_install = &apk.scripts["post-install"];
    assert!(
        post_install.ends_with(&format!(
            "default_postinst\n{}",
            body("luci-app-derpd/postinst")
        )),
        "{what}: post-install\n{post_install}"
    );
    assert_eq!(
        apk.scripts["post-deinstall"],
        format!("#!/bin/sh\n{}", body("luci-app-derpd/postrm")),
        "{what}: post-deinstall"
    );
}
