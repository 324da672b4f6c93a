//! What `vmmu perf` prints: the selftests' phase lines per side, each followed by the
//! side's MMU counters over the phase, then a table of every phase line's figure per
//! side and vmmu's over KVM's; or, with `--json`, the bench contract's records (scenario
//! `perf-<test>`, variant the side, metric the phase, unit `s`, `params` the flags and,
//! for a per-iteration phase, `iteration`; counters as `<phase>_<counter>` records).

use std::io::{self, Write};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::side::Delta;
use crate::bench::Record;

/// `%ld.%.9lds`, as the selftests print a `struct timespec`.
pub fn timespec(d: Duration) -> String {
    format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
}

/// One side's figure on one phase line.
#[derive(Clone, Debug)]
pub struct Figure {
    /// The side's label.
    pub side: String,
    /// Seconds.
    pub secs: f64,
}

/// A phase line of the table.
#[derive(Clone, Debug)]
struct Row {
    text: String,
    figures: Vec<Figure>,
}

/// The printer of one test run.
pub struct Out {
    json: bool,
    /// Collect the records only (a bench scenario): print nothing.
    quiet: bool,
    scenario: String,
    params: Map<String, Value>,
    rows: Vec<Row>,
    records: Vec<Record>,
}

impl Out {
    /// For scenario `scenario` (`perf-dirty-log`, ...) with its flags as `params`.
    pub fn new(scenario: &str, json: bool, params: Map<String, Value>) -> Self {
        Out {
            json,
            quiet: false,
            scenario: scenario.to_owned(),
            params,
            rows: Vec::new(),
            records: Vec::new(),
        }
    }

    /// A bench scenario's printer: collects the records, prints nothing.
    pub fn quiet(scenario: &str, params: Map<String, Value>) -> Self {
        Out {
            quiet: true,
            ..Out::new(scenario, true, params)
        }
    }

    /// The records as the bench harness's samples (one run's values).
    pub fn samples(&self) -> Vec<crate::bench::Sample> {
        self.records
            .iter()
            .map(|r| {
                crate::bench::Sample::new(&r.variant, &r.metric, r.params.clone(), r.value, &r.unit)
            })
            .collect()
    }

    /// A line of its own (the selftest's banners; notes): text mode only.
    pub fn line(&mut self, text: &str) {
        if !self.json {
            println!("{text}");
        }
    }

    /// A phase measured on each side: `(side, time, counters over the phase)`. Prints
    /// `[side] <text> time: 1.234567890s` and the counters line per side; `metric` (and
    /// `iteration`) key the JSON records.
    pub fn phase(
        &mut self,
        text: &str,
        metric: &str,
        iteration: Option<u32>,
        results: &[(String, Duration, Delta)],
    ) {
        let mut params = self.params.clone();
        if let Some(i) = iteration {
            params.insert("iteration".into(), json!(i));
        }
        for (side, d, delta) in results {
            if !self.json {
                println!("[{side}] {text} time: {}", timespec(*d));
                if *delta != Delta::default() {
                    println!("{}", counters_line(side.len() + 3, delta));
                }
            }
            self.record(side, metric, &params, d.as_secs_f64(), "s");
            for (name, v) in [
                ("faults", delta.faults),
                ("fast_faults", delta.fast),
                ("tlb_flushes", delta.flushes),
                ("huge_split", delta.split),
                ("huge_rebuilt", delta.rebuilt),
            ] {
                if let Some(v) = v {
                    self.record(
                        side,
                        &format!("{metric}_{name}"),
                        &params,
                        v as f64,
                        "count",
                    );
                }
            }
            if let Some(v) = delta.huge_delta {
                self.record(
                    side,
                    &format!("{metric}_huge_spte_delta"),
                    &params,
                    v as f64,
                    "count",
                );
            }
        }
        self.rows.push(Row {
            text: text.to_owned(),
            figures: results
                .iter()
                .map(|(side, d, _)| Figure {
                    side: side.clone(),
                    secs: d.as_secs_f64(),
                })
                .collect(),
        });
    }

    /// A total over iterations, as the selftest prints it: `[side] <text> over N
    /// iterations took 1.2s. (Avg 0.6s/iteration)`.
    pub fn total(
        &mut self,
        text: &str,
        metric: &str,
        iterations: u32,
        per_side: &[(String, Duration)],
    ) {
        let params = self.params.clone();
        for (side, d) in per_side {
            let avg = *d / iterations.max(1);
            if !self.json {
                println!(
                    "[{side}] {text} over {iterations} iterations took {}. (Avg {}/iteration)",
                    timespec(*d),
                    timespec(avg)
                );
            }
            self.record(side, metric, &params, d.as_secs_f64(), "s");
        }
        self.rows.push(Row {
            text: format!("{text} over {iterations} iterations"),
            figures: per_side
                .iter()
                .map(|(side, d)| Figure {
                    side: side.clone(),
                    secs: d.as_secs_f64(),
                })
                .collect(),
        });
    }

