//! The PyO3 surface of `symm_rs._native`. Arguments are converted here, the GIL is released
//! around anything that may block in NCCL, and `Error` becomes a Python exception in one place.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::allocator;
use crate::collective::{self, CollectiveKind, DataType, ReduceOp, Target, TensorView};
use crate::comm::{self, Communicator};
use crate::error::Error;
use crate::handles::{CommPtr, DevicePtr, StreamPtr};
use crate::nccl;
use crate::policy::RouteTable;
use crate::segments::{Scope, Tag, ALL_LANES};

mod context;

mod cp;

mod registration;

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
            Error::NullWindow { .. } => RegistrationError::new_err(message),
            Error::Cuda { .. }
            | Error::SegmentLeaked { .. }
            | Error::Usage(_)
            | Error::Timeout { .. } => SymmetricMemoryError::new_err(message),
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

/// Loads libnccl (the one already in the process first) and describes it.
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

/// Registers every pool segment of `peers` (seen from `lane`) that `comm` has not registered
/// yet, without an agreement between ranks first. Collective over its ranks. Returns how many
/// windows were made; a NULL window from NCCL makes the communicator plain (`is_plain`).
#[pyfunction]
#[pyo3(signature = (comm, peers = 0, lane = ALL_LANES))]
fn register_pending(py: Python<'_>, comm: usize, peers: u64, lane: u64) -> PyResult<usize> {
    let scope = Scope { peers, lane };
    let done = py.detach(|| allocator::register_pending(CommPtr::new(comm), scope))?;
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
fn release_comm(py: Python<'_>, comm: usize) -> PyResult<usize> {
    Ok(py.detach(|| allocator::release_comm(CommPtr::new(comm)))?)
}

/// Forgets a communicator that was destroyed without `release_comm` (no NCCL call is made).
#[pyfunction]
fn forget_comm(py: Python<'_>, comm: usize) -> usize {
    py.detach(|| allocator::forget_comm(CommPtr::new(comm)))
}

/// Postpones `comm`'s registration until `take_deferred` (a capture or NCCL group is open).
#[pyfunction]
fn defer_registration(comm: usize) {
    allocator::defer_registration(CommPtr::new(comm));
}

/// The communicators whose registration was postponed, in first-seen order, cleared.
#[pyfunction]
fn take_deferred() -> Vec<usize> {
    allocator::take_deferred()
        .into_iter()
        .map(CommPtr::addr)
        .collect()
}

/// Sizes of the segments of `peers` (seen from `lane`) that `comm` would register next.
#[pyfunction]
#[pyo3(signature = (comm, peers = 0, lane = ALL_LANES))]
fn pending_sizes(py: Python<'_>, comm: usize, peers: u64, lane: u64) -> PyResult<Vec<usize>> {
    let comm = CommPtr::new(comm);
    let device = py.detach(|| nccl::get()?.comm_device(comm))?;
    let scope = Scope { peers, lane };
    Ok(allocator::with_table(|t| {
        t.pending(comm, device, scope).map(|s| s.size).collect()
    }))
}

/// Whether `[ptr, ptr + nbytes)` lies inside one window `comm` holds.
#[pyfunction]
fn is_registered(ptr: usize, nbytes: usize, comm: usize) -> bool {
    allocator::with_table(|t| t.is_registered(ptr, nbytes.max(1), CommPtr::new(comm)))
}

/// The communicators holding a window that contains all of `[ptr, ptr + nbytes)`.
#[pyfunction]
fn window_comms(ptr: usize, nbytes: usize) -> Vec<usize> {
    allocator::with_table(|t| {
        t.find(ptr, nbytes.max(1))
            .map(|s| s.windows.iter().map(|w| w.comm.addr()).collect())
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
fn segments() -> Vec<(usize, usize, i32, Vec<usize>)> {
    allocator::with_table(|t| {
        t.segments()
            .map(|s| {
                let comms = s.windows.iter().map(|w| w.comm.addr()).collect();
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
fn comm_info(py: Python<'_>, comm: usize) -> PyResult<(i32, i32, i32)> {
    let comm = CommPtr::new(comm);
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

/// What one communicator holds in the symmetric pool.
#[pyclass(name = "CommStats", module = "symm_rs._native", frozen, get_all)]
#[derive(Clone)]
struct PyCommStats {
    /// The `ncclComm_t` address.
    comm: usize,
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
            self.comm,
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

    /// `stats["windows_registered"]`: the dict-style access of earlier releases, kept.
    fn __getitem__<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        self.as_dict(py)?
            .get_item(key)?
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(key.to_owned()))
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
                comm: c.comm.addr(),
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

/// torch's dtype objects are singletons, so each is named once (by `str`) and afterwards
/// found by identity. The strong references keep an address from being reused by another
/// object; the cap bounds what odd duck-typed dtypes can add.
static DTYPES: Mutex<Vec<(Py<PyAny>, DataType)>> = Mutex::new(Vec::new());
const DTYPE_CACHE_CAP: usize = 64;

fn data_type(dtype: &Bound<'_, PyAny>) -> PyResult<DataType> {
    let cached = |cache: &Vec<(Py<PyAny>, DataType)>| {
        cache
            .iter()
            .find(|(known, _)| known.as_ptr() == dtype.as_ptr())
            .map(|(_, d)| *d)
    };
    if let Some(found) = cached(&DTYPES.lock().unwrap_or_else(|p| p.into_inner())) {
        return Ok(found);
    }
    // Not under the lock: `str` runs Python code.
    let found = DataType::from_torch_name(&dtype.str()?.to_string())?;
    let mut cache = DTYPES.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() < DTYPE_CACHE_CAP && cached(&cache).is_none() {
        cache.push((dtype.clone().unbind(), found));
    }
    Ok(found)
}

/// `torch.Tensor`, taken once. The pointer NCCL is given comes from the tensor, so only a real
/// tensor (or a subclass) may supply it: an object that merely has a tensor's methods could
/// name any address.
static TENSOR_TYPE: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();

fn require_tensor(name: &str, tensor: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tensor.py();
    let tensor_type = TENSOR_TYPE.get_or_try_init(py, || -> PyResult<_> {
        Ok(py
            .import("torch")?
            .getattr("Tensor")?
            .cast_into::<pyo3::types::PyType>()?
            .unbind())
    })?;
    if tensor.is_instance(tensor_type.bind(py))? {
        return Ok(());
    }
    let type_name = tensor
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string());
    Err(PyTypeError::new_err(format!(
        "{name} must be a torch.Tensor, got {type_name}"
    )))
}

/// Reads what a collective needs from a torch tensor in one pass of five cheap calls, after
/// checking that it is one.
fn tensor_view(name: &str, tensor: &Bound<'_, PyAny>) -> PyResult<TensorView> {
    let py = tensor.py();
    require_tensor(name, tensor)?;
    let not_a_tensor = |e: PyErr| {
        if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) {
            let type_name = tensor
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string());
            PyTypeError::new_err(format!("{name} must be a torch.Tensor, got {type_name}"))
        } else {
            e
        }
    };
    let ptr: usize = tensor
        .call_method0(intern!(py, "data_ptr"))
        .map_err(not_a_tensor)?
        .extract()?;
    let device: i64 = tensor
        .call_method0(intern!(py, "get_device"))
        .map_err(not_a_tensor)?
        .extract()?;
    Ok(TensorView {
        ptr: DevicePtr::new(ptr),
        numel: tensor.call_method0(intern!(py, "numel"))?.extract()?,
        dtype: data_type(&tensor.getattr(intern!(py, "dtype"))?)?,
        // torch's get_device(): the CUDA index, or -1 for a CPU tensor.
        device: i32::try_from(device).ok().filter(|d| *d >= 0),
        contiguous: tensor
            .call_method0(intern!(py, "is_contiguous"))?
            .extract()?,
    })
}

/// What a launch needs from Python: the collective and both tensors, read and checked.
fn launch_args(
    kind: &str,
    op: &str,
    out: &Bound<'_, PyAny>,
    inp: &Bound<'_, PyAny>,
) -> PyResult<(CollectiveKind, TensorView, TensorView)> {
    Ok((
        collective_kind(kind, op)?,
        tensor_view("out", out)?,
        tensor_view("inp", inp)?,
    ))
}

/// `"all_gather"`, `"all_reduce"` or `"reduce_scatter"` with its reduction.
fn collective_kind(kind: &str, op: &str) -> PyResult<CollectiveKind> {
    match kind {
        "all_gather" => Ok(CollectiveKind::AllGather),
        "all_reduce" => Ok(CollectiveKind::AllReduce(ReduceOp::parse(op)?)),
        "reduce_scatter" => Ok(CollectiveKind::ReduceScatter(ReduceOp::parse(op)?)),
        other => Err(PyValueError::new_err(format!(
            "kind must be 'all_gather', 'all_reduce' or 'reduce_scatter'; got {other:?}"
        ))),
    }
}

/// Runs one collective on any communicator (for symm_rs's own exchanges and groups it does not
/// own): the buffers are checked against the communicator's size and device first.
/// `stream` is `(cudaStream_t, device index)`.
#[pyfunction]
#[pyo3(signature = (comm, kind, out, inp, stream, op = "sum"))]
fn run_collective(
    py: Python<'_>,
    comm: usize,
    kind: &str,
    out: &Bound<'_, PyAny>,
    inp: &Bound<'_, PyAny>,
    stream: (usize, i32),
    op: &str,
) -> PyResult<()> {
    let (kind, out, inp) = launch_args(kind, op, out, inp)?;
    let comm = CommPtr::new(comm);
    Ok(py.detach(|| -> crate::Result<()> {
        let lib = nccl::get()?;
        let target = Target {
            comm,
            nranks: lib.comm_count(comm)? as usize,
            device: lib.comm_device(comm)?,
            stream: StreamPtr::new(stream.0),
            stream_device: Some(stream.1),
        };
        let call = collective::plan(kind, &out, &inp, target, lib.version())?;
        // SAFETY: `plan` checked the buffers against the communicator read from NCCL itself
        // (after `comm_count` checked the address is readable); the caller keeps the tensors
        // alive until the stream has run the collective.
        unsafe { lib.launch(&call) }
    })?)
}

/// The Rust-owned NCCL communicator behind `symm_rs.Communicator`.
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
        nccl::get()?;
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
        Ok(self.0.comm()?.addr())
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

    /// `ncclCommAbort`: frees it without waiting for peers or pending work (a peer failed);
    /// its windows are forgotten. Idempotent.
    fn abort(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.0.abort())?)
    }

    /// Checks `out`/`inp` against this communicator and enqueues the collective on `stream`,
    /// given as `(cudaStream_t, device index)`. Returns where it went: `"main"`, `"twin"` (the
    /// policy's window-less twin), or `"stage"` when nothing was launched because the call
    /// needs a staging output (see `set_stage_unaligned`).
    #[pyo3(signature = (kind, out, inp, stream, op = "sum"))]
    fn run(
        &self,
        py: Python<'_>,
        kind: &str,
        out: &Bound<'_, PyAny>,
        inp: &Bound<'_, PyAny>,
        stream: (usize, i32),
        op: &str,
    ) -> PyResult<&'static str> {
        let (kind, out, inp) = launch_args(kind, op, out, inp)?;
        let launch = py.detach(|| {
            self.0
                .run(kind, &out, &inp, StreamPtr::new(stream.0), Some(stream.1))
        })?;
        Ok(launch.as_str())
    }

    /// Whether `run` answers `"stage"` for 16-bit all-gathers and reduce-scatters with an odd
    /// per-rank count on this communicator's windows (an NCCL with the unaligned LL defect).
    fn set_stage_unaligned(&self, on: bool) {
        self.0.set_stage_unaligned(on);
    }

    /// Creates the size policy's window-less twin, `ncclCommSplit(comm, 0, rank)`
    /// (idempotent; collective). It routes nothing until `set_route`.
    fn enable_twin(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.0.enable_twin())?)
    }

    /// Sends calls of `(collective, low, high)` bytes per rank (`[low, high)`, `high` None for
    /// unbounded) to the twin; replaces the previous table.
    fn set_route(&self, ranges: Vec<(String, usize, Option<usize>)>) -> PyResult<()> {
        Ok(self.0.set_route(RouteTable::new(&ranges)?)?)
    }

    /// The twin's `ncclComm_t` address, or None without the policy.
    #[getter]
    fn twin_comm(&self) -> PyResult<Option<usize>> {
        Ok(self.0.twin_comm()?.map(CommPtr::addr))
    }
}

impl Drop for PyNcclCommunicator {
    fn drop(&mut self) {
        // Destroying a communicator can wait on the GPU: never with the GIL held, or every
        // other Python thread stops with it. Errors cannot surface here; `close()` shows them.
        let communicator = &self.0;
        Python::attach(|py| py.detach(|| drop(communicator.close())));
    }
}

/// `ncclGroupStart()`: collectives until `group_end` are launched together.
#[pyfunction]
fn group_start() -> PyResult<()> {
    Ok(nccl::get()?.group_start()?)
}

/// `ncclGroupEnd()`.
#[pyfunction]
fn group_end(py: Python<'_>) -> PyResult<()> {
    Ok(py.detach(|| nccl::get()?.group_end())?)
}

/// Whether this thread is inside `group_start`/`group_end`.
#[pyfunction]
fn in_group() -> bool {
    nccl::in_group()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("LIBRARY_ENV", nccl::LIBRARY_ENV)?;
    let dtype_names: Vec<&str> = DataType::TORCH_NAMES.iter().map(|(n, _)| *n).collect();
    m.add("NCCL_DTYPE_NAMES", PyTuple::new(py, dtype_names)?)?;
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
    m.add_function(wrap_pyfunction!(allocate_for, m)?)?;
    m.add_function(wrap_pyfunction!(release_comm, m)?)?;
    m.add_function(wrap_pyfunction!(forget_comm, m)?)?;
    m.add_function(wrap_pyfunction!(defer_registration, m)?)?;
    m.add_function(wrap_pyfunction!(take_deferred, m)?)?;
    m.add_function(wrap_pyfunction!(pending_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(is_registered, m)?)?;
    m.add_function(wrap_pyfunction!(segment_of, m)?)?;
    m.add_function(wrap_pyfunction!(window_comms, m)?)?;
    m.add_function(wrap_pyfunction!(context::innermost_comm, m)?)?;
    registration::add_to(m)?;
    m.add_function(wrap_pyfunction!(segment_position, m)?)?;
    m.add_function(wrap_pyfunction!(segments, m)?)?;
    m.add_function(wrap_pyfunction!(comm_info, m)?)?;
    m.add_function(wrap_pyfunction!(take_last_error, m)?)?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(mark_exiting, m)?)?;
    m.add_function(wrap_pyfunction!(run_collective, m)?)?;
    m.add_function(wrap_pyfunction!(group_start, m)?)?;
    m.add_function(wrap_pyfunction!(group_end, m)?)?;
    m.add_function(wrap_pyfunction!(in_group, m)?)?;
    m.add_function(wrap_pyfunction!(context::set_graph_pool_id, m)?)?;
    m.add_function(wrap_pyfunction!(context::graph_pool_id, m)?)?;
    m.add_function(wrap_pyfunction!(context::pools_changed, m)?)?;
    m.add_function(wrap_pyfunction!(context::forget_group, m)?)?;
    m.add_class::<context::UseSymmetricMemory>()?;
    m.add_function(wrap_pyfunction!(cp::cp_all_gather, m)?)?;
    m.add_function(wrap_pyfunction!(cp::cp_plan, m)?)?;
    m.add_class::<PyNcclCommunicator>()?;
    m.add_class::<PyStats>()?;
    m.add_class::<PyCommStats>()?;
    Ok(())
}
