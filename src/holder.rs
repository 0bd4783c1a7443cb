//! Who holds a port, for the log line when a listener cannot bind: the kernel's socket tables
//! (`/proc/net/tcp`, `tcp6`, `udp`, `udp6`) give the inode and owner uid of each socket bound to
//! the port, and `/proc/<pid>/fd/*` links (`socket:[<inode>]`) lead to the process and its name
//! (`/proc/<pid>/comm`). Best effort: another user's descriptors are hidden from an unprivileged
//! derpd (then only the uid is told), and anything unreadable is skipped. Linux only; elsewhere
//! the tables are missing and nothing is found.

use std::fmt::Write as _;

/// The transport of the socket that could not bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn tables(self) -> [&'static str; 2] {
        match self {
            Proto::Tcp => ["/proc/net/tcp", "/proc/net/tcp6"],
            Proto::Udp => ["/proc/net/udp", "/proc/net/udp6"],
        }
    }

    /// The `st` column of a socket that holds a port: TCP LISTEN (0A); UDP's unconnected state
    /// is TCP_CLOSE (07).
    fn holding_state(self) -> &'static str {
        match self {
            Proto::Tcp => "0A",
            Proto::Udp => "07",
        }
    }
}

/// A socket bound to the port: its owner's uid and its inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Socket {
    pub(crate) uid: u32,
    pub(crate) inode: u64,
}

/// The sockets of one `/proc/net/{tcp,udp}{,6}` table that hold `port` (any local address).
/// Lines: `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`, the
/// local address as hex `ADDR:PORT`.
pub(crate) fn sockets_on_port(table: &str, proto: Proto, port: u16) -> Vec<Socket> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(uid), Some(inode)) =
            (f.get(1), f.get(3), f.get(7), f.get(9))
        else {
            continue;
        };
        let Some((_, port_hex)) = local.rsplit_once(':') else {
            continue;
        };
        if u16::from_str_radix(port_hex, 16) != Ok(port) || *state != proto.holding_state() {
            continue;
        }
        if let (Ok(uid), Ok(inode)) = (uid.parse(), inode.parse()) {
            if inode != 0 {
                out.push(Socket { uid, inode });
            }
        }
    }
    out
}

/// The inode of an fd link's target `socket:[12345]`.
pub(crate) fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The processes (pid, name) with a descriptor for one of `inodes`, from `/proc`.
fn processes_with(inodes: &[u64]) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // Another user's descriptors are unreadable without privileges: skipped.
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| l.to_str().and_then(socket_inode))
                .is_some_and(|i| inodes.contains(&i))
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_string()));
        }
    }
    found
}

/// Says who holds `port` ("uhttpd (pid 1234)", or "a socket of uid 0" when its process cannot be
/// seen); `None` when no socket is found.
pub(crate) fn describe(proto: Proto, port: u16) -> Option<String> {
    let mut sockets = Vec::new();
    for t in proto.tables() {
        if let Ok(text) = std::fs::read_to_string(t) {
            sockets.extend(sockets_on_port(&text, proto, port));
        }
    }
    if sockets.is_empty() {
        return None;
    }
    let inodes: Vec<u64> = sockets.iter().map(|s| s.inode).collect();
    let procs = processes_with(&inodes);
    let mut out = String::new();
    if procs.is_empty() {
        let mut uids: Vec<u32> = sockets.iter().map(|s| s.uid).collect();
        uids.sort_unstable();
        uids.dedup();
        let uids: Vec<String> = uids.iter().map(u32::to_string).collect();
        let _ = write!(
            out,
            "a socket of uid {} (its process is hidden from derpd's user)",
            uids.join(", ")
        );
    } else {
        for (i, (pid, name)) in procs.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(out, "{sep}{name} (pid {pid})");
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    // From a router with uhttpd on 0.0.0.0:80, 0.0.0.0:443 and a client connection to :443.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2345 1 00000000 100 0 0 10 0
   1: 00000000:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2346 1 00000000 100 0 0 10 0
   2: 0101A8C0:01BB 0201A8C0:C350 01 00000000:00000000 02:000AFC6D 00000000     0        0 9999 2 00000000 20 4 30 10 -1
   3: 0100007F:0CFD 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 3456 1 00000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2348 1 00000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0D96 00000000:0000 07 00000000:00000000 00:00000000 00000000   110        0 4567 2 0000000000000000 0
  101: 0100007F:0D96 0200007F:0035 01 00000000:00000000 00:00000000 00000000   110        0 4568 2 0000000000000000 0
";

    #[test]
    fn listening_sockets_on_the_port() {
        let s = |uid, inode| Socket { uid, inode };
        assert_eq!(sockets_on_port(TCP, Proto::Tcp, 443), [s(0, 2346)]);
        assert_eq!(sockets_on_port(TCP, Proto::Tcp, 80), [s(0, 2345)]);
        assert_eq!(sockets_on_port(TCP, Proto::Tcp, 3325), [s(1000, 3456)]);
        assert_eq!(sockets_on_port(TCP6, Proto::Tcp, 443), [s(0, 2348)]);
        assert!(sockets_on_port(TCP, Proto::Tcp, 8443).is_empty());
        // A connected UDP socket does not hold the port; the unconnected one does.
        assert_eq!(sockets_on_port(UDP, Proto::Udp, 3478), [s(110, 4567)]);
        // TCP's LISTEN state is not UDP's bound state.
        assert!(sockets_on_port(TCP, Proto::Udp, 443).is_empty());
    }

    #[test]
    fn garbage_is_skipped() {
        for t in [
            "",
            "header only\n",
            "h\n0: zz:01BB 0 0A a b c x y z\n",
            "h\n0: 0:01BB\n",
        ] {
            assert!(sockets_on_port(t, Proto::Tcp, 443).is_empty(), "{t:?}");
        }
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[2346]"), Some(2346));
        assert_eq!(socket_inode("pipe:[2346]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    /// This process holds a listener: found by its port, with this process's name.
    #[test]
    fn finds_this_process() {
        if !std::path::Path::new("/proc/net/tcp").exists() {
            return; // not Linux
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let who = describe(Proto::Tcp, port).unwrap();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let want = format!("{} (pid {})", comm.trim(), std::process::id());
        assert!(who.contains(&want), "{who:?}, want {want:?}");
        drop(l);
        assert_eq!(describe(Proto::Tcp, port), None);
    }
}
