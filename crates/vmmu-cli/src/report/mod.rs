//! `vmmu report [--out DIR] [--quick] [--mem-gib N] [--runs R]`: every published scenario,
//! the floor and the host's KVM in one run, written as a page, a document and data.
//!
//! Sources, in order:
//! 1. every scenario of the bench registry (`bench::SCENARIOS`), in-process through the
//!    bench harness (`bench::run`: median of `--runs` runs), so a scenario added to the
//!    registry is in the report without a change here (those in [`QUICK_IN_REPORT`] run
//!    at the quick size even without `--quick`); the last of them is the floor
//!    (`bench/floor.rs`), the least work of the operations the others measure;
//! 2. `kvm-compare` (`kvm.rs`): `vmmu kvm compare --json` as a child process, or a line
//!    saying why it was skipped;
//! 3. `migrate` (`migrate.rs`, Linux): `vmmu migrate --json` as a child process, on the
//!    host's KVM too where it opens.
//!
//! A source that fails is reported failed and the others still run; the report is written
//! either way, and the command then exits 1. Progress goes to stderr (indicatif bars on a
//! terminal, one line per source otherwise); stdout gets what was written and ends with the
//! seed summary table.
//!
//! Output, in `DIR` (default `vmmu-report/`):
//! - `results.json`: `{"meta", "sources", "seeds", "records"}`, where `records` holds every
//!   measurement as the bench JSON contract's objects;
//! - `report.md`: vmmu against the host's KVM first, then the seed summary and every table;
//! - `index.html`: the same with inline SVG plots (`figures.rs`, `plots.rs`).
//!
//! Both documents open, right after their header, with vmmu against the host's KVM
//! (`versus.rs`): kvm-compare's harvests as a row per mode and ratio (KVM, vmmu's shadow and
//! TDP MMUs, KVM's time over each, whether the bitmaps were identical), first touch and
//! memslot delete by host backing, and a paragraph on reading them, naming the MMU the
//! host's KVM runs on (`kvm::host_mmu`, also `meta.host_kvm_mmu` in `results.json`). Where
//! kvm-compare did not run the section is one line saying why. The seeds come next; the
//! full kvm-compare tables stay under their figures.

mod figures;
mod html;
mod kvm;
mod markdown;
#[cfg(target_os = "linux")]
mod migrate;
mod perf_figure;
mod plots;
mod query;
mod summary;
mod tables;
mod versus;

/// Which MMU the host's KVM runs guests on (for `vmmu perf`'s KVM lines).
pub use kvm::host_mmu as host_kvm_mmu;

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::bench::ruler::Ruler;
use crate::bench::{self, names, BenchConfig, Record, Scenario};
use summary::SeedRow;

/// `vmmu report` arguments.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Directory to write index.html, report.md and results.json to (created if missing).
    #[arg(long, default_value = "vmmu-report")]
    out: PathBuf,

    /// A first look in well under 30 s: slots and fixed workloads 16 times smaller, one run,
    /// the KVM comparison with one round and four ratios.
    #[arg(long)]
    quick: bool,

    /// Size of the guest memory slots, in GiB (1..=64).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    mem_gib: u32,

    /// Runs per scenario, each value the median (>= 1; default 5, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    runs: Option<u32>,
}

/// How a source ended.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceState {
    /// It ran and reported.
    Ok,
    /// It could not run here; why.
    Skipped(String),
    /// It failed; the error (its records, if any, are kept).
    Failed(String),
}

/// One source's line in "What ran".
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    /// Scenario name.
    pub name: String,
    /// How it ended.
    #[serde(serialize_with = "state_json")]
    pub state: SourceState,
    /// Runs (kvm-compare: rounds) each value is the median of; 0 when it did not run.
    pub runs: u32,
    /// Records it produced.
    pub records: usize,
    /// Wall-clock time it took.
    pub seconds: f64,
    /// The CPU ruler over its runs (`bench::ruler`), when it ran through the harness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ruler: Option<Ruler>,
}

/// A source's CPU ruler for the "What ran" tables: its spread, flagged when the machine
/// moved more than `bench::ruler::SPREAD_WARN` during the scenario; `-` without one.
pub fn ruler_cell(s: &Source) -> (String, bool) {
    match s.ruler {
        Some(r) => (format!("{:.2}x", r.spread()), r.moved()),
        None => ("-".into(), false),
    }
}

