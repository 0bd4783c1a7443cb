//! Who is connected: node key → its connections, the active one, and who must hear PeerGone.
//! The per-packet path takes only a read lock; writes happen on connect, disconnect and mesh
//! changes.
//!
//! Duplicate keys (derper's `lastWriterIsActive` policy): the newest connection becomes active;
//! older ones stay open and are read from; whichever connection of the key sends a frame becomes
//! active. PeerGone goes out only when the last connection of a key leaves. A switch of the
//! active connection is the key's own business: it takes the read lock and the key's
//! `Active` slot, and invalidates only the cached routes to that key, so two connections of
//! one key that send alternately cost the two of them (and their senders), not everyone else.
//!
//! Mesh (derper's `clientsMesh`, `watchers`): keys present on other nodes of the region map to
//! the [`Link`] that forwards to them; a local connection always wins. Watchers (mesh peers that
//! sent WatchConns) hear PeerPresent for every registration and PeerGone for every key's last
//! departure. derper also stores a nil forwarder for every local key; here "local and no
//! forwarder" is simply the absence of a mesh entry, which behaves the same in every case of
//! derper's `TestForwarderRegistration` (see `tests.rs`).

use std::collections::HashMap;
#[cfg(test)]
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::frame::{PeerGoneReason, SmallFrame};
use crate::key::NodePublic;
use crate::link::Link;
use crate::metrics::Metrics;
use crate::sync::lock;

mod handle;

pub use handle::{ClientHandle, Outbox, CLIENT_QUEUE_DEPTH};

/// All connections of one key.
#[derive(Debug)]
struct KeySet {
    /// Every connection of the key, oldest first. Invariant: never empty while in the map.
    conns: Vec<Arc<ClientHandle>>,
    /// Where packets for the key go; `None` only transiently.
    active: Arc<Active>,
}

/// A key's active connection. Changed under the registry's write lock (connect, disconnect)
/// or, when a duplicate connection speaks, under its read lock: a fight between duplicates
/// never takes the write lock nor moves the registry's generation.
#[derive(Debug)]
struct Active {
    /// The connection.
    slot: Mutex<Option<Arc<ClientHandle>>>,
    /// How many times it changed; written only under `slot`'s lock. A cached route to the key
    /// is valid while this has not moved. (usize: 32-bit targets have no native 64-bit
    /// atomics; a cache that missed exactly 2^32 changes would be wrong for one packet at most,
    /// until the next registry change.)
    changes: AtomicUsize,
}

impl Active {
    fn new(c: &Arc<ClientHandle>) -> Arc<Self> {
        Arc::new(Self {
            slot: Mutex::new(Some(c.clone())),
            changes: AtomicUsize::new(0),
        })
    }

    fn get(&self) -> Option<Arc<ClientHandle>> {
        lock(&self.slot).clone()
    }

    /// The active connection and the change count it goes with.
    fn get_counted(&self) -> (Option<Arc<ClientHandle>>, usize) {
        let g = lock(&self.slot);
        (g.clone(), self.changes.load(Relaxed))
    }

    fn is(&self, c: &Arc<ClientHandle>) -> bool {
        lock(&self.slot).as_ref().is_some_and(|a| Arc::ptr_eq(a, c))
    }

    /// Makes `c` the active connection (a change only if it was not).
    fn set(&self, c: Option<Arc<ClientHandle>>) {
        let mut g = lock(&self.slot);
        let same = match (&*g, &c) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        *g = c;
        // Published after the new value, under the slot lock: a reader that sees the new count
        // and then misses looks up the new connection.
        let n = self.changes.load(Relaxed).wrapping_add(1);
        self.changes.store(n, Ordering::Release);
    }
}

/// One reader's last route: the registry generation and destination it was looked up for,
/// where it went, and for a local key the key's `Active` slot and its change count then.
#[derive(Debug, Default)]
pub struct RouteCache(Option<Cached>);

