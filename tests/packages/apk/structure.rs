//! The built packages: every `.apk` against the repository and the `.ipk` of its architecture.

use super::reader::*;
use super::*;

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
