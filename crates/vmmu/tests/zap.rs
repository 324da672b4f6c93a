//! Zapping ranges of mapped memory: exactly the leaves that intersect the range go (huge
//! pages cut by the range go whole), the flush is counted, emptied tables are freed, and
//! the guest faults the pages back in with the host's translations.
//!
//! Emptied tables: the shadow MMU frees a table when its last entry goes; the TDP MMU,
//! as KVM's `tdp_mmu_zap_leafs`, keeps them until a zap of the whole root, and frees
//! unlinked tables through the epoch collector once no walker can see them.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use vmmu::host::{Backing, SimHostMemory};
use vmmu::spte::{Spte, SpteFormat};
use vmmu::types::{AccessKind, Gfn, Gpa, Level, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{Algorithms, MemslotFlags, RmapDrop, VmConfig};

/// Whether the leaf (first gfn, level) maps any gfn in `[start, end)`.
fn intersects(gfn: u64, level: Level, start: u64, end: u64) -> bool {
    gfn < end && start < gfn + level.pages()
}

/// Zap `[start, end)` and check exactly the intersecting leaves went, the counters, the
/// flush and the audit. Returns the leaves zapped.
fn zap_and_check(
    vm: &TestVm,
    host: &SimHostMemory,
    start: u64,
    end: u64,
) -> BTreeMap<(u64, Level), Spte> {
    let before = leaves(vm);
    let stats0 = vm.stats();
    vm.zap_gfn_range(Gfn(start), Gfn(end)).unwrap();
    let after = leaves(vm);
    let (gone, kept): (BTreeMap<_, _>, BTreeMap<_, _>) = before
        .into_iter()
        .partition(|&((g, l), _)| intersects(g, l, start, end));
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        kept.keys().collect::<Vec<_>>(),
        "zap [{start:#x}, {end:#x}) left the wrong leaves"
    );
    for (k, spte) in &after {
        // A/D bits may not change without guest accesses; nothing else may either.
        assert_eq!(kept[k], *spte, "zap changed a leaf it should keep");
    }
    let stats = vm.stats();
    if !is_tdp(vm) {
        // The shadow MMU counts the leaves it zaps (the TDP MMU keeps no such counter).
        assert_eq!(
            stats.mmu.leaves_zapped - stats0.mmu.leaves_zapped,
            gone.len() as u64
        );
    }
    assert_eq!(
        stats.remote_tlb_flushes - stats0.remote_tlb_flushes,
        u64::from(!gone.is_empty()),
        "a zap flushes iff it removed something"
    );
    let rep = audit(vm);
    assert_eq!(rep.leaves, after.len());
    check_leaves_against_host(vm, host);
    gone
}

/// Access `gpas`; check translations and that the number of exits is the number of
/// distinct leaves that were missing.
fn reaccess(vm: &TestVm, host: &SimHostMemory, vcpu: &mut Vcpu, specs: &[SlotSpec], gpas: &[u64]) {
    let present: BTreeSet<_> = leaves(vm).into_keys().collect();
    let mut missing = BTreeSet::new();
    let exits0 = vcpu.exits;
    for (n, &gpa) in gpas.iter().enumerate() {
        let spec = specs
            .iter()
            .find(|s| s.contains_gpa(gpa))
            .expect("gpa in a slot");
        let level = expected_level(host, spec, gpa, Level::L1G);
        let key = ((gpa & !(level.bytes() - 1)) / PAGE_SIZE, level);
        if !present.contains(&key) {
            missing.insert(key);
        }
        access_ok(vm, vcpu, host, spec, gpa, kind_for(n as u64));
    }
    assert_eq!(
        vcpu.exits - exits0,
        missing.len() as u64,
        "exits after zap != leaves zapped and touched"
    );
    audit(vm);
}

fn all_pages(specs: &[SlotSpec]) -> Vec<u64> {
    specs
        .iter()
        .flat_map(|s| (0..s.pages()).map(move |i| s.page_gpa(i) + 0x10))
        .collect()
}

