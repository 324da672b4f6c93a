//! MMU-notifier operations on gfn ranges (KVM's `kvm_unmap_gfn_range`, `kvm_age_gfn`,
//! `kvm_test_age_gfn`; `kvm_set_spte_gfn`, gone from Linux since 6.10, for the
//! compatibility option `VmConfig::change_pte`). The invalidation bookkeeping that stops a
//! fault from installing a page the host is taking away is shared by both MMUs
//! ([`crate::mmu::Invalidation`]).
//!
//! The VM translates host-virtual ranges into gfn ranges per memslot and calls these under
//! the MMU lock.

use crate::flush::Flush;
use crate::memslot::Memslots;
use crate::spte::bits;
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, Pfn};

use super::wrprot::for_each_rmap_spte;
use super::ShadowMmu;

impl<A: TableAllocator> ShadowMmu<A> {
    /// Clear the accessed bit of every leaf mapping a gfn in `[start, end)`; whether any
    /// was young (KVM's `kvm_age_gfn`). No flush: a cached translation stays correct, the
    /// CPU just will not set A again until it walks.
    pub fn age_gfn_range(&self, slots: &Memslots, start: Gfn, end: Gfn) -> bool {
        let mut young = false;
        let accessed = self.format.accessed();
        self.for_each_leaf_in_range(slots, start, end, |pages, s| {
            let t = pages.get(s.table_id()).table();
            if t.get(s.index()).0 & accessed != 0 {
                t.fetch_and_not(s.index(), accessed);
                young = true;
            }
            true
        });
        young
    }

    /// Whether any leaf mapping a gfn in `[start, end)` is young; stops at the first
    /// (KVM's `kvm_test_age_gfn`).
    pub fn test_age_gfn_range(&self, slots: &Memslots, start: Gfn, end: Gfn) -> bool {
        let mut young = false;
        let accessed = self.format.accessed();
        self.for_each_leaf_in_range(slots, start, end, |pages, s| {
            young = pages.get(s.table_id()).table().get(s.index()).0 & accessed != 0;
            !young
        });
        young
    }

    /// The host now maps the page behind `gfn` at `new_pfn` (KVM's `kvm_set_spte_gfn`):
    /// if the new host mapping is writable, drop the SPTEs (the next fault maps it);
    /// otherwise point them read-only at `new_pfn`. Huge leaves over `gfn` are dropped.
    /// Linux removed `kvm_set_spte_gfn` with the `.change_pte` notifier in 2024 (6.10):
    /// reached only through the compatibility option `VmConfig::change_pte`.
    pub fn change_pte(
        &mut self,
        slots: &mut Memslots,
        gfn: Gfn,
        new_pfn: Pfn,
        writable: bool,
    ) -> Flush {
        let mut flush = self.zap_gfn_range_levels(slots, gfn, Gfn(gfn.0 + 1), Level::L2M);
        if writable {
            return flush | self.zap_gfn_range_levels(slots, gfn, Gfn(gfn.0 + 1), Level::L4K);
        }
        let Some(slot) = slots.lookup(gfn) else {
            return flush;
        };
        let mut refs = alloc::vec::Vec::new();
        for_each_rmap_spte(
            slot.rmap_head(gfn, Level::L4K),
            &self.pool,
            self.algos.rmap_iteration,
            |s| refs.push(s),
        );
        for s in refs {
            let sp = self.pages.get_mut(s.table_id());
            let old = sp.table().get(s.index());
            let new = old
                .with_pfn(new_pfn)
                .without_bits(bits::WRITABLE | bits::HOST_WRITABLE | self.format.accessed());
            sp.spte_update(s.index(), new);
            flush.set();
        }
        flush
    }

    /// Call `f(pages, sref)` on every leaf mapping a gfn in `[start, end)`, at every
    /// level; `f` returns false to stop.
    fn for_each_leaf_in_range(
        &self,
        slots: &Memslots,
        start: Gfn,
        end: Gfn,
        mut f: impl FnMut(&crate::page::Pages, crate::rmap::SpteRef) -> bool,
    ) {
        let mode = self.algos.rmap_iteration;
        for slot in slots.iter() {
            let (lo, hi) = (start.max(slot.base_gfn), end.min(slot.end_gfn()));
            for level in Level::LEAF_LEVELS {
                if slot.rmap_entries(level) == 0 {
                    continue;
                }
                let mut g = lo;
                while g < hi {
                    let mut go = true;
                    let pages = &self.pages;
                    for_each_rmap_spte(slot.rmap_head(g, level), &self.pool, mode, |s| {
                        if go {
                            go = f(pages, s);
                        }
                    });
                    if !go {
                        return;
                    }
                    g = Gfn(g.align_down(level).0 + level.pages());
                }
            }
        }
    }
}
