//! `vmmu perf <test>`: the KVM selftests' MMU performance tests, with their flags,
//! defaults and printed lines, run on vmmu and on the host's KVM side by side.
//!
//! - `dirty-log` ([`dirty_log`]): `dirty_log_perf_test`
//! - `pre-fault` ([`pre_fault`]): `pre_fault_memory_test`'s workload
//! - `page-table` ([`page_table`]): `kvm_page_table_test`
//! - `access-tracking` ([`access_tracking`]): `access_tracking_perf_test`
//! - `memslot` ([`memslot`]): `memslot_perf_test`
//!
//! Each test builds both sides ([`side`]: vmmu on simulated host memory, the host's KVM
//! through `vmmu_kvm::perf`), lays the test memory out as the selftests' `memstress`
//! does, and runs every phase on one side and then the other, with the same accesses
//! ([`access`]) on both. Every phase line is the selftest's own (`Populate memory time:
//! 0.123456789s`), with the side's name in front, and is followed by what KVM shows only
//! through tracepoints and binary stats: faults, remote TLB flushes, huge pages split and
//! rebuilt ([`output`]). At the end a table gives every phase line's figure per side and
//! vmmu's over KVM's. `--json` prints the bench contract's records instead.
//!
//! Usage errors (a bad flag or value, more memory than the machine has, `-v 0`) exit
//! with code 2 before anything is built. Where the host's KVM cannot run a test (no
//! `/dev/kvm`, a missing capability), `--target both` says why and runs vmmu alone;
//! `--target kvm` fails with that message.

pub mod access;
pub mod access_tracking;
pub mod dirty_log;
pub mod memslot;
pub mod output;
pub mod page_table;
pub mod pre_fault;
pub mod side;

use std::fmt;

use clap::{Args, Subcommand, ValueEnum};

/// `vmmu perf` arguments.
#[derive(Args, Debug)]
pub struct PerfArgs {
    #[command(subcommand)]
    test: PerfTest,
}

#[derive(Subcommand, Debug)]
enum PerfTest {
    /// dirty_log_perf_test: populate, enable dirty logging, iterations of dirty memory /
    /// get dirty log / clear dirty log, disable dirty logging.
    DirtyLog(dirty_log::DirtyLogArgs),
    /// pre_fault_memory_test's workload: every vCPU pre-faults its memory in parallel
    /// (KVM_PRE_FAULT_MEMORY), then reads it.
    PreFault(pre_fault::PreFaultArgs),
    /// kvm_page_table_test: create mappings (first touch), update them under dirty
    /// logging, adjust them after logging stops (huge pages rebuilt).
    PageTable(page_table::PageTableArgs),
    /// access_tracking_perf_test: populate, write/read populated memory, mark memory
    /// idle (aging through the MMU-notifier ops), write/read idle memory.
    AccessTracking(access_tracking::AccessTrackingArgs),
    /// memslot_perf_test: map, unmap, unmap chunked, move active area, move inactive
    /// area, RW, each for `-l` seconds, the best of `-r` runs.
    Memslot(memslot::MemslotArgs),
}

/// Which sides a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// vmmu only.
    Vmmu,
    /// The host's KVM only.
    Kvm,
    /// Both, phase by phase.
    Both,
}

/// vmmu's MMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MmuArg {
    /// The shadow MMU in direct mode (reverse maps, one MMU lock).
    Shadow,
    /// The TDP MMU, scanning every entry (seed 002's old iteration).
    TdpScan,
    /// The TDP MMU, skipping non-present entries.
    TdpSkip,
    /// The TDP MMU with its used-entries bitmap.
    TdpUsed,
}

impl MmuArg {
    /// The name as typed.
    pub fn name(self) -> &'static str {
        match self {
            MmuArg::Shadow => "shadow",
            MmuArg::TdpScan => "tdp-scan",
            MmuArg::TdpSkip => "tdp-skip",
            MmuArg::TdpUsed => "tdp-used",
        }
    }
}

