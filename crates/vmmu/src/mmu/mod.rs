//! The vocabulary both MMUs share, below both of them: what a fault maps and what it did
//! (`plan_map`, [`FaultOutcome`], [`DirtyGfn`]; KVM's `struct kvm_page_fault`,
//! `kvm_faultin_pfn` and `RET_PF_*`), the MMU-notifier invalidation in progress
//! ([`Invalidation`]) and the work counters ([`MmuStats`]). What every operation returns,
//! the flush owed and the tables to free after it, sits beside the flush token
//! ([`crate::flush::Removed`]).
//!
//! The shadow MMU ([`crate::shadow`]) and the TDP MMU ([`crate::tdp`]) import from here and
//! never from each other; the VM (`vm`) dispatches between them in one place
//! (`vm/mmu.rs`).

mod fault;
mod invalidation;
mod stats;

pub(crate) use fault::{plan_fault, plan_map, FaultPlan, MapDecision};
pub use fault::{DirtyGfn, FaultOutcome};
pub use invalidation::Invalidation;
pub use stats::MmuStats;
