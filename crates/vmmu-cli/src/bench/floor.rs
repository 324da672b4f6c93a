//! `floor`: the memory operations a measured MMU operation cannot avoid, done in a tight
//! loop over memory laid out as the MMU's, in the same run as the scenarios it bounds. A
//! row of the report says how many times the floor vmmu's figure is; good code lands
//! within about 2x.
//!
//! - `harvest` (us, by `pattern` and `ratio`): the work every dirty-log harvest must do,
//!   over a slot's footprint — a dirty bitmap of the slot's pages and its 4 KiB last-level
//!   tables, each a page-aligned allocation of 512 SPTEs as the MMU's are. Untimed, the
//!   workload's own writes: its dirty set in its order (`random`: the pages `dirty-log` and
//!   `wrprot-slot` write, [`random_pages`]; `stride`: every `round(1 / ratio)`-th page, as
//!   `kvm-compare`'s guest writes), each restoring its SPTE's writable bit and setting its
//!   bitmap bit, so the caches are as the guest's writes leave them. Timed: a copy of the
//!   whole bitmap to the caller's buffer; one read-modify-write per non-zero bitmap word
//!   (clearing exactly the bits copied); one store per dirty SPTE at an address computed
//!   from its gfn (a plain store, since its accessed and dirty bits are set and no bit the
//!   CPU sets can be lost; an atomic AND where they are not); one flush request (an atomic
//!   add on a shared word). The same floor bounds every harvest mode: GET, GET+CLEAR (which
//!   does the copy in GET and the rest in CLEAR) and the ring (which copies entries instead
//!   of a bitmap: cheaper at low ratios, 128 times the bytes at high ones). Compared with
//!   `dirty-log` `harvest_us` and `wrprot-slot` `us` (pattern `random`) and `kvm-compare`
//!   `harvest_us` (pattern `stride`) at the same ratio.
//! - `zap` (us, by `backing`): one read per present entry of a fully mapped slot (4 KiB
//!   leaves or 2 MiB leaves, plus the non-leaf entries above them) — what finding every
//!   mapping must do at least. Compared with `zap`, `tdp-zap` and `kvm-compare` `delete_us`.
//! - `age` (ns per SPTE): one read and one atomic AND clearing the accessed bit per SPTE,
//!   compared with `rmap-iter`.
//! - `clear` (ns per SPTE): one atomic swap to zero per SPTE, compared with
//!   `pte-list-destroy`.
//!
//! Everything is allocated and written before the clock starts (the caller's buffer too),
//! so the floor is the loop alone over memory already touched: the cheapest those
//! operations can be on this machine.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{json, Value};
use vmmu::types::PAGE_SIZE;

use super::dirty_ratio::{dirty_count, random_pages, ratio_params, RATIOS};
use super::guest::HostBacking;
use super::names::floor as names;
use super::{params, BenchConfig, BenchError, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "the least work of a harvest (bitmap copy, RMW per dirty word, store per dirty SPTE, flush), a zap, aging and clearing, over memory laid out as the MMU's",
    run,
};

/// An EPT leaf as the scenarios install it: readable, writable, executable, accessed, dirty.
const LEAF: u64 = 0x7 | ACCESSED | DIRTY;
const WRITABLE: u64 = 1 << 1;
const ACCESSED: u64 = 1 << 8;
const DIRTY: u64 = 1 << 9;

/// SPTEs for `age` and `clear`: as many as `rmap-iter` and `pte-list-destroy` build.
const RMAP_SPTES: usize = 1 << 20;

/// Entries per table.
const ENTRIES: u64 = 512;

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let pages = config.mem_bytes() / PAGE_SIZE;
    let mut samples = Vec::new();

    let mut slot = HarvestFloor::new(pages);
    for (pattern, dirty) in [
        (names::RANDOM, random_ratio as fn(u64, f64) -> Vec<u64>),
        (names::STRIDE, stride_pages),
    ] {
        for ratio in RATIOS {
            let us = slot.measure(&dirty(pages, ratio))?;
            let mut p = ratio_params(config, ratio);
            p.insert("pattern".into(), Value::from(pattern));
            samples.push(Sample::new(names::HARVEST, names::US, p, us, "us"));
        }
    }
    drop(slot);

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

    for s in &sptes {
        s.store(LEAF, Ordering::Relaxed);
    }
    let start = Instant::now();
    for s in &sptes {
        black_box(s.swap(0, Ordering::Relaxed));
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    samples.push(Sample::new(names::CLEAR, names::NS_PER_SPTE, p(), ns, "ns"));
    Ok(samples)
}

