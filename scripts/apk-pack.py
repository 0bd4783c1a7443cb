#!/usr/bin/env python3
"""Writes an apk-tools v3 package (the ADB format of OpenWrt 25.12's .apk files), unsigned.

Written from apk-tools' public description of the format (doc/apk-v3.5.scd, doc/apk-package.5.scd)
and the layout `apk mkpkg` writes, without apk-tools: the arguments are a subset of
`apk mkpkg`'s, and for the same files and fields the output is the one `apk mkpkg` makes under
fakeroot with SOURCE_DATE_EPOCH set (every file root:root, no xattrs):

  apk-pack.py --info name:derpd --info version:0.1.0-r1 --info arch:mipsel_24kc \
      --info "description:..." --info license:BSD-3-Clause --info "depends:procd-ujail" \
      --script post-install:FILE ... --files ROOT --output derpd-0.1.0-r1.apk

--info takes the pkginfo fields by their apk names (name, version, description, arch (default
noarch), license, origin, maintainer, url, depends, provides, replaces, install-if,
recommends, tags, provider-priority, layer, build-time, repo-commit); --script the types
pre-install, post-install, pre-deinstall, post-deinstall, pre-upgrade, post-upgrade, trigger.
ROOT holds the files as they are installed: regular files, directories and symlinks, with their
modes; owners are written as root, times as SOURCE_DATE_EPOCH (the file's own without it).
Stdlib only. The file: "ADBd", then raw deflate of: the file header ("ADB." and the schema
"pckg"), one ADB block (the package's metadata: info, paths with each file's sha256, scripts),
and one DATA block per non-empty regular file. apk checks the files against the hashes; the
package's id (info.hashes) is the first 20 bytes of the sha256 of the ADB block.
"""

import argparse
import hashlib
import os
import re
import stat
import struct
import sys
import zlib

# Value types (high 4 bits of a 32-bit little-endian value).
T_SPECIAL, T_INT, T_INT32, T_INT64 = 0x0, 0x1, 0x2, 0x3
T_BLOB8, T_BLOB16, T_BLOB32, T_ARRAY, T_OBJECT = 0x8, 0x9, 0xA, 0xD, 0xE
NULL = 0
# Block types (high 2 bits of a block's 32-bit header).
B_ADB, B_DATA = 0, 2
SCHEMA_PACKAGE = 0x676B6370  # "pckg"

# pkginfo fields, by index, and what kind of value each is.
PKGINFO = [
    ("name", "name"), ("version", "version"), ("hashes", "hexblob"),
    ("description", "string"), ("arch", "string"), ("license", "string"),
    ("origin", "string"), ("maintainer", "string"), ("url", "string"),
    ("repo-commit", "hexblob"), ("build-time", "int"), ("installed-size", None),
    ("file-size", None), ("provider-priority", "int"), ("depends", "deps"),
    ("provides", "deps"), ("replaces", "deps"), ("install-if", "deps"),
    ("recommends", "deps"), ("layer", "int"), ("tags", "tags"),
]
PI = {name: i + 1 for i, (name, _) in enumerate(PKGINFO)}
SCRIPTS = ["trigger", "pre-install", "post-install", "pre-deinstall", "post-deinstall",
           "pre-upgrade", "post-upgrade"]
# Object field indices (apk_adb.h).
PKG_INFO, PKG_PATHS, PKG_SCRIPTS = 1, 2, 3
ACL_MODE, ACL_USER, ACL_GROUP = 1, 2, 3
FI_NAME, FI_ACL, FI_SIZE, FI_MTIME, FI_HASH, FI_TARGET = 1, 2, 3, 4, 5, 6
DI_NAME, DI_ACL, DI_FILES = 1, 2, 3
DEP_NAME, DEP_VERSION, DEP_MATCH = 1, 2, 3
# Dependency operators (apk_version.h): the match field's bits.
V_EQUAL, V_LESS, V_GREATER, V_FUZZY = 1, 2, 4, 8

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
VERSION_RE = re.compile(
    r"[0-9]+(\.[0-9]+)*[a-z]?(_(alpha|beta|pre|rc|cvs|svn|git|hg|p)[0-9]*)*(~[0-9a-f]+)?(-r[0-9]+)?\Z")
