//! `vmmu perf access-tracking`: `access_tracking_perf_test`.
//!
//! The selftest's flags and defaults: `-v` vCPUs (1), `-b` bytes per vCPU (1G), `-s`
//! backing. Its phases, each vCPU on its own thread over its own memory: populating
//! memory (writes), writing to populated memory, reading from populated memory, marking
//! memory idle, writing to idle memory, reading from idle memory. Marking idle is the
//! host's aging: the selftest writes `/sys/kernel/mm/page_idle/bitmap`, which reaches
//! KVM's `clear_young` through the MMU notifier; here vmmu's `age_hva_range` over each
//! vCPU's memory, from the host thread. After the idle writes, the idle-page check: how
//! many of each vCPU's pages are still idle (no young SPTE). As on KVM for x86,
//! `clear_young` does not flush the TLB, so a page whose translation stayed cached is
//! accessed without setting its accessed bit and still reads idle (the selftest only
//! warns then).

use clap::Args;
use serde_json::json;

use crate::bench::names::perf::access_tracking as names;

use super::access::{Accesses, Pattern};
use super::dirty_log::each;
use super::output::Out;
use super::side::Layout;
use super::{check_memory, measure, open_sides, parse_size, parse_vcpus, BackingArg};
use super::{CommonArgs, PerfError};

/// `vmmu perf access-tracking` arguments: `access_tracking_perf_test`'s.
#[derive(Args, Debug, Clone)]
pub struct AccessTrackingArgs {
    /// Number of vCPUs, each on its own thread.
    #[arg(short = 'v', default_value = "1", value_parser = parse_vcpus)]
    pub vcpus: u32,

    /// Memory each vCPU accesses, e.g. 10M or 3G.
    #[arg(short = 'b', default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,

    /// Backing of the test memory.
    #[arg(short = 's', value_enum, default_value_t = BackingArg::Anonymous)]
    pub backing: BackingArg,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl AccessTrackingArgs {
    /// The layout both sides build.
    pub fn layout(&self) -> Layout {
        Layout {
            vcpus: self.vcpus,
            bytes_per_vcpu: self.bytes,
            slots: 1,
            backing: self.backing,
            manual_protect: false,
            initially_set: false,
        }
    }

    /// The flags, as the records' `params`.
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        crate::bench::params([
            ("v", json!(self.vcpus)),
            ("b", json!(self.bytes)),
            ("s", json!(self.backing.name())),
            ("mmu", json!(self.common.mmu.name())),
        ])
    }
}

/// Run the test.
pub fn run(args: &AccessTrackingArgs) -> Result<(), PerfError> {
    if args.bytes == 0 || !args.bytes.is_multiple_of(4096) {
        return Err(PerfError::Usage(format!(
            "-b {}: the memory per vCPU must be a nonzero multiple of 4096 bytes",
            args.bytes
        )));
    }
    let layout = args.layout();
    check_memory(&layout, args.common.target, super::mem_available())?;
    let mut out = Out::new(names::NAME, args.common.json, args.params());
    run_with(args, &layout, &mut out)?;
    out.finish()
        .map_err(|e| PerfError::side("output", e.to_string()))
}

/// The test on the sides `args` asks for, printed into `out`.
pub fn run_with(
    args: &AccessTrackingArgs,
    layout: &Layout,
    out: &mut Out,
) -> Result<(), PerfError> {
    let mut sides = open_sides(layout, &args.common, layout.vcpu_pages(), out)?;
    let pattern = |write_percent| Pattern {
        write_percent,
        random: false,
        overlap: false,
    };
    let writes = Accesses::new(1, layout.vcpus).lists(layout, pattern(100));
    let reads = Accesses::new(1, layout.vcpus).lists(layout, pattern(0));
    let ranges: Vec<(u64, u64)> = (0..layout.vcpus)
        .map(|i| {
            let (gpa, pages) = Accesses::range(layout, pattern(100), i);
            (gpa, pages * 4096)
        })
        .collect();
    let r = each(&mut sides, |s| s.run(&writes))?;
    out.phase("Populating memory", names::POPULATING_MEMORY, None, &r);
    let r = each(&mut sides, |s| s.run(&writes))?;
    out.phase(
        "Writing to populated memory",
        names::WRITING_POPULATED,
        None,
        &r,
    );
    let r = each(&mut sides, |s| s.run(&reads))?;
    out.phase(
        "Reading from populated memory",
        names::READING_POPULATED,
        None,
        &r,
    );
    for (write, text, metric) in [
        (true, "Writing to idle memory", names::WRITING_IDLE),
        (false, "Reading from idle memory", names::READING_IDLE),
    ] {
        let marked = mark_idle(&mut sides, &ranges, out)?;
        let lists = if write { &writes } else { &reads };
        let r = each(&mut sides, |s| s.run(lists))?;
        out.phase(text, metric, None, &r);
        for &k in &marked {
            let s = &sides[k];
            for (i, &(gpa, size)) in ranges.iter().enumerate() {
                let idle = s.idle_pages(gpa, size)?;
                out.line(&format!(
                    "[{}] vCPU{i}: idle pages: {idle}/{}",
                    s.label(),
                    size / 4096
                ));
            }
        }
    }
    Ok(())
}

/// The "Mark memory idle" phase on every side that can; the sides that did.
fn mark_idle(
    sides: &mut [Box<dyn super::side::Side>],
    ranges: &[(u64, u64)],
    out: &mut Out,
) -> Result<Vec<usize>, PerfError> {
    let mut marked = Vec::new();
    let mut results = Vec::new();
    for (k, s) in sides.iter_mut().enumerate() {
        match measure(s.as_mut(), |s| s.mark_idle(ranges)) {
            Ok(r) => {
                results.push(r);
                marked.push(k);
            }
            Err(PerfError::Unsupported(why)) => {
                out.line(&format!("[{}] Mark memory idle: skipped: {why}", s.label()));
            }
            Err(e) => return Err(e),
        }
    }
    out.phase("Mark memory idle", names::MARK_IDLE, None, &results);
    Ok(marked)
}
