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

use alloc::boxed::Box;
use alloc::collections::BTreeMap;

use crate::types::{Gfn, Level};

/// Regions per chunk: a chunk covers 1 GiB of gfns.
const REGIONS: usize = 512;

/// One GiB of gfns: the page id of each 2 MiB region (0: none), and how many are set.
#[derive(Debug)]
pub(crate) struct Chunk {
    pages: Box<[u32; REGIONS]>,
    set: u32,
}

impl Chunk {
    /// The page mapping `gfn`'s region at 4 KiB, if one is linked (`gfn` in this chunk).
    #[inline]
    pub(crate) fn get(&self, gfn: Gfn) -> Option<u32> {
        let id = self.pages[region(gfn) % REGIONS];
        (id != 0).then_some(id)
    }
}

/// The map: 1 GiB chunks by `gfn >> 18`, each an array of its 512 regions, so a lookup
/// is an index into a 2 KiB array (16 regions, 32 MiB of gfns, to a cache line) once its
/// chunk is known, and [`LeafTables::chunk`] lets a caller keep the chunk across regions.
#[derive(Debug, Default)]
pub(crate) struct LeafTables(BTreeMap<u64, Chunk>);

/// The region of `gfn`.
#[inline]
fn region(gfn: Gfn) -> usize {
    (gfn.0 >> Level::L2M.gfn_shift()) as usize
}

/// The chunk of `gfn`.
#[inline]
fn chunk_of(gfn: Gfn) -> u64 {
    gfn.0 >> Level::L1G.gfn_shift()
}

impl LeafTables {
    /// Page `id`, mapping the region starting at `gfn`, was linked.
    pub(crate) fn linked(&mut self, gfn: Gfn, id: u32) {
        let c = self.0.entry(chunk_of(gfn)).or_insert_with(|| Chunk {
            pages: Box::new([0; REGIONS]),
            set: 0,
        });
        let slot = &mut c.pages[region(gfn) % REGIONS];
        debug_assert!(
            *slot == 0 || *slot == id,
            "two direct 4K pages {} and {id} for gfn {gfn:?}",
            *slot
        );
        if *slot == 0 {
            c.set += 1;
        }
        *slot = id;
    }

    /// Page `id`, mapping the region starting at `gfn`, lost its parent.
    pub(crate) fn unlinked(&mut self, gfn: Gfn, id: u32) {
        let key = chunk_of(gfn);
        let Some(c) = self.0.get_mut(&key) else {
            return;
        };
        let slot = &mut c.pages[region(gfn) % REGIONS];
        if *slot == id {
            *slot = 0;
            c.set -= 1;
            if c.set == 0 {
                self.0.remove(&key);
            }
        }
    }

    /// The chunk holding `gfn`'s region, if any page of it is linked.
    #[inline]
    pub(crate) fn chunk(&self, gfn: Gfn) -> Option<&Chunk> {
        self.0.get(&chunk_of(gfn))
    }

    /// The page mapping `gfn`'s region at 4 KiB, if one is linked.
    pub(crate) fn get(&self, gfn: Gfn) -> Option<u32> {
        self.chunk(gfn)?.get(gfn)
    }

    /// Every (first gfn of the region, page id).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Gfn, u32)> + '_ {
        self.0.iter().flat_map(|(&k, c)| {
            c.pages.iter().enumerate().filter(|(_, &id)| id != 0).map(move |(r, &id)| {
                let region = (k as usize * REGIONS + r) as u64;
                (Gfn(region << Level::L2M.gfn_shift()), id)
            })
        })
    }

    /// Regions in the map.
    pub(crate) fn len(&self) -> usize {
        self.0.values().map(|c| c.set as usize).sum()
    }
}
