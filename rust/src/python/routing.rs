//! Routing a thread's allocations into a pool: torch's routing functions (looked up once here,
//! and handed to Python, so both languages call the same ones), the graph pool the captures use,
//! and each thread's stack of entered contexts with its fast route into the thread's own shared
//! pool (no Python frame runs on it).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::errors::symmetric_memory_error;
use super::registration::open_route;
use crate::allocator;
use crate::handles::CommPtr;
use crate::routes::GATE;
use crate::segments::{Lane, Tag};

// -- torch's functions, taken once -------------------------------------------------------------

/// torch's routing functions: begin, end (the newer name first), release.
const BEGIN: &str = "_cuda_beginAllocateCurrentThreadToPool";
const END: [&str; 2] = [
    "_cuda_endAllocateToPool",
    "_cuda_endAllocateCurrentStreamToPool",
];
const RELEASE: &str = "_cuda_releasePool";
/// What the fast path asks before it routes.
const CURRENT_DEVICE: &str = "_cuda_getDevice";
const CAPTURING: &str = "_cuda_isCurrentStreamCapturing";

struct Torch {
    /// begin, end, release; or the names this torch lacks.
    routing: Result<[Py<PyAny>; 3], Vec<&'static str>>,
    version: String,
    current_device: Option<Py<PyAny>>,
    capturing: Option<Py<PyAny>>,
}

static TORCH: PyOnceLock<Option<Torch>> = PyOnceLock::new();

fn load_torch(py: Python<'_>) -> PyResult<Torch> {
    let torch = py.import("torch")?;
    let c = torch.getattr("_C")?;
    let get = |name: &str| c.getattr(name).ok().map(Bound::unbind);
    let routing = match (get(BEGIN), END.into_iter().find_map(get), get(RELEASE)) {
        (Some(begin), Some(end), Some(release)) => Ok([begin, end, release]),
        (begin, end, release) => Err([
            (BEGIN, begin.is_some()),
            (END[0], end.is_some()),
            (RELEASE, release.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, found)| (!found).then_some(name))
        .collect()),
    };
    Ok(Torch {
        routing,
        version: torch.getattr("__version__")?.str()?.to_string(),
        current_device: get(CURRENT_DEVICE),
        capturing: get(CAPTURING),
    })
}

