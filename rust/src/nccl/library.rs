//! Finding and opening the one libnccl this process uses.
//!
//! A communicator pointer is only valid inside the library that created it, so the order is:
//! the libnccl already mapped into the process (torch's), then the path the user preferred
//! (`SYMM_RS_NCCL_LIBRARY`, which the Python layer reads), then the NVIDIA wheel paths the Python
//! layer found, then the system's. Nothing here reads the environment.

use std::ffi::{c_int, c_void, CStr, OsStr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use libloading::os::unix::Library;

use super::sys::{self, Symbols};
use super::version::NcclVersion;
use crate::error::{Error, Result};

/// Where a preferred path comes from, for messages (the Python layer reads the variable).
pub const PREFERRED_FROM: &str = "SYMM_RS_NCCL_LIBRARY";
const SONAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// How the library in use was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    AlreadyLoaded,
    Explicit,
    Preferred,
    Wheel,
    System,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::AlreadyLoaded => "already loaded in this process",
            Origin::Explicit => "opened by path",
            Origin::Preferred => PREFERRED_FROM,
            Origin::Wheel => "NVIDIA NCCL wheel",
            Origin::System => "system library path",
        }
    }
}

/// An opened libnccl with its resolved symbols. Lives for the whole process once loaded.
pub struct Nccl {
    pub(super) symbols: Symbols,
    path: PathBuf,
    origin: Origin,
    version: NcclVersion,
    notes: Vec<String>,
    // Keeps the mapping alive; the symbols above point into it.
    _library: Library,
}

impl Nccl {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn version(&self) -> NcclVersion {
        self.version
    }

    /// Things the user should know about how the library was chosen (an ignored override, say).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Opens `path` (anything `dlopen` accepts) as a standalone handle, for tests and `doctor`.
    pub fn open_path(path: &Path) -> Result<Self> {
        let library = open(path.as_os_str(), libc::RTLD_NOW | libc::RTLD_LOCAL).map_err(|e| {
            Error::LibraryNotFound {
                tried: format!("{} ({})", path.display(), describe(&e)),
            }
        })?;
        Self::from_library(library, path.as_os_str(), Origin::Explicit, Vec::new())
    }

    /// `opened_as` names the library in errors until the loader tells us its real path.
    fn from_library(
        library: Library,
        opened_as: &OsStr,
        origin: Origin,
        notes: Vec<String>,
    ) -> Result<Self> {
        let mut path = PathBuf::from(opened_as);
        let get_version: sys::GetVersionFn = required(&library, &path, b"ncclGetVersion\0")?;
        if let Some(found) = path_of(get_version as *const c_void) {
            path = found;
        }
        let get_error_string = required(&library, &path, b"ncclGetErrorString\0")?;
        let symbols = Symbols {
            get_version,
            get_error_string,
            get_last_error: optional(&library, b"ncclGetLastError\0"),
            mem_alloc: optional(&library, b"ncclMemAlloc\0"),
            mem_free: optional(&library, b"ncclMemFree\0"),
            window_register: optional(&library, b"ncclCommWindowRegister\0"),
            window_deregister: optional(&library, b"ncclCommWindowDeregister\0"),
            get_unique_id: optional(&library, b"ncclGetUniqueId\0"),
            comm_init_rank: optional(&library, b"ncclCommInitRank\0"),
            comm_destroy: optional(&library, b"ncclCommDestroy\0"),
            comm_split: optional(&library, b"ncclCommSplit\0"),
            comm_count: optional(&library, b"ncclCommCount\0"),
            comm_cu_device: optional(&library, b"ncclCommCuDevice\0"),
            comm_user_rank: optional(&library, b"ncclCommUserRank\0"),
            all_gather: optional(&library, b"ncclAllGather\0"),
            all_reduce: optional(&library, b"ncclAllReduce\0"),
            reduce_scatter: optional(&library, b"ncclReduceScatter\0"),
            group_start: optional(&library, b"ncclGroupStart\0"),
            group_end: optional(&library, b"ncclGroupEnd\0"),
            comm_get_async_error: optional(&library, b"ncclCommGetAsyncError\0"),
            comm_abort: optional(&library, b"ncclCommAbort\0"),
            comm_query_properties: optional(&library, b"ncclCommQueryProperties\0"),
        };
        let mut code: c_int = 0;
        // SAFETY: ncclGetVersion only writes one int through the pointer we own.
        let status = unsafe { (symbols.get_version)(&mut code) };
        if status != sys::NCCL_SUCCESS {
            return Err(Error::MissingSymbol {
                path,
                symbol: "ncclGetVersion",
                reason: format!("it returned error {status}"),
            });
        }
        Ok(Self {
            symbols,
            path,
            origin,
            version: NcclVersion::from_code(code),
            notes,
            _library: library,
        })
    }
}

static NCCL: OnceLock<Nccl> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());
/// What the Python layer last asked to load, kept so that a lazy load (an allocator plug called
/// first) tries the same candidates and, when they fail, says the same.
static ASKED: Mutex<Option<Candidates>> = Mutex::new(None);

/// What the first load may open besides a libnccl already in the process.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    /// The user's choice (`SYMM_RS_NCCL_LIBRARY`), tried before the wheels.
    pub preferred: Option<PathBuf>,
    /// The NVIDIA wheels' libraries the Python layer found on `sys.path`.
    pub wheels: Vec<PathBuf>,
}

