//! Memslot updates while the guest has the memory mapped: delete, move, flag changes
//! (dirty logging), and every invalid input, which must change nothing.

mod common;

use std::collections::BTreeMap;

use common::*;
use vmmu::host::{Backing, SimHostMemory};
use vmmu::memslot::MemslotLimits;
use vmmu::types::{AccessKind, Gfn, Gpa, Hpa, Level, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{Error, Exit, MemslotFlags, VmConfig};

fn map_slot(
    vm: &TestVm,
    host: &SimHostMemory,
    vcpu: &mut Vcpu,
    spec: &SlotSpec,
) -> BTreeMap<u64, Hpa> {
    (0..spec.pages())
        .map(|i| {
            let gpa = spec.page_gpa(i) + (i % 512) * 8;
            (i, access_ok(vm, vcpu, host, spec, gpa, kind_for(i)))
        })
        .collect()
}

fn slot_leaves(vm: &TestVm, spec: &SlotSpec) -> BTreeMap<(u64, Level), vmmu::spte::Spte> {
    leaves(vm)
        .into_iter()
        .filter(|&((g, _), _)| g >= spec.base_gfn().0 && g < spec.end_gfn().0)
        .collect()
}

fn levels_in(vm: &TestVm, spec: &SlotSpec) -> [usize; 3] {
    let mut c = [0; 3];
    for (_, l) in slot_leaves(vm, spec).keys() {
        c[l.leaf_index()] += 1;
    }
    c
}

#[test]
fn delete_while_mapped_turns_the_range_into_mmio() {
    let (host, vm) = new_vm(VmConfig::default());
    let ha = mmap(&host, 8 * M1, Backing::Thp);
    let hb = mmap(&host, 2 * M1, Backing::Page4K);
    let none = MemslotFlags::empty();
    // A starts 1 MiB into a 2 MiB page: 4K edges, 2M middle.
    let a = add_slot(
        &vm,
        SlotSpec {
            id: 3,
            gpa: G1 + M1,
            size: 6 * M1,
            hva: ha + M1,
            flags: none,
        },
    );
    let b = add_slot(
        &vm,
        SlotSpec {
            id: 4,
            gpa: G1 + 8 * M1,
            size: 2 * M1,
            hva: hb,
            flags: none,
        },
    );
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    map_slot(&vm, &host, &mut v0, &a);
    map_slot(&vm, &host, &mut v0, &b);
    // v1 caches a few translations of A in its TLB.
    for i in [0, 255, 256, 1000, a.pages() - 1] {
        access_ok(&vm, &mut v1, &host, &a, a.page_gpa(i), AccessKind::Read);
    }
    let exits1 = v1.exits;
    access_ok(&vm, &mut v1, &host, &a, a.page_gpa(1000), AccessKind::Read);
    assert_eq!(v1.exits, exits1, "TLB hit expected before the delete");
    assert_eq!(levels_in(&vm, &a), [512, 2, 0]);
    audit(&vm);
    let b_leaves = slot_leaves(&vm, &b);
    let st0 = vm.stats();

    vm.set_user_memory_region(region(a.id, 0, 0, 0, none))
        .unwrap();
    let st = vm.stats();
    assert_eq!(st.remote_tlb_flushes - st0.remote_tlb_flushes, 1);
    if !is_tdp(&vm) {
        // The shadow MMU counts the leaves it zaps (the TDP MMU keeps no such counter).
        assert_eq!(st.mmu.leaves_zapped - st0.mmu.leaves_zapped, 514);
    }
    assert!(slot_leaves(&vm, &a).is_empty());
    assert_eq!(slot_leaves(&vm, &b), b_leaves, "delete of A touched B");
    assert!(with_slots(&vm, |s| s.by_id(a.id).is_none()));
    audit(&vm);

    // Every vCPU, cached or not, now exits to the VMM for every page of A.
    for i in [0, 255, 256, 1000, a.pages() - 1] {
        access_mmio(&vm, &mut v1, a.page_gpa(i) + 4, AccessKind::Read);
    }
    for i in 0..a.pages() {
        access_mmio(&vm, &mut v0, a.page_gpa(i), kind_for(i));
    }
    let rep = audit(&vm);
    assert_eq!(
        rep.mmio as u64,
        a.pages(),
        "one MMIO SPTE per page of the deleted slot"
    );
    // B is still mapped: no exit.
    let exits0 = v0.exits;
    map_slot(&vm, &host, &mut v0, &b);
    assert_eq!(v0.exits, exits0);

    // Re-create A with the same host memory: it maps again, same translations and levels,
    // replacing the MMIO SPTEs.
    let a = add_slot(&vm, a);
    map_slot(&vm, &host, &mut v1, &a);
    assert_eq!(levels_in(&vm, &a), [512, 2, 0]);
    let rep = audit(&vm);
    assert_eq!(rep.mmio, 0);
    check_leaves_against_host(&vm, &host);

    // Deleting everything frees every table (no MMIO SPTE left to hold one). The TDP
    // MMU, as KVM's, keeps emptied tables after a leaf zap: only zap_all drops them.
    vm.set_user_memory_region(region(a.id, 0, 0, 0, none))
        .unwrap();
    vm.set_user_memory_region(region(b.id, 0, 0, 0, none))
        .unwrap();
    if is_tdp(&vm) {
        assert!(table_count(&vm) > 1);
        vm.zap_all().unwrap();
    }
    assert_eq!(table_count(&vm), 1);
    assert_eq!(audit(&vm).leaves, 0);
}

#[test]
fn move_while_mapped_keeps_the_host_pages() {
    let (host, vm) = new_vm(VmConfig::default());
    let none = MemslotFlags::empty();
    let ha = mmap(&host, 8 * M1, Backing::Thp);
    let hb = mmap(&host, 4 * M1, Backing::Page4K);
    let mut a = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 8 * M1,
            hva: ha,
            flags: none,
        },
    );
    let b = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 3 * G1,
            size: 4 * M1,
            hva: hb,
            flags: none,
        },
    );
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    let hpas = map_slot(&vm, &host, &mut v0, &a);
    map_slot(&vm, &host, &mut v1, &b);
    access_ok(&vm, &mut v1, &host, &a, a.gpa + 0x1234, AccessKind::Write);
    assert_eq!(levels_in(&vm, &a), [0, 4, 0]);
    let b_leaves = slot_leaves(&vm, &b);

    // (new gpa, expected leaf levels): congruent 2M-aligned, incongruent by 20 KiB,
    // incongruent by 1 MiB, back home.
    let moves = [
        (2 * G1, [0, 4, 0]),
        (2 * G1 + 5 * K4, [2048, 0, 0]),
        (5 * G1 + M1, [2048, 0, 0]),
        (G1, [0, 4, 0]),
    ];
    for (to, want_levels) in moves {
        let old = a;
        a.gpa = to;
        let st0 = vm.stats();
        vm.set_user_memory_region(a.region()).unwrap();
        assert_eq!(vm.stats().remote_tlb_flushes - st0.remote_tlb_flushes, 1);
        assert!(slot_leaves(&vm, &old).is_empty() || old.gpa == a.gpa);
        assert_eq!(
            with_slots(&vm, |s| s.by_id(0).unwrap().base_gfn),
            a.base_gfn()
        );
        audit(&vm);
        // The old range is MMIO for both vCPUs (v1 had a TLB entry in it).
        if !a.contains_gpa(old.gpa + 0x1234) {
            access_mmio(&vm, &mut v1, old.gpa + 0x1234, AccessKind::Write);
        }
        if !a.contains_gpa(old.gpa + old.size - 8) {
            access_mmio(&vm, &mut v0, old.gpa + old.size - 8, AccessKind::Read);
        }
        // The new range reaches the same host pages, page for page.
        for i in 0..a.pages() {
            let gpa = a.page_gpa(i) + (i % 512) * 8;
            let hpa = access_ok(&vm, &mut v0, &host, &a, gpa, kind_for(i));
            assert_eq!(hpa, hpas[&i], "page {i} moved to another host page");
        }
        assert_eq!(
            levels_in(&vm, &a),
            want_levels,
            "levels after moving to {to:#x}"
        );
        assert_eq!(slot_leaves(&vm, &b), b_leaves, "moving A touched B");
        audit(&vm);
        check_leaves_against_host(&vm, &host);
    }

    // A move onto B fails and changes nothing.
    let before = snapshot(&vm);
    let onto_b = SlotSpec {
        gpa: b.gpa + 2 * M1,
        ..a
    };
    assert_eq!(
        vm.set_user_memory_region(onto_b.region()),
        Err(Error::Overlap { slot: 0, other: 1 })
    );
    assert_eq!(snapshot(&vm), before);
    audit(&vm);
}

