//! The ACME client (RFC 8555) on [`httpc`](crate::httpc): one kept-alive connection to the CA,
//! every request a JWS POST (POST-as-GET to read) with the nonce of the CA's last answer.
//!
//! [`AcmeClient::new`] reads the directory; [`AcmeClient::issue`] creates or finds the account
//! (JWK once, its URL as `kid` after), places an order for the identifiers (with a profile
//! if asked), has a [`Solver`] serve each authorization's challenge (HTTP-01 or
//! TLS-ALPN-01, the caller's choice), tells the CA it is ready, polls the authorization and
//! the order (with `Retry-After`, within the caller's deadline), finalizes with a CSR for a
//! new P-256 key, and downloads the chain. A `badNonce` answer is retried with the fresh
//! nonce it carried; any other CA error is an [`Error::Ca`] with the problem document.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::{PemObject as _, SectionKind};
use smol::Timer;

use super::{
    alpn_challenge_cert, csr, finalize_payload, new_account_payload, new_order_payload, parse,
    retry_after, AccountKey, AcmeError, Authorization, Directory, Identifier, Order, Problem,
    Status, CHALLENGE_READY,
};
use crate::httpc::{within, Conn, Framing, Url};

/// How long one HTTP exchange with the CA may take (connecting included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Sending a request again after `badNonce`, at most this many times.
pub const BAD_NONCE_RETRIES: usize = 8;
/// The wait between polls when the CA gives no `Retry-After`.
pub const POLL_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between polls, whatever `Retry-After` says.
pub const POLL_WAIT_MAX: Duration = Duration::from_secs(30);
/// The largest answer read from the CA (a certificate chain is a few KB).
const BODY_MAX: usize = 256 << 10;

const JOSE: &str = "application/jose+json";

