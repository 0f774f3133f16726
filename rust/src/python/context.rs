//! `use_symmetric_memory` as a native class.
//!
//! The context engines enter on every layer is the common one: an eager context on a group seen
//! before, on the thread's device, with nothing new to register on exit. That path runs here, with
//! torch's routing functions taken once and the group's resolution cached, and calls no Python
//! frame. Everything else (first use of a group or thread, CUDA-graph captures, graph pools,
//! registration, verification, errors) calls the functions of `symm_rs.context` that own those
//! rules, so they stay in one place.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyInt, PyWeakrefReference};

use super::registration::open_route;
use super::SymmetricMemoryError;
use crate::allocator;
use crate::handles::CommPtr;
use crate::routes::GATE;
use crate::segments::{Lane, Tag};

/// The Python module whose functions handle everything but the common path.
const RULES: &str = "symm_rs.context";
/// Engines hold a handful of groups; a runaway count means objects made per call, not groups.
const MAX_CACHED_GROUPS: usize = 256;

// -- torch's routing functions, taken once -----------------------------------------------------

struct Torch {
    begin: Py<PyAny>,
    end: Py<PyAny>,
    release: Py<PyAny>,
    current_device: Py<PyAny>,
    capturing: Py<PyAny>,
}

static TORCH: PyOnceLock<Option<Torch>> = PyOnceLock::new();

fn load_torch(py: Python<'_>) -> PyResult<Torch> {
    let c = py.import("torch")?.getattr("_C")?;
    let end = match c.getattr("_cuda_endAllocateToPool") {
        Ok(end) => end,
        Err(_) => c.getattr("_cuda_endAllocateCurrentStreamToPool")?,
    };
    Ok(Torch {
        begin: c
            .getattr("_cuda_beginAllocateCurrentThreadToPool")?
            .unbind(),
        end: end.unbind(),
        release: c.getattr("_cuda_releasePool")?.unbind(),
        current_device: c.getattr("_cuda_getDevice")?.unbind(),
        capturing: c.getattr("_cuda_isCurrentStreamCapturing")?.unbind(),
    })
}

/// `None` when this torch lacks one of them: every context then takes the Python path, which
/// raises the error that names what is missing.
fn torch(py: Python<'_>) -> Option<&Torch> {
    TORCH.get_or_init(py, || load_torch(py).ok()).as_ref()
}

// -- process-wide state the Python side sets ----------------------------------------------------

/// The graph pool `set_graph_pool` named (its id tuple), if any.
static GRAPH_POOL: Mutex<Option<Py<PyAny>>> = Mutex::new(None);
/// Bumped whenever pools are freed, so that no thread routes into a pool id it cached before.
static POOL_GENERATION: AtomicU64 = AtomicU64::new(0);

fn graph_pool_is_set() -> bool {
    GRAPH_POOL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
}

/// Sets (or, with `None`, clears) the graph pool id the captures that follow use.
#[pyfunction]
#[pyo3(signature = (pool_id))]
pub(super) fn set_graph_pool_id(pool_id: Option<Py<PyAny>>) {
    *GRAPH_POOL.lock().unwrap_or_else(|p| p.into_inner()) = pool_id;
}

/// The graph pool id `set_graph_pool_id` set, if any.
#[pyfunction]
pub(super) fn graph_pool_id(py: Python<'_>) -> Option<Py<PyAny>> {
    let pool = GRAPH_POOL.lock().unwrap_or_else(|p| p.into_inner());
    pool.as_ref().map(|p| p.clone_ref(py))
}

/// The communicator of this thread's innermost active context, if one is active.
#[pyfunction]
pub(super) fn innermost_comm() -> Option<usize> {
    THREAD.with(|t| t.borrow().levels.last().map(|l| l.comm))
}

/// Pools were freed: every thread's cached pool id is stale.
#[pyfunction]
pub(super) fn pools_changed() {
    POOL_GENERATION.fetch_add(1, Ordering::SeqCst);
}

// -- per-thread routing --------------------------------------------------------------------------

