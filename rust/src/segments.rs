//! The segment table: every pool segment in allocation order, and for each communicator the
//! first segment it has not looked at yet, plus the window handles it holds.
//!
//! Registration is collective, so every rank must register the same sequence; registering the
//! segments each communicator has not seen yet, in allocation order, gives every rank the same
//! sequence as long as the ranks allocated the same sizes in the same order.
//!
//! Ranks allocate the same sequence only within a group: two sub-groups of the world (TP
//! `{0,1}` and `{2,3}`) grow their pools differently, so a world communicator that registered
//! every segment of the device would ask rank 0 and rank 2 for different registrations, which
//! hangs or fails inside NCCL. Every segment therefore records the peer set whose context
//! allocated it (`PeerSet`, a process-local id of a set of ranks), and a communicator registers
//! only the segments of its own peer set.
//!
//! `SegmentTable` is the bookkeeping alone (no locking, no NCCL). `SharedTable` puts it behind a
//! mutex and drives the NCCL calls through `WindowRegistrar`, *outside* the lock: registration
//! waits for every peer, and torch calls the allocator plugs (which need the table) under its
//! own allocator mutex, so a lock held across `ncclCommWindowRegister` would let one slow peer
//! stall every CUDA allocation of the process. Both are generic over the NCCL calls, so tests and
//! benches drive them with a stand-in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::handles::{CommPtr, DevicePtr, WindowHandle};

/// The NCCL calls the table needs.
pub trait WindowRegistrar {
    /// The CUDA device a communicator is bound to.
    fn comm_device(&self, comm: CommPtr) -> Result<i32>;
    /// Registers one segment; `None` when NCCL handed back a NULL window.
    fn register(&self, comm: CommPtr, ptr: DevicePtr, size: usize) -> Result<Option<WindowHandle>>;
    /// Deregisters a window that `register` returned (local to this rank).
    fn deregister(&self, comm: CommPtr, window: WindowHandle) -> Result<()>;
}

/// A process-local id of the ranks a pool serves (every communicator over those ranks shares
/// it); `ANY_PEERS` tags segments allocated outside any context, which every communicator
/// registers.
pub type PeerSet = u64;
pub const ANY_PEERS: PeerSet = 0;

/// A window one communicator holds on one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub comm: CommPtr,
    pub handle: WindowHandle,
}

/// One `ncclMemAlloc` allocation handed to torch's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Position in allocation order (never reused), the same on every rank that allocated the
    /// same sequence.
    pub seq: u64,
    pub ptr: DevicePtr,
    pub size: usize,
    pub device: i32,
    /// The peer set whose context allocated it: only their communicators register it.
    pub peers: PeerSet,
    pub windows: Vec<Window>,
    /// NCCL calls on this segment running outside the lock; it must not be freed meanwhile.
    pinned: u32,
}

impl Segment {
    pub fn end(&self) -> usize {
        self.ptr.addr() + self.size
    }

    pub fn window_for(&self, comm: CommPtr) -> Option<Window> {
        self.windows.iter().copied().find(|w| w.comm == comm)
    }

    /// Whether a communicator over `peers` registers this segment.
    pub fn serves(&self, peers: PeerSet) -> bool {
        self.peers == ANY_PEERS || self.peers == peers
    }

    fn contains(&self, ptr: usize, len: usize) -> bool {
        ptr >= self.ptr.addr() && ptr.checked_add(len).is_some_and(|end| end <= self.end())
    }
}

/// A segment taken out of the table, with any window that could not be deregistered.
#[derive(Debug)]
pub struct Untracked {
    pub segment: Segment,
    pub failures: Vec<Error>,
}

/// Running totals, for `stats()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub segments_tracked: u64,
    pub segments_untracked: u64,
    pub windows_registered: u64,
    pub windows_deregistered: u64,
    /// Windows dropped without an NCCL call because their communicator was already destroyed.
    pub windows_forgotten: u64,
    pub deregistration_failures: u64,
}

/// What one communicator holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommSummary {
    pub comm: CommPtr,
    pub device: i32,
    pub windows: usize,
    pub window_bytes: usize,
    pub pending_segments: usize,
}

#[derive(Debug, Clone, Copy)]
struct CommState {
    /// Segments with `seq < next` have been looked at (registered, or on another device).
    next: u64,
    device: i32,
    /// The peer set this communicator serves (from its first registration on).
    peers: PeerSet,
    /// Windows it holds and their bytes, kept as windows come and go so that `stats()` reads
    /// them without a pass over the segments.
    windows: usize,
    window_bytes: usize,
    /// A registration or release of this communicator is running outside the lock.
    busy: bool,
}