DEP_RE = re.compile(r"(!?)([^<>=~!]+)(?:(<=|>=|<~|>~|=~|~=|~|<|>|=|><)(.+))?\Z")
OPS = {"=": V_EQUAL, "<": V_LESS, ">": V_GREATER, "<=": V_LESS | V_EQUAL,
       ">=": V_GREATER | V_EQUAL, "~": V_EQUAL | V_FUZZY, "=~": V_EQUAL | V_FUZZY,
       "~=": V_EQUAL | V_FUZZY, "<~": V_LESS | V_EQUAL | V_FUZZY,
       ">~": V_GREATER | V_EQUAL | V_FUZZY, "><": V_LESS | V_GREATER}


def fail(msg):
    sys.exit(f"apk-pack: {msg}")


def val(kind, v):
    return (kind << 28) | v


class Adb:
    """The ADB block's body, written as apk-tools writes it: values aligned to their size,
    identical data stored once, objects with their trailing null fields cut off."""

    def __init__(self):
        self.buf = bytearray(8)  # adb_hdr: compat version 0, version 0, reserved, root
        self.seen = {}

    def raw(self, data, align, cache=True):
        if cache and data in self.seen and self.seen[data] % align == 0:
            return self.seen[data]
        self.buf += bytes(-len(self.buf) % align)
        off = len(self.buf)
        if off >= 1 << 28:
            fail("metadata over 256 MiB")
        self.buf += data
        if cache:
            self.seen[data] = off
        return off

    def blob(self, data, cache=True):
        n = len(data)
        if n == 0:
            return NULL
        if n <= 0xFF:
            return val(T_BLOB8, self.raw(struct.pack("<B", n) + data, 1, cache))
        if n <= 0xFFFF:
            return val(T_BLOB16, self.raw(struct.pack("<H", n) + data, 2, cache))
        return val(T_BLOB32, self.raw(struct.pack("<I", n) + data, 4, cache))

    def int(self, n):
        if n < 0x10000000:
            return val(T_INT, n)
        if n < 1 << 32:
            return val(T_INT32, self.raw(struct.pack("<I", n), 4))
        return val(T_INT64, self.raw(struct.pack("<Q", n), 4))

    def obj(self, fields, kind=T_OBJECT):
        """fields: slot 1.. values (0 = null); returns the value of the object, or null."""
        slots = list(fields)
        while slots and slots[-1] == NULL:
            slots.pop()
        if not slots:
            return NULL
        data = struct.pack(f"<{len(slots) + 1}I", len(slots) + 1, *slots)
        return val(kind, self.raw(data, 4))

    def arr(self, items):
        # An array is an object whose slots all hold one kind of value; apk mkpkg writes the
        # package's arrays (paths, files, depends, tags) with the object type code, as here.
        return self.obj([v for v in items if v != NULL])


def fields(n, **kv):
    f = [NULL] * n
    for k, v in kv.items():
        f[int(k[1:]) - 1] = v
    return f


