//! Map every page of several memslots, at each host backing (4 KiB, THP, 1 GiB hugetlb),
//! through the CPU model; check every translation against the host, the level each page
//! is mapped at, the fault counts, and the audit after every slot.

mod common;

use std::collections::BTreeSet;

use common::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gpa, Level, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{Exit, MemslotFlags, VmConfig};

/// Map every page of `specs` (in order), checking each translation, the audit after each
/// slot, and that exactly one fault per expected leaf happened. Returns the expected
/// leaves as (first gfn, level). With `stride` > 1 only every `stride`-th page (plus the
/// first and last pages of the slot) is touched.
fn map_all(
    vm: &TestVm,
    host: &vmmu::host::SimHostMemory,
    vcpu: &mut Vcpu,
    specs: &[SlotSpec],
    max_level: Level,
    stride: u64,
) -> BTreeSet<(u64, Level)> {
    let exits0 = vcpu.exits;
    let stats0 = vm.stats();
    let before: BTreeSet<_> = leaves(vm).into_keys().collect();
    let mut want = BTreeSet::new();
    for spec in specs {
        let n = spec.pages();
        let mut i = 0;
        while i < n {
            // A different offset in each page, so the page offset is checked too.
            let gpa = spec.page_gpa(i) + (i * 8) % PAGE_SIZE;
            let kind = kind_for(i);
            access_ok(vm, vcpu, host, spec, gpa, kind);
            let level = expected_level(host, spec, gpa, max_level);
            want.insert(((gpa & !(level.bytes() - 1)) / PAGE_SIZE, level));
            i = if i + stride >= n && i != n - 1 {
                n - 1
            } else {
                i + stride
            };
        }
        audit(vm);
    }
    let got: BTreeSet<_> = leaves(vm).into_keys().collect();
    let all: BTreeSet<_> = before.union(&want).copied().collect();
    assert_eq!(got, all, "leaves differ from the expected mapping levels");
    let faults = want.difference(&before).count() as u64;
    assert_eq!(vcpu.exits - exits0, faults, "one exit per leaf mapped");
    let stats = vm.stats();
    if !is_tdp(vm) {
        // The shadow MMU counts its faults; the TDP MMU's fault path, run in parallel,
        // touches no shared counter: the vCPU's exits above count them there.
        assert_eq!(stats.mmu.faults - stats0.mmu.faults, faults);
        assert_eq!(
            stats.mmu.leaves_installed - stats0.mmu.leaves_installed,
            faults
        );
        assert_eq!(stats.mmu.mmio_faults, stats0.mmu.mmio_faults);
    }
    assert_eq!(stats.mmu.spurious_faults, stats0.mmu.spurious_faults);
    check_leaves_against_host(vm, host);
    let rep = audit(vm);
    assert_eq!(rep.leaves, all.len());
    if !is_tdp(vm) {
        assert_eq!(rep.rmap_entries, all.len());
    }
    want
}

/// Touch every page again (writes): everything is mapped, so no exit, same translations.
fn remap_is_free(
    vm: &TestVm,
    host: &vmmu::host::SimHostMemory,
    vcpu: &mut Vcpu,
    specs: &[SlotSpec],
    stride: u64,
) {
    let exits0 = vcpu.exits;
    let faults0 = vm.stats().mmu.faults;
    for spec in specs {
        let mut i = 0;
        while i < spec.pages() {
            access_ok(
                vm,
                vcpu,
                host,
                spec,
                spec.page_gpa(i) + 0xff8,
                AccessKind::Write,
            );
            i += stride;
        }
    }
    assert_eq!(vcpu.exits, exits0, "second pass over mapped pages exited");
    assert_eq!(vm.stats().mmu.faults, faults0);
    audit(vm);
}

/// Just past the end and just before the start of each slot: MMIO (when not in another
/// slot).
fn edges_are_mmio(vm: &TestVm, vcpu: &mut Vcpu, specs: &[SlotSpec]) {
    for spec in specs {
        for gpa in [spec.gpa + spec.size, spec.gpa.wrapping_sub(PAGE_SIZE)] {
            if specs.iter().any(|s| s.contains_gpa(gpa)) || gpa == u64::MAX - PAGE_SIZE + 1 {
                continue;
            }
            access_mmio(vm, vcpu, gpa, AccessKind::Read);
            access_mmio(vm, vcpu, gpa + 8, AccessKind::Write);
        }
    }
    audit(vm);
}

