//! `rmap-iter`: the cost of walking reverse maps, per SPTE visited, as a function of the
//! list length. Tests seed 000's claim: an iterator that keeps its place between steps
//! (`rmap::iter`, KVM's `rmap_get_first`/`rmap_get_next`) costs the same per SPTE at any
//! length, while restarting the scan from the head on every step (`rmap::next_restart_scan`,
//! the `pte_list_next` it replaced) grows with the length: quadratic per list.
//!
//! The timed pass is what KVM's `kvm_age_rmapp` does for every gfn: visit each SPTE of the
//! list, read it through its table, and clear the accessed bit where it is set. Every SPTE
//! starts accessed, so every visit is a read and an atomic AND.
//!
//! Layout, as shadow paging produces it: `lists` gfns, each mapped by `len` SPTEs. SPTE `k`
//! of list `l` is slot `k * lists + l` of the tables (table `slot / 512`, index
//! `slot % 512`), and the lists are filled table by table (all lists' entry 0, then all
//! lists' entry 1, ...), as shadow pages are created one after another and each maps a run
//! of gfns. So at `len` 1 it is the direct map (gfn `l` at index `l % 512` of table
//! `l / 512`), and for long lists each SPTE of a list sits in a different table and the
//! list's descriptors are spread over the pool, as in KVM's slab.

use std::ptr::NonNull;
use std::time::Instant;

use serde_json::json;
use vmmu::rmap::{self, DescPool, RmapHead, SpteRef, PTE_LIST_EXT};
use vmmu::spte::{LeafAttrs, Spte, SpteFormat};
use vmmu::table::{HeapTableAllocator, Table, TableAllocator};
use vmmu::types::{Level, Pfn, SPTE_ENT_PER_PAGE};

use super::names::rmap_iter as names;
use super::{params, BenchConfig, BenchError, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "age every SPTE of ~1M reverse-map entries: restart-scan vs iterator (ns per spte), len 1..1024",
    run,
};

/// List lengths measured.
const LENS: [usize; 7] = [1, 2, 4, 16, 64, 256, 1024];

/// SPTEs built per length: about a million, whatever the length ([`BenchConfig::scaled`]
/// down for a quick run).
pub(super) const TOTAL_SPTES: usize = 1 << 20;

/// Bound on the entries the restart scan reads in one pass (it reads about `len² / 2` per
/// list). Above it, fewer lists are timed, so the pass stays well under a second at
/// `len` 1024; the value is per SPTE, so it stays comparable. Scaled down for a quick run.
const RESTART_SCAN_BUDGET: usize = 1 << 28;

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let total = config.scaled(TOTAL_SPTES);
    let budget = config.scaled(RESTART_SCAN_BUDGET);
    let mut samples = Vec::new();
    for len in LENS {
        let lists = (total / len).max(1);
        for (variant, walk) in [
            (names::RESTART_SCAN, Walk::RestartScan),
            (names::ITERATOR, Walk::Iterator),
        ] {
            let fixture = RmapLists::build(lists, len)?; // untimed
            let timed = match walk {
                Walk::RestartScan => restart_scan_lists(lists, len, budget),
                Walk::Iterator => lists,
            };
            let heads = &fixture.heads[..timed];
            let start = Instant::now();
            let young = match walk {
                Walk::RestartScan => age_restart_scan(&fixture, heads),
                Walk::Iterator => age_iterator(&fixture, heads),
            };
            let elapsed = start.elapsed();
            let sptes = timed * len;
            if young != sptes {
                return Err(BenchError::new(format!(
                    "rmap-iter {variant} len {len}: aged {young} SPTEs, expected {sptes}"
                )));
            }
            samples.push(Sample::new(
                variant,
                names::NS_PER_SPTE,
                params([("len", json!(len))]),
                elapsed.as_nanos() as f64 / sptes as f64,
                "ns",
            ));
            drop(fixture); // teardown, outside the timed window
        }
    }
    Ok(samples)
}

#[derive(Clone, Copy)]
enum Walk {
    RestartScan,
    Iterator,
}

/// How many of the `lists` lists the restart scan walks: all of them unless that would read
/// more than `budget` entries.
fn restart_scan_lists(lists: usize, len: usize, budget: usize) -> usize {
    (budget / (len * len)).clamp(1, lists)
}

/// KVM's age handler body for one SPTE: if the accessed bit is set, clear it (atomically:
/// a CPU may set A/D bits in the same word). Returns whether it was young.
#[inline(always)]
fn age_spte(table: &Table, index: usize) -> bool {
    if SpteFormat::EPT.is_accessed(table.get(index)) {
        table.fetch_and_not(index, SpteFormat::EPT.accessed());
        true
    } else {
        false
    }
}

/// Ages every SPTE of `heads` with the iterator that keeps its place (seed 000).
fn age_iterator(lists: &RmapLists, heads: &[RmapHead]) -> usize {
    let mut young = 0;
    for &head in heads {
        for s in rmap::iter(head, &lists.pool) {
            young += usize::from(age_spte(lists.tables.get(s.table_id()), s.index()));
        }
    }
    young
}

/// Ages every SPTE of `heads` with the scan that restarts from the head on every step
/// (before seed 000).
fn age_restart_scan(lists: &RmapLists, heads: &[RmapHead]) -> usize {
    let mut young = 0;
    for &head in heads {
        let mut prev = None;
        while let Some(s) = rmap::next_restart_scan(head, &lists.pool, prev) {
            young += usize::from(age_spte(lists.tables.get(s.table_id()), s.index()));
            prev = Some(s);
        }
    }
    young
}

