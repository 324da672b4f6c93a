//! Write schedules: which data-slot pages the guest stores to, in which order, and the
//! random generator the conformance rounds draw them from.

/// The pages one guest run stores to, as page offsets into the data slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Pages `first`, `first + step`, ... below `end`, in that order (the stride loop).
    Stride {
        /// First page.
        first: u64,
        /// One past the last page that may be written.
        end: u64,
        /// Distance between written pages (>= 1).
        step: u64,
    },
    /// These pages in this order, repeats allowed (the list loop).
    Pages(Vec<u64>),
}

impl Schedule {
    /// Nothing written.
    pub fn empty() -> Self {
        Schedule::Pages(Vec::new())
    }

    /// Every page of a slot of `npages`, in address order.
    pub fn every_page(npages: u64) -> Self {
        Schedule::every_kth(npages, 1)
    }

    /// Every `k`-th page of a slot of `npages`, from page 0.
    ///
    /// # Panics
    /// If `k` is 0.
    pub fn every_kth(npages: u64, k: u64) -> Self {
        assert!(k >= 1, "stride of 0 pages");
        Schedule::Stride {
            first: 0,
            end: npages,
            step: k,
        }
    }

    /// About `ratio` of a slot of `npages` dirty: every `round(1 / ratio)`-th page;
    /// nothing for a ratio of 0 (or below).
    pub fn for_ratio(npages: u64, ratio: f64) -> Self {
        if ratio <= 0.0 || npages == 0 {
            return Schedule::empty();
        }
        let k = (1.0 / ratio).round().max(1.0);
        let k = if k >= npages as f64 { npages } else { k as u64 };
        Schedule::every_kth(npages, k)
    }

    /// The same stores in order, as runs of at most `max` stores each (`max >= 1`): a
    /// VMM with a dirty ring harvests between them.
    pub fn split(&self, max: u64) -> Vec<Schedule> {
        assert!(max >= 1, "pieces of 0 stores");
        match self {
            Schedule::Stride { first, end, step } => {
                let span = max.saturating_mul(*step);
                let mut pieces = Vec::new();
                let mut at = *first;
                while at < *end {
                    let stop = at.saturating_add(span).min(*end);
                    pieces.push(Schedule::Stride {
                        first: at,
                        end: stop,
                        step: *step,
                    });
                    at = stop;
                }
                pieces
            }
            Schedule::Pages(p) => p
                .chunks(max as usize)
                .map(|c| Schedule::Pages(c.to_vec()))
                .collect(),
        }
    }

    /// Number of stores (repeats counted).
    pub fn len(&self) -> u64 {
        match self {
            Schedule::Stride { first, end, step } => end.saturating_sub(*first).div_ceil(*step),
            Schedule::Pages(p) => p.len() as u64,
        }
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The written pages in order.
    pub fn pages(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            Schedule::Stride { first, end, step } => {
                Box::new((*first..*end).step_by(*step as usize))
            }
            Schedule::Pages(p) => Box::new(p.iter().copied()),
        }
    }

    /// Set the bit of every written page in `bitmap` (bit `i` of word `i / 64` is page `i`).
    pub fn mark(&self, bitmap: &mut [u64]) {
        for p in self.pages() {
            bitmap[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// The largest page written, if any.
    pub fn max_page(&self) -> Option<u64> {
        self.pages().max()
    }
}

/// SplitMix64: a small, fast, seedable generator, so a failing round can be replayed
/// from its seed. Not for anything but test schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Shuffle `v` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_store_in_order() {
        for s in [
            Schedule::every_kth(1000, 3),
            Schedule::every_page(64),
            Schedule::Pages((0..10).rev().collect()),
            Schedule::empty(),
        ] {
            for max in [1, 7, 64, 1000] {
                let pieces = s.split(max);
                assert!(pieces.iter().all(|p| p.len() <= max && !p.is_empty()));
                let joined: Vec<u64> = pieces.iter().flat_map(|p| p.pages()).collect();
                assert_eq!(joined, s.pages().collect::<Vec<_>>(), "{s:?} by {max}");
            }
        }
        assert_eq!(Schedule::every_page(100).split(40).len(), 3);
    }

    #[test]
    fn stride_counts_and_pages() {
        let s = Schedule::every_kth(10, 3);
        assert_eq!(s.pages().collect::<Vec<_>>(), [0, 3, 6, 9]);
        assert_eq!(s.len(), 4);
        assert_eq!(Schedule::every_page(5).len(), 5);
        assert!(Schedule::empty().is_empty());
    }

    #[test]
    fn ratios() {
        assert!(Schedule::for_ratio(1000, 0.0).is_empty());
        assert_eq!(Schedule::for_ratio(1000, 1.0).len(), 1000);
        assert_eq!(Schedule::for_ratio(1000, 0.5).len(), 500);
        assert_eq!(Schedule::for_ratio(262_144, 0.001).len(), 263); // ceil(262144 / 1000)
        assert_eq!(Schedule::for_ratio(100, 0.000_001).len(), 1);
    }

    #[test]
    fn mark_sets_exactly_the_written_bits() {
        let s = Schedule::Pages(vec![65, 0, 65, 127]);
        let mut b = [0u64; 2];
        s.mark(&mut b);
        assert_eq!(b, [1, 2 | 1 << 63]);
        assert_eq!(s.max_page(), Some(127));
    }

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let x = a.below(13);
            assert_eq!(x, b.below(13));
            assert!(x < 13);
            let y = a.range(5, 9);
            b.range(5, 9);
            assert!((5..=9).contains(&y));
        }
        let mut v: Vec<u32> = (0..50).collect();
        a.shuffle(&mut v);
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
