//! The ACME protocol core (RFC 8555, with RFC 8737 TLS-ALPN-01 and RFC 8738 IP identifiers):
//! the account key and its JWS (ES256), the messages a client sends and the objects a CA
//! answers with, key authorizations, the TLS-ALPN-01 certificate, the CSR and the renewal
//! rule. No I/O here: [`client`] talks to a CA with it; [`AccountKey`] (`account.rs`) also
//! reads and writes derper's account key file.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::pem::{PemObject as _, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod account;
pub mod client;
mod csr;
mod json;
pub mod order;

pub use account::AccountKey;
pub use csr::csr;
use json::{as_string, list, opt, opt_string, string};
pub use json::{parse, FromJson};

/// Let's Encrypt's production directory, the default `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// The profile for IP address certificates (Let's Encrypt: 160 hours).
pub const SHORTLIVED: &str = "shortlived";
/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// What went wrong, in words for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeError(pub String);

impl fmt::Display for AcmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AcmeError {}

fn err(what: impl Into<String>) -> AcmeError {
    AcmeError(what.into())
}

fn json_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A name a certificate is for: a DNS name, or an IP address (RFC 8738).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    /// "dns" or "ip" (`type`).
    pub kind: String,
    /// The name, or the address in its textual form (IPv6 as RFC 5952).
    pub value: String,
}

impl Identifier {
    /// A DNS name.
    pub fn dns(name: &str) -> Self {
        Self {
            kind: "dns".into(),
            value: name.trim_end_matches('.').to_ascii_lowercase(),
        }
    }

    /// An IP address.
    pub fn ip(ip: IpAddr) -> Self {
        Self {
            kind: "ip".into(),
            value: ip.to_canonical().to_string(),
        }
    }

    /// The identifier for a `--hostname`: an address if it parses as one.
    pub fn for_host(host: &str) -> Self {
        match host_ip(host) {
            Some(ip) => Self::ip(ip),
            None => Self::dns(host),
        }
    }

    /// The address, for an IP identifier.
    pub fn as_ip(&self) -> Option<IpAddr> {
        (self.kind == "ip")
            .then(|| self.value.parse().ok())
            .flatten()
    }

    /// The SNI a TLS-ALPN-01 validation for this identifier carries: the name itself, or for
    /// an address its reverse-DNS name (RFC 8738 section 6).
    pub fn alpn_sni(&self) -> String {
        match self.as_ip() {
            Some(ip) => reverse_dns_name(ip),
            None => self.value.clone(),
        }
    }

    fn json(&self) -> String {
        format!(
            r#"{{"type":{},"value":{}}}"#,
            json_str(&self.kind),
            json_str(&self.value)
        )
    }
}

