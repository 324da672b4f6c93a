//! Zapping in the TDP MMU (KVM's `tdp_mmu_zap_root`, `tdp_mmu_zap_leafs`,
//! `handle_removed_pt`).
//!
//! A root is zapped in passes of increasing level, as KVM does to bound the work of each
//! pass: 4K leaves first, then the entries pointing at the emptied 4K tables, and so on up
//! to the root's own entries. Removed tables are returned in [`Removed`] to be retired
//! after the flush.

use crossbeam_epoch::{Guard, Shared};

use super::iter::Step;
use super::page::TdpPage;
use super::{Removed, TdpMmu};
use crate::spte::{Spte, SpteFormat, FROZEN};
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, SPTE_ENT_PER_PAGE};

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
    /// root itself stays.
    pub fn zap_root(&self, root: &TdpPage, guard: &Guard) -> (Removed, ZapCounts) {
        let mut removed = Removed::default();
        let mut counts = ZapCounts::default();
        let mut zap_level = Level::L4K;
        loop {
            // Tables below the root are freed by the next pass: only the root's
            // used-entries bits need clearing.
            let keep = zap_level == root.level;
            let w = self.walk_root(root, Gfn(0)..MAX_GFN, zap_level, u64::MAX, guard, |it| {
                if it.level() == zap_level && it.spte != Spte::NONE {
                    if !keep && it.spte.is_leaf(zap_level) {
                        // A leaf in a table the next pass unlinks and frees whole: nothing
                        // reads it but CPUs until the flush, and nothing is owed for it
                        // (no reverse map, no dirty bit to carry), so it is not cleared.
                        if it.spte.is_shadow_present() {
                            removed.flush.set();
                        }
                    } else {
                        self.zap_entry_in(
                            it.page(),
                            it.index(),
                            it.spte,
                            keep,
                            &mut removed,
                            guard,
                        );
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

    /// Zap every leaf mapping a gfn in `[start, end)` under every root (exclusive lock).
    /// Tables stay, as in KVM. Stops after `budget` positions per root with a resume point.
    pub fn zap_leafs(
        &self,
        start: Gfn,
        end: Gfn,
        budget: u64,
        guard: &Guard,
    ) -> (Removed, Option<Gfn>) {
        self.zap_leafs_from(start, end, Level::L4K, budget, guard)
    }

    /// [`zap_leafs`](Self::zap_leafs) for leaves of `min_level` and above only (huge
    /// pages, when they must go and their 4K neighbours may stay).
    pub fn zap_leafs_from(
        &self,
        start: Gfn,
        end: Gfn,
        min_level: Level,
        budget: u64,
        guard: &Guard,
    ) -> (Removed, Option<Gfn>) {
        let mut removed = Removed::default();
        let w = self.walk(start..end, min_level, budget, false, guard, |it| {
            let s = it.spte;
            if s.is_shadow_present() && s.is_leaf(it.level()) {
                self.zap_entry(it.page(), it.index(), s, &mut removed, guard);
            }
            Step::Next
        });
        (removed, w.resume)
    }

    /// Clear entry `i` of `page` under the exclusive lock, taking a child table out with
    /// it. A plain store suffices unless a CPU may still set A/D bits in the SPTE.
    pub(crate) fn zap_entry(
        &self,
        page: &TdpPage,
        i: usize,
        seen: Spte,
        removed: &mut Removed,
        guard: &Guard,
    ) {
        self.zap_entry_in(page, i, seen, true, removed, guard);
    }

    /// [`zap_entry`](Self::zap_entry), leaving the used-entries bit alone unless
    /// `table_stays` (the table itself is about to be freed).
    fn zap_entry_in(
        &self,
        page: &TdpPage,
        i: usize,
        seen: Spte,
        table_stays: bool,
        removed: &mut Removed,
        guard: &Guard,
    ) {
        let old = if SpteFormat::EPT.has_volatile_bits(seen) {
            page.table().swap(i, Spte::NONE)
        } else {
            page.table().set(i, Spte::NONE);
            seen
        };
        if table_stays && self.mode == crate::tdp::TdpIteration::UsedEntries {
            page.clear_used(i);
        }
        if old.is_shadow_present() {
            removed.flush.set();
            if !old.is_leaf(page.level) {
                self.remove_subtree(page, i, old, true, removed, guard);
            }
        }
    }

    /// Entry `i` of `page`, which held the non-leaf `s`, no longer points at its child
    /// (the caller cleared it, or set it to FROZEN): queue the child's subtree for
    /// retirement. Under the shared lock (`exclusive` false) every entry of the subtree is
    /// frozen first, so a racing fault inside it cannot install anything; under the
    /// exclusive lock nobody else writes the tables and plain reads find the children.
    pub(crate) fn remove_subtree(
        &self,
        page: &TdpPage,
        i: usize,
        s: Spte,
        exclusive: bool,
        removed: &mut Removed,
        guard: &Guard,
    ) {
        let child = page.child(i, guard);
        page.clear_child(i);
        // SAFETY: the guard pins the epoch; the child is retired only through it.
        match unsafe { child.as_ref() } {
            Some(c) if c.frame == s.pfn() => self.handle_removed(child, exclusive, removed, guard),
            _ => unreachable!("a non-leaf SPTE without its child page"),
        }
    }

    fn handle_removed(
        &self,
        table: Shared<'_, TdpPage>,
        exclusive: bool,
        removed: &mut Removed,
        guard: &Guard,
    ) {
        // SAFETY: pinned; retired only through the epoch.
        let t = unsafe { table.deref() };
        if t.level > Level::L4K {
            for j in 0..SPTE_ENT_PER_PAGE {
                let old = if exclusive {
                    t.table().get(j)
                } else {
                    loop {
                        let old = t.table().get(j);
                        if old == FROZEN || t.table().compare_exchange(j, old, FROZEN).is_ok() {
                            break old;
                        }
                    }
                };
                if old.is_shadow_present() && !old.is_leaf(t.level) {
                    let grand = t.child(j, guard);
                    t.clear_child(j);
                    self.handle_removed(grand, exclusive, removed, guard);
                }
            }
        } else if !exclusive {
            for j in 0..SPTE_ENT_PER_PAGE {
                while {
                    let old = t.table().get(j);
                    old != FROZEN && t.table().compare_exchange(j, old, FROZEN).is_err()
                } {}
            }
        }
        removed.push(table);
    }
}
