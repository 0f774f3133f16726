//! What symm_rs costs on the paths a serving engine hits, with no GPU needed.
//!
//! * `exit_nothing_new`, `exit_1_new`, `exit_8_new`: the bookkeeping done when a
//!   `use_symmetric_memory` context exits, for pools of 10 to 10,000 segments. `segment_table` is
//!   `SegmentTable::register_pending` driven by a no-op registrar (so only our bookkeeping is
//!   timed, not NCCL's milliseconds); `snapshot_scan` is the alternative we replaced: materialise a
//!   `MemPool.snapshot()`-like record for every segment and look each one up in a set of
//!   already-registered `(comm, ptr)` pairs.
//! * `lookup`: `is_symmetric`'s question (is this range inside a window of this communicator?)
//!   at 10 to 10,000 segments, and `stats`: the table's summary `symm_rs.stats()` returns, at
//!   1,000 segments held by two communicators.
//! * `alloc_free`: the `symm_rs_alloc`/`symm_rs_free` plugs next to the bare
//!   `ncclMemAlloc`/`ncclMemFree` they wrap, both on the stand-in libnccl compiled from
//!   `tests/stand_in/stand_in_nccl.c`, at 4 KiB and 2 MiB.
//!
//! The parameter of the exit groups is the number of segments the communicator has already
//! registered; the "new" segments are tracked after those, as allocations made inside the
//! context would be.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};

use _native::allocator::{failure_counts, symm_rs_alloc, symm_rs_free, take_last_error};
use _native::handles::{CommPtr, DevicePtr, WindowHandle};
use _native::nccl::{self, Candidates, Origin};
use _native::segments::{SharedTable, WindowRegistrar, ANY_PEERS};

const TABLE_SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
const COMM: CommPtr = CommPtr::new(0xC0);
const DEVICE: i32 = 0;
const SEGMENT_BYTES: usize = 2 << 20;
/// Where the synthetic segments start; any plausible device address does.
const POOL_BASE: usize = 0x7f00_0000_0000;

// ---------------------------------------------------------------------------------------------
// Fixtures shared by both exit strategies
// ---------------------------------------------------------------------------------------------

/// A registrar that does no NCCL work: every registration "succeeds" with a fresh non-NULL
/// handle, so the table's success path (recording the window) is what gets timed.
#[derive(Default)]
struct NoopRegistrar {
    last_handle: Cell<usize>,
}

impl WindowRegistrar for NoopRegistrar {
    fn comm_device(&self, _comm: CommPtr) -> _native::Result<i32> {
        Ok(DEVICE)
    }

    fn register(
        &self,
        _comm: CommPtr,
        _ptr: DevicePtr,
        _size: usize,
    ) -> _native::Result<Option<WindowHandle>> {
        let handle = self.last_handle.get() + 1;
        self.last_handle.set(handle);
        Ok(Some(WindowHandle::new(handle)))
    }

    fn deregister(&self, _comm: CommPtr, _window: WindowHandle) -> _native::Result<()> {
        Ok(())
    }
}

/// The address of the `index`-th segment of the synthetic pool.
fn segment_ptr(index: usize) -> usize {
    POOL_BASE + index * SEGMENT_BYTES
}

fn segment_at(index: usize) -> DevicePtr {
    DevicePtr::new(segment_ptr(index))
}

/// The table as it stands when a context exits: `registered` segments that `COMM` registered at
/// earlier exits, then `new` segments allocated inside this context.
fn table_at_exit(registered: usize, new: usize, nccl: &NoopRegistrar) -> SharedTable {
    let table = SharedTable::new();
    for index in 0..registered {
        table
            .lock()
            .track(segment_at(index), SEGMENT_BYTES, DEVICE, ANY_PEERS);
    }
    table
        .register_pending(COMM, ANY_PEERS, nccl)
        .expect("the no-op registrar never fails");
    for index in registered..registered + new {
        table
            .lock()
            .track(segment_at(index), SEGMENT_BYTES, DEVICE, ANY_PEERS);
    }
    table
}

// ---------------------------------------------------------------------------------------------
// The baseline: find new segments by scanning a pool snapshot
// ---------------------------------------------------------------------------------------------

