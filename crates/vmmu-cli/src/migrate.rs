//! `vmmu migrate`: live migration end to end on real memory (`vmmu_testing::migrate`).
//! A source VM whose vCPU threads run a write workload at a given rate, pre-copy rounds
//! by harvest mode over a modelled link until the dirty set fits the downtime budget (or
//! the round limit), stop-and-copy, and the destination compared byte for byte with the
//! source. Prints each migration's rounds, pages sent per round, total time, downtime,
//! the MMU's time and `identical` or the first differing page; then the medians per MMU
//! and mode. `--json`: the bench contract (`vmmu bench --json` records, scenario
//! `migrate`, one per metric, median and minimum over the runs). Exit code 1 if any
//! destination differs, 2 for a usage error.

use std::io::Write;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use vmmu::host::RealBacking;
use vmmu::{MmuKind, TdpIteration};
use vmmu_testing::migrate::{
    migrate, HarvestMode, HostEvents, MigrateConfig, MigrateReport, Trace, Workload,
};

use crate::bench::Record;

/// Arguments of `vmmu migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Which MMU runs the source.
    #[arg(long, value_enum, default_value_t = MmuArg::Both)]
    mmu: MmuArg,
    /// Harvest modes, comma-separated (`get`, `get-clear`, `ring`), or `all`.
    #[arg(long, default_value = "all", value_delimiter = ',', value_parser = ["get", "get-clear", "ring", "all"])]
    mode: Vec<String>,
    /// Guest RAM in MiB (a multiple of 2).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(2..=65536))]
    mem_mib: u64,
    /// Host backing of the guest RAM.
    #[arg(long, value_enum, default_value_t = BackingArg::Thp)]
    backing: BackingArg,
    /// vCPU threads running the workload.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: u32,
    /// The workload's page pattern.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Uniform)]
    workload: WorkloadArg,
    /// Hot workload: size of the hot set, percent of the pages.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    hot_percent: u32,
    /// Hot workload: percent of the writes that go to the hot set.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(0..=100))]
    skew_percent: u32,
    /// Trace workload: a trace file (`<time> <vcpu> <R|W> <page>` lines).
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
    /// Trace workload: `valgrind --tool=lackey --trace-mem=yes` output to convert.
    #[arg(long, conflicts_with = "trace")]
    lackey: Option<std::path::PathBuf>,
    /// Write the trace (`--trace`/`--lackey`) in the trace format to this file, thinned
    /// to at most 30000 records (`Trace::thinned`), and migrate with that.
    #[arg(long)]
    save_trace: Option<std::path::PathBuf>,
    /// Guest accesses per second over all vCPUs (0: as fast as they run).
    #[arg(long, default_value_t = 1_000_000)]
    dirty_rate: u64,
    /// The link's bandwidth in MiB/s (0: infinitely fast).
    #[arg(long, default_value_t = 1024)]
    bandwidth: u64,
    /// Downtime budget in ms: stop-and-copy once the dirty set crosses the link in this.
    #[arg(long, default_value_t = 300.0)]
    downtime_ms: f64,
    /// Most pre-copy rounds after the first full copy.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Dirty ring entries per vCPU (ring mode).
    #[arg(long, default_value_t = 4096)]
    ring_size: u32,
    /// Host discards (MADV_DONTNEED through the notifier) per round.
    #[arg(long, default_value_t = 0)]
    discards: u32,
    /// Host page moves (new frame, same contents) per round.
    #[arg(long, default_value_t = 0)]
    moves: u32,
    /// Host THP splits per round.
    #[arg(long, default_value_t = 0)]
    splits: u32,
    /// Turn logging off and on again at the start of this round.
    #[arg(long)]
    toggle_logging_at: Option<u32>,
    /// Move the memslot to another guest-physical address at the start of this round.
    #[arg(long)]
    move_slot_at: Option<u32>,
    /// Migrations per MMU and mode (seeds `seed`, `seed + 1`, ...).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Vary the workload run by run (uniform, sequential, hot 10/90, hot 1/99, and the
    /// trace if one is given), and the host events (none, then discards and moves).
    #[arg(long)]
    vary: bool,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to migrate: `vmmu` (vCPU threads on real memory, concurrent rounds), `kvm`
    /// (the host's KVM guest on real memory, and the same rounds on vmmu's peer for the
    /// MMU time ratio; rounds alternate with the single vCPU), or `both`.
    #[arg(long, value_enum, default_value_t = TargetArg::Vmmu)]
    target: TargetArg,
    /// Mark the records `"quick": true`, as `vmmu report --quick` runs this command (a
    /// small guest: the report passes `--mem-mib 32 --runs 1`).
    #[arg(long)]
    quick: bool,
    /// Print bench records (JSON lines) on stdout, and nothing else.
    #[arg(long)]
    json: bool,
}

