//! Fixed-budget packet buffers. Every packet the relay holds lives in a buffer from this pool;
//! when the pool is empty, readers wait (TCP backpressure) instead of allocating.
//!
//! Memory arithmetic (default `--buffer-budget-mib 16`, chosen for a 128 MB router where
//! OpenWrt itself uses ~40-60 MB):
//! - large buffers get 1/4 of the budget: 4 MiB / 65,573 B = 63 buffers (a 64 KiB packet each);
//! - small buffers get the rest: (16 MiB - 63 x 65,573 B) / 2,048 B = 6,174 buffers (a
//!   WireGuard or disco packet each);
//! - the per-client queues hold at most 32 disco + 32 other packets, so 6,174 small buffers
//!   fill the queues of 96 stalled clients before any reader has to wait;
//! - of large buffers a client's queues hold at most 1/16 of the class (63 / 16 = 3; at
//!   least 1, so tiny pools still work; past that its oldest large packet is dropped, counted
//!   as `queue_large`). A receiver that stops reading holds its 3 plus one in the batch its
//!   writer is stuck on, and its sender one more while it reads the next packet: 5. Eight
//!   such receivers hold 40 of 63, and 23 stay free for every other sender of large packets.
//!   (Before, the share was a quarter, 15 + 2: four stuck receivers took them all.)
//! - total: 63 x 65,573 + 6,174 x 2,048 = 16,775,451 B, just under 16 MiB.
//!
//! Buffers are allocated on first use and then recycled, never freed: idle memory stays small
//! and steady-state traffic does no heap allocation per packet.
//!
//! Outside the pool, one connection can make derpd hold at most W = [`CONN_WORST_BYTES`]
//! (52 KiB), whatever it does (unfinished WebSocket messages, a slow TLS reader, a half login,
//! a stalled frame), so the whole relay stays under idle + budget + `--max-clients` x W
//! (about 16 + 104 MiB at the defaults; tests/process/attacks/ measures it), plus at most
//! [`crate::tls::stream::SPARE_BYTES`] (520 KiB) of TLS buffers kept for reuse. For a TLS
//! connection, the worst case:
//! - an idle TLS client: 5,847 B (measured, 10,000 clients: the connection's task, the TLS
//!   stream and its keys, client and registry entries; no buffer);
//! - the TLS read buffer ([`crate::tls::stream::BUF_LEN`], one whole record and its header,
//!   16,645 B), held while a record is partly read or its content waits for the reader (for a
//!   pool buffer, or the rate limit); nothing more is read until it is consumed;
//! - the TLS write buffer (16,645 B): sealed records the client has not read yet; a write past
//!   it waits for the socket, as on plain TCP;
//! - during the login only: the ClientInfo, at most
//!   [`crate::handshake::CLIENT_INFO_ACCEPT_MAX`] = 1,024 B (not a pool buffer);
//! - over a WebSocket: the transport's state, under 1,024 B; payloads stream through into
//!   pool buffers, so an unfinished fragment or message holds nothing more;
//! - a stalled frame holds a pool buffer (counted in the budget) for `--frame-timeout`;
//! - sum 41,185 B, plus the allocator's rounding and headers: under 52 KiB.
//!
//! (During the TLS handshake, before the connection is a client: rustls's handshake state and
//! buffers, and at most 16 KiB of data sent with the client's Finished; `--max-handshakes`
//! bounds how many.) The two TLS buffers are most of it: a record is opened only whole, and
//! the client picks its size (up to 16 KiB). A plain-TCP connection's W is about 33 KiB
//! smaller.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use event_listener::{listener, Event, IntoNotification};

use crate::frame::{self, FrameType, HEADER_LEN, MAX_PACKET_SIZE, RECV_PREFIX};
use crate::key::{NodePublic, KEY_LEN};

