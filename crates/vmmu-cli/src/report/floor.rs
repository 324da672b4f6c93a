//! The floor: the memory operations a measured MMU operation cannot avoid, done in a tight
//! loop over a flat array of SPTE-sized words, measured in the same run as the scenarios.
//! A row of the report says how many times the floor vmmu's figure is; good code lands
//! within about 2x.
//!
//! - `harvest` (us, by `ratio`, the dirty-logging ratios): one atomic AND clearing the
//!   writable bit per dirty SPTE, in gfn order — what write-protecting the harvested pages
//!   must do at least. Compared with `dirty-log` `harvest_us`, `wrprot-slot` `us` and
//!   `kvm-compare` `harvest_us` at the same ratio.
//! - `zap` (us, by `backing`): one read per present entry of a fully mapped slot (4 KiB
//!   leaves or 2 MiB leaves, plus the non-leaf entries above them) — what finding every
//!   mapping must do at least. Compared with `zap`, `tdp-zap` and `kvm-compare` `delete_us`.
//! - `age` (ns per SPTE): one read and one atomic AND clearing the accessed bit per SPTE,
//!   compared with `rmap-iter`.
//! - `clear` (ns per SPTE): one atomic swap to zero per SPTE, compared with
//!   `pte-list-destroy`.
//!
//! The array is allocated and filled before the clock starts, so the floor is the loop
//! alone over memory already touched: the cheapest those operations can be on this machine.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;
use vmmu::types::PAGE_SIZE;

use crate::bench::dirty_ratio::{dirty_count, random_pages, ratio_params, RATIOS};
use crate::bench::guest::HostBacking;
use crate::bench::names::floor as names;
use crate::bench::{params, BenchConfig, BenchError, Sample, Scenario};

/// Run through the bench harness like a scenario, but not registered in `vmmu bench`: its
/// records belong to the report.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "the same memory operations in a tight loop over a flat array: harvest, zap, age, clear",
    run,
};

/// An EPT leaf as the scenarios install it: readable, writable, executable, accessed, dirty.
const LEAF: u64 = 0x7 | (1 << 8) | (1 << 9);
const WRITABLE: u64 = 1 << 1;
const ACCESSED: u64 = 1 << 8;

/// SPTEs for `age` and `clear`: as many as `rmap-iter` and `pte-list-destroy` build.
const RMAP_SPTES: usize = 1 << 20;

/// Entries per table.
const ENTRIES: u64 = 512;

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let pages = config.mem_bytes() / PAGE_SIZE;
    let mut samples = Vec::new();

    let sptes = leaves(pages as usize);
    for ratio in RATIOS {
        let mut dirty = random_pages(pages, dirty_count(pages, ratio));
        dirty.sort_unstable();
        refill(&sptes);
        let start = Instant::now();
        for &page in &dirty {
            sptes[page as usize].fetch_and(!WRITABLE, Ordering::Relaxed);
        }
        let us = start.elapsed().as_nanos() as f64 / 1e3;
        black_box(&sptes);
        samples.push(Sample::new(
            names::HARVEST,
            names::US,
            ratio_params(config, ratio),
            us,
            "us",
        ));
    }
    drop(sptes);

    for backing in HostBacking::ALL {
        let entries = leaves(present_entries(pages, backing) as usize);
        let start = Instant::now();
        let present = entries
            .iter()
            .filter(|e| e.load(Ordering::Relaxed) != 0)
            .count();
        let us = start.elapsed().as_nanos() as f64 / 1e3;
        black_box(present);
        samples.push(Sample::new(
            names::ZAP,
            names::US,
            backing.params(config),
            us,
            "us",
        ));
    }

    let n = config.scaled(RMAP_SPTES);
    let sptes = leaves(n);
    let p = || params([("sptes", json!(n))]);
    let start = Instant::now();
    let mut young = 0usize;
    for s in &sptes {
        if s.load(Ordering::Relaxed) & ACCESSED != 0 {
            s.fetch_and(!ACCESSED, Ordering::Relaxed);
            young += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    black_box(young);
    samples.push(Sample::new(names::AGE, names::NS_PER_SPTE, p(), ns, "ns"));

    refill(&sptes);
    let start = Instant::now();
    for s in &sptes {
        black_box(s.swap(0, Ordering::Relaxed));
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    samples.push(Sample::new(names::CLEAR, names::NS_PER_SPTE, p(), ns, "ns"));
    Ok(samples)
}

/// `n` present, writable, accessed leaves.
fn leaves(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(LEAF)).collect()
}

fn refill(sptes: &[AtomicU64]) {
    for s in sptes {
        s.store(LEAF, Ordering::Relaxed);
    }
}

/// Present entries in the tables of a fully mapped slot of `pages` 4 KiB pages: the leaves
/// (4 KiB, or 2 MiB over THP) and one entry per table below them, up to the root's one.
fn present_entries(pages: u64, backing: HostBacking) -> u64 {
    let mut level = match backing {
        HostBacking::Page4K => pages,
        HostBacking::Thp => pages.div_ceil(ENTRIES),
    };
    let mut total = level;
    while level > 1 {
        level = level.div_ceil(ENTRIES);
        total += level;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_entries_count_every_level() {
        // 1 GiB: 262,144 leaves, 512 PDEs, one PDPTE.
        assert_eq!(
            present_entries(1 << 18, HostBacking::Page4K),
            262_144 + 512 + 1
        );
        assert_eq!(present_entries(1 << 18, HostBacking::Thp), 512 + 1);
        assert_eq!(present_entries(1, HostBacking::Page4K), 1);
    }

    #[test]
    fn floor_reports_every_operation() {
        let config = BenchConfig {
            mem_gib: 1,
            quick: true,
        };
        let samples = run(&config).unwrap();
        let count = |v: &str| samples.iter().filter(|s| s.variant == v).count();
        assert_eq!(count("harvest"), RATIOS.len());
        assert_eq!(count("zap"), 2);
        assert_eq!((count("age"), count("clear")), (1, 1));
        assert!(samples
            .iter()
            .all(|s| s.value.is_finite() && s.value >= 0.0));
    }
}
