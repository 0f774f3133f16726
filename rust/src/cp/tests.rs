use super::*;
use crate::collective::DataType;

fn copy(src: usize, dst: usize, rows: usize) -> RowCopy {
    RowCopy { src, dst, rows }
}

/// Runs a plan on host arrays, one rank at a time: every rank fills its slot (rows labelled
/// `(rank, row)`, padding `None`), the gather concatenates the slots, and each rank compacts.
/// Every rank's result must be every rank's rows in rank order, with no padding.
fn simulate(counts: &[usize], row_bytes: usize) {
    let world = counts.len();
    let plans: Vec<Plan> = (0..world)
        .map(|r| plan(r, counts, row_bytes).unwrap())
        .collect();
    let slot = plans[0].slot_rows;
    let mut gathered = vec![Some((usize::MAX, 0)); slot * world];
    for p in &plans {
        assert_eq!(
            (p.slot_rows, p.world, p.compact),
            (slot, world, plans[0].compact)
        );
        assert_eq!(p.fill.src, 0);
        // The fill and the padding cover exactly this rank's slot.
        assert_eq!(p.fill.dst, p.rank * slot);
        assert_eq!(p.padding, (p.fill.dst + p.fill.rows, slot - p.fill.rows));
        for i in 0..p.fill.rows {
            gathered[p.fill.dst + i] = Some((p.rank, i));
        }
        for i in 0..p.padding.1 {
            gathered[p.padding.0 + i] = None;
        }
    }
    let expected: Vec<(usize, usize)> = counts
        .iter()
        .enumerate()
        .flat_map(|(r, &n)| (0..n).map(move |i| (r, i)))
        .collect();
    for p in &plans {
        assert_eq!(p.total_rows, expected.len());
        let result: Vec<Option<(usize, usize)>> = if p.compact {
            let mut out = vec![Some((usize::MAX, 1)); p.total_rows];
            for c in &p.compaction {
                assert!(c.rows > 0, "empty copy in {:?}", p.compaction);
                out[c.dst..c.dst + c.rows].copy_from_slice(&gathered[c.src..c.src + c.rows]);
            }
            out
        } else {
            gathered.clone()
        };
        let want: Vec<_> = expected.iter().copied().map(Some).collect();
        assert_eq!(
            result, want,
            "counts={counts:?} row_bytes={row_bytes} rank={}",
            p.rank
        );
    }
}

#[test]
fn equal_aligned_counts_need_no_compaction() {
    let p = plan(1, &[8, 8], 2048).unwrap();
    assert_eq!((p.slot_rows, p.total_rows, p.compact), (8, 16, false));
    assert!(p.compaction.is_empty());
    assert_eq!((p.fill, p.padding), (copy(0, 8, 8), (16, 0)));
}

#[test]
fn odd_16_bit_rows_pad_each_slot_to_16_bytes() {
    // One bf16 per row: 3 rows are 6 bytes, so the slot grows to 8 rows (16 bytes) even though
    // every rank holds 3, and the padding must be dropped again.
    let p = plan(0, &[3, 3], 2).unwrap();
    assert_eq!((p.slot_rows, p.compact), (8, true));
    assert_eq!(p.compaction, vec![copy(0, 0, 3), copy(8, 3, 3)]);
    assert_eq!(p.padding, (3, 5));
    // Three bf16 per row (6 bytes): 8 rows make 48 bytes.
    assert_eq!(plan(0, &[5, 1], 6).unwrap().slot_rows, 8);
    // 1 x 576 bf16 rows are 1152 bytes, a multiple of 16: no alignment padding.
    let mla = plan(1, &[4096, 4093], 1152).unwrap();
    assert_eq!((mla.slot_rows, mla.padding), (4096, (8189, 3)));
    // Rank 0 fills its slot, so both ranks' rows are already contiguous: one copy.
    assert_eq!(mla.compaction, vec![copy(0, 0, 8189)]);
}

#[test]
fn uneven_and_zero_counts() {
    let p = plan(2, &[5, 3, 0, 7], 2048).unwrap();
    assert_eq!((p.slot_rows, p.total_rows), (7, 15));
    assert_eq!(
        p.compaction,
        vec![copy(0, 0, 5), copy(7, 5, 3), copy(21, 8, 7)]
    );
    assert_eq!((p.fill, p.padding), (copy(0, 14, 0), (14, 7)));
    // Full slots merge with the next rank's rows, across ranks that hold nothing.
    let p = plan(0, &[4, 4, 3], 16).unwrap();
    assert_eq!(p.compaction, vec![copy(0, 0, 11)]);
    let p = plan(0, &[4, 0, 4, 1], 16).unwrap();
    assert_eq!(p.compaction, vec![copy(0, 0, 4), copy(8, 4, 5)]);
}