/// Reverse-map iteration of vmmu's shadow MMU (seed 000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RmapIterArg {
    /// The iterator that keeps its place (seed 000).
    Iterator,
    /// Restart from the head at every step (before seed 000).
    RestartScan,
}

/// The selftests' `-s` backing types this tool offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackingArg {
    /// 4 KiB host pages (vmmu: `Backing::Page4K`; KVM: `MADV_NOHUGEPAGE`).
    #[value(name = "anonymous")]
    Anonymous,
    /// Transparent huge pages (vmmu: `Backing::Thp`; KVM: `MADV_HUGEPAGE`).
    #[value(name = "anonymous_thp")]
    AnonymousThp,
    /// hugetlb with the default 2 MiB pages (vmmu: `Backing::Thp` on 2 MiB-aligned
    /// slots, every chunk huge; KVM: `MAP_HUGETLB`, needs `vm.nr_hugepages`).
    #[value(name = "anonymous_hugetlb")]
    AnonymousHugetlb,
    /// hugetlb with 1 GiB pages (vmmu: `Backing::HugeTlb1G`; not on the KVM side).
    #[value(name = "anonymous_hugetlb_1gb")]
    AnonymousHugetlb1gb,
}

impl BackingArg {
    /// The name as typed.
    pub fn name(self) -> &'static str {
        match self {
            BackingArg::Anonymous => "anonymous",
            BackingArg::AnonymousThp => "anonymous_thp",
            BackingArg::AnonymousHugetlb => "anonymous_hugetlb",
            BackingArg::AnonymousHugetlb1gb => "anonymous_hugetlb_1gb",
        }
    }

    /// The alignment each memslot needs on vmmu's simulated host.
    fn slot_alignment(self) -> u64 {
        match self {
            BackingArg::Anonymous | BackingArg::AnonymousThp => 4096,
            BackingArg::AnonymousHugetlb => 2 << 20,
            BackingArg::AnonymousHugetlb1gb => 1 << 30,
        }
    }
}

/// Options every test takes.
#[derive(Args, Debug, Clone, Copy)]
pub struct CommonArgs {
    /// Where to run: vmmu, the host's KVM, or both, phase by phase.
    #[arg(long, value_enum, default_value_t = Target::Both)]
    pub target: Target,

    /// vmmu's MMU.
    #[arg(long, value_enum, default_value_t = MmuArg::TdpUsed)]
    pub mmu: MmuArg,

    /// vmmu's TDP MMU: do not split huge pages eagerly when dirty logging starts (KVM's
    /// `eager_page_split=N`; vmmu zaps them instead). vmmu's variant then ends in
    /// `-no-eager-split`.
    #[arg(long)]
    pub no_eager_split: bool,

    /// vmmu's shadow MMU: how reverse maps are iterated (seed 000: `iterator`, the
    /// default; `restart-scan`, before it). vmmu's variant then ends in `-restart-scan`.
    #[arg(long, value_enum)]
    pub rmap_iteration: Option<RmapIterArg>,

    /// Print one JSON object per record on stdout (the bench contract), and nothing else.
    #[arg(long)]
    pub json: bool,
}

/// Why a test did not complete.
#[derive(Debug)]
pub enum PerfError {
    /// A usage error found after parsing (exit code 2).
    Usage(String),
    /// The host's KVM cannot run it (the message says why).
    Unsupported(String),
    /// A side failed.
    Side {
        /// Which side.
        side: &'static str,
        /// What failed.
        what: String,
    },
}

impl PerfError {
    /// A failure of `side`.
    pub fn side(side: &'static str, what: impl Into<String>) -> Self {
        PerfError::Side {
            side,
            what: what.into(),
        }
    }

