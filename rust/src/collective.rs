//! What a collective is, independent of who runs it: the NCCL data types and reductions, the
//! three collectives symm_rs offers, and the checks that make a launch sound. Every layer above
//! (`nccl::api`, `comm`, `python`) matches on `CollectiveKind` once, so adding a collective is one
//! arm per layer; the checks live here, next to the sizes the `unsafe` NCCL calls rely on.

use crate::error::{Error, Result};
use crate::handles::{CommPtr, DevicePtr, StreamPtr};
use crate::nccl::NcclVersion;

/// `ncclDataType_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Uint32 = 3,
    Int64 = 4,
    Uint64 = 5,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
    Float8E4m3 = 10,
    Float8E5m2 = 11,
}

impl DataType {
    /// fp8 collectives need NCCL 2.24.
    const FP8: NcclVersion = NcclVersion::new(2, 24, 0);

    /// torch's name for each type NCCL has: the one table `from_torch_name` reads and Python
    /// sees (`_native.NCCL_DTYPE_NAMES`).
    pub const TORCH_NAMES: [(&'static str, Self); 12] = [
        ("int8", Self::Int8),
        ("uint8", Self::Uint8),
        ("int32", Self::Int32),
        ("uint32", Self::Uint32),
        ("int64", Self::Int64),
        ("uint64", Self::Uint64),
        ("float16", Self::Float16),
        ("float32", Self::Float32),
        ("float64", Self::Float64),
        ("bfloat16", Self::Bfloat16),
        ("float8_e4m3fn", Self::Float8E4m3),
        ("float8_e5m2", Self::Float8E5m2),
    ];

    /// From torch's name for a dtype (`"bfloat16"`, `"torch.bfloat16"`).
    pub fn from_torch_name(name: &str) -> Result<Self> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        Self::TORCH_NAMES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, dtype)| *dtype)
            .ok_or_else(|| {
                let supported: Vec<&str> = Self::TORCH_NAMES.iter().map(|(n, _)| *n).collect();
                Error::InvalidType(format!(
                    "NCCL has no type for {name}; supported: {}",
                    supported.join(", ")
                ))
            })
    }

    pub fn size(self) -> usize {
        match self {
            Self::Int8 | Self::Uint8 | Self::Float8E4m3 | Self::Float8E5m2 => 1,
            Self::Float16 | Self::Bfloat16 => 2,
            Self::Int32 | Self::Uint32 | Self::Float32 => 4,
            Self::Int64 | Self::Uint64 | Self::Float64 => 8,
        }
    }

    /// Ok when the NCCL in use has this type.
    pub fn check_supported(self, version: NcclVersion) -> Result<()> {
        if matches!(self, Self::Float8E4m3 | Self::Float8E5m2) && version < Self::FP8 {
            return Err(Error::InvalidType(format!(
                "{self:?} collectives need NCCL >= 2.24; this NCCL is {version}"
            )));
        }
        Ok(())
    }
}

/// `ncclRedOp_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Prod = 1,
    Max = 2,
    Min = 3,
    Avg = 4,
}

impl ReduceOp {
    /// Every reduction by its name: the one table `parse` reads and Python sees
    /// (`_native.REDUCE_OPS`).
    pub const ALL: [(&'static str, Self); 5] = [
        ("sum", Self::Sum),
        ("prod", Self::Prod),
        ("max", Self::Max),
        ("min", Self::Min),
        ("avg", Self::Avg),
    ];
    /// Other spellings `parse` takes (torch's `ReduceOp` says `product`; numpy says `mean`).
    const ALIASES: [(&'static str, Self); 2] = [("product", Self::Prod), ("mean", Self::Avg)];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, op)| *op == self)
            .map_or("?", |(name, _)| name)
    }

    /// From a name in `ALL` or an alias, ignoring case.
    pub fn parse(name: &str) -> Result<Self> {
        let wanted = name.to_ascii_lowercase();
        Self::ALL
            .iter()
            .chain(&Self::ALIASES)
            .find(|(known, _)| *known == wanted)
            .map(|(_, op)| *op)
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL.iter().map(|(n, _)| format!("'{n}'")).collect();
                Error::invalid_argument(format!(
                    "op must be one of {}; got {wanted:?}",
                    names.join(", ")
                ))
            })
    }
}

/// The collectives symm_rs runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveKind {
    /// `count` elements from every rank into `count * nranks`.
    AllGather,
    /// `count` elements reduced across ranks.
    AllReduce(ReduceOp),
    /// `count * nranks` elements reduced; this rank keeps its `count`.
    ReduceScatter(ReduceOp),
}

