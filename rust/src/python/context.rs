//! `use_symmetric_memory` as a native class.
//!
//! The context engines enter on every layer is the common one: an eager context on a group seen
//! before, on the thread's device, with nothing new to register on exit. That path runs here and
//! calls no Python frame: the group comes from the native cache (`groups`), the route from the
//! thread's state (`routing`). Everything else goes through the two functions of
//! `symm_rs.context` that own those rules (`rules`), so a group's first use crosses into
//! symm_rs's Python twice: once to resolve and route it, once to register on exit.

use pyo3::prelude::*;

use super::errors::symmetric_memory_error;
use super::groups::{self, ContextTarget};
use super::routing::{self, Level, Route};
use super::rules::rules;
use crate::allocator;
use crate::segments::Tag;

/// The context around the one being entered, for `symm_rs.context._enter`, which asks it
/// whether the new context needs a route of its own (`routing::route_needed`: one rule).
#[pyclass(name = "OuterContext", module = "symm_rs._native", frozen)]
pub(super) struct OuterContext {
    device: i32,
    tag: Tag,
}

#[pymethods]
impl OuterContext {
    /// Whether a context for `target` inside this one routes to a pool of its own (`False`:
    /// it allocates where this one does).
    ///
    /// Raises:
    ///     SymmetricMemoryError: `target` runs on another device.
    fn route_needed(&self, py: Python<'_>, target: &ContextTarget) -> PyResult<bool> {
        routing::route_needed(
            py,
            Some((self.device, self.tag)),
            target.device,
            target.peers,
        )
    }
}

/// What `symm_rs.context._enter` hands back: the group resolved (or the target it was given),
/// and the route it began: `route` (an object whose `end()` undoes it; `None` when the context
/// allocates where the one around it does), this thread's shared pool id when that is where it
/// routed (later contexts route there natively), and the pool's lane.
#[pyclass(name = "Entered", module = "symm_rs._native", frozen)]
pub(super) struct Entered {
    target: Py<ContextTarget>,
    route: Option<Py<PyAny>>,
    shared_pool: Option<Py<PyAny>>,
    lane: u64,
}

#[pymethods]
impl Entered {
    #[new]
    #[pyo3(signature = (target, route = None, shared_pool = None, lane = 0))]
    fn new(
        target: Py<ContextTarget>,
        route: Option<Py<PyAny>>,
        shared_pool: Option<Py<PyAny>>,
        lane: u64,
    ) -> Self {
        Self {
            target,
            route,
            shared_pool,
            lane,
        }
    }
}

/// Enters a context on `group` (`known`: its cached target). Returns its target, or `None` for
/// a one-rank group (nothing to do).
fn enter(
    py: Python<'_>,
    group: &Bound<'_, PyAny>,
    known: Option<Py<ContextTarget>>,
    graph_pool: &Py<PyAny>,
    verify: Option<bool>,
    timeout: &Py<PyAny>,
) -> PyResult<Option<Py<ContextTarget>>> {
    let outer = routing::outer();
    if let Some(target) = &known {
        let t = target.get();
        match (routing::route_needed(py, outer, t.device, t.peers), outer) {
            (Ok(false), Some((_, tag))) => {
                routing::push(Level {
                    comm: t.comm,
                    device: t.device,
                    tag,
                    route: None,
                });
                return Ok(known);
            }
            (Ok(true), None) => {
                if let Some(level) = routing::fast_route(py, t.comm, t.device, t.peers)? {
                    routing::push(level);
                    return Ok(known);
                }
            }
            // Routing by Python, or a refusal it reports to the peers first.
            _ => {}
        }
    }
    let outer_context = outer.map(|(device, tag)| OuterContext { device, tag });
    let known_again = known.as_ref().map(|k| k.clone_ref(py));
    let entered = rules(py)?
        .enter
        .bind(py)
        .call1((
            group,
            known_again,
            graph_pool,
            outer_context,
            verify,
            timeout,
        ))?
        .cast_into::<Entered>()?;
    let entered = entered.get();
    let target = entered.target.clone_ref(py);
    if known.is_none() {
        groups::remember(py, group, &target);
    }
    let t = target.get();
    if t.group.is_none() {
        return Ok(None);
    }
    let tag = match (&entered.route, outer) {
        // Kept the outer route: its segments keep the outer tag.
        (None, Some((_, outer_tag))) => outer_tag,
        _ => Tag {
            peers: t.peers,
            lane: entered.lane,
        },
    };
    if let Some(id) = &entered.shared_pool {
        routing::remember_shared(t.device, t.peers, id.clone_ref(py), entered.lane);
    }
    routing::push(Level {
        comm: t.comm,
        device: t.device,
        tag,
        route: entered
            .route
            .as_ref()
            .map(|r| Route::Python(r.clone_ref(py))),
    });
    Ok(Some(target))
}