/// The harvest floor of any workload over a slot of 4 KiB pages, measured on demand:
/// `vmmu kvm compare` times it in every round beside KVM and vmmu, on its own pages.
pub struct HarvestFloor(Footprint);

impl HarvestFloor {
    /// The footprint of a logging slot of `npages` pages, nothing dirty.
    pub fn new(npages: u64) -> Self {
        HarvestFloor(Footprint::new(npages))
    }

    /// Write `pages` (distinct, each below the slot's size), in that order, then time the
    /// least harvest of them that knows which pages they are (a ring reset, a CLEAR of
    /// dirty ranges): per page in address order, one read-modify-write of its bitmap word
    /// and one store to its SPTE, then the flush request; no bitmap copy. Microseconds.
    pub fn measure_sparse(&mut self, pages: &[u64]) -> Result<f64, BenchError> {
        self.0.write(pages);
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        let start = Instant::now();
        let f = &self.0;
        for &gfn in &sorted {
            f.bitmap[(gfn / 64) as usize].fetch_and(!(1 << (gfn % 64)), Ordering::Relaxed);
            let spte = f.spte(gfn);
            spte.store(spte.load(Ordering::Relaxed) & !WRITABLE, Ordering::Relaxed);
        }
        f.flush.fetch_add(1, Ordering::SeqCst);
        let us = start.elapsed().as_nanos() as f64 / 1e3;
        let left = sorted
            .iter()
            .filter(|&&g| f.spte(g).load(Ordering::Relaxed) & WRITABLE != 0)
            .count();
        if left != 0 {
            return Err(BenchError::new(format!(
                "floor: {left} pages left writable"
            )));
        }
        Ok(us)
    }

    /// Write `pages` (distinct, each below the slot's size), in that order, then time the
    /// least harvest of them; microseconds. An error if the harvest did not protect
    /// exactly those pages.
    pub fn measure(&mut self, pages: &[u64]) -> Result<f64, BenchError> {
        self.0.write(pages);
        let start = Instant::now();
        let protected = self.0.harvest();
        let us = start.elapsed().as_nanos() as f64 / 1e3;
        black_box(&self.0.out);
        if protected != pages.len() as u64 {
            return Err(BenchError::new(format!(
                "floor: the harvest protected {protected} pages, {} were written",
                pages.len()
            )));
        }
        Ok(us)
    }
}

/// `dirty-log`'s and `wrprot-slot`'s pages at `ratio`: distinct, random, in random order.
fn random_ratio(npages: u64, ratio: f64) -> Vec<u64> {
    random_pages(npages, dirty_count(npages, ratio))
}

/// `kvm-compare`'s pages at `ratio` (its `Schedule::for_ratio`): every `round(1 / ratio)`-th
/// page from page 0, in address order; none at ratio 0.
fn stride_pages(npages: u64, ratio: f64) -> Vec<u64> {
    if ratio <= 0.0 || npages == 0 {
        return Vec::new();
    }
    let k = (1.0 / ratio).round().max(1.0);
    let k = if k >= npages as f64 { npages } else { k as u64 };
    (0..npages).step_by(k as usize).collect()
}

/// A last-level table: 512 SPTEs in one page-aligned 4 KiB allocation, as the MMU's.
#[repr(C, align(4096))]
struct Table([AtomicU64; ENTRIES as usize]);

/// A logging slot as a harvest finds it: its last-level tables, its dirty bitmap, the
/// caller's buffer and the word a flush request goes to.
struct Footprint {
    /// One table per 2 MiB of the slot, every SPTE a present 4 KiB leaf.
    tables: Vec<Box<Table>>,
    /// One bit per page.
    bitmap: Vec<AtomicU64>,
    /// The caller's copy of the bitmap.
    out: Vec<u64>,
    /// The remote-flush request.
    flush: AtomicU64,
}

