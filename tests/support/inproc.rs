//! Test helpers: an in-process server on 127.0.0.1:0 and a raw, blocking DERP client.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use derpd::config::Config;
use derpd::dialer;
use derpd::handshake;
use derpd::key::{NodePrivate, NodePublic};
use derpd::server::Server;

/// Read timeout for every test socket: a hung server fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn start(cfg: Config) -> Server {
    let _ = simple_logger::SimpleLogger::new()
        .with_level(log::LevelFilter::Warn)
        .env()
        .init();
    Server::start(cfg).expect("server starts")
}

pub fn start_dev() -> Server {
    start(Config::dev_loopback())
}

/// Polls `cond` until it holds or 5 s pass.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends raw bytes and returns everything the server sends back until it closes.
pub fn http_exchange(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(req).unwrap();
    // A reset after the server's reply (it closes with our bytes unread) still ends the read.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP connection from `src` (any address of 127.0.0.0/8: Linux routes all of it to `lo`) to
/// `dst`, for tests of per-address limits.
pub fn connect_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{self as rn, AddressFamily, SocketFlags, SocketType};
    let fd = rn::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rn::bind(&fd, &SocketAddr::new(src.into(), 0))?;
    rn::connect(&fd, &dst)?;
    Ok(TcpStream::from(fd))
}

/// A frame as received: type and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub t: u8,
    pub payload: Vec<u8>,
}

pub struct DerpClient<S: Read + Write = TcpStream> {
    pub key: NodePrivate,
    pub server_key: NodePublic,
    pub s: S,
}

impl DerpClient<TcpStream> {
    /// Connects over plain HTTP, with or without fast start, and completes the login.
    pub fn connect(addr: SocketAddr) -> Self {
        Self::connect_with(
            addr,
            NodePrivate::generate(),
            br#"{"version":2,"CanAckPings":true}"#,
        )
    }

    pub fn connect_with(addr: SocketAddr, key: NodePrivate, json: &[u8]) -> Self {
        Self::try_connect_with(addr, key, json).expect("login")
    }

    /// [`DerpClient::connect_with`] for logins that may be refused: `Err` if it does not
    /// complete.
    pub fn try_connect_with(
        addr: SocketAddr,
        key: NodePrivate,
        json: &[u8],
    ) -> Result<Self, String> {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = DerpClient {
            key,
            server_key: NodePublic([0; 32]),
            s,
        };
        c.login_upgrade(json).map(|()| c)
    }
}

impl<S: Read + Write> DerpClient<S> {
    pub fn new_raw(s: S) -> Self {
        DerpClient {
            key: NodePrivate::generate(),
            server_key: NodePublic([0; 32]),
            s,
        }
    }

    /// Classic login: request, 101, ServerKey, ClientInfo, ServerInfo, by the library's one
    /// DERP client login ([`dialer::login`]) over this blocking stream.
    pub fn login_upgrade(&mut self, json: &[u8]) -> Result<(), String> {
        let client = dialer::Client {
            host: "x",
            user_agent: "derpd-tests",
            key: &self.key,
            max_server_info: 1 << 16,
        };
        let mut s = smol::io::AssertAsync::new(&mut self.s);
        let info = |_: &NodePublic| Ok::<_, dialer::DialError>(json.to_vec());
        let login =
            smol::block_on(dialer::login(&mut s, client, info)).map_err(|e| e.to_string())?;
        self.server_key = login.server_key;
        // derpd sends nothing after ServerInfo until something happens, and the dialer reads
        // ServerInfo exactly: nothing can have been read past it.
        assert!(login.leftover.is_empty(), "bytes read past ServerInfo");
        if login.server_info != br#"{"version":2}"# {
            return Err(format!(
                "ServerInfo JSON {:?}",
                String::from_utf8_lossy(&login.server_info)
            ));
        }
        Ok(())
    }

    pub fn read_server_key(&mut self) -> Result<(), String> {
        let f = self.read_frame().map_err(|e| e.to_string())?;
        self.server_key =
            handshake::parse_server_key(f.t, &f.payload).map_err(|e| e.to_string())?;
        Ok(())
    }

    pub fn expect_server_info(&mut self) -> Result<(), String> {
        let f = self
            .read_frame()
            .map_err(|e| format!("reading ServerInfo: {e}"))?;
        let bx = handshake::SessionBox::new(&self.key, &self.server_key);
        let json = handshake::read_server_info(&bx, f.t, &f.payload).map_err(|e| e.to_string())?;
        if json != br#"{"version":2}"# {
            return Err(format!(
                "ServerInfo JSON {:?}",
                String::from_utf8_lossy(&json)
            ));
        }
        Ok(())
    }

    pub fn public(&self) -> NodePublic {
        self.key.public()
    }

    pub fn write_frame(&mut self, t: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut f = vec![t];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        self.s.write_all(&f)
    }

    pub fn send(&mut self, dst: &NodePublic, pkt: &[u8]) {
        let mut p = dst.0.to_vec();
        p.extend_from_slice(pkt);
        self.write_frame(0x04, &p).unwrap();
    }

    pub fn read_frame(&mut self) -> std::io::Result<Frame> {
        let mut h = [0u8; 5];
        self.s.read_exact(&mut h)?;
        let len = u32::from_be_bytes(h[1..].try_into().unwrap()) as usize;
        assert!(len <= 1 << 20, "frame too large: {len}");
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload)?;
        Ok(Frame { t: h[0], payload })
    }

    /// Next frame that is not a KeepAlive.
    pub fn recv(&mut self) -> Frame {
        loop {
            let f = self.read_frame().expect("frame");
            if f.t != 0x06 {
                return f;
            }
        }
    }

    /// Next RecvPacket: (source, packet).
    pub fn recv_packet(&mut self) -> (NodePublic, Vec<u8>) {
        let f = self.recv();
        assert_eq!(f.t, 0x05, "want RecvPacket, got {f:?}");
        (
            NodePublic(f.payload[..32].try_into().unwrap()),
            f.payload[32..].to_vec(),
        )
    }

    /// True when the server has closed the connection (EOF or reset) within the timeout.
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

pub fn read_http_head<S: Read>(s: &mut S) -> Result<String, String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("EOF in head {:?}", String::from_utf8_lossy(&head)));
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A disco-looking packet: magic, then enough bytes for a key and a nonce.
pub fn disco_packet() -> Vec<u8> {
    let mut p = derpd::frame::DISCO_MAGIC.to_vec();
    p.resize(derpd::frame::DISCO_MIN_LEN + 10, 7);
    p
}

/// A counter or gauge from /debug/varz, summed over its labels (absent when the scrape fails).
pub fn varz_value(addr: SocketAddr, name: &str) -> Option<u64> {
    let text = http_exchange(
        addr,
        b"GET /debug/varz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let sum: Vec<u64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    (!sum.is_empty()).then(|| sum.iter().sum())
}

/// A client's binary WebSocket frame header (RFC 6455 §5.2): FIN as given, the length
/// declared in its shortest encoding, then the masking key; the masked payload is the caller's.
pub fn ws_client_header(fin: bool, len: usize, mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![if fin { 0x82 } else { 0x02 }];
    match len {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f
}

// ---------------------------------------------------------------------------------------------
// A TLS client that accepts any certificate

/// A TLS client connection for SNI 127.0.0.1 that accepts any certificate (the tests that use it
/// are about what follows the handshake; handshake signatures are still verified).
pub fn tls_client_conn() -> rustls::ClientConnection {
    let cfg = derpd::trust::client_config(derpd::trust::Trust::AnyCertificate).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    rustls::ClientConnection::new(cfg, name).unwrap()
}
