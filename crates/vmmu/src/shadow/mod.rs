//! The shadow MMU (KVM's `mmu.c`), in two modes: direct (every shadow page is
//! `role.direct` and maps a contiguous gfn range, as KVM ran EPT before its TDP MMU; one
//! root) and shadow paging ([`paging`]: indirect pages shadow the guest's own tables and
//! map guest-virtual addresses; a root per guest CR3, pages hashed by gfn and role).
//!
//! # Locking
//! Everything here runs under the VM's MMU lock, held exclusively, as KVM's `mmu_lock`.
//! The only concurrent actors are CPUs walking the tables (they set A/D bits with
//! compare-exchange, see `hw`), which is why SPTE changes go through the page's
//! `spte_set`/`spte_update`/`spte_clear` funnels.
//!
//! # Invariants (checked by `audit`)
//! - Every shadow-present leaf SPTE has exactly one entry in the reverse map of its gfn at
//!   its level, and every reverse-map entry names a present leaf for that gfn.
//! - Every present non-leaf SPTE points at a page whose `parent_ptes` names it.
//! - Pages unlinked from the tree sit on `invalid_list` until a remote TLB flush has
//!   completed; only then are their frames freed ([`ShadowMmu::free_invalid_pages`]).
//! - The direct root lives as long as the MMU; shadow-paging roots live while a vCPU
//!   holds them or while they are hashed.

mod algorithms;
mod fault;
mod leaf_tables;
mod notifier;
pub mod paging;
mod wrprot;
mod zap;

use alloc::vec::Vec;

pub use algorithms::{Algorithms, DirtyWrprot, PageWrprot, RmapDrop, RmapIteration};
pub use fault::Fault;
pub use paging::{GvaFault, PagingConfig, PagingFault, PagingStats, RootRef};

use crate::error::Error;
use crate::memslot::Memslots;
use crate::mmu::{Invalidation, MmuStats};
use crate::page::{Pages, Role};
use crate::rmap::{self, DescPool, SpteRef};
use crate::spte::{Spte, SpteFormat};
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, Pfn};

/// The shadow MMU's state: pages, reverse-map descriptors, the root.
pub struct ShadowMmu<A: TableAllocator> {
    pub(crate) alloc: A,
    pub(crate) pages: Pages,
    pub(crate) pool: DescPool,
    /// The direct-mode root (0 under shadow paging, whose roots are per CR3).
    root: u32,
    invalid_list: Vec<u32>,
    pub(crate) format: SpteFormat,
    pub(crate) paging: Option<alloc::boxed::Box<paging::Paging>>,
    /// Shadow paging: a zap invalidated a root in use; the VM has vCPUs reload.
    pub(crate) roots_invalidated: bool,
    max_level: Level,
    pub(crate) algos: Algorithms,
    pub(crate) invalidation: Invalidation,
    pub(crate) stats: MmuStats,
    /// Direct mode: the linked last-level page of each 2 MiB region (see `leaf_tables`).
    pub(crate) leaf_tables: leaf_tables::LeafTables,
}

impl<A: TableAllocator> ShadowMmu<A> {
    /// A new MMU with an empty root table; huge mappings up to `max_level`; the
    /// algorithms `algos` where the seeds offer a choice.
    pub fn new(alloc: A, max_level: Level, algos: Algorithms) -> Result<Self, Error> {
        let mut pages = Pages::new();
        let root = pages
            .create(&alloc, Role::direct(Level::ROOT), Gfn(0), 0)
            .ok_or(Error::OutOfTableMemory)?;
        pages.get_mut(root).root_count = 1;
        Ok(ShadowMmu {
            alloc,
            pages,
            pool: DescPool::new(),
            root,
            invalid_list: Vec::new(),
            format: SpteFormat::EPT,
            paging: None,
            roots_invalidated: false,
            max_level: max_level.min(Level::L1G),
            algos,
            invalidation: Invalidation::default(),
            stats: MmuStats::default(),
            leaf_tables: leaf_tables::LeafTables::default(),
        })
    }

    /// A shadow-paging MMU: legacy-format tables shadowing the guest's page tables, one
    /// root per guest CR3 (see [`paging`]).
    pub fn new_paging(alloc: A, max_level: Level, algos: Algorithms, cfg: PagingConfig) -> Self {
        ShadowMmu {
            alloc,
            pages: Pages::new(),
            pool: DescPool::new(),
            root: 0,
            invalid_list: Vec::new(),
            format: SpteFormat::LEGACY,
            paging: Some(alloc::boxed::Box::new(paging::Paging::new(cfg))),
            roots_invalidated: false,
            max_level: max_level.min(Level::L1G),
            algos,
            invalidation: Invalidation::default(),
            stats: MmuStats::default(),
            leaf_tables: leaf_tables::LeafTables::default(),
        }
    }

    /// Whether the MMU shadows guest page tables.
    pub fn is_paging(&self) -> bool {
        self.paging.is_some()
    }

    /// The SPTE format the MMU builds.
    pub fn format(&self) -> SpteFormat {
        self.format
    }

