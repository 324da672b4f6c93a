//! The TLB model really caches, every operation that removes a translation reaches every
//! vCPU's TLB through the remote flush, and a missing flush shows up as a stale
//! translation (and the audit catches the tampering that caused it).

mod common;

use common::*;
use vmmu::host::Backing;
use vmmu::spte::Spte;
use vmmu::types::{AccessKind, Gfn, Gpa, Level};
use vmmu::{MemslotFlags, VmConfig};

struct Env {
    host: std::sync::Arc<vmmu::host::SimHostMemory>,
    vm: TestVm,
    s4k: SlotSpec,
    thp: SlotSpec,
}

fn env() -> Env {
    let (host, vm) = new_vm(VmConfig::default());
    let h0 = mmap(&host, 4 * M1, Backing::Page4K);
    let h1 = mmap(&host, 4 * M1, Backing::Thp);
    let s4k = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 4 * M1,
            hva: h0,
            flags: MemslotFlags::empty(),
        },
    );
    let thp = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 4 * M1,
            hva: h1,
            flags: MemslotFlags::empty(),
        },
    );
    Env { host, vm, s4k, thp }
}

/// Store `new` into the `level` entry that maps `gfn`, directly in the table, bypassing
/// the MMU: no rmap or used-entries update, no flush. Returns the old SPTE. The shadow
/// MMU's entry is found through the reverse map (which still names it after a clear), the
/// TDP MMU's by walking to it.
fn poke_leaf_behind_the_mmus_back(vm: &TestVm, gfn: Gfn, level: Level, new: Spte) -> Spte {
    let base = gfn.align_down(level);
    if is_tdp(vm) {
        return vm.with_tdp(|_, tdp| {
            let guard = vmmu::tdp::pin();
            let mut it = vmmu::tdp::TdpIter::new(
                tdp.root(&guard),
                level,
                base,
                Gfn(base.0 + 1),
                vmmu::TdpIteration::ScanAll,
                u64::MAX,
                &guard,
            );
            while it.valid() {
                if it.level() == level {
                    let table = it.page().table();
                    let old = table.get(it.index());
                    table.set(it.index(), new);
                    return old;
                }
                it.next();
            }
            panic!("no {level:?} table over {gfn:?}")
        });
    }
    vm.with_mmu(|slots, mmu| {
        let e = mmu.rmap_entries(slots, base, level);
        assert_eq!(e.len(), 1, "expected one leaf for {gfn:?} at {level:?}");
        let sref = e[0];
        let table = mmu.pages().get(sref.table_id()).table();
        let old = table.get(sref.index());
        table.set(sref.index(), new);
        old
    })
}

/// Clear the leaf SPTE mapping `gfn` directly in the table, bypassing the MMU: no rmap
/// update, no flush. Returns the old SPTE.
fn clear_leaf_behind_the_mmus_back(vm: &TestVm, gfn: Gfn, level: Level) -> Spte {
    let old = poke_leaf_behind_the_mmus_back(vm, gfn, level, Spte::NONE);
    assert!(old.is_shadow_present() && old.is_leaf(level));
    old
}

/// Whether the audit can tell that a leaf was cleared behind the MMU's back: the shadow
/// MMU's page counters and reverse maps do, and the TDP MMU's used-entries bitmap does;
/// in the other two TDP modes an empty entry is as legal as any other.
fn audit_sees_a_cleared_leaf(vm: &TestVm) -> bool {
    !is_tdp(vm) || vm.config().mmu == vmmu::MmuKind::Tdp(vmmu::TdpIteration::UsedEntries)
}

#[test]
fn the_tlb_caches_translations() {
    let Env { host, vm, s4k, .. } = env();
    let mut a = vm.create_vcpu().unwrap();
    let p = s4k.gpa + 7 * K4;
    let (h0, m0, _) = a.tlb().counters();
    let hpa = access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Write);
    assert_eq!(a.exits, 1);
    for n in 0..10 {
        assert_eq!(vm.read(&mut a, Gpa(p + n)).unwrap().0, hpa.0 + n);
    }
    let (h1, m1, _) = a.tlb().counters();
    assert_eq!(h1 - h0, 10, "repeated accesses hit the TLB");
    assert!(m1 > m0);
    assert_eq!(a.exits, 1);
    audit(&vm);
}

