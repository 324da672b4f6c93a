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
//! # Features
//! - `std` (default): see above.
//! - `internals`: for vmmu's own tests, benches and reference model; not a stable or
//!   safe-to-misuse API. It makes the MMUs' insides public: the modules marked *internals*
//!   below, access to the live MMU (`Vm::with_mmu`, `with_tdp`, `with_tdp_mut`), reads
//!   and writes of table entries, the guest walk, a vCPU's TLB. Safe code using them can
//!   corrupt live tables (and so reach undefined behaviour); an embedder never enables
//!   it. What no caller outside the MMU needs stays crate-private even then: making
//!   table pages (`TdpPage::new`, `Pages::create`), linking caller pages
//!   (`split_huge_pages`), faulting or zapping under a caller's root (`map`,
//!   `zap_root`), epoch guards of another collector (`tdp::EpochGuard`).
//!
//! # The public API (default features)
//! What an embedder needs and nothing more, none of it able to reach undefined behaviour
//! from safe code: [`Vm`] and [`Vcpu`] (a vCPU is tied to the VM that made it); the run
//! loop a hypervisor drives its vCPUs with ([`Vm::enter_guest`] and its [`EntryState`],
//! [`Eptp`], [`Invept`]; [`Vm::exit_guest`]; [`Vm::handle_ept_violation`] with
//! [`EptViolation`], [`Vm::handle_ept_misconfig`], [`ExitAction`]; the [`Kick`] remote
//! flushes call; the guide is [`embedding`]) and the CPU model that stands in for VMX in
//! it ([`Vm::model_access`], [`VmExit`], [`Vcpu::model_invept`], [`InterruptLine`],
//! [`ModelKick`], [`ModelRun`]); the
//! configuration ([`VmConfig`], [`DirtyLogConfig`], [`PagingConfig`], [`MemslotLimits`],
//! [`Algorithms`] and its choices, [`MmuKind`], [`TdpIteration`]), memory regions
//! ([`MemoryRegion`], [`MemslotFlags`]), [`Error`] and [`Exit`], the counters ([`VmStats`],
//! [`MmuStats`], [`PagingStats`]), the audit's report ([`AuditReport`], [`AuditError`]), the
//! traits an embedder implements and the types they use: [`host::HostMemory`],
//! [`table::TableAllocator`] (an `unsafe` trait: its implementor vouches for the frames),
//! [`guest::GuestMemory`], [`types`], [`guest::pte`]; and [`table::HeapTableAllocator`]
//! and the simulators ([`host::SimHostMemory`], [`guest::SimGuestMemory`]), which the
//! examples, tests and benchmarks run on. The simulators are safe code with no `unsafe`
//! contract, so they stay in the default build (an embedder that does not use them pays
//! nothing at run time).
//!
//! # Module map
//! One mechanism per file, named as KVM names it, in layers: each imports only from the
//! layers below it, and no two modules import each other. *internals*: public only with
//! the `internals` feature.
//!
//! - vocabulary: [`types`] (gfn, pfn, gpa, hva, levels, access kinds, error codes),
//!   `flush` (*internals*: the `#[must_use]` TLB flush token, and `flush::Removed`, what
//!   every MMU operation returns), [`error`], `sync` (*internals*: locks, the asymmetric
//!   fence pair), `brlock` (*internals*: the big-reader lock TDP faults enter through)
//! - what the MMU reads: [`host`] (the `HostMemory` trait; a simulated host beside it;
//!   with `std` on Linux, real anonymous memory, `RealHostMemory`),
//!   [`guest`] (shadow paging's guest side: guest memory, guest PTEs, paging registers,
//!   and, *internals*, the walk of the guest's tables)
//! - formats and memory: `spte` (*internals*: the 64-bit SPTE: the bits every format
//!   shares, and the formats, EPT and legacy x86-64, as mask tables), [`table`] (4 KiB frames of 512 atomic SPTEs and their allocator; the
//!   entries' accessors are *internals*), `rmap` (*internals*: KVM's `pte_list`),
//!   `memslot` (*internals*, the region types re-exported here: slots with their per-level
//!   metadata, dirty bitmaps, write tracking), `page` (*internals*: shadow pages,
//!   `kvm_mmu_page`)
//! - `mmu` (*internals*, the outcome and counters re-exported here): the vocabulary both
//!   MMUs share: the fault plan and its outcome, the MMU-notifier invalidation in
//!   progress, the work counters
//! - the MMUs, side by side (*internals*, their configuration re-exported here): `shadow`
//!   (direct mode and shadow paging: fault paths, zapping, write protection, emulated
//!   page-table writes, unsync and resync) and `tdp` (parallel faults, the one iterator in
//!   three modes, one SPTE write funnel, lock modes in the types)
//! - `dirty` (*internals*): the lockless index of logging slots and the per-vCPU dirty
//!   rings
//! - `hw` (*internals*): the CPU model: EPT walker setting A/D bits, per-CPU TLB (by gfn
//!   or by virtual page, flushed only by the INVEPT an entry owes), the vCPU mode
//!   protocol (requests, kicks, the wait for each vCPU's exit)
//! - [`audit`]: invariant checks (KVM's `mmu_audit.c`), for both MMUs ([`Vm::audit`] runs
//!   them; the report types are public, the checks crate-private)
//! - [`vm`]: the public API: the VM and its vCPUs, one file per mechanism (memslots,
//!   faults, pre-faulting, zaps, write tracking, dirty log, MMU notifier, shadow paging,
//!   the lock, the run loop in `vm/run.rs` with the EPT exit qualification in
//!   `vm/qualification.rs` and the CPU model as its embedder in `vm/model.rs`; with `std`
//!   on Linux, guest accesses that move real bytes, `vm/data.rs`), and in `vm/mmu.rs` the
//!   one place that dispatches between the MMUs
//! - [`embedding`]: the guide for a hypervisor that embeds vmmu (no code)
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
#![deny(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

