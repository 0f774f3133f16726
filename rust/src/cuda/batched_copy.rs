//! The batched copy kernel (`batched_copy.cu`, embedded as PTX): up to `MAX_COPIES` copies or
//! zero fills in one launch, so that a CUDA graph holds one kernel node where driver copies make
//! a memcpy or memset node each. `CopyDesc` and `Params` mirror the kernel's structs. How each copy
//! is split (head bytes, body units, tail bytes) and how large the grid is are decided here, on
//! the host, where the tests can check them; the kernel only follows the descriptors.
//!
//! The module is loaded once per CUDA context (a process may drive several GPUs from threads) and
//! kept for the life of the process. Where it cannot be loaded (a driver too old for the PTX, say)
//! `for_current_context` says so once, and callers use driver copies instead.

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::sync::Mutex;

use super::module::{self, Function};
use super::{require_driver, ByteCopy, CuContext, CuStream, Driver};
use crate::error::{Error, Result};
use crate::handles::StreamPtr;

/// Copies per launch: `SYMM_RS_MAX_COPIES` in `batched_copy.cu`. More make several launches.
pub const MAX_COPIES: usize = 16;
/// Threads per block: the kernel's `__launch_bounds__`.
pub const THREADS: u32 = 256;
/// Units each thread keeps in flight per step of its loop (the kernel's unrolling).
const UNITS_PER_THREAD: u64 = 4;
/// 8 blocks of 256 threads fill an SM of an A100 or H100 (2048 threads).
const BLOCKS_PER_SM: u64 = 8;
/// The kernel's entry point.
pub const ENTRY: &CStr = c"symm_rs_batched_copy";
/// The PTX text, NUL-terminated as `cuModuleLoadDataEx` wants it.
pub const PTX: &str = concat!(include_str!("batched_copy.ptx"), "\0");
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const ATTRIBUTE_MULTIPROCESSOR_COUNT: i32 = 16;

/// One copy as the kernel reads it: the first `head` bytes one at a time, then units of `width`
/// bytes (`dst + head` and `src + head` are multiples of `width`), then the rest one at a time.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyDesc {
    pub dst: u64,
    /// 0: write zeros.
    pub src: u64,
    pub bytes: u64,
    pub head: u32,
    /// 1, 2, 4, 8 or 16.
    pub width: u32,
}

impl CopyDesc {
    /// The split of `copy`: the widest unit (16 bytes at most) at which its destination and
    /// source can both be aligned, which is the lowest bit in which their addresses differ (a
    /// zero fill has no source: 16), and the head bytes that align the destination to it.
    /// A source of `Some(null)` would read as zeros; callers never pass one.
    pub fn new(copy: &ByteCopy) -> Self {
        let dst = copy.dst.addr() as u64;
        let src = copy.src.map_or(0, |s| s.addr() as u64);
        let bytes = copy.bytes as u64;
        let apart = if copy.src.is_some() {
            (dst ^ src) & 15
        } else {
            0
        };
        let width: u64 = if apart == 0 {
            16
        } else {
            1 << apart.trailing_zeros()
        };
        let head = ((width - dst % width) % width).min(bytes);
        Self {
            dst,
            src,
            bytes,
            // Both below 16.
            head: head as u32,
            width: width as u32,
        }
    }

    /// Units of `width` bytes after the head (the kernel computes the same).
    pub fn body_units(&self) -> u64 {
        (self.bytes - u64::from(self.head)) / u64::from(self.width)
    }

    /// Bytes after the body, fewer than `width`.
    pub fn tail(&self) -> u64 {
        (self.bytes - u64::from(self.head)) % u64::from(self.width)
    }
}

/// The kernel's one argument, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub copies: [CopyDesc; MAX_COPIES],
    /// `copies[..count]` are used.
    pub count: u32,
}

impl Params {
    pub fn used(&self) -> &[CopyDesc] {
        &self.copies[..self.count as usize]
    }
}

/// The launches for `copies`, in order: copies of 0 bytes are dropped, the rest go
/// `MAX_COPIES` to a launch. Empty when there is nothing to copy.
pub fn batches(copies: &[ByteCopy]) -> Vec<Params> {
    let descs: Vec<CopyDesc> = copies
        .iter()
        .filter(|c| c.bytes > 0)
        .map(CopyDesc::new)
        .collect();
    descs
        .chunks(MAX_COPIES)
        .map(|chunk| {
            let mut params = Params {
                copies: [CopyDesc::default(); MAX_COPIES],
                count: chunk.len() as u32, // at most MAX_COPIES
            };
            params.copies[..chunk.len()].copy_from_slice(chunk);
            params
        })
        .collect()
}