    /// A KVM-side error: unavailable or unsupported are [`PerfError::Unsupported`].
    #[cfg(feature = "kvm")]
    pub fn kvm(e: vmmu_kvm::Error) -> Self {
        match e {
            vmmu_kvm::Error::KvmUnavailable(_) | vmmu_kvm::Error::KvmUnsupported(_) => {
                PerfError::Unsupported(e.to_string())
            }
            e => PerfError::side("kvm", e.to_string()),
        }
    }
}

impl fmt::Display for PerfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PerfError::Usage(m) => write!(f, "{m}"),
            PerfError::Unsupported(m) => write!(f, "kvm: {m}"),
            PerfError::Side { side, what } => write!(f, "{side}: {what}"),
        }
    }
}

impl std::error::Error for PerfError {}

/// Run `vmmu perf`. A usage error found after parsing exits with code 2 here, as clap's
/// own do.
pub fn run(args: &PerfArgs) -> Result<(), Box<dyn std::error::Error>> {
    let r = match &args.test {
        PerfTest::DirtyLog(a) => dirty_log::run(a),
        PerfTest::PreFault(a) => pre_fault::run(a),
        PerfTest::PageTable(a) => page_table::run(a),
        PerfTest::AccessTracking(a) => access_tracking::run(a),
        PerfTest::Memslot(a) => memslot::run(a),
    };
    match r {
        Err(PerfError::Usage(msg)) => {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{msg}\n")).exit()
        }
        r => Ok(r?),
    }
}

/// The selftests' `parse_size`: a number of bytes with an optional suffix `K`, `M`, `G`
/// or `T` (either case; powers of 1024), e.g. `10M`, `3G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?} in {s:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 10M, 3G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `-v`: at least one vCPU, at most 512.
pub fn parse_vcpus(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of vCPUs"))?;
    if !(1..=MAX_VCPUS).contains(&n) {
        return Err(format!(
            "the number of vCPUs must be between 1 and {MAX_VCPUS}, not {n}"
        ));
    }
    Ok(n)
}

/// Most vCPUs a test takes.
pub const MAX_VCPUS: u32 = 512;
/// Most test memory (the guest's page tables on the KVM side map 64 GiB above 4 GiB).
pub const MAX_TEST_BYTES: u64 = 64 << 30;

/// Bytes of memory the host can still give (`MemAvailable`), if known.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Check the memory a test asks for against the layout's limits and, where the KVM side
/// runs (its memory is real and populated), against the host's available memory.
pub fn check_memory(
    layout: &side::Layout,
    target: Target,
    available: Option<u64>,
) -> Result<(), PerfError> {
    let total = layout.data_bytes();
    if total > MAX_TEST_BYTES {
        return Err(PerfError::Usage(format!(
            "{} vCPUs x {} bytes = {} GiB of test memory: at most {} GiB",
            layout.vcpus,
            layout.bytes_per_vcpu,
            total >> 30,
            MAX_TEST_BYTES >> 30
        )));
    }
    let align = layout.backing.slot_alignment();
    if !total.is_multiple_of(u64::from(layout.slots) * align) {
        return Err(PerfError::Usage(format!(
            "{total} bytes of test memory do not split into {} memslots of whole {} KiB \
             pages ({})",
            layout.slots,
            align >> 10,
            layout.backing.name()
        )));
    }
    if target != Target::Vmmu {
        if let Some(avail) = available {
            // The data, one 2 MiB list per GiB, the tables; and room for everything else.
            let need = total + total / 512 + (1 << 30);
            if need > avail {
                return Err(PerfError::Usage(format!(
                    "{} MiB of test memory: the KVM side backs it with real, populated host \
                     memory and this machine has {} MiB available (run with --target vmmu, \
                     or fewer vCPUs or bytes)",
                    total >> 20,
                    avail >> 20
                )));
            }
        }
    }
    Ok(())
}