/// What the CPU rulers say about the run as a whole: which scenarios ran on a machine
/// that moved more than `bench::ruler::SPREAD_WARN`.
pub fn ruler_note(sources: &[Source]) -> String {
    let moved: Vec<&str> = sources
        .iter()
        .filter(|s| s.ruler.is_some_and(|r| r.moved()))
        .map(|s| s.name.as_str())
        .collect();
    let what = "CPU ruler spread: the slowest over the fastest timing of a fixed arithmetic \
                loop, timed before each run of a scenario and after the last (1.00x: the \
                machine gave the process the same CPU throughout)";
    if moved.is_empty() {
        format!(
            "{what}. No scenario saw it move more than {}x.",
            bench::ruler::SPREAD_WARN
        )
    } else {
        format!(
            "{what}. The machine moved more than {}x during: {}; their figures are less \
             comparable than the others.",
            bench::ruler::SPREAD_WARN,
            moved.join(", ")
        )
    }
}

fn state_json<S: serde::Serializer>(state: &SourceState, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(2))?;
    match state {
        SourceState::Ok => m.serialize_entry("status", "ok")?,
        SourceState::Skipped(why) => {
            m.serialize_entry("status", "skipped")?;
            m.serialize_entry("reason", why)?;
        }
        SourceState::Failed(why) => {
            m.serialize_entry("status", "failed")?;
            m.serialize_entry("reason", why)?;
        }
    }
    m.end()
}

/// What the run was.
#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    /// The command line.
    pub command: String,
    /// `vmmu x.y.z`.
    pub version: String,
    /// When it started, UTC.
    pub generated: String,
    /// `--quick`.
    pub quick: bool,
    /// `--mem-gib`.
    pub mem_gib: u32,
    /// Runs per scenario: a number, or the adaptive range (each source says how many).
    pub runs: String,
    /// Whether each scenario ran once, untimed, before its runs (the adaptive default).
    pub warm_up: bool,
    /// CPUs the machine offers.
    pub cpus: usize,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Which of its MMUs the host's KVM runs guests on, from its module parameters
    /// (`kvm::host_mmu`); absent where they cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_kvm_mmu: Option<String>,
}

/// Everything the report says; `results.json` is this.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The run.
    pub meta: Meta,
    /// Every source and how it ended.
    pub sources: Vec<Source>,
    /// The seed summary.
    pub seeds: Vec<SeedRow>,
    /// Every measurement, as the bench JSON contract's objects.
    pub records: Vec<Record>,
}

/// How many runs each scenario gets.
#[derive(Clone, Copy, Debug)]
enum Runs {
    /// `--runs`, or 1 with `--quick`.
    Fixed(u32),
    /// The default: a warm-up run, timed and dropped, then as many runs as fit in about
    /// [`TARGET_SECS`], between [`MIN_RUNS`] and [`MAX_RUNS`]: cheap scenarios, whose single
    /// runs are the noisiest, get the most.
    Adaptive,
}

const MIN_RUNS: u32 = 5;
const MAX_RUNS: u32 = 21;
const TARGET_SECS: f64 = 2.0;

/// Runs for a scenario whose warm-up run took `warm`: an odd count, so the median is a
/// measured value.
fn adaptive_runs(warm: Duration) -> u32 {
    let fit = (TARGET_SECS / warm.as_secs_f64().max(1e-3)).floor() as u32;
    let r = fit.clamp(MIN_RUNS, MAX_RUNS);
    r | 1
}

/// Scenarios the report expects from issues still open, with why they are missing: listed
/// as not in this build until they are in the registry (a name ending in `*` stands for
/// every scenario it prefixes). None today; a test checks that no entry is registered.
const PENDING: [(&str, &str); 0] = [];

/// Whether the registry has `name` (or, for `prefix*`, a scenario starting with `prefix`).
fn registered(name: &str) -> bool {
    match name.strip_suffix('*') {
        Some(prefix) => bench::SCENARIOS.iter().any(|s| s.name.starts_with(prefix)),
        None => bench::find(name).is_some(),
    }
}

