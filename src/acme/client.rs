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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::Timer;

use super::order::{other, Next, OrderFlow};
pub use super::order::{Answer, ChallengeKind, Error, Issued, Proof, Solver};
use super::{new_account_payload, parse, retry_after, AccountKey, Directory, Identifier, Problem};
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

/// A request to the CA under way.
type Pending<'a> = Pin<Box<dyn Future<Output = Result<Answer, Error>> + Send + 'a>>;

/// A client for one CA and one account.
#[derive(Debug)]
pub struct AcmeClient {
    tls: Arc<rustls::ClientConfig>,
    directory: Directory,
    key: Arc<AccountKey>,
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
        key: impl Into<Arc<AccountKey>>,
    ) -> Result<Self, Error> {
        let mut c = Self {
            tls,
            directory: Directory {
                new_nonce: String::new(),
                new_account: String::new(),
                new_order: String::new(),
                meta: Default::default(),
            },
            key: key.into(),
            kid: None,
            nonce: None,
            conn: None,
            bad_nonces: 0,
        };
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let a = c.exchange("GET", directory_url, None, deadline).await?;
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
        let deadline = Instant::now() + REQUEST_TIMEOUT * (BAD_NONCE_RETRIES as u32 + 2);
        let payload = new_account_payload(email);
        let a = self
            .post("newAccount", &url, Some(&payload), deadline)
            .await?;
        let kid = a.location_of("newAccount")?;
        self.kid = Some(kid.clone());
        Ok(kid)
    }

    /// Orders and fetches a certificate for `ids` (DNS names and IP addresses), with
    /// `profile` (such as [`SHORTLIVED`](super::SHORTLIVED)) if given, the account made
    /// first if need be (with `email` as its contact). `deadline` bounds the whole of it. The
    /// steps are [`OrderFlow`]'s; this carries its requests and the CA's answers.
    pub async fn issue(
        &mut self,
        ids: &[Identifier],
        profile: Option<&str>,
        email: Option<&str>,
        solver: &dyn Solver,
        deadline: Instant,
    ) -> Result<Issued, Error> {
        if ids.is_empty() {
            return Err(other("no identifiers to order a certificate for"));
        }
        let account = self.kid.is_none().then(|| new_account_payload(email));
        let key = self.key.clone();
        let mut flow = OrderFlow::new(ids, profile, account, &key, solver);
        loop {
            let r = flow.request(&self.directory);
            let a = self
                .post(r.what, &r.url, r.payload.as_deref(), deadline)
                .await?;
            match flow.answer(a)? {
                Next::Now => {}
                Next::Account(kid) => self.kid = Some(kid),
                Next::Wait(retry_after) => wait(retry_after, deadline).await?,
                Next::Done(issued) => return Ok(issued),
            }
        }
    }

    /// A signed POST (`payload` None: POST-as-GET), sent again with the fresh nonce after a
    /// `badNonce`, each exchange by `deadline` at the latest. An error status is an
    /// [`Error::Ca`]. Boxed, so that its callers poll it through one pointer instead of each
    /// inlining its state machine.
    fn post<'a>(
        &'a mut self,
        what: &'a str,
        url: &'a str,
        payload: Option<&'a str>,
        deadline: Instant,
    ) -> Pending<'a> {
        Box::pin(self.post_inner(what, url, payload, deadline))
    }

    async fn post_inner(
        &mut self,
        what: &str,
        url: &str,
        payload: Option<&str>,
        deadline: Instant,
    ) -> Result<Answer, Error> {
        let mut tries = 0;
        loop {
            if Instant::now() >= deadline {
                return Err(other("the ACME order ran past its deadline"));
            }
            let nonce = self.nonce(deadline).await?;
            let body = self.key.sign(url, &nonce, self.kid.as_deref(), payload)?;
            let a = self
                .exchange("POST", url, Some(body.as_bytes()), deadline)
                .await?;
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
    async fn nonce(&mut self, deadline: Instant) -> Result<String, Error> {
        if let Some(n) = self.nonce.take() {
            return Ok(n);
        }
        let url = self.directory.new_nonce.clone();
        self.exchange("HEAD", &url, None, deadline).await?;
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
        deadline: Instant,
    ) -> Result<Answer, Error> {
        let u = Url::parse(url).map_err(|e| other(format!("CA URL {url:?}: {e}")))?;
        let place = format!("{}://{}:{}", u.https, u.host, u.port);
        let now = Instant::now();
        let deadline = deadline.min(now + REQUEST_TIMEOUT);
        let budget = deadline.saturating_duration_since(now);
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
                    let io = within(deadline, budget, u.connect(Some(&self.tls)))
                        .await
                        .map_err(|e| other(format!("connecting to {}: {e}", u.authority)))?;
                    Conn::new(io, deadline, budget)
                }
            };
            conn.start(deadline, budget);
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