#[test]
fn dirty_logging_forces_4k_and_logs_every_write() {
    let (host, vm) = new_vm(VmConfig::default());
    let h = mmap(&host, 16 * M1, Backing::Thp);
    let mut s = add_slot(
        &vm,
        SlotSpec {
            id: 2,
            gpa: G1,
            size: 16 * M1,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    );
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    // Writes fill both TLBs with writable, dirty 2M translations.
    for i in 0..s.pages() {
        access_ok(&vm, &mut v0, &host, &s, s.page_gpa(i), AccessKind::Write);
    }
    for i in (0..s.pages()).step_by(7) {
        access_ok(&vm, &mut v1, &host, &s, s.page_gpa(i), AccessKind::Write);
    }
    assert_eq!(levels_in(&vm, &s), [0, 8, 0]);
    assert!(with_slots(&vm, |sl| sl
        .by_id(2)
        .unwrap()
        .dirty_bitmap()
        .is_none()));

    // Logging on: the huge leaves go at once, with a flush. The shadow MMU zaps them;
    // the TDP MMU splits them eagerly into read-only 4K leaves (KVM's eager split).
    let split = is_tdp(&vm);
    let after_split = |pages: u64| {
        if split {
            [pages as usize, 0, 0]
        } else {
            [0, 0, 0]
        }
    };
    s.flags = MemslotFlags::LOG_DIRTY_PAGES;
    let st0 = vm.stats();
    vm.set_user_memory_region(s.region()).unwrap();
    assert_eq!(vm.stats().remote_tlb_flushes - st0.remote_tlb_flushes, 1);
    assert_eq!(levels_in(&vm, &s), after_split(s.pages()));
    assert!(slot_leaves(&vm, &s).values().all(|l| !l.is_writable()));
    audit(&vm);
    let npages = s.pages();
    let bitmap = |vm: &TestVm| -> Vec<u64> {
        with_slots(vm, |sl| {
            let bm = sl
                .by_id(2)
                .unwrap()
                .dirty_bitmap()
                .expect("bitmap while logging");
            (0..npages).filter(|&i| bm.test(i)).collect()
        })
    };
    assert!(bitmap(&vm).is_empty());

    // Writes to W (from both vCPUs, which had the pages writable in their TLBs), reads of R.
    let mut rng = Rng::new(77);
    let mut written = std::collections::BTreeSet::new();
    let mut read = std::collections::BTreeSet::new();
    for n in 0..1500u64 {
        let i = rng.below(s.pages());
        let v = if n % 2 == 0 { &mut v0 } else { &mut v1 };
        if rng.below(3) == 0 {
            access_ok(&vm, v, &host, &s, s.page_gpa(i) + 16, AccessKind::Write);
            written.insert(i);
        } else {
            access_ok(&vm, v, &host, &s, s.page_gpa(i) + 16, AccessKind::Read);
            read.insert(i);
        }
        if n % 250 == 0 {
            audit(&vm);
        }
    }
    audit(&vm);
    assert_eq!(
        bitmap(&vm),
        written.iter().copied().collect::<Vec<_>>(),
        "bitmap != pages written"
    );
    let [k4, m2, g1] = levels_in(&vm, &s);
    assert_eq!((m2, g1), (0, 0), "huge leaf while logging");
    if split {
        assert_eq!(k4 as u64, s.pages());
    } else {
        assert_eq!(k4, written.union(&read).count());
    }
    for (&(g, _), spte) in &slot_leaves(&vm, &s) {
        let i = g - s.base_gfn().0;
        assert_eq!(
            spte.is_writable(),
            written.contains(&i),
            "page {i}: only written pages map writable"
        );
    }
    check_leaves_against_host(&vm, &host);

    // A page only read so far: the first write faults (read-only SPTE, fixed on the slow
    // or the lockless path) and is logged.
    let i = *read.difference(&written).next().unwrap();
    access_ok(&vm, &mut v0, &host, &s, s.page_gpa(i), AccessKind::Write);
    assert!(bitmap(&vm).contains(&i));
    assert!(leaf_of(&vm, Gfn(s.base_gfn().0 + i))
        .unwrap()
        .2
        .is_writable());
    audit(&vm);

    // Map every page of the first 2 MiB at 4K while logging (reads: nothing logged).
    let logged = bitmap(&vm);
    for i in 0..512 {
        access_ok(&vm, &mut v0, &host, &s, s.page_gpa(i), AccessKind::Read);
    }
    assert_eq!(bitmap(&vm), logged, "reads were logged");
    audit(&vm);

    // Logging off: the bitmap goes. The shadow MMU's 4K leaves stay until something
    // zaps them; the TDP MMU recovers the huge leaves in place (every 2 MiB of the slot
    // is mapped at 4K since the split).
    s.flags = MemslotFlags::empty();
    vm.set_user_memory_region(s.region()).unwrap();
    assert!(with_slots(&vm, |sl| sl
        .by_id(2)
        .unwrap()
        .dirty_bitmap()
        .is_none()));
    if split {
        assert_eq!(levels_in(&vm, &s), [0, 8, 0]);
    } else {
        assert_eq!(levels_in(&vm, &s)[1], 0);
    }
    audit(&vm);
    // Zap one page of the first 2 MiB: the next access maps the whole 2 MiB huge again.
    // Whatever 4K leaves are left there (the MMU may already have collapsed them when
    // logging stopped, as KVM's zap_collapsible_sptes does) are replaced by the huge leaf
    // (as KVM's mmu_set_spte does), with a flush.
    vm.zap_gfn_range(Gfn(s.base_gfn().0 + 9), Gfn(s.base_gfn().0 + 10))
        .unwrap();
    audit(&vm);
    let b = s.base_gfn().0;
    let small_in_first_2m = |vm: &TestVm| {
        leaves(vm)
            .keys()
            .filter(|&&(g, l)| l == Level::L4K && g >= b && g < b + 512)
            .count() as u64
    };
    let left = small_in_first_2m(&vm);
    let tables0 = table_count(&vm);
    let st0 = vm.stats();
    access_ok(&vm, &mut v0, &host, &s, s.page_gpa(9), AccessKind::Write);
    let st = vm.stats();
    assert_eq!(leaf_of(&vm, Gfn(b + 100)).unwrap().1, Level::L2M);
    assert_eq!(small_in_first_2m(&vm), 0);
    if !is_tdp(&vm) {
        assert_eq!(st.mmu.leaves_zapped - st0.mmu.leaves_zapped, left);
    }
    if left > 0 {
        assert_eq!(
            st.remote_tlb_flushes - st0.remote_tlb_flushes,
            1,
            "replacing a table by a huge leaf flushes"
        );
        assert_eq!(table_count(&vm), tables0 - 1);
    }
    audit(&vm);
    for i in 0..s.pages() {
        access_ok(&vm, &mut v1, &host, &s, s.page_gpa(i), kind_for(i));
    }
    audit(&vm);
    check_leaves_against_host(&vm, &host);

    // Logging on again: a fresh, clean bitmap.
    s.flags = MemslotFlags::LOG_DIRTY_PAGES;
    vm.set_user_memory_region(s.region()).unwrap();
    assert!(bitmap(&vm).is_empty());
    assert_eq!(levels_in(&vm, &s), after_split(s.pages()));
    access_ok(&vm, &mut v1, &host, &s, s.page_gpa(3), AccessKind::Write);
    assert_eq!(bitmap(&vm), vec![3]);
    audit(&vm);
}

/// Repeated delete / create / move of slots with different backings while mapped; the
/// audit after each step and the tables return to just the root at the end.
#[test]
fn churn_of_slots_while_mapped() {
    let (host, vm) = new_vm(VmConfig::default());
    let none = MemslotFlags::empty();
    let backings = [Backing::Thp, Backing::Page4K, Backing::Thp];
    let hvas: Vec<u64> = backings.iter().map(|&b| mmap(&host, 4 * M1, b)).collect();
    let mut vcpu = vm.create_vcpu().unwrap();
    let mut rng = Rng::new(0xc0ffee);
    let mut live: Vec<Option<SlotSpec>> = vec![None; 3];
    for round in 0..60u64 {
        let id = rng.below(3) as usize;
        match live[id] {
            None => {
                // Create at a random 64 KiB-aligned place in this slot's own 64 MiB window.
                let gpa = G1 + id as u64 * 64 * M1 + rng.below(800) * 16 * K4;
                let spec = SlotSpec {
                    id: id as u32,
                    gpa,
                    size: 4 * M1,
                    hva: hvas[id],
                    flags: none,
                };
                live[id] = Some(add_slot(&vm, spec));
            }
            Some(spec) if round % 3 == 0 => {
                vm.set_user_memory_region(region(spec.id, 0, 0, 0, none))
                    .unwrap();
                live[id] = None;
                access_mmio(&vm, &mut vcpu, spec.gpa, AccessKind::Read);
            }
            Some(mut spec) => {
                let old = spec.gpa;
                spec.gpa = G1 + id as u64 * 64 * M1 + rng.below(800) * 16 * K4;
                vm.set_user_memory_region(spec.region()).unwrap();
                live[id] = Some(spec);
                if !spec.contains_gpa(old) {
                    access_mmio(&vm, &mut vcpu, old, AccessKind::Write);
                }
            }
        }
        audit(&vm);
        for spec in live.iter().flatten() {
            for _ in 0..64 {
                let i = rng.below(spec.pages());
                access_ok(
                    &vm,
                    &mut vcpu,
                    &host,
                    spec,
                    spec.page_gpa(i) + 8,
                    kind_for(i),
                );
            }
        }
        audit(&vm);
        check_leaves_against_host(&vm, &host);
    }
    vm.zap_all().unwrap();
    for spec in live.iter().flatten() {
        vm.set_user_memory_region(region(spec.id, 0, 0, 0, none))
            .unwrap();
    }
    assert_eq!(table_count(&vm), 1);
    assert_eq!(audit(&vm).leaves, 0);
}

/// Every invalid region, every invalid zap: the typed error, and nothing changes (counters,
/// leaves with their A/D bits, slots, generation; an MMIO SPTE is still recognised from
/// the SPTE alone, so the generation really did not move).
#[test]
fn bad_input_returns_typed_errors_and_changes_nothing() {
    let limits = MemslotLimits {
        id_limit: 16,
        max_slots: 3,
        gpa_bits: 40,
    };
    let (host, vm) = new_vm(VmConfig {
        limits,
        max_vcpus: 2,
        ..VmConfig::default()
    });
    let none = MemslotFlags::empty();
    let h0 = mmap(&host, 4 * M1, Backing::Thp);
    let h1 = mmap(&host, 4 * M1, Backing::Page4K);
    let h2 = mmap(&host, 2 * M1, Backing::Page4K);
    let s0 = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 4 * M1,
            hva: h0,
            flags: none,
        },
    );
    let s1 = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 4 * M1,
            hva: h1,
            flags: MemslotFlags::READONLY,
        },
    );
    let mut vcpu = vm.create_vcpu().unwrap();
    map_slot(&vm, &host, &mut vcpu, &s0);
    for i in 0..s1.pages() {
        access_ok(&vm, &mut vcpu, &host, &s1, s1.page_gpa(i), AccessKind::Read);
    }
    let mmio_gpa = 3 * G1 + 0x40;
    access_mmio(&vm, &mut vcpu, mmio_gpa, AccessKind::Read);
    audit(&vm);

    let check = |what: &str, f: &dyn Fn() -> Result<(), Error>, want: Error| {
        let before = snapshot(&vm);
        assert_eq!(f(), Err(want), "{what}");
        assert_eq!(snapshot(&vm), before, "{what} changed the VM");
        audit(&vm);
    };
    let set = |r: vmmu::MemoryRegion| vm.set_user_memory_region(r);
    let r = |slot, gpa, size, hva| region(slot, gpa, size, hva, none);
    let big = 1u64 << 40;
    let cases: Vec<(&str, vmmu::MemoryRegion, Error)> = vec![
        (
            "slot id",
            r(16, 0, K4, h2),
            Error::InvalidSlotId {
                slot: 16,
                limit: 16,
            },
        ),
        (
            "slot id max",
            r(u32::MAX, 0, K4, h2),
            Error::InvalidSlotId {
                slot: u32::MAX,
                limit: 16,
            },
        ),
        ("size", r(2, 0, K4 + 1, h2), Error::UnalignedSize(K4 + 1)),
        (
            "gpa",
            r(2, 0x800, K4, h2),
            Error::UnalignedGuestPhysAddr(0x800),
        ),
        (
            "hva",
            r(2, 0, K4, h2 + 8),
            Error::UnalignedUserspaceAddr(h2 + 8),
        ),
        (
            "delete missing",
            r(2, 0, 0, h2),
            Error::ZeroSize { slot: 2 },
        ),
        (
            "gpa overflow",
            r(2, !0xfffu64, 2 * K4, h2),
            Error::AddressOverflow,
        ),
        (
            "hva overflow",
            r(2, 0, 2 * K4, !0xfffu64),
            Error::AddressOverflow,
        ),
        (
            "width",
            r(2, big - K4, 2 * K4, h2),
            Error::BeyondGuestPhysWidth {
                end: big + K4,
                width_bits: 40,
            },
        ),
        (
            "width start",
            r(2, big, K4, h2),
            Error::BeyondGuestPhysWidth {
                end: big + K4,
                width_bits: 40,
            },
        ),
        (
            "overlap start",
            r(2, G1 - K4, 2 * K4, h2),
            Error::Overlap { slot: 2, other: 0 },
        ),
        (
            "overlap inside",
            r(2, 2 * G1 + M1, K4, h2),
            Error::Overlap { slot: 2, other: 1 },
        ),
        (
            "overlap around",
            r(2, G1 - M1, 8 * M1, h2),
            Error::Overlap { slot: 2, other: 0 },
        ),
        (
            "resize",
            r(0, G1, 2 * M1, h0),
            Error::SlotResize { slot: 0 },
        ),
        (
            "hva change",
            r(0, G1, 4 * M1, h0 + M2),
            Error::SlotHvaChange { slot: 0 },
        ),
        (
            "readonly on",
            region(0, G1, 4 * M1, h0, MemslotFlags::READONLY),
            Error::ReadonlyFlagChange { slot: 0 },
        ),
        (
            "readonly off",
            r(1, 2 * G1, 4 * M1, h1),
            Error::ReadonlyFlagChange { slot: 1 },
        ),
        (
            "move onto other",
            r(0, 2 * G1 + 2 * M1, 4 * M1, h0),
            Error::Overlap { slot: 0, other: 1 },
        ),
    ];
    for (what, reg, want) in cases {
        check(what, &|| set(reg), want);
    }
    // Flags outside the two KVM flags cannot even be built.
    assert_eq!(MemslotFlags::from_bits(4), Err(Error::InvalidFlags(4)));
    assert_eq!(
        MemslotFlags::from_bits(0x8000_0003),
        Err(Error::InvalidFlags(0x8000_0003))
    );

    // Bad zaps.
    let max = big / PAGE_SIZE;
    let zap = |a: u64, b: u64| vm.zap_gfn_range(Gfn(a), Gfn(b));
    check(
        "empty",
        &|| zap(s0.base_gfn().0, s0.base_gfn().0),
        Error::InvalidRange {
            start: s0.base_gfn().0,
            end: s0.base_gfn().0,
        },
    );
    check(
        "reversed",
        &|| zap(s0.end_gfn().0, s0.base_gfn().0),
        Error::InvalidRange {
            start: s0.end_gfn().0,
            end: s0.base_gfn().0,
        },
    );
    check(
        "too large",
        &|| zap(0, max + 1),
        Error::InvalidRange {
            start: 0,
            end: max + 1,
        },
    );
    check(
        "beyond",
        &|| zap(max, max + 1),
        Error::InvalidRange {
            start: max,
            end: max + 1,
        },
    );
    check(
        "huge",
        &|| zap(0, u64::MAX),
        Error::InvalidRange {
            start: 0,
            end: u64::MAX,
        },
    );
    check("unknown slot", &|| vm.zap_memslot(7), Error::NoSuchSlot(7));
    check(
        "slot id past limit",
        &|| vm.zap_memslot(16),
        Error::NoSuchSlot(16),
    );
    // An access beyond the guest-physical width: the fault handler refuses it.
    let before = snapshot(&vm);
    assert_eq!(
        vm.write(&mut vcpu, Gpa(big + 0x1008)),
        Err(Exit::Error(Error::InvalidRange {
            start: max + 1,
            end: max + 2,
        }))
    );
    assert_eq!(
        snapshot(&vm),
        before,
        "an access beyond the width changed the VM"
    );
    audit(&vm);

    // Valid edge cases still work: the last gfn, and a slot that ends at the width.
    let flushes = vm.stats().remote_tlb_flushes;
    vm.zap_gfn_range(Gfn(max - 1), Gfn(max)).unwrap();
    assert_eq!(vm.stats().remote_tlb_flushes, flushes);
    audit(&vm);

    // The generation did not move: the MMIO SPTE is still recognised without a lookup.
    let st0 = vm.stats();
    access_mmio(&vm, &mut vcpu, mmio_gpa, AccessKind::Write);
    let st = vm.stats();
    assert_eq!(st.fast_mmio_exits - st0.fast_mmio_exits, 1);
    assert_eq!(st.mmu.mmio_faults, st0.mmu.mmio_faults);

    // A third slot fits; a fourth is one too many; a slot may end exactly at the width.
    add_slot(
        &vm,
        SlotSpec {
            id: 2,
            gpa: big - 2 * M1,
            size: 2 * M1,
            hva: h2,
            flags: none,
        },
    );
    check(
        "too many",
        &|| set(r(3, 4 * G1, K4, h2)),
        Error::TooManySlots { max: 3 },
    );
    // Deleting then re-creating stays within the limit.
    set(r(2, 0, 0, 0)).unwrap();
    audit(&vm);

    // vCPU limit.
    let _v2 = vm.create_vcpu().unwrap();
    assert_eq!(vm.create_vcpu().err(), Some(Error::TooManyVcpus { max: 2 }));

    // The mapped pages still translate, without exits.
    let exits0 = vcpu.exits;
    map_slot(&vm, &host, &mut vcpu, &s0);
    assert_eq!(vcpu.exits, exits0);
    audit(&vm);
}