/// Where the migration runs.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TargetArg {
    /// vmmu on real memory.
    Vmmu,
    /// The host's KVM (and vmmu's peer, same rounds).
    Kvm,
    /// Both.
    Both,
}

/// The MMU(s) to run.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum MmuArg {
    /// The shadow MMU in direct mode.
    Shadow,
    /// The TDP MMU.
    Tdp,
    /// Both, one after the other.
    Both,
}

/// Host backing.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackingArg {
    /// 4 KiB pages.
    #[value(name = "4k")]
    Page4K,
    /// Transparent huge pages (MADV_HUGEPAGE).
    Thp,
    /// hugetlb 2 MiB pages (needs reserved huge pages).
    Hugetlb,
}

/// Workload kinds.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum WorkloadArg {
    /// Uniform random pages.
    Uniform,
    /// Sequential sweep.
    Sequential,
    /// A hot set (`--hot-percent`, `--skew-percent`).
    Hot,
    /// A replayed trace (`--trace` or `--lackey`).
    Trace,
}

fn usage(msg: String) -> ! {
    clap::Error::raw(clap::error::ErrorKind::ValueValidation, msg + "\n").exit()
}

fn load_trace(args: &MigrateArgs) -> Result<Option<Arc<Trace>>, Box<dyn std::error::Error>> {
    let open = |p: &std::path::Path| -> Result<_, Box<dyn std::error::Error>> {
        let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(std::io::BufReader::new(f))
    };
    let name = |p: &std::path::Path| {
        p.file_stem()
            .map_or("trace".into(), |s| s.to_string_lossy().into_owned())
    };
    Ok(match (&args.trace, &args.lackey) {
        (Some(p), _) => Some(Arc::new(Trace::parse(&name(p), open(p)?)?)),
        (_, Some(p)) => Some(Arc::new(Trace::from_lackey(&name(p), open(p)?, 1 << 22))),
        _ => None,
    })
}

