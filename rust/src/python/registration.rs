//! Registration as the Python layer drives it: plan (pin the segments and fix the list), let
//! the ranks agree on it, then register exactly that plan; the watchdog's view of what is
//! running; and the gate that keeps pool destruction away from open allocation routes.

use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::allocator::{self, Planned};
use crate::handles::CommPtr;
use crate::nccl;
use crate::routes::GATE;
use crate::segments::{Scope, Tag, ALL_LANES};

/// A registration planned for one communicator: the segment sizes every rank must agree on
/// before `register()`. Dropping it (or `cancel()`) leaves the segments pending.
#[pyclass(name = "RegistrationPlan", module = "symm_rs._native", frozen)]
pub(super) struct RegistrationPlan {
    plan: Mutex<Option<Planned>>,
    comm: CommPtr,
    peers: u64,
    sizes: Vec<usize>,
}

impl RegistrationPlan {
    fn take(&self) -> Option<Planned> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[pymethods]
impl RegistrationPlan {
    /// Sizes of the planned segments, in registration order.
    #[getter]
    fn sizes(&self) -> Vec<usize> {
        self.sizes.clone()
    }

    #[getter]
    fn comm(&self) -> CommPtr {
        self.comm
    }

    /// Registers exactly the planned segments (collective; the GIL is released meanwhile).
    /// Returns `(windows made, NCCL answered with a NULL window)`.
    fn register(&self, py: Python<'_>) -> PyResult<(usize, bool)> {
        let plan = self.take().ok_or_else(|| {
            PyValueError::new_err("this registration plan was already registered or cancelled")
        })?;
        let peers = self.peers;
        let done = py.detach(move || allocator::register_planned(plan, peers))?;
        Ok((done.windows, done.null_window))
    }

    /// Gives the plan up; its segments stay pending. Idempotent.
    fn cancel(&self, py: Python<'_>) {
        let plan = self.take();
        py.detach(move || drop(plan));
    }

    fn __len__(&self) -> usize {
        self.sizes.len()
    }
}

/// Plans the registration of every segment of `peers` (seen from `lane`) that `comm` has not
/// registered; `None` when there is nothing to register. Waits, boundedly, while another
/// registration of `comm` runs.
#[pyfunction]
#[pyo3(signature = (comm, peers = 0, lane = ALL_LANES))]
pub(super) fn plan_registration(
    py: Python<'_>,
    comm: CommPtr,
    peers: u64,
    lane: u64,
) -> PyResult<Option<RegistrationPlan>> {
    let scope = Scope { peers, lane };
    let plan = py.detach(|| allocator::plan_registration(comm, scope))?;
    Ok(plan.map(|plan| {
        let sizes = plan.plan().sizes();
        RegistrationPlan {
            plan: Mutex::new(Some(plan)),
            comm,
            peers,
            sizes,
        }
    }))
}

/// Whether an exit on `comm` from `lane` has nothing to register.
#[pyfunction]
#[pyo3(signature = (comm, lane = ALL_LANES))]
pub(super) fn is_up_to_date(comm: CommPtr, lane: u64) -> bool {
    allocator::is_up_to_date(comm, lane)
}

/// From now on `comm` registers nothing: its ranks use the pool as plain memory.
#[pyfunction]
pub(super) fn make_plain(py: Python<'_>, comm: CommPtr) -> PyResult<()> {
    Ok(py.detach(|| allocator::make_plain(comm))?)
}

/// Whether `comm` registers nothing any more.
#[pyfunction]
pub(super) fn is_plain(comm: CommPtr) -> bool {
    allocator::with_table(|t| t.is_plain(comm))
}

/// NCCL's own answer to whether `comm` can run symmetric kernels
/// (`ncclCommQueryProperties`), or `None` where this NCCL cannot say.
#[pyfunction]
pub(super) fn symmetric_support(py: Python<'_>, comm: CommPtr) -> PyResult<Option<bool>> {
    Ok(py.detach(|| nccl::get()?.symmetric_support(comm))?)
}

/// Registrations NCCL is running now: `(comm, peer set, sizes, seconds running, segments
/// entered, OS thread id)`, oldest first.
#[pyfunction]
pub(super) fn registrations_in_progress() -> Vec<(CommPtr, u64, Vec<usize>, f64, usize, u64)> {
    allocator::registrations_in_progress()
        .into_iter()
        .map(|r| {
            let seconds = r.started.elapsed().as_secs_f64();
            (r.comm, r.peers, r.sizes, seconds, r.entered, r.thread)
        })
        .collect()
}

/// How long symm_rs's own waits last (`SYMM_RS_TIMEOUT`): another registration of the same
/// communicator, a segment being registered, a pool being destroyed.
#[pyfunction]
pub(super) fn set_wait_limit(seconds: f64) -> PyResult<()> {
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(PyValueError::new_err(format!(
            "the wait limit must be a finite number of seconds > 0; got {seconds}"
        )));
    }
    allocator::set_wait_limit(Duration::from_secs_f64(seconds));
    Ok(())
}

