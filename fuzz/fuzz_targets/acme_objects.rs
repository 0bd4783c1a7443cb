//! What an ACME CA answers, read as the client reads it (`derpd::acme`): the directory, an
//! order, an authorization (its challenges, its identifier as an address and its TLS-ALPN-01
//! SNI), a problem document (and its log line), a `Retry-After` value; and the account key file
//! (PEM, SEC1 and PKCS#8 DER, read by hand-written DER code). The first byte picks which, the
//! rest is the input.
//!
//! Checks: no panic; `Retry-After` is at most an hour; a key that reads writes back to a key
//! that reads the same.
#![no_main]

use std::sync::atomic::{AtomicIsize, Ordering};

use derpd::acme::order::{Answer, ChallengeKind, Next, OrderFlow, Proof, Solver};
use derpd::acme::{self, AccountKey, Authorization, Directory, Identifier, Order, Problem};
use libfuzzer_sys::fuzz_target;

/// Counts the proofs being served.
struct Count(AtomicIsize);

impl Solver for Count {
    fn kinds(&self) -> &[ChallengeKind] {
        &[ChallengeKind::Http01, ChallengeKind::TlsAlpn01]
    }
    fn present(&self, _: &Identifier, _: &Proof) -> Result<(), String> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn remove(&self, _: &Identifier, _: &Proof) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn order(answers: &[u8]) {
    thread_local! {
        static KEY: AccountKey = AccountKey::generate().expect("a key");
    }
    let solver = Count(AtomicIsize::new(0));
    KEY.with(|key| {
        let ids = [Identifier::for_host("192.0.2.1")];
        let account = Some(acme::new_account_payload(None));
        let mut flow = OrderFlow::new(&ids, None, account, key, &solver);
        let dir = Directory {
            new_nonce: "https://ca/nonce".into(),
            new_account: "https://ca/new-account".into(),
            new_order: "https://ca/new-order".into(),
            meta: Default::default(),
        };
        for body in answers.split(|&b| b == 0xff) {
            let _ = flow.request(&dir);
            let a = Answer {
                status: 200,
                location: Some("https://ca/order/1".into()),
                retry_after: None,
                body: body.to_vec(),
            };
            match flow.answer(a) {
                Ok(Next::Done(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    assert_eq!(solver.0.load(Ordering::Relaxed), 0, "a proof left served");
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => {
            if let Ok(d) = acme::parse::<Directory>("directory", rest) {
                let _ = d.meta.profiles.iter().any(|p| p == acme::SHORTLIVED);
            }
        }
        1 => {
            if let Ok(o) = acme::parse::<Order>("order", rest) {
                if let Some(p) = o.error {
                    let _ = p.to_string();
                }
            }
        }
        2 => {
            if let Ok(a) = acme::parse::<Authorization>("authorization", rest) {
                let _ = a.identifier.as_ip();
                let _ = a.identifier.alpn_sni();
                let _ = a.challenge("http-01");
                let _ = a.challenge("tls-alpn-01");
            }
        }
        3 => {
            if let Ok(p) = acme::parse::<Problem>("problem", rest) {
                let _ = p.is_bad_nonce();
                let _ = p.to_string();
            }
        }
        4 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                if let Some(w) = acme::retry_after(s) {
                    assert!(w.as_secs() <= 3600);
                }
            }
        }
        6 => order(rest),
        _ => {
            for key in [
                AccountKey::from_pem(rest),
                AccountKey::from_sec1(rest),
                AccountKey::from_pkcs8(rest),
            ]
            .into_iter()
            .flatten()
            {
                let again = AccountKey::from_pem(key.to_pem().as_bytes()).expect("written key reads");
                assert_eq!(again.jwk(), key.jwk());
                let again = AccountKey::from_pkcs8(&key.pkcs8()).expect("PKCS#8 reads");
                assert_eq!(again.jwk(), key.jwk());
            }
        }
    }
});
