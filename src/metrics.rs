//! Server counters and gauges, named after derper's expvars so `/debug/varz` (`server/debug/`)
//! publishes them under the same names. 64-bit counters use portable-atomic: 32-bit MIPS has
//! no native 64-bit atomics.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use portable_atomic::AtomicU64;

/// Why a packet was dropped (derper's `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// No client with that key here.
    UnknownDest = 0,
    /// A mesh peer forwarded to a key that is not here.
    UnknownDestOnFwd = 1,
    /// The destination disconnected with the packet queued.
    GoneDisconnected = 2,
    /// The destination's queue was full: its oldest packet was dropped.
    QueueHead = 3,
    /// The new packet itself was dropped.
    QueueTail = 4,
    /// Writing to the destination failed.
    WriteError = 5,
    /// The destination key has several connections and none is active.
    DupClient = 6,
    /// The mesh link to the destination's node was down or its queue full (derpd's own
    /// reason: derper forwards synchronously and ignores errors).
    MeshForward = 7,
    /// The destination's queues already held its share of large buffers: its oldest large
    /// packet was dropped (derpd's own reason: derper has no buffer pool).
    QueueLarge = 8,
}

impl DropReason {
    /// All reasons, in label order.
    pub const ALL: [DropReason; 9] = [
        Self::UnknownDest,
        Self::UnknownDestOnFwd,
        Self::GoneDisconnected,
        Self::QueueHead,
        Self::QueueTail,
        Self::WriteError,
        Self::DupClient,
        Self::MeshForward,
        Self::QueueLarge,
    ];

    /// derper's label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::UnknownDest => "unknown_dest",
            Self::UnknownDestOnFwd => "unknown_dest_on_fwd",
            Self::GoneDisconnected => "gone_disconnected",
            Self::QueueHead => "queue_head",
            Self::QueueTail => "queue_tail",
            Self::WriteError => "write_error",
            Self::DupClient => "dup_client",
            Self::MeshForward => "mesh_forward",
            Self::QueueLarge => "queue_large",
        }
    }
}