fn count_levels(set: &BTreeSet<(u64, Level)>, spec: &SlotSpec) -> [usize; 3] {
    let mut c = [0; 3];
    for &(gfn, level) in set {
        if gfn >= spec.base_gfn().0 && gfn < spec.end_gfn().0 {
            c[level.leaf_index()] += 1;
        }
    }
    c
}

/// Slots of different sizes and alignments over THP (or 4K) host memory:
/// 0: 16 MiB, 2M-aligned, congruent; 1: starts 1 MiB into a 2 MiB page, ends mid-page;
/// 2: guest and host not congruent modulo 2 MiB; 3: three pages at an odd gpa; 4: over a
/// THP region whose last 1 MiB the host maps at 4K.
fn mixed_slots(host: &vmmu::host::SimHostMemory, backing: Backing) -> Vec<SlotSpec> {
    let none = MemslotFlags::empty();
    let h0 = mmap(host, 16 * M1, backing);
    let h1 = mmap(host, 8 * M1, backing);
    let h2 = mmap(host, 8 * M1, backing);
    let h3 = mmap(host, 64 * K4, backing);
    let h4 = mmap(host, 5 * M1, backing);
    vec![
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 16 * M1,
            hva: h0,
            flags: none,
        },
        SlotSpec {
            id: 1,
            gpa: G1 + 65 * M1,
            size: 6 * M1 + M1 / 2,
            hva: h1 + M1,
            flags: none,
        },
        SlotSpec {
            id: 2,
            gpa: 2 * G1,
            size: 6 * M1,
            hva: h2 + K4,
            flags: none,
        },
        SlotSpec {
            id: 7,
            gpa: 3 * G1 + 3 * K4,
            size: 3 * K4,
            hva: h3 + 5 * K4,
            flags: none,
        },
        SlotSpec {
            id: 9,
            gpa: 3 * G1 + 64 * M1,
            size: 5 * M1,
            hva: h4,
            flags: none,
        },
    ]
}

#[test]
fn thp_slots_map_every_page_at_the_expected_level() {
    let (host, vm) = new_vm(VmConfig::default());
    let specs: Vec<_> = mixed_slots(&host, Backing::Thp)
        .into_iter()
        .map(|s| add_slot(&vm, s))
        .collect();
    audit(&vm);
    let mut vcpu = vm.create_vcpu().unwrap();
    let want = map_all(&vm, &host, &mut vcpu, &specs, Level::L1G, 1);
    // The expectations above come from a model; pin the ones that matter by hand too.
    assert_eq!(
        count_levels(&want, &specs[0]),
        [0, 8, 0],
        "aligned THP slot maps 2M"
    );
    // [65M, 71.5M): 2M pages at 66M and 68M; 65-66M and 70-71.5M at 4K.
    assert_eq!(
        count_levels(&want, &specs[1]),
        [256 + 384, 2, 0],
        "unaligned edges map 4K"
    );
    assert_eq!(
        count_levels(&want, &specs[2]),
        [1536, 0, 0],
        "incongruent slot maps 4K"
    );
    assert_eq!(count_levels(&want, &specs[3]), [3, 0, 0]);
    assert_eq!(
        count_levels(&want, &specs[4]),
        [256, 2, 0],
        "host 4K tail maps 4K"
    );
    remap_is_free(&vm, &host, &mut vcpu, &specs, 1);
    edges_are_mmio(&vm, &mut vcpu, &specs);
}

#[test]
fn page4k_backing_maps_only_4k() {
    let (host, vm) = new_vm(VmConfig::default());
    let specs: Vec<_> = mixed_slots(&host, Backing::Page4K)
        .into_iter()
        .map(|s| add_slot(&vm, s))
        .collect();
    let mut vcpu = vm.create_vcpu().unwrap();
    let want = map_all(&vm, &host, &mut vcpu, &specs, Level::L1G, 1);
    let total: u64 = specs.iter().map(|s| s.pages()).sum();
    assert!(want.iter().all(|&(_, l)| l == Level::L4K));
    assert_eq!(want.len() as u64, total);
    remap_is_free(&vm, &host, &mut vcpu, &specs, 1);
    edges_are_mmio(&vm, &mut vcpu, &specs);
}