/// vCPU A caches page P; a zap of P through the API flushes A's TLB: A's next access
/// faults again. The same for zap_all, zap_all_fast (which gives the TDP MMU's vCPUs a new
/// root), zap_memslot and for a huge page zapped through a 4K sub-range.
#[test]
fn zaps_reach_other_vcpus_tlbs() {
    let Env { host, vm, s4k, thp } = env();
    let mut a = vm.create_vcpu().unwrap();
    let p = s4k.gpa + 9 * K4;
    let q = thp.gpa + M2 + 0x3000; // in the second 2M page
    access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Read);
    access_ok(&vm, &mut a, &host, &thp, q, AccessKind::Write);
    assert_eq!(leaf_of(&vm, Gpa(q).gfn()).unwrap().1, Level::L2M);
    // Neighbours in the same tables, so no zap below empties (and frees) a table: the
    // flush must come from the zapped leaves alone.
    access_ok(&vm, &mut a, &host, &s4k, p + K4, AccessKind::Read);
    access_ok(&vm, &mut a, &host, &thp, thp.gpa, AccessKind::Read);
    type Zap<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let zaps: Vec<Zap> = vec![
        (
            "zap_gfn_range",
            Box::new(|| {
                vm.zap_gfn_range(Gpa(p).gfn(), Gfn(Gpa(p).gfn().0 + 1))
                    .unwrap()
            }),
        ),
        ("zap_all", Box::new(|| vm.zap_all().unwrap())),
        ("zap_all_fast", Box::new(|| vm.zap_all_fast().unwrap())),
        ("zap_memslot", Box::new(|| vm.zap_memslot(0).unwrap())),
    ];
    for (what, zap) in &zaps {
        // Fill A's TLB and check it hits.
        access_ok(&vm, &mut a, &host, &s4k, p + K4, AccessKind::Read);
        access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Read);
        let exits = a.exits;
        access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Read);
        assert_eq!(a.exits, exits, "{what}: TLB hit before the zap");
        let flushes = vm.stats().remote_tlb_flushes;
        zap();
        assert!(
            vm.stats().remote_tlb_flushes > flushes,
            "{what}: no remote flush"
        );
        audit(&vm);
        let hpa = access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Read);
        assert_eq!(
            a.exits,
            exits + 1,
            "{what}: A used a stale TLB entry after the zap"
        );
        assert_eq!(hpa, expected_hpa(&host, &s4k, p));
    }
    // A huge page zapped through a 4K sub-range of it: A's 2M TLB entry goes too.
    access_ok(&vm, &mut a, &host, &thp, q, AccessKind::Write);
    let exits = a.exits;
    access_ok(&vm, &mut a, &host, &thp, q + 0x1000, AccessKind::Write);
    assert_eq!(a.exits, exits, "the 2M TLB entry covers the neighbour page");
    let g = Gpa(thp.gpa + M2 + 100 * K4).gfn();
    vm.zap_gfn_range(g, Gfn(g.0 + 1)).unwrap();
    access_ok(&vm, &mut a, &host, &thp, q, AccessKind::Read);
    assert_eq!(
        a.exits,
        exits + 1,
        "stale 2M TLB entry after zapping part of the huge page"
    );
    audit(&vm);

    // Make staleness visible in the result: the host gives P a new frame (as migration
    // would), the VMM zaps P, and A must reach the new frame, not its cached old one.
    let old = access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Write);
    let fresh = host.remap_page(vmmu::types::Hva(s4k.hva_of(p))).unwrap();
    assert_ne!(fresh.0 << 12, old.0 & !0xfff);
    vm.zap_gfn_range(Gpa(p).gfn(), Gfn(Gpa(p).gfn().0 + 1))
        .unwrap();
    let new = vm.read(&mut a, Gpa(p)).unwrap();
    assert_eq!(
        new.0,
        fresh.0 << 12,
        "A reached the old host page after the zap"
    );
    assert_eq!(new, expected_hpa(&host, &s4k, p));
    audit(&vm);
    check_leaves_against_host(&vm, &host);
}