/// One segment as a snapshot-based allocator would see it. torch's `MemPool.snapshot()` returns,
/// per segment, a dict of about a dozen keys (device, address, total_size, allocated_size,
/// active_size, requested_size, stream, segment_type, segment_pool_id, is_expandable, frames)
/// plus a list of block dicts. This model keeps the six fields a registration scan would read or
/// that cost an allocation (the `segment_type` string and the block list), each block reduced to
/// plain integers. It is a lower bound: torch builds Python objects for every key and value (the
/// design brief measured 392 µs for a 7-segment pool), and we build only two heap allocations.
#[allow(dead_code)] // Fields are written to model the materialisation cost; the scan reads two.
struct SnapshotSegment {
    device: i32,
    address: usize,
    total_size: usize,
    allocated_size: usize,
    segment_type: String,
    blocks: Vec<SnapshotBlock>,
}

#[allow(dead_code)]
struct SnapshotBlock {
    address: usize,
    size: usize,
    active: bool,
}

/// What the pool knows about each of its segments: `(ptr, size)`, in allocation order.
fn pool_of(segments: usize) -> Vec<(usize, usize)> {
    (0..segments)
        .map(|index| (segment_ptr(index), SEGMENT_BYTES))
        .collect()
}

/// Windows already made, keyed by `(comm, ptr)`. A map, not a set: a snapshot-based allocator
/// must keep the window handle too, to deregister it before the segment is freed.
type RegisteredWindows = HashMap<(CommPtr, usize), WindowHandle>;

fn registered_windows(pool: &[(usize, usize)]) -> RegisteredWindows {
    pool.iter()
        .enumerate()
        .map(|(handle, &(ptr, _))| ((COMM, ptr), WindowHandle::new(handle + 1)))
        .collect()
}

/// One exit the snapshot way: materialise a record per segment, keep the ones `comm` has not
/// registered, register them (with the same no-op registrar) and remember their windows.
fn snapshot_exit(
    pool: &[(usize, usize)],
    registered: &mut RegisteredWindows,
    comm: CommPtr,
    nccl: &NoopRegistrar,
) -> usize {
    let snapshot: Vec<SnapshotSegment> = pool
        .iter()
        .map(|&(address, size)| SnapshotSegment {
            device: DEVICE,
            address,
            total_size: size,
            allocated_size: size,
            segment_type: "large".to_owned(),
            blocks: vec![SnapshotBlock {
                address,
                size,
                active: true,
            }],
        })
        .collect();
    let mut made = 0;
    for segment in &snapshot {
        let key = (comm, segment.address);
        if registered.contains_key(&key) {
            continue;
        }
        let handle = nccl
            .register(comm, DevicePtr::new(segment.address), segment.total_size)
            .expect("the no-op registrar never fails")
            .expect("the no-op registrar never returns NULL");
        registered.insert(key, handle);
        made += 1;
    }
    made
}

// ---------------------------------------------------------------------------------------------
// Exit benchmarks
// ---------------------------------------------------------------------------------------------

/// The common exit: every segment is registered already, so both strategies find nothing. No
/// state changes between iterations, so plain `iter` measures exactly one exit.
fn exit_nothing_new(c: &mut Criterion) {
    let nccl = NoopRegistrar::default();
    let mut group = c.benchmark_group("exit_nothing_new");
    for size in TABLE_SIZES {
        let table = table_at_exit(size, 0, &nccl);
        assert_eq!(
            table
                .register_pending(COMM, ANY_PEERS, &nccl)
                .unwrap()
                .windows,
            0
        );
        group.bench_function(BenchmarkId::new("segment_table", size), |b| {
            b.iter(|| table.register_pending(black_box(COMM), ANY_PEERS, &nccl))
        });

        let pool = pool_of(size);
        let mut registered = registered_windows(&pool);
        assert_eq!(snapshot_exit(&pool, &mut registered, COMM, &nccl), 0);
        group.bench_function(BenchmarkId::new("snapshot_scan", size), |b| {
            b.iter(|| snapshot_exit(&pool, &mut registered, black_box(COMM), &nccl))
        });
    }
    group.finish();
}

