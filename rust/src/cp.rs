//! The context-parallel KV all-gather, enqueued on one stream: this rank's rows are copied into
//! its slot of a padded symmetric buffer, the padding is zeroed, the ranks all-gather in place,
//! and the padding is dropped by copying each rank's real rows into a compact output.
//!
//! `plan` is the arithmetic alone (no GPU, unit-tested); `enqueue` checks the buffers against the
//! plan and the communicator, then issues the copies (`copies`: one launch of a batched copy
//! kernel before the gather and one after, or driver copies) and one `ncclAllGather`. Each of those
//! is a stream operation, so the whole sequence can be captured in a CUDA graph.

use crate::collective::{self, CollectiveKind, Target, TensorView};
use crate::cuda::DeviceGuard;
use crate::error::{Error, Result};
use crate::handles::{CommPtr, DevicePtr, StreamPtr};
use crate::nccl;

mod copies;

use copies::Copier;
pub use copies::CopyMode;

/// NCCL 2.28's symmetric kernels give wrong results for 16-bit data whose per-rank size is not a
/// multiple of 16 bytes (tests/gpu/results/suite_alignment_*): every slot is padded to one.
pub const SLOT_ALIGN_BYTES: usize = 16;

/// `rows` rows from row `src` of one buffer to row `dst` of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCopy {
    pub src: usize,
    pub dst: usize,
    pub rows: usize,
}

/// Where every row goes, for one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub rank: usize,
    pub world: usize,
    pub row_bytes: usize,
    /// Rows per rank in the gathered buffer (the longest count, padded to `SLOT_ALIGN_BYTES`).
    pub slot_rows: usize,
    /// The rows of all ranks together: the output's length.
    pub total_rows: usize,
    /// Input rows into this rank's slot of the gathered buffer.
    pub fill: RowCopy,
    /// `(first row, rows)` of this rank's slot to zero: padding never reaches the result, and
    /// zeroing it keeps the gathered buffer deterministic.
    pub padding: (usize, usize),
    /// Whether some rank was padded, so the result needs its own buffer. When not, the gathered
    /// buffer is the result.
    pub compact: bool,
    /// Gathered rows into the output, when `compact`; runs of ranks whose rows are already
    /// contiguous (every rank before the last of a run fills its slot) are merged into one copy.
    pub compaction: Vec<RowCopy>,
}

impl Plan {
    /// Rows of the gathered buffer: one slot per rank.
    pub fn gathered_rows(&self) -> usize {
        self.slot_rows * self.world
    }
}

