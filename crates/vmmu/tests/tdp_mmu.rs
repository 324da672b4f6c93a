//! The TDP MMU's own behaviour, beyond the API tests that run against every MMU (see
//! `common::test_mmu`): table accounting through eager splits, what the fast zap does to
//! roots that idle vCPUs still hold, logging that cannot get table memory, and the three
//! iteration modes agreeing on what the tables hold. Every test runs in every mode.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use vmmu::host::{Backing, SimHostMemory};
use vmmu::spte::Spte;
use vmmu::tdp::TdpIter;
use vmmu::types::{AccessKind, Gfn, Gpa, Level, Pfn};
use vmmu::{MemslotFlags, MmuKind, TdpIteration, Vm, VmConfig};

const MODES: [TdpIteration; 3] = [
    TdpIteration::ScanAll,
    TdpIteration::SkipNonPresent,
    TdpIteration::UsedEntries,
];

fn tdp_vm(mode: TdpIteration) -> (Arc<SimHostMemory>, TestVm) {
    new_vm(VmConfig {
        mmu: MmuKind::Tdp(mode),
        ..VmConfig::default()
    })
}

/// An 8 MiB THP slot at 1 GiB, every 2 MiB page written (2M leaves).
fn thp_slot_mapped(host: &SimHostMemory, vm: &TestVm, vcpu: &mut vmmu::Vcpu) -> SlotSpec {
    let hva = mmap(host, 8 * M1, Backing::Thp);
    let spec = add_slot(
        vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 8 * M1,
            hva,
            flags: MemslotFlags::empty(),
        },
    );
    for i in 0..4 {
        access_ok(vm, vcpu, host, &spec, G1 + i * M2 + 0x40, AccessKind::Write);
    }
    assert_eq!(leaf_counts(vm), [0, 4, 0]);
    spec
}

/// `VmStats::shadow_pages` is the TDP MMU's live tables (allocated minus freed). Eager
/// splitting takes its tables from a preallocation made outside the lock; once those
/// tables are freed again (logging stops and the huge pages are recovered), the count
/// must still match the allocator, and `stats()` must not underflow.
#[test]
fn stats_count_the_tables_of_an_eager_split() {
    for mode in MODES {
        let (host, vm) = tdp_vm(mode);
        let mut vcpu = vm.create_vcpu().unwrap();
        let spec = thp_slot_mapped(&host, &vm, &mut vcpu);
        let log = SlotSpec {
            flags: MemslotFlags::LOG_DIRTY_PAGES,
            ..spec
        };
        vm.set_user_memory_region(log.region()).unwrap();
        assert_eq!(leaf_counts(&vm), [2048, 0, 0], "{mode:?}: eager split");
        audit(&vm);
        let live = settle_tables(&vm);
        assert_eq!(
            vm.stats().shadow_pages as u64,
            live,
            "{mode:?}: after the split"
        );
        // Logging off: the four 4K tables are replaced by huge leaves and freed.
        vm.set_user_memory_region(spec.region()).unwrap();
        assert_eq!(leaf_counts(&vm), [0, 4, 0], "{mode:?}: recovery");
        audit(&vm);
        let live = settle_tables(&vm);
        assert_eq!(
            vm.stats().shadow_pages as u64,
            live,
            "{mode:?}: after the recovery"
        );
    }
}

/// The fast zap (KVM's `kvm_mmu_zap_all_fast`) gives vCPUs a new root; a vCPU that does
/// not run again keeps its reference to the old one. KVM zaps invalidated roots at once
/// (`kvm_tdp_mmu_zap_invalidated_roots`) and only the root page waits for the last
/// reference. Here: after the fast zap, the old root must map nothing (so its tables are
/// not held by an idle vCPU, and nothing under it can break a rule of the slots that
/// change later: starting dirty logging must not leave a huge leaf anywhere).
#[test]
fn fast_zap_empties_the_old_root_while_an_idle_vcpu_holds_it() {
    for mode in MODES {
        let (host, vm) = tdp_vm(mode);
        let mut idle = vm.create_vcpu().unwrap();
        let spec = thp_slot_mapped(&host, &vm, &mut idle);
        vm.zap_all_fast().unwrap();
        assert_eq!(table_count(&vm), 1, "{mode:?}: the new root is empty");
        audit(&vm);
        let log = SlotSpec {
            flags: MemslotFlags::LOG_DIRTY_PAGES,
            ..spec
        };
        vm.set_user_memory_region(log.region()).unwrap();
        if let Err(e) = vm.audit() {
            panic!("{mode:?}: after the fast zap and the start of logging, with a vCPU idle on the old root: {e}");
        }
        assert!(
            tables_held(&vm) <= 2,
            "{mode:?}: the idle vCPU's old root still holds {} tables",
            tables_held(&vm) - 1
        );
        // Once the vCPU runs, it moves to the new root and the old one goes.
        access_ok(&vm, &mut idle, &host, &log, G1 + 0x40, AccessKind::Write);
        audit(&vm);
        assert_eq!(tables_held(&vm), table_count(&vm), "{mode:?}");
        settle_tables(&vm);
    }
}

