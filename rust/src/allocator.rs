//! The allocator plugs torch calls (`symm_rs_alloc` / `symm_rs_free`), the process-wide segment
//! table they feed, and the operations Python runs on that table.
//!
//! The plugs are exported with C ABI from the extension module itself, so torch's
//! `CUDAPluggableAllocator` can `dlopen` the very file Python imported and share its state.

use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cuda::{self, DeviceGuard};
use crate::error::{Error, Result};
use crate::handles::{CommPtr, DevicePtr, WindowHandle};
use crate::nccl::{self, Nccl};
use crate::segments::{
    Lane, PeerSet, PlanGuard, Registered, Scope, SegmentTable, SharedTable, Tag, WindowRegistrar,
};

static TABLE: LazyLock<SharedTable> = LazyLock::new(SharedTable::new);
/// Communicators whose registration a CUDA-graph capture (or an open NCCL group) postponed, in
/// first-seen order: the same order on every rank, so the postponed registrations line up.
static DEFERRED: Mutex<Vec<CommPtr>> = Mutex::new(Vec::new());
static EXITING: AtomicBool = AtomicBool::new(false);
static LAST_ERROR_ANY_THREAD: Mutex<Option<String>> = Mutex::new(None);

thread_local! {
    // torch raises its OOM on the thread whose allocation failed, so that thread's own
    // message is the one to attach; another thread's failure must not overwrite it.
    static LAST_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}
thread_local! {
    // The peer set and pool of the context this thread is in: torch calls the alloc plug on the
    // thread whose allocation missed the cache, so the segment is tagged with that context's.
    static ALLOCATING_FOR: std::cell::Cell<Tag> = const {
        std::cell::Cell::new(Tag { peers: 0, lane: 0 })
    };
}

/// Tags this thread's next segments with `tag`; returns the previous tag (to restore).
pub fn allocate_for(tag: Tag) -> Tag {
    ALLOCATING_FOR.with(|cell| cell.replace(tag))
}

/// How long symm_rs's own waits last (a registration of the same communicator, a segment being
/// registered): `SYMM_RS_TIMEOUT`, pushed here by the Python layer.
pub fn set_wait_limit(limit: Duration) {
    TABLE.set_wait_limit(limit);
}

pub fn wait_limit() -> Duration {
    TABLE.wait_limit()
}

static FAILURES: Mutex<FailureCounts> = Mutex::new(FailureCounts {
    alloc: 0,
    free: 0,
    leaked_segments: 0,
});

/// Plug failures so far; torch only sees a NULL pointer, so these make them observable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureCounts {
    pub alloc: u64,
    pub free: u64,
    /// Segments not handed to `ncclMemFree` because a window on them could not be deregistered
    /// (freeing memory NCCL may still map is worse than leaking it).
    pub leaked_segments: u64,
}

/// Runs `f` with the table locked (bookkeeping only: never call NCCL inside `f`).
pub fn with_table<T>(f: impl FnOnce(&mut SegmentTable) -> T) -> T {
    f(&mut TABLE.lock())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The message of this thread's most recent plug failure, taken (cleared) by the reader.
pub fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

/// The message of the most recent plug failure on any thread, left in place.
pub fn last_error_any_thread() -> Option<String> {
    lock(&LAST_ERROR_ANY_THREAD).clone()
}

pub fn failure_counts() -> FailureCounts {
    *lock(&FAILURES)
}

fn remember(message: String) {
    *lock(&LAST_ERROR_ANY_THREAD) = Some(message.clone());
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(message));
}

/// Runs plug code so that neither a panic nor an error crosses the C boundary.
fn guarded<T>(what: &str, fallback: T, body: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => {
            remember(format!("{what}: {e}"));
            fallback
        }
        Err(panic) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            remember(format!("{what}: internal error (panic): {detail}"));
            fallback
        }
    }
}

/// The real NCCL as the table's registrar.
pub struct NcclWindows<'a>(pub &'a Nccl);

impl WindowRegistrar for NcclWindows<'_> {
    fn comm_device(&self, comm: CommPtr) -> Result<i32> {
        self.0.comm_device(comm)
    }

    fn register(&self, comm: CommPtr, ptr: DevicePtr, size: usize) -> Result<Option<WindowHandle>> {
        // SAFETY: `comm` was resolved from a live group by the Python layer (a destroyed one is
        // forgotten first), and `ptr`/`size` describe a segment the table keeps pinned, so
        // still allocated, for the whole call.
        unsafe { self.0.window_register(comm, ptr, size) }
    }

    fn deregister(&self, comm: CommPtr, window: WindowHandle) -> Result<()> {
        // SAFETY: `window` was returned by `register` on `comm` and the table has taken it off
        // its segment, so it is deregistered exactly once; forgotten (destroyed)
        // communicators hold no windows.
        unsafe { self.0.window_deregister(comm, window) }
    }
}

