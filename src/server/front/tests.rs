//! The front door without sockets: [`route`] on parsed heads, and [`read_head`] and
//! [`respond`] over in-memory pipes (`piper`), as `session`'s tests drive a session.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::task::{Context, Poll};

use super::*;
use crate::http::HeadError;

/// A client's address, for the log lines.
const REMOTE: &str = "192.0.2.1:41641";

/// Runs `fut` to its end, or fails the test after 5 s: a front door that forgot to close or to
/// answer would otherwise hang it.
fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    smol::block_on(fut.or(async {
        Timer::after(Duration::from_secs(5)).await;
        panic!("timed out after 5 s")
    }))
}

/// One end of an in-memory connection: a pipe each way.
struct End {
    rd: piper::Reader,
    wr: piper::Writer,
}

/// Both ends of an in-memory connection whose pipes hold `cap` bytes each: (client, server).
fn pair(cap: usize) -> (End, End) {
    let (client_rd, server_wr) = piper::pipe(cap);
    let (server_rd, client_wr) = piper::pipe(cap);
    let client = End {
        rd: client_rd,
        wr: client_wr,
    };
    let server = End {
        rd: server_rd,
        wr: server_wr,
    };
    (client, server)
}

impl AsyncRead for End {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl AsyncWrite for End {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.wr).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_close(cx)
    }
}

/// A request head: `extra` is more header lines, each ending in CRLF.
fn head(method: &str, target: &str, extra: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: derp.example.com\r\n{extra}\r\n")
}

fn parse(head: &str) -> Request {
    http::parse_head(head.as_bytes()).unwrap().unwrap().0
}

/// The route for `head` on listener `which`, DERP enabled and the default home page.
fn action(head: &str, which: Listener) -> Action {
    route_with(head, which, true, &Home::Default)
}

fn route_with(head: &str, which: Listener, derp_enabled: bool, home: &Home) -> Action {
    route(
        &parse(head),
        REMOTE.parse().unwrap(),
        which,
        derp_enabled,
        home,
    )
}

/// The response `action` gives; panics on any other action.
fn answer(head: &str, which: Listener) -> String {
    text(action(head, which))
}

fn text(a: Action) -> String {
    match a {
        Action::Respond(resp) => String::from_utf8(resp).unwrap(),
        other => panic!("not a response: {other:?}"),
    }
}

/// The head of a response: all up to and including the blank line.
fn head_part(resp: &str) -> &str {
    let end = resp.find("\r\n\r\n").unwrap() + 4;
    &resp[..end]
}

const DERP_UPGRADE: &str = "Upgrade: DERP\r\nConnection: Upgrade\r\n";
/// A WebSocket handshake asking for `derp`, with RFC 6455's sample key.
const WS_DERP: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Protocol: derp\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[test]
fn probes_answer_get_and_head_and_refuse_other_methods() {
    for path in ["/derp/probe", "/derp/latency-check"] {
        for method in ["GET", "HEAD"] {
            let r = answer(&head(method, path, ""), Listener::Main);
            assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
            assert!(r.contains("Access-Control-Allow-Origin: *\r\n"), "{r}");
            assert!(
                r.ends_with("Content-Length: 0\r\nConnection: close\r\n\r\n"),
                "{r}"
            );
        }
        let r = answer(&head("POST", path, ""), Listener::Main);
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.ends_with("bogus probe method\n"), "{r}");
        // Probes do not depend on `--derp`.
        let r = text(route_with(
            &head("GET", path, ""),
            Listener::Main,
            false,
            &Home::Blank,
        ));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    }
}