/// The address a `--hostname` is, if it is one (IPv6 with or without brackets).
pub fn host_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// `4.3.2.1.in-addr.arpa` for 1.2.3.4; nibbles under `ip6.arpa` for IPv6.
pub fn reverse_dns_name(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// The newAccount payload: terms agreed, and a contact address if one was given.
pub fn new_account_payload(email: Option<&str>) -> String {
    match email {
        Some(e) => format!(
            r#"{{"termsOfServiceAgreed":true,"contact":[{}]}}"#,
            json_str(&format!("mailto:{e}"))
        ),
        None => r#"{"termsOfServiceAgreed":true}"#.into(),
    }
}

/// The newOrder payload, with a profile (draft-ietf-acme-profiles) if one is asked for.
pub fn new_order_payload(ids: &[Identifier], profile: Option<&str>) -> String {
    let mut out = String::from(r#"{"identifiers":["#);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&id.json());
    }
    out.push(']');
    if let Some(p) = profile {
        out.push_str(r#","profile":"#);
        out.push_str(&json_str(p));
    }
    out.push('}');
    out
}

/// The finalize payload: the CSR, DER in base64url.
pub fn finalize_payload(csr_der: &[u8]) -> String {
    format!(r#"{{"csr":"{}"}}"#, b64(csr_der))
}

/// The payload that tells the CA a challenge is ready to be validated.
pub const CHALLENGE_READY: &str = "{}";

/// The directory (RFC 8555 section 7.1.1).
#[derive(Debug, Clone)]
pub struct Directory {
    /// URL for a fresh nonce.
    pub new_nonce: String,
    /// URL to create or find an account.
    pub new_account: String,
    /// URL to create an order.
    pub new_order: String,
    /// Terms of service, profiles.
    pub meta: Meta,
}

/// The directory's metadata.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// The profiles' names (draft-ietf-acme-profiles).
    pub profiles: Vec<String>,
}

/// The state of an order, an authorization or a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for the client.
    Pending,
    /// Order: authorizations done, ready to finalize.
    Ready,
    /// Being validated or issued.
    Processing,
    /// Done.
    Valid,
    /// Failed.
    Invalid,
    /// Authorization: deactivated by the client.
    Deactivated,
    /// Expired.
    Expired,
    /// Revoked.
    Revoked,
}

/// An order (RFC 8555 section 7.1.3).
#[derive(Debug, Clone)]
pub struct Order {
    /// Its state.
    pub status: Status,
    /// Authorization URLs, one per identifier.
    pub authorizations: Vec<String>,
    /// URL to post the CSR to.
    pub finalize: String,
    /// URL of the certificate chain, once valid.
    pub certificate: Option<String>,
    /// Why it is invalid.
    pub error: Option<Problem>,
}

/// An authorization (RFC 8555 section 7.1.4).
#[derive(Debug, Clone)]
pub struct Authorization {
    /// What it authorizes.
    pub identifier: Identifier,
    /// Its state.
    pub status: Status,
    /// The ways to prove control.
    pub challenges: Vec<Challenge>,
}

impl Authorization {
    /// The challenge of this type, if the CA offers it.
    pub fn challenge(&self, kind: &str) -> Option<&Challenge> {
        self.challenges.iter().find(|c| c.kind == kind)
    }
}

/// A challenge (RFC 8555 section 8).
#[derive(Debug, Clone)]
pub struct Challenge {
    /// "http-01", "tls-alpn-01", "dns-01", … (`type`)
    pub kind: String,
    /// URL to post to when ready.
    pub url: String,
    /// Its state.
    pub status: Status,
    /// The token (HTTP-01, TLS-ALPN-01; empty if absent).
    pub token: String,
    /// Why it failed.
    pub error: Option<Problem>,
}

/// A problem document (RFC 7807), as the CA explains an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problem {
    /// `urn:ietf:params:acme:error:badNonce` and the like (`type`; empty if absent).
    pub kind: String,
    /// The CA's words (empty if absent).
    pub detail: String,
    /// Per-identifier problems.
    pub subproblems: Vec<Problem>,
}

impl Problem {
    /// A nonce the CA did not take: the request is sent again with the fresh nonce it gave.
    pub fn is_bad_nonce(&self) -> bool {
        self.kind == "urn:ietf:params:acme:error:badNonce"
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind.rsplit(':').next() {
            Some(kind) if !kind.is_empty() => write!(f, "{kind}: {}", self.detail)?,
            _ => f.write_str(&self.detail)?,
        }
        for s in &self.subproblems {
            write!(f, "; {s}")?;
        }
        Ok(())
    }
}

impl FromJson for Identifier {
    fn from_json(v: &Value) -> Result<Self, String> {
        Ok(Self {
            kind: string(v, "type")?,
            value: string(v, "value")?,
        })
    }
}

impl FromJson for Directory {
    fn from_json(v: &Value) -> Result<Self, String> {
        Ok(Self {
            new_nonce: string(v, "newNonce")?,
            new_account: string(v, "newAccount")?,
            new_order: string(v, "newOrder")?,
            meta: opt(v, "meta", Meta::from_json)?.unwrap_or_default(),
        })
    }
}

impl FromJson for Meta {
    fn from_json(v: &Value) -> Result<Self, String> {
        let profiles = match v.get("profiles") {
            None | Some(Value::Null) => Vec::new(),
            // Profile name → free-text description; only the names matter here.
            Some(Value::Object(m)) => m.keys().cloned().collect(),
            Some(_) => return Err("`profiles` is not an object".into()),
        };
        Ok(Self { profiles })
    }
}

impl FromJson for Status {
    fn from_json(v: &Value) -> Result<Self, String> {
        const NAMES: [(&str, Status); 8] = [
            ("pending", Status::Pending),
            ("ready", Status::Ready),
            ("processing", Status::Processing),
            ("valid", Status::Valid),
            ("invalid", Status::Invalid),
            ("deactivated", Status::Deactivated),
            ("expired", Status::Expired),
            ("revoked", Status::Revoked),
        ];
        let name = v.as_str().unwrap_or_default();
        NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| "`status` is not one of RFC 8555's".into())
    }
}

fn status(v: &Value) -> Result<Status, String> {
    Status::from_json(v.get("status").ok_or("missing field `status`")?)
}

impl FromJson for Order {
    fn from_json(v: &Value) -> Result<Self, String> {
        Ok(Self {
            status: status(v)?,
            authorizations: list(v, "authorizations", as_string)?,
            finalize: string(v, "finalize")?,
            certificate: opt_string(v, "certificate")?,
            error: opt(v, "error", Problem::from_json)?,
        })
    }
}