/// 0: 16 MiB THP, 2M leaves; 1: THP starting 1 MiB into a 2 MiB page; 2: 8 MiB of 4K
/// pages; 3: incongruent THP (4K leaves); 4: 1 GiB hugetlb (one 1G leaf), or with
/// `small`, 64 MiB of hugetlb at a 1 GiB-aligned gpa (2M leaves; its metadata is small, so
/// the audit after every step stays fast).
fn setup_with(host: &SimHostMemory, vm: &TestVm, small: bool) -> Vec<SlotSpec> {
    let none = MemslotFlags::empty();
    let h0 = mmap(host, 16 * M1, Backing::Thp);
    let h1 = mmap(host, 8 * M1, Backing::Thp);
    let h2 = mmap(host, 8 * M1, Backing::Page4K);
    let h3 = mmap(host, 4 * M1, Backing::Thp);
    let h4 = mmap(host, G1, Backing::HugeTlb1G);
    [
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 16 * M1,
            hva: h0,
            flags: none,
        },
        SlotSpec {
            id: 1,
            gpa: G1 + 16 * M1 + M1,
            size: 7 * M1,
            hva: h1 + M1,
            flags: none,
        },
        SlotSpec {
            id: 2,
            gpa: G1 + 32 * M1,
            size: 8 * M1,
            hva: h2,
            flags: none,
        },
        SlotSpec {
            id: 3,
            gpa: G1 + 48 * M1,
            size: 2 * M1,
            hva: h3 + 8 * K4,
            flags: none,
        },
        SlotSpec {
            id: 4,
            gpa: 2 * G1,
            size: if small { 64 * M1 } else { G1 },
            hva: h4,
            flags: none,
        },
    ]
    .into_iter()
    .map(|s| add_slot(vm, s))
    .collect()
}

fn setup(host: &SimHostMemory, vm: &TestVm) -> Vec<SlotSpec> {
    setup_with(host, vm, false)
}

/// Map the small slots fully and the 1 GiB slot through a few pages (one leaf anyway).
fn map_everything(vm: &TestVm, host: &SimHostMemory, vcpu: &mut Vcpu, specs: &[SlotSpec]) {
    let mut gpas = all_pages(&specs[..4]);
    gpas.extend((0..64).map(|i| specs[4].gpa + i * (specs[4].size / 64) + 0x20));
    reaccess(vm, host, vcpu, specs, &gpas);
}

#[test]
fn zap_cutting_a_huge_page_zaps_it_whole() {
    zap_cutting_a_huge_page_zaps_it_whole_with(VmConfig::default());
}

fn zap_cutting_a_huge_page_zaps_it_whole_with(config: VmConfig) {
    let (host, vm) = new_vm(config);
    let specs = setup(&host, &vm);
    let mut vcpu = vm.create_vcpu().unwrap();
    map_everything(&vm, &host, &mut vcpu, &specs);
    let pages0 = table_count(&vm);
    // 44 pages in the middle of the second 2M page of slot 0.
    let start = specs[0].base_gfn().0 + 512 + 256;
    let gone = zap_and_check(&vm, &host, start, start + 44);
    assert_eq!(
        gone.keys().copied().collect::<Vec<_>>(),
        vec![(specs[0].base_gfn().0 + 512, Level::L2M)]
    );
    assert_eq!(
        table_count(&vm),
        pages0,
        "the 2M table still holds other leaves"
    );
    // One page of the 1 GiB leaf.
    let start = specs[4].base_gfn().0 + 12345;
    let gone = zap_and_check(&vm, &host, start, start + 1);
    assert_eq!(
        gone.keys().copied().collect::<Vec<_>>(),
        vec![(specs[4].base_gfn().0, Level::L1G)]
    );
    // The whole guest comes back with two faults.
    let exits0 = vcpu.exits;
    map_everything(&vm, &host, &mut vcpu, &specs);
    assert_eq!(vcpu.exits - exits0, 2);
}

#[test]
fn zaps_across_slot_edges_and_gaps() {
    zaps_across_slot_edges_and_gaps_with(VmConfig::default());
}

