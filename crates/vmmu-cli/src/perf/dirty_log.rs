//! `vmmu perf dirty-log`: `dirty_log_perf_test`.
//!
//! The selftest's flags and defaults: `-v` vCPUs (1), `-b` bytes per vCPU (1G), `-i`
//! iterations (2, at least 2), `-g` (no `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: GET clears
//! and protects, and logging starts write-protected; without `-g`, manual protect with
//! `KVM_DIRTY_LOG_INITIALLY_SET` where the host offers it), `-s` backing, `-x` memslots
//! (1), `-w` write percentage (100), `-a` random access, `-o` overlapping vCPU memory,
//! `-e` vCPUs keep running while logging is disabled, `-r` seed (1).
//!
//! Its phases and lines: the vCPUs populate memory (every page written, in order);
//! dirty logging is enabled on every slot; then per iteration the vCPUs dirty memory (one
//! pass each, with `-w`/`-a`/`-o`), GET_DIRTY_LOG of every slot and, with manual
//! protect, CLEAR_DIRTY_LOG of every slot with the bitmap just read; logging is
//! disabled; the totals over the iterations. Each vCPU is a thread; a phase that runs the
//! vCPUs is timed from their common start until the last one finished, as the selftest
//! times it from bumping the iteration until every vCPU reported it. Where both sides ran,
//! each iteration's bitmaps are compared and the line says whether they are identical
//! (the same accesses ran; KVM also logs a page a *read* fault mapped writable, which the
//! test's flow never does: every page is mapped by the populate pass).

use std::time::Duration;

use clap::Args;

use crate::bench::names::perf::dirty_log as names;
use serde_json::json;

use super::access::{Accesses, Pattern};
use super::output::Out;
use super::side::{Layout, Side};
use super::{check_memory, measure, open_sides, parse_size, parse_vcpus, BackingArg};
use super::{CommonArgs, PerfError};

/// `vmmu perf dirty-log` arguments: `dirty_log_perf_test`'s.
#[derive(Args, Debug, Clone)]
pub struct DirtyLogArgs {
    /// Number of vCPUs, each on its own thread (1..=512).
    #[arg(short = 'v', default_value = "1", value_parser = parse_vcpus)]
    pub vcpus: u32,

    /// Memory each vCPU dirties, e.g. 10M or 3G.
    #[arg(short = 'b', default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,

    /// Iterations (at least 2, as the selftest asserts).
    #[arg(short = 'i', default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub iterations: u32,

    /// Do not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG clears the log, and
    /// writes are tracked as soon as logging is enabled (no KVM_DIRTY_LOG_INITIALLY_SET).
    #[arg(short = 'g')]
    pub no_manual_protect: bool,

    /// Backing of the test memory.
    #[arg(short = 's', value_enum, default_value_t = BackingArg::Anonymous)]
    pub backing: BackingArg,

    /// Split the memory into this many memslots (1..=512).
    #[arg(short = 'x', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub slots: u32,

    /// Percentage of accesses that write, 0..=100 (the rest read).
    #[arg(short = 'w', default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub write_percent: u32,

    /// Access memory randomly rather than in order.
    #[arg(short = 'a')]
    pub random: bool,

    /// Overlap the vCPUs' accesses instead of giving each its own region.
    #[arg(short = 'o')]
    pub overlap: bool,

    /// Run the vCPUs while dirty logging is being disabled.
    #[arg(short = 'e')]
    pub run_while_disabling: bool,

    /// The starting random seed (positive).
    #[arg(short = 'r', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub seed: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl DirtyLogArgs {
    /// The layout both sides build.
    pub fn layout(&self) -> Layout {
        Layout {
            vcpus: self.vcpus,
            bytes_per_vcpu: self.bytes,
            slots: self.slots,
            backing: self.backing,
            manual_protect: !self.no_manual_protect,
            initially_set: !self.no_manual_protect,
        }
    }

    /// The flags, as the records' `params`.
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        crate::bench::params([
            ("v", json!(self.vcpus)),
            ("b", json!(self.bytes)),
            ("i", json!(self.iterations)),
            ("g", json!(self.no_manual_protect)),
            ("s", json!(self.backing.name())),
            ("x", json!(self.slots)),
            ("w", json!(self.write_percent)),
            ("a", json!(self.random)),
            ("o", json!(self.overlap)),
            ("e", json!(self.run_while_disabling)),
            ("r", json!(self.seed)),
            ("mmu", json!(self.common.mmu.name())),
        ])
    }

    fn check(&self) -> Result<(), PerfError> {
        if !self.bytes.is_multiple_of(4096) || self.bytes == 0 {
            return Err(PerfError::Usage(format!(
                "-b {}: the memory per vCPU must be a nonzero multiple of 4096 bytes",
                self.bytes
            )));
        }
        Ok(())
    }
}

/// Run the test.
pub fn run(args: &DirtyLogArgs) -> Result<(), PerfError> {
    args.check()?;
    let layout = args.layout();
    check_memory(&layout, args.common.target, super::mem_available())?;
    let mut out = Out::new(names::NAME, args.common.json, args.params());
    run_with(args, &layout, &mut out)?;
    out.finish()
        .map_err(|e| PerfError::side("output", e.to_string()))
}