/// hugetlb: a 1 GiB-aligned 1 GiB slot maps one 1G leaf; a slot congruent modulo 2 MiB
/// only maps 2M; an incongruent one maps 4K; a 64 MiB slot at a 1 GiB-aligned gpa over a
/// 1 GiB page maps 2M (the 1G page would extend past the slot).
fn hugetlb_slots(host: &vmmu::host::SimHostMemory) -> Vec<SlotSpec> {
    let none = MemslotFlags::empty();
    let h0 = mmap(host, G1, Backing::HugeTlb1G);
    let h1 = mmap(host, G1, Backing::HugeTlb1G);
    let h2 = mmap(host, G1, Backing::HugeTlb1G);
    vec![
        SlotSpec {
            id: 0,
            gpa: 4 * G1,
            size: G1,
            hva: h0,
            flags: none,
        },
        SlotSpec {
            id: 1,
            gpa: 6 * G1 + M2,
            size: 8 * M1,
            hva: h1 + M2,
            flags: none,
        },
        SlotSpec {
            id: 2,
            gpa: 7 * G1,
            size: M2 + 3 * K4,
            hva: h1 + 64 * M1 + K4,
            flags: none,
        },
        SlotSpec {
            id: 3,
            gpa: 8 * G1,
            size: 64 * M1,
            hva: h2,
            flags: none,
        },
    ]
}

#[test]
fn hugetlb_slots_map_1g_2m_and_4k() {
    let (host, vm) = new_vm(VmConfig::default());
    let specs: Vec<_> = hugetlb_slots(&host)
        .into_iter()
        .map(|s| add_slot(&vm, s))
        .collect();
    let mut vcpu = vm.create_vcpu().unwrap();
    // Every page: the small slots first, then all 262,144 pages of the 1 GiB slot.
    let want = map_all(&vm, &host, &mut vcpu, &specs[1..], Level::L1G, 1);
    assert_eq!(count_levels(&want, &specs[1]), [0, 4, 0]);
    assert_eq!(count_levels(&want, &specs[2]), [515, 0, 0]);
    assert_eq!(count_levels(&want, &specs[3]), [0, 32, 0]);
    let want = map_all(&vm, &host, &mut vcpu, &specs[..1], Level::L1G, 1);
    assert_eq!(want, BTreeSet::from([((4 * G1) / PAGE_SIZE, Level::L1G)]));
    if is_tdp(&vm) {
        let (_, level, _) = leaf_of(&vm, Gpa(4 * G1 + 12345 * K4).gfn()).unwrap();
        assert_eq!(level, Level::L1G);
    } else {
        assert_eq!(
            vm.with_mmu(|s, m| m.rmap_entries(s, Gpa(4 * G1).gfn(), Level::L1G).len()),
            1
        );
    }
    remap_is_free(&vm, &host, &mut vcpu, &specs, 1);
    edges_are_mmio(&vm, &mut vcpu, &specs);
    assert_eq!(leaf_counts(&vm), [515, 36, 1]);
}

#[test]
fn max_level_4k_forces_4k_mappings() {
    let config = VmConfig {
        max_level: Level::L4K,
        ..VmConfig::default()
    };
    let (host, vm) = new_vm(config);
    let none = MemslotFlags::empty();
    let h_thp = mmap(&host, 16 * M1, Backing::Thp);
    let h_huge = mmap(&host, G1, Backing::HugeTlb1G);
    let specs = [
        add_slot(
            &vm,
            SlotSpec {
                id: 0,
                gpa: G1,
                size: 16 * M1,
                hva: h_thp,
                flags: none,
            },
        ),
        add_slot(
            &vm,
            SlotSpec {
                id: 1,
                gpa: 4 * G1,
                size: 32 * M1,
                hva: h_huge,
                flags: none,
            },
        ),
    ];
    let mut vcpu = vm.create_vcpu().unwrap();
    let want = map_all(&vm, &host, &mut vcpu, &specs, Level::L4K, 1);
    assert_eq!(want.len(), (48 * M1 / PAGE_SIZE) as usize);
    assert_eq!(leaf_counts(&vm), [12288, 0, 0]);
    remap_is_free(&vm, &host, &mut vcpu, &specs, 1);
}