/// The plan for `rank` of `counts.len()` ranks, each row `row_bytes` long.
pub fn plan(rank: usize, counts: &[usize], row_bytes: usize) -> Result<Plan> {
    let world = counts.len();
    if rank >= world {
        return Err(Error::invalid_argument(format!(
            "rank {rank} is out of range for {world} per-rank counts"
        )));
    }
    let max = counts.iter().copied().max().unwrap_or(0);
    let align = if row_bytes == 0 {
        1
    } else {
        SLOT_ALIGN_BYTES / gcd(row_bytes, SLOT_ALIGN_BYTES)
    };
    let overflow = || Error::invalid_argument("the gathered buffer's size overflows");
    let slot_rows = max
        .div_ceil(align)
        .checked_mul(align)
        .ok_or_else(overflow)?;
    // Every offset below is at most the gathered buffer's size, so checking it once suffices.
    slot_rows
        .checked_mul(world)
        .and_then(|rows| rows.checked_mul(row_bytes.max(1)))
        .ok_or_else(overflow)?;
    let total_rows = counts.iter().sum();
    let mine = counts[rank];
    let start = rank * slot_rows;
    let compact = slot_rows != max || counts.iter().any(|&c| c != max);
    let mut compaction: Vec<RowCopy> = Vec::new();
    if compact {
        let mut dst = 0;
        for (r, &rows) in counts.iter().enumerate() {
            let src = r * slot_rows;
            if rows > 0 {
                // Destinations are always back to back; sources are when the run so far ends
                // where this slot starts (its ranks filled their slots).
                match compaction.last_mut() {
                    Some(run) if run.src + run.rows == src => run.rows += rows,
                    _ => compaction.push(RowCopy { src, dst, rows }),
                }
            }
            dst += rows;
        }
    }
    Ok(Plan {
        rank,
        world,
        row_bytes,
        slot_rows,
        total_rows,
        fill: RowCopy {
            src: 0,
            dst: start,
            rows: mine,
        },
        padding: (start + mine, slot_rows - mine),
        compact,
        compaction,
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The three tensors of one gather, as read from torch.
#[derive(Debug, Clone, Copy)]
pub struct Buffers {
    /// `slot_rows * world` rows, allocated inside the group's symmetric window.
    pub gathered: TensorView,
    /// This rank's `counts[rank]` rows.
    pub input: TensorView,
    /// `total_rows` rows when the plan compacts; `None` otherwise.
    pub output: Option<TensorView>,
}

/// What `enqueue` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// How the copies were issued: the mode asked for, or `Driver` where the kernel could not be
    /// loaded.
    pub copies: CopyMode,
    /// Why the kernel could not be loaded, the first time that happened on this context: for the
    /// caller to log (the crate has no logger of its own).
    pub warning: Option<String>,
}

/// Checks every buffer against the plan, then enqueues the gather on `stream`: copy into the
/// slot, zero the padding, all-gather in place on `comm`, and compact into the output, the
/// copies issued as `mode` says. `row_elems` is the elements per token row; `rank` is
/// cross-checked against NCCL.
#[allow(clippy::too_many_arguments)]
pub fn enqueue(
    comm: CommPtr,
    rank: usize,
    counts: &[usize],
    row_elems: usize,
    buffers: &Buffers,
    stream: StreamPtr,
    stream_device: Option<i32>,
    mode: CopyMode,
) -> Result<Enqueued> {
    let dtype = buffers.input.dtype;
    let row_bytes = row_elems
        .checked_mul(dtype.size())
        .ok_or_else(|| Error::invalid_argument("a token row's size overflows"))?;
    let plan = plan(rank, counts, row_bytes)?;
    let device = check_buffers(&plan, row_elems, buffers)?;
    let lib = nccl::get()?;
    let nranks = lib.comm_count(comm)?;
    let nccl_rank = lib.comm_user_rank(comm)?;
    if usize::try_from(nranks) != Ok(plan.world) || usize::try_from(nccl_rank) != Ok(rank) {
        return Err(Error::invalid_argument(format!(
            "the communicator is rank {nccl_rank} of {nranks}, but the call says rank {rank} \
             of {} (one count per rank)",
            plan.world
        )));
    }
    let target = Target {
        comm,
        nranks: plan.world,
        device: lib.comm_device(comm)?,
        stream,
        stream_device,
    };
    if device != Some(target.device) {
        // `collective::plan` below says which tensor is where; only CUDA tensors reach here.
        let d = device.unwrap_or(-1);
        return Err(Error::invalid_argument(format!(
            "the tensors are on cuda:{d}, but this communicator runs on cuda:{}",
            target.device
        )));
    }
    if plan.gathered_rows() == 0 || row_bytes == 0 {
        // Nothing to move; every rank sees the same counts and skips together.
        return Ok(Enqueued {
            copies: mode,
            warning: None,
        });
    }
    let g = buffers.gathered;
    let slot = TensorView {
        ptr: offset(g.ptr, plan.rank * plan.slot_rows * row_bytes)?,
        numel: plan.slot_rows * row_elems,
        ..g
    };
    let gather = collective::plan(CollectiveKind::AllGather, &g, &slot, target, lib.version())?;
    let _device = DeviceGuard::enter(target.device)?;
    let (copier, warning) = Copier::resolve(mode)?;
    let fill = copies::fill(&plan, g.ptr, buffers.input.ptr)?;
    let compaction = match buffers.output {
        Some(out) => copies::compaction(&plan, g.ptr, out.ptr)?,
        None => Vec::new(),
    };
    // SAFETY: `check_buffers` checked that the input holds `fill.rows` rows, that the gathered
    // buffer holds `gathered_rows()` rows (so the slot and its padding lie inside it), that the
    // output holds `total_rows` rows (every compaction copy ends inside both), and that no two
    // of the buffers overlap (so no copy's destination overlaps a source or another destination
    // of its step); all are CUDA memory of the stream's device, whose context the guard made
    // current (the one `Copier::resolve` loaded the kernel for), and the caller keeps them alive
    // until the stream has run these operations.
    unsafe {
        copier.enqueue(&fill, stream)?;
        lib.launch(&gather)?;
        copier.enqueue(&compaction, stream)?;
    }
    Ok(Enqueued {
        copies: copier.mode(),
        warning,
    })
}

fn offset(ptr: DevicePtr, bytes: usize) -> Result<DevicePtr> {
    ptr.checked_add(bytes)
        .ok_or_else(|| Error::invalid_argument("a buffer offset overflows the address space"))
}

/// Everything `enqueue` relies on for memory safety that needs no NCCL call: the three tensors
/// are contiguous CUDA memory of one device and dtype, hold exactly the rows the plan reads and
/// writes, and do not overlap. Returns their device.
fn check_buffers(plan: &Plan, row_elems: usize, b: &Buffers) -> Result<Option<i32>> {
    let mut named = vec![("input", b.input), ("gathered", b.gathered)];
    match (b.output, plan.compact) {
        (Some(out), true) => named.push(("output", out)),
        (None, false) => {}
        (Some(_), false) => {
            return Err(Error::invalid_argument(
                "output must be None: no rank needs padding, so the gathered buffer is the result",
            ))
        }
        (None, true) => {
            return Err(Error::invalid_argument(
                "output is needed: some rank is padded, and its rows must be compacted",
            ))
        }
    }
    let rows = [plan.fill.rows, plan.gathered_rows(), plan.total_rows];
    let device = b.input.device;
    for ((name, t), rows) in named.iter().zip(rows) {
        let Some(d) = t.device else {
            return Err(Error::invalid_argument(format!(
                "{name} is not a CUDA tensor"
            )));
        };
        if Some(d) != device {
            return Err(Error::invalid_argument(format!(
                "{name} is on cuda:{d}, but input is on cuda:{}",
                device.unwrap_or(-1)
            )));
        }
        if !t.contiguous {
            return Err(Error::invalid_argument(format!(
                "{name} must be contiguous"
            )));
        }
        if t.dtype != b.input.dtype {
            return Err(Error::InvalidType(format!(
                "{name} is {:?} but input is {:?}; they must match",
                t.dtype, b.input.dtype
            )));
        }
        let want = rows * row_elems;
        if t.numel != want {
            return Err(Error::invalid_argument(format!(
                "{name} must hold {rows} rows of {row_elems} elements ({want}); it holds {}",
                t.numel
            )));
        }
        if t.numel > 0 && t.ptr.is_null() {
            return Err(Error::invalid_argument(format!("{name} has no storage")));
        }
    }
    for (i, (a, ta)) in named.iter().enumerate() {
        for (z, tz) in &named[i + 1..] {
            if overlaps(ta, tz) {
                return Err(Error::invalid_argument(format!(
                    "{a} and {z} overlap; they must be separate buffers"
                )));
            }
        }
    }
    Ok(device)
}

fn overlaps(a: &TensorView, b: &TensorView) -> bool {
    let (a0, b0) = (a.ptr.addr(), b.ptr.addr());
    let (an, bn) = (a.nbytes(), b.nbytes());
    an > 0 && bn > 0 && a0 < b0.saturating_add(bn) && b0 < a0.saturating_add(an)
}

#[cfg(test)]
mod tests;
