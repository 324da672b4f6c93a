//! The MMU a VM runs: the shadow MMU (direct mode or shadow paging) or the TDP MMU, behind
//! one set of operations, as KVM dispatches between `mmu.c` and `tdp_mmu.c`.
//!
//! Operations return [`Removed`]: the flush owed and, for the TDP MMU, the tables to
//! retire after it (the shadow MMU keeps its own list of zapped pages, freed by
//! [`Mmu::free_after_flush`]).
//!
//! Methods taking `&mut self` need the exclusive MMU lock; `&self` methods on the TDP MMU
//! run under the shared lock.

use alloc::sync::Arc;

use crate::flush::{Flush, Removed};
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::mmu::Invalidation;
use crate::shadow::{DirtyWrprot, ShadowMmu};
use crate::table::TableAllocator;
use crate::tdp::{self, TdpMmu};
use crate::types::{Gfn, Level, Pfn};

use super::{Vm, VmState};

/// Which MMU a VM uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MmuKind {
    /// KVM's shadow MMU driven in direct mode (EPT before the TDP MMU).
    #[default]
    ShadowDirect,
    /// KVM's TDP MMU, iterating as given (seed 002).
    Tdp(tdp::TdpIteration),
    /// KVM's shadow MMU shadowing the guest's own page tables (no EPT: what PVM and hosts
    /// without EPT/NPT run). Shadow tables use the legacy x86-64 format and map
    /// guest-virtual addresses; the VM needs guest memory (`Vm::with_guest_memory`).
    ShadowPaging,
}

/// The MMU of a VM.
pub enum Mmu<A: TableAllocator + 'static> {
    /// The shadow MMU.
    Shadow(ShadowMmu<Arc<A>>),
    /// The TDP MMU.
    Tdp(TdpMmu<A>),
}

