//! Shadow paging (KVM's `paging_tmpl.h` and the indirect half of `mmu.c`): shadow pages
//! that shadow the guest's own page tables and map guest-virtual addresses to host frames.
//!
//! - `fault`: the fault path (guest walk, then one shadow page per guest table, found or
//!   created through the hash, then the leaf with the combined rights)
//! - `emulate`: writes to write-protected guest tables, and write-flooding detection
//! - `sync`: unsync pages (the guest writes a last-level table directly) and their
//!   resync at CR3 load, INVLPG and guest TLB flushes
//! - `roots`: per-CR3 roots, their reference counts, zapping and reclaim
//! - `translate`: the CPU's walk of the shadow tables by guest-virtual address
//!
//! # Invariants (checked by `audit`)
//! - Every hashed page is named in the hash under its gfn, exactly once; no two hashed
//!   pages share (gfn, role); invalid pages are not hashed.
//! - An indirect page shadowing a table of level > 1 write-tracks its gfn (one tracker
//!   each); a last-level one disallows huge pages over its gfn (one count each); while any
//!   indirect page of a gfn is sync, no SPTE maps that gfn writable.
//! - A sync indirect page's present leaves grant no more than the guest entry they were
//!   built from, and map the gfn it names.
//! - `unsync_child_bitmap` bit `i` of a page is set iff entry `i` points at a page that is
//!   unsync or has unsync children.
//!
//! # Locking
//! Everything runs under the exclusive MMU lock, except [`translate`](ShadowMmu::translate)
//! (the shared lock; it only sets A/D bits with compare-exchange, as a CPU does).

mod emulate;
mod fault;
mod roots;
mod sync;
mod translate;

pub(crate) use sync::spte_allowed_by;

use alloc::vec::Vec;

use hashbrown::HashMap;

pub use fault::{GvaFault, PagingFault, RMAP_RECYCLE_THRESHOLD};
pub use roots::RootRef;

use super::ShadowMmu;
use crate::error::Error;
use crate::flush::Flush;
use crate::memslot::Memslots;
use crate::page::Role;
use crate::rmap;
use crate::table::TableAllocator;
use crate::types::{Gfn, Level};

/// Shadow paging's choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingConfig {
    /// Let a last-level shadow page go unsync when the guest writes its table, instead of
    /// emulating every write (KVM's default).
    pub unsync: bool,
    /// Previous roots each vCPU keeps for CR3 switches (KVM keeps 3).
    pub prev_roots: u8,
}

impl Default for PagingConfig {
    fn default() -> Self {
        PagingConfig {
            unsync: true,
            prev_roots: 3,
        }
    }
}

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
    /// Shadow pages zapped by reclaim.
    pub reclaimed_pages: u64,
}

/// What a shadow-paging MMU keeps beside the pages.
#[derive(Default)]
pub(crate) struct Paging {
    /// Hashed pages by gfn (KVM's `mmu_page_hash`).
    hash: HashMap<u64, Vec<u32>>,
    pub(crate) cfg: PagingConfig,
    pub(crate) stats: PagingStats,
    /// A fault linked a subtree with unsync pages: the faulting vCPU's root is synced
    /// before the access is retried.
    pub(crate) sync_needed: bool,
}

impl Paging {
    pub(crate) fn new(cfg: PagingConfig) -> Self {
        Paging {
            cfg,
            ..Paging::default()
        }
    }
}

impl<A: TableAllocator> ShadowMmu<A> {
    #[inline]
    pub(crate) fn paging_mut(&mut self) -> &mut Paging {
        self.paging.as_mut().expect("a shadow-paging MMU")
    }

    /// Shadow-paging counters (zero for a direct MMU).
    pub fn paging_stats(&self) -> PagingStats {
        self.paging.as_ref().map(|p| p.stats).unwrap_or_default()
    }

    /// The hashed page with `gfn` and `role` (KVM's hash lookup).
    pub fn find_page(&self, gfn: Gfn, role: Role) -> Option<u32> {
        let p = self.paging.as_ref()?;
        p.hash
            .get(&gfn.0)?
            .iter()
            .copied()
            .find(|&id| self.pages.get(id).role == role)
    }

