//! Zapping in the TDP MMU (KVM's `tdp_mmu_zap_root`, `tdp_mmu_zap_leafs`).
//!
//! A root is zapped in passes of increasing level, as KVM does to bound the work of each
//! pass: 4K leaves first, then the entries pointing at the emptied 4K tables, and so on up
//! to the root's own entries. Removed tables (taken out by the write funnel,
//! `spte_write`, as KVM's `handle_removed_pt`) are returned in [`Removed`] to be retired
//! after the flush.
//!
//! # Locking
//! Every zap needs the exclusive lock: the public operations take `&mut self`, and the
//! work is done through [`ExclusiveMmu`], the proof the funnel's exclusive writes take.

use super::EpochGuard;

use super::iter::Step;
use super::page::TdpPage;
use super::spte_write::ExclusiveMmu;
use super::{Removed, TdpMmu};
use crate::spte::Spte;
use crate::table::TableAllocator;
use crate::types::{Gfn, Level};

/// What a zap walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZapCounts {
    /// Iterator positions (the seed's "loops").
    pub loops: u64,
    /// SPTEs read by the iterator.
    pub reads: u64,
    /// Entries zapped.
    pub zapped: u64,
}

impl ZapCounts {
    /// Add another walk's counts.
    pub fn add(&mut self, o: ZapCounts) {
        self.loops += o.loops;
        self.reads += o.reads;
        self.zapped += o.zapped;
    }
}

/// One past the largest gfn a 4-level table maps.
pub(crate) const MAX_GFN: Gfn = Gfn(1 << 36);

impl<A: TableAllocator + 'static> TdpMmu<A> {
    /// Zap everything under `root` in passes of increasing level (exclusive lock). The
    /// root itself stays. Crate-private: `root` must be one of this MMU's roots (what is
    /// zapped is retired through this MMU's allocator).
    pub(crate) fn zap_root(&mut self, root: &TdpPage, guard: &EpochGuard) -> (Removed, ZapCounts) {
        self.exclusive().zap_root(root, guard)
    }

    /// Zap every leaf mapping a gfn in `[start, end)` under every root (exclusive lock).
    /// Tables stay, as in KVM. Stops after `budget` positions per root with a resume point.
    pub fn zap_leafs(
        &mut self,
        start: Gfn,
        end: Gfn,
        budget: u64,
        guard: &EpochGuard,
    ) -> (Removed, Option<Gfn>) {
        self.zap_leafs_from(start, end, Level::L4K, budget, guard)
    }

    /// [`zap_leafs`](Self::zap_leafs) for leaves of `min_level` and above only (huge
    /// pages, when they must go and their 4K neighbours may stay).
    pub fn zap_leafs_from(
        &mut self,
        start: Gfn,
        end: Gfn,
        min_level: Level,
        budget: u64,
        guard: &EpochGuard,
    ) -> (Removed, Option<Gfn>) {
        let mmu = self.exclusive();
        let mut removed = Removed::default();
        let w = mmu.walk(start..end, min_level, budget, false, guard, |it| {
            let s = it.spte;
            if s.is_shadow_present() && s.is_leaf(it.level()) {
                mmu.zap_spte(it.page(), it.index(), s, &mut removed, guard);
            }
            Step::Next
        });
        (removed, w.resume)
    }
}

impl<A: TableAllocator + 'static> ExclusiveMmu<'_, A> {
    /// [`TdpMmu::zap_root`] for a caller that already holds the proof of the exclusive
    /// lock (and may be iterating over the roots).
    pub(crate) fn zap_root(self, root: &TdpPage, guard: &EpochGuard) -> (Removed, ZapCounts) {
        let mut removed = Removed::default();
        let mut counts = ZapCounts::default();
        let mut zap_level = Level::L4K;
        loop {
            let last = zap_level == root.level;
            let w = self.walk_root(root, Gfn(0)..MAX_GFN, zap_level, u64::MAX, guard, |it| {
                if it.level() == zap_level && it.spte != Spte::NONE {
                    if !last && it.spte.is_leaf(zap_level) {
                        // A leaf in a table the next pass unlinks and frees whole: nothing
                        // reads it but CPUs until the flush, and nothing is owed for it
                        // (no reverse map, no dirty bit to carry), so it is not cleared.
                        if it.spte.is_shadow_present() {
                            removed.flush.set();
                        }
                    } else {
                        self.zap_spte(it.page(), it.index(), it.spte, &mut removed, guard);
                    }
                    counts.zapped += 1;
                }
                Step::Next
            });
            counts.loops += w.loops;
            counts.reads += w.reads;
            self.stats
                .zap_loops
                .fetch_add(w.loops, core::sync::atomic::Ordering::Relaxed);
            self.stats
                .zap_reads
                .fetch_add(w.reads, core::sync::atomic::Ordering::Relaxed);
            match zap_level.above() {
                Some(l) if l <= root.level => zap_level = l,
                _ => break,
            }
        }
        (removed, counts)
    }

    /// Clear entry `i` of `page`, read as `seen` (exclusive lock), taking a child table
    /// out with it; a flush is owed if it was present.
    #[inline]
    pub(crate) fn zap_spte(
        self,
        page: &TdpPage,
        i: usize,
        seen: Spte,
        removed: &mut Removed,
        guard: &EpochGuard,
    ) {
        if self
            .set_spte(page, i, seen, Spte::NONE, removed, guard)
            .is_shadow_present()
        {
            removed.flush.set();
        }
    }
}
