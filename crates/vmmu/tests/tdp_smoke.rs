mod common;
use common::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gpa};
use vmmu::{MemslotFlags, MmuKind, TdpIteration, VmConfig};

#[test]
fn smoke() {
    for mode in [
        TdpIteration::ScanAll,
        TdpIteration::SkipNonPresent,
        TdpIteration::UsedEntries,
    ] {
        for backing in [Backing::Page4K, Backing::Thp] {
            let (host, vm) = new_vm(VmConfig {
                mmu: MmuKind::Tdp(mode),
                ..VmConfig::default()
            });
            let hva = mmap(&host, 8 * M2, backing);
            let spec = add_slot(
                &vm,
                SlotSpec {
                    id: 0,
                    gpa: G1,
                    size: 8 * M2,
                    hva,
                    flags: MemslotFlags::empty(),
                },
            );
            let mut v = vm.create_vcpu().unwrap();
            for p in (0..8 * M2).step_by(K4 as usize) {
                access_ok(&vm, &mut v, &host, &spec, G1 + p, AccessKind::Write);
            }
            vm.audit().unwrap();
            vm.zap_gfn_range(Gpa(G1 + M2).gfn(), Gpa(G1 + 3 * M2).gfn())
                .unwrap();
            vm.audit().unwrap();
            for p in (0..8 * M2).step_by(K4 as usize) {
                access_ok(&vm, &mut v, &host, &spec, G1 + p, AccessKind::Read);
            }
            vm.zap_all().unwrap();
            vm.audit().unwrap();
            for p in (0..8 * M2).step_by(K4 as usize) {
                access_ok(&vm, &mut v, &host, &spec, G1 + p, AccessKind::Write);
            }
            vm.audit().unwrap();
            let log = SlotSpec {
                flags: MemslotFlags::LOG_DIRTY_PAGES,
                ..spec
            };
            vm.set_user_memory_region(log.region()).unwrap();
            vm.audit().unwrap();
            let mut bits = vec![0u64; 64];
            vm.get_dirty_log(0, &mut bits).unwrap();
            access_ok(&vm, &mut v, &host, &log, G1 + 5 * K4, AccessKind::Write);
            vm.audit().unwrap();
            vm.get_dirty_log(0, &mut bits).unwrap();
            assert_eq!(bits[0], 1 << 5, "{mode:?} {backing:?}");
            vm.set_user_memory_region(spec.region()).unwrap();
            vm.audit().unwrap();
            drop(v);
        }
    }
}

#[test]
fn fast_zap_invalidates_roots_and_vcpus_reload() {
    let (host, vm) = new_vm(VmConfig {
        mmu: MmuKind::Tdp(TdpIteration::UsedEntries),
        ..VmConfig::default()
    });
    let hva = mmap(&host, 4 * M2, Backing::Page4K);
    let spec = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 4 * M2,
            hva,
            flags: MemslotFlags::empty(),
        },
    );
    let mut a = vm.create_vcpu().unwrap();
    let mut b = vm.create_vcpu().unwrap();
    for p in (0..4 * M2).step_by(K4 as usize) {
        access_ok(&vm, &mut a, &host, &spec, G1 + p, AccessKind::Write);
    }
    access_ok(&vm, &mut b, &host, &spec, G1, AccessKind::Read);
    let old = a.root();
    vm.zap_all_fast().unwrap();
    // The old root is still held by both vCPUs: two roots exist, one valid.
    assert_eq!(vm.with_tdp(|_, t| t.roots(&vmmu::tdp::pin()).count()), 2);
    access_ok(&vm, &mut a, &host, &spec, G1 + K4, AccessKind::Write);
    assert_ne!(a.root(), old, "vCPU A reloaded the new root");
    assert_eq!(
        vm.with_tdp(|_, t| t.roots(&vmmu::tdp::pin()).count()),
        2,
        "B still holds the old root"
    );
    access_ok(&vm, &mut b, &host, &spec, G1 + K4, AccessKind::Read);
    assert_eq!(
        vm.with_tdp(|_, t| t.roots(&vmmu::tdp::pin()).count()),
        1,
        "the old root was zapped once released"
    );
    vm.audit().unwrap();
}

/// The iterator stops after its budget and reports a resume point past everything it
/// walked: a zap in small chunks, each under its own lock hold, still finishes, with
/// strictly increasing resume points, and leaves nothing mapped.
#[test]
fn yielding_walks_make_progress_and_finish() {
    for mode in [
        TdpIteration::ScanAll,
        TdpIteration::SkipNonPresent,
        TdpIteration::UsedEntries,
    ] {
        let (host, vm) = new_vm(VmConfig {
            mmu: MmuKind::Tdp(mode),
            ..VmConfig::default()
        });
        let hva = mmap(&host, 4 * M2, Backing::Page4K);
        let spec = add_slot(
            &vm,
            SlotSpec {
                id: 0,
                gpa: G1,
                size: 4 * M2,
                hva,
                flags: MemslotFlags::empty(),
            },
        );
        let mut v = vm.create_vcpu().unwrap();
        for p in (0..4 * M2).step_by(K4 as usize) {
            access_ok(&vm, &mut v, &host, &spec, G1 + p, AccessKind::Write);
        }
        let (mut start, end) = (Gpa(G1).gfn(), Gpa(G1 + 4 * M2).gfn());
        let mut chunks = 0;
        loop {
            let (removed, resume) =
                vm.with_tdp_mut(|_, t| t.zap_leafs(start, end, 100, &vmmu::tdp::pin()));
            vm.flush_remote_tlbs();
            // SAFETY: flushed after the unlinks.
            vm.with_tdp(|_, t| unsafe { t.retire(removed) });
            chunks += 1;
            match resume {
                Some(r) => {
                    assert!(
                        r > start,
                        "{mode:?}: resume {r:?} does not advance past {start:?}"
                    );
                    start = r;
                }
                None => break,
            }
            assert!(chunks < 1000, "{mode:?}: no end in sight");
        }
        assert!(
            chunks >= 10,
            "{mode:?}: 1024 leaves in budgets of 100 took {chunks} chunks"
        );
        vm.audit().unwrap();
        let mapped = vm.with_tdp(|_, t| {
            let g = vmmu::tdp::pin();
            let root = t.root(&g);
            let mut it = vmmu::tdp::TdpIter::new(
                root,
                vmmu::types::Level::L4K,
                Gpa(G1).gfn(),
                end,
                TdpIteration::ScanAll,
                u64::MAX,
                &g,
            );
            let mut n = 0;
            while it.valid() {
                n += (it.spte.is_shadow_present() && it.spte.is_leaf(it.level())) as u32;
                it.next();
            }
            n
        });
        assert_eq!(mapped, 0, "{mode:?}");
        for p in (0..4 * M2).step_by(64 * K4 as usize) {
            access_ok(&vm, &mut v, &host, &spec, G1 + p, AccessKind::Read);
        }
        vm.audit().unwrap();
    }
}
