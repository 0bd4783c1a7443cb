//! The TLS record layer (TLS 1.3, RFC 8446 section 5; and TLS 1.2's AEAD records, RFC 5288
//! and RFC 7905) in place, for the traffic after a handshake that rustls ran: one
//! [`RecordKey`] per direction, from the keys rustls hands over
//! ([`rustls::ConnectionTrafficSecrets`], via its kernel-connection API, which also derives the
//! keys of a KeyUpdate). rustls's own record layer builds every record in a new `Vec`, both
//! ways, even in its unbuffered API (0.23); this one seals into the caller's buffer and opens
//! where the record lies, so relayed packets need no allocation and one copy fewer.
//!
//! A TLS 1.3 record: the 5-byte header (opaque type application_data, legacy version 3.3,
//! length), then the AEAD-sealed inner plaintext (content, its real content type, no padding on
//! the way out) and the 16-byte tag. The nonce is the IV XOR the record's sequence number; the
//! header is the additional data. A TLS 1.2 record carries its real type in the header, the
//! additional data is the sequence number, type, version and plaintext length, and AES-GCM
//! sends the nonce's last 8 bytes before the ciphertext (rustls's: the IV XOR the sequence
//! number, as for ChaCha20-Poly1305).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

/// The record header's length.
pub const HEADER_LEN: usize = 5;
/// The AEAD tag's length (all three TLS 1.3 suites rustls offers).
pub const TAG_LEN: usize = 16;
/// The largest plaintext a record carries (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest record body (ciphertext and tag) a peer may send: 2^14 + 256.
pub const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// The most sealing adds to a plaintext: the header, then the content type (TLS 1.3) or the
/// explicit nonce (TLS 1.2 AES-GCM), and the tag.
pub const OVERHEAD: usize = HEADER_LEN + 8 + TAG_LEN;

/// Content types (RFC 8446 section 5.1).
pub const ALERT: u8 = 21;
/// A post-handshake message (KeyUpdate, NewSessionTicket).
pub const HANDSHAKE: u8 = 22;
/// Application data, and the opaque type of every protected record.
pub const APPLICATION_DATA: u8 = 23;

/// What went wrong with a record: the connection ends (RFC 8446 section 5.2: a record that does
/// not open is fatal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// The header is not a protected record's: another opaque type, or a length out of
    /// bounds.
    BadHeader,
    /// The tag does not verify (or the inner plaintext has no content type).
    BadRecord,
    /// A plaintext larger than a record carries.
    TooLarge,
    /// The sequence number would wrap (2^64 records).
    Exhausted,
    /// The key from rustls is not one ring takes.
    BadKey,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BadHeader => "TLS record with a bad header",
            Self::BadRecord => "cannot decrypt peer's message (TLS record)",
            Self::TooLarge => "TLS plaintext larger than a record",
            Self::Exhausted => "TLS sequence numbers exhausted",
            Self::BadKey => "TLS traffic key not usable",
        })
    }
}

impl std::error::Error for RecordError {}

/// The body length a record header announces, if the header is a record's a peer may send
/// after the handshake (an application-data record; under TLS 1.2 also an alert or a
/// handshake message, which the caller refuses) and the length is in bounds.
pub fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, RecordError> {
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let kind_ok = matches!(header[0], ALERT | HANDSHAKE | APPLICATION_DATA);
    // The (legacy) version is 3.3 in every protected record; rustls checks the same.
    if !kind_ok || header[1..3] != [3, 3] || !(TAG_LEN + 1..=MAX_BODY).contains(&len) {
        return Err(RecordError::BadHeader);
    }
    Ok(len)
}

/// How records are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Tls13,
    /// AES-GCM: the nonce's last 8 bytes go before the ciphertext.
    Tls12Gcm,
    Tls12Chacha,
}

/// One direction's protection: the AEAD key and IV of the current traffic secret and the next
/// record's sequence number.
pub struct RecordKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    version: Version,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordKey({:?}, seq {})", self.key.algorithm(), self.seq)
    }
}

