//! An accepted TLS connection: rustls runs the handshake (its unbuffered API, on buffers of
//! ours), then hands over the traffic keys (its kernel-connection API) and derpd protects the
//! records itself ([`super::record`]): each record is opened where it was read and sealed where
//! it will be written, so relayed packets cost no heap allocation and one copy fewer each way
//! than rustls's own record layer (0.23 builds every record in a new `Vec`).
//!
//! Buffers: a connection takes a read buffer and a write buffer (one record and its framing
//! each, [`BUF_LEN`]) from a shared cache while data is in flight and gives them back when they
//! are empty, so an idle connection holds none. After the handshake the connection answers a
//! TLS 1.3 KeyUpdate (new keys from rustls), refreshes its own keys before the suite's
//! confidentiality limit, ends reading at close_notify and sends one when closed; any other
//! alert, a record that does not open, or a TLS 1.2 renegotiation ends it with an error.

use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::ConnectionState;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::Async;

use super::record::{
    body_len, RecordError, RecordKey, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER_LEN, MAX_BODY,
    MAX_PLAINTEXT, OVERHEAD,
};
use crate::sync::lock;

/// A read or write buffer: one whole record (the largest a peer may send) and its header.
pub const BUF_LEN: usize = HEADER_LEN + MAX_BODY;
/// Spare buffers the cache keeps for the next connection that needs one.
const SPARE_MAX: usize = 32;
/// The most the cache keeps: 32 buffers, 532,640 B.
pub const SPARE_BYTES: usize = SPARE_MAX * BUF_LEN;
/// TLS 1.3 handshake message types after the handshake.
const KEY_UPDATE: u8 = 24;

/// Buffers given back, for the next connection with data in flight.
static SPARE: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buf() -> Box<[u8]> {
    lock(&SPARE)
        .pop()
        .unwrap_or_else(|| vec![0; BUF_LEN].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    let mut spare = lock(&SPARE);
    if spare.len() < SPARE_MAX {
        spare.push(b);
    }
}

/// Bytes in a buffer taken from the cache: `buf[start..end]`; no buffer while empty.
#[derive(Default)]
struct Buf {
    data: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl Buf {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn filled(&self) -> &[u8] {
        match &self.data {
            Some(d) => &d[self.start..self.end],
            None => &[],
        }
    }

    fn filled_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            Some(d) => &mut d[self.start..self.end],
            None => &mut [],
        }
    }

    /// The buffer, taken if need be, its bytes moved to its front.
    fn room(&mut self) -> &mut [u8] {
        let d = self.data.get_or_insert_with(take_buf);
        if self.start > 0 {
            d.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut d[self.end..]
    }

    /// Gives the buffer back to the cache if nothing is in it (an idle connection holds none).
    fn release_if_empty(&mut self) {
        self.consume(0);
    }

    /// Consumes `n` bytes; gives the buffer back once it is empty.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
            if let Some(d) = self.data.take() {
                give_buf(d);
            }
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(d) = self.data.take() {
            give_buf(d);
        }
    }
}

fn tls_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// An accepted TLS connection after its handshake.
pub struct TlsStream {
    io: Async<TcpStream>,
    kernel: KernelConnection<ServerConnectionData>,
    rx: RecordKey,
    tx: RecordKey,
    /// Records sealed with `tx` before it is refreshed (the suite's confidentiality limit).
    tx_limit: u64,
    /// Ciphertext read; the content of the record opened last is `plain`, inside it.
    rd: Buf,
    plain: Range<usize>,
    /// Where the record opened last ends in `rd` (consumed once `plain` is read).
    record_end: usize,
    /// Records sealed and not yet written.
    wr: Buf,
    /// Application data that came with the end of the handshake.
    early: Vec<u8>,
    /// The client asked for our KeyUpdate: sent as soon as the write buffer has room.
    key_update_due: bool,
    /// close_notify (or the end of the TCP stream) seen.
    read_closed: bool,
    close_sent: bool,
    /// ALPN chose `acme-tls/1`: an ACME CA validating TLS-ALPN-01.
    acme_validation: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TlsStream({:?}, {:?})",
            self.kernel.protocol_version(),
            self.kernel.negotiated_cipher_suite().suite()
        )
    }
}

