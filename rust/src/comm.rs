//! A thin NCCL communicator owned by Rust: created from a unique id, destroyed exactly once
//! (after its windows are deregistered), and the collectives symm_rs needs. A collective's
//! buffers are checked by `collective::plan` against this communicator before NCCL sees them.
//!
//! With the size policy on, the communicator also owns a window-less twin over the same ranks
//! (`ncclCommSplit`): calls the route table sends there run NCCL's regular algorithms even on
//! buffers that are windows of this communicator. The twin is created, used and destroyed with
//! its parent, under the same lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::allocator;
use crate::collective::{self, Collective, CollectiveKind, DataType, Target, TensorView};
use crate::cuda::DeviceGuard;
use crate::error::{Error, Result};
use crate::handles::{CommPtr, StreamPtr};
use crate::nccl::{self, sys::NcclUniqueId};
use crate::policy::RouteTable;

#[derive(Debug, Clone, Copy)]
struct Live {
    comm: CommPtr,
    rank: i32,
    size: i32,
    device: i32,
}

/// The window-less twin and the calls routed to it.
struct Twin {
    comm: CommPtr,
    table: RouteTable,
}

struct State {
    main: Live,
    twin: Option<Twin>,
}

/// Where `Communicator::run` sent a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    Main,
    Twin,
    /// Nothing was launched: the call must go through a staging buffer (see `run`).
    NeedsStaging,
}

impl Launch {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Twin => "twin",
            Self::NeedsStaging => "stage",
        }
    }
}

/// An owned `ncclComm_t`. `None` inside once closed.
pub struct Communicator {
    live: Mutex<Option<State>>,
    /// Whether this NCCL's symmetric LL kernels mishandle odd 16-bit counts (set once by the
    /// Python layer, which keeps the list of NCCL defects).
    stage_unaligned: AtomicBool,
}

/// The 128-byte id rank 0 creates and every rank passes to `Communicator::new`.
pub fn unique_id() -> Result<Vec<u8>> {
    let id = nccl::get()?.get_unique_id()?;
    Ok(id.internal.iter().map(|&b| b as u8).collect())
}

fn closed() -> Error {
    Error::Closed("this Communicator is closed; create a new one to communicate".into())
}

