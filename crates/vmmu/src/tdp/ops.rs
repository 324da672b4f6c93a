//! TDP MMU operations over gfn ranges, each a loop body over the one iterator: write
//! protection, dirty clearing by 64-page mask, aging, change_pte, eager huge-page split
//! and in-place huge-page recovery (KVM's `wrprot_gfn_range`,
//! `clear_dirty_pt_masked`, `age_gfn_range`, `tdp_mmu_split_huge_pages_root`,
//! `recover_huge_pages_range`).
//!
//! # Locking
//! `change_pte` and `clear_dirty` need the exclusive lock and take `&mut self`; their
//! writes are the funnel's exclusive ones. The others take `&self` and are correct under
//! the shared lock: every change is a compare-exchange against the value read; on
//! failure the body re-reads and retries (aging gives up, as KVM tolerates a lost
//! accessed-bit update).

use alloc::vec::Vec;

use super::EpochGuard;
use crossbeam_epoch::Owned;

use super::iter::Step;
use super::page::TdpPage;
use super::spte_write::Link;
use super::{Removed, TdpMmu};
use crate::dirty::DirtyMasks;
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::spte::{bits, LeafAttrs, Spte, SpteFormat};
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, Pfn, SPTE_ENT_PER_PAGE};

/// What an eager split needs to go on.
#[derive(Debug)]
pub enum SplitProgress {
    /// Done.
    Done(Removed),
    /// Out of preallocated tables: allocate about this many outside the lock and call
    /// again from `resume`.
    NeedPages {
        /// Tables to allocate.
        pages: usize,
        /// Where to start again.
        resume: Gfn,
        /// What was done so far.
        removed: Removed,
    },
}

