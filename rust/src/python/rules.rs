//! The Python functions the native context calls, imported once.
//!
//! The context's common path runs in Rust. What it cannot do alone (resolve a group it has not
//! seen, route a thread into a pool for the first time, a capture, a graph pool, registration,
//! agreement between ranks) is done by two functions of `symm_rs.context`, one per direction:
//! `_enter` and `_exit`. The first use of a group therefore crosses into symm_rs's Python twice,
//! and every later use of it not at all.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

pub(super) struct Rules {
    /// `_enter(group, target, graph_pool, outer, verify, timeout) -> Entered`: resolves the
    /// group when `target` is None, then routes (see `symm_rs.context._enter`).
    pub enter: Py<PyAny>,
    /// `_exit(group, lane, verify, timeout, error)`: registers, or reports `error`.
    pub exit: Py<PyAny>,
    /// `_verify_default() -> bool`: `SYMM_RS_VERIFY`, read through `symm_rs.env`.
    pub verify_default: Py<PyAny>,
}

static RULES: PyOnceLock<Rules> = PyOnceLock::new();

pub(super) fn rules(py: Python<'_>) -> PyResult<&'static Rules> {
    RULES.get_or_try_init(py, || {
        let context = py.import("symm_rs.context")?;
        Ok(Rules {
            enter: context.getattr("_enter")?.unbind(),
            exit: context.getattr("_exit")?.unbind(),
            verify_default: context.getattr("_verify_default")?.unbind(),
        })
    })
}
