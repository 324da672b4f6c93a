//! Direct mode: the last-level page of each 2 MiB region of gfns, so that dirty-log write
//! protection finds a dirty gfn's SPTE from the gfn alone, without loading its reverse-map
//! head (a cache miss per dirty gfn when the dirty pages are scattered).
//!
//! # Invariant (checked by `audit`)
//! In direct mode the map holds, for every region, the id of the 4 KiB direct page that is
//! linked under a parent and maps that region, and nothing else: a page enters when it is
//! linked (`ShadowMmu::link_child`) and leaves when it loses its parent (`unlink_child`,
//! `prepare_zap`, `free_empty_pages`), before it goes on the invalid list. Direct mode has
//! one root, so a region has at most one such page, and every 4 KiB leaf of a gfn in the
//! region is in it. Under shadow paging the map stays empty (leaves of a gfn sit in
//! indirect pages anywhere), and lookups fall back to the reverse maps.

use alloc::collections::BTreeMap;

use crate::types::{Gfn, Level};

/// The map: region (gfn >> 9) to page id.
#[derive(Debug, Default)]
pub(crate) struct LeafTables(BTreeMap<u64, u32>);

/// The region of `gfn`.
#[inline]
fn region(gfn: Gfn) -> u64 {
    gfn.0 >> Level::L2M.gfn_shift()
}

impl LeafTables {
    /// Page `id`, mapping the region starting at `gfn`, was linked.
    pub(crate) fn linked(&mut self, gfn: Gfn, id: u32) {
        let old = self.0.insert(region(gfn), id);
        debug_assert!(
            old.is_none_or(|o| o == id),
            "two direct 4K pages {old:?} and {id} for gfn {gfn:?}"
        );
    }

    /// Page `id`, mapping the region starting at `gfn`, lost its parent.
    pub(crate) fn unlinked(&mut self, gfn: Gfn, id: u32) {
        if self.0.get(&region(gfn)) == Some(&id) {
            self.0.remove(&region(gfn));
        }
    }

    /// The page mapping `gfn`'s region at 4 KiB, if one is linked.
    #[inline]
    pub(crate) fn get(&self, gfn: Gfn) -> Option<u32> {
        self.0.get(&region(gfn)).copied()
    }

    /// Every (first gfn of the region, page id).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Gfn, u32)> + '_ {
        self.0
            .iter()
            .map(|(&r, &id)| (Gfn(r << Level::L2M.gfn_shift()), id))
    }

    /// Regions in the map.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}
