//! `SharedTable`: the table behind a mutex, with the NCCL calls made outside it and every wait
//! bounded.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::table::PlanEnd;
use super::{Lane, Plan, Scope, SegmentTable, Untracked, WindowRegistrar, ANY_PEERS};
use crate::error::{Error, Result};
use crate::handles::{CommPtr, DevicePtr};

/// How long a wait on another registration of the same communicator (or on a segment being
/// registered) lasts by default: `SYMM_RS_TIMEOUT`'s default.
const DEFAULT_WAIT_LIMIT: Duration = Duration::from_secs(30);

/// What a registration did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registered {
    pub windows: usize,
    /// NCCL answered with a NULL window: the communicator has no symmetric memory, and now
    /// registers nothing (on every rank alike: NCCL decides per communicator).
    pub null_window: bool,
}

/// The table behind a mutex, with the NCCL calls made outside it. A `Condvar` lets a second
/// registration of the same communicator, or the free of a segment being registered, wait
/// (boundedly) for the first to finish instead of racing it.
#[derive(Debug)]
pub struct SharedTable {
    table: Mutex<SegmentTable>,
    changed: Condvar,
    wait_limit_ms: AtomicU64,
}

impl Default for SharedTable {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            changed: Condvar::new(),
            wait_limit_ms: AtomicU64::new(DEFAULT_WAIT_LIMIT.as_millis() as u64),
        }
    }
}

/// A planned registration: its segments are pinned and its communicator is busy until it is
/// registered or dropped (dropping cancels it, also on a panic or an early return).
#[derive(Debug)]
pub struct PlanGuard<'a> {
    table: &'a SharedTable,
    plan: Option<Plan>,
}

impl PlanGuard<'_> {
    pub fn plan(&self) -> &Plan {
        self.plan
            .as_ref()
            .expect("a PlanGuard holds its plan until consumed")
    }

    /// Registers exactly the planned segments, in order; `progress(i)` is told before the
    /// `i`-th NCCL call. Collective: every rank must register its own plan of the same sizes.
    pub fn register<R: WindowRegistrar>(
        mut self,
        nccl: &R,
        mut progress: impl FnMut(usize),
    ) -> Result<Registered> {
        let plan = self.plan.take().expect("a PlanGuard is consumed once");
        let comm = plan.comm();
        let mut made = Vec::with_capacity(plan.len());
        let mut end = PlanEnd::Complete;
        let mut failure = None;
        for (i, (ptr, size)) in plan.segments().enumerate() {
            if !self.table.lock().is_current(&plan) {
                end = PlanEnd::Cancelled;
                failure = Some(Error::Closed(format!(
                    "communicator {comm} was released or forgotten while its registration was \
                     planned; nothing more is registered on it"
                )));
                break;
            }
            progress(i);
            match nccl.register(comm, ptr, size) {
                Ok(Some(handle)) => made.push(handle),
                Ok(None) => {
                    end = PlanEnd::NullWindow;
                    break;
                }
                Err(e) => {
                    end = PlanEnd::Failed;
                    failure = Some(e);
                    break;
                }
            }
        }
        let windows = made.len();
        self.table.lock().finish(plan, &made, end);
        self.table.changed.notify_all();
        match failure {
            Some(e) => Err(e),
            None => Ok(Registered {
                windows,
                null_window: end == PlanEnd::NullWindow,
            }),
        }
    }

    /// Gives the plan up: nothing registered, the segments stay pending.
    pub fn cancel(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(plan) = self.plan.take() {
            self.table.lock().finish(plan, &[], PlanEnd::Cancelled);
            self.table.changed.notify_all();
        }
    }
}

