//! A thin NCCL communicator owned by Rust: created from a unique id, destroyed exactly once
//! (after its windows are deregistered), and the collectives symm_rs needs. Arguments arrive
//! already validated by the Python layer; this layer only guards the communicator's lifetime.

use std::sync::{Mutex, MutexGuard};

use crate::allocator;
use crate::cuda::DeviceGuard;
use crate::error::{Error, Result};
use crate::nccl::{self, sys::NcclUniqueId, Collective};

/// Reductions, numbered as `ncclRedOp_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Prod = 1,
    Max = 2,
    Min = 3,
    Avg = 4,
}

impl ReduceOp {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sum" => Ok(Self::Sum),
            "prod" | "product" => Ok(Self::Prod),
            "max" => Ok(Self::Max),
            "min" => Ok(Self::Min),
            "avg" | "mean" => Ok(Self::Avg),
            other => Err(Error::invalid_argument(format!(
                "op must be one of 'sum', 'prod', 'max', 'min', 'avg'; got {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Live {
    comm: usize,
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

    pub fn comm(&self) -> Result<usize> {
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

    /// Runs one collective with the communicator held, so `close` cannot race with it.
    fn with_live(&self, f: impl FnOnce(&nccl::Nccl, Live) -> Result<()>) -> Result<()> {
        let guard = self.lock();
        let live = guard.ok_or_else(|| {
            Error::Closed("this Communicator is closed; create a new one to communicate".into())
        })?;
        f(nccl::get()?, live)
    }

    /// `count` elements from every rank into `recv` (`count * size` elements).
    pub fn all_gather(
        &self,
        send: usize,
        recv: usize,
        count: usize,
        dtype: i32,
        stream: usize,
    ) -> Result<()> {
        self.with_live(|lib, live| {
            // SAFETY: the Python layer checked both tensors are contiguous CUDA tensors of this
            // communicator's device, of `dtype`, with `count` and `count * size` elements, and
            // `stream` is a live stream of that device; the lock keeps `comm` alive.
            unsafe { lib.all_gather(Collective::new(send, recv, count, dtype, live.comm, stream)) }
        })
    }

    /// Reduces `count` elements across ranks into `recv`.
    pub fn all_reduce(
        &self,
        send: usize,
        recv: usize,
        count: usize,
        dtype: i32,
        op: ReduceOp,
        stream: usize,
    ) -> Result<()> {
        self.with_live(|lib, live| {
            // SAFETY: as in `all_gather`, with `count` elements in both buffers.
            unsafe {
                lib.all_reduce(
                    Collective::new(send, recv, count, dtype, live.comm, stream),
                    op as i32,
                )
            }
        })
    }

    /// Reduces `count * size` elements and leaves this rank's `count` in `recv`.
    pub fn reduce_scatter(
        &self,
        send: usize,
        recv: usize,
        count: usize,
        dtype: i32,
        op: ReduceOp,
        stream: usize,
    ) -> Result<()> {
        self.with_live(|lib, live| {
            // SAFETY: as in `all_gather`, with `count * size` elements sent and `count` received.
            unsafe {
                lib.reduce_scatter(
                    Collective::new(send, recv, count, dtype, live.comm, stream),
                    op as i32,
                )
            }
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Errors cannot be reported from a destructor; `close()` is the way to see them.
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::ReduceOp;

    #[test]
    fn parses_reduce_ops_and_rejects_others() {
        assert_eq!(ReduceOp::parse("SUM").unwrap(), ReduceOp::Sum);
        assert_eq!(ReduceOp::parse("avg").unwrap() as i32, 4);
        let err = ReduceOp::parse("xor").unwrap_err().to_string();
        assert!(err.contains("'sum'") && err.contains("xor"), "{err}");
    }
}