/// Run `vmmu migrate`.
pub fn run(args: &MigrateArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Usage errors first (exit code 2), before anything is allocated.
    if !args.mem_mib.is_multiple_of(2) {
        usage(format!(
            "--mem-mib {}: must be a multiple of 2",
            args.mem_mib
        ));
    }
    if !(args.downtime_ms.is_finite() && args.downtime_ms >= 0.0) {
        usage(format!("--downtime-ms {}: must be >= 0", args.downtime_ms));
    }
    if args.workload == WorkloadArg::Trace && args.trace.is_none() && args.lackey.is_none() {
        usage("--workload trace needs --trace FILE or --lackey FILE".into());
    }
    let mut trace = load_trace(args)?;
    if let Some(path) = &args.save_trace {
        let Some(t) = &trace else {
            usage("--save-trace needs --trace FILE or --lackey FILE".into());
        };
        let thin = t.thinned(30_000);
        let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        thin.write_to(std::io::BufWriter::new(f))?;
        eprintln!(
            "vmmu migrate: {} records of {} saved to {} ({} pages written)",
            thin.records.len(),
            t.records.len(),
            path.display(),
            thin.pages_written()
        );
        trace = Some(Arc::new(thin));
    }
    let modes: Vec<HarvestMode> = if args.mode.iter().any(|m| m == "all") {
        HarvestMode::ALL.to_vec()
    } else {
        args.mode
            .iter()
            .map(|m| HarvestMode::parse(m).expect("clap checked the names"))
            .collect()
    };
    let mmus: Vec<(&str, MmuKind)> = match args.mmu {
        MmuArg::Shadow => vec![("shadow", MmuKind::ShadowDirect)],
        MmuArg::Tdp => vec![("tdp", MmuKind::Tdp(TdpIteration::UsedEntries))],
        MmuArg::Both => vec![
            ("shadow", MmuKind::ShadowDirect),
            ("tdp", MmuKind::Tdp(TdpIteration::UsedEntries)),
        ],
    };
    let base_workload = match args.workload {
        WorkloadArg::Uniform => Workload::Uniform,
        WorkloadArg::Sequential => Workload::Sequential,
        WorkloadArg::Hot => Workload::HotSet {
            hot_percent: args.hot_percent,
            skew_percent: args.skew_percent,
        },
        WorkloadArg::Trace => Workload::Trace(trace.clone().expect("checked above")),
    };
    let mut varied = vec![
        Workload::Uniform,
        Workload::Sequential,
        Workload::HotSet {
            hot_percent: 10,
            skew_percent: 90,
        },
        Workload::HotSet {
            hot_percent: 1,
            skew_percent: 99,
        },
    ];
    if let Some(t) = &trace {
        varied.push(Workload::Trace(t.clone()));
    }
    let template = MigrateConfig {
        guest_bytes: args.mem_mib << 20,
        backing: match args.backing {
            BackingArg::Page4K => RealBacking::Page4K,
            BackingArg::Thp => RealBacking::Thp,
            BackingArg::Hugetlb => RealBacking::HugeTlb2M,
        },
        vcpus: args.vcpus,
        workload: base_workload,
        dirty_rate: args.dirty_rate,
        bandwidth: args.bandwidth.saturating_mul(1 << 20),
        downtime_ms: args.downtime_ms,
        max_rounds: args.max_rounds,
        ring_size: args.ring_size,
        host_events: HostEvents {
            discards: args.discards,
            moves: args.moves,
            splits: args.splits,
        },
        toggle_logging_at: args.toggle_logging_at,
        move_slot_at: args.move_slot_at,
        seed: args.seed,
        ..MigrateConfig::default()
    };
    for &mode in &modes {
        let cfg = MigrateConfig {
            mode,
            ..template.clone()
        };
        if let Err(e) = vmmu_testing::migrate::check(&cfg) {
            usage(e);
        }
    }
    let mut out = std::io::stdout().lock();
    let mut records = Vec::new();
    let mut failures = 0u32;
    let mut total = 0u32;
    if args.target != TargetArg::Vmmu {
        #[cfg(feature = "kvm")]
        kvm_target(
            args,
            &template,
            &mmus,
            &modes,
            &varied,
            &mut out,
            &mut records,
            &mut failures,
            &mut total,
        )?;
        #[cfg(not(feature = "kvm"))]
        return Err("--target kvm: vmmu was built without the `kvm` feature".into());
    }
    let vmmu_mmus = if args.target == TargetArg::Kvm {
        &[][..]
    } else {
        &mmus[..]
    };
    for &(mmu_name, mmu) in vmmu_mmus {
        for &mode in &modes {
            let mut reports = Vec::new();
            for r in 0..args.runs {
                let mut cfg = MigrateConfig {
                    mmu,
                    mode,
                    seed: args.seed + r as u64,
                    ..template.clone()
                };
                if args.vary {
                    cfg.workload = varied[r as usize % varied.len()].clone();
                    if (r / varied.len() as u32) % 2 == 1 {
                        cfg.host_events = HostEvents {
                            discards: 4,
                            moves: 2,
                            splits: 1,
                        };
                    }
                }
                let rep = migrate(&cfg)?;
                total += 1;
                if !rep.identical() || rep.audit.is_err() {
                    failures += 1;
                }
                if !args.json {
                    print_run(&mut out, mmu_name, &cfg, &rep, args.runs == 1)?;
                }
                reports.push((cfg, rep));
            }
            records.extend(summarize(mmu_name, &template, mode, &reports));
        }
    }
    if args.quick {
        for r in &mut records {
            r.params.insert("quick".into(), json!(true));
        }
    }
    if args.json {
        crate::bench::output::write_json(&mut out, &records)?;
    } else {
        writeln!(out)?;
        crate::bench::output::write_table(&mut out, &records)?;
        writeln!(
            out,
            "{} of {total} migrations: destination identical to the source",
            total - failures
        )?;
    }
    out.flush()?;
    if failures > 0 {
        return Err(
            format!("{failures} of {total} migrations differ (or failed the audit)").into(),
        );
    }
    Ok(())
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn print_run(
    out: &mut impl Write,
    mmu: &str,
    cfg: &MigrateConfig,
    r: &MigrateReport,
    detail: bool,
) -> std::io::Result<()> {
    let verdict = match (r.first_difference, &r.audit) {
        (None, Ok(())) => "identical".to_string(),
        (Some(p), _) => format!("DIFFERS: {} pages, first page {p}", r.differing_pages),
        (None, Err(e)) => format!("identical, AUDIT FAILED: {e}"),
    };
    writeln!(
        out,
        "{mmu} {} {} {} MiB seed {}: {} rounds{}, {} pages sent, total {:.1} ms, downtime \
         {:.2} ms, MMU {:.1} ms, {} writes: {verdict}",
        cfg.mode.name(),
        cfg.workload.name(),
        cfg.guest_bytes >> 20,
        cfg.seed,
        r.rounds.len(),
        if r.converged { "" } else { " (round limit)" },
        r.pages_sent(),
        ms(r.total_ns),
        ms(r.downtime_ns),
        ms(r.mmu_ns),
        r.writes,
    )?;
    if detail {
        writeln!(out, "  round  dirty    sent  harvest_ms  copy_ms  link_ms")?;
        for (k, x) in r.rounds.iter().enumerate() {
            writeln!(
                out,
                "  {k:>5} {:>6} {:>7} {:>11.2} {:>8.2} {:>8.2}",
                x.dirty_pages,
                x.pages_sent,
                ms(x.harvest_ns),
                ms(x.copy_ns),
                ms(x.link_ns)
            )?;
        }
        let x = &r.stop_copy;
        writeln!(
            out,
            "  stop  {:>6} {:>7} {:>11.2} {:>8.2} {:>8.2}",
            x.dirty_pages,
            x.pages_sent,
            ms(x.harvest_ns),
            ms(x.copy_ns),
            ms(x.link_ns)
        )?;
    }
    Ok(())
}

fn median_min(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}

/// The bench records of one MMU and mode: medians and minimums over the runs.
fn summarize(
    mmu: &str,
    t: &MigrateConfig,
    mode: HarvestMode,
    reports: &[(MigrateConfig, MigrateReport)],
) -> Vec<Record> {
    let mut params = Map::new();
    params.insert("guest_mib".into(), json!(t.guest_bytes >> 20));
    params.insert("backing".into(), json!(format!("{:?}", t.backing)));
    params.insert("vcpus".into(), json!(t.vcpus));
    let workloads: Vec<String> = {
        let mut w: Vec<String> = Vec::new();
        for (c, _) in reports {
            if !w.contains(&c.workload.name()) {
                w.push(c.workload.name());
            }
        }
        w
    };
    params.insert("workload".into(), json!(workloads.join(",")));
    params.insert("dirty_rate".into(), json!(t.dirty_rate));
    params.insert("bandwidth_mibps".into(), json!(t.bandwidth >> 20));
    params.insert("downtime_budget_ms".into(), json!(t.downtime_ms));
    params.insert("max_rounds".into(), json!(t.max_rounds));
    params.insert("runs".into(), json!(reports.len()));
    let variant = format!("{mmu}/{}", mode.name());
    let rec = |metric: &str, unit: &str, vals: Vec<f64>, extra: Option<(&str, Value)>| {
        let (value, min) = median_min(vals);
        let mut p = params.clone();
        if let Some((k, v)) = extra {
            p.insert(k.into(), v);
        }
        Record {
            scenario: "migrate".into(),
            variant: variant.clone(),
            metric: metric.into(),
            value,
            min: Some(min),
            unit: unit.into(),
            params: p,
            ruler: None,
        }
    };
    let of = |f: &dyn Fn(&MigrateReport) -> f64| reports.iter().map(|(_, r)| f(r)).collect();
    let mut out = vec![
        rec("rounds", "rounds", of(&|r| r.rounds.len() as f64), None),
        rec("pages_sent", "pages", of(&|r| r.pages_sent() as f64), None),
        rec("total", "ms", of(&|r| ms(r.total_ns)), None),
        rec("downtime", "ms", of(&|r| ms(r.downtime_ns)), None),
        rec("mmu_time", "ms", of(&|r| ms(r.mmu_ns)), None),
        rec(
            "converged",
            "fraction",
            of(&|r| r.converged as u8 as f64),
            None,
        ),
        rec(
            "identical",
            "fraction",
            of(&|r| (r.identical() && r.audit.is_ok()) as u8 as f64),
            None,
        ),
    ];
    let most = reports
        .iter()
        .map(|(_, r)| r.rounds.len())
        .max()
        .unwrap_or(0);
    for k in 0..most {
        let vals: Vec<f64> = reports
            .iter()
            .filter_map(|(_, r)| r.rounds.get(k).map(|x| x.pages_sent as f64))
            .collect();
        out.push(rec("round_pages", "pages", vals, Some(("round", json!(k)))));
    }
    out
}

/// `--target kvm`: the rounds on the host's KVM (real memory, compared byte for byte)
/// and on vmmu's peer with the same stores, for the MMU time ratio.
#[cfg(feature = "kvm")]
#[allow(clippy::too_many_arguments)]
fn kvm_target(
    args: &MigrateArgs,
    t: &MigrateConfig,
    mmus: &[(&str, MmuKind)],
    modes: &[HarvestMode],
    varied: &[Workload],
    out: &mut impl Write,
    records: &mut Vec<Record>,
    failures: &mut u32,
    total: &mut u32,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::time::Duration;
    use vmmu_kvm::migrate::{migrate as peer_migrate, PeerMigration, Plan};
    use vmmu_kvm::{DirtyLog, HostBacking, SlotConfig};
    use vmmu_testing::migrate::Stream;

    let backing = match t.backing {
        RealBacking::Page4K => HostBacking::Page4K,
        RealBacking::Thp => HostBacking::Thp,
        RealBacking::HugeTlb2M => {
            usage("--target kvm: the KVM guest has no hugetlb backing".into())
        }
    };
    if t.bandwidth == 0 {
        usage("--target kvm: --bandwidth must be > 0 (the rounds are modelled on it)".into());
    }
    vmmu_kvm::kvm_available()?;
    let plan = Plan {
        dirty_rate: t.dirty_rate,
        bandwidth: t.bandwidth,
        downtime: Duration::from_secs_f64(t.downtime_ms / 1e3),
        max_rounds: t.max_rounds,
    };
    let npages = t.guest_bytes / 4096;
    for &mode in modes {
        let log = match mode {
            HarvestMode::Get => DirtyLog::Get,
            HarvestMode::GetClear => DirtyLog::GetClear,
            HarvestMode::Ring => DirtyLog::Ring,
        };
        let slot = SlotConfig::new(t.guest_bytes, backing, log);
        let mut kvm_runs: Vec<(MigrateConfig, PeerMigration)> = Vec::new();
        let mut peer_runs: Vec<Vec<PeerMigration>> = vec![Vec::new(); mmus.len()];
        for r in 0..args.runs {
            let mut cfg = MigrateConfig {
                mode,
                seed: args.seed + r as u64,
                vcpus: 1,
                ..t.clone()
            };
            if args.vary {
                cfg.workload = varied[r as usize % varied.len()].clone();
            }
            // The same stores on every peer: the stream's writes, round after round.
            let pages = |cfg: &MigrateConfig| {
                let mut stream = Stream::new(&cfg.workload, npages, 0, 1, cfg.seed);
                move |_round: u32, n: u64| {
                    let mut v = Vec::with_capacity(n as usize);
                    let mut tries = 0;
                    while (v.len() as u64) < n && tries < 4 * n + 16 {
                        tries += 1;
                        let (p, write) = stream.next_access();
                        if write {
                            v.push(p);
                        }
                    }
                    v
                }
            };
            let mut kvm = vmmu_kvm::open_kvm(&slot)?;
            let k = peer_migrate(&mut *kvm, &plan, pages(&cfg))?;
            drop(kvm);
            *total += 1;
            if k.differing_pages > 0 {
                *failures += 1;
            }
            for (i, &(_, mmu)) in mmus.iter().enumerate() {
                let vm_config = vmmu::VmConfig {
                    mmu,
                    ..vmmu::VmConfig::default()
                };
                let mut peer = vmmu_kvm::model::VmmuGuest::with_vm_config(&slot, vm_config)?;
                let m = peer_migrate(&mut peer, &plan, pages(&cfg))?;
                peer.vm()
                    .audit()
                    .map_err(|e| format!("vmmu peer audit: {e}"))?;
                peer_runs[i].push(m);
            }
            if !args.json {
                let verdict = match k.first_difference {
                    None => "identical".to_string(),
                    Some(p) => format!("DIFFERS: {} pages, first page {p}", k.differing_pages),
                };
                write!(
                    out,
                    "kvm {} {} {} MiB seed {}: {} rounds{}, pages per round {:?}, link {:.1} ms, \
                     downtime {:.2} ms, KVM MMU {:.2} ms",
                    mode.name(),
                    cfg.workload.name(),
                    t.guest_bytes >> 20,
                    cfg.seed,
                    k.pages_sent.len() - 1,
                    if k.converged { "" } else { " (round limit)" },
                    k.pages_sent,
                    k.link.as_secs_f64() * 1e3,
                    k.downtime.as_secs_f64() * 1e3,
                    k.mmu_time().as_secs_f64() * 1e3,
                )?;
                for (i, &(name, _)) in mmus.iter().enumerate() {
                    let m = peer_runs[i].last().expect("pushed");
                    write!(
                        out,
                        ", vmmu {name} {:.2} ms ({:.2}x){}",
                        m.mmu_time().as_secs_f64() * 1e3,
                        m.mmu_time().as_secs_f64() / k.mmu_time().as_secs_f64().max(1e-9),
                        if m.pages_sent == k.pages_sent {
                            ""
                        } else {
                            " PAGES DIFFER FROM KVM"
                        }
                    )?;
                }
                writeln!(out, ": {verdict}")?;
            }
            kvm_runs.push((cfg, k));
        }
        let mut params = Map::new();
        params.insert("guest_mib".into(), json!(t.guest_bytes >> 20));
        params.insert("backing".into(), json!(backing.name()));
        params.insert("dirty_rate".into(), json!(t.dirty_rate));
        params.insert("bandwidth_mibps".into(), json!(t.bandwidth >> 20));
        params.insert("downtime_budget_ms".into(), json!(t.downtime_ms));
        params.insert("max_rounds".into(), json!(t.max_rounds));
        params.insert("runs".into(), json!(args.runs));
        params.insert("protocol".into(), json!("alternating"));
        let rec = |variant: String, metric: &str, unit: &str, vals: Vec<f64>| {
            let (value, min) = median_min(vals);
            Record {
                scenario: "migrate".into(),
                variant,
                metric: metric.into(),
                value,
                min: Some(min),
                unit: unit.into(),
                params: params.clone(),
                ruler: None,
            }
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let of = |runs: &[PeerMigration], f: &dyn Fn(&PeerMigration) -> f64| -> Vec<f64> {
            runs.iter().map(f).collect()
        };
        let ks: Vec<PeerMigration> = kvm_runs.iter().map(|(_, k)| k.clone()).collect();
        let kv = format!("kvm/{}", mode.name());
        records.push(rec(
            kv.clone(),
            "rounds",
            "rounds",
            // Pre-copy rounds, round 0 included, the stop-and-copy round not (as vmmu's).
            of(&ks, &|k| k.pages_sent.len() as f64 - 1.0),
        ));
        records.push(rec(
            kv.clone(),
            "pages_sent",
            "pages",
            of(&ks, &|k| k.pages_sent.iter().sum::<u64>() as f64),
        ));
        records.push(rec(kv.clone(), "total", "ms", of(&ks, &|k| ms(k.link))));
        records.push(rec(
            kv.clone(),
            "downtime",
            "ms",
            of(&ks, &|k| ms(k.downtime)),
        ));
        records.push(rec(
            kv.clone(),
            "mmu_time",
            "ms",
            of(&ks, &|k| ms(k.mmu_time())),
        ));
        records.push(rec(
            kv,
            "identical",
            "fraction",
            of(&ks, &|k| (k.differing_pages == 0) as u8 as f64),
        ));
        for (i, &(name, _)) in mmus.iter().enumerate() {
            let v = format!("vmmu-peer/{name}/{}", mode.name());
            records.push(rec(
                v.clone(),
                "mmu_time",
                "ms",
                of(&peer_runs[i], &|m| ms(m.mmu_time())),
            ));
            let ratios = peer_runs[i]
                .iter()
                .zip(&ks)
                .map(|(m, k)| m.mmu_time().as_secs_f64() / k.mmu_time().as_secs_f64().max(1e-9))
                .collect();
            records.push(rec(v, "mmu_time_over_kvm", "ratio", ratios));
        }
    }
    Ok(())
}