/// What went wrong, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The CA said no: what was asked, the HTTP status (0 for a problem found in an object,
    /// such as a failed challenge), and the CA's problem document.
    Ca {
        /// The request or object, in words.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The CA's explanation.
        problem: Problem,
    },
    /// Anything else: connecting, timeouts, malformed answers, the solver.
    Other(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ca {
                what,
                status: 0,
                problem,
            } => write!(f, "{what}: {problem}"),
            Self::Ca {
                what,
                status,
                problem,
            } => write!(f, "{what}: HTTP {status}: {problem}"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {}

impl From<AcmeError> for Error {
    fn from(e: AcmeError) -> Self {
        Self::Other(e.0)
    }
}

fn other(what: impl std::fmt::Display) -> Error {
    Error::Other(what.to_string())
}

/// A challenge type this client can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// `http-01`: the key authorization at `/.well-known/acme-challenge/<token>` on port 80.
    Http01,
    /// `tls-alpn-01` (RFC 8737): a certificate for ALPN `acme-tls/1` on port 443.
    TlsAlpn01,
}

impl ChallengeKind {
    /// The name in the CA's objects.
    pub fn name(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// What the caller serves while the CA validates one identifier.
#[derive(Debug, Clone)]
pub enum Proof {
    /// Answer `GET /.well-known/acme-challenge/<token>` with `key_authorization`.
    Http01 {
        /// The path's last segment.
        token: String,
        /// The whole body (`text/plain` or `application/octet-stream`).
        key_authorization: String,
    },
    /// Answer a TLS handshake with ALPN `acme-tls/1` and SNI `sni` with this certificate
    /// (offering only `acme-tls/1`).
    TlsAlpn01 {
        /// The name the CA sends: the DNS name, or an address's reverse-DNS name (RFC 8738).
        sni: String,
        /// The self-signed certificate, DER.
        cert_der: Vec<u8>,
        /// Its key, PKCS#8 DER.
        key_pkcs8: Vec<u8>,
    },
}

/// The caller's side of a challenge: serve a proof while the CA looks, then stop.
pub trait Solver: Send + Sync {
    /// The challenge types the caller can serve, the preferred first.
    fn kinds(&self) -> &[ChallengeKind];
    /// Starts serving `proof` for `id` (before the CA is told to look).
    fn present(&self, id: &Identifier, proof: &Proof) -> Result<(), String>;
    /// Stops serving it (after the authorization is settled, valid or not).
    fn remove(&self, id: &Identifier, proof: &Proof);
}

/// An issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain as the CA sent it: PEM, the leaf first.
    pub chain_pem: String,
    /// The certificate's new key, PKCS#8 DER (P-256).
    pub key_pkcs8: Vec<u8>,
}

/// A CA's answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    location: Option<String>,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

/// A client for one CA and one account.
#[derive(Debug)]
pub struct AcmeClient {
    tls: Arc<rustls::ClientConfig>,
    directory: Directory,
    key: AccountKey,
    /// The account URL, once known.
    kid: Option<String>,
    /// The `Replay-Nonce` of the CA's last answer, not used yet.
    nonce: Option<String>,
    /// The kept-alive connection and the `scheme://authority` it goes to.
    conn: Option<(String, Conn)>,
    /// `badNonce` answers retried so far.
    bad_nonces: u32,
}

impl AcmeClient {
    /// Reads the directory at `directory_url`, trusting the CA's TLS certificate as `tls`
    /// says.
    pub async fn new(
        directory_url: &str,
        tls: Arc<rustls::ClientConfig>,
        key: AccountKey,
    ) -> Result<Self, Error> {
        let mut c = Self {
            tls,
            directory: Directory {
                new_nonce: String::new(),
                new_account: String::new(),
                new_order: String::new(),
                meta: Default::default(),
            },
            key,
            kid: None,
            nonce: None,
            conn: None,
            bad_nonces: 0,
        };
        let a = c.exchange("GET", directory_url, None).await?;
        if a.status != 200 {
            return Err(ca_error("the directory", &a));
        }
        c.directory = parse("directory", &a.body)?;
        Ok(c)
    }

    /// The CA's directory.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The account key.
    pub fn key(&self) -> &AccountKey {
        &self.key
    }

    /// How many `badNonce` answers were retried so far.
    pub fn bad_nonces(&self) -> u32 {
        self.bad_nonces
    }

    /// The account URL, once [`AcmeClient::account`] found or made it.
    pub fn account_url(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Creates the account for the key (or finds the existing one: the CA answers 200 with
    /// its URL), terms of service agreed, with `email` as its contact. Returns its URL.
    pub async fn account(&mut self, email: Option<&str>) -> Result<String, Error> {
        if let Some(k) = &self.kid {
            return Ok(k.clone());
        }
        let url = self.directory.new_account.clone();
        let a = self
            .post("newAccount", &url, Some(&new_account_payload(email)))
            .await?;
        let kid = a
            .location
            .ok_or_else(|| other("the CA's newAccount answer has no Location"))?;
        self.kid = Some(kid.clone());
        Ok(kid)
    }

    /// Orders and fetches a certificate for `ids` (DNS names and IP addresses), with
    /// `profile` (such as [`SHORTLIVED`](super::SHORTLIVED)) if given, the account made
    /// first if need be. `deadline` bounds the whole of it.
    pub async fn issue(
        &mut self,
        ids: &[Identifier],
        profile: Option<&str>,
        solver: &dyn Solver,
        deadline: Instant,
    ) -> Result<Issued, Error> {
        if ids.is_empty() {
            return Err(other("no identifiers to order a certificate for"));
        }
        bounded(deadline, self.account(None)).await?;
        let url = self.directory.new_order.clone();
        let payload = new_order_payload(ids, profile);
        let a = bounded(deadline, self.post("newOrder", &url, Some(&payload))).await?;
        let order_url = a
            .location
            .clone()
            .ok_or_else(|| other("the CA's newOrder answer has no Location"))?;
        let mut order: Order = parse("order", &a.body)?;
        for authz in order.authorizations.clone() {
            self.authorize(&authz, solver, deadline).await?;
        }
        if order.status != Status::Ready {
            order = self.poll_order(&order_url, Status::Ready, deadline).await?;
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| other(format!("cannot make a certificate key: {e}")))?;
        let key_pkcs8 = key.serialize_der();
        let csr_der = csr(ids, &key_pkcs8)?;
        let fin = order.finalize.clone();
        let a = bounded(
            deadline,
            self.post("finalize", &fin, Some(&finalize_payload(&csr_der))),
        )
        .await?;
        order = parse("order", &a.body)?;
        if order.status != Status::Valid {
            order = self.poll_order(&order_url, Status::Valid, deadline).await?;
        }
        let cert_url = order
            .certificate
            .ok_or_else(|| other("the valid order has no certificate URL"))?;
        let a = bounded(deadline, self.post("certificate", &cert_url, None)).await?;
        let chain_pem =
            String::from_utf8(a.body).map_err(|_| other("the certificate chain is not text"))?;
        if !is_pem_certificates(chain_pem.as_bytes()) {
            return Err(other("the certificate chain is not PEM certificates"));
        }
        Ok(Issued {
            chain_pem,
            key_pkcs8,
        })
    }

    /// Settles one authorization: nothing to do if valid; else the solver serves the first
    /// challenge type it can that the CA offers, the CA is told to look, and the
    /// authorization is polled until it is no longer pending.
    async fn authorize(
        &mut self,
        url: &str,
        solver: &dyn Solver,
        deadline: Instant,
    ) -> Result<(), Error> {
        let a = bounded(deadline, self.post("authorization", url, None)).await?;
        let authz: Authorization = parse("authorization", &a.body)?;
        match authz.status {
            Status::Valid => return Ok(()),
            Status::Pending => {}
            s => return Err(other(format!("authorization is {s:?}"))),
        }
        let id = &authz.identifier;
        let Some(challenge) = solver
            .kinds()
            .iter()
            .find_map(|k| authz.challenge(k.name()).map(|c| (*k, c)))
        else {
            let offered: Vec<&str> = authz.challenges.iter().map(|c| c.kind.as_str()).collect();
            return Err(other(format!(
                "the CA offers {offered:?} for {}, none of which can be served here",
                id.value
            )));
        };
        let (kind, challenge) = (challenge.0, challenge.1.clone());
        let key_authorization = self.key.key_authorization(&challenge.token);
        let proof = match kind {
            ChallengeKind::Http01 => Proof::Http01 {
                token: challenge.token.clone(),
                key_authorization,
            },
            ChallengeKind::TlsAlpn01 => {
                let (cert_der, key_pkcs8) = alpn_challenge_cert(id, &key_authorization)?;
                Proof::TlsAlpn01 {
                    sni: id.alpn_sni(),
                    cert_der,
                    key_pkcs8,
                }
            }
        };
        solver
            .present(id, &proof)
            .map_err(|e| other(format!("serving the {} challenge: {e}", kind.name())))?;
        let result = self.validate(url, &challenge.url, kind, deadline).await;
        solver.remove(id, &proof);
        result
    }

    async fn validate(
        &mut self,
        authz_url: &str,
        challenge_url: &str,
        kind: ChallengeKind,
        deadline: Instant,
    ) -> Result<(), Error> {
        bounded(
            deadline,
            self.post("challenge", challenge_url, Some(CHALLENGE_READY)),
        )
        .await?;
        loop {
            let a = bounded(deadline, self.post("authorization", authz_url, None)).await?;
            let authz: Authorization = parse("authorization", &a.body)?;
            match authz.status {
                Status::Valid => return Ok(()),
                Status::Pending => wait(a.retry_after, deadline).await?,
                s => {
                    let problem = authz
                        .challenge(kind.name())
                        .and_then(|c| c.error.clone())
                        .unwrap_or_else(|| Problem {
                            detail: format!("authorization {s:?}"),
                            ..Problem::default()
                        });
                    return Err(Error::Ca {
                        what: format!("{} challenge for {}", kind.name(), authz.identifier.value),
                        status: 0,
                        problem,
                    });
                }
            }
        }
    }

    /// Polls the order until it is `want` (or fails, or past the deadline).
    async fn poll_order(
        &mut self,
        url: &str,
        want: Status,
        deadline: Instant,
    ) -> Result<Order, Error> {
        loop {
            let a = bounded(deadline, self.post("order", url, None)).await?;
            let order: Order = parse("order", &a.body)?;
            match order.status {
                s if s == want => return Ok(order),
                Status::Pending | Status::Processing | Status::Ready => {
                    wait(a.retry_after, deadline).await?
                }
                s => {
                    return Err(Error::Ca {
                        what: "order".into(),
                        status: 0,
                        problem: order.error.unwrap_or_else(|| Problem {
                            detail: format!("order {s:?}"),
                            ..Problem::default()
                        }),
                    })
                }
            }
        }
    }

    /// A signed POST (`payload` None: POST-as-GET), sent again with the fresh nonce after a
    /// `badNonce`. An error status is an [`Error::Ca`].
    async fn post(
        &mut self,
        what: &str,
        url: &str,
        payload: Option<&str>,
    ) -> Result<Answer, Error> {
        let mut tries = 0;
        loop {
            let nonce = self.nonce().await?;
            let body = self.key.sign(url, &nonce, self.kid.as_deref(), payload)?;
            let a = self.exchange("POST", url, Some(body.as_bytes())).await?;
            if a.status < 400 {
                return Ok(a);
            }
            let e = ca_error(what, &a);
            match &e {
                Error::Ca { problem, .. }
                    if problem.is_bad_nonce() && tries < BAD_NONCE_RETRIES =>
                {
                    tries += 1;
                    self.bad_nonces += 1;
                    log::debug!("ACME {what}: badNonce, sending again ({tries})");
                }
                _ => return Err(e),
            }
        }
    }

    /// The nonce to sign with: the last answer's, else a fresh one from newNonce.
    async fn nonce(&mut self) -> Result<String, Error> {
        if let Some(n) = self.nonce.take() {
            return Ok(n);
        }
        let url = self.directory.new_nonce.clone();
        self.exchange("HEAD", &url, None).await?;
        self.nonce
            .take()
            .ok_or_else(|| other("the CA's newNonce answer has no Replay-Nonce"))
    }

    /// One HTTP exchange, on the kept-alive connection when it goes to the same place
    /// (a new one if that turns out closed before any byte of an answer). Keeps the answer's
    /// `Replay-Nonce`.
    async fn exchange(
        &mut self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, Error> {
        let u = Url::parse(url).map_err(|e| other(format!("CA URL {url:?}: {e}")))?;
        let place = format!("{}://{}:{}", u.https, u.host, u.port);
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut reused = match self.conn.take() {
            Some((p, c)) if p == place => Some(c),
            _ => None,
        };
        let mut req = u.request(method).header("Accept", "*/*");
        if let Some(b) = body {
            req = req.header("Content-Type", JOSE).body(b);
        }
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => {
                    let io = within(deadline, REQUEST_TIMEOUT, u.connect(Some(&self.tls)))
                        .await
                        .map_err(|e| other(format!("connecting to {}: {e}", u.authority)))?;
                    Conn::new(io, deadline, REQUEST_TIMEOUT)
                }
            };
            conn.start(deadline, REQUEST_TIMEOUT);
            let head = match conn.send(&req).await {
                Ok(()) => conn.read_head().await,
                Err(e) => Err(e),
            };
            let head = match head {
                Ok(h) => h,
                Err(_) if was_reused && !conn.received() => continue,
                Err(e) => return Err(other(format!("{method} {url}: {e}"))),
            };
            let framing = if method == "HEAD" {
                Framing::Empty
            } else {
                head.framing
            };
            let b = conn.read_body(framing, BODY_MAX, BODY_MAX as u64).await;
            match &b.end {
                Ok(true) => {}
                Ok(false) => return Err(other(format!("{method} {url}: answer too long"))),
                Err(e) => return Err(other(format!("{method} {url}: {e}"))),
            }
            if let Some(n) = head.header("Replay-Nonce") {
                self.nonce = Some(n.trim().to_string());
            }
            if conn.reusable(&head, &b) {
                conn.idle();
                self.conn = Some((place, conn));
            }
            return Ok(Answer {
                status: head.status,
                location: head.header("Location").map(str::to_string),
                retry_after: head.header("Retry-After").and_then(retry_after),
                body: b.data,
            });
        }
    }
}

/// At least one PEM section, and every one a certificate (rustls's PEM reader).
fn is_pem_certificates(text: &[u8]) -> bool {
    let mut n = 0;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
        match section {
            Ok((SectionKind::Certificate, _)) => n += 1,
            _ => return false,
        }
    }
    n > 0
}

/// The CA's error answer as an [`Error::Ca`]: its problem document, or the status line.
fn ca_error(what: &str, a: &Answer) -> Error {
    let problem = parse::<Problem>("problem", &a.body).unwrap_or_else(|_| Problem {
        detail: String::from_utf8_lossy(&a.body[..a.body.len().min(200)])
            .trim()
            .to_string(),
        ..Problem::default()
    });
    Error::Ca {
        what: what.to_string(),
        status: a.status,
        problem,
    }
}

/// Runs `f` until `deadline`.
async fn bounded<T>(
    deadline: Instant,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    use smol::future::FutureExt as _;
    f.or(async {
        Timer::at(deadline).await;
        Err(other("the ACME order ran past its deadline"))
    })
    .await
}

/// Waits before the next poll: `Retry-After`, else [`POLL_WAIT`], at most [`POLL_WAIT_MAX`];
/// an error if that would pass `deadline`.
async fn wait(retry_after: Option<Duration>, deadline: Instant) -> Result<(), Error> {
    let w = retry_after.unwrap_or(POLL_WAIT).min(POLL_WAIT_MAX);
    if Instant::now() + w > deadline {
        return Err(other("the ACME order ran past its deadline while polling"));
    }
    Timer::after(w).await;
    Ok(())
}
