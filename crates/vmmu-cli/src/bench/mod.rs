//! `vmmu bench`: the scenario registry, the record format and the run harness.
//!
//! A [`Scenario`] is a named function that performs *one run* — fresh state, measure, tear
//! down — and returns its [`Sample`]s. The harness ([`run`]) calls it `--runs` times and
//! reduces the samples to their median per (variant, metric, params) key
//! ([`median::median_by_key`]), giving one [`Record`] per key, with the minimum beside the
//! median and the [`ruler`] (a fixed CPU loop timed before every run and after the last)
//! that says how much the machine moved meanwhile. A scenario runs its variants inside
//! each run, so over the runs they alternate.
//!
//! Adding a scenario is adding a file that defines a `pub const SCENARIO: Scenario`, one
//! entry in [`SCENARIOS`] and a module of its names in [`names`]. Scenario, variant and
//! metric names are a public contract: once published they are kept, and new ones are
//! added beside them. They are defined once, in [`names`], for the scenarios and the report.

mod dirty_log;
pub mod dirty_ratio;
mod fault_in;
pub mod floor;
pub mod guest;
pub mod median;
mod memory;
pub mod names;
pub mod output;
mod perf_tests;
mod pte_list_destroy;
mod rmap_iter;
pub mod ruler;
pub mod scale;
mod shadow_ctxsw;
pub mod shadow_fork;
mod shadow_guest;
mod shadow_pt_churn;
mod tdp_fault_in;
mod tdp_fault_parallel;
mod tdp_zap;
mod tdp_zap_hello;
mod writable_bitmap;
mod wrprot_slot;
mod zap;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Every scenario `vmmu bench` knows, in the order `vmmu bench list` prints them.
pub const SCENARIOS: &[Scenario] = &[
    fault_in::SCENARIO,
    zap::SCENARIO,
    rmap_iter::SCENARIO,
    pte_list_destroy::SCENARIO,
    writable_bitmap::SCENARIO,
    wrprot_slot::SCENARIO,
    dirty_log::SCENARIO,
    tdp_zap_hello::SCENARIO,
    tdp_zap::SCENARIO,
    tdp_fault_in::SCENARIO,
    tdp_fault_parallel::SCENARIO,
    memory::SCENARIO,
    shadow_fork::SCENARIO,
    shadow_ctxsw::SCENARIO,
    shadow_pt_churn::SCENARIO,
    perf_tests::DIRTY_LOG,
    perf_tests::PRE_FAULT,
    perf_tests::PAGE_TABLE,
    perf_tests::ACCESS_TRACKING,
    perf_tests::MEMSLOT,
    floor::SCENARIO,
    scale::SCENARIO,
];

/// Looks a scenario up by its public name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// A benchmark scenario.
#[derive(Debug)]
pub struct Scenario {
    /// Public name, as typed after `vmmu bench`.
    pub name: &'static str,
    /// One line saying what is measured.
    pub about: &'static str,
    /// Performs one run: builds its own state, measures, tears it down. Setup and teardown
    /// are excluded from the values it reports.
    pub run: fn(&BenchConfig) -> Result<Vec<Sample>, BenchError>,
}

/// What the command line tells a scenario about the workload.
#[derive(Clone, Copy, Debug)]
pub struct BenchConfig {
    /// What `scale` runs (its own flags; the other scenarios ignore it).
    pub scale: scale::ScaleConfig,
    /// Size of the guest memory slot, in GiB.
    pub mem_gib: u32,
    /// A smaller workload (`vmmu report --quick`): every slot is [`QUICK_SCALE`] times
    /// smaller than `mem_gib` says and fixed-size workloads shrink by the same factor
    /// ([`BenchConfig::scaled`]); every published (scenario, variant, metric, params) is
    /// still measured, and [`run`] adds `"quick": true` to the params of its records.
    pub quick: bool,
}

/// How much smaller a [`BenchConfig::quick`] workload is.
pub const QUICK_SCALE: u64 = 16;

impl BenchConfig {
    /// The full-size workload on a `mem_gib` GiB slot.
    pub fn new(mem_gib: u32) -> Self {
        BenchConfig {
            mem_gib,
            quick: false,
            scale: scale::ScaleConfig::default(),
        }
    }