/// Runs the server side of a TLS handshake on `io` with `config` (which must have
/// `enable_secret_extraction`), then takes the records over.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    mut io: Async<TcpStream>,
) -> io::Result<TlsStream> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
    // The handshake reads and writes in the buffers the connection keeps: what the client
    // sent after its Finished stays where it is.
    let (mut rd, mut wr) = (Buf::default(), Buf::default());
    let mut early = Vec::new();
    loop {
        let (transmit, read, done, discard) = {
            let status = conn.process_tls_records(rd.filled_mut());
            let discard = status.discard;
            let (transmit, read, done) = match status.state.map_err(tls_err)? {
                ConnectionState::EncodeTlsData(mut e) => {
                    // A flight (ServerHello to Finished, the chain included) fits a buffer.
                    let n = e.encode(wr.room()).map_err(tls_err)?;
                    wr.end += n;
                    (false, false, false)
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    (true, false, false)
                }
                ConnectionState::BlockedHandshake => (false, true, false),
                ConnectionState::ReadTraffic(mut r) => {
                    // The client's first records, right after its Finished.
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(tls_err)?;
                        if early.len() + rec.payload.len() > MAX_PLAINTEXT {
                            return Err(tls_err("too much data during the TLS handshake"));
                        }
                        early.extend_from_slice(rec.payload);
                    }
                    (false, false, false)
                }
                ConnectionState::WriteTraffic(_) => (false, false, true),
                other => return Err(tls_err(format!("TLS handshake: unexpected {other:?}"))),
            };
            (transmit, read, done, discard)
        };
        rd.consume(discard);
        if transmit || done {
            io.write_all(wr.filled()).await?;
            wr.consume(wr.end - wr.start);
        }
        if done {
            break;
        }
        if read {
            let room = rd.room();
            if room.is_empty() {
                return Err(tls_err("TLS handshake message too large"));
            }
            let n = io.read(room).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            rd.end += n;
        }
    }
    let acme_validation = conn.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN);
    let tls13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
    let rx = RecordKey::new(tls13, secrets.rx.0, &secrets.rx.1).map_err(tls_err)?;
    let tx = RecordKey::new(tls13, secrets.tx.0, &secrets.tx.1).map_err(tls_err)?;
    let limit = match kernel.negotiated_cipher_suite() {
        rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
    };
    Ok(TlsStream {
        io,
        kernel,
        rx,
        tx,
        tx_limit: limit.saturating_sub(1 << 10),
        rd,
        plain: 0..0,
        record_end: 0,
        wr,
        early,
        key_update_due: false,
        read_closed: false,
        close_sent: false,
        acme_validation,
    })
}

impl TlsStream {
    /// An ACME CA's TLS-ALPN-01 validation (ALPN `acme-tls/1`): the handshake was all of it.
    pub fn is_acme_validation(&self) -> bool {
        self.acme_validation
    }

    /// The cipher suite negotiated.
    pub fn negotiated_suite(&self) -> rustls::SupportedCipherSuite {
        self.kernel.negotiated_cipher_suite()
    }

    /// The TCP connection.
    pub fn get_ref(&self) -> &Async<TcpStream> {
        &self.io
    }

    /// Opens the next whole record in `rd`, if there is one: its content becomes `plain`, or
    /// it is acted on (an alert, a KeyUpdate). `Ok(false)`: more bytes are needed.
    fn open_next(&mut self) -> io::Result<bool> {
        let (start, end) = (self.rd.start, self.rd.end);
        let Some(header) = self.rd.filled().get(..HEADER_LEN) else {
            return Ok(false);
        };
        let header: [u8; HEADER_LEN] = header.try_into().map_err(tls_err)?;
        let len = HEADER_LEN + body_len(&header).map_err(tls_err)?;
        if end - start < len {
            return Ok(false);
        }
        let Some(data) = self.rd.data.as_mut() else {
            return Ok(false);
        };
        let record = &mut data[start..start + len];
        let (kind, range) = self.rx.open(record).map_err(tls_err)?;
        let content = start + range.start..start + range.end;
        self.record_end = start + len;
        match kind {
            APPLICATION_DATA => {
                self.plain = content;
                if self.plain.is_empty() {
                    self.rd.consume(len);
                }
            }
            ALERT => {
                let alert = &data[content];
                // close_notify (level warning or fatal, description 0) ends the stream.
                if alert.len() == 2 && alert[1] == 0 {
                    self.read_closed = true;
                    self.rd.consume(len);
                } else {
                    let desc = alert.get(1).copied().unwrap_or_default();
                    return Err(tls_err(format!("TLS alert {desc} from the client")));
                }
            }
            HANDSHAKE if self.rx.is_tls13() => {
                let msg = data[content].to_vec();
                self.rd.consume(len);
                self.post_handshake(&msg)?;
            }
            _ => return Err(tls_err("unexpected TLS record after the handshake")),
        }
        Ok(true)
    }

    /// TLS 1.3 messages after the handshake: a KeyUpdate gives the next receiving keys (and,
    /// if asked, ours are updated too). Anything else from a client is an error.
    fn post_handshake(&mut self, mut msgs: &[u8]) -> io::Result<()> {
        while !msgs.is_empty() {
            let (typ, len) = match msgs {
                [typ, a, b, c, ..] => (*typ, u32::from_be_bytes([0, *a, *b, *c]) as usize),
                _ => return Err(tls_err("truncated TLS handshake message")),
            };
            let body = msgs
                .get(4..4 + len)
                .ok_or_else(|| tls_err("truncated TLS message"))?;
            match (typ, body) {
                (KEY_UPDATE, [request]) if *request <= 1 => {
                    let (seq, secrets) = self.kernel.update_rx_secret().map_err(tls_err)?;
                    self.rx = RecordKey::new(true, seq, &secrets).map_err(tls_err)?;
                    self.key_update_due |= *request == 1;
                }
                _ => return Err(tls_err(format!("unexpected TLS handshake message {typ}"))),
            }
            msgs = &msgs[4 + len..];
        }
        Ok(())
    }