/// Clear P's leaf SPTE directly in the table, without a flush: vCPU A keeps reaching P's
/// host page through its stale TLB entry, while a fresh vCPU faults. That is what a
/// missing flush looks like; the audit catches the tampering itself.
#[test]
fn a_missing_flush_shows_up_as_a_stale_translation() {
    let Env { host, vm, s4k, .. } = env();
    let mut a = vm.create_vcpu().unwrap();
    let p = s4k.gpa + 33 * K4 + 0x40;
    let hpa = access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Write);
    audit(&vm);
    let st0 = vm.stats();
    clear_leaf_behind_the_mmus_back(&vm, Gpa(p).gfn(), Level::L4K);
    assert!(table_leaves(&vm).is_empty(), "the table no longer maps P");

    // A: stale hit, no exit, the old host page.
    let exits = a.exits;
    let (hits0, _, _) = a.tlb().counters();
    assert_eq!(vm.read(&mut a, Gpa(p)), Ok(hpa));
    assert_eq!(
        vm.write(&mut a, Gpa(p + 8)),
        Ok(vmmu::types::Hpa(hpa.0 + 8))
    );
    assert_eq!(a.exits, exits, "A walked the tables: the TLB did not cache");
    assert_eq!(a.tlb().counters().0 - hits0, 2);
    assert_eq!(vm.stats(), st0, "nothing flushed, nothing faulted");

    // The audit sees the leaf missing from its table (the page's present count, or the
    // reverse-map entry naming a non-present SPTE, whichever it checks first; for the
    // TDP MMU in used-entries mode, the bitmap marking an empty entry).
    if audit_sees_a_cleared_leaf(&vm) {
        let err = vm
            .audit()
            .expect_err("the audit missed a leaf missing from its table");
        assert!(
            err.0.contains("present") || err.0.contains("rmap") || err.0.contains("used"),
            "unexpected audit message: {err}"
        );
    } else {
        audit(&vm);
    }

    // A fresh vCPU walks the tables and faults.
    let mut b = vm.create_vcpu().unwrap();
    assert_eq!(vm.read(&mut b, Gpa(p)), Ok(hpa));
    assert_eq!(
        b.exits, 1,
        "a fresh vCPU must fault: P is not in the tables"
    );
    if is_tdp(&vm) {
        // Without reverse maps, the refault made the tables whole again.
        audit(&vm);
    } else {
        assert_eq!(vm.stats().mmu.faults - st0.mmu.faults, 1);
        // The fault handler re-linked P on top of the stale rmap entry: still inconsistent.
        assert!(vm.audit().is_err());
    }
}

/// The same tampering, then an explicit remote flush: A's stale entry is gone and A
/// faults. Then the SPTE is put back as it was: the audit passes again.
#[test]
fn a_flush_removes_the_stale_translation() {
    let Env { host, vm, thp, .. } = env();
    let mut a = vm.create_vcpu().unwrap();
    let p = thp.gpa + 0x1234;
    let hpa = access_ok(&vm, &mut a, &host, &thp, p, AccessKind::Read);
    let old = clear_leaf_behind_the_mmus_back(&vm, Gpa(p).gfn(), Level::L2M);
    assert_eq!(vm.audit().is_err(), audit_sees_a_cleared_leaf(&vm));
    let exits = a.exits;
    // Any page of the 2M leaf hits the stale 2M entry.
    assert_eq!(
        vm.read(&mut a, Gpa(p + 0x10_0000)),
        Ok(vmmu::types::Hpa(hpa.0 + 0x10_0000))
    );
    assert_eq!(a.exits, exits);
    let flushes = vm.stats().remote_tlb_flushes;
    vm.flush_remote_tlbs();
    assert_eq!(vm.stats().remote_tlb_flushes, flushes + 1);
    // Put the SPTE back before A walks again, so the MMU's state is whole.
    poke_leaf_behind_the_mmus_back(&vm, Gpa(p).gfn(), Level::L2M, old);
    audit(&vm);
    let (_, _, f0) = a.tlb().counters();
    // The walk now finds the leaf again: a TLB miss, no exit, and A handled the flush.
    assert_eq!(vm.read(&mut a, Gpa(p)), Ok(hpa));
    assert_eq!(a.tlb().counters().2, f0 + 1, "A did not flush its TLB");
    assert_eq!(a.exits, exits);
    // Clear it again and flush: now A faults.
    clear_leaf_behind_the_mmus_back(&vm, Gpa(p).gfn(), Level::L2M);
    vm.flush_remote_tlbs();
    poke_leaf_behind_the_mmus_back(&vm, Gpa(p).gfn(), Level::L2M, old);
    vm.zap_all().unwrap();
    audit(&vm);
    assert_eq!(vm.read(&mut a, Gpa(p)), Ok(hpa));
    assert_eq!(a.exits, exits + 1);
    audit(&vm);
}

