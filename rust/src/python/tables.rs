//! The tables the Rust core holds, exported once so that Python reads them instead of keeping
//! copies: the collectives and reductions (`collective.rs`), NCCL's dtypes, the CP copy modes,
//! and the size policy's per-call lookup (`policy.rs`).

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::collective::{CollectiveKind, DataType, ReduceOp};
use crate::cp::CopyMode;
use crate::policy;
use crate::segments::ALL_LANES;

/// A size-policy table as the Rust core looks calls up in it: Python's `PolicyTable` asks this
/// one, so both languages route a call the same way.
#[pyclass(name = "RouteTable", module = "symm_rs._native", frozen)]
pub(super) struct PyRouteTable(policy::RouteTable);

#[pymethods]
impl PyRouteTable {
    /// From `(collective, low, high)` rows (`[low, high)` bytes per rank, `high` None for
    /// unbounded).
    #[new]
    fn new(entries: Vec<(String, usize, Option<usize>)>) -> PyResult<Self> {
        Ok(Self(policy::RouteTable::new(&entries)?))
    }

    /// Whether a `kind` call of `nbytes` per rank goes to the window-less twin.
    fn to_twin(&self, kind: &str, nbytes: usize) -> PyResult<bool> {
        Ok(self.0.to_twin(CollectiveKind::parse(kind, "sum")?, nbytes))
    }
}

impl PyRouteTable {
    pub(super) fn table(&self) -> &policy::RouteTable {
        &self.0
    }
}

/// `op` checked against the reductions (an alias resolves to its name), for Python code that
/// validates before anything launches.
#[pyfunction]
fn reduce_op(op: &str) -> PyResult<&'static str> {
    Ok(ReduceOp::parse(op)?.name())
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let collectives = CollectiveKind::ALL.map(CollectiveKind::name);
    m.add("COLLECTIVES", PyTuple::new(py, collectives)?)?;
    m.add(
        "REDUCE_OPS",
        PyTuple::new(py, ReduceOp::ALL.map(|(n, _)| n))?,
    )?;
    m.add(
        "NCCL_DTYPE_NAMES",
        PyTuple::new(py, DataType::TORCH_NAMES.map(|(n, _)| n))?,
    )?;
    m.add("CP_COPY_MODES", PyTuple::new(py, CopyMode::NAMES)?)?;
    m.add("ALL_LANES", ALL_LANES)?;
    m.add_class::<PyRouteTable>()?;
    m.add_function(wrap_pyfunction!(reduce_op, m)?)?;
    Ok(())
}
