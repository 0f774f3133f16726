//! NCCL in three layers, as cudarc does it: raw symbols (`sys`), loading (`library`), and
//! `Result`-returning calls (`api`; the ones that enqueue work on a stream in `collectives`).
//! Nothing is linked at build time.

pub mod api;
pub mod collectives;
pub mod library;
pub mod sys;
pub mod version;

pub use api::result_name;
pub use collectives::in_group;
pub use library::{get, load, loaded, Candidates, Nccl, Origin, PREFERRED_FROM};
pub use version::NcclVersion;