#[test]
fn max_level_2m_caps_hugetlb_at_2m() {
    let config = VmConfig {
        max_level: Level::L2M,
        ..VmConfig::default()
    };
    let (host, vm) = new_vm(config);
    let h = mmap(&host, G1, Backing::HugeTlb1G);
    let spec = add_slot(
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
    let want = map_all(&vm, &host, &mut vcpu, &[spec], Level::L2M, 1);
    assert_eq!(want.len(), 512);
    assert_eq!(leaf_counts(&vm), [0, 512, 0]);
}

/// Several vCPUs see the same translations: the second vCPU finds every page mapped by
/// walking the shared tables (no exit, no new leaf).
#[test]
fn second_vcpu_shares_the_tables() {
    let (host, vm) = new_vm(VmConfig::default());
    let specs: Vec<_> = mixed_slots(&host, Backing::Thp)
        .into_iter()
        .map(|s| add_slot(&vm, s))
        .collect();
    let mut a = vm.create_vcpu().unwrap();
    let mut b = vm.create_vcpu().unwrap();
    map_all(&vm, &host, &mut a, &specs, Level::L1G, 1);
    let installed = vm.stats().mmu.leaves_installed;
    let tables = table_leaves(&vm);
    for spec in &specs {
        for i in 0..spec.pages() {
            let gpa = spec.page_gpa(i);
            let ha = vm.read(&mut a, Gpa(gpa)).unwrap();
            let hb = vm.write(&mut b, Gpa(gpa)).unwrap();
            assert_eq!(ha, hb);
            assert_eq!(hb, expected_hpa(&host, spec, gpa));
        }
    }
    assert_eq!(b.exits, 0, "vCPU b found every page mapped by the walk");
    assert_eq!(vm.stats().mmu.leaves_installed, installed);
    // Only the A/D bits the second vCPU's writes set may differ.
    let ad = vmmu::spte::bits::ACCESSED | vmmu::spte::bits::DIRTY;
    let strip = |m: std::collections::BTreeMap<(u64, Level), vmmu::spte::Spte>| {
        m.into_iter()
            .map(|(k, v)| (k, v.0 & !ad))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(table_leaves(&vm)),
        strip(tables),
        "b changed the tables"
    );
    audit(&vm);
}

/// A slot the host does not back: the access fails with the typed error, nothing is
/// mapped. A host read-only mapping: reads map, writes fail with HostReadOnly.
#[test]
fn host_errors_reach_the_vmm() {
    let (host, vm) = new_vm(VmConfig::default());
    let none = MemslotFlags::empty();
    // Unbacked: an hva nobody mapped.
    let unbacked = vmmu::host::SIM_HVA_BASE + 4096 * G1;
    vm.set_user_memory_region(region(0, G1, 4 * M1, unbacked, none))
        .unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    let before = snapshot(&vm);
    let got = vm.read(&mut vcpu, Gpa(G1 + 0x2010));
    assert_eq!(
        got,
        Err(Exit::Error(vmmu::Error::NoHostMapping {
            gpa: Gpa(G1 + 0x2010),
            hva: vmmu::types::Hva(unbacked + 0x2000)
        }))
    );
    let after = snapshot(&vm);
    assert_eq!(after.leaves, before.leaves);
    assert_eq!(
        after.stats.shadow_pages, before.stats.shadow_pages,
        "a failed fault built tables"
    );
    audit(&vm);

    let ro = host.mmap(4 * M1, Backing::Thp, false).unwrap().0;
    let spec = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 4 * M1,
            hva: ro,
            flags: none,
        },
    );
    let gpa = spec.gpa + 0x5000;
    access_ok(&vm, &mut vcpu, &host, &spec, gpa, AccessKind::Read);
    let (_, level, spte) = leaf_of(&vm, Gpa(gpa).gfn()).unwrap();
    assert_eq!(level, Level::L2M);
    assert!(!spte.is_writable() && !spte.is_host_writable());
    assert_eq!(
        vm.write(&mut vcpu, Gpa(gpa)),
        Err(Exit::Error(vmmu::Error::HostReadOnly {
            gpa: Gpa(gpa),
            hva: vmmu::types::Hva(ro + 0x5000)
        }))
    );
    assert!(!leaf_of(&vm, Gpa(gpa).gfn()).unwrap().2.is_writable());
    audit(&vm);
}