#[test]
fn derp_upgrade_plain_websocket_none_and_other() {
    let derp = |extra: &str| action(&head("GET", "/derp", extra), Listener::Main);
    assert!(matches!(derp(DERP_UPGRADE), Action::Derp));
    // A WebSocket client that does not offer `derp` gets plain DERP, as derper allows.
    let ws_no_derp = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    assert!(matches!(derp(ws_no_derp), Action::Derp));
    // The WebSocket handshake, version 13, offering `derp`: accepted with RFC 6455's answer.
    match derp(&format!("{WS_DERP}Sec-WebSocket-Version: 13\r\n")) {
        Action::WebSocket(acc) => {
            let acc = format!("{acc:?}");
            assert!(acc.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
            assert!(acc.contains("Sec-WebSocket-Protocol: derp"), "{acc}");
            assert!(acc.contains("derp: true"), "{acc}");
        }
        other => panic!("{other:?}"),
    }
    // The same with a version it does not speak: refused with the version it does.
    let r = text(derp(&format!("{WS_DERP}Sec-WebSocket-Version: 8\r\n")));
    assert!(
        r.starts_with("HTTP/1.1 400 Bad Request\r\nSec-WebSocket-Version: 13\r\n"),
        "{r}"
    );
    // No upgrade, or one that is neither DERP nor WebSocket: 426.
    for extra in ["", "Upgrade: h2c\r\nConnection: Upgrade\r\n"] {
        let r = text(derp(extra));
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{r}");
        assert!(r.ends_with("DERP requires connection upgrade\n"), "{r}");
    }
}

#[test]
fn derp_disabled_is_404_and_said_on_the_home_page() {
    let off = |h: &str| text(route_with(h, Listener::Main, false, &Home::Default));
    for extra in [DERP_UPGRADE, WS_DERP, ""] {
        let r = off(&head("GET", "/derp", extra));
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        assert!(r.ends_with("derp server disabled\n"), "{r}");
    }
    assert!(off(&head("GET", "/", "")).contains("<p>Status: disabled</p>"));
    assert!(!answer(&head("GET", "/", ""), Listener::Main).contains("Status: disabled"));
}

#[test]
fn generate_204_echoes_a_well_formed_challenge_only() {
    let g = |extra: &str| answer(&head("GET", "/generate_204", extra), Listener::Main);
    let r = g("X-Tailscale-Challenge: abc-1.2_3:4\r\n");
    assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
    assert!(
        r.contains("\r\nX-Tailscale-Response: response abc-1.2_3:4\r\n"),
        "{r}"
    );
    assert!(!r.contains("Content-Length"), "{r}");
    for extra in ["", "X-Tailscale-Challenge: a<b\r\n"] {
        let r = g(extra);
        assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
        assert!(!r.contains("X-Tailscale-Response"), "{r}");
    }
}

#[test]
fn robots_home_pages_and_head_requests() {
    let r = answer(&head("GET", "/robots.txt", ""), Listener::Main);
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\nUser-agent: *\nDisallow: /\n"), "{r}");
    // HEAD: the same head, no body.
    let h = answer(&head("HEAD", "/robots.txt", ""), Listener::Main);
    assert_eq!(h, head_part(&r));
    // `/` and every unmatched path is the home page.
    for target in ["/", "/elsewhere?x=1", "/derpx"] {
        let r = answer(&head("GET", target, ""), Listener::Main);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{target}: {r}");
        assert!(r.contains("<h1>DERP</h1>"), "{target}: {r}");
        let h = answer(&head("HEAD", target, ""), Listener::Main);
        assert_eq!(h, head_part(&r));
    }
    let home = |h: &Home| text(route_with(&head("GET", "/", ""), Listener::Main, true, h));
    let blank = home(&Home::Blank);
    assert!(blank.starts_with("HTTP/1.1 200 OK\r\n"), "{blank}");
    assert!(
        blank.ends_with("Content-Length: 0\r\nConnection: close\r\n\r\n"),
        "{blank}"
    );
    let away = home(&Home::Redirect("https://example.com/".into()));
    assert!(away.starts_with("HTTP/1.1 302 Found\r\n"), "{away}");
    assert!(
        away.contains("\r\nLocation: https://example.com/\r\n"),
        "{away}"
    );
}

/// ACME HTTP-01 on port 80 only: the token goes to the caller (the keeper's challenges); on the
/// main listener the path is nothing special. The answers: the key authorization, or 404.
#[test]
fn acme_challenges_on_port_80() {
    let target = "/.well-known/acme-challenge/tok-1_x";
    match action(&head("GET", target, ""), Listener::Port80) {
        Action::AcmeHttp01(token) => assert_eq!(token, "tok-1_x"),
        other => panic!("{other:?}"),
    }
    let main = text(action(&head("GET", target, ""), Listener::Main));
    assert!(
        main.starts_with("HTTP/1.1 200 OK\r\n"),
        "the home page: {main}"
    );
    let ok = String::from_utf8(http::acme_challenge(Some("tok-1_x.thumb"), false)).unwrap();
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.ends_with("\r\n\r\ntok-1_x.thumb"), "{ok}");
    let none = String::from_utf8(http::acme_challenge(None, false)).unwrap();
    assert!(none.starts_with("HTTP/1.1 404 Not Found\r\n"), "{none}");
}

