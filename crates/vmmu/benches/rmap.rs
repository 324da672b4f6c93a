//! Criterion benches for the reverse map's measured strategies, small enough to profile in
//! seconds (`cargo bench -p vmmu --bench rmap`). The full-size runs are the CLI's
//! `vmmu bench rmap-iter` and `vmmu bench pte-list-destroy`; these use the same workload
//! at ~16K SPTEs.
//!
//! - `rmap-iter/{iterator,restart-scan}/LEN` (seed 000): age every SPTE of lists of `LEN`
//!   entries — read it through its table, clear the accessed bit — walking each list with
//!   `rmap::iter` (keeps its place) or `rmap::next_restart_scan` (rescans from the head).
//! - `pte-list-destroy/{destroy,one-by-one}/LEN` (seed 003): clear and unlink every SPTE
//!   of lists of `LEN` entries, in one pass then freeing the descriptors together
//!   (`rmap::for_each_destroy`), or by clearing and removing the first entry until empty.
//!
//! Throughput is in SPTEs, so criterion's time per element is the CLI's `ns_per_spte`.
//! Layout, as shadow paging makes it: SPTE `k` of list `l` is slot `k * lists + l` of the
//! tables, and the lists are filled table by table.

use std::hint::black_box;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vmmu::rmap::{self, DescPool, RmapHead, SpteRef};
use vmmu::spte::{LeafAttrs, Spte, SpteFormat};
use vmmu::table::{HeapTableAllocator, Table, TableAllocator};
use vmmu::types::{Level, Pfn, SPTE_ENT_PER_PAGE};

/// SPTEs per fixture.
const TOTAL_SPTES: usize = 1 << 14;

/// `lists` reverse maps of `len` present, accessed 4 KiB leaves over heap tables.
struct Fixture {
    alloc: HeapTableAllocator,
    /// By table id; id 0 is never used (a `SpteRef` is never zero), as in the MMU.
    tables: Vec<Option<NonNull<Table>>>,
    frames: Vec<Pfn>,
    /// The SPTE each slot holds when armed.
    leaves: Vec<Spte>,
    heads: Vec<RmapHead>,
    pool: DescPool,
}

impl Fixture {
    fn new(len: usize) -> Fixture {
        let lists = (TOTAL_SPTES / len).max(1);
        let sptes = lists * len;
        let alloc = HeapTableAllocator::new();
        let mut tables = vec![None];
        let mut frames = Vec::new();
        for _ in 0..sptes.div_ceil(SPTE_ENT_PER_PAGE) {
            let frame = alloc.alloc_table().expect("out of memory for tables");
            frames.push(frame);
            tables.push(Some(alloc.table_ptr(frame)));
        }
        let attrs = LeafAttrs {
            writable: true,
            host_writable: true,
            mmu_writable: true,
            accessed: true,
            dirty: true,
            ..LeafAttrs::DEFAULT
        };
        let mut f = Fixture {
            alloc,
            tables,
            frames,
            leaves: vec![Spte::NONE; sptes],
            heads: vec![RmapHead::EMPTY; lists],
            pool: DescPool::new(),
        };
        for k in 0..len {
            for l in 0..lists {
                let slot = k * lists + l;
                f.leaves[slot] =
                    SpteFormat::EPT.leaf(Pfn(0x10_0000 + l as u64), Level::L4K, attrs, true);
                let s = SpteRef::new(
                    1 + (slot / SPTE_ENT_PER_PAGE) as u32,
                    slot % SPTE_ENT_PER_PAGE,
                );
                rmap::add(&mut f.heads[l], s, &mut f.pool);
            }
        }
        f.arm();
        f
    }

    fn sptes(&self) -> usize {
        self.leaves.len()
    }

    #[inline(always)]
    fn table(&self, id: u32) -> &Table {
        let t = self.tables[id as usize].expect("dangling table id");
        // SAFETY: allocated from `self.alloc` and freed only in `drop`, so it outlives the
        // borrow of `self`; entries are atomics, so shared references are all there are.
        unsafe { t.as_ref() }
    }