/// A vCPU released while it holds an invalidated root lets the root go at once.
#[test]
fn releasing_a_vcpu_frees_the_invalid_root_it_held() {
    for mode in MODES {
        let (host, vm) = tdp_vm(mode);
        let mut idle = vm.create_vcpu().unwrap();
        thp_slot_mapped(&host, &vm, &mut idle);
        vm.zap_all_fast().unwrap();
        let roots = |vm: &TestVm| vm.with_tdp(|_, m| m.roots(&vmmu::tdp::pin()).count());
        assert_eq!(roots(&vm), 2, "{mode:?}: the idle vCPU holds the old root");
        vm.release_vcpu(idle).unwrap();
        assert_eq!(roots(&vm), 1, "{mode:?}: released, the old root goes");
        assert_eq!(tables_held(&vm), table_count(&vm), "{mode:?}");
        audit(&vm);
        settle_tables(&vm);
    }
}

/// A table allocator with a cap on live tables.
struct CappedAlloc {
    inner: vmmu::table::HeapTableAllocator,
    cap: AtomicU64,
}

// SAFETY: forwards to the heap allocator, which keeps the contract; only refuses earlier.
unsafe impl vmmu::table::TableAllocator for CappedAlloc {
    fn alloc_table(&self) -> Option<Pfn> {
        if self.inner.live() >= self.cap.load(Ordering::Relaxed) {
            return None;
        }
        self.inner.alloc_table()
    }
    unsafe fn free_table(&self, frame: Pfn) {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.free_table(frame) }
    }
    fn table_ptr(&self, frame: Pfn) -> std::ptr::NonNull<vmmu::table::Table> {
        self.inner.table_ptr(frame)
    }
}

/// Starting dirty logging splits huge pages with tables allocated outside the lock. When
/// the allocator runs dry, the VMM gets the error, and the VM must stay whole: either the
/// slot does not log (and nothing changed), or it logs and then every write is logged
/// (no writable or huge leaf escapes the protection), and no table frame leaks.
#[test]
fn logging_that_cannot_get_table_memory_loses_no_write() {
    for mode in MODES {
        let host = Arc::new(SimHostMemory::new());
        let alloc = Arc::new(CappedAlloc {
            inner: vmmu::table::HeapTableAllocator::new(),
            cap: AtomicU64::new(u64::MAX),
        });
        let config = VmConfig {
            mmu: MmuKind::Tdp(mode),
            ..VmConfig::default()
        };
        let vm = Vm::with_allocator(config, host.clone(), alloc.clone()).unwrap();
        let hva = mmap(&host, 8 * M1, Backing::Thp);
        let spec = SlotSpec {
            id: 0,
            gpa: G1,
            size: 8 * M1,
            hva,
            flags: MemslotFlags::empty(),
        };
        vm.set_user_memory_region(spec.region()).unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        for i in 0..4 {
            vm.write(&mut vcpu, Gpa(G1 + i * M2)).unwrap();
        }
        // Room for one more table: the split needs four.
        alloc.cap.store(alloc.inner.live() + 1, Ordering::Relaxed);
        let log = SlotSpec {
            flags: MemslotFlags::LOG_DIRTY_PAGES,
            ..spec
        };
        let got = vm.set_user_memory_region(log.region());
        let logging = with_slots(&vm, |s| s.by_id(0).unwrap().is_logging());
        if let Err(e) = vm.audit() {
            panic!("{mode:?}: start of logging returned {got:?}; then: {e}");
        }
        alloc.cap.store(u64::MAX, Ordering::Relaxed);
        if logging {
            let p = G1 + 3 * M2 + 5 * K4;
            vm.write(&mut vcpu, Gpa(p)).unwrap();
            let mut bits = vec![0u64; 32];
            vm.get_dirty_log(0, &mut bits).unwrap();
            let page = (p - G1) / K4;
            assert!(
                bits[(page / 64) as usize] & (1 << (page % 64)) != 0,
                "{mode:?}: start of logging returned {got:?}, the slot logs, and a write was not logged"
            );
        } else {
            assert!(got.is_err());
        }
        assert_eq!(
            settle_tables_with(&vm, || alloc.inner.live()),
            tables_held(&vm) as u64,
            "{mode:?}: a table frame leaked"
        );
    }
}

