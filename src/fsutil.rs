//! Crash-safe writes for the few files derpd makes itself (the key file `-c`, the self-signed
//! certificate and its key, the ACME account key): after a power cut each such file is either
//! absent, its old contents, or complete, never empty or half-written.
//!
//! Routers lose power. A plain create-and-write can leave a zero-length file behind (the name
//! reaches the disk before the data, as with ext4's delayed allocation), so each file is
//! written under a temporary name in the same directory, flushed (`fsync`), renamed over the
//! final name (atomic on POSIX), and then the directory is flushed so the rename itself lasts.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Temporary files are `.<name>.derpd-tmp.<pid>` beside `<name>`.
const TMP_MARK: &str = ".derpd-tmp.";

/// Writes `data` to `path` so that a crash at any moment leaves either the old file (or none)
/// or the whole new one. The temporary file is created with `mode` (less the umask) from the
/// start, so a key is never readable by others, not even briefly, and with `O_EXCL`, so it
/// never writes through a file or symlink someone else put there. The directory must exist.
pub(crate) fn write_file_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let tmp = temp_path(path, std::process::id())?;
    let mut f = match create_new(&tmp, mode) {
        // Left by a crashed derpd that had our process id (after a reboot).
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)?;
            create_new(&tmp, mode)?
        }
        r => r?,
    };
    let written = f.write_all(data).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// `fs::create_dir_all` with `mode` for the directories it makes, each made durable by flushing
/// its parent, so a power cut cannot take away a directory that files were just written into.
pub(crate) fn create_dir_all_durably(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(up) = dir.parent() {
        create_dir_all_durably(up, mode)?;
    }
    match DirBuilder::new().mode(mode).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        r => r?,
    }
    sync_dir(parent(dir))
}

/// Removes `path` (a missing file is fine) and makes the removal last across a power cut.
pub(crate) fn remove_file_durably(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dir(parent(path))
}

/// Removes temporary files that [`write_file_atomic`] left beside `path` when derpd stopped
/// mid-write (power cut, kill). Returns how many it removed; errors are ignored, as such a file
/// is only clutter (it never has a name derpd reads).
pub(crate) fn remove_temp_files(path: &Path) -> usize {
    let Some(prefix) = temp_prefix(path) else {
        return 0;
    };
    let Ok(entries) = fs::read_dir(parent(path)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_ours = name.as_bytes().starts_with(prefix.as_bytes())
            && entry.file_type().is_ok_and(|t| t.is_file());
        if is_ours && fs::remove_file(entry.path()).is_ok() {
            log::info!(
                "removed {}, left by an interrupted write",
                entry.path().display()
            );
            removed += 1;
        }
    }
    removed
}

/// `fsync` on a directory, which makes renames and removals in it durable. A filesystem that
/// cannot sync directories (EINVAL) has nothing more to offer, so that is not an error.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<name>.derpd-tmp.`
fn temp_prefix(path: &Path) -> Option<OsString> {
    let mut prefix = OsString::from(".");
    prefix.push(path.file_name()?);
    prefix.push(TMP_MARK);
    Some(prefix)
}

fn temp_path(path: &Path, pid: u32) -> io::Result<PathBuf> {
    let mut name = temp_prefix(path).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    name.push(pid.to_string());
    Ok(parent(path).join(name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_dir() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "derpd-fsutil-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_replaces_and_leaves_no_temp_file() {
        let dir = temp_dir();
        let key = dir.join("a.key");
        write_file_atomic(&key, b"first", 0o600).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"first");
        assert_eq!(mode(&key), 0o600);
        write_file_atomic(&key, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"second");
        assert_eq!(mode(&key), 0o600);
        let crt = dir.join("a.crt");
        write_file_atomic(&crt, b"cert", 0o644).unwrap();
        assert_eq!(mode(&crt) & 0o600, 0o600);
        assert_eq!(mode(&crt) & 0o022, 0, "never group/world writable");
        assert_eq!(names(&dir), ["a.crt", "a.key"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn creates_missing_directories_with_the_mode() {
        let dir = temp_dir();
        let deep = dir.join("a").join("b");
        create_dir_all_durably(&deep, 0o700).unwrap();
        assert_eq!(mode(&dir.join("a")), 0o700);
        assert_eq!(mode(&deep), 0o700);
        create_dir_all_durably(&deep, 0o755).unwrap();
        assert_eq!(mode(&deep), 0o700, "an existing directory is left alone");
        create_dir_all_durably(Path::new(""), 0o700).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replaces_a_symlink_instead_of_writing_through_it() {
        let dir = temp_dir();
        let victim = dir.join("victim");
        fs::write(&victim, "untouched").unwrap();
        let link = dir.join("derper.key");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        write_file_atomic(&link, b"key", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert!(!fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(fs::read(&link).unwrap(), b"key");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temp_files_are_replaced_and_cleaned() {
        let dir = temp_dir();
        let key = dir.join("derper.key");
        // A crashed derpd with our pid left its temp file: the next write still works.
        let ours = temp_path(&key, std::process::id()).unwrap();
        fs::write(&ours, "half").unwrap();
        write_file_atomic(&key, b"whole", 0o600).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"whole");
        assert_eq!(names(&dir), ["derper.key"]);
        // Others' leftovers are removed by the start-up clean-up; unrelated files stay.
        fs::write(temp_path(&key, 1).unwrap(), "half").unwrap();
        fs::write(temp_path(&key, 77).unwrap(), "").unwrap();
        fs::write(dir.join(".other.key.derpd-tmp.5"), "").unwrap();
        fs::write(dir.join("derper.key.bak"), "").unwrap();
        assert_eq!(remove_temp_files(&key), 2);
        assert_eq!(
            names(&dir),
            [".other.key.derpd-tmp.5", "derper.key", "derper.key.bak"]
        );
        assert_eq!(remove_temp_files(&key), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_write_keeps_the_old_file_and_leaves_no_temp_file() {
        let dir = temp_dir();
        // Renaming a file over a directory fails: the temp file must go.
        let target = dir.join("sub");
        fs::create_dir_all(target.join("x")).unwrap();
        assert!(write_file_atomic(&target, b"data", 0o600).is_err());
        assert_eq!(names(&dir), ["sub"]);
        // A write that fails before the rename leaves the old file as it was.
        let f = dir.join("f");
        fs::write(&f, "x").unwrap();
        let blocker = temp_path(&f, std::process::id()).unwrap();
        fs::create_dir(&blocker).unwrap();
        assert!(write_file_atomic(&f, b"new", 0o600).is_err());
        assert_eq!(fs::read(&f).unwrap(), b"x");
        fs::remove_dir(&blocker).unwrap();
        remove_file_durably(&f).unwrap();
        remove_file_durably(&f).unwrap();
        assert_eq!(names(&dir), ["sub"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
