//! The built `.ipk` files (derpd for each target, luci-app-derpd), read as opkg reads them.

use super::{cargo_version, check_elf, check_gzip, control_fields, field, read, repo};
use super::{require_package, root_owned, run, same_as_repo, tar_listing, untar, IPKS};
use crate::support::{fresh_path, makefile_define, makefile_var, packages_dir};

/// The control fields opkg (opkg-lede, `libopkg/pkg_parse.c`) knows, in the order it tries
/// them: it takes a line as the first of these whose name the line starts with, so
/// `SourceName:` and `SourceDateEpoch:` are read as `Source`, and ignores the rest.
const OPKG_FIELDS: &[&str] = &[
    "ABIVersion",
    "Alternatives",
    "Architecture",
    "Auto-Installed",
    "Conffiles",
    "Conflicts",
    "Description",
    "Depends",
    "Essential",
    "Filename",
    "Installed-Size",
    "Installed-Time",
    "MD5sum:",
    "MD5Sum:",
    "Maintainer",
    "Package",
    "Priority",
    "Provides",
    "Pre-Depends",
    "Recommends",
    "Replaces",
    "Section",
    "SHA256sum",
    "Size",
    "Source",
    "Status",
    "Suggests",
    "Tags",
    "Version",
];

/// What opkg makes of a control file: each field it stores is stored under its own name, and
/// no value is cut. opkg keeps a field's first value in a buffer of that value's size, copies
/// a later value of the same field into it, and prints "ERROR: truncating field" when the
/// later one is longer (`pkg_set_raw` in `libopkg/pkg.c`): with `SourceName:` and
/// `SourceDateEpoch:` read as Source, a short or missing `Source:` before them does that.
fn opkg_reads_as_written(control: &str, what: &str) {
    let mut stored: Vec<(&str, usize)> = Vec::new(); // opkg field, buffer size
    for line in control.lines().filter(|l| !l.starts_with(' ')) {
        let Some(name) = OPKG_FIELDS.iter().find(|f| line.starts_with(*f)) else {
            continue;
        };
        let written = line.split(':').next().unwrap();
        let value = &line[name.trim_end_matches(':').len() + 1..];
        let size = value.len() + 1;
        match stored.iter().find(|(f, _)| f == name) {
            None => {
                assert!(
                    written == *name || *name == "Source",
                    "{what}: opkg reads {written}: as {name}"
                );
                stored.push((name, size));
            }
            Some((_, first)) => assert!(
                size <= *first,
                "{what}: opkg would truncate {written}: ({size} bytes) into {name}'s \
                 {first}-byte buffer and print ERROR: truncating field"
            ),
        }
    }
    for want in [
        "Package",
        "Version",
        "Source",
        "Section",
        "Architecture",
        "Maintainer",
    ] {
        assert!(
            stored.iter().any(|(f, _)| *f == want),
            "{what}: no {want} for opkg in {control}"
        );
    }
}

#[test]
fn opkg_reads_as_written_catches_a_missing_or_short_source_field() {
    let control = |source: Option<&str>| {
        let source = source.map(|v| format!("Source: {v}\n")).unwrap_or_default();
        format!(
            "Package: derpd\nVersion: 0.1.0-r1\n{source}SourceName: derpd\nSection: net\n\
             SourceDateEpoch: 1796197046\nMaintainer: m\nArchitecture: all\n"
        )
    };
    opkg_reads_as_written(&control(Some("twenty characters...")), "long enough");
    for (source, what) in [
        (None, "no Source"),
        (Some("package/derpd"), "a short Source"),
    ] {
        let text = control(source);
        let caught = std::panic::catch_unwind(|| opkg_reads_as_written(&text, what));
        assert!(caught.is_err(), "{what} passed");
    }
}