/// The present entries under `root` as `mode` yields them, and the positions it yielded.
fn walk(vm: &TestVm, mode: TdpIteration) -> (BTreeMap<(u64, Level), Spte>, u64) {
    vm.with_tdp(|_, tdp| {
        let guard = vmmu::tdp::pin();
        let mut it = TdpIter::new(
            tdp.root(&guard),
            Level::L4K,
            Gfn(0),
            Gfn(1 << 36),
            mode,
            u64::MAX,
            &guard,
        );
        let mut out = BTreeMap::new();
        while it.valid() {
            if it.spte.is_shadow_present() {
                out.insert((it.gfn().0, it.level()), it.spte);
            }
            it.next();
        }
        (out, it.loops)
    })
}

/// In a used-entries VM the bitmap is exact at quiescent points, so the three modes find
/// the same present entries (leaves and tables); skip-non-present and used-entries yield
/// exactly those, scan-all every entry of every table. Over maps, zaps, splits, recoveries
/// and MMIO SPTEs (which are not present: no mode but scan-all yields them).
#[test]
fn the_three_iteration_modes_agree_on_a_used_entries_vm() {
    let (host, vm) = tdp_vm(TdpIteration::UsedEntries);
    let mut vcpu = vm.create_vcpu().unwrap();
    let spec = thp_slot_mapped(&host, &vm, &mut vcpu);
    let h4k = mmap(&host, 4 * M1, Backing::Page4K);
    let small = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 3 * G1 + M1,
            size: 4 * M1,
            hva: h4k,
            flags: MemslotFlags::empty(),
        },
    );
    let mut rng = Rng::new(0x7d9);
    let check = |vm: &TestVm, what: &str| {
        audit(vm);
        let (all, scan_loops) = walk(vm, TdpIteration::ScanAll);
        let (skip, skip_loops) = walk(vm, TdpIteration::SkipNonPresent);
        let (used, used_loops) = walk(vm, TdpIteration::UsedEntries);
        assert_eq!(skip, all, "{what}: skip-non-present");
        assert_eq!(used, all, "{what}: used-entries");
        assert_eq!(
            skip_loops,
            all.len() as u64,
            "{what}: skip-non-present loops"
        );
        assert_eq!(used_loops, all.len() as u64, "{what}: used-entries loops");
        let tables = table_count(vm) as u64;
        assert_eq!(scan_loops, 512 * tables, "{what}: scan-all loops");
    };
    check(&vm, "mapped");
    for round in 0..20 {
        for _ in 0..200 {
            let i = rng.below(small.pages());
            access_ok(
                &vm,
                &mut vcpu,
                &host,
                &small,
                small.page_gpa(i),
                kind_for(i),
            );
        }
        // MMIO SPTEs next to the small slot.
        access_mmio(
            &vm,
            &mut vcpu,
            small.gpa + small.size + rng.below(64) * K4,
            AccessKind::Read,
        );
        check(&vm, &format!("round {round}: faults"));
        let start = small.base_gfn().0 + rng.below(small.pages());
        vm.zap_gfn_range(Gfn(start), Gfn(start + 1 + rng.below(300)))
            .unwrap();
        check(&vm, &format!("round {round}: zap"));
        let flags = if round % 2 == 0 {
            MemslotFlags::LOG_DIRTY_PAGES
        } else {
            MemslotFlags::empty()
        };
        vm.set_user_memory_region(SlotSpec { flags, ..spec }.region())
            .unwrap();
        check(&vm, &format!("round {round}: logging {}", round % 2 == 0));
        if round % 7 == 6 {
            vm.zap_all().unwrap();
            check(&vm, &format!("round {round}: zap_all"));
        }
    }
}
