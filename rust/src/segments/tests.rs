use super::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

/// A stand-in NCCL that logs every call and can be told to fail or to block.
#[derive(Default)]
struct FakeNccl {
    log: Mutex<Vec<(&'static str, CommPtr, usize)>>,
    next_handle: AtomicUsize,
    fail_register_at_ptr: Mutex<Option<usize>>,
    null_window_at_ptr: Mutex<Option<usize>>,
    fail_deregister: AtomicBool,
    /// When set, `register` waits at this barrier twice (entered, then released).
    gate: Mutex<Option<Arc<Barrier>>>,
}

impl WindowRegistrar for FakeNccl {
    fn comm_device(&self, _comm: CommPtr) -> Result<i32> {
        Ok(0)
    }
    fn register(
        &self,
        comm: CommPtr,
        ptr: DevicePtr,
        _size: usize,
    ) -> Result<Option<WindowHandle>> {
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.wait();
            gate.wait();
        }
        if *self.fail_register_at_ptr.lock().unwrap() == Some(ptr.addr()) {
            return Err(Error::invalid_argument("injected register failure"));
        }
        if *self.null_window_at_ptr.lock().unwrap() == Some(ptr.addr()) {
            return Ok(None);
        }
        self.log
            .lock()
            .unwrap()
            .push(("register", comm, ptr.addr()));
        let n = self.next_handle.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Some(WindowHandle::new(0x1000 + n)))
    }
    fn deregister(&self, comm: CommPtr, window: WindowHandle) -> Result<()> {
        if self.fail_deregister.load(Ordering::SeqCst) {
            return Err(Error::invalid_argument("injected deregister failure"));
        }
        self.log
            .lock()
            .unwrap()
            .push(("deregister", comm, window.addr()));
        Ok(())
    }
}

impl FakeNccl {
    fn registered(&self, comm: CommPtr) -> Vec<usize> {
        self.calls("register", comm)
    }
    fn calls(&self, what: &str, comm: CommPtr) -> Vec<usize> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, c, _)| *w == what && *c == comm)
            .map(|(_, _, ptr)| *ptr)
            .collect()
    }
}

const A: CommPtr = CommPtr::new(0xA);
const B: CommPtr = CommPtr::new(0xB);

fn p(addr: usize) -> DevicePtr {
    DevicePtr::new(addr)
}

fn table_with(ptrs: &[usize]) -> SharedTable {
    let table = SharedTable::new();
    for &ptr in ptrs {
        table.lock().track(p(ptr), 0x100, 0, ANY_PEERS);
    }
    table
}

fn registered_in_table(table: &SharedTable, ptr: usize, comm: CommPtr) -> bool {
    table.lock().is_registered(ptr, 1, comm)
}

#[test]
fn registers_in_allocation_order_once() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x3000, 0x1000, 0x2000]);
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        3
    );
    assert_eq!(nccl.registered(A), vec![0x3000, 0x1000, 0x2000]);
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        0
    );
    table.lock().track(p(0x500), 0x100, 0, ANY_PEERS);
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(nccl.registered(A), vec![0x3000, 0x1000, 0x2000, 0x500]);
}

#[test]
fn each_communicator_registers_only_its_peer_sets_segments() {
    // Rank 0 of a 4-rank world: its TP pool ({0,1}) grew twice, its CP pool ({0,2}) once, and
    // the world's pool once. Rank 2's TP pool ({2,3}) may have grown another way: the world
    // communicator must ask for the world's segments (and untagged ones) only.
    const TP: PeerSet = 1;
    const CP: PeerSet = 2;
    const WORLD: PeerSet = 3;
    let (tp, cp, world) = (A, B, CommPtr::new(0xC));
    let nccl = FakeNccl::default();
    let table = SharedTable::new();
    for (ptr, peers) in [(0x1000, TP), (0x2000, CP), (0x3000, WORLD), (0x4000, TP)] {
        table.lock().track(p(ptr), 0x100, 0, peers);
    }
    table.lock().track(p(0x5000), 0x100, 0, ANY_PEERS);
    assert_eq!(
        table.register_pending(world, WORLD, &nccl).unwrap().windows,
        2
    );
    assert_eq!(nccl.registered(world), vec![0x3000, 0x5000]);
    assert_eq!(table.register_pending(tp, TP, &nccl).unwrap().windows, 3);
    assert_eq!(nccl.registered(tp), vec![0x1000, 0x4000, 0x5000]);
    assert_eq!(table.register_pending(cp, CP, &nccl).unwrap().windows, 2);
    assert_eq!(nccl.registered(cp), vec![0x2000, 0x5000]);
    // Another TP segment leaves the world communicator up to date.
    table.lock().track(p(0x6000), 0x100, 0, TP);
    assert!(table.is_up_to_date(world, ALL_LANES));
    assert!(!table.is_up_to_date(tp, ALL_LANES));
    let summaries = table.lock().comm_summaries();
    let pending: Vec<usize> = summaries.iter().map(|s| s.pending_segments).collect();
    assert_eq!(pending, vec![1, 0, 0]); // tp (0xA), cp (0xB), world (0xC)
    assert_eq!(
        table.register_pending(world, WORLD, &nccl).unwrap().windows,
        0
    );
    assert_eq!(table.register_pending(tp, TP, &nccl).unwrap().windows, 1);
}