/// The segments one registration will register, planned under the lock.
#[derive(Debug)]
pub struct Plan {
    comm: CommPtr,
    /// `(seq, ptr, size)` in allocation order.
    segments: Vec<(u64, DevicePtr, usize)>,
    /// Where the communicator's `next` goes once every planned segment is registered.
    upto: u64,
}

#[derive(Debug, Default)]
pub struct SegmentTable {
    /// Allocation order.
    segments: BTreeMap<u64, Segment>,
    /// Start address -> seq, for lookups by address in O(log n).
    by_address: BTreeMap<usize, u64>,
    comms: HashMap<CommPtr, CommState>,
    next_seq: u64,
    counters: Counters,
}

impl SegmentTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.values()
    }

    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn total_bytes(&self) -> usize {
        self.segments.values().map(|s| s.size).sum()
    }

    /// Records a fresh allocation at the end of the order, allocated for `peers`.
    pub fn track(&mut self, ptr: DevicePtr, size: usize, device: i32, peers: PeerSet) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.segments.insert(
            seq,
            Segment {
                seq,
                ptr,
                size,
                device,
                peers,
                windows: Vec::new(),
                pinned: 0,
            },
        );
        self.by_address.insert(ptr.addr(), seq);
        self.counters.segments_tracked += 1;
    }

    /// Segments `comm`, serving `peers`, would register next, in order (all of its peer set's
    /// segments on its device if it has never registered). `device` is the communicator's.
    pub fn pending(
        &self,
        comm: CommPtr,
        device: i32,
        peers: PeerSet,
    ) -> impl Iterator<Item = &Segment> {
        let start = self.comms.get(&comm).map_or(0, |state| state.next);
        self.segments
            .range(start..)
            .map(|(_, s)| s)
            .filter(move |s| s.device == device && s.serves(peers) && s.window_for(comm).is_none())
    }

    /// The peer set `comm` registered for, once it has registered.
    pub fn peers_of(&self, comm: CommPtr) -> Option<PeerSet> {
        self.comms.get(&comm).map(|state| state.peers)
    }

    /// Whether a registration or release of `comm` is running.
    pub fn is_busy(&self, comm: CommPtr) -> bool {
        self.comms.get(&comm).is_some_and(|state| state.busy)
    }

    /// The device recorded for `comm`, if the table has seen it.
    pub fn known_device(&self, comm: CommPtr) -> Option<i32> {
        self.comms.get(&comm).map(|state| state.device)
    }

    /// Plans the registration of everything `comm` has not registered: marks the communicator
    /// busy and pins the planned segments, so that neither changes until `finish`.
    pub fn plan(&mut self, comm: CommPtr, device: i32, peers: PeerSet) -> Plan {
        let upto = self.next_seq;
        let segments: Vec<(u64, DevicePtr, usize)> = self
            .pending(comm, device, peers)
            .map(|s| (s.seq, s.ptr, s.size))
            .collect();
        for (seq, _, _) in &segments {
            if let Some(segment) = self.segments.get_mut(seq) {
                segment.pinned += 1;
            }
        }
        let state = self.comms.entry(comm).or_insert(CommState {
            next: 0,
            device,
            peers,
            windows: 0,
            window_bytes: 0,
            busy: false,
        });
        state.peers = peers;
        state.busy = true;
        Plan {
            comm,
            segments,
            upto,
        }
    }

    /// Records what a planned registration did: `made` windows for the first planned segments,
    /// in order, and `failed_at` the position of the segment that failed, if any. The
    /// communicator's index stops at a failed segment, so a retry registers exactly the rest.
    pub fn finish(&mut self, plan: Plan, made: &[WindowHandle], failed: bool) {
        let (mut windows, mut bytes) = (0, 0);
        for (i, (seq, _, _)) in plan.segments.iter().enumerate() {
            let Some(segment) = self.segments.get_mut(seq) else {
                continue;
            };
            segment.pinned -= 1;
            if let Some(&handle) = made.get(i) {
                segment.windows.push(Window {
                    comm: plan.comm,
                    handle,
                });
                self.counters.windows_registered += 1;
                windows += 1;
                bytes += segment.size;
            }
        }
        if let Some(state) = self.comms.get_mut(&plan.comm) {
            state.windows += windows;
            state.window_bytes += bytes;
            state.busy = false;
            state.next = match (failed, plan.segments.get(made.len())) {
                (true, Some(&(seq, _, _))) => seq,
                _ => plan.upto,
            };
        }
    }

    /// Whether the segment at `ptr` has NCCL calls running on it.
    pub fn is_pinned(&self, ptr: DevicePtr) -> bool {
        self.seq_at(ptr)
            .and_then(|seq| self.segments.get(&seq))
            .is_some_and(|s| s.pinned > 0)
    }

    fn seq_at(&self, ptr: DevicePtr) -> Option<u64> {
        self.by_address.get(&ptr.addr()).copied()
    }

    /// Takes the segment starting at `ptr` out of the table; its windows still need
    /// deregistering. `None` if `ptr` is not a tracked segment.
    pub fn remove(&mut self, ptr: DevicePtr) -> Option<Segment> {
        let seq = self.by_address.remove(&ptr.addr())?;
        let segment = self.segments.remove(&seq)?;
        self.counters.segments_untracked += 1;
        for window in &segment.windows {
            if let Some(state) = self.comms.get_mut(&window.comm) {
                state.windows = state.windows.saturating_sub(1);
                state.window_bytes = state.window_bytes.saturating_sub(segment.size);
            }
        }
        Some(segment)
    }

    /// Takes every window `comm` holds off its segment and pins those segments, for
    /// deregistration outside the lock; marks the communicator busy meanwhile.
    pub fn take_windows(&mut self, comm: CommPtr) -> Vec<(u64, WindowHandle)> {
        let mut taken = Vec::new();
        for segment in self.segments.values_mut() {
            if let Some(position) = segment.windows.iter().position(|w| w.comm == comm) {
                taken.push((segment.seq, segment.windows.remove(position).handle));
                segment.pinned += 1;
            }
        }
        if let Some(state) = self.comms.get_mut(&comm) {
            state.busy = true;
            state.windows = 0;
            state.window_bytes = 0;
        }
        taken
    }

    /// Ends a release: windows that failed to deregister go back on their segments (so those
    /// segments are never freed under a live window, and a retry can try again); the
    /// communicator is forgotten once it holds nothing.
    pub fn finish_release(
        &mut self,
        comm: CommPtr,
        taken: &[(u64, WindowHandle)],
        failed: &HashSet<u64>,
    ) {
        for &(seq, handle) in taken {
            let Some(segment) = self.segments.get_mut(&seq) else {
                continue;
            };
            segment.pinned -= 1;
            if failed.contains(&seq) {
                segment.windows.push(Window { comm, handle });
                self.counters.deregistration_failures += 1;
                if let Some(state) = self.comms.get_mut(&comm) {
                    state.windows += 1;
                    state.window_bytes += segment.size;
                }
            } else {
                self.counters.windows_deregistered += 1;
            }
        }
        if failed.is_empty() {
            self.comms.remove(&comm);
        } else if let Some(state) = self.comms.get_mut(&comm) {
            state.busy = false;
        }
    }

    /// Drops every window of a communicator that no longer exists, without calling NCCL (its
    /// destruction released them), and forgets the communicator: an address NCCL reuses for a
    /// new communicator then starts with no windows. Returns how many windows were dropped.
    pub fn forget(&mut self, comm: CommPtr) -> usize {
        let mut dropped = 0;
        for segment in self.segments.values_mut() {
            let before = segment.windows.len();
            segment.windows.retain(|w| w.comm != comm);
            dropped += before - segment.windows.len();
        }
        self.comms.remove(&comm);
        self.counters.windows_forgotten += dropped as u64;
        dropped
    }

    /// The segment holding all of `[ptr, ptr + len)`, if any.
    pub fn find(&self, ptr: usize, len: usize) -> Option<&Segment> {
        let (_, &seq) = self.by_address.range(..=ptr).next_back()?;
        self.segments.get(&seq).filter(|s| s.contains(ptr, len))
    }

    /// `(position in allocation order, byte offset)` of `[ptr, ptr + len)` in its segment.
    pub fn position(&self, ptr: usize, len: usize) -> Option<(u64, usize)> {
        self.find(ptr, len).map(|s| (s.seq, ptr - s.ptr.addr()))
    }

    /// Whether `[ptr, ptr + len)` lies inside one window of `comm`.
    pub fn is_registered(&self, ptr: usize, len: usize, comm: CommPtr) -> bool {
        self.find(ptr, len)
            .is_some_and(|s| s.window_for(comm).is_some())
    }

    /// One summary per communicator the table knows, from its running window counts and the
    /// segments from its index on (no pass over every segment).
    pub fn comm_summaries(&self) -> Vec<CommSummary> {
        let mut out: Vec<CommSummary> = self
            .comms
            .iter()
            .map(|(&comm, state)| CommSummary {
                comm,
                device: state.device,
                windows: state.windows,
                window_bytes: state.window_bytes,
                pending_segments: self.pending(comm, state.device, state.peers).count(),
            })
            .collect();
        out.sort_by_key(|s| s.comm);
        out
    }
}

