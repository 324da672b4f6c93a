//! `vmmu kvm`: vmmu side by side with the host's real KVM (`/dev/kvm`).
//!
//! - `vmmu kvm compare [--mem-gib N] [--ratios R,...] [--rounds R] [--json]`: per dirty-log
//!   mode (`get`: KVM_GET_DIRTY_LOG; `get-clear`: manual protect, GET + KVM_CLEAR_DIRTY_LOG;
//!   `ring`: a 65,536-entry dirty ring per vCPU, its entries collected into a bitmap, then
//!   KVM_RESET_DIRTY_RINGS, every 32,768 pages written, where the host offers the ring)
//!   and dirty ratio, the same stride of pages is written on a KVM guest and through
//!   vmmu's CPU model, both harvest, and the two bitmaps are compared word for word; then
//!   the first-touch fault-in of a fresh slot and the deletion of the fully mapped slot,
//!   on 4 KiB and THP host backing. Each figure is the median over `--rounds` rounds.
//! - `vmmu kvm conformance [--rounds N] [--seed S]`: random write schedules and clears on
//!   both, every harvested bitmap compared (the test `vmmu-kvm/tests/conformance.rs` runs
//!   the same with fewer rounds).
//!
//! With `--json`, `compare` prints records of the bench contract: scenario `kvm-compare`,
//! variants `kvm` and `vmmu`, metrics `harvest_us`, `fault_ns_per_page`, `delete_us`, and
//! `bitmap_equal` (variant `vmmu`: 1 if vmmu's bitmap equalled KVM's in every round).
//!
//! Where `/dev/kvm` cannot be opened both commands fail with an error saying so: nothing
//! is ever reported as compared that was not.
//!
//! KVM's long operations (a harvest of thousands of pages, a memslot delete) run in the
//! kernel on the calling thread and are preempted like it: on a busy machine they read up
//! to twice as slow. Run under a real-time policy (`chrt -f 20 vmmu kvm compare`) or on
//! an idle machine for figures to quote.

use clap::{Args, Subcommand};

/// `vmmu kvm` arguments.
#[derive(Args, Debug)]
pub struct KvmArgs {
    #[command(subcommand)]
    command: KvmCommand,
}

#[derive(Subcommand, Debug)]
enum KvmCommand {
    /// Run the same writes on /dev/kvm and on vmmu: compare dirty bitmaps bit for bit and
    /// harvest, fault-in and memslot-delete costs side by side.
    Compare(CompareArgs),
    /// Random write schedules and clears on /dev/kvm and on vmmu; every harvested dirty
    /// bitmap must be identical.
    Conformance(ConformanceArgs),
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Size of the data memslot, in GiB (1..=64; KVM's side is real, populated memory).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    mem_gib: u32,

    /// Dirty ratios to measure, comma-separated, each in [0, 1] (0: nothing dirty, the
    /// harvest's fixed cost). Ratio r writes every round(1/r)-th page.
    #[arg(long, value_delimiter = ',', value_parser = parse_ratio,
          default_value = "0,0.001,0.01,0.1,0.5,1")]
    ratios: Vec<f64>,

    /// Measured rounds per figure; each figure is the median (>= 1).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Print one JSON object per record on stdout, and nothing else.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ConformanceArgs {
    /// Rounds per slot configuration (>= 1).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,

    /// Seed of the random schedules, decimal or 0x-hex (a run is reproducible from it).
    #[arg(long, default_value = "0x766d6d75", value_parser = parse_seed)]
    seed: u64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is not in [0, 1]"))
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a decimal or 0x-hex number"))
}

/// Run `vmmu kvm ...`.
pub fn run(args: &KvmArgs) -> Result<(), Box<dyn std::error::Error>> {
    imp::run(args)
}

#[cfg(not(feature = "kvm"))]
mod imp {
    pub fn run(_: &super::KvmArgs) -> Result<(), Box<dyn std::error::Error>> {
        Err("this vmmu was built without the `kvm` feature: nothing was compared".into())
    }
}

#[cfg(feature = "kvm")]
mod imp {
    use std::io::{self, IsTerminal, Write};
    use std::time::Duration;

    use serde_json::{json, Map, Value};
    use vmmu::{MmuKind, TdpIteration, VmConfig};
    use vmmu_kvm::compare::{self, Bitmaps, FaultDelete};
    use vmmu_kvm::conformance;
    use vmmu_kvm::model::VmmuGuest;
    use vmmu_kvm::{DirtyLog, HostBacking, Peer, Schedule, SlotConfig};

