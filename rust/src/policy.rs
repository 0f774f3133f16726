//! The size policy's routing table: per collective, the byte ranges (bytes per rank) where
//! NCCL's regular algorithms beat its symmetric kernels. A call in one of them goes to the
//! communicator's window-less twin, where NCCL cannot pick a symmetric kernel. The Python
//! layer parses, validates and documents tables (`symm_rs.policy`); this is the lookup, the one
//! Python's `PolicyTable.use_twin` asks too (`_native.RouteTable`).

use crate::collective::CollectiveKind;
use crate::error::{Error, Result};

/// `[low, high)` in bytes per rank; `None` is unbounded.
type Range = (usize, Option<usize>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Indexed by `CollectiveKind::index`.
    ranges: [Vec<Range>; CollectiveKind::ALL.len()],
}

impl RouteTable {
    /// From `(collective name, low, high)` entries, e.g. `("all_reduce", 65536, None)`.
    pub fn new(entries: &[(String, usize, Option<usize>)]) -> Result<Self> {
        let mut table = Self::default();
        for (name, low, high) in entries {
            let Some(kind) = CollectiveKind::named(name) else {
                return Err(Error::invalid_argument(format!(
                    "policy table: unknown collective {name:?} (one of {})",
                    CollectiveKind::names_quoted()
                )));
            };
            if matches!(high, Some(h) if h <= low) {
                return Err(Error::invalid_argument(format!(
                    "policy table: {name} range [{low}, {high:?}) is empty"
                )));
            }
            table.ranges[kind.index()].push((*low, *high));
        }
        Ok(table)
    }

    /// Whether a `kind` call of `bytes` per rank belongs on the twin.
    pub fn to_twin(&self, kind: CollectiveKind, bytes: usize) -> bool {
        self.ranges[kind.index()]
            .iter()
            .any(|&(low, high)| bytes >= low && high.is_none_or(|h| bytes < h))
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.iter().all(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ReduceOp;

    #[test]
    fn ranges_are_half_open_and_per_collective() {
        let table = RouteTable::new(&[
            ("all_reduce".into(), 64 << 10, Some(1 << 20)),
            ("all_reduce".into(), 16 << 20, None),
            ("reduce_scatter".into(), 0, None),
        ])
        .unwrap();
        let ar = CollectiveKind::AllReduce(ReduceOp::Sum);
        assert!(!table.to_twin(ar, (64 << 10) - 1));
        assert!(table.to_twin(ar, 64 << 10));
        assert!(!table.to_twin(ar, 1 << 20));
        assert!(table.to_twin(ar, 1 << 30));
        assert!(table.to_twin(CollectiveKind::ReduceScatter(ReduceOp::Max), 2));
        assert!(!table.to_twin(CollectiveKind::AllGather, 1 << 30));
        assert!(RouteTable::default().is_empty() && !table.is_empty());
    }

    #[test]
    fn rejects_unknown_collectives_and_empty_ranges() {
        let err = RouteTable::new(&[("broadcast".into(), 0, None)]).unwrap_err();
        assert!(err.to_string().contains("broadcast"), "{err}");
        let err = RouteTable::new(&[("all_gather".into(), 8, Some(8))]).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