    /// Stores every slot's leaf again (accessed bit set), as the fixture was built.
    fn arm(&self) {
        for (slot, &leaf) in self.leaves.iter().enumerate() {
            let id = 1 + (slot / SPTE_ENT_PER_PAGE) as u32;
            self.table(id).set(slot % SPTE_ENT_PER_PAGE, leaf);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.tables.clear();
        for frame in self.frames.drain(..) {
            // SAFETY: allocated by `self.alloc`, freed once, no reference left.
            unsafe { self.alloc.free_table(frame) };
        }
    }
}

/// KVM's age handler body for one SPTE.
#[inline(always)]
fn age_spte(table: &Table, index: usize) -> bool {
    if SpteFormat::EPT.is_accessed(table.get(index)) {
        table.fetch_and_not(index, SpteFormat::EPT.accessed());
        true
    } else {
        false
    }
}

fn age_iterator(f: &Fixture) -> usize {
    let mut young = 0;
    for &head in &f.heads {
        for s in rmap::iter(head, &f.pool) {
            young += usize::from(age_spte(f.table(s.table_id()), s.index()));
        }
    }
    young
}

fn age_restart_scan(f: &Fixture) -> usize {
    let mut young = 0;
    for &head in &f.heads {
        let mut prev = None;
        while let Some(s) = rmap::next_restart_scan(head, &f.pool, prev) {
            young += usize::from(age_spte(f.table(s.table_id()), s.index()));
            prev = Some(s);
        }
    }
    young
}

fn drop_one_by_one(f: &Fixture, heads: &mut [RmapHead], pool: &mut DescPool) -> usize {
    let mut dropped = 0;
    for head in heads {
        while let Some(s) = rmap::first(*head, pool) {
            f.table(s.table_id()).swap(s.index(), Spte::NONE);
            dropped += usize::from(rmap::remove(head, s, pool));
        }
    }
    dropped
}

fn drop_destroy(f: &Fixture, heads: &mut [RmapHead], pool: &mut DescPool) -> usize {
    let mut dropped = 0;
    for head in heads {
        dropped += rmap::for_each_destroy(head, pool, |s| {
            f.table(s.table_id()).swap(s.index(), Spte::NONE);
        });
    }
    dropped
}

fn rmap_iter(c: &mut Criterion) {
    let mut group = c.benchmark_group("rmap-iter");
    for len in [16, 256] {
        let f = Fixture::new(len);
        group.throughput(Throughput::Elements(f.sptes() as u64));
        type Walk = fn(&Fixture) -> usize;
        for (name, walk) in [
            ("iterator", age_iterator as Walk),
            ("restart-scan", age_restart_scan),
        ] {
            group.bench_function(BenchmarkId::new(name, len), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        f.arm(); // untimed: every SPTE young again
                        let start = Instant::now();
                        let young = walk(black_box(&f));
                        total += start.elapsed();
                        assert_eq!(young, f.sptes());
                    }
                    total
                });
            });
        }
    }
    group.finish();
}

fn pte_list_destroy(c: &mut Criterion) {
    let mut group = c.benchmark_group("pte-list-destroy");
    for len in [200, 1000] {
        let f = Fixture::new(len);
        group.throughput(Throughput::Elements(f.sptes() as u64));
        type DropLists = fn(&Fixture, &mut [RmapHead], &mut DescPool) -> usize;
        for (name, drop_lists) in [
            ("destroy", drop_destroy as DropLists),
            ("one-by-one", drop_one_by_one),
        ] {
            group.bench_function(BenchmarkId::new(name, len), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // Untimed: a fresh copy of the lists and every SPTE present again.
                        let mut heads = f.heads.clone();
                        let mut pool = f.pool.clone();
                        f.arm();
                        let start = Instant::now();
                        let dropped = drop_lists(&f, black_box(&mut heads), &mut pool);
                        total += start.elapsed();
                        assert_eq!(dropped, f.sptes());
                        assert_eq!(pool.in_use(), 0);
                    }
                    total
                });
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = rmap_iter, pte_list_destroy
}
criterion_main!(benches);