    fn record(
        &mut self,
        side: &str,
        metric: &str,
        params: &Map<String, Value>,
        value: f64,
        unit: &str,
    ) {
        self.records.push(Record {
            scenario: self.scenario.clone(),
            variant: side.to_owned(),
            metric: metric.to_owned(),
            value,
            min: None,
            unit: unit.to_owned(),
            params: params.clone(),
            ruler: None,
        });
    }

    /// Print the table (text) or the records (JSON).
    pub fn finish(&self) -> io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        let mut out = io::stdout().lock();
        if self.json {
            crate::bench::output::write_json(&mut out, &self.records)?;
            return out.flush();
        }
        write_table(&mut out, &self.rows)?;
        out.flush()
    }
}

/// `faults 262144 (fast 0), remote TLB flushes 1, huge pages split 512 / rebuilt 0`,
/// indented by `indent`, `n/a` where the side cannot tell.
pub fn counters_line(indent: usize, d: &Delta) -> String {
    let n = |v: Option<u64>| v.map_or_else(|| "n/a".to_owned(), |v| v.to_string());
    let huge = match (d.split, d.rebuilt, d.huge_delta) {
        (None, None, Some(g)) => format!("huge SPTEs {g:+}"),
        (s, r, g) => {
            let mut t = format!("huge pages split {} / rebuilt {}", n(s), n(r));
            if let Some(g) = g {
                t += &format!(", huge SPTEs {g:+}");
            }
            t
        }
    };
    format!(
        "{:indent$}faults {} (fast {}), remote TLB flushes {}, {huge}",
        "",
        n(d.faults),
        n(d.fast),
        n(d.flushes)
    )
}

/// The table: a row per phase line, a column per side, and vmmu's over KVM's where both
/// ran (below 1: vmmu took less time).
fn write_table(out: &mut impl Write, rows: &[Row]) -> io::Result<()> {
    let mut sides: Vec<String> = Vec::new();
    for r in rows {
        for f in &r.figures {
            if !sides.contains(&f.side) {
                sides.push(f.side.clone());
            }
        }
    }
    let vmmu = sides.iter().position(|s| s.starts_with("vmmu"));
    let kvm = sides.iter().position(|s| s == "kvm");
    let ratio = vmmu.is_some() && kvm.is_some();
    let w0 = rows.iter().map(|r| r.text.len()).max().unwrap_or(5).max(5);
    writeln!(out)?;
    let mut header = format!("{:<w0$}", "phase");
    for s in &sides {
        header += &format!("  {:>16}", format!("{s} (s)"));
    }
    if ratio {
        header += &format!("  {:>9}", "vmmu/kvm");
    }
    writeln!(out, "{header}")?;
    for r in rows {
        let mut line = format!("{:<w0$}", r.text);
        let value = |side: &str| r.figures.iter().find(|f| f.side == side).map(|f| f.secs);
        for s in &sides {
            line += &format!(
                "  {:>16}",
                value(s).map_or_else(|| "-".to_owned(), |v| format!("{v:.9}"))
            );
        }
        if let (true, Some(v), Some(k)) = (ratio, vmmu, kvm) {
            let cell = match (value(&sides[v]), value(&sides[k])) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                _ => "-".to_owned(),
            };
            line += &format!("  {cell:>9}");
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    if ratio {
        writeln!(
            out,
            "vmmu/kvm: vmmu's time over KVM's (below 1: vmmu took less time)."
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespec_prints_as_the_selftests_do() {
        assert_eq!(timespec(Duration::new(1, 5)), "1.000000005s");
        assert_eq!(timespec(Duration::from_millis(17)), "0.017000000s");
    }

    #[test]
    fn counters_say_na_where_unknown() {
        let d = Delta {
            faults: Some(10),
            fast: Some(2),
            flushes: None,
            split: None,
            rebuilt: None,
            huge_delta: Some(-3),
        };
        assert_eq!(
            counters_line(2, &d),
            "  faults 10 (fast 2), remote TLB flushes n/a, huge SPTEs -3"
        );
    }

    #[test]
    fn table_has_the_ratio_where_both_ran() {
        let rows = vec![Row {
            text: "Populate memory".into(),
            figures: vec![
                Figure {
                    side: "vmmu-tdp-used".into(),
                    secs: 1.0,
                },
                Figure {
                    side: "kvm".into(),
                    secs: 4.0,
                },
            ],
        }];
        let mut v = Vec::new();
        write_table(&mut v, &rows).unwrap();
        let s = String::from_utf8(v).unwrap();
        assert!(s.contains("0.250"), "{s}");
        assert!(s.contains("vmmu-tdp-used (s)"), "{s}");
    }
}
