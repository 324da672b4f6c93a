//! Shadow paging through the public API: guest tables built in guest memory, accesses by
//! gva through the CPU model, the audit after every step.
//!
//! The expected translation comes from the test's own tables (the frame it wrote in the
//! guest entry), never from the MMU.

use std::sync::Arc;

use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
use vmmu::host::{Backing, SimHostMemory};
use vmmu::hw::Vcpu;
use vmmu::types::{AccessKind, ErrorCode, Gpa, Gva, Level};
use vmmu::{Exit, MemoryRegion, MemslotFlags, MmuKind, PagingConfig, Vm, VmConfig};

const RAM: u64 = 64 << 20;
const PML4: u64 = 0x1000;
const UP: u64 = pte::P | pte::RW | pte::US;

struct Guest {
    mem: Arc<SimGuestMemory>,
    vm: Vm<Arc<SimHostMemory>>,
    next_table: u64,
}

impl Guest {
    fn new(unsync: bool) -> Guest {
        let host = Arc::new(SimHostMemory::new());
        let hva = host.mmap(RAM, Backing::Thp, true).unwrap();
        let mem = Arc::new(SimGuestMemory::new(RAM));
        let config = VmConfig {
            mmu: MmuKind::ShadowPaging,
            paging: PagingConfig {
                unsync,
                ..PagingConfig::default()
            },
            ..VmConfig::default()
        };
        let vm = Vm::new_paging(config, host, mem.clone());
        vm.set_user_memory_region(MemoryRegion {
            slot: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: 0,
            memory_size: RAM,
            userspace_addr: hva.0,
        })
        .unwrap();
        Guest {
            mem,
            vm,
            next_table: 0x2000,
        }
    }

    fn table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += 0x1000;
        t
    }

    /// Map `gva` to `frame` (4K) with `leaf` flags, building tables with `UP` as needed,
    /// writing guest memory directly (before the MMU shadows them). Returns the gpa of the
    /// leaf entry.
    fn map(&mut self, cr3: u64, gva: Gva, frame: u64, leaf: u64) -> Gpa {
        let mut t = cr3;
        for level in [Level::L512G, Level::L1G, Level::L2M] {
            let at = Gpa(t + gva.index_at(level) as u64 * 8);
            let e = self.mem.read_u64(at).unwrap();
            t = if e & pte::P != 0 {
                e & pte::ADDR_MASK
            } else {
                let n = self.table();
                self.mem.write_u64(at, n | UP).unwrap();
                n
            };
        }
        let at = Gpa(t + gva.index_at(Level::L4K) as u64 * 8);
        self.mem.write_u64(at, frame | leaf).unwrap();
        at
    }

    fn vcpu(&self, cr3: u64) -> Vcpu {
        let mut v = self.vm.create_vcpu().unwrap();
        self.vm
            .set_paging(
                &mut v,
                PagingState {
                    cr3: Gpa(cr3),
                    ..PagingState::default()
                },
            )
            .unwrap();
        v
    }

    fn audit(&self) {
        self.vm.audit().unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn maps_reads_writes_and_reflects_guest_faults() {
    for unsync in [false, true] {
        let mut g = Guest::new(unsync);
        let va = Gva(0x40_0000_1000);
        let pte_gpa = g.map(PML4, va, 0x80_0000, UP);
        let mut v = g.vcpu(PML4);
        assert_eq!(
            g.vm.gva_access(&mut v, Gva(va.0 + 0x10), AccessKind::Read),
            Ok(Gpa(0x80_0010))
        );
        g.audit();
        g.vm.gva_write_u64(&mut v, Gva(va.0 + 8), 77).unwrap();
        assert_eq!(g.mem.read_u64(Gpa(0x80_0008)).unwrap(), 77);
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
        g.map(PML4, sva, 0x81_0000, pte::P | pte::RW);
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
            Ok(Gpa(0x81_0000))
        );
        g.audit();
    }
}

#[test]
fn guest_pte_writes_are_emulated_or_unsynced_and_never_stale() {
    for unsync in [false, true] {
        let mut g = Guest::new(unsync);
        let va = Gva(0x40_0000_1000);
        let pte_gpa = g.map(PML4, va, 0x80_0000, UP);
        // Map the page tables themselves at a kernel address, as an OS does.
        let kbase = 0xffff_8880_0000_0000u64;
        let table_gfn_page = pte_gpa.0 & !0xfff;
        g.map(
            PML4,
            Gva(kbase + table_gfn_page),
            table_gfn_page,
            pte::P | pte::RW,
        );
        let mut v = g.vcpu(PML4);
        assert_eq!(
            g.vm.gva_access(&mut v, va, AccessKind::Read),
            Ok(Gpa(0x80_0000))
        );
        g.audit();
        // The guest repoints its PTE through the kernel mapping, then INVLPG.
        let kva = Gva(kbase + pte_gpa.0);
        for (k, frame) in [0x90_0000u64, 0xa0_0000, 0xb0_0000, 0xc0_0000]
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
    let mut g = Guest::new(true);
    let cr3s = [0x10_0000u64, 0x11_0000, 0x12_0000, 0x13_0000, 0x14_0000];
    for (k, &cr3) in cr3s.iter().enumerate() {
        g.map(cr3, Gva(0x1000), 0x100_0000 + (k as u64) * 0x1000, UP);
    }
    let mut v = g.vcpu(cr3s[0]);
    let mut w = g.vcpu(cr3s[0]);
    for round in 0..3 {
        for (k, &cr3) in cr3s.iter().enumerate() {
            g.vm.load_cr3(&mut v, Gpa(cr3)).unwrap();
            g.vm.load_cr3(&mut w, Gpa(cr3)).unwrap();
            let want = Ok(Gpa(0x100_0000 + k as u64 * 0x1000));
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
    drop((v, w));
    g.audit();
}
