//! The queue of one mesh link: packets for keys on a `--mesh-with` peer wait here for the link's
//! writer ([`crate::mesh`]). The registry maps keys on other nodes to a [`Link`].

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use event_listener::Event;

use crate::frame;
use crate::key::NodePublic;
use crate::metrics::{DropReason, Metrics};
use crate::pool::PacketBuf;
use crate::sync::lock;

/// Packets waiting for a link; more are dropped (`mesh_forward`), never waited for, so a slow
/// peer cannot stall the readers of local clients.
pub const FORWARD_QUEUE_DEPTH: usize = 256;
/// Most packets per write.
pub const MAX_BATCH: usize = 32;

/// A mesh peer as a packet forwarder. Its identity (the `Arc`'s address) is what the registry
/// stores per key; it outlives reconnections.
#[derive(Debug)]
pub struct Link {
    /// Which peer: its `--mesh-with` host, as given.
    pub name: String,
    queue: Mutex<Queue>,
    /// Notified when a packet is queued or the link goes up or down.
    pub wake: Event,
}

#[derive(Debug, Default)]
struct Queue {
    /// Connected and logged in: packets are accepted.
    up: bool,
    /// (destination, packet framed as RecvPacket from its source).
    pkts: VecDeque<(NodePublic, PacketBuf)>,
}

impl Link {
    /// Whether the link is connected.
    pub fn is_up(&self) -> bool {
        lock(&self.queue).up
    }

    /// A link, not connected.
    pub fn new(name: String) -> Arc<Self> {
        Arc::new(Self {
            name,
            queue: Mutex::new(Queue::default()),
            wake: Event::new(),
        })
    }

    /// Queues a packet (a RecvPacket frame from its source) for `dst` on the peer. Never waits:
    /// when the link is down or its queue full the packet is dropped as `mesh_forward`.
    pub fn forward(&self, dst: NodePublic, pkt: PacketBuf, disco: bool, m: &Metrics) {
        let rejected = {
            let mut q = lock(&self.queue);
            if q.up && q.pkts.len() < FORWARD_QUEUE_DEPTH {
                q.pkts.push_back((dst, pkt));
                None
            } else {
                Some(pkt)
            }
        };
        match rejected {
            None => {
                m.packets_forwarded_out.fetch_add(1, Relaxed);
                self.wake.notify(1);
            }
            Some(p) => m.drop_packet(DropReason::MeshForward, disco, p.payload().len()),
        }
    }

    /// Marks the link connected (packets are accepted) or not (its queue is dropped).
    pub fn set_up(&self, up: bool, m: &Metrics) {
        let dropped: Vec<_> = {
            let mut q = lock(&self.queue);
            q.up = up;
            if up {
                Vec::new()
            } else {
                q.pkts.drain(..).collect()
            }
        };
        for (_, p) in dropped {
            let data = p.payload();
            m.drop_packet(
                DropReason::MeshForward,
                frame::looks_like_disco(data),
                data.len(),
            );
        }
        self.wake.notify(usize::MAX);
    }

    /// Moves up to [`MAX_BATCH`] queued packets into `out`.
    pub fn take_batch(&self, out: &mut Vec<(NodePublic, PacketBuf)>) {
        let mut q = lock(&self.queue);
        while out.len() < MAX_BATCH {
            let Some(x) = q.pkts.pop_front() else { break };
            out.push(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_queue_is_bounded_and_down_drops() {
        let m = Metrics::default();
        let pool = crate::pool::Pool::with_counts(FORWARD_QUEUE_DEPTH + 8, 1);
        let link = Link::new("peer".into());
        let pkt = || {
            let mut p = pool.try_get(frame::RECV_PREFIX + 10).unwrap();
            p.frame_recv_packet(&NodePublic([2; 32]), 10);
            p
        };
        link.forward(NodePublic([1; 32]), pkt(), false, &m);
        assert_eq!(m.dropped(DropReason::MeshForward), 1, "down: dropped");
        link.set_up(true, &m);
        for _ in 0..FORWARD_QUEUE_DEPTH + 2 {
            link.forward(NodePublic([1; 32]), pkt(), false, &m);
        }
        assert_eq!(m.dropped(DropReason::MeshForward), 3, "full: dropped");
        assert_eq!(
            m.packets_forwarded_out.load(Relaxed),
            FORWARD_QUEUE_DEPTH as u64
        );
        link.set_up(false, &m);
        assert_eq!(
            m.dropped(DropReason::MeshForward),
            3 + FORWARD_QUEUE_DEPTH as u64
        );
        assert_eq!(pool.stats().small.2, 0, "buffers returned");
    }
}