    use super::{CompareArgs, ConformanceArgs, KvmArgs, KvmCommand};
    use crate::bench::floor::HarvestFloor;
    use crate::bench::median::median;
    use crate::bench::names::kvm_compare as names;
    use crate::bench::{output, Record};

    type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    pub fn run(args: &KvmArgs) -> Result<()> {
        // Fail before anything else, and say why, when there is no KVM to compare with.
        vmmu_kvm::kvm_available()?;
        match &args.command {
            KvmCommand::Compare(a) => compare_command(a),
            KvmCommand::Conformance(a) => conformance_command(a),
        }
    }

    /// Progress on stderr, one line rewritten in place, only on a terminal.
    fn progress(msg: &str) {
        if io::stderr().is_terminal() {
            eprint!("\r\x1b[2K{msg}");
        }
    }

    fn us(d: Duration) -> f64 {
        d.as_nanos() as f64 / 1e3
    }

    fn med(v: &[f64]) -> f64 {
        median(v).unwrap_or(f64::NAN)
    }

    fn record(
        variant: &str,
        metric: &str,
        params: &Map<String, Value>,
        v: f64,
        unit: &str,
    ) -> Record {
        Record {
            scenario: names::NAME.into(),
            variant: variant.into(),
            metric: metric.into(),
            value: v,
            min: None,
            unit: unit.into(),
            params: params.clone(),
            ruler: None,
        }
    }

    /// The vmmu peers of the harvest rows: (JSON variant, table name, configuration).
    fn vmmu_peers() -> [(&'static str, &'static str, VmConfig); 2] {
        [
            (names::VMMU, "shadow", VmConfig::default()),
            (
                names::VMMU_TDP,
                "tdp",
                VmConfig {
                    mmu: MmuKind::Tdp(TdpIteration::default()),
                    ..VmConfig::default()
                },
            ),
        ]
    }

    /// One (mode, ratio) row: medians over the rounds.
    struct HarvestRow {
        mode: DirtyLog,
        ratio: f64,
        writes: u64,
        kvm_us: f64,
        /// KVM's fastest round.
        kvm_min_us: f64,
        /// The floor of the same pages ([`HarvestFloor`]), timed in every round.
        floor_us: f64,
        /// Per vmmu peer ([`vmmu_peers`]), its median and its minimum.
        vmmu_us: Vec<(f64, f64)>,
        /// Per vmmu peer, whether its bitmaps equalled KVM's in every round.
        equal: Vec<bool>,
        diff: Option<String>,
    }

    /// One backing's fault-in and delete, medians over the rounds.
    struct FaultRow {
        backing: HostBacking,
        kvm_fault_ns: f64,
        vmmu_fault_ns: f64,
        kvm_delete_us: f64,
        vmmu_delete_us: f64,
        kvm_huge_bytes: Option<u64>,
    }

