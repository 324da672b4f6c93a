//! Regressions found by the differential property tests on the TDP MMU.

mod common;

use common::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gpa};
use vmmu::{MemslotFlags, MmuKind, TdpIteration, VmConfig};

/// A hugetlb-backed slot at gpa 0 created logging, written, then zapped: every mode's
/// walk must find and clear the 4K leaves under the root's first entry.
#[test]
fn logging_hugetlb_slot_at_zero_zaps_cleanly() {
    for mode in [
        TdpIteration::ScanAll,
        TdpIteration::SkipNonPresent,
        TdpIteration::UsedEntries,
    ] {
        let (host, vm) = new_vm(VmConfig {
            mmu: MmuKind::Tdp(mode),
            ..VmConfig::default()
        });
        let hva = mmap(&host, G1, Backing::HugeTlb1G);
        let spec = add_slot(
            &vm,
            SlotSpec {
                id: 3,
                gpa: 0,
                size: G1,
                hva,
                flags: MemslotFlags::LOG_DIRTY_PAGES,
            },
        );
        let mut v = vm.create_vcpu().unwrap();
        for p in [0, K4, 5 * M2, G1 - K4] {
            access_ok(&vm, &mut v, &host, &spec, p, AccessKind::Write);
        }
        audit(&vm);
        vm.zap_memslot(3).unwrap();
        audit(&vm);
        assert_eq!(leaf_of(&vm, Gpa(K4).gfn()), None, "{mode:?}");
        access_ok(&vm, &mut v, &host, &spec, K4, AccessKind::Read);
        audit(&vm);
    }
}

/// The proptest's minimal case: create the logging hugetlb slot and zap it at once.
#[test]
fn create_then_zap_unmapped_logging_slot() {
    for mode in [
        TdpIteration::ScanAll,
        TdpIteration::SkipNonPresent,
        TdpIteration::UsedEntries,
    ] {
        let (host, vm) = new_vm(VmConfig {
            mmu: MmuKind::Tdp(mode),
            ..VmConfig::default()
        });
        let hva = mmap(&host, G1, Backing::HugeTlb1G);
        add_slot(
            &vm,
            SlotSpec {
                id: 3,
                gpa: 0,
                size: G1,
                hva,
                flags: MemslotFlags::LOG_DIRTY_PAGES,
            },
        );
        audit(&vm);
        vm.zap_memslot(3).unwrap();
        audit(&vm);
    }
}