impl FromJson for Authorization {
    fn from_json(v: &Value) -> Result<Self, String> {
        Ok(Self {
            identifier: Identifier::from_json(
                v.get("identifier").ok_or("missing field `identifier`")?,
            )?,
            status: status(v)?,
            challenges: list(v, "challenges", Challenge::from_json)?,
        })
    }
}

impl FromJson for Challenge {
    fn from_json(v: &Value) -> Result<Self, String> {
        Ok(Self {
            kind: string(v, "type")?,
            url: string(v, "url")?,
            status: status(v)?,
            token: opt_string(v, "token")?.unwrap_or_default(),
            error: opt(v, "error", Problem::from_json)?,
        })
    }
}

impl FromJson for Problem {
    fn from_json(v: &Value) -> Result<Self, String> {
        if !v.is_object() {
            return Err("a problem document is an object".into());
        }
        Ok(Self {
            kind: opt_string(v, "type")?.unwrap_or_default(),
            detail: opt_string(v, "detail")?.unwrap_or_default(),
            subproblems: list(v, "subproblems", Problem::from_json)?,
        })
    }
}

/// A `Retry-After` value in seconds (an HTTP date is not used by ACME CAs in practice and
/// reads as None: the caller's own back-off applies). At most an hour.
pub fn retry_after(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

/// The certificate for a TLS-ALPN-01 validation (RFC 8737): self-signed, for the identifier,
/// with the acmeIdentifier extension holding SHA-256 of the key authorization. Returns the
/// certificate and its key, DER.
pub fn alpn_challenge_cert(
    id: &Identifier,
    key_authorization: &str,
) -> Result<(Vec<u8>, Vec<u8>), AcmeError> {
    let digest = Sha256::digest(key_authorization.as_bytes());
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![san(id)?];
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(&digest));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| err(format!("cannot make a challenge key: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| err(format!("cannot make the challenge certificate: {e}")))?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

fn san(id: &Identifier) -> Result<rcgen::SanType, AcmeError> {
    Ok(match id.as_ip() {
        Some(ip) => rcgen::SanType::IpAddress(ip),
        None => rcgen::SanType::DnsName(
            id.value
                .clone()
                .try_into()
                .map_err(|_| err(format!("{:?} is not a DNS name", id.value)))?,
        ),
    })
}

/// When to renew a certificate valid from `not_before` to `not_after` (seconds since the
/// epoch): when a third of its lifetime is left, derper's rule.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before).max(0) / 3
}

/// Waits between failed attempts: 1 minute, doubling, at most 30 minutes (derper's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_secs(60);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(30 * 60);

    /// Before the first failure, derper's waits.
    pub fn new() -> Self {
        Self::with(Self::FIRST, Self::MAX)
    }

    /// Waits from `first`, doubling, at most `max`.
    pub fn with(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            first,
            max,
        }
    }

    /// The wait after one more failure.
    pub fn next_wait(&mut self) -> Duration {
        let w = self.next;
        self.next = (w * 2).min(self.max);
        w
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// A PEM text as the CA sends a chain and derper stores a certificate: its certificates in
/// order, and its first private key (PKCS#8, SEC1 or PKCS#1). Other sections are counted in
/// `others`. One reader (rustls's) for all of it.
#[derive(Debug, Default)]
pub struct PemFile {
    /// The certificates, DER.
    pub certs: Vec<CertificateDer<'static>>,
    /// The first private key.
    pub key: Option<PrivateKeyDer<'static>>,
    /// Sections that are neither, and keys after the first.
    pub others: usize,
}

impl PemFile {
    /// Reads `text`; an error if it is not PEM.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let mut f = Self::default();
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
            let (kind, der) = section.map_err(|e| e.to_string())?;
            let key = match kind {
                SectionKind::Certificate => {
                    f.certs.push(der.into());
                    continue;
                }
                SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(der.into()),
                SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
                SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
                _ => {
                    f.others += 1;
                    continue;
                }
            };
            if f.key.is_none() {
                f.key = Some(key);
            } else {
                f.others += 1;
            }
        }
        Ok(f)
    }
}

/// derper's file names in `--certdir` for an IP certificate: `<ip>.crt` and `<ip>.key`, with
/// `:` written as `.` for IPv6.
pub fn ip_cert_file_stem(ip: IpAddr) -> String {
    ip.to_canonical().to_string().replace(':', ".")
}

#[cfg(test)]
mod tests;
