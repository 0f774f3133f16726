//! The PyO3 surface of `symm_rs._native`. Arguments are converted here, the GIL is released
//! around anything that may block in NCCL, and `Error` becomes a Python exception in one place.

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::allocator;
use crate::comm::{self, Communicator, ReduceOp};
use crate::error::Error;
use crate::nccl;

create_exception!(
    symm_rs,
    SymmetricMemoryError,
    PyRuntimeError,
    "Base class of the errors symm_rs raises about NCCL and symmetric memory."
);
create_exception!(
    symm_rs,
    NcclLibraryError,
    SymmetricMemoryError,
    "libnccl is missing, too old, or lacks a symbol symm_rs needs."
);
create_exception!(
    symm_rs,
    NcclError,
    SymmetricMemoryError,
    "An NCCL call returned an error."
);
create_exception!(
    symm_rs,
    RegistrationError,
    SymmetricMemoryError,
    "A symmetric window could not be registered (NULL window, or ranks that disagree)."
);

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        let message = error.to_string();
        match error {
            Error::LibraryNotFound { .. }
            | Error::MissingSymbol { .. }
            | Error::LibraryTooOld { .. } => NcclLibraryError::new_err(message),
            Error::Nccl { .. } => NcclError::new_err(message),
            Error::NullWindow { .. } | Error::RankMismatch(_) => {
                RegistrationError::new_err(message)
            }
            Error::Cuda { .. } | Error::SegmentLeaked { .. } => {
                SymmetricMemoryError::new_err(message)
            }
            Error::InvalidType(_) => PyTypeError::new_err(message),
            Error::InvalidArgument(_) | Error::Closed(_) => PyValueError::new_err(message),
        }
    }
}

fn library_info<'py>(py: Python<'py>, lib: &nccl::Nccl) -> PyResult<Bound<'py, PyDict>> {
    let info = PyDict::new(py);
    let version = lib.version();
    info.set_item("path", lib.path().to_string_lossy().into_owned())?;
    info.set_item("origin", lib.origin().as_str())?;
    info.set_item("version", (version.major, version.minor, version.patch))?;
    info.set_item("version_code", version.code())?;
    let windows = lib.require_windows();
    info.set_item("windows_supported", windows.is_ok())?;
    info.set_item("windows_problem", windows.err().map(|e| e.to_string()))?;
    info.set_item("notes", lib.notes().to_vec())?;
    Ok(info)
}

