//! The one place the VM dispatches between its MMUs: the shadow MMU (direct mode or
//! shadow paging) or the TDP MMU, behind one set of operations, as KVM dispatches between
//! `mmu.c` and `tdp_mmu.c`. No other file matches on [`Mmu`]; adding an MMU operation
//! means one method here plus each MMU's implementation.
//!
//! Operations return [`Removed`]: the flush owed and, for the TDP MMU, the tables to
//! retire after it (the shadow MMU keeps its own list of zapped pages, freed by
//! [`Mmu::free_after_flush`]).
//!
//! # Locking
//! Methods taking `&mut self` need the exclusive MMU lock. The lock an operation needs
//! differs by MMU where KVM's does (a TDP fault or aging runs inside the fault gate, a
//! shadow one under the exclusive lock): those operations are the `Vm` methods at the end
//! of this file, which take the right lock themselves.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::Vcpu;
use crate::audit::{AuditError, AuditReport};
use crate::dirty::DirtyMasks;
use crate::error::Error;
use crate::flush::Removed;
use crate::guest::GuestMemory;
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::mmu::{FaultOutcome, Invalidation, MmuStats};
use crate::shadow::{DirtyWrprot, PagingStats, ShadowMmu};
use crate::table::TableAllocator;
use crate::tdp::{self, TdpMmu, TdpPage};
use crate::types::{ErrorCode, Gfn, Gpa, Level, Pfn};