/// The CPU model must not let a gpa beyond the guest-physical width reach memory. A
/// 4-level walk only looks at gpa bits 12..48, so without a check gpa 2^48 + X walks to
/// the leaf of X.
#[test]
fn access_beyond_the_guest_physical_width_is_rejected() {
    let (host, vm) = new_vm(VmConfig::default());
    let h = mmap(&host, 2 * M1, Backing::Page4K);
    let s = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 2 * M1,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    );
    let mut vcpu = vm.create_vcpu().unwrap();
    access_ok(&vm, &mut vcpu, &host, &s, G1 + 0x10, AccessKind::Read);
    let before = snapshot(&vm);
    // Unmapped alias first: the fault path rejects it.
    let got = vm.read(&mut vcpu, Gpa((1 << 48) + G1 + M1));
    assert!(
        matches!(got, Err(Exit::Error(Error::InvalidRange { .. }))),
        "got {got:?}"
    );
    // Aliasing a mapped page: must not return G1's host page.
    let got = vm.read(&mut vcpu, Gpa((1 << 48) + G1 + 0x10));
    assert!(
        matches!(got, Err(Exit::Error(Error::InvalidRange { .. }))),
        "gpa 2^48 + {G1:#x} reached memory through the leaf of {G1:#x}: {got:?}"
    );
    assert_eq!(snapshot(&vm).leaves.len(), before.leaves.len());
    audit(&vm);
}

