//! The two ways a guest access ends at the VMM: READONLY memslots (writes exit, reads map
//! read-only) and MMIO (a gpa in no memslot; cached in an MMIO SPTE tagged with the
//! memslot generation, recognised from the SPTE alone until the generation changes).

mod common;

use common::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gfn, Gpa, Level};
use vmmu::{Exit, MemslotFlags, VmConfig};

#[test]
fn readonly_slot_maps_reads_and_exits_on_writes() {
    let (host, vm) = new_vm(VmConfig::default());
    let ro = MemslotFlags::READONLY;
    let h0 = mmap(&host, 8 * M1, Backing::Thp);
    let h1 = mmap(&host, 4 * M1, Backing::Page4K);
    let a = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 8 * M1,
            hva: h0,
            flags: ro,
        },
    );
    let b = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1 + 3 * K4,
            size: 2 * M1,
            hva: h1,
            flags: ro,
        },
    );
    let mut vcpu = vm.create_vcpu().unwrap();

    // Writes before anything is mapped: MMIO exits, nothing mapped, no MMIO SPTE.
    for spec in [&a, &b] {
        for i in (0..spec.pages()).step_by(97) {
            access_mmio(&vm, &mut vcpu, spec.page_gpa(i) + 8, AccessKind::Write);
        }
    }
    let rep = audit(&vm);
    assert_eq!((rep.leaves, rep.mmio), (0, 0));
    assert_eq!(
        vm.stats().mmu.mmio_faults,
        0,
        "a READONLY write is not an MMIO-SPTE fault"
    );

    // Reads and fetches map every page, read-only, and translate.
    for spec in [&a, &b] {
        for i in 0..spec.pages() {
            let kind = if i % 2 == 0 {
                AccessKind::Read
            } else {
                AccessKind::Fetch
            };
            access_ok(&vm, &mut vcpu, &host, spec, spec.page_gpa(i) + 0x100, kind);
        }
        audit(&vm);
    }
    assert_eq!(
        leaf_counts(&vm),
        [512, 4, 0],
        "READONLY does not prevent huge mappings"
    );
    for (_, spte) in leaves(&vm) {
        assert!(
            !spte.is_writable() && !spte.is_mmu_writable(),
            "writable SPTE in READONLY slot: {spte:?}"
        );
        assert!(spte.is_host_writable());
    }

    // Writes to mapped pages: every one exits (no emulation cache), nothing changes.
    let before = table_leaves(&vm);
    for spec in [&a, &b] {
        let exits0 = vcpu.exits;
        let n = spec.pages();
        for i in 0..n {
            access_mmio(&vm, &mut vcpu, spec.page_gpa(i) + 0x10, AccessKind::Write);
        }
        assert_eq!(vcpu.exits - exits0, n, "every READONLY write exits");
        audit(&vm);
    }
    assert_eq!(
        table_leaves(&vm),
        before,
        "a READONLY write changed an SPTE"
    );
    // Reads after the writes still hit, without exits.
    let exits0 = vcpu.exits;
    for i in 0..a.pages() {
        access_ok(&vm, &mut vcpu, &host, &a, a.page_gpa(i), AccessKind::Read);
    }
    assert_eq!(vcpu.exits, exits0);
    check_leaves_against_host(&vm, &host);

    // READONLY with dirty logging: logging splits to 4K, writes still exit, nothing logged.
    let a_log = SlotSpec {
        flags: ro | MemslotFlags::LOG_DIRTY_PAGES,
        ..a
    };
    vm.set_user_memory_region(a_log.region()).unwrap();
    audit(&vm);
    for i in (0..a.pages()).step_by(3) {
        access_ok(
            &vm,
            &mut vcpu,
            &host,
            &a_log,
            a.page_gpa(i),
            AccessKind::Read,
        );
        access_mmio(&vm, &mut vcpu, a.page_gpa(i), AccessKind::Write);
    }
    let dirty = with_slots(&vm, |s| {
        let bm = s.by_id(0).unwrap().dirty_bitmap().unwrap();
        (0..a.pages()).filter(|&i| bm.test(i)).count()
    });
    assert_eq!(dirty, 0, "READONLY writes were logged");
    assert_eq!(leaf_counts(&vm)[1], 0);
    audit(&vm);
}

