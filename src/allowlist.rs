//! `--allow-keys-file`: the keys that may log in, re-read when the file changes.
//!
//! The list is re-read by [`AllowList::reload`] (SIGHUP, to be called off the executor) and,
//! without a background task, when a check finds the file changed (at most one `stat` per
//! `recheck`, normally [`RECHECK_INTERVAL`]); checks do that file I/O on smol's blocking
//! threads, never on an executor thread. A file with a recent or future modification time (a
//! router without a clock) is read once more [`RACY_WINDOW`] later and then trusted until its
//! stamp changes. A file that does not parse at start-up is a start-up error; later, it is
//! logged and the previous list is kept.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use portable_atomic::AtomicU64;

use crate::key::NodePublic;
use crate::sync::lock;

/// How often (at most) a check looks at the allow-keys file for changes.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The largest allow-keys file accepted (about 200 000 keys).
const ALLOW_FILE_MAX: u64 = 16 << 20;
/// A file read while its modification time was less than this long ago (or in the future: a
/// router without a clock) is read once more this long after, by the monotonic clock, even if
/// its stamp has not changed: file systems with coarse timestamps (jffs2: 1 s) could otherwise
/// hide a second edit of the same length. After that re-read an unchanged stamp is trusted.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// The allow list of a running server.
#[derive(Debug)]
pub struct AllowList {
    path: PathBuf,
    recheck: Duration,
    /// The keys in force; the lock is held only to clone or replace the `Arc`.
    keys: Mutex<Arc<HashSet<NodePublic>>>,
    /// What the last look at the file saw; held (asynchronously) across a look, so that one
    /// check at a time looks while the others go on with the keys in force.
    watch: smol::lock::Mutex<Watch>,
    /// Reads of the file, for the `derpd_allow_keys_reads` metric.
    reads: AtomicU64,
}

#[derive(Debug)]
struct Watch {
    /// The stamp of the file the keys came from (or of the file that failed to parse); `None`
    /// forces a read at the next look.
    stamp: Option<Stamp>,
    /// `Some(t)`: the stamp was too recent to trust when read; read once more at or after `t`
    /// even if it has not changed (see [`RACY_WINDOW`]).
    recheck_at: Option<Instant>,
    looked: Instant,
    /// The file could not be opened at the last look (logged once).
    missing: bool,
}

impl Watch {
    /// Whether a file with stamp `now_stamp` must be read.
    fn must_read(&self, now_stamp: Stamp, now: Instant) -> bool {
        self.stamp != Some(now_stamp) || self.recheck_at.is_some_and(|t| now >= t)
    }

    /// Records the stamp of a file just read (or that failed to parse).
    fn read(&mut self, stamp: Option<Stamp>, now: Instant) {
        // The same stamp read again after the racy window: nothing can hide behind it now.
        let confirmed =
            stamp.is_some() && self.stamp == stamp && self.recheck_at.is_some_and(|t| now >= t);
        self.recheck_at = match stamp {
            Some(s) if !confirmed && !s.old_enough() => Some(now + RACY_WINDOW),
            _ => None,
        };
        self.stamp = stamp;
    }
}

/// What tells that a file changed: device, inode, length, modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Modified at least [`RACY_WINDOW`] ago by the wall clock (never, for a time in the future).
    fn old_enough(&self) -> bool {
        let Ok(secs) = u64::try_from(self.mtime.0) else {
            return true;
        };
        let nanos = u32::try_from(self.mtime.1).unwrap_or(0);
        let mtime = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        SystemTime::now()
            .duration_since(mtime)
            .is_ok_and(|age| age >= RACY_WINDOW)
    }
}

/// What a look at the allow-keys file found (made on a blocking thread).
enum Looked {
    Unchanged,
    Missing(String),
    Read(Read),
}

/// A read of the allow-keys file: the keys or why not, and the file's stamp.
struct Read {
    keys: Result<HashSet<NodePublic>, String>,
    stamp: Option<Stamp>,
    /// The keys differ from `current`'s (compared here, off the executor).
    changed: bool,
}