/// Scenarios the report always runs at the quick size (their records say `"quick":
/// true`), because their full size would take most of a minute per run: `shadow-fork`
/// forks 2,132 children over its grid, each reading 64 MiB (about 15 s a run at full
/// size, under 1 s quick). Quick keeps every published key, 500 children included.
const QUICK_IN_REPORT: [&str; 1] = [names::shadow_fork::NAME];

/// The guest `scale` runs in the report, in GiB (`--quick`: 16 times less, 1 GiB).
const REPORT_SCALE_GIB: u32 = 16;

/// Run `vmmu report`.
pub fn run(args: &ReportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let generated = utc_now();
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let plan = match args.runs {
        Some(r) => Runs::Fixed(r),
        None if args.quick => Runs::Fixed(1),
        None => Runs::Adaptive,
    };
    let config = BenchConfig {
        mem_gib: args.mem_gib,
        quick: args.quick,
        // `scale` at a size the report's time allows (its default is 16 GiB).
        scale: bench::scale::ScaleConfig {
            guest_gib: REPORT_SCALE_GIB,
            ..bench::scale::ScaleConfig::default()
        },
    };
    let kvm_state = kvm::Availability::probe();

    let scenarios: Vec<&Scenario> = bench::SCENARIOS.iter().collect();
    let progress = Progress::new(scenarios.len() as u64 + 2);
    let mut records: Vec<Record> = Vec::new();
    let mut sources: Vec<Source> = Vec::new();

    for (k, scenario) in scenarios.iter().enumerate() {
        let name = scenario.name;
        let config = BenchConfig {
            quick: config.quick || QUICK_IN_REPORT.contains(&name),
            ..config
        };
        let t = Instant::now();
        let on_run = |i: u32, n: u32| progress.at(k as u64, &format!("{name}: run {i}/{n}"));
        let (runs, result) = match plan {
            Runs::Fixed(r) => (r, bench::run(scenario, &config, r, on_run)),
            Runs::Adaptive => {
                let warm = bench::run(scenario, &config, 1, |_, _| {
                    progress.at(k as u64, &format!("{name}: warm-up run"));
                });
                match warm {
                    Err(e) => (1, Err(e)),
                    Ok(_) => {
                        let r = adaptive_runs(t.elapsed());
                        (r, bench::run(scenario, &config, r, on_run))
                    }
                }
            }
        };
        let seconds = t.elapsed().as_secs_f64();
        let (state, got) = match result {
            Ok(rs) => (SourceState::Ok, rs),
            Err(e) => (SourceState::Failed(e.to_string()), Vec::new()),
        };
        progress.done(name, &state, seconds);
        sources.push(Source {
            name: name.into(),
            state,
            runs,
            records: got.len(),
            seconds,
            ruler: got.first().and_then(|r| r.ruler),
        });
        records.extend(got);
    }

    let base = scenarios.len() as u64;
    let rounds = match plan {
        Runs::Fixed(r) => r.min(MIN_RUNS),
        Runs::Adaptive => MIN_RUNS,
    };
    let t = Instant::now();
    let (state, got) = match kvm_state.skip_reason() {
        Some(why) => (SourceState::Skipped(why), Vec::new()),
        None => {
            progress.at(
                base,
                "kvm-compare: vmmu kvm compare (KVM and vmmu side by side)",
            );
            let exe = std::env::current_exe()?;
            let out = kvm::run(&exe, &kvm::args(args.mem_gib, rounds, args.quick));
            let state = out.error.map_or(SourceState::Ok, SourceState::Failed);
            (state, out.records)
        }
    };
    let seconds = t.elapsed().as_secs_f64();
    progress.done(kvm::NAME, &state, seconds);
    sources.push(Source {
        name: kvm::NAME.into(),
        state,
        runs: rounds,
        records: got.len(),
        seconds,
        ruler: None,
    });
    records.extend(got);
    #[cfg(target_os = "linux")]
    {
        let t = Instant::now();
        progress.at(
            base + 1,
            "migrate: vmmu migrate (live migration on real memory)",
        );
        let exe = std::env::current_exe()?;
        let with_kvm = kvm_state.skip_reason().is_none();
        let out = migrate::run(&exe, &migrate::args(args.quick, with_kvm));
        let state = out.error.map_or(SourceState::Ok, SourceState::Failed);
        let seconds = t.elapsed().as_secs_f64();
        progress.done(migrate::NAME, &state, seconds);
        sources.push(Source {
            name: migrate::NAME.into(),
            state,
            runs: if args.quick { 1 } else { 3 },
            records: out.records.len(),
            seconds,
            ruler: None,
        });
        records.extend(out.records);
    }
    for (name, why) in PENDING {
        if !registered(name) {
            sources.push(Source {
                name: name.into(),
                state: SourceState::Skipped(why.into()),
                runs: 0,
                records: 0,
                seconds: 0.0,
                ruler: None,
            });
        }
    }
    progress.finish();

    let report = Report {
        meta: Meta {
            command: command_line(),
            version: format!("vmmu {}", env!("CARGO_PKG_VERSION")),
            generated,
            quick: args.quick,
            mem_gib: args.mem_gib,
            runs: match plan {
                Runs::Fixed(r) => format!("{r}"),
                Runs::Adaptive => format!("{MIN_RUNS} to {MAX_RUNS}"),
            },
            warm_up: matches!(plan, Runs::Adaptive),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seconds: started.elapsed().as_secs_f64(),
            host_kvm_mmu: kvm::host_mmu(),
        },
        sources,
        seeds: summary::seeds(&records),
        records,
    };
    let kvm_note = report
        .sources
        .iter()
        .find(|s| s.name == kvm::NAME && s.records == 0)
        .map(|s| match &s.state {
            SourceState::Skipped(why) => why.clone(),
            SourceState::Failed(why) => format!("failed: {why}"),
            SourceState::Ok => "reported nothing".into(),
        });
    let versus = versus::versus(
        &report.sources,
        &report.records,
        report.meta.host_kvm_mmu.as_deref(),
    );
    let figures = figures::figures(&report.records, kvm_note.as_deref(), args.quick);
    let tables = tables::tables(&report.records);

    let write = |name: &str, text: &str| -> Result<PathBuf, String> {
        let path = args.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };
    let json = serde_json::to_string_pretty(&report)?;
    let paths = [
        write(
            "index.html",
            &html::page(&report, &versus, &figures, &tables),
        )?,
        write(
            "report.md",
            &markdown::document(&report, &versus, &figures, &tables),
        )?,
        write("results.json", &json)?,
    ];

    let mut out = io::stdout().lock();
    out.write_all(closing(&report, &paths).as_bytes())?;
    out.flush()?;
    let failed: Vec<&str> = report
        .sources
        .iter()
        .filter(|s| matches!(s.state, SourceState::Failed(_)))
        .map(|s| s.name.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the report was written, but these failed: {}",
            failed.join(", ")
        )
        .into())
    }
}

