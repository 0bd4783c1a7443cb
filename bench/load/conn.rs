//! TLS pinned to the server's certificate, and one DERP connection with rustls driven by hand
//! (frames read in place from the decrypted buffer); the login.

use super::*;

pub(super) fn tls_config(leaf: Vec<u8>) -> Result<Arc<ClientConfig>, String> {
    // The server's own certificate, pinned as a Tailscale client pins it (`sha256-raw:`).
    let pin = Trust::Pin(Sha256::digest(&leaf).into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Offer cipher suites in Go's order (Tailscale clients are Go): AES-128-GCM first.
    let mut provider = (*provider).clone();
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    });
    let provider = Arc::new(provider);
    let verifier = trust::verifier(pin, &provider)?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // Every login is a full handshake, as for a client that has never seen the server.
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

// ---- one DERP connection, rustls driven by hand ----

pub(super) struct Conn {
    pub(super) tcp: Async<TcpStream>,
    pub(super) tls: ClientConnection,
    /// Socket reads land here, then go through rustls.
    pub(super) raw: Vec<u8>,
    /// Decrypted bytes; `buf[start..]` is not yet consumed.
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) fills: u32,
    pub(super) key: NodePublic,
}

pub(super) fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Conn {
    /// Writes every TLS record rustls has ready.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            let tls = &mut self.tls;
            self.tcp.write_with(|mut s| tls.write_tls(&mut s)).await?;
        }
        Ok(())
    }

    /// One socket read, decrypted into `buf`. EOF is an error.
    pub(super) async fn fill(&mut self) -> io::Result<()> {
        let raw = &mut self.raw;
        let n = self.tcp.read_with(|mut s| s.read(raw)).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > BIG_READ {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let mut src = &self.raw[..n];
        while !src.is_empty() {
            self.tls.read_tls(&mut src)?;
            let st = self.tls.process_new_packets().map_err(bad)?;
            let want = st.plaintext_bytes_to_read();
            let old = self.buf.len();
            self.buf.resize(old + want, 0);
            self.tls.reader().read_exact(&mut self.buf[old..])?;
        }
        self.flush().await
    }

    /// The next complete frame already decrypted: its type and payload range in `buf`.
    pub(super) fn frame(&mut self) -> Option<(u8, Range<usize>)> {
        let avail = &self.buf[self.start..];
        let (t, len) = frame::decode_header(avail.get(..HEADER_LEN)?.try_into().ok()?);
        let end = HEADER_LEN + len as usize;
        if avail.len() < end {
            return None;
        }
        let r = self.start + HEADER_LEN..self.start + end;
        self.start += end;
        Some((t, r))
    }

    pub(super) async fn next_frame(&mut self) -> io::Result<(u8, Range<usize>)> {
        loop {
            if let Some(f) = self.frame() {
                return Ok(f);
            }
            self.fill().await?;
            // A socket that always has data never makes the read wait: let others run.
            self.fills += 1;
            if self.fills.is_multiple_of(8) {
                smol::future::yield_now().await;
            }
        }
    }

    pub(super) fn queue(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(bytes)
    }
}

/// A client key with its public half and, once the server key is known, the login box: the
/// X25519 work a real client does once per key, not once per connection.
pub(super) struct ClientKey {
    pub(super) private: NodePrivate,
    pub(super) public: NodePublic,
    pub(super) session: RefCell<Option<(NodePublic, Rc<SessionBox>)>>,
}

impl ClientKey {
    pub(super) fn generate() -> Self {
        let private = NodePrivate::generate();
        Self {
            public: private.public(),
            private,
            session: RefCell::new(None),
        }
    }

    pub(super) fn session(&self, server: &NodePublic) -> Rc<SessionBox> {
        let mut s = self.session.borrow_mut();
        match &*s {
            Some((k, bx)) if k == server => bx.clone(),
            _ => {
                let bx = Rc::new(SessionBox::new(&self.private, server));
                *s = Some((*server, bx.clone()));
                bx
            }
        }
    }
}

/// TCP, TLS, the HTTP upgrade and the DERP login (ServerKey → ClientInfo → ServerInfo).
pub(super) async fn login(ctx: &Ctx, key: &ClientKey, read_size: usize) -> io::Result<Conn> {
    let tcp = Async::<TcpStream>::connect(ctx.addr).await?;
    tcp.get_ref().set_nodelay(true)?;
    let name = ServerName::IpAddress(ctx.addr.ip().into());
    let tls = ClientConnection::new(ctx.tls.clone(), name).map_err(bad)?;
    let mut c = Conn {
        tcp,
        tls,
        raw: vec![0; read_size],
        buf: Vec::new(),
        start: 0,
        fills: 0,
        key: key.public,
    };
    // rustls holds the request until the handshake is done.
    c.queue(handshake::upgrade_request("derp", "derpd-load").as_bytes())?;
    c.flush().await?;
    loop {
        match httpc::parse_head(&c.buf[c.start..]).map_err(bad)? {
            Some((head, n)) if head.status == 101 => {
                c.start += n;
                break;
            }
            Some((head, _)) => return Err(bad(format!("upgrade refused: {}", head.status_line))),
            None if c.buf.len() - c.start > 4096 => return Err(bad("response head too long")),
            None => c.fill().await?,
        }
    }
    let (t, r) = c.next_frame().await?;
    let server = handshake::parse_server_key(t, &c.buf[r]).map_err(bad)?;
    let bx = key.session(&server);
    let ci = bx.client_info_frame(&key.public, br#"{"version":2,"CanAckPings":true}"#);
    c.queue(&ci)?;
    c.flush().await?;
    let (t, r) = c.next_frame().await?;
    handshake::read_server_info(&bx, t, &c.buf[r]).map_err(bad)?;
    Ok(c)
}

/// A SendPacket frame to `dst` carrying `size` bytes (not disco-looking).
pub(super) fn send_frame(dst: &NodePublic, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN + KEY_LEN + size];
    let mut h = [0u8; HEADER_LEN];
    frame::encode_header(&mut h, FrameType::SendPacket, (KEY_LEN + size) as u32);
    f[..HEADER_LEN].copy_from_slice(&h);
    f[HEADER_LEN..HEADER_LEN + KEY_LEN].copy_from_slice(&dst.0);
    for (i, b) in f[HEADER_LEN + KEY_LEN..].iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    f
}
