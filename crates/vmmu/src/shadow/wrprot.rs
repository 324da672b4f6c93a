//! Write protection (KVM's `rmap_write_protect`, `kvm_mmu_slot_remove_write_access`,
//! `kvm_mmu_write_protect_pt_masked`), and the reverse-map visits every rmap-based
//! operation shares.
//!
//! Two writable states, as KVM keeps them:
//! - dirty-logging protection clears W but keeps MMU-writable, so the next write fault
//!   restores W on the lockless fast path (and logs the page);
//! - write tracking (shadow paging's protection of guest page tables) clears
//!   MMU-writable too, so only the locked fault path can make the SPTE writable again.
//!
//! Clearing W needs a flush: a vCPU may hold a writable translation in its TLB.

use crate::dirty::DirtyMasks;
use crate::flush::Flush;
use crate::memslot::Memslots;
use crate::page::{Pages, ShadowPage};
use crate::rmap::{self, DescPool, RmapHead, SpteRef};
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, SPTE_ENT_PER_PAGE};

use super::leaf_tables::Chunk;
use super::{DirtyWrprot, PageWrprot, RmapIteration, ShadowMmu};

/// Cost model of [`DirtyWrprot::Adaptive`], in tenths of a nanosecond, fitted to
/// `examples/harvest_prof` (GET of a 1 GiB slot at 4K, strided writes, 2 cores):
/// - per gfn: one reverse-map lookup and SPTE update at a scattered place, ~13 ns;
/// - walk: ~25 ns per shadow page looked at (its eight mask words), ~0.9 ns per dirty
///   SPTE visited (neighbours share lines), plus ~4.5 ns per branch the CPU mispredicts
///   on "is this entry's bit set?", which happens about `dirty * (1 - dirty / mapped)`
///   times.
///
/// The crossover lands near 0.4% dirty; the measured one lies between 0.3% and 1%.
const COST_PER_GFN: u64 = 130;
const COST_PER_PAGE: u64 = 250;
const COST_PER_DIRTY_WALKED: u64 = 9;
const COST_PER_MISPREDICT: u64 = 45;

/// Whether `gfn`'s bit is set in `masks`; true without masks.
#[inline]
fn in_masks(masks: Option<&DirtyMasks<'_>>, gfn: Gfn) -> bool {
    masks.is_none_or(|m| m.contains(gfn))
}

/// Call `f` on every entry of `head`, iterating as `mode` says (seed 000).
#[inline]
pub(crate) fn for_each_rmap_spte(
    head: RmapHead,
    pool: &DescPool,
    mode: RmapIteration,
    mut f: impl FnMut(SpteRef),
) {
    match mode {
        RmapIteration::Iterator => rmap::iter(head, pool).for_each(f),
        RmapIteration::RestartScan => {
            let mut prev = None;
            while let Some(s) = rmap::next_restart_scan(head, pool, prev) {
                f(s);
                prev = Some(s);
            }
        }
    }
}

/// Clear W (and, when `track`, MMU-writable) on the SPTE `sref` names. Returns whether
/// the SPTE was writable (so a flush is owed).
#[inline]
fn spte_write_protect(pages: &mut Pages, sref: SpteRef, track: bool) -> bool {
    let sp = pages.get_mut(sref.table_id());
    let i = sref.index();
    let old = sp.table().get(i);
    let flush = old.is_writable();
    if flush || (track && old.is_mmu_writable()) {
        let new = if track {
            old.write_tracked()
        } else {
            old.write_protected()
        };
        sp.spte_update(i, new);
    }
    flush
}

