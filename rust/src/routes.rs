//! The gate between allocation routes and pool destruction.
//!
//! torch aborts the process (an internal assert, `captures_underway.empty()`) when a `MemPool`
//! is destroyed while any thread has an allocation route open. symm_rs opens routes on many
//! threads (every context) and destroys pools only on request (`destroy_pool`,
//! `release_graph_pool`) or when a thread that owned one is gone, so it counts its open routes
//! here and destroys a pool only while none is open; a route waits (boundedly) while a
//! destruction runs. (A dead thread's pool is never destroyed: the next thread that needs one
//! for the same ranks takes it over.) The lock is only ever held for this bookkeeping, never while Python runs.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    /// Routes symm_rs has begun and not yet ended, on any thread.
    open: usize,
    /// A pool destruction is running.
    dropping: bool,
}

#[derive(Debug, Default)]
pub struct RouteGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl RouteGate {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                open: 0,
                dropping: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a route about to begin, unless a destruction runs (then `false`: call `open`).
    pub fn try_open(&self) -> bool {
        let mut state = self.lock();
        if state.dropping {
            return false;
        }
        state.open += 1;
        true
    }

    /// Counts a route about to begin, waiting at most `limit` for a destruction to end.
    pub fn open(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        while state.dropping {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    call: "routing allocations into a symmetric pool",
                    seconds: limit.as_secs_f64(),
                    what: "a symmetric pool is being destroyed on another thread".into(),
                });
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.open += 1;
        Ok(())
    }

    /// Counts a route that ended.
    pub fn close(&self) {
        let mut state = self.lock();
        state.open = state.open.saturating_sub(1);
    }

    /// Starts a destruction when no route is open (`true`); no route can begin until
    /// `end_drop`. `false` when routes are open: destroying a pool now would abort the process.
    pub fn begin_drop(&self) -> bool {
        let mut state = self.lock();
        if state.open > 0 || state.dropping {
            return false;
        }
        state.dropping = true;
        true
    }

    pub fn end_drop(&self) {
        self.lock().dropping = false;
        self.changed.notify_all();
    }

    pub fn open_routes(&self) -> usize {
        self.lock().open
    }
}

/// The process's one gate.
pub static GATE: RouteGate = RouteGate::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_never_dropped_while_a_route_is_open() {
        let gate = RouteGate::new();
        assert!(gate.try_open());
        assert!(!gate.begin_drop(), "dropped under an open route");
        gate.close();
        assert!(gate.begin_drop());
        assert!(!gate.try_open(), "a route began during a drop");
        gate.end_drop();
        assert!(gate.try_open());
    }

    #[test]
    fn a_route_waits_for_a_drop_boundedly() {
        let gate = RouteGate::new();
        assert!(gate.begin_drop());
        let err = gate.open(Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        gate.end_drop();
        gate.open(Duration::from_millis(20)).unwrap();
        assert_eq!(gate.open_routes(), 1);
    }
}