use super::dirty_log::DirtyRoom;
use super::{Vm, VmConfig, VmState};

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
    /// The MMU `config` asks for, its tables from `alloc`.
    pub(crate) fn new(config: &VmConfig, alloc: &Arc<A>) -> Result<Self, Error> {
        Ok(match config.mmu {
            MmuKind::ShadowDirect => Mmu::Shadow(ShadowMmu::new(
                alloc.clone(),
                config.max_level,
                config.algorithms,
            )?),
            MmuKind::Tdp(mode) => Mmu::Tdp(TdpMmu::new(alloc.clone(), mode, config.max_level)?),
            MmuKind::ShadowPaging => Mmu::Shadow(ShadowMmu::new_paging(
                alloc.clone(),
                config.max_level,
                config.algorithms,
                config.paging,
            )),
        })
    }

    /// The TDP MMU, mutably, if that is what runs (exclusive lock).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn tdp_mut(&mut self) -> Option<&mut TdpMmu<A>> {
        match self {
            Mmu::Tdp(m) => Some(m),
            Mmu::Shadow(_) => None,
        }
    }

    /// The shadow MMU, mutably, if that is what runs.
    pub(crate) fn shadow_mut(&mut self) -> Option<&mut ShadowMmu<Arc<A>>> {
        match self {
            Mmu::Shadow(m) => Some(m),
            Mmu::Tdp(_) => None,
        }
    }

    /// The root a new vCPU loads, with a reference taken on it (the TDP MMU counts its
    /// roots' users; the shadow MMU's direct root lives as long as the MMU, and under
    /// shadow paging a vCPU loads its root when its paging registers are set).
    pub(crate) fn take_root(&self) -> Pfn {
        match self {
            Mmu::Shadow(m) => m.root_frame(),
            Mmu::Tdp(m) => m.get_root(),
        }
    }

    /// Give back a reference [`take_root`](Self::take_root) took.
    pub(crate) fn put_root(&self, root: Pfn) {
        if let Mmu::Tdp(m) = self {
            m.put_root(root);
        }
    }

    /// Whether a vCPU may keep running on `root` (the TDP MMU invalidates its roots in a
    /// fast zap; the shadow MMU's direct root never is).
    pub(crate) fn is_valid_root(&self, root: Pfn) -> bool {
        match self {
            Mmu::Shadow(_) => true,
            Mmu::Tdp(m) => m.is_valid_root(root),
        }
    }

    /// Move `vcpu` from an invalidated root to the current one (shared lock). Returns
    /// whether it gave an old root back, so invalid roots may now be free to zap
    /// ([`reap_invalid_roots`](Self::reap_invalid_roots)).
    pub(crate) fn reload_root(&self, vcpu: &mut Vcpu) -> bool {
        let Mmu::Tdp(m) = self else {
            return false;
        };
        if m.is_valid_root(vcpu.root()) {
            return false;
        }
        let new = m.get_root();
        m.put_root(vcpu.root());
        vcpu.cpu.set_root(new);
        true
    }

    /// Zap the invalidated roots no vCPU holds any more (exclusive lock).
    pub(crate) fn reap_invalid_roots(&mut self) -> Removed {
        match self {
            Mmu::Shadow(_) => Removed::default(),
            Mmu::Tdp(m) => m.reap_invalid_roots(&tdp::pin()).0,
        }
    }

    /// Give back every root `vcpu` holds (KVM's vCPU destruction; exclusive lock).
    pub(crate) fn release_vcpu(&mut self, vcpu: &mut Vcpu) -> Removed {
        match self {
            Mmu::Tdp(m) => {
                m.put_root(vcpu.root());
                m.reap_invalid_roots(&tdp::pin()).0
            }
            Mmu::Shadow(m) => {
                if m.is_paging() {
                    for r in vcpu
                        .proot
                        .take()
                        .into_iter()
                        .chain(vcpu.prev_roots.drain(..))
                    {
                        m.put_paging_root(&r);
                    }
                }
                Removed::default()
            }
        }
    }

    /// Whether a zap invalidated roots vCPUs run on, so they must load new ones before
    /// they run again (shadow paging); reading clears it.
    pub(crate) fn take_roots_invalidated(&mut self) -> bool {
        match self {
            Mmu::Shadow(m) => core::mem::take(&mut m.roots_invalidated),
            Mmu::Tdp(_) => false,
        }
    }

    /// Zap the leaves of `[start, end)` for a while (exclusive lock). Returns where to
    /// resume when the walk stopped to let the lock go (the TDP MMU stops every
    /// [`tdp::YIELD_BUDGET`] positions, as KVM's `tdp_mmu_iter_cond_resched`; the shadow
    /// MMU's zap by reverse maps finishes at once).
    pub(crate) fn zap_range_step(
        &mut self,
        slots: &mut Memslots,
        start: Gfn,
        end: Gfn,
    ) -> (Removed, Option<Gfn>) {
        match self {
            Mmu::Tdp(m) => m.zap_leafs(start, end, tdp::YIELD_BUDGET, &tdp::pin()),
            Mmu::Shadow(m) => (
                Removed::flush_only(m.zap_gfn_range(slots, start, end)),
                None,
            ),
        }
    }

    /// Work counters, the tables in use and the reverse-map descriptors in use.
    pub(crate) fn stats(&self) -> (MmuStats, usize, usize) {
        match self {
            Mmu::Shadow(m) => (m.stats(), m.pages().len(), m.pool().in_use()),
            Mmu::Tdp(m) => {
                let t = m.stats();
                let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
                // Fault counts are per vCPU (`Vcpu::exits`) on the TDP MMU.
                let s = MmuStats {
                    spurious_faults: ld(&t.spurious_faults) + ld(&t.retried_faults),
                    pages_freed: ld(&t.pages_freed),
                    ..MmuStats::default()
                };
                (s, m.live_pages() as usize, 0)
            }
        }
    }

    /// Shadow paging's counters (zero on a direct MMU).
    pub(crate) fn paging_stats(&self) -> PagingStats {
        match self {
            Mmu::Shadow(m) => m.paging_stats(),
            Mmu::Tdp(_) => PagingStats::default(),
        }
    }

    /// The longest reverse map (the TDP MMU has none: 0).
    pub(crate) fn max_rmap_len(&self, slots: &Memslots) -> usize {
        match self {
            Mmu::Shadow(m) => m.max_rmap_len(slots),
            Mmu::Tdp(_) => 0,
        }
    }

    /// Check the MMU's invariants against the memslots and the host (and, under shadow
    /// paging, the guest's tables in `guest`); exclusive lock.
    pub(crate) fn audit<H: HostMemory + ?Sized>(
        &self,
        slots: &Memslots,
        host: &H,
        bitmap_logging: bool,
        guest: Option<&dyn GuestMemory>,
    ) -> Result<AuditReport, AuditError> {
        match self {
            Mmu::Shadow(m) => {
                let rep = crate::audit::audit(slots, m, host, bitmap_logging)?;
                if let (true, Some(g)) = (m.is_paging(), guest) {
                    crate::audit::audit_paging(slots, m, g)?;
                }
                Ok(rep)
            }
            Mmu::Tdp(m) => crate::audit::audit_tdp(slots, m, host, bitmap_logging),
        }
    }

    /// Tear everything down, roots included.
    ///
    /// # Safety
    /// No vCPU will run again.
    pub(crate) unsafe fn destroy(&mut self, slots: &mut Memslots) {
        match self {
            // SAFETY: forwarded.
            Mmu::Shadow(m) => unsafe { m.destroy(slots) },
            Mmu::Tdp(m) => {
                // SAFETY: forwarded.
                unsafe { m.destroy() };
                // Give the memory back now rather than at some later pin.
                tdp::quiesce();
            }
        }
    }

    /// The shadow MMU, if that is what runs.
    pub fn shadow(&self) -> Option<&ShadowMmu<Arc<A>>> {
        match self {
            Mmu::Shadow(m) => Some(m),
            Mmu::Tdp(_) => None,
        }
    }
    /// The TDP MMU, if that is what runs.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
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
    pub fn zap_all_fast(&mut self, slots: &mut Memslots) -> Result<Removed, Error> {
        let reserved = self.reserve_fast_zap()?;
        Ok(self.zap_all_fast_reserved(slots, reserved))
    }

    /// The table memory a fast zap needs (the TDP MMU's new root; nothing for the shadow
    /// MMU), allocated before an operation changes anything, so that running out of it
    /// leaves the VM as it was.
    pub(crate) fn reserve_fast_zap(&self) -> Result<Option<TdpPage>, Error> {
        match self {
            Mmu::Shadow(_) => Ok(None),
            Mmu::Tdp(m) => m.alloc_root().map(Some),
        }
    }

    /// [`zap_all_fast`](Self::zap_all_fast) with its memory from
    /// [`reserve_fast_zap`](Self::reserve_fast_zap): cannot fail.
    pub(crate) fn zap_all_fast_reserved(
        &mut self,
        slots: &mut Memslots,
        reserved: Option<TdpPage>,
    ) -> Removed {
        match self {
            Mmu::Shadow(m) => Removed::flush_only(m.zap_all(slots)),
            Mmu::Tdp(m) => {
                let guard = tdp::pin();
                let page = reserved.expect("reserve_fast_zap gives the TDP MMU a root");
                let mut removed = m.invalidate_all_roots_with(page, &guard);
                removed.merge(m.reap_invalid_roots(&guard).0);
                removed.flush.set();
                // vCPUs must move to the new root before they run again.
                removed.reload = true;
                removed
            }
        }
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

    /// Write-protect exactly the pages whose bits are set in `masks`: the pages GET harvested or CLEAR cleared. The shadow MMU chooses its method
    /// as configured (seed 004); the TDP MMU walks per mask or once, by density.
    pub fn write_protect_dirty(
        &mut self,
        slots: &Memslots,
        slot: u32,
        masks: &DirtyMasks<'_>,
    ) -> (Removed, Option<DirtyWrprot>) {
        match self {
            Mmu::Shadow(m) => {
                let (f, how) = m.write_protect_dirty(slots, slot, masks);
                (Removed::flush_only(f), Some(how))
            }
            Mmu::Tdp(m) => (m.clear_dirty(masks, &tdp::pin()), None),
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

    /// Clear accessed bits over `[start, end)`; whether any was young. In the lock
    /// [`Vm::with_aging_lock`] takes.
    pub(crate) fn age(&self, slots: &Memslots, start: Gfn, end: Gfn) -> bool {
        match self {
            Mmu::Shadow(m) => m.age_gfn_range(slots, start, end),
            Mmu::Tdp(m) => m.age_range(start, end, &tdp::pin()),
        }
    }

    /// Whether any leaf over `[start, end)` is young. In the lock
    /// [`Vm::with_aging_lock`] takes.
    pub(crate) fn test_age(&self, slots: &Memslots, start: Gfn, end: Gfn) -> bool {
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
                Removed::flush_only(m.recover_huge_pages(slots, host, start, end, max_level))
            }
            Mmu::Tdp(m) => m.recover_huge_pages(slots, host, start, end, &tdp::pin()),
        }
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// Perform the flush an operation owes, then free the tables it unlinked (KVM's
    /// `kvm_mmu_commit_zap_page`); have vCPUs load new roots if it invalidated theirs.
    /// Exclusive lock.
    #[inline]
    pub(crate) fn commit(&self, st: &mut VmState<A>, removed: Removed) {
        if st.mmu.take_roots_invalidated() || removed.reload {
            self.request_reload();
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

    /// The MMU's fault handler for a fault `vcpu` took at `gpa` (checked by the caller):
    /// the TDP MMU maps inside the fault gate, in parallel with other vCPUs' faults; the
    /// shadow MMU under the exclusive lock. A page a write made writable in a logging
    /// slot is logged before the lock goes, in room taken before the fault
    /// ([`Error::DirtyRingFull`], nothing mapped, when the vCPU's ring has none).
    pub(super) fn mmu_page_fault(
        &self,
        vcpu: &Vcpu,
        gpa: Gpa,
        ec: ErrorCode,
    ) -> Result<FaultOutcome, Error> {
        // Dropped after the lock guards below (declared first): unused room goes back
        // outside the lock.
        let room = DirtyRoom::take(vcpu)?;
        if let MmuKind::Tdp(_) = self.config.mmu {
            let guard = self.lock_gated(Some(vcpu.id));
            let Mmu::Tdp(m) = &guard.mmu else {
                unreachable!("the VM's MMU kind does not change");
            };
            return self.tdp_page_fault(m, &guard.slots, vcpu, gpa, ec, room);
        }
        let mut guard = self.lock();
        self.page_fault_under(&mut guard, vcpu, gpa, ec, room)
    }

    /// [`mmu_page_fault`](Self::mmu_page_fault) under the exclusive lock, held by the
    /// caller (an access that lost too many races, see `vm/fault.rs`, or any fault of
    /// the shadow MMU), with the room taken.
    pub(super) fn page_fault_under(
        &self,
        st: &mut VmState<A>,
        vcpu: &Vcpu,
        gpa: Gpa,
        ec: ErrorCode,
        room: DirtyRoom,
    ) -> Result<FaultOutcome, Error> {
        let m = match &mut st.mmu {
            // The exclusive lock allows all that the fault gate does.
            Mmu::Tdp(m) => return self.tdp_page_fault(m, &st.slots, vcpu, gpa, ec, room),
            Mmu::Shadow(m) => m,
        };
        let fault = m.direct_page_fault(&mut st.slots, &self.host, gpa, ec)?;
        if let Some(d) = fault.dirty {
            let slot = st.slots.by_id(d.slot).expect("the fault found this slot");
            room.log(d, slot.dirty_bitmap());
        }
        self.commit(st, Removed::flush_only(fault.flush));
        Ok(fault.outcome)
    }

    /// The TDP MMU's fault handler, in the fault gate or under the exclusive lock.
    fn tdp_page_fault(
        &self,
        m: &TdpMmu<A>,
        slots: &Memslots,
        vcpu: &Vcpu,
        gpa: Gpa,
        ec: ErrorCode,
        room: DirtyRoom,
    ) -> Result<FaultOutcome, Error> {
        let epoch = tdp::pin();
        let Some(root) = m.valid_root(vcpu.root(), &epoch) else {
            // The vCPU's root was invalidated; it reloads before its next entry.
            return Ok(FaultOutcome::Spurious);
        };
        let fault = m.map(slots, &self.host, root, gpa, ec, &epoch)?;
        if let Some(d) = fault.dirty {
            let slot = slots.by_id(d.slot).expect("the fault found this slot");
            room.log(d, slot.dirty_bitmap());
        }
        drop(epoch);
        self.commit_tdp(m, fault.removed);
        Ok(fault.outcome)
    }

    /// Run `f` on the memslots and the MMU in the lock aging needs: the TDP MMU ages
    /// without the MMU lock, inside the fault gate (which keeps memslots and roots from
    /// changing, as KVM's SRCU and RCU do; A is cleared by compare-exchange and a lost
    /// one is tolerated); the shadow MMU under the exclusive lock.
    pub(super) fn with_aging_lock<R>(&self, f: impl FnOnce(&Memslots, &Mmu<A>) -> R) -> R {
        if let MmuKind::Tdp(_) = self.config.mmu {
            let st = self.lock_gated(None);
            f(&st.slots, &st.mmu)
        } else {
            let st = self.lock();
            f(&st.slots, &st.mmu)
        }
    }

    /// Logging starts on `[start, end)`: the TDP MMU splits its huge leaves there eagerly
    /// under the shared lock, allocating tables outside it (nothing for the shadow MMU,
    /// which zaps them instead). What it cannot get tables for stays huge, for the caller
    /// to zap.
    pub(super) fn split_huge_for_logging(&self, start: Gfn, end: Gfn) {
        let mut prealloc = Vec::new();
        let mut from = start;
        loop {
            let guard = self.lock_shared();
            let Mmu::Tdp(m) = &guard.mmu else {
                break;
            };
            let epoch = tdp::pin();
            match m.split_huge_pages(from, end, &mut prealloc, &epoch) {
                tdp::SplitProgress::Done(removed) => {
                    drop(epoch);
                    self.commit_tdp(m, removed);
                    break;
                }
                tdp::SplitProgress::NeedPages {
                    pages,
                    resume,
                    removed,
                } => {
                    drop(epoch);
                    self.commit_tdp(m, removed);
                    drop(guard);
                    // Out of the lock: the allocator may be slow (or sleep, in a kernel).
                    let before = prealloc.len();
                    for _ in 0..pages {
                        match TdpPage::new(&*self.alloc, Level::L2M, Gfn(0)) {
                            Some(p) => prealloc.push(p),
                            None => break,
                        }
                    }
                    if prealloc.len() == before {
                        // Out of table memory: what is left huge is zapped instead (the
                        // next faults map it at 4K).
                        break;
                    }
                    from = resume;
                }
            }
        }
        for p in prealloc {
            // SAFETY: never linked: the frames were allocated above and only we know them.
            unsafe { self.alloc.free_table(p.frame()) };
        }
    }
}
