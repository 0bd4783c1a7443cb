//! One logged-in connection as the rest of the relay sees it: a [`ClientHandle`], shared by the
//! session's reader, its writer and the registry, and its [`Outbox`] (the bounded queues of
//! packets and control frames waiting for the writer).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use event_listener::Event;

use crate::frame::{self, SmallFrame};
use crate::key::NodePublic;
use crate::metrics::{DropReason, Metrics};
use crate::pool::{DropOldest, PacketBuf};
use crate::sync::lock;

/// Per-client queue depth for each of the disco and other queues (derper: 32 each).
pub const CLIENT_QUEUE_DEPTH: usize = 32;

/// One logged-in connection, shared by its reader, its writer and the registry.
#[derive(Debug)]
pub struct ClientHandle {
    /// Process-wide connection number (derper's connNum), for logs and identity.
    pub conn_id: u64,
    /// The node key the client logged in with.
    pub key: NodePublic,
    /// Remote address of the TCP connection.
    pub remote: SocketAddr,
    /// PeerPresent flags (mesh watchers see these).
    pub present_flags: u8,
    /// The client presented the mesh key: WatchConns, ClosePeer and ForwardPacket allowed.
    pub is_mesh: bool,
    /// What the writer has to send.
    out: Mutex<Outbox>,
    /// Notified when `out` gains something or the connection is closed.
    wake: Event,
    /// Set once: the connection is going away and must not be sent to.
    closed: AtomicBool,
    /// Another connection shares this key (enables the activity check on every frame).
    pub(super) dup: AtomicBool,
    /// Last NotePreferred value.
    pub(crate) preferred: AtomicBool,
    /// Sources this connection has received from and must hear PeerGone for when they leave.
    /// Invariant (under the registry's `gone_watchers` lock): `src` is here exactly when this
    /// connection is in `gone_watchers[src]`. Lock order: registry `inner`, then
    /// `gone_watchers`, then this.
    pub(super) senders: Mutex<HashSet<NodePublic>>,
}

/// Frames waiting for a client's writer.
#[derive(Debug)]
pub struct Outbox {
    /// Disco packets (RecvPacket frames), oldest dropped when full.
    pub disco: DropOldest<PacketBuf>,
    /// All other packets.
    pub other: DropOldest<PacketBuf>,
    /// PeerGone/PeerPresent and similar control frames. Bounded by the number of keys that
    /// ever sent to this connection (one PeerGone each), so no cap is needed.
    pub control: std::collections::VecDeque<SmallFrame>,
    /// Pending Pong payload. Capacity one: further pings are ignored until it is written.
    pub pong: Option<[u8; 8]>,
    /// Large pool buffers in `disco` and `other`. Invariant: at most the pool's
    /// [`crate::pool::Pool::large_per_receiver`] (past it the oldest large one goes, counted
    /// as `queue_large`); both queues together (64 packets) could otherwise hold every large
    /// buffer there is, and a few stuck receivers all of them.
    pub large: usize,
}

impl ClientHandle {
    /// A client handle; not yet registered.
    pub fn new(conn_id: u64, key: NodePublic, remote: SocketAddr, present_flags: u8) -> Arc<Self> {
        Self::with_mesh(conn_id, key, remote, present_flags, false)
    }

