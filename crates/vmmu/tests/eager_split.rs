//! `VmConfig::eager_split`: with it (the default) the TDP MMU splits huge leaves when
//! dirty logging starts and the first writes take the fast path; without it the huge
//! leaves are zapped and the first writes fault the pages in at 4 KiB. The audit holds
//! after every step, and the dirty log has every page written either way.

mod common;
use common::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gpa, Level};
use vmmu::{MemslotFlags, MmuKind, TdpIteration, VmConfig};

#[test]
fn eager_split_or_zap_when_logging_starts() {
    for eager in [true, false] {
        let (host, vm) = new_vm(VmConfig {
            mmu: MmuKind::Tdp(TdpIteration::UsedEntries),
            eager_split: eager,
            ..VmConfig::default()
        });
        let size = 4 * M2;
        let hva = mmap(&host, size, Backing::Thp);
        let spec = add_slot(
            &vm,
            SlotSpec {
                id: 0,
                gpa: G1,
                size,
                hva,
                flags: MemslotFlags::empty(),
            },
        );
        let mut v = vm.create_vcpu().unwrap();
        for p in (0..size).step_by(K4 as usize) {
            vm.access(&mut v, Gpa(G1 + p), AccessKind::Write).unwrap();
        }
        let huge = |vm: &TestVm| {
            tdp_entries(vm, false)
                .iter()
                .filter(|e| e.level == Level::L2M && e.spte.is_shadow_present())
                .filter(|e| e.spte.is_leaf(e.level))
                .count()
        };
        assert_eq!(huge(&vm), 4);
        let log = SlotSpec {
            flags: MemslotFlags::LOG_DIRTY_PAGES,
            ..spec
        };
        vm.set_user_memory_region(log.region()).unwrap();
        vm.audit().unwrap();
        assert_eq!(huge(&vm), 0, "eager {eager}");
        let split = vm.with_tdp(|_, m| {
            m.stats()
                .huge_split
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        assert_eq!(split, if eager { 4 } else { 0 });
        let exits = v.exits;
        let fast = vm.stats().fast_page_faults;
        for p in (0..size).step_by(K4 as usize) {
            vm.access(&mut v, Gpa(G1 + p), AccessKind::Write).unwrap();
        }
        let pages = size / K4;
        assert_eq!(v.exits - exits, pages, "eager {eager}: one exit per page");
        let fixed_fast = vm.stats().fast_page_faults - fast;
        // Split: every write is a fast fault; zapped: none is (the pages are not present).
        assert_eq!(fixed_fast, if eager { pages } else { 0 }, "eager {eager}");
        vm.audit().unwrap();
        let mut bits = vec![0u64; (pages / 64) as usize];
        vm.get_dirty_log(0, &mut bits).unwrap();
        assert!(bits.iter().all(|&w| w == u64::MAX), "eager {eager}");
    }
}
