//! `Result`-returning wrappers over the raw symbols. Addresses cross this layer as the typed
//! handles of `crate::handles`; this is the one place they become the raw pointers of `nccl.h`.

use std::ffi::{c_int, c_void, CStr};
use std::time::{Duration, Instant};

use super::collectives::in_group;
use super::library::Nccl;
use super::sys::{self, NcclComm, NcclUniqueId};
use super::version::NcclVersion;
use crate::error::{Error, Result};
use crate::handles::{CommPtr, DevicePtr, WindowHandle};

/// How long symm_rs waits for a non-blocking communicator to finish one of its calls.
const IN_PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);

/// Human names for `ncclResult_t`, so an error says what kind of failure it was.
pub fn result_name(code: c_int) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        _ => "unknown ncclResult_t",
    }
}

impl Nccl {
    pub(super) fn check(
        &self,
        call: &'static str,
        code: c_int,
        comm: Option<CommPtr>,
    ) -> Result<()> {
        if code == sys::NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let mut message = cstr_or_empty(unsafe { (self.symbols.get_error_string)(code) });
        if let Some(last_error) = self.symbols.get_last_error {
            // NCCL keeps the last error per thread and accepts NULL for calls with no
            // communicator (ncclMemAlloc); the text is where it explains *why* (e.g. OOM).
            let comm = comm.map_or(std::ptr::null_mut(), raw_comm);
            // SAFETY: comm is the communicator the failed call used, or NULL; NCCL returns a
            // string it owns.
            let detail = cstr_or_empty(unsafe { last_error(comm) });
            if !detail.is_empty() {
                message = format!("{message}; {detail}");
            }
        }
        Err(Error::Nccl {
            call,
            code,
            code_name: result_name(code),
            message,
        })
    }

    fn need<T: Copy>(
        &self,
        symbol: Option<T>,
        name: &'static str,
        needed: NcclVersion,
        needed_text: &'static str,
    ) -> Result<T> {
        match symbol {
            Some(f) => Ok(f),
            None if self.version() < needed => Err(Error::LibraryTooOld {
                path: self.path().to_owned(),
                found: self.version().to_string(),
                needed: needed_text,
                feature: name,
            }),
            None => Err(Error::MissingSymbol {
                path: self.path().to_owned(),
                symbol: name,
                reason: "not exported by this build".to_owned(),
            }),
        }
    }

    pub(super) fn basic<T: Copy>(&self, symbol: Option<T>, name: &'static str) -> Result<T> {
        self.need(symbol, name, NcclVersion::new(2, 0, 0), "2.0.0")
    }

    /// Ok when this library can register symmetric windows; otherwise the reason it cannot.
    pub fn require_windows(&self) -> Result<()> {
        self.window_fns().map(|_| ())
    }

    fn window_fns(&self) -> Result<(sys::WindowRegisterFn, sys::WindowDeregisterFn)> {
        let version = self.version();
        if version < NcclVersion::WINDOWS {
            return Err(Error::LibraryTooOld {
                path: self.path().to_owned(),
                found: version.to_string(),
                needed: NcclVersion::WINDOWS_TEXT,
                feature: "symmetric windows (ncclCommWindowRegister)",
            });
        }
        let register = self.need(
            self.symbols.window_register,
            "ncclCommWindowRegister",
            NcclVersion::WINDOWS,
            NcclVersion::WINDOWS_TEXT,
        )?;
        let deregister = self.need(
            self.symbols.window_deregister,
            "ncclCommWindowDeregister",
            NcclVersion::WINDOWS,
            NcclVersion::WINDOWS_TEXT,
        )?;
        Ok((register, deregister))
    }

    /// `ncclMemAlloc` on the current device. Never returns a pointer NCCL did not vouch for.
    pub fn mem_alloc(&self, size: usize) -> Result<DevicePtr> {
        let alloc = self.need(
            self.symbols.mem_alloc,
            "ncclMemAlloc",
            NcclVersion::MEM_ALLOC,
            NcclVersion::MEM_ALLOC_TEXT,
        )?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: ncclMemAlloc writes one pointer through `&mut ptr`, which we own.
        let code = unsafe { alloc(&mut ptr, size) };
        self.check("ncclMemAlloc", code, None)?;
        if ptr.is_null() {
            return Err(Error::Nccl {
                call: "ncclMemAlloc",
                code,
                code_name: result_name(code),
                message: format!("reported success for {size} bytes but returned NULL"),
            });
        }
        Ok(DevicePtr::new(ptr as usize))
    }

