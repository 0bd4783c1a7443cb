//! Who is connected: node key → its connections, the active one, and who must hear PeerGone.
//! The per-packet path takes only a read lock; writes happen on connect, disconnect, and when a
//! duplicate connection of a key starts talking.
//!
//! Duplicate keys (derper's `lastWriterIsActive` policy): the newest connection becomes active;
//! older ones stay open and are read from; whichever connection of the key sends a frame becomes
//! active. PeerGone goes out only when the last connection of a key leaves.

use std::collections::HashMap;
#[cfg(test)]
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};

use event_listener::Event;

use crate::frame::{PeerGoneReason, SmallFrame};
use crate::key::NodePublic;
use crate::metrics::{DropReason, Metrics};
use crate::pool::{DropOldest, PacketBuf};

/// Per-client queue depth for each of the disco and other queues (derper: 32 each).
pub const QUEUE_DEPTH: usize = 32;

/// One logged-in connection, shared by its reader, its writer and the registry.
#[derive(Debug)]
pub struct Client {
    /// Process-wide connection number (derper's connNum), for logs and identity.
    pub conn_id: u64,
    /// The node key the client logged in with.
    pub key: NodePublic,
    /// Remote address of the TCP connection.
    pub remote: SocketAddr,
    /// PeerPresent flags (mesh watchers see these).
    pub present_flags: u8,
    /// The client holds the mesh key (mesh privileges; always false until mesh lands).
    pub is_mesh: bool,
    /// What the writer has to send.
    out: Mutex<Outbox>,
    /// Notified when `out` gains something or the connection is closed.
    wake: Event,
    /// Set once: the connection is going away and must not be sent to.
    closed: AtomicBool,
    /// Another connection shares this key (enables the activity check on every frame).
    dup: AtomicBool,
    /// Last NotePreferred value.
    pub(crate) preferred: AtomicBool,
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
}

impl Client {
    /// A client handle; not yet registered.
    pub fn new(conn_id: u64, key: NodePublic, remote: SocketAddr, present_flags: u8) -> Arc<Self> {
        Arc::new(Self {
            conn_id,
            key,
            remote,
            present_flags,
            is_mesh: false,
            out: Mutex::new(Outbox {
                disco: DropOldest::new(QUEUE_DEPTH),
                other: DropOldest::new(QUEUE_DEPTH),
                control: std::collections::VecDeque::new(),
                pong: None,
            }),
            wake: Event::new(),
            closed: AtomicBool::new(false),
            dup: AtomicBool::new(false),
            preferred: AtomicBool::new(false),
        })
    }

    /// Queues a RecvPacket frame. Never blocks: a full queue loses its oldest packet.
    pub fn enqueue_packet(&self, pkt: PacketBuf, disco: bool, metrics: &Metrics) {
        let bytes = pkt.len();
        let dropped = {
            let mut out = lock(&self.out);
            if self.closed.load(Relaxed) {
                Some((pkt, DropReason::GoneDisconnected))
            } else {
                let q = if disco {
                    &mut out.disco
                } else {
                    &mut out.other
                };
                q.push(pkt).map(|old| (old, DropReason::QueueHead))
            }
        };
        if let Some((old, reason)) = dropped {
            let n = if reason == DropReason::GoneDisconnected {
                bytes
            } else {
                old.len()
            };
            metrics.drop_packet(reason, disco, n);
            drop(old);
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

    /// True once [`Client::close`] was called.
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
            ..
        } = &mut *guard;
        for (q, is_disco) in [(disco, true), (other, false)] {
            for p in q.drain() {
                metrics.drop_packet(DropReason::GoneDisconnected, is_disco, p.len());
            }
        }
        control.clear();
    }
}

/// All connections of one key.
#[derive(Debug)]
struct KeySet {
    /// Every connection of the key, oldest first. Invariant: never empty while in the map.
    conns: Vec<Arc<Client>>,
    /// Where packets for the key go; `None` only transiently.
    active: Option<Arc<Client>>,
}