/// A 1 GiB hugetlb slot mapped by one 1G leaf, moved while mapped: to another 1 GiB-aligned
/// gpa (1G again), to a gpa that is only 2 MiB-aligned (2M leaves), then deleted.
#[test]
fn move_and_delete_a_1g_mapped_slot() {
    let (host, vm) = new_vm(VmConfig::default());
    let h = mmap(&host, G1, Backing::HugeTlb1G);
    let mut s = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: 4 * G1,
            size: G1,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    );
    let mut vcpu = vm.create_vcpu().unwrap();
    let probe: Vec<u64> = (0..64).map(|i| i * (G1 / 64) + i * 0x1008).collect();
    let touch = |vcpu: &mut Vcpu, s: &SlotSpec| -> Vec<Hpa> {
        probe
            .iter()
            .map(|&off| access_ok(&vm, vcpu, &host, s, s.gpa + off, AccessKind::Write))
            .collect()
    };
    let hpas = touch(&mut vcpu, &s);
    assert_eq!(levels_in(&vm, &s), [0, 0, 1]);
    for (to, want) in [
        (6 * G1, [0, 0, 1]),
        (8 * G1 + 2 * M2, [0, 64, 0]),
        (4 * G1, [0, 0, 1]),
    ] {
        let old = s;
        s.gpa = to;
        vm.set_user_memory_region(s.region()).unwrap();
        audit(&vm);
        access_mmio(&vm, &mut vcpu, old.gpa + 0x10, AccessKind::Read);
        // An unaligned slot over a 1 GiB page cannot cover the page's last 2 MiB with a
        // huge leaf; the probes all fall below that.
        assert_eq!(touch(&mut vcpu, &s), hpas, "moved to {to:#x}");
        assert_eq!(levels_in(&vm, &s), want, "levels after moving to {to:#x}");
        audit(&vm);
        check_leaves_against_host(&vm, &host);
    }
    vm.set_user_memory_region(region(0, 0, 0, 0, MemslotFlags::empty()))
        .unwrap();
    access_mmio(&vm, &mut vcpu, 4 * G1, AccessKind::Write);
    assert_eq!(audit(&vm).leaves, 0);
}

