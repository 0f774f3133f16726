//! The PyO3 surface of `symm_rs._native`, one file per concern. Arguments are converted at the
//! boundary (handles as their types: `handles`), the GIL is released around anything that may
//! block in NCCL, and `Error` becomes a Python exception in one place (`errors`).
//!
//! - `tables`: the tables Python reads from Rust (collectives, reductions, dtypes, copy modes,
//!   the policy lookup);
//! - `library`: the libnccl in use (`LibraryInfo`); `stats`: the table's bookkeeping;
//! - `segments`: the segment table as Python drives it; `registration`: planned registrations,
//!   the route gate, the watchdog's view;
//! - `tensors` and `communicator`: torch tensors read for a launch, the Rust-owned communicator;
//! - `cp`: the CP all-gather;
//! - `context`, `groups`, `routing`, `rules`: `use_symmetric_memory`, its group cache, its
//!   routing, and the two Python functions it calls.

mod communicator;
mod context;
mod cp;
mod errors;
mod groups;
mod handles;
mod library;
mod registration;
mod routing;
mod rules;
mod segments;
mod stats;
mod tables;
mod tensors;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    tables::add_to(m)?;
    library::add_to(m)?;
    stats::add_to(m)?;
    segments::add_to(m)?;
    registration::add_to(m)?;
    communicator::add_to(m)?;
    cp::add_to(m)?;
    groups::add_to(m)?;
    routing::add_to(m)?;
    context::add_to(m)?;
    rules::add_to(m)?;
    Ok(())
}