def deps(adb, text):
    """A depends/provides/... list ("a b>=1.2"; apk splits on spaces and newlines): dependency
    objects sorted by name (adb_wa_sort_unique), duplicates dropped. Conflicts ("!a") and two
    constraints on one name (sorted by apk's version order) are refused: not needed here."""
    items = {}
    for word in text.replace("\n", " ").split(" "):
        if not word:
            continue
        m = DEP_RE.match(word)
        if not m or m.group(1):
            fail(f"unsupported dependency {word!r}")
        _, name, op, ver = m.groups()
        if not re.fullmatch(r"[A-Za-z0-9._+:/\[\],=-]+", name):
            fail(f"bad dependency name {name!r}")
        if op and not VERSION_RE.match(ver):
            fail(f"bad version in dependency {word!r}")
        match = OPS[op] if op else 0
        f = [adb.blob(name.encode()), adb.blob(ver.encode()) if op else NULL,
             adb.int(match) if match not in (0, V_EQUAL) else NULL]
        v = adb.obj(f)
        if items.get(name.encode(), v) != v:
            fail(f"two constraints on {name}: not supported")
        items[name.encode()] = v
    return adb.arr([items[k] for k in sorted(items)])


def info_value(adb, field, text):
    kind = PKGINFO[PI[field] - 1][1]
    if kind == "name":
        if not NAME_RE.match(text):
            fail(f"bad package name {text!r}")
        return adb.blob(text.encode())
    if kind == "version":
        if not VERSION_RE.match(text):
            fail(f"bad version {text!r} (apk's form: 1.2.3-r1)")
        return adb.blob(text.encode())
    if kind == "string":
        if "\n" in text:
            fail(f"{field}: one line only")
        return adb.blob(text.encode())
    if kind == "hexblob":
        return adb.blob(bytes.fromhex(text))
    if kind == "int":
        return adb.int(int(text, 10))
    if kind == "deps":
        return deps(adb, text)
    if kind == "tags":
        words = text.split()
        for w in words:
            if not re.fullmatch(r"[A-Za-z0-9._+,:/\[\]=-]+", w):
                fail(f"bad tag {w!r}")
        return adb.arr([adb.blob(w.encode()) for w in words])
    fail(f"--info {field}: apk computes this field")
    return NULL