/// Permission downgrades need a flush too: after dirty logging starts, a vCPU that had a
/// writable TLB entry must fault on its next write (or the write would not be logged).
#[test]
fn dirty_logging_start_flushes_writable_tlb_entries() {
    let Env { host, vm, s4k, .. } = env();
    let mut a = vm.create_vcpu().unwrap();
    let p = s4k.gpa + 3 * K4;
    access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Write);
    let exits = a.exits;
    access_ok(&vm, &mut a, &host, &s4k, p, AccessKind::Write);
    assert_eq!(a.exits, exits);
    let log = SlotSpec {
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        ..s4k
    };
    vm.set_user_memory_region(log.region()).unwrap();
    // The write must reach the MMU (slow or lockless fault) to be logged: a stale
    // writable TLB entry would let it through unseen.
    access_ok(&vm, &mut a, &host, &log, p, AccessKind::Write);
    assert!(with_slots(&vm, |s| s
        .by_id(0)
        .unwrap()
        .dirty_bitmap()
        .unwrap()
        .test(3)));
    audit(&vm);
}

/// A flush request reaches vCPUs that are not running: they flush when they next enter.
#[test]
fn flush_counts_and_idle_vcpus() {
    let Env { host, vm, s4k, .. } = env();
    let mut vcpus: Vec<_> = (0..4).map(|_| vm.create_vcpu().unwrap()).collect();
    let p = s4k.gpa;
    for v in vcpus.iter_mut() {
        access_ok(&vm, v, &host, &s4k, p, AccessKind::Read);
    }
    // A neighbour keeps the 4K table alive through the zap of P.
    access_ok(&vm, &mut vcpus[0], &host, &s4k, p + K4, AccessKind::Read);
    let flushes = vm.stats().remote_tlb_flushes;
    let before: Vec<u64> = vcpus.iter().map(|v| v.exits).collect();
    // Each vCPU's first entry flushed its TLB already (the INVEPT of a newly loaded root).
    let flushed: Vec<u64> = vcpus.iter().map(|v| v.tlb().counters().2).collect();
    vm.zap_gfn_range(Gpa(p).gfn(), Gfn(Gpa(p).gfn().0 + 1))
        .unwrap();
    for v in vcpus.iter_mut() {
        access_ok(&vm, v, &host, &s4k, p, AccessKind::Read);
    }
    // Exactly one of them re-created the leaf; the others found it by walking. None hit a
    // stale TLB entry: each flushed before its access (3 walks + 1 fault).
    assert_eq!(vm.stats().remote_tlb_flushes, flushes + 1);
    let faulted: u64 = vcpus.iter().zip(&before).map(|(v, b)| v.exits - b).sum();
    assert_eq!(faulted, 1);
    for (v, f) in vcpus.iter().zip(&flushed) {
        assert_eq!(
            v.tlb().counters().2,
            f + 1,
            "vCPU {} did not flush once",
            v.id
        );
    }
    audit(&vm);
}
