//! symm_rs: NCCL symmetric memory for PyTorch.
//!
//! The core is plain Rust (`nccl`, `segments`, `allocator`, `comm`, `cp`); `python` is the PyO3
//! surface, built only with the `python` feature (maturin turns it on).

pub mod allocator;
pub mod collective;
pub mod comm;
pub mod cp;
pub mod cuda;
pub mod error;
pub mod handles;
pub mod nccl;
pub mod policy;
pub mod routes;
pub mod segments;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