#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn ipk_structure() {
    let version = format!("{}-r{}", cargo_version(), makefile_var("PKG_RELEASE"));
    for (arch, elf) in IPKS {
        let ipk = packages_dir().join(format!("derpd_{version}_{arch}.ipk"));
        require_package(&ipk);
        let what = ipk.file_name().unwrap().to_string_lossy().into_owned();
        check_gzip(&read(&ipk), &what);
        // The outer archive: a gzip'd tar (not ar) of exactly these three, in this order.
        let outer = tar_listing(&ipk);
        let names: Vec<&str> = outer.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(
            names,
            ["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
            "{what}"
        );
        let dir = fresh_path("ipk", arch);
        std::fs::create_dir_all(dir.join("control")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        run(
            "tar",
            &["-xzf", ipk.to_str().unwrap(), "-C", dir.to_str().unwrap()],
        );
        assert_eq!(read(&dir.join("debian-binary")), b"2.0\n", "{what}");
        for inner in ["data.tar.gz", "control.tar.gz"] {
            check_gzip(&read(&dir.join(inner)), &format!("{what}/{inner}"));
        }
        let data = tar_listing(&dir.join("data.tar.gz"));
        let want = root_owned(&[
            ("drwxr-xr-x", "./"),
            ("drwxr-xr-x", "./etc/"),
            ("drwxr-xr-x", "./etc/capabilities/"),
            ("-rw-------", "./etc/capabilities/derpd.json"),
            ("drwxr-xr-x", "./etc/config/"),
            ("-rw-------", "./etc/config/derpd"),
            ("drwxr-xr-x", "./etc/init.d/"),
            ("-rwxr-xr-x", "./etc/init.d/derpd"),
            ("drwxr-xr-x", "./lib/"),
            ("drwxr-xr-x", "./lib/upgrade/"),
            ("drwxr-xr-x", "./lib/upgrade/keep.d/"),
            ("-rw-r--r--", "./lib/upgrade/keep.d/derpd"),
            ("drwxr-xr-x", "./usr/"),
            ("drwxr-xr-x", "./usr/sbin/"),
            ("-rwxr-xr-x", "./usr/sbin/derpd"),
        ]);
        assert_eq!(data, want, "{what}: data.tar.gz");
        let control = tar_listing(&dir.join("control.tar.gz"));
        let want = root_owned(&[
            ("drwxr-xr-x", "./"),
            ("-rw-r--r--", "./conffiles"),
            ("-rw-r--r--", "./control"),
            ("-rwxr-xr-x", "./postinst"),
            ("-rwxr-xr-x", "./prerm"),
        ]);
        assert_eq!(control, want, "{what}: control.tar.gz");
        let (d, c) = (dir.join("data"), dir.join("control"));
        untar(&dir.join("data.tar.gz"), &d);
        untar(&dir.join("control.tar.gz"), &c);

        let text = String::from_utf8(read(&c.join("control"))).unwrap();
        let fields = control_fields(&text);
        // package-pack.mk's order of the fields.
        let order = [
            "Package",
            "Version",
            "Source",
            "SourceName",
            "License",
            "LicenseFiles",
            "Section",
            "Require-User",
            "SourceDateEpoch",
            "Maintainer",
            "Architecture",
            "Installed-Size",
            "Description",
        ];
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, order, "{what}: control fields");
        assert_eq!(field(&fields, "Package"), "derpd");
        assert_eq!(field(&fields, "Version"), version);
        assert_eq!(field(&fields, "Architecture"), arch);
        // No Depends: an offline router without procd-ujail must be able to install it (opkg
        // drops a package with an unresolved dependency even with --force-depends); the init
        // script runs derpd without ujail and says so in the log.
        opkg_reads_as_written(&text, &what);
        assert_eq!(field(&fields, "License"), makefile_var("PKG_LICENSE"));
        assert_eq!(field(&fields, "Section"), makefile_var("SECTION"));
        assert_eq!(field(&fields, "Require-User"), makefile_var("USERID"));
        assert_eq!(field(&fields, "Maintainer"), makefile_var("PKG_MAINTAINER"));
        // ipkg-build: the size of the uncompressed data tar.
        let unpacked = run(
            "sh",
            &[
                "-c",
                &format!("zcat < '{}' | wc -c", dir.join("data.tar.gz").display()),
            ],
        );
        assert_eq!(field(&fields, "Installed-Size"), unpacked.trim(), "{what}");
        assert!(
            text.contains("Description:  A small, wire-compatible"),
            "{what}: {text}"
        );

        assert_eq!(read(&c.join("conffiles")), b"/etc/config/derpd\n", "{what}");
        // opkg records each conffile's hash at install, and on an upgrade keeps the user's
        // edited file and puts the new one beside it as <name>-opkg: each entry must be a
        // regular file of the package.
        for conf in String::from_utf8(read(&c.join("conffiles")))
            .unwrap()
            .lines()
        {
            let rel = conf.strip_prefix('/').expect("absolute conffile");
            let meta = std::fs::symlink_metadata(d.join(rel)).unwrap();
            assert!(
                meta.is_file(),
                "{what}: conffile {conf} is not a regular file"
            );
        }
        assert_eq!(
            read(&d.join("lib/upgrade/keep.d/derpd")),
            b"/etc/derpd/\n",
            "{what}"
        );
        assert_eq!(
            String::from_utf8(read(&c.join("postinst"))).unwrap(),
            "#!/bin/sh\n[ \"${IPKG_NO_SCRIPT}\" = \"1\" ] && exit 0\n\
             [ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
             . ${IPKG_INSTROOT}/lib/functions.sh\ndefault_postinst $0 $@\n"
        );
        assert_eq!(
            String::from_utf8(read(&c.join("prerm"))).unwrap(),
            "#!/bin/sh\n[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
             . ${IPKG_INSTROOT}/lib/functions.sh\ndefault_prerm $0 $@\n"
        );
        same_as_repo(
            &d,
            &[
                ("etc/init.d/derpd", "openwrt/files/derpd.init"),
                ("etc/config/derpd", "openwrt/files/derpd.config"),
                ("etc/capabilities/derpd.json", "openwrt/files/derpd.json"),
            ],
            &what,
        );
        check_elf(
            &read(&d.join("usr/sbin/derpd")),
            elf,
            &format!("{what}: /usr/sbin/derpd"),
        );
    }
}

