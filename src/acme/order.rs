//! An order's progress (RFC 8555 section 7.4), without I/O: [`OrderFlow::request`] says what
//! to send the CA next, [`OrderFlow::answer`] takes the CA's answer and says whether to send
//! the next request now, after a wait, or that the certificate is there. The client
//! ([`client`](super::client)) only carries requests and answers; the challenge proofs are
//! served through a [`Solver`] while their authorization is validated, and removed when it is
//! settled (or the flow is dropped).
//!
//! The steps: newOrder; each authorization read, and if pending, a proof served, the
//! challenge posted, the authorization polled until settled; the order polled until ready;
//! finalize with a CSR for a new P-256 key; the order polled until valid; the chain fetched.
//! (Written as a state machine rather than an `async fn` per step: on mipsel the nested
//! futures' code was about twice the size.)

use std::time::Duration;

use super::{
    alpn_challenge_cert, csr, finalize_payload, new_order_payload, parse, AccountKey, AcmeError,
    Authorization, Directory, Identifier, Order, PemFile, Problem, Status, CHALLENGE_READY,
};

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

pub(super) fn other(what: impl Into<String>) -> Error {
    Error::Other(what.into())
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

/// A CA's answer to a request.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The HTTP status (the client has turned error statuses into [`Error::Ca`]).
    pub status: u16,
    /// `Location`.
    pub location: Option<String>,
    /// `Retry-After`.
    pub retry_after: Option<Duration>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The `Location` of `what`'s answer (an account's or an order's URL), which it must have.
    pub fn location_of(&self, what: &str) -> Result<String, Error> {
        let loc = self.location.clone();
        loc.ok_or_else(|| other(format!("the CA's {what} answer has no Location")))
    }
}

/// A request to send: what it is (for messages), the URL, and the payload (`None`:
/// POST-as-GET).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request or object, in words.
    pub what: &'static str,
    /// Where to POST.
    pub url: String,
    /// The JWS payload; `None` for POST-as-GET.
    pub payload: Option<String>,
}

/// What to do after an answer.
#[derive(Debug)]
pub enum Next {
    /// Send the next request now.
    Now,
    /// The account's URL (newAccount's `Location`): sign with it as `kid` from now on, and
    /// send the next request now.
    Account(String),
    /// Send it after the CA's `Retry-After`, or the client's own poll wait.
    Wait(Option<Duration>),
    /// The certificate is there.
    Done(Issued),
}

/// Where the order stands.
#[derive(Debug)]
enum At {
    /// Create the account (or find it: the CA answers with its URL).
    NewAccount { payload: String },
    /// Place it.
    NewOrder { payload: String },
    /// Read authorization `i`.
    Authorization(usize),
    /// Tell the CA that the challenge at `url` (of authorization `i`) is ready.
    Challenge { i: usize, url: String },
    /// Poll authorization `i` until it is settled.
    Validating(usize),
    /// Poll the order until it is `want`.
    Polling { want: Status },
    /// Send the CSR.
    Finalize { payload: String },
    /// Fetch the chain.
    Certificate { url: String },
}

/// One order for `ids`, from newOrder to the chain.
pub struct OrderFlow<'a> {
    solver: &'a dyn Solver,
    key: &'a AccountKey,
    at: At,
    /// The order's URL (newOrder's `Location`) and its last state.
    url: String,
    order: Option<Order>,
    /// The proof being served, and the challenge type it is for.
    serving: Option<(Identifier, Proof, ChallengeKind)>,
    /// The certificate's key, made at finalize.
    key_pkcs8: Vec<u8>,
    ids: Vec<Identifier>,
    profile: Option<String>,
}

impl std::fmt::Debug for OrderFlow<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OrderFlow({:?} at {:?})", self.ids, self.at)
    }
}

impl<'a> OrderFlow<'a> {
    /// An order for `ids` (not empty) with `profile` if given; the key authorizations are
    /// `key`'s, the proofs served by `solver`. `account`: the newAccount payload, when the
    /// account's URL is not known yet.
    pub fn new(
        ids: &[Identifier],
        profile: Option<&str>,
        account: Option<String>,
        key: &'a AccountKey,
        solver: &'a dyn Solver,
    ) -> Self {
        let at = match account {
            Some(payload) => At::NewAccount { payload },
            None => At::NewOrder {
                payload: new_order_payload(ids, profile),
            },
        };
        Self {
            solver,
            key,
            at,
            url: String::new(),
            order: None,
            serving: None,
            key_pkcs8: Vec::new(),
            ids: ids.to_vec(),
            profile: profile.map(str::to_string),
        }
    }

