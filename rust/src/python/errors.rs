//! `Error` becomes a Python exception here, once. The classes are declared in Python, in
//! `symm_rs.errors`, with every other exception and warning symm_rs raises; they are imported
//! once, the first time one is raised.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

use crate::error::Error;

/// The classes of `symm_rs.errors` that Rust raises.
#[derive(Clone, Copy)]
pub(super) enum Class {
    SymmetricMemory,
    NcclLibrary,
    Nccl,
    Registration,
}

const NAMES: [&str; 4] = [
    "SymmetricMemoryError",
    "NcclLibraryError",
    "NcclError",
    "RegistrationError",
];

static CLASSES: PyOnceLock<Option<[Py<PyType>; 4]>> = PyOnceLock::new();

fn load(py: Python<'_>) -> PyResult<[Py<PyType>; 4]> {
    let module = py.import("symm_rs.errors")?;
    let class = |name: &str| -> PyResult<Py<PyType>> {
        Ok(module.getattr(name)?.cast_into::<PyType>()?.unbind())
    };
    Ok([
        class(NAMES[0])?,
        class(NAMES[1])?,
        class(NAMES[2])?,
        class(NAMES[3])?,
    ])
}

/// A `class` error saying `message`. Should `symm_rs.errors` not import, the message still
/// reaches the caller, as a `RuntimeError`.
pub(super) fn new_err(py: Python<'_>, class: Class, message: String) -> PyErr {
    match CLASSES.get_or_init(py, || load(py).ok()) {
        Some(classes) => PyErr::from_type(classes[class as usize].bind(py).clone(), message),
        None => PyRuntimeError::new_err(message),
    }
}

/// `symm_rs.errors.SymmetricMemoryError(message)`.
pub(super) fn symmetric_memory_error(py: Python<'_>, message: impl Into<String>) -> PyErr {
    new_err(py, Class::SymmetricMemory, message.into())
}

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        let message = error.to_string();
        let class = match error {
            Error::LibraryNotFound { .. }
            | Error::MissingSymbol { .. }
            | Error::LibraryTooOld { .. } => Class::NcclLibrary,
            Error::Nccl { .. } => Class::Nccl,
            Error::NullWindow { .. } => Class::Registration,
            Error::Cuda { .. }
            | Error::SegmentLeaked { .. }
            | Error::Usage(_)
            | Error::Timeout { .. } => Class::SymmetricMemory,
            Error::InvalidType(_) => return PyTypeError::new_err(message),
            Error::InvalidArgument(_) | Error::Closed(_) => return PyValueError::new_err(message),
        };
        Python::attach(|py| new_err(py, class, message))
    }
}

/// `result[key]` on a typed result (`type_name`, shown as its `as_dict`): the value, with a
/// warning that dict-style access is deprecated (one release: use the attribute `.key`).
///
/// Raises:
///     KeyError: `key` names no field.
pub(super) fn deprecated_item<'py>(
    as_dict: Bound<'py, PyDict>,
    type_name: &str,
    key: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let py = as_dict.py();
    let message = format!(
        "{type_name}[{key:?}] is deprecated and goes in the next release; use the attribute \
         .{key}"
    );
    let message = std::ffi::CString::new(message).unwrap_or_default();
    let category = py.get_type::<pyo3::exceptions::PyDeprecationWarning>();
    PyErr::warn(py, &category, &message, 2)?;
    as_dict
        .get_item(key)?
        .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(key.to_owned()))
}