/// Page tables from a [`HeapTableAllocator`], named by table id as the MMU names them.
pub(super) struct Tables {
    alloc: HeapTableAllocator,
    /// Indexed by table id. Ids start at 1 (a [`SpteRef`] is never zero), so slot 0 is
    /// `None`, as in the MMU's page store.
    tables: Vec<Option<NonNull<Table>>>,
    frames: Vec<Pfn>,
}

impl Tables {
    /// `count` zeroed tables, with ids `1..=count`.
    fn new(count: usize) -> Result<Tables, BenchError> {
        let alloc = HeapTableAllocator::new();
        let mut tables = Vec::with_capacity(count + 1);
        let mut frames = Vec::with_capacity(count);
        tables.push(None);
        for _ in 0..count {
            let frame = alloc
                .alloc_table()
                .ok_or_else(|| BenchError::new("out of memory for page tables"))?;
            frames.push(frame);
            tables.push(Some(alloc.table_ptr(frame)));
        }
        Ok(Tables {
            alloc,
            tables,
            frames,
        })
    }

    /// The table with id `id`.
    ///
    /// # Panics
    /// If there is no such table.
    #[inline(always)]
    pub(super) fn get(&self, id: u32) -> &Table {
        let table = self.tables[id as usize].expect("dangling table id");
        // SAFETY: every table was allocated from `self.alloc` and is freed only in `drop`,
        // so it outlives the returned borrow of `self`; its entries are atomics, so shared
        // references are all anyone holds.
        unsafe { table.as_ref() }
    }

    /// Whether every entry of every table is zero.
    pub(super) fn all_clear(&self) -> bool {
        (1..self.tables.len() as u32).all(|id| {
            let t = self.get(id);
            (0..SPTE_ENT_PER_PAGE).all(|i| t.get(i) == Spte::NONE)
        })
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        self.tables.clear();
        for frame in self.frames.drain(..) {
            // SAFETY: allocated by `self.alloc`, freed once, and no reference to it is left
            // (`get` borrows `self`, and the pointers were just dropped).
            unsafe { self.alloc.free_table(frame) };
        }
    }
}

/// `heads.len()` reverse maps of `len` SPTEs each, over real tables of present, accessed
/// 4 KiB leaves (see the module doc for the layout).
pub(super) struct RmapLists {
    pub(super) tables: Tables,
    pub(super) heads: Vec<RmapHead>,
    pub(super) pool: DescPool,
}

impl RmapLists {
    /// Builds `lists` lists of `len` SPTEs, installing each SPTE and linking it.
    pub(super) fn build(lists: usize, len: usize) -> Result<RmapLists, BenchError> {
        let sptes = lists * len;
        let tables = Tables::new(sptes.div_ceil(SPTE_ENT_PER_PAGE))?;
        let descs_per_list = if len < 2 {
            0
        } else {
            len.div_ceil(PTE_LIST_EXT)
        };
        let mut pool = DescPool::with_capacity(lists * descs_per_list);
        let mut heads = vec![RmapHead::EMPTY; lists];
        let attrs = LeafAttrs {
            writable: true,
            host_writable: true,
            mmu_writable: true,
            accessed: true,
            dirty: true,
            ..LeafAttrs::DEFAULT
        };
        for k in 0..len {
            for (l, head) in heads.iter_mut().enumerate() {
                let slot = k * lists + l;
                let id = u32::try_from(1 + slot / SPTE_ENT_PER_PAGE)
                    .ok()
                    .filter(|&id| id <= SpteRef::MAX_TABLE_ID)
                    .ok_or_else(|| BenchError::new("too many tables for a SpteRef"))?;
                let index = slot % SPTE_ENT_PER_PAGE;
                // Every SPTE of list `l` maps gfn `l`'s host frame.
                let pfn = Pfn(0x10_0000 + l as u64);
                tables
                    .get(id)
                    .set(index, SpteFormat::EPT.leaf(pfn, Level::L4K, attrs, true));
                rmap::add(head, SpteRef::new(id, index), &mut pool);
            }
        }
        Ok(RmapLists {
            tables,
            heads,
            pool,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_links_every_spte_once() {
        let (lists, len) = (37, 30);
        let f = RmapLists::build(lists, len).unwrap();
        let mut seen = Vec::new();
        for &head in &f.heads {
            assert_eq!(rmap::check(head, &f.pool), Ok(len));
            for s in rmap::iter(head, &f.pool) {
                assert!(SpteFormat::EPT.is_accessed(f.tables.get(s.table_id()).get(s.index())));
                seen.push(s);
            }
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), lists * len);
    }

    #[test]
    fn both_walks_age_every_spte_once() {
        for len in [1, 2, 14, 40] {
            let f = RmapLists::build(11, len).unwrap();
            assert_eq!(age_restart_scan(&f, &f.heads), 11 * len);
            assert_eq!(age_iterator(&f, &f.heads), 0, "already aged");
            let f = RmapLists::build(11, len).unwrap();
            assert_eq!(age_iterator(&f, &f.heads), 11 * len);
        }
    }

    #[test]
    fn restart_scan_is_bounded() {
        for len in LENS {
            let lists = (TOTAL_SPTES / len).max(1);
            let timed = restart_scan_lists(lists, len, RESTART_SCAN_BUDGET);
            assert!(timed >= 1 && timed <= lists);
            assert!(timed * len * len <= RESTART_SCAN_BUDGET.max(len * len));
        }
        assert_eq!(
            restart_scan_lists(TOTAL_SPTES, 1, RESTART_SCAN_BUDGET),
            TOTAL_SPTES
        );
    }
}