    fn harvest_rows(a: &CompareArgs, mode: DirtyLog) -> Result<Vec<HarvestRow>> {
        let slot = SlotConfig::new(u64::from(a.mem_gib) << 30, HostBacking::Page4K, mode);
        let mut kvm = vmmu_kvm::open_kvm(&slot)?;
        let peers = vmmu_peers();
        let mut guests = peers
            .iter()
            .map(|(_, _, c)| VmmuGuest::with_vm_config(&slot, *c))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut vmmu: Vec<&mut dyn Peer> = guests.iter_mut().map(|g| g as &mut dyn Peer).collect();
        let mut bufs = Bitmaps::new(slot.bitmap_words(), vmmu.len());
        // Map every page once and empty the log, so rounds measure re-dirtying (a write
        // fault on a write-protected SPTE), not first touch.
        let all = Schedule::every_page(slot.pages());
        let first = compare::harvest_round(&mut *kvm, &mut vmmu, &all, &mut bufs)?;
        for ((_, name, _), d) in peers.iter().zip(first.diff) {
            if let Some(d) = d {
                return Err(format!(
                    "{}: KVM's and vmmu {name}'s dirty bitmaps differ after the first write \
                     of every page: {d}",
                    mode.name()
                )
                .into());
            }
        }
        let mut rows = Vec::new();
        let mut floor = HarvestFloor::new(slot.pages());
        for &ratio in &a.ratios {
            progress(&format!("kvm compare: {} ratio {ratio}", mode.name()));
            let s = Schedule::for_ratio(slot.pages(), ratio);
            let pages: Vec<u64> = s.pages().collect();
            let mut f = Vec::new();
            // One untimed round first: every written page is then mapped and protected.
            let warm = compare::harvest_round(&mut *kvm, &mut vmmu, &s, &mut bufs)?;
            let mut diffs: Vec<Option<String>> = warm
                .diff
                .into_iter()
                .map(|d| d.map(|d| format!("warm-up round: {d}")))
                .collect();
            let mut k = Vec::new();
            let mut v = vec![Vec::new(); vmmu.len()];
            for i in 0..a.rounds {
                let r = compare::harvest_round(&mut *kvm, &mut vmmu, &s, &mut bufs)?;
                f.push(floor.measure(&pages)?);
                k.push(us(r.kvm));
                for (j, t) in r.vmmu.iter().enumerate() {
                    v[j].push(us(*t));
                }
                for (d, rd) in diffs.iter_mut().zip(r.diff) {
                    if d.is_none() {
                        *d = rd.map(|x| format!("round {i}: {x}"));
                    }
                }
            }
            let diff = peers
                .iter()
                .zip(&diffs)
                .filter_map(|((_, name, _), d)| d.as_ref().map(|d| format!("vmmu {name}: {d}")))
                .reduce(|a, b| format!("{a}; {b}"));
            rows.push(HarvestRow {
                mode,
                ratio,
                writes: s.len(),
                kvm_us: med(&k),
                kvm_min_us: k.iter().copied().fold(f64::INFINITY, f64::min),
                floor_us: med(&f),
                vmmu_us: v
                    .iter()
                    .map(|x| (med(x), x.iter().copied().fold(f64::INFINITY, f64::min)))
                    .collect(),
                equal: diffs.iter().map(Option::is_none).collect(),
                diff,
            });
        }
        Ok(rows)
    }