    /// `ncclMemFree`.
    ///
    /// # Safety
    /// `ptr` must come from `ncclMemAlloc` of this library and not have been freed.
    pub unsafe fn mem_free(&self, ptr: DevicePtr) -> Result<()> {
        let free = self.need(
            self.symbols.mem_free,
            "ncclMemFree",
            NcclVersion::MEM_ALLOC,
            NcclVersion::MEM_ALLOC_TEXT,
        )?;
        // SAFETY: the caller guarantees `ptr` is a live ncclMemAlloc allocation.
        let code = unsafe { free(ptr.addr() as *mut c_void) };
        self.check("ncclMemFree", code, None)
    }

    /// Registers `[ptr, ptr + size)` as a symmetric window. `None` when NCCL handed back a NULL
    /// window (symmetric support switched off): the caller decides that is an error. Refused
    /// inside `group_start`/`group_end`, where NCCL would write the handle only at the group's
    /// end; a non-blocking communicator is waited for.
    ///
    /// # Safety
    /// `comm` must be a live communicator of this library; collective over its ranks.
    pub unsafe fn window_register(
        &self,
        comm: CommPtr,
        ptr: DevicePtr,
        size: usize,
    ) -> Result<Option<WindowHandle>> {
        let (register, _) = self.window_fns()?;
        if in_group() {
            return Err(Error::Usage(
                "cannot register symmetric windows inside symm_rs.nccl_group(): NCCL writes the \
                 window only when the group ends; leave the group first"
                    .to_owned(),
            ));
        }
        // NCCL may write the handle after this call returns (a group opened by another
        // library, a non-blocking communicator), so the slot lives on the heap and is only
        // freed once NCCL has certainly written it.
        let slot: *mut sys::NcclWindow = Box::into_raw(Box::new(std::ptr::null_mut()));
        // SAFETY: the caller guarantees `comm` is live; `slot` is a valid, heap-allocated
        // out-pointer that outlives every write NCCL may make to it (see below).
        let code = unsafe {
            register(
                raw_comm(comm),
                ptr.addr() as *mut c_void,
                size,
                slot,
                sys::NCCL_WIN_COLL_SYMMETRIC,
            )
        };
        let outcome = match code {
            sys::NCCL_IN_PROGRESS => self.wait_for(comm, "ncclCommWindowRegister"),
            code => self.check("ncclCommWindowRegister", code, Some(comm)),
        };
        // On failure the slot is left allocated: a call that timed out may still complete.
        outcome?;
        // SAFETY: `slot` came from Box::into_raw above and NCCL has finished with it.
        let window = unsafe { *slot };
        if window.is_null() {
            // Inside a group another library opened, NCCL writes the handle at that group's
            // end: the slot is deliberately leaked (one pointer) rather than freed under it.
            return Ok(None);
        }
        // SAFETY: as above; reclaimed exactly once.
        drop(unsafe { Box::from_raw(slot) });
        Ok(Some(WindowHandle::new(window as usize)))
    }

    /// # Safety
    /// `comm` must be live and `window` a handle it returned that has not been deregistered.
    pub unsafe fn window_deregister(&self, comm: CommPtr, window: WindowHandle) -> Result<()> {
        let (_, deregister) = self.window_fns()?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe { deregister(raw_comm(comm), window.addr() as sys::NcclWindow) };
        match code {
            sys::NCCL_IN_PROGRESS => self.wait_for(comm, "ncclCommWindowDeregister"),
            code => self.check("ncclCommWindowDeregister", code, Some(comm)),
        }
    }