/// Clear W on the 4K leaves of the direct page `sp` at entries `first..last` whose gfn is
/// set in `masks`, 64 entries at a time: the word of the masks, and with
/// [`PageWrprot::Bitmap`] the possibly-writable word, say which entries to look at.
/// Returns whether a writable SPTE was protected.
fn protect_direct_masked(
    sp: &ShadowPage,
    first: usize,
    last: usize,
    masks: &DirtyMasks<'_>,
    how: PageWrprot,
) -> bool {
    if how == PageWrprot::Bitmap && sp.possible_writable == 0 {
        return false;
    }
    let writable = sp.possible_writable_words();
    let mut flush = false;
    for (w, &pw) in writable.iter().enumerate() {
        let (lo, hi) = (w * 64, w * 64 + 64);
        if hi <= first || lo >= last {
            continue;
        }
        let mut bits = masks.bits_from(Gfn(sp.gfn.0 + lo as u64));
        if how == PageWrprot::Bitmap {
            bits &= pw;
        }
        if first > lo {
            bits &= u64::MAX << (first - lo);
        }
        if last < hi {
            bits &= u64::MAX >> (hi - last);
        }
        while bits != 0 {
            let i = lo + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let spte = sp.table().get(i);
            if spte.is_shadow_present() && spte.is_leaf(Level::L4K) && spte.is_writable() {
                sp.spte_write_protect(i, spte);
                flush = true;
            }
        }
    }
    flush
}

/// Clear W on the SPTE `sref` names, for dirty logging (MMU-writable stays, so no counter
/// moves). Returns whether it was writable (so a flush is owed).
#[inline]
fn spte_clear_writable(pages: &Pages, sref: SpteRef) -> bool {
    clear_writable_at(pages.get(sref.table_id()), sref.index())
}

/// [`spte_clear_writable`] of entry `i` of `sp`.
#[inline]
fn clear_writable_at(sp: &ShadowPage, i: usize) -> bool {
    let old = sp.table().get(i);
    if old.is_writable() {
        sp.spte_write_protect(i, old);
        return true;
    }
    false
}

impl<A: TableAllocator> ShadowMmu<A> {
    /// Write-protect every leaf mapping `gfn` at `min_level` and above, through the
    /// reverse maps (KVM's `rmap_write_protect`). With `track`, also clear MMU-writable
    /// (write tracking). `gfn` must be in a memslot.
    pub fn rmap_write_protect(
        &mut self,
        slots: &Memslots,
        gfn: Gfn,
        min_level: Level,
        track: bool,
    ) -> Flush {
        let Some(slot) = slots.lookup(gfn) else {
            return Flush::NONE;
        };
        let mut flush = false;
        let (pages, pool, mode) = (&mut self.pages, &self.pool, self.algos.rmap_iteration);
        for level in Level::LEAF_LEVELS.into_iter().filter(|&l| l >= min_level) {
            if slot.rmap_entries(level) == 0 {
                continue;
            }
            for_each_rmap_spte(slot.rmap_head(gfn, level), pool, mode, |s| {
                flush |= spte_write_protect(pages, s, track);
            });
        }
        Flush::new(flush)
    }