#[test]
fn mmio_is_recognised_from_the_spte_the_second_time() {
    let (host, vm) = new_vm(VmConfig::default());
    let h = mmap(&host, 2 * M1, Backing::Page4K);
    // The slot ends in the middle of a 4K table: MMIO SPTEs share the table with leaves.
    let s = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: M1,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    );
    let mut vcpu = vm.create_vcpu().unwrap();
    for i in 0..s.pages() {
        access_ok(&vm, &mut vcpu, &host, &s, s.page_gpa(i), kind_for(i));
    }
    let x = G1 + M1 + 5 * K4;
    let st0 = vm.stats();
    let exits0 = vcpu.exits;
    access_mmio(&vm, &mut vcpu, x + 0x18, AccessKind::Read);
    let st1 = vm.stats();
    // (The TDP MMU keeps no fault counters: a slow MMIO fault there is an exit that was
    // not a fast MMIO exit.)
    if !is_tdp(&vm) {
        assert_eq!(st1.mmu.mmio_faults - st0.mmu.mmio_faults, 1);
        assert_eq!(st1.mmu.faults - st0.mmu.faults, 1);
    }
    assert_eq!(st1.fast_mmio_exits, st0.fast_mmio_exits);
    assert_eq!(vcpu.exits - exits0, 1);
    let rep = audit(&vm);
    assert_eq!(rep.mmio, 1);

    // Again, any kind and offset in the page: the SPTE answers, no fault handler.
    for (n, kind) in [
        AccessKind::Write,
        AccessKind::Read,
        AccessKind::Fetch,
        AccessKind::Write,
    ]
    .into_iter()
    .enumerate()
    {
        access_mmio(&vm, &mut vcpu, x + 8 * n as u64, kind);
    }
    let st2 = vm.stats();
    assert_eq!(st2.fast_mmio_exits - st1.fast_mmio_exits, 4);
    assert_eq!(st2.mmu.mmio_faults, st1.mmu.mmio_faults);
    assert_eq!(st2.mmu.faults, st1.mmu.faults);
    assert_eq!(vcpu.exits - exits0, 5, "an MMIO exit is still an exit");
    // A second vCPU uses the same SPTE.
    let mut other = vm.create_vcpu().unwrap();
    access_mmio(&vm, &mut other, x, AccessKind::Read);
    assert_eq!(vm.stats().fast_mmio_exits - st2.fast_mmio_exits, 1);
    // The neighbouring page is a new MMIO fault.
    access_mmio(&vm, &mut vcpu, x + K4, AccessKind::Read);
    if !is_tdp(&vm) {
        assert_eq!(vm.stats().mmu.mmio_faults - st0.mmu.mmio_faults, 2);
    }
    assert_eq!(vm.stats().fast_mmio_exits - st2.fast_mmio_exits, 1);
    assert_eq!(audit(&vm).mmio, 2);

    // Zapping the slot's range leaves the MMIO SPTEs (and so their table) in place; the
    // mapped pages refault.
    vm.zap_gfn_range(Gfn(0), Gfn(1 << 36)).unwrap();
    let rep = audit(&vm);
    assert_eq!((rep.leaves, rep.mmio), (0, 2));
    assert!(table_count(&vm) > 1);
    let st3 = vm.stats();
    access_mmio(&vm, &mut vcpu, x, AccessKind::Write);
    assert_eq!(vm.stats().fast_mmio_exits - st3.fast_mmio_exits, 1);
    // zap_all clears them: root only, and the next access takes the slow path again.
    vm.zap_all().unwrap();
    let rep = audit(&vm);
    assert_eq!((rep.pages, rep.mmio), (1, 0));
    assert_eq!(table_count(&vm), 1);
    let st4 = vm.stats();
    let exits4 = vcpu.exits;
    access_mmio(&vm, &mut vcpu, x, AccessKind::Write);
    if !is_tdp(&vm) {
        assert_eq!(vm.stats().mmu.mmio_faults - st4.mmu.mmio_faults, 1);
    }
    assert_eq!(vcpu.exits - exits4, 1);
    assert_eq!(vm.stats().fast_mmio_exits, st4.fast_mmio_exits);
    audit(&vm);
}

