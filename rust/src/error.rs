//! The one error type of the crate. `python/errors.rs` maps each variant to a Python exception once.

use std::path::PathBuf;

use crate::handles::{CommPtr, DevicePtr};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No candidate libnccl could be opened.
    #[error(
        "could not load NCCL; tried: {tried}. Install the NVIDIA NCCL wheel \
         (pip install nvidia-nccl-cu12 or nvidia-nccl-cu13), import torch first, \
         or set SYMM_RS_NCCL_LIBRARY to the path of libnccl.so.2"
    )]
    LibraryNotFound { tried: String },

    /// The library lacks a symbol that every supported NCCL has.
    #[error("{path} is not a usable NCCL: symbol {symbol} is missing ({reason})")]
    MissingSymbol {
        path: PathBuf,
        symbol: &'static str,
        reason: String,
    },

    /// The library is too old for what was asked of it.
    #[error(
        "NCCL {found} at {path} is too old for {feature}: it needs NCCL >= {needed}. \
         Upgrade the nvidia-nccl wheel or point SYMM_RS_NCCL_LIBRARY at a newer libnccl.so.2"
    )]
    LibraryTooOld {
        path: PathBuf,
        found: String,
        needed: &'static str,
        feature: &'static str,
    },

    /// An NCCL call returned something other than ncclSuccess.
    #[error("{call} failed: {code_name} ({code}): {message}")]
    Nccl {
        call: &'static str,
        code: i32,
        code_name: &'static str,
        message: String,
    },

    /// ncclCommWindowRegister succeeded but handed back a NULL window: NCCL has symmetric
    /// support switched off (NCCL_WIN_ENABLE=0, no cuMem, or an unsupported topology).
    #[error(
        "ncclCommWindowRegister returned a NULL window for segment {ptr} ({size} bytes) on \
         communicator {comm}: symmetric memory is off in this NCCL (check NCCL_WIN_ENABLE, \
         NCCL_CUMEM_ENABLE and that every GPU of the group is reachable over NVLink), or the \
         registration ran inside an NCCL group another library opened"
    )]
    NullWindow {
        comm: CommPtr,
        ptr: DevicePtr,
        size: usize,
    },

    /// A CUDA driver call failed.
    #[error("{call} failed with CUDA error {code}: {message}")]
    Cuda {
        call: &'static str,
        code: i32,
        message: String,
    },

    /// The caller passed something of the wrong kind.
    #[error("{0}")]
    InvalidType(String),

    /// The caller passed a value that cannot be used.
    #[error("{0}")]
    InvalidArgument(String),

    /// The call is not allowed in the state the process is in (inside an NCCL group, say).
    #[error("{0}")]
    Usage(String),

    /// NCCL did not finish an operation within the time symm_rs waits for it.
    #[error("{call} did not complete within {seconds} s: {what}")]
    Timeout {
        call: &'static str,
        seconds: f64,
        what: String,
    },

    /// The communicator has been closed.
    #[error("{0}")]
    Closed(String),

    /// A segment was kept allocated because a window on it could not be deregistered.
    #[error(
        "segment {ptr} ({size} bytes) was not freed: {failures} window(s) on it could not be \
         deregistered (first: {first}); it stays allocated rather than be freed under NCCL"
    )]
    SegmentLeaked {
        ptr: DevicePtr,
        size: usize,
        failures: usize,
        first: String,
    },
}

impl Error {
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}
