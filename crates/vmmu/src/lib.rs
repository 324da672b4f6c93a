//! vmmu: a KVM-style x86-64 MMU.
//!
//! vmmu owns the second-level page tables (EPT format) that map a guest's physical memory
//! onto host memory, and everything around them: memslots, reverse maps, zapping, TLB
//! flush requests, and a CPU model that walks the tables as hardware does.
//!
//! The core is `#![no_std]` + `alloc`; the default `std` feature adds parking-lot locks.
//! Module map (each file holds one mechanism, named as KVM names it):
//!
//! - [`types`]: gfn, pfn, gpa, hva, levels, access kinds, error codes
//! - [`spte`]: the 64-bit EPT SPTE: bit layout, constructors, predicates
//! - [`host`]: what the MMU learns from the host (hva -> pfn, mapping level), and a simulation
//! - [`table`]: page-table memory (4 KiB frames of 512 atomic SPTEs) and its allocator
//! - [`rmap`]: KVM's `pte_list`: reverse maps from a gfn to the SPTEs that map it
//! - [`memslot`]: KVM_SET_USER_MEMORY_REGION slots with their per-level metadata
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod host;
pub mod rmap;
pub mod spte;
pub mod sync;
pub mod types;