/// Windows and bytes per communicator counted the slow way, to check the running counts.
fn windows_by_scan(table: &SegmentTable) -> Vec<(CommPtr, usize, usize)> {
    let mut comms: Vec<CommPtr> = table.comm_summaries().iter().map(|s| s.comm).collect();
    comms.sort();
    comms
        .into_iter()
        .map(|comm| {
            let held: Vec<&Segment> = table
                .segments()
                .filter(|s| s.window_for(comm).is_some())
                .collect();
            (comm, held.len(), held.iter().map(|s| s.size).sum())
        })
        .collect()
}

fn windows_in_summaries(table: &SegmentTable) -> Vec<(CommPtr, usize, usize)> {
    table
        .comm_summaries()
        .iter()
        .map(|s| (s.comm, s.windows, s.window_bytes))
        .collect()
}

#[test]
fn running_window_counts_match_a_scan_through_frees_releases_and_failures() {
    let nccl = FakeNccl::default();
    let table = SharedTable::new();
    for (i, ptr) in [0x1000, 0x2000, 0x3000, 0x4000].into_iter().enumerate() {
        table.lock().track(p(ptr), 0x100 * (i + 1), 0, ANY_PEERS);
    }
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    table.register_pending(B, ANY_PEERS, &nccl).unwrap();
    let check = |when: &str| {
        let guard = table.lock();
        assert_eq!(
            windows_in_summaries(&guard),
            windows_by_scan(&guard),
            "{when}"
        );
    };
    check("after registration");
    table.untrack(p(0x2000), &nccl).unwrap().unwrap(); // freed: both windows go
    check("after a free");
    nccl.fail_deregister.store(true, Ordering::SeqCst);
    assert!(table.release_comm(A, &nccl).is_err()); // A's windows go back on their segments
    nccl.fail_deregister.store(false, Ordering::SeqCst);
    check("after a release that failed");
    assert_eq!(windows_in_summaries(&table.lock())[0].1, 3);
    assert_eq!(table.release_comm(A, &nccl).unwrap(), 3);
    check("after the release, retried");
    table.lock().forget(B);
    check("after forgetting B");
    table.lock().track(p(0x5000), 0x100, 0, ANY_PEERS);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    check("after registering again");
}

#[test]
fn several_communicators_share_one_pool() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    table.lock().track(p(0x3000), 0x100, 0, ANY_PEERS);
    table.register_pending(B, ANY_PEERS, &nccl).unwrap();
    assert_eq!(nccl.registered(B), vec![0x1000, 0x2000, 0x3000]);
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(nccl.registered(A), vec![0x1000, 0x2000, 0x3000]);
    let guard = table.lock();
    for segment in guard.segments() {
        assert!(segment.window_for(A).is_some() && segment.window_for(B).is_some());
    }
    let summaries = guard.comm_summaries();
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
    let table = table_with(&[0x1000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    assert!(!table.lock().is_registered(0x1010, 0x20, B));
    table.register_pending(B, ANY_PEERS, &nccl).unwrap();
    assert!(table.lock().is_registered(0x1010, 0x20, B));
    assert_eq!(nccl.registered(B), vec![0x1000]);
}

#[test]
fn freed_then_reallocated_address_is_a_new_segment() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    let gone = table.untrack(p(0x1000), &nccl).unwrap().unwrap();
    assert!(gone.failures.is_empty());
    table.lock().track(p(0x1000), 0x100, 0, ANY_PEERS);
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(nccl.registered(A), vec![0x1000, 0x2000, 0x1000]);
    assert_eq!(table.lock().len(), 2);
}

#[test]
fn a_null_window_makes_the_communicator_plain_without_an_error() {
    // NCCL answers "no symmetric memory here" with a NULL window, per communicator: every rank
    // gets it, and every rank then treats the pool as plain memory for that communicator.
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000, 0x3000]);
    *nccl.null_window_at_ptr.lock().unwrap() = Some(0x1000);
    let done = table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    assert_eq!(
        done,
        Registered {
            windows: 0,
            null_window: true
        }
    );
    assert!(table.lock().is_plain(A));
    assert_eq!(table.lock().pending(A, 0, ANY_PEERS).count(), 0);
    assert!(
        table.is_up_to_date(A, ALL_LANES),
        "a plain communicator has nothing to do"
    );
    table.lock().track(p(0x4000), 0x100, 0, ANY_PEERS);
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        0
    );
    assert!(nccl.registered(A).is_empty());
    // Other communicators are not affected.
    *nccl.null_window_at_ptr.lock().unwrap() = None;
    assert_eq!(
        table.register_pending(B, ANY_PEERS, &nccl).unwrap().windows,
        4
    );
    let summaries = table.lock().comm_summaries();
    assert!(summaries
        .iter()
        .any(|s| s.comm == A && s.plain && s.pending_segments == 0));
}

