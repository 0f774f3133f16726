use super::*;
use crate::cp::plan;

fn ptr(addr: usize) -> DevicePtr {
    DevicePtr::new(addr)
}

#[test]
fn modes_parse_by_name_ignoring_case_and_space() {
    assert_eq!(CopyMode::parse("kernel"), Some(CopyMode::Kernel));
    assert_eq!(CopyMode::parse(" Driver "), Some(CopyMode::Driver));
    assert_eq!(CopyMode::parse("memcpy"), None);
    for mode in [CopyMode::Kernel, CopyMode::Driver] {
        assert_eq!(CopyMode::parse(mode.name()), Some(mode));
    }
    assert_eq!(
        CopyMode::NAMES,
        [CopyMode::Kernel.name(), CopyMode::Driver.name()]
    );
}

#[test]
fn the_fill_is_the_input_then_zeros_over_the_rest_of_the_slot() {
    // Rank 2 of [5, 3, 0, 7] holds nothing: an empty fill, a whole slot of zeros (8 rows).
    let p = plan(2, &[5, 3, 0, 7], 6).unwrap();
    assert_eq!(p.slot_rows, 8); // 7 rows of 6 bytes, padded to 48 bytes
    let [input, zeros] = fill(&p, ptr(0x10000), ptr(0x20000)).unwrap();
    assert_eq!(
        input,
        ByteCopy {
            dst: ptr(0x10000 + 16 * 6),
            src: Some(ptr(0x20000)),
            bytes: 0
        }
    );
    assert_eq!(
        zeros,
        ByteCopy {
            dst: ptr(0x10000 + 16 * 6),
            src: None,
            bytes: 48
        }
    );
    // Rank 1: 3 rows in, 5 rows of zeros after them.
    let p = plan(1, &[5, 3, 0, 7], 6).unwrap();
    let [input, zeros] = fill(&p, ptr(0x10000), ptr(0x20000)).unwrap();
    assert_eq!(
        input,
        ByteCopy {
            dst: ptr(0x10000 + 48),
            src: Some(ptr(0x20000)),
            bytes: 18
        }
    );
    assert_eq!(
        zeros,
        ByteCopy {
            dst: ptr(0x10000 + 66),
            src: None,
            bytes: 30
        }
    );
    // Both in one launch of the kernel.
    assert_eq!(batched_copy::batches(&[input, zeros])[0].count, 2);
}

#[test]
fn the_compaction_copies_each_run_of_ranks_back_to_back() {
    let p = plan(0, &[5, 3, 0, 7], 6).unwrap();
    let copies = compaction(&p, ptr(0x10000), ptr(0x50000)).unwrap();
    let want = [(0, 0, 5), (8, 5, 3), (24, 8, 7)].map(|(src, dst, rows)| ByteCopy {
        dst: ptr(0x50000 + 6 * dst),
        src: Some(ptr(0x10000 + 6 * src)),
        bytes: 6 * rows,
    });
    assert_eq!(copies, want);
    let launches = batched_copy::batches(&copies);
    assert_eq!(launches.len(), 1);
    // The output rows start 0, 30 and 48 bytes in, the slots 0, 48 and 144: 16-byte units,
    // 2-byte units, 16-byte units.
    let widths: Vec<u32> = launches[0].used().iter().map(|d| d.width).collect();
    assert_eq!(widths, [16, 2, 16]);
    // An unpadded plan has nothing to compact.
    let even = plan(0, &[8, 8], 2048).unwrap();
    assert!(compaction(&even, ptr(0x10000), ptr(0x50000))
        .unwrap()
        .is_empty());
}

#[test]
fn offsets_past_the_address_space_are_errors() {
    let p = plan(1, &[5, 3], 2048).unwrap();
    assert!(fill(&p, ptr(usize::MAX - 16), ptr(0x20000)).is_err());
}
