//! Curve25519 node keys as DERP uses them: raw 32 bytes on the wire, `nodekey:`/`privkey:` hex
//! in text, and derper's JSON key file (`-c`).

use std::fmt;
use std::path::Path;

use crypto_box::aead::OsRng;

/// Length of a Curve25519 key on the wire.
pub const KEY_LEN: usize = 32;

/// A node's public key (the DERP address of a client, or the server's identity).
#[derive(Clone, Copy, Eq, PartialOrd, Ord)]
pub struct NodePublic(pub [u8; KEY_LEN]);

/// Keys compare word by word. The derived comparison calls the C library's `memcmp` (at
/// opt-level "z" LLVM does not expand it), a byte loop in musl, the C library of every
/// package: several times per relayed packet (routes, queues, the writer's source check),
/// that was 3.5 % of a relayed packet's instructions.
impl PartialEq for NodePublic {
    fn eq(&self, other: &Self) -> bool {
        let word = |k: &[u8; KEY_LEN], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&k[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        (0..KEY_LEN / 8).fold(0, |d, i| d | (word(&self.0, i) ^ word(&other.0, i))) == 0
    }
}

/// The bytes, as the derived hash would: equal keys hash alike.
impl std::hash::Hash for NodePublic {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl NodePublic {
    /// True for the all-zero key, which no real node has and which derper's box code panics on.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
    }

    /// 64 lowercase hex digits, no prefix (meta-cert CN, `Derp-Public-Key` header).
    pub fn untyped_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses `nodekey:<64 hex>`.
    pub fn parse(s: &str) -> Option<Self> {
        parse_hex32(s.strip_prefix("nodekey:")?).map(Self)
    }

    /// Tailscale's `ShortString`: `[` + the first five base64 characters + `]`, used in logs.
    pub fn short(&self) -> String {
        const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let b = &self.0;
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let mut s = String::with_capacity(7);
        s.push('[');
        for i in 0..4 {
            s.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
        }
        s.push(char::from(B64[usize::from(b[3] >> 2)]));
        s.push(']');
        s
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nodekey:{}", hex(&self.0))
    }
}

impl fmt::Debug for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// The server's private key. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct NodePrivate(crypto_box::SecretKey);

impl NodePrivate {
    /// A fresh random key (dev mode, and the first start with no key file).
    pub fn generate() -> Self {
        Self(crypto_box::SecretKey::generate(&mut OsRng))
    }

    /// The key from its 32 raw bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(crypto_box::SecretKey::from_bytes(b))
    }

    /// The matching public key.
    pub fn public(&self) -> NodePublic {
        NodePublic(*self.0.public_key().as_bytes())
    }

    /// The crypto_box secret, for sealing and opening login messages.
    pub(crate) fn secret(&self) -> &crypto_box::SecretKey {
        &self.0
    }

    /// `privkey:<64 hex>`, as in derper's key file.
    pub fn to_text(&self) -> String {
        format!("privkey:{}", hex(&self.0.to_bytes()))
    }

    /// Parses `privkey:<64 hex>`.
    pub fn parse(s: &str) -> Option<Self> {
        parse_hex32(s.strip_prefix("privkey:")?).map(Self::from_bytes)
    }
}

impl fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePrivate({:?})", self.public())
    }
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

/// Parses exactly 64 hex digits (either case) into 32 bytes.
pub fn parse_hex32(s: &str) -> Option<[u8; KEY_LEN]> {
    let s = s.as_bytes();
    if s.len() != 2 * KEY_LEN {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Why the key file could not be used.
#[derive(Debug)]
pub enum KeyFileError {
    /// Reading or creating the file failed.
    Io(std::path::PathBuf, std::io::Error),
    /// The file is not `{"PrivateKey":"privkey:<hex>"}`.
    Invalid(std::path::PathBuf, String),
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(p, e) => write!(f, "key file {}: {e}", p.display()),
            Self::Invalid(p, why) => write!(
                f,
                "key file {}: {why} (expected {{\"PrivateKey\":\"privkey:<64 hex>\"}}); derpd \
                 does not replace a key file it cannot read, since it may hold the server's key: \
                 repair it, or move it away to have a new key made",
                p.display()
            ),
        }
    }
}

impl std::error::Error for KeyFileError {}