#[test]
fn failed_registration_then_retry_registers_exactly_the_rest() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000, 0x3000]);
    *nccl.fail_register_at_ptr.lock().unwrap() = Some(0x3000);
    assert!(table.register_pending(A, ANY_PEERS, &nccl).is_err());
    assert_eq!(nccl.registered(A), vec![0x1000, 0x2000]);
    *nccl.fail_register_at_ptr.lock().unwrap() = None;
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(nccl.registered(A), vec![0x1000, 0x2000, 0x3000]);
    assert_eq!(table.lock().counters().windows_registered, 3);
}

#[test]
fn untrack_deregisters_every_window_first_and_keeps_order_right() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    table.register_pending(B, ANY_PEERS, &nccl).unwrap();
    table.lock().track(p(0x3000), 0x100, 0, ANY_PEERS);
    let gone = table.untrack(p(0x1000), &nccl).unwrap().unwrap();
    assert_eq!(gone.segment.windows.len(), 2);
    assert_eq!(nccl.calls("deregister", A).len(), 1);
    assert_eq!(nccl.calls("deregister", B).len(), 1);
    // Only the segment allocated after the last exit is still pending, for both.
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(
        table.register_pending(B, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(table.lock().counters().windows_deregistered, 2);
}

#[test]
fn failed_deregistration_is_reported_not_hidden() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    nccl.fail_deregister.store(true, Ordering::SeqCst);
    let gone = table.untrack(p(0x1000), &nccl).unwrap().unwrap();
    assert_eq!(gone.failures.len(), 1);
    assert_eq!(table.lock().counters().deregistration_failures, 1);
    assert!(table.lock().is_empty());
}

#[test]
fn other_devices_segments_are_skipped() {
    let nccl = FakeNccl::default();
    let table = SharedTable::new();
    table.lock().track(p(0x1000), 0x100, 0, ANY_PEERS);
    table.lock().track(p(0x2000), 0x100, 1, ANY_PEERS);
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(nccl.registered(A), vec![0x1000]);
    assert_eq!(table.lock().comm_summaries()[0].pending_segments, 0);
}

#[test]
fn failed_release_keeps_the_window_so_the_segment_is_never_freed_under_it() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    nccl.fail_deregister.store(true, Ordering::SeqCst);
    assert!(table.release_comm(A, &nccl).is_err());
    assert!(registered_in_table(&table, 0x1000, A));
    let gone = table.untrack(p(0x1000), &nccl).unwrap().unwrap();
    assert_eq!(
        gone.failures.len(),
        1,
        "untrack must see the window and refuse to free"
    );
}

#[test]
fn release_comm_retry_after_failure_releases_the_rest() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    nccl.fail_deregister.store(true, Ordering::SeqCst);
    assert!(table.release_comm(A, &nccl).is_err());
    nccl.fail_deregister.store(false, Ordering::SeqCst);
    assert_eq!(table.release_comm(A, &nccl).unwrap(), 2);
    assert!(!registered_in_table(&table, 0x1000, A));
}

#[test]
fn release_comm_deregisters_only_that_communicator() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    table.register_pending(B, ANY_PEERS, &nccl).unwrap();
    assert_eq!(table.release_comm(A, &nccl).unwrap(), 2);
    assert!(!registered_in_table(&table, 0x1000, A));
    assert!(registered_in_table(&table, 0x1000, B));
    // A communicator seen again later starts from scratch.
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        2
    );
}

#[test]
fn a_forgotten_communicator_never_reaches_nccl_and_its_address_starts_clean() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    assert_eq!(table.forget_comm(A), 2);
    // Its windows are gone from the table, without a deregister call on the dead communicator.
    assert!(nccl.calls("deregister", A).is_empty());
    assert!(!registered_in_table(&table, 0x1000, A));
    // Freeing the segments later must not deregister on the dead communicator either.
    table.untrack(p(0x1000), &nccl).unwrap().unwrap();
    assert!(nccl.calls("deregister", A).is_empty());
    // A new communicator at the same address registers what exists, from scratch.
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        1
    );
    assert_eq!(table.lock().counters().windows_forgotten, 2);
}

#[test]
fn lookup_needs_the_whole_range_inside_one_segment() {
    let table = table_with(&[0x1000, 0x3000]);
    let t = table.lock();
    assert!(t.find(0x1000, 0x100).is_some());
    assert!(t.find(0x10ff, 1).is_some());
    assert!(t.find(0x10ff, 2).is_none());
    assert!(t.find(0xfff, 1).is_none());
    assert!(t.find(0x2000, 1).is_none());
    assert!(t.find(0x30ff, 1).is_some());
    assert!(t.find(usize::MAX, 2).is_none());
    assert_eq!(t.position(0x1010, 0x10), Some((0, 0x10)));
    assert_eq!(t.position(0x3010, 0x10), Some((1, 0x10)));
    assert_eq!(t.position(usize::MAX, 2), None);
}

// The table under threads: NCCL calls made outside its lock, waits, plans and lanes.
mod concurrency;
