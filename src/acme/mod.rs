//! The ACME protocol core (RFC 8555, with RFC 8737 TLS-ALPN-01 and RFC 8738 IP identifiers):
//! the account key and its JWS (ES256), the messages a client sends and the objects a CA
//! answers with, key authorizations, the TLS-ALPN-01 certificate, the CSR and the renewal
//! rule. No I/O here: [`client`] talks to a CA with it; [`AccountKey`] (`account.rs`) also
//! reads and writes derper's account key file.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

mod account;
pub mod client;

pub use account::AccountKey;

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

fn err(what: impl fmt::Display) -> AcmeError {
    AcmeError(what.to_string())
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A name a certificate is for: a DNS name, or an IP address (RFC 8738).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Identifier {
    /// "dns" or "ip".
    #[serde(rename = "type")]
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
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => Self::ip(ip),
            Err(_) => Self::dns(host),
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
    let ids: Vec<String> = ids.iter().map(Identifier::json).collect();
    match profile {
        Some(p) => format!(
            r#"{{"identifiers":[{}],"profile":{}}}"#,
            ids.join(","),
            json_str(p)
        ),
        None => format!(r#"{{"identifiers":[{}]}}"#, ids.join(",")),
    }
}

/// The finalize payload: the CSR, DER in base64url.
pub fn finalize_payload(csr_der: &[u8]) -> String {
    format!(r#"{{"csr":"{}"}}"#, b64(csr_der))
}

/// The payload that tells the CA a challenge is ready to be validated.
pub const CHALLENGE_READY: &str = "{}";

/// The directory (RFC 8555 section 7.1.1).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Directory {
    /// URL for a fresh nonce.
    pub new_nonce: String,
    /// URL to create or find an account.
    pub new_account: String,
    /// URL to create an order.
    pub new_order: String,
    /// Terms of service, profiles.
    #[serde(default)]
    pub meta: Meta,
}

/// The directory's metadata.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// The CA's terms of service.
    pub terms_of_service: Option<String>,
    /// Profile name → description.
    #[serde(default)]
    pub profiles: std::collections::BTreeMap<String, String>,
}

/// The state of an order, an authorization or a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// Its state.
    pub status: Status,
    /// Authorization URLs, one per identifier.
    #[serde(default)]
    pub authorizations: Vec<String>,
    /// URL to post the CSR to.
    pub finalize: String,
    /// URL of the certificate chain, once valid.
    pub certificate: Option<String>,
    /// Why it is invalid.
    pub error: Option<Problem>,
}

/// An authorization (RFC 8555 section 7.1.4).
#[derive(Debug, Clone, Deserialize)]
pub struct Authorization {
    /// What it authorizes.
    pub identifier: Identifier,
    /// Its state.
    pub status: Status,
    /// The ways to prove control.
    #[serde(default)]
    pub challenges: Vec<Challenge>,
}

impl Authorization {
    /// The challenge of this type, if the CA offers it.
    pub fn challenge(&self, kind: &str) -> Option<&Challenge> {
        self.challenges.iter().find(|c| c.kind == kind)
    }
}

/// A challenge (RFC 8555 section 8).
#[derive(Debug, Clone, Deserialize)]
pub struct Challenge {
    /// "http-01", "tls-alpn-01", "dns-01", …
    #[serde(rename = "type")]
    pub kind: String,
    /// URL to post to when ready.
    pub url: String,
    /// Its state.
    pub status: Status,
    /// The token (HTTP-01, TLS-ALPN-01).
    #[serde(default)]
    pub token: String,
    /// Why it failed.
    pub error: Option<Problem>,
}

/// A problem document (RFC 7807), as the CA explains an error.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Problem {
    /// `urn:ietf:params:acme:error:badNonce` and the like.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The CA's words.
    #[serde(default)]
    pub detail: String,
    /// Per-identifier problems.
    #[serde(default)]
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