    /// Ids of the hashed pages of `gfn` (any role).
    pub fn pages_of_gfn(&self, gfn: Gfn) -> Vec<u32> {
        self.paging
            .as_ref()
            .and_then(|p| p.hash.get(&gfn.0))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether an indirect page shadows the guest table at `gfn` (no allocation: the
    /// fault path asks this for every 4K leaf it maps writable).
    pub(crate) fn shadows_guest_table(&self, gfn: Gfn) -> bool {
        self.paging
            .as_ref()
            .and_then(|p| p.hash.get(&gfn.0))
            .is_some_and(|ids| ids.iter().any(|&id| !self.pages.get(id).role.is_direct()))
    }

    /// Every hashed page, oldest first.
    pub fn hashed_pages(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .paging
            .as_ref()
            .map(|p| p.hash.values().flatten().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable_by_key(|&id| self.pages.get(id).seq);
        ids
    }

    fn hash_insert(&mut self, id: u32) {
        let gfn = self.pages.get(id).gfn.0;
        self.pages.get_mut(id).hashed = true;
        self.paging_mut().hash.entry(gfn).or_default().push(id);
    }

    pub(crate) fn hash_remove(&mut self, id: u32) {
        let gfn = self.pages.get(id).gfn.0;
        self.pages.get_mut(id).hashed = false;
        let hash = &mut self.paging_mut().hash;
        let ids = hash
            .get_mut(&gfn)
            .expect("hashed page missing from its bucket");
        ids.retain(|&x| x != id);
        if ids.is_empty() {
            hash.remove(&gfn);
        }
    }

    /// The page shadowing the guest table at `gfn` with `role`, or a direct page for part
    /// of a guest huge page, found in the hash or created (KVM's `kvm_mmu_get_shadow_page`).
    /// A new indirect page write-protects its gfn (`account_shadowed`). Returns the id,
    /// whether it was created, and the flush owed. A table above the last level whose gfn
    /// already has `u16::MAX` write trackers (a VMM's) cannot be tracked once more:
    /// [`Error::WriteTrackCount`], nothing created.
    pub(crate) fn get_shadow_page(
        &mut self,
        slots: &mut Memslots,
        gfn: Gfn,
        role: Role,
    ) -> Result<(u32, bool, Flush), Error> {
        if let Some(id) = self.find_page(gfn, role) {
            return Ok((id, false, Flush::NONE));
        }
        if !role.is_direct()
            && role.level() > Level::L4K
            && slots.lookup(gfn).is_some_and(|s| s.write_track_full(gfn))
        {
            return Err(Error::WriteTrackCount { gfn: gfn.0 });
        }
        let id = self
            .pages
            .create(&self.alloc, role, gfn, 0)
            .ok_or(Error::OutOfTableMemory)?;
        self.hash_insert(id);
        let flush = if role.is_direct() {
            Flush::NONE
        } else {
            self.account_shadowed(slots, gfn, role.level())
        };
        Ok((id, true, flush))
    }

    /// A guest table at `gfn` of `level` got a shadow page: tables above the last level are
    /// write-tracked; last-level ones only block huge pages (they may go unsync); every
    /// mapping of the gfn loses W and MMU-writable (KVM's `account_shadowed`).
    fn account_shadowed(&mut self, slots: &mut Memslots, gfn: Gfn, level: Level) -> Flush {
        let slot = slots
            .lookup_mut(gfn)
            .expect("guest tables lie in memslots (checked by the fault path)");
        if level > Level::L4K {
            let ok = slot.track_write(gfn, true);
            debug_assert!(
                ok,
                "write-track count full: get_shadow_page checks it first"
            );
        } else {
            slot.account_disallow_lpage(gfn, 1);
        }
        let flush = self.zap_gfn_range_levels(slots, gfn, Gfn(gfn.0 + 1), Level::L2M);
        flush | self.rmap_write_protect(slots, gfn, Level::L4K, true)
    }

    /// Undo [`account_shadowed`](Self::account_shadowed) for a zapped page.
    pub(crate) fn unaccount_shadowed(&mut self, slots: &mut Memslots, gfn: Gfn, level: Level) {
        let Some(slot) = slots.lookup_mut(gfn) else {
            return;
        };
        if level > Level::L4K {
            let ok = slot.track_write(gfn, false);
            debug_assert!(ok, "write-track count underflow");
        } else {
            slot.account_disallow_lpage(gfn, -1);
        }
    }

    /// Entry `i` of page `id` now leads to unsync pages: mark it, and the page's parents
    /// if it had no such entry before (KVM's `kvm_mmu_mark_parents_unsync`).
    pub(crate) fn mark_unsync(&mut self, id: u32, i: usize) {
        if self.pages.get_mut(id).set_unsync_child(i) {
            self.mark_parents_unsync(id);
        }
    }

    pub(crate) fn mark_parents_unsync(&mut self, id: u32) {
        let parents: Vec<_> = rmap::iter(self.pages.get(id).parent_ptes, &self.pool).collect();
        for p in parents {
            self.mark_unsync(p.table_id(), p.index());
        }
    }

    /// Entry `i` of page `id` no longer leads to unsync pages: clear it, and the parents'
    /// marks if the page has none left.
    pub(crate) fn clear_unsync(&mut self, id: u32, i: usize) {
        let sp = self.pages.get_mut(id);
        if sp.clear_unsync_child(i) && !sp.unsync {
            self.clear_parents_unsync(id);
        }
    }

    pub(crate) fn clear_parents_unsync(&mut self, id: u32) {
        let parents: Vec<_> = rmap::iter(self.pages.get(id).parent_ptes, &self.pool).collect();
        for p in parents {
            self.clear_unsync(p.table_id(), p.index());
        }
    }

    /// The longest reverse map (most SPTEs mapping one gfn at one level).
    pub fn max_rmap_len(&self, slots: &Memslots) -> usize {
        let mut max = 0;
        for slot in slots.iter() {
            for level in Level::LEAF_LEVELS {
                if slot.rmap_entries(level) == 0 {
                    continue;
                }
                for (_, head) in slot.rmaps(level).iter() {
                    max = max.max(rmap::count(head, &self.pool));
                }
            }
        }
        max
    }
}
