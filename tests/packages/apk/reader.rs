//! The ADB format, read as apk-tools' documentation describes it, with every check.

use super::inflate::inflate;
use super::*;

/// The type codes of a value (its high 4 bits).
pub(super) const T_SPECIAL: u32 = 0x0;
pub(super) const T_INT: u32 = 0x1;
pub(super) const T_INT32: u32 = 0x2;
pub(super) const T_INT64: u32 = 0x3;
pub(super) const T_BLOB8: u32 = 0x8;
pub(super) const T_BLOB16: u32 = 0x9;
pub(super) const T_BLOB32: u32 = 0xa;
pub(super) const T_ARRAY: u32 = 0xd;
pub(super) const T_OBJECT: u32 = 0xe;
pub(super) const SCHEMA_PACKAGE: u32 = u32::from_le_bytes(*b"pckg");

pub(super) struct Adb<'a> {
    pub(super) buf: &'a [u8],
}

impl Adb<'_> {
    pub(super) fn u32_at(&self, off: usize) -> Result<u32, String> {
        let b = self
            .buf
            .get(off..off + 4)
            .ok_or_else(|| format!("offset {off} beyond the ADB block"))?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()))
    }

    /// A value's data offset, checked for alignment and bounds.
    pub(super) fn at(&self, v: u32, align: usize, len: usize) -> Result<usize, String> {
        let off = (v & 0x0fff_ffff) as usize;
        if !off.is_multiple_of(align) {
            return Err(format!("value {v:#x}: offset not {align}-aligned"));
        }
        if off < 8 || off + len > self.buf.len() {
            return Err(format!("value {v:#x}: out of the ADB block"));
        }
        Ok(off)
    }

    pub(super) fn int(&self, v: u32) -> Result<Option<u64>, String> {
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

    pub(super) fn blob(&self, v: u32) -> Result<Option<&[u8]>, String> {
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

    pub(super) fn string(&self, v: u32, what: &str) -> Result<Option<String>, String> {
        self.blob(v)?
            .map(|b| String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8")))
            .transpose()
    }

    /// An object's or array's slots 1.. (null when the value is null), at most `max` of them.
    pub(super) fn slots(&self, v: u32, max: usize, what: &str) -> Result<Vec<u32>, String> {
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
    pub(super) fn fields(&self, v: u32, max: usize, what: &str) -> Result<Vec<u32>, String> {
        let mut f = self.slots(v, max, what)?;
        f.resize(max, 0);
        Ok(f)
    }

    /// An array's items: none null.
    pub(super) fn items(&self, v: u32, what: &str) -> Result<Vec<u32>, String> {
        let items = self.slots(v, usize::MAX, what)?;
        if items.contains(&0) || items.iter().any(|&i| i >> 28 == T_SPECIAL) {
            return Err(format!("{what}: a null item"));
        }
        Ok(items)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Dep {
    pub(super) name: String,
    pub(super) version: Option<String>,
    pub(super) op: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Acl {
    pub(super) mode: u32,
    pub(super) user: String,
    pub(super) group: String,
}

#[derive(Debug)]
pub(super) struct File {
    pub(super) name: String,
    pub(super) acl: Acl,
    pub(super) size: u64,
    pub(super) mtime: u64,
    pub(super) sha256: Option<Vec<u8>>,
    /// For a symlink: its target.
    pub(super) symlink: Option<String>,
    /// A regular file's bytes, from its DATA block (empty files have none).
    pub(super) content: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Dir {
    pub(super) name: String,
    pub(super) acl: Acl,
    pub(super) files: Vec<File>,
}

/// One package, as read.
#[derive(Debug)]
pub(super) struct Apk {
    pub(super) compressed: bool,
    /// The pkginfo fields that are strings, by their apk names.
    pub(super) info: BTreeMap<&'static str, String>,
    pub(super) id: Vec<u8>,
    pub(super) installed_size: u64,
    pub(super) depends: Vec<Dep>,
    pub(super) provides: Vec<Dep>,
    pub(super) paths: Vec<Dir>,
    pub(super) scripts: BTreeMap<&'static str, String>,
}

/// pkginfo's fields by index (apk_adb.h); `None`: not a string.
pub(super) const PKGINFO: [(&str, bool); 21] = [
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
pub(super) const SCRIPTS: [&str; 7] = [
    "trigger",
    "pre-install",
    "post-install",
    "pre-deinstall",
    "post-deinstall",
    "pre-upgrade",
    "post-upgrade",
];

pub(super) fn acl(adb: &Adb<'_>, v: u32, what: &str) -> Result<Acl, String> {
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

pub(super) fn deps(adb: &Adb<'_>, v: u32, what: &str) -> Result<Vec<Dep>, String> {
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

pub(super) fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Reads a whole .apk: every block, value and hash; `Err` says what is wrong.
pub(super) fn read_apk(file: &[u8]) -> Result<Apk, String> {
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
    pub(super) fn listing(&self) -> Vec<(String, String, String)> {
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

    pub(super) fn file(&self, path: &str) -> &File {
        let rel = path.trim_start_matches('/');
        let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        self.paths
            .iter()
            .find(|d| d.name == dir)
            .and_then(|d| d.files.iter().find(|f| f.name == name))
            .unwrap_or_else(|| panic!("no {path} in the package"))
    }

    pub(super) fn text(&self, path: &str) -> String {
        String::from_utf8(self.file(path).content.clone()).unwrap()
    }
}
