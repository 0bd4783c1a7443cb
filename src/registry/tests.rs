//! The registry's unit tests: routes, duplicate keys, PeerGone bookkeeping, mesh forwarders
//! and watchers.

use super::handle::tests::{addr, key};
use super::*;
use crate::frame;

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
    let a = ClientHandle::new(1, key(1), addr(), 1);
    r.register(&a);
    assert_eq!(id(r.route_cached(&mut cache, &key(1))), Some(1));
    assert_eq!(id(r.route_cached(&mut cache, &key(1))), Some(1));
    // A newer connection for the key takes over; the cached route must not survive it.
    let b = ClientHandle::new(2, key(1), addr(), 1);
    r.register(&b);
    assert_eq!(id(r.route_cached(&mut cache, &key(1))), Some(2));
    r.unregister(&b);
    r.unregister(&a);
    assert_eq!(id(r.route_cached(&mut cache, &key(1))), None);
    // Another destination is looked up, not served from the cache.
    let c = ClientHandle::new(3, key(2), addr(), 1);
    r.register(&c);
    assert_eq!(id(r.route_cached(&mut cache, &key(2))), Some(3));
    assert_eq!(id(r.route_cached(&mut cache, &key(1))), None);
}

#[test]
fn dup_policy_newest_then_last_writer() {
    let r = Registry::new(Arc::default());
    let a1 = ClientHandle::new(1, key(1), addr(), 1);
    let a2 = ClientHandle::new(2, key(1), addr(), 1);
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
    let b = ClientHandle::new(3, key(2), addr(), 1);
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

/// Two connections of one key that send alternately (derper's last-writer policy) move
/// the key's route through every reader's cache, and nobody else's cached route is
/// invalidated: the registry's generation stays where it was.
#[test]
fn a_dup_fight_leaves_other_keys_routes_cached() {
    let r = Registry::new(Arc::default());
    let id = |route: Route| match route {
        Route::Local(c) => Some(c.conn_id),
        _ => None,
    };
    let bystander = ClientHandle::new(1, key(1), addr(), 1);
    r.register(&bystander);
    let fighters = [
        ClientHandle::new(2, key(2), addr(), 1),
        ClientHandle::new(3, key(2), addr(), 1),
    ];
    for f in &fighters {
        r.register(f);
    }
    let (mut to_bystander, mut to_fighters) = (RouteCache::default(), RouteCache::default());
    assert_eq!(id(r.route_cached(&mut to_bystander, &key(1))), Some(1));
    assert_eq!(id(r.route_cached(&mut to_fighters, &key(2))), Some(3));
    let generation = r.generation.load(Ordering::Acquire);
    for round in 0..100 {
        let f = &fighters[round % 2];
        r.note_activity(f);
        r.note_activity(f);
        assert_eq!(
            id(r.route_cached(&mut to_fighters, &key(2))),
            Some(f.conn_id),
            "round {round}: the last writer gets the packets"
        );
        assert_eq!(id(r.route_cached(&mut to_bystander, &key(1))), Some(1));
    }
    assert_eq!(
        r.generation.load(Ordering::Acquire),
        generation,
        "a fight invalidated every reader's route cache"
    );
    // A departure still moves the fighters' route, and is a registry change.
    r.unregister(&fighters[1]);
    assert_eq!(id(r.route_cached(&mut to_fighters, &key(2))), Some(2));
    assert_ne!(r.generation.load(Ordering::Acquire), generation);
}

#[test]
fn three_dups_active_moves_on_departure() {
    let r = Registry::new(Arc::default());
    let c: Vec<_> = (1..=3)
        .map(|i| ClientHandle::new(i, key(9), addr(), 1))
        .collect();
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

fn link(name: &str) -> Arc<Link> {
    Link::new(name.into())
}

/// What `mesh[k]` holds: None (no entry: derper's nil or absent), or the links, preferred
/// first.
fn fwd(r: &Registry, k: u8) -> Option<Vec<String>> {
    let inner = read(&r.inner);
    inner.mesh.get(&key(k)).map(|f| match f {
        Forwarder::One(l) => vec![l.name.clone()],
        Forwarder::Many { preferred, all } => {
            let mut v = vec![preferred.name.clone()];
            let mut rest: Vec<_> = all
                .iter()
                .filter(|(l, _)| !Arc::ptr_eq(l, preferred))
                .collect();
            rest.sort_by_key(|(_, n)| *n);
            v.extend(rest.iter().map(|(l, _)| l.name.clone()));
            v
        }
    })
}

fn mesh_len(r: &Registry) -> usize {
    r.mesh_key_count()
}

/// derper's TestForwarderRegistration, case by case. derper's `clientsMesh` also holds a nil
/// entry for every local key; here that is "no entry while the key is local" (`fwd` = None
/// and the key registered), and the outcomes are the same.
#[test]
fn forwarder_registration_as_derper() {
    let r = Registry::new(Arc::default());
    let m = &r.metrics;
    let (f1, f2, f3, f100, f55, f999) = (
        link("f1"),
        link("f2"),
        link("f3"),
        link("f100"),
        link("f55"),
        link("f999"),
    );
    let one = |h: &str| Some(vec![h.to_string()]);
    r.add_forwarder(key(1), &f1);
    r.add_forwarder(key(2), &f2);
    assert_eq!((fwd(&r, 1), fwd(&r, 2)), (one("f1"), one("f2")));

    // Removing a forwarder that is not the registered one is a no-op.
    r.remove_forwarder(&key(2), &f999);
    assert_eq!(fwd(&r, 2), one("f2"));
    assert_eq!(m.packet_forwarder_delete_other_value.load(Relaxed), 1);
    // Removing for a key with no entry is a no-op.
    r.remove_forwarder(&key(3), &f1);
    assert_eq!(mesh_len(&r), 2);
    // Actual removal.
    r.remove_forwarder(&key(2), &f2);
    assert_eq!((fwd(&r, 1), fwd(&r, 2)), (one("f1"), None));

    // A second forwarder for a key makes a multi-forwarder; the first stays preferred;
    // adding the same one again changes nothing.
    assert_eq!(m.multiforwarder_created.load(Relaxed), 0);
    r.add_forwarder(key(1), &f100);
    r.add_forwarder(key(1), &f100);
    assert_eq!(fwd(&r, 1), Some(vec!["f1".into(), "f100".into()]));
    assert_eq!(m.multiforwarder_created.load(Relaxed), 1);
    assert!(matches!(r.route(&key(1)), Route::Forward(l) if Arc::ptr_eq(&l, &f1)));

    // Removing one that is not in the set does nothing.
    r.remove_forwarder(&key(1), &f55);
    assert_eq!(fwd(&r, 1), Some(vec!["f1".into(), "f100".into()]));
    // Removing one of two collapses back to a single forwarder.
    assert_eq!(m.multiforwarder_deleted.load(Relaxed), 0);
    r.remove_forwarder(&key(1), &f1);
    assert_eq!(fwd(&r, 1), one("f100"));
    assert_eq!(m.multiforwarder_deleted.load(Relaxed), 1);

    // Removing the forwarder of a key that is connected locally leaves it local (derper:
    // the entry becomes nil).
    let u1 = ClientHandle::new(1, key(1), addr(), 1);
    r.register(&u1);
    r.remove_forwarder(&key(1), &f100);
    assert_eq!(fwd(&r, 1), None);
    assert!(matches!(r.route(&key(1)), Route::Local(_)));
    // ...and once that client disconnects the key is gone.
    r.unregister(&u1);
    assert!(matches!(r.route(&key(1)), Route::Unknown));
    assert_eq!(mesh_len(&r), 0);

    // But a key that also has a forwarder keeps it when its local client leaves.
    r.register(&u1);
    r.add_forwarder(key(1), &f2);
    assert!(matches!(r.route(&key(1)), Route::Local(_)), "local wins");
    r.unregister(&u1);
    assert_eq!(fwd(&r, 1), one("f2"));
    assert!(matches!(r.route(&key(1)), Route::Forward(l) if Arc::ptr_eq(&l, &f2)));

    // A local key (derper: nil entry) that a peer then reports gets that forwarder alone,
    // not a multi-forwarder.
    r.remove_forwarder(&key(1), &f2);
    r.register(&u1);
    assert_eq!(fwd(&r, 1), None);
    r.add_forwarder(key(1), &f3);
    assert_eq!(fwd(&r, 1), one("f3"));
    assert_eq!(m.multiforwarder_created.load(Relaxed), 1);
}

#[test]
fn multi_forwarder_prefers_oldest_remaining() {
    let r = Registry::new(Arc::default());
    let (a, b, c) = (link("a"), link("b"), link("c"));
    r.add_forwarder(key(1), &a);
    r.add_forwarder(key(1), &b);
    r.add_forwarder(key(1), &c);
    assert_eq!(fwd(&r, 1), Some(vec!["a".into(), "b".into(), "c".into()]));
    r.remove_forwarder(&key(1), &a);
    assert_eq!(fwd(&r, 1), Some(vec!["b".into(), "c".into()]));
    r.add_forwarder(key(1), &a);
    assert_eq!(
        fwd(&r, 1),
        Some(vec!["b".into(), "c".into(), "a".into()]),
        "a re-added goes last"
    );
    r.remove_forwarder(&key(1), &b);
    r.remove_forwarder(&key(1), &c);
    assert_eq!(fwd(&r, 1), Some(vec!["a".into()]));
    assert_eq!(r.metrics.multiforwarder_deleted.load(Relaxed), 1);
}

/// PeerGone(Disconnected) to receivers when a key leaves the region: its last local
/// connection goes while no peer has it, or its last forwarder goes while it is not local.
#[test]
fn peer_gone_from_region_with_mesh() {
    let r = Registry::new(Arc::default());
    let rx = ClientHandle::new(9, key(9), addr(), 1);
    r.register(&rx);
    let gone_count = || rx.with_outbox(|o| o.control.len());
    let l = link("peer");
    // A key on a peer only: its forwarder going is its departure.
    r.add_forwarder(key(1), &l);
    r.add_gone_watcher(key(1), &rx);
    r.remove_forwarder(&key(1), &l);
    assert_eq!(gone_count(), 1);
    // Local and on a peer: the local client leaving is not a departure...
    let c = ClientHandle::new(2, key(2), addr(), 1);
    r.register(&c);
    r.add_forwarder(key(2), &l);
    r.add_gone_watcher(key(2), &rx);
    r.unregister(&c);
    assert_eq!(gone_count(), 1);
    // ...the forwarder going then is.
    r.remove_forwarder(&key(2), &l);
    assert_eq!(gone_count(), 2);
}

/// The writer registers its interest after writing the packet; the source may be gone by
/// then. It still hears PeerGone, exactly once, and nothing is kept on either side.
#[test]
fn interest_in_a_departed_source_is_answered_at_once() {
    let r = Registry::new(Arc::default());
    let v = ClientHandle::new(1, key(1), addr(), 1);
    r.register(&v);
    let gone = |c: &ClientHandle| c.with_outbox(|o| o.control.drain(..).count());
    // The source sent, then left before V's writer got to its packet.
    let s = ClientHandle::new(2, key(2), addr(), 1);
    r.register(&s);
    r.unregister(&s);
    assert!(!r.add_gone_watcher(key(2), &v));
    assert_eq!(gone(&v), 1);
    assert_eq!(r.peer_gone_interests(), 0);
    assert!(lock(&v.senders).is_empty());
    // It comes back: a new interest, and its next departure is heard again.
    let s2 = ClientHandle::new(3, key(2), addr(), 1);
    r.register(&s2);
    assert!(r.add_gone_watcher(key(2), &v));
    assert!(r.add_gone_watcher(key(2), &v), "a repeat is a no-op");
    assert_eq!(r.peer_gone_interests(), 1);
    r.unregister(&s2);
    assert_eq!(gone(&v), 1);
    assert_eq!(r.peer_gone_interests(), 0);
    assert!(lock(&v.senders).is_empty());
    assert_eq!(r.metrics.peer_gone_disconnected_frames.load(Relaxed), 2);
}

/// A receiver that leaves takes its interests with it, while the sources stay.
#[test]
fn departed_receiver_leaves_no_interest_behind() {
    let r = Registry::new(Arc::default());
    let sources: Vec<_> = (10..20)
        .map(|i| ClientHandle::new(i, key(i as u8), addr(), 1))
        .collect();
    for s in &sources {
        r.register(s);
    }
    for n in 0..3 {
        let v = ClientHandle::new(100 + n, key(99), addr(), 1);
        r.register(&v);
        for s in &sources {
            assert!(r.add_gone_watcher(s.key, &v));
        }
        assert_eq!(r.peer_gone_interests(), sources.len());
        r.unregister(&v);
        assert_eq!(r.peer_gone_interests(), 0, "round {n}");
        assert!(r.watched_sources().is_empty());
    }
}

#[test]
fn watchers_hear_present_and_gone() {
    let r = Registry::new(Arc::default());
    let a = ClientHandle::new(1, key(1), "192.0.2.1:41641".parse().unwrap(), 1);
    r.register(&a);
    let w = ClientHandle::with_mesh(2, key(2), addr(), peer_flags_mesh(), true);
    r.register(&w);
    r.add_watcher(&w);
    let frames = || -> Vec<Vec<u8>> {
        w.with_outbox(|o| o.control.drain(..).map(|f| f.as_bytes().to_vec()).collect())
    };
    let got = frames();
    // Both active keys, the watcher itself included, in some order.
    assert_eq!(got.len(), 2);
    let want_a = SmallFrame::peer_present(&key(1), Some(a.remote), 1);
    assert!(got.contains(&want_a.as_bytes().to_vec()));
    assert_eq!(want_a.as_bytes().len(), 5 + 51);
    assert_eq!(&want_a.as_bytes()[5 + 32..5 + 48], &{
        let mut v = [0u8; 16];
        v[10] = 0xff;
        v[11] = 0xff;
        v[12..].copy_from_slice(&[192, 0, 2, 1]);
        v
    });
    // A duplicate connection is announced too; only the last departure is PeerGone.
    let a2 = ClientHandle::new(3, key(1), addr(), 1);
    r.register(&a2);
    assert_eq!(frames().len(), 1);
    r.unregister(&a2);
    assert!(frames().is_empty());
    r.unregister(&a);
    assert_eq!(
        frames(),
        vec![SmallFrame::peer_gone(&key(1), PeerGoneReason::Disconnected)
            .as_bytes()
            .to_vec()]
    );
    // An unregistered watcher hears nothing more.
    r.unregister(&w);
    r.register(&ClientHandle::new(4, key(4), addr(), 1));
    assert!(frames().is_empty());
}

fn peer_flags_mesh() -> u8 {
    frame::peer_flags::IS_MESH_PEER
}