/// The fault path decides writability from the fresh host lookup, not from the old SPTE:
/// a page first mapped while the host mapping was read-only, then made writable by the
/// host (mprotect), takes a guest write like any RAM page (KVM's slow path rebuilds the
/// SPTE from the new `gfn_to_pfn` answer). It must not exit as MMIO: the slot is not
/// READONLY.
#[test]
fn write_after_host_makes_a_page_writable_maps_it() {
    let (host, vm) = new_vm(VmConfig::default());
    let h = host.mmap(2 * M1, Backing::Page4K, false).unwrap().0;
    let spec = add_slot(
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
    let gpa = G1 + 0x3000;
    access_ok(&vm, &mut vcpu, &host, &spec, gpa, AccessKind::Read);
    assert!(!leaf_of(&vm, Gpa(gpa).gfn()).unwrap().2.is_mmu_writable());
    host.set_writable(vmmu::types::Hva(h), 2 * M1, true)
        .unwrap();
    let got = vm.write(&mut vcpu, Gpa(gpa));
    assert_eq!(
        got,
        Ok(expected_hpa(&host, &spec, gpa)),
        "write to RAM the host now allows"
    );
    assert!(leaf_of(&vm, Gpa(gpa).gfn()).unwrap().2.is_writable());
    audit(&vm);
}

/// A table allocator that refuses to hand out more than `cap` tables at once.
struct CappedAlloc {
    inner: vmmu::table::HeapTableAllocator,
    cap: std::sync::atomic::AtomicU64,
}

// SAFETY: every call is forwarded to the heap allocator, which keeps the contract; this
// only returns `None` earlier.
unsafe impl vmmu::table::TableAllocator for CappedAlloc {
    fn alloc_table(&self) -> Option<vmmu::types::Pfn> {
        if self.inner.live() >= self.cap.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        self.inner.alloc_table()
    }
    unsafe fn free_table(&self, frame: vmmu::types::Pfn) {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.free_table(frame) }
    }
    fn table_ptr(&self, frame: vmmu::types::Pfn) -> std::ptr::NonNull<vmmu::table::Table> {
        self.inner.table_ptr(frame)
    }
}

/// Running out of table memory is a typed error for the VMM, leaves the MMU consistent,
/// and the same access succeeds once memory is available again.
#[test]
fn out_of_table_memory_is_reported_and_recoverable() {
    use std::sync::atomic::Ordering;
    let host = std::sync::Arc::new(vmmu::host::SimHostMemory::new());
    let alloc = std::sync::Arc::new(CappedAlloc {
        inner: vmmu::table::HeapTableAllocator::new(),
        cap: 3.into(),
    });
    let vm = vmmu::Vm::with_allocator(default_config(), host.clone(), alloc.clone()).unwrap();
    let h = mmap(&host, 2 * M1, Backing::Page4K);
    let spec = SlotSpec {
        id: 0,
        gpa: G1,
        size: 2 * M1,
        hva: h,
        flags: MemslotFlags::empty(),
    };
    vm.set_user_memory_region(spec.region()).unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    let gpa = G1 + 0x1238;
    // Root + two tables: the 4K table does not fit.
    assert_eq!(
        vm.write(&mut vcpu, Gpa(gpa)),
        Err(Exit::Error(vmmu::Error::OutOfTableMemory))
    );
    vm.audit().unwrap();
    assert_eq!(vm.stats().mmu.leaves_installed, 0);
    // An MMIO fault needs a 4K table too.
    assert_eq!(
        vm.read(&mut vcpu, Gpa(8 * G1)),
        Err(Exit::Error(vmmu::Error::OutOfTableMemory))
    );
    vm.audit().unwrap();
    alloc.cap.store(64, Ordering::Relaxed);
    let hpa = vm.write(&mut vcpu, Gpa(gpa)).unwrap();
    assert_eq!(hpa, expected_hpa(&host, &spec, gpa));
    assert_eq!(
        vm.read(&mut vcpu, Gpa(8 * G1)),
        Err(Exit::Mmio {
            gpa: Gpa(8 * G1),
            write: false
        })
    );
    vm.audit().unwrap();
    vm.zap_all().unwrap();
    vm.audit().unwrap();
    assert_eq!(table_count(&vm), 1, "zap_all leaves only the root");
    // (The TDP MMU frees through the epoch collector: let it run.)
    assert_eq!(
        settle_tables_with(&vm, || alloc.inner.live()),
        1,
        "zap_all frees every table but the root"
    );
}
