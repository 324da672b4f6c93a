//! `pte-list-destroy`: the cost of dropping every SPTE of long reverse maps, per SPTE, as
//! KVM's `kvm_unmap_rmapp` does when a host page goes away or a memslot is deleted. Tests
//! seed 003's claim: clearing every SPTE in one pass over the list and then freeing all
//! its descriptors together (`destroy`, KVM's `pte_list_destroy`) beats removing the
//! entries one by one from the head (`one-by-one`, each removal moving an entry between
//! descriptors and freeing a descriptor when it empties).
//!
//! Workload: lists of 200 and 1000 SPTEs — the long reverse maps shadow paging produces,
//! one gfn mapped by hundreds of shadow pages — about a million SPTEs in all, laid out and
//! filled as in `rmap-iter` (each SPTE of a list in a different table, the lists filled
//! table by table). Each run builds fresh lists for each variant; only the drop is timed.

use std::time::Instant;

use serde_json::json;
use vmmu::rmap;
use vmmu::spte::Spte;

use super::names::pte_list_destroy as names;
use super::rmap_iter::{RmapLists, TOTAL_SPTES};
use super::{params, BenchConfig, BenchError, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "drop every SPTE of ~1M reverse-map entries: one-by-one removal vs one-pass destroy (ns per spte), len 200 and 1000",
    run,
};

/// List lengths measured.
const LENS: [usize; 2] = [200, 1000];

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let total = config.scaled(TOTAL_SPTES);
    let mut samples = Vec::new();
    for len in LENS {
        let lists = (total / len).max(1);
        for (variant, drop_lists) in [
            (
                names::ONE_BY_ONE,
                drop_one_by_one as fn(&mut RmapLists) -> usize,
            ),
            (names::DESTROY, drop_destroy),
        ] {
            let mut fixture = RmapLists::build(lists, len)?; // untimed
            let start = Instant::now();
            let dropped = drop_lists(&mut fixture);
            let elapsed = start.elapsed();
            check_dropped(&fixture, variant, len, dropped, lists * len)?;
            samples.push(Sample::new(
                variant,
                names::NS_PER_SPTE,
                params([("len", json!(len))]),
                elapsed.as_nanos() as f64 / (lists * len) as f64,
                "ns",
            ));
            drop(fixture); // teardown, outside the timed window
        }
    }
    Ok(samples)
}

/// Before seed 003: clear the first SPTE of the list, unlink it, start again from the head.
/// Returns the number of SPTEs dropped.
fn drop_one_by_one(lists: &mut RmapLists) -> usize {
    let RmapLists {
        tables,
        heads,
        pool,
    } = lists;
    let mut dropped = 0;
    for head in heads.iter_mut() {
        while let Some(s) = rmap::first(*head, pool) {
            tables.get(s.table_id()).swap(s.index(), Spte::NONE);
            dropped += usize::from(rmap::remove(head, s, pool));
        }
    }
    dropped
}

/// Seed 003: clear every SPTE in one walk of the list, then free its descriptors together.
/// Returns the number of SPTEs dropped.
fn drop_destroy(lists: &mut RmapLists) -> usize {
    let RmapLists {
        tables,
        heads,
        pool,
    } = lists;
    let mut dropped = 0;
    for head in heads.iter_mut() {
        dropped += rmap::for_each_destroy(head, pool, |s| {
            tables.get(s.table_id()).swap(s.index(), Spte::NONE);
        });
    }
    dropped
}

/// The correctness check after a drop (not timed): every SPTE was unlinked and cleared,
/// every head is empty and the pool has no descriptor in use.
fn check_dropped(
    lists: &RmapLists,
    variant: &str,
    len: usize,
    dropped: usize,
    expected: usize,
) -> Result<(), BenchError> {
    let fail =
        |what: String| BenchError::new(format!("pte-list-destroy {variant} len {len}: {what}"));
    if dropped != expected {
        return Err(fail(format!(
            "dropped {dropped} SPTEs, expected {expected}"
        )));
    }
    if lists.pool.in_use() != 0 {
        return Err(fail(format!(
            "{} rmap descriptors still in use",
            lists.pool.in_use()
        )));
    }
    if !lists.heads.iter().all(|h| h.is_empty()) {
        return Err(fail("a reverse map is not empty".into()));
    }
    if !lists.tables.all_clear() {
        return Err(fail("an SPTE is still set".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_strategies_drop_everything() {
        for len in [1, 2, 13, 14, 200] {
            for drop_lists in [drop_one_by_one as fn(&mut RmapLists) -> usize, drop_destroy] {
                let mut f = RmapLists::build(7, len).unwrap();
                let n = drop_lists(&mut f);
                check_dropped(&f, "test", len, n, 7 * len).unwrap();
                assert_eq!(f.pool.allocated_total(), f.pool.freed_total());
            }
        }
    }
}