#[test]
fn port_80_redirects_all_but_generate_204_and_debug() {
    let p80 = |method: &str, target: &str, extra: &str| {
        action(&head(method, target, extra), Listener::Port80)
    };
    for method in ["GET", "HEAD"] {
        let r = text(p80(method, "/x?y=1", ""));
        assert!(r.starts_with("HTTP/1.1 302 Found\r\n"), "{r}");
        assert!(
            r.contains("\r\nLocation: https://derp.example.com/x?y=1\r\n"),
            "{r}"
        );
    }
    // Even the DERP upgrade and the probes: port 80 is not the DERP port.
    let r = text(p80("GET", "/derp", DERP_UPGRADE));
    assert!(r.starts_with("HTTP/1.1 302 Found\r\n"), "{r}");
    let r = text(p80("GET", "/derp/probe", ""));
    assert!(r.starts_with("HTTP/1.1 302 Found\r\n"), "{r}");
    let r = text(p80("POST", "/", ""));
    assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
    assert!(r.ends_with("Use HTTPS\n"), "{r}");
    let r = text(p80("GET", "/generate_204", "X-Tailscale-Challenge: c1\r\n"));
    assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
    assert!(r.contains("X-Tailscale-Response: response c1\r\n"), "{r}");
    // `/debug…` goes to the main routes, where the debug pages' access rule applies.
    for target in ["/debug", "/debug/", "/debug/varz?x"] {
        assert!(matches!(p80("GET", target, ""), Action::Debug), "{target}");
        let main = action(&head("GET", target, ""), Listener::Main);
        assert!(matches!(main, Action::Debug), "{target}");
    }
    // A target that only starts with `/debug` passes the port-80 check, and the main routes
    // give it the home page (as today).
    let r = text(p80("GET", "/debugger", ""));
    assert!(r.contains("<h1>DERP</h1>"), "{r}");
}

/// The whole front door of one plain request over pipes: the head, its route, the response,
/// then the close (the client reads to EOF while the server's end is still alive).
#[test]
fn a_plain_request_is_answered_and_closed() {
    let (mut client, mut server) = pair(64 << 10);
    run(async {
        let h = head("GET", "/robots.txt", "");
        client.write_all(h.as_bytes()).await.unwrap();
        let (req, left) = read_head(&mut server).await.unwrap();
        assert!(left.is_empty());
        let resp = text(route(
            &req,
            REMOTE.parse().unwrap(),
            Listener::Main,
            true,
            &Home::Default,
        ));
        respond(&mut server, resp.as_bytes(), Duration::from_secs(5))
            .await
            .unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, http::robots(false));
        drop(server);
    });
}

#[test]
fn respond_gives_up_at_its_deadline() {
    // A client that never reads: the 64-byte pipe fills and the write waits.
    let (_client, mut server) = pair(64);
    let r = run(respond(
        &mut server,
        &http::robots(false),
        Duration::from_millis(50),
    ));
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
}