    /// Slot size in bytes: `mem_gib` GiB, or [`QUICK_SCALE`] times less when quick.
    pub fn mem_bytes(&self) -> u64 {
        let bytes = u64::from(self.mem_gib) << 30;
        if self.quick {
            bytes / QUICK_SCALE
        } else {
            bytes
        }
    }

    /// `n`, or [`QUICK_SCALE`] times less (at least 1) when quick: for workloads whose size
    /// does not come from the slot.
    pub fn scaled(&self, n: usize) -> usize {
        if self.quick {
            (n / QUICK_SCALE as usize).max(1)
        } else {
            n
        }
    }
}

/// One measured value from one run of a scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Which implementation was measured, e.g. `shadow-direct`.
    pub variant: String,
    /// What was measured, e.g. `ns_per_page`.
    pub metric: String,
    /// The workload's settings, e.g. `{"backing": "4k", "mem_gib": 1}`.
    pub params: Map<String, Value>,
    /// The measurement.
    pub value: f64,
    /// Unit of `value`, e.g. `ns`.
    pub unit: String,
}

impl Sample {
    /// A sample from its parts.
    pub fn new(
        variant: &str,
        metric: &str,
        params: Map<String, Value>,
        value: f64,
        unit: &str,
    ) -> Self {
        Sample {
            variant: variant.into(),
            metric: metric.into(),
            params,
            value,
            unit: unit.into(),
        }
    }

    /// Whether two samples measure the same thing, i.e. share (variant, metric, params).
    pub fn same_key(&self, other: &Sample) -> bool {
        self.variant == other.variant && self.metric == other.metric && self.params == other.params
    }
}

/// One line of `vmmu bench --json` output: a sample's median over the runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The scenario's public name.
    pub scenario: String,
    /// See [`Sample::variant`].
    pub variant: String,
    /// See [`Sample::metric`].
    pub metric: String,
    /// Median of the runs' values.
    pub value: f64,
    /// Minimum of the runs' values (absent in records from before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// See [`Sample::unit`].
    pub unit: String,
    /// See [`Sample::params`].
    pub params: Map<String, Value>,
    /// The CPU ruler over the scenario's runs (see [`ruler`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ruler: Option<ruler::Ruler>,
}

impl Record {
    fn new(scenario: &str, sample: Sample, min: f64, ruler: Option<ruler::Ruler>) -> Self {
        Record {
            scenario: scenario.into(),
            variant: sample.variant,
            metric: sample.metric,
            value: sample.value,
            min: Some(min),
            unit: sample.unit,
            params: sample.params,
            ruler,
        }
    }
}

/// Runs `scenario` `runs` times and reports the median (and the minimum) of each key, with
/// the CPU ruler timed before each run and after the last. `on_run(i, runs)` is called
/// before run `i` (1-based), for progress reporting.
pub fn run(
    scenario: &Scenario,
    config: &BenchConfig,
    runs: u32,
    mut on_run: impl FnMut(u32, u32),
) -> Result<Vec<Record>, BenchError> {
    let mut samples = Vec::new();
    let mut ruler = ruler::RulerTimes::default();
    for i in 1..=runs {
        on_run(i, runs);
        ruler.tick();
        samples.extend((scenario.run)(config)?);
    }
    ruler.tick();
    let ruler = ruler.ruler();
    Ok(median::median_by_key(samples)
        .into_iter()
        .map(|(mut s, min)| {
            if config.quick {
                // A quick workload is a different measurement: its key says so.
                s.params.insert("quick".into(), Value::Bool(true));
            }
            Record::new(scenario.name, s, min, ruler)
        })
        .collect())
}

/// Builds a `params` map from `(name, value)` pairs.
pub fn params<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// A scenario failed: the library returned an error, said with what was being done.
#[derive(Debug)]
pub struct BenchError(String);

impl BenchError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        BenchError(message.into())
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