/// Bytes in a small buffer: a RecvPacket frame (header + source key) of up to 2,011 packet bytes.
pub const SMALL_BUF: usize = 2048;
/// Bytes in a large buffer: a RecvPacket frame carrying a maximum-size packet.
pub const LARGE_BUF: usize = RECV_PREFIX + MAX_PACKET_SIZE;
/// Default budget, MiB.
pub const DEFAULT_BUDGET_MIB: usize = 16;
/// W: the most one connection makes derpd hold outside the pool (the module doc adds it up).
pub const CONN_WORST_BYTES: usize = 52 << 10;
/// At least this many buffers of each class, whatever the budget.
const MIN_PER_CLASS: usize = 4;
/// Receivers that stop reading at once which must not stall senders to anyone else.
pub const STUCK_RECEIVERS: usize = 8;
/// A receiver's queues may hold 1/`LARGE_SHARES` of the large buffers: twice as many shares
/// as [`STUCK_RECEIVERS`], because a stuck receiver holds up to two buffers beyond its share.
pub const LARGE_SHARES: usize = 2 * STUCK_RECEIVERS;

/// Size classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Small = 0,
    Large = 1,
}

struct ClassState {
    /// Recycled buffers. Invariant: every entry has exactly the class's length.
    free: Vec<Box<[u8]>>,
    /// Buffers ever allocated. Invariant: `allocated <= cap`, and `allocated - free.len()` are
    /// out in [`PacketBuf`]s.
    allocated: usize,
}

struct ClassPool {
    buf_len: usize,
    cap: usize,
    state: Mutex<ClassState>,
    /// Notified when a buffer comes back: one *additional* waiter per returned buffer.
    /// (A plain `notify(1)` counts a waiter that was notified but has not run yet, so a burst
    /// of returns woke one waiter while the others slept beside free buffers.)
    returned: Event,
    /// Readers waiting in [`Pool::get`] for a buffer of this class now.
    waiting: AtomicUsize,
}

/// The pool: two size classes with a fixed number of buffers each.
pub struct Pool {
    classes: [ClassPool; 2],
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.stats();
        write!(f, "Pool({s:?})")
    }
}

/// A snapshot of pool usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Small buffers: capacity, allocated so far, currently in use.
    pub small: (usize, usize, usize),
    /// Large buffers: capacity, allocated so far, currently in use.
    pub large: (usize, usize, usize),
    /// Readers waiting for a buffer now: (small, large).
    pub waiting: (usize, usize),
}

impl Pool {
    /// A pool spending at most `budget_bytes` on buffers: 1/4 large, 3/4 small.
    pub fn with_budget(budget_bytes: usize) -> Arc<Self> {
        let large = (budget_bytes / 4 / LARGE_BUF).max(MIN_PER_CLASS);
        let small = (budget_bytes.saturating_sub(large * LARGE_BUF) / SMALL_BUF).max(MIN_PER_CLASS);
        Self::with_counts(small, large)
    }

    /// A pool with exactly these numbers of buffers (tests use tiny pools).
    pub fn with_counts(small: usize, large: usize) -> Arc<Self> {
        let class = |buf_len, cap| ClassPool {
            buf_len,
            cap,
            state: Mutex::new(ClassState {
                free: Vec::new(),
                allocated: 0,
            }),
            returned: Event::new(),
            waiting: AtomicUsize::new(0),
        };
        Arc::new(Self {
            classes: [class(SMALL_BUF, small), class(LARGE_BUF, large)],
        })
    }

    /// Large buffers one receiver's queues may hold: 1/[`LARGE_SHARES`] of the class, at
    /// least one. A receiver that stops reading (until the write timeout closes it, if ever)
    /// then holds its share plus two (the batch its writer is stuck on, its sender's next
    /// packet); at the default budget [`STUCK_RECEIVERS`] of them hold 40 of the 63 and
    /// leave 23 to every other sender of packets over 2 KiB (see the module doc).
    pub fn large_per_receiver(&self) -> usize {
        (self.classes[Class::Large as usize].cap / LARGE_SHARES).max(1)
    }

    /// Bytes the pool may hold at most.
    pub fn budget_bytes(&self) -> usize {
        self.classes.iter().map(|c| c.cap * c.buf_len).sum()
    }

