//! `vmmu perf memslot`: `memslot_perf_test`.
//!
//! The selftest's flags: `-s` cap on the memslots the test memory (512 MiB) is split into
//! (here 32 by default; the selftest's default is as many as the host allows, thousands,
//! which the KVM side here, one populated mapping per slot, cannot set up in seconds),
//! `-l` seconds per test (5), `-r` runs per test (1), `-f`/`-e` the first and last test
//! (0..=5). One vCPU (the selftest's). Its tests, each on a fresh VM whose slot setup is
//! timed, each iteration repeated until `-l` seconds have passed:
//!
//! - 0 `map`: the host drops all the test memory (`MADV_DONTNEED` on KVM, the notifier's
//!   `unmap_hva_range` on vmmu), then the guest writes every page, faulting it back;
//! - 1 `unmap`: the guest writes every page, then the host drops it all in one call (an
//!   iteration is both);
//! - 2 `unmap chunked`: the same, dropped 2 MiB a call;
//! - 3 `move active area`: the host moves the last slot away and back while the guest
//!   keeps writing all of the memory (its writes to the slot exit to MMIO while it is
//!   away; KVM side: this guest's loop cannot take those exits, the line says so);
//! - 4 `move inactive area`: the same while the guest writes every slot but that one;
//! - 5 `RW`: the guest writes, then reads, every page.
//!
//! Lines as the selftest prints them, per side: `Test took Xs for slot setup + Ys all
//! iterations`, `Done N iterations, avg Zs each`, `Best runtime result was Zs per
//! iteration (with N iterations)`, and at the end the best slot setup time.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::bench::names::perf::memslot as names;

use super::access::{Accesses, Pattern};
use super::output::{timespec, Out};
use super::side::{Delta, Layout, Side, DATA_GPA, WRITE};
use super::{check_memory, open_sides, BackingArg, CommonArgs, PerfError, Target};

/// The test memory, as the selftest sizes it (512 MiB).
const MEM_BYTES: u64 = 512 << 20;
/// Where the moved slot goes: above any test memory the layout maps.
const AWAY_GPA: u64 = DATA_GPA + (64 << 30);

/// The tests, in the selftest's order.
const TESTS: [&str; 6] = [
    "map",
    "unmap",
    "unmap chunked",
    "move active area",
    "move inactive area",
    "RW",
];

/// `vmmu perf memslot` arguments: `memslot_perf_test`'s.
#[derive(Args, Debug, Clone)]
pub struct MemslotArgs {
    /// Most memslots the 512 MiB of test memory is split into (a power of two, 2..=512).
    #[arg(short = 's', default_value_t = 32, value_parser = parse_slots)]
    pub slots: u32,

    /// Seconds each test runs (1..=3600).
    #[arg(short = 'l', default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub seconds: u32,

    /// Runs of each test; the best is reported (1..=100).
    #[arg(short = 'r', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,

    /// First test to run (0..=5).
    #[arg(short = 'f', default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=5))]
    pub first: u32,

    /// Last test to run (0..=5).
    #[arg(short = 'e', default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=5))]
    pub last: u32,

    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_slots(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of memslots"))?;
    if !(2..=512).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "the memslot cap must be a power of two from 2 to 512, not {n}"
        ));
    }
    Ok(n)
}

impl MemslotArgs {
    /// The layout both sides build.
    pub fn layout(&self) -> Layout {
        self.layout_of(MEM_BYTES)
    }

    /// The layout with `bytes` of test memory instead of the selftest's 512 MiB.
    pub fn layout_of(&self, bytes: u64) -> Layout {
        Layout {
            vcpus: 1,
            bytes_per_vcpu: bytes,
            slots: self.slots,
            backing: BackingArg::Anonymous,
            manual_protect: false,
            initially_set: false,
        }
    }

    /// The flags, as the records' `params`.
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        crate::bench::params([
            ("s", json!(self.slots)),
            ("l", json!(self.seconds)),
            ("r", json!(self.runs)),
            ("mmu", json!(self.common.mmu.name())),
        ])
    }
}

/// Run the test.
pub fn run(args: &MemslotArgs) -> Result<(), PerfError> {
    if args.first > args.last {
        return Err(PerfError::Usage(format!(
            "-f {} is after -e {}: the first test must not come after the last",
            args.first, args.last
        )));
    }
    let layout = args.layout();
    check_memory(&layout, args.common.target, super::mem_available())?;
    let mut out = Out::new(names::NAME, args.common.json, args.params());
    let budget = Duration::from_secs(u64::from(args.seconds));
    run_with(args, &layout, budget, &mut out)?;
    out.finish()
        .map_err(|e| PerfError::side("output", e.to_string()))
}