/// `scripts/stage-luci-app.sh --list`: (mode, installed path) of luci-app-derpd's files.
fn luci_app_files() -> Vec<(String, String)> {
    run(
        "bash",
        &[
            repo("scripts/stage-luci-app.sh").to_str().unwrap(),
            "--list",
        ],
    )
    .lines()
    .map(|l| {
        let (mode, path) = l.split_once(' ').unwrap();
        (mode.to_string(), path.to_string())
    })
    .collect()
}

/// A `define Package/<what>` body of openwrt/Makefile, as the SDK writes it (make's `$$` is
/// `$`).
fn makefile_body(what: &str) -> String {
    format!("{}\n", makefile_define(what).join("\n").replace("$$", "$"))
}

#[test]
#[ignore = "needs the packages: scripts/build-packages.sh runs it"]
fn luci_ipk_structure() {
    let version = format!("{}-r{}", cargo_version(), makefile_var("PKG_RELEASE"));
    let ipk = packages_dir().join(format!("luci-app-derpd_{version}_all.ipk"));
    require_package(&ipk);
    let what = "luci-app-derpd .ipk";
    check_gzip(&read(&ipk), what);
    let dir = fresh_path("luci-ipk", "all");
    std::fs::create_dir_all(dir.join("control")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    run(
        "tar",
        &["-xzf", ipk.to_str().unwrap(), "-C", dir.to_str().unwrap()],
    );
    let (d, c) = (dir.join("data"), dir.join("control"));
    untar(&dir.join("data.tar.gz"), &d);
    untar(&dir.join("control.tar.gz"), &c);
    // Every file of stage-luci-app.sh with its mode, root-owned, and nothing else.
    let files: Vec<(String, String)> = tar_listing(&dir.join("data.tar.gz"))
        .into_iter()
        .filter(|(mode, owner, _)| !mode.starts_with('d') && owner == "0/0")
        .map(|(mode, _, name)| (mode, name[1..].to_string()))
        .collect();
    let want: Vec<(String, String)> = luci_app_files()
        .into_iter()
        .map(|(mode, path)| {
            let m = if mode == "0755" {
                "-rwxr-xr-x"
            } else {
                "-rw-r--r--"
            };
            (m.to_string(), path)
        })
        .collect();
    assert_eq!(files, want, "{what}: data.tar.gz");
    for (_, path) in &want {
        let source = if let Some(rest) = path.strip_prefix("/www/") {
            format!("openwrt/luci-app-derpd/htdocs/{rest}")
        } else {
            format!("openwrt/luci-app-derpd/root{path}")
        };
        assert_eq!(
            read(&d.join(&path[1..])),
            read(&repo(&source)),
            "{what}: {path}"
        );
    }
    let control = tar_listing(&dir.join("control.tar.gz"));
    let names: Vec<&str> = control.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(
        names,
        [
            "./",
            "./control",
            "./postinst",
            "./postinst-pkg",
            "./postrm",
            "./prerm"
        ],
        "{what}"
    );
    let text = String::from_utf8(read(&c.join("control"))).unwrap();
    let fields = control_fields(&text);
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "Package",
            "Version",
            "Depends",
            "Source",
            "SourceName",
            "License",
            "LicenseFiles",
            "Section",
            "SourceDateEpoch",
            "Maintainer",
            "Architecture",
            "Installed-Size",
            "Description"
        ],
        "{what}"
    );
    opkg_reads_as_written(&text, what);
    assert_eq!(field(&fields, "Package"), "luci-app-derpd");
    assert_eq!(field(&fields, "Version"), version);
    assert_eq!(field(&fields, "Architecture"), "all");
    assert_eq!(field(&fields, "Section"), "luci");
    assert_eq!(field(&fields, "Depends"), "libc, derpd, luci-base");
    // The package's own scripts are the Makefile's, stored as package-pack.mk stores them.
    assert_eq!(
        String::from_utf8(read(&c.join("postinst-pkg"))).unwrap(),
        makefile_body("luci-app-derpd/postinst")
    );
    assert_eq!(
        String::from_utf8(read(&c.join("postrm"))).unwrap(),
        makefile_body("luci-app-derpd/postrm")
    );
}