/// `None` when torch cannot be imported.
fn torch(py: Python<'_>) -> Option<&'static Torch> {
    TORCH.get_or_init(py, || load_torch(py).ok()).as_ref()
}

/// `(begin, end, release)`, the functions every route of symm_rs calls.
///
/// Raises:
///     SymmetricMemoryError: torch lacks one of them (symm_rs needs torch >= 2.8).
#[pyfunction]
pub(super) fn routing_functions(py: Python<'_>) -> PyResult<(Py<PyAny>, Py<PyAny>, Py<PyAny>)> {
    let Some(torch) = torch(py) else {
        return Err(symmetric_memory_error(py, "torch cannot be imported"));
    };
    match &torch.routing {
        Ok([begin, end, release]) => Ok((
            begin.clone_ref(py),
            end.clone_ref(py),
            release.clone_ref(py),
        )),
        Err(missing) => Err(symmetric_memory_error(
            py,
            format!(
                "torch {} lacks {}; symm_rs needs torch >= 2.8",
                torch.version,
                missing.join(", ")
            ),
        )),
    }
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
pub(super) fn innermost_comm() -> Option<CommPtr> {
    THREAD.with(|t| t.borrow().levels.last().map(|e| e.level.comm))
}

/// Pools were freed: every thread's cached pool id is stale.
#[pyfunction]
pub(super) fn pools_changed() {
    POOL_GENERATION.fetch_add(1, Ordering::SeqCst);
}

// -- per-thread routing --------------------------------------------------------------------------

pub(super) enum Route {
    /// This thread's shared pool, routed here: the pool id.
    Shared(Py<PyAny>),
    /// Routed by `symm_rs.context`: an object whose `end()` undoes it.
    Python(Py<PyAny>),
}

/// One entered context of this thread.
pub(super) struct Level {
    /// The communicator of the group this context registers with.
    pub comm: CommPtr,
    pub device: i32,
    /// What the segments it allocates are tagged with (its pool's peer set and lane).
    pub tag: Tag,
    /// The route this context began; `None` when it allocates where the one around it does.
    pub route: Option<Route>,
}

struct Entered {
    level: Level,
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
    levels: Vec<Entered>,
    /// (device, peer set) -> this thread's shared pool for them.
    shared: HashMap<(i32, u64), SharedPool>,
}

thread_local! {
    static THREAD: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

/// The device and allocation tag of this thread's innermost context, if one is active.
pub(super) fn outer() -> Option<(i32, Tag)> {
    THREAD.with(|t| {
        t.borrow()
            .levels
            .last()
            .map(|e| (e.level.device, e.level.tag))
    })
}

/// Whether a context for `peers` on `device` needs a route of its own inside `outer`: one
/// nested in a context for the same peers keeps that route (its pool is theirs already); one
/// for other peers routes to their pool, so that every pool grows only by what its own ranks
/// all allocate. Nesting across devices is an error.
pub(super) fn route_needed(
    py: Python<'_>,
    outer: Option<(i32, Tag)>,
    device: i32,
    peers: u64,
) -> PyResult<bool> {
    match outer {
        None => Ok(true),
        Some((outer_device, _)) if outer_device != device => Err(symmetric_memory_error(
            py,
            format!(
                "a use_symmetric_memory context for cuda:{device} cannot nest inside one for \
                 cuda:{outer_device}"
            ),
        )),
        Some((_, tag)) => Ok(tag.peers != peers),
    }
}

/// Starts a context of this thread: tags what it allocates and remembers how to end it.
pub(super) fn push(level: Level) {
    let previous_tag = allocator::allocate_for(level.tag);
    THREAD.with(|t| {
        t.borrow_mut().levels.push(Entered {
            level,
            previous_tag,
        })
    });
}

/// Remembers this thread's shared pool for `peers` on `device`, for the fast path.
pub(super) fn remember_shared(device: i32, peers: u64, id: Py<PyAny>, lane: Lane) {
    let generation = POOL_GENERATION.load(Ordering::SeqCst);
    let pool = SharedPool {
        generation,
        id,
        lane,
    };
    THREAD.with(|t| t.borrow_mut().shared.insert((device, peers), pool));
}

fn cached_shared_pool(py: Python<'_>, device: i32, peers: u64) -> Option<(Py<PyAny>, Lane)> {
    let generation = POOL_GENERATION.load(Ordering::SeqCst);
    THREAD.with(|t| match t.borrow().shared.get(&(device, peers)) {
        Some(pool) if pool.generation == generation => Some((pool.id.clone_ref(py), pool.lane)),
        _ => None,
    })
}

/// Routes this thread into its shared pool for `peers` on `device` without Python, when
/// nothing calls for the Python path: no graph pool is set, this thread already routed there
/// for these peers on this device, the thread is on that device, and no capture is running.
/// Returns the route's level, or `None` when the Python path must route.
pub(super) fn fast_route(
    py: Python<'_>,
    comm: CommPtr,
    device: i32,
    peers: u64,
) -> PyResult<Option<Level>> {
    let Some(torch) = torch(py) else {
        return Ok(None);
    };
    let (Ok([begin, _, _]), Some(current_device), Some(capturing)) =
        (&torch.routing, &torch.current_device, &torch.capturing)
    else {
        return Ok(None);
    };
    if graph_pool_is_set() {
        return Ok(None);
    }
    let Some((pool, lane)) = cached_shared_pool(py, device, peers) else {
        return Ok(None);
    };
    if current_device.bind(py).call0()?.extract::<i32>()? != device
        || capturing.bind(py).call0()?.extract::<bool>()?
    {
        return Ok(None);
    }
    // Counted before it begins: no pool may be destroyed while a route is open.
    open_route(py)?;
    if let Err(e) = begin.call1(py, (device, pool.bind(py))) {
        GATE.close();
        return Err(e);
    }
    Ok(Some(Level {
        comm,
        device,
        tag: Tag { peers, lane },
        route: Some(Route::Shared(pool)),
    }))
}

/// Ends this thread's innermost context; returns its level.
pub(super) fn leave(py: Python<'_>) -> PyResult<Option<Level>> {
    let Some(entered) = THREAD.with(|t| t.borrow_mut().levels.pop()) else {
        return Ok(None);
    };
    allocator::allocate_for(entered.previous_tag);
    let level = entered.level;
    match &level.route {
        Some(Route::Shared(pool)) => {
            // torch's functions were loaded when this route began.
            let ended = match torch(py).map(|t| &t.routing) {
                Some(Ok([_, end, release])) => end
                    .call1(py, (level.device, pool.bind(py)))
                    .and_then(|_| release.call1(py, (level.device, pool.bind(py)))),
                _ => Ok(py.None()),
            };
            GATE.close();
            ended?;
        }
        Some(Route::Python(handle)) => {
            handle.call_method0(py, "end")?;
        }
        None => {}
    }
    Ok(Some(level))
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(routing_functions, m)?)?;
    m.add_function(wrap_pyfunction!(set_graph_pool_id, m)?)?;
    m.add_function(wrap_pyfunction!(graph_pool_id, m)?)?;
    m.add_function(wrap_pyfunction!(innermost_comm, m)?)?;
    m.add_function(wrap_pyfunction!(pools_changed, m)?)?;
    Ok(())
}
