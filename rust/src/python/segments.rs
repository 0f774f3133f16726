//! The process's segment table as Python reads and drives it: registration without an
//! agreement, allocation tags, releasing and forgetting communicators, and look-ups.

use pyo3::prelude::*;

use crate::allocator;
use crate::handles::CommPtr;
use crate::nccl;
use crate::segments::{Scope, Tag, ALL_LANES};

/// Registers every pool segment of `peers` (seen from `lane`) that `comm` has not registered
/// yet, without an agreement between ranks first. Collective over its ranks. Returns how many
/// windows were made; a NULL window from NCCL makes the communicator plain (`is_plain`).
#[pyfunction]
#[pyo3(signature = (comm, peers = 0, lane = ALL_LANES))]
fn register_pending(py: Python<'_>, comm: CommPtr, peers: u64, lane: u64) -> PyResult<usize> {
    let scope = Scope { peers, lane };
    let done = py.detach(|| allocator::register_pending(comm, scope))?;
    Ok(done.windows)
}

/// Tags the segments this thread allocates from now on with `(peers, lane)` (0, 0: any
/// communicator registers them, from any lane); returns the previous tag.
#[pyfunction]
#[pyo3(signature = (peers, lane = 0))]
fn allocate_for(peers: u64, lane: u64) -> (u64, u64) {
    let previous = allocator::allocate_for(Tag { peers, lane });
    (previous.peers, previous.lane)
}

/// Deregisters every window `comm` holds; call before the communicator is destroyed.
#[pyfunction]
fn release_comm(py: Python<'_>, comm: CommPtr) -> PyResult<usize> {
    Ok(py.detach(|| allocator::release_comm(comm))?)
}

/// Forgets a communicator that was destroyed without `release_comm` (no NCCL call is made).
#[pyfunction]
fn forget_comm(py: Python<'_>, comm: CommPtr) -> usize {
    py.detach(|| allocator::forget_comm(comm))
}

/// Postpones `comm`'s registration until `take_deferred` (a capture or NCCL group is open).
#[pyfunction]
fn defer_registration(comm: CommPtr) {
    allocator::defer_registration(comm);
}

/// The communicators whose registration was postponed, in first-seen order, cleared.
#[pyfunction]
fn take_deferred() -> Vec<CommPtr> {
    allocator::take_deferred()
}

/// Sizes of the segments of `peers` (seen from `lane`) that `comm` would register next.
#[pyfunction]
#[pyo3(signature = (comm, peers = 0, lane = ALL_LANES))]
fn pending_sizes(py: Python<'_>, comm: CommPtr, peers: u64, lane: u64) -> PyResult<Vec<usize>> {
    let device = py.detach(|| nccl::get()?.comm_device(comm))?;
    let scope = Scope { peers, lane };
    Ok(allocator::with_table(|t| {
        t.pending(comm, device, scope).map(|s| s.size).collect()
    }))
}

/// Whether `[ptr, ptr + nbytes)` lies inside one window `comm` holds.
#[pyfunction]
fn is_registered(ptr: usize, nbytes: usize, comm: CommPtr) -> bool {
    allocator::with_table(|t| t.is_registered(ptr, nbytes.max(1), comm))
}

/// The communicators holding a window that contains all of `[ptr, ptr + nbytes)`.
#[pyfunction]
fn window_comms(ptr: usize, nbytes: usize) -> Vec<CommPtr> {
    allocator::with_table(|t| {
        t.find(ptr, nbytes.max(1))
            .map(|s| s.windows.iter().map(|w| w.comm).collect())
            .unwrap_or_default()
    })
}

/// `(ptr, size, device)` of the pool segment holding `[ptr, ptr + nbytes)`, if any.
#[pyfunction]
fn segment_of(ptr: usize, nbytes: usize) -> Option<(usize, usize, i32)> {
    allocator::with_table(|t| {
        t.find(ptr, nbytes.max(1))
            .map(|s| (s.ptr.addr(), s.size, s.device))
    })
}

/// Every pool segment in allocation order: `(ptr, size, device, communicators with a window
/// on it)`, read under one lock.
#[pyfunction]
fn segments() -> Vec<(usize, usize, i32, Vec<CommPtr>)> {
    allocator::with_table(|t| {
        t.segments()
            .map(|s| {
                let comms = s.windows.iter().map(|w| w.comm).collect();
                (s.ptr.addr(), s.size, s.device, comms)
            })
            .collect()
    })
}

/// `(position in allocation order, byte offset)` of `[ptr, ptr + nbytes)` inside its pool
/// segment, if any: symmetric kernels find a peer's buffer at the same position and offset.
#[pyfunction]
fn segment_position(ptr: usize, nbytes: usize) -> Option<(u64, usize)> {
    allocator::with_table(|t| t.position(ptr, nbytes.max(1)))
}

/// `(size, rank, device)` of a communicator, each read from NCCL.
#[pyfunction]
fn comm_info(py: Python<'_>, comm: CommPtr) -> PyResult<(i32, i32, i32)> {
    Ok(py.detach(|| -> crate::Result<_> {
        let lib = nccl::get()?;
        Ok((
            lib.comm_count(comm)?,
            lib.comm_user_rank(comm)?,
            lib.comm_device(comm)?,
        ))
    })?)
}

/// The reason of this thread's most recent allocator-plug failure, cleared once read.
#[pyfunction]
fn take_last_error() -> Option<String> {
    allocator::take_last_error()
}

/// Makes the free plug leave segments to the OS from now on (interpreter exit).
#[pyfunction]
fn mark_exiting() {
    allocator::mark_exiting();
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(register_pending, m)?)?;
    m.add_function(wrap_pyfunction!(allocate_for, m)?)?;
    m.add_function(wrap_pyfunction!(release_comm, m)?)?;
    m.add_function(wrap_pyfunction!(forget_comm, m)?)?;
    m.add_function(wrap_pyfunction!(defer_registration, m)?)?;
    m.add_function(wrap_pyfunction!(take_deferred, m)?)?;
    m.add_function(wrap_pyfunction!(pending_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(is_registered, m)?)?;
    m.add_function(wrap_pyfunction!(window_comms, m)?)?;
    m.add_function(wrap_pyfunction!(segment_of, m)?)?;
    m.add_function(wrap_pyfunction!(segments, m)?)?;
    m.add_function(wrap_pyfunction!(segment_position, m)?)?;
    m.add_function(wrap_pyfunction!(comm_info, m)?)?;
    m.add_function(wrap_pyfunction!(take_last_error, m)?)?;
    m.add_function(wrap_pyfunction!(mark_exiting, m)?)?;
    Ok(())
}
