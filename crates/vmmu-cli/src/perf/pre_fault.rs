//! `vmmu perf pre-fault`: `pre_fault_memory_test`'s workload as a measurement.
//!
//! The selftest pre-faults a slot with `KVM_PRE_FAULT_MEMORY` (whole, partly past the
//! slot's end, wholly outside it; with the slot deleted and recreated under it), then has
//! the guest read the memory. Here every vCPU (`-v`, each on its own thread) pre-faults
//! its own `-b` bytes (default 1G) in parallel — vmmu's `Vm::pre_fault_memory`, KVM's
//! ioctl where the host offers it (`KVM_CAP_PRE_FAULT_MEMORY`: only on KVM's TDP MMU;
//! otherwise the line says so) — then every vCPU reads its memory once. The second phase
//! shows what the first saved: after a complete pre-fault the reads take no fault.
//! (Pre-faulting is not a guest exit: vmmu's fault count does not grow during it.) The
//! selftest's error cases and the memslot race are `crates/vmmu/tests/pre_fault.rs`.

use clap::Args;

use crate::bench::names::perf::pre_fault as names;
use serde_json::json;

use super::access::{Accesses, Pattern};
use super::dirty_log::each;
use super::output::Out;
use super::side::Layout;
use super::{check_memory, measure, open_sides, parse_size, parse_vcpus, BackingArg};
use super::{CommonArgs, PerfError};

/// `vmmu perf pre-fault` arguments.
#[derive(Args, Debug, Clone)]
pub struct PreFaultArgs {
    /// Number of vCPUs, each on its own thread, each pre-faulting its own memory.
    #[arg(short = 'v', default_value = "1", value_parser = parse_vcpus)]
    pub vcpus: u32,

    /// Memory each vCPU pre-faults, e.g. 10M or 3G.
    #[arg(short = 'b', default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,

    /// Backing of the test memory.
    #[arg(short = 's', value_enum, default_value_t = BackingArg::Anonymous)]
    pub backing: BackingArg,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl PreFaultArgs {
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
pub fn run(args: &PreFaultArgs) -> Result<(), PerfError> {
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
pub fn run_with(args: &PreFaultArgs, layout: &Layout, out: &mut Out) -> Result<(), PerfError> {
    let mut sides = open_sides(layout, &args.common, layout.vcpu_pages(), out)?;
    let ranges: Vec<Option<(u64, u64)>> = (0..layout.vcpus)
        .map(|i| {
            let (gpa, pages) = Accesses::range(layout, Pattern::POPULATE, i);
            Some((gpa, pages * 4096))
        })
        .collect();
    let mut results = Vec::new();
    for s in sides.iter_mut() {
        match measure(s.as_mut(), |s| s.pre_fault(&ranges)) {
            Ok(r) => results.push(r),
            Err(PerfError::Unsupported(why)) => {
                out.line(&format!("[{}] Pre-fault memory: skipped: {why}", s.label()));
            }
            Err(e) => return Err(e),
        }
    }
    out.phase("Pre-fault memory", names::PRE_FAULT_MEMORY, None, &results);
    let reads = Pattern {
        write_percent: 0,
        random: false,
        overlap: false,
    };
    let lists = Accesses::new(1, layout.vcpus).lists(layout, reads);
    let r = each(&mut sides, |s| s.run(&lists))?;
    out.phase("Read pre-faulted memory", names::READ_MEMORY, None, &r);
    Ok(())
}
