//! `stats()`: the segment table's bookkeeping as typed objects.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::deprecated_item;
use crate::allocator;
use crate::handles::CommPtr;

/// What one communicator holds in the symmetric pool.
#[pyclass(name = "CommStats", module = "symm_rs._native", frozen, get_all)]
#[derive(Clone)]
struct PyCommStats {
    /// The `ncclComm_t` address.
    comm: CommPtr,
    /// Its CUDA device.
    device: i32,
    /// Windows it holds.
    windows: usize,
    /// Bytes those windows cover.
    window_bytes: usize,
    /// Segments of its device it has not registered yet.
    pending_segments: usize,
    /// It registers nothing (NCCL answered with a NULL window, or cannot run symmetric
    /// kernels on it): its ranks use the pool as plain memory.
    plain: bool,
}

#[pymethods]
impl PyCommStats {
    fn __repr__(&self) -> String {
        format!(
            "CommStats(comm={:#x}, device={}, windows={}, window_bytes={}, pending_segments={}, \
             plain={})",
            self.comm.addr(),
            self.device,
            self.windows,
            self.window_bytes,
            self.pending_segments,
            if self.plain { "True" } else { "False" }
        )
    }
}

/// The symmetric pool's bookkeeping: read from the segment table, no pool snapshot.
#[pyclass(name = "Stats", module = "symm_rs._native", frozen, get_all)]
struct PyStats {
    /// Pool segments alive (each one `ncclMemAlloc` allocation).
    segments: usize,
    /// Bytes those segments hold.
    bytes: usize,
    /// One entry per communicator that registered or was asked to.
    communicators: Vec<PyCommStats>,
    /// Segments allocated since the process started.
    segments_tracked: u64,
    /// Segments freed since the process started.
    segments_freed: u64,
    windows_registered: u64,
    windows_deregistered: u64,
    /// Windows dropped without an NCCL call because their communicator was destroyed.
    windows_forgotten: u64,
    deregistration_failures: u64,
    /// Communicators whose registration waits for the end of a capture or NCCL group.
    deferred_registrations: usize,
    /// `symm_rs_alloc` calls that returned NULL.
    alloc_failures: u64,
    free_failures: u64,
    /// Segments kept (not freed) because a window on them could not be deregistered.
    leaked_segments: u64,
    /// The most recent plug failure on any thread.
    last_error: Option<String>,
}

#[pymethods]
impl PyStats {
    /// The same fields as a plain dict (for logging and JSON); `communicators` maps each
    /// communicator address to its figures.
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        out.set_item("segments", self.segments)?;
        out.set_item("bytes", self.bytes)?;
        let comms = PyDict::new(py);
        for c in &self.communicators {
            let entry = PyDict::new(py);
            entry.set_item("device", c.device)?;
            entry.set_item("windows", c.windows)?;
            entry.set_item("window_bytes", c.window_bytes)?;
            entry.set_item("pending_segments", c.pending_segments)?;
            entry.set_item("plain", c.plain)?;
            comms.set_item(c.comm, entry)?;
        }
        out.set_item("communicators", comms)?;
        out.set_item("segments_tracked", self.segments_tracked)?;
        out.set_item("segments_freed", self.segments_freed)?;
        out.set_item("windows_registered", self.windows_registered)?;
        out.set_item("windows_deregistered", self.windows_deregistered)?;
        out.set_item("windows_forgotten", self.windows_forgotten)?;
        out.set_item("deregistration_failures", self.deregistration_failures)?;
        out.set_item("deferred_registrations", self.deferred_registrations)?;
        out.set_item("alloc_failures", self.alloc_failures)?;
        out.set_item("free_failures", self.free_failures)?;
        out.set_item("leaked_segments", self.leaked_segments)?;
        out.set_item("last_error", self.last_error.clone())?;
        Ok(out)
    }

    /// `stats["windows_registered"]`: the dict of earlier releases, deprecated for one release.
    fn __getitem__<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        deprecated_item(self.as_dict(py)?, "stats()", key)
    }

    fn __repr__(&self) -> String {
        format!(
            "Stats(segments={}, bytes={}, communicators={}, windows_registered={}, \
             deferred_registrations={})",
            self.segments,
            self.bytes,
            self.communicators.len(),
            self.windows_registered,
            self.deferred_registrations
        )
    }
}

/// Segments, bytes, windows per communicator, and failure counts.
#[pyfunction]
fn stats() -> PyStats {
    let (segments, bytes, counters, comms) =
        allocator::with_table(|t| (t.len(), t.total_bytes(), t.counters(), t.comm_summaries()));
    let failures = allocator::failure_counts();
    PyStats {
        segments,
        bytes,
        communicators: comms
            .into_iter()
            .map(|c| PyCommStats {
                comm: c.comm,
                device: c.device,
                windows: c.windows,
                window_bytes: c.window_bytes,
                pending_segments: c.pending_segments,
                plain: c.plain,
            })
            .collect(),
        segments_tracked: counters.segments_tracked,
        segments_freed: counters.segments_untracked,
        windows_registered: counters.windows_registered,
        windows_deregistered: counters.windows_deregistered,
        windows_forgotten: counters.windows_forgotten,
        deregistration_failures: counters.deregistration_failures,
        deferred_registrations: allocator::deferred_count(),
        alloc_failures: failures.alloc,
        free_failures: failures.free,
        leaked_segments: failures.leaked_segments,
        last_error: allocator::last_error_any_thread(),
    }
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyStats>()?;
    m.add_class::<PyCommStats>()?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    Ok(())
}
