//! `SegmentTable`: the bookkeeping of segments, windows and per-communicator progress, with
//! no locking and no NCCL calls.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{
    CommSummary, Counters, Lane, PeerSet, Scope, Segment, Tag, Window, ALL_LANES, ANY_PEERS,
};
use crate::handles::{CommPtr, DevicePtr, WindowHandle};

#[derive(Debug, Clone)]
struct CommState {
    /// Tells this state apart from a later one at the same address (NCCL reuses addresses),
    /// so a registration that finishes after its communicator was forgotten records nothing.
    id: u64,
    /// Per registering lane: segments with `seq` below it have been looked at.
    cursors: HashMap<Lane, u64>,
    device: i32,
    /// The peer set this communicator serves (from its first registration on).
    peers: PeerSet,
    /// Windows it holds and their bytes, kept as windows come and go so that `stats()` reads
    /// them without a pass over the segments.
    windows: usize,
    window_bytes: usize,
    /// A registration or release of this communicator is running outside the lock.
    busy: bool,
    /// Nothing is registered on it any more (NCCL answered with a NULL window, or symmetric
    /// kernels cannot run on it): every rank then uses the pool as plain memory alike.
    plain: bool,
}

/// The segments one registration will register, planned under the lock.
#[derive(Debug)]
pub struct Plan {
    comm: CommPtr,
    state_id: u64,
    lane: Lane,
    /// `(seq, ptr, size)` in allocation order.
    segments: Vec<(u64, DevicePtr, usize)>,
    /// Where the lane's cursor goes once every planned segment is registered.
    upto: u64,
}

impl Plan {
    pub fn comm(&self) -> CommPtr {
        self.comm
    }

    /// `(ptr, size)` of each planned segment, in the order they will be registered.
    pub fn segments(&self) -> impl Iterator<Item = (DevicePtr, usize)> + '_ {
        self.segments.iter().map(|&(_, ptr, size)| (ptr, size))
    }

    pub fn sizes(&self) -> Vec<usize> {
        self.segments.iter().map(|&(_, _, size)| size).collect()
    }

    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// How a planned registration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanEnd {
    /// Every planned segment was registered.
    Complete,
    /// NCCL failed on the segment after the last one made: a retry starts there.
    Failed,
    /// NCCL handed back a NULL window: the communicator has no symmetric memory.
    NullWindow,
    /// Nothing was registered (the ranks did not agree, or the caller gave up).
    Cancelled,
}

#[derive(Debug, Default)]
pub struct SegmentTable {
    /// Allocation order.
    segments: BTreeMap<u64, Segment>,
    /// Start address -> seq, for lookups by address in O(log n).
    by_address: BTreeMap<usize, u64>,
    comms: HashMap<CommPtr, CommState>,
    next_seq: u64,
    next_state_id: u64,
    pub(super) counters: Counters,
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

    /// Records a fresh allocation at the end of the order.
    pub fn track(&mut self, ptr: DevicePtr, size: usize, device: i32, tag: impl Into<Tag>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.segments.insert(
            seq,
            Segment {
                seq,
                ptr,
                size,
                device,
                tag: tag.into(),
                windows: Vec::new(),
                pinned: 0,
            },
        );
        self.by_address.insert(ptr.addr(), seq);
        self.counters.segments_tracked += 1;
    }

    /// Segments `comm` would register next for `scope`, in order (all of the scope's segments
    /// on its device if it has never registered); none once the communicator is plain.
    /// `device` is the communicator's.
    pub fn pending(
        &self,
        comm: CommPtr,
        device: i32,
        scope: impl Into<Scope>,
    ) -> impl Iterator<Item = &Segment> {
        let scope = scope.into();
        let state = self.comms.get(&comm);
        let plain = state.is_some_and(|s| s.plain);
        let start = state
            .and_then(|s| s.cursors.get(&scope.lane).copied())
            .unwrap_or(0);
        let start = if plain { self.next_seq } else { start };
        self.segments
            .range(start..)
            .map(|(_, s)| s)
            .filter(move |s| s.device == device && s.serves(scope) && s.window_for(comm).is_none())
    }

    /// The peer set `comm` registered for, once it has registered.
    pub fn peers_of(&self, comm: CommPtr) -> Option<PeerSet> {
        self.comms.get(&comm).map(|state| state.peers)
    }

    /// Whether a registration or release of `comm` is running.
    pub fn is_busy(&self, comm: CommPtr) -> bool {
        self.comms.get(&comm).is_some_and(|state| state.busy)
    }

    /// Whether `comm` registers nothing any more.
    pub fn is_plain(&self, comm: CommPtr) -> bool {
        self.comms.get(&comm).is_some_and(|state| state.plain)
    }

    /// The device recorded for `comm`, if the table has seen it.
    pub fn known_device(&self, comm: CommPtr) -> Option<i32> {
        self.comms.get(&comm).map(|state| state.device)
    }

