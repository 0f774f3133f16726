//! The segment table: every pool segment in allocation order, and for each communicator the
//! index of the first segment it has not looked at yet, plus the window handles it holds.
//!
//! Registration is collective, so every rank must register the same sequence; keeping the
//! allocation order and registering `[next[comm], len)` in that order gives every rank the same
//! sequence as long as the ranks allocated the same sizes in the same order. The table knows
//! nothing about NCCL itself: it is generic over `WindowRegistrar`, so tests and benches drive it
//! with a stand-in.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// The NCCL calls the table needs.
pub trait WindowRegistrar {
    /// The CUDA device a communicator is bound to.
    fn comm_device(&self, comm: usize) -> Result<i32>;
    /// Registers one segment; returns the raw window handle (0 means NCCL gave back NULL).
    fn register(&self, comm: usize, ptr: usize, size: usize) -> Result<usize>;
    /// Deregisters a window that `register` returned.
    fn deregister(&self, comm: usize, window: usize) -> Result<()>;
}

/// A window one communicator holds on one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub comm: usize,
    pub handle: usize,
}

/// One `ncclMemAlloc` allocation handed to torch's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub ptr: usize,
    pub size: usize,
    pub device: i32,
    pub windows: Vec<Window>,
}

impl Segment {
    pub fn end(&self) -> usize {
        self.ptr + self.size
    }

    pub fn window_for(&self, comm: usize) -> Option<Window> {
        self.windows.iter().copied().find(|w| w.comm == comm)
    }

    fn contains(&self, ptr: usize, len: usize) -> bool {
        ptr >= self.ptr && ptr.checked_add(len).is_some_and(|end| end <= self.end())
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
    pub deregistration_failures: u64,
}

/// What one communicator holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommSummary {
    pub comm: usize,
    pub device: i32,
    pub windows: usize,
    pub window_bytes: usize,
    pub pending_segments: usize,
}

#[derive(Debug, Clone, Copy)]
struct CommState {
    next: usize,
    device: i32,
}

#[derive(Debug, Default)]
pub struct SegmentTable {
    segments: Vec<Segment>,
    comms: HashMap<usize, CommState>,
    counters: Counters,
}

