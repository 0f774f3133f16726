//! torch tensors read into `TensorView`s: checked to be real tensors, in one pass of cheap calls.

use std::sync::Mutex;

use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::collective::{CollectiveKind, DataType, TensorView};
use crate::handles::DevicePtr;

/// torch's dtype objects are singletons, so each is named once (by `str`) and afterwards
/// found by identity. The strong references keep an address from being reused by another
/// object; the cap bounds what odd duck-typed dtypes can add.
static DTYPES: Mutex<Vec<(Py<PyAny>, DataType)>> = Mutex::new(Vec::new());
const DTYPE_CACHE_CAP: usize = 64;

fn data_type(dtype: &Bound<'_, PyAny>) -> PyResult<DataType> {
    let cached = |cache: &Vec<(Py<PyAny>, DataType)>| {
        cache
            .iter()
            .find(|(known, _)| known.as_ptr() == dtype.as_ptr())
            .map(|(_, d)| *d)
    };
    if let Some(found) = cached(&DTYPES.lock().unwrap_or_else(|p| p.into_inner())) {
        return Ok(found);
    }
    // Not under the lock: `str` runs Python code.
    let found = DataType::from_torch_name(&dtype.str()?.to_string())?;
    let mut cache = DTYPES.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() < DTYPE_CACHE_CAP && cached(&cache).is_none() {
        cache.push((dtype.clone().unbind(), found));
    }
    Ok(found)
}

/// `torch.Tensor`, taken once. The pointer NCCL is given comes from the tensor, so only a real
/// tensor (or a subclass) may supply it: an object that merely has a tensor's methods could
/// name any address.
static TENSOR_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn require_tensor(name: &str, tensor: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tensor.py();
    let tensor_type = TENSOR_TYPE.get_or_try_init(py, || -> PyResult<_> {
        Ok(py
            .import("torch")?
            .getattr("Tensor")?
            .cast_into::<PyType>()?
            .unbind())
    })?;
    if tensor.is_instance(tensor_type.bind(py))? {
        return Ok(());
    }
    let type_name = tensor
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string());
    Err(PyTypeError::new_err(format!(
        "{name} must be a torch.Tensor, got {type_name}"
    )))
}

/// Reads what a collective needs from a torch tensor in one pass of five cheap calls, after
/// checking that it is one.
pub(super) fn tensor_view(name: &str, tensor: &Bound<'_, PyAny>) -> PyResult<TensorView> {
    let py = tensor.py();
    require_tensor(name, tensor)?;
    let not_a_tensor = |e: PyErr| {
        if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) {
            let type_name = tensor
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string());
            PyTypeError::new_err(format!("{name} must be a torch.Tensor, got {type_name}"))
        } else {
            e
        }
    };
    let ptr: usize = tensor
        .call_method0(intern!(py, "data_ptr"))
        .map_err(not_a_tensor)?
        .extract()?;
    let device: i64 = tensor
        .call_method0(intern!(py, "get_device"))
        .map_err(not_a_tensor)?
        .extract()?;
    Ok(TensorView {
        ptr: DevicePtr::new(ptr),
        numel: tensor.call_method0(intern!(py, "numel"))?.extract()?,
        dtype: data_type(&tensor.getattr(intern!(py, "dtype"))?)?,
        // torch's get_device(): the CUDA index, or -1 for a CPU tensor.
        device: i32::try_from(device).ok().filter(|d| *d >= 0),
        contiguous: tensor
            .call_method0(intern!(py, "is_contiguous"))?
            .extract()?,
    })
}

/// What a launch needs from Python: the collective and both tensors, read and checked.
pub(super) fn launch_args(
    kind: &str,
    op: &str,
    out: &Bound<'_, PyAny>,
    inp: &Bound<'_, PyAny>,
) -> PyResult<(CollectiveKind, TensorView, TensorView)> {
    Ok((
        CollectiveKind::parse(kind, op)?,
        tensor_view("out", out)?,
        tensor_view("inp", inp)?,
    ))
}