    /// Polls a non-blocking communicator until the call that returned `ncclInProgress` ends.
    fn wait_for(&self, comm: CommPtr, call: &'static str) -> Result<()> {
        let get = self.basic(self.symbols.comm_get_async_error, "ncclCommGetAsyncError")?;
        let deadline = Instant::now() + IN_PROGRESS_TIMEOUT;
        loop {
            let mut state = sys::NCCL_IN_PROGRESS;
            // SAFETY: `comm` is live (the caller's guarantee for the call being waited for);
            // NCCL writes one result code we own.
            let code = unsafe { get(raw_comm(comm), &mut state) };
            self.check("ncclCommGetAsyncError", code, Some(comm))?;
            if state != sys::NCCL_IN_PROGRESS {
                return self.check(call, state, Some(comm));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    call,
                    seconds: IN_PROGRESS_TIMEOUT.as_secs_f64(),
                    what: format!("communicator {comm} is still in progress"),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn comm_query(
        &self,
        f: Option<sys::CommIntQueryFn>,
        name: &'static str,
        comm: CommPtr,
    ) -> Result<i32> {
        let f = self.basic(f, name)?;
        ensure_communicator_readable(comm, name)?;
        let mut value: c_int = -1;
        // SAFETY: `comm` is readable memory and the caller vouches it is live (a
        // `Communicator`, or a group the Python layer resolved); NCCL writes one int we own.
        let code = unsafe { f(raw_comm(comm), &mut value) };
        self.check(name, code, Some(comm))?;
        Ok(value)
    }

    /// The CUDA device a communicator runs on.
    pub fn comm_device(&self, comm: CommPtr) -> Result<i32> {
        self.comm_query(self.symbols.comm_cu_device, "ncclCommCuDevice", comm)
    }

    /// How many ranks a communicator has.
    pub fn comm_count(&self, comm: CommPtr) -> Result<i32> {
        self.comm_query(self.symbols.comm_count, "ncclCommCount", comm)
    }

    /// This process's rank in a communicator.
    pub fn comm_user_rank(&self, comm: CommPtr) -> Result<i32> {
        self.comm_query(self.symbols.comm_user_rank, "ncclCommUserRank", comm)
    }

    pub fn get_unique_id(&self) -> Result<NcclUniqueId> {
        let f = self.basic(self.symbols.get_unique_id, "ncclGetUniqueId")?;
        let mut id = NcclUniqueId {
            internal: [0; sys::NCCL_UNIQUE_ID_BYTES],
        };
        // SAFETY: NCCL fills the 128-byte id we own.
        let code = unsafe { f(&mut id) };
        self.check("ncclGetUniqueId", code, None)?;
        Ok(id)
    }

    /// Creates a communicator on the current device. Collective over `nranks` processes.
    pub fn comm_init_rank(&self, nranks: i32, id: NcclUniqueId, rank: i32) -> Result<CommPtr> {
        let f = self.basic(self.symbols.comm_init_rank, "ncclCommInitRank")?;
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: NCCL writes the new communicator through a pointer we own.
        let code = unsafe { f(&mut comm, nranks, id, rank) };
        self.check("ncclCommInitRank", code, None)?;
        if comm.is_null() {
            return Err(Error::Nccl {
                call: "ncclCommInitRank",
                code,
                code_name: result_name(code),
                message: "reported success but returned a NULL communicator".to_owned(),
            });
        }
        Ok(CommPtr::new(comm as usize))
    }

    /// `ncclCommSplit(comm, 0, rank)`: a new communicator over the same ranks in the same order,
    /// with the parent's configuration and none of its windows. Collective over `comm`'s ranks
    /// and needs no unique id. A non-blocking parent is waited for.
    ///
    /// # Safety
    /// `comm` must be a live communicator of this library.
    pub unsafe fn comm_split(&self, comm: CommPtr, key: i32) -> Result<CommPtr> {
        let f = self.need(
            self.symbols.comm_split,
            "ncclCommSplit",
            NcclVersion::SPLIT,
            NcclVersion::SPLIT_TEXT,
        )?;
        if in_group() {
            return Err(Error::Usage(
                "cannot split a communicator inside symm_rs.nccl_group(): NCCL writes the new \
                 communicator only when the group ends; leave the group first"
                    .to_owned(),
            ));
        }
        let mut child: NcclComm = std::ptr::null_mut();
        // SAFETY: the caller guarantees `comm` is live; NCCL writes the new communicator
        // through a pointer we own; a NULL config means "inherit the parent's".
        let code = unsafe { f(raw_comm(comm), 0, key, &mut child, std::ptr::null_mut()) };
        match code {
            sys::NCCL_IN_PROGRESS => self.wait_for(comm, "ncclCommSplit")?,
            code => self.check("ncclCommSplit", code, Some(comm))?,
        }
        if child.is_null() {
            return Err(Error::Nccl {
                call: "ncclCommSplit",
                code,
                code_name: result_name(code),
                message: "reported success but returned a NULL communicator".to_owned(),
            });
        }
        Ok(CommPtr::new(child as usize))
    }

    /// `ncclCommAbort`: frees the communicator without waiting for peers or pending work.
    ///
    /// # Safety
    /// `comm` must be live and never used again.
    pub unsafe fn comm_abort(&self, comm: CommPtr) -> Result<()> {
        let f = self.basic(self.symbols.comm_abort, "ncclCommAbort")?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe { f(raw_comm(comm)) };
        self.check("ncclCommAbort", code, None)
    }

    /// NCCL's own answer to "can this communicator run symmetric kernels"
    /// (`ncclCommQueryProperties(...).deviceApiSupport`, which is `comm->symmetricSupport`),
    /// or `None` where this NCCL has no such query. Local: no traffic between ranks.
    pub fn symmetric_support(&self, comm: CommPtr) -> Result<Option<bool>> {
        let Some(f) = self.symbols.comm_query_properties else {
            return Ok(None);
        };
        let version = self.version();
        if version < NcclVersion::PROPERTIES {
            return Ok(None);
        }
        ensure_communicator_readable(comm, "ncclCommQueryProperties")?;
        let asked = version.min(NcclVersion::PROPERTIES_ASKED);
        let mut props = sys::NcclCommProperties {
            size: std::mem::size_of::<sys::NcclCommProperties>(),
            magic: sys::NCCL_API_MAGIC,
            version: asked.code(),
            rank: -1,
            n_ranks: -1,
            cuda_dev: -1,
            nvml_dev: -1,
            device_api_support: false,
            multimem_support: false,
            gin_type: 0,
            n_lsa_teams: 0,
            host_rma_support: false,
            railed_gin_type: 0,
        };
        // SAFETY: `comm` is readable and the caller vouches it is live; NCCL fills the struct
        // we own, no further than the `size` we give it.
        let code = unsafe { f(raw_comm(comm), &mut props) };
        self.check("ncclCommQueryProperties", code, Some(comm))?;
        Ok(Some(props.device_api_support))
    }

    /// # Safety
    /// `comm` must be live and never used again.
    pub unsafe fn comm_destroy(&self, comm: CommPtr) -> Result<()> {
        let f = self.basic(self.symbols.comm_destroy, "ncclCommDestroy")?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe { f(raw_comm(comm)) };
        self.check("ncclCommDestroy", code, None)
    }
}

pub(super) fn raw_comm(comm: CommPtr) -> NcclComm {
    comm.addr() as NcclComm
}

/// A communicator address from Python is just an int. NCCL checks a magic number at its start,
/// but reading an unmapped address would crash the process first; copying those bytes through
/// the kernel turns that crash into an error.
fn ensure_communicator_readable(comm: CommPtr, call: &'static str) -> Result<()> {
    if comm.is_null() {
        return Err(Error::invalid_argument(format!(
            "{call}: the communicator is NULL (0); pass a live ncclComm_t"
        )));
    }
    let mut probe = [0u8; 8];
    let local = libc::iovec {
        iov_base: probe.as_mut_ptr().cast(),
        iov_len: probe.len(),
    };
    let remote = libc::iovec {
        iov_base: comm.addr() as *mut c_void,
        iov_len: probe.len(),
    };
    // SAFETY: reads 8 bytes of our own address space into a local buffer; the kernel reports
    // EFAULT instead of faulting when `comm` is not mapped.
    let copied = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if copied != probe.len() as isize {
        return Err(Error::invalid_argument(format!(
            "{call}: {comm} is not a live ncclComm_t (that address is not readable memory)"
        )));
    }
    Ok(())
}

fn cstr_or_empty(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: NCCL returns NUL-terminated strings that outlive this call.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}