/// Seals the pool of `(peers, lane)`: a new segment for it fails at once, saying `note`.
#[pyfunction]
pub(super) fn seal_pool(peers: u64, lane: u64, note: String) {
    allocator::seal(Tag { peers, lane }, note);
}

/// Lets the pool of `(peers, lane)` grow again; returns whether it was sealed.
#[pyfunction]
pub(super) fn unseal_pool(peers: u64, lane: u64) -> bool {
    allocator::unseal(Tag { peers, lane })
}

/// Counts an allocation route about to begin; waits (boundedly, GIL released) while a pool is
/// being destroyed.
#[pyfunction]
pub(super) fn route_opened(py: Python<'_>) -> PyResult<()> {
    open_route(py)
}

pub(super) fn open_route(py: Python<'_>) -> PyResult<()> {
    if GATE.try_open() {
        return Ok(());
    }
    let limit = allocator::wait_limit();
    Ok(py.detach(|| GATE.open(limit))?)
}

/// Counts a route that ended.
#[pyfunction]
pub(super) fn route_closed() {
    GATE.close();
}

/// Starts destroying pools if no route is open (`True`); `end_pool_drop()` must follow.
#[pyfunction]
pub(super) fn begin_pool_drop() -> bool {
    GATE.begin_drop()
}

#[pyfunction]
pub(super) fn end_pool_drop() {
    GATE.end_drop();
}

/// Allocation routes symm_rs has open now, on every thread.
#[pyfunction]
pub(super) fn open_routes() -> usize {
    GATE.open_routes()
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RegistrationPlan>()?;
    m.add_function(wrap_pyfunction!(plan_registration, m)?)?;
    m.add_function(wrap_pyfunction!(is_up_to_date, m)?)?;
    m.add_function(wrap_pyfunction!(make_plain, m)?)?;
    m.add_function(wrap_pyfunction!(is_plain, m)?)?;
    m.add_function(wrap_pyfunction!(symmetric_support, m)?)?;
    m.add_function(wrap_pyfunction!(registrations_in_progress, m)?)?;
    m.add_function(wrap_pyfunction!(set_wait_limit, m)?)?;
    m.add_function(wrap_pyfunction!(route_opened, m)?)?;
    m.add_function(wrap_pyfunction!(route_closed, m)?)?;
    m.add_function(wrap_pyfunction!(begin_pool_drop, m)?)?;
    m.add_function(wrap_pyfunction!(end_pool_drop, m)?)?;
    m.add_function(wrap_pyfunction!(open_routes, m)?)?;
    m.add_function(wrap_pyfunction!(seal_pool, m)?)?;
    m.add_function(wrap_pyfunction!(unseal_pool, m)?)?;
    Ok(())
}
