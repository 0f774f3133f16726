//! How the CP gather's copies reach the stream: by default the batched copy kernel
//! (`cuda::batched_copy`), one launch for the fill and the padding and one for the compaction;
//! or one driver copy or memset each (`SYMM_RS_CP_COPY=driver`, and wherever the kernel cannot be
//! loaded). Both give the same bytes; in a CUDA graph the kernel makes one node per step where
//! driver copies make one memcpy or memset node per copy.

use super::{offset, Plan};
use crate::cuda::batched_copy::{self, Kernel, Loaded};
use crate::cuda::{self, ByteCopy};
use crate::error::Result;
use crate::handles::{DevicePtr, StreamPtr};

/// How the gather's copies are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// The batched copy kernel (the default).
    Kernel,
    /// A driver copy (`cuMemcpyDtoDAsync`) or memset (`cuMemsetD8Async`) per copy.
    Driver,
}

impl CopyMode {
    /// Where the Python layer reads the default from, for messages.
    pub const CHOSEN_BY: &'static str = "SYMM_RS_CP_COPY";
    /// The names `parse` takes, the default first (Python's `_native.CP_COPY_MODES`).
    pub const NAMES: [&'static str; 2] = ["kernel", "driver"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Driver => "driver",
        }
    }

    /// `kernel` or `driver`, ignoring case and surrounding space.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "kernel" => Some(Self::Kernel),
            "driver" => Some(Self::Driver),
            _ => None,
        }
    }
}

/// The copies before the all-gather: this rank's input rows into its slot of `gathered`, then
/// zeros over the rest of the slot. Either may be empty.
pub(super) fn fill(plan: &Plan, gathered: DevicePtr, input: DevicePtr) -> Result<[ByteCopy; 2]> {
    let bytes = |rows: usize| rows * plan.row_bytes;
    let (first, rows) = plan.padding;
    Ok([
        ByteCopy {
            dst: offset(gathered, bytes(plan.fill.dst))?,
            src: Some(offset(input, bytes(plan.fill.src))?),
            bytes: bytes(plan.fill.rows),
        },
        ByteCopy {
            dst: offset(gathered, bytes(first))?,
            src: None,
            bytes: bytes(rows),
        },
    ])
}

/// The copies after the all-gather: `plan.compaction`, from `gathered` into `output`.
pub(super) fn compaction(
    plan: &Plan,
    gathered: DevicePtr,
    output: DevicePtr,
) -> Result<Vec<ByteCopy>> {
    let bytes = |rows: usize| rows * plan.row_bytes;
    plan.compaction
        .iter()
        .map(|c| {
            Ok(ByteCopy {
                dst: offset(output, bytes(c.dst))?,
                src: Some(offset(gathered, bytes(c.src))?),
                bytes: bytes(c.rows),
            })
        })
        .collect()
}

/// What issues the copies, resolved for the current context.
#[derive(Debug, Clone, Copy)]
pub(super) enum Copier {
    Kernel(Kernel),
    Driver,
}

impl Copier {
    /// The copier for `mode` in the current context, and a warning the first time the kernel
    /// could not be loaded into it (driver copies are used instead).
    pub(super) fn resolve(mode: CopyMode) -> Result<(Self, Option<String>)> {
        if mode == CopyMode::Driver {
            return Ok((Self::Driver, None));
        }
        Ok(match batched_copy::for_current_context()? {
            Loaded::Ready(kernel) => (Self::Kernel(kernel), None),
            Loaded::Unavailable(reason) => (
                Self::Driver,
                reason.map(|why| {
                    format!(
                        "the CP all-gather's copy kernel could not be loaded on this GPU ({why}); \
                         it uses driver copies instead (set {}=driver to choose them and skip \
                         this warning)",
                        CopyMode::CHOSEN_BY
                    )
                }),
            ),
        })
    }

    pub(super) fn mode(self) -> CopyMode {
        match self {
            Self::Kernel(_) => CopyMode::Kernel,
            Self::Driver => CopyMode::Driver,
        }
    }

    /// Enqueues `copies` on `stream`.
    ///
    /// # Safety
    /// As for `cuda::batched_copy::Kernel::enqueue` (which covers `cuda::copy_async` too).
    pub(super) unsafe fn enqueue(self, copies: &[ByteCopy], stream: StreamPtr) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        unsafe {
            match self {
                Self::Kernel(kernel) => kernel.enqueue(copies, stream),
                Self::Driver => cuda::driver_copies(copies, stream),
            }
        }
    }
}

#[cfg(test)]
mod tests;