/// Build the sides `common.target` asks for. Where the host's KVM cannot run the test and
/// both were asked for, a line says why and vmmu runs alone.
pub fn open_sides(
    layout: &side::Layout,
    common: &CommonArgs,
    list_entries: u64,
    out: &mut output::Out,
) -> Result<Vec<Box<dyn side::Side>>, PerfError> {
    let mut sides: Vec<Box<dyn side::Side>> = Vec::new();
    if common.target != Target::Kvm {
        sides.push(Box::new(side::VmmuSide::new(layout, common)?));
    }
    if common.target != Target::Vmmu {
        match open_kvm(layout, list_entries, out) {
            Ok(kvm) => sides.push(kvm),
            Err(PerfError::Unsupported(why)) if common.target == Target::Both => {
                out.line(&format!("[kvm] skipped: {why}"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(sides)
}

#[cfg(feature = "kvm")]
fn open_kvm(
    layout: &side::Layout,
    list_entries: u64,
    out: &mut output::Out,
) -> Result<Box<dyn side::Side>, PerfError> {
    let kvm = side::KvmSide::new(layout, list_entries)?;
    if let Some(why) = kvm.stats_error() {
        out.line(&format!("[kvm] no MMU counters: {why}"));
    }
    if let Some(mmu) = crate::report::host_kvm_mmu() {
        out.line(&format!("[kvm] the host's KVM runs guests on {mmu}"));
    }
    if layout.backing == BackingArg::AnonymousThp {
        if let Some(huge) = kvm.host_huge_bytes() {
            out.line(&format!(
                "[kvm] the host backs {} of {} MiB of test memory with THP",
                huge >> 20,
                layout.data_bytes() >> 20
            ));
        }
    }
    Ok(Box::new(kvm))
}

#[cfg(not(feature = "kvm"))]
fn open_kvm(
    _: &side::Layout,
    _: u64,
    _: &mut output::Out,
) -> Result<Box<dyn side::Side>, PerfError> {
    Err(PerfError::Unsupported(
        "not available in this build (built without the `kvm` feature)".into(),
    ))
}

/// Run `f` on `side`, with its counters before and after: `(label, time, counters)`.
pub fn measure(
    side: &mut dyn side::Side,
    f: impl FnOnce(&mut dyn side::Side) -> Result<std::time::Duration, PerfError>,
) -> Result<(String, std::time::Duration, side::Delta), PerfError> {
    let before = side.counters();
    let d = f(side)?;
    let delta = side.counters().delta(&before);
    Ok((side.label(), d, delta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_the_selftests_parse_them() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("3g"), Ok(3 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn vcpus_from_one_to_the_limit() {
        assert_eq!(parse_vcpus("2"), Ok(2));
        assert!(parse_vcpus("0").unwrap_err().contains("between 1 and"));
        assert!(parse_vcpus("513").is_err());
        assert!(parse_vcpus("x").is_err());
    }

    fn layout(vcpus: u32, bytes: u64, slots: u32, backing: BackingArg) -> side::Layout {
        side::Layout {
            vcpus,
            bytes_per_vcpu: bytes,
            slots,
            backing,
            manual_protect: true,
            initially_set: true,
        }
    }

    #[test]
    fn memory_limits_are_usage_errors() {
        let ok = layout(2, 1 << 30, 1, BackingArg::Anonymous);
        assert!(check_memory(&ok, Target::Both, Some(8 << 30)).is_ok());
        // More than the machine has: only where the KVM side runs.
        let big = layout(2, 8 << 30, 1, BackingArg::Anonymous);
        assert!(matches!(
            check_memory(&big, Target::Both, Some(8 << 30)),
            Err(PerfError::Usage(m)) if m.contains("available")
        ));
        assert!(check_memory(&big, Target::Vmmu, Some(8 << 30)).is_ok());
        let huge = layout(65, 1 << 30, 1, BackingArg::Anonymous);
        assert!(check_memory(&huge, Target::Vmmu, None).is_err());
        let odd = layout(1, 3 << 20, 2, BackingArg::AnonymousHugetlb);
        assert!(check_memory(&odd, Target::Vmmu, None).is_err());
    }
}
