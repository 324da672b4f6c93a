//! A minimal guest for the shadow-paging tests: guest memory, a memslot of page-table
//! memory at gpa 0 (the guest's tables and nothing else), and a builder that writes the
//! guest's 4-level tables straight into guest memory (as a bootloader does before the
//! first access) or through a vCPU (as a running kernel does).
//!
//! Expected translations come from the tables the test wrote, never from the MMU.
#![allow(dead_code)]

use std::sync::Arc;

use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{Gpa, Gva, Level};
use vmmu::Vcpu;
use vmmu::{MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};

/// Guest-physical memory the tests give a guest (tables at the bottom, data above).
pub const RAM: u64 = 2 << 30;
/// The page-table memslot: [0, TABLES).
pub const TABLES: u64 = 16 << 20;
/// Every right at an upper level.
pub const UP: u64 = pte::P | pte::RW | pte::US;

pub type PagingVm = Vm<Arc<SimHostMemory>>;

pub struct Guest {
    pub host: Arc<SimHostMemory>,
    pub mem: Arc<SimGuestMemory>,
    pub vm: PagingVm,
    next_table: u64,
}

impl Guest {
    /// A shadow-paging VM with `config` (its `mmu` is set here) and the table memslot
    /// (slot 0).
    pub fn new(config: VmConfig) -> Guest {
        let host = Arc::new(SimHostMemory::new());
        let mem = Arc::new(SimGuestMemory::new(RAM));
        let config = VmConfig {
            mmu: MmuKind::ShadowPaging,
            ..config
        };
        let vm = Vm::new_paging(config, host.clone(), mem.clone());
        let mut g = Guest {
            host,
            mem,
            vm,
            next_table: 0x1000,
        };
        g.add_slot(0, 0, TABLES, Backing::Page4K, MemslotFlags::empty());
        g
    }

    /// Add memslot `id` at `gpa` of `size`, backed by fresh host memory.
    pub fn add_slot(
        &mut self,
        id: u32,
        gpa: u64,
        size: u64,
        backing: Backing,
        flags: MemslotFlags,
    ) -> u64 {
        let hva = self.host.mmap(size, backing, true).unwrap();
        self.vm
            .set_user_memory_region(MemoryRegion {
                slot: id,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: hva.0,
            })
            .unwrap();
        hva.0
    }

    /// A fresh zeroed table page.
    pub fn table(&mut self) -> u64 {
        let t = self.next_table;
        assert!(t < TABLES, "out of table memory");
        self.next_table += 0x1000;
        t
    }

    /// The gpa of the entry of `level` for `gva` in the tables under `cr3`, building the
    /// upper tables (with `UP`) as needed, straight in guest memory.
    pub fn entry_gpa(&mut self, cr3: u64, gva: Gva, level: Level) -> Gpa {
        let mut t = cr3;
        let mut l = Level::L512G;
        while l > level {
            let at = Gpa(t + gva.index_at(l) as u64 * 8);
            let e = self.mem.read_u64(at).unwrap();
            t = if e & pte::P != 0 {
                assert_eq!(e & pte::PS, 0, "a huge page in the way");
                e & pte::ADDR_MASK
            } else {
                let n = self.table();
                self.mem.write_u64(at, n | UP).unwrap();
                n
            };
            l = l.below().unwrap();
        }
        Gpa(t + gva.index_at(level) as u64 * 8)
    }

    /// Map `gva` to `frame` with `flags` at `level` (PS added above 4K), straight in
    /// guest memory. Returns the gpa of the entry.
    pub fn map(&mut self, cr3: u64, gva: Gva, frame: u64, flags: u64, level: Level) -> Gpa {
        let at = self.entry_gpa(cr3, gva, level);
        let ps = if level > Level::L4K { pte::PS } else { 0 };
        self.mem.write_u64(at, frame | flags | ps).unwrap();
        at
    }

    /// A vCPU running on `cr3` at CPL 0 with WP and NX on.
    pub fn vcpu(&self, cr3: u64) -> Vcpu {
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

    pub fn audit(&self) {
        self.vm.audit().unwrap_or_else(|e| panic!("{e}"));
    }
}