fn zaps_across_slot_edges_and_gaps_with(config: VmConfig) {
    let (host, vm) = new_vm(config);
    let specs = setup(&host, &vm);
    let mut vcpu = vm.create_vcpu().unwrap();
    map_everything(&vm, &host, &mut vcpu, &specs);
    let s0 = &specs[0];
    let s1 = &specs[1];
    // From the last page of slot 0, across the 1 MiB gap, into the first 2M page of slot 1
    // (which slot 1 maps at 4K: its first 1 MiB is an unaligned edge).
    let gone = zap_and_check(&vm, &host, s0.end_gfn().0 - 1, s1.base_gfn().0 + 200);
    assert_eq!(gone.iter().filter(|(k, _)| k.1 == Level::L2M).count(), 1);
    assert_eq!(gone.iter().filter(|(k, _)| k.1 == Level::L4K).count(), 200);
    // From the 4K tail of slot 1 into the 4K slot 2; cutting the last 2M leaf of slot 1.
    let gone = zap_and_check(&vm, &host, s1.end_gfn().0 - 400, specs[2].base_gfn().0 + 7);
    assert_eq!(
        gone.len(),
        1 + 7,
        "one 2M leaf of slot 1 and 7 pages of slot 2"
    );
    // Only the gap: nothing mapped there, no flush.
    let flushes = vm.stats().remote_tlb_flushes;
    let gone = zap_and_check(&vm, &host, s0.end_gfn().0, s1.base_gfn().0);
    assert!(gone.is_empty());
    assert_eq!(vm.stats().remote_tlb_flushes, flushes);
    // A range below every slot, and one above.
    assert!(zap_and_check(&vm, &host, 0, s0.base_gfn().0).is_empty());
    assert!(zap_and_check(&vm, &host, specs[4].end_gfn().0, 1 << 36).is_empty());
    // Exactly one 4K page at each edge of the incongruent slot.
    let s3 = &specs[3];
    assert_eq!(
        zap_and_check(&vm, &host, s3.base_gfn().0, s3.base_gfn().0 + 1).len(),
        1
    );
    assert_eq!(
        zap_and_check(&vm, &host, s3.end_gfn().0 - 1, s3.end_gfn().0).len(),
        1
    );
    map_everything(&vm, &host, &mut vcpu, &specs);
}

#[test]
fn random_zaps_then_reaccess() {
    random_zaps_then_reaccess_with(VmConfig::default());
}

fn random_zaps_then_reaccess_with(config: VmConfig) {
    let (host, vm) = new_vm(config);
    let specs = setup_with(&host, &vm, true);
    let mut vcpu = vm.create_vcpu().unwrap();
    map_everything(&vm, &host, &mut vcpu, &specs);
    let mut rng = Rng::new(0x05ee_d2a9);
    let lo = specs[0].base_gfn().0 - 1024;
    let hi = specs[3].end_gfn().0 + 1024;
    let small: Vec<u64> = all_pages(&specs[..4]);
    for round in 0..60 {
        let start = if round % 5 == 4 {
            // Sometimes inside the hugetlb slot (2M leaves).
            specs[4].base_gfn().0 + rng.below(specs[4].pages())
        } else {
            lo + rng.below(hi - lo)
        };
        let len = match rng.below(4) {
            0 => 1,
            1 => 1 + rng.below(16),
            2 => 1 + rng.below(1024),
            _ => 1 + rng.below(8192),
        };
        zap_and_check(&vm, &host, start, start + len);
        let gpas: Vec<u64> = (0..300)
            .map(|_| small[rng.below(small.len() as u64) as usize] + rng.below(4096) / 8 * 8 - 0x10)
            .collect();
        reaccess(&vm, &host, &mut vcpu, &specs, &gpas);
    }
    map_everything(&vm, &host, &mut vcpu, &specs);
    check_leaves_against_host(&vm, &host);
}

/// Slot 0: 8 MiB of 4K host pages at gpa 1 GiB (four last-level tables).
fn slot_8m_4k(host: &SimHostMemory, vm: &TestVm) -> SlotSpec {
    let h = mmap(host, 8 * M1, Backing::Page4K);
    add_slot(
        vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 8 * M1,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    )
}

/// A 4K-backed 8 MiB slot at a 1 GiB-aligned gpa uses root + 1G table + 2M table + four
/// 4K tables. Zapping exactly one table's 512 pages frees that table; zapping a part of a
/// table frees nothing; zapping the rest frees everything up to the root.
#[test]
fn emptied_tables_are_freed_up_to_the_root() {
    emptied_tables_are_freed_up_to_the_root_with(VmConfig::default());
}