fn read_file(path: &Path, current: &HashSet<NodePublic>) -> Read {
    match read_keys(path) {
        Ok((keys, stamp)) => Read {
            changed: keys != *current,
            keys: Ok(keys),
            stamp,
        },
        Err(e) => Read {
            changed: false,
            keys: Err(e),
            // Not read again until it changes (or once after an edit too recent to trust).
            stamp: std::fs::metadata(path).ok().map(|m| Stamp::of(&m)),
        },
    }
}

impl AllowList {
    /// Reads the file at start-up; `recheck` is the least time between two looks at it.
    pub fn load(path: PathBuf, recheck: Duration) -> Result<Self, String> {
        let (keys, stamp) =
            read_keys(&path).map_err(|e| format!("allow-keys file {}: {e}", path.display()))?;
        info!("allow-keys file {}: {} keys", path.display(), keys.len());
        let now = Instant::now();
        let mut watch = Watch {
            stamp: None,
            recheck_at: None,
            looked: now,
            missing: false,
        };
        watch.read(stamp, now);
        Ok(Self {
            path,
            recheck,
            keys: Mutex::new(Arc::new(keys)),
            watch: smol::lock::Mutex::new(watch),
            reads: AtomicU64::new(1),
        })
    }

    /// Whether `key` is in the list (after a look at the file, if one is due).
    pub async fn check(&self, key: &NodePublic) -> Result<(), String> {
        // One check looks at a time; the others use the keys in force meanwhile.
        if let Some(mut w) = self.watch.try_lock() {
            let now = Instant::now();
            if now.saturating_duration_since(w.looked) >= self.recheck {
                w.looked = now;
                self.look(&mut w).await;
            }
        }
        let keys = lock(&self.keys).clone();
        if keys.contains(key) {
            Ok(())
        } else {
            Err(format!(
                "peer {key} not authorized (not in allow-keys file {})",
                self.path.display()
            ))
        }
    }

    /// Re-reads the file if its stamp changed: `stat` and read on a blocking thread.
    async fn look(&self, w: &mut Watch) {
        let path = self.path.clone();
        let (stamp, recheck_at) = (w.stamp, w.recheck_at);
        let current = lock(&self.keys).clone();
        let looked = smol::unblock(move || {
            let probe = Watch {
                stamp,
                recheck_at,
                looked: Instant::now(),
                missing: false,
            };
            match std::fs::metadata(&path) {
                Ok(m) if !probe.must_read(Stamp::of(&m), Instant::now()) => Looked::Unchanged,
                Ok(_) => Looked::Read(read_file(&path, &current)),
                Err(e) => Looked::Missing(e.to_string()),
            }
        })
        .await;
        match looked {
            Looked::Unchanged => w.missing = false,
            Looked::Missing(e) => {
                if !w.missing {
                    w.missing = true;
                    warn!(
                        "allow-keys file {}: {e}; keeping the previous {} keys",
                        self.path.display(),
                        lock(&self.keys).len()
                    );
                }
            }
            Looked::Read(r) => {
                w.missing = false;
                self.apply(w, r, false);
            }
        }
    }

    /// Reads of the file so far (start-up, SIGHUP, changes seen).
    pub fn reads(&self) -> u64 {
        self.reads.load(Relaxed)
    }

    /// Re-reads the file now (SIGHUP). Blocking file I/O: call it off the executor.
    pub fn reload(&self) {
        let mut w = self.watch.lock_blocking();
        w.looked = Instant::now();
        let current = lock(&self.keys).clone();
        let r = read_file(&self.path, &current);
        self.apply(&mut w, r, true);
    }

