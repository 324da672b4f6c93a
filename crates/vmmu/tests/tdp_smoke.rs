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
