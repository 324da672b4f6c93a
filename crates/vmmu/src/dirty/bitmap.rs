//! A slot's dirty bitmap, with two levels of summary of its non-zero words, and the masks
//! a harvest hands to the MMUs ([`DirtyMasks`]).
//!
//! One bit per 4 KiB page, 64 pages a word; one summary bit per word (4096 pages), one
//! top bit per summary word (256 Ki pages, 1 GiB). A harvest visits only the summary
//! words the top names and the words they name, so what it costs grows with the dirty
//! words, not with the slot: a 1 TiB slot has 4 Mi words, 64 Ki summary words and 1024
//! top words.
//!
//! # Invariants
//! - At rest (no marker between its steps) every non-zero word has its summary bit set,
//!   and every non-zero summary word its top bit. A summary (top) bit may be set over a
//!   zero word (summary word): a harvest clears it when it looks.
//! - A marker sets the word's bit first, then, if the word was zero, the summary bit,
//!   then, if the summary word was zero, the top bit; a harvester exchanges the top word
//!   first, then the summary words it names, then the words they name. At each level,
//!   either the harvester sees the marker's bit, or the marker's bit lands after the
//!   harvester's exchange and the next harvest sees it. A bit set into a word that another
//!   marker has just made non-zero, before that marker sets the summary bit, is reported
//!   by the harvest after that marker finishes: late, never lost (and the page stays
//!   writable only because its bit is set).
//! - CLEAR only and-s bits out of words; a summary (top) bit it leaves over a zero word
//!   (summary word) is dropped by the next harvest that only copies (manual protect's
//!   GET): one atomic per summary (top) word, then a second look at those words, setting
//!   back the bit of any a marker filled in between.
//!
//! # Locking
//! None: markers (faults, lockless ones included) and harvesters (under the MMU lock)
//! meet only in these atomics.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::types::Gfn;

/// A slot's dirty bitmap (see the module docs).
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
    top: Box<[AtomicU64]>,
}

/// `n` atomic words for `nbits` bits, every bit clear or, with `all_set`, every bit set.
fn level(nbits: u64, all_set: bool) -> Box<[AtomicU64]> {
    (0..nbits.div_ceil(64))
        .map(|w| {
            let bits = (nbits - w * 64).min(64);
            AtomicU64::new(match (all_set, bits) {
                (false, _) => 0,
                (true, 64) => u64::MAX,
                (true, b) => (1u64 << b) - 1,
            })
        })
        .collect()
}

/// Drop the bits of `zero` from `word` (they named words or summary words seen zero),
/// then look at those again (`is_set(j)`) and put back the bit of any a marker filled in
/// between (module docs).
#[inline]
fn drop_zero_bits(word: &AtomicU64, mut zero: u64, is_set: impl Fn(usize) -> bool) {
    word.fetch_and(!zero, Ordering::AcqRel);
    let mut back = 0;
    while zero != 0 {
        let j = zero.trailing_zeros() as usize;
        zero &= zero - 1;
        if is_set(j) {
            back |= 1 << j;
        }
    }
    if back != 0 {
        word.fetch_or(back, Ordering::AcqRel);
    }
}

/// Take (`swap`) or read the bits of a summary or top word.
#[inline]
fn read_level(word: &AtomicU64, take: bool) -> u64 {
    if take {
        word.swap(0, Ordering::AcqRel)
    } else {
        word.load(Ordering::Acquire)
    }
}

impl DirtyBitmap {
    /// A bitmap for `npages` pages, every bit clear or, with `all_set`, every bit of a
    /// page set (KVM_DIRTY_LOG_INITIALLY_SET).
    pub fn new(npages: u64, all_set: bool) -> Self {
        let nwords = npages.div_ceil(64);
        DirtyBitmap {
            words: level(npages, all_set),
            summary: level(nwords, all_set),
            top: level(nwords.div_ceil(64), all_set),
        }
    }

    /// Mark page `offset` dirty; returns whether it was clean.
    #[inline]
    pub fn mark(&self, offset: u64) -> bool {
        let w = (offset / 64) as usize;
        let bit = 1u64 << (offset % 64);
        // Release: a harvester that reads the summary bit below sees this word's bit.
        let old = self.words[w].fetch_or(bit, Ordering::AcqRel);
        if old == 0 {
            let s = w / 64;
            if self.summary[s].fetch_or(1 << (w % 64), Ordering::AcqRel) == 0 {
                self.top[s / 64].fetch_or(1 << (s % 64), Ordering::AcqRel);
            }
        }
        old & bit == 0
    }