impl<A: TableAllocator + 'static> Mmu<A> {
    /// The shadow MMU, if that is what runs.
    pub fn shadow(&self) -> Option<&ShadowMmu<Arc<A>>> {
        match self {
            Mmu::Shadow(m) => Some(m),
            Mmu::Tdp(_) => None,
        }
    }
    /// The TDP MMU, if that is what runs.
    pub fn tdp(&self) -> Option<&TdpMmu<A>> {
        match self {
            Mmu::Tdp(m) => Some(m),
            Mmu::Shadow(_) => None,
        }
    }

    pub(crate) fn invalidation_mut(&mut self) -> &mut Invalidation {
        match self {
            Mmu::Shadow(m) => &mut m.invalidation,
            Mmu::Tdp(m) => &mut m.invalidation,
        }
    }

    /// Whether anything waits for a flush.
    pub(crate) fn pending(&self, removed: &Removed) -> bool {
        !removed.is_empty() || self.shadow().is_some_and(|m| m.invalid_pages() != 0)
    }

    /// Free what the operation unlinked.
    ///
    /// # Safety
    /// A remote TLB flush has completed since the unlinks.
    pub(crate) unsafe fn free_after_flush(&mut self, removed: Removed) {
        match self {
            // SAFETY: forwarded.
            Mmu::Shadow(m) => unsafe { m.free_invalid_pages() },
            // SAFETY: forwarded.
            Mmu::Tdp(m) => unsafe { m.retire(removed) },
        }
    }

    /// Zap every leaf mapping `[start, end)` (exclusive lock).
    pub fn zap_gfn_range(&mut self, slots: &mut Memslots, start: Gfn, end: Gfn) -> Removed {
        match self {
            Mmu::Shadow(m) => Removed::flush_only(m.zap_gfn_range(slots, start, end)),
            Mmu::Tdp(m) => {
                let guard = tdp::pin();
                m.zap_leafs(start, end, u64::MAX, &guard).0
            }
        }
    }

    /// Zap everything, keeping the roots (exclusive lock; KVM's `kvm_mmu_zap_all`; the
    /// TDP MMU zaps each root in passes of increasing level).
    pub fn zap_all(&mut self, slots: &mut Memslots) -> Removed {
        match self {
            Mmu::Shadow(m) => Removed::flush_only(m.zap_all(slots)),
            Mmu::Tdp(m) => m.zap_all_roots(&tdp::pin()).0,
        }
    }

    /// Zap everything fast (exclusive lock; KVM's `kvm_mmu_zap_all_fast`): the TDP MMU
    /// invalidates its roots and makes a new one, which vCPUs must reload; old roots are
    /// zapped as soon as no vCPU runs on them. The shadow MMU zaps in place.
    pub fn zap_all_fast(&mut self, slots: &mut Memslots) -> Result<Removed, crate::Error> {
        Ok(match self {
            Mmu::Shadow(m) => Removed::flush_only(m.zap_all(slots)),
            Mmu::Tdp(m) => {
                let guard = tdp::pin();
                let mut removed = m.invalidate_all_roots(&guard)?;
                removed.merge(m.reap_invalid_roots(&guard).0);
                removed.flush.set();
                removed
            }
        })
    }

    /// Zap huge leaves over `[start, end)` (exclusive lock): the shadow MMU's way to force
    /// 4K mappings. The TDP MMU splits them first (see `Vm`); this zaps whatever the split
    /// could not (out of table memory), so no huge leaf survives.
    pub fn zap_huge(&mut self, slots: &mut Memslots, start: Gfn, end: Gfn) -> Removed {
        match self {
            Mmu::Shadow(m) => {
                Removed::flush_only(m.zap_gfn_range_levels(slots, start, end, Level::L2M))
            }
            Mmu::Tdp(m) => {
                m.zap_leafs_from(start, end, Level::L2M, u64::MAX, &tdp::pin())
                    .0
            }
        }
    }

    /// Write-protect every leaf of memslot `slot` (logging starts).
    pub fn write_protect_slot(&mut self, slots: &Memslots, slot: u32) -> Removed {
        let Some(s) = slots.by_id(slot) else {
            return Removed::default();
        };
        let (start, end) = (s.base_gfn, s.end_gfn());
        match self {
            Mmu::Shadow(m) => Removed::flush_only(m.slot_remove_write_access(slots, slot)),
            Mmu::Tdp(m) => {
                let guard = tdp::pin();
                m.write_protect_range(start, end, Level::L4K, false, u64::MAX, &guard)
                    .0
            }
        }
    }

    /// Write-protect exactly the pages whose bits are set in `masks` (64 pages a word from
    /// `base`): the pages GET harvested or CLEAR cleared. The shadow MMU chooses its method
    /// as configured (seed 004); the TDP MMU walks per mask or once, by density.
    pub fn write_protect_dirty(
        &mut self,
        slots: &Memslots,
        slot: u32,
        base: Gfn,
        masks: &[u64],
        nr_dirty: u64,
    ) -> (Removed, Option<DirtyWrprot>) {
        match self {
            Mmu::Shadow(m) => {
                let (f, how) = m.write_protect_dirty(slots, slot, base, masks, nr_dirty);
                (Removed::flush_only(f), Some(how))
            }
            Mmu::Tdp(m) => (m.clear_dirty(base, masks, &tdp::pin()), None),
        }
    }

    /// Write tracking of `gfn` starts: its leaves lose W and MMU-writable, huge leaves
    /// over it go (exclusive lock).
    pub fn track_write(&mut self, slots: &mut Memslots, gfn: Gfn) -> Removed {
        match self {
            Mmu::Shadow(m) => Removed::flush_only(
                m.zap_gfn_range_levels(slots, gfn, Gfn(gfn.0 + 1), Level::L2M)
                    | m.rmap_write_protect(slots, gfn, Level::L4K, true),
            ),
            Mmu::Tdp(m) => {
                let guard = tdp::pin();
                m.zap_leafs(gfn, Gfn(gfn.0 + 1), u64::MAX, &guard).0
            }
        }
    }

    /// Clear accessed bits over `[start, end)`; whether any was young.
    pub fn age(&mut self, slots: &Memslots, start: Gfn, end: Gfn) -> bool {
        match self {
            Mmu::Shadow(m) => m.age_gfn_range(slots, start, end),
            Mmu::Tdp(m) => m.age_range(start, end, &tdp::pin()),
        }
    }

    /// Whether any leaf over `[start, end)` is young.
    pub fn test_age(&self, slots: &Memslots, start: Gfn, end: Gfn) -> bool {
        match self {
            Mmu::Shadow(m) => m.test_age_gfn_range(slots, start, end),
            Mmu::Tdp(m) => m.test_age_range(start, end, &tdp::pin()),
        }
    }

    /// The host remapped `gfn` to `new_pfn` (exclusive lock).
    pub fn change_pte(
        &mut self,
        slots: &mut Memslots,
        gfn: Gfn,
        new_pfn: Pfn,
        writable: bool,
    ) -> Removed {
        match self {
            Mmu::Shadow(m) => Removed::flush_only(m.change_pte(slots, gfn, new_pfn, writable)),
            Mmu::Tdp(m) => m.change_pte(gfn, new_pfn, writable, &tdp::pin()),
        }
    }

    /// Make huge mappings possible again over `[start, end)` after logging stops: the
    /// shadow MMU zaps the 4K leaves in huge-eligible 2 MiB ranges, the TDP MMU replaces
    /// their tables by huge leaves in place.
    pub fn recover_huge<H: HostMemory + ?Sized>(
        &mut self,
        slots: &mut Memslots,
        host: &H,
        start: Gfn,
        end: Gfn,
        max_level: Level,
    ) -> Removed {
        match self {
            Mmu::Shadow(m) => {
                let mut flush = Flush::NONE;
                let mut g = start.align_down(Level::L2M);
                while g < end {
                    let next = Gfn(g.0 + Level::L2M.pages());
                    let huge = slots.lookup(g).is_some_and(|s| {
                        s.contains(Gfn(next.0 - 1))
                            && s.max_mapping_level(g, max_level) >= Level::L2M
                            && host
                                .translate(s.gfn_to_hva(g))
                                .is_some_and(|h| h.level >= Level::L2M)
                    });
                    if huge {
                        flush |= m.zap_gfn_range(slots, g, next);
                    }
                    g = next;
                }
                Removed::flush_only(flush)
            }
            Mmu::Tdp(m) => m.recover_huge_pages(slots, host, start, end, &tdp::pin()),
        }
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// Perform the flush an operation owes, then free the tables it unlinked (KVM's
    /// `kvm_mmu_commit_zap_page`). Exclusive lock.
    #[inline]
    pub(crate) fn commit(&self, st: &mut VmState<A>, removed: Removed) {
        if let Mmu::Shadow(m) = &mut st.mmu {
            if core::mem::take(&mut m.roots_invalidated) {
                // Shadow paging zapped roots vCPUs run on: they load new ones first.
                self.request_reload();
            }
        }
        if !st.mmu.pending(&removed) {
            return;
        }
        self.flush_remote_tlbs();
        // SAFETY: the flush above made every vCPU leave guest mode after the unlinks.
        unsafe { st.mmu.free_after_flush(removed) };
    }

    /// [`commit`](Self::commit) for a TDP operation run under the shared lock.
    pub(crate) fn commit_tdp(&self, tdp: &TdpMmu<A>, removed: Removed) {
        if !removed.is_empty() {
            self.flush_remote_tlbs();
            // SAFETY: flushed after the unlinks.
            unsafe { tdp.retire(removed) };
        }
    }
}
