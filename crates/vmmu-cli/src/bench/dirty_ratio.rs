//! What the dirty-logging scenarios (`wrprot-slot`, `dirty-log`) share: the dirty ratios
//! they sweep, and the choice of which pages a round dirties.
//!
//! The pages are drawn uniformly without replacement by a fixed-seed xorshift generator, so
//! every variant at a ratio, and every run, dirties the same pages in the same order: the
//! variants differ only in the algorithm measured.

use serde_json::{json, Map, Value};

use super::{params, BenchConfig};

/// Fractions of the slot's pages dirtied before a harvest (the `ratio` param).
pub const RATIOS: [f64; 7] = [0.0, 0.0001, 0.001, 0.01, 0.1, 0.5, 1.0];

/// Number of pages a round at `ratio` dirties in a slot of `npages` pages.
pub fn dirty_count(npages: u64, ratio: f64) -> u64 {
    ((npages as f64 * ratio).round() as u64).min(npages)
}

/// The `params` of a record at `ratio`: `mem_gib` and `ratio`.
pub fn ratio_params(config: &BenchConfig, ratio: f64) -> Map<String, Value> {
    params([("mem_gib", json!(config.mem_gib)), ("ratio", json!(ratio))])
}

/// `count` distinct page numbers below `npages`, in random order (a partial Fisher-Yates
/// shuffle), the same for the same arguments.
pub fn random_pages(npages: u64, count: u64) -> Vec<u64> {
    assert!(count <= npages, "{count} distinct pages out of {npages}");
    let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15 ^ count);
    let mut pages: Vec<u64> = (0..npages).collect();
    for i in 0..count as usize {
        let j = i + rng.below((npages - i as u64) as usize);
        pages.swap(i, j);
    }
    pages.truncate(count as usize);
    pages
}

/// Marsaglia's xorshift64* generator: enough randomness to scatter pages, no dependency.
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        XorShift64(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`); the modulo bias is below 2^-40 for the sizes used here.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_and_cap() {
        assert_eq!(dirty_count(262_144, 0.0), 0);
        assert_eq!(dirty_count(262_144, 0.0001), 26);
        assert_eq!(dirty_count(262_144, 0.5), 131_072);
        assert_eq!(dirty_count(262_144, 1.0), 262_144);
    }

    #[test]
    fn pages_are_distinct_in_range_and_repeatable() {
        let a = random_pages(10_000, 2_500);
        assert_eq!(a.len(), 2_500);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 2_500);
        assert!(sorted.last().is_some_and(|&p| p < 10_000));
        assert_eq!(a, random_pages(10_000, 2_500));
        let mut all = random_pages(64, 64);
        all.sort_unstable();
        assert_eq!(all, (0..64).collect::<Vec<_>>());
    }
}