#[derive(Debug)]
struct Cached {
    generation: usize,
    dst: NodePublic,
    route: Route,
    active: Option<(Arc<Active>, usize)>,
}

/// Where a packet for a key should go.
#[derive(Debug, Clone)]
pub enum Route {
    /// The key's active local connection.
    Local(Arc<ClientHandle>),
    /// The key is on another node of the region: forward over this mesh link.
    Forward(Arc<Link>),
    /// The key is here but has no active connection (dup_client).
    NoActive,
    /// Nobody with that key is here, and no mesh peer claims it.
    Unknown,
}

/// The mesh forwarder(s) for a key (derper's `PacketForwarder` / `multiForwarder`).
#[derive(Debug)]
enum Forwarder {
    One(Arc<Link>),
    /// The key showed up on several peers (a client moving between nodes). Each link has an
    /// order number; the lowest (seen longest) is used, so forwarding does not flap.
    Many {
        preferred: Arc<Link>,
        all: Vec<(Arc<Link>, u32)>,
    },
}

impl Forwarder {
    fn preferred(&self) -> &Arc<Link> {
        match self {
            Self::One(l) | Self::Many { preferred: l, .. } => l,
        }
    }
}

/// What the registry lock protects.
#[derive(Debug, Default)]
struct Inner {
    /// Key → local connections.
    clients: HashMap<NodePublic, KeySet>,
    /// Key → the mesh link(s) it is reachable through (keys present on other nodes).
    mesh: HashMap<NodePublic, Forwarder>,
    /// Mesh connections that asked for PeerPresent/PeerGone (WatchConns).
    watchers: Vec<Arc<ClientHandle>>,
}

impl Inner {
    fn broadcast(&self, f: SmallFrame) {
        for w in &self.watchers {
            w.enqueue_control(f);
        }
    }
}

/// The registry of connected clients.
#[derive(Debug)]
pub struct Registry {
    /// Connections, mesh forwarders and watchers. Read-locked on a reader's first packet to a
    /// key; write-locked on (un)registration and mesh changes.
    inner: RwLock<Inner>,
    /// Bumped whenever `clients` is write-locked: a reader's [`RouteCache`] is valid while
    /// this has not moved. (usize: 32-bit targets have no native 64-bit atomics.)
    generation: AtomicUsize,
    /// Source key A → connections that received a packet from A and must get PeerGone(A)
    /// when A leaves the region. Only taken with `inner` held (read or write), so that a
    /// departure (write) and a new interest in the departing key (read) are ordered. An entry
    /// goes when A leaves or when the receiver leaves: nothing stays once either end is gone.
    gone_watchers: Mutex<HashMap<NodePublic, Vec<Weak<ClientHandle>>>>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
}

impl Registry {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            generation: AtomicUsize::new(0),
            gone_watchers: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn write_inner(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        let g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        // Bumped under the lock: a reader that sees the new value then waits for this writer.
        self.generation.fetch_add(1, Ordering::Release);
        g
    }

