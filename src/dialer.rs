//! The client side of a DERP login over any byte stream: the HTTP upgrade request, the `101`
//! response head, ServerKey, ClientInfo and ServerInfo. A mesh link logs in to its peer with
//! it ([`crate::mesh`]), and the tests log in to derpd with it (over blocking sockets, through
//! `smol::io::AssertAsync`). The benchmark's load generator drives rustls by hand for
//! speed and takes the same steps with the same pure functions ([`handshake`],
//! [`httpc::parse_head`]).
//!
//! The stream is one value that reads and writes (a mesh link's [`crate::net::LockedStream`],
//! a test's socket); bytes the server sent after the response head are read before the
//! stream, and those left after ServerInfo are handed back in [`Login::leftover`].

use std::io;

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, HEADER_LEN};
use crate::handshake::{self, SessionBox};
use crate::httpc;
use crate::key::{NodePrivate, NodePublic};

/// The most a response head may take.
pub const MAX_RESPONSE_HEAD: usize = 8 << 10;
/// The most a ServerKey frame may take (magic and key are 40 bytes; derper sends no more).
pub const MAX_SERVER_KEY_FRAME: u32 = 1024;

/// Why a login did not complete.
#[derive(Debug)]
pub enum DialError {
    Io(io::Error),
    /// The server answered the upgrade with another status (its status line).
    Refused(String),
    /// The server broke the protocol (what it did).
    Protocol(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Refused(status) => write!(f, "upgrade refused: {status:?}"),
            Self::Protocol(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for DialError {}

impl DialError {
    /// The same error, its text prefixed with `what` (`reading ServerInfo: …`).
    fn context(self, what: &str) -> Self {
        match self {
            Self::Io(e) => Self::Io(io::Error::new(e.kind(), format!("{what}: {e}"))),
            Self::Refused(s) => Self::Refused(s),
            Self::Protocol(s) => Self::Protocol(format!("{what}: {s}")),
        }
    }
}

impl From<io::Error> for DialError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<handshake::ServerLoginError> for DialError {
    fn from(e: handshake::ServerLoginError) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// A completed login.
#[derive(Debug)]
pub struct Login {
    /// The server's public key, from ServerKey.
    pub server_key: NodePublic,
    /// The ServerInfo JSON, opened.
    pub server_info: Vec<u8>,
    /// Bytes the server sent after ServerInfo that were already read: the first frames of
    /// the session, to be read before the stream.
    pub leftover: Vec<u8>,
}

/// What the client says: the upgrade request's `Host` and `User-Agent`, its key, and the
/// maximum ServerInfo frame it accepts.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub host: &'a str,
    pub user_agent: &'a str,
    pub key: &'a NodePrivate,
    pub max_server_info: u32,
}

/// Logs in over `stream`: the upgrade request, the `101` head, ServerKey; then
/// `client_info(server_key)` gives the ClientInfo JSON (or an error, e.g. for a server that
/// is the client itself), which is sent sealed; then ServerInfo.
pub async fn login<S, E>(
    stream: &mut S,
    client: Client<'_>,
    client_info: impl FnOnce(&NodePublic) -> Result<Vec<u8>, E>,
) -> Result<Login, E>
where
    S: AsyncRead + AsyncWrite + Unpin,
    E: From<DialError>,
{
    let req = handshake::upgrade_request(client.host, client.user_agent);
    write(stream, req.as_bytes()).await?;
    let mut rd = Buffered {
        buf: read_response_head(stream).await?,
        pos: 0,
    };
    let (t, payload) = rd
        .frame(stream, MAX_SERVER_KEY_FRAME)
        .await
        .map_err(|e| e.context("reading ServerKey"))?;
    let server_key = handshake::parse_server_key(t, &payload).map_err(DialError::from)?;
    let json = client_info(&server_key)?;
    let bx = SessionBox::new(client.key, &server_key);
    write(stream, &bx.client_info_frame(&client.key.public(), &json)).await?;
    let (t, payload) = rd
        .frame(stream, client.max_server_info)
        .await
        .map_err(|e| e.context("reading ServerInfo"))?;
    let server_info = handshake::read_server_info(&bx, t, &payload).map_err(DialError::from)?;
    Ok(Login {
        server_key,
        server_info,
        leftover: rd.buf.split_off(rd.pos),
    })
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), DialError> {
    stream.write_all(bytes).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads the HTTP response head ([`httpc::parse_head`]) and wants `101`. Returns the bytes
/// read after it.
pub async fn read_response_head<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Vec<u8>, DialError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Err(DialError::Protocol(
                "connection closed before the HTTP response".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((head, end)) = httpc::parse_head(&buf).map_err(DialError::Protocol)? {
            if head.status != 101 {
                return Err(DialError::Refused(head.status_line));
            }
            return Ok(buf.split_off(end));
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(DialError::Protocol("HTTP response head too long".into()));
        }
    }
}

/// Reads one whole frame of at most `max` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: u32,
) -> Result<(u8, Vec<u8>), DialError> {
    let mut h = [0u8; HEADER_LEN];
    rd.read_exact(&mut h).await?;
    frame_body(rd, &h, max).await
}

async fn frame_body<R: AsyncRead + Unpin>(
    rd: &mut R,
    h: &[u8; HEADER_LEN],
    max: u32,
) -> Result<(u8, Vec<u8>), DialError> {
    let (t, len) = frame::decode_header(h);
    if len > max {
        return Err(DialError::Protocol(format!(
            "frame {t:#04x} of {len} bytes is too large"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    rd.read_exact(&mut payload).await?;
    Ok((t, payload))
}

/// Bytes already read (after the response head), consumed before the stream.
struct Buffered {
    buf: Vec<u8>,
    pos: usize,
}

impl Buffered {
    async fn frame<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        max: u32,
    ) -> Result<(u8, Vec<u8>), DialError> {
        let mut rd = (&self.buf[self.pos..]).chain(&mut *stream);
        let mut h = [0u8; HEADER_LEN];
        rd.read_exact(&mut h).await?;
        let frame = frame_body(&mut rd, &h, max).await;
        // What the chain took from the buffer: all of it, or the frame's length.
        let (first, _) = rd.into_inner();
        self.pos = self.buf.len() - first.len();
        frame
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::frame::FrameType;

    /// A scripted server: everything it will send, in one buffer, given out `chunk` bytes a
    /// read; what the client wrote.
    struct Script {
        rd: io::Cursor<Vec<u8>>,
        chunk: usize,
        written: Vec<u8>,
    }

    impl Script {
        fn new(bytes: Vec<u8>, chunk: usize) -> Self {
            Self {
                rd: io::Cursor::new(bytes),
                chunk,
                written: Vec::new(),
            }
        }
    }

    impl AsyncRead for Script {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            std::task::Poll::Ready(io::Read::read(&mut self.rd, &mut buf[..n]))
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn server_frames(server: &NodePrivate, client: &NodePublic, after: &[u8]) -> Vec<u8> {
        let mut out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n".to_vec();
        out.extend_from_slice(&handshake::server_key_frame(&server.public()));
        let bx = SessionBox::new(server, client);
        out.extend_from_slice(&handshake::server_info_frame(&bx));
        out.extend_from_slice(after);
        out
    }

    #[test]
    fn logs_in_and_hands_back_what_followed() {
        let server = NodePrivate::generate();
        let client = NodePrivate::generate();
        let mut keep_alive = [0u8; HEADER_LEN];
        frame::encode_header(&mut keep_alive, FrameType::KeepAlive, 0);
        let c = Client {
            host: "derp.example",
            user_agent: "test",
            key: &client,
            max_server_info: 1 << 10,
        };
        // One byte a read (every boundary), and reads that take the frames with the head.
        for chunk in [1, 7, 4096] {
            let bytes = server_frames(&server, &client.public(), &keep_alive);
            let mut s = Script::new(bytes, chunk);
            let login = smol::block_on(login(&mut s, c, |k| {
                assert_eq!(*k, server.public());
                Ok::<_, DialError>(br#"{"version":2}"#.to_vec())
            }))
            .unwrap();
            assert_eq!(login.server_key, server.public());
            assert_eq!(login.server_info, br#"{"version":2}"#);
            // The KeepAlive after ServerInfo: handed back if it was read, else still unread.
            let mut rest = login.leftover.clone();
            io::Read::read_to_end(&mut s.rd, &mut rest).unwrap();
            assert_eq!(rest, keep_alive, "chunk {chunk}");
            assert_eq!(login.leftover.is_empty(), chunk < 512, "chunk {chunk}");
            let req = handshake::upgrade_request("derp.example", "test");
            assert!(s.written.starts_with(req.as_bytes()));
            let ci = &s.written[req.len()..];
            assert_eq!(ci[0], FrameType::ClientInfo as u8);
        }
    }

    #[test]
    fn refusals_and_broken_servers_are_errors() {
        let client = NodePrivate::generate();
        let c = Client {
            host: "h",
            user_agent: "t",
            key: &client,
            max_server_info: 1 << 10,
        };
        let run = |bytes: Vec<u8>| {
            let mut s = Script::new(bytes, 64);
            smol::block_on(login(&mut s, c, |_| Ok::<_, DialError>(b"{}".to_vec())))
                .unwrap_err()
                .to_string()
        };
        let e = run(b"HTTP/1.1 426 Upgrade Required\r\n\r\n".to_vec());
        assert!(e.contains("upgrade refused") && e.contains("426"), "{e}");
        let e = run(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x01\xff\xff\xff\xff".to_vec());
        assert!(
            e.starts_with("reading ServerKey: ") && e.contains("too large"),
            "{e}"
        );
        // A server that closes after ServerKey (a refused login, as derper and derpd refuse).
        let server = NodePrivate::generate();
        let mut refused = server_frames(&server, &client.public(), &[]);
        let info = handshake::server_info_frame(&SessionBox::new(&server, &client.public()));
        refused.truncate(refused.len() - info.len());
        let e = run(refused);
        assert!(e.starts_with("reading ServerInfo: "), "{e}");
        let e = run(Vec::new());
        assert!(e.contains("closed before the HTTP response"), "{e}");
        let e = run(vec![b'a'; MAX_RESPONSE_HEAD + 600]);
        assert!(!e.is_empty(), "{e}");
        // A client that refuses the server's key stops before ClientInfo.
        let server = NodePrivate::generate();
        let mut s = Script::new(server_frames(&server, &client.public(), &[]), 64);
        let e = smol::block_on(login(&mut s, c, |_| {
            Err(DialError::Protocol("self".into()))
        }));
        assert_eq!(e.unwrap_err().to_string(), "self");
        assert_eq!(s.written, handshake::upgrade_request("h", "t").as_bytes());
    }
}