    /// Write-protect the 4K mappings of the gfns `base + i` for every bit `i` of `mask`
    /// (KVM's `kvm_mmu_write_protect_pt_masked`). In direct mode the 4K leaf of a gfn is
    /// found from the gfn through the leaf-table map; under shadow paging through its
    /// reverse map. Huge leaves are found through their reverse maps.
    pub fn write_protect_masked(&mut self, slots: &Memslots, base: Gfn, mut mask: u64) -> Flush {
        // One memslot lookup per mask: its 64 gfns lie in one slot.
        let Some(slot) = slots.lookup(Gfn(base.0 + mask.trailing_zeros() as u64)) else {
            return Flush::NONE;
        };
        // Levels with no mapping in the slot are skipped for the whole mask.
        let [(_, small), huge @ ..] = Level::LEAF_LEVELS.map(|l| (l, slot.rmap_entries(l) != 0));
        let mut flush = false;
        let (pages, pool, mode) = (&self.pages, &self.pool, self.algos.rmap_iteration);
        let heads = slot.rmaps(Level::L4K);
        // Direct mode finds a gfn's 4K leaf from the gfn: the region's page (hot, one
        // lookup per 2 MiB) and the entry's index, with no reverse-map head to load.
        let direct = !self.is_paging();
        let mut region: Option<(Gfn, Option<&ShadowPage>)> = None;
        let mut chunk: Option<(Gfn, Option<&Chunk>)> = None;
        // Under shadow paging: the 4K heads of a mask's gfns are neighbours, and most
        // name one SPTE each, in one table: keep that table's page from gfn to gfn.
        let mut last: Option<(u32, &ShadowPage)> = None;
        while mask != 0 {
            let gfn = Gfn(base.0 + mask.trailing_zeros() as u64);
            mask &= mask - 1;
            if !slot.contains(gfn) {
                continue;
            }
            if small && direct {
                let start = gfn.align_down(Level::L2M);
                let sp = match region {
                    Some((r, sp)) if r == start => sp,
                    _ => {
                        let g = gfn.align_down(Level::L1G);
                        let c = match chunk {
                            Some((k, c)) if k == g => c,
                            _ => {
                                let c = self.leaf_tables.chunk(gfn);
                                chunk = Some((g, c));
                                c
                            }
                        };
                        let sp = c.and_then(|c| c.get(gfn)).map(|id| pages.get(id));
                        region = Some((start, sp));
                        sp
                    }
                };
                // No page: no 4K leaf maps the region.
                if let Some(sp) = sp {
                    let i = (gfn.0 - sp.gfn.0) as usize;
                    let spte = sp.table().get(i);
                    if spte.is_shadow_present() && spte.is_writable() {
                        sp.spte_write_protect(i, spte);
                        flush = true;
                    }
                }
            } else if small {
                let head = heads.get(gfn);
                match head.as_single() {
                    Some(s) => {
                        let sp = match last {
                            Some((id, sp)) if id == s.table_id() => sp,
                            _ => {
                                let sp = pages.get(s.table_id());
                                last = Some((s.table_id(), sp));
                                sp
                            }
                        };
                        flush |= clear_writable_at(sp, s.index());
                    }
                    None => for_each_rmap_spte(head, pool, mode, |s| {
                        flush |= spte_clear_writable(pages, s);
                    }),
                }
            }
            for (level, mapped) in huge {
                if mapped {
                    for_each_rmap_spte(slot.rmap_head(gfn, level), pool, mode, |s| {
                        flush |= spte_clear_writable(pages, s);
                    });
                }
            }
        }
        Flush::new(flush)
    }

    /// Write-protect the leaves of page `id` that map gfns in `[lo, hi)`, reading all 512
    /// entries or only the possibly-writable ones (seed 001), as configured. Returns
    /// whether a writable SPTE was protected.
    pub fn write_protect_page(&mut self, id: u32, lo: Gfn, hi: Gfn) -> bool {
        self.write_protect_page_masked(id, lo, hi, None)
    }

    /// [`write_protect_page`](Self::write_protect_page), protecting only the 4K leaves
    /// whose gfn's bit is set in `masks` (64 gfns a word from its `Gfn`), when given.
    fn write_protect_page_masked(
        &mut self,
        id: u32,
        lo: Gfn,
        hi: Gfn,
        masks: Option<&DirtyMasks<'_>>,
    ) -> bool {
        let sp = self.pages.get(id);
        let level = sp.role.level();
        let shift = level.gfn_shift();
        // Entries whose first gfn is in [lo, hi).
        let first = (lo.0.saturating_sub(sp.gfn.0).div_ceil(1 << shift))
            .min(SPTE_ENT_PER_PAGE as u64) as usize;
        let last = (hi.0.saturating_sub(sp.gfn.0).div_ceil(1 << shift))
            .min(SPTE_ENT_PER_PAGE as u64) as usize;
        // An indirect page's entries map gfns in no order: filter by each one's gfn.
        let indirect = sp.has_translations();
        let (first, last) = if indirect {
            (0, SPTE_ENT_PER_PAGE)
        } else {
            (first, last)
        };
        let in_range = |i: usize| {
            !indirect || {
                let g = sp.gfn_at(i);
                lo <= g && g < hi
            }
        };
        if let (false, Level::L4K, Some(m)) = (indirect, level, masks) {
            // A direct 4K page holds gfns in order: 64 entries take one word of the masks.
            return protect_direct_masked(sp, first, last, m, self.algos.page_wrprot);
        }
        let mut flush = false;
        match self.algos.page_wrprot {
            PageWrprot::Scan512 => {
                for i in 0..SPTE_ENT_PER_PAGE {
                    let spte = sp.table().get(i);
                    if spte.is_shadow_present()
                        && spte.is_leaf(level)
                        && spte.is_writable()
                        && (first..last).contains(&i)
                        && in_range(i)
                        && in_masks(masks, sp.gfn_at(i))
                    {
                        sp.spte_write_protect(i, spte);
                        flush = true;
                    }
                }
            }
            PageWrprot::Bitmap => {
                if sp.possible_writable == 0 {
                    return false;
                }
                for (w, mut bits) in sp.possible_writable_words().into_iter().enumerate() {
                    while bits != 0 {
                        let i = w * 64 + bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let spte = sp.table().get(i);
                        if spte.is_writable()
                            && (first..last).contains(&i)
                            && in_range(i)
                            && in_masks(masks, sp.gfn_at(i))
                        {
                            sp.spte_write_protect(i, spte);
                            flush = true;
                        }
                    }
                }
            }
        }
        flush
    }

