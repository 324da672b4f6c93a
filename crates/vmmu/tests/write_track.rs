//! Write tracking of a gfn (KVM's page track, used by shadow paging for guest page
//! tables): tracked pages lose W and MMU-writable, huge pages over them are dropped and
//! disallowed, writes exit to the tracker, and untracking restores normal faults.

mod common;

use common::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gfn, Gpa, Level};
use vmmu::{Error, Exit, MemslotFlags, VmConfig};

fn thp_slot() -> (std::sync::Arc<vmmu::host::SimHostMemory>, TestVm, SlotSpec) {
    let (host, vm) = new_vm(VmConfig::default());
    let hva = mmap(&host, 4 * M2, Backing::Thp);
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
    (host, vm, spec)
}

#[test]
fn tracked_page_splits_huge_mapping_and_exits_on_write() {
    let (host, vm, spec) = thp_slot();
    let mut a = vm.create_vcpu().unwrap();
    let mut b = vm.create_vcpu().unwrap();
    let p = G1 + M2 + 5 * K4;
    access_ok(&vm, &mut a, &host, &spec, p, AccessKind::Write);
    access_ok(&vm, &mut b, &host, &spec, p, AccessKind::Write);
    assert_eq!(leaf_of(&vm, Gpa(p).gfn()).unwrap().1, Level::L2M);
    audit(&vm);

    let gfn = Gpa(p).gfn();
    vm.track_write(gfn).unwrap();
    audit(&vm);
    // The huge page is gone: the tracked page can only be mapped at 4K now.
    assert!(leaf_of(&vm, gfn).is_none());
    // Reads map it read-only at 4K; both vCPUs' old writable 2M TLB entries are gone.
    for v in [&mut a, &mut b] {
        access_ok(&vm, v, &host, &spec, p, AccessKind::Read);
        assert_eq!(vm.write(v, Gpa(p)), Err(Exit::WriteTracked { gpa: Gpa(p) }));
    }
    let (_, level, spte) = leaf_of(&vm, gfn).unwrap();
    assert_eq!(level, Level::L4K);
    assert!(!spte.is_writable() && !spte.is_mmu_writable());
    // Its neighbours in the same 2 MiB are still writable, but at 4K.
    access_ok(&vm, &mut a, &host, &spec, p + K4, AccessKind::Write);
    assert_eq!(leaf_of(&vm, Gfn(gfn.0 + 1)).unwrap().1, Level::L4K);
    // Other 2 MiB pages are unaffected.
    access_ok(&vm, &mut a, &host, &spec, G1 + 2 * M2, AccessKind::Write);
    assert_eq!(leaf_of(&vm, Gpa(G1 + 2 * M2).gfn()).unwrap().1, Level::L2M);
    audit(&vm);

    // Two trackers need two untracks.
    vm.track_write(gfn).unwrap();
    vm.untrack_write(gfn).unwrap();
    assert_eq!(
        vm.write(&mut a, Gpa(p)),
        Err(Exit::WriteTracked { gpa: Gpa(p) })
    );
    vm.untrack_write(gfn).unwrap();
    access_ok(&vm, &mut a, &host, &spec, p, AccessKind::Write);
    assert!(leaf_of(&vm, gfn).unwrap().2.is_writable());
    audit(&vm);
    // The 2 MiB page may be huge again once its 4K leaves are gone.
    vm.zap_gfn_range(Gfn(gfn.0 & !511), Gfn((gfn.0 & !511) + 512))
        .unwrap();
    access_ok(&vm, &mut a, &host, &spec, p, AccessKind::Write);
    assert_eq!(leaf_of(&vm, gfn).unwrap().1, Level::L2M);
    audit(&vm);
}

#[test]
fn tracking_errors_change_nothing() {
    let (_host, vm, _spec) = thp_slot();
    let before = snapshot(&vm);
    assert_eq!(
        vm.untrack_write(Gpa(G1).gfn()),
        Err(Error::WriteTrackCount {
            gfn: Gpa(G1).gfn().0
        })
    );
    let outside = Gpa(5 * G1).gfn();
    assert_eq!(
        vm.track_write(outside),
        Err(Error::InvalidRange {
            start: outside.0,
            end: outside.0 + 1
        })
    );
    assert_eq!(snapshot(&vm), before);
    audit(&vm);
}

#[test]
fn fast_path_cannot_restore_w_on_a_tracked_page() {
    let (host, vm, spec) = thp_slot();
    let mut a = vm.create_vcpu().unwrap();
    // Logging: pages are write-protected but MMU-writable (the fast path may fix them).
    let log = SlotSpec {
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        ..spec
    };
    vm.set_user_memory_region(log.region()).unwrap();
    let p = G1 + 7 * K4;
    access_ok(&vm, &mut a, &host, &log, p, AccessKind::Write);
    let mut bits = vec![0u64; (spec.pages() as usize).div_ceil(64)];
    vm.get_dirty_log(0, &mut bits).unwrap();
    assert_eq!(bits[0], 1 << 7);
    let fast = vm.stats().fast_page_faults;
    access_ok(&vm, &mut a, &host, &log, p, AccessKind::Write);
    assert_eq!(
        vm.stats().fast_page_faults,
        fast + 1,
        "logging protection is fixed on the fast path"
    );
    vm.get_dirty_log(0, &mut bits).unwrap();
    vm.track_write(Gpa(p).gfn()).unwrap();
    assert_eq!(
        vm.write(&mut a, Gpa(p)),
        Err(Exit::WriteTracked { gpa: Gpa(p) })
    );
    assert_eq!(
        vm.stats().fast_page_faults,
        fast + 1,
        "tracking must not be undone locklessly"
    );
    audit(&vm);
}
