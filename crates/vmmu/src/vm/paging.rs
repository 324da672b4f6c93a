//! The shadow-paging half of the VM API: a vCPU's paging registers, guest-virtual
//! accesses through the CPU model, and the guest's TLB maintenance (MOV CR3, INVLPG, a
//! full flush), as KVM handles them when it shadows the guest's page tables.

use alloc::sync::Arc;

use crate::error::Error;
use crate::guest::{GuestMemory, PagingState};
use crate::host::HostMemory;
use crate::hw::Vcpu;
use crate::table::{HeapTableAllocator, TableAllocator};
use crate::types::{AccessKind, Gpa, Gva};

use super::{Exit, Vm, VmConfig};

/// Shadow-paging counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingStats {
    /// Page faults reflected into the guest (its own tables forbid the access).
    pub guest_faults: u64,
    /// Writes to write-protected guest page tables emulated by the MMU.
    pub emulated_writes: u64,
    /// Shadow pages zapped because their guest table was written repeatedly without
    /// being used (write flooding).
    pub flooded_pages: u64,
    /// Last-level shadow pages made unsync (the guest writes them directly).
    pub unsynced_pages: u64,
    /// Unsync pages brought back in sync.
    pub synced_pages: u64,
    /// CR3 loads served from the vCPU's cache of previous roots.
    pub root_cache_hits: u64,
    /// CR3 loads that looked the root up (or built it).
    pub root_cache_misses: u64,
    /// Shadow pages zapped by reclaim ([`Vm::reclaim_shadow_pages`]).
    pub reclaimed_pages: u64,
}

impl<H: HostMemory> Vm<H, HeapTableAllocator> {
    /// A shadow-paging VM ([`crate::MmuKind::ShadowPaging`]) whose guest page tables live
    /// in `guest`, with tables from the heap.
    ///
    /// # Panics
    /// If the configuration is invalid or the MMU cannot be created.
    pub fn new_paging(config: VmConfig, host: H, guest: Arc<dyn GuestMemory>) -> Self {
        Self::with_guest_memory(config, host, Arc::new(HeapTableAllocator::new()), guest)
            .unwrap_or_else(|e| panic!("cannot create the VM: {e}"))
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// A VM whose guest memory is `guest` (required by shadow paging: the MMU reads the
    /// guest's page tables there).
    pub fn with_guest_memory(
        config: VmConfig,
        host: H,
        alloc: Arc<A>,
        guest: Arc<dyn GuestMemory>,
    ) -> Result<Self, Error> {
        let _ = (config, host, alloc, guest);
        unimplemented!()
    }

    /// Set `vcpu`'s paging registers at once (CR0.WP, EFER.NX, CR3, CPL), as a guest
    /// entering long mode or changing them does: the vCPU loads the root for the new
    /// state and its TLB is flushed.
    pub fn set_paging(&self, vcpu: &mut Vcpu, state: PagingState) -> Result<(), Error> {
        let _ = (vcpu, state);
        unimplemented!()
    }

    /// MOV to CR3: switch `vcpu` to the address space whose top-level table is at `cr3`.
    /// Unsync shadow pages reachable from the new root are synced; the vCPU's TLB is
    /// flushed; a root among the vCPU's previous roots is reused without a lookup.
    pub fn load_cr3(&self, vcpu: &mut Vcpu, cr3: Gpa) -> Result<(), Error> {
        let _ = (vcpu, cr3);
        unimplemented!()
    }

    /// INVLPG: drop `vcpu`'s translation of `gva` and sync the unsync shadow entry that
    /// maps it.
    pub fn invlpg(&self, vcpu: &mut Vcpu, gva: Gva) -> Result<(), Error> {
        let _ = (vcpu, gva);
        unimplemented!()
    }

    /// A full guest TLB flush (CR4.PGE toggle, or INVPCID all): every unsync page under
    /// the vCPU's root is synced and its TLB flushed.
    pub fn flush_guest_tlb(&self, vcpu: &mut Vcpu) -> Result<(), Error> {
        let _ = vcpu;
        unimplemented!()
    }

    /// One guest access to `gva` through the CPU model, at the vCPU's CPL: TLB hit, or
    /// walk of the shadow tables, or exit to the MMU (which may reflect a page fault into
    /// the guest: [`Exit::GuestPageFault`]). Returns the guest-physical address reached.
    pub fn gva_access(&self, vcpu: &mut Vcpu, gva: Gva, kind: AccessKind) -> Result<Gpa, Exit> {
        let _ = (vcpu, gva, kind);
        unimplemented!()
    }

    /// A guest read of the 8-byte-aligned word at `gva`.
    pub fn gva_read_u64(&self, vcpu: &mut Vcpu, gva: Gva) -> Result<u64, Exit> {
        let _ = (vcpu, gva);
        unimplemented!()
    }

    /// A guest write of the 8-byte-aligned word at `gva`. A write to a write-protected
    /// guest page table is emulated by the MMU (guest memory updated, the shadow entries
    /// of that table fixed).
    pub fn gva_write_u64(&self, vcpu: &mut Vcpu, gva: Gva, val: u64) -> Result<(), Exit> {
        let _ = (vcpu, gva, val);
        unimplemented!()
    }

    /// Zap up to `n` shadow pages, oldest first, as KVM's shrinker and its shadow-page
    /// limit do (roots in use are invalidated and reloaded). Returns the pages zapped.
    pub fn reclaim_shadow_pages(&self, n: usize) -> usize {
        let _ = n;
        unimplemented!()
    }

    /// The longest reverse map now: the most SPTEs mapping one gfn.
    pub fn max_rmap_len(&self) -> usize {
        unimplemented!()
    }
}