impl<A: TableAllocator + 'static> TdpMmu<A> {
    /// Write-protect every leaf of level `min_level` and above mapping `[start, end)`.
    /// With `track`, clear MMU-writable too. Returns the flush owed and a resume point if
    /// the walk stopped to yield.
    pub fn write_protect_range(
        &self,
        start: Gfn,
        end: Gfn,
        min_level: Level,
        track: bool,
        budget: u64,
        guard: &EpochGuard,
    ) -> (Removed, Option<Gfn>) {
        let mut removed = Removed::default();
        let w = self.walk(start..end, min_level, budget, false, guard, |it| {
            let s = it.spte;
            let protect = s.is_shadow_present()
                && s.is_leaf(it.level())
                && (s.is_writable() || (track && s.is_mmu_writable()));
            if !protect {
                return Step::Next;
            }
            let new = if track {
                s.write_tracked()
            } else {
                s.write_protected()
            };
            if !self.set_spte_atomic(it.page(), it.index(), s, new, &mut removed, guard) {
                return Step::Retry;
            }
            if s.is_writable() {
                removed.flush.set();
            }
            Step::Next
        });
        (removed, w.resume)
    }

    /// Write-protect the 4K leaves of the gfns set in `masks` (KVM's
    /// `kvm_tdp_mmu_clear_dirty_pt_masked` in write-protect mode; like it, under the
    /// exclusive lock, so a plain store suffices where no CPU can set A/D). The walk goes
    /// down to the 2M level only; each last-level table under it is read where the masks
    /// say, one mask word per 64 entries. Dirty words that are dense over their range get
    /// one walk over it all; sparse ones a short walk each.
    pub fn clear_dirty(&mut self, masks: &DirtyMasks<'_>, guard: &EpochGuard) -> Removed {
        let mmu = self.exclusive();
        let mut removed = Removed::default();
        if masks.nr == 0 {
            return removed;
        }
        let span = |(at, m): (Gfn, u64)| {
            (
                Gfn(at.0 + m.trailing_zeros() as u64),
                Gfn(at.0 + 64 - m.leading_zeros() as u64),
            )
        };
        let mut protect = |start: Gfn, end: Gfn| {
            mmu.walk(start..end, Level::L2M, u64::MAX, false, guard, |it| {
                if it.level() != Level::L2M || !masks.any_in_table(it.gfn()) {
                    return Step::Next;
                }
                let Some(pt) = it.child_table() else {
                    return Step::Next;
                };
                for w in 0..SPTE_ENT_PER_PAGE / 64 {
                    let g = pt.gfn.0 + 64 * w as u64;
                    if g + 64 <= start.0 || g >= end.0 {
                        continue;
                    }
                    // Only this walk's range: the next walk may start in the same table.
                    let mut set = masks.bits_from(Gfn(g));
                    if start.0 > g {
                        set &= u64::MAX << (start.0 - g);
                    }
                    if end.0 < g + 64 {
                        set &= u64::MAX >> (g + 64 - end.0);
                    }
                    while set != 0 {
                        let i = w * 64 + set.trailing_zeros() as usize;
                        set &= set - 1;
                        let s = pt.table().get(i);
                        if s.is_shadow_present() && s.is_writable() {
                            mmu.clear_bits(pt, i, s, bits::WRITABLE);
                            removed.flush.set();
                        }
                    }
                }
                Step::Next
            });
        };
        let first = masks.iter().next().map(span).expect("nr > 0").0;
        let last = masks.iter().next_back().map(span).expect("nr > 0").1;
        let words = masks.iter().count() as u64;
        // A walk visits every 2M entry of its range: one walk when the dirty words are
        // at least a quarter as many as those entries, else one per word.
        if words * 4 > (last.0 - first.0) / SPTE_ENT_PER_PAGE as u64 {
            protect(first, last);
        } else {
            for m in masks.iter() {
                let (start, end) = span(m);
                protect(start, end);
            }
        }
        removed
    }

    /// Clear the accessed bits of the leaves mapping `[start, end)`; whether any was
    /// young. A lost compare-exchange is not retried (KVM tolerates it).
    pub fn age_range(&self, start: Gfn, end: Gfn, guard: &EpochGuard) -> bool {
        let mut young = false;
        // Clearing A changes no translation and unlinks nothing: nothing is owed.
        let mut removed = Removed::default();
        self.walk(start..end, Level::L4K, u64::MAX, false, guard, |it| {
            let s = it.spte;
            if s.is_shadow_present() && s.is_leaf(it.level()) && SpteFormat::EPT.is_accessed(s) {
                young = true;
                let new = s.without_bits(SpteFormat::EPT.accessed());
                let _ = self.set_spte_atomic(it.page(), it.index(), s, new, &mut removed, guard);
            }
            Step::Next
        });
        debug_assert!(removed.is_empty());
        young
    }

    /// Whether any leaf mapping `[start, end)` is young; stops at the first.
    pub fn test_age_range(&self, start: Gfn, end: Gfn, guard: &EpochGuard) -> bool {
        self.walk(start..end, Level::L4K, u64::MAX, false, guard, |it| {
            let s = it.spte;
            if s.is_shadow_present() && s.is_leaf(it.level()) && SpteFormat::EPT.is_accessed(s) {
                Step::Stop
            } else {
                Step::Next
            }
        })
        .stopped
    }

    /// The host now maps `gfn` at `new_pfn` (exclusive lock): point 4K leaves there
    /// read-only, or zap them when the new host mapping is writable; huge leaves over
    /// `gfn` are zapped. KVM's `kvm_tdp_mmu_set_spte_gfn`, removed from Linux in 2024
    /// (6.10) with the `.change_pte` notifier: reached only through the compatibility
    /// option `VmConfig::change_pte`.
    pub fn change_pte(
        &mut self,
        gfn: Gfn,
        new_pfn: Pfn,
        writable: bool,
        guard: &EpochGuard,
    ) -> Removed {
        let mmu = self.exclusive();
        let mut removed = Removed::default();
        mmu.walk(
            gfn..Gfn(gfn.0 + 1),
            Level::L4K,
            u64::MAX,
            false,
            guard,
            |it| {
                let s = it.spte;
                if s.is_shadow_present() && s.is_leaf(it.level()) {
                    if writable || it.level() > Level::L4K {
                        mmu.zap_spte(it.page(), it.index(), s, &mut removed, guard);
                    } else {
                        let new = s.with_pfn(new_pfn).without_bits(
                            bits::WRITABLE | bits::HOST_WRITABLE | SpteFormat::EPT.accessed(),
                        );
                        mmu.set_spte(it.page(), it.index(), s, new, &mut removed, guard);
                        removed.flush.set();
                    }
                }
                Step::Next
            },
        );
        removed
    }

    /// Split every huge leaf mapping `[start, end)` down to 4K (eager split when dirty
    /// logging starts), taking tables from `prealloc`, which the caller fills outside the
    /// lock. The mappings do not change, so no flush is owed by the split itself.
    /// Crate-private: the pages of `prealloc` are linked into the tables, so they must be
    /// fresh pages of this MMU's allocator, never linked (the VM allocates them).
    pub(crate) fn split_huge_pages(
        &self,
        start: Gfn,
        end: Gfn,
        prealloc: &mut Vec<TdpPage>,
        guard: &EpochGuard,
    ) -> SplitProgress {
        let mut removed = Removed::default();
        let mut need = None;
        self.walk(start..end, Level::L2M, u64::MAX, true, guard, |it| {
            let s = it.spte;
            let level = it.level();
            if !(s.is_shadow_present() && level > Level::L4K && s.is_leaf(level)) {
                return Step::Next;
            }
            let Some(mut child) = prealloc.pop() else {
                need = Some((
                    1 + ((end.0 - it.gfn().0) >> Level::L2M.gfn_shift()) as usize,
                    it.gfn(),
                ));
                return Step::Stop;
            };
            // The table joins the MMU's accounting when it leaves the preallocation.
            self.stats
                .pages_allocated
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            let below = level.below().expect("huge level");
            child.level = below;
            child.gfn = it.gfn();
            for k in 0..SPTE_ENT_PER_PAGE {
                let large = if below == Level::L4K { bits::LARGE } else { 0 };
                let sub = Spte(s.0 & !bits::PFN_MASK & !large)
                    .with_pfn(Pfn(s.pfn().0 + ((k as u64) << below.gfn_shift())));
                self.init_spte(&mut child, k, sub);
            }
            let child = Owned::new(child);
            match self.link_table_atomic(it.page(), it.index(), s, child, &mut removed, guard) {
                Link::Linked => {}
                Link::Busy(child) => {
                    // A racing fault records its own table there: ours was never
                    // published; it goes with the removed tables.
                    removed.push(child);
                    return Step::Retry;
                }
                // Lost a race: the table, briefly recorded, is already among the removed.
                Link::Lost => return Step::Retry,
            }
            self.stats
                .huge_split
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            // Read the new table entry, so the walk steps into the table and splits its
            // huge leaves in turn (1G into 2M into 4K).
            it.reread();
            Step::Next
        });
        match need {
            None => SplitProgress::Done(removed),
            Some((pages, resume)) => SplitProgress::NeedPages {
                pages,
                resume,
                removed,
            },
        }
    }

    /// Replace the tables under `[start, end)` whose range the memslot and the host would
    /// now map huge by a huge leaf, in place (when dirty logging stops; KVM's
    /// `recover_huge_pages_range`). Shared lock: each table is frozen out first.
    pub fn recover_huge_pages<H: HostMemory + ?Sized>(
        &self,
        slots: &Memslots,
        host: &H,
        start: Gfn,
        end: Gfn,
        guard: &EpochGuard,
    ) -> Removed {
        let mut removed = Removed::default();
        self.walk(start..end, Level::L2M, u64::MAX, true, guard, |it| {
            let s = it.spte;
            let level = it.level();
            if level > self.max_level || !s.is_shadow_present() || s.is_leaf(level) {
                return Step::Next;
            }
            let Some(new) = self.huge_leaf_for(slots, host, it.gfn(), level) else {
                return Step::Next;
            };
            let Some(frozen) = self.freeze(it.page(), it.index(), s, &mut removed, guard) else {
                return Step::Retry;
            };
            frozen.install(new);
            self.stats
                .huge_recovered
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            it.reread();
            Step::Next
        });
        removed
    }

    /// The huge leaf of `level` the fault path would install for the page starting at
    /// `gfn` (read-only: the next write makes it writable), if slot and host allow it.
    fn huge_leaf_for<H: HostMemory + ?Sized>(
        &self,
        slots: &Memslots,
        host: &H,
        gfn: Gfn,
        level: Level,
    ) -> Option<Spte> {
        let slot = slots.lookup(gfn)?;
        if !slot.contains(Gfn(gfn.0 + level.pages() - 1))
            || slot.max_mapping_level(gfn, level) < level
        {
            return None;
        }
        let hva = slot.gfn_to_hva(gfn);
        // As a fault: no huge leaf over a range an invalidation in progress intersects.
        if self.invalidation.covers_range(hva.0, hva.0 + level.bytes()) {
            return None;
        }
        let hp = host.translate(hva)?;
        if hp.level < level || hp.pfn.0 > bits::MAX_PFN {
            return None;
        }
        let mmu_writable = !slot.is_readonly() && hp.writable;
        Some(SpteFormat::EPT.leaf(
            Pfn(hp.pfn.0 & !(level.pages() - 1)),
            level,
            LeafAttrs {
                writable: false,
                executable: true,
                host_writable: hp.writable,
                mmu_writable,
                accessed: true,
                ..LeafAttrs::default()
            },
            true,
        ))
    }
}