impl CollectiveKind {
    /// Every collective, once (the reductions are placeholders): the one list of names that
    /// parsing, the policy table and Python (`_native.COLLECTIVES`) read. Adding a collective
    /// is a variant here and an arm in each `match` below and in `nccl::api`.
    pub const ALL: [Self; 3] = [
        Self::AllGather,
        Self::AllReduce(ReduceOp::Sum),
        Self::ReduceScatter(ReduceOp::Sum),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::AllGather => "all_gather",
            Self::AllReduce(_) => "all_reduce",
            Self::ReduceScatter(_) => "reduce_scatter",
        }
    }

    /// Position in `ALL`, whatever the reduction: tables per collective index by it.
    pub fn index(self) -> usize {
        match self {
            Self::AllGather => 0,
            Self::AllReduce(_) => 1,
            Self::ReduceScatter(_) => 2,
        }
    }

    /// The collective called `name`, with a placeholder reduction.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The names in `ALL`, quoted and joined, for messages.
    pub fn names_quoted() -> String {
        let names: Vec<String> = Self::ALL
            .iter()
            .map(|k| format!("'{}'", k.name()))
            .collect();
        names.join(", ")
    }

    /// `name` with its reduction `op` (read only by the collectives that reduce).
    pub fn parse(name: &str, op: &str) -> Result<Self> {
        match Self::named(name) {
            Some(Self::AllReduce(_)) => Ok(Self::AllReduce(ReduceOp::parse(op)?)),
            Some(Self::ReduceScatter(_)) => Ok(Self::ReduceScatter(ReduceOp::parse(op)?)),
            Some(kind) => Ok(kind),
            None => Err(Error::invalid_argument(format!(
                "kind must be one of {}; got {name:?}",
                Self::names_quoted()
            ))),
        }
    }

    /// `(send elements, recv elements)` for `count` per rank.
    fn extents(self, count: usize, nranks: usize) -> Option<(usize, usize)> {
        let all = count.checked_mul(nranks)?;
        Some(match self {
            Self::AllGather => (count, all),
            Self::AllReduce(_) => (count, count),
            Self::ReduceScatter(_) => (all, count),
        })
    }
}

/// A tensor as the collective sees it, read from torch by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorView {
    pub ptr: DevicePtr,
    pub numel: usize,
    pub dtype: DataType,
    /// The CUDA device index, or `None` for a tensor that is not on a CUDA device.
    pub device: Option<i32>,
    pub contiguous: bool,
}

impl TensorView {
    pub fn nbytes(&self) -> usize {
        self.numel * self.dtype.size()
    }
}

/// One launch: checked buffers on one communicator and stream.
#[derive(Debug, Clone, Copy)]
pub struct Collective {
    pub kind: CollectiveKind,
    pub send: DevicePtr,
    pub recv: DevicePtr,
    /// Elements per rank (what NCCL calls `count`/`recvcount`/`sendcount`).
    pub count: usize,
    pub dtype: DataType,
    pub comm: CommPtr,
    pub stream: StreamPtr,
}

/// Where the launch runs: the communicator, its size and device, and the stream's device.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub comm: CommPtr,
    pub nranks: usize,
    pub device: i32,
    pub stream: StreamPtr,
    /// The stream's device, when the caller knows it.
    pub stream_device: Option<i32>,
}

fn check_tensor(name: &str, t: &TensorView, device: i32) -> Result<()> {
    match t.device {
        Some(d) if d == device => {}
        Some(d) => {
            return Err(Error::invalid_argument(format!(
                "{name} is on cuda:{d}, but this communicator runs on cuda:{device}"
            )))
        }
        None => {
            return Err(Error::invalid_argument(format!(
                "{name} is not a CUDA tensor; this communicator runs on cuda:{device}"
            )))
        }
    }
    if !t.contiguous {
        return Err(Error::invalid_argument(format!(
            "{name} must be contiguous (call .contiguous() first)"
        )));
    }
    if t.numel > 0 && t.ptr.is_null() {
        return Err(Error::invalid_argument(format!("{name} has no storage")));
    }
    Ok(())
}