    /// Whether page `offset` is marked.
    #[inline]
    pub fn test(&self, offset: u64) -> bool {
        self.words[(offset / 64) as usize].load(Ordering::Relaxed) & (1 << (offset % 64)) != 0
    }

    /// The words.
    pub fn words(&self) -> &[AtomicU64] {
        &self.words
    }

    /// Words of summary [`harvest`](Self::harvest) needs for its `nonzero`.
    pub fn summary_len(&self) -> usize {
        self.summary.len()
    }

    /// Bytes held (words and both summaries).
    pub fn bytes(&self) -> usize {
        (self.words.len() + self.summary.len() + self.top.len()) * 8
    }

    /// Copy the bitmap into `out` (at least as many words as the bitmap's; the rest is
    /// left alone), taking the bits out of it when `take` (GET without manual protect),
    /// and record in `nonzero` (one bit per word, at least `words().len() / 64` rounded up
    /// words, overwritten) which words of `out` are not zero. Returns the number of pages
    /// reported. Only the words the summaries name are read.
    pub fn harvest(&self, out: &mut [u64], nonzero: &mut [u64], take: bool) -> u64 {
        out[..self.words.len()].fill(0);
        nonzero[..self.summary.len()].fill(0);
        self.harvest_each(take, |w, v| {
            out[w] = v;
            nonzero[w / 64] |= 1 << (w % 64);
        })
    }

    /// Call `f(word index, bits)` on every non-zero word, in increasing order, taking the
    /// bits out of the bitmap when `take`. Returns the number of pages reported. Visits
    /// the top words, the summary words they name and the words those name: the cost
    /// grows with the dirty words (and the slot's GiBs, one top bit each), and nothing is
    /// written but the bitmap itself.
    pub fn harvest_each(&self, take: bool, mut f: impl FnMut(usize, u64)) -> u64 {
        let mut nr = 0;
        for (t, top) in self.top.iter().enumerate() {
            if top.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut rest = read_level(top, take);
            let mut top_zero = 0u64;
            while rest != 0 {
                let k = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let i = t * 64 + k;
                let s = &self.summary[i];
                let (mut bits, mut zero) = (read_level(s, take), 0u64);
                if bits == 0 {
                    top_zero |= 1 << k;
                }
                while bits != 0 {
                    let j = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let w = i * 64 + j;
                    let v = read_level(&self.words[w], take);
                    if v != 0 {
                        f(w, v);
                        nr += v.count_ones() as u64;
                    } else {
                        zero |= 1 << j;
                    }
                }
                if !take && zero != 0 {
                    // Summary bits over words CLEAR emptied.
                    drop_zero_bits(s, zero, |j| {
                        self.words[i * 64 + j].load(Ordering::Acquire) != 0
                    });
                    if s.load(Ordering::Relaxed) == 0 {
                        top_zero |= 1 << k;
                    }
                }
            }
            if !take && top_zero != 0 {
                // Top bits over summary words now empty.
                drop_zero_bits(top, top_zero, |k| {
                    self.summary[t * 64 + k].load(Ordering::Acquire) != 0
                });
            }
        }
        nr
    }

    /// Clear the bits of `user` in word `w`; returns the bits that were set. The summary
    /// bit stays, even over a word left zero: the next copying harvest drops it.
    #[inline]
    pub fn clear_word(&self, w: usize, user: u64) -> u64 {
        let word = &self.words[w];
        if word.load(Ordering::Relaxed) & user == 0 {
            return 0;
        }
        word.fetch_and(!user, Ordering::AcqRel) & user
    }
}

/// Pages to write-protect after a harvest: bit `i` of `masks[k]` is gfn
/// `base + 64 * k + i`, and bit `k % 64` of `nonzero[k / 64]` says `masks[k]` is not zero
/// (so a sparse harvest visits only its dirty words).
#[derive(Clone, Copy)]
pub struct DirtyMasks<'a> {
    /// The gfn of bit 0 of `masks[0]`.
    pub base: Gfn,
    masks: &'a [u64],
    index: Index<'a>,
    /// Bits set in all.
    pub nr: u64,
}

