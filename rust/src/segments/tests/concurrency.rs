//! The segment table under several threads: NCCL is never called with the table locked, a
//! second registration of one communicator waits for the first, pinned segments outlive frees,
//! lanes and plans keep each rank's order, and every wait is bounded.

use super::*;

/// Runs `register_pending(A)` on a thread while `register` is held at the gate; returns the
/// thread, the gate and the table once the registration is inside NCCL.
fn registration_in_flight(
    ptrs: &[usize],
) -> (
    Arc<SharedTable>,
    Arc<FakeNccl>,
    Arc<Barrier>,
    thread::JoinHandle<Result<Registered>>,
) {
    let table = Arc::new(table_with(ptrs));
    let nccl = Arc::new(FakeNccl::default());
    let gate = Arc::new(Barrier::new(2));
    *nccl.gate.lock().unwrap() = Some(gate.clone());
    let worker = {
        let (table, nccl) = (table.clone(), nccl.clone());
        thread::spawn(move || table.register_pending(A, ANY_PEERS, &*nccl))
    };
    gate.wait(); // the worker is inside `register`, holding no lock
    *nccl.gate.lock().unwrap() = None;
    (table, nccl, gate, worker)
}

#[test]
fn the_table_is_not_locked_while_nccl_registers() {
    let (table, _nccl, gate, worker) = registration_in_flight(&[0x1000]);
    // The allocator plug's work (track) and lookups go through while NCCL is busy.
    table.lock().track(p(0x2000), 0x100, 0, ANY_PEERS);
    assert!(table.lock().find(0x2000, 1).is_some());
    gate.wait();
    assert_eq!(worker.join().unwrap().unwrap().windows, 1);
    // The segment tracked during the registration stays pending for the next one.
    assert_eq!(table.lock().pending(A, 0, ANY_PEERS).count(), 1);
}

#[test]
fn a_second_registration_of_one_communicator_waits_and_registers_the_rest() {
    let (table, nccl, gate, worker) = registration_in_flight(&[0x1000]);
    table.lock().track(p(0x2000), 0x100, 0, ANY_PEERS);
    let second = {
        let (table, nccl) = (table.clone(), nccl.clone());
        thread::spawn(move || table.register_pending(A, ANY_PEERS, &*nccl))
    };
    thread::sleep(Duration::from_millis(50));
    assert!(
        !second.is_finished(),
        "the second registration did not wait"
    );
    gate.wait();
    assert_eq!(worker.join().unwrap().unwrap().windows, 1);
    assert_eq!(second.join().unwrap().unwrap().windows, 1);
    assert_eq!(nccl.registered(A), vec![0x1000, 0x2000]);
}

#[test]
fn a_segment_being_registered_is_not_freed_until_registration_ends() {
    let (table, nccl, gate, worker) = registration_in_flight(&[0x1000]);
    let freer = {
        let (table, nccl) = (table.clone(), nccl.clone());
        thread::spawn(move || {
            table
                .untrack(p(0x1000), &*nccl)
                .unwrap()
                .map(|u| u.segment.windows.len())
        })
    };
    thread::sleep(Duration::from_millis(50));
    assert!(
        !freer.is_finished(),
        "the segment was freed under a registration"
    );
    gate.wait();
    worker.join().unwrap().unwrap();
    // Once registered, the free deregisters the new window before handing the memory back.
    assert_eq!(freer.join().unwrap(), Some(1));
    assert_eq!(nccl.calls("deregister", A).len(), 1);
}