impl Communicator {
    /// Joins the communicator `id` names as `rank` of `size`, on `device`. Collective.
    pub fn new(id: &[u8], rank: i32, size: i32, device: i32) -> Result<Self> {
        if id.len() != nccl::sys::NCCL_UNIQUE_ID_BYTES {
            return Err(Error::invalid_argument(format!(
                "unique_id must be {} bytes (from Communicator.unique_id()), got {}",
                nccl::sys::NCCL_UNIQUE_ID_BYTES,
                id.len()
            )));
        }
        if size < 1 || rank < 0 || rank >= size {
            return Err(Error::invalid_argument(format!(
                "rank must be in [0, size) and size >= 1; got rank={rank}, size={size}"
            )));
        }
        let mut unique = NcclUniqueId {
            internal: [0; nccl::sys::NCCL_UNIQUE_ID_BYTES],
        };
        for (dst, &src) in unique.internal.iter_mut().zip(id) {
            *dst = src as std::ffi::c_char;
        }
        let lib = nccl::get()?;
        let _device = DeviceGuard::enter(device)?;
        let comm = lib.comm_init_rank(size, unique, rank)?;
        let main = Live {
            comm,
            rank,
            size,
            device,
        };
        Ok(Self {
            live: Mutex::new(Some(State { main, twin: None })),
            stage_unaligned: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<State>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> Result<Live> {
        self.lock().as_ref().map(|s| s.main).ok_or_else(closed)
    }

    pub fn comm(&self) -> Result<CommPtr> {
        Ok(self.live()?.comm)
    }
    pub fn rank(&self) -> Result<i32> {
        Ok(self.live()?.rank)
    }
    pub fn size(&self) -> Result<i32> {
        Ok(self.live()?.size)
    }
    pub fn device(&self) -> Result<i32> {
        Ok(self.live()?.device)
    }
    pub fn is_closed(&self) -> bool {
        self.lock().is_none()
    }

    /// Stage 16-bit all-gathers and reduce-scatters with an odd per-rank count whose buffers
    /// are both windows of this communicator (see `run`).
    pub fn set_stage_unaligned(&self, on: bool) {
        self.stage_unaligned.store(on, Ordering::Relaxed);
    }

    /// Creates the window-less twin (idempotent). Collective over this communicator's ranks.
    pub fn enable_twin(&self) -> Result<()> {
        let mut guard = self.lock();
        let state = guard.as_mut().ok_or_else(closed)?;
        if state.twin.is_some() {
            return Ok(());
        }
        let lib = nccl::get()?;
        let _device = DeviceGuard::enter(state.main.device)?;
        // SAFETY: the lock keeps `main.comm` alive (close takes the state first).
        let comm = unsafe { lib.comm_split(state.main.comm, state.main.rank) }?;
        state.twin = Some(Twin {
            comm,
            table: RouteTable::default(),
        });
        Ok(())
    }

    /// Replaces the calls routed to the twin. Errors when there is no twin.
    pub fn set_route(&self, table: RouteTable) -> Result<()> {
        let mut guard = self.lock();
        let state = guard.as_mut().ok_or_else(closed)?;
        let twin = state.twin.as_mut().ok_or_else(|| {
            Error::Usage("this Communicator has no policy twin; enable the policy first".into())
        })?;
        twin.table = table;
        Ok(())
    }

    /// The twin's `ncclComm_t`, if there is one.
    pub fn twin_comm(&self) -> Result<Option<CommPtr>> {
        let guard = self.lock();
        let state = guard.as_ref().ok_or_else(closed)?;
        Ok(state.twin.as_ref().map(|t| t.comm))
    }

    /// Deregisters this communicator's windows, then destroys its twin and itself. Idempotent.
    /// A window that could not be deregistered is forgotten once its communicator is destroyed
    /// (NCCL's destruction frees it), so no later free deregisters on a dead communicator.
    pub fn close(&self) -> Result<()> {
        let Some(state) = self.lock().take() else {
            return Ok(());
        };
        let lib = nccl::get()?;
        let mut outcome = Ok(());
        for comm in state.twin.iter().map(|t| t.comm).chain([state.main.comm]) {
            let windows = allocator::release_comm(comm).map(|_| ());
            // SAFETY: `take()` removed the only copy of the handle, so it is destroyed once and
            // never used again; its windows were released (or are forgotten) just below.
            let destroyed = unsafe { lib.comm_destroy(comm) };
            allocator::forget_comm(comm);
            outcome = outcome.and(windows).and(destroyed);
        }
        outcome
    }

    /// `ncclCommAbort` on the twin and this communicator: no wait for peers or pending work
    /// (the way out when a peer failed). Its windows are forgotten without NCCL calls.
    /// Idempotent; a closed communicator stays closed.
    pub fn abort(&self) -> Result<()> {
        let Some(state) = self.lock().take() else {
            return Ok(());
        };
        let lib = nccl::get()?;
        let mut outcome = Ok(());
        for comm in state.twin.iter().map(|t| t.comm).chain([state.main.comm]) {
            allocator::forget_comm(comm);
            // SAFETY: `take()` removed the only copy of the handle: it is never used again.
            outcome = outcome.and(unsafe { lib.comm_abort(comm) });
        }
        outcome
    }

    /// Checks the buffers against this communicator and enqueues `kind` on `stream`, on the
    /// twin when the route table says so; the communicator stays locked meanwhile, so `close`
    /// cannot race with the launch.
    ///
    /// Launches nothing and returns `NeedsStaging` for a call NCCL's symmetric LL kernels get
    /// wrong on an NCCL with that defect: a 16-bit all-gather or reduce-scatter with an odd
    /// per-rank count, both buffers windows of this communicator. NCCL picks a symmetric kernel
    /// only when both are, so the caller reruns it with a staging output outside the windows.
    pub fn run(
        &self,
        kind: CollectiveKind,
        out: &TensorView,
        inp: &TensorView,
        stream: StreamPtr,
        stream_device: Option<i32>,
    ) -> Result<Launch> {
        let guard = self.lock();
        let state = guard.as_ref().ok_or_else(closed)?;
        let main = state.main;
        let lib = nccl::get()?;
        let target = Target {
            comm: main.comm,
            nranks: main.size as usize,
            device: main.device,
            stream,
            stream_device,
        };
        let mut call = collective::plan(kind, out, inp, target, lib.version())?;
        let per_rank_bytes = call.count.saturating_mul(call.dtype.size());
        let launch = match &state.twin {
            Some(twin) if twin.table.to_twin(kind, per_rank_bytes) => {
                call.comm = twin.comm;
                Launch::Twin
            }
            _ if self.stage_unaligned.load(Ordering::Relaxed)
                && unaligned_symmetric(&call, out, inp) =>
            {
                return Ok(Launch::NeedsStaging)
            }
            _ => Launch::Main,
        };
        // SAFETY: `plan` checked both buffers against this communicator (device, dtype,
        // contiguity, element counts), and the twin has the same ranks and device; the caller
        // keeps the tensors alive until the stream has run the collective, and the lock keeps
        // both communicators alive for the launch.
        unsafe { lib.launch(&call) }?;
        Ok(launch)
    }
}

/// Whether `call` is one the symmetric LL kernels' unaligned 16-bit defect hits.
fn unaligned_symmetric(call: &Collective, out: &TensorView, inp: &TensorView) -> bool {
    let per_rank = matches!(
        call.kind,
        CollectiveKind::AllGather | CollectiveKind::ReduceScatter(_)
    );
    if !per_rank
        || call.count.is_multiple_of(2)
        || !matches!(call.dtype, DataType::Float16 | DataType::Bfloat16)
    {
        return false;
    }
    allocator::with_table(|t| {
        [out, inp]
            .iter()
            .all(|v| t.is_registered(v.ptr.addr(), v.nbytes().max(1), call.comm))
    })
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Errors cannot be reported from a destructor; `close()` is the way to see them.
        let _ = self.close();
    }
}