/// After a memslot covers an MMIO gpa, the stale MMIO SPTE (older generation) is replaced
/// by a mapping, at 4K or as part of a huge page.
#[test]
fn slot_created_over_an_mmio_gpa_maps_normally() {
    for (backing, level) in [(Backing::Page4K, Level::L4K), (Backing::Thp, Level::L2M)] {
        let (host, vm) = new_vm(VmConfig::default());
        let mut vcpu = vm.create_vcpu().unwrap();
        let x = 3 * G1 + 2 * M1 + 0x7008;
        access_mmio(&vm, &mut vcpu, x, AccessKind::Write);
        access_mmio(&vm, &mut vcpu, x + K4, AccessKind::Read);
        access_mmio(&vm, &mut vcpu, x, AccessKind::Read);
        assert_eq!(vm.stats().fast_mmio_exits, 1);
        assert_eq!(audit(&vm).mmio, 2);
        let gen0 = with_slots(&vm, |s| s.generation());

        let h = mmap(&host, 4 * M1, backing);
        let s = add_slot(
            &vm,
            SlotSpec {
                id: 5,
                gpa: 3 * G1 + 2 * M1,
                size: 4 * M1,
                hva: h,
                flags: MemslotFlags::empty(),
            },
        );
        assert_ne!(with_slots(&vm, |s| s.generation()), gen0);
        audit(&vm);
        let st0 = vm.stats();
        let exits0 = vcpu.exits;
        access_ok(&vm, &mut vcpu, &host, &s, x, AccessKind::Write);
        let st1 = vm.stats();
        assert_eq!(
            st1.fast_mmio_exits, st0.fast_mmio_exits,
            "stale MMIO SPTE taken as current"
        );
        if !is_tdp(&vm) {
            assert_eq!(st1.mmu.faults - st0.mmu.faults, 1);
        }
        assert_eq!(vcpu.exits - exits0, 1);
        assert_eq!(leaf_of(&vm, Gpa(x).gfn()).unwrap().1, level);
        let rep = audit(&vm);
        if level == Level::L4K {
            assert_eq!(rep.mmio, 1, "the other MMIO SPTE is still there");
        } else {
            assert_eq!(rep.mmio, 0, "the huge leaf replaced the table holding both");
        }
        access_ok(&vm, &mut vcpu, &host, &s, x + K4, AccessKind::Read);
        for i in 0..s.pages() {
            access_ok(&vm, &mut vcpu, &host, &s, s.page_gpa(i), kind_for(i));
        }
        let rep = audit(&vm);
        assert_eq!(rep.mmio, 0);
        check_leaves_against_host(&vm, &host);
    }
}

/// Any memslot update changes the generation, so every MMIO SPTE goes stale: the next
/// access re-checks the memslots (slow path), and the one after is fast again. A failed
/// update changes nothing.
#[test]
fn memslot_updates_invalidate_mmio_sptes() {
    let (host, vm) = new_vm(VmConfig::default());
    let mut vcpu = vm.create_vcpu().unwrap();
    let h = mmap(&host, 2 * M1, Backing::Page4K);
    let x = 5 * G1 + 0x3000;
    access_mmio(&vm, &mut vcpu, x, AccessKind::Read);
    let mut spec = SlotSpec {
        id: 1,
        gpa: G1,
        size: 2 * M1,
        hva: h,
        flags: MemslotFlags::empty(),
    };
    let updates: [fn(&mut SlotSpec) -> vmmu::MemoryRegion; 5] = [
        |s| s.region(), // create
        |s| {
            s.flags = MemslotFlags::LOG_DIRTY_PAGES;
            s.region()
        },
        |s| {
            s.flags = MemslotFlags::empty();
            s.region()
        },
        |s| {
            s.gpa = 2 * G1; // move
            s.region()
        },
        |s| region(s.id, 0, 0, 0, MemslotFlags::empty()), // delete
    ];
    for update in &updates {
        let r = update(&mut spec);
        vm.set_user_memory_region(r).unwrap();
        audit(&vm);
        let st0 = vm.stats();
        let exits0 = vcpu.exits;
        access_mmio(&vm, &mut vcpu, x, AccessKind::Write);
        let st1 = vm.stats();
        assert_eq!(
            st1.fast_mmio_exits, st0.fast_mmio_exits,
            "stale generation accepted after {r:?}"
        );
        assert_eq!(vcpu.exits - exits0, 1);
        if !is_tdp(&vm) {
            assert_eq!(st1.mmu.mmio_faults - st0.mmu.mmio_faults, 1);
        }
        access_mmio(&vm, &mut vcpu, x, AccessKind::Read);
        let st2 = vm.stats();
        assert_eq!(st2.fast_mmio_exits - st1.fast_mmio_exits, 1);
        assert_eq!(st2.mmu.mmio_faults, st1.mmu.mmio_faults);
        assert_eq!(
            audit(&vm).mmio,
            1,
            "the slow path updated the SPTE in place"
        );
    }
    // A no-op update (same region twice) does not change the generation.
    vm.set_user_memory_region(spec_region_create(&h)).unwrap();
    let gen = with_slots(&vm, |s| s.generation());
    vm.set_user_memory_region(spec_region_create(&h)).unwrap();
    assert_eq!(with_slots(&vm, |s| s.generation()), gen);
}

