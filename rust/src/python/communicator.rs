//! The Rust-owned communicator, collectives on any communicator, and NCCL groups.

use pyo3::prelude::*;

use super::handles::Stream;
use super::tables::PyRouteTable;
use super::tensors::launch_args;
use crate::collective::{self, Target};
use crate::comm::{self, Communicator};
use crate::handles::CommPtr;
use crate::nccl;

/// Runs one collective on any communicator (for symm_rs's own exchanges and groups it does not
/// own): the buffers are checked against the communicator's size and device first.
/// `stream` is `(cudaStream_t, device index)`.
#[pyfunction]
#[pyo3(signature = (comm, kind, out, inp, stream, op = "sum"))]
fn run_collective(
    py: Python<'_>,
    comm: CommPtr,
    kind: &str,
    out: &Bound<'_, PyAny>,
    inp: &Bound<'_, PyAny>,
    stream: Stream,
    op: &str,
) -> PyResult<()> {
    let (kind, out, inp) = launch_args(kind, op, out, inp)?;
    Ok(py.detach(|| -> crate::Result<()> {
        let lib = nccl::get()?;
        let target = Target {
            comm,
            nranks: lib.comm_count(comm)? as usize,
            device: lib.comm_device(comm)?,
            stream: stream.ptr,
            stream_device: Some(stream.device),
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
    fn comm(&self) -> PyResult<CommPtr> {
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
        stream: Stream,
        op: &str,
    ) -> PyResult<&'static str> {
        let (kind, out, inp) = launch_args(kind, op, out, inp)?;
        let launch = py.detach(|| {
            self.0
                .run(kind, &out, &inp, stream.ptr, Some(stream.device))
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

    /// Sends the calls `table` routes to the twin there; replaces the previous table.
    fn set_route(&self, table: &PyRouteTable) -> PyResult<()> {
        Ok(self.0.set_route(table.table().clone())?)
    }

    /// The twin's `ncclComm_t` address, or None without the policy.
    #[getter]
    fn twin_comm(&self) -> PyResult<Option<CommPtr>> {
        Ok(self.0.twin_comm()?)
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

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNcclCommunicator>()?;
    m.add_function(wrap_pyfunction!(run_collective, m)?)?;
    m.add_function(wrap_pyfunction!(group_start, m)?)?;
    m.add_function(wrap_pyfunction!(group_end, m)?)?;
    m.add_function(wrap_pyfunction!(in_group, m)?)?;
    Ok(())
}