    fn state(&mut self, comm: CommPtr, device: i32, peers: PeerSet) -> &mut CommState {
        let id = &mut self.next_state_id;
        self.comms.entry(comm).or_insert_with(|| {
            *id += 1;
            CommState {
                id: *id,
                cursors: HashMap::new(),
                device,
                peers,
                windows: 0,
                window_bytes: 0,
                busy: false,
                plain: false,
            }
        })
    }

    /// From now on `comm` registers nothing: its ranks use the pool as plain memory. Every
    /// rank decides this alike (NCCL's NULL window, or the symmetric-kernel verdict).
    pub fn make_plain(&mut self, comm: CommPtr, device: i32) {
        self.state(comm, device, ANY_PEERS).plain = true;
    }

    /// Plans the registration of everything `comm` has not registered for `scope`: marks the
    /// communicator busy and pins the planned segments, so that neither changes until
    /// `finish`.
    pub fn plan(&mut self, comm: CommPtr, device: i32, scope: Scope) -> Plan {
        let upto = self.next_seq;
        let segments: Vec<(u64, DevicePtr, usize)> = self
            .pending(comm, device, scope)
            .map(|s| (s.seq, s.ptr, s.size))
            .collect();
        for (seq, _, _) in &segments {
            if let Some(segment) = self.segments.get_mut(seq) {
                segment.pinned += 1;
            }
        }
        let state = self.state(comm, device, scope.peers);
        state.peers = scope.peers;
        state.busy = true;
        Plan {
            comm,
            state_id: state.id,
            lane: scope.lane,
            segments,
            upto,
        }
    }

    /// Whether the communicator `plan` was made for is still the one the table knows (not
    /// released or forgotten since: then it may be destroyed, and must not reach NCCL).
    pub fn is_current(&self, plan: &Plan) -> bool {
        self.comms
            .get(&plan.comm)
            .is_some_and(|s| s.id == plan.state_id)
    }

    /// Records what a planned registration did: `made` windows for the first planned
    /// segments, in order, and how it ended. A failed registration's cursor stops at the
    /// segment that failed, so a retry registers exactly the rest.
    pub fn finish(&mut self, plan: Plan, made: &[WindowHandle], end: PlanEnd) {
        let live = self.is_current(&plan);
        let (mut windows, mut bytes) = (0, 0);
        for (i, (seq, _, _)) in plan.segments.iter().enumerate() {
            let Some(segment) = self.segments.get_mut(seq) else {
                continue;
            };
            segment.pinned -= 1;
            // A communicator forgotten meanwhile was destroyed: its windows went with it.
            if let (true, Some(&handle)) = (live, made.get(i)) {
                segment.windows.push(Window {
                    comm: plan.comm,
                    handle,
                });
                self.counters.windows_registered += 1;
                windows += 1;
                bytes += segment.size;
            }
        }
        if !live {
            return;
        }
        let Some(state) = self.comms.get_mut(&plan.comm) else {
            return;
        };
        state.windows += windows;
        state.window_bytes += bytes;
        state.busy = false;
        let cursor = match end {
            PlanEnd::Complete => Some(plan.upto),
            PlanEnd::Failed => plan.segments.get(made.len()).map(|&(seq, _, _)| seq),
            PlanEnd::NullWindow => {
                state.plain = true;
                None
            }
            PlanEnd::Cancelled => None,
        };
        if let Some(cursor) = cursor {
            if plan.lane != ALL_LANES {
                state.cursors.insert(plan.lane, cursor);
            }
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
            // A communicator forgotten meanwhile was destroyed: nothing of it may stay.
            if failed.contains(&seq) && self.comms.contains_key(&comm) {
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
    /// new communicator then starts with no windows. A registration of it still running
    /// records nothing when it ends. Returns how many windows were dropped.
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
    /// segments of its peer set it has not registered (any lane).
    pub fn comm_summaries(&self) -> Vec<CommSummary> {
        let mut out: Vec<CommSummary> = self
            .comms
            .iter()
            .map(|(&comm, state)| {
                // From the earliest lane cursor: exact for one lane (the usual case), and a
                // scan of every segment is what the running counts exist to avoid.
                let start = state.cursors.values().copied().min().unwrap_or(0);
                let scope = Scope::from(state.peers);
                let pending = if state.plain {
                    0
                } else {
                    self.segments
                        .range(start..)
                        .filter(|(_, s)| {
                            s.device == state.device
                                && s.serves(scope)
                                && s.window_for(comm).is_none()
                        })
                        .count()
                };
                CommSummary {
                    comm,
                    device: state.device,
                    windows: state.windows,
                    window_bytes: state.window_bytes,
                    pending_segments: pending,
                    plain: state.plain,
                }
            })
            .collect();
        out.sort_by_key(|s| s.comm);
        out
    }
}