/// Attaches what was being done to a library error. Bounded on `Display` rather than
/// `std::error::Error` because the `no_std` core's errors need not implement the latter.
pub trait Context<T> {
    /// Turns the error into a [`BenchError`] that starts with `what`.
    fn context(self, what: &str) -> Result<T, BenchError>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, BenchError> {
        self.map_err(|e| BenchError::new(format!("{what}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::Cell;

    #[test]
    fn registry_names_are_unique_and_findable() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|t| t.name != s.name),
                "{}",
                s.name
            );
            assert_eq!(find(s.name).map(|f| f.name), Some(s.name));
            assert!(!s.about.is_empty() && !s.about.contains('\n'));
        }
        assert!(find("fault-in").is_some() && find("zap").is_some());
        assert!(find("no-such-scenario").is_none());
    }

    thread_local!(static CALLS: Cell<u32> = const { Cell::new(0) });

    /// Reports 10, 20, 30, ... on successive calls.
    fn counting(_: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
        let n = CALLS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        let p = params([("backing", json!("4k"))]);
        Ok(vec![Sample::new("v", "m", p, f64::from(n) * 10.0, "ns")])
    }

    #[test]
    fn harness_runs_r_times_and_reports_the_median() {
        let scenario = Scenario {
            name: "counting",
            about: "test",
            run: counting,
        };
        let mut seen = Vec::new();
        let records = run(&scenario, &BenchConfig::new(1), 4, |i, r| seen.push((i, r))).unwrap();
        assert_eq!(seen, [(1, 4), (2, 4), (3, 4), (4, 4)]);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].scenario, "counting");
        assert_eq!(records[0].value, 25.0);
        assert!(!records[0].params.contains_key("quick"));
    }

    #[test]
    fn quick_shrinks_the_workload_and_marks_the_records() {
        let quick = BenchConfig {
            quick: true,
            ..BenchConfig::new(1)
        };
        assert_eq!(
            quick.mem_bytes() * QUICK_SCALE,
            BenchConfig::new(1).mem_bytes()
        );
        assert_eq!(quick.scaled(1 << 20), (1 << 20) / QUICK_SCALE as usize);
        assert_eq!(quick.scaled(3), 1);
        assert_eq!(BenchConfig::new(1).scaled(3), 3);
        let scenario = Scenario {
            name: "counting",
            about: "test",
            run: counting,
        };
        let records = run(&scenario, &quick, 1, |_, _| {}).unwrap();
        assert_eq!(records[0].params["quick"], json!(true));
        assert_eq!(records[0].params["backing"], json!("4k"));
    }

    #[test]
    fn record_serializes_to_the_public_json_shape() {
        let p = params([("backing", json!("2m")), ("mem_gib", json!(1))]);
        let ruler = ruler::Ruler {
            min_us: 900.0,
            max_us: 1000.0,
            samples: 2,
        };
        let r = Record::new(
            "zap",
            Sample::new("shadow-direct", "us", p, 1.5, "us"),
            1.25,
            Some(ruler),
        );
        let v: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"scenario": "zap", "variant": "shadow-direct", "metric": "us",
                   "value": 1.5, "min": 1.25, "unit": "us",
                   "params": {"backing": "2m", "mem_gib": 1},
                   "ruler": {"min_us": 900.0, "max_us": 1000.0, "samples": 2}})
        );
        // Records without the newer fields (the KVM side's, older files) still parse.
        let old: Record = serde_json::from_value(json!({"scenario": "zap",
            "variant": "kvm", "metric": "us", "value": 2.0, "unit": "us", "params": {}}))
        .unwrap();
        assert_eq!((old.min, old.ruler), (None, None));
    }

    #[test]
    fn runs_record_the_minimum_and_the_ruler() {
        let records = run(
            &SCENARIOS[0],
            &BenchConfig {
                quick: true,
                ..BenchConfig::new(1)
            },
            2,
            |_, _| {},
        )
        .unwrap();
        for r in &records {
            let min = r.min.expect("the harness keeps the minimum");
            assert!(min <= r.value, "{r:?}");
            let ruler = r.ruler.expect("the harness times the ruler");
            assert_eq!(ruler.samples, 3, "before each of 2 runs and after the last");
        }
    }

    #[test]
    fn context_names_the_failed_step() {
        let r: Result<(), &str> = Err("boom");
        assert_eq!(
            r.context("host mmap").unwrap_err().to_string(),
            "host mmap: boom"
        );
    }
}