fn emptied_tables_are_freed_up_to_the_root_with(config: VmConfig) {
    let (host, vm) = new_vm(config);
    let spec = slot_8m_4k(&host, &vm);
    let mut vcpu = vm.create_vcpu().unwrap();
    reaccess(&vm, &host, &mut vcpu, &[spec], &all_pages(&[spec]));
    assert_eq!(table_count(&vm), 7);
    assert_eq!(vm.allocator().live(), 7);
    let b = spec.base_gfn().0;
    if is_tdp(&vm) {
        // The TDP MMU keeps emptied tables after a leaf zap (as KVM's does): every zap
        // below leaves all seven; zap_all takes them, freed once the epoch has passed.
        for (lo, hi) in [(512, 1024), (0, 511), (511, 512), (1024, 2048)] {
            zap_and_check(&vm, &host, b + lo, b + hi);
            assert_eq!(table_count(&vm), 7, "a leaf zap freed a table");
        }
        let rep = audit(&vm);
        assert_eq!((rep.leaves, rep.nonleaves), (0, 6));
        assert_eq!(settle_tables(&vm), 7);
        vm.zap_all().unwrap();
        assert_eq!(table_count(&vm), 1);
        assert_eq!(settle_tables(&vm), 1);
        reaccess(&vm, &host, &mut vcpu, &[spec], &all_pages(&[spec]));
        assert_eq!(table_count(&vm), 7);
        assert_eq!(settle_tables(&vm), 7);
        return;
    }
    let freed0 = vm.stats().mmu.pages_freed;
    zap_and_check(&vm, &host, b + 512, b + 1024);
    assert_eq!(vm.stats().shadow_pages, 6);
    assert_eq!(vm.stats().mmu.pages_freed - freed0, 1);
    zap_and_check(&vm, &host, b, b + 511);
    assert_eq!(
        vm.stats().shadow_pages,
        6,
        "a table with one leaf left stays"
    );
    zap_and_check(&vm, &host, b + 511, b + 512);
    assert_eq!(vm.stats().shadow_pages, 5);
    zap_and_check(&vm, &host, b + 1024, b + 2048);
    assert_eq!(
        vm.stats().shadow_pages,
        1,
        "the cascade frees the 2M and 1G tables too"
    );
    assert_eq!(vm.allocator().live(), 1);
    assert_eq!(vm.stats().rmap_descs, 0);
    let rep = audit(&vm);
    assert_eq!((rep.pages, rep.leaves, rep.nonleaves), (1, 0, 0));
    reaccess(&vm, &host, &mut vcpu, &[spec], &all_pages(&[spec]));
    assert_eq!(vm.stats().shadow_pages, 7);
}

#[test]
fn zapping_everything_leaves_only_the_root() {
    zapping_everything_leaves_only_the_root_with(VmConfig::default());
}