    /// The request to send now, to the CA whose directory is `dir`.
    pub fn request(&self, dir: &Directory) -> Request {
        let order = self.order.as_ref();
        let authz = |i: usize| {
            let url = order.and_then(|o| o.authorizations.get(i));
            url.cloned().unwrap_or_default()
        };
        let (what, url, payload) = match &self.at {
            At::NewAccount { payload } => ("newAccount", dir.new_account.clone(), Some(payload)),
            At::NewOrder { payload } => ("newOrder", dir.new_order.clone(), Some(payload)),
            At::Authorization(i) | At::Validating(i) => ("authorization", authz(*i), None),
            At::Challenge { url, .. } => ("challenge", url.clone(), None),
            At::Polling { .. } => ("order", self.url.clone(), None),
            At::Finalize { payload } => {
                let url = order.map(|o| o.finalize.clone()).unwrap_or_default();
                ("finalize", url, Some(payload))
            }
            At::Certificate { url } => ("certificate", url.clone(), None),
        };
        let payload = match &self.at {
            At::Challenge { .. } => Some(CHALLENGE_READY.to_string()),
            _ => payload.cloned(),
        };
        Request { what, url, payload }
    }

    /// Moves on with the CA's answer to [`OrderFlow::request`].
    pub fn answer(&mut self, a: Answer) -> Result<Next, Error> {
        match std::mem::replace(&mut self.at, At::Authorization(0)) {
            At::NewAccount { .. } => {
                let kid = a.location_of("newAccount")?;
                self.at = At::NewOrder {
                    payload: new_order_payload(&self.ids, self.profile.as_deref()),
                };
                Ok(Next::Account(kid))
            }
            At::NewOrder { .. } => {
                self.url = a.location_of("newOrder")?;
                self.order = Some(parse("order", &a.body)?);
                self.next_authorization(0)
            }
            At::Authorization(i) => {
                let authz: Authorization = parse("authorization", &a.body)?;
                match authz.status {
                    Status::Valid => self.next_authorization(i + 1),
                    Status::Pending => self.serve(i, authz),
                    s => Err(other(format!("authorization is {s:?}"))),
                }
            }
            At::Challenge { i, .. } => {
                self.at = At::Validating(i);
                Ok(Next::Now)
            }
            At::Validating(i) => {
                let mut authz: Authorization = parse("authorization", &a.body)?;
                match authz.status {
                    Status::Pending => {
                        self.at = At::Validating(i);
                        return Ok(Next::Wait(a.retry_after));
                    }
                    Status::Valid => {
                        self.stop_serving();
                        return self.next_authorization(i + 1);
                    }
                    _ => {}
                }
                let kind = self.stop_serving().unwrap_or(ChallengeKind::Http01).name();
                let at = authz.challenges.iter().position(|c| c.kind == kind);
                let problem = at.and_then(|i| authz.challenges.swap_remove(i).error);
                Err(Error::Ca {
                    what: format!("{kind} challenge for {}", authz.identifier.value),
                    status: 0,
                    problem: problem.unwrap_or_else(|| problem_of("authorization", authz.status)),
                })
            }
            At::Polling { want } => {
                let wait = Next::Wait(a.retry_after);
                self.settle(parse("order", &a.body)?, want, wait)
            }
            // Not yet valid: polled at once, then as the CA says.
            At::Finalize { .. } => self.settle(parse("order", &a.body)?, Status::Valid, Next::Now),
            At::Certificate { .. } => {
                let chain_pem = String::from_utf8(a.body)
                    .map_err(|_| other("the certificate chain is not text"))?;
                let pem = PemFile::parse(chain_pem.as_bytes()).unwrap_or_default();
                if pem.certs.is_empty() || pem.key.is_some() || pem.others > 0 {
                    return Err(other("the certificate chain is not PEM certificates"));
                }
                Ok(Next::Done(Issued {
                    chain_pem,
                    key_pkcs8: std::mem::take(&mut self.key_pkcs8),
                }))
            }
        }
    }