    fn apply(&self, w: &mut Watch, r: Read, always_log: bool) {
        self.reads.fetch_add(1, Relaxed);
        w.read(r.stamp, Instant::now());
        match r.keys {
            Ok(keys) => {
                if always_log || r.changed {
                    info!(
                        "allow-keys file {}: {} keys",
                        self.path.display(),
                        keys.len()
                    );
                }
                let old = std::mem::replace(&mut *lock(&self.keys), Arc::new(keys));
                // Freed outside the lock.
                drop(old);
            }
            Err(e) => warn!(
                "allow-keys file {}: {e}; keeping the previous {} keys",
                self.path.display(),
                lock(&self.keys).len()
            ),
        }
    }
}

/// Reads and parses the file; the stamp is of the file that was read.
fn read_keys(path: &Path) -> Result<(HashSet<NodePublic>, Option<Stamp>), String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let stamp = f.metadata().ok().map(|m| Stamp::of(&m));
    let mut text = Vec::new();
    f.take(ALLOW_FILE_MAX + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > ALLOW_FILE_MAX {
        return Err(format!("larger than {ALLOW_FILE_MAX} bytes"));
    }
    Ok((parse_keys(&text)?, stamp))
}

/// One `nodekey:<64 hex>` per line; `#` starts a comment; blank lines are ignored.
fn parse_keys(text: &[u8]) -> Result<HashSet<NodePublic>, String> {
    let mut keys = HashSet::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.split(|&b| b == b'#').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let word = line.trim();
        if word.is_empty() {
            continue;
        }
        let key = NodePublic::parse(word)
            .ok_or_else(|| format!("line {}: want nodekey:<64 hex digits>, got {word:?}", i + 1))?;
        keys.insert(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    #[test]
    fn allow_keys_format() {
        let text = format!(
            "# derpd allow list\n\n  nodekey:{}  # laptop\r\nnodekey:{}\n\t\n#nodekey:{}\n",
            "01".repeat(32),
            "AB".repeat(32),
            "02".repeat(32)
        );
        let keys = parse_keys(text.as_bytes()).unwrap();
        assert_eq!(keys, HashSet::from([key(1), key(0xab)]));
        assert!(parse_keys(b"").unwrap().is_empty());
        let e = parse_keys(format!("nodekey:{}\n\nnodekey:123\n", "01".repeat(32)).as_bytes())
            .unwrap_err();
        assert!(e.starts_with("line 3: "), "{e}");
        let e = parse_keys(
            format!("nodekey:{} nodekey:{}", "01".repeat(32), "02".repeat(32)).as_bytes(),
        )
        .unwrap_err();
        assert!(e.starts_with("line 1: "), "{e}");
        let e = parse_keys(format!("{}\n", "01".repeat(32)).as_bytes()).unwrap_err();
        assert!(e.starts_with("line 1: "), "{e}");
        let e = parse_keys(b"\n\xff\n").unwrap_err();
        assert!(e.starts_with("line 2: "), "{e}");
    }

    #[test]
    fn racy_stamps_are_read_once_more() {
        let now = Instant::now();
        let stamp = |secs: i64| Stamp {
            dev: 1,
            ino: 2,
            len: 3,
            mtime: (secs, 0),
            ctime: (secs, 0),
        };
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut w = Watch {
            stamp: None,
            recheck_at: None,
            looked: now,
            missing: false,
        };
        // Old: trusted at once.
        w.read(Some(stamp(wall - 60)), now);
        assert!(!w.must_read(stamp(wall - 60), now));
        assert!(w.must_read(stamp(wall - 59), now));
        // In the future: read once more after the racy window, then trusted.
        let future = stamp(wall + 3600);
        w.read(Some(future), now);
        assert!(!w.must_read(future, now + RACY_WINDOW - Duration::from_millis(1)));
        assert!(w.must_read(future, now + RACY_WINDOW));
        w.read(Some(future), now + RACY_WINDOW);
        assert!(!w.must_read(future, now + RACY_WINDOW * 100));
        // No stamp: read at every look.
        w.read(None, now);
        assert!(w.must_read(future, now));
    }
}
