//! Zapping: removing mappings (KVM's `kvm_zap_gfn_range`, `kvm_mmu_zap_all`,
//! `kvm_mmu_prepare_zap_page`).
//!
//! A gfn range is zapped through the reverse maps of its memslots, one list at a time with
//! destroy-all (seed 003): every SPTE of the list is cleared, then the descriptors are
//! freed together. In direct mode, a range mapping many more 4 KiB leaves than there are
//! shadow pages (a memslot delete, a large invalidation) is zapped instead by visiting
//! the last-level pages that overlap it: a page wholly inside loses all its leaves in one
//! pass over its table and the run of reverse-map heads of its 512 gfns, in address
//! order, with none of the per-leaf lookups of its page. Tables left empty are unlinked
//! from their parents (cascading up) and put on the invalid list; their frames are freed
//! only after the caller's remote TLB flush.

use alloc::vec::Vec;

use crate::flush::Flush;
use crate::host::HostMemory;
use crate::memslot::{Memslot, Memslots};
use crate::rmap::{self, SpteRef};
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, SPTE_ENT_PER_PAGE};

use super::{RmapDrop, ShadowMmu};

/// How many leaves zapped through the reverse maps cost as much as visiting one shadow
/// page in a zap by pages: a range whose 4 KiB leaves (at most its length, at most the
/// slot's mapped pages) outnumber the VM's shadow pages by more is zapped by pages.
const LEAVES_PER_PAGE_VISIT: u64 = 4;