/// The process-wide NCCL, loading it on first use. `candidates` are only consulted by the first
/// successful load.
pub fn load(candidates: &Candidates) -> Result<&'static Nccl> {
    if let Some(nccl) = NCCL.get() {
        return Ok(nccl);
    }
    let _serialised = LOADING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(nccl) = NCCL.get() {
        return Ok(nccl);
    }
    *ASKED.lock().unwrap_or_else(|p| p.into_inner()) = Some(candidates.clone());
    let nccl = discover(candidates)?;
    Ok(NCCL.get_or_init(|| nccl))
}

/// The process-wide NCCL if it has been loaded, else a load of the candidates last asked for
/// (none: the library already in the process, or the system's).
pub fn get() -> Result<&'static Nccl> {
    if let Some(nccl) = NCCL.get() {
        return Ok(nccl);
    }
    let asked = ASKED.lock().unwrap_or_else(|p| p.into_inner()).clone();
    load(&asked.unwrap_or_default())
}

/// The library, only if it was already loaded (never loads).
pub fn loaded() -> Option<&'static Nccl> {
    NCCL.get()
}

fn discover(candidates: &Candidates) -> Result<Nccl> {
    let mut tried = Vec::new();
    let override_path = candidates
        .preferred
        .as_ref()
        .filter(|p| !p.as_os_str().is_empty());

    for soname in SONAMES {
        if let Ok(library) = open(soname.as_ref(), libc::RTLD_NOW | libc::RTLD_NOLOAD) {
            let mut notes = Vec::new();
            if let Some(wanted) = &override_path {
                notes.push(format!(
                    "{PREFERRED_FROM}={} was not used: this process already has {soname} loaded \
                     (torch's), and a communicator is only valid inside the library that made it",
                    wanted.display()
                ));
            }
            return Nccl::from_library(library, soname.as_ref(), Origin::AlreadyLoaded, notes);
        }
    }
    tried.push("libnccl.so.2 already loaded in the process (none)".to_owned());

    if let Some(wanted) = override_path {
        return match open(wanted.as_os_str(), libc::RTLD_NOW | libc::RTLD_LOCAL) {
            Ok(library) => {
                Nccl::from_library(library, wanted.as_os_str(), Origin::Preferred, Vec::new())
            }
            Err(e) => Err(Error::LibraryNotFound {
                tried: format!("{PREFERRED_FROM}={} ({})", wanted.display(), describe(&e)),
            }),
        };
    }

    for candidate in &candidates.wheels {
        match open(candidate.as_os_str(), libc::RTLD_NOW | libc::RTLD_LOCAL) {
            Ok(library) => {
                return Nccl::from_library(
                    library,
                    candidate.as_os_str(),
                    Origin::Wheel,
                    Vec::new(),
                )
            }
            Err(e) => tried.push(format!("{} ({})", candidate.display(), describe(&e))),
        }
    }

    for soname in SONAMES {
        match open(soname.as_ref(), libc::RTLD_NOW | libc::RTLD_LOCAL) {
            Ok(library) => {
                return Nccl::from_library(library, soname.as_ref(), Origin::System, Vec::new())
            }
            Err(e) => tried.push(format!("{soname} on the system path ({})", describe(&e))),
        }
    }
    Err(Error::LibraryNotFound {
        tried: tried.join("; "),
    })
}

/// libloading's `Display` says only "dlopen failed"; the loader's reason is in `source()`.
fn describe(error: &libloading::Error) -> String {
    match std::error::Error::source(error) {
        Some(reason) => format!("{error}: {reason}"),
        None => error.to_string(),
    }
}

fn open(name: &OsStr, flags: c_int) -> std::result::Result<Library, libloading::Error> {
    // SAFETY: loading libnccl runs its initialisers, which have no preconditions on us.
    unsafe { Library::open(Some(name), flags) }
}

fn required<T: Copy>(library: &Library, path: &Path, name: &'static [u8]) -> Result<T> {
    // SAFETY: every `T` used here is the exact signature nccl.h declares for `name`.
    match unsafe { library.get::<T>(name) } {
        Ok(symbol) => Ok(*symbol),
        Err(e) => Err(Error::MissingSymbol {
            path: path.to_owned(),
            symbol: symbol_name(name),
            reason: describe(&e),
        }),
    }
}

fn optional<T: Copy>(library: &Library, name: &'static [u8]) -> Option<T> {
    // SAFETY: as in `required`, the signature matches nccl.h.
    unsafe { library.get::<T>(name) }.ok().map(|symbol| *symbol)
}

fn symbol_name(name: &'static [u8]) -> &'static str {
    CStr::from_bytes_with_nul(name)
        .ok()
        .and_then(|c| c.to_str().ok())
        .unwrap_or("<symbol>")
}

/// The file a loaded symbol lives in, as the dynamic loader reports it.
fn path_of(address: *const c_void) -> Option<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads `address` as a number and fills `info`, which we own.
    let found = unsafe { libc::dladdr(address, info.as_mut_ptr()) };
    if found == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so `info` was written.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader, alive while mapped.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let path = PathBuf::from(name.to_string_lossy().into_owned());
    Some(std::fs::canonicalize(&path).unwrap_or(path))
}
