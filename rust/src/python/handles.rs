//! The typed addresses cross the PyO3 boundary as themselves: Python passes and receives plain
//! ints, and every function here takes a `CommPtr` or a `Stream`, never a bare `usize` it must
//! remember to wrap.

use std::convert::Infallible;

use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::handles::{CommPtr, StreamPtr};

impl<'a, 'py> FromPyObject<'a, 'py> for CommPtr {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Self::new(obj.extract::<usize>()?))
    }
}

impl<'py> IntoPyObject<'py> for CommPtr {
    type Target = PyInt;
    type Output = Bound<'py, PyInt>;
    type Error = Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        self.addr().into_pyobject(py)
    }
}

/// A CUDA stream as Python names it: `(cudaStream_t, device index)`.
#[derive(Clone, Copy)]
pub(super) struct Stream {
    pub ptr: StreamPtr,
    pub device: i32,
}

impl<'a, 'py> FromPyObject<'a, 'py> for Stream {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let (ptr, device): (usize, i32) = obj.extract()?;
        Ok(Self {
            ptr: StreamPtr::new(ptr),
            device,
        })
    }
}