impl SegmentTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn total_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// Records a fresh allocation at the end of the order.
    pub fn track(&mut self, ptr: usize, size: usize, device: i32) {
        self.segments.push(Segment {
            ptr,
            size,
            device,
            windows: Vec::new(),
        });
        self.counters.segments_tracked += 1;
    }

    /// Segments `comm` would register next, in order (all of its device's segments if it has
    /// never registered). `device` is the communicator's device.
    pub fn pending(&self, comm: usize, device: i32) -> impl Iterator<Item = &Segment> {
        let start = self.comms.get(&comm).map_or(0, |state| state.next);
        self.segments[start.min(self.segments.len())..]
            .iter()
            .filter(move |s| s.device == device && s.window_for(comm).is_none())
    }

    /// Registers, in allocation order, every segment of the communicator's device that it has
    /// not registered yet. Returns how many windows were made. On failure, the windows made so
    /// far stay recorded and the communicator's index stops at the failed segment, so that a
    /// retry registers exactly what is still missing.
    pub fn register_pending<R: WindowRegistrar>(&mut self, comm: usize, nccl: &R) -> Result<usize> {
        let device = match self.comms.get(&comm) {
            Some(state) => state.device,
            None => nccl.comm_device(comm)?,
        };
        let state = self
            .comms
            .entry(comm)
            .or_insert(CommState { next: 0, device });
        let mut made = 0;
        for index in state.next..self.segments.len() {
            let segment = &mut self.segments[index];
            if segment.device != device || segment.window_for(comm).is_some() {
                continue;
            }
            let outcome = nccl.register(comm, segment.ptr, segment.size);
            match outcome {
                Ok(0) => {
                    state.next = index;
                    return Err(Error::NullWindow {
                        comm,
                        ptr: segment.ptr,
                        size: segment.size,
                    });
                }
                Ok(handle) => {
                    segment.windows.push(Window { comm, handle });
                    self.counters.windows_registered += 1;
                    made += 1;
                }
                Err(e) => {
                    state.next = index;
                    return Err(e);
                }
            }
        }
        state.next = self.segments.len();
        Ok(made)
    }

    /// Takes the segment at `ptr` out of the table after deregistering every window on it, so
    /// the caller can free it. `None` if `ptr` is not a tracked segment.
    pub fn untrack<R: WindowRegistrar>(&mut self, ptr: usize, nccl: &R) -> Option<Untracked> {
        let index = self.segments.iter().position(|s| s.ptr == ptr)?;
        let segment = self.segments.remove(index);
        for state in self.comms.values_mut() {
            if state.next > index {
                state.next -= 1;
            }
        }
        let mut failures = Vec::new();
        for window in &segment.windows {
            match nccl.deregister(window.comm, window.handle) {
                Ok(()) => self.counters.windows_deregistered += 1,
                Err(e) => {
                    self.counters.deregistration_failures += 1;
                    failures.push(e);
                }
            }
        }
        self.counters.segments_untracked += 1;
        Some(Untracked { segment, failures })
    }

    /// Deregisters every window `comm` holds and forgets the communicator, before it is
    /// destroyed. Returns how many windows were released, or the first failure.
    pub fn release_comm<R: WindowRegistrar>(&mut self, comm: usize, nccl: &R) -> Result<usize> {
        let mut released = 0;
        let mut first_failure = None;
        for segment in &mut self.segments {
            let Some(position) = segment.windows.iter().position(|w| w.comm == comm) else {
                continue;
            };
            let window = segment.windows[position];
            match nccl.deregister(window.comm, window.handle) {
                Ok(()) => {
                    segment.windows.remove(position);
                    self.counters.windows_deregistered += 1;
                    released += 1;
                }
                Err(e) => {
                    // The window stays recorded: the segment must then never reach ncclMemFree
                    // (`untrack` reports it instead), and a retry can try again.
                    self.counters.deregistration_failures += 1;
                    first_failure.get_or_insert(e);
                }
            }
        }
        if first_failure.is_none() {
            self.comms.remove(&comm);
        }
        match first_failure {
            Some(e) => Err(e),
            None => Ok(released),
        }
    }

    /// The segment holding all of `[ptr, ptr + len)`, if any.
    pub fn find(&self, ptr: usize, len: usize) -> Option<&Segment> {
        self.position(ptr, len)
            .map(|(index, _)| &self.segments[index])
    }

    /// `(index in allocation order, byte offset)` of `[ptr, ptr + len)` in its segment, if any.
    pub fn position(&self, ptr: usize, len: usize) -> Option<(usize, usize)> {
        let index = self.segments.iter().position(|s| s.contains(ptr, len))?;
        Some((index, ptr - self.segments[index].ptr))
    }

    /// Whether `[ptr, ptr + len)` lies inside one window of `comm`.
    pub fn is_registered(&self, ptr: usize, len: usize, comm: usize) -> bool {
        self.find(ptr, len)
            .is_some_and(|s| s.window_for(comm).is_some())
    }

    /// One summary per communicator the table knows.
    pub fn comm_summaries(&self) -> Vec<CommSummary> {
        let mut out: Vec<CommSummary> = self
            .comms
            .iter()
            .map(|(&comm, state)| {
                let mut summary = CommSummary {
                    comm,
                    device: state.device,
                    ..CommSummary::default()
                };
                for segment in &self.segments {
                    if segment.window_for(comm).is_some() {
                        summary.windows += 1;
                        summary.window_bytes += segment.size;
                    } else if segment.device == state.device {
                        summary.pending_segments += 1;
                    }
                }
                summary
            })
            .collect();
        out.sort_by_key(|s| s.comm);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A stand-in NCCL that logs every call and can be told to fail.
    #[derive(Default)]
    struct FakeNccl {
        log: RefCell<Vec<(&'static str, usize, usize)>>,
        next_handle: RefCell<usize>,
        fail_register_at_ptr: RefCell<Option<usize>>,
        null_window_at_ptr: RefCell<Option<usize>>,
        fail_deregister: RefCell<bool>,
        device: i32,
    }

    impl WindowRegistrar for FakeNccl {
        fn comm_device(&self, _comm: usize) -> Result<i32> {
            Ok(self.device)
        }
        fn register(&self, comm: usize, ptr: usize, _size: usize) -> Result<usize> {
            if *self.fail_register_at_ptr.borrow() == Some(ptr) {
                return Err(Error::invalid_argument("injected register failure"));
            }
            if *self.null_window_at_ptr.borrow() == Some(ptr) {
                return Ok(0);
            }
            self.log.borrow_mut().push(("register", comm, ptr));
            let mut next = self.next_handle.borrow_mut();
            *next += 1;
            Ok(0x1000 + *next)
        }
        fn deregister(&self, comm: usize, window: usize) -> Result<()> {
            if *self.fail_deregister.borrow() {
                return Err(Error::invalid_argument("injected deregister failure"));
            }
            self.log.borrow_mut().push(("deregister", comm, window));
            Ok(())
        }
    }

    impl FakeNccl {
        fn registered(&self, comm: usize) -> Vec<usize> {
            self.log
                .borrow()
                .iter()
                .filter(|(what, c, _)| *what == "register" && *c == comm)
                .map(|(_, _, ptr)| *ptr)
                .collect()
        }
    }

    const A: usize = 0xA;
    const B: usize = 0xB;

    fn table_with(ptrs: &[usize]) -> SegmentTable {
        let mut table = SegmentTable::new();
        for &ptr in ptrs {
            table.track(ptr, 0x100, 0);
        }
        table
    }

    #[test]
    fn registers_in_allocation_order_once() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x3000, 0x1000, 0x2000]);
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 3);
        assert_eq!(nccl.registered(A), vec![0x3000, 0x1000, 0x2000]);
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 0);
        table.track(0x500, 0x100, 0);
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 1);
        assert_eq!(nccl.registered(A), vec![0x3000, 0x1000, 0x2000, 0x500]);
    }

    #[test]
    fn several_communicators_share_one_pool() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000, 0x2000]);
        table.register_pending(A, &nccl).unwrap();
        table.track(0x3000, 0x100, 0);
        table.register_pending(B, &nccl).unwrap();
        assert_eq!(nccl.registered(B), vec![0x1000, 0x2000, 0x3000]);
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 1);
        assert_eq!(nccl.registered(A), vec![0x1000, 0x2000, 0x3000]);
        for segment in table.segments() {
            assert!(segment.window_for(A).is_some() && segment.window_for(B).is_some());
        }
        let summaries = table.comm_summaries();
        assert_eq!(summaries.len(), 2);
        assert!(summaries
            .iter()
            .all(|s| s.windows == 3 && s.pending_segments == 0));
    }

    #[test]
    fn segment_reused_under_another_group_is_registered_with_it() {
        // Group A allocates a block; torch frees it back to the pool (the segment stays) and a
        // later allocation under group B reuses it. B's exit must register that segment with B.
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000]);
        table.register_pending(A, &nccl).unwrap();
        assert!(!table.is_registered(0x1010, 0x20, B));
        table.register_pending(B, &nccl).unwrap();
        assert!(table.is_registered(0x1010, 0x20, B));
        assert_eq!(nccl.registered(B), vec![0x1000]);
    }

    #[test]
    fn freed_then_reallocated_address_is_a_new_segment() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000, 0x2000]);
        table.register_pending(A, &nccl).unwrap();
        let gone = table.untrack(0x1000, &nccl).unwrap();
        assert!(gone.failures.is_empty());
        table.track(0x1000, 0x100, 0);
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 1);
        assert_eq!(nccl.registered(A), vec![0x1000, 0x2000, 0x1000]);
        assert_eq!(table.segments().len(), 2);
    }

    #[test]
    fn null_window_is_an_error_and_retry_resumes_there() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000, 0x2000, 0x3000]);
        *nccl.null_window_at_ptr.borrow_mut() = Some(0x2000);
        let err = table.register_pending(A, &nccl).unwrap_err();
        assert!(
            matches!(err, Error::NullWindow { ptr: 0x2000, .. }),
            "{err}"
        );
        assert!(table.is_registered(0x1000, 1, A));
        assert!(!table.is_registered(0x2000, 1, A));
        assert_eq!(table.pending(A, 0).count(), 2);

        *nccl.null_window_at_ptr.borrow_mut() = None;
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 2);
        assert_eq!(nccl.registered(A), vec![0x1000, 0x2000, 0x3000]);
    }

    #[test]
    fn failed_registration_then_retry_registers_exactly_the_rest() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000, 0x2000, 0x3000]);
        *nccl.fail_register_at_ptr.borrow_mut() = Some(0x3000);
        assert!(table.register_pending(A, &nccl).is_err());
        assert_eq!(nccl.registered(A), vec![0x1000, 0x2000]);
        *nccl.fail_register_at_ptr.borrow_mut() = None;
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 1);
        assert_eq!(nccl.registered(A), vec![0x1000, 0x2000, 0x3000]);
        assert_eq!(table.counters().windows_registered, 3);
    }

    #[test]
    fn untrack_deregisters_every_window_first_and_keeps_indices_right() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000, 0x2000]);
        table.register_pending(A, &nccl).unwrap();
        table.register_pending(B, &nccl).unwrap();
        table.track(0x3000, 0x100, 0);
        let gone = table.untrack(0x1000, &nccl).unwrap();
        assert_eq!(gone.segment.windows.len(), 2);
        let deregistered: Vec<_> = nccl
            .log
            .borrow()
            .iter()
            .filter(|(what, _, _)| *what == "deregister")
            .map(|(_, comm, _)| *comm)
            .collect();
        assert_eq!(deregistered, vec![A, B]);
        // Only the segment allocated after the last exit is still pending, for both.
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 1);
        assert_eq!(table.register_pending(B, &nccl).unwrap(), 1);
        assert_eq!(table.counters().windows_deregistered, 2);
    }

    #[test]
    fn failed_deregistration_is_reported_not_hidden() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000]);
        table.register_pending(A, &nccl).unwrap();
        *nccl.fail_deregister.borrow_mut() = true;
        let gone = table.untrack(0x1000, &nccl).unwrap();
        assert_eq!(gone.failures.len(), 1);
        assert_eq!(table.counters().deregistration_failures, 1);
        assert!(table.segments().is_empty());
    }

    #[test]
    fn other_devices_segments_are_skipped() {
        let nccl = FakeNccl::default();
        let mut table = SegmentTable::new();
        table.track(0x1000, 0x100, 0);
        table.track(0x2000, 0x100, 1);
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 1);
        assert_eq!(nccl.registered(A), vec![0x1000]);
        assert_eq!(table.comm_summaries()[0].pending_segments, 0);
    }

    #[test]
    fn failed_release_keeps_the_window_so_the_segment_is_never_freed_under_it() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000]);
        table.register_pending(A, &nccl).unwrap();
        *nccl.fail_deregister.borrow_mut() = true;
        assert!(table.release_comm(A, &nccl).is_err());
        assert!(table.is_registered(0x1000, 1, A));
        let gone = table.untrack(0x1000, &nccl).unwrap();
        assert_eq!(
            gone.failures.len(),
            1,
            "untrack must see the window and refuse to free"
        );
    }

    #[test]
    fn release_comm_retry_after_failure_releases_the_rest() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000, 0x2000]);
        table.register_pending(A, &nccl).unwrap();
        *nccl.fail_deregister.borrow_mut() = true;
        assert!(table.release_comm(A, &nccl).is_err());
        *nccl.fail_deregister.borrow_mut() = false;
        assert_eq!(table.release_comm(A, &nccl).unwrap(), 2);
        assert!(!table.is_registered(0x1000, 1, A));
    }

    #[test]
    fn release_comm_deregisters_only_that_communicator() {
        let nccl = FakeNccl::default();
        let mut table = table_with(&[0x1000, 0x2000]);
        table.register_pending(A, &nccl).unwrap();
        table.register_pending(B, &nccl).unwrap();
        assert_eq!(table.release_comm(A, &nccl).unwrap(), 2);
        assert!(!table.is_registered(0x1000, 1, A));
        assert!(table.is_registered(0x1000, 1, B));
        // A communicator seen again later starts from scratch.
        assert_eq!(table.register_pending(A, &nccl).unwrap(), 2);
    }

    #[test]
    fn lookup_needs_the_whole_range_inside_one_segment() {
        let table = table_with(&[0x1000]);
        assert!(table.find(0x1000, 0x100).is_some());
        assert!(table.find(0x10ff, 1).is_some());
        assert!(table.find(0x10ff, 2).is_none());
        assert!(table.find(0xfff, 1).is_none());
        assert!(table.find(usize::MAX, 2).is_none());
        assert_eq!(table.position(0x1010, 0x10), Some((0, 0x10)));
        assert_eq!(table.position(usize::MAX, 2), None);
    }
}
