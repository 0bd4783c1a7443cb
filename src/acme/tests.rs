//! The ACME core's unit tests: the JWS verified with ring against its JWK, the RFC 7638
//! thumbprint, identifiers and reverse-DNS names, the CA's objects, the TLS-ALPN-01
//! certificate and the CSR, the renewal rule and back-off.

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
    let v: Value = serde_json::from_str(&body).unwrap();
    let protected = unb64(v["protected"].as_str().unwrap());
    let header: Value = serde_json::from_slice(&protected).unwrap();
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
    let v: Value = serde_json::from_str(&body).unwrap();
    let header: Value = serde_json::from_slice(&unb64(v["protected"].as_str().unwrap())).unwrap();
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
    let jwk: Value = serde_json::from_str(k.jwk()).unwrap();
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
    assert!(d.meta.profiles.iter().any(|p| p == SHORTLIVED));
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
    assert!(matches!(san.value.general_names[0], GeneralName::IPAddress(b) if b == [192, 0, 2, 1]));

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
    assert_eq!(
        sans,
        [
            "DNSName(derp.example.net)",
            "IPAddress(20:01:0d:b8:00:00:00:00:00:00:00:00:00:00:00:01)"
        ]
    );
    // Signed by the certificate's key.
    let info = req.certification_request_info;
    let point = info.subject_pki.subject_public_key.data.to_vec();
    assert_eq!(&point[..], cert_key.public_key_raw());
    UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &point)
        .verify(info.raw, &req.signature_value.data)
        .expect("the CSR's signature verifies");
    assert!(csr(&[Identifier::dns("bad\u{e9}")], &cert_key.serialize_der()).is_err());
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
    b.reset();
    assert_eq!(b.next_wait(), Backoff::FIRST);
}

/// A solver that records what it serves; it can refuse.
#[derive(Default)]
struct Recorder {
    kinds: Vec<order::ChallengeKind>,
    served: std::sync::Mutex<Vec<String>>,
    log: std::sync::Mutex<Vec<String>>,
}

impl order::Solver for Recorder {
    fn kinds(&self) -> &[order::ChallengeKind] {
        &self.kinds
    }
    fn present(&self, id: &Identifier, proof: &order::Proof) -> Result<(), String> {
        let what = match proof {
            order::Proof::Http01 { token, .. } => format!("http {token}"),
            order::Proof::TlsAlpn01 { sni, .. } => format!("alpn {sni}"),
        };
        self.log
            .lock()
            .unwrap()
            .push(format!("present {} {what}", id.value));
        self.served.lock().unwrap().push(id.value.clone());
        Ok(())
    }
    fn remove(&self, id: &Identifier, _proof: &order::Proof) {
        self.log
            .lock()
            .unwrap()
            .push(format!("remove {}", id.value));
        self.served.lock().unwrap().retain(|v| *v != id.value);
    }
}

fn directory() -> Directory {
    Directory {
        new_nonce: "https://ca/nonce".into(),
        new_account: "https://ca/new-account".into(),
        new_order: "https://ca/new-order".into(),
        meta: Meta::default(),
    }
}

fn answer(body: &str) -> order::Answer {
    order::Answer {
        status: 200,
        location: Some("https://ca/order/1".into()),
        retry_after: None,
        body: body.as_bytes().to_vec(),
    }
}

const AUTHZ_PENDING: &str = r#"{"status":"pending","identifier":{"type":"ip","value":"192.0.2.1"},
    "challenges":[{"type":"dns-01","url":"https://ca/c/dns","status":"pending","token":"t0"},
                  {"type":"http-01","url":"https://ca/c/http","status":"pending","token":"t1"},
                  {"type":"tls-alpn-01","url":"https://ca/c/alpn","status":"pending","token":"t2"}]}"#;

fn order_json(status: &str, cert: bool) -> String {
    let cert = if cert {
        r#","certificate":"https://ca/cert/1""#
    } else {
        ""
    };
    format!(
        r#"{{"status":"{status}","authorizations":["https://ca/authz/1"],
            "finalize":"https://ca/order/1/fin"{cert}}}"#
    )
}