    /// Write-protect every leaf of memslot `slot_id` by walking the shadow pages that map
    /// it (KVM's `kvm_mmu_slot_remove_write_access` of 2012: every page in use is looked
    /// at; those mapping the slot are protected).
    pub fn slot_remove_write_access(&mut self, slots: &Memslots, slot_id: u32) -> Flush {
        self.walk_write_protect(slots, slot_id, None)
    }

    /// Walk every shadow page mapping memslot `slot_id` and write-protect its leaves, or
    /// with `masks` only the 4K leaves whose gfn's bit is set.
    fn walk_write_protect(
        &mut self,
        slots: &Memslots,
        slot_id: u32,
        masks: Option<&DirtyMasks<'_>>,
    ) -> Flush {
        let Some(slot) = slots.by_id(slot_id) else {
            return Flush::NONE;
        };
        let (lo, hi) = match masks {
            None => (slot.base_gfn, slot.end_gfn()),
            Some(m) => (
                m.base.max(slot.base_gfn),
                Gfn(m.base.0 + 64 * m.masks().len() as u64).min(slot.end_gfn()),
            ),
        };
        let mut flush = false;
        for id in 1..self.pages.id_limit() {
            let Some(sp) = self.pages.try_get(id) else {
                continue;
            };
            let level = sp.role.level();
            if level > Level::L1G {
                continue;
            }
            let span = level.pages() * SPTE_ENT_PER_PAGE as u64;
            if !sp.has_translations() && (sp.gfn.0 >= hi.0 || sp.gfn.0 + span <= lo.0) {
                continue;
            }
            flush |= self.write_protect_page_masked(id, lo, hi, masks);
        }
        Flush::new(flush)
    }

    /// Write-protect the dirty gfns of `masks` in memslot `slot_id`, choosing the method as
    /// configured (seed 004). Returns the flush owed and the method used.
    pub fn write_protect_dirty(
        &mut self,
        slots: &Memslots,
        slot_id: u32,
        masks: &DirtyMasks<'_>,
    ) -> (Flush, DirtyWrprot) {
        let nr_dirty = masks.nr;
        if nr_dirty == 0 {
            return (Flush::NONE, DirtyWrprot::PerGfn);
        }
        let per_gfn = match self.algos.dirty_wrprot {
            DirtyWrprot::PerGfn => true,
            DirtyWrprot::WalkPages => false,
            DirtyWrprot::Kvm2012 => nr_dirty < self.pages.len() as u64,
            DirtyWrprot::Adaptive => {
                let mapped = slots
                    .by_id(slot_id)
                    .map_or(0, |s| s.rmap_entries(Level::L4K))
                    .max(nr_dirty);
                let mispredicts = nr_dirty * (mapped - nr_dirty) / mapped.max(1);
                let walk = self.pages.len() as u64 * COST_PER_PAGE
                    + nr_dirty * COST_PER_DIRTY_WALKED
                    + mispredicts * COST_PER_MISPREDICT;
                nr_dirty * COST_PER_GFN < walk
            }
        };
        if per_gfn {
            let mut flush = Flush::NONE;
            for (base, m) in masks.iter() {
                flush |= self.write_protect_masked(slots, base, m);
            }
            (flush, DirtyWrprot::PerGfn)
        } else {
            (
                self.walk_write_protect(slots, slot_id, Some(masks)),
                DirtyWrprot::WalkPages,
            )
        }
    }
}
