//! `Vm::pre_fault_memory` (KVM_PRE_FAULT_MEMORY): what it maps, how it advances, the
//! errors for bad ranges and missing memslots, the partial progress and the retry error
//! when the memslots change under it, and pre-faulting from several vCPUs in parallel;
//! the audit after every step. Runs on both MMUs.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gpa};
use vmmu::{Error, MemslotFlags, MmuKind, PreFault, TdpIteration, VmConfig};

fn mmus() -> [MmuKind; 2] {
    [
        MmuKind::ShadowDirect,
        MmuKind::Tdp(TdpIteration::UsedEntries),
    ]
}

fn vm_with_slot(mmu: MmuKind, size: u64, backing: Backing) -> (TestVm, SlotSpec) {
    let (host, vm) = new_vm(VmConfig {
        mmu,
        ..VmConfig::default()
    });
    let hva = mmap(&host, size, backing);
    let spec = add_slot(
        &vm,
        SlotSpec {
            id: 10,
            gpa: G1,
            size,
            hva,
            flags: MemslotFlags::empty(),
        },
    );
    (vm, spec)
}

#[test]
fn maps_the_whole_range_so_the_guest_takes_no_fault() {
    for mmu in mmus() {
        let (vm, spec) = vm_with_slot(mmu, 4 * M2, Backing::Page4K);
        let mut v = vm.create_vcpu().unwrap();
        let r = vm.pre_fault_memory(&mut v, Gpa(G1), 2 * M2 + K4).unwrap();
        assert_eq!(
            r,
            PreFault {
                done: 2 * M2 + K4,
                next: Gpa(G1 + 2 * M2 + K4),
                left: 0
            },
            "{mmu:?}"
        );
        vm.audit().unwrap();
        // The pre-fault's own faults count as the vCPU's exits; the guest's reads of the
        // range then take none.
        let exits = v.exits;
        for p in 0..(2 * M2 + K4) / K4 {
            vm.access(&mut v, Gpa(G1 + p * K4), AccessKind::Read)
                .unwrap();
        }
        assert_eq!(
            v.exits, exits,
            "{mmu:?}: reads of a pre-faulted range faulted"
        );
        // Past the range nothing was mapped: the next page faults.
        vm.access(&mut v, Gpa(G1 + 2 * M2 + 2 * K4), AccessKind::Read)
            .unwrap();
        assert_eq!(v.exits, exits + 1, "{mmu:?}");
        let _ = spec;
        vm.audit().unwrap();
    }
}

#[test]
fn advances_by_the_huge_page_it_mapped() {
    let (vm, _) = vm_with_slot(
        MmuKind::Tdp(TdpIteration::UsedEntries),
        8 * M2,
        Backing::Thp,
    );
    let mut v = vm.create_vcpu().unwrap();
    let r = vm.pre_fault_memory(&mut v, Gpa(G1), 2 * M2).unwrap();
    assert_eq!(r.left, 0);
    // Two 2 MiB leaves and no 4 KiB one.
    let leaves: Vec<_> = tdp_entries(&vm, false)
        .into_iter()
        .filter(|e| e.spte.is_shadow_present() && e.spte.is_leaf(e.level))
        .map(|e| (e.gfn, e.level))
        .collect();
    let m2 = M2 / K4;
    let g = G1 / K4;
    use vmmu::types::Level::L2M;
    assert_eq!(leaves, [(g, L2M), (g + m2, L2M)]);
    // Pre-faulting is not a guest exit.
    assert_eq!(v.exits, 0);
    vm.audit().unwrap();
}

