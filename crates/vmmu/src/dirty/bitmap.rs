//! A slot's dirty bitmap, with a summary of its non-zero words, and the masks a harvest
//! hands to the MMUs ([`DirtyMasks`]).
//!
//! One bit per 4 KiB page, 64 pages a word; one summary bit per word, 4096 pages a summary
//! bit. A harvest visits only the words the summary names, so what it costs grows with
//! the dirty words, not with the slot (a 1 GiB slot has 4096 words and 64 summary words).
//!
//! # Invariants
//! - At rest (no marker between its two steps) every non-zero word has its summary bit
//!   set. A summary bit may be set over a zero word (a harvest clears it when it looks).
//! - A marker sets the word's bit first, then, if the word was zero, the summary bit; a
//!   harvester exchanges the summary word first, then the words it names. Either the
//!   harvester sees the marker's bit, or the marker's summary bit lands after the
//!   harvester's exchange and the next harvest sees it. A bit set into a word that another
//!   marker has just made non-zero, before that marker sets the summary bit, is reported
//!   by the harvest after that marker finishes: late, never lost (and the page stays
//!   writable only because its bit is set).
//! - CLEAR only and-s bits out of words; a summary bit it leaves over a zero word is
//!   dropped by the next harvest that only copies (manual protect's GET): one atomic per
//!   summary word, then a second look at those words, setting back the bit of any a
//!   marker filled in between.
//!
//! # Locking
//! None: markers (faults, lockless ones included) and harvesters (under the MMU lock)
//! meet only in these atomics.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::types::Gfn;

/// A slot's dirty bitmap (see the module docs).
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// A bitmap for `npages` pages, every bit clear or, with `all_set`, every bit of a
    /// page set (KVM_DIRTY_LOG_INITIALLY_SET).
    pub fn new(npages: u64, all_set: bool) -> Self {
        let nwords = npages.div_ceil(64);
        let words = (0..nwords)
            .map(|w| {
                let bits = (npages - w * 64).min(64);
                AtomicU64::new(match (all_set, bits) {
                    (false, _) => 0,
                    (true, 64) => u64::MAX,
                    (true, b) => (1u64 << b) - 1,
                })
            })
            .collect();
        let summary = (0..nwords.div_ceil(64))
            .map(|s| {
                let bits = (nwords - s * 64).min(64);
                AtomicU64::new(match (all_set, bits) {
                    (false, _) => 0,
                    (true, 64) => u64::MAX,
                    (true, b) => (1u64 << b) - 1,
                })
            })
            .collect();
        DirtyBitmap { words, summary }
    }

    /// Mark page `offset` dirty; returns whether it was clean.
    #[inline]
    pub fn mark(&self, offset: u64) -> bool {
        let w = (offset / 64) as usize;
        let bit = 1u64 << (offset % 64);
        // Release: a harvester that reads the summary bit below sees this word's bit.
        let old = self.words[w].fetch_or(bit, Ordering::AcqRel);
        if old == 0 {
            self.summary[w / 64].fetch_or(1 << (w % 64), Ordering::AcqRel);
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

    /// Bytes held (words and summary).
    pub fn bytes(&self) -> usize {
        (self.words.len() + self.summary.len()) * 8
    }

    /// Copy the bitmap into `out` (at least as many words as the bitmap's; the rest is
    /// left alone), taking the bits out of it when `take` (GET without manual protect),
    /// and record in `nonzero` (one bit per word, at least `words().len() / 64` rounded up
    /// words, overwritten) which words of `out` are not zero. Returns the number of pages
    /// reported. Only the words the summary names are read.
    pub fn harvest(&self, out: &mut [u64], nonzero: &mut [u64], take: bool) -> u64 {
        let n = self.words.len();
        out[..n].fill(0);
        let mut nr = 0;
        for (i, (s, nz)) in self.summary.iter().zip(nonzero.iter_mut()).enumerate() {
            *nz = 0;
            if s.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let bits = if take {
                s.swap(0, Ordering::AcqRel)
            } else {
                s.load(Ordering::Acquire)
            };
            let (mut rest, mut zero) = (bits, 0u64);
            while rest != 0 {
                let j = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let w = i * 64 + j;
                let v = if take {
                    self.words[w].swap(0, Ordering::AcqRel)
                } else {
                    self.words[w].load(Ordering::Acquire)
                };
                if v != 0 {
                    out[w] = v;
                    *nz |= 1 << j;
                    nr += v.count_ones() as u64;
                } else {
                    zero |= 1 << j;
                }
            }
            if !take && zero != 0 {
                // Summary bits over words CLEAR emptied: drop them with one atomic, then
                // look at those words again and put back the bit of any a marker filled
                // meanwhile (module docs).
                s.fetch_and(!zero, Ordering::AcqRel);
                let mut back = 0;
                while zero != 0 {
                    let j = zero.trailing_zeros() as usize;
                    zero &= zero - 1;
                    if self.words[i * 64 + j].load(Ordering::Acquire) != 0 {
                        back |= 1 << j;
                    }
                }
                if back != 0 {
                    s.fetch_or(back, Ordering::AcqRel);
                }
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
    nonzero: Option<&'a [u64]>,
    /// Bits set in all.
    pub nr: u64,
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
            nonzero: Some(nonzero),
            nr,
        }
    }

    /// Masks without a summary: every word is looked at.
    pub fn dense(base: Gfn, masks: &'a [u64]) -> Self {
        let nr = masks.iter().map(|m| m.count_ones() as u64).sum();
        DirtyMasks {
            base,
            masks,
            nonzero: None,
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

    /// Whether any of the 512 gfns from `gfn` (a last-level table's) may be set: false only if none is. With a summary it
    /// reads summary bits, not the masks.
    #[inline]
    pub fn any_in_table(&self, gfn: Gfn) -> bool {
        let off = gfn.0.wrapping_sub(self.base.0) as i64;
        let first = off.div_euclid(64);
        // The table's 512 gfns touch words first..=first + 8 (one more when misaligned).
        let last = (off + 511).div_euclid(64);
        (first.max(0)..=last.min(self.masks.len() as i64 - 1)).any(|k| {
            let k = k as usize;
            match self.nonzero {
                Some(nz) => nz[k / 64] & (1 << (k % 64)) != 0,
                None => self.masks[k] != 0,
            }
        })
    }

    /// The non-zero masks in order, each with the gfn of its bit 0.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (Gfn, u64)> + 'a {
        let (base, masks) = (self.base, self.masks);
        let at = move |k: usize| (Gfn(base.0 + 64 * k as u64), masks[k]);
        let summary = self.nonzero.unwrap_or(&[]);
        let sparse = summary.iter().enumerate().flat_map(move |(i, &s)| {
            BitIter(s).map(move |j| at(i * 64 + j))
        });
        // Without a summary, every word is looked at.
        let all = if self.nonzero.is_some() { 0 } else { masks.len() };
        let dense = masks[..all]
            .iter()
            .enumerate()
            .filter(|(_, &m)| m != 0)
            .map(move |(k, _)| at(k));
        sparse.chain(dense)
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
        b.mark(64 * 65);
        b.harvest(&mut out, &mut nz, true);
        assert_eq!((nz[1], out[65]), (u64::MAX, 1));
        b.harvest(&mut out, &mut nz, true);
        assert_eq!((nz[0], nz[1]), (0, 0));
    }
}