/// Every page written, optionally without the last slot.
fn writes(layout: &Layout, skip_last_slot: bool) -> Vec<Vec<u64>> {
    let mut l = Accesses::new(1, 1).lists(layout, Pattern::POPULATE);
    if skip_last_slot {
        let end = DATA_GPA + layout.data_bytes() - layout.slot_bytes();
        l[0].retain(|&e| e & !WRITE < end);
    }
    l
}

/// One iteration of test `t` on `side`; `(iterations, time)` (a move test counts its
/// moves there and back, each an iteration, in one call).
fn iterate(
    t: usize,
    side: &mut dyn Side,
    layout: &Layout,
    budget: Duration,
) -> Result<(u64, Duration), PerfError> {
    let all = (DATA_GPA, layout.data_bytes());
    let last = layout.slots as usize - 1;
    match t {
        0 => {
            let d = side.discard(all.0, all.1, all.1)?;
            Ok((1, d + side.run(&writes(layout, false))?))
        }
        1 | 2 => {
            let w = side.run(&writes(layout, false))?;
            let chunk = if t == 1 { all.1 } else { 2 << 20 };
            Ok((1, w + side.discard(all.0, all.1, chunk)?))
        }
        3 | 4 => {
            side.run(&writes(layout, t == 4))?;
            side.move_slot_while_running(last, AWAY_GPA, budget, t == 3)
        }
        _ => {
            let w = writes(layout, false);
            let r: Vec<Vec<u64>> = w
                .iter()
                .map(|l| l.iter().map(|e| e & !WRITE).collect())
                .collect();
            Ok((1, side.run(&w)? + side.run(&r)?))
        }
    }
}

/// The test on the sides `args` asks for, each test running for `budget` (`-l`, or less
/// for a bench scenario), printed into `out`.
pub fn run_with(
    args: &MemslotArgs,
    layout: &Layout,
    budget: Duration,
    out: &mut Out,
) -> Result<(), PerfError> {
    let targets: Vec<Target> = match args.common.target {
        Target::Both => vec![Target::Vmmu, Target::Kvm],
        t => vec![t],
    };
    let mut best_setup: Vec<(String, Duration)> = Vec::new();
    let (first, last) = (args.first as usize, args.last as usize);
    for (t, name) in TESTS.iter().enumerate().take(last + 1).skip(first) {
        if t > first {
            out.line("");
        }
        out.line(&format!(
            "Testing {name} performance with {} runs, {} seconds each",
            args.runs, args.seconds
        ));
        let mut best: Vec<(String, Duration, Delta)> = Vec::new();
        for &target in &targets {
            let common = CommonArgs {
                target,
                ..args.common
            };
            for _ in 0..args.runs {
                let start = Instant::now();
                let mut sides = match open_sides(layout, &common, layout.vcpu_pages(), out) {
                    Ok(s) => s,
                    Err(PerfError::Unsupported(why)) if args.common.target == Target::Both => {
                        out.line(&format!("[kvm] skipped: {why}"));
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let setup = start.elapsed();
                let Some(side) = sides.first_mut() else {
                    break;
                };
                let label = side.label();
                let before = side.counters();
                let mut n = 0u64;
                let mut total = Duration::ZERO;
                let mut skipped = None;
                while total < budget {
                    match iterate(t, side.as_mut(), layout, budget) {
                        Ok((k, d)) => {
                            n += k;
                            total += d;
                        }
                        Err(PerfError::Unsupported(why)) => {
                            skipped = Some(why);
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                if let Some(why) = skipped {
                    out.line(&format!("[{label}] {name}: skipped: {why}"));
                    break;
                }
                let delta = side.counters().delta(&before);
                out.line(&format!(
                    "[{label}] Test took {} for slot setup + {} all iterations",
                    timespec(setup),
                    timespec(total)
                ));
                let avg = total / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
                out.line(&format!(
                    "[{label}] Done {n} iterations, avg {} each",
                    timespec(avg)
                ));
                match best_setup.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, b)) => *b = (*b).min(setup),
                    None => best_setup.push((label.clone(), setup)),
                }
                match best.iter_mut().find(|(l, _, _)| *l == label) {
                    Some(b) if b.1 <= avg => {}
                    Some(b) => *b = (label.clone(), avg, delta),
                    None => best.push((label.clone(), avg, delta)),
                }
            }
        }
        for (label, avg, _) in &best {
            out.line(&format!(
                "[{label}] Best runtime result was {} per iteration",
                timespec(*avg)
            ));
        }
        out.phase(
            &format!("{name}: best per iteration"),
            names::METRICS[t],
            None,
            &best,
        );
    }
    let per_side: Vec<(String, Duration, Delta)> = best_setup
        .into_iter()
        .map(|(l, d)| (l, d, Delta::default()))
        .collect();
    out.phase(
        "Best slot setup time for the whole test area",
        names::SLOT_SETUP,
        None,
        &per_side,
    );
    Ok(())
}