/// Checks `out` and `inp` for `kind` on `target` and returns the launch. Every property the
/// NCCL call relies on for memory safety is checked here: both buffers are contiguous CUDA
/// memory of the communicator's device, of one dtype, holding exactly the elements NCCL will
/// read and write.
pub fn plan(
    kind: CollectiveKind,
    out: &TensorView,
    inp: &TensorView,
    target: Target,
    version: NcclVersion,
) -> Result<Collective> {
    check_tensor("out", out, target.device)?;
    check_tensor("inp", inp, target.device)?;
    if let Some(d) = target.stream_device {
        if d != target.device {
            return Err(Error::invalid_argument(format!(
                "stream is on cuda:{d}, but this communicator runs on cuda:{}",
                target.device
            )));
        }
    }
    if out.dtype != inp.dtype {
        return Err(Error::InvalidType(format!(
            "out is {:?} but inp is {:?}; they must match",
            out.dtype, inp.dtype
        )));
    }
    inp.dtype.check_supported(version)?;
    let nranks = target.nranks.max(1);
    let count = match kind {
        CollectiveKind::AllGather | CollectiveKind::AllReduce(_) => inp.numel,
        CollectiveKind::ReduceScatter(_) => out.numel,
    };
    let (send, recv) = kind
        .extents(count, nranks)
        .ok_or_else(|| Error::invalid_argument("element count overflows"))?;
    let expectation = match kind {
        CollectiveKind::AllGather => "out must hold size * inp.numel()",
        CollectiveKind::AllReduce(_) => "out must have as many elements as inp",
        CollectiveKind::ReduceScatter(_) => "inp must hold size * out.numel()",
    };
    if inp.numel != send || out.numel != recv {
        return Err(Error::invalid_argument(format!(
            "{expectation} ({} ranks): got inp.numel()={}, out.numel()={}",
            nranks, inp.numel, out.numel
        )));
    }
    Ok(Collective {
        kind,
        send: inp.ptr,
        recv: out.ptr,
        count,
        dtype: inp.dtype,
        comm: target.comm,
        stream: target.stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(numel: usize, dtype: DataType) -> TensorView {
        TensorView {
            ptr: DevicePtr::new(0x1000),
            numel,
            dtype,
            device: Some(1),
            contiguous: true,
        }
    }

    fn target() -> Target {
        Target {
            comm: CommPtr::new(0xC0),
            nranks: 4,
            device: 1,
            stream: StreamPtr::new(0),
            stream_device: Some(1),
        }
    }

    const V: NcclVersion = NcclVersion::new(2, 28, 9);

    #[test]
    fn sizes_follow_the_collective() {
        let bf = DataType::Bfloat16;
        let ag = plan(
            CollectiveKind::AllGather,
            &view(40, bf),
            &view(10, bf),
            target(),
            V,
        );
        assert_eq!(ag.unwrap().count, 10);
        let rs = CollectiveKind::ReduceScatter(ReduceOp::Sum);
        assert_eq!(
            plan(rs, &view(10, bf), &view(40, bf), target(), V)
                .unwrap()
                .count,
            10
        );
        let err = plan(
            CollectiveKind::AllGather,
            &view(39, bf),
            &view(10, bf),
            target(),
            V,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("size * inp.numel()") && err.contains("39"),
            "{err}"
        );
    }

    #[test]
    fn devices_dtypes_layout_and_streams_are_checked() {
        let f = DataType::Float32;
        let ar = CollectiveKind::AllReduce(ReduceOp::Sum);
        let mut elsewhere = view(8, f);
        elsewhere.device = Some(0);
        let err = plan(ar, &elsewhere, &view(8, f), target(), V).unwrap_err();
        assert!(err.to_string().contains("out is on cuda:0"), "{err}");
        let mut strided = view(8, f);
        strided.contiguous = false;
        assert!(plan(ar, &view(8, f), &strided, target(), V)
            .unwrap_err()
            .to_string()
            .contains("inp must be contiguous"));
        let err = plan(ar, &view(8, DataType::Float16), &view(8, f), target(), V).unwrap_err();
        assert!(matches!(err, Error::InvalidType(_)), "{err}");
        let mut t = target();
        t.stream_device = Some(3);
        assert!(plan(ar, &view(8, f), &view(8, f), t, V)
            .unwrap_err()
            .to_string()
            .contains("stream is on cuda:3"));
        let cpu = TensorView {
            device: None,
            ..view(8, f)
        };
        assert!(plan(ar, &cpu, &view(8, f), target(), V).is_err());
    }

    #[test]
    fn fp8_needs_nccl_2_24() {
        let e4 = DataType::from_torch_name("torch.float8_e4m3fn").unwrap();
        let ar = CollectiveKind::AllReduce(ReduceOp::Max);
        assert!(plan(ar, &view(8, e4), &view(8, e4), target(), V).is_ok());
        let old = NcclVersion::new(2, 21, 5);
        assert!(matches!(
            plan(ar, &view(8, e4), &view(8, e4), target(), old),
            Err(Error::InvalidType(_))
        ));
        assert!(DataType::from_torch_name("complex64").is_err());
    }

    #[test]
    fn every_collective_parses_by_its_name_and_indexes_its_place() {
        for (i, kind) in CollectiveKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(CollectiveKind::parse(kind.name(), "sum").unwrap(), kind);
        }
        assert_eq!(
            CollectiveKind::parse("reduce_scatter", "max").unwrap(),
            CollectiveKind::ReduceScatter(ReduceOp::Max)
        );
        let err = CollectiveKind::parse("broadcast", "sum")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'all_gather'") && err.contains("broadcast"),
            "{err}"
        );
        for (name, op) in ReduceOp::ALL {
            assert_eq!(op.name(), name);
        }
    }

    #[test]
    fn parses_reduce_ops_and_rejects_others() {
        assert_eq!(ReduceOp::parse("SUM").unwrap(), ReduceOp::Sum);
        assert_eq!(ReduceOp::parse("avg").unwrap() as i32, 4);
        let err = ReduceOp::parse("xor").unwrap_err().to_string();
        assert!(err.contains("'sum'") && err.contains("xor"), "{err}");
    }
}
