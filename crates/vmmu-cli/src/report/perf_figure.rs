//! The figure of `vmmu perf`'s tests as scenarios (`perf-dirty-log`, `perf-pre-fault`,
//! `perf-page-table`): dirty_log_perf_test's phases on vmmu's TDP MMU with 1 and 2 vCPU
//! threads, and the tables of all three tests.

use serde_json::Value;

use super::figures::Figure;
use super::plots::{self, BarChart, Bars, Look};
use super::query;
use crate::bench::names::perf::{
    access_tracking as at, dirty_log as dl, memslot as ms, page_table as pt, pre_fault as pf,
};
use crate::bench::Record;

/// The variant the scenarios measure.
const VARIANT: &str = "vmmu-tdp-used";

/// The figure.
pub fn perf(rs: &[Record]) -> Figure {
    // (label, metric, iteration)
    let phases: [(&str, &str, Option<u32>); 8] = [
        ("populate", dl::POPULATE_MEMORY, None),
        ("enable logging", dl::ENABLING_DIRTY_LOGGING, None),
        ("dirty memory 1", dl::DIRTY_MEMORY, Some(1)),
        ("get log 1", dl::GET_DIRTY_LOG, Some(1)),
        ("clear log 1", dl::CLEAR_DIRTY_LOG, Some(1)),
        ("dirty memory 2", dl::DIRTY_MEMORY, Some(2)),
        ("clear log 2", dl::CLEAR_DIRTY_LOG, Some(2)),
        ("disable logging", dl::DISABLING_DIRTY_LOGGING, None),
    ];
    let series: Vec<Bars> = [1u32, 2]
        .iter()
        .enumerate()
        .map(|(i, &v)| Bars {
            label: format!("{v} vCPU thread{}", if v > 1 { "s" } else { "" }),
            values: phases
                .iter()
                .map(|(_, m, it)| {
                    let mut p = vec![("v", Value::from(v))];
                    if let Some(it) = it {
                        p.push(("iteration", Value::from(*it)));
                    }
                    query::value(rs, dl::NAME, VARIANT, m, &p).map(|s| s * 1e3)
                })
                .collect(),
            look: Look::Solid(i),
        })
        .collect();
    let svg = if series.iter().all(|s| s.values.iter().all(Option::is_none)) {
        Err("no records for this figure in this run".to_owned())
    } else {
        plots::bar_chart(&BarChart {
            title: "perf-dirty-log: dirty_log_perf_test's phases on vmmu's TDP MMU".into(),
            x_desc: "phase (iterations 1 and 2)".into(),
            y_desc: "time of the phase (ms, log)".into(),
            groups: phases.iter().map(|(l, _, _)| (*l).to_owned()).collect(),
            y_log: true,
            series,
        })
    };
    Figure {
        id: "perf",
        tables: vec![
            (dl::NAME, None),
            (pf::NAME, None),
            (pt::NAME, None),
            (at::NAME, None),
            (ms::NAME, None),
        ],
        heading: "The KVM selftests' MMU workloads — dirty_log_perf_test, pre_fault_memory_test, \
                  kvm_page_table_test, access_tracking_perf_test, memslot_perf_test"
            .into(),
        svg,
        reading: "vmmu perf runs the selftests' workloads with their flags and lines; these \
                  are vmmu's side at the report's size (the TDP MMU, each vCPU a thread \
                  with its own part of the memory; manual protect with initially-set bits, \
                  so iteration 1 writes take no fault and its CLEAR write-protects). Each \
                  phase's MMU counters are the `<phase>_*` rows of the tables (faults, fast \
                  faults, TLB flushes, huge pages split and rebuilt). `vmmu perf <test>` \
                  runs the same phases on the host's KVM beside vmmu and prints vmmu's time \
                  over KVM's per phase."
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::query::tests::rec;
    use serde_json::json;

    #[test]
    fn plots_every_phase_for_one_and_two_vcpus() {
        let mut rs = Vec::new();
        for v in [1u32, 2] {
            rs.push(rec(
                dl::NAME,
                VARIANT,
                dl::POPULATE_MEMORY,
                &[("v", json!(v))],
                0.1,
            ));
            for it in [1u32, 2] {
                let p = [("v", json!(v)), ("iteration", json!(it))];
                rs.push(rec(dl::NAME, VARIANT, dl::DIRTY_MEMORY, &p, 0.01));
            }
        }
        let fig = perf(&rs);
        let svg = fig.svg.unwrap();
        assert!(
            svg.contains("2 vCPU threads") && svg.contains("dirty memory 2"),
            "{svg}"
        );
        assert_eq!(fig.tables.len(), 5);
    }
}
