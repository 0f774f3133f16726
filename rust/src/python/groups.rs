//! The groups the native context has resolved, kept as the typed `ContextTarget`s Python made,
//! so that a group seen before is entered without Python.
//!
//! `symm_rs.groups.kind_of` classifies every group object into a `GroupKind` (the one
//! classification); the kind says how a cached answer is confirmed, since an engine may swap the
//! communicator an object holds.

use std::collections::HashMap;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyWeakrefReference};

use crate::handles::CommPtr;

/// Engines hold a handful of groups; a runaway count means objects made per call, not groups.
const MAX_CACHED_GROUPS: usize = 256;

/// The kinds of group symm_rs accepts, as `symm_rs.groups.kind_of` classifies them.
#[pyclass(
    name = "GroupKind",
    module = "symm_rs._native",
    eq,
    eq_int,
    frozen,
    from_py_object
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GroupKind {
    /// A `symm_rs.groups.Group`.
    #[pyo3(name = "GROUP")]
    Group,
    /// A `torch.distributed.ProcessGroup`.
    #[pyo3(name = "PROCESS_GROUP")]
    ProcessGroup,
    /// A raw `int` `ncclComm_t`.
    #[pyo3(name = "ADDRESS")]
    Address,
    /// An object with `.pynccl_comm.comm` (SGLang's `GroupCoordinator`).
    #[pyo3(name = "PYNCCL")]
    Pynccl,
    /// An object with `.comm` (a `PyNcclCommunicator`, a `symm_rs.Communicator`).
    #[pyo3(name = "COMM")]
    Comm,
}

/// How a cached resolution is confirmed.
#[derive(Clone, Copy)]
enum Recheck {
    /// The key alone names it (a ProcessGroup's communicator, a raw address, a `Group`).
    Nothing,
    /// `group.pynccl_comm.comm` must still be the cached address.
    PyncclComm,
    /// `group.comm` must still be the cached address.
    Comm,
}

impl From<GroupKind> for Recheck {
    fn from(kind: GroupKind) -> Self {
        match kind {
            GroupKind::Group | GroupKind::ProcessGroup | GroupKind::Address => Self::Nothing,
            GroupKind::Pynccl => Self::PyncclComm,
            GroupKind::Comm => Self::Comm,
        }
    }
}

/// A group as the context uses it: the `symm_rs.groups.Group` (None for a one-rank group, whose
/// context does nothing), its communicator, device and peer set, and its kind. Made by
/// `symm_rs.context`; kept by the native cache.
#[pyclass(name = "ContextTarget", module = "symm_rs._native", frozen, get_all)]
pub(super) struct ContextTarget {
    pub kind: Option<GroupKind>,
    pub group: Option<Py<PyAny>>,
    pub comm: CommPtr,
    pub device: i32,
    pub peers: u64,
}

#[pymethods]
impl ContextTarget {
    #[new]
    #[pyo3(signature = (kind, group, comm = CommPtr::new(0), device = -1, peers = 0))]
    fn new(
        kind: Option<GroupKind>,
        group: Option<Py<PyAny>>,
        comm: CommPtr,
        device: i32,
        peers: u64,
    ) -> Self {
        Self {
            kind,
            group,
            comm,
            device,
            peers,
        }
    }
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
    comm: CommPtr,
    target: Py<ContextTarget>,
}

static GROUPS: Mutex<Option<HashMap<Key, Cached>>> = Mutex::new(None);

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
fn address(value: &Bound<'_, PyAny>) -> Option<CommPtr> {
    let address = match value.extract::<usize>() {
        Ok(address) => Some(address),
        Err(_) => value
            .getattr("value")
            .ok()?
            .extract::<Option<usize>>()
            .ok()?,
    };
    address.map(CommPtr::new)
}

fn still_holds(group: &Bound<'_, PyAny>, recheck: Recheck, comm: CommPtr) -> bool {
    let holder = match recheck {
        Recheck::Nothing => return true,
        Recheck::PyncclComm => group.getattr("pynccl_comm").and_then(|p| p.getattr("comm")),
        Recheck::Comm => group.getattr("comm"),
    };
    holder.ok().and_then(|h| address(&h)) == Some(comm)
}

/// The cached target of `group`, if it is cached and still holds the same communicator.
pub(super) fn lookup(py: Python<'_>, group: &Bound<'_, PyAny>) -> Option<Py<ContextTarget>> {
    let key = key_of(group)?;
    // Copied out under the lock and checked after it: the checks run Python (`.comm` may be a
    // property), which can switch threads, and another thread that then waits for this lock
    // while holding the GIL would never let this one finish.
    let (alive, recheck, comm, target) = {
        let guard = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        let cached = guard.as_ref()?.get(&key)?;
        (
            cached.alive.as_ref().map(|a| a.clone_ref(py)),
            cached.recheck,
            cached.comm,
            cached.target.clone_ref(py),
        )
    };
    if let Some(alive) = alive {
        if !alive.bind(py).upgrade()?.is(group) {
            return None;
        }
    }
    still_holds(group, recheck, comm).then_some(target)
}

/// Caches `target` for `group`, when its kind says how to confirm it later.
pub(super) fn remember(py: Python<'_>, group: &Bound<'_, PyAny>, target: &Py<ContextTarget>) {
    let (Some(key), Some(kind)) = (key_of(group), target.get().kind) else {
        return;
    };
    let recheck = Recheck::from(kind);
    let alive = match key {
        Key::Address(_) => None,
        // An object without weak references is not cached: its id could be reused unseen.
        Key::Object(_) => match PyWeakrefReference::new(group) {
            Ok(weak) => Some(weak.unbind()),
            Err(_) => return,
        },
    };
    let comm = match (&target.get().group, key) {
        (Some(_), _) => target.get().comm,
        // A one-rank answer is kept under its address too, so that forgetting the address
        // drops it.
        (None, Key::Address(address)) => CommPtr::new(address),
        (None, Key::Object(_)) => CommPtr::new(0),
    };
    if comm.is_null() && !matches!(recheck, Recheck::Nothing) {
        return;
    }
    let cached = Cached {
        alive,
        recheck,
        comm,
        target: target.clone_ref(py),
    };
    // What leaves the cache is dropped after the lock: dropping a Python object can run
    // Python code, which may enter a context and need the lock.
    let (_replaced, _cleared) = {
        let mut guard = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        let map = guard.get_or_insert_with(HashMap::new);
        let cleared = if map.len() >= MAX_CACHED_GROUPS {
            std::mem::take(map)
        } else {
            HashMap::new()
        };
        (map.insert(key, cached), cleared)
    };
}

/// Forgets every cached resolution to `comm` (it was released or forgotten).
#[pyfunction]
pub(super) fn forget_group(comm: CommPtr) {
    let _forgotten: Vec<Cached> = {
        let mut guard = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        let Some(map) = guard.as_mut() else {
            return;
        };
        let keys: Vec<Key> = map
            .iter()
            .filter(|(_, cached)| cached.comm == comm)
            .map(|(key, _)| *key)
            .collect();
        keys.iter().filter_map(|key| map.remove(key)).collect()
    };
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GroupKind>()?;
    m.add_class::<ContextTarget>()?;
    m.add_function(wrap_pyfunction!(forget_group, m)?)?;
    Ok(())
}