/// An exit that allocated `new` segments. Each exit changes the state (the new segments become
/// registered), so every iteration gets a freshly built input from `iter_batched_ref`'s setup,
/// which is not timed; dropping the input is not timed either. Inputs are built in batches just
/// before they are used, so at 10,000 segments part of what the routine touches may be out of
/// cache.
fn exit_with_new(c: &mut Criterion, group_name: &str, new: usize) {
    let nccl = NoopRegistrar::default();
    let mut group = c.benchmark_group(group_name);
    for size in TABLE_SIZES {
        // The routine must do what the name says: register exactly `new` segments.
        assert_eq!(
            table_at_exit(size, new, &nccl)
                .register_pending(COMM, ANY_PEERS, &nccl)
                .unwrap()
                .windows,
            new
        );
        group.bench_function(BenchmarkId::new("segment_table", size), |b| {
            b.iter_batched_ref(
                || table_at_exit(size, new, &nccl),
                |table| table.register_pending(black_box(COMM), ANY_PEERS, &nccl),
                BatchSize::LargeInput,
            )
        });

        let pool = pool_of(size + new);
        let registered = registered_windows(&pool[..size]);
        assert_eq!(
            snapshot_exit(&pool, &mut registered.clone(), COMM, &nccl),
            new
        );
        group.bench_function(BenchmarkId::new("snapshot_scan", size), |b| {
            b.iter_batched_ref(
                || registered.clone(),
                |registered| snapshot_exit(&pool, registered, black_box(COMM), &nccl),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn exit_one_new(c: &mut Criterion) {
    exit_with_new(c, "exit_1_new", 1);
}

fn exit_eight_new(c: &mut Criterion) {
    exit_with_new(c, "exit_8_new", 8);
}

// ---------------------------------------------------------------------------------------------
// Introspection: is_symmetric and stats
// ---------------------------------------------------------------------------------------------

/// `is_symmetric` on a tensor in the last segment (the worst case for a linear scan), so the
/// rows show the lookup's growth with the pool.
fn lookup(c: &mut Criterion) {
    let nccl = NoopRegistrar::default();
    let mut group = c.benchmark_group("lookup");
    for size in TABLE_SIZES {
        let table = table_at_exit(size, 0, &nccl);
        let inside = segment_ptr(size - 1) + 4096;
        assert!(table.lock().is_registered(inside, 1024, COMM));
        group.bench_function(BenchmarkId::new("is_registered", size), |b| {
            b.iter(|| table.lock().is_registered(black_box(inside), 1024, COMM))
        });
    }
    group.finish();
}

/// What `symm_rs.stats()` reads from the table: counters, and per communicator its windows,
/// bytes and pending segments, with two communicators over 1,000 segments.
fn stats(c: &mut Criterion) {
    let nccl = NoopRegistrar::default();
    let table = table_at_exit(1_000, 0, &nccl);
    table
        .register_pending(CommPtr::new(0xC1), ANY_PEERS, &nccl)
        .expect("the no-op registrar never fails");
    c.bench_function("stats/1000_segments_2_comms", |b| {
        b.iter(|| {
            let t = table.lock();
            black_box((t.len(), t.total_bytes(), t.counters(), t.comm_summaries()))
        })
    });
}

// ---------------------------------------------------------------------------------------------
// Allocator plugs against the stand-in libnccl
// ---------------------------------------------------------------------------------------------

/// 2 MiB is a real segment size. The stand-in's `posix_memalign` serves it with mmap/munmap and a
/// page fault each time, which buries the plug's own cost; at 4 KiB glibc serves it from the heap,
/// so that pair shows what the plug adds.
const ALLOC_SIZES: [(&str, usize); 2] = [("4KiB", 4 << 10), ("2MiB", SEGMENT_BYTES)];

type MemAllocFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type MemFreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;

/// Compiles the stand-in libnccl under `target/stand_in/`. Cargo sets no `CARGO_TARGET_TMPDIR`
/// for benches, so the path hangs off the manifest directory. The library is written under a
/// temporary name and renamed, so a test process that has the old file mapped is not disturbed.
fn build_stand_in_nccl() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target").join("stand_in");
    std::fs::create_dir_all(&dir).expect("create target/stand_in");
    let library = dir.join("libnccl_stand_in.so");
    let partial = dir.join(format!(
        "libnccl_stand_in.so.{}.partial",
        std::process::id()
    ));
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&partial)
        .arg(root.join("tests/stand_in/stand_in_nccl.c"))
        .status()
        .unwrap_or_else(|e| panic!("could not run {compiler}: {e}"));
    assert!(status.success(), "{compiler} failed to build the stand-in");
    std::fs::rename(&partial, &library).expect("move the stand-in into place");
    library
}

/// Points the plugs at the stand-in. Must run before the first plug call: the process-wide NCCL
/// is chosen once.
fn load_stand_in_for_plugs(library: &Path) {
    let candidates = Candidates {
        preferred: Some(library.to_path_buf()),
        ..Candidates::default()
    };
    let nccl = nccl::load(&candidates).expect("the plugs' NCCL loads");
    // If a real libnccl were already mapped, the plugs would use it, not the stand-in, and the
    // comparison below would be between two different libraries.
    assert_eq!(nccl.origin(), Origin::Preferred, "{:?}", nccl.path());
}

/// Plug pair: NCCL lookup, device guard, `ncclMemAlloc`, table insert under the lock; then
/// lookup, table removal, device guard, device synchronise, `ncclMemFree`. There is no GPU here:
/// without `libcuda.so.1` the device guard and the synchronise are no-ops, so on a real machine
/// add the driver's context calls and whatever `cuCtxSynchronize` waits for.
fn plug_alloc_free(size: usize) {
    let ptr = symm_rs_alloc(size, DEVICE, ptr::null_mut());
    symm_rs_free(black_box(ptr), size, DEVICE, ptr::null_mut());
}

fn alloc_free(c: &mut Criterion) {
    let library = build_stand_in_nccl();
    load_stand_in_for_plugs(&library);

    // Opening the same path again yields the mapping the plugs use, so both sides of the
    // comparison call the very same functions.
    // SAFETY: the stand-in's initialisers do nothing; it stays loaded until the end of main.
    let direct = unsafe { libloading::Library::new(&library) }.expect("open the stand-in");
    // SAFETY: the types are the signatures stand_in_nccl.c (and nccl.h) give these symbols.
    let (mem_alloc, mem_free) = unsafe {
        (
            *direct.get::<MemAllocFn>(b"ncclMemAlloc\0").unwrap(),
            *direct.get::<MemFreeFn>(b"ncclMemFree\0").unwrap(),
        )
    };

    // A plug failure shows up only as NULL and a kept message; fail loudly instead of timing
    // an error path.
    let ptr = symm_rs_alloc(SEGMENT_BYTES, DEVICE, ptr::null_mut());
    assert!(
        !ptr.is_null(),
        "symm_rs_alloc failed: {:?}",
        take_last_error()
    );
    symm_rs_free(ptr, SEGMENT_BYTES, DEVICE, ptr::null_mut());
    assert_eq!(failure_counts().free, 0, "{:?}", take_last_error());

    let mut group = c.benchmark_group("alloc_free");
    for (label, size) in ALLOC_SIZES {
        group.bench_function(BenchmarkId::new("symm_rs_plugs", label), |b| {
            b.iter(|| plug_alloc_free(black_box(size)))
        });
        group.bench_function(BenchmarkId::new("stand_in_nccl_direct", label), |b| {
            b.iter(|| {
                let mut ptr: *mut c_void = ptr::null_mut();
                // SAFETY: ncclMemAlloc writes one pointer into a local; ncclMemFree gets back
                // the pointer it returned, once.
                unsafe {
                    assert_eq!(mem_alloc(&mut ptr, black_box(size)), 0);
                    mem_free(black_box(ptr));
                }
            })
        });
    }
    group.finish();
    assert_eq!(failure_counts().alloc + failure_counts().free, 0);
}

criterion_group!(
    benches,
    exit_nothing_new,
    exit_one_new,
    exit_eight_new,
    lookup,
    stats,
    alloc_free
);
criterion_main!(benches);
