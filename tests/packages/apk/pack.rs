//! `scripts/apk-pack.py` on a small tree of every kind of entry, read back; damaged copies
//! refused.

use super::reader::*;
use super::*;

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