#[test]
fn all_empty_is_an_empty_plan() {
    let p = plan(1, &[0, 0], 2).unwrap();
    assert_eq!((p.slot_rows, p.total_rows, p.compact), (0, 0, false));
    assert_eq!(p.gathered_rows(), 0);
    assert_eq!(p.padding, (0, 0));
    // Rows of no bytes (a zero trailing dimension) need no alignment.
    assert_eq!(plan(0, &[3, 1], 0).unwrap().slot_rows, 3);
}

#[test]
fn every_rank_of_many_shapes_gathers_exactly() {
    let cases: &[&[usize]] = &[
        &[1],
        &[0, 1],
        &[3, 0],
        &[5, 3, 0, 7],
        &[4, 4, 4, 4],
        &[4, 4, 4, 3],
        &[0, 0, 0, 1],
        &[9, 0, 0, 3],
        &[17, 16, 15, 1, 0, 33, 2, 2],
    ];
    for counts in cases {
        for row_bytes in [0, 1, 2, 4, 6, 8, 16, 18, 256, 1152, 2048] {
            simulate(counts, row_bytes);
            let p = plan(0, counts, row_bytes).unwrap();
            let max = counts.iter().copied().max().unwrap();
            assert!(
                p.slot_rows >= max && (p.slot_rows * row_bytes).is_multiple_of(SLOT_ALIGN_BYTES)
            );
            assert!(
                p.slot_rows - max < SLOT_ALIGN_BYTES,
                "{counts:?} {row_bytes}"
            );
        }
    }
}

#[test]
fn bad_ranks_and_overflow_are_errors() {
    assert!(plan(2, &[1, 1], 2)
        .unwrap_err()
        .to_string()
        .contains("rank 2"));
    assert!(plan(0, &[], 2).is_err());
    let err = plan(0, &[usize::MAX / 2, 1], 2).unwrap_err().to_string();
    assert!(err.contains("overflows"), "{err}");
}

fn view(ptr: usize, numel: usize) -> TensorView {
    TensorView {
        ptr: DevicePtr::new(ptr),
        numel,
        dtype: DataType::Bfloat16,
        device: Some(0),
        contiguous: true,
    }
}

#[test]
fn buffers_are_checked_against_the_plan() {
    // counts [3, 2], 4 elements (8 bytes) per row: slot 4 rows, gathered 8 rows, output 5.
    let p = plan(1, &[3, 2], 8).unwrap();
    let good = Buffers {
        gathered: view(0x10000, 32),
        input: view(0x20000, 8),
        output: Some(view(0x30000, 20)),
    };
    assert_eq!(check_buffers(&p, 4, &good).unwrap(), Some(0));
    let err = |b: Buffers| check_buffers(&p, 4, &b).unwrap_err().to_string();
    assert!(err(Buffers {
        output: None,
        ..good
    })
    .contains("output is needed"));
    let short = Buffers {
        gathered: view(0x10000, 31),
        ..good
    };
    assert!(err(short).contains("gathered must hold 8 rows of 4 elements (32)"));
    let cpu = Buffers {
        input: TensorView {
            device: None,
            ..good.input
        },
        ..good
    };
    assert!(err(cpu).contains("input is not a CUDA tensor"));
    let elsewhere = Buffers {
        output: Some(TensorView {
            device: Some(1),
            ..view(0x30000, 20)
        }),
        ..good
    };
    assert!(err(elsewhere).contains("output is on cuda:1, but input is on cuda:0"));
    let inside = Buffers {
        input: view(0x10000 + 16, 8),
        ..good
    };
    assert!(err(inside).contains("input and gathered overlap"));
    let strided = Buffers {
        gathered: TensorView {
            contiguous: false,
            ..good.gathered
        },
        ..good
    };
    assert!(err(strided).contains("gathered must be contiguous"));
    let wrong_type = Buffers {
        output: Some(TensorView {
            dtype: DataType::Float16,
            ..view(0x30000, 20)
        }),
        ..good
    };
    assert!(matches!(
        check_buffers(&p, 4, &wrong_type),
        Err(Error::InvalidType(_))
    ));
    // No rank padded: the gathered buffer is the result, and an output is a mistake.
    let even = plan(0, &[4, 4], 8).unwrap();
    assert!(check_buffers(&even, 4, &good)
        .unwrap_err()
        .to_string()
        .contains("output must be None"));
}