/// Loads derper's JSON key file, or creates it (mode 0600) with a fresh key when it is missing.
/// Returns the key and whether it was created.
///
/// A file with nothing in it (zero bytes, or only NUL bytes) holds no key: it is what a power
/// cut leaves when it comes just after a file was first written without fsync (as derpd did
/// before its writes were crash-safe). Refusing to start would make every respawn fail, so derpd warns
/// that the old key is lost and makes a new one. Any other file that does not parse is refused:
/// it may be a real key that a person can repair.
pub fn load_or_create_key_file(path: &Path) -> Result<(NodePrivate, bool), KeyFileError> {
    crate::fsutil::remove_temp_files(path);
    match std::fs::read(path) {
        Ok(bytes) if bytes.iter().all(|&b| b == 0) => {
            log::warn!(
                "key file {} is empty ({} bytes, no key): the server's previous key was lost, \
                 most likely in a power cut just after it was written; making a new key (clients \
                 simply see a new server key when they reconnect)",
                path.display(),
                bytes.len()
            );
            Ok((create_key_file(path)?, true))
        }
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| KeyFileError::Invalid(path.into(), e.to_string()))?;
            let text = v
                .get("PrivateKey")
                .and_then(|k| k.as_str())
                .ok_or_else(|| KeyFileError::Invalid(path.into(), "no PrivateKey".into()))?;
            let key = NodePrivate::parse(text)
                .ok_or_else(|| KeyFileError::Invalid(path.into(), "bad PrivateKey".into()))?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((create_key_file(path)?, true)),
        Err(e) => Err(KeyFileError::Io(path.into(), e)),
    }
}

/// Writes a fresh key to `path` (0600, crash-safe), replacing what is there.
fn create_key_file(path: &Path) -> Result<NodePrivate, KeyFileError> {
    let key = NodePrivate::generate();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsutil::create_dir_all_durably(dir, 0o777)
            .map_err(|e| KeyFileError::Io(dir.into(), e))?;
    }
    // derper writes the same tab-indented JSON.
    let body = format!("{{\n\t\"PrivateKey\": \"{}\"\n}}", key.to_text());
    crate::fsutil::write_file_atomic(path, body.as_bytes(), 0o600)
        .map_err(|e| KeyFileError::Io(path.into(), e))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn text_round_trip() {
        let k = NodePrivate::generate();
        let p = NodePrivate::parse(&k.to_text()).unwrap();
        assert_eq!(p.public(), k.public());
        let pubk = k.public();
        assert_eq!(NodePublic::parse(&pubk.to_string()), Some(pubk));
        assert_eq!(pubk.untyped_hex().len(), 64);
        assert!(NodePublic::parse("nodekey:abc").is_none());
        assert!(NodePublic::parse(&"0".repeat(64)).is_none());
    }

    /// The word-by-word comparison sees every byte, and agrees with the bytes' own.
    #[test]
    fn keys_equal_only_when_every_byte_is() {
        let a = NodePrivate::generate().public();
        assert_eq!(a, NodePublic(a.0));
        for i in 0..KEY_LEN {
            for bit in [0x01, 0x80] {
                let mut b = a;
                b.0[i] ^= bit;
                assert_ne!(a, b, "byte {i} bit {bit:#x}");
                assert_eq!(a == b, a.0 == b.0);
                assert_eq!(a.cmp(&b) == std::cmp::Ordering::Equal, a == b);
            }
        }
    }

    #[test]
    fn short_string_matches_base64() {
        // base64 of ff ff ff fc.. starts with "////", then 0xfc>>2 = 63 -> '/'.
        let k = NodePublic(
            [0xff, 0xff, 0xff, 0xfc]
                .into_iter()
                .chain([0; 28])
                .collect::<Vec<_>>()[..]
                .try_into()
                .unwrap(),
        );
        assert_eq!(k.short(), "[/////]");
        assert_eq!(NodePublic([0; 32]).short(), "[AAAAA]");
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("derpd-keytest-{}", std::process::id()));
        let path = dir.join("sub/derper.key");
        let (k1, created) = load_or_create_key_file(&path).unwrap();
        assert!(created);
        let (k2, created) = load_or_create_key_file(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.public(), k2.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "{\"PrivateKey\":\"nope\"}").unwrap();
        assert!(load_or_create_key_file(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// What a power cut right after the first start leaves: a zero-length file (or one of NUL
    /// bytes). derpd makes a new key and the file then holds it.
    #[test]
    fn empty_key_file_gets_a_new_key() {
        let dir = std::env::temp_dir().join(format!("derpd-keytest-empty-{}", std::process::id()));
        let path = dir.join("derper.key");
        for lost in [&b""[..], &[0u8; 64][..]] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, lost).unwrap();
            let (k, created) = load_or_create_key_file(&path).unwrap();
            assert!(created);
            let (again, created) = load_or_create_key_file(&path).unwrap();
            assert!(!created, "the new key was written");
            assert_eq!(again.public(), k.public());
            #[cfg(unix)]
            assert_eq!(mode(&path), 0o600);
            let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
            assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// A file with anything else in it may be a real key: refused, never replaced.
    #[test]
    fn unreadable_key_file_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("derpd-keytest-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("derper.key");
        for bad in ["{\"PrivateKey\": \"privkey:12", "\n", "garbage"] {
            std::fs::write(&path, bad).unwrap();
            let err = load_or_create_key_file(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::Invalid(..)), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("derper.key"), "{msg}");
            assert!(msg.contains("does not replace"), "{msg}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
