//! The guest side of shadow paging: the guest's memory (where its own page tables live),
//! the format of its page-table entries, and a vCPU's paging registers.
//!
//! Under shadow paging the MMU reads the guest's 4-level tables itself (KVM's
//! `paging_tmpl.h`) and builds shadow tables that map guest-virtual addresses straight to
//! host frames. Everything the MMU learns about the guest's translations comes through
//! [`GuestMemory`].
//!
//! - [`memory`]: the [`GuestMemory`] trait and [`SimGuestMemory`], a lazily allocated
//!   simulation
//! - [`pte`]: the x86-64 page-table entry bits (the guest's format, and the legacy format
//!   the shadow tables use)
//! - `walk` (*internals*, see the crate docs): the MMU's walk of the guest tables (KVM's
//!   `walk_addr_generic`)
//! - [`PagingState`]: CR3, CR0.WP, EFER.NX and CPL: what decides a guest translation
//!
//! ```
//! use std::sync::Arc;
//! use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
//! use vmmu::host::{Backing, SimHostMemory};
//! use vmmu::types::{AccessKind, Gpa, Gva};
//! use vmmu::{MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};
//!
//! let host = Arc::new(SimHostMemory::new());
//! let ram = Arc::new(SimGuestMemory::new(4 << 20)); // where the guest's tables live
//! let hva = host.mmap(4 << 20, Backing::Page4K, true).unwrap();
//! let config = VmConfig { mmu: MmuKind::ShadowPaging, ..VmConfig::default() };
//! let vm = Vm::new_paging(config, host, ram.clone());
//! vm.set_user_memory_region(MemoryRegion {
//!     slot: 0,
//!     flags: MemslotFlags::empty(),
//!     guest_phys_addr: 0,
//!     memory_size: 4 << 20,
//!     userspace_addr: hva.0,
//! })
//! .unwrap();
//! // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> the page at 0x9000.
//! let up = pte::P | pte::RW | pte::US;
//! for (table, next) in [(0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000), (0x4000, 0x9000)] {
//!     ram.write_u64(Gpa(table), next | up).unwrap();
//! }
//! let mut vcpu = vm.create_vcpu().unwrap();
//! let user = PagingState { cr3: Gpa(0x1000), cpl: 3, ..PagingState::default() };
//! vm.set_paging(&mut vcpu, user).unwrap();
//! assert_eq!(vm.gva_access(&mut vcpu, Gva(0x123), AccessKind::Write), Ok(Gpa(0x9123)));
//! // The guest's A and D bits were set by the walk.
//! assert_eq!(ram.read_u64(Gpa(0x4000)).unwrap() & (pte::A | pte::D), pte::A | pte::D);
//! vm.audit().unwrap();
//! ```

pub mod memory;
pub mod pte;
internal! { pub mod walk; }

pub use memory::{GuestMemory, SimGuestMemory};
internal! { pub use walk::{walk_addr, GuestWalk}; }

use crate::types::Gpa;

/// A vCPU's paging registers as the MMU sees them (long mode, 4-level paging; CR4.PAE and
/// PSE are implied, SMEP, SMAP, PKE and LA57 are not modelled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagingState {
    /// CR3: the guest-physical address of the top-level table (bits 51..=12; PCID is not
    /// modelled, the low 12 bits are ignored).
    pub cr3: Gpa,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub cr0_wp: bool,
    /// EFER.NXE: the NX bit is defined (else it is a reserved bit).
    pub efer_nx: bool,
    /// Current privilege level: 3 is a user access, 0..=2 supervisor.
    pub cpl: u8,
}

impl Default for PagingState {
    /// Long mode as a 64-bit OS runs it: WP and NX on, CPL 0, CR3 0.
    fn default() -> Self {
        PagingState {
            cr3: Gpa(0),
            cr0_wp: true,
            efer_nx: true,
            cpl: 0,
        }
    }
}

impl PagingState {
    /// Whether an access now is a user access (CPL 3).
    #[inline]
    pub const fn user(&self) -> bool {
        self.cpl == 3
    }
    /// The guest frame of the top-level table.
    #[inline]
    pub const fn root_gfn(&self) -> crate::types::Gfn {
        crate::types::Gfn((self.cr3.0 & pte::ADDR_MASK) >> crate::types::PAGE_SHIFT)
    }
}