/// Loads libnccl (the one already in the process first; see DESIGN.md) and describes it.
#[pyfunction]
#[pyo3(signature = (wheel_candidates = Vec::new()))]
fn load_nccl(py: Python<'_>, wheel_candidates: Vec<PathBuf>) -> PyResult<Bound<'_, PyDict>> {
    let lib = py.detach(|| nccl::load(&wheel_candidates))?;
    library_info(py, lib)
}

/// Opens one libnccl by path, independently of the process-wide one, and describes it.
#[pyfunction]
fn probe_nccl(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let lib = nccl::Nccl::open_path(&path)?;
    let info = library_info(py, &lib);
    // The probe handle stays open: unloading a library that may have started threads is unsafe.
    std::mem::forget(lib);
    info
}

/// Registers every pool segment `comm` has not registered yet. Collective over its ranks.
#[pyfunction]
fn register_pending(py: Python<'_>, comm: usize) -> PyResult<usize> {
    Ok(py.detach(|| allocator::register_pending(comm))?)
}

/// Deregisters every window `comm` holds; call before the communicator is destroyed.
#[pyfunction]
fn release_comm(py: Python<'_>, comm: usize) -> PyResult<usize> {
    Ok(py.detach(|| allocator::release_comm(comm))?)
}

/// Sizes of the segments `comm` would register next, in order.
#[pyfunction]
fn pending_sizes(comm: usize) -> PyResult<Vec<usize>> {
    let device = nccl::get()?.comm_device(comm)?;
    Ok(allocator::with_table(|t| {
        t.pending(comm, device).map(|s| s.size).collect()
    }))
}

/// Whether `[ptr, ptr + nbytes)` lies inside one window `comm` holds.
#[pyfunction]
fn is_registered(ptr: usize, nbytes: usize, comm: usize) -> bool {
    allocator::with_table(|t| t.is_registered(ptr, nbytes.max(1), comm))
}

/// `(ptr, size, device)` of the pool segment holding `[ptr, ptr + nbytes)`, if any.
#[pyfunction]
fn segment_of(ptr: usize, nbytes: usize) -> Option<(usize, usize, i32)> {
    allocator::with_table(|t| {
        t.find(ptr, nbytes.max(1))
            .map(|s| (s.ptr, s.size, s.device))
    })
}

/// `(position in allocation order, byte offset)` of `[ptr, ptr + nbytes)` inside its pool
/// segment, if any: symmetric kernels find a peer's buffer at the same position and offset.
#[pyfunction]
fn segment_position(ptr: usize, nbytes: usize) -> Option<(usize, usize)> {
    allocator::with_table(|t| t.position(ptr, nbytes.max(1)))
}

#[pyfunction]
fn comm_size(py: Python<'_>, comm: usize) -> PyResult<i32> {
    Ok(py.detach(|| nccl::get()?.comm_count(comm))?)
}

#[pyfunction]
fn comm_rank(py: Python<'_>, comm: usize) -> PyResult<i32> {
    Ok(py.detach(|| nccl::get()?.comm_user_rank(comm))?)
}

#[pyfunction]
fn comm_device(py: Python<'_>, comm: usize) -> PyResult<i32> {
    Ok(py.detach(|| nccl::get()?.comm_device(comm))?)
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

/// Segments, bytes, windows per communicator, and failure counts.
#[pyfunction]
fn stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let (segments, bytes, counters, comms) = allocator::with_table(|t| {
        let segments: Vec<(usize, usize, i32, usize)> = t
            .segments()
            .iter()
            .map(|s| (s.ptr, s.size, s.device, s.windows.len()))
            .collect();
        (segments, t.total_bytes(), t.counters(), t.comm_summaries())
    });
    let failures = allocator::failure_counts();
    let out = PyDict::new(py);
    out.set_item("segments", segments.len())?;
    out.set_item("bytes", bytes)?;
    out.set_item("segment_list", PyList::new(py, segments)?)?;
    let per_comm = PyDict::new(py);
    for summary in comms {
        let entry = PyDict::new(py);
        entry.set_item("device", summary.device)?;
        entry.set_item("windows", summary.windows)?;
        entry.set_item("window_bytes", summary.window_bytes)?;
        entry.set_item("pending_segments", summary.pending_segments)?;
        per_comm.set_item(summary.comm, entry)?;
    }
    out.set_item("communicators", per_comm)?;
    out.set_item("segments_tracked", counters.segments_tracked)?;
    out.set_item("segments_freed", counters.segments_untracked)?;
    out.set_item("windows_registered", counters.windows_registered)?;
    out.set_item("windows_deregistered", counters.windows_deregistered)?;
    out.set_item("deregistration_failures", counters.deregistration_failures)?;
    out.set_item("alloc_failures", failures.alloc)?;
    out.set_item("free_failures", failures.free)?;
    out.set_item("leaked_segments", failures.leaked_segments)?;
    out.set_item("last_error", allocator::last_error_any_thread())?;
    Ok(out)
}

/// The Rust-owned NCCL communicator behind `symm_rs.Communicator`. Arguments are addresses and
/// NCCL codes that `symm_rs.comm` has already validated.
#[pyclass(name = "NcclCommunicator", module = "symm_rs._native", frozen)]
struct PyNcclCommunicator(Communicator);

#[pymethods]
impl PyNcclCommunicator {
    /// Joins the communicator `unique_id` names, as `rank` of `size`, on CUDA device `device`.
    #[new]
    fn new(
        py: Python<'_>,
        unique_id: Vec<u8>,
        rank: i32,
        size: i32,
        device: i32,
    ) -> PyResult<Self> {
        crate::nccl::get()?;
        Ok(Self(py.detach(|| {
            Communicator::new(&unique_id, rank, size, device)
        })?))
    }

    /// A fresh 128-byte NCCL unique id (rank 0 makes it and shares it).
    #[staticmethod]
    fn unique_id(py: Python<'_>) -> PyResult<Vec<u8>> {
        Ok(py.detach(comm::unique_id)?)
    }

    #[getter]
    fn comm(&self) -> PyResult<usize> {
        Ok(self.0.comm()?)
    }
    #[getter]
    fn rank(&self) -> PyResult<i32> {
        Ok(self.0.rank()?)
    }
    #[getter]
    fn size(&self) -> PyResult<i32> {
        Ok(self.0.size()?)
    }
    #[getter]
    fn device(&self) -> PyResult<i32> {
        Ok(self.0.device()?)
    }
    #[getter]
    fn closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Deregisters this communicator's windows and destroys it (idempotent; collective).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.0.close())?)
    }

    fn all_gather(
        &self,
        py: Python<'_>,
        send: usize,
        recv: usize,
        count: usize,
        dtype: i32,
        stream: usize,
    ) -> PyResult<()> {
        Ok(py.detach(|| self.0.all_gather(send, recv, count, dtype, stream))?)
    }

    #[allow(clippy::too_many_arguments)]
    fn all_reduce(
        &self,
        py: Python<'_>,
        send: usize,
        recv: usize,
        count: usize,
        dtype: i32,
        op: &str,
        stream: usize,
    ) -> PyResult<()> {
        let op = ReduceOp::parse(op)?;
        Ok(py.detach(|| self.0.all_reduce(send, recv, count, dtype, op, stream))?)
    }

    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        send: usize,
        recv: usize,
        count: usize,
        dtype: i32,
        op: &str,
        stream: usize,
    ) -> PyResult<()> {
        let op = ReduceOp::parse(op)?;
        Ok(py.detach(|| self.0.reduce_scatter(send, recv, count, dtype, op, stream))?)
    }
}