fn zapping_everything_leaves_only_the_root_with(config: VmConfig) {
    let (host, vm) = new_vm(config);
    let specs = setup(&host, &vm);
    let mut vcpu = vm.create_vcpu().unwrap();
    // Nothing mapped. The shadow MMU has freed every table but the root; the TDP MMU
    // keeps the tables a leaf zap emptied (its `empty_tables` argument says whether only
    // the root may be left, as after a zap_all).
    let check_empty = |vm: &TestVm, root_only: bool| {
        assert!(leaves(vm).is_empty() && table_leaves(vm).is_empty());
        if is_tdp(vm) {
            let rep = audit(vm);
            assert_eq!(rep.leaves, 0);
            if root_only {
                assert_eq!(table_count(vm), 1, "only the root remains");
            }
            settle_tables(vm);
            return;
        }
        let st = vm.stats();
        assert_eq!(st.shadow_pages, 1, "only the root remains");
        assert_eq!(st.rmap_descs, 0, "descriptor pool empty");
        assert_eq!(vm.with_mmu(|_, m| m.pool().in_use()), 0);
        assert_eq!(vm.allocator().live(), 1);
        let rep = audit(vm);
        assert_eq!(
            (rep.pages, rep.leaves, rep.nonleaves, rep.rmap_entries),
            (1, 0, 0, 0)
        );
    };

    map_everything(&vm, &host, &mut vcpu, &specs);
    let n = leaves(&vm).len() as u64;
    let pages = table_count(&vm) as u64;
    let st0 = vm.stats();
    // 1. One range over the whole guest-physical space.
    zap_and_check(&vm, &host, 0, 1 << 36);
    check_empty(&vm, false);
    if is_tdp(&vm) {
        assert_eq!(table_count(&vm) as u64, pages, "a leaf zap freed a table");
    } else {
        assert_eq!(vm.stats().mmu.pages_freed - st0.mmu.pages_freed, pages - 1);
    }
    let exits0 = vcpu.exits;
    map_everything(&vm, &host, &mut vcpu, &specs);
    assert_eq!(vcpu.exits - exits0, n, "every leaf faults back in");

    // 2. zap_all.
    let st0 = vm.stats();
    vm.zap_all().unwrap();
    check_empty(&vm, true);
    if !is_tdp(&vm) {
        assert_eq!(vm.stats().mmu.leaves_zapped - st0.mmu.leaves_zapped, n);
    }
    assert_eq!(vm.stats().remote_tlb_flushes - st0.remote_tlb_flushes, 1);
    map_everything(&vm, &host, &mut vcpu, &specs);

    // 3. Slot by slot: each zap removes that slot's leaves only.
    for (k, spec) in specs.iter().enumerate() {
        let before = leaves(&vm);
        vm.zap_memslot(spec.id).unwrap();
        let after = leaves(&vm);
        for (&(g, l), _) in before.iter() {
            let inside = g >= spec.base_gfn().0 && g < spec.end_gfn().0;
            assert_eq!(
                after.contains_key(&(g, l)),
                !inside,
                "zap_memslot({}) and leaf {g:#x}",
                spec.id
            );
        }
        audit(&vm);
        if k + 1 < specs.len() {
            assert!(table_count(&vm) > 1);
        }
    }
    check_empty(&vm, false);
    map_everything(&vm, &host, &mut vcpu, &specs);
    // 4. zap_all with nothing mapped: no leaves, so no flush is needed.
    vm.zap_all().unwrap();
    check_empty(&vm, true);
    if is_tdp(&vm) {
        // A leaf zap keeps the tables it empties; the fast zap (new root, vCPUs reload)
        // frees the old root's tables once the vCPU has moved.
        access_ok(
            &vm,
            &mut vcpu,
            &host,
            &specs[0],
            specs[0].gpa,
            AccessKind::Read,
        );
        vm.zap_gfn_range(Gfn(0), Gfn(1 << 36)).unwrap();
        assert_eq!(
            settle_tables(&vm),
            3,
            "the root and the two tables over one 2M leaf"
        );
        vm.zap_all_fast().unwrap();
        assert_eq!(table_count(&vm), 1);
        access_ok(
            &vm,
            &mut vcpu,
            &host,
            &specs[0],
            specs[0].gpa,
            AccessKind::Read,
        );
        assert_eq!(settle_tables(&vm), 3, "the old root was freed");
        vm.zap_all().unwrap();
    }
    let flushes = vm.stats().remote_tlb_flushes;
    vm.zap_all().unwrap();
    vm.zap_gfn_range(Gfn(0), Gfn(1 << 36)).unwrap();
    check_empty(&vm, true);
    assert_eq!(
        vm.stats().remote_tlb_flushes,
        flushes,
        "zapping nothing flushed"
    );
}

/// A write-mapped page keeps its D bit through a zap of other pages, and a refault after a
/// zap installs a fresh leaf (A set, D set only by a write).
#[test]
fn refault_after_zap_installs_fresh_leaves() {
    let (host, vm) = new_vm(VmConfig::default());
    let h = mmap(&host, 4 * M1, Backing::Page4K);
    let spec = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 4 * M1,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    );
    let mut vcpu = vm.create_vcpu().unwrap();
    let (p, q) = (spec.gpa, spec.gpa + 5 * K4);
    access_ok(&vm, &mut vcpu, &host, &spec, p, AccessKind::Write);
    access_ok(&vm, &mut vcpu, &host, &spec, q, AccessKind::Read);
    let leaf = |gpa: u64| leaf_of(&vm, Gpa(gpa).gfn()).unwrap().2;
    const EPT: SpteFormat = SpteFormat::EPT; // the tests' MMUs are EPT ones
    assert!(EPT.is_dirty(leaf(p)) && EPT.is_accessed(leaf(p)));
    assert!(!EPT.is_dirty(leaf(q)) && EPT.is_accessed(leaf(q)));
    zap_and_check(&vm, &host, Gpa(q).gfn().0, Gpa(q).gfn().0 + 1);
    assert!(
        EPT.is_dirty(leaf(p)),
        "zap of another page touched this one"
    );
    assert!(leaf_of(&vm, Gpa(q).gfn()).is_none());
    access_ok(&vm, &mut vcpu, &host, &spec, q, AccessKind::Write);
    assert!(EPT.is_dirty(leaf(q)) && leaf(q).is_writable());
    audit(&vm);
}

