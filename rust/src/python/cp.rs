//! The PyO3 surface of the CP all-gather (`crate::cp`): Python allocates the gathered buffer
//! inside the symmetric context and the compact output; everything else is enqueued here.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::handles::Stream;
use super::tensors::tensor_view;
use crate::cp::{self, Buffers, CopyMode};
use crate::handles::CommPtr;

/// Token counts from Python, each an int >= 0.
fn counts_of(counts: &[i64]) -> PyResult<Vec<usize>> {
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            usize::try_from(n).map_err(|_| {
                PyValueError::new_err(format!("counts[{i}] is {n}; token counts must be >= 0"))
            })
        })
        .collect()
}

/// A tensor's shape (torch.Size is a tuple of ints).
fn shape_of(tensor: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    tensor.getattr("shape")?.extract()
}

/// Elements per token row: the product of `input`'s trailing dimensions, which `gathered` and
/// `output` must share (their token counts are checked against the plan in Rust).
fn row_elems(input: &[usize], others: &[(&str, Vec<usize>)]) -> PyResult<usize> {
    let Some((_, trailing)) = input.split_first() else {
        return Err(PyValueError::new_err(
            "input must have a token dimension (dim 0); got a 0-d tensor",
        ));
    };
    for (name, shape) in others {
        if shape.get(1..) != Some(trailing) {
            return Err(PyValueError::new_err(format!(
                "{name} has shape {shape:?}; its trailing dimensions must be input's \
                 {trailing:?}"
            )));
        }
    }
    trailing
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| PyValueError::new_err("input's row size overflows"))
}

/// `copy` (`"kernel"` or `"driver"`; the Python layer passes `SYMM_RS_CP_COPY`'s choice).
fn copy_mode(name: &str) -> PyResult<CopyMode> {
    CopyMode::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "copy must be one of {}; got '{name}'",
            CopyMode::NAMES.join(", ")
        ))
    })
}

/// Logs `message` on the `symm_rs` logger at WARNING. The gather is already enqueued, so a
/// failure to log is dropped rather than raised.
fn log_warning(py: Python<'_>, message: &str) {
    let logged = py
        .import("logging")
        .and_then(|logging| logging.call_method1("getLogger", ("symm_rs",)))
        .and_then(|logger| logger.call_method1("warning", (message,)));
    drop(logged);
}

/// Enqueues the CP all-gather on `stream` (`(cudaStream_t, device index)`): `input` into this
/// rank's slot of `gathered`, zeroed padding, an in-place all-gather on `comm`, and each rank's
/// rows compacted into `output` (which must be `None` exactly when no rank is padded). The
/// copies are issued as `copy` says (default: the kernel); returns how they were issued.
#[pyfunction]
#[pyo3(signature = (comm, rank, gathered, input, output, counts, stream, copy = "kernel"))]
#[allow(clippy::too_many_arguments)]
pub(super) fn cp_all_gather(
    py: Python<'_>,
    comm: CommPtr,
    rank: usize,
    gathered: &Bound<'_, PyAny>,
    input: &Bound<'_, PyAny>,
    output: Option<&Bound<'_, PyAny>>,
    counts: Vec<i64>,
    stream: Stream,
    copy: &str,
) -> PyResult<&'static str> {
    let mode = copy_mode(copy)?;
    let counts = counts_of(&counts)?;
    let buffers = Buffers {
        gathered: tensor_view("gathered", gathered)?,
        input: tensor_view("input", input)?,
        output: output.map(|o| tensor_view("output", o)).transpose()?,
    };
    let mut others = vec![("gathered", shape_of(gathered)?)];
    if let Some(out) = output {
        others.push(("output", shape_of(out)?));
    }
    let row = row_elems(&shape_of(input)?, &others)?;
    let done = py.detach(|| {
        cp::enqueue(
            comm,
            rank,
            &counts,
            row,
            &buffers,
            stream.ptr,
            Some(stream.device),
            mode,
        )
    })?;
    if let Some(warning) = &done.warning {
        log_warning(py, warning);
    }
    Ok(done.copies.name())
}

/// `(source row, destination row, rows)` of one compaction copy.
type RowCopy = (usize, usize, usize);

/// `(slot rows, compaction copies as (source row, destination row, rows))` for `rank` of
/// `len(counts)` ranks and rows of `row_bytes`: how `cp_all_gather` lays the buffers out. The
/// list is empty when no rank is padded (the gathered buffer is then the result).
/// The one slot-alignment rule (`cp::plan`): Python's own gather path asks it too.
#[pyfunction]
pub(super) fn cp_plan(
    rank: usize,
    counts: Vec<i64>,
    row_bytes: usize,
) -> PyResult<(usize, Vec<RowCopy>)> {
    let plan = cp::plan(rank, &counts_of(&counts)?, row_bytes)?;
    let copies = plan.compaction.iter().map(|c| (c.src, c.dst, c.rows));
    Ok((plan.slot_rows, copies.collect()))
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cp_all_gather, m)?)?;
    m.add_function(wrap_pyfunction!(cp_plan, m)?)?;
    Ok(())
}