/// Pools that may not grow any more (sealed mode), by tag, with what to say when one would.
static SEALED: Mutex<Vec<(Tag, String)>> = Mutex::new(Vec::new());

/// From now on a new segment for `tag` fails at once (torch raises its out-of-memory error
/// with `note` attached) instead of growing a pool whose new segment would need a registration
/// the peers might not make.
pub fn seal(tag: Tag, note: String) {
    let mut sealed = lock(&SEALED);
    sealed.retain(|(t, _)| *t != tag);
    sealed.push((tag, note));
}

/// Lets `tag`'s pool grow again; returns whether it was sealed.
pub fn unseal(tag: Tag) -> bool {
    let mut sealed = lock(&SEALED);
    let before = sealed.len();
    sealed.retain(|(t, _)| *t != tag);
    sealed.len() != before
}

/// Allocates one pool segment with `ncclMemAlloc` on `device` and tracks it.
pub fn allocate(size: usize, device: i32) -> Result<DevicePtr> {
    if size == 0 {
        return Err(Error::invalid_argument("size 0 requested"));
    }
    let tag = ALLOCATING_FOR.with(std::cell::Cell::get);
    if let Some((_, note)) = lock(&SEALED).iter().find(|(t, _)| *t == tag) {
        return Err(Error::Usage(format!(
            "a new {size}-byte segment was refused: {note}"
        )));
    }
    let nccl = nccl::get()?;
    let _device = DeviceGuard::enter(device)?;
    let ptr = nccl.mem_alloc(size)?;
    with_table(|table| table.track(ptr, size, device, tag));
    Ok(ptr)
}

/// From now on the free plug leaves segments to the operating system. Called at interpreter
/// exit, when the communicators the windows belong to may already be destroyed.
pub fn mark_exiting() {
    EXITING.store(true, Ordering::SeqCst);
}

/// Waits for the device, deregisters every window on the segment at `ptr`, then frees it.
pub fn release(ptr: DevicePtr, device: i32) -> Result<()> {
    if EXITING.load(Ordering::SeqCst) {
        return Ok(());
    }
    let nccl = nccl::get()?;
    let _device = DeviceGuard::enter(device)?;
    // A collective still running on this segment reads through its window: wait for the device
    // before the window is unmapped, not only before the memory is. Segments are freed rarely
    // (pool destruction, OOM retry), so the wait costs nothing that matters.
    cuda::synchronize_current()?;
    let untracked = match TABLE.untrack(ptr, &NcclWindows(nccl)) {
        Ok(untracked) => untracked,
        Err(e) => {
            lock(&FAILURES).leaked_segments += 1;
            return Err(e);
        }
    };
    if let Some(untracked) = &untracked {
        if let Some(first) = untracked.failures.first() {
            lock(&FAILURES).leaked_segments += 1;
            return Err(Error::SegmentLeaked {
                ptr,
                size: untracked.segment.size,
                failures: untracked.failures.len(),
                first: first.to_string(),
            });
        }
    }
    // SAFETY: torch hands back only pointers our alloc plug returned, once each.
    unsafe { nccl.mem_free(ptr) }
}

/// A registration that NCCL is running now, for the watchdog.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub comm: CommPtr,
    pub peers: PeerSet,
    pub sizes: Vec<usize>,
    pub started: Instant,
    /// Segments whose `ncclCommWindowRegister` has been entered.
    pub entered: usize,
    /// The OS thread id of the registering thread.
    pub thread: u64,
}

static IN_FLIGHT: Mutex<Vec<(u64, InFlight)>> = Mutex::new(Vec::new());
static IN_FLIGHT_IDS: AtomicU64 = AtomicU64::new(1);

/// Registrations running now, oldest first.
pub fn registrations_in_progress() -> Vec<InFlight> {
    lock(&IN_FLIGHT).iter().map(|(_, r)| r.clone()).collect()
}

/// Removes its entry from `IN_FLIGHT` however the registration ends.
struct InFlightEntry(u64);

impl InFlightEntry {
    fn start(comm: CommPtr, peers: PeerSet, sizes: Vec<usize>) -> Self {
        let id = IN_FLIGHT_IDS.fetch_add(1, Ordering::Relaxed);
        let record = InFlight {
            comm,
            peers,
            sizes,
            started: Instant::now(),
            entered: 0,
            thread: current_thread_id(),
        };
        lock(&IN_FLIGHT).push((id, record));
        Self(id)
    }

    fn entered(&self, segments: usize) {
        if let Some((_, r)) = lock(&IN_FLIGHT).iter_mut().find(|(id, _)| *id == self.0) {
            r.entered = segments;
        }
    }
}

