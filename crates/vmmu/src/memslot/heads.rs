//! A slot's reverse-map heads for one leaf level, allocated in chunks as pages are mapped.
//!
//! KVM allocates `rmap` arrays of one head per page for every slot up front. vmmu keeps
//! heads in chunks of [`CHUNK`] (a 2 MiB region at 4 KiB, 1 GiB at 2 MiB), aligned to
//! absolute gfns so a direct last-level table's 512 gfns are one chunk; a chunk is
//! allocated by the first head added in it. So the memory grows with what the shadow MMU
//! maps, not with the slot (a 1 TiB slot with 1 GiB mapped holds 1 GiB's worth of heads
//! and 8 bytes per unmapped chunk), and walks skip unmapped chunks. The TDP MMU has no
//! reverse maps: its slots hold no chunk array at all ([`RmapHeads::none`]).
//!
//! # Invariants
//! - Heads outside the slot's range (in the edge chunks) are always empty.
//! - A missing chunk reads as empty heads.
//!
//! # Locking
//! Inside the memslot, so under the VM's MMU lock: written only with it held exclusive.

use alloc::boxed::Box;

use crate::rmap::RmapHead;
use crate::types::{Gfn, Level};

/// Heads per chunk.
pub const CHUNK: usize = 512;

/// One level's reverse-map heads of a slot (see the module docs).
pub struct RmapHeads {
    /// The level-page number (`gfn >> level.gfn_shift()`) of chunk 0's first head.
    first: u64,
    level: Level,
    chunks: Box<[Option<Box<[RmapHead; CHUNK]>>]>,
}

impl RmapHeads {
    /// Heads for the level-`level` pages of gfns `[base, base + npages)`, none allocated.
    pub fn new(base: Gfn, npages: u64, level: Level) -> Self {
        let shift = level.gfn_shift();
        let first = (base.0 >> shift) & !(CHUNK as u64 - 1);
        let last = (base.0 + npages - 1) >> shift;
        let n = ((last - first) / CHUNK as u64 + 1) as usize;
        RmapHeads {
            first,
            level,
            chunks: (0..n).map(|_| None).collect(),
        }
    }

    /// No heads and no chunk array: for an MMU without reverse maps. Every head reads as
    /// empty; adding one panics.
    pub fn none(level: Level) -> Self {
        RmapHeads {
            first: 0,
            level,
            chunks: Box::new([]),
        }
    }

    #[inline]
    fn locate(&self, gfn: Gfn) -> (usize, usize) {
        let p = (gfn.0 >> self.level.gfn_shift()) - self.first;
        ((p / CHUNK as u64) as usize, (p % CHUNK as u64) as usize)
    }

    /// The head of the level page containing `gfn` (in the slot).
    #[inline]
    pub fn get(&self, gfn: Gfn) -> RmapHead {
        if self.chunks.is_empty() {
            return RmapHead::EMPTY;
        }
        let (c, i) = self.locate(gfn);
        self.chunks[c].as_ref().map_or(RmapHead::EMPTY, |h| h[i])
    }

    /// The head of the level page containing `gfn`, allocating its chunk.
    #[inline]
    pub fn get_mut(&mut self, gfn: Gfn) -> &mut RmapHead {
        assert!(!self.chunks.is_empty(), "reverse map of an MMU without them");
        let (c, i) = self.locate(gfn);
        &mut self.chunks[c].get_or_insert_with(|| Box::new([RmapHead::EMPTY; CHUNK]))[i]
    }

    /// The head of `gfn` if its chunk exists (a missing chunk means an empty head).
    #[inline]
    pub fn get_existing_mut(&mut self, gfn: Gfn) -> Option<&mut RmapHead> {
        if self.chunks.is_empty() {
            return None;
        }
        let (c, i) = self.locate(gfn);
        self.chunks[c].as_mut().map(|h| &mut h[i])
    }

    /// The chunk holding `gfn`'s head and the head's index in it, if allocated.
    #[inline]
    pub fn chunk(&self, gfn: Gfn) -> Option<(&[RmapHead; CHUNK], usize)> {
        if self.chunks.is_empty() {
            return None;
        }
        let (c, i) = self.locate(gfn);
        self.chunks[c].as_deref().map(|h| (h, i))
    }

    /// The 4 KiB heads of the 512 gfns from `first` (512-aligned), if allocated: a direct
    /// last-level table's gfns, which always share a chunk.
    #[inline]
    pub fn table_run_mut(&mut self, first: Gfn) -> Option<&mut [RmapHead; CHUNK]> {
        debug_assert!(self.level == Level::L4K && first.0.is_multiple_of(CHUNK as u64));
        if self.chunks.is_empty() {
            return None;
        }
        let (c, _) = self.locate(first);
        self.chunks[c].as_deref_mut()
    }