#[test]
fn bad_ranges_are_refused_before_anything_is_mapped() {
    for mmu in mmus() {
        let (vm, _) = vm_with_slot(mmu, 4 * M2, Backing::Page4K);
        let mut v = vm.create_vcpu().unwrap();
        let tables = table_count(&vm);
        for (gpa, size) in [
            (G1, 0),
            (G1 + 1, K4),
            (G1, K4 + 8),
            (!(K4 - 1), 2 * K4),
            (1 << 52, K4),
        ] {
            let e = vm.pre_fault_memory(&mut v, Gpa(gpa), size).unwrap_err();
            assert!(
                matches!(e, Error::InvalidPreFaultRange { .. }),
                "{mmu:?} {gpa:#x}+{size:#x}: {e}"
            );
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(
            table_count(&vm),
            tables,
            "{mmu:?}: a refused call mapped something"
        );
        assert_eq!(v.exits, 0);
        vm.audit().unwrap();
    }
}

#[test]
fn outside_every_memslot_is_an_error_and_a_range_running_out_is_partial() {
    for mmu in mmus() {
        let (vm, _) = vm_with_slot(mmu, 4 * M2, Backing::Page4K);
        let mut v = vm.create_vcpu().unwrap();
        // The selftest's cases: a range ending one page past the slot leaves one page;
        // a range wholly past it fails with ENOENT.
        let r = vm
            .pre_fault_memory(&mut v, Gpa(G1 + 4 * M2 - K4), 2 * K4)
            .unwrap();
        assert_eq!((r.done, r.left), (K4, K4), "{mmu:?}");
        assert_eq!(r.next, Gpa(G1 + 4 * M2));
        let e = vm.pre_fault_memory(&mut v, r.next, r.left).unwrap_err();
        assert_eq!(
            e,
            Error::PreFaultNoMemslot {
                gpa: Gpa(G1 + 4 * M2)
            },
            "{mmu:?}"
        );
        vm.audit().unwrap();
    }
}

#[test]
fn shadow_paging_has_no_guest_physical_pre_fault() {
    let host = std::sync::Arc::new(vmmu::host::SimHostMemory::new());
    let ram = std::sync::Arc::new(vmmu::guest::SimGuestMemory::new(4 << 20));
    let vm = vmmu::Vm::new_paging(
        VmConfig {
            mmu: MmuKind::ShadowPaging,
            ..VmConfig::default()
        },
        host,
        ram,
    );
    let mut v = vm.create_vcpu().unwrap();
    assert!(matches!(
        vm.pre_fault_memory(&mut v, Gpa(0), K4),
        Err(Error::WrongPagingMode(_))
    ));
}

/// The selftest's race: another thread deletes the slot while the vCPU pre-faults it.
/// The call stops where it saw the memslots change: with the progress made so far, or
/// with the retry error if it had made none; once the slot is back, calling again with
/// the rest finishes the range. Repeated until the deletion landed inside a call (each
/// try is a fresh VM; the deleting thread starts as soon as the first tables appear).
#[test]
fn a_memslot_change_under_it_stops_it_with_progress_or_the_retry_error() {
    for mmu in mmus() {
        let size = 128 * M2;
        let mut stopped = false;
        for _ in 0..50 {
            let (vm, spec) = vm_with_slot(mmu, size, Backing::Page4K);
            let mut v = vm.create_vcpu().unwrap();
            let started = AtomicBool::new(false);
            let tables = table_count(&vm);
            let first = std::thread::scope(|s| {
                let deleter = s.spawn(|| {
                    while !started.load(Ordering::Acquire) || table_count(&vm) < tables + 4 {
                        std::hint::spin_loop();
                    }
                    vm.set_user_memory_region(SlotSpec { size: 0, ..spec }.region())
                        .unwrap();
                });
                started.store(true, Ordering::Release);
                let r = vm.pre_fault_memory(&mut v, Gpa(G1), size);
                deleter.join().unwrap();
                r
            });
            vm.audit().unwrap();
            let (next, left) = match first {
                Ok(PreFault { left: 0, .. }) => continue, // finished before the deletion
                Ok(p) => {
                    assert_eq!(p.next.0, G1 + p.done, "{mmu:?}");
                    assert_eq!(p.done + p.left, size, "{mmu:?}");
                    (p.next, p.left)
                }
                Err(Error::PreFaultRetry { .. }) => (Gpa(G1), size),
                Err(e) => panic!("{mmu:?}: {e}"),
            };
            stopped = true;
            // The slot is gone: the rest fails as outside every memslot.
            assert!(matches!(
                vm.pre_fault_memory(&mut v, next, left),
                Err(Error::PreFaultNoMemslot { .. })
            ));
            // Recreated, the rest completes.
            add_slot(&vm, spec);
            let r = vm.pre_fault_memory(&mut v, next, left).unwrap();
            assert_eq!(r.left, 0, "{mmu:?}");
            vm.audit().unwrap();
            break;
        }
        assert!(
            stopped,
            "{mmu:?}: the deletion never landed inside a pre-fault call"
        );
    }
}

/// Every vCPU pre-faults its own quarter in parallel (the TDP MMU's faults run in the
/// fault gate together); then every page is mapped and the audit holds.
#[test]
fn vcpus_pre_fault_their_ranges_in_parallel() {
    for mmu in mmus() {
        let size = 16 * M2;
        let (vm, _) = vm_with_slot(mmu, size, Backing::Page4K);
        let mut vcpus: Vec<_> = (0..4).map(|_| vm.create_vcpu().unwrap()).collect();
        std::thread::scope(|s| {
            for (i, v) in vcpus.iter_mut().enumerate() {
                let vm = &vm;
                s.spawn(move || {
                    let quarter = size / 4;
                    let r = vm
                        .pre_fault_memory(v, Gpa(G1 + i as u64 * quarter), quarter)
                        .unwrap();
                    assert_eq!(r.left, 0);
                });
            }
        });
        vm.audit().unwrap();
        let v = &mut vcpus[0];
        let exits = v.exits;
        for p in 0..size / K4 {
            vm.access(v, Gpa(G1 + p * K4), AccessKind::Read).unwrap();
        }
        assert_eq!(v.exits, exits, "{mmu:?}");
    }
}