    /// Usage snapshot.
    pub fn stats(&self) -> PoolStats {
        let get = |c: &ClassPool| {
            let s = lock(&c.state);
            (c.cap, s.allocated, s.allocated - s.free.len())
        };
        PoolStats {
            small: get(&self.classes[0]),
            large: get(&self.classes[1]),
            waiting: (
                self.classes[0].waiting.load(Relaxed),
                self.classes[1].waiting.load(Relaxed),
            ),
        }
    }

    /// A buffer that can hold `len` bytes, waiting while the pool is exhausted.
    /// `len` must be at most [`LARGE_BUF`]; larger requests are clamped (callers check limits).
    pub async fn get(self: &Arc<Self>, len: usize) -> PacketBuf {
        let class = if len <= SMALL_BUF {
            Class::Small
        } else {
            Class::Large
        };
        if let Some(b) = self.try_get_class(class) {
            return b;
        }
        let cp = &self.classes[class as usize];
        cp.waiting.fetch_add(1, Relaxed);
        // Counted out on every exit, a cancelled wait (the connection closed) included.
        let _waiting = Waiting(&cp.waiting);
        loop {
            // Listen first, then look: a buffer returned in between still wakes this waiter.
            listener!(cp.returned => returned);
            if let Some(b) = self.try_get_class(class) {
                return b;
            }
            returned.await;
        }
    }

    /// A buffer if one is free now.
    pub fn try_get(self: &Arc<Self>, len: usize) -> Option<PacketBuf> {
        self.try_get_class(if len <= SMALL_BUF {
            Class::Small
        } else {
            Class::Large
        })
    }

    fn try_get_class(self: &Arc<Self>, class: Class) -> Option<PacketBuf> {
        let cp = &self.classes[class as usize];
        let mut st = lock(&cp.state);
        let data = match st.free.pop() {
            Some(b) => b,
            None if st.allocated < cp.cap => {
                st.allocated += 1;
                if st.free.capacity() < st.allocated {
                    // Reserve the free list once per growth so returning never allocates.
                    let want = st.allocated.next_power_of_two().min(cp.cap);
                    let extra = want.saturating_sub(st.free.len());
                    st.free.reserve_exact(extra);
                }
                vec![0u8; cp.buf_len].into_boxed_slice()
            }
            None => return None,
        };
        Some(PacketBuf {
            data: Some(data),
            len: 0,
            pool: self.clone(),
            class,
        })
    }

    fn put(&self, class: Class, data: Box<[u8]>) {
        let cp = &self.classes[class as usize];
        lock(&cp.state).free.push(data);
        cp.returned.notify(1.additional());
    }
}

/// Decrements a class's waiting count when a [`Pool::get`] ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer on loan from the pool; it goes back when dropped.
pub struct PacketBuf {
    /// Invariant: `Some` until drop.
    data: Option<Box<[u8]>>,
    /// Bytes of `data` in use.
    len: usize,
    pool: Arc<Pool>,
    class: Class,
}

impl fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PacketBuf({:?}, {} bytes)", self.class, self.len)
    }
}

impl PacketBuf {
    /// The whole buffer, for filling.
    pub fn raw_mut(&mut self) -> &mut [u8] {
        self.data.as_deref_mut().unwrap_or_default()
    }

    /// True for a buffer of the large class.
    pub fn is_large(&self) -> bool {
        self.class == Class::Large
    }