impl RecordKey {
    /// The key for `secrets` of a `tls13` connection (else TLS 1.2), whose next record is
    /// number `seq`.
    pub fn new(
        tls13: bool,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::BadKey),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::BadKey)?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::BadKey)?;
        let version = match (tls13, alg == &aead::CHACHA20_POLY1305) {
            (true, _) => Version::Tls13,
            (false, true) => Version::Tls12Chacha,
            (false, false) => Version::Tls12Gcm,
        };
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            version,
        })
    }

    /// Whether the connection is TLS 1.3 (else 1.2).
    pub fn is_tls13(&self) -> bool {
        self.version == Version::Tls13
    }

    /// Records protected with this key so far (from its first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The next record's nonce; the sequence number moves on.
    fn next_nonce(&mut self) -> Result<([u8; NONCE_LEN], u64), RecordError> {
        let seq = self.seq;
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        Ok((nonce, seq))
    }

    /// Bytes between a record's header and its plaintext: AES-GCM's explicit nonce under TLS
    /// 1.2, else none.
    pub fn prefix_len(&self) -> usize {
        if self.version == Version::Tls12Gcm {
            8
        } else {
            0
        }
    }

    /// Seals, where it lies, the record whose plaintext (content type `kind`) the caller put in
    /// `buf` at [`HEADER_LEN`] + [`RecordKey::prefix_len`], `plain_len` bytes (at most
    /// [`MAX_PLAINTEXT`]); `buf` has room for at most [`OVERHEAD`] bytes more than that.
    /// Returns the record's length.
    pub fn seal_at(
        &mut self,
        kind: u8,
        buf: &mut [u8],
        plain_len: usize,
    ) -> Result<usize, RecordError> {
        if plain_len > MAX_PLAINTEXT {
            return Err(RecordError::TooLarge);
        }
        let prefix = self.prefix_len();
        let (outer, suffix) = match self.version {
            Version::Tls13 => (APPLICATION_DATA, 1),
            _ => (kind, 0),
        };
        let body = prefix + plain_len + suffix + TAG_LEN;
        if buf.len() < HEADER_LEN + body {
            return Err(RecordError::TooLarge);
        }
        let (nonce, seq) = self.next_nonce()?;
        let len = (body as u16).to_be_bytes();
        let header = [outer, 3, 3, len[0], len[1]];
        buf[..HEADER_LEN].copy_from_slice(&header);
        buf[HEADER_LEN..HEADER_LEN + prefix].copy_from_slice(&nonce[NONCE_LEN - prefix..]);
        let start = HEADER_LEN + prefix;
        let aad = match self.version {
            Version::Tls13 => {
                buf[start + plain_len] = kind;
                aad13(header)
            }
            _ => tls12_aad(seq, kind, plain_len),
        };
        let sealed = &mut buf[start..start + plain_len + suffix];
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, sealed)
            .map_err(|_| RecordError::BadRecord)?;
        let end = start + plain_len + suffix;
        buf[end..end + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(HEADER_LEN + body)
    }

    /// Appends to `out` the record carrying `plaintext` (at most [`MAX_PLAINTEXT`] bytes) of
    /// content type `kind`: at most [`OVERHEAD`] bytes more than the plaintext. (The tests'
    /// way; the stream seals in its buffer with [`RecordKey::seal_at`].)
    #[cfg(test)]
    pub fn seal(
        &mut self,
        kind: u8,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(RecordError::TooLarge);
        }
        let start = out.len();
        let at = start + HEADER_LEN + self.prefix_len();
        out.resize(at, 0);
        out.extend_from_slice(plaintext);
        out.resize(start + plaintext.len() + OVERHEAD, 0);
        let n = self.seal_at(kind, &mut out[start..], plaintext.len())?;
        out.truncate(start + n);
        Ok(())
    }

    /// Opens the record in `record` (its header, then the body the header announces) where it
    /// lies: its content type and the range of `record` that holds its content.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), RecordError> {
        let header: [u8; HEADER_LEN] = record
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(RecordError::BadHeader)?;
        let body = body_len(&header)?;
        if body != record.len() - HEADER_LEN {
            return Err(RecordError::BadHeader);
        }
        let (mut nonce, seq) = self.next_nonce()?;
        let (aad, prefix) = match self.version {
            Version::Tls13 if header[0] == APPLICATION_DATA => (aad13(header), 0),
            Version::Tls13 => return Err(RecordError::BadHeader),
            Version::Tls12Gcm => {
                let explicit = record.get(HEADER_LEN..HEADER_LEN + 8);
                let explicit = explicit.ok_or(RecordError::BadRecord)?;
                nonce[NONCE_LEN - 8..].copy_from_slice(explicit);
                let plain = body
                    .checked_sub(8 + TAG_LEN)
                    .ok_or(RecordError::BadRecord)?;
                (tls12_aad(seq, header[0], plain), 8)
            }
            Version::Tls12Chacha => (tls12_aad(seq, header[0], body - TAG_LEN), 0),
        };
        let nonce = Nonce::assume_unique_for_key(nonce);
        let at = HEADER_LEN + prefix;
        let inner = self
            .key
            .open_in_place(nonce, aad, &mut record[at..])
            .map_err(|_| RecordError::BadRecord)?;
        if self.version != Version::Tls13 {
            return Ok((header[0], at..at + inner.len()));
        }
        // The content type is the last non-zero byte; zeros after it are padding.
        let end = inner
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::BadRecord)?;
        Ok((inner[end], at..at + end))
    }
}

