//! The few CUDA driver calls symm_rs needs: making the requested device current around
//! `ncclMemAlloc`/`ncclMemFree`, waiting for it before memory is unmapped, and the stream copies
//! of the CP all-gather (`crate::cp`): driver copies here, the batched copy kernel in
//! `batched_copy` (its PTX loaded by `module`). The driver (`libcuda.so.1`) is opened lazily, so
//! a machine without a GPU never needs it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use libloading::os::unix::Library;

use crate::error::{Error, Result};
use crate::handles::{DevicePtr, StreamPtr};

pub mod batched_copy;
mod module;

type CuResult = c_int;
type CuContext = *mut c_void;
type CuDevicePtr = u64;
type CuStream = *mut c_void;
type CuModule = *mut c_void;
type CuFunction = *mut c_void;

struct Driver {
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    ctx_get_current: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    ctx_set_current: unsafe extern "C" fn(CuContext) -> CuResult,
    ctx_get_device: unsafe extern "C" fn(*mut c_int) -> CuResult,
    ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    primary_retain: unsafe extern "C" fn(*mut CuContext, c_int) -> CuResult,
    primary_release: unsafe extern "C" fn(c_int) -> CuResult,
    error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    memcpy_dtod_async: unsafe extern "C" fn(CuDevicePtr, CuDevicePtr, usize, CuStream) -> CuResult,
    memset_d8_async: unsafe extern "C" fn(CuDevicePtr, u8, usize, CuStream) -> CuResult,
    device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    module_load_data_ex: unsafe extern "C" fn(
        *mut CuModule,
        *const c_void,
        c_uint,
        *mut c_int,
        *mut *mut c_void,
    ) -> CuResult,
    module_get_function: unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    launch_kernel: unsafe extern "C" fn(
        CuFunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        CuStream,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    thread_exchange_capture_mode: unsafe extern "C" fn(*mut c_int) -> CuResult,
    _library: Library,
}

static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

/// The driver, or `None` on a machine without one (checked once; no allocation per call).
fn driver() -> Option<&'static Driver> {
    DRIVER.get_or_init(open_driver).as_ref().ok()
}

/// The driver, for calls that cannot do without one.
fn require_driver() -> Result<&'static Driver> {
    DRIVER
        .get_or_init(open_driver)
        .as_ref()
        .map_err(|reason| Error::Usage(format!("this needs the CUDA driver: {reason}")))
}

fn open_driver() -> std::result::Result<Driver, String> {
    // SAFETY: loading the CUDA driver library runs its initialisers only.
    let library = unsafe { Library::open(Some("libcuda.so.1"), libc::RTLD_NOW | libc::RTLD_LOCAL) }
        .map_err(|e| format!("no CUDA driver: {e}"))?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: each field's type is the signature cuda.h declares for this name.
            *unsafe { library.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{}: {e}", $name))?
        };
    }
    let driver = Driver {
        init: sym!("cuInit"),
        device_get: sym!("cuDeviceGet"),
        ctx_get_current: sym!("cuCtxGetCurrent"),
        ctx_set_current: sym!("cuCtxSetCurrent"),
        ctx_get_device: sym!("cuCtxGetDevice"),
        ctx_synchronize: sym!("cuCtxSynchronize"),
        primary_retain: sym!("cuDevicePrimaryCtxRetain"),
        primary_release: sym!("cuDevicePrimaryCtxRelease_v2"),
        error_string: sym!("cuGetErrorString"),
        // The legacy-stream names (not `_ptsz`): stream 0 means what torch means by it.
        memcpy_dtod_async: sym!("cuMemcpyDtoDAsync_v2"),
        memset_d8_async: sym!("cuMemsetD8Async"),
        device_get_attribute: sym!("cuDeviceGetAttribute"),
        module_load_data_ex: sym!("cuModuleLoadDataEx"),
        module_get_function: sym!("cuModuleGetFunction"),
        launch_kernel: sym!("cuLaunchKernel"),
        thread_exchange_capture_mode: sym!("cuThreadExchangeStreamCaptureMode"),
        _library: library,
    };
    // SAFETY: cuInit(0) is idempotent and has no pointer arguments.
    let code = unsafe { (driver.init)(0) };
    if code != 0 {
        return Err(format!("cuInit failed with CUDA error {code}"));
    }
    Ok(driver)
}

impl Driver {
    fn check(&self, call: &'static str, code: CuResult) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a pointer to a static string, or leaves it NULL.
        unsafe { (self.error_string)(code, &mut text) };
        let message = if text.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: non-NULL strings from cuGetErrorString are static and NUL-terminated.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        Err(Error::Cuda {
            call,
            code,
            message,
        })
    }
}

/// Makes `device` current on this thread for its lifetime, restoring the previous context after.
pub struct DeviceGuard {
    restore: Option<(CuContext, c_int)>,
}

