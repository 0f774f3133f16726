//! Which libnccl the process uses, described as a typed `LibraryInfo`.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::deprecated_item;
use crate::nccl::{self, Candidates};

/// The libnccl symm_rs uses (or one opened by path) and what it can do.
#[pyclass(name = "LibraryInfo", module = "symm_rs", frozen, get_all, eq)]
#[derive(PartialEq)]
pub(super) struct PyLibraryInfo {
    /// The file that was opened.
    path: String,
    /// How it was found: already loaded in the process, `SYMM_RS_NCCL_LIBRARY`, a wheel, ...
    origin: &'static str,
    /// `(major, minor, patch)`.
    version: (u32, u32, u32),
    /// `ncclGetVersion`'s code.
    version_code: u32,
    /// Whether it can register symmetric windows.
    windows_supported: bool,
    /// Why not, when it cannot.
    windows_problem: Option<String>,
    /// What the user should know about how it was chosen (an override that was ignored).
    notes: Vec<String>,
}

impl PyLibraryInfo {
    fn of(lib: &nccl::Nccl) -> Self {
        let version = lib.version();
        let windows = lib.require_windows();
        Self {
            path: lib.path().to_string_lossy().into_owned(),
            origin: lib.origin().as_str(),
            version: (version.major, version.minor, version.patch),
            version_code: version.code(),
            windows_supported: windows.is_ok(),
            windows_problem: windows.err().map(|e| e.to_string()),
            notes: lib.notes().to_vec(),
        }
    }
}

#[pymethods]
impl PyLibraryInfo {
    /// The same fields as a plain dict (for JSON).
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        out.set_item("path", &self.path)?;
        out.set_item("origin", self.origin)?;
        out.set_item("version", self.version)?;
        out.set_item("version_code", self.version_code)?;
        out.set_item("windows_supported", self.windows_supported)?;
        out.set_item("windows_problem", &self.windows_problem)?;
        out.set_item("notes", self.notes.clone())?;
        Ok(out)
    }

    /// `info["version"]`: the dict of earlier releases, deprecated for one release.
    fn __getitem__<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        deprecated_item(self.as_dict(py)?, "library_info()", key)
    }

    fn __repr__(&self) -> String {
        let (major, minor, patch) = self.version;
        format!(
            "LibraryInfo(path={:?}, origin={:?}, version=({major}, {minor}, {patch}), \
             windows_supported={})",
            self.path,
            self.origin,
            if self.windows_supported {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// Loads libnccl once per process (the one already in the process first, then `preferred`,
/// which Python reads from `SYMM_RS_NCCL_LIBRARY`, then the wheels, then the system's) and
/// describes it.
#[pyfunction]
#[pyo3(signature = (wheel_candidates = Vec::new(), preferred = None))]
fn load_nccl(
    py: Python<'_>,
    wheel_candidates: Vec<PathBuf>,
    preferred: Option<PathBuf>,
) -> PyResult<PyLibraryInfo> {
    let candidates = Candidates {
        preferred,
        wheels: wheel_candidates,
    };
    let lib = py.detach(|| nccl::load(&candidates))?;
    Ok(PyLibraryInfo::of(lib))
}

/// Opens one libnccl by path, independently of the process-wide one, and describes it.
#[pyfunction]
fn probe_nccl(path: PathBuf) -> PyResult<PyLibraryInfo> {
    let lib = nccl::Nccl::open_path(&path)?;
    let info = PyLibraryInfo::of(&lib);
    // The probe handle stays open: unloading a library that may have started threads is unsafe.
    std::mem::forget(lib);
    Ok(info)
}

pub(super) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLibraryInfo>()?;
    m.add_function(wrap_pyfunction!(load_nccl, m)?)?;
    m.add_function(wrap_pyfunction!(probe_nccl, m)?)?;
    Ok(())
}