/// One reader's last route: (registry generation, destination, its connection).
#[derive(Debug, Default)]
pub struct RouteCache(Option<(usize, NodePublic, Arc<Client>)>);

/// Where a packet for a key should go.
#[derive(Debug)]
pub enum Route {
    /// The key's active local connection.
    Local(Arc<Client>),
    /// The key is here but has no active connection (dup_client).
    NoActive,
    /// Nobody with that key is here (and, later, no mesh peer claims it).
    Unknown,
}

/// The registry of connected clients.
#[derive(Debug)]
pub struct Registry {
    /// Key → connections. Read-locked on a reader's first packet to a key; write-locked on
    /// (un)registration.
    clients: RwLock<HashMap<NodePublic, KeySet>>,
    /// Bumped whenever `clients` is write-locked: a reader's [`RouteCache`] is valid while
    /// this has not moved. (usize: 32-bit targets have no native 64-bit atomics.)
    generation: AtomicUsize,
    /// Source key A → connections that received a packet from A and must get PeerGone(A)
    /// when A leaves. Dead entries are pruned when a list doubles.
    gone_watchers: Mutex<HashMap<NodePublic, Vec<Weak<Client>>>>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
}

impl Registry {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            clients: RwLock::new(HashMap::new()),
            generation: AtomicUsize::new(0),
            gone_watchers: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn write_clients(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodePublic, KeySet>> {
        let g = self.clients.write().unwrap_or_else(|e| e.into_inner());
        // Bumped under the lock: a reader that sees the new value then waits for this writer.
        self.generation.fetch_add(1, Ordering::Release);
        g
    }

    /// Adds a logged-in connection; it becomes the active one for its key.
    pub fn register(&self, c: &Arc<Client>) {
        let m = &self.metrics;
        let mut map = self.write_clients();
        match map.get_mut(&c.key) {
            None => {
                map.insert(
                    c.key,
                    KeySet {
                        conns: vec![c.clone()],
                        active: Some(c.clone()),
                    },
                );
            }
            Some(set) => {
                if set.conns.len() == 1 {
                    m.dup_client_keys.fetch_add(1, Relaxed);
                    m.dup_client_conns.fetch_add(2, Relaxed);
                } else {
                    m.dup_client_conns.fetch_add(1, Relaxed);
                }
                m.total_dup_client_conns.fetch_add(1, Relaxed);
                for o in &set.conns {
                    o.dup.store(true, Relaxed);
                }
                c.dup.store(true, Relaxed);
                set.conns.push(c.clone());
                set.active = Some(c.clone());
            }
        }
        m.current_connections.fetch_add(1, Relaxed);
        // Mesh watchers get PeerPresent here (later issue).
    }

    /// Removes a connection. When it was the key's last, every connection that received from
    /// the key gets PeerGone(Disconnected).
    pub fn unregister(&self, c: &Arc<Client>) {
        let m = &self.metrics;
        let last_gone = {
            let mut map = self.write_clients();
            let Some(set) = map.get_mut(&c.key) else {
                return;
            };
            let before = set.conns.len();
            set.conns.retain(|o| !Arc::ptr_eq(o, c));
            if set.conns.len() == before {
                return;
            }
            m.current_connections.fetch_sub(1, Relaxed);
            match set.conns.len() {
                0 => {
                    map.remove(&c.key);
                    true
                }
                1 => {
                    m.dup_client_keys.fetch_sub(1, Relaxed);
                    m.dup_client_conns.fetch_sub(2, Relaxed);
                    let rest = set.conns[0].clone();
                    rest.dup.store(false, Relaxed);
                    set.active = Some(rest);
                    false
                }
                _ => {
                    m.dup_client_conns.fetch_sub(1, Relaxed);
                    if set.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, c)) {
                        // derper leaves the key without an active connection until one of the
                        // others speaks; sending to the newest remaining one loses less.
                        set.active = set.conns.last().cloned();
                    }
                    false
                }
            }
        };
        if c.preferred.swap(false, Relaxed) {
            m.home_connections.fetch_sub(1, Relaxed);
        }
        if last_gone {
            self.peer_gone_from_region(&c.key);
        }
    }

    /// Sends PeerGone(key, Disconnected) to everyone who received from `key`.
    fn peer_gone_from_region(&self, key: &NodePublic) {
        let watchers = lock(&self.gone_watchers).remove(key).unwrap_or_default();
        let f = SmallFrame::peer_gone(key, PeerGoneReason::Disconnected);
        for w in watchers.iter().filter_map(Weak::upgrade) {
            if w.enqueue_control(f) {
                self.metrics
                    .peer_gone_disconnected_frames
                    .fetch_add(1, Relaxed);
            }
        }
    }

    /// Records that `receiver` got a packet from `src`; called once per (connection, source).
    pub fn add_gone_watcher(&self, src: NodePublic, receiver: &Arc<Client>) {
        let mut map = lock(&self.gone_watchers);
        let list = map.entry(src).or_default();
        if list.len() >= 8 && list.len().is_power_of_two() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(receiver));
    }

    /// Where a packet to `dst` goes.
    /// [`Registry::route`] through a reader's one-entry cache: a reader usually sends to the
    /// same key again, and then costs no lock and no hash while no client came or went.
    pub fn route_cached(&self, cache: &mut RouteCache, dst: &NodePublic) -> Route {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, k, c)) = &cache.0 {
            if *g == generation && k == dst {
                return Route::Local(c.clone());
            }
        }
        let r = self.route(dst);
        cache.0 = match &r {
            Route::Local(c) => Some((generation, *dst, c.clone())),
            _ => None,
        };
        r
    }

    /// Where a packet for `dst` goes now.
    pub fn route(&self, dst: &NodePublic) -> Route {
        let map = read(&self.clients);
        match map.get(dst) {
            Some(KeySet {
                active: Some(a), ..
            }) => Route::Local(a.clone()),
            Some(_) => Route::NoActive,
            None => Route::Unknown,
        }
    }

    /// A frame arrived on `c`: if it shares its key, it becomes the active connection.
    pub fn note_activity(&self, c: &Arc<Client>) {
        if !c.is_dup() {
            return;
        }
        {
            let map = read(&self.clients);
            if let Some(KeySet {
                active: Some(a), ..
            }) = map.get(&c.key)
            {
                if Arc::ptr_eq(a, c) {
                    return;
                }
            }
        }
        let mut map = self.write_clients();
        if let Some(set) = map.get_mut(&c.key) {
            if set.conns.iter().any(|o| Arc::ptr_eq(o, c)) {
                set.active = Some(c.clone());
            }
        }
    }

    /// Number of distinct keys connected.
    pub fn key_count(&self) -> usize {
        read(&self.clients).len()
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self) {
        for set in read(&self.clients).values() {
            for c in &set.conns {
                c.close();
            }
        }
    }

    /// The distinct keys of the given receiver's watch lists (tests).
    #[cfg(test)]
    fn watched_sources(&self) -> HashSet<NodePublic> {
        lock(&self.gone_watchers).keys().copied().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    fn key(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    fn active_id(r: &Registry, k: u8) -> Option<u64> {
        match r.route(&key(k)) {
            Route::Local(c) => Some(c.conn_id),
            _ => None,
        }
    }

    #[test]
    fn route_cache_follows_registrations() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let mut cache = RouteCache::default();
        let id = |route: Route| match route {
            Route::Local(c) => Some(c.conn_id),
            _ => None,
        };
        assert_eq!(id(r.route_cached(&mut cache, &key(1))), None);
        let a = Client::new(1, key(1), addr(), 1);
        r.register(&a);
        assert_eq!(id(r.route_cached(&mut cache, &key(1))), Some(1));
        assert_eq!(id(r.route_cached(&mut cache, &key(1))), Some(1));
        // A newer connection for the key takes over; the cached route must not survive it.
        let b = Client::new(2, key(1), addr(), 1);
        r.register(&b);
        assert_eq!(id(r.route_cached(&mut cache, &key(1))), Some(2));
        r.unregister(&b);
        r.unregister(&a);
        assert_eq!(id(r.route_cached(&mut cache, &key(1))), None);
        // Another destination is looked up, not served from the cache.
        let c = Client::new(3, key(2), addr(), 1);
        r.register(&c);
        assert_eq!(id(r.route_cached(&mut cache, &key(2))), Some(3));
        assert_eq!(id(r.route_cached(&mut cache, &key(1))), None);
    }

    #[test]
    fn dup_policy_newest_then_last_writer() {
        let r = Registry::new(Arc::default());
        let a1 = Client::new(1, key(1), addr(), 1);
        let a2 = Client::new(2, key(1), addr(), 1);
        r.register(&a1);
        assert_eq!(active_id(&r, 1), Some(1));
        assert!(!a1.is_dup());
        r.register(&a2);
        assert_eq!(active_id(&r, 1), Some(2), "newest connection is active");
        assert_eq!(r.metrics.dup_client_keys.load(Relaxed), 1);
        assert_eq!(r.metrics.dup_client_conns.load(Relaxed), 2);
        r.note_activity(&a1);
        assert_eq!(active_id(&r, 1), Some(1), "last writer is active");
        // A third party watches key 1; dup churn must not send PeerGone.
        let b = Client::new(3, key(2), addr(), 1);
        r.register(&b);
        r.add_gone_watcher(key(1), &b);
        r.unregister(&a1);
        assert_eq!(active_id(&r, 1), Some(2));
        assert!(!a2.is_dup(), "demoted to single");
        assert_eq!(r.metrics.dup_client_keys.load(Relaxed), 0);
        assert_eq!(r.metrics.dup_client_conns.load(Relaxed), 0);
        assert!(
            b.with_outbox(|o| o.control.is_empty()),
            "no spurious PeerGone"
        );
        r.unregister(&a2);
        assert!(matches!(r.route(&key(1)), Route::Unknown));
        let sent = b.with_outbox(|o| o.control.pop_front()).unwrap();
        assert_eq!(
            sent.as_bytes(),
            SmallFrame::peer_gone(&key(1), PeerGoneReason::Disconnected).as_bytes()
        );
        assert!(r.watched_sources().is_empty());
        assert_eq!(r.metrics.current_connections.load(Relaxed), 1);
    }

    #[test]
    fn three_dups_active_moves_on_departure() {
        let r = Registry::new(Arc::default());
        let c: Vec<_> = (1..=3).map(|i| Client::new(i, key(9), addr(), 1)).collect();
        for x in &c {
            r.register(x);
        }
        assert_eq!(r.metrics.dup_client_conns.load(Relaxed), 3);
        r.unregister(&c[2]);
        assert_eq!(active_id(&r, 9), Some(2));
        r.note_activity(&c[0]);
        assert_eq!(active_id(&r, 9), Some(1));
        r.unregister(&c[1]);
        assert_eq!(active_id(&r, 9), Some(1));
        r.unregister(&c[0]);
        assert_eq!(r.key_count(), 0);
        r.unregister(&c[0]); // idempotent
        assert_eq!(r.metrics.current_connections.load(Relaxed), 0);
    }

    #[test]
    fn closed_client_drops_as_gone_disconnected() {
        let m = Arc::new(Metrics::default());
        let pool = crate::pool::Pool::with_counts(4, 1);
        let c = Client::new(1, key(1), addr(), 1);
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

    #[test]
    fn full_queue_drops_oldest() {
        let m = Metrics::default();
        let pool = crate::pool::Pool::with_counts(64, 1);
        let c = Client::new(1, key(1), addr(), 1);
        for i in 0..QUEUE_DEPTH + 3 {
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