    /// Authorization `i` next, or, when all are valid, the order polled until ready.
    fn next_authorization(&mut self, i: usize) -> Result<Next, Error> {
        let n = self.order.as_ref().map_or(0, |o| o.authorizations.len());
        self.at = if i < n {
            At::Authorization(i)
        } else {
            At::Polling {
                want: Status::Ready,
            }
        };
        // The order as newOrder or the last poll gave it may already be ready.
        match &self.order {
            Some(o) if i >= n && o.status == Status::Ready => self.finalize(),
            _ => Ok(Next::Now),
        }
    }

    /// Has the solver serve the first challenge type it can that authorization `i` offers,
    /// then tells the CA to look.
    fn serve(&mut self, i: usize, authz: Authorization) -> Result<Next, Error> {
        let id = authz.identifier.clone();
        let Some((kind, challenge)) = self
            .solver
            .kinds()
            .iter()
            .find_map(|k| authz.challenge(k.name()).map(|c| (*k, c)))
        else {
            let offered: Vec<&str> = authz.challenges.iter().map(|c| c.kind.as_str()).collect();
            return Err(other(format!(
                "the CA offers {} for {}, none of which can be served here",
                offered.join(", "),
                id.value
            )));
        };
        let key_authorization = self.key.key_authorization(&challenge.token);
        let proof = match kind {
            ChallengeKind::Http01 => Proof::Http01 {
                token: challenge.token.clone(),
                key_authorization,
            },
            ChallengeKind::TlsAlpn01 => {
                let (cert_der, key_pkcs8) = alpn_challenge_cert(&id, &key_authorization)?;
                Proof::TlsAlpn01 {
                    sni: id.alpn_sni(),
                    cert_der,
                    key_pkcs8,
                }
            }
        };
        self.solver
            .present(&id, &proof)
            .map_err(|e| other(format!("serving the {} challenge: {e}", kind.name())))?;
        self.at = At::Challenge {
            i,
            url: challenge.url.clone(),
        };
        self.serving = Some((id, proof, kind));
        Ok(Next::Now)
    }

    /// The solver stops serving the current proof; its challenge type.
    fn stop_serving(&mut self) -> Option<ChallengeKind> {
        let (id, proof, kind) = self.serving.take()?;
        self.solver.remove(&id, &proof);
        Some(kind)
    }

    /// A polled (or finalized) order: on to the next step if it is `want`, polled again
    /// (`then`) while it is on its way, an error if it failed.
    fn settle(&mut self, order: Order, want: Status, then: Next) -> Result<Next, Error> {
        match order.status {
            s if s == want && want == Status::Ready => {
                // Finalized at the order's finalize URL.
                self.order = Some(order);
                self.finalize()
            }
            s if s == want => {
                let url = order
                    .certificate
                    .ok_or_else(|| other("the valid order has no certificate URL"))?;
                self.at = At::Certificate { url };
                Ok(Next::Now)
            }
            Status::Pending | Status::Processing | Status::Ready => {
                self.at = At::Polling { want };
                Ok(then)
            }
            s => Err(Error::Ca {
                what: "order".into(),
                status: 0,
                problem: order.error.unwrap_or_else(|| problem_of("order", s)),
            }),
        }
    }

    /// A new P-256 key and the CSR for it.
    fn finalize(&mut self) -> Result<Next, Error> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .map_err(|_| other("cannot make a certificate key"))?;
        self.key_pkcs8 = doc.as_ref().to_vec();
        let csr_der = csr(&self.ids, &self.key_pkcs8)?;
        self.at = At::Finalize {
            payload: finalize_payload(&csr_der),
        };
        Ok(Next::Now)
    }
}

impl Drop for OrderFlow<'_> {
    /// A proof still served (the order failed, or was given up) is removed.
    fn drop(&mut self) {
        self.stop_serving();
    }
}

/// A problem document for an object that failed without one.
fn problem_of(what: &str, s: Status) -> Problem {
    Problem {
        detail: format!("{what} {s:?}"),
        ..Problem::default()
    }
}
