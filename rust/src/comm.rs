//! A thin NCCL communicator owned by Rust: created from a unique id, destroyed exactly once
//! (after its windows are deregistered), and the collectives symm_rs needs. A collective's
//! buffers are checked by `collective::plan` against this communicator before NCCL sees them.

use std::sync::{Mutex, MutexGuard};

use crate::allocator;
use crate::collective::{self, CollectiveKind, Target, TensorView};
use crate::cuda::DeviceGuard;
use crate::error::{Error, Result};
use crate::handles::{CommPtr, StreamPtr};
use crate::nccl::{self, sys::NcclUniqueId};

#[derive(Debug, Clone, Copy)]
struct Live {
    comm: CommPtr,
    rank: i32,
    size: i32,
    device: i32,
}

/// An owned `ncclComm_t`. `None` inside once closed.
pub struct Communicator {
    live: Mutex<Option<Live>>,
}

/// The 128-byte id rank 0 creates and every rank passes to `Communicator::new`.
pub fn unique_id() -> Result<Vec<u8>> {
    let id = nccl::get()?.get_unique_id()?;
    Ok(id.internal.iter().map(|&b| b as u8).collect())
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
        Ok(Self {
            live: Mutex::new(Some(Live {
                comm,
                rank,
                size,
                device,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> Result<Live> {
        self.lock().ok_or_else(|| {
            Error::Closed("this Communicator is closed; create a new one to communicate".into())
        })
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

    /// Deregisters this communicator's windows, then destroys it. Idempotent.
    pub fn close(&self) -> Result<()> {
        let Some(live) = self.lock().take() else {
            return Ok(());
        };
        let windows = allocator::release_comm(live.comm);
        let lib = nccl::get()?;
        // SAFETY: `take()` removed the only copy of the handle, so it is destroyed once and
        // never used again; its windows were released just above.
        let destroyed = unsafe { lib.comm_destroy(live.comm) };
        windows.and(destroyed)
    }

    /// Checks the buffers against this communicator and enqueues `kind` on `stream`; the
    /// communicator stays locked meanwhile, so `close` cannot race with the launch.
    pub fn run(
        &self,
        kind: CollectiveKind,
        out: &TensorView,
        inp: &TensorView,
        stream: StreamPtr,
        stream_device: Option<i32>,
    ) -> Result<()> {
        let guard = self.lock();
        let live = guard.ok_or_else(|| {
            Error::Closed("this Communicator is closed; create a new one to communicate".into())
        })?;
        let lib = nccl::get()?;
        let target = Target {
            comm: live.comm,
            nranks: live.size as usize,
            device: live.device,
            stream,
            stream_device,
        };
        let call = collective::plan(kind, out, inp, target, lib.version())?;
        // SAFETY: `plan` checked both buffers against this communicator (device, dtype,
        // contiguity, element counts); the caller keeps the tensors alive until the stream has
        // run the collective, and the lock keeps `comm` alive for the launch.
        unsafe { lib.launch(&call) }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Errors cannot be reported from a destructor; `close()` is the way to see them.
        let _ = self.close();
    }
}