/// Counters and gauges. Every field is updated with relaxed atomics: they are statistics, not
/// synchronisation.
#[derive(Debug, Default)]
pub struct Metrics {
    /// DERP connections: HTTP upgrades to DERP, WebSocket included, before the login (derper's
    /// `accepts`, which it counts in `Server.Accept`).
    pub accepts: AtomicU64,
    /// TCP connections accepted on any listener: DERP, probes, scrapes, failed TLS
    /// (`derpd_tcp_accepts`).
    pub tcp_accepts: AtomicU64,
    /// Logged-in DERP connections now (`gauge_current_connections`).
    pub current_connections: AtomicUsize,
    /// Connections whose last NotePreferred was true (`gauge_current_home_connections`).
    pub home_connections: AtomicUsize,
    /// Connections that came with an `Ideal-Node` header (`gauge_current_notideal_connections`).
    pub notideal_connections: AtomicUsize,
    /// Keys with more than one connection (`gauge_current_dup_client_keys`).
    pub dup_client_keys: AtomicUsize,
    /// Connections that share their key with another (`gauge_current_dup_client_conns`).
    pub dup_client_conns: AtomicUsize,
    /// Duplicate connections ever (`counter_total_dup_client_conns`).
    pub total_dup_client_conns: AtomicU64,
    /// Logins that used fast start (no 101).
    pub fast_start_logins: AtomicU64,
    /// Connections that ended with an error (bad head, TLS, ClientInfo, deadline, protocol).
    pub failed_logins: AtomicU64,
    /// Connections on the main listener let through the accept rate limit
    /// (derper's `tls_listener` `counter_accepted_connections`).
    pub main_accepted: AtomicU64,
    /// Connections closed at accept by `--accept-connection-limit`
    /// (derper's `tls_listener` `counter_rejected_connections`).
    pub accept_rejected: AtomicU64,
    /// Connections closed at accept because their address (IPv6: /64) had
    /// `--max-handshakes-per-ip` connections logging in.
    pub handshakes_ip_full: AtomicU64,
    /// Connections not logged in yet, evicted for a newcomer when all `--max-handshakes` were
    /// taken, by how far they had come ([`crate::limits::Progress`]: silent, talking, upgraded).
    pub handshakes_evicted: [AtomicU64; 3],
    /// Connections closed because they sent nothing within `--first-byte-timeout`.
    pub first_byte_timeouts: AtomicU64,
    /// Logins refused because `--max-clients` were connected.
    pub clients_full: AtomicU64,
    /// Failed accept calls (out of file descriptors and the like).
    pub accept_errors: AtomicU64,
    /// Packets received from clients (`packets_received`).
    pub packets_received: AtomicU64,
    /// Bytes of packets received (`bytes_received`).
    pub bytes_received: AtomicU64,
    /// Packets received by kind: [disco, other] (`counter_packets_received_kind`).
    pub packets_received_kind: [AtomicU64; 2],
    /// Packets written to clients (`packets_sent`).
    pub packets_sent: AtomicU64,
    /// Bytes of packets written (`bytes_sent`).
    pub bytes_sent: AtomicU64,
    /// Drops by `[reason][disco=0/other=1]` (`derp_packets_dropped`).
    pub packets_dropped: [[AtomicU64; 2]; DropReason::ALL.len()],
    /// Bytes dropped by `[reason][kind]` (`derp_bytes_dropped`).
    pub bytes_dropped: [[AtomicU64; 2]; DropReason::ALL.len()],
    /// Pings received (`got_ping`).
    pub got_ping: AtomicU64,
    /// Pongs sent (`sent_pong`).
    pub sent_pong: AtomicU64,
    /// PeerGone Disconnected frames sent (`peer_gone_disconnected_frames`).
    pub peer_gone_disconnected_frames: AtomicU64,
    /// PeerGone NotHere frames sent (`peer_gone_not_here_frames`).
    pub peer_gone_not_here_frames: AtomicU64,
    /// Home region changes after the first 5 s (`home_moves_in`/`home_moves_out`).
    pub home_moves_in: AtomicU64,
    /// See `home_moves_in`.
    pub home_moves_out: AtomicU64,
    /// Connections closed for a write timeout (`sclient_write_timeouts`).
    pub write_timeouts: AtomicU64,
    /// Frames of unknown type, skipped (derper never counts these; we do).
    pub unknown_frames: AtomicU64,
    /// Packets handed to a mesh link for another node (`packets_forwarded_out`).
    pub packets_forwarded_out: AtomicU64,
    /// ForwardPacket frames received from mesh peers (`packets_forwarded_in`).
    pub packets_forwarded_in: AtomicU64,
    /// Keys that became reachable through a second mesh peer (`multiforwarder_created`).
    pub multiforwarder_created: AtomicU64,
    /// Keys back to one mesh peer (`multiforwarder_deleted`).
    pub multiforwarder_deleted: AtomicU64,
    /// Forwarder removals that named another link (`packet_forwarder_delete_other_value`).
    pub packet_forwarder_delete_other_value: AtomicU64,
    /// Mesh links now connected (derpd's own gauge).
    pub mesh_links_up: AtomicUsize,
    /// STUN: answered requests (`stun_requests{disposition="success"}`).
    pub stun_success: AtomicU64,
    /// STUN: datagrams that were not Tailscale binding requests (`not_stun`).
    pub stun_not_stun: AtomicU64,
    /// STUN: failed socket reads (`read_error`).
    pub stun_read_error: AtomicU64,
    /// STUN: failed response writes (`write_error`).
    pub stun_write_error: AtomicU64,
    /// STUN: binding requests by address family, [ipv4, ipv6] (`stun_addrfamily`); IPv4 peers
    /// seen on a dual-stack socket count as ipv4, as in derper.
    pub stun_addrfamily: [AtomicU64; 2],
    /// WebSocket upgrades accepted on `/derp` (`derp_websocket_accepts`).
    pub websocket_accepts: AtomicU64,
    /// TLS handshakes completed on the main listener, by the AEAD of the suite negotiated
    /// (`derpd_tls_handshakes{aead}`: `tls::ciphers::AEADS`).
    pub tls_aead: [AtomicU64; 3],
}

impl Metrics {
    /// Counts a dropped packet.
    pub fn drop_packet(&self, reason: DropReason, disco: bool, bytes: usize) {
        let k = usize::from(!disco);
        self.packets_dropped[reason as usize][k].fetch_add(1, Relaxed);
        self.bytes_dropped[reason as usize][k].fetch_add(bytes as u64, Relaxed);
    }

    /// Packets dropped for `reason`, both kinds.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.packets_dropped[reason as usize]
            .iter()
            .map(|c| c.load(Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_counted_by_reason_and_kind() {
        let m = Metrics::default();
        m.drop_packet(DropReason::QueueHead, true, 100);
        m.drop_packet(DropReason::QueueHead, false, 50);
        assert_eq!(m.dropped(DropReason::QueueHead), 2);
        assert_eq!(
            m.bytes_dropped[DropReason::QueueHead as usize][0].load(Relaxed),
            100
        );
        assert_eq!(m.dropped(DropReason::UnknownDest), 0);
        assert_eq!(DropReason::ALL.len(), 9);
        assert_eq!(DropReason::DupClient.label(), "dup_client");
    }
}
