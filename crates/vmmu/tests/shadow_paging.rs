//! Shadow paging through the public API: guest tables built in guest memory, accesses by
//! gva through the CPU model, the audit after every step.
//!
//! The expected translation comes from the test's own tables (the frame it wrote in the
//! guest entry), never from the MMU.

use vmmu::guest::{pte, GuestMemory};
use vmmu::host::Backing;
use vmmu::types::{AccessKind, ErrorCode, Gpa, Gva, Level};
use vmmu::{Exit, MemslotFlags, PagingConfig, VmConfig};

mod paging;

use paging::{Guest, UP};

const PML4: u64 = 0x1000;

fn guest(unsync: bool) -> Guest {
    let mut g = Guest::new(VmConfig {
        paging: PagingConfig {
            unsync,
            ..PagingConfig::default()
        },
        ..VmConfig::default()
    });
    assert_eq!(g.table(), PML4);
    g.add_slot(1, 1 << 30, 64 << 20, Backing::Thp, MemslotFlags::empty());
    g
}

#[test]
fn maps_reads_writes_and_reflects_guest_faults() {
    for unsync in [false, true] {
        let mut g = guest(unsync);
        let va = Gva(0x40_0000_1000);
        let pte_gpa = g.map(PML4, va, (1 << 30) + 0x80_0000, UP, Level::L4K);
        let mut v = g.vcpu(PML4);
        assert_eq!(
            g.vm.gva_access(&mut v, Gva(va.0 + 0x10), AccessKind::Read),
            Ok(Gpa((1 << 30) + 0x80_0010))
        );
        g.audit();
        g.vm.gva_write_u64(&mut v, Gva(va.0 + 8), 77).unwrap();
        assert_eq!(g.mem.read_u64(Gpa((1 << 30) + 0x80_0008)).unwrap(), 77);
        assert_eq!(g.vm.gva_read_u64(&mut v, Gva(va.0 + 8)).unwrap(), 77);
        g.audit();
        let leaf = g.mem.read_u64(pte_gpa).unwrap();
        assert_eq!(leaf & (pte::A | pte::D), pte::A | pte::D, "guest A/D set");
        // Not present.
        let err =
            g.vm.gva_access(&mut v, Gva(0x40_0000_5000), AccessKind::Write);
        assert_eq!(
            err,
            Err(Exit::GuestPageFault {
                gva: Gva(0x40_0000_5000),
                error_code: ErrorCode::WRITE
            })
        );
        // User access to a supervisor page.
        let sva = Gva(0x40_0000_2000);
        g.map(
            PML4,
            sva,
            (1 << 30) + 0x81_0000,
            pte::P | pte::RW,
            Level::L4K,
        );
        g.vm.invlpg(&mut v, sva).unwrap();
        v.set_cpl(3);
        assert_eq!(
            g.vm.gva_access(&mut v, sva, AccessKind::Read),
            Err(Exit::GuestPageFault {
                gva: sva,
                error_code: ErrorCode::PRESENT | ErrorCode::USER
            })
        );
        v.set_cpl(0);
        assert_eq!(
            g.vm.gva_access(&mut v, sva, AccessKind::Read),
            Ok(Gpa((1 << 30) + 0x81_0000))
        );
        g.audit();
    }
}

#[test]
fn guest_pte_writes_are_emulated_or_unsynced_and_never_stale() {
    for unsync in [false, true] {
        let mut g = guest(unsync);
        let va = Gva(0x40_0000_1000);
        let pte_gpa = g.map(PML4, va, (1 << 30) + 0x80_0000, UP, Level::L4K);
        // Map the page tables themselves at a kernel address, as an OS does.
        let kbase = 0xffff_8880_0000_0000u64;
        let table_gfn_page = pte_gpa.0 & !0xfff;
        g.map(
            PML4,
            Gva(kbase + table_gfn_page),
            table_gfn_page,
            pte::P | pte::RW,
            Level::L4K,
        );
        let mut v = g.vcpu(PML4);
        assert_eq!(
            g.vm.gva_access(&mut v, va, AccessKind::Read),
            Ok(Gpa((1 << 30) + 0x80_0000))
        );
        g.audit();
        // The guest repoints its PTE through the kernel mapping, then INVLPG.
        let kva = Gva(kbase + pte_gpa.0);
        for (k, frame) in [
            (1u64 << 30) + 0x90_0000,
            (1 << 30) + 0xa0_0000,
            (1 << 30) + 0xb0_0000,
            (1 << 30) + 0xc0_0000,
        ]
        .into_iter()
        .enumerate()
        {
            g.vm.gva_write_u64(&mut v, kva, frame | UP).unwrap();
            g.audit();
            g.vm.invlpg(&mut v, va).unwrap();
            g.audit();
            assert_eq!(
                g.vm.gva_access(&mut v, va, AccessKind::Read),
                Ok(Gpa(frame)),
                "unsync={unsync} step {k}"
            );
            g.audit();
        }
        // Clear it: the next access faults into the guest.
        g.vm.gva_write_u64(&mut v, kva, 0).unwrap();
        g.vm.invlpg(&mut v, va).unwrap();
        assert!(matches!(
            g.vm.gva_access(&mut v, va, AccessKind::Read),
            Err(Exit::GuestPageFault { .. })
        ));
        g.audit();
        let s = g.vm.stats().paging;
        if unsync {
            assert!(s.unsynced_pages > 0 && s.emulated_writes == 0, "{s:?}");
        } else {
            assert!(s.emulated_writes >= 5 && s.unsynced_pages == 0, "{s:?}");
        }
    }
}

