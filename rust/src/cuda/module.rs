//! Loading embedded PTX into the current CUDA context: the driver JIT-compiles it for the GPU at
//! hand. Errors come back as text, with the JIT's log, for callers that fall back to other means.

use std::ffi::{c_int, c_void, CStr};
use std::ptr::null_mut;

use super::{CuFunction, CuModule, Driver};

/// `CUjit_option`s of cuda.h.
const JIT_ERROR_LOG_BUFFER: c_int = 5;
const JIT_ERROR_LOG_BUFFER_SIZE_BYTES: c_int = 6;
/// `CU_STREAM_CAPTURE_MODE_RELAXED`.
const CAPTURE_MODE_RELAXED: c_int = 2;
const LOG_BYTES: usize = 4096;

/// A kernel's `CUfunction` in the context that was current when it was loaded; valid as long as
/// that context lives (the module is never unloaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Function(usize);

impl Function {
    pub(super) fn handle(self) -> CuFunction {
        self.0 as CuFunction
    }
}

/// Loads `ptx` into the current context and returns its entry point `name`. A capture on another
/// thread (or this one) in global mode would forbid the load, so it runs in relaxed mode.
pub(super) fn load_function(
    driver: &Driver,
    ptx: &CStr,
    name: &CStr,
) -> std::result::Result<Function, String> {
    let _relaxed = RelaxedCapture::enter(driver)?;
    let mut log = vec![0u8; LOG_BYTES];
    let mut options = [JIT_ERROR_LOG_BUFFER, JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
    // The driver reads each option's value from a pointer-sized slot; the size is passed as one.
    let mut values = [log.as_mut_ptr().cast::<c_void>(), LOG_BYTES as *mut c_void];
    let mut module: CuModule = null_mut();
    // SAFETY: `ptx` is NUL-terminated PTX text; the two options point at `log`, which outlives
    // the call and holds `LOG_BYTES` bytes; `module` is a local the driver writes.
    let code = unsafe {
        (driver.module_load_data_ex)(
            &mut module,
            ptx.as_ptr().cast(),
            2,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if let Err(e) = driver.check("cuModuleLoadDataEx", code) {
        let log = CStr::from_bytes_until_nul(&log)
            .map(|s| s.to_string_lossy().trim().to_owned())
            .unwrap_or_default();
        return Err(if log.is_empty() {
            e.to_string()
        } else {
            format!("{e}; JIT log: {log}")
        });
    }
    let mut function: CuFunction = null_mut();
    // SAFETY: `module` was just loaded; `name` is NUL-terminated; writes into a local.
    let code = unsafe { (driver.module_get_function)(&mut function, module, name.as_ptr()) };
    driver
        .check("cuModuleGetFunction", code)
        .map_err(|e| e.to_string())?;
    Ok(Function(function as usize))
}

/// This thread's stream-capture mode set to relaxed for the guard's lifetime.
struct RelaxedCapture<'a> {
    driver: &'a Driver,
    previous: c_int,
}

impl<'a> RelaxedCapture<'a> {
    fn enter(driver: &'a Driver) -> std::result::Result<Self, String> {
        let mut mode = CAPTURE_MODE_RELAXED;
        // SAFETY: exchanges this thread's capture mode through a local.
        let code = unsafe { (driver.thread_exchange_capture_mode)(&mut mode) };
        driver
            .check("cuThreadExchangeStreamCaptureMode", code)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            driver,
            previous: mode,
        })
    }
}

impl Drop for RelaxedCapture<'_> {
    fn drop(&mut self) {
        let mut mode = self.previous;
        // SAFETY: restores the mode `enter` replaced, through a local.
        unsafe { (self.driver.thread_exchange_capture_mode)(&mut mode) };
    }
}