/// Blocks for one launch: enough for the largest copy's body at `UNITS_PER_THREAD` units a
/// thread, at most `BLOCKS_PER_SM` per SM (the threads then stride), at least one.
pub fn blocks(params: &Params, sms: u32) -> u32 {
    let most = params
        .used()
        .iter()
        .map(CopyDesc::body_units)
        .max()
        .unwrap_or(0);
    let wanted = most.div_ceil(u64::from(THREADS) * UNITS_PER_THREAD).max(1);
    let cap = u64::from(sms.max(1)) * BLOCKS_PER_SM;
    // At most `cap`, which fits.
    wanted.min(cap) as u32
}

/// The kernel, loaded into one context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    function: Function,
    sms: u32,
}

/// What `for_current_context` found.
#[derive(Debug)]
pub enum Loaded {
    Ready(Kernel),
    /// The kernel cannot be used in this context: why, the first time this is answered for the
    /// context (so it is reported once), `None` after.
    Unavailable(Option<String>),
}

/// One entry per CUDA context the kernel was loaded into (or failed to load into).
struct Cached {
    context: usize,
    /// `None`: it did not load (reported when it was cached).
    kernel: Option<Kernel>,
}

static KERNELS: Mutex<Vec<Cached>> = Mutex::new(Vec::new());

/// The kernel in the current context, loading it the first time. Errors only without a driver
/// or a current context; a module that does not load is `Loaded::Unavailable`.
pub fn for_current_context() -> Result<Loaded> {
    let driver = require_driver()?;
    let mut context: CuContext = null_mut();
    // SAFETY: writes the current context (or NULL) into a local.
    driver.check("cuCtxGetCurrent", unsafe {
        (driver.ctx_get_current)(&mut context)
    })?;
    if context.is_null() {
        return Err(Error::Usage(
            "the CP copy kernel needs a current CUDA context".to_owned(),
        ));
    }
    let mut cache = KERNELS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cached) = cache.iter().find(|c| c.context == context as usize) {
        return Ok(match cached.kernel {
            Some(kernel) => Loaded::Ready(kernel),
            None => Loaded::Unavailable(None),
        });
    }
    // Loading under the lock: only the first call of each context pays, and it runs once.
    let loaded = load(driver);
    cache.push(Cached {
        context: context as usize,
        kernel: loaded.as_ref().ok().copied(),
    });
    Ok(match loaded {
        Ok(kernel) => Loaded::Ready(kernel),
        Err(reason) => Loaded::Unavailable(Some(reason)),
    })
}

fn load(driver: &Driver) -> std::result::Result<Kernel, String> {
    let ptx = CStr::from_bytes_with_nul(PTX.as_bytes()).map_err(|e| e.to_string())?;
    let function = module::load_function(driver, ptx, ENTRY)?;
    let mut device = 0;
    // SAFETY: a context is current (checked by the caller); writes into a local.
    let code = unsafe { (driver.ctx_get_device)(&mut device) };
    driver
        .check("cuCtxGetDevice", code)
        .map_err(|e| e.to_string())?;
    let mut sms = 0;
    // SAFETY: `device` is the current context's device; writes into a local.
    let code =
        unsafe { (driver.device_get_attribute)(&mut sms, ATTRIBUTE_MULTIPROCESSOR_COUNT, device) };
    driver
        .check("cuDeviceGetAttribute", code)
        .map_err(|e| e.to_string())?;
    Ok(Kernel {
        function,
        sms: u32::try_from(sms).unwrap_or(1),
    })
}

impl Kernel {
    /// Enqueues `copies` on `stream`, `MAX_COPIES` to a launch (captured as kernel nodes inside
    /// a CUDA-graph capture). Nothing is enqueued when every copy is empty.
    ///
    /// # Safety
    /// The context this kernel was loaded into must be current. Each copy's ranges must be
    /// device memory of that context's device that stays allocated until `stream` has run the
    /// copies, and no destination may overlap a source or another destination of the same
    /// call; `stream` must be a live stream of that context (or 0).
    pub unsafe fn enqueue(&self, copies: &[ByteCopy], stream: StreamPtr) -> Result<()> {
        let driver = require_driver()?;
        for mut params in batches(copies) {
            let grid = blocks(&params, self.sms);
            let mut args = [(&mut params as *mut Params).cast::<c_void>()];
            // SAFETY: the function takes one `Params` by value, which the driver copies from
            // `args[0]` during the call; the memory it names is the caller's to guarantee.
            let code = unsafe {
                (driver.launch_kernel)(
                    self.function.handle(),
                    grid,
                    1,
                    1,
                    THREADS,
                    1,
                    1,
                    0,
                    stream.addr() as CuStream,
                    args.as_mut_ptr(),
                    null_mut(),
                )
            };
            driver.check("cuLaunchKernel", code)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