    /// The direct-mode root table's frame (what a vCPU loads as its EPT pointer; 0 under
    /// shadow paging).
    pub fn root_frame(&self) -> Pfn {
        self.pages.try_get(self.root).map_or(Pfn(0), |sp| sp.frame)
    }
    /// The root page's id.
    pub fn root_id(&self) -> u32 {
        self.root
    }
    /// The shadow pages.
    pub fn pages(&self) -> &Pages {
        &self.pages
    }
    /// The reverse-map descriptor pool.
    pub fn pool(&self) -> &DescPool {
        &self.pool
    }
    /// The algorithms in use.
    pub fn algorithms(&self) -> Algorithms {
        self.algos
    }
    /// Work counters.
    pub fn stats(&self) -> MmuStats {
        self.stats
    }
    /// The table allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }
    /// Pages unlinked and waiting for a flush.
    pub fn invalid_pages(&self) -> usize {
        self.invalid_list.len()
    }

    /// Read the SPTE `sref` names.
    #[inline]
    pub fn spte(&self, sref: SpteRef) -> Spte {
        self.pages.get(sref.table_id()).table().get(sref.index())
    }

    /// Clear the leaf SPTE at (`id`, `i`) of `level` and take it out of its gfn's reverse
    /// map (KVM's `drop_spte`). The caller owes a flush.
    pub(crate) fn drop_leaf(
        &mut self,
        slots: &mut Memslots,
        id: u32,
        i: usize,
        level: Level,
    ) -> Spte {
        let sp = self.pages.get_mut(id);
        let gfn = sp.gfn_at(i);
        let old = sp.spte_clear(i);
        debug_assert!(old.is_shadow_present() && old.is_leaf(level));
        let slot = slots
            .lookup_mut(gfn)
            .expect("present leaf SPTE outside every memslot");
        let removed = slot.rmap_remove(gfn, level, SpteRef::new(id, i), &mut self.pool);
        debug_assert!(removed, "leaf SPTE missing from its reverse map");
        self.stats.leaves_zapped += 1;
        old
    }

    /// Link a new child page under entry `i` of page `id` (KVM's `link_shadow_page`).
    fn link_child(&mut self, id: u32, i: usize, child: u32) {
        let frame = self.pages.get(child).frame;
        let nonleaf = self.format.nonleaf(frame);
        let parent = self.pages.get_mut(id);
        parent.set_child(i, child);
        parent.spte_set(i, nonleaf);
        let sp = self.pages.get_mut(child);
        rmap::add(&mut sp.parent_ptes, SpteRef::new(id, i), &mut self.pool);
        if self.paging.is_none() && sp.role.level() == Level::L4K {
            self.leaf_tables.linked(sp.gfn, child);
        }
    }

    /// Page `id` lost its last parent: out of the leaf-table map if it is in it.
    pub(crate) fn leaf_table_unlinked(&mut self, id: u32) {
        let sp = self.pages.get(id);
        if sp.role.level() == Level::L4K && sp.parent_ptes.is_empty() {
            self.leaf_tables.unlinked(sp.gfn, id);
        }
    }

    /// Unlink the child under entry `i` of page `id`: clear the parent SPTE and drop it
    /// from the child's `parent_ptes`. Returns the child's id.
    fn unlink_child(&mut self, id: u32, i: usize) -> u32 {
        let parent = self.pages.get_mut(id);
        let child = parent.child(i);
        parent.spte_clear(i);
        parent.set_child(i, 0);
        if parent.unsync_children != 0 {
            self.clear_unsync(id, i);
        }
        let sp = self.pages.get_mut(child);
        let removed = rmap::remove(&mut sp.parent_ptes, SpteRef::new(id, i), &mut self.pool);
        debug_assert!(removed, "child page does not name its parent");
        self.leaf_table_unlinked(child);
        child
    }

    /// Free the frames of every page unlinked since the last flush.
    ///
    /// # Safety
    /// A remote TLB flush has completed since the pages were unlinked, so no vCPU is still
    /// walking them.
    pub unsafe fn free_invalid_pages(&mut self) {
        for id in self.invalid_list.drain(..) {
            // SAFETY: forwarded from the caller.
            unsafe { self.pages.free(&self.alloc, id) };
            self.stats.pages_freed += 1;
        }
    }

    /// Tear everything down, root included. Used when the VM goes away.
    ///
    /// # Safety
    /// No vCPU will run again.
    pub unsafe fn destroy(&mut self, slots: &mut Memslots) {
        if self.is_paging() {
            let _ = self.zap_all_paging(slots);
            // Roots the vCPUs still hold: nothing runs any more.
            for (id, sp) in self.pages.iter() {
                if sp.root_count != 0 {
                    self.invalid_list.push(id);
                }
            }
            // SAFETY: forwarded from the caller.
            unsafe { self.free_invalid_pages() };
            return;
        }
        let _ = self.zap_all(slots);
        let root = self.root;
        self.invalid_list.push(root);
        // SAFETY: forwarded from the caller.
        unsafe { self.free_invalid_pages() };
    }
}