/// What stdout gets: where the files are, what did not run, and the seed table last.
fn closing(report: &Report, paths: &[PathBuf]) -> String {
    let m = &report.meta;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "vmmu report: {} records in {:.0} s ({} CPUs, {} GiB slots{}, median of {} runs)",
        report.records.len(),
        m.seconds,
        m.cpus,
        m.mem_gib,
        if m.quick { ", quick" } else { "" },
        m.runs
    );
    for p in paths {
        let _ = writeln!(s, "  wrote {}", p.display());
    }
    for src in &report.sources {
        match &src.state {
            SourceState::Ok => {}
            SourceState::Skipped(why) => {
                let _ = writeln!(s, "  {}: {why}", src.name);
            }
            SourceState::Failed(why) => {
                let _ = writeln!(s, "  {}: FAILED: {why}", src.name);
            }
        }
    }
    s.push('\n');
    s.push_str(&seed_table(&report.seeds));
    s
}

/// The seed summary as an aligned text table.
fn seed_table(rows: &[SeedRow]) -> String {
    let header = ["seed", "claim", "variants compared", "measured", "held"];
    let body: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.seed.to_owned(),
                r.claim.to_owned(),
                r.pair.clone(),
                r.measured.clone(),
                r.verdict.to_string(),
            ]
        })
        .collect();
    let mut w = header.map(str::len);
    for row in &body {
        for (w, c) in w.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for row in std::iter::once(&header.map(String::from)).chain(&body) {
        let cells: Vec<String> = row.iter().zip(w).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(s, "{}", cells.join("  ").trim_end());
    }
    s
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("vmmu {}", args.join(" "))
}

