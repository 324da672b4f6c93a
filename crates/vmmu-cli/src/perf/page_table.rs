//! `vmmu perf page-table`: `kvm_page_table_test`.
//!
//! The selftest's flags and defaults: `-b` size of the test memory in all (1G, split
//! evenly between the vCPUs), `-v` vCPUs (1), `-s` backing (`anonymous`). Its three
//! stages and lines, each vCPU on its own thread touching its own part once per host page
//! of the backing (4 KiB for `anonymous`, 2 MiB for THP and hugetlb), as the selftest's
//! guest strides by the backing's page size:
//!
//! - `KVM_CREATE_MAPPINGS`: first touch (a write): the MMU creates the mappings, huge
//!   where the backing allows;
//! - `KVM_UPDATE_MAPPINGS`: dirty logging is enabled on the slot (untimed, as in the
//!   selftest), then the same writes: huge mappings were split (vmmu's TDP MMU splits
//!   eagerly when logging starts, KVM's shadow MMU zaps them) and the writes fault on the
//!   write-protected 4 KiB mappings;
//! - `KVM_ADJUST_MAPPINGS`: logging is disabled (untimed), then a read per host page: the
//!   huge mappings come back (vmmu's TDP MMU rebuilt them in place when logging stopped;
//!   KVM's shadow MMU zapped the 4 KiB ones and faults them back huge).
//!
//! The counters under each line say which (faults, flushes, split / rebuilt); the two
//! untimed toggles get lines of their own, `(enable dirty logging)` and `(disable dirty
//! logging)`, so what they did to the mappings shows.

use clap::Args;

use crate::bench::names::perf::page_table as names;
use serde_json::json;

use super::access::{Accesses, Pattern};
use super::dirty_log::each;
use super::output::Out;
use super::side::{Layout, WRITE};
use super::{check_memory, open_sides, parse_size, parse_vcpus, BackingArg};
use super::{CommonArgs, PerfError};

/// `vmmu perf page-table` arguments: `kvm_page_table_test`'s.
#[derive(Args, Debug, Clone)]
pub struct PageTableArgs {
    /// Size of the test memory in all, split evenly between the vCPUs, e.g. 10M or 3G.
    #[arg(short = 'b', default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,

    /// Number of vCPUs, each on its own thread.
    #[arg(short = 'v', default_value = "1", value_parser = parse_vcpus)]
    pub vcpus: u32,

    /// Backing of the test memory.
    #[arg(short = 's', value_enum, default_value_t = BackingArg::Anonymous)]
    pub backing: BackingArg,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl PageTableArgs {
    fn host_page(&self) -> u64 {
        match self.backing {
            BackingArg::Anonymous => 4096,
            BackingArg::AnonymousThp | BackingArg::AnonymousHugetlb => 2 << 20,
            BackingArg::AnonymousHugetlb1gb => 1 << 30,
        }
    }

    /// The layout both sides build (the memory split evenly between the vCPUs).
    pub fn layout(&self) -> Layout {
        Layout {
            vcpus: self.vcpus,
            bytes_per_vcpu: self.bytes / u64::from(self.vcpus),
            slots: 1,
            backing: self.backing,
            manual_protect: false,
            initially_set: false,
        }
    }

    /// The flags, as the records' `params`.
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        crate::bench::params([
            ("b", json!(self.bytes)),
            ("v", json!(self.vcpus)),
            ("s", json!(self.backing.name())),
            ("mmu", json!(self.common.mmu.name())),
        ])
    }
}

/// One access per host page of each vCPU's part.
fn lists(layout: &Layout, stride: u64, write: bool) -> Vec<Vec<u64>> {
    (0..layout.vcpus)
        .map(|i| {
            let (base, pages) = Accesses::range(layout, Pattern::POPULATE, i);
            (0..pages * 4096)
                .step_by(stride as usize)
                .map(|off| (base + off) | if write { WRITE } else { 0 })
                .collect()
        })
        .collect()
}

/// Run the test.
pub fn run(args: &PageTableArgs) -> Result<(), PerfError> {
    let unit = u64::from(args.vcpus) * args.host_page();
    if args.bytes == 0 || !args.bytes.is_multiple_of(unit) {
        return Err(PerfError::Usage(format!(
            "-b {}: the test memory must split into {} vCPU parts of whole {} KiB host pages",
            args.bytes,
            args.vcpus,
            args.host_page() >> 10
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
pub fn run_with(args: &PageTableArgs, layout: &Layout, out: &mut Out) -> Result<(), PerfError> {
    let stride = args.host_page();
    out.line(&format!(
        "Testing memory backing src type: {}",
        args.backing.name()
    ));
    out.line(&format!(
        "Testing memory backing src granularity: {stride:#x}"
    ));
    out.line(&format!(
        "Testing memory size(aligned): {:#x}",
        layout.data_bytes()
    ));
    out.line(&format!(
        "Guest physical test memory offset: {:#x}",
        super::side::DATA_GPA
    ));
    out.line(&format!("Number of testing vCPUs: {}", layout.vcpus));
    let per_vcpu = layout.vcpu_pages() * 4096 / stride;
    let mut sides = open_sides(layout, &args.common, per_vcpu.max(1), out)?;
    let writes = lists(layout, stride, true);
    let r = each(&mut sides, |s| s.run(&writes))?;
    out.phase(
        "KVM_CREATE_MAPPINGS: total execution",
        names::CREATE_MAPPINGS,
        None,
        &r,
    );
    out.line("");
    // Untimed in the selftest; its line here shows what enabling did to the mappings.
    let r = each(&mut sides, |s| s.set_logging(true, false))?;
    out.phase(
        "(enable dirty logging)",
        names::ENABLE_DIRTY_LOGGING,
        None,
        &r,
    );
    let r = each(&mut sides, |s| s.run(&writes))?;
    out.phase(
        "KVM_UPDATE_MAPPINGS: total execution",
        names::UPDATE_MAPPINGS,
        None,
        &r,
    );
    out.line("");
    // What disabling logging did to the mappings is in this line's counters.
    let r = each(&mut sides, |s| s.set_logging(false, false))?;
    out.phase(
        "(disable dirty logging)",
        names::DISABLE_DIRTY_LOGGING,
        None,
        &r,
    );
    let reads = lists(layout, stride, false);
    let r = each(&mut sides, |s| s.run(&reads))?;
    out.phase(
        "KVM_ADJUST_MAPPINGS: total execution",
        names::ADJUST_MAPPINGS,
        None,
        &r,
    );
    out.line("");
    Ok(())
}
