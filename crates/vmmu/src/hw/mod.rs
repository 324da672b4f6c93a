//! The CPU model: an EPT walker that sets A/D bits, a per-CPU TLB, and the vCPU mode
//! protocol that makes remote TLB flushes kick and wait for vCPUs in guest mode.

mod tlb;
mod vcpu;
mod walk;

pub use tlb::{Tlb, TlbEntry};
pub use vcpu::{flush_vcpus, request_vcpus, Cpu, CpuShared, REQ_MMU_RELOAD, REQ_TLB_FLUSH};
pub(crate) use vcpu::GuestState;
pub use walk::{ept_walk, fast_page_fault, leaf_pfn, lockless_walk, WalkExit, WalkPoint};