/// Allocate from the symmetric pool, and register new segments with ``group`` on exit.
///
/// Arguments:
///     group: the group whose collectives will use the buffers (see ``symm_rs.groups``).
///     disabled: make the context a no-op (as a one-rank group does).
///     graph_pool: the capture's graph pool, overriding ``set_graph_pool`` and what torch
///         reports; only consulted inside a CUDA-graph capture.
///     verify: before registering, the ranks agree (bounded by ``timeout``) that every one of
///         them is about to register the same segment sizes. ``None`` (the default) reads
///         ``SYMM_RS_VERIFY`` (on unless set to 0) at each exit that registers; with it off an
///         exit may wait inside NCCL for ever.
///     timeout: seconds the agreement waits for peers (default ``SYMM_RS_TIMEOUT``, 30).
///
/// The object may be entered again after it exits (engines pause and resume a context).
///
/// Raises:
///     TypeError: ``group`` is not a kind symm_rs accepts.
///     SymmetricMemoryError: no GPU, torch too old, or a capture whose pool is unknown.
///     NcclLibraryError: the NCCL in use cannot register symmetric windows.
///     RegistrationError / NcclError: registration or verification failed on exit.
#[pyclass(name = "use_symmetric_memory", module = "symm_rs", subclass)]
pub(super) struct UseSymmetricMemory {
    group: Py<PyAny>,
    #[pyo3(get, set)]
    disabled: bool,
    #[pyo3(get, set)]
    graph_pool: Py<PyAny>,
    verify: Option<bool>,
    #[pyo3(get, set)]
    timeout: Py<PyAny>,
    /// While entered: the group it resolved.
    active: Option<Py<ContextTarget>>,
}

#[pymethods]
impl UseSymmetricMemory {
    #[new]
    #[pyo3(signature = (group, disabled = false, graph_pool = None, verify = None, timeout = None))]
    fn new(
        py: Python<'_>,
        group: Py<PyAny>,
        disabled: bool,
        graph_pool: Option<Py<PyAny>>,
        verify: Option<bool>,
        timeout: Option<Py<PyAny>>,
    ) -> Self {
        Self {
            group,
            disabled,
            graph_pool: graph_pool.unwrap_or_else(|| py.None()),
            verify,
            timeout: timeout.unwrap_or_else(|| py.None()),
            active: None,
        }
    }

    /// Whether the ranks agree before registering: as passed, else ``SYMM_RS_VERIFY`` now.
    #[getter]
    fn verify(&self, py: Python<'_>) -> PyResult<bool> {
        match self.verify {
            Some(verify) => Ok(verify),
            None => rules(py)?.verify_default.call0(py)?.extract(py),
        }
    }

    #[setter]
    fn set_verify(&mut self, verify: Option<bool>) {
        self.verify = verify;
    }

    /// The group this context resolved, while it is entered.
    #[getter]
    fn _resolved(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let target = self.active.as_ref()?;
        target.get().group.as_ref().map(|g| g.clone_ref(py))
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let py = slf.py();
        let (group, graph_pool, verify, timeout) = {
            let this = slf.borrow();
            if this.disabled {
                return Ok(slf.clone());
            }
            if this.active.is_some() {
                return Err(symmetric_memory_error(
                    py,
                    "this use_symmetric_memory object is already active; enter it again only \
                     after it exits",
                ));
            }
            (
                this.group.clone_ref(py),
                this.graph_pool.clone_ref(py),
                this.verify,
                this.timeout.clone_ref(py),
            )
        };
        let known = groups::lookup(py, group.bind(py));
        if known.as_ref().is_some_and(|t| t.get().group.is_none()) {
            return Ok(slf.clone());
        }
        let entered = enter(py, group.bind(py), known, &graph_pool, verify, &timeout)?;
        slf.borrow_mut().active = entered;
        Ok(slf.clone())
    }

    #[pyo3(signature = (exc_type, exc, tb))]
    fn __exit__(
        slf: Bound<'_, Self>,
        exc_type: Bound<'_, PyAny>,
        exc: Bound<'_, PyAny>,
        tb: Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let _ = tb;
        let py = slf.py();
        let (active, verify, timeout) = {
            let mut this = slf.borrow_mut();
            (this.active.take(), this.verify, this.timeout.clone_ref(py))
        };
        let Some(target) = active else {
            return Ok(false);
        };
        let Some(level) = routing::leave(py)? else {
            return Ok(false);
        };
        let t = target.get();
        let Some(group) = &t.group else {
            return Ok(false);
        };
        let lane = level.tag.lane;
        let error = (!exc_type.is_none()).then_some(exc);
        // The common exit: nothing to register, decided in Rust. Whether it is common is this
        // rank's own view; the agreement before any registration catches ranks whose views
        // differ.
        if error.is_none() && allocator::is_up_to_date(t.comm, lane) {
            return Ok(false);
        }
        rules(py)?
            .exit
            .call1(py, (group, lane, verify, timeout, error))?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let verify = match self.verify {
            Some(true) => "True",
            Some(false) => "False",
            None => "None",
        };
        Ok(format!(
            "use_symmetric_memory({}, disabled={}, verify={verify})",
            self.group.bind(py).repr()?,
            if self.disabled { "True" } else { "False" },
        ))
    }
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<UseSymmetricMemory>()?;
    m.add_class::<OuterContext>()?;
    m.add_class::<Entered>()?;
    Ok(())
}