/// The test on the sides `args` asks for, printed into `out`.
pub fn run_with(args: &DirtyLogArgs, layout: &Layout, out: &mut Out) -> Result<(), PerfError> {
    let pattern = Pattern {
        write_percent: args.write_percent,
        random: args.random,
        overlap: args.overlap,
    };
    let list_entries = Accesses::range(layout, pattern, 0).1;
    out.line(&format!("Test iterations: {}", args.iterations));
    out.line(&format!(
        "guest physical test memory: [{:#x}, {:#x})",
        super::side::DATA_GPA,
        super::side::DATA_GPA + layout.data_bytes()
    ));
    let mut sides = open_sides(layout, &args.common, list_entries, out)?;
    if sides.is_empty() {
        return Err(PerfError::Unsupported("no side to run on".into()));
    }

    let populate = Accesses::new(args.seed, layout.vcpus).lists(layout, Pattern::POPULATE);
    let r = each(&mut sides, |s| s.run(&populate))?;
    out.phase("Populate memory", names::POPULATE_MEMORY, None, &r);
    drop(populate);

    let r = each(&mut sides, |s| s.set_logging(true, false))?;
    out.phase(
        "Enabling dirty logging",
        names::ENABLING_DIRTY_LOGGING,
        None,
        &r,
    );
    out.line("");

    let words = layout.slot_pages().div_ceil(64) as usize;
    let mut bitmaps: Vec<Vec<Vec<u64>>> =
        vec![vec![vec![0u64; words]; layout.slots as usize]; sides.len()];
    let mut get_total = vec![Duration::ZERO; sides.len()];
    let mut clear_total = vec![Duration::ZERO; sides.len()];
    let mut accesses = Accesses::new(args.seed, layout.vcpus);
    for it in 1..=args.iterations {
        let lists = accesses.lists(layout, pattern);
        let r = each(&mut sides, |s| s.run(&lists))?;
        out.phase(
            &format!("Iteration {it} dirty memory"),
            names::DIRTY_MEMORY,
            Some(it),
            &r,
        );
        let r = each_indexed(&mut sides, |k, s| {
            timed(|| {
                for (i, b) in bitmaps[k].iter_mut().enumerate() {
                    s.get_dirty_log(i, b)?;
                }
                Ok(())
            })
        })?;
        for (k, (_, d, _)) in r.iter().enumerate() {
            get_total[k] += *d;
        }
        out.phase(
            &format!("Iteration {it} get dirty log"),
            names::GET_DIRTY_LOG,
            Some(it),
            &r,
        );
        if layout.manual_protect {
            let r = each_indexed(&mut sides, |k, s| {
                timed(|| {
                    for (i, b) in bitmaps[k].iter().enumerate() {
                        s.clear_dirty_log(i, b)?;
                    }
                    Ok(())
                })
            })?;
            for (k, (_, d, _)) in r.iter().enumerate() {
                clear_total[k] += *d;
            }
            out.phase(
                &format!("Iteration {it} clear dirty log"),
                names::CLEAR_DIRTY_LOG,
                Some(it),
                &r,
            );
        }
        if sides.len() == 2 {
            let same = bitmaps[0] == bitmaps[1];
            let pages: u64 = bitmaps[0]
                .iter()
                .flatten()
                .map(|w| u64::from(w.count_ones()))
                .sum();
            out.line(&format!(
                "Iteration {it} dirty bitmaps: {} ({pages} pages dirty on {})",
                if same {
                    "identical on both sides"
                } else {
                    "DIFFER between the sides"
                },
                sides[0].label()
            ));
        }
    }
    // With -e the vCPUs keep running their last pass while logging is disabled.
    let e = args.run_while_disabling;
    let r = each(&mut sides, |s| s.set_logging(false, e))?;
    out.phase(
        "Disabling dirty logging",
        names::DISABLING_DIRTY_LOGGING,
        None,
        &r,
    );

    let labels: Vec<String> = sides.iter().map(|s| s.label()).collect();
    let totals = |t: &[Duration]| -> Vec<(String, Duration)> {
        labels.iter().cloned().zip(t.iter().copied()).collect()
    };
    out.total(
        "Get dirty log",
        names::GET_DIRTY_LOG_TOTAL,
        args.iterations,
        &totals(&get_total),
    );
    if layout.manual_protect {
        out.total(
            "Clear dirty log",
            names::CLEAR_DIRTY_LOG_TOTAL,
            args.iterations,
            &totals(&clear_total),
        );
    }
    Ok(())
}

/// Time `f`.
fn timed(f: impl FnOnce() -> Result<(), PerfError>) -> Result<Duration, PerfError> {
    let start = std::time::Instant::now();
    f()?;
    Ok(start.elapsed())
}

type PhaseResult = (String, Duration, super::side::Delta);

/// Run a phase on every side in turn, with its counters.
pub fn each(
    sides: &mut [Box<dyn Side>],
    mut f: impl FnMut(&mut dyn Side) -> Result<Duration, PerfError>,
) -> Result<Vec<PhaseResult>, PerfError> {
    sides
        .iter_mut()
        .map(|s| measure(s.as_mut(), &mut f))
        .collect()
}

/// [`each`], telling `f` which side it runs on.
pub fn each_indexed(
    sides: &mut [Box<dyn Side>],
    mut f: impl FnMut(usize, &mut dyn Side) -> Result<Duration, PerfError>,
) -> Result<Vec<PhaseResult>, PerfError> {
    sides
        .iter_mut()
        .enumerate()
        .map(|(k, s)| measure(s.as_mut(), |s| f(k, s)))
        .collect()
}