#[test]
fn fast_start_bytes_after_the_head_are_returned() {
    let (mut client, mut server) = pair(64 << 10);
    let login = [0x02, 0, 0, 0, 9, 1, 2, 3];
    run(async {
        let h = head(
            "GET",
            "/derp",
            &format!("{DERP_UPGRADE}Derp-Fast-Start: 1\r\n"),
        );
        client
            .write_all(&[h.as_bytes(), &login].concat())
            .await
            .unwrap();
        let (req, left) = read_head(&mut server).await.unwrap();
        assert!(req.fast_start);
        assert_eq!((req.path.as_str(), req.upgrade.as_str()), ("/derp", "derp"));
        assert_eq!(left, login);
        // Nothing is answered: the login is the client's to continue.
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back.is_empty());
    });
}

#[test]
fn a_head_split_over_many_small_writes_is_read_whole() {
    // 3-byte pipes: the reader sees the head a few bytes at a time.
    let (mut client, mut server) = pair(3);
    let h = head("GET", "/derp", DERP_UPGRADE);
    let write = async {
        for b in h.as_bytes() {
            client.write_all(&[*b]).await.unwrap();
            smol::future::yield_now().await;
        }
        client
    };
    let (mut client, got) = run(smol::future::zip(write, read_head(&mut server)));
    let (req, left) = got.unwrap();
    assert_eq!(req, parse(&h));
    assert!(left.is_empty());
    assert!(client.rd.is_empty());
    drop(server);
    let mut back = Vec::new();
    run(client.read_to_end(&mut back)).unwrap();
    assert!(back.is_empty());
}

/// Sends `input`, reads it as a head on the server's end, then closes that end. Returns what
/// `read_head` said and all the client read back.
fn refused(input: &[u8]) -> (FrontError, String) {
    let (mut client, mut server) = pair(64 << 10);
    run(async {
        client.write_all(input).await.unwrap();
        let e = read_head(&mut server).await.unwrap_err();
        // At most one byte past the limit is read.
        assert!(input.len() - client.wr.len() <= http::MAX_HEAD_LEN + 1);
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        (e, String::from_utf8(back).unwrap())
    })
}

#[test]
fn an_over_long_head_is_answered_431_then_closed() {
    let long = head(
        "GET",
        "/",
        &format!("X-Long: {}\r\n", "a".repeat(http::MAX_HEAD_LEN)),
    );
    let many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
    for input in [long, head("GET", "/", &many)] {
        let (e, back) = refused(input.as_bytes());
        assert!(matches!(e, FrontError::Head(HeadError::TooLarge)), "{e}");
        let want = http::head_error(&HeadError::TooLarge);
        assert_eq!(back.as_bytes(), want);
        assert!(back.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    }
}

#[test]
fn a_malformed_head_is_answered_400_as_gos_server_does() {
    // A header line without a colon, and a TLS ClientHello on a plain listener.
    for input in [
        &b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let (e, back) = refused(input);
        assert!(
            matches!(e, FrontError::Head(HeadError::Malformed(_))),
            "{e}"
        );
        assert!(back.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{back}");
        assert!(back.ends_with("\r\n\r\nmalformed request\n"), "{back}");
    }
}

#[test]
fn eof_before_a_whole_head_is_an_error_and_answered_with_nothing() {
    for input in [&b""[..], b"GET / HT"] {
        let (client, mut server) = pair(64 << 10);
        let End {
            rd: mut back_rd,
            mut wr,
        } = client;
        let e = run(async {
            wr.write_all(input).await.unwrap();
            drop(wr);
            read_head(&mut server).await.unwrap_err()
        });
        match e {
            FrontError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other}"),
        }
        drop(server);
        let mut back = Vec::new();
        run(back_rd.read_to_end(&mut back)).unwrap();
        assert!(back.is_empty());
    }
}
