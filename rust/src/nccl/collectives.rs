//! The calls that enqueue work on a stream: the collectives, and NCCL groups around them.
//! Every layer above matches on `CollectiveKind` once; this is the arm per collective here.

use std::cell::Cell;
use std::ffi::{c_int, c_void};

use super::api::raw_comm;
use super::library::Nccl;
use super::sys;
use crate::collective::{Collective, CollectiveKind};
use crate::error::Result;

thread_local! {
    // ncclGroupStart/End nest per thread; inside a group NCCL defers work (and writes a
    // window handle only at the outermost end), so calls that need the result now refuse.
    static GROUP_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Whether this thread is inside `group_start` / `group_end` made through symm_rs.
pub fn in_group() -> bool {
    GROUP_DEPTH.with(|depth| depth.get() > 0)
}

impl Nccl {
    /// Enqueues one collective on its stream.
    ///
    /// # Safety
    /// `c` must come from `collective::plan` (buffers of the right size, dtype and device) for
    /// tensors that stay alive until the stream has run it, and `c.comm` and `c.stream` must be
    /// live.
    pub unsafe fn launch(&self, c: &Collective) -> Result<()> {
        let send = c.send.addr() as *const c_void;
        let recv = c.recv.addr() as *mut c_void;
        let (comm, stream, dtype) = (
            raw_comm(c.comm),
            c.stream.addr() as sys::CudaStream,
            c.dtype as c_int,
        );
        let (call, code) = match c.kind {
            CollectiveKind::AllGather => {
                let f = self.basic(self.symbols.all_gather, "ncclAllGather")?;
                // SAFETY: guaranteed by the caller.
                ("ncclAllGather", unsafe {
                    f(send, recv, c.count, dtype, comm, stream)
                })
            }
            CollectiveKind::AllReduce(op) => {
                let f = self.basic(self.symbols.all_reduce, "ncclAllReduce")?;
                // SAFETY: guaranteed by the caller.
                ("ncclAllReduce", unsafe {
                    f(send, recv, c.count, dtype, op as c_int, comm, stream)
                })
            }
            CollectiveKind::ReduceScatter(op) => {
                let f = self.basic(self.symbols.reduce_scatter, "ncclReduceScatter")?;
                // SAFETY: guaranteed by the caller.
                ("ncclReduceScatter", unsafe {
                    f(send, recv, c.count, dtype, op as c_int, comm, stream)
                })
            }
        };
        self.check(call, code, Some(c.comm))
    }

    pub fn group_start(&self) -> Result<()> {
        let f = self.basic(self.symbols.group_start, "ncclGroupStart")?;
        // SAFETY: takes no arguments; only changes NCCL's thread-local group depth.
        let code = unsafe { f() };
        self.check("ncclGroupStart", code, None)?;
        GROUP_DEPTH.with(|depth| depth.set(depth.get() + 1));
        Ok(())
    }

    pub fn group_end(&self) -> Result<()> {
        let f = self.basic(self.symbols.group_end, "ncclGroupEnd")?;
        // NCCL leaves the group even when launching what it queued fails.
        GROUP_DEPTH.with(|depth| depth.set(depth.get().saturating_sub(1)));
        // SAFETY: takes no arguments; launches what was queued since ncclGroupStart.
        let code = unsafe { f() };
        self.check("ncclGroupEnd", code, None)
    }
}