impl Drop for InFlightEntry {
    fn drop(&mut self) {
        lock(&IN_FLIGHT).retain(|(id, _)| *id != self.0);
    }
}

fn current_thread_id() -> u64 {
    // SAFETY: gettid has no preconditions.
    (unsafe { libc::gettid() }) as u64
}

/// A registration planned but not yet made: its segments stay pinned and its communicator
/// busy until `register_planned` or drop.
pub type Planned = PlanGuard<'static>;

/// Plans the registration of every segment of `scope` that `comm` has not registered; `None`
/// when there is nothing to register.
pub fn plan_registration(comm: CommPtr, scope: Scope) -> Result<Option<Planned>> {
    let nccl = nccl::get()?;
    nccl.require_windows()?;
    TABLE.plan(comm, scope, &NcclWindows(nccl))
}

/// Registers exactly what was planned (collective), visible to the watchdog meanwhile. A
/// registration a capture or an NCCL group postponed is done once this one succeeds.
pub fn register_planned(plan: Planned, peers: PeerSet) -> Result<Registered> {
    let nccl = nccl::get()?;
    let comm = plan.plan().comm();
    let entry = InFlightEntry::start(comm, peers, plan.plan().sizes());
    let done = plan.register(&NcclWindows(nccl), |i| entry.entered(i + 1))?;
    lock(&DEFERRED).retain(|&c| c != comm);
    Ok(done)
}

/// Registers every segment of `scope` that `comm` has not registered yet, without an
/// agreement between ranks first. The table is not locked while NCCL registers.
pub fn register_pending(comm: CommPtr, scope: Scope) -> Result<Registered> {
    match plan_registration(comm, scope)? {
        Some(plan) => register_planned(plan, scope.peers),
        None => Ok(Registered::default()),
    }
}

/// From now on `comm` registers nothing (NCCL cannot use symmetric memory on it).
pub fn make_plain(comm: CommPtr) -> Result<()> {
    let nccl = nccl::get()?;
    TABLE.make_plain(comm, &NcclWindows(nccl))
}

/// Whether a context exit on `comm` from `lane` has nothing to register (one lock, no NCCL
/// call).
pub fn is_up_to_date(comm: CommPtr, lane: Lane) -> bool {
    TABLE.is_up_to_date(comm, lane)
}

/// Deregisters every window `comm` holds (call before destroying the communicator).
pub fn release_comm(comm: CommPtr) -> Result<usize> {
    let Some(nccl) = nccl::loaded() else {
        return Ok(0);
    };
    TABLE.release_comm(comm, &NcclWindows(nccl))
}

/// Forgets a communicator that was destroyed without `release_comm`: its windows are dropped
/// without an NCCL call, and a postponed registration of it is cancelled.
pub fn forget_comm(comm: CommPtr) -> usize {
    lock(&DEFERRED).retain(|&c| c != comm);
    TABLE.forget_comm(comm)
}

/// Postpones `comm`'s registration (a CUDA-graph capture or an NCCL group is open).
pub fn defer_registration(comm: CommPtr) {
    let mut deferred = lock(&DEFERRED);
    if !deferred.contains(&comm) {
        deferred.push(comm);
    }
}

/// The postponed communicators, in first-seen order, cleared.
pub fn take_deferred() -> Vec<CommPtr> {
    std::mem::take(&mut *lock(&DEFERRED))
}

/// How many communicators wait for a postponed registration.
pub fn deferred_count() -> usize {
    lock(&DEFERRED).len()
}

/// torch's allocation plug. Returns NULL on failure (torch then raises its out-of-memory error);
/// the reason is kept for `symm_rs` to attach to that error.
#[no_mangle]
pub extern "C" fn symm_rs_alloc(size: usize, device: c_int, _stream: *mut c_void) -> *mut c_void {
    let ptr = guarded("symm_rs_alloc", DevicePtr::default(), || {
        allocate(size, device)
    });
    if ptr.is_null() {
        lock(&FAILURES).alloc += 1;
    }
    ptr.addr() as *mut c_void
}

/// torch's free plug. Errors are kept for Python; nothing unwinds into torch.
#[no_mangle]
pub extern "C" fn symm_rs_free(
    ptr: *mut c_void,
    _size: usize,
    device: c_int,
    _stream: *mut c_void,
) {
    let ok = guarded("symm_rs_free", false, || {
        release(DevicePtr::new(ptr as usize), device).map(|()| true)
    });
    if !ok {
        lock(&FAILURES).free += 1;
    }
}

/// The crate version, so a caller holding only the shared object can check what it loaded.
#[no_mangle]
pub extern "C" fn symm_rs_abi_version() -> *const std::ffi::c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
