//! vmmu: a KVM-style x86-64 MMU.
//!
//! vmmu owns the second-level page tables (EPT format) that map a guest's physical memory
//! onto host memory — or, under shadow paging, the shadow tables (legacy x86-64 format)
//! that stand for the guest's own page tables — and everything around them: memslots,
//! reverse maps, zapping, TLB flush requests, and a CPU model that walks the tables as
//! hardware does.
//!
//! The core is `#![no_std]` + `alloc`; the default `std` feature adds parking-lot locks
//! (which sleep when contended) and `std::error::Error` impls.
//!
//! Module map (one mechanism per file, named as KVM names it):
//!
//! - [`types`]: gfn, pfn, gpa, hva, levels, access kinds, error codes
//! - [`spte`]: the 64-bit SPTE: bit layout, the formats (EPT, legacy) as mask tables,
//!   constructors, predicates
//! - [`host`]: what the MMU learns from the host (hva -> pfn, mapping level), and a simulation
//! - [`table`]: page-table memory (4 KiB frames of 512 atomic SPTEs) and its allocator
//! - [`rmap`]: KVM's `pte_list`: reverse maps from a gfn to the SPTEs that map it
//! - [`page`]: shadow pages (`kvm_mmu_page`) and the store naming them by table id
//! - [`memslot`]: KVM_SET_USER_MEMORY_REGION slots with their per-level metadata
//! - `faultin`: what a fault maps (host page, level, leaf), shared by both MMUs
//! - [`shadow`]: the shadow MMU, direct mode and shadow paging: fault paths, zapping,
//!   write protection, emulated page-table writes, unsync and resync
//! - [`tdp`]: the TDP MMU: parallel faults, the one iterator (three modes, seed 002)
//! - [`flush`]: the `#[must_use]` TLB flush token
//! - [`guest`]: shadow paging's guest side: guest memory, guest PTEs, paging registers
//! - [`dirty`]: dirty logging: bitmap GET / CLEAR (manual protect), per-vCPU dirty rings
//! - [`notifier`]: MMU-notifier operations: invalidate (unmap), age, test_age, change_pte
//! - [`hw`]: the CPU: EPT walker setting A/D bits, per-vCPU TLB (by gfn or by virtual
//!   page), the vCPU mode protocol
//! - [`audit`]: invariant checks (KVM's `mmu_audit.c`)
//! - [`brlock`]: the big-reader lock the TDP MMU's faults take shared, one cache line per vCPU
//! - [`mmu`]: which MMU a VM runs (shadow direct, TDP, shadow paging), behind one set of
//!   operations
//! - [`vm`]: the VM tying them together, and the public API
//!
//! ```
//! use std::sync::Arc;
//! use vmmu::host::{Backing, SimHostMemory};
//! use vmmu::types::Gpa;
//! use vmmu::{MemoryRegion, MemslotFlags, Vm, VmConfig};
//!
//! let host = Arc::new(SimHostMemory::new());
//! let hva = host.mmap(4 << 20, Backing::Thp, true).unwrap();
//! let vm = Vm::new(VmConfig::default(), host.clone());
//! vm.set_user_memory_region(MemoryRegion {
//!     slot: 0,
//!     flags: MemslotFlags::empty(),
//!     guest_phys_addr: 1 << 30,
//!     memory_size: 4 << 20,
//!     userspace_addr: hva.0,
//! })
//! .unwrap();
//! let mut vcpu = vm.create_vcpu().unwrap();
//! let hpa = vm.write(&mut vcpu, Gpa((1 << 30) + 0x1234)).unwrap(); // fault, map 2M, retry
//! assert_eq!(hpa.0 & 0xfff, 0x234);
//! vm.audit().unwrap();
//! ```
#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod audit;
pub mod brlock;
pub mod dirty;
pub mod error;
pub mod flush;
pub mod guest;
pub mod host;
pub mod hw;
pub mod memslot;
pub mod mmu;
pub mod page;
pub mod rmap;
pub mod shadow;
pub mod spte;
pub mod sync;
pub mod table;
pub mod tdp;
pub mod types;
pub mod vm;

pub use error::Error;
pub use flush::Flush;
pub use memslot::{MemoryRegion, MemslotFlags};
pub use mmu::{DirtyGfn, FaultOutcome};
pub use shadow::{Algorithms, DirtyWrprot, PageWrprot, RmapDrop, RmapIteration};
pub use tdp::TdpIteration;
pub use vm::{DirtyLogConfig, Exit, PagingConfig, PagingStats, Vm, VmConfig, VmStats};
pub use vm::{Mmu, MmuKind};