enum Route {
    /// This thread's shared pool, routed here: the pool id.
    Shared(Py<PyAny>),
    /// Routed by `symm_rs.context`: an object whose `end()` undoes it.
    Python(Py<PyAny>),
}

/// One entered context of this thread.
struct Level {
    /// The communicator of the group this context registers with.
    comm: usize,
    device: i32,
    /// What the segments it allocates are tagged with (its pool's peer set and lane).
    tag: Tag,
    /// The route this context began; `None` when it allocates where the one around it does.
    route: Option<Route>,
    /// The allocation tag to restore when it exits.
    previous_tag: Tag,
}

/// This thread's shared pool for one (device, peer set), as the fast path routes into it.
struct SharedPool {
    generation: u64,
    id: Py<PyAny>,
    lane: Lane,
}

#[derive(Default)]
struct ThreadState {
    /// Entered contexts, outermost first.
    levels: Vec<Level>,
    /// (device, peer set) -> this thread's shared pool for them.
    shared: HashMap<(i32, u64), SharedPool>,
}

thread_local! {
    static THREAD: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

fn cached_shared_pool(py: Python<'_>, device: i32, peers: u64) -> Option<(Py<PyAny>, Lane)> {
    let generation = POOL_GENERATION.load(Ordering::SeqCst);
    THREAD.with(|t| match t.borrow().shared.get(&(device, peers)) {
        Some(pool) if pool.generation == generation => Some((pool.id.clone_ref(py), pool.lane)),
        _ => None,
    })
}

/// The shared pool id to route into without Python, when nothing calls for the Python path:
/// no graph pool is set, this thread already routed there for these peers on this device, the
/// thread is on the communicator's device, and no capture is running.
fn fast_route(
    py: Python<'_>,
    device: i32,
    peers: u64,
) -> PyResult<Option<(&Torch, Py<PyAny>, Lane)>> {
    let Some(torch) = torch(py) else {
        return Ok(None);
    };
    if graph_pool_is_set() {
        return Ok(None);
    }
    let Some((pool, lane)) = cached_shared_pool(py, device, peers) else {
        return Ok(None);
    };
    if torch.current_device.bind(py).call0()?.extract::<i32>()? != device
        || torch.capturing.bind(py).call0()?.extract::<bool>()?
    {
        return Ok(None);
    }
    Ok(Some((torch, pool, lane)))
}

/// Routes by `symm_rs.context._enter_slow`: the route (`None` when a nested context keeps the
/// route around it, because torch cannot put an inner route first) and the lane of the pool
/// it routed into.
fn slow_route(
    py: Python<'_>,
    group: &Py<PyAny>,
    device: i32,
    peers: u64,
    graph_pool: &Py<PyAny>,
    nested: bool,
) -> PyResult<(Option<Route>, Lane)> {
    let entered = py.import(RULES)?.getattr("_enter_slow")?.call1((
        group.bind(py),
        graph_pool.bind(py),
        nested,
    ))?;
    let (handle, shared, lane): (Option<Py<PyAny>>, Option<Py<PyAny>>, Lane) = entered.extract()?;
    if let Some(id) = shared {
        let generation = POOL_GENERATION.load(Ordering::SeqCst);
        THREAD.with(|t| {
            t.borrow_mut().shared.insert(
                (device, peers),
                SharedPool {
                    generation,
                    id,
                    lane,
                },
            )
        });
    }
    Ok((handle.map(Route::Python), lane))
}

/// Routes this thread for a context on `device` serving `peers`, and tags the segments it
/// allocates with those peers and the lane of the pool it routes into. A context nested in
/// one for the same peers keeps its route; one for other peers routes to their pool, so that
/// every pool grows only by what its own ranks all allocate.
fn enter(
    py: Python<'_>,
    group: &Py<PyAny>,
    comm: usize,
    device: i32,
    peers: u64,
    graph_pool: &Py<PyAny>,
) -> PyResult<()> {
    let around = THREAD.with(|t| t.borrow().levels.last().map(|l| (l.device, l.tag)));
    let (route, tag) = match around {
        Some((outer_device, _)) if outer_device != device => {
            return Err(SymmetricMemoryError::new_err(format!(
                "a use_symmetric_memory context for cuda:{device} cannot nest inside one for \
                 cuda:{outer_device}"
            )));
        }
        Some((_, outer)) if outer.peers == peers => (None, outer),
        Some((_, outer)) => match slow_route(py, group, device, peers, graph_pool, true)? {
            (Some(route), lane) => (Some(route), Tag { peers, lane }),
            // Keeps the outer route: its segments keep the outer tag.
            (None, _) => (None, outer),
        },
        None => match fast_route(py, device, peers)? {
            Some((torch, pool, lane)) => {
                // Counted before it begins: no pool may be destroyed while a route is open.
                open_route(py)?;
                if let Err(e) = torch.begin.call1(py, (device, pool.bind(py))) {
                    close_route(py);
                    return Err(e);
                }
                (Some(Route::Shared(pool)), Tag { peers, lane })
            }
            None => {
                // Tagged before routing: the slow path may grow the pool right away.
                let previous = allocator::allocate_for(Tag { peers, lane: 0 });
                let routed = slow_route(py, group, device, peers, graph_pool, false);
                allocator::allocate_for(previous);
                let (route, lane) = routed?;
                (route, Tag { peers, lane })
            }
        },
    };
    let previous_tag = allocator::allocate_for(tag);
    THREAD.with(|t| {
        t.borrow_mut().levels.push(Level {
            comm,
            device,
            tag,
            route,
            previous_tag,
        })
    });
    Ok(())
}

/// Counts a route that ended.
fn close_route(_py: Python<'_>) {
    GATE.close();
}

/// Ends this thread's innermost context; returns its level.
fn leave(py: Python<'_>) -> PyResult<Option<Level>> {
    let Some(level) = THREAD.with(|t| t.borrow_mut().levels.pop()) else {
        return Ok(None);
    };
    allocator::allocate_for(level.previous_tag);
    match &level.route {
        Some(Route::Shared(pool)) => {
            // `torch` was loaded when this route began.
            let ended = match torch(py) {
                Some(torch) => torch
                    .end
                    .call1(py, (level.device, pool.bind(py)))
                    .and_then(|_| torch.release.call1(py, (level.device, pool.bind(py)))),
                None => Ok(py.None()),
            };
            close_route(py);
            ended?;
        }
        Some(Route::Python(handle)) => {
            handle.call_method0(py, "end")?;
        }
        None => {}
    }
    Ok(Some(level))
}

// -- group resolution, cached ----------------------------------------------------------------------

/// How a cached resolution is confirmed: an engine may swap the communicator an object holds.
#[derive(Clone, Copy)]
enum Recheck {
    /// The key alone names it (a ProcessGroup's communicator, a raw address, a `Group`).
    Nothing,
    /// `group.pynccl_comm.comm` must still be the cached address.
    PyncclComm,
    /// `group.comm` must still be the cached address.
    Comm,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Object(usize),
    Address(usize),
}

struct Cached {
    /// A weak reference to the group object: a new object at a freed object's id is a miss.
    alive: Option<Py<PyWeakrefReference>>,
    recheck: Recheck,
    comm: usize,
    /// `None` for a one-rank group (the context is a no-op).
    group: Option<Py<PyAny>>,
    device: i32,
    peers: u64,
}

static GROUPS: Mutex<Option<HashMap<Key, Cached>>> = Mutex::new(None);

/// A resolved group: the `Group`, its communicator, device and peer set.
struct Target {
    group: Py<PyAny>,
    comm: usize,
    device: i32,
    peers: u64,
}

/// `None` for a one-rank group.
type Resolved = Option<Target>;

fn key_of(group: &Bound<'_, PyAny>) -> Option<Key> {
    if group.is_instance_of::<PyBool>() {
        return None;
    }
    if group.is_instance_of::<PyInt>() {
        return group.extract::<usize>().ok().map(Key::Address);
    }
    Some(Key::Object(group.as_ptr() as usize))
}

/// An address held as an int or a `ctypes.c_void_p`.
fn address(value: &Bound<'_, PyAny>) -> Option<usize> {
    match value.extract::<usize>() {
        Ok(address) => Some(address),
        Err(_) => value
            .getattr("value")
            .ok()?
            .extract::<Option<usize>>()
            .ok()?,
    }
}

fn still_holds(group: &Bound<'_, PyAny>, recheck: Recheck, comm: usize) -> bool {
    let holder = match recheck {
        Recheck::Nothing => return true,
        Recheck::PyncclComm => group.getattr("pynccl_comm").and_then(|p| p.getattr("comm")),
        Recheck::Comm => group.getattr("comm"),
    };
    holder.ok().and_then(|h| address(&h)) == Some(comm)
}

fn lookup(py: Python<'_>, group: &Bound<'_, PyAny>, key: Key) -> Option<Resolved> {
    // Copied out under the lock and checked after it: the checks run Python (`.comm` may be a
    // property), which can switch threads, and another thread that then waits for this lock
    // while holding the GIL would never let this one finish.
    let (alive, recheck, comm, resolved, device, peers) = {
        let guard = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        let cached = guard.as_ref()?.get(&key)?;
        (
            cached.alive.as_ref().map(|a| a.clone_ref(py)),
            cached.recheck,
            cached.comm,
            cached.group.as_ref().map(|g| g.clone_ref(py)),
            cached.device,
            cached.peers,
        )
    };
    if let Some(alive) = alive {
        let target = alive.bind(py).upgrade()?;
        if !target.is(group) {
            return None;
        }
    }
    if !still_holds(group, recheck, comm) {
        return None;
    }
    Some(resolved.map(|group| Target {
        group,
        comm,
        device,
        peers,
    }))
}

fn remember(py: Python<'_>, group: &Bound<'_, PyAny>, key: Key, how: &str, resolved: &Resolved) {
    let recheck = match how {
        "fixed" => Recheck::Nothing,
        "pynccl" => Recheck::PyncclComm,
        "comm" => Recheck::Comm,
        _ => return,
    };
    let alive = match key {
        Key::Address(_) => None,
        // An object without weak references is not cached: its id could be reused unseen.
        Key::Object(_) => match PyWeakrefReference::new(group) {
            Ok(weak) => Some(weak.unbind()),
            Err(_) => return,
        },
    };
    // A one-rank answer is kept under its address too, so that forgetting the address drops it.
    let unresolved = match key {
        Key::Address(address) => address,
        Key::Object(_) => 0,
    };
    let (comm, device, peers) = resolved
        .as_ref()
        .map_or((unresolved, -1, 0), |t| (t.comm, t.device, t.peers));
    if comm == 0 && !matches!(recheck, Recheck::Nothing) {
        return;
    }
    let mut guard = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if map.len() >= MAX_CACHED_GROUPS {
        map.clear();
    }
    let group = resolved.as_ref().map(|t| t.group.clone_ref(py));
    map.insert(
        key,
        Cached {
            alive,
            recheck,
            comm,
            group,
            device,
            peers,
        },
    );
}

/// `group` resolved: from the cache, or by `symm_rs.context._resolve_for_context`, which also
/// says how the answer may be cached.
fn resolve(py: Python<'_>, group: &Bound<'_, PyAny>) -> PyResult<Resolved> {
    let key = key_of(group);
    if let Some(hit) = key.and_then(|k| lookup(py, group, k)) {
        return Ok(hit);
    }
    let answer = py
        .import(RULES)?
        .getattr("_resolve_for_context")?
        .call1((group,))?;
    let (resolved, how): (Option<Bound<'_, PyAny>>, Option<String>) = answer.extract()?;
    let resolved = match resolved {
        None => None,
        Some(g) => {
            let comm: usize = g.getattr("comm")?.extract()?;
            let device: i32 = g.getattr("device")?.extract()?;
            let peers: u64 = g.getattr("peer_set")?.extract()?;
            Some(Target {
                group: g.unbind(),
                comm,
                device,
                peers,
            })
        }
    };
    if let (Some(key), Some(how)) = (key, how) {
        remember(py, group, key, &how, &resolved);
    }
    Ok(resolved)
}

/// Forgets every cached resolution to `comm` (it was released or forgotten).
#[pyfunction]
pub(super) fn forget_group(comm: usize) {
    let mut guard = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(map) = guard.as_mut() {
        map.retain(|_, cached| cached.comm != comm);
    }
}

// -- the class -------------------------------------------------------------------------------------

/// `SYMM_RS_VERIFY` read as `symm_rs.env.read_flag` reads it; an unknown value is left to it,
/// so that the error names the variable the same way.
fn verify_from_env(py: Python<'_>) -> PyResult<bool> {
    // On by default: ranks agree before every collective registration.
    let Some(value) = std::env::var_os("SYMM_RS_VERIFY") else {
        return Ok(true);
    };
    match value
        .to_str()
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        _ => py
            .import("symm_rs.env")?
            .getattr("read_flag")?
            .call1(("SYMM_RS_VERIFY",))?
            .extract(),
    }
}

/// Allocate from the symmetric pool, and register new segments with ``group`` on exit.
///
/// Arguments:
///     group: the group whose collectives will use the buffers (see ``symm_rs.groups``).
///     disabled: make the context a no-op (as a one-rank group does).
///     graph_pool: the capture's graph pool, overriding ``set_graph_pool`` and what torch
///         reports; only consulted inside a CUDA-graph capture.
///     verify: before registering, the ranks agree (bounded by ``timeout``) that every one of
///         them is about to register the same segment sizes; default on (``SYMM_RS_VERIFY=0``
///         turns it off, and an exit may then wait inside NCCL for ever).
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
    #[pyo3(get, set)]
    verify: bool,
    #[pyo3(get, set)]
    timeout: Py<PyAny>,
    /// While entered: the resolved group and its communicator.
    active: Option<(Py<PyAny>, usize)>,
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
    ) -> PyResult<Self> {
        let verify = match verify {
            Some(verify) => verify,
            None => verify_from_env(py)?,
        };
        Ok(Self {
            group,
            disabled,
            graph_pool: graph_pool.unwrap_or_else(|| py.None()),
            verify,
            timeout: timeout.unwrap_or_else(|| py.None()),
            active: None,
        })
    }

    /// The group this context resolved, while it is entered.
    #[getter]
    fn _resolved(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.active.as_ref().map(|(g, _)| g.clone_ref(py))
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let py = slf.py();
        let (group, graph_pool, verify, timeout) = {
            let this = slf.borrow();
            if this.disabled {
                return Ok(slf.clone());
            }
            if this.active.is_some() {
                return Err(SymmetricMemoryError::new_err(
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
        let Some(target) = resolve(py, group.bind(py))? else {
            return Ok(slf.clone());
        };
        let resolved = target.group;
        match enter(
            py,
            &resolved,
            target.comm,
            target.device,
            target.peers,
            &graph_pool,
        ) {
            Ok(()) => {
                slf.borrow_mut().active = Some((resolved, target.comm));
                Ok(slf.clone())
            }
            Err(error) => {
                if verify {
                    py.import(RULES)?.getattr("_enter_failed")?.call1((
                        resolved.bind(py),
                        error.value(py),
                        timeout.bind(py),
                    ))?;
                }
                Err(error)
            }
        }
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
        let Some((group, comm)) = active else {
            return Ok(false);
        };
        let Some(level) = leave(py)? else {
            return Ok(false);
        };
        let lane = level.tag.lane;
        if !exc_type.is_none() {
            py.import(RULES)?.getattr("_exit_failed")?.call1((
                group.bind(py),
                lane,
                verify,
                timeout.bind(py),
                exc,
            ))?;
            return Ok(false);
        }
        // The common exit: nothing to register, decided in Rust. Whether it is common is this
        // rank's own view; the agreement before any registration catches ranks whose views
        // differ.
        if allocator::is_up_to_date(CommPtr::new(comm), lane) {
            return Ok(false);
        }
        py.import(RULES)?.getattr("_exit_register")?.call1((
            group.bind(py),
            lane,
            verify,
            timeout.bind(py),
        ))?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "use_symmetric_memory({}, disabled={}, verify={})",
            self.group.bind(py).repr()?,
            if self.disabled { "True" } else { "False" },
            if self.verify { "True" } else { "False" },
        ))
    }
}