/// Additional data: TLS 1.3's (the header) or TLS 1.2's, on the stack.
type RecordAad = Aad<AadBytes>;

/// Up to 13 bytes.
struct AadBytes([u8; 13], usize);

impl AsRef<[u8]> for AadBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

/// TLS 1.3's additional data: the record header.
fn aad13(header: [u8; HEADER_LEN]) -> RecordAad {
    let mut aad = [0; 13];
    aad[..HEADER_LEN].copy_from_slice(&header);
    Aad::from(AadBytes(aad, HEADER_LEN))
}

/// TLS 1.2's additional data: the sequence number, the type, the version, the plaintext's
/// length.
fn tls12_aad(seq: u64, kind: u8, len: usize) -> RecordAad {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8..11].copy_from_slice(&[kind, 3, 3]);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    Aad::from(AadBytes(aad, 13))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::sync::Arc;

    use rustls::kernel::KernelConnection;
    use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
    use rustls::unbuffered::ConnectionState;

    /// A rustls client (the buffered API, as Go's or any client would be) and a server driven
    /// through rustls's unbuffered API to the end of its handshake, then handed to the record
    /// layer: the server's keys and its kernel connection (for KeyUpdates).
    fn connected(
        suite: rustls::SupportedCipherSuite,
    ) -> (
        rustls::ClientConnection,
        RecordKey,
        RecordKey,
        KernelConnection<ServerConnectionData>,
    ) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["derp.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let provider = Arc::new(provider);
        let tls13 = suite.version() == &rustls::version::TLS13;
        let version = [suite.version()];
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&version)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        server.enable_secret_extraction = true;
        server.send_tls13_tickets = 0;
        // Any certificate will do: the test checks the records.
        let any = crate::trust::verifier(crate::trust::Trust::AnyCertificate, &provider).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&version)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(any)
            .with_no_client_auth();
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), "derp.test".try_into().unwrap())
                .unwrap();
        let mut s = UnbufferedServerConnection::new(Arc::new(server)).unwrap();
        let (mut incoming, mut outgoing) = (Vec::new(), Vec::new());
        loop {
            // Client to server.
            while c.wants_write() {
                c.write_tls(&mut incoming).unwrap();
            }
            let st = s.process_tls_records(&mut incoming);
            let discard = st.discard;
            match st.state.unwrap() {
                ConnectionState::EncodeTlsData(mut e) => {
                    let mut buf = vec![0; 16 << 10];
                    let n = e.encode(&mut buf).unwrap();
                    outgoing.extend_from_slice(&buf[..n]);
                }
                ConnectionState::TransmitTlsData(t) => {
                    let mut rd = &outgoing[..];
                    while !rd.is_empty() {
                        c.read_tls(&mut rd).unwrap();
                        c.process_new_packets().unwrap();
                    }
                    outgoing.clear();
                    t.done();
                }
                ConnectionState::BlockedHandshake => {
                    assert!(c.wants_write() || discard > 0 || !incoming.is_empty())
                }
                ConnectionState::WriteTraffic(_) => {
                    incoming.drain(..discard);
                    break;
                }
                other => panic!("unexpected state {other:?}"),
            }
            incoming.drain(..discard);
        }
        assert!(incoming.is_empty() && !c.is_handshaking());
        let (secrets, kernel) = s.dangerous_into_kernel_connection().unwrap();
        let tx = RecordKey::new(tls13, secrets.tx.0, &secrets.tx.1).unwrap();
        let rx = RecordKey::new(tls13, secrets.rx.0, &secrets.rx.1).unwrap();
        (c, tx, rx, kernel)
    }

    /// The records a rustls client sent, one by one.
    fn records(c: &mut rustls::ClientConnection) -> Vec<Vec<u8>> {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut out = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let len = body_len(rest[..HEADER_LEN].try_into().unwrap()).unwrap();
            out.push(rest[..HEADER_LEN + len].to_vec());
            rest = &rest[HEADER_LEN + len..];
        }
        out
    }

    #[test]
    fn records_go_both_ways_with_each_suite() {
        use rustls::crypto::ring::cipher_suite::*;
        for suite in [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut c, mut tx, mut rx, _) = connected(suite);
            // (TLS 1.2's Finished was each direction's record 0.)
            let (tx0, rx0) = (tx.seq(), rx.seq());
            // Client to us: opened in place.
            c.writer().write_all(b"hello, relay").unwrap();
            c.writer().write_all(&[7; 3000]).unwrap();
            let mut got = Vec::new();
            for mut r in records(&mut c) {
                let (kind, range) = rx.open(&mut r).unwrap();
                assert_eq!(kind, APPLICATION_DATA, "{suite:?}");
                got.extend_from_slice(&r[range]);
            }
            assert_eq!(&got[..12], b"hello, relay");
            assert_eq!(got.len(), 12 + 3000);
            // Us to the client: sealed into one buffer, read by rustls.
            let mut wire = Vec::new();
            tx.seal(APPLICATION_DATA, b"hello, node", &mut wire)
                .unwrap();
            tx.seal(APPLICATION_DATA, &[9; MAX_PLAINTEXT], &mut wire)
                .unwrap();
            assert!(wire.len() <= 11 + MAX_PLAINTEXT + 2 * OVERHEAD);
            let mut rd = &wire[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
            let mut plain = vec![0; 11 + MAX_PLAINTEXT];
            c.reader().read_exact(&mut plain).unwrap();
            assert_eq!(&plain[..11], b"hello, node");
            assert!(plain[11..].iter().all(|&b| b == 9));
            assert_eq!((tx.seq() - tx0, rx.seq() - rx0), (2, 2));
        }
    }

    #[test]
    fn a_key_update_gives_the_next_keys() {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let (mut c, _tx, mut rx, mut kernel) = connected(suite);
        c.refresh_traffic_keys().unwrap();
        c.writer().write_all(b"after").unwrap();
        let mut recs = records(&mut c).into_iter();
        // The KeyUpdate: a handshake message (type 24) under the old key.
        let mut r = recs.next().unwrap();
        let (kind, range) = rx.open(&mut r).unwrap();
        assert_eq!((kind, r[range.start]), (HANDSHAKE, 24));
        let (seq, secrets) = kernel.update_rx_secret().unwrap();
        let mut rx = RecordKey::new(true, seq, &secrets).unwrap();
        let mut r = recs.next().unwrap();
        let (kind, range) = rx.open(&mut r).unwrap();
        assert_eq!((kind, &r[range]), (APPLICATION_DATA, &b"after"[..]));
    }

    #[test]
    fn bad_records_do_not_open() {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
        let (mut c, _tx, mut rx, _) = connected(suite);
        c.writer().write_all(b"one").unwrap();
        c.writer().write_all(b"two").unwrap();
        let mut recs = records(&mut c);
        // A flipped bit in the body, a header that lies about the length, another opaque
        // type: none opens, and nothing panics.
        let mut flipped = recs[0].clone();
        flipped[HEADER_LEN + 1] ^= 1;
        assert_eq!(
            rx.clone_for_test().open(&mut flipped),
            Err(RecordError::BadRecord)
        );
        let mut short = recs[0].clone();
        short.pop();
        assert_eq!(
            rx.clone_for_test().open(&mut short),
            Err(RecordError::BadHeader)
        );
        let mut other = recs[0].clone();
        other[0] = HANDSHAKE;
        assert_eq!(
            rx.clone_for_test().open(&mut other),
            Err(RecordError::BadHeader)
        );
        assert_eq!(
            body_len(&[23, 3, 3, 0x48, 0x01]),
            Err(RecordError::BadHeader)
        );
        assert_eq!(body_len(&[23, 3, 3, 0, 16]), Err(RecordError::BadHeader));
        // Out of order: the second record under the first one's nonce does not open.
        // (A record that failed to open is garbage afterwards: ring decrypts before it checks.)
        let mut second = recs.pop().unwrap();
        assert_eq!(
            rx.clone_for_test().open(&mut second.clone()),
            Err(RecordError::BadRecord)
        );
        let (_, range) = rx.open(&mut recs[0]).unwrap();
        assert_eq!(&recs[0][range], b"one");
        let (_, range) = rx.open(&mut second).unwrap();
        assert_eq!(&second[range], b"two");
        let mut tx = rx;
        assert_eq!(
            tx.seal(APPLICATION_DATA, &[0; MAX_PLAINTEXT + 1], &mut Vec::new()),
            Err(RecordError::TooLarge)
        );
    }

    impl RecordKey {
        /// The same key at the same sequence number, to try a record without moving on.
        fn clone_for_test(&self) -> Self {
            Self {
                key: self.key.clone(),
                iv: self.iv,
                seq: self.seq,
                version: self.version,
            }
        }
    }
}