/// `internal! { pub ... }`: an item (a module, a re-export, a function or method) that
/// is public with the `internals` feature and crate-private without it, for vmmu's own
/// tests, benches and reference model (see the crate docs' "Features").
macro_rules! internal {
    ($(#[$m:meta])* pub $($item:tt)*) => {
        $(#[$m])*
        #[cfg(feature = "internals")]
        pub $($item)*
        $(#[$m])*
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports)]
        pub(crate) $($item)*
    };
}

// The embedder's API (see "Features" above).
pub mod audit;
pub mod embedding;
pub mod error;
pub mod guest;
pub mod host;
pub mod table;
pub mod types;
pub mod vm;

// The MMUs' insides: public with `internals`, crate-private without.
internal! { pub mod brlock; }
internal! { pub mod dirty; }
internal! { pub mod flush; }
internal! { pub mod hw; }
internal! { pub mod memslot; }
internal! { pub mod mmu; }
internal! { pub mod page; }
internal! { pub mod rmap; }
internal! { pub mod shadow; }
internal! { pub mod spte; }
internal! { pub mod sync; }
internal! { pub mod tdp; }

pub use audit::{AuditError, AuditReport};
pub use dirty::ring::{RingEntry, RingLimits};
pub use error::Error;
pub use memslot::{MemoryRegion, MemslotFlags, MemslotLimits};
pub use mmu::{DirtyGfn, FaultOutcome, MmuStats};
pub use shadow::{Algorithms, DirtyWrprot, PageWrprot, RmapDrop, RmapIteration};
pub use tdp::TdpIteration;
pub use vm::PreFault;
pub use vm::{
    DirtyLogConfig, DirtyRange, DirtyRingView, EntryState, EptViolation, Eptp, Exit, ExitAction,
    HarvestReport, InterruptLine, Invept, Kick, MmuKind, ModelKick, ModelRun, PagingConfig,
    PagingStats, Vcpu, Vm, VmConfig, VmExit, VmStats,
};
internal! { pub use flush::Flush; }
internal! { pub use vm::Mmu; }