    /// Whether `e` says the host's KVM lacks a capability.
    fn unsupported(e: &(dyn std::error::Error + 'static)) -> bool {
        matches!(
            e.downcast_ref::<vmmu_kvm::Error>(),
            Some(vmmu_kvm::Error::KvmUnsupported(_))
        )
    }

    fn fault_row(a: &CompareArgs, backing: HostBacking) -> Result<FaultRow> {
        let slot = SlotConfig::new(u64::from(a.mem_gib) << 30, backing, DirtyLog::Off);
        let (mut kf, mut kd, mut vf, mut vd) = (vec![], vec![], vec![], vec![]);
        let mut huge = None;
        for i in 1..=a.rounds {
            progress(&format!(
                "kvm compare: fault-in and delete, {} backing, round {i}/{}",
                backing.name(),
                a.rounds
            ));
            let mut kvm = vmmu_kvm::open_kvm(&slot)?;
            huge = kvm.host_huge_bytes();
            let k: FaultDelete = compare::fault_in_and_delete(&mut *kvm)?;
            drop(kvm);
            let mut vmmu = VmmuGuest::new(&slot)?;
            let v = compare::fault_in_and_delete(&mut vmmu)?;
            drop(vmmu);
            kf.push(k.fault_ns_per_page());
            kd.push(us(k.delete));
            vf.push(v.fault_ns_per_page());
            vd.push(us(v.delete));
        }
        Ok(FaultRow {
            backing,
            kvm_fault_ns: med(&kf),
            vmmu_fault_ns: med(&vf),
            kvm_delete_us: med(&kd),
            vmmu_delete_us: med(&vd),
            kvm_huge_bytes: huge,
        })
    }

    fn compare_command(a: &CompareArgs) -> Result<()> {
        let mut rows = Vec::new();
        let mut missing = Vec::new();
        for mode in [DirtyLog::Get, DirtyLog::GetClear, DirtyLog::Ring] {
            match harvest_rows(a, mode) {
                Ok(r) => rows.extend(r),
                // A host without the ring still compares the bitmap modes, and says so.
                Err(e) if mode == DirtyLog::Ring && unsupported(&*e) => {
                    missing.push(format!("{}: not measured: {e}", mode.name()));
                }
                Err(e) => return Err(e),
            }
        }
        let faults = HostBacking::ALL
            .iter()
            .map(|&b| fault_row(a, b))
            .collect::<Result<Vec<_>>>()?;
        progress("");
        let mut out = io::stdout().lock();
        if a.json {
            output::write_json(&mut out, &records(a, &rows, &faults))?;
        } else {
            write_tables(&mut out, a, &rows, &faults)?;
        }
        for m in &missing {
            if a.json {
                eprintln!("vmmu kvm compare: {m}");
            } else {
                writeln!(out, "  {m}")?;
            }
        }
        out.flush()?;
        let differ: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                r.diff
                    .as_ref()
                    .map(|d| format!("{} ratio {}: {d}", r.mode.name(), r.ratio))
            })
            .collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "KVM's and vmmu's dirty bitmaps differ: {}",
                differ.join("; ")
            )
            .into())
        }
    }

    fn records(a: &CompareArgs, rows: &[HarvestRow], faults: &[FaultRow]) -> Vec<Record> {
        let mut v = Vec::new();
        for r in rows {
            let p: Map<String, Value> = [
                ("mode", json!(r.mode.name())),
                ("ratio", json!(r.ratio)),
                ("pages_written", json!(r.writes)),
                ("backing", json!("4k")),
                ("mem_gib", json!(a.mem_gib)),
                ("host_populated", json!(true)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            let mut kvm = record(names::KVM, names::HARVEST_US, &p, r.kvm_us, "us");
            kvm.min = Some(r.kvm_min_us);
            v.push(kvm);
            for (((variant, _, _), &(t, min)), &equal) in
                vmmu_peers().iter().zip(&r.vmmu_us).zip(&r.equal)
            {
                let mut rec = record(variant, names::HARVEST_US, &p, t, "us");
                rec.min = Some(min);
                v.push(rec);
                let eq = if equal { 1.0 } else { 0.0 };
                v.push(record(variant, names::BITMAP_EQUAL, &p, eq, "bool"));
            }
        }
        for f in faults {
            let p: Map<String, Value> = [
                ("backing", json!(f.backing.name())),
                ("mem_gib", json!(a.mem_gib)),
                ("host_populated", json!(true)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            v.push(record(
                names::KVM,
                names::FAULT_NS_PER_PAGE,
                &p,
                f.kvm_fault_ns,
                "ns",
            ));
            v.push(record(
                names::VMMU,
                names::FAULT_NS_PER_PAGE,
                &p,
                f.vmmu_fault_ns,
                "ns",
            ));
            v.push(record(
                names::KVM,
                names::DELETE_US,
                &p,
                f.kvm_delete_us,
                "us",
            ));
            v.push(record(
                names::VMMU,
                names::DELETE_US,
                &p,
                f.vmmu_delete_us,
                "us",
            ));
        }
        v
    }

    /// `x.yz` with enough digits for small values, fewer for large ones.
    fn num(v: f64) -> String {
        if v < 10.0 {
            format!("{v:.2}")
        } else if v < 1000.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        }
    }

    fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
        let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for r in rows {
            for (w, c) in w.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let head: Vec<String> = header.iter().map(|s| s.to_string()).collect();
        for (i, r) in std::iter::once(&head).chain(rows).enumerate() {
            let cells: Vec<String> = r
                .iter()
                .zip(&w)
                .enumerate()
                .map(|(j, (c, &w))| {
                    // First column left-aligned, numbers right-aligned.
                    if j == 0 || i == 0 && j == r.len() - 1 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect();
            writeln!(out, "{}", cells.join("  ").trim_end())?;
        }
        Ok(())
    }

    fn write_tables(
        out: &mut impl Write,
        a: &CompareArgs,
        rows: &[HarvestRow],
        faults: &[FaultRow],
    ) -> io::Result<()> {
        let pages = (u64::from(a.mem_gib) << 30) / 4096;
        writeln!(
            out,
            "vmmu kvm compare: a {} GiB data memslot ({pages} pages) at gpa {:#x}, median of {} rounds",
            a.mem_gib,
            vmmu_kvm::image::DATA_GPA,
            a.rounds
        )?;
        writeln!(
            out,
            "  kvm:  /dev/kvm, one vCPU at CPL 3 on 2 MiB guest pages; host memory populated \
             before the VM starts (no host page faults in the figures)"
        )?;
        writeln!(
            out,
            "  vmmu: the same slot over simulated host memory, written through the CPU model; \
             shadow = vmmu's default configuration (the shadow MMU, direct), tdp = the TDP MMU; \
             the first-touch and delete rows are the default's"
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "dirty-log harvest (4 KiB host pages; every page mapped, then each ratio's pages \
             re-dirtied and harvested)"
        )?;
        let body: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let mut row = vec![
                    r.mode.name().to_owned(),
                    format!("{}", r.ratio),
                    r.writes.to_string(),
                    num(r.kvm_us),
                ];
                for &(t, _) in &r.vmmu_us {
                    row.push(num(t));
                    row.push(format!("{}x", num(r.kvm_us / t)));
                }
                row.push(num(r.floor_us));
                row.push(format!("{}x", num(r.kvm_us / r.floor_us)));
                let same = r.equal.iter().all(|&e| e);
                row.push(if same { "identical" } else { "DIFFER" }.to_owned());
                row
            })
            .collect();
        let mut header = vec![
            "mode".to_owned(),
            "ratio".into(),
            "pages".into(),
            "kvm us".into(),
        ];
        for (_, name, _) in vmmu_peers() {
            header.push(format!("{name} us"));
            header.push(format!("kvm/{name}"));
        }
        header.push("floor us".into());
        header.push("kvm/floor".into());
        header.push("bitmaps".into());
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(out, &header, &body)?;
        writeln!(
            out,
            "  floor: the least work of any harvest of the same pages (a copy of the bitmap, \
             one RMW per dirty word, one store per dirty SPTE, a flush request; `vmmu bench \
             floor`), timed in every round; kvm/floor is the most any MMU could lead KVM by"
        )?;
        for r in rows {
            if let Some(d) = &r.diff {
                writeln!(out, "  {} ratio {}: {d}", r.mode.name(), r.ratio)?;
            }
        }
        writeln!(out)?;
        writeln!(
            out,
            "first touch of every page of a fresh slot (no dirty logging), then deleting the \
             fully mapped slot"
        )?;
        let body: Vec<Vec<String>> = faults
            .iter()
            .map(|f| {
                vec![
                    f.backing.name().to_owned(),
                    num(f.kvm_fault_ns),
                    num(f.vmmu_fault_ns),
                    format!("{}x", num(f.kvm_fault_ns / f.vmmu_fault_ns)),
                    num(f.kvm_delete_us),
                    num(f.vmmu_delete_us),
                    format!("{}x", num(f.kvm_delete_us / f.vmmu_delete_us)),
                ]
            })
            .collect();
        table(
            out,
            &[
                "backing",
                "kvm fault ns/page",
                "vmmu fault ns/page",
                "kvm/vmmu",
                "kvm delete us",
                "vmmu delete us",
                "kvm/vmmu",
            ],
            &body,
        )?;
        for f in faults {
            if f.backing == HostBacking::Thp {
                match f.kvm_huge_bytes {
                    Some(b) => writeln!(
                        out,
                        "  2m: the host backed {:.2} of {} GiB of KVM's slot with THP",
                        b as f64 / (1u64 << 30) as f64,
                        a.mem_gib
                    )?,
                    None => writeln!(out, "  2m: how much THP the host gave is unknown")?,
                }
            }
        }
        Ok(())
    }

    fn conformance_command(a: &ConformanceArgs) -> Result<()> {
        let mut out = io::stdout().lock();
        let mut differ = 0;
        for (i, slot) in conformance::standard_slots().iter().enumerate() {
            progress(&format!(
                "kvm conformance: {} slot of {} pages, {} rounds",
                slot.log.name(),
                slot.pages(),
                a.rounds
            ));
            let mut kvm = vmmu_kvm::open_kvm(slot)?;
            let mut vmmu = VmmuGuest::new(slot)?;
            let r = conformance::run(&mut *kvm, &mut vmmu, a.rounds, a.seed + i as u64)?;
            progress("");
            writeln!(out, "{r}")?;
            for m in &r.mismatches {
                writeln!(out, "  {m}")?;
            }
            differ += r.mismatch_count;
        }
        out.flush()?;
        if differ == 0 {
            Ok(())
        } else {
            Err(format!("{differ} harvested bitmaps differ between KVM and vmmu").into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_parse_and_are_bounded() {
        assert_eq!(parse_ratio("0.5"), Ok(0.5));
        assert_eq!(parse_ratio(" 1 "), Ok(1.0));
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("x").is_err());
    }

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse_seed("12"), Ok(12));
        assert_eq!(parse_seed("0x10"), Ok(16));
        assert!(parse_seed("0xg").is_err());
    }
}