def scan(root):
    """Every directory under root (root first as ""), sorted as apk mkpkg sorts them, with its
    non-directory entries sorted by name."""
    dirs = []

    def walk(rel):
        names = sorted(os.listdir(os.path.join(root, rel) if rel else root),
                       key=lambda s: s.encode())
        for name in names:
            p = os.path.join(rel, name) if rel else name
            if stat.S_ISDIR(os.lstat(os.path.join(root, p)).st_mode):
                dirs.append(p)
                walk(p)

    walk("")
    dirs.sort(key=lambda s: s.encode())
    out = []
    for d in [""] + dirs:
        full = os.path.join(root, d) if d else root
        names = sorted(os.listdir(full), key=lambda s: s.encode())
        out.append((d, [n for n in names if not stat.S_ISDIR(os.lstat(os.path.join(full, n)).st_mode)]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--info", "-I", action="append", default=[], metavar="FIELD:VALUE")
    ap.add_argument("--script", "-s", action="append", default=[], metavar="TYPE:FILE")
    ap.add_argument("--files", "-F", metavar="DIR")
    ap.add_argument("--output", "-o", required=True)
    ap.add_argument("--compression", choices=["deflate", "none"], default="deflate")
    a = ap.parse_args()

    info = {}
    for item in a.info:
        k, sep, v = item.partition(":")
        if not sep or k not in PI:
            fail(f"invalid info field: {item!r}")
        if k in ("installed-size", "file-size"):
            fail(f"invalid info field: {k} (apk computes it)")
        info[k] = v
    for k in ("name", "version"):
        if k not in info:
            fail(f"required info field '{k}' not provided")
    info.setdefault("arch", "noarch")
    scripts = {}
    for item in a.script:
        k, sep, path = item.partition(":")
        if not sep or k not in SCRIPTS:
            fail(f"invalid script type: {item!r}")
        with open(path, "rb") as f:
            scripts[k] = f.read()
    sde = os.environ.get("SOURCE_DATE_EPOCH", "")
    mtime_all = int(sde) if sde else None

    adb = Adb()
    pi = [NULL] * len(PKGINFO)
    for field, _ in PKGINFO:
        if field in info:
            pi[PI[field] - 1] = info_value(adb, field, info[field])

    root = b"root"
    paths, data_files, installed = [], [], 0
    if a.files:
        for d, names in scan(a.files):
            files = []
            for name in names:
                p = os.path.join(a.files, d, name)
                st = os.lstat(p)
                f = [NULL] * 6
                f[FI_NAME - 1] = adb.blob(name.encode())
                size = 0
                if stat.S_ISREG(st.st_mode):
                    if st.st_nlink > 1:
                        fail(f"{p}: hard links are not supported")
                    with open(p, "rb") as fh:
                        content = fh.read()
                    size = len(content)
                    f[FI_HASH - 1] = adb.blob(hashlib.sha256(content).digest())
                    installed += size
                elif stat.S_ISLNK(st.st_mode):
                    target = os.readlink(p).encode()
                    size = len(target)
                    f[FI_TARGET - 1] = adb.blob(struct.pack("<H", stat.S_IFLNK) + target)
                else:
                    fail(f"{p}: not a regular file, directory or symlink")
                f[FI_MTIME - 1] = adb.int(mtime_all if mtime_all is not None else int(st.st_mtime))
                f[FI_SIZE - 1] = adb.int(size)
                acl = adb.obj([adb.int(stat.S_IMODE(st.st_mode)), adb.blob(root), adb.blob(root)])
                f[FI_ACL - 1] = acl
                files.append((name.encode(), adb.obj(f), p if stat.S_ISREG(st.st_mode) and size else None))
            st = os.lstat(os.path.join(a.files, d) if d else a.files)
            dname = adb.blob(d.encode())
            acl = adb.obj([adb.int(stat.S_IMODE(st.st_mode)), adb.blob(root), adb.blob(root)])
            files.sort(key=lambda x: x[0])
            farr = adb.arr([x[1] for x in files])
            paths.append((d.encode(), adb.obj([dname, acl, farr]),
                          [x[2] for x in files]))
        if installed == 0:
            installed = 1
    if scripts and installed == 0:
        installed = 1
    pi[PI["installed-size"] - 1] = adb.int(installed)
    uid_val = adb.blob(bytes(20), cache=False)  # the package id, filled in below
    pi[PI["hashes"] - 1] = uid_val
    pkg = [NULL] * 5
    pkg[PKG_INFO - 1] = adb.obj(pi)
    paths.sort(key=lambda x: x[0])
    pkg[PKG_PATHS - 1] = adb.arr([x[1] for x in paths])
    if scripts:
        pkg[PKG_SCRIPTS - 1] = adb.obj([adb.blob(scripts.get(k, b"")) for k in SCRIPTS])
    root_val = adb.obj(pkg)
    struct.pack_into("<I", adb.buf, 4, root_val)
    uid_off = (uid_val & 0x0FFFFFFF) + 1
    adb.buf[uid_off:uid_off + 20] = hashlib.sha256(adb.buf).digest()[:20]

    def block(kind, payload):
        n = 4 + len(payload)
        if n > 0x3FFFFFFF:
            fail("block over 1 GiB")
        return struct.pack("<I", (kind << 30) | n) + payload + bytes(-n % 8)

    out = [b"ADB." + struct.pack("<I", SCHEMA_PACKAGE), block(B_ADB, bytes(adb.buf))]
    for pi_idx, (_, _, datafiles) in enumerate(paths, 1):
        for fi_idx, p in enumerate(datafiles, 1):
            if p:
                with open(p, "rb") as fh:
                    out.append(block(B_DATA, struct.pack("<II", pi_idx, fi_idx) + fh.read()))
    body = b"".join(out)
    if a.compression == "deflate":
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 8)
        body = b"ADBd" + c.compress(body) + c.flush()
    tmp = a.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(body)
    os.chmod(tmp, 0o644)
    os.replace(tmp, a.output)


if __name__ == "__main__":
    main()