#[test]
fn roots_are_cached_shared_and_survive_reclaim() {
    let mut g = guest(true);
    let cr3s = [0x10_0000u64, 0x11_0000, 0x12_0000, 0x13_0000, 0x14_0000];
    for (k, &cr3) in cr3s.iter().enumerate() {
        g.map(
            cr3,
            Gva(0x1000),
            (1 << 30) + 0x100_0000 + (k as u64) * 0x1000,
            UP,
            Level::L4K,
        );
    }
    let mut v = g.vcpu(cr3s[0]);
    let mut w = g.vcpu(cr3s[0]);
    for round in 0..3 {
        for (k, &cr3) in cr3s.iter().enumerate() {
            g.vm.load_cr3(&mut v, Gpa(cr3)).unwrap();
            g.vm.load_cr3(&mut w, Gpa(cr3)).unwrap();
            let want = Ok(Gpa((1 << 30) + 0x100_0000 + k as u64 * 0x1000));
            assert_eq!(g.vm.gva_access(&mut v, Gva(0x1000), AccessKind::Read), want);
            assert_eq!(
                g.vm.gva_access(&mut w, Gva(0x1000), AccessKind::Write),
                want
            );
            g.audit();
            if round == 1 && k == 2 {
                // Reclaim everything while both vCPUs run on a root.
                assert!(g.vm.reclaim_shadow_pages(usize::MAX) > 0);
                g.audit();
                assert_eq!(g.vm.gva_access(&mut v, Gva(0x1000), AccessKind::Read), want);
                g.audit();
            }
        }
    }
    // Two processes alternating hit the cache (once both are in it).
    g.vm.load_cr3(&mut v, Gpa(cr3s[0])).unwrap();
    g.vm.load_cr3(&mut v, Gpa(cr3s[1])).unwrap();
    let before = g.vm.stats().paging;
    for _ in 0..10 {
        g.vm.load_cr3(&mut v, Gpa(cr3s[0])).unwrap();
        g.vm.load_cr3(&mut v, Gpa(cr3s[1])).unwrap();
    }
    let after = g.vm.stats().paging;
    assert_eq!(after.root_cache_hits - before.root_cache_hits, 20);
    assert_eq!(after.root_cache_misses, before.root_cache_misses);
    // Zapped while held, the roots stay until their vCPUs let go of them.
    g.vm.reclaim_shadow_pages(usize::MAX);
    assert!(g.vm.stats().shadow_pages > 0, "held roots survive the zap");
    g.audit();
    g.vm.release_vcpu(v).unwrap();
    g.vm.release_vcpu(w).unwrap();
    assert_eq!(g.vm.stats().shadow_pages, 0, "released roots are freed");
    g.audit();
}

/// A last-level table that went unsync under one process, changed while no root reached
/// it, then linked into another process: its stale shadow entries must not be used.
#[test]
fn an_unsync_table_relinked_elsewhere_is_not_stale() {
    let mut g = guest(true);
    let (x, y) = (0x10_0000u64, 0x20_0000u64);
    let (va, va2) = (Gva(0x40_0000_1000), Gva(0x40_0000_2000));
    let f1 = (1u64 << 30) + 0x10_0000;
    let f2 = (1u64 << 30) + 0x20_0000;
    let leaf = g.map(x, va, f1, UP, Level::L4K);
    let leaf2 = g.map(x, va2, f1 + 0x1000, UP, Level::L4K);
    let table = leaf.0 & !0xfff;
    // Kernel mappings of the table page, in both address spaces.
    let kbase = 0xffff_8880_0000_0000u64;
    for cr3 in [x, y] {
        g.map(cr3, Gva(kbase + table), table, pte::P | pte::RW, Level::L4K);
    }
    // Y's PD slot for `va`, empty for now, and a kernel mapping of Y's PD.
    let y_pde = g.entry_gpa(y, va, Level::L2M);
    g.map(
        y,
        Gva(kbase + (y_pde.0 & !0xfff)),
        y_pde.0 & !0xfff,
        pte::P | pte::RW,
        Level::L4K,
    );
    let mut v = g.vcpu(x);
    assert_eq!(g.vm.gva_access(&mut v, va, AccessKind::Read), Ok(Gpa(f1)));
    assert_eq!(
        g.vm.gva_access(&mut v, va2, AccessKind::Read),
        Ok(Gpa(f1 + 0x1000))
    );
    // Touch the table through the kernel map: it goes unsync.
    g.vm.gva_write_u64(&mut v, Gva(kbase + leaf.0), f1 | UP)
        .unwrap();
    g.audit();
    assert!(g.vm.stats().paging.unsynced_pages > 0);
    // Switch to Y; repoint va2 in the table (unsync: written directly), then link the
    // table into Y and flush.
    g.vm.load_cr3(&mut v, Gpa(y)).unwrap();
    g.vm.gva_write_u64(&mut v, Gva(kbase + leaf2.0), f2 | UP)
        .unwrap();
    g.vm.gva_write_u64(&mut v, Gva(kbase + y_pde.0), table | UP)
        .unwrap();
    g.vm.flush_guest_tlb(&mut v).unwrap();
    g.audit();
    // The first access links the table; the second must not find va2's old entry.
    assert_eq!(g.vm.gva_access(&mut v, va, AccessKind::Read), Ok(Gpa(f1)));
    assert_eq!(g.vm.gva_access(&mut v, va2, AccessKind::Read), Ok(Gpa(f2)));
    g.audit();
}