impl DeviceGuard {
    /// Without a CUDA driver there is no device to make current; the NCCL call that follows
    /// reports the real problem (a stand-in NCCL used in CPU tests needs no driver at all).
    pub fn enter(device: i32) -> Result<Self> {
        let Some(driver) = driver() else {
            return Ok(Self { restore: None });
        };
        let mut previous: CuContext = std::ptr::null_mut();
        // SAFETY: writes the current context (or NULL) into a local we own.
        driver.check("cuCtxGetCurrent", unsafe {
            (driver.ctx_get_current)(&mut previous)
        })?;
        if !previous.is_null() {
            let mut current: c_int = -1;
            // SAFETY: a context is current, so cuCtxGetDevice can answer; writes into a local.
            let code = unsafe { (driver.ctx_get_device)(&mut current) };
            if code == 0 && current == device {
                return Ok(Self { restore: None });
            }
        }
        let mut handle: c_int = 0;
        // SAFETY: writes the device handle for ordinal `device` into a local.
        driver.check("cuDeviceGet", unsafe {
            (driver.device_get)(&mut handle, device)
        })?;
        let mut context: CuContext = std::ptr::null_mut();
        // SAFETY: retains the primary context of a valid device handle; released in Drop.
        driver.check("cuDevicePrimaryCtxRetain", unsafe {
            (driver.primary_retain)(&mut context, handle)
        })?;
        // SAFETY: `context` was just retained and is valid.
        if let Err(e) = driver.check("cuCtxSetCurrent", unsafe {
            (driver.ctx_set_current)(context)
        }) {
            // SAFETY: balances the retain above.
            unsafe { (driver.primary_release)(handle) };
            return Err(e);
        }
        Ok(Self {
            restore: Some((previous, handle)),
        })
    }
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        let Some((previous, handle)) = self.restore else {
            return;
        };
        if let Some(driver) = driver() {
            // SAFETY: `previous` was current when we entered (or NULL, which unbinds), and the
            // release balances the retain in `enter`.
            unsafe {
                (driver.ctx_set_current)(previous);
                (driver.primary_release)(handle);
            }
        }
    }
}

/// Waits for all work on the current device, so memory can be unmapped safely.
/// A no-op without a driver, for the same reason as `DeviceGuard::enter`.
pub fn synchronize_current() -> Result<()> {
    let Some(driver) = driver() else {
        return Ok(());
    };
    // SAFETY: no arguments; blocks until the current context is idle.
    driver.check("cuCtxSynchronize", unsafe { (driver.ctx_synchronize)() })
}

/// Enqueues a copy of `bytes` from `src` to `dst` on `stream` (captured as a memcpy node inside
/// a CUDA-graph capture). Nothing is enqueued for 0 bytes.
///
/// # Safety
/// `[src, src + bytes)` and `[dst, dst + bytes)` must be device memory of the current context's
/// device that does not overlap and stays allocated until `stream` has run the copy; `stream`
/// must be a live stream of that context (or 0).
pub unsafe fn copy_async(
    dst: DevicePtr,
    src: DevicePtr,
    bytes: usize,
    stream: StreamPtr,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let driver = require_driver()?;
    // SAFETY: guaranteed by the caller.
    let code = unsafe {
        (driver.memcpy_dtod_async)(
            dst.addr() as CuDevicePtr,
            src.addr() as CuDevicePtr,
            bytes,
            stream.addr() as CuStream,
        )
    };
    driver.check("cuMemcpyDtoDAsync", code)
}

/// Enqueues zeroing `bytes` at `dst` on `stream`. Nothing is enqueued for 0 bytes.
///
/// # Safety
/// As for `copy_async`, for `[dst, dst + bytes)`.
pub unsafe fn zero_async(dst: DevicePtr, bytes: usize, stream: StreamPtr) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let driver = require_driver()?;
    // SAFETY: guaranteed by the caller.
    let code = unsafe {
        (driver.memset_d8_async)(
            dst.addr() as CuDevicePtr,
            0,
            bytes,
            stream.addr() as CuStream,
        )
    };
    driver.check("cuMemsetD8Async", code)
}

/// One stream copy: `bytes` from `src` to `dst`, or `bytes` zeros at `dst` when `src` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCopy {
    pub dst: DevicePtr,
    pub src: Option<DevicePtr>,
    pub bytes: usize,
}

/// Enqueues `copies` on `stream` as driver calls, one each (`copy_async` or `zero_async`).
///
/// # Safety
/// As for `copy_async`, for every copy.
pub unsafe fn driver_copies(copies: &[ByteCopy], stream: StreamPtr) -> Result<()> {
    for c in copies {
        // SAFETY: guaranteed by the caller.
        unsafe {
            match c.src {
                Some(src) => copy_async(c.dst, src, c.bytes, stream)?,
                None => zero_async(c.dst, c.bytes, stream)?,
            }
        }
    }
    Ok(())
}
