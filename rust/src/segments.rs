//! The segment table: every pool segment in allocation order, and for each communicator where
//! it stands in that order, plus the window handles it holds.
//!
//! Registration is collective, so every rank must register the same sequence; registering the
//! segments each communicator has not seen yet, in allocation order, gives every rank the same
//! sequence as long as the ranks allocated the same sizes in the same order.
//!
//! Ranks allocate the same sequence only within a group, and only within one thread of it.
//! Every segment therefore records a `Tag`:
//! - its *peer set* (a process-local id of the ranks whose context allocated it): two
//!   sub-groups of the world (TP `{0,1}` and `{2,3}`) grow their pools differently, so a world
//!   communicator that registered every segment of the device would ask its ranks for
//!   different registrations, which hangs or fails inside NCCL;
//! - its *lane* (the pool it was allocated into; torch routes one thread at a time into a
//!   pool): two threads allocating for the same ranks interleave differently on different
//!   ranks, so a registration takes the segments of one lane only, in that lane's order.
//!
//! `SegmentTable` is the bookkeeping alone (no locking, no NCCL). `SharedTable` puts it behind a
//! mutex and drives the NCCL calls through `WindowRegistrar`, *outside* the lock: registration
//! waits for every peer, and torch calls the allocator plugs (which need the table) under its
//! own allocator mutex, so a lock held across `ncclCommWindowRegister` would let one slow peer
//! stall every CUDA allocation of the process. Every wait on the table is bounded. Both are
//! generic over the NCCL calls, so tests and benches drive them with a stand-in.

use crate::error::{Error, Result};
use crate::handles::{CommPtr, DevicePtr, WindowHandle};

mod shared;
mod table;

pub use shared::{PlanGuard, Registered, SharedTable};
pub use table::{Plan, SegmentTable};

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

/// A process-local id of the pool (so, at any time, of the one thread) a segment was
/// allocated into. `ANY_LANE` segments (capture pools, untagged ones) are in every lane.
pub type Lane = u64;
pub const ANY_LANE: Lane = 0;
/// A registration that takes the segments of every lane (an explicit `register(group)`).
pub const ALL_LANES: Lane = u64::MAX;

/// What a segment was allocated for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tag {
    pub peers: PeerSet,
    pub lane: Lane,
}

impl From<PeerSet> for Tag {
    fn from(peers: PeerSet) -> Self {
        Self {
            peers,
            lane: ANY_LANE,
        }
    }
}

/// Which segments a registration takes: those of one peer set, seen from one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub peers: PeerSet,
    pub lane: Lane,
}

impl From<PeerSet> for Scope {
    fn from(peers: PeerSet) -> Self {
        Self {
            peers,
            lane: ALL_LANES,
        }
    }
}

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
    pub tag: Tag,
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

    /// Whether a registration of `scope` takes this segment.
    pub fn serves(&self, scope: Scope) -> bool {
        let peers = self.tag.peers == ANY_PEERS || self.tag.peers == scope.peers;
        let lane =
            scope.lane == ALL_LANES || self.tag.lane == ANY_LANE || self.tag.lane == scope.lane;
        peers && lane
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
    /// NCCL answered its registration with a NULL window (or symm_rs decided it cannot use
    /// symmetric kernels): nothing is registered on it any more.
    pub plain: bool,
}

#[cfg(test)]
mod tests;