impl Footprint {
    /// A slot of `pages` pages, every SPTE write-protected (logging on, nothing dirty), all
    /// of it written once so no page of it faults under the clock.
    fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        Footprint {
            tables: (0..pages.div_ceil(ENTRIES))
                .map(|_| {
                    Box::new(Table(std::array::from_fn(|_| {
                        AtomicU64::new(LEAF & !WRITABLE)
                    })))
                })
                .collect(),
            bitmap: (0..words).map(|_| AtomicU64::new(0)).collect(),
            out: vec![u64::MAX; words],
            flush: AtomicU64::new(0),
        }
    }

    /// The SPTE of `gfn`.
    fn spte(&self, gfn: u64) -> &AtomicU64 {
        spte_in(&self.tables, gfn)
    }

    /// The guest's writes to `pages`, in that order: each write fault restores the SPTE's
    /// writable bit and sets the page's bitmap bit.
    fn write(&self, pages: &[u64]) {
        for &gfn in pages {
            self.spte(gfn).fetch_or(WRITABLE, Ordering::Relaxed);
            self.bitmap[(gfn / 64) as usize].fetch_or(1 << (gfn % 64), Ordering::Relaxed);
        }
    }

    /// The least a harvest does (see the module doc); the number of SPTEs protected.
    fn harvest(&mut self) -> u64 {
        let Footprint {
            tables,
            bitmap,
            out,
            flush,
        } = self;
        let mut protected = 0;
        for (i, (word, out)) in bitmap.iter().zip(out).enumerate() {
            let mut mask = word.load(Ordering::Relaxed);
            *out = mask;
            if mask == 0 {
                continue;
            }
            word.fetch_and(!mask, Ordering::Relaxed);
            let base = i as u64 * 64;
            while mask != 0 {
                let spte = spte_in(tables, base + u64::from(mask.trailing_zeros()));
                let old = spte.load(Ordering::Relaxed);
                if old & (ACCESSED | DIRTY) == ACCESSED | DIRTY {
                    spte.store(old & !WRITABLE, Ordering::Relaxed);
                } else {
                    spte.fetch_and(!WRITABLE, Ordering::Relaxed);
                }
                mask &= mask - 1;
                protected += 1;
            }
        }
        flush.fetch_add(1, Ordering::SeqCst);
        protected
    }
}

/// The SPTE of `gfn` in `tables`, its address computed from the gfn.
fn spte_in(tables: &[Box<Table>], gfn: u64) -> &AtomicU64 {
    &tables[(gfn / ENTRIES) as usize].0[(gfn % ENTRIES) as usize]
}

/// `n` present, writable, accessed, dirty leaves.
fn leaves(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(LEAF)).collect()
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
    fn stride_follows_kvm_compare() {
        assert!(stride_pages(1 << 18, 0.0).is_empty());
        assert_eq!(stride_pages(1 << 18, 0.001).len(), 263);
        assert_eq!(stride_pages(10, 0.5), [0, 2, 4, 6, 8]);
        assert_eq!(stride_pages(10, 1.0).len(), 10);
        assert_eq!(stride_pages(10, 0.0001), [0]);
    }

    #[test]
    fn the_harvest_copies_clears_and_protects_what_was_written() {
        let mut slot = Footprint::new(2048);
        let pages = [5, 64, 65, 1500, 2047];
        slot.write(&pages);
        assert!(pages
            .iter()
            .all(|&p| slot.spte(p).load(Ordering::Relaxed) & WRITABLE != 0));
        assert_eq!(slot.harvest(), 5);
        assert_eq!(slot.out[0], 1 << 5);
        assert_eq!(slot.out[1], 0b11);
        assert_eq!(slot.out[23], 1 << (1500 % 64));
        assert_eq!(slot.out[31], 1 << 63);
        assert_eq!(slot.out.iter().map(|w| w.count_ones()).sum::<u32>(), 5);
        assert!(slot.bitmap.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        assert!((0..2048).all(|p| slot.spte(p).load(Ordering::Relaxed) == LEAF & !WRITABLE));
        assert_eq!(slot.flush.load(Ordering::Relaxed), 1);
        // Nothing dirty: the copy writes zeros over the last harvest's words.
        assert_eq!(slot.harvest(), 0);
        assert!(slot.out.iter().all(|&w| w == 0));
    }

    #[test]
    fn floor_reports_every_operation() {
        let config = BenchConfig {
            quick: true,
            ..BenchConfig::new(1)
        };
        let samples = run(&config).unwrap();
        let count = |v: &str| samples.iter().filter(|s| s.variant == v).count();
        assert_eq!(count("harvest"), 2 * RATIOS.len());
        for pattern in [names::RANDOM, names::STRIDE] {
            let n = samples
                .iter()
                .filter(|s| s.params.get("pattern") == Some(&Value::from(pattern)))
                .count();
            assert_eq!(n, RATIOS.len(), "{pattern}");
        }
        assert_eq!(count("zap"), 2);
        assert_eq!((count("age"), count("clear")), (1, 1));
        assert!(samples
            .iter()
            .all(|s| s.value.is_finite() && s.value >= 0.0));
    }
}
