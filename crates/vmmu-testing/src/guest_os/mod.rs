//! A guest OS model that drives shadow paging the way Linux does: a kernel with a direct
//! map shared by every process, processes with their own 4-level page tables, demand
//! paging, fork with copy-on-write, exec, exit, mmap/munmap and context switches, on
//! several vCPUs at once.
//!
//! The kernel's page-table reads and writes are guest accesses at CPL 0 through the
//! direct map, and user accesses are CPL 3 accesses, so the MMU under test sees what a
//! shadow-paging hypervisor sees: writes to write-protected guest tables (emulated),
//! tables going unsync, CR3 switches, INVLPGs and flushes, and guest page faults reflected
//! back to the guest.
//!
//! One mechanism per file:
//! - [`layout`]: the virtual address layout and table-index arithmetic;
//! - [`frames`]: the physical frame allocator with reference counts (shared, thread-safe);
//! - [`kernel`]: the shared [`Kernel`], its boot (direct map, idle PML4) and counters;
//! - [`cpu`]: the [`Cpu`] trait the kernel runs on: a vmmu vCPU ([`VcpuCpu`]) or the
//!   reference [`SoftCpu`];
//! - [`walk`]: the reference translation, straight from guest memory;
//! - [`vma`]: VMAs and the per-page records the checks compare with;
//! - [`pgtable`]: page-table edits through a [`Cpu`] (walk, allocate, free);
//! - [`process`]: processes and their system calls, the page-fault handler;
//! - [`check`]: what must hold after every step;
//! - [`machine`]: a shadow-paging VM over simulated memory with the kernel booted on it.
//!
//! Data-page contents are not modelled: only page tables live in guest memory. A process
//! runs on one vCPU only; the kernel's shared parts (frame allocator, direct map) are
//! shared by every vCPU.

pub mod check;
pub mod cpu;
pub mod frames;
pub mod kernel;
pub mod layout;
pub mod machine;
pub mod pgtable;
pub mod process;
pub mod vma;
pub mod walk;

use std::fmt;

use vmmu::types::{AccessKind, ErrorCode, Gva};
use vmmu::Exit;

pub use cpu::{Cpu, SoftCpu, VcpuCpu};
pub use frames::FrameAllocator;
pub use kernel::{Kernel, KernelStats};
pub use machine::{clock_ns, Machine};
pub use process::{Image, Process};
pub use vma::{AddressSpace, PageRecord, Prot, Vma};

/// Why a guest OS operation failed.
#[derive(Clone, Debug, PartialEq)]
pub enum OsError {
    /// The user access is not allowed by any VMA (SIGSEGV).
    Segfault {
        /// The address.
        gva: Gva,
        /// The page fault's error code.
        error_code: ErrorCode,
    },
    /// Guest RAM is exhausted.
    OutOfMemory,
    /// A kernel access through the direct map faulted: the direct map is broken.
    KernelFault {
        /// The address.
        gva: Gva,
        /// The page fault's error code.
        error_code: ErrorCode,
    },
    /// A user access kept faulting although the guest's tables allow it (the MMU keeps a
    /// stale translation).
    Stuck {
        /// The address.
        gva: Gva,
        /// The access.
        kind: AccessKind,
        /// The last error code.
        error_code: ErrorCode,
    },
    /// The VM exited to the VMM unexpectedly.
    Exit(Exit),
    /// The VM returned an error.
    Vm(vmmu::Error),
    /// The host could not provide memory.
    Host(String),
    /// A bad argument to a system call.
    BadArgument(&'static str),
    /// The kernel's record and its page tables disagree (a bug in the model or in the
    /// emulation of its writes).
    Inconsistent(String),
}

impl fmt::Display for OsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OsError::Segfault { gva, error_code } => write!(
                f,
                "segmentation fault at {gva} (error code {:#x})",
                error_code.bits()
            ),
            OsError::OutOfMemory => f.write_str("guest out of memory"),
            OsError::KernelFault { gva, error_code } => write!(
                f,
                "kernel fault through the direct map at {gva} (error code {:#x})",
                error_code.bits()
            ),
            OsError::Stuck {
                gva,
                kind,
                error_code,
            } => write!(
                f,
                "{kind:?} at {gva} keeps faulting (error code {:#x}) although the guest tables allow it",
                error_code.bits()
            ),
            OsError::Exit(e) => write!(f, "unexpected exit: {e}"),
            OsError::Vm(e) => write!(f, "VM error: {e}"),
            OsError::Host(e) => write!(f, "host memory: {e}"),
            OsError::BadArgument(what) => write!(f, "bad argument: {what}"),
            OsError::Inconsistent(what) => write!(f, "inconsistent: {what}"),
        }
    }
}

impl std::error::Error for OsError {}

#[cfg(test)]
mod tests;
