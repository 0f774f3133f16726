//! The Python functions the native context calls, handed over once by `symm_rs.context` when it
//! is imported (`set_context_rules`), never looked up by name at call time.
//!
//! The context's common path runs in Rust. What it cannot do alone (resolve a group it has not
//! seen, route a thread into a pool for the first time, a capture, a graph pool, registration,
//! agreement between ranks) is done by two functions of `symm_rs.context`, one per direction:
//! `_enter` and `_exit`. The first use of a group therefore crosses into symm_rs's Python twice,
//! and every later use of it not at all.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use super::errors::symmetric_memory_error;

pub(super) struct Rules {
    /// `_enter(group, target, graph_pool, outer, verify, timeout) -> Entered`: resolves the
    /// group when `target` is None, then routes (see `symm_rs.context._enter`).
    pub enter: Py<PyAny>,
    /// `_exit(group, lane, verify, timeout, error)`: registers, or reports `error`.
    pub exit: Py<PyAny>,
    /// `_verify_default() -> bool`: `SYMM_RS_VERIFY`, read through `symm_rs.env` (only for the
    /// `verify` attribute; the enter and exit read it in Python).
    pub verify_default: Py<PyAny>,
}

static RULES: Mutex<Option<Arc<Rules>>> = Mutex::new(None);

fn current() -> Option<Arc<Rules>> {
    RULES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Called once by `symm_rs.context` as it is imported: the functions the native context calls.
#[pyfunction]
fn set_context_rules(enter: Py<PyAny>, exit: Py<PyAny>, verify_default: Py<PyAny>) {
    *RULES.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Rules {
        enter,
        exit,
        verify_default,
    }));
}

/// The rules `symm_rs.context` handed over. The native class is reached through that module,
/// which has then run `set_context_rules`; should someone reach it another way, importing the module
/// hands them over.
pub(super) fn rules(py: Python<'_>) -> PyResult<Arc<Rules>> {
    if let Some(rules) = current() {
        return Ok(rules);
    }
    py.import("symm_rs.context")?;
    current().ok_or_else(|| {
        symmetric_memory_error(
            py,
            "symm_rs.context did not hand its rules to the native module",
        )
    })
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_context_rules, m)?)?;
    Ok(())
}