/// Parses a CA's JSON reply.
pub fn parse<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, AcmeError> {
    serde_json::from_slice(body).map_err(|e| err(format!("malformed {what} from the CA: {e}")))
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

/// A CSR for the identifiers, signed by the certificate's key (PKCS#8 DER, P-256).
pub fn csr(ids: &[Identifier], cert_key_pkcs8: &[u8]) -> Result<Vec<u8>, AcmeError> {
    let key = rcgen::KeyPair::try_from(cert_key_pkcs8)
        .map_err(|e| err(format!("certificate key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = ids.iter().map(san).collect::<Result<_, _>>()?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| err(format!("cannot make the CSR: {e}")))?;
    Ok(csr.der().to_vec())
}

/// When to renew a certificate valid from `not_before` to `not_after` (seconds since the
/// epoch): when a third of its lifetime is left, derper's rule.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before).max(0) / 3
}

/// Waits between failed attempts: 1 minute, doubling, at most 30 minutes (derper's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_secs(60);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(30 * 60);

    /// Before the first failure.
    pub fn new() -> Self {
        Self(Self::FIRST)
    }

    /// The wait after one more failure.
    pub fn next_wait(&mut self) -> Duration {
        let w = self.0;
        self.0 = (w * 2).min(Self::MAX);
        w
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// derper's file names in `--certdir` for an IP certificate: `<ip>.crt` and `<ip>.key`, with
/// `:` written as `.` for IPv6.
pub fn ip_cert_file_stem(ip: IpAddr) -> String {
    ip.to_canonical().to_string().replace(':', ".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    fn unb64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    }

    #[test]
    fn jws_verifies_with_the_jwk_and_carries_the_header() {
        let k = AccountKey::generate().unwrap();
        let body = k
            .sign(
                "https://ca/new-acct",
                "n0nce",
                None,
                Some(&new_account_payload(Some("a@b.c"))),
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let protected = unb64(v["protected"].as_str().unwrap());
        let header: serde_json::Value = serde_json::from_slice(&protected).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["nonce"], "n0nce");
        assert_eq!(header["url"], "https://ca/new-acct");
        assert_eq!(header["jwk"]["kty"], "EC");
        assert!(header.get("kid").is_none());
        let payload = unb64(v["payload"].as_str().unwrap());
        assert_eq!(
            payload,
            br#"{"termsOfServiceAgreed":true,"contact":["mailto:a@b.c"]}"#
        );
        // Verify with the key rebuilt from the JWK, as the CA does.
        let jwk = &header["jwk"];
        let mut point = vec![4u8];
        point.extend(unb64(jwk["x"].as_str().unwrap()));
        point.extend(unb64(jwk["y"].as_str().unwrap()));
        let input = format!(
            "{}.{}",
            v["protected"].as_str().unwrap(),
            v["payload"].as_str().unwrap()
        );
        let sig = unb64(v["signature"].as_str().unwrap());
        assert_eq!(sig.len(), 64);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(input.as_bytes(), &sig)
            .expect("signature verifies");
        // With an account URL: kid instead of jwk; POST-as-GET has an empty payload.
        let body = k
            .sign("https://ca/o/1", "n2", Some("https://ca/acct/7"), None)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&unb64(v["protected"].as_str().unwrap())).unwrap();
        assert_eq!(header["kid"], "https://ca/acct/7");
        assert!(header.get("jwk").is_none());
        assert_eq!(v["payload"], "");
        // The key survives its file.
        let again = AccountKey::from_pkcs8(&k.pkcs8()).unwrap();
        assert_eq!(again.jwk(), k.jwk());
    }

    #[test]
    fn thumbprint_is_rfc7638s() {
        // RFC 7638 section 3.1 uses an RSA key; for EC the same rule applies: SHA-256 of
        // the canonical JWK. Check the canonical form and the digest of a fixed JWK.
        let k = AccountKey::generate().unwrap();
        let jwk: serde_json::Value = serde_json::from_str(k.jwk()).unwrap();
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        assert_eq!(k.jwk(), canonical);
        assert_eq!(
            unb64(&k.thumbprint()),
            Sha256::digest(canonical.as_bytes()).to_vec()
        );
        assert_eq!(
            k.key_authorization("tok"),
            format!("tok.{}", k.thumbprint())
        );
    }

    #[test]
    fn identifiers_and_reverse_names() {
        assert_eq!(
            Identifier::for_host("Derp.Example.NET."),
            Identifier::dns("derp.example.net")
        );
        assert_eq!(Identifier::for_host("203.0.113.7").kind, "ip");
        assert_eq!(Identifier::for_host("[2001:DB8::1]").value, "2001:db8::1");
        assert_eq!(
            Identifier::for_host("203.0.113.7").alpn_sni(),
            "7.113.0.203.in-addr.arpa"
        );
        assert_eq!(
            reverse_dns_name("2001:db8::567:89ab".parse().unwrap()),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        assert_eq!(
            new_order_payload(&[Identifier::for_host("192.0.2.1")], Some(SHORTLIVED)),
            r#"{"identifiers":[{"type":"ip","value":"192.0.2.1"}],"profile":"shortlived"}"#
        );
        assert_eq!(
            ip_cert_file_stem("2001:db8::1".parse().unwrap()),
            "2001.db8..1"
        );
    }

    #[test]
    fn ca_objects_parse() {
        let d: Directory = parse(
            "directory",
            br#"{"newNonce":"https://ca/nonce","newAccount":"https://ca/acct",
                 "newOrder":"https://ca/order","revokeCert":"x",
                 "meta":{"profiles":{"classic":"c","shortlived":"s"}}}"#,
        )
        .unwrap();
        assert!(d.meta.profiles.contains_key(SHORTLIVED));
        let o: Order = parse(
            "order",
            br#"{"status":"pending","authorizations":["https://ca/authz/1"],
                 "finalize":"https://ca/fin","identifiers":[]}"#,
        )
        .unwrap();
        assert_eq!(o.status, Status::Pending);
        let a: Authorization = parse(
            "authorization",
            br#"{"identifier":{"type":"ip","value":"192.0.2.1"},"status":"pending",
                 "challenges":[{"type":"http-01","url":"https://ca/c/1","token":"t1","status":"pending"},
                               {"type":"tls-alpn-01","url":"https://ca/c/2","token":"t2","status":"pending"}]}"#,
        )
        .unwrap();
        assert_eq!(a.challenge("tls-alpn-01").unwrap().token, "t2");
        assert!(a.challenge("dns-01").is_none());
        let p: Problem = parse(
            "problem",
            br#"{"type":"urn:ietf:params:acme:error:badNonce","detail":"JWS has an invalid anti-replay nonce"}"#,
        )
        .unwrap();
        assert!(p.is_bad_nonce());
        assert_eq!(
            p.to_string(),
            "badNonce: JWS has an invalid anti-replay nonce"
        );
        let untyped = Problem {
            detail: "404 page not found".into(),
            ..Problem::default()
        };
        assert_eq!(untyped.to_string(), "404 page not found");
        assert!(parse::<Order>("order", b"{\"status\":\"weird\"}")
            .unwrap_err()
            .0
            .starts_with("malformed order from the CA"));
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("99999"), Some(Duration::from_secs(3600)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn challenge_cert_and_csr() {
        use x509_parser::prelude::*;
        let k = AccountKey::generate().unwrap();
        let ka = k.key_authorization("token");
        let id = Identifier::for_host("192.0.2.1");
        let (der, _key) = alpn_challenge_cert(&id, &ka).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING (0x04, 32) holding SHA-256 of the key authorization.
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        assert_eq!(&ext.value[2..], Sha256::digest(ka.as_bytes()).as_slice());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(
            matches!(san.value.general_names[0], GeneralName::IPAddress(b) if b == [192, 0, 2, 1])
        );

        let cert_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr_der = csr(
            &[
                Identifier::dns("derp.example.net"),
                Identifier::for_host("2001:db8::1"),
            ],
            &cert_key.serialize_der(),
        )
        .unwrap();
        let (_, req) = X509CertificationRequest::from_der(&csr_der).unwrap();
        let sans: Vec<String> = req
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                ParsedExtension::SubjectAlternativeName(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.general_names.iter().map(|g| g.to_string()))
            .collect();
        assert_eq!(sans.len(), 2, "{sans:?}");
        assert!(finalize_payload(&csr_der).starts_with(r#"{"csr":""#));
    }

    #[test]
    fn renewal_and_backoff() {
        // 160 hours: renew with 53h20m left.
        let nb = 1_000_000;
        let na = nb + 160 * 3600;
        assert_eq!(renew_at(nb, na), na - 160 * 3600 / 3);
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..7).map(|_| b.next_wait().as_secs() / 60).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    }
}
