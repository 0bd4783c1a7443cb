//! The TLS stream against rustls's client over loopback TCP (futures-rustls, as the mesh and
//! the tests' DERP clients use it): data both ways in small and large pieces, data that comes
//! with the end of the handshake, a KeyUpdate, TLS 1.2, close_notify both ways, garbage after
//! the handshake, and the buffers going back to the cache when idle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use futures_rustls::TlsConnector;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::Async;

use super::*;
use crate::tls::testutil::TempDir;
use crate::trust::Trust;

/// A server configuration as derpd's (a self-signed IP certificate), with `versions`.
fn server(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<rustls::ServerConfig> {
    let tmp = TempDir::new();
    let cert = crate::tls::load_or_create("127.0.0.1", &tmp.0).unwrap();
    let cfg = crate::tls::server_config(&cert, "127.0.0.1", [7; 32], true).unwrap();
    let mut cfg = (*cfg).clone();
    cfg.enable_secret_extraction = true;
    if versions.len() == 1 {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(cfg.cert_resolver.clone());
        c.enable_secret_extraction = true;
        return Arc::new(c);
    }
    Arc::new(cfg)
}

fn client(tls12: bool) -> TlsConnector {
    let cfg = crate::tls::testutil::client_config(tls12, Trust::AnyCertificate).unwrap();
    TlsConnector::from(Arc::new(cfg))
}

/// A connected pair: rustls's client, and our server stream.
async fn pair(
    config: Arc<rustls::ServerConfig>,
    tls12: bool,
    first: &[u8],
) -> (
    futures_rustls::client::TlsStream<Async<TcpStream>>,
    TlsStream,
) {
    let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).unwrap();
    let addr = listener.get_ref().local_addr().unwrap();
    let first = first.to_vec();
    let dial = async move {
        let tcp = Async::<TcpStream>::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut c = client(tls12).connect(name, tcp).await.unwrap();
        if !first.is_empty() {
            c.write_all(&first).await.unwrap();
            c.flush().await.unwrap();
        }
        c
    };
    let serve = async {
        let (tcp, _) = listener.accept().await.unwrap();
        accept(config, tcp).await.unwrap()
    };
    smol::future::zip(dial, serve).await
}

#[test]
fn data_goes_both_ways() {
    smol::block_on(async {
        for tls12 in [false, true] {
            let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
                &[&rustls::version::TLS12]
            } else {
                &[&rustls::version::TLS13]
            };
            let (mut c, mut s) = pair(server(versions), tls12, b"first words").await;
            assert_eq!(s.tx.is_tls13(), !tls12);
            let mut got = [0; 11];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"first words");
            // Large: several records each way, written as one vectored batch.
            let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            let (a, b) = big.split_at(1234);
            let write = async {
                let mut rest = [IoSlice::new(a), IoSlice::new(b)];
                let mut slices = &mut rest[..];
                let mut left = big.len();
                while left > 0 {
                    let n = s.write_vectored(slices).await.unwrap();
                    left -= n;
                    IoSlice::advance_slices(&mut slices, n);
                }
                s.flush().await.unwrap();
                s
            };
            let read = async {
                let mut back = vec![0; big.len()];
                c.read_exact(&mut back).await.unwrap();
                assert_eq!(back, big);
                c.write_all(&big).await.unwrap();
                c.flush().await.unwrap();
                c
            };
            let (mut s, mut c) = smol::future::zip(write, read).await;
            let mut back = vec![0; big.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, big);
            // Idle: both buffers went back.
            assert!(s.rd.data.is_none() && s.wr.data.is_none());
            // close_notify both ways.
            s.close().await.unwrap();
            let mut end = Vec::new();
            c.read_to_end(&mut end).await.unwrap();
            assert!(end.is_empty());
            c.close().await.unwrap();
            assert_eq!(s.read(&mut [0; 8]).await.unwrap(), 0);
        }
    })
}

#[test]
fn a_client_key_update_is_followed() {
    smol::block_on(async {
        let (mut c, mut s) = pair(server(&[&rustls::version::TLS13]), false, b"").await;
        c.write_all(b"before").await.unwrap();
        c.flush().await.unwrap();
        c.get_mut().1.refresh_traffic_keys().unwrap();
        c.write_all(b"after").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0; 11];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"beforeafter");
        s.write_all(b"still here").await.unwrap();
        s.flush().await.unwrap();
        let mut got = [0; 10];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still here");
        // rustls's client asks for our KeyUpdate with its own: ours was sent, and what follows
        // is sealed with the new keys (the client reads it).
        assert!(!s.key_update_due);
        assert_eq!(s.tx.seq(), 1);
    })
}

#[test]
fn garbage_after_the_handshake_is_an_error() {
    smol::block_on(async {
        let (c, mut s) = pair(server(&[&rustls::version::TLS13]), false, b"").await;
        let (mut tcp, _) = c.into_inner();
        // A record header that announces a body, then bytes that are no record.
        tcp.write_all(&[23, 3, 3, 0, 40]).await.unwrap();
        tcp.write_all(&[0x55; 40]).await.unwrap();
        let e = s.read(&mut [0; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // A header no record has.
        let (c, mut s) = pair(server(&[&rustls::version::TLS13]), false, b"").await;
        let (mut tcp, _) = c.into_inner();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(s.read(&mut [0; 64]).await.is_err());
    })
}