/// The pre-seed-003 way of dropping reverse maps (one SPTE at a time through the full
/// `drop_spte` path) must zap exactly the same leaves, with the same counters.
fn one_by_one() -> VmConfig {
    // (The shadow MMU's algorithm: under the TDP MMU these would repeat the tests above.)
    VmConfig {
        algorithms: Algorithms {
            rmap_drop: RmapDrop::OneByOne,
            ..Algorithms::default()
        },
        ..VmConfig::default()
    }
}

const ONE_BY_ONE: &str =
    "RmapDrop::OneByOne is how the shadow MMU drops reverse maps; the TDP MMU has none";

#[test]
fn one_by_one_zap_cutting_a_huge_page_zaps_it_whole() {
    if shadow_only(ONE_BY_ONE) {
        return;
    }
    zap_cutting_a_huge_page_zaps_it_whole_with(one_by_one());
}

#[test]
fn one_by_one_zaps_across_slot_edges_and_gaps() {
    if shadow_only(ONE_BY_ONE) {
        return;
    }
    zaps_across_slot_edges_and_gaps_with(one_by_one());
}

#[test]
fn one_by_one_random_zaps_then_reaccess() {
    if shadow_only(ONE_BY_ONE) {
        return;
    }
    random_zaps_then_reaccess_with(one_by_one());
}

#[test]
fn one_by_one_emptied_tables_are_freed_up_to_the_root() {
    if shadow_only(ONE_BY_ONE) {
        return;
    }
    emptied_tables_are_freed_up_to_the_root_with(one_by_one());
}

#[test]
fn one_by_one_zapping_everything_leaves_only_the_root() {
    if shadow_only(ONE_BY_ONE) {
        return;
    }
    zapping_everything_leaves_only_the_root_with(one_by_one());
}

/// The shadow MMU zaps a range mapping many more 4 KiB leaves than there are shadow pages
/// by visiting the last-level pages instead of the reverse maps: tables wholly inside in
/// one pass, tables across the range's edges leaf by leaf, and a table holding an MMIO
/// entry leaf by leaf too (its MMIO entry stays, as in any zap). Every zap leaves exactly
/// what `zap_and_check` expects of any zap; a small range still goes by reverse maps.
#[test]
fn large_ranges_are_zapped_by_visiting_pages() {
    let (host, vm) = new_vm(VmConfig::default());
    let tdp = is_tdp(&vm);
    let mut vcpu = vm.create_vcpu().unwrap();
    // An MMIO entry in what becomes the slot's third table: read while no slot covers it.
    let mmio = G1 + 2 * M2 + 5 * K4;
    access_mmio(&vm, &mut vcpu, mmio, AccessKind::Read);
    let spec = slot_8m_4k(&host, &vm);
    let others: Vec<u64> = all_pages(&[spec])
        .into_iter()
        .filter(|&g| g / K4 != mmio / K4)
        .collect();
    reaccess(&vm, &host, &mut vcpu, &[spec], &others);
    assert_eq!(audit(&vm).mmio, 1);
    let by_pages = |vm: &TestVm| vm.stats().mmu.leaves_zapped_by_pages;
    let b = spec.base_gfn().0;

    // One leaf: through its reverse map.
    let n0 = by_pages(&vm);
    assert_eq!(zap_and_check(&vm, &host, b + 3, b + 4).len(), 1);
    assert_eq!(by_pages(&vm), n0);

    // Most of the slot: the first and last tables cut by the range, the second whole, the
    // third whole but for its MMIO entry.
    let gone = zap_and_check(&vm, &host, b + 100, b + 2000);
    assert_eq!(
        gone.len(),
        1900 - 1,
        "every leaf in range; the MMIO entry is none"
    );
    assert_eq!(audit(&vm).mmio, 1, "a zap leaves MMIO entries");
    if !tdp {
        assert_eq!(by_pages(&vm) - n0, gone.len() as u64);
    }

    // Everything mapped again (the old MMIO entry replaced by a leaf), then the whole slot:
    // four whole tables, and every table up to the root freed.
    reaccess(&vm, &host, &mut vcpu, &[spec], &all_pages(&[spec]));
    assert_eq!(audit(&vm).mmio, 0);
    let n1 = by_pages(&vm);
    assert_eq!(zap_and_check(&vm, &host, b, b + 2048).len(), 2048);
    if !tdp {
        assert_eq!(by_pages(&vm) - n1, 2048);
        assert_eq!(vm.stats().shadow_pages, 1, "only the root is left");
        assert_eq!(vm.allocator().live(), 1);
    }
    reaccess(&vm, &host, &mut vcpu, &[spec], &all_pages(&[spec]));
}
