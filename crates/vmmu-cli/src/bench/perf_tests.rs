//! `perf-dirty-log`, `perf-pre-fault`, `perf-page-table`, `perf-access-tracking`: `vmmu perf`'s tests as bench
//! scenarios, on vmmu's side only (the TDP MMU in used-entries mode), at sizes the
//! report's time allows: with 1 and 2 vCPUs (one thread each), dirty-log, pre-fault and
//! access-tracking
//! with `-b` a quarter of the `--mem-gib` slot per vCPU, page-table with half of it in all
//! on THP (so huge pages are split and rebuilt). `perf-dirty-log` also runs seed 000's
//! workload: GET_DIRTY_LOG of the whole slot dirty (`-g`, 1 GB at the default size) on the
//! shadow MMU with each reverse-map iteration (variants `vmmu-shadow`,
//! `vmmu-shadow-restart-scan`), which the report's seed table compares. `params` carry the test's flags; the
//! metrics are its phases (seconds) and the MMU counters over each (counts). `vmmu perf
//! <test>` runs the same workloads with KVM beside them.

use super::names::perf as names;
use super::{BenchConfig, BenchError, Sample, Scenario};
use crate::perf::access_tracking::AccessTrackingArgs;
use crate::perf::dirty_log::DirtyLogArgs;
use crate::perf::memslot::MemslotArgs;
use crate::perf::output::Out;
use crate::perf::page_table::PageTableArgs;
use crate::perf::pre_fault::PreFaultArgs;
use crate::perf::{BackingArg, CommonArgs, MmuArg, RmapIterArg, Target};

/// Registry entry: `perf-dirty-log`.
pub const DIRTY_LOG: Scenario = Scenario {
    name: names::dirty_log::NAME,
    about: "dirty_log_perf_test's phases on vmmu's TDP MMU, 1 and 2 vCPU threads (`vmmu perf dirty-log` adds KVM)",
    run: dirty_log,
};

/// Registry entry: `perf-pre-fault`.
pub const PRE_FAULT: Scenario = Scenario {
    name: names::pre_fault::NAME,
    about:
        "KVM_PRE_FAULT_MEMORY from 1 and 2 vCPU threads in parallel, then reads, on vmmu's TDP MMU",
    run: pre_fault,
};

/// Registry entry: `perf-access-tracking`.
pub const ACCESS_TRACKING: Scenario = Scenario {
    name: names::access_tracking::NAME,
    about: "access_tracking_perf_test's phases (aging through age_hva_range), 1 and 2 vCPU threads, vmmu's TDP MMU",
    run: access_tracking,
};

/// Registry entry: `perf-memslot`.
pub const MEMSLOT: Scenario = Scenario {
    name: names::memslot::NAME,
    about:
        "memslot_perf_test's six tests on vmmu's TDP MMU, 32 slots over half the slot, 100 ms each",
    run: memslot,
};

/// Registry entry: `perf-page-table`.
pub const PAGE_TABLE: Scenario = Scenario {
    name: names::page_table::NAME,
    about:
        "kvm_page_table_test's stages on THP (create, update under logging, adjust), vmmu's TDP MMU",
    run: page_table,
};

const COMMON: CommonArgs = CommonArgs {
    target: Target::Vmmu,
    mmu: MmuArg::TdpUsed,
    no_eager_split: false,
    rmap_iteration: None,
    json: true,
};

fn err(e: crate::perf::PerfError) -> BenchError {
    BenchError::new(e.to_string())
}

fn dirty_log(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for vcpus in [1, 2] {
        let args = DirtyLogArgs {
            vcpus,
            bytes: config.mem_bytes() / 4,
            iterations: 2,
            no_manual_protect: false,
            backing: BackingArg::Anonymous,
            slots: 1,
            write_percent: 100,
            random: false,
            overlap: false,
            run_while_disabling: false,
            seed: 1,
            common: COMMON,
        };
        let mut out = Out::quiet(names::dirty_log::NAME, args.params());
        crate::perf::dirty_log::run_with(&args, &args.layout(), &mut out).map_err(err)?;
        samples.extend(out.samples());
    }
    // Seed 000's own workload: GET_DIRTY_LOG of all of the slot dirty (1 GB at the
    // default size), default GET (`-g`), on the shadow MMU with each rmap iteration.
    for rmap in [RmapIterArg::Iterator, RmapIterArg::RestartScan] {
        let args = DirtyLogArgs {
            vcpus: 1,
            bytes: config.mem_bytes(),
            iterations: 2,
            no_manual_protect: true,
            backing: BackingArg::Anonymous,
            slots: 1,
            write_percent: 100,
            random: false,
            overlap: false,
            run_while_disabling: false,
            seed: 1,
            common: CommonArgs {
                mmu: MmuArg::Shadow,
                rmap_iteration: Some(rmap),
                ..COMMON
            },
        };
        let mut out = Out::quiet(names::dirty_log::NAME, args.params());
        crate::perf::dirty_log::run_with(&args, &args.layout(), &mut out).map_err(err)?;
        samples.extend(out.samples());
    }
    Ok(samples)
}