/// One page mapped at more virtual addresses than the recycle threshold: its reverse map
/// never grows past it (the mappings are dropped and refault), and every access still
/// reaches the page.
#[test]
fn a_reverse_map_is_recycled_past_the_threshold() {
    use vmmu::shadow::paging::RMAP_RECYCLE_THRESHOLD;
    let mut g = guest(false);
    let frame = (1u64 << 30) + 0x5000;
    let n = RMAP_RECYCLE_THRESHOLD as u64 + 100;
    for k in 0..n {
        g.map(PML4, Gva(0x80_0000_0000 + k * 4096), frame, UP, Level::L4K);
    }
    let mut v = g.vcpu(PML4);
    for k in 0..n {
        let gva = Gva(0x80_0000_0000 + k * 4096 + 8);
        assert_eq!(
            g.vm.gva_access(&mut v, gva, AccessKind::Read),
            Ok(Gpa(frame + 8))
        );
        assert!(g.vm.max_rmap_len() <= RMAP_RECYCLE_THRESHOLD);
        if k % 250 == 0 {
            g.audit();
        }
    }
    assert!(g.vm.max_rmap_len() < 200, "the list was recycled");
    g.audit();
}

/// Bad input on the shadow-paging API: a typed error, and nothing changed.
#[test]
fn bad_input_gets_typed_errors_and_changes_nothing() {
    use std::sync::Arc;
    use vmmu::guest::{PagingState, SimGuestMemory};
    use vmmu::host::SimHostMemory;
    use vmmu::table::HeapTableAllocator;
    use vmmu::{Error, MmuKind, Vm};

    // Guest memory with another MMU, or shadow paging without it: refused before any
    // table is allocated.
    let alloc = Arc::new(HeapTableAllocator::new());
    let mem: Arc<dyn GuestMemory> = Arc::new(SimGuestMemory::new(1 << 20));
    let host = Arc::new(SimHostMemory::new());
    let tdp = VmConfig {
        mmu: MmuKind::Tdp(vmmu::TdpIteration::default()),
        ..VmConfig::default()
    };
    assert!(matches!(
        Vm::with_guest_memory(tdp, host.clone(), alloc.clone(), mem),
        Err(Error::WrongPagingMode(_))
    ));
    let paging = VmConfig {
        mmu: MmuKind::ShadowPaging,
        ..VmConfig::default()
    };
    assert!(matches!(
        Vm::with_allocator(paging, host, alloc.clone()),
        Err(Error::WrongPagingMode(_))
    ));
    assert_eq!(alloc.allocated(), 0, "a refused VM allocated tables");

    let g = guest(true);
    let mut v = g.vcpu(PML4);
    let before = v.paging();
    // CR3 outside every memslot: refused, the vCPU keeps its state and its root.
    let bad = PagingState {
        cr3: Gpa(1 << 40),
        ..before
    };
    assert_eq!(
        g.vm.set_paging(&mut v, bad),
        Err(Error::GuestMemory { gpa: Gpa(1 << 40) })
    );
    assert_eq!(v.paging(), before);
    for gva in [Gva(1 << 47), Gva(0x8000_0000_0000_1000)] {
        assert_eq!(
            g.vm.gva_access(&mut v, gva, AccessKind::Read),
            Err(Exit::Error(Error::NonCanonical { gva }))
        );
        assert_eq!(g.vm.invlpg(&mut v, gva), Err(Error::NonCanonical { gva }));
    }
    assert_eq!(
        g.vm.gva_read_u64(&mut v, Gva(0x1004)),
        Err(Exit::Error(Error::Unaligned { gva: Gva(0x1004) }))
    );
    assert_eq!(
        g.vm.gva_write_u64(&mut v, Gva(0x1001), 5),
        Err(Exit::Error(Error::Unaligned { gva: Gva(0x1001) }))
    );
    // Guest-physical accesses on a shadow-paging VM.
    assert!(matches!(
        g.vm.access(&mut v, Gpa(1 << 30), AccessKind::Read),
        Err(Exit::Error(Error::WrongPagingMode(_)))
    ));
    assert_eq!(g.vm.stats().mmu.faults, 0, "no fault ran");
    g.audit();
}