impl Drop for PlanGuard<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl SharedTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The table locked. A poisoned lock is recovered: every mutation leaves the table whole.
    pub fn lock(&self) -> MutexGuard<'_, SegmentTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a wait on the table lasts before it gives up with `Error::Timeout`.
    pub fn set_wait_limit(&self, limit: Duration) {
        let ms = limit.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        self.wait_limit_ms.store(ms, Ordering::Relaxed);
    }

    pub fn wait_limit(&self) -> Duration {
        Duration::from_millis(self.wait_limit_ms.load(Ordering::Relaxed))
    }

    /// Waits (with the lock released) until `blocked` is false, at most the wait limit.
    fn wait_while<'a>(
        &'a self,
        mut table: MutexGuard<'a, SegmentTable>,
        call: &'static str,
        what: impl Fn() -> String,
        blocked: impl Fn(&SegmentTable) -> bool,
    ) -> Result<MutexGuard<'a, SegmentTable>> {
        let limit = self.wait_limit();
        let deadline = Instant::now() + limit;
        while blocked(&table) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    call,
                    seconds: limit.as_secs_f64(),
                    what: what(),
                });
            }
            table = self
                .changed
                .wait_timeout(table, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(table)
    }

    /// Locks the table once `comm` is not busy (bounded).
    fn lock_idle(&self, comm: CommPtr, call: &'static str) -> Result<MutexGuard<'_, SegmentTable>> {
        let what = || {
            format!(
                "another registration or release of communicator {comm} is still running (see \
                 symm_rs.watchdog.describe_registration_in_progress())"
            )
        };
        self.wait_while(self.lock(), call, what, |t| t.is_busy(comm))
    }

    /// Whether `comm` has registered every segment its exits from `lane` would register and
    /// no registration of it is running (a communicator the table has never seen is not up to
    /// date, unless it is plain).
    pub fn is_up_to_date(&self, comm: CommPtr, lane: Lane) -> bool {
        let table = self.lock();
        let peers = table.peers_of(comm).unwrap_or(ANY_PEERS);
        Self::up_to_date(&table, comm, Scope { peers, lane })
    }

    fn up_to_date(table: &SegmentTable, comm: CommPtr, scope: Scope) -> bool {
        match table.known_device(comm) {
            Some(device) => {
                !table.is_busy(comm) && table.pending(comm, device, scope).next().is_none()
            }
            None => false,
        }
    }

    /// Marks `comm` plain: nothing is registered on it from now on.
    pub fn make_plain<R: WindowRegistrar>(&self, comm: CommPtr, nccl: &R) -> Result<()> {
        let device = self.device_of(comm, nccl)?;
        self.lock().make_plain(comm, device);
        Ok(())
    }

    fn device_of<R: WindowRegistrar>(&self, comm: CommPtr, nccl: &R) -> Result<i32> {
        let known = self.lock().known_device(comm);
        match known {
            Some(device) => Ok(device),
            None => nccl.comm_device(comm),
        }
    }

    /// Plans the registration of every segment of `scope` on the communicator's device that it
    /// has not registered yet, or `None` when there is nothing to register. Waits (bounded)
    /// while another registration of the same communicator runs. Other communicators, and
    /// the allocator plugs, are never blocked by a plan.
    pub fn plan<R: WindowRegistrar>(
        &self,
        comm: CommPtr,
        scope: impl Into<Scope>,
        nccl: &R,
    ) -> Result<Option<PlanGuard<'_>>> {
        let scope = scope.into();
        // The common exit: nothing new since the last registration, decided under one lock.
        if Self::up_to_date(&self.lock(), comm, scope) {
            return Ok(None);
        }
        let device = self.device_of(comm, nccl)?;
        let plan = self
            .lock_idle(comm, "planning a registration")?
            .plan(comm, device, scope);
        let guard = PlanGuard {
            table: self,
            plan: Some(plan),
        };
        if guard.plan().is_empty() {
            guard.cancel();
            return Ok(None);
        }
        Ok(Some(guard))
    }

    /// Plans and registers in one go (no agreement between ranks first).
    pub fn register_pending<R: WindowRegistrar>(
        &self,
        comm: CommPtr,
        scope: impl Into<Scope>,
        nccl: &R,
    ) -> Result<Registered> {
        match self.plan(comm, scope, nccl)? {
            Some(plan) => plan.register(nccl, |_| {}),
            None => Ok(Registered::default()),
        }
    }

    /// Takes the segment at `ptr` out of the table after deregistering every window on it, so
    /// the caller can free it. Waits (bounded) while a registration of that segment runs; a
    /// segment still pinned after that stays in the table and is not freed. `None` if `ptr`
    /// is not a tracked segment.
    pub fn untrack<R: WindowRegistrar>(
        &self,
        ptr: DevicePtr,
        nccl: &R,
    ) -> Result<Option<Untracked>> {
        let segment = {
            let what = || {
                format!(
                    "segment {ptr} is still being registered by NCCL; it is kept allocated rather \
                     than freed under NCCL"
                )
            };
            let mut table =
                self.wait_while(self.lock(), "freeing a segment", what, |t| t.is_pinned(ptr))?;
            match table.remove(ptr) {
                Some(segment) => segment,
                None => return Ok(None),
            }
        };
        let mut failures = Vec::new();
        for window in &segment.windows {
            if let Err(e) = nccl.deregister(window.comm, window.handle) {
                failures.push(e);
            }
        }
        {
            let mut table = self.lock();
            let failed = failures.len() as u64;
            table.counters.windows_deregistered += segment.windows.len() as u64 - failed;
            table.counters.deregistration_failures += failed;
        }
        Ok(Some(Untracked { segment, failures }))
    }

    /// Deregisters every window `comm` holds and forgets the communicator, before it is
    /// destroyed. Returns how many windows were released, or the first failure.
    pub fn release_comm<R: WindowRegistrar>(&self, comm: CommPtr, nccl: &R) -> Result<usize> {
        let taken = self
            .lock_idle(comm, "releasing a communicator's windows")?
            .take_windows(comm);
        let mut failed = HashSet::new();
        let mut first_failure = None;
        for &(seq, handle) in &taken {
            if let Err(e) = nccl.deregister(comm, handle) {
                failed.insert(seq);
                first_failure.get_or_insert(e);
            }
        }
        self.lock().finish_release(comm, &taken, &failed);
        self.changed.notify_all();
        match first_failure {
            Some(e) => Err(e),
            None => Ok(taken.len()),
        }
    }

    /// Forgets a destroyed communicator (see `SegmentTable::forget`). Never waits: a
    /// registration of it still running records nothing when it ends.
    pub fn forget_comm(&self, comm: CommPtr) -> usize {
        let dropped = self.lock().forget(comm);
        self.changed.notify_all();
        dropped
    }
}
