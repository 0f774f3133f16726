//! NCCL in three layers, as cudarc does it: raw symbols (`sys`), loading (`library`), and
//! `Result`-returning calls (`api`). Nothing is linked at build time.

pub mod api;
pub mod library;
pub mod sys;
pub mod version;

pub use api::{in_group, result_name};
pub use library::{get, load, loaded, Nccl, Origin, LIBRARY_ENV};
pub use version::NcclVersion;
