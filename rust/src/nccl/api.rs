//! `Result`-returning wrappers over the raw symbols. Pointers that cross into NCCL are plain
//! addresses (`usize`) at this layer: they come from Python or from our own table, and NCCL, not
//! Rust, owns what they point to.

use std::ffi::{c_int, c_void, CStr};

use super::library::Nccl;
use super::sys::{self, NcclComm, NcclUniqueId};
use super::version::NcclVersion;
use crate::error::{Error, Result};

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

/// The arguments of one collective, checked by the caller (the Communicator) beforehand.
#[derive(Debug, Clone, Copy)]
pub struct Collective {
    pub send: usize,
    pub recv: usize,
    pub count: usize,
    pub dtype: c_int,
    pub comm: usize,
    pub stream: usize,
}

impl Collective {
    pub fn new(
        send: usize,
        recv: usize,
        count: usize,
        dtype: c_int,
        comm: usize,
        stream: usize,
    ) -> Self {
        Self {
            send,
            recv,
            count,
            dtype,
            comm,
            stream,
        }
    }
}

impl Nccl {
    fn check(&self, call: &'static str, code: c_int, comm: Option<usize>) -> Result<()> {
        if code == sys::NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let mut message = cstr_or_empty(unsafe { (self.symbols.get_error_string)(code) });
        if let Some(last_error) = self.symbols.get_last_error {
            // NCCL keeps the last error per thread and accepts NULL for calls with no
            // communicator (ncclMemAlloc); the text is where it explains *why* (e.g. OOM).
            let comm = comm.unwrap_or(0) as NcclComm;
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

    fn basic<T: Copy>(&self, symbol: Option<T>, name: &'static str) -> Result<T> {
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
    pub fn mem_alloc(&self, size: usize) -> Result<usize> {
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
        Ok(ptr as usize)
    }

    /// `ncclMemFree`.
    ///
    /// # Safety
    /// `ptr` must come from `ncclMemAlloc` of this library and not have been freed.
    pub unsafe fn mem_free(&self, ptr: usize) -> Result<()> {
        let free = self.need(
            self.symbols.mem_free,
            "ncclMemFree",
            NcclVersion::MEM_ALLOC,
            NcclVersion::MEM_ALLOC_TEXT,
        )?;
        // SAFETY: the caller guarantees `ptr` is a live ncclMemAlloc allocation.
        let code = unsafe { free(ptr as *mut c_void) };
        self.check("ncclMemFree", code, None)
    }

    /// Registers `[ptr, ptr + size)` as a symmetric window. Returns the raw handle, which is 0
    /// when NCCL has symmetric support switched off: the caller decides that is an error.
    ///
    /// # Safety
    /// `comm` must be a live communicator of this library; collective over its ranks.
    pub unsafe fn window_register(&self, comm: usize, ptr: usize, size: usize) -> Result<usize> {
        let (register, _) = self.window_fns()?;
        let mut window: sys::NcclWindow = std::ptr::null_mut();
        // SAFETY: the caller guarantees `comm` is live; NCCL validates the buffer itself.
        let code = unsafe {
            register(
                comm as NcclComm,
                ptr as *mut c_void,
                size,
                &mut window,
                sys::NCCL_WIN_COLL_SYMMETRIC,
            )
        };
        self.check("ncclCommWindowRegister", code, Some(comm))?;
        Ok(window as usize)
    }

    /// # Safety
    /// `comm` must be live and `window` a handle it returned that has not been deregistered.
    pub unsafe fn window_deregister(&self, comm: usize, window: usize) -> Result<()> {
        let (_, deregister) = self.window_fns()?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe { deregister(comm as NcclComm, window as sys::NcclWindow) };
        self.check("ncclCommWindowDeregister", code, Some(comm))
    }

    fn comm_query(
        &self,
        f: Option<sys::CommIntQueryFn>,
        name: &'static str,
        comm: usize,
    ) -> Result<i32> {
        let f = self.basic(f, name)?;
        ensure_communicator_readable(comm, name)?;
        let mut value: c_int = -1;
        // SAFETY: `comm` is non-NULL and the caller vouches it is live (see `Communicator`
        // and the group resolution in Python); NCCL writes one int we own.
        let code = unsafe { f(comm as NcclComm, &mut value) };
        self.check(name, code, Some(comm))?;
        Ok(value)
    }

    /// The CUDA device a communicator runs on.
    pub fn comm_device(&self, comm: usize) -> Result<i32> {
        self.comm_query(self.symbols.comm_cu_device, "ncclCommCuDevice", comm)
    }

    /// How many ranks a communicator has.
    pub fn comm_count(&self, comm: usize) -> Result<i32> {
        self.comm_query(self.symbols.comm_count, "ncclCommCount", comm)
    }

    /// This process's rank in a communicator.
    pub fn comm_user_rank(&self, comm: usize) -> Result<i32> {
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
    pub fn comm_init_rank(&self, nranks: i32, id: NcclUniqueId, rank: i32) -> Result<usize> {
        let f = self.basic(self.symbols.comm_init_rank, "ncclCommInitRank")?;
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: NCCL writes the new communicator through a pointer we own.
        let code = unsafe { f(&mut comm, nranks, id, rank) };
        self.check("ncclCommInitRank", code, None)?;
        if comm.is_null() {
            return Err(Error::invalid_argument(
                "ncclCommInitRank reported success but returned a NULL communicator",
            ));
        }
        Ok(comm as usize)
    }

    /// # Safety
    /// `comm` must be live and never used again.
    pub unsafe fn comm_destroy(&self, comm: usize) -> Result<()> {
        let f = self.basic(self.symbols.comm_destroy, "ncclCommDestroy")?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe { f(comm as NcclComm) };
        self.check("ncclCommDestroy", code, None)
    }

    /// # Safety
    /// Buffers must be device memory of the communicator's device, large enough for `count`
    /// elements (send) and `count * nranks` (recv); `comm` and `stream` must be live.
    pub unsafe fn all_gather(&self, c: Collective) -> Result<()> {
        let f = self.basic(self.symbols.all_gather, "ncclAllGather")?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe {
            f(
                c.send as *const c_void,
                c.recv as *mut c_void,
                c.count,
                c.dtype,
                c.comm as NcclComm,
                c.stream as sys::CudaStream,
            )
        };
        self.check("ncclAllGather", code, Some(c.comm))
    }

    /// # Safety
    /// As `all_gather`, with `count` elements in both buffers.
    pub unsafe fn all_reduce(&self, c: Collective, op: c_int) -> Result<()> {
        let f = self.basic(self.symbols.all_reduce, "ncclAllReduce")?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe {
            f(
                c.send as *const c_void,
                c.recv as *mut c_void,
                c.count,
                c.dtype,
                op,
                c.comm as NcclComm,
                c.stream as sys::CudaStream,
            )
        };
        self.check("ncclAllReduce", code, Some(c.comm))
    }

    /// # Safety
    /// As `all_gather`, with `count` elements received and `count * nranks` sent.
    pub unsafe fn reduce_scatter(&self, c: Collective, op: c_int) -> Result<()> {
        let f = self.basic(self.symbols.reduce_scatter, "ncclReduceScatter")?;
        // SAFETY: guaranteed by the caller.
        let code = unsafe {
            f(
                c.send as *const c_void,
                c.recv as *mut c_void,
                c.count,
                c.dtype,
                op,
                c.comm as NcclComm,
                c.stream as sys::CudaStream,
            )
        };
        self.check("ncclReduceScatter", code, Some(c.comm))
    }

    pub fn group_start(&self) -> Result<()> {
        let f = self.basic(self.symbols.group_start, "ncclGroupStart")?;
        // SAFETY: takes no arguments; only changes NCCL's thread-local group depth.
        let code = unsafe { f() };
        self.check("ncclGroupStart", code, None)
    }

    pub fn group_end(&self) -> Result<()> {
        let f = self.basic(self.symbols.group_end, "ncclGroupEnd")?;
        // SAFETY: takes no arguments; launches what was queued since ncclGroupStart.
        let code = unsafe { f() };
        self.check("ncclGroupEnd", code, None)
    }
}

/// A communicator address from Python is just an int. NCCL checks a magic number at its start,
/// but reading an unmapped address would crash the process first; copying those bytes through
/// the kernel turns that crash into an error.
fn ensure_communicator_readable(comm: usize, call: &'static str) -> Result<()> {
    if comm == 0 {
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
        iov_base: comm as *mut c_void,
        iov_len: probe.len(),
    };
    // SAFETY: reads 8 bytes of our own address space into a local buffer; the kernel reports
    // EFAULT instead of faulting when `comm` is not mapped.
    let copied = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if copied != probe.len() as isize {
        return Err(Error::invalid_argument(format!(
            "{call}: {comm:#x} is not a live ncclComm_t (that address is not readable memory)"
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
