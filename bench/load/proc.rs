//! The server's and the generator's CPU time and memory from `/proc`, and the measured window.

use super::*;

#[derive(Clone, Copy, Debug)]
pub(super) struct Sample {
    pub(super) at: Instant,
    pub(super) server_ticks: u64,
    pub(super) self_ticks: u64,
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) received_bytes: u64,
    pub(super) logins: u64,
    pub(super) probes_sent: u64,
    pub(super) fight_frames: u64,
    /// The server's allocations so far, when counted (`--alloc-counter`).
    pub(super) allocs: Option<u64>,
    /// The server's guest instructions so far, when counted (`--insn-counter`).
    pub(super) insns: Option<u64>,
}

/// utime + stime of a process, in clock ticks.
pub(super) fn cpu_ticks(pid: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name start at field 3 (state).
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Counter 0 of bench/alloc-count.c's file: the allocations so far.
pub(super) fn alloc_count(path: &str) -> Option<u64> {
    let b = std::fs::read(path).ok()?;
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

/// Allocations per unit of work (packet, login) in the window, when counted.
pub(super) fn allocs_per(a: &Sample, b: &Sample, units: u64) -> Value {
    per(a.allocs, b.allocs, units, 3)
}

/// Guest instructions per unit of work (packet, login) in the window, when counted.
pub(super) fn insns_per(a: &Sample, b: &Sample, units: u64) -> Value {
    per(a.insns, b.insns, units, 0)
}

fn per(a: Option<u64>, b: Option<u64>, units: u64, digits: i32) -> Value {
    match (a, b) {
        (Some(x), Some(y)) if units > 0 => {
            json!(round(y.saturating_sub(x) as f64 / units as f64, digits))
        }
        _ => Value::Null,
    }
}

/// A reading of bench/qemu-insn.c's counter: a newline to its FIFO, then the line it appends
/// to its output file (the guest instructions so far). Blocks the generator for that moment
/// (a few milliseconds), at the edges of the measured window only.
pub(super) fn insn_count((ctl, out): &(String, String)) -> Option<u64> {
    let lines = |s: &str| s.lines().filter(|l| !l.starts_with("exit")).count();
    let before = lines(&std::fs::read_to_string(out).unwrap_or_default());
    std::fs::OpenOptions::new()
        .write(true)
        .open(ctl)
        .and_then(|mut f| f.write_all(b"\n"))
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let s = std::fs::read_to_string(out).unwrap_or_default();
        if lines(&s) > before {
            let last = s.lines().rev().find(|l| !l.starts_with("exit"))?;
            return last.trim().parse().ok();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

pub(super) fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Ctx {
    pub(super) fn sample(&self) -> Sample {
        let s = &self.stats;
        let (server_ticks, rss_kib, hwm_kib) = match self.pid {
            Some(p) => (
                cpu_ticks(&p.to_string()),
                status_kib(p, "VmRSS:"),
                status_kib(p, "VmHWM:"),
            ),
            None => (0, 0, 0),
        };
        Sample {
            at: Instant::now(),
            server_ticks,
            self_ticks: cpu_ticks("self"),
            rss_kib,
            hwm_kib,
            sent: s.sent.get(),
            received: s.received.get(),
            received_bytes: s.received_bytes.get(),
            logins: s.logins.get(),
            probes_sent: s.probes_sent.get(),
            fight_frames: s.fight_frames.get(),
            allocs: self.alloc_counter.as_deref().and_then(alloc_count),
            insns: self.insn_counter.as_ref().and_then(insn_count),
        }
    }

    pub(super) fn note(&self, what: &str, r: io::Result<()>) {
        if let Err(e) = r {
            if !self.stop.get() {
                self.stats.error(format!("{what}: {e}"));
            }
        }
    }
}

/// Window figures common to every mode: wall time, CPU of both sides, the bottleneck.
/// Returns the wall time and the server's CPU seconds too, for per-packet and per-login figures.
pub(super) fn window(a: &Sample, b: &Sample) -> (f64, f64, Value) {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let wall = b.at.duration_since(a.at).as_secs_f64();
    let server_s = b.server_ticks.saturating_sub(a.server_ticks) as f64 / hz;
    let self_s = b.self_ticks.saturating_sub(a.self_ticks) as f64 / hz;
    let (su, lu) = (server_s / wall, self_s / wall);
    let bottleneck = if su >= 0.9 {
        "server"
    } else if lu >= 0.9 {
        "loadgen"
    } else {
        "neither"
    };
    let v = json!({
        "seconds": round(wall, 3),
        "server_cpu_s": round(server_s, 3),
        "server_cpu_util": round(su, 3),
        "loadgen_cpu_util": round(lu, 3),
        "bottleneck": bottleneck,
    });
    (wall, server_s, v)
}

pub(super) fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

pub(super) fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}