impl<A: TableAllocator> ShadowMmu<A> {
    /// Make huge mappings possible again over `[start, end)` after dirty logging stops
    /// (KVM's `kvm_mmu_zap_collapsible_sptes`): zap the 4K leaves of every 2 MiB range
    /// the memslot, `max_level` and the host page all allow huge, so the next fault there
    /// maps it huge.
    pub fn recover_huge_pages<H: HostMemory + ?Sized>(
        &mut self,
        slots: &mut Memslots,
        host: &H,
        start: Gfn,
        end: Gfn,
        max_level: Level,
    ) -> Flush {
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
                flush |= self.zap_gfn_range(slots, g, next);
            }
            g = next;
        }
        flush
    }

    /// Zap every leaf mapping any gfn in `[start, end)`. Leaves that cover the range only
    /// in part (huge pages across its edges) are zapped whole.
    pub fn zap_gfn_range(&mut self, slots: &mut Memslots, start: Gfn, end: Gfn) -> Flush {
        self.zap_gfn_range_levels(slots, start, end, Level::L4K)
    }

    /// Zap the leaves of level `min_level` and above that map a gfn in `[start, end)`,
    /// dropping each reverse map as configured (seed 003: destroy in one pass; before it,
    /// one SPTE at a time through the full `drop_spte` path).
    pub fn zap_gfn_range_levels(
        &mut self,
        slots: &mut Memslots,
        start: Gfn,
        end: Gfn,
        min_level: Level,
    ) -> Flush {
        let mut emptied = Vec::new();
        let mut zapped = 0u64;
        let ranges: Vec<(u32, Gfn, Gfn)> = slots
            .iter()
            .filter_map(|s| {
                let (lo, hi) = (start.max(s.base_gfn), end.min(s.end_gfn()));
                (lo < hi).then_some((s.id, lo, hi))
            })
            .collect();
        for (id, lo, hi) in ranges {
            for level in Level::LEAF_LEVELS.into_iter().filter(|&l| l >= min_level) {
                match self.algos.rmap_drop {
                    RmapDrop::Destroy if level == Level::L4K && self.zap_by_pages(slots, id, lo, hi) => {
                        let slot = slots.by_id_mut(id).expect("slot listed above");
                        let n = self.zap_4k_by_pages(slot, lo, hi, &mut emptied);
                        self.stats.leaves_zapped_by_pages += n;
                        zapped += n;
                    }
                    RmapDrop::Destroy => {
                        let slot = slots.by_id_mut(id).expect("slot listed above");
                        let pages = &mut self.pages;
                        zapped += slot.rmap_destroy_range(level, lo, hi, &mut self.pool, |sref| {
                            let sp = pages.get_mut(sref.table_id());
                            sp.spte_zap_leaf(sref.index());
                            if sp.used() == 0 {
                                emptied.push(sref.table_id());
                            }
                        });
                    }
                    RmapDrop::OneByOne => {
                        let before = zapped;
                        let mut g = lo;
                        while g < hi {
                            loop {
                                let slot = slots.by_id(id).expect("slot listed above");
                                let Some(s) = rmap::first(slot.rmap_head(g, level), &self.pool)
                                else {
                                    break;
                                };
                                self.drop_leaf(slots, s.table_id(), s.index(), level);
                                zapped += 1;
                                if self.pages.get(s.table_id()).used() == 0 {
                                    emptied.push(s.table_id());
                                }
                            }
                            g = Gfn(g.align_down(level).0 + level.pages());
                        }
                        // drop_leaf counted these already.
                        self.stats.leaves_zapped -= zapped - before;
                    }
                }
            }
        }
        self.stats.leaves_zapped += zapped;
        self.free_empty_pages(emptied);
        Flush::new(zapped != 0)
    }

    /// Whether the 4 KiB leaves of `[lo, hi)` in slot `id` are zapped by visiting pages
    /// rather than reverse maps: in direct mode (an indirect page's leaves map gfns in no
    /// order, so only the reverse maps find them), when they may outnumber the shadow
    /// pages by [`LEAVES_PER_PAGE_VISIT`].
    fn zap_by_pages(&self, slots: &Memslots, id: u32, lo: Gfn, hi: Gfn) -> bool {
        let Some(slot) = slots.by_id(id) else {
            return false;
        };
        let leaves = (hi.0 - lo.0).min(slot.rmap_entries(Level::L4K));
        !self.is_paging() && (self.pages.len() as u64).saturating_mul(LEAVES_PER_PAGE_VISIT) < leaves
    }

    /// Zap the 4 KiB leaves mapping `[lo, hi)` (inside `slot`) by visiting every direct
    /// last-level page that overlaps the range, in direct mode, where a page's entry `i`
    /// maps gfn `page.gfn + i`. A page wholly inside the range with no MMIO entry is
    /// cleared in one pass ([`ShadowPage::zap_all_leaves`](crate::page::ShadowPage)) and
    /// its gfns' reverse-map heads in another; a page across an edge loses its leaves in
    /// the range one by one. Pages left with no entry go to `emptied`. Returns the leaves
    /// zapped.
    fn zap_4k_by_pages(
        &mut self,
        slot: &mut Memslot,
        lo: Gfn,
        hi: Gfn,
        emptied: &mut Vec<u32>,
    ) -> u64 {
        let mut zapped = 0u64;
        for id in 1..self.pages.id_limit() {
            let Some(sp) = self.pages.try_get_mut(id) else {
                continue;
            };
            if sp.role.level() != Level::L4K || sp.has_translations() || sp.present == 0 {
                continue;
            }
            let start = sp.gfn;
            let end = Gfn(start.0 + SPTE_ENT_PER_PAGE as u64);
            let (first, last) = (start.max(lo), end.min(hi));
            if first >= last {
                continue;
            }
            let sref = |i: usize| SpteRef::new(id, i);
            if (first, last) == (start, end) && sp.mmio == 0 {
                let removed = slot.rmap_remove_table(start, id, &mut self.pool);
                let present = sp.zap_all_leaves();
                debug_assert_eq!(removed, u64::from(present), "page {id}: rmaps and leaves");
                zapped += removed;
            } else {
                for i in (first.0 - start.0) as usize..(last.0 - start.0) as usize {
                    if sp.table().get(i).is_shadow_present() {
                        sp.spte_zap_leaf(i);
                        let gfn = Gfn(start.0 + i as u64);
                        let removed = slot.rmap_remove(gfn, Level::L4K, sref(i), &mut self.pool);
                        debug_assert!(removed, "page {id} entry {i}: leaf without rmap");
                        zapped += 1;
                    }
                }
            }
            if sp.used() == 0 {
                emptied.push(id);
            }
        }
        zapped
    }

    /// Zap every mapping, keeping the root (KVM's `kvm_mmu_zap_all`). Under shadow
    /// paging every page goes, roots in use are invalidated (the caller has vCPUs reload).
    pub fn zap_all(&mut self, slots: &mut Memslots) -> Flush {
        if self.is_paging() {
            return self.zap_all_paging(slots).0;
        }
        let root = self.root;
        let mut flush = Flush::NONE;
        for i in 0..SPTE_ENT_PER_PAGE {
            let spte = self.pages.get(root).table().get(i);
            if spte.is_shadow_present() {
                let child = self.unlink_child(root, i);
                self.zap_page(slots, child);
                flush.set();
            } else if spte.is_mmio() {
                self.pages.get_mut(root).spte_clear(i);
            }
        }
        flush
    }

    /// Zap page `id` (KVM's `kvm_mmu_prepare_zap_page`), for both modes: unlink it from
    /// every parent, drop its entries (leaves leave their reverse maps; a child left with
    /// no parent is zapped in turn unless it is hashed, to be found again, or a root), put
    /// it on the invalid list (freed after the caller's flush). Under shadow paging also
    /// take it out of the hash and undo its write protection; a root in use is marked
    /// invalid and kept. Returns the flush owed and whether a root in use was
    /// invalidated (vCPUs must reload).
    pub(crate) fn prepare_zap(&mut self, slots: &mut Memslots, id: u32) -> (Flush, bool) {
        let mut flush = Flush::NONE;
        let mut parents = Vec::new();
        rmap::for_each_destroy(
            &mut self.pages.get_mut(id).parent_ptes,
            &mut self.pool,
            |p| parents.push(p),
        );
        self.leaf_table_unlinked(id);
        for p in parents {
            let parent = self.pages.get_mut(p.table_id());
            parent.spte_clear(p.index());
            parent.set_child(p.index(), 0);
            self.clear_unsync(p.table_id(), p.index());
            flush.set();
        }
        for i in 0..SPTE_ENT_PER_PAGE {
            let sp = self.pages.get(id);
            if sp.used() == 0 {
                break;
            }
            let (present, child) = self.zap_spte(slots, id, i);
            if present {
                flush.set();
            }
            if let Some(child) = child {
                let c = self.pages.get(child);
                if !c.hashed && c.parent_ptes.is_empty() && c.root_count == 0 {
                    let (f, _) = self.prepare_zap(slots, child);
                    flush |= f;
                }
            }
        }
        let sp = self.pages.get(id);
        let (gfn, role, hashed) = (sp.gfn, sp.role, sp.hashed);
        if hashed {
            self.hash_remove(id);
            if !role.is_direct() {
                self.unaccount_shadowed(slots, gfn, role.level());
            }
        }
        let sp = self.pages.get_mut(id);
        sp.unsync = false;
        if sp.root_count > 0 {
            sp.role = role.invalidated();
            self.roots_invalidated = true;
            (flush, true)
        } else {
            self.invalid_list.push(id);
            (flush, false)
        }
    }

    /// Clear entry `i` of page `id`, whatever it holds (KVM's `mmu_page_zap_pte`): a leaf
    /// leaves its reverse map, a link to a child is undone, an MMIO SPTE is cleared.
    /// Returns whether a shadow-present entry went (a flush is owed) and the child it
    /// unlinked, if any.
    pub(crate) fn zap_spte(
        &mut self,
        slots: &mut Memslots,
        id: u32,
        i: usize,
    ) -> (bool, Option<u32>) {
        let sp = self.pages.get(id);
        let spte = sp.table().get(i);
        if spte.is_shadow_present() {
            let level = sp.role.level();
            if spte.is_leaf(level) {
                self.drop_leaf(slots, id, i, level);
                (true, None)
            } else {
                (true, Some(self.unlink_child(id, i)))
            }
        } else {
            if spte.is_mmio() {
                self.pages.get_mut(id).spte_clear(i);
            }
            (false, None)
        }
    }

    /// Zap a page that no parent points at any more (KVM's `kvm_mmu_prepare_zap_page`;
    /// see [`prepare_zap`](Self::prepare_zap), which this is with no parent to unlink).
    pub(crate) fn zap_page(&mut self, slots: &mut Memslots, id: u32) {
        debug_assert!(self.pages.get(id).parent_ptes.is_empty());
        let _ = self.prepare_zap(slots, id);
    }

    /// Unlink pages whose tables became empty, and their parents if they empty in turn.
    fn free_empty_pages(&mut self, mut emptied: Vec<u32>) {
        while let Some(id) = emptied.pop() {
            let Some(sp) = self.pages.try_get(id) else {
                continue;
            };
            if sp.used() != 0 || sp.root_count != 0 || sp.parent_ptes.is_empty() || sp.hashed {
                // Refilled, a root, already unlinked, or a shadow of a guest table (it
                // stays, found again through the hash, until zapped as a page).
                continue;
            }
            let mut parents = Vec::new();
            rmap::for_each_destroy(
                &mut self.pages.get_mut(id).parent_ptes,
                &mut self.pool,
                |p| parents.push(p),
            );
            self.leaf_table_unlinked(id);
            for p in parents {
                let parent = self.pages.get_mut(p.table_id());
                parent.spte_clear(p.index());
                parent.set_child(p.index(), 0);
                if parent.used() == 0 {
                    emptied.push(p.table_id());
                }
            }
            self.invalid_list.push(id);
        }
    }

    /// The SPTE references of every leaf mapping `gfn` at `level`, for tests and the
    /// notifier paths.
    pub fn rmap_entries(&self, slots: &Memslots, gfn: Gfn, level: Level) -> Vec<SpteRef> {
        slots
            .lookup(gfn)
            .map(|s| rmap::iter(s.rmap_head(gfn, level), &self.pool).collect())
            .unwrap_or_default()
    }
}
