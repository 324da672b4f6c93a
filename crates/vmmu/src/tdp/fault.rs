//! The TDP fault path (KVM's `kvm_tdp_mmu_map`), under the shared MMU lock.
//!
//! The iterator walks toward the gfn; missing tables are linked with a compare-exchange
//! (the loser frees its unpublished table and retries), a huge page in the way of a
//! smaller mapping is replaced by an empty table, a table where a huge page now fits is
//! frozen, taken out and replaced by the huge leaf, and the leaf is installed with a
//! compare-exchange against the value read.

use crossbeam_epoch::{Guard, Owned};

use super::iter::{TdpIter, TdpIteration};
use super::page::TdpPage;
use super::{Removed, TdpMmu};
use crate::error::Error;
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::mmu::{plan_fault, DirtyGfn, FaultOutcome, FaultPlan};
use crate::spte::{SpteFormat, FROZEN};
use crate::table::TableAllocator;
use crate::types::{ErrorCode, Gpa, Level};

/// The result of a TDP fault.
#[derive(Debug)]
pub struct TdpFault {
    /// What happened.
    pub outcome: FaultOutcome,
    /// Tables taken out and the flush owed.
    pub removed: Removed,
    /// A page to log as dirty.
    pub dirty: Option<DirtyGfn>,
}

impl TdpFault {
    fn new(outcome: FaultOutcome) -> Self {
        TdpFault {
            outcome,
            removed: Removed::default(),
            dirty: None,
        }
    }
}

impl<A: TableAllocator + 'static> TdpMmu<A> {
    /// Handle a fault at `gpa` on the tables under `root` (the faulting vCPU's root).
    pub fn map<H: HostMemory + ?Sized>(
        &self,
        slots: &Memslots,
        host: &H,
        root: &TdpPage,
        gpa: Gpa,
        ec: ErrorCode,
        guard: &Guard,
    ) -> Result<TdpFault, Error> {
        // No shared counter is touched on the common path: with faults running in
        // parallel, one would bounce its cache line between the faulting CPUs.
        use core::sync::atomic::Ordering::Relaxed;
        let gfn = gpa.gfn();
        let write = ec.contains(ErrorCode::WRITE);
        let (level, new, dirty) =
            match plan_fault(slots, host, gpa, ec, self.max_level, &self.invalidation)? {
                FaultPlan::Exit(outcome) => return Ok(TdpFault::new(outcome)),
                FaultPlan::Mmio(mmio) => (Level::L4K, mmio, None),
                FaultPlan::Map {
                    level, spte, dirty, ..
                } => (level, spte, dirty),
            };
        let used = self.mode == TdpIteration::UsedEntries;
        let mut removed = Removed::default();
        let mut it = TdpIter::new(
            root,
            level,
            gfn,
            crate::types::Gfn(gfn.0 + 1),
            TdpIteration::ScanAll,
            u64::MAX,
            guard,
        );
        while it.valid() {
            let s = it.spte;
            if s.is_frozen() {
                // Another thread is changing this entry: let the vCPU retry.
                self.stats.retried_faults.fetch_add(1, Relaxed);
                return Ok(TdpFault {
                    outcome: FaultOutcome::Spurious,
                    removed,
                    dirty: None,
                });
            }
            let (page, i) = (it.page(), it.index());
            if it.level() == level {
                if s.is_shadow_present()
                    && s.is_leaf(level)
                    && s.pfn() == new.pfn()
                    && (!write || s.is_writable())
                {
                    self.stats.spurious_faults.fetch_add(1, Relaxed);
                    return Ok(TdpFault {
                        outcome: FaultOutcome::Spurious,
                        removed,
                        dirty: None,
                    });
                }
                if s.is_shadow_present() && !s.is_leaf(level) {
                    // A table where a huge page now fits: take the subtree out.
                    if page.table().compare_exchange(i, s, FROZEN).is_err() {
                        it.reread();
                        continue;
                    }
                    self.remove_subtree(page, i, s, false, &mut removed, guard);
                    page.table().set(i, new);
                } else if page.table().compare_exchange(i, s, new).is_err() {
                    it.reread();
                    continue;
                } else if s.is_shadow_present() {
                    // Replaced a leaf (new permissions or a new pfn).
                    removed.flush.set();
                }
                if used && !s.is_shadow_present() && new.is_shadow_present() {
                    page.set_used(i);
                }
                if new.is_mmio() {
                    return Ok(TdpFault {
                        outcome: FaultOutcome::Mmio,
                        removed,
                        dirty: None,
                    });
                }
                return Ok(TdpFault {
                    outcome: FaultOutcome::Mapped(level),
                    removed,
                    dirty,
                });
            }
            if s.is_shadow_present() && !s.is_leaf(it.level()) {
                it.next();
                continue;
            }
            // Link a new table here: over nothing, an old MMIO SPTE, or a huge page that
            // must become smaller mappings (its translation goes: flush).
            let below = it.level().below().expect("above the target level");
            let child = Owned::new(self.alloc_page(below, it.gfn())?).into_shared(guard);
            // SAFETY: just created, not yet visible to anyone.
            let frame = unsafe { child.deref() }.frame;
            if !page.claim_child(i, child, guard) {
                // Another fault is linking a table here.
                // SAFETY: never published.
                unsafe { self.free_unpublished(child) };
                it.reread();
                continue;
            }
            if page
                .table()
                .compare_exchange(i, s, SpteFormat::EPT.nonleaf(frame))
                .is_err()
            {
                page.clear_child(i);
                removed.push(child);
                it.reread();
                continue;
            }
            if used && !s.is_shadow_present() {
                page.set_used(i);
            }
            if s.is_shadow_present() {
                removed.flush.set();
            }
            it.reread();
            it.next();
        }
        // The walk ended without reaching the level (a racing change): retry.
        self.stats.retried_faults.fetch_add(1, Relaxed);
        Ok(TdpFault {
            outcome: FaultOutcome::Spurious,
            removed,
            dirty: None,
        })
    }

    /// Free a page that was never linked anywhere.
    ///
    /// # Safety
    /// Nothing else has seen `page`.
    pub(crate) unsafe fn free_unpublished(&self, page: crossbeam_epoch::Shared<'_, TdpPage>) {
        // SAFETY: forwarded from the caller: the page is ours alone.
        let owned = unsafe { page.into_owned() };
        // SAFETY: the frame was allocated for this page and nobody else references it.
        unsafe { self.alloc.free_table(owned.frame) };
        self.stats
            .pages_freed
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }
}
