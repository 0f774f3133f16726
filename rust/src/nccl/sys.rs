//! Raw NCCL ABI: the types and function signatures of `nccl.h` that symm_rs uses, and the
//! table of symbols resolved from one loaded libnccl. Nothing here is safe to call directly;
//! `api.rs` wraps each entry in a `Result`-returning method.

use std::ffi::{c_char, c_int, c_void};

pub type NcclResult = c_int;
pub type NcclComm = *mut c_void;
pub type NcclWindow = *mut c_void;
pub type CudaStream = *mut c_void;
pub type NcclDataType = c_int;
pub type NcclRedOp = c_int;

pub const NCCL_SUCCESS: NcclResult = 0;
pub const NCCL_IN_PROGRESS: NcclResult = 7;

/// `NCCL_WIN_COLL_SYMMETRIC`: the window is registered at the same offset on every rank, which
/// is what lets NCCL pick its symmetric kernels.
pub const NCCL_WIN_COLL_SYMMETRIC: c_int = 0x01;

pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct NcclUniqueId {
    pub internal: [c_char; NCCL_UNIQUE_ID_BYTES],
}

pub type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> NcclResult;
pub type GetErrorStringFn = unsafe extern "C" fn(NcclResult) -> *const c_char;
pub type GetLastErrorFn = unsafe extern "C" fn(NcclComm) -> *const c_char;
pub type MemAllocFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> NcclResult;
pub type MemFreeFn = unsafe extern "C" fn(*mut c_void) -> NcclResult;
pub type WindowRegisterFn =
    unsafe extern "C" fn(NcclComm, *mut c_void, usize, *mut NcclWindow, c_int) -> NcclResult;
pub type WindowDeregisterFn = unsafe extern "C" fn(NcclComm, NcclWindow) -> NcclResult;
pub type GetUniqueIdFn = unsafe extern "C" fn(*mut NcclUniqueId) -> NcclResult;
pub type CommInitRankFn =
    unsafe extern "C" fn(*mut NcclComm, c_int, NcclUniqueId, c_int) -> NcclResult;
pub type CommDestroyFn = unsafe extern "C" fn(NcclComm) -> NcclResult;
/// `ncclCommSplit(comm, color, key, newcomm, config)`; a NULL config inherits the parent's.
pub type CommSplitFn =
    unsafe extern "C" fn(NcclComm, c_int, c_int, *mut NcclComm, *mut c_void) -> NcclResult;
pub type CommIntQueryFn = unsafe extern "C" fn(NcclComm, *mut c_int) -> NcclResult;
pub type AllGatherFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclComm,
    CudaStream,
) -> NcclResult;
pub type ReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclRedOp,
    NcclComm,
    CudaStream,
) -> NcclResult;
pub type GroupFn = unsafe extern "C" fn() -> NcclResult;
pub type CommGetAsyncErrorFn = unsafe extern "C" fn(NcclComm, *mut NcclResult) -> NcclResult;
pub type CommAbortFn = unsafe extern "C" fn(NcclComm) -> NcclResult;
pub type CommQueryPropertiesFn =
    unsafe extern "C" fn(NcclComm, *mut NcclCommProperties) -> NcclResult;

/// `NCCL_API_MAGIC`: `ncclCommQueryProperties` refuses a struct without it.
pub const NCCL_API_MAGIC: u32 = 0xcafe_beef;

/// `ncclCommProperties_t` as NCCL 2.28 to 2.30 lay it out. NCCL reads `size` and `version`
/// and fills only the fields that version has; the tail stays as we zeroed it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NcclCommProperties {
    pub size: usize,
    pub magic: u32,
    pub version: u32,
    pub rank: c_int,
    pub n_ranks: c_int,
    pub cuda_dev: c_int,
    pub nvml_dev: c_int,
    /// `comm->symmetricSupport`: whether this communicator can run symmetric kernels.
    pub device_api_support: bool,
    pub multimem_support: bool,
    pub gin_type: c_int,
    pub n_lsa_teams: c_int,
    pub host_rma_support: bool,
    pub railed_gin_type: c_int,
}

/// Every symbol symm_rs may use. `ncclGetVersion` and `ncclGetErrorString` exist in every NCCL
/// and are required at load time; the rest are resolved as optional so that an old library can
/// still report its version, and a call that needs a missing one fails with a clear error.
pub struct Symbols {
    pub get_version: GetVersionFn,
    pub get_error_string: GetErrorStringFn,
    pub get_last_error: Option<GetLastErrorFn>,
    pub mem_alloc: Option<MemAllocFn>,
    pub mem_free: Option<MemFreeFn>,
    pub window_register: Option<WindowRegisterFn>,
    pub window_deregister: Option<WindowDeregisterFn>,
    pub get_unique_id: Option<GetUniqueIdFn>,
    pub comm_init_rank: Option<CommInitRankFn>,
    pub comm_destroy: Option<CommDestroyFn>,
    /// NCCL >= 2.18; only the size policy's window-less twin needs it.
    pub comm_split: Option<CommSplitFn>,
    pub comm_count: Option<CommIntQueryFn>,
    pub comm_cu_device: Option<CommIntQueryFn>,
    pub comm_user_rank: Option<CommIntQueryFn>,
    pub all_gather: Option<AllGatherFn>,
    pub all_reduce: Option<ReduceFn>,
    pub reduce_scatter: Option<ReduceFn>,
    pub group_start: Option<GroupFn>,
    pub group_end: Option<GroupFn>,
    pub comm_get_async_error: Option<CommGetAsyncErrorFn>,
    pub comm_abort: Option<CommAbortFn>,
    /// NCCL >= 2.28: a communicator's properties, among them its symmetric support.
    pub comm_query_properties: Option<CommQueryPropertiesFn>,
}