    /// Answers the client's KeyUpdate request if the write buffer has room (else later).
    fn answer_key_update(&mut self) -> io::Result<()> {
        let used = self.wr.end - self.wr.start;
        if self.key_update_due && BUF_LEN - used >= OVERHEAD + 5 {
            self.key_update_due = false;
            self.update_tx()?;
        }
        Ok(())
    }

    /// Sends a KeyUpdate (not asking for one back) and seals with the next keys from then on.
    fn update_tx(&mut self) -> io::Result<()> {
        self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(tls_err)?;
        self.tx = RecordKey::new(true, seq, &secrets).map_err(tls_err)?;
        Ok(())
    }

    /// Seals one record into `wr` (the caller has made room).
    fn seal(&mut self, kind: u8, plaintext: &[u8]) -> io::Result<()> {
        self.seal_gathered(kind, &[IoSlice::new(plaintext)], 0, plaintext.len())
    }

    /// Seals into `wr` one record of `take` bytes of `bufs`, from byte `skip` on (frames from
    /// several slices share a record); the caller has made room.
    fn seal_gathered(
        &mut self,
        kind: u8,
        bufs: &[IoSlice<'_>],
        mut skip: usize,
        take: usize,
    ) -> io::Result<()> {
        let prefix = HEADER_LEN + self.tx.prefix_len();
        let room = self.wr.room();
        if room.len() < take + OVERHEAD {
            return Err(tls_err(RecordError::TooLarge));
        }
        let mut at = prefix;
        for b in bufs {
            if at == prefix + take {
                break;
            }
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let n = (b.len() - skip).min(prefix + take - at);
            room[at..at + n].copy_from_slice(&b[skip..skip + n]);
            at += n;
            skip = 0;
        }
        let n = self.tx.seal_at(kind, room, take).map_err(tls_err)?;
        self.wr.end += n;
        Ok(())
    }

    /// Writes out what `wr` holds; `Ready(Ok)` once it is all written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wr.is_empty() {
            let n = match Pin::new(&mut self.io).poll_write(cx, self.wr.filled()) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.wr.consume(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = buf.len().min(this.early.len());
            buf[..n].copy_from_slice(&this.early[..n]);
            this.early.drain(..n);
            if this.early.is_empty() {
                this.early = Vec::new();
            }
            return Poll::Ready(Ok(n));
        }
        loop {
            if !this.plain.is_empty() {
                let n = buf.len().min(this.plain.len());
                let from = this.plain.start;
                if let Some(d) = &this.rd.data {
                    buf[..n].copy_from_slice(&d[from..from + n]);
                }
                this.plain.start += n;
                if this.plain.is_empty() {
                    this.rd.consume(this.record_end - this.rd.start);
                }
                return Poll::Ready(Ok(n));
            }
            if this.read_closed || buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            if this.open_next()? {
                // A KeyUpdate's answer is sealed now and goes out with the next write or
                // flush (the writer's, whose waker the socket keeps).
                this.answer_key_update()?;
                continue;
            }
            let room = this.rd.room();
            match Pin::new(&mut this.io).poll_read(cx, room) {
                Poll::Ready(Ok(0)) if this.rd.is_empty() => {
                    // The client closed without close_notify: an end all the same, as Go's
                    // server takes it.
                    this.read_closed = true;
                    this.rd.release_if_empty();
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS record cut short",
                    )))
                }
                Poll::Ready(Ok(n)) => this.rd.end += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing in flight: the buffer goes back to the cache.
                    this.rd.release_if_empty();
                    return Poll::Pending;
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Seals as much of `bufs` as the write buffer takes, in records of up to 16 KiB (frames
    /// from several slices share a record), and writes what the socket takes. Waits only when
    /// earlier records are still unwritten and leave no room.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut accepted = 0;
        loop {
            this.answer_key_update()?;
            // Room for at least a small record after what is still unwritten?
            let used = this.wr.end - this.wr.start;
            let space = BUF_LEN - used;
            if space > OVERHEAD + 256 && accepted < total {
                if this.tx.seq() >= this.tx_limit {
                    if !this.tx.is_tls13() {
                        // TLS 1.2 has no KeyUpdate: the connection ends, as rustls ends it.
                        return Poll::Ready(Err(tls_err("TLS 1.2 keys at their limit")));
                    }
                    this.update_tx()?;
                    continue;
                }
                let take = (total - accepted).min(MAX_PLAINTEXT).min(space - OVERHEAD);
                this.seal_gathered(APPLICATION_DATA, bufs, accepted, take)?;
                accepted += take;
                continue;
            }
            match this.poll_send(cx) {
                Poll::Ready(Ok(())) if accepted < total => continue,
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(accepted)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if accepted > 0 => return Poll::Ready(Ok(accepted)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.answer_key_update()?;
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            // Unwritten records go first; then close_notify.
            match this.poll_send(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            this.seal(ALERT, &[1, 0])?;
            this.close_sent = true;
        }
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_close(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