fn pre_fault(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for vcpus in [1, 2] {
        let args = PreFaultArgs {
            vcpus,
            bytes: config.mem_bytes() / 4,
            backing: BackingArg::Anonymous,
            common: COMMON,
        };
        let mut out = Out::quiet(names::pre_fault::NAME, args.params());
        crate::perf::pre_fault::run_with(&args, &args.layout(), &mut out).map_err(err)?;
        samples.extend(out.samples());
    }
    Ok(samples)
}

fn page_table(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for vcpus in [1, 2] {
        let args = PageTableArgs {
            bytes: config.mem_bytes() / 2,
            vcpus,
            backing: BackingArg::AnonymousThp,
            common: COMMON,
        };
        let mut out = Out::quiet(names::page_table::NAME, args.params());
        crate::perf::page_table::run_with(&args, &args.layout(), &mut out).map_err(err)?;
        samples.extend(out.samples());
    }
    Ok(samples)
}

fn access_tracking(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for vcpus in [1, 2] {
        let args = AccessTrackingArgs {
            vcpus,
            bytes: config.mem_bytes() / 4,
            backing: BackingArg::Anonymous,
            common: COMMON,
        };
        let mut out = Out::quiet(names::access_tracking::NAME, args.params());
        crate::perf::access_tracking::run_with(&args, &args.layout(), &mut out).map_err(err)?;
        samples.extend(out.samples());
    }
    Ok(samples)
}

fn memslot(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let args = MemslotArgs {
        slots: 32,
        seconds: 1,
        runs: 1,
        first: 0,
        last: 5,
        common: COMMON,
    };
    let mut params = args.params();
    params.remove("l");
    params.insert("budget_ms".into(), serde_json::json!(100));
    let mut out = Out::quiet(names::memslot::NAME, params);
    let layout = args.layout_of(config.mem_bytes() / 2);
    let budget = std::time::Duration::from_millis(100);
    crate::perf::memslot::run_with(&args, &layout, budget, &mut out).map_err(err)?;
    Ok(out.samples())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quick sizes: every scenario gives its phases for 1 and 2 vCPUs, with the counters
    /// that must follow from the workload.
    #[test]
    fn every_perf_scenario_reports_its_phases() {
        let config = BenchConfig {
            quick: true,
            ..BenchConfig::new(1)
        };
        let s = dirty_log(&config).unwrap();
        let find = |s: &[Sample], m: &str, v: u32| {
            s.iter()
                .find(|x| x.metric == m && x.params["v"] == v)
                .unwrap_or_else(|| panic!("{m} v={v}"))
                .value
        };
        for v in [1, 2] {
            assert!(find(&s, "populate_memory", v) > 0.0);
            // 16 MiB per vCPU on 4 KiB pages: every page faults in on first touch.
            assert_eq!(find(&s, "populate_memory_faults", v), f64::from(v) * 4096.0);
        }
        let s = pre_fault(&config).unwrap();
        for v in [1, 2] {
            // Pre-faulted completely: the reads take no fault.
            assert_eq!(find(&s, "read_memory_faults", v), 0.0);
        }
        let s = access_tracking(&config).unwrap();
        for v in [1, 2] {
            assert!(find(&s, "mark_idle", v) > 0.0);
            // Aging unmaps nothing: the idle writes take no fault.
            assert_eq!(find(&s, "writing_idle_faults", v), 0.0);
        }
        let s = memslot(&config).unwrap();
        for m in names::memslot::METRICS {
            assert!(s.iter().any(|x| x.metric == m && x.value > 0.0), "{m}");
        }
        let s = page_table(&config).unwrap();
        for v in [1, 2] {
            // 32 MiB of THP: 16 huge pages split when logging starts, rebuilt when it stops.
            assert_eq!(find(&s, "enable_dirty_logging_huge_split", v), 16.0);
            assert_eq!(find(&s, "disable_dirty_logging_huge_rebuilt", v), 16.0);
        }
    }
}