    /// The pool the buffer goes back to.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.data.as_deref().map_or(0, <[u8]>::len)
    }

    /// Sets how many bytes are in use (clamped to the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        self.data.as_deref().map_or(&[], |d| &d[..self.len])
    }

    /// Length in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where a received packet of `len` bytes goes (clamped to the capacity): after the room
    /// for its RecvPacket header and source key. Then [`Self::frame_recv_packet`].
    pub fn packet_space(&mut self, len: usize) -> &mut [u8] {
        let raw = self.raw_mut();
        let end = (RECV_PREFIX + len).min(raw.len());
        raw.get_mut(RECV_PREFIX..end).unwrap_or_default()
    }

    /// Frames the `len` packet bytes written to [`Self::packet_space`] as a RecvPacket from
    /// `src`: the buffer then holds the whole frame, ready to write.
    pub fn frame_recv_packet(&mut self, src: &NodePublic, len: usize) {
        let len = len.min(self.capacity().saturating_sub(RECV_PREFIX));
        let total = RECV_PREFIX + len;
        let mut h = [0u8; HEADER_LEN];
        frame::encode_header(&mut h, FrameType::RecvPacket, (KEY_LEN + len) as u32);
        if let Some(prefix) = self.raw_mut().get_mut(..RECV_PREFIX) {
            prefix[..HEADER_LEN].copy_from_slice(&h);
            prefix[HEADER_LEN..].copy_from_slice(&src.0);
        }
        self.set_len(total);
    }

    /// The source key of the RecvPacket frame in the buffer.
    pub fn src(&self) -> NodePublic {
        let mut k = [0u8; KEY_LEN];
        if let Some(s) = self.as_slice().get(HEADER_LEN..RECV_PREFIX) {
            k.copy_from_slice(s);
        }
        NodePublic(k)
    }

    /// The packet of the RecvPacket frame in the buffer: what follows its header and source key.
    pub fn payload(&self) -> &[u8] {
        self.as_slice().get(RECV_PREFIX..).unwrap_or_default()
    }
}

impl Drop for PacketBuf {
    fn drop(&mut self) {
        if let Some(d) = self.data.take() {
            self.pool.put(self.class, d);
        }
    }
}

/// A bounded FIFO that drops its oldest entry when full (derper's per-client queues).
#[derive(Debug)]
pub struct DropOldest<T> {
    q: VecDeque<T>,
    cap: usize,
}

impl<T> DropOldest<T> {
    /// An empty queue holding at most `cap` items; memory is taken on first push.
    pub fn new(cap: usize) -> Self {
        Self {
            q: VecDeque::new(),
            cap,
        }
    }

    /// Appends `item`; returns the entry dropped to make room, if any.
    pub fn push(&mut self, item: T) -> Option<T> {
        let dropped = if self.q.len() >= self.cap {
            self.q.pop_front()
        } else {
            None
        };
        if self.q.capacity() == 0 {
            self.q.reserve_exact(self.cap);
        }
        self.q.push_back(item);
        dropped
    }

    /// Removes the oldest entry.
    pub fn pop(&mut self) -> Option<T> {
        self.q.pop_front()
    }

    /// Removes the oldest entry for which `f` holds.
    pub fn remove_first(&mut self, f: impl FnMut(&T) -> bool) -> Option<T> {
        let i = self.q.iter().position(f)?;
        self.q.remove(i)
    }