/// `2026-11-21 05:45 UTC`, from the system clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Progress on stderr: a bar over every run of every source on a terminal; elsewhere one
/// line per finished source, so a log shows how long each took.
struct Progress {
    bar: ProgressBar,
    live: bool,
}

impl Progress {
    fn new(steps: u64) -> Self {
        let live = io::stderr().is_terminal();
        let bar = if live {
            let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} vmmu report [{elapsed_precise}] [{bar:30}] {pos}/{len} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        } else {
            ProgressBar::hidden()
        };
        Progress { bar, live }
    }

    fn at(&self, pos: u64, msg: &str) {
        self.bar.set_position(pos);
        self.bar.set_message(msg.to_owned());
    }

    fn done(&self, name: &str, state: &SourceState, seconds: f64) {
        let line = match state {
            SourceState::Ok => format!("{name}: {seconds:.1} s"),
            SourceState::Skipped(why) => format!("{name}: {why}"),
            SourceState::Failed(why) => format!("{name}: FAILED after {seconds:.1} s: {why}"),
        };
        if self.live {
            self.bar.println(line);
        } else {
            eprintln!("vmmu report: {line}");
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registered scenarios with no figure of their own: the report shows their tables
    /// under "Other measurements". A scenario added to the registry gets a figure or is
    /// listed here. The floor is drawn in the figures it bounds and tabled at the end.
    const WITHOUT_FIGURE: [&str; 4] = [
        names::floor::NAME,
        names::memory::NAME,
        names::shadow_ctxsw::NAME,
        names::shadow_pt_churn::NAME,
    ];

    #[test]
    fn every_registered_scenario_has_a_figure_or_is_listed() {
        let figures = figures::figures(&[], None, false);
        let in_figure = |name: &str| {
            figures
                .iter()
                .any(|f| f.tables.iter().any(|(s, _)| *s == name))
        };
        for s in bench::SCENARIOS {
            match (in_figure(s.name), WITHOUT_FIGURE.contains(&s.name)) {
                (true, false) | (false, true) => {}
                (false, false) => panic!(
                    "{}: registered, but no figure shows its tables and WITHOUT_FIGURE \
                     does not list it",
                    s.name
                ),
                (true, true) => panic!("{}: has a figure, but WITHOUT_FIGURE lists it", s.name),
            }
        }
        for name in WITHOUT_FIGURE {
            assert!(
                registered(name),
                "{name}: in WITHOUT_FIGURE, not registered"
            );
        }
        for (name, _) in PENDING {
            assert!(
                !registered(name),
                "{name}: registered, so no longer pending"
            );
        }
        for name in QUICK_IN_REPORT {
            assert!(
                registered(name),
                "{name}: in QUICK_IN_REPORT, not registered"
            );
        }
        // Every figure's tables name a scenario some source reports.
        for f in &figures {
            for (s, _) in &f.tables {
                assert!(
                    registered(s) || *s == kvm::NAME,
                    "figure {}: no source reports {s}",
                    f.id
                );
            }
        }
    }

    #[test]
    fn adaptive_runs_are_odd_and_bounded() {
        assert_eq!(adaptive_runs(Duration::from_secs(3)), MIN_RUNS);
        assert_eq!(adaptive_runs(Duration::from_micros(1)), MAX_RUNS);
        assert_eq!(adaptive_runs(Duration::from_millis(200)), 11);
        assert_eq!(adaptive_runs(Duration::from_millis(250)), 9);
    }

    #[test]
    fn dates_are_civil() {
        let d = utc_now();
        assert!(
            d.ends_with(" UTC") && d.len() == "2026-11-21 05:45 UTC".len(),
            "{d}"
        );
    }

    #[test]
    fn seed_table_is_aligned_and_last_column_is_held() {
        let rows = summary::seeds(&[]);
        let t = seed_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[0].starts_with("seed") && lines[0].ends_with("held"));
        assert!(lines[1].starts_with("000") && lines[1].ends_with("no data"));
    }

    #[test]
    fn sources_serialize_with_status_and_reason() {
        let s = Source {
            name: "kvm-compare".into(),
            state: SourceState::Skipped("skipped: cannot open /dev/kvm".into()),
            runs: 0,
            records: 0,
            seconds: 0.0,
            ruler: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"]["status"], "skipped");
        assert_eq!(v["state"]["reason"], "skipped: cannot open /dev/kvm");
    }
}
