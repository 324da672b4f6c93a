//! Exact accounting: whatever a VM allocated is freed. Tables go back to the allocator
//! (`HeapTableAllocator::live() == 0` once the VM is dropped; for the TDP MMU once the
//! epoch collector has run, `vmmu::tdp::quiesce`), reverse-map descriptors to the pool
//! (`pool().in_use() == 0` after a zap of everything) and shadow pages to the store
//! (`pages().created_freed()` differs by the root alone). Every interpreter run
//! (`proptest_ops.rs`, the fuzz target) and every soak VM checks the same at teardown.

use std::sync::Arc;

use vmmu::host::{Backing, SimHostMemory};
use vmmu::table::HeapTableAllocator;
use vmmu::types::{Gfn, Gpa, Hva};
use vmmu::{DirtyLogConfig, MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};
use vmmu_testing::view::settle_live;
use vmmu_testing::MMUS;

const G1: u64 = 1 << 30;
const M1: u64 = 1 << 20;

fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: MemslotFlags) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

/// Map everything in every way (4K and 2M, two slots over the same host memory, logging
/// on and off, a fast zap, a remap) and drop the VM: nothing may stay allocated.
fn run(mmu: MmuKind, dirty_log: DirtyLogConfig) {
    let host = Arc::new(SimHostMemory::new());
    let thp = host.mmap(16 * M1, Backing::Thp, true).unwrap().0;
    let small = host.mmap(8 * M1, Backing::Page4K, true).unwrap().0;
    let alloc = Arc::new(HeapTableAllocator::new());
    let config = VmConfig {
        mmu,
        dirty_log,
        ..VmConfig::default()
    };
    let vm = Vm::with_allocator(config, host.clone(), alloc.clone()).unwrap();
    vm.set_user_memory_region(region(0, G1, 16 * M1, thp, MemslotFlags::empty()))
        .unwrap();
    vm.set_user_memory_region(region(1, 2 * G1, 8 * M1, small, MemslotFlags::empty()))
        .unwrap();
    // Slot 2 aliases slot 1's host memory.
    vm.set_user_memory_region(region(2, 3 * G1, 8 * M1, small, MemslotFlags::empty()))
        .unwrap();
    let mut vcpus: Vec<_> = (0..3).map(|_| vm.create_vcpu().unwrap()).collect();
    let touch_all = |vcpus: &mut [vmmu::Vcpu]| {
        for (base, size) in [(G1, 16 * M1), (2 * G1, 8 * M1), (3 * G1, 8 * M1)] {
            for p in 0..size / 4096 {
                let v = &mut vcpus[(p % 3) as usize];
                match vm.write(v, Gpa(base + p * 4096)) {
                    Ok(_) | Err(vmmu::Exit::DirtyRingFull) => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
        }
    };
    touch_all(&mut vcpus);
    vm.set_user_memory_region(region(0, G1, 16 * M1, thp, MemslotFlags::LOG_DIRTY_PAGES))
        .unwrap();
    touch_all(&mut vcpus);
    vm.zap_all_fast().unwrap();
    touch_all(&mut vcpus);
    vm.set_user_memory_region(region(0, G1, 16 * M1, thp, MemslotFlags::empty()))
        .unwrap();
    vm.unmap_hva_range(Hva(small), Hva(small + M1)).unwrap();
    vm.zap_gfn_range(Gfn(G1 >> 12), Gfn((G1 >> 12) + 100))
        .unwrap();
    touch_all(&mut vcpus);
    assert!(alloc.live() > 10, "the VM mapped something");
    vm.audit().unwrap();
    if mmu == MmuKind::ShadowDirect {
        assert!(vm.with_mmu(|_, m| m.pages().len()) > 10);
        vm.zap_all().unwrap();
        vm.with_mmu(|_, m| {
            let (created, freed) = m.pages().created_freed();
            assert_eq!(m.pages().len(), 1, "only the root is left");
            assert_eq!(created - freed, 1, "{created} created, {freed} freed");
            assert_eq!(m.pool().in_use(), 0, "rmap descriptors in use");
            assert_eq!(m.pool().allocated_total(), m.pool().freed_total());
        });
        assert_eq!(alloc.live(), 1, "the root's table");
    }
    drop(vcpus);
    drop(vm);
    assert_eq!(
        settle_live(&alloc),
        0,
        "tables still allocated after the VM went ({} allocated, {} freed)",
        alloc.allocated(),
        alloc.freed()
    );
}

#[test]
fn teardown_frees_everything() {
    if vmmu_testing::skip_rerun("teardown_frees_everything") {
        return;
    }
    for &(name, mmu) in MMUS {
        for dirty_log in [
            DirtyLogConfig::default(),
            DirtyLogConfig {
                ring_size: Some(1 << 16),
                ..DirtyLogConfig::default()
            },
        ] {
            eprintln!("{name} {dirty_log:?}");
            run(mmu, dirty_log);
        }
    }
}