#[test]
fn each_lane_registers_its_own_segments_in_its_own_order() {
    // Two threads allocate for the same ranks at once: rank 0 may interleave them as
    // 1,2,1 and rank 1 as 1,1,2. A registration from lane 1 takes lane 1's segments (and
    // lane-less ones) only, so every rank registers the same sequence.
    const PEERS: PeerSet = 7;
    let tag = |lane| Tag { peers: PEERS, lane };
    let nccl = FakeNccl::default();
    let table = SharedTable::new();
    table.lock().track(p(0x1000), 0x100, 0, tag(1));
    table.lock().track(p(0x2000), 0x100, 0, tag(2));
    table.lock().track(p(0x3000), 0x100, 0, tag(1));
    table.lock().track(p(0x4000), 0x100, 0, tag(ANY_LANE));
    let lane = |lane| Scope { peers: PEERS, lane };
    assert!(!table.is_up_to_date(A, 1));
    assert_eq!(
        table.register_pending(A, lane(1), &nccl).unwrap().windows,
        3
    );
    assert_eq!(nccl.registered(A), vec![0x1000, 0x3000, 0x4000]);
    assert!(table.is_up_to_date(A, 1), "lane 1 is done");
    assert!(
        !table.is_up_to_date(A, 2),
        "lane 2's segment is still pending"
    );
    assert_eq!(
        table.register_pending(A, lane(2), &nccl).unwrap().windows,
        1
    );
    assert_eq!(nccl.registered(A), vec![0x1000, 0x3000, 0x4000, 0x2000]);
    // An explicit registration of every lane takes whatever is left, in allocation order.
    table.lock().track(p(0x5000), 0x100, 0, tag(2));
    table.lock().track(p(0x6000), 0x100, 0, tag(1));
    assert_eq!(table.register_pending(A, PEERS, &nccl).unwrap().windows, 2);
    assert_eq!(&nccl.registered(A)[4..], &[0x5000, 0x6000]);
}

#[test]
fn a_plan_fixes_the_list_so_later_allocations_wait_for_the_next_one() {
    // The sizes the ranks agree on are the plan's: a segment another thread allocates between
    // the agreement and the registration is not registered by this one.
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    let plan = table.plan(A, ANY_PEERS, &nccl).unwrap().unwrap();
    assert_eq!(plan.plan().sizes(), vec![0x100, 0x100]);
    table.lock().track(p(0x3000), 0x100, 0, ANY_PEERS);
    assert_eq!(plan.register(&nccl, |_| {}).unwrap().windows, 2);
    assert_eq!(nccl.registered(A), vec![0x1000, 0x2000]);
    assert_eq!(table.lock().pending(A, 0, ANY_PEERS).count(), 1);
}

#[test]
fn a_dropped_plan_unpins_and_leaves_everything_pending() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000, 0x2000]);
    {
        let plan = table.plan(A, ANY_PEERS, &nccl).unwrap().unwrap();
        assert!(table.lock().is_pinned(p(0x1000)));
        assert!(table.lock().is_busy(A));
        drop(plan); // the agreement failed, or a panic unwound through the caller
    }
    assert!(!table.lock().is_pinned(p(0x1000)));
    assert!(!table.lock().is_busy(A));
    assert_eq!(table.lock().pending(A, 0, ANY_PEERS).count(), 2);
    assert!(nccl.registered(A).is_empty());
    assert_eq!(
        table.register_pending(A, ANY_PEERS, &nccl).unwrap().windows,
        2
    );
}

#[test]
fn nothing_to_register_plans_nothing() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000]);
    table.register_pending(A, ANY_PEERS, &nccl).unwrap();
    assert!(table.plan(A, ANY_PEERS, &nccl).unwrap().is_none());
    assert!(!table.lock().is_busy(A));
}

#[test]
fn waits_on_a_busy_communicator_or_a_pinned_segment_are_bounded() {
    let nccl = FakeNccl::default();
    let table = table_with(&[0x1000]);
    table.set_wait_limit(Duration::from_millis(30));
    let plan = table.plan(A, ANY_PEERS, &nccl).unwrap().unwrap();
    // A second registration, a release, and the free plug each give up instead of hanging.
    let second = table.register_pending(A, ANY_PEERS, &nccl).unwrap_err();
    assert!(matches!(second, Error::Timeout { .. }), "{second}");
    let release = table.release_comm(A, &nccl).unwrap_err();
    assert!(matches!(release, Error::Timeout { .. }), "{release}");
    let free = table.untrack(p(0x1000), &nccl).unwrap_err();
    assert!(free.to_string().contains("kept allocated"), "{free}");
    assert!(
        table.lock().find(0x1000, 1).is_some(),
        "a pinned segment must stay tracked"
    );
    // Forgetting never waits: the communicator was destroyed, whatever runs on it.
    assert_eq!(table.forget_comm(A), 0);
    let late = plan.register(&nccl, |_| {}).unwrap_err();
    assert!(matches!(late, Error::Closed(_)), "{late}");
    assert!(
        nccl.registered(A).is_empty(),
        "a forgotten communicator reached NCCL"
    );
    assert!(!table.lock().is_pinned(p(0x1000)));
}
