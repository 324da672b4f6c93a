//! Zapping: removing mappings (KVM's `kvm_zap_gfn_range`, `kvm_mmu_zap_all`,
//! `kvm_mmu_prepare_zap_page`).
//!
//! A gfn range is zapped through the reverse maps of its memslots, one list at a time with
//! destroy-all (seed 003): every SPTE of the list is cleared, then the descriptors are
//! freed together. Tables left empty are unlinked from their parents (cascading up) and put
//! on the invalid list; their frames are freed only after the caller's remote TLB flush.

use alloc::vec::Vec;

use crate::flush::Flush;
use crate::memslot::Memslots;
use crate::rmap::{self, SpteRef};
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, SPTE_ENT_PER_PAGE};

use super::ShadowMmu;

impl<A: TableAllocator> ShadowMmu<A> {
    /// Zap every leaf mapping any gfn in `[start, end)`. Leaves that cover the range only
    /// in part (huge pages across its edges) are zapped whole.
    pub fn zap_gfn_range(&mut self, slots: &mut Memslots, start: Gfn, end: Gfn) -> Flush {
        let mut emptied = Vec::new();
        let mut zapped = 0u64;
        for slot in slots.iter_mut() {
            let lo = start.max(slot.base_gfn);
            let hi = end.min(slot.end_gfn());
            if lo >= hi {
                continue;
            }
            for level in Level::LEAF_LEVELS {
                let pages = &mut self.pages;
                zapped += slot.rmap_destroy_range(level, lo, hi, &mut self.pool, |sref| {
                    let sp = pages.get_mut(sref.table_id());
                    sp.spte_clear(sref.index());
                    if sp.used() == 0 {
                        emptied.push(sref.table_id());
                    }
                });
            }
        }
        self.stats.leaves_zapped += zapped;
        self.free_empty_pages(emptied);
        Flush::new(zapped != 0)
    }

    /// Zap every mapping, keeping the root (KVM's `kvm_mmu_zap_all`).
    pub fn zap_all(&mut self, slots: &mut Memslots) -> Flush {
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

    /// Zap a page that no parent points at any more: drop each of its entries (leaves
    /// leave their reverse maps, child pages are unlinked and zapped in turn) and put it on
    /// the invalid list (KVM's `kvm_mmu_prepare_zap_page`).
    pub(crate) fn zap_page(&mut self, slots: &mut Memslots, id: u32) {
        debug_assert!(self.pages.get(id).parent_ptes.is_empty());
        let level = self.pages.get(id).role.level();
        for i in 0..SPTE_ENT_PER_PAGE {
            let sp = self.pages.get(id);
            if sp.used() == 0 {
                break;
            }
            let spte = sp.table().get(i);
            if spte.is_shadow_present() {
                if spte.is_leaf(level) {
                    self.drop_leaf(slots, id, i, level);
                } else {
                    let child = self.unlink_child(id, i);
                    if self.pages.get(child).parent_ptes.is_empty() {
                        self.zap_page(slots, child);
                    }
                }
            } else if spte.is_mmio() {
                self.pages.get_mut(id).spte_clear(i);
            }
        }
        self.invalid_list.push(id);
    }

    /// Unlink pages whose tables became empty, and their parents if they empty in turn.
    fn free_empty_pages(&mut self, mut emptied: Vec<u32>) {
        while let Some(id) = emptied.pop() {
            let Some(sp) = self.pages.try_get(id) else {
                continue;
            };
            if sp.used() != 0 || sp.root_count != 0 || sp.parent_ptes.is_empty() {
                // Refilled, a root, or already unlinked.
                continue;
            }
            let mut parents = Vec::new();
            rmap::for_each_destroy(
                &mut self.pages.get_mut(id).parent_ptes,
                &mut self.pool,
                |p| parents.push(p),
            );
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