    /// Adds a logged-in connection; it becomes the active one for its key. Watchers hear
    /// PeerPresent for it (for every connection, duplicates included, as derper).
    pub fn register(&self, c: &Arc<ClientHandle>) {
        let m = &self.metrics;
        let mut inner = self.write_inner();
        match inner.clients.get_mut(&c.key) {
            None => {
                inner.clients.insert(
                    c.key,
                    KeySet {
                        conns: vec![c.clone()],
                        active: Active::new(c),
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
                set.active.set(Some(c.clone()));
            }
        }
        m.current_connections.fetch_add(1, Relaxed);
        inner.broadcast(SmallFrame::peer_present(
            &c.key,
            Some(c.remote),
            c.present_flags,
        ));
    }

    /// Removes a connection. When it was the key's last, watchers hear PeerGone, and unless a
    /// mesh peer still has the key, every connection that received from it gets
    /// PeerGone(Disconnected).
    pub fn unregister(&self, c: &Arc<ClientHandle>) {
        let m = &self.metrics;
        {
            let mut inner = self.write_inner();
            self.forget_receiver(c);
            if c.is_mesh {
                inner.watchers.retain(|w| !Arc::ptr_eq(w, c));
            }
            let Some(set) = inner.clients.get_mut(&c.key) else {
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
                    inner.clients.remove(&c.key);
                    inner.broadcast(SmallFrame::peer_gone(&c.key, PeerGoneReason::Disconnected));
                    // Still reachable through a mesh peer: not gone from the region.
                    if !inner.mesh.contains_key(&c.key) {
                        self.peer_gone_from_region(&c.key);
                    }
                }
                1 => {
                    m.dup_client_keys.fetch_sub(1, Relaxed);
                    m.dup_client_conns.fetch_sub(2, Relaxed);
                    let rest = set.conns[0].clone();
                    rest.dup.store(false, Relaxed);
                    set.active.set(Some(rest));
                }
                _ => {
                    m.dup_client_conns.fetch_sub(1, Relaxed);
                    if set.active.is(c) {
                        // derper leaves the key without an active connection until one of the
                        // others speaks; sending to the newest remaining one loses less.
                        set.active.set(set.conns.last().cloned());
                    }
                }
            }
        }
        if c.preferred.swap(false, Relaxed) {
            m.home_connections.fetch_sub(1, Relaxed);
        }
    }

    /// `key` left the region: everyone who received from it gets PeerGone(key, Disconnected),
    /// and the interest is forgotten on both sides. Called with the `inner` write lock held,
    /// so no receiver can register a new interest in `key` halfway through; the frames are
    /// queued before a new connection of `key` can send anything.
    fn peer_gone_from_region(&self, key: &NodePublic) {
        let Some(receivers) = lock(&self.gone_watchers).remove(key) else {
            return;
        };
        for r in receivers.iter().filter_map(Weak::upgrade) {
            lock(&r.senders).remove(key);
            self.send_peer_gone(&r, key);
        }
    }

    fn send_peer_gone(&self, receiver: &ClientHandle, key: &NodePublic) {
        if receiver.enqueue_control(SmallFrame::peer_gone(key, PeerGoneReason::Disconnected)) {
            self.metrics
                .peer_gone_disconnected_frames
                .fetch_add(1, Relaxed);
        }
    }

    /// `c` is leaving: drop its interest in every source. Called with `inner` write-locked.
    fn forget_receiver(&self, c: &Arc<ClientHandle>) {
        let sources = std::mem::take(&mut *lock(&c.senders));
        if sources.is_empty() {
            return;
        }
        let mut map = lock(&self.gone_watchers);
        for src in &sources {
            if let Some(list) = map.get_mut(src) {
                list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(c)));
                if list.is_empty() {
                    map.remove(src);
                }
            }
        }
    }

    /// `receiver` was just sent a packet from `src` (the writer calls this after writing it):
    /// it must hear PeerGone(src) when `src` leaves the region. When `src` has already left
    /// (its packet sat in the queue while it disconnected), PeerGone goes out at once: every
    /// receiver hears of every departed sender, however the two raced. Returns whether an
    /// interest was registered.
    pub fn add_gone_watcher(&self, src: NodePublic, receiver: &Arc<ClientHandle>) -> bool {
        if lock(&receiver.senders).contains(&src) {
            return true;
        }
        let inner = read(&self.inner);
        let present = inner.clients.contains_key(&src) || inner.mesh.contains_key(&src);
        if !present {
            drop(inner);
            self.send_peer_gone(receiver, &src);
            return false;
        }
        let mut map = lock(&self.gone_watchers);
        if lock(&receiver.senders).insert(src) {
            map.entry(src).or_default().push(Arc::downgrade(receiver));
        }
        true
    }

    /// [`Registry::route`] through a reader's one-entry cache: a reader usually sends to the
    /// same key again, and then costs no lock and no hash while nothing came or went.
    /// A duplicate-key fight invalidates only the cached routes to that key.
    pub fn route_cached(&self, cache: &mut RouteCache, dst: &NodePublic) -> Route {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(c) = &cache.0 {
            if c.generation == generation
                && c.dst == *dst
                && c.active
                    .as_ref()
                    .is_none_or(|(a, n)| a.changes.load(Ordering::Acquire) == *n)
            {
                return c.route.clone();
            }
        }
        let (route, active) = self.lookup_counted(dst, true);
        cache.0 = match &route {
            Route::Local(_) | Route::Forward(_) => Some(Cached {
                generation,
                dst: *dst,
                route: route.clone(),
                active,
            }),
            _ => None,
        };
        route
    }

    /// Where a packet for `dst` goes now: the local active connection, else (only when the key
    /// has no local connection at all) its mesh forwarder.
    pub fn route(&self, dst: &NodePublic) -> Route {
        self.lookup(dst, true)
    }

    /// Where a packet a mesh peer forwarded goes: local connections only (never re-forwarded).
    pub fn route_local(&self, dst: &NodePublic) -> Route {
        self.lookup(dst, false)
    }

    fn lookup(&self, dst: &NodePublic, with_mesh: bool) -> Route {
        self.lookup_counted(dst, with_mesh).0
    }

    /// [`Registry::lookup`], and for a local key its [`Active`] slot and change count.
    fn lookup_counted(
        &self,
        dst: &NodePublic,
        with_mesh: bool,
    ) -> (Route, Option<(Arc<Active>, usize)>) {
        let inner = read(&self.inner);
        match inner.clients.get(dst) {
            Some(set) => {
                let (a, n) = set.active.get_counted();
                let route = a.map_or(Route::NoActive, Route::Local);
                (route, Some((set.active.clone(), n)))
            }
            None => match inner.mesh.get(dst).filter(|_| with_mesh) {
                Some(f) => (Route::Forward(f.preferred().clone()), None),
                None => (Route::Unknown, None),
            },
        }
    }

    /// WatchConns from mesh connection `c`: queues PeerPresent for every key with an active
    /// connection (`c`'s own included) and subscribes `c` to later changes.
    pub fn add_watcher(&self, c: &Arc<ClientHandle>) {
        let mut inner = self.write_inner();
        for (k, set) in &inner.clients {
            if let Some(a) = set.active.get() {
                c.enqueue_control(SmallFrame::peer_present(k, Some(a.remote), a.present_flags));
            }
        }
        if !inner.watchers.iter().any(|w| Arc::ptr_eq(w, c)) {
            inner.watchers.push(c.clone());
        }
    }

    /// A mesh peer reports `key` present: packets for it may go over `link` (derper's
    /// `AddPacketForwarder`).
    pub fn add_forwarder(&self, key: NodePublic, link: &Arc<Link>) {
        let mut inner = self.write_inner();
        let Some(f) = inner.mesh.get_mut(&key) else {
            inner.mesh.insert(key, Forwarder::One(link.clone()));
            return;
        };
        match f {
            Forwarder::One(prev) if Arc::ptr_eq(prev, link) => {}
            Forwarder::One(prev) => {
                // The first registered stays preferred.
                let prev = prev.clone();
                *f = Forwarder::Many {
                    preferred: prev.clone(),
                    all: vec![(prev, 0), (link.clone(), 1)],
                };
                self.metrics.multiforwarder_created.fetch_add(1, Relaxed);
            }
            Forwarder::Many { all, .. } => {
                if !all.iter().any(|(l, _)| Arc::ptr_eq(l, link)) {
                    let next = all.iter().map(|(_, n)| n + 1).max().unwrap_or(0);
                    all.push((link.clone(), next));
                }
            }
        }
    }

    /// A mesh peer reports `key` gone, or its link broke (derper's `RemovePacketForwarder`).
    /// When that was the key's last way into the region and the key is not local either,
    /// connections that received from it get PeerGone(Disconnected).
    pub fn remove_forwarder(&self, key: &NodePublic, link: &Arc<Link>) {
        let mut inner = self.write_inner();
        let gone = {
            let local = inner.clients.contains_key(key);
            let m = &self.metrics;
            match inner.mesh.get_mut(key) {
                // derper keeps a nil entry for a local key; removing a link from it counts
                // as removing "another value".
                None => {
                    if local {
                        m.packet_forwarder_delete_other_value.fetch_add(1, Relaxed);
                    }
                    false
                }
                Some(Forwarder::Many { preferred, all }) => {
                    all.retain(|(l, _)| !Arc::ptr_eq(l, link));
                    if Arc::ptr_eq(preferred, link) {
                        if let Some((l, _)) = all.iter().min_by_key(|(_, n)| *n) {
                            *preferred = l.clone();
                        }
                    }
                    if let [(only, _)] = all.as_slice() {
                        let only = only.clone();
                        inner.mesh.insert(*key, Forwarder::One(only));
                        m.multiforwarder_deleted.fetch_add(1, Relaxed);
                    }
                    false
                }
                Some(Forwarder::One(l)) if !Arc::ptr_eq(l, link) => {
                    m.packet_forwarder_delete_other_value.fetch_add(1, Relaxed);
                    false
                }
                Some(Forwarder::One(_)) => {
                    inner.mesh.remove(key);
                    !local
                }
            }
        };
        if gone {
            self.peer_gone_from_region(key);
        }
        drop(inner);
    }

    /// ClosePeer: closes every local connection of `key`. Returns how many there were.
    pub fn close_key(&self, key: &NodePublic) -> usize {
        let inner = read(&self.inner);
        let Some(set) = inner.clients.get(key) else {
            return 0;
        };
        for c in &set.conns {
            c.close();
        }
        set.conns.len()
    }

    /// Number of keys reachable through mesh peers.
    pub fn mesh_key_count(&self) -> usize {
        read(&self.inner).mesh.len()
    }

    /// A frame arrived on `c`: if it shares its key, it becomes the active connection. Only
    /// the read lock: unregistration (write lock) cannot run meanwhile, so `c` is still one
    /// of the key's connections when it is made active.
    pub fn note_activity(&self, c: &Arc<ClientHandle>) {
        if !c.is_dup() {
            return;
        }
        let inner = read(&self.inner);
        if let Some(set) = inner.clients.get(&c.key) {
            if !set.active.is(c) && set.conns.iter().any(|o| Arc::ptr_eq(o, c)) {
                set.active.set(Some(c.clone()));
            }
        }
    }

    /// (source, receiver) pairs waiting for a PeerGone: bounded by the pairs of keys present
    /// that exchanged packets; zero once every sender or receiver is gone.
    pub fn peer_gone_interests(&self) -> usize {
        let _inner = read(&self.inner);
        lock(&self.gone_watchers).values().map(Vec::len).sum()
    }

    /// Number of distinct keys connected.
    pub fn key_count(&self) -> usize {
        read(&self.inner).clients.len()
    }

    /// Queues `frame()` on every connection and closes it: each writer sends the frame (control
    /// frames go first) and the packets already queued, then ends the connection. Returns how
    /// many were told.
    pub fn restart_all(&self, mut frame: impl FnMut() -> SmallFrame) -> usize {
        let mut n = 0;
        for set in read(&self.inner).clients.values() {
            for c in &set.conns {
                if c.enqueue_control(frame()) {
                    n += 1;
                }
                c.close();
            }
        }
        n
    }

    /// For `/debug/varz`: (keys connected here, keys only on other nodes of the region, mesh
    /// watchers). derper's `clients_local`, `clients_remote` and `watchers`. Read-only; the
    /// middle count walks the mesh keys, which is fine once per scrape.
    pub fn varz_counts(&self) -> (usize, usize, usize) {
        let inner = read(&self.inner);
        let remote = inner
            .mesh
            .keys()
            .filter(|k| !inner.clients.contains_key(k))
            .count();
        (inner.clients.len(), remote, inner.watchers.len())
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self) {
        for set in read(&self.inner).clients.values() {
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

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
