//! Log lines that a stranger can cause, at a bounded rate.
//!
//! A failed login, a refused request head, a refused WebSocket, a connection that ends in an
//! error or a login admitted because the admission controller is down each deserve a line,
//! but the logger writes synchronously (stderr into procd's logd or journald): a flood of such
//! connections would fill the pipe and block the executor thread that writes. Each kind writes
//! at most [`LINES_PER_WINDOW`] lines every [`WINDOW`]; the first line of the next window is
//! preceded by "… and N more `<kind>` in the last 10 s".
//! The lines held back are counted in `derpd_log_lines_suppressed{kind}` and written at debug
//! level instead (`--log-level debug` shows every one, for troubleshooting). Write them with
//! the crate-private `limited!` macro.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The length of a window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines of one kind written per window.
pub const LINES_PER_WINDOW: u32 = 5;

/// One kind of line.
#[derive(Debug)]
pub struct LogLimit {
    /// Plural, for the summary: "failed logins".
    what: &'static str,
    window: Mutex<Window>,
    /// Lines held back since start (wraps after 4 billion).
    suppressed: AtomicU32,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    shown: u32,
    held: u32,
}

impl LogLimit {
    /// A kind of line; `what` names its events in the plural.
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            window: Mutex::new(Window {
                start: None,
                shown: 0,
                held: 0,
            }),
            suppressed: AtomicU32::new(0),
        }
    }

    /// Whether to write one more line of this kind now. When the window that held lines back
    /// has ended, writes its summary first.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> bool {
        let (ok, summary) = {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            let mut summary = None;
            if w.start
                .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW)
            {
                if let (Some(s), held @ 1..) = (w.start, w.held) {
                    summary = Some((held, now.saturating_duration_since(s)));
                }
                *w = Window {
                    start: Some(now),
                    shown: 0,
                    held: 0,
                };
            }
            let ok = w.shown < LINES_PER_WINDOW;
            if ok {
                w.shown += 1;
            } else {
                w.held += 1;
            }
            (ok, summary)
        };
        if let Some((held, since)) = summary {
            log::info!(
                "… and {held} more {} in the last {} s",
                self.what,
                since.as_secs()
            );
        }
        if !ok {
            self.suppressed.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Lines held back since start.
    pub fn suppressed(&self) -> u32 {
        self.suppressed.load(Relaxed)
    }
}

/// `limited!(info, LOGINS, "…", args)`: the line at its level when `LOGINS` allows one more,
/// else at debug level.
macro_rules! limited {
    ($level:ident, $limit:expr, $($arg:tt)+) => {
        if $limit.allow() {
            log::$level!($($arg)+)
        } else {
            log::debug!($($arg)+)
        }
    };
}
pub(crate) use limited;

/// Failed and refused logins (ClientInfo errors, admission, `--max-clients`).
pub static LOGINS: LogLimit = LogLimit::new("failed logins");
/// DERP connections that ended with an error after login.
pub static CONN_ERRORS: LogLimit = LogLimit::new("connection errors");
/// Request heads refused (bad HTTP, unknown upgrade and the like).
pub static HEADS: LogLimit = LogLimit::new("refused requests");
/// WebSocket upgrades refused.
pub static WEBSOCKETS: LogLimit = LogLimit::new("refused WebSockets");

/// Logins admitted because the admission controller could not be reached.
pub static FAIL_OPEN: LogLimit = LogLimit::new("fail-open admissions");

/// Every kind, in the order of [`KIND_LABELS`].
pub static KINDS: [&LogLimit; 5] = [&LOGINS, &CONN_ERRORS, &HEADS, &WEBSOCKETS, &FAIL_OPEN];
/// The metric label of each kind in [`KINDS`].
pub const KIND_LABELS: &[&str] = &["login", "conn_error", "head", "websocket", "fail_open"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_writes_its_share_then_holds_back() {
        let l = LogLimit::new("things");
        let t0 = Instant::now();
        let shown = (0..100).filter(|_| l.allow_at(t0)).count();
        assert_eq!(shown, LINES_PER_WINDOW as usize);
        assert_eq!(l.suppressed(), 100 - LINES_PER_WINDOW);
        // Still the same window just before it ends.
        assert!(!l.allow_at(t0 + WINDOW - Duration::from_millis(1)));
        // A new window: lines again, and the held count starts over.
        let t1 = t0 + WINDOW;
        assert!(l.allow_at(t1));
        assert_eq!(l.window.lock().unwrap().held, 0);
        let shown = (0..10).filter(|_| l.allow_at(t1)).count();
        assert_eq!(shown, LINES_PER_WINDOW as usize - 1);
        assert_eq!(
            l.suppressed(),
            100 - LINES_PER_WINDOW + 1 + 10 - (LINES_PER_WINDOW - 1)
        );
    }
}