    /// Number of queued entries.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Removes everything.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.q.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn budget_arithmetic() {
        let p = Pool::with_budget(DEFAULT_BUDGET_MIB << 20);
        let s = p.stats();
        assert_eq!(s.large.0, 63);
        assert_eq!(s.small.0, 6174);
        assert!(p.budget_bytes() <= DEFAULT_BUDGET_MIB << 20);
        // Eight stuck receivers: share + batch + sender's next packet each, 23 left.
        assert_eq!(p.large_per_receiver(), 3);
        assert_eq!(
            s.large.0 - STUCK_RECEIVERS * (p.large_per_receiver() + 2),
            23
        );
        let tiny = Pool::with_budget(0);
        assert_eq!(tiny.stats().small.0, MIN_PER_CLASS);
        assert_eq!(tiny.large_per_receiver(), 1, "the floor");
    }

    #[test]
    fn exhausted_pool_waits_and_recycles() {
        let p = Pool::with_counts(2, 1);
        let a = p.try_get(10).unwrap();
        let b = p.try_get(SMALL_BUF).unwrap();
        assert!(p.try_get(1).is_none(), "small class exhausted");
        let l = p.try_get(SMALL_BUF + 1).unwrap();
        assert_eq!(l.capacity(), LARGE_BUF);
        assert!(p.try_get(LARGE_BUF).is_none());
        assert_eq!(p.stats().small, (2, 2, 2));
        // A waiter is woken by a return and gets the same memory back (no new allocation).
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || smol::block_on(p2.get(5)).capacity());
        drop(a);
        assert_eq!(waiter.join().unwrap(), SMALL_BUF);
        drop(b);
        drop(l);
        assert_eq!(p.stats().small, (2, 2, 0));
        assert_eq!(p.stats().large, (1, 1, 0));
    }

    /// N readers wait on an empty class; N buffers come back in a burst; every reader must get
    /// one. With `notify(1)` a burst woke one waiter and left the rest asleep beside free
    /// buffers (the pool's wait has no timeout, so such a reader froze its connection).
    #[test]
    fn a_burst_of_returns_wakes_every_waiter() {
        const N: usize = 8;
        for round in 0..50 {
            let p = Pool::with_counts(N, 1);
            let held: Vec<_> = (0..N).map(|_| p.try_get(10).unwrap()).collect();
            let (tx, rx) = std::sync::mpsc::channel();
            let waiters: Vec<_> = (0..N)
                .map(|_| {
                    let (p, tx) = (p.clone(), tx.clone());
                    std::thread::spawn(move || {
                        let b = smol::block_on(p.get(10));
                        tx.send(()).unwrap();
                        // Keep it: a waiter must be woken by its own returned buffer.
                        b
                    })
                })
                .collect();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while p.stats().waiting.0 < N {
                assert!(std::time::Instant::now() < deadline, "waiters never waited");
                std::thread::yield_now();
            }
            drop(held);
            for i in 0..N {
                let got = rx.recv_timeout(std::time::Duration::from_secs(10));
                assert!(got.is_ok(), "round {round}: {i} of {N} waiters woke");
            }
            let bufs: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
            assert_eq!(bufs.len(), N);
            assert_eq!(p.stats().waiting, (0, 0));
        }
    }

    /// A wait that is cancelled (its connection closed) is counted out of the gauge.
    #[test]
    fn cancelled_wait_leaves_the_gauge() {
        let p = Pool::with_counts(1, 1);
        let _held = p.try_get(10).unwrap();
        let mut fut = Box::pin(p.get(10));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(p.stats().waiting, (1, 0));
        drop(fut);
        assert_eq!(p.stats().waiting, (0, 0));
    }

    #[test]
    fn recv_packet_view() {
        let p = Pool::with_counts(1, 1);
        let mut b = p.try_get(RECV_PREFIX + 3).unwrap();
        assert!(b.payload().is_empty() && b.src() == NodePublic([0; KEY_LEN]));
        b.packet_space(3).copy_from_slice(b"abc");
        b.frame_recv_packet(&NodePublic([9; KEY_LEN]), 3);
        assert_eq!(b.as_slice()[..HEADER_LEN], [0x05, 0, 0, 0, 35]);
        assert_eq!(
            (b.src(), b.payload()),
            (NodePublic([9; KEY_LEN]), &b"abc"[..])
        );
        assert_eq!(b.len(), RECV_PREFIX + 3);
        // The largest packet fills a large buffer; nothing is written past it.
        let mut l = p.try_get(LARGE_BUF).unwrap();
        assert_eq!(l.packet_space(MAX_PACKET_SIZE + 1).len(), MAX_PACKET_SIZE);
        l.frame_recv_packet(&NodePublic([1; KEY_LEN]), MAX_PACKET_SIZE);
        assert_eq!((l.len(), l.payload().len()), (LARGE_BUF, MAX_PACKET_SIZE));
    }

    #[test]
    fn drop_oldest_queue() {
        let mut q = DropOldest::new(3);
        assert_eq!(q.push(1), None);
        q.push(2);
        q.push(3);
        assert_eq!(q.push(4), Some(1));
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.drain().collect::<Vec<_>>(), [3, 4]);
    }
}
