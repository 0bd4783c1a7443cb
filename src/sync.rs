//! Locking that survives a panic elsewhere.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also when a thread panicked while holding it: every value derpd keeps under a
/// std mutex stays consistent between statements (a counter, a queue, a map), so one bad
/// task must not take the relay's shared state down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