/// How a [`DirtyMasks`] finds its non-zero words.
#[derive(Clone, Copy)]
enum Index<'a> {
    /// One bit per word (bit `k % 64` of `nonzero[k / 64]` for word `k`).
    Summary(&'a [u64]),
    /// The non-zero words' indices, increasing.
    Listed(&'a [u32]),
    /// None: every word is looked at.
    Dense,
}

impl<'a> DirtyMasks<'a> {
    /// Masks with their non-zero summary (`nonzero` must name every non-zero word).
    pub fn new(base: Gfn, masks: &'a [u64], nonzero: &'a [u64], nr: u64) -> Self {
        debug_assert!(masks
            .iter()
            .enumerate()
            .all(|(k, &m)| m == 0 || nonzero[k / 64] & (1 << (k % 64)) != 0));
        DirtyMasks {
            base,
            masks,
            index: Index::Summary(nonzero),
            nr,
        }
    }

    /// Masks whose non-zero words are `words` (increasing, every non-zero word named):
    /// for a sparse set gathered into a large scratch array ([`MaskScratch`]), so nothing
    /// visits the slot's clean words.
    pub fn listed(base: Gfn, masks: &'a [u64], words: &'a [u32], nr: u64) -> Self {
        debug_assert!(words.windows(2).all(|w| w[0] < w[1]));
        debug_assert_eq!(
            masks.iter().filter(|&&m| m != 0).count(),
            words.iter().filter(|&&w| masks[w as usize] != 0).count()
        );
        DirtyMasks {
            base,
            masks,
            index: Index::Listed(words),
            nr,
        }
    }

    /// Masks without a summary: every word is looked at.
    pub fn dense(base: Gfn, masks: &'a [u64]) -> Self {
        let nr = masks.iter().map(|m| m.count_ones() as u64).sum();
        DirtyMasks {
            base,
            masks,
            index: Index::Dense,
            nr,
        }
    }

    /// The masks, by word.
    pub fn masks(&self) -> &'a [u64] {
        self.masks
    }

    /// Whether `gfn`'s bit is set.
    #[inline]
    pub fn contains(&self, gfn: Gfn) -> bool {
        let bit = gfn.0.wrapping_sub(self.base.0) as usize;
        self.masks
            .get(bit / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// The 64 bits of gfns `gfn .. gfn + 64` (bit `i` is `gfn + i`), wherever `gfn` falls
    /// relative to the masks' words (zero outside them).
    #[inline]
    pub fn bits_from(&self, gfn: Gfn) -> u64 {
        let off = gfn.0.wrapping_sub(self.base.0) as i64;
        let word = |k: i64| -> u64 {
            usize::try_from(k)
                .ok()
                .and_then(|k| self.masks.get(k))
                .copied()
                .unwrap_or(0)
        };
        let (k, r) = (off.div_euclid(64), off.rem_euclid(64) as u32);
        if r == 0 {
            word(k)
        } else {
            (word(k) >> r) | (word(k + 1) << (64 - r))
        }
    }

    /// Whether any of the 512 gfns from `gfn` (a last-level table's) may be set: false
    /// only if none is. With a summary it reads summary bits, not the masks.
    #[inline]
    pub fn any_in_table(&self, gfn: Gfn) -> bool {
        let off = gfn.0.wrapping_sub(self.base.0) as i64;
        let first = off.div_euclid(64);
        // The table's 512 gfns touch words first..=first + 8 (one more when misaligned).
        let last = (off + 511).div_euclid(64);
        (first.max(0)..=last.min(self.masks.len() as i64 - 1)).any(|k| {
            let k = k as usize;
            match self.index {
                Index::Summary(nz) => nz[k / 64] & (1 << (k % 64)) != 0,
                Index::Listed(_) | Index::Dense => self.masks[k] != 0,
            }
        })
    }

    /// The non-zero masks in order, each with the gfn of its bit 0.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (Gfn, u64)> + 'a {
        let (base, masks) = (self.base, self.masks);
        let at = move |k: usize| (Gfn(base.0 + 64 * k as u64), masks[k]);
        let (summary, listed, all): (&[u64], &[u32], usize) = match self.index {
            Index::Summary(nz) => (nz, &[], 0),
            Index::Listed(words) => (&[], words, 0),
            // Without an index, every word is looked at.
            Index::Dense => (&[], &[], masks.len()),
        };
        let sparse = summary.iter().enumerate().flat_map(move |(i, &s)| {
            BitIter(s).map(move |j| at(i * 64 + j))
        });
        let listed = listed.iter().map(move |&k| at(k as usize));
        let dense = masks[..all]
            .iter()
            .enumerate()
            .filter(|(_, &m)| m != 0)
            .map(move |(k, _)| at(k));
        sparse.chain(listed).chain(dense)
    }
}

/// Zeroed 64-page masks of one slot at a time and the list of the words set in them: a
/// VM keeps one, so a sparse harvest (CLEAR, a ring reset, dirty ranges) gathers its
/// pages into a slot-sized array without clearing or scanning it: everything it costs
/// follows the words it set. All zero between uses ([`reset`](Self::reset)).
#[derive(Default)]
pub struct MaskScratch {
    masks: Vec<u64>,
    words: Vec<u32>,
    nr: u64,
    sorted: bool,
}

impl MaskScratch {
    /// An empty scratch.
    pub const fn new() -> Self {
        MaskScratch {
            masks: Vec::new(),
            words: Vec::new(),
            nr: 0,
            sorted: true,
        }
    }

    /// Make room for a slot of `nwords` words (the scratch must be reset).
    pub fn begin(&mut self, nwords: usize) {
        debug_assert!(self.words.is_empty() && self.nr == 0);
        if self.masks.len() < nwords {
            self.masks.resize(nwords, 0);
        }
    }

    /// Set `bits` in word `w` (inside the room [`begin`](Self::begin) made).
    #[inline]
    pub fn or(&mut self, w: usize, bits: u64) {
        let m = &mut self.masks[w];
        if *m == 0 && bits != 0 {
            if self.words.last().is_some_and(|&l| l as usize > w) {
                self.sorted = false;
            }
            self.words.push(w as u32);
        }
        self.nr += (bits & !*m).count_ones() as u64;
        *m |= bits;
    }

    /// Pages set.
    #[inline]
    pub fn nr(&self) -> u64 {
        self.nr
    }

    /// The gathered pages as masks of `nwords` words from `base`.
    pub fn masks(&mut self, base: Gfn, nwords: usize) -> DirtyMasks<'_> {
        if !self.sorted {
            self.words.sort_unstable();
            self.sorted = true;
        }
        DirtyMasks::listed(base, &self.masks[..nwords], &self.words, self.nr)
    }

    /// Zero the words set, visiting only those.
    pub fn reset(&mut self) {
        for w in self.words.drain(..) {
            self.masks[w as usize] = 0;
        }
        self.nr = 0;
        self.sorted = true;
    }
}