#[test]
fn an_order_goes_from_new_order_to_the_chain() {
    use order::{ChallengeKind, Next, OrderFlow};
    let key = AccountKey::generate().unwrap();
    let solver = Recorder {
        kinds: vec![ChallengeKind::Http01, ChallengeKind::TlsAlpn01],
        ..Recorder::default()
    };
    let ids = [Identifier::for_host("192.0.2.1")];
    let account = Some(new_account_payload(None));
    let mut flow = OrderFlow::new(&ids, Some(SHORTLIVED), account, &key, &solver);
    let mut sent = Vec::new();
    let mut step = |flow: &mut OrderFlow<'_>, body: &str| {
        let r = flow.request(&directory());
        sent.push(format!("{} {} {}", r.what, r.url, r.payload.is_some()));
        let mut a = answer(body);
        a.retry_after = Some(Duration::from_secs(3));
        flow.answer(a).unwrap()
    };
    // The account first (its URL is the answer's Location), then the order.
    let kid = step(&mut flow, "{}");
    assert!(matches!(kid, Next::Account(k) if k == "https://ca/order/1"));
    assert!(matches!(
        step(&mut flow, &order_json("pending", false)),
        Next::Now
    ));
    assert!(matches!(step(&mut flow, AUTHZ_PENDING), Next::Now));
    // The first kind the solver prefers that the CA offers: HTTP-01, served before the CA
    // is told to look.
    assert_eq!(*solver.served.lock().unwrap(), ["192.0.2.1"]);
    assert!(matches!(
        step(
            &mut flow,
            r#"{"status":"pending","url":"u","type":"http-01"}"#
        ),
        Next::Now
    ));
    let pending = AUTHZ_PENDING.to_string();
    assert!(matches!(step(&mut flow, &pending), Next::Wait(Some(w)) if w.as_secs() == 3));
    let valid = pending.replacen("pending", "valid", 1);
    assert!(matches!(step(&mut flow, &valid), Next::Now));
    assert!(
        solver.served.lock().unwrap().is_empty(),
        "removed once valid"
    );
    assert!(matches!(
        step(&mut flow, &order_json("pending", false)),
        Next::Wait(_)
    ));
    assert!(matches!(
        step(&mut flow, &order_json("ready", false)),
        Next::Now
    ));
    // Finalized, not yet valid: polled at once, then valid with its certificate URL.
    assert!(matches!(
        step(&mut flow, &order_json("processing", false)),
        Next::Now
    ));
    assert!(matches!(
        step(&mut flow, &order_json("valid", true)),
        Next::Now
    ));
    let pem = "-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n";
    let Next::Done(issued) = step(&mut flow, pem) else {
        panic!("want the chain");
    };
    assert_eq!(issued.chain_pem, pem);
    assert!(crate::p256::Parts::from_pkcs8(&issued.key_pkcs8).is_some());
    assert_eq!(
        sent,
        [
            "newAccount https://ca/new-account true",
            "newOrder https://ca/new-order true",
            "authorization https://ca/authz/1 false",
            "challenge https://ca/c/http true",
            "authorization https://ca/authz/1 false",
            "authorization https://ca/authz/1 false",
            "order https://ca/order/1 false",
            "order https://ca/order/1 false",
            "finalize https://ca/order/1/fin true",
            "order https://ca/order/1 false",
            "certificate https://ca/cert/1 false",
        ]
    );
    let log = solver.log.lock().unwrap().clone();
    assert_eq!(log, ["present 192.0.2.1 http t1", "remove 192.0.2.1"]);
}

#[test]
fn a_ready_order_is_finalized_without_polling() {
    use order::{Next, OrderFlow};
    let key = AccountKey::generate().unwrap();
    let solver = Recorder::default();
    let ids = [Identifier::dns("derp.example.net")];
    let mut flow = OrderFlow::new(&ids, None, None, &key, &solver);
    assert_eq!(flow.request(&directory()).what, "newOrder");
    let body = order_json("ready", false).replace(r#""https://ca/authz/1""#, "");
    assert!(matches!(flow.answer(answer(&body)).unwrap(), Next::Now));
    let r = flow.request(&directory());
    assert_eq!(
        (r.what, r.url.as_str()),
        ("finalize", "https://ca/order/1/fin")
    );
    let payload: Value = serde_json::from_str(&r.payload.unwrap()).unwrap();
    let csr_der = unb64(payload["csr"].as_str().unwrap());
    use x509_parser::prelude::FromDer as _;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der).unwrap();
    assert!(req.requested_extensions().is_some());
}

#[test]
fn a_failed_challenge_says_why_and_stops_serving() {
    use order::{ChallengeKind, Error, OrderFlow};
    let key = AccountKey::generate().unwrap();
    let solver = Recorder {
        kinds: vec![ChallengeKind::TlsAlpn01],
        ..Recorder::default()
    };
    let ids = [Identifier::for_host("192.0.2.1")];
    let mut flow = OrderFlow::new(&ids, None, None, &key, &solver);
    flow.answer(answer(&order_json("pending", false))).unwrap();
    flow.answer(answer(AUTHZ_PENDING)).unwrap();
    assert_eq!(
        solver.log.lock().unwrap()[0],
        "present 192.0.2.1 alpn 1.2.0.192.in-addr.arpa"
    );
    assert_eq!(flow.request(&directory()).url, "https://ca/c/alpn");
    flow.answer(answer("{}")).unwrap();
    let failed = AUTHZ_PENDING.replacen("pending", "invalid", 1).replace(
        r#""token":"t2"}"#,
        r#""token":"t2","error":{"type":"urn:ietf:params:acme:error:connection","detail":"refused"}}"#,
    );
    match flow.answer(answer(&failed)) {
        Err(Error::Ca { what, problem, .. }) => {
            assert_eq!(what, "tls-alpn-01 challenge for 192.0.2.1");
            assert_eq!(problem.to_string(), "connection: refused");
        }
        other => panic!("want the CA's problem, got {other:?}"),
    }
    assert!(solver.served.lock().unwrap().is_empty());
    // A proof still served when the flow is given up (a deadline, a shutdown) is removed.
    let mut flow = OrderFlow::new(&ids, None, None, &key, &solver);
    flow.answer(answer(&order_json("pending", false))).unwrap();
    flow.answer(answer(AUTHZ_PENDING)).unwrap();
    assert_eq!(solver.served.lock().unwrap().len(), 1);
    drop(flow);
    assert!(solver.served.lock().unwrap().is_empty());
    // Nothing the solver can serve: an error naming what the CA offers.
    let none = Recorder::default();
    let mut flow = OrderFlow::new(&ids, None, None, &key, &none);
    flow.answer(answer(&order_json("pending", false))).unwrap();
    let e = flow.answer(answer(AUTHZ_PENDING)).unwrap_err().to_string();
    assert!(e.contains("offers dns-01, http-01, tls-alpn-01 for"), "{e}");
}
