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
//! Module map (one mechanism per file, named as KVM names it), in layers: each imports only
//! from the layers below it, and no two modules import each other.
//!
//! - vocabulary: [`types`] (gfn, pfn, gpa, hva, levels, access kinds, error codes),
//!   [`flush`] (the `#[must_use]` TLB flush token, and [`flush::Removed`], what every MMU
//!   operation returns), [`error`], [`sync`] (locks, the asymmetric fence pair), [`brlock`]
//!   (the big-reader lock TDP faults enter through)
//! - what the MMU reads: [`host`] (the `HostMemory` trait; a simulated host beside it),
//!   [`guest`] (shadow paging's guest side: guest memory, guest PTEs, paging registers,
//!   the walk of the guest's tables)
//! - formats and memory: [`spte`] (the 64-bit SPTE: the bits every format shares, and
//!   the formats, EPT and legacy x86-64, as mask tables with their builders and predicates),
//!   [`table`] (4 KiB frames of 512 atomic SPTEs and their allocator), [`rmap`] (KVM's
//!   `pte_list`), [`memslot`] (slots with their per-level metadata, dirty bitmaps, write
//!   tracking), [`page`] (shadow pages, `kvm_mmu_page`)
//! - [`mmu`]: the vocabulary both MMUs share: the fault plan and its outcome, the
//!   MMU-notifier invalidation in progress, the work counters
//! - the MMUs, side by side: [`shadow`] (direct mode and shadow paging: fault paths,
//!   zapping, write protection, emulated page-table writes, unsync and resync) and [`tdp`]
//!   (parallel faults, the one iterator in three modes, one SPTE write funnel, lock modes
//!   in the types)
//! - [`dirty`]: the lockless index of logging slots and the per-vCPU dirty rings
//! - [`hw`]: the CPU model: EPT walker setting A/D bits, per-CPU TLB (by gfn or by
//!   virtual page), the vCPU mode protocol
//! - [`audit`]: invariant checks (KVM's `mmu_audit.c`), for both MMUs
//! - [`vm`]: the public API: the VM and its vCPUs, one file per mechanism (memslots,
//!   faults, zaps, write tracking, dirty log, MMU notifier, shadow paging, the lock), and
//!   in `vm/mmu.rs` the one place that dispatches between the MMUs
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
pub use vm::{Mmu, MmuKind, Vcpu};
