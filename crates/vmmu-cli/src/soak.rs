//! `vmmu soak --seconds N [--mmu shadow|tdp] [--json]`: the concurrent soak of
//! `vmmu_testing::soak` (vCPU threads faulting and writing, a dirty-log harvester, an
//! MMU-notifier thread, a memslot thread; the audit and the reference model's checks at
//! every quiescent point; exact accounting when each VM goes), then what it ran:
//! operations per kind and checks passed. Exit code 1 if any check failed.

use std::io::Write;

use clap::{Args, ValueEnum};
use serde_json::json;
use vmmu::{MmuKind, TdpIteration};
use vmmu_testing::soak::{run as run_soak, SoakConfig};

/// Arguments of `vmmu soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Which MMU (default: both, alternating VM by VM; the TDP MMU in each of its
    /// iteration modes).
    #[arg(long, value_enum)]
    mmu: Option<SoakMmu>,
    /// vCPU threads.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=256))]
    vcpus: u32,
    /// Accesses a vCPU makes per guest entry at most (default: its whole round; it
    /// leaves guest mode only when kicked or when an access exits).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stretch: Option<u64>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// The MMU under soak.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SoakMmu {
    /// The shadow MMU in direct mode.
    Shadow,
    /// The TDP MMU (every iteration mode in turn).
    Tdp,
}

const SHADOW: &[(&str, MmuKind)] = &[("shadow-direct", MmuKind::ShadowDirect)];
const TDP: &[(&str, MmuKind)] = &[
    ("tdp-scan", MmuKind::Tdp(TdpIteration::ScanAll)),
    ("tdp-skip", MmuKind::Tdp(TdpIteration::SkipNonPresent)),
    ("tdp-used", MmuKind::Tdp(TdpIteration::UsedEntries)),
];

/// Run `vmmu soak`.
pub fn run(args: &SoakArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err("--seconds must be a positive number".into());
    }
    let mmus = match args.mmu {
        Some(SoakMmu::Shadow) => SHADOW,
        Some(SoakMmu::Tdp) => TDP,
        None => vmmu_testing::MMUS,
    };
    let mut cfg = SoakConfig::new(mmus, args.seconds);
    cfg.vcpus = args.vcpus as usize;
    if let Some(n) = args.stretch {
        cfg.stretch = n;
    }
    if !args.json {
        eprintln!(
            "vmmu soak: {:.0} s on {}, {} vCPU threads + harvester + notifier + memslot thread",
            args.seconds,
            mmus.iter().map(|m| m.0).collect::<Vec<_>>().join(", "),
            cfg.vcpus
        );
    }
    let r = run_soak(&cfg);
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = json!({
            "seconds": r.seconds,
            "vms": r.vms,
            "rounds": r.rounds,
            "operations": r.total_ops(),
            "ops": r.ops,
            "checks_passed": r.total_checks(),
            "checks": r.checks,
            "failures": usize::from(r.failure.is_some()),
            "failure": r.failure,
            "vcpus": cfg.vcpus,
            "faults": r.faults,
            "faults_per_s": r.faults as f64 / r.seconds,
            "lock_acquisitions": r.lock_acquisitions,
            "lock_wait_ns": r.lock_wait_ns,
            "lock_wait_ns_per_acquisition": r.lock_wait_ns as f64 / r.lock_acquisitions.max(1) as f64,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "ran {:.1} s: {} VMs, {} quiescent points, {} operations, {} checks passed, {} failures",
            r.seconds,
            r.vms.values().sum::<u64>(),
            r.rounds,
            r.total_ops(),
            r.total_checks(),
            usize::from(r.failure.is_some())
        )?;
        writeln!(
            out,
            "faults: {} ({:.0}/s); MMU lock: {} acquisitions, waited {:.1} ms in all, {:.0} ns each on average, {:.1} ms per vCPU thread",
            r.faults,
            r.faults as f64 / r.seconds,
            r.lock_acquisitions,
            r.lock_wait_ns as f64 / 1e6,
            r.lock_wait_ns as f64 / r.lock_acquisitions.max(1) as f64,
            r.lock_wait_ns as f64 / 1e6 / cfg.vcpus as f64,
        )?;
        writeln!(out, "VMs (MMU, dirty-log mode):")?;
        for (k, v) in &r.vms {
            writeln!(out, "  {v:>8}  {k}")?;
        }
        writeln!(out, "operations:")?;
        for (k, v) in &r.ops {
            writeln!(out, "  {v:>12}  {k}")?;
        }
        writeln!(out, "checks passed:")?;
        for (k, v) in &r.checks {
            writeln!(out, "  {v:>12}  {k}")?;
        }
    }
    out.flush()?;
    match r.failure {
        Some(f) => Err(format!("soak failed: {f}").into()),
        None => Ok(()),
    }
}