/// The table behind a mutex, with the NCCL calls made outside it. A `Condvar` lets a second
/// registration of the same communicator, or the free of a segment being registered, wait for
/// the first to finish instead of racing it.
#[derive(Debug, Default)]
pub struct SharedTable {
    table: Mutex<SegmentTable>,
    changed: Condvar,
}

impl SharedTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The table locked. A poisoned lock is recovered: every mutation leaves the table whole.
    pub fn lock(&self) -> MutexGuard<'_, SegmentTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, SegmentTable>) -> MutexGuard<'a, SegmentTable> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the table once `comm` is not busy.
    fn lock_idle(&self, comm: CommPtr) -> MutexGuard<'_, SegmentTable> {
        let mut table = self.lock();
        while table.is_busy(comm) {
            table = self.wait(table);
        }
        table
    }

    /// Whether `comm` has registered every segment of its peer set and device and no
    /// registration of it is running (a communicator the table has never seen is not up to
    /// date).
    pub fn is_up_to_date(&self, comm: CommPtr) -> bool {
        let table = self.lock();
        let peers = table.peers_of(comm).unwrap_or(ANY_PEERS);
        Self::up_to_date(&table, comm, peers)
    }

    fn up_to_date(table: &SegmentTable, comm: CommPtr, peers: PeerSet) -> bool {
        match table.known_device(comm) {
            Some(device) => {
                !table.is_busy(comm) && table.pending(comm, device, peers).next().is_none()
            }
            None => false,
        }
    }

    /// Registers, in allocation order, every segment of `peers` on the communicator's device
    /// that it has not registered yet; returns how many windows were made. Registrations of one
    /// communicator are serialised (the second waits, then finds what is left); other
    /// communicators, and the allocator plugs, are never blocked by it.
    pub fn register_pending<R: WindowRegistrar>(
        &self,
        comm: CommPtr,
        peers: PeerSet,
        nccl: &R,
    ) -> Result<usize> {
        // The common exit: nothing new since the last registration, decided under one lock.
        if Self::up_to_date(&self.lock(), comm, peers) {
            return Ok(0);
        }
        let known = self.lock().known_device(comm);
        let device = match known {
            Some(device) => device,
            None => nccl.comm_device(comm)?,
        };
        let plan = self.lock_idle(comm).plan(comm, device, peers);
        let mut made = Vec::with_capacity(plan.segments.len());
        let mut outcome = Ok(());
        for &(_, ptr, size) in &plan.segments {
            match nccl.register(comm, ptr, size) {
                Ok(Some(handle)) => made.push(handle),
                Ok(None) => {
                    outcome = Err(Error::NullWindow { comm, ptr, size });
                    break;
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        let count = made.len();
        self.lock().finish(plan, &made, outcome.is_err());
        self.changed.notify_all();
        outcome.map(|()| count)
    }

    /// Takes the segment at `ptr` out of the table after deregistering every window on it, so
    /// the caller can free it. Waits while a registration of that segment is running. `None`
    /// if `ptr` is not a tracked segment.
    pub fn untrack<R: WindowRegistrar>(&self, ptr: DevicePtr, nccl: &R) -> Option<Untracked> {
        let segment = {
            let mut table = self.lock();
            while table.is_pinned(ptr) {
                table = self.wait(table);
            }
            table.remove(ptr)?
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
        Some(Untracked { segment, failures })
    }

    /// Deregisters every window `comm` holds and forgets the communicator, before it is
    /// destroyed. Returns how many windows were released, or the first failure.
    pub fn release_comm<R: WindowRegistrar>(&self, comm: CommPtr, nccl: &R) -> Result<usize> {
        let taken = self.lock_idle(comm).take_windows(comm);
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

    /// Forgets a destroyed communicator (see `SegmentTable::forget`), once nothing runs on it.
    pub fn forget_comm(&self, comm: CommPtr) -> usize {
        let dropped = self.lock_idle(comm).forget(comm);
        self.changed.notify_all();
        dropped
    }
}

#[cfg(test)]
mod tests;