/// The set bits of a word, lowest first (and highest first, backwards).
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        (self.0 != 0).then(|| {
            let j = self.0.trailing_zeros() as usize;
            self.0 &= self.0 - 1;
            j
        })
    }
}

impl DoubleEndedIterator for BitIter {
    #[inline]
    fn next_back(&mut self) -> Option<usize> {
        (self.0 != 0).then(|| {
            let j = 63 - self.0.leading_zeros() as usize;
            self.0 &= !(1 << j);
            j
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn harvest_visits_the_summary_and_takes_the_bits() {
        let b = DirtyBitmap::new(64 * 200 + 5, false);
        for p in [3, 64 * 70 + 1, 64 * 70 + 9, 64 * 200 + 4] {
            assert!(b.mark(p));
        }
        assert!(!b.mark(3));
        let mut out = vec![7u64; 202];
        let mut nz = vec![9u64; 4];
        assert_eq!(b.harvest(&mut out, &mut nz, false), 4);
        assert_eq!((out[0], out[70], out[200], out[201]), (8, 0x202, 16, 7));
        assert_eq!(nz[..], [1, 1 << 6, 0, 1 << 8]);
        assert_eq!(b.harvest(&mut out, &mut nz, true), 4);
        assert_eq!(b.harvest(&mut out, &mut nz, true), 0);
        assert!(out[..201].iter().all(|&w| w == 0) && nz.iter().all(|&s| s == 0));
        let m = DirtyMasks::dense(Gfn(100), &[0, 5, 0, 1 << 63]);
        let v: vec::Vec<_> = m.iter().collect();
        assert_eq!(v, [(Gfn(164), 5), (Gfn(292), 1 << 63)]);
        assert_eq!(m.nr, 3);
        assert!(m.contains(Gfn(166)) && !m.contains(Gfn(165)) && !m.contains(Gfn(99)));
        assert_eq!(m.bits_from(Gfn(164)), 5);
        assert_eq!(m.bits_from(Gfn(162)), 5 << 2);
        assert_eq!(m.bits_from(Gfn(166)), 1);
        assert_eq!(m.bits_from(Gfn(60)), 0);
        assert_eq!(m.bits_from(Gfn(120)), 5 << 44);
        assert_eq!(m.bits_from(Gfn(292 + 63)), 1);
        assert_eq!(m.bits_from(Gfn(292 + 64)), 0);
        assert!(m.any_in_table(Gfn(0)) && m.any_in_table(Gfn(292)));
        assert!(!m.any_in_table(Gfn(356)) && !m.any_in_table(Gfn(0x1000_0000)));
        let nz = [0b1010u64];
        let s = DirtyMasks::new(Gfn(0), &[0, 1, 0, 1, 0, 0, 0, 0, 0, 0], &nz, 2);
        assert!(s.any_in_table(Gfn(0)) && !s.any_in_table(Gfn(256)));
    }

    #[test]
    fn clear_keeps_the_summary_of_words_left_dirty() {
        let b = DirtyBitmap::new(64 * 64 * 2, true);
        assert_eq!(b.clear_word(65, u64::MAX), u64::MAX);
        assert_eq!(b.clear_word(66, 1), 1);
        assert_eq!(b.clear_word(66, 1), 0);
        let mut out = vec![0u64; 128];
        let mut nz = vec![0u64; 2];
        b.harvest(&mut out, &mut nz, false);
        assert_eq!(nz[1], !0b10);
        assert_eq!(out[66], !1);
        assert_eq!(b.summary[1].load(Ordering::Relaxed), !0b10);
        assert_eq!(b.top[0].load(Ordering::Relaxed), 0b11);
        b.mark(64 * 65);
        b.harvest(&mut out, &mut nz, true);
        assert_eq!((nz[1], out[65]), (u64::MAX, 1));
        b.harvest(&mut out, &mut nz, true);
        assert_eq!((nz[0], nz[1]), (0, 0));
    }

    #[test]
    fn the_top_level_names_the_dirty_summary_words() {
        // 4 GiB and 64 pages: 16385 words, 257 summary words, 5 top words.
        let npages = 64 * 64 * 64 * 4 + 64;
        let b = DirtyBitmap::new(npages, false);
        assert_eq!(b.top.len(), 5);
        let pages = [5u64, 64 * 64 * 70 + 3, npages - 1];
        for p in pages {
            b.mark(p);
        }
        let tops: vec::Vec<u64> = b.top.iter().map(|t| t.load(Ordering::Relaxed)).collect();
        assert_eq!(tops, [1, 1 << 6, 0, 0, 1]);
        let mut seen = vec::Vec::new();
        assert_eq!(b.harvest_each(false, |w, v| seen.push((w, v))), 3);
        assert_eq!(
            seen,
            [
                (0, 1 << 5),
                (64 * 70, 1 << 3),
                ((npages / 64 - 1) as usize, 1 << 63)
            ]
        );
        // CLEAR empties a word: the next copying harvest drops its summary and top bits.
        assert_eq!(b.clear_word(64 * 70, u64::MAX), 1 << 3);
        assert_eq!(b.harvest_each(false, |_, _| {}), 2);
        assert_eq!(b.top[1].load(Ordering::Relaxed), 0);
        assert_eq!(b.summary[70].load(Ordering::Relaxed), 0);
        assert_eq!(b.harvest_each(true, |_, _| {}), 2);
        assert!(b.top.iter().all(|t| t.load(Ordering::Relaxed) == 0));
        assert_eq!(b.harvest_each(true, |_, _| panic!("taken")), 0);
    }

    #[test]
    fn scratch_lists_the_words_it_set_and_resets_them() {
        let mut s = MaskScratch::new();
        s.begin(100);
        s.or(70, 0b11);
        s.or(3, 1);
        s.or(70, 0b110);
        assert_eq!(s.nr(), 4);
        let m = s.masks(Gfn(1000), 100);
        let v: vec::Vec<_> = m.iter().collect();
        assert_eq!(v, [(Gfn(1000 + 3 * 64), 1), (Gfn(1000 + 70 * 64), 0b111)]);
        assert!(m.any_in_table(Gfn(1000)) && !m.any_in_table(Gfn(1000 + 512)));
        s.reset();
        assert!(s.masks.iter().all(|&w| w == 0) && s.nr() == 0);
    }
}