    /// Every allocated head whose level page overlaps gfns `[lo, hi)`, with the first gfn
    /// of its level page, in gfn order; `f` may change the head. Missing chunks are
    /// skipped, so the walk costs what is mapped. If `free_empty`, a chunk left with only
    /// empty heads after the walk and wholly inside the range is freed.
    pub fn for_each_mut(
        &mut self,
        lo: Gfn,
        hi: Gfn,
        free_empty: bool,
        mut f: impl FnMut(Gfn, &mut RmapHead),
    ) {
        if self.chunks.is_empty() || lo >= hi {
            return;
        }
        let shift = self.level.gfn_shift();
        let (p_lo, p_hi) = (lo.0 >> shift, (hi.0 - 1) >> shift);
        let (c_lo, c_hi) = (self.locate(lo).0, self.locate(Gfn(hi.0 - 1)).0);
        for c in c_lo..=c_hi {
            let Some(heads) = self.chunks[c].as_deref_mut() else {
                continue;
            };
            let chunk_first = self.first + (c * CHUNK) as u64;
            let from = p_lo.saturating_sub(chunk_first).min(CHUNK as u64) as usize;
            let to = (p_hi + 1 - chunk_first).min(CHUNK as u64) as usize;
            for (i, head) in heads[from..to].iter_mut().enumerate() {
                if !head.is_empty() {
                    f(Gfn((chunk_first + (from + i) as u64) << shift), head);
                }
            }
            if free_empty && (from, to) == (0, CHUNK) && heads.iter().all(|h| h.is_empty()) {
                self.chunks[c] = None;
            }
        }
    }

    /// Every non-empty head, with the first gfn of its level page, in gfn order.
    pub fn iter(&self) -> impl Iterator<Item = (Gfn, RmapHead)> + '_ {
        let shift = self.level.gfn_shift();
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(c, h)| h.as_deref().map(|h| (c, h)))
            .flat_map(move |(c, heads)| {
                let first = self.first + (c * CHUNK) as u64;
                heads
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| !h.is_empty())
                    .map(move |(i, &h)| (Gfn((first + i as u64) << shift), h))
            })
    }

    /// Bytes held: the chunk array and the chunks.
    pub fn bytes(&self) -> usize {
        self.chunks.len() * core::mem::size_of::<Option<Box<[RmapHead; CHUNK]>>>()
            + self.chunks.iter().flatten().count() * core::mem::size_of::<[RmapHead; CHUNK]>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rmap::{add, DescPool, SpteRef};

    fn single(sref: SpteRef) -> RmapHead {
        let mut h = RmapHead::EMPTY;
        add(&mut h, sref, &mut DescPool::new());
        h
    }

    #[test]
    fn chunks_are_allocated_by_use_and_aligned_to_gfns() {
        // A slot from gfn 100 of 2000 pages: chunks at gfn 0, 512, 1024, 1536, 2048.
        let mut h = RmapHeads::new(Gfn(100), 2000, Level::L4K);
        assert_eq!(h.bytes(), 5 * 8);
        assert_eq!(h.get(Gfn(700)), RmapHead::EMPTY);
        *h.get_mut(Gfn(700)) = single(SpteRef::new(3, 700 - 512));
        assert_eq!(h.bytes(), 5 * 8 + CHUNK * 4);
        assert_eq!(h.get(Gfn(700)), single(SpteRef::new(3, 188)));
        assert!(h.table_run_mut(Gfn(512)).is_some());
        assert!(h.table_run_mut(Gfn(1024)).is_none());
        assert_eq!(h.iter().collect::<alloc::vec::Vec<_>>().len(), 1);
        let mut seen = 0;
        h.for_each_mut(Gfn(100), Gfn(2100), true, |g, head| {
            assert_eq!(g, Gfn(700));
            *head = RmapHead::EMPTY;
            seen += 1;
        });
        assert_eq!(seen, 1);
        assert_eq!(h.bytes(), 5 * 8, "an emptied chunk inside the range is freed");
    }

    #[test]
    fn huge_levels_index_level_pages() {
        let mut h = RmapHeads::new(Gfn(512 * 3), 512 * 10, Level::L2M);
        *h.get_mut(Gfn(512 * 5 + 7)) = single(SpteRef::new(1, 2));
        assert_eq!(h.get(Gfn(512 * 5)), single(SpteRef::new(1, 2)));
        let got: alloc::vec::Vec<_> = h.iter().map(|(g, _)| g).collect();
        assert_eq!(got, [Gfn(512 * 5)]);
        let none = RmapHeads::none(Level::L4K);
        assert_eq!(none.get(Gfn(5)), RmapHead::EMPTY);
        assert_eq!(none.bytes(), 0);
    }
}