fn spec_region_create(h: &u64) -> vmmu::MemoryRegion {
    region(9, 7 * G1, 2 * M1, *h, MemslotFlags::empty())
}

/// The MMIO generation in an SPTE has 19 bits. After 2^19 memslot updates the generation
/// an old MMIO SPTE carries matches again; KVM zaps every MMIO SPTE when the generation
/// wraps (`kvm_mmu_invalidate_mmio_sptes`), so a stale SPTE can never be taken as current.
/// Here: an MMIO SPTE for X, then a slot over X, then 2^19 - 1 more updates: the access
/// to X must map the slot's page, not exit as MMIO.
#[test]
fn mmio_generation_wraparound_does_not_revive_stale_sptes() {
    let (host, vm) = new_vm(VmConfig::default());
    let mut vcpu = vm.create_vcpu().unwrap();
    let h = mmap(&host, 2 * M1, Backing::Page4K);
    let hx = mmap(&host, 2 * M1, Backing::Page4K);
    let other = SlotSpec {
        id: 0,
        gpa: G1,
        size: K4,
        hva: h,
        flags: MemslotFlags::empty(),
    };
    add_slot(&vm, other);
    let x = 2 * G1 + 0x5000;
    access_mmio(&vm, &mut vcpu, x, AccessKind::Read);
    let gen0 = with_slots(&vm, |s| s.generation());
    let sx = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 2 * M1,
            hva: hx,
            flags: MemslotFlags::empty(),
        },
    );
    let wrap = 1u64 << vmmu::spte::bits::MMIO_GEN_BITS;
    let mut flip = other;
    while with_slots(&vm, |s| s.generation()) != gen0 + wrap {
        flip.flags = if flip.logging() {
            MemslotFlags::empty()
        } else {
            MemslotFlags::LOG_DIRTY_PAGES
        };
        vm.set_user_memory_region(flip.region()).unwrap();
    }
    audit(&vm);
    let got = vm.read(&mut vcpu, Gpa(x));
    assert_eq!(
        got,
        Ok(expected_hpa(&host, &sx, x)),
        "after 2^19 memslot updates, a stale MMIO SPTE was taken as current"
    );
    audit(&vm);
}

/// An MMIO exit carries the exact gpa (with its offset) and whether it was a write, for
/// gpas below, between and above slots.
#[test]
fn mmio_exits_carry_the_exact_gpa() {
    let (host, vm) = new_vm(VmConfig::default());
    let h = mmap(&host, 4 * M1, Backing::Thp);
    let s = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1 + M1,
            size: 2 * M1,
            hva: h + M1,
            flags: MemslotFlags::empty(),
        },
    );
    let mut vcpu = vm.create_vcpu().unwrap();
    for gpa in [
        0u64,
        0xfff,
        G1,
        G1 + M1 - 1,
        G1 + 3 * M1,
        G1 + 3 * M1 + 0xabc,
        (1 << 48) - 1,
    ] {
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            assert_eq!(
                vm.access(&mut vcpu, Gpa(gpa), kind),
                Err(Exit::Mmio {
                    gpa: Gpa(gpa),
                    write: kind == AccessKind::Write
                })
            );
        }
    }
    access_ok(&vm, &mut vcpu, &host, &s, G1 + M1, AccessKind::Write);
    access_ok(
        &vm,
        &mut vcpu,
        &host,
        &s,
        G1 + 3 * M1 - 1,
        AccessKind::Write,
    );
    audit(&vm);
    check_leaves_against_host(&vm, &host);
}