/// `ncclAllGather` on any communicator, for symm_rs's own small control exchanges (the
/// cross-rank check before registration). Buffers are addresses of device tensors the caller
/// keeps alive; `comm` is checked to be readable memory first.
#[pyfunction]
fn all_gather_on(
    py: Python<'_>,
    comm: usize,
    send: usize,
    recv: usize,
    count: usize,
    dtype: i32,
    stream: usize,
) -> PyResult<()> {
    let lib = crate::nccl::get()?;
    lib.comm_count(comm)?; // validates the address before NCCL dereferences it
    let call = crate::nccl::Collective::new(send, recv, count, dtype, comm, stream);
    // SAFETY: symm_rs.memory passes contiguous int64 CUDA tensors of `count` and
    // `count * size` elements on the communicator's device, and the current stream.
    Ok(py.detach(|| unsafe { lib.all_gather(call) })?)
}

/// `ncclGroupStart()`: collectives until `group_end` are launched together.
#[pyfunction]
fn group_start() -> PyResult<()> {
    Ok(crate::nccl::get()?.group_start()?)
}

/// `ncclGroupEnd()`.
#[pyfunction]
fn group_end(py: Python<'_>) -> PyResult<()> {
    Ok(py.detach(|| crate::nccl::get()?.group_end())?)
}

/// Checks an op name (`sum`, `prod`, `max`, `min`, `avg`) without running anything.
#[pyfunction]
fn check_reduce_op(op: &str) -> PyResult<()> {
    ReduceOp::parse(op)?;
    Ok(())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("LIBRARY_ENV", nccl::LIBRARY_ENV)?;
    m.add(
        "SymmetricMemoryError",
        py.get_type::<SymmetricMemoryError>(),
    )?;
    m.add("NcclLibraryError", py.get_type::<NcclLibraryError>())?;
    m.add("NcclError", py.get_type::<NcclError>())?;
    m.add("RegistrationError", py.get_type::<RegistrationError>())?;
    m.add_function(wrap_pyfunction!(load_nccl, m)?)?;
    m.add_function(wrap_pyfunction!(probe_nccl, m)?)?;
    m.add_function(wrap_pyfunction!(register_pending, m)?)?;
    m.add_function(wrap_pyfunction!(release_comm, m)?)?;
    m.add_function(wrap_pyfunction!(pending_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(is_registered, m)?)?;
    m.add_function(wrap_pyfunction!(segment_of, m)?)?;
    m.add_function(wrap_pyfunction!(segment_position, m)?)?;
    m.add_function(wrap_pyfunction!(comm_size, m)?)?;
    m.add_function(wrap_pyfunction!(comm_rank, m)?)?;
    m.add_function(wrap_pyfunction!(comm_device, m)?)?;
    m.add_function(wrap_pyfunction!(take_last_error, m)?)?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(mark_exiting, m)?)?;
    m.add_function(wrap_pyfunction!(all_gather_on, m)?)?;
    m.add_function(wrap_pyfunction!(group_start, m)?)?;
    m.add_function(wrap_pyfunction!(group_end, m)?)?;
    m.add_function(wrap_pyfunction!(check_reduce_op, m)?)?;
    m.add_class::<PyNcclCommunicator>()?;
    Ok(())
}