/// The MMU builds 4-level tables, which translate 48 bits of gpa. A configuration that
/// allows wider gpas must either be refused, refuse slots above 2^48, or translate them
/// correctly; it must not let a slot at 2^48 + X share table entries with a slot at X.
#[test]
fn gpa_width_above_48_bits_does_not_alias() {
    let limits = MemslotLimits {
        gpa_bits: 52,
        ..MemslotLimits::default()
    };
    let config = VmConfig {
        limits,
        ..VmConfig::default()
    };
    let host = std::sync::Arc::new(SimHostMemory::new());
    let Ok(vm) = vmmu::Vm::with_allocator(
        config,
        host.clone(),
        std::sync::Arc::new(vmmu::table::HeapTableAllocator::new()),
    ) else {
        return; // Refusing the configuration is a fine answer.
    };
    let low = SlotSpec {
        id: 0,
        gpa: G1,
        size: 2 * M1,
        hva: mmap(&host, 2 * M1, Backing::Page4K),
        flags: MemslotFlags::empty(),
    };
    let high = SlotSpec {
        id: 1,
        gpa: (1 << 48) + G1,
        ..low
    };
    let high = SlotSpec {
        hva: mmap(&host, 2 * M1, Backing::Page4K),
        ..high
    };
    vm.set_user_memory_region(low.region()).unwrap();
    if vm.set_user_memory_region(high.region()).is_err() {
        return; // Refusing slots the tables cannot map is a fine answer too.
    }
    let mut vcpu = vm.create_vcpu().unwrap();
    let want_low = expected_hpa(&host, &low, low.gpa);
    let want_high = expected_hpa(&host, &high, high.gpa);
    assert_eq!(vm.read(&mut vcpu, Gpa(low.gpa)), Ok(want_low));
    assert_eq!(
        vm.read(&mut vcpu, Gpa(high.gpa)),
        Ok(want_high),
        "gpa 2^48 + {G1:#x} translated through the tables of {G1:#x}"
    );
    vm.audit().unwrap();
}