    /// A client handle that may hold the mesh key; not yet registered.
    pub fn with_mesh(
        conn_id: u64,
        key: NodePublic,
        remote: SocketAddr,
        present_flags: u8,
        is_mesh: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            conn_id,
            key,
            remote,
            present_flags,
            is_mesh,
            out: Mutex::new(Outbox {
                disco: DropOldest::new(CLIENT_QUEUE_DEPTH),
                other: DropOldest::new(CLIENT_QUEUE_DEPTH),
                control: std::collections::VecDeque::new(),
                pong: None,
                large: 0,
            }),
            wake: Event::new(),
            closed: AtomicBool::new(false),
            dup: AtomicBool::new(false),
            preferred: AtomicBool::new(false),
            senders: Mutex::new(HashSet::new()),
        })
    }

    /// Queues a RecvPacket frame. Never blocks: a full queue loses its oldest packet, and so
    /// does a client already holding its share of large buffers (its oldest large one).
    pub fn enqueue_packet(&self, pkt: PacketBuf, disco: bool, metrics: &Metrics) {
        let bytes = pkt.len();
        let dropped = {
            let mut out = lock(&self.out);
            if self.closed.load(Relaxed) {
                Some((pkt, DropReason::GoneDisconnected))
            } else {
                let Outbox {
                    disco: dq,
                    other: oq,
                    large,
                    ..
                } = &mut *out;
                let (q, other_q) = if disco { (dq, oq) } else { (oq, dq) };
                let mut evicted = None;
                if pkt.is_large() {
                    if *large >= pkt.pool().large_per_receiver() {
                        // This queue's oldest large packet, else the other queue's.
                        evicted = q
                            .remove_first(PacketBuf::is_large)
                            .or_else(|| other_q.remove_first(PacketBuf::is_large));
                        *large -= usize::from(evicted.is_some());
                    }
                    *large += 1;
                }
                let old = q.push(pkt);
                if old.as_ref().is_some_and(PacketBuf::is_large) {
                    *large -= 1;
                }
                // Both only when the large packet evicted was the other queue's.
                for (p, reason) in [
                    (evicted, DropReason::QueueLarge),
                    (old, DropReason::QueueHead),
                ] {
                    let Some(p) = p else { continue };
                    let was_disco = frame::looks_like_disco(p.payload());
                    metrics.drop_packet(reason, was_disco, p.len());
                }
                None
            }
        };
        if let Some((pkt, reason)) = dropped {
            metrics.drop_packet(reason, disco, bytes);
            drop(pkt);
        }
        self.wake.notify(1);
    }

    /// Queues a control frame (PeerGone, PeerPresent). False if the connection is closing.
    pub fn enqueue_control(&self, f: SmallFrame) -> bool {
        if self.closed.load(Relaxed) {
            return false;
        }
        lock(&self.out).control.push_back(f);
        self.wake.notify(1);
        true
    }

    /// Queues a Pong unless one is already pending. Returns whether it was queued.
    pub fn enqueue_pong(&self, data: [u8; 8]) -> bool {
        let queued = {
            let mut out = lock(&self.out);
            if out.pong.is_some() {
                false
            } else {
                out.pong = Some(data);
                true
            }
        };
        if queued {
            self.wake.notify(1);
        }
        queued
    }

    /// Runs `f` on the outbox under its lock (the writer drains it this way).
    pub fn with_outbox<R>(&self, f: impl FnOnce(&mut Outbox) -> R) -> R {
        f(&mut lock(&self.out))
    }

    /// The event the writer waits on.
    pub fn wake_event(&self) -> &Event {
        &self.wake
    }

    /// Marks the connection closed and wakes its writer, which then ends the connection.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.wake.notify(usize::MAX);
    }

    /// True once [`ClientHandle::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// True while another connection shares this key.
    pub fn is_dup(&self) -> bool {
        self.dup.load(Relaxed)
    }

    /// Drops every queued packet, counting them as `gone_disconnected`.
    pub fn drain_on_close(&self, metrics: &Metrics) {
        let mut guard = lock(&self.out);
        let Outbox {
            disco,
            other,
            control,
            large,
            ..
        } = &mut *guard;
        for (q, is_disco) in [(disco, true), (other, false)] {
            for p in q.drain() {
                metrics.drop_packet(DropReason::GoneDisconnected, is_disco, p.len());
            }
        }
        *large = 0;
        control.clear();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::registry) fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    pub(in crate::registry) fn key(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    #[test]
    fn closed_client_drops_as_gone_disconnected() {
        let m = Arc::new(Metrics::default());
        let pool = crate::pool::Pool::with_counts(4, 1);
        let c = ClientHandle::new(1, key(1), addr(), 1);
        let mut p = pool.try_get(10).unwrap();
        p.set_len(10);
        c.enqueue_packet(p, false, &m);
        c.close();
        c.enqueue_packet(pool.try_get(10).unwrap(), true, &m);
        assert_eq!(m.dropped(DropReason::GoneDisconnected), 1);
        c.drain_on_close(&m);
        assert_eq!(m.dropped(DropReason::GoneDisconnected), 2);
        assert_eq!(pool.stats().small.2, 0, "buffers returned");
    }

    /// Both queues together hold at most the receiver's share of large buffers: a large
    /// packet over the share evicts the oldest large one, from its own queue first.
    #[test]
    fn a_receiver_holds_at_most_its_share_of_large_buffers() {
        let m = Metrics::default();
        let pool = crate::pool::Pool::with_counts(64, 2 * crate::pool::LARGE_SHARES);
        assert_eq!(pool.large_per_receiver(), 2);
        let c = ClientHandle::new(1, key(1), addr(), 1);
        let large = |tag: u8| {
            let mut p = pool.try_get(crate::pool::SMALL_BUF + 1).unwrap();
            p.packet_space(1)[0] = tag;
            p.set_len(crate::pool::SMALL_BUF + 1);
            p
        };
        let small = pool.try_get(10).unwrap();
        c.enqueue_packet(small, false, &m);
        for (tag, disco) in [(1, true), (2, false), (3, true), (4, false)] {
            c.enqueue_packet(large(tag), disco, &m);
            assert!(pool.stats().large.2 <= 2, "{:?}", pool.stats());
        }
        c.with_outbox(|o| {
            assert_eq!(o.large, 2);
            assert_eq!(o.disco.len(), 1);
            assert_eq!(o.other.len(), 2, "the small packet stays");
            // The two newest large packets are what is left.
            assert_eq!(o.disco.pop().unwrap().payload()[0], 3);
            assert!(!o.other.pop().unwrap().is_large());
            assert_eq!(o.other.pop().unwrap().payload()[0], 4);
            o.large = 0;
        });
        assert_eq!(m.dropped(DropReason::QueueLarge), 2);
        assert_eq!(m.dropped(DropReason::QueueHead), 0);
        assert_eq!(pool.stats().large.2, 0);
    }

    #[test]
    fn full_queue_drops_oldest() {
        let m = Metrics::default();
        let pool = crate::pool::Pool::with_counts(64, 1);
        let c = ClientHandle::new(1, key(1), addr(), 1);
        for i in 0..CLIENT_QUEUE_DEPTH + 3 {
            let mut p = pool.try_get(1).unwrap();
            p.raw_mut()[0] = i as u8;
            p.set_len(1);
            c.enqueue_packet(p, false, &m);
        }
        assert_eq!(m.dropped(DropReason::QueueHead), 3);
        let first = c.with_outbox(|o| o.other.pop()).unwrap();
        assert_eq!(first.as_slice()[0], 3, "oldest three dropped");
        assert!(c.enqueue_pong([1; 8]));
        assert!(!c.enqueue_pong([2; 8]), "pong queue has capacity one");
    }
}
