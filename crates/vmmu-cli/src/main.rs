//! `vmmu`: benchmarks for the vmmu MMU.
//!
//! `vmmu bench <scenario> [--mem-gib N] [--runs R] [--json]` runs a scenario and prints the
//! median of each measurement; `vmmu bench list` prints the scenarios. With `--json`, stdout
//! carries only the records, one JSON object a line; progress goes to stderr. Exit codes:
//! 0 success, 1 a scenario or output failed, 2 a usage error (clap's convention).

mod bench;
mod kvm;
#[cfg(target_os = "linux")]
mod migrate;
mod perf;
mod report;
mod soak;

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use bench::{BenchConfig, Scenario};

/// vmmu: a KVM-style x86-64 MMU, measured in user space.
#[derive(Parser, Debug)]
#[command(name = "vmmu", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a benchmark scenario and print the median of each measurement.
    Bench(BenchArgs),
    /// Side by side with the host's KVM (/dev/kvm): dirty bitmaps and costs.
    Kvm(kvm::KvmArgs),
    /// The KVM selftests' MMU performance tests (dirty_log_perf_test, ...), with their
    /// flags and printed lines, on vmmu and on the host's KVM side by side.
    Perf(perf::PerfArgs),
    /// Every scenario, the floor and KVM in one run: writes index.html, report.md and
    /// results.json, and prints the seeds' claims against the measurements.
    Report(report::ReportArgs),
    /// Live migration end to end on real memory: pre-copy rounds by dirty-log mode over
    /// a modelled link, stop-and-copy, the destination compared byte for byte.
    #[cfg(target_os = "linux")]
    Migrate(migrate::MigrateArgs),
    /// Concurrent soak: vCPU, harvester, notifier and memslot threads for a bounded time,
    /// with the audit and the reference model's checks at quiescent points.
    Soak(soak::SoakArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Scenario to run, or `list` to print the scenarios.
    #[arg(value_parser = scenario_parser(), required_unless_present = "list")]
    scenario: Option<ScenarioArg>,

    /// Print the scenarios with a one-line description and exit.
    #[arg(long, conflicts_with = "scenario")]
    list: bool,

    /// Size of the guest memory slot, in GiB (1..=64).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    mem_gib: u32,

    /// Number of runs; each value reported is the median over the runs (>= 1).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,

    /// Print one JSON object per record on stdout, and nothing else.
    #[arg(long)]
    json: bool,

    /// The smaller workload `vmmu report --quick` runs: slots and fixed workloads 16 times
    /// smaller; the records carry `"quick": true`.
    #[arg(long)]
    quick: bool,

    #[command(flatten)]
    scale: ScaleArgs,
}

/// The flags of `vmmu bench scale` (a usage error with any other scenario).
#[derive(Args, Debug, Default)]
#[command(next_help_heading = "scale")]
struct ScaleArgs {
    /// scale: guest memory in GiB (up to 1024 at 4k backing, 12288 at 2m) [default: 16]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=12288))]
    guest_gib: Option<u32>,
    /// scale: host backing [default: 4k, then 2m]
    #[arg(long, value_parser = ["4k", "2m"])]
    backing: Option<String>,
    /// scale: vCPU threads (1..=256) [default: 2]
    #[arg(short = 'v', long, value_parser = clap::value_parser!(u32).range(1..=256))]
    vcpus: Option<u32>,
    /// scale: memslots the guest is cut into (each at most KVM's 2^31 - 1 pages) [default: 4]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=512))]
    slots: Option<u32>,
    /// scale: the MMU [default: tdp]
    #[arg(long, value_parser = ["tdp", "shadow"])]
    mmu: Option<String>,
    /// scale: zap huge pages when logging starts instead of splitting them (KVM's
    /// eager_page_split=N)
    #[arg(long)]
    no_eager_split: bool,
}

impl ScaleArgs {
    fn given(&self) -> bool {
        self.guest_gib.is_some()
            || self.backing.is_some()
            || self.vcpus.is_some()
            || self.slots.is_some()
            || self.mmu.is_some()
            || self.no_eager_split
    }

    fn config(&self) -> bench::scale::ScaleConfig {
        let d = bench::scale::ScaleConfig::default();
        bench::scale::ScaleConfig {
            guest_gib: self.guest_gib.unwrap_or(d.guest_gib),
            backing: self.backing.as_deref().map(|b| match b {
                "4k" => bench::guest::HostBacking::Page4K,
                _ => bench::guest::HostBacking::Thp,
            }),
            vcpus: self.vcpus.unwrap_or(d.vcpus),
            slots: self.slots.unwrap_or(d.slots),
            mmu: match self.mmu.as_deref() {
                Some("shadow") => bench::scale::ScaleMmu::Shadow,
                _ => bench::scale::ScaleMmu::Tdp,
            },
            no_eager_split: self.no_eager_split,
        }
    }
}

/// What may follow `vmmu bench`.
#[derive(Clone, Copy, Debug)]
enum ScenarioArg {
    List,
    Run(&'static Scenario),
}

/// Accepts exactly the registry's names and `list`; anything else is a usage error that
/// lists the valid names (exit code 2).
fn scenario_parser() -> impl TypedValueParser<Value = ScenarioArg> {
    let names = bench::SCENARIOS
        .iter()
        .map(|s| PossibleValue::new(s.name).help(s.about))
        .chain([PossibleValue::new("list").help("print the scenarios and exit")]);
    PossibleValuesParser::new(names).map(|name| match bench::find(&name) {
        Some(scenario) => ScenarioArg::Run(scenario),
        None => ScenarioArg::List,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench_command(&args),
        Command::Kvm(args) => kvm::run(&args),
        Command::Perf(args) => perf::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Soak(args) => soak::run(&args),
        #[cfg(target_os = "linux")]
        Command::Migrate(args) => migrate::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmmu: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench_command(args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut stdout = io::stdout().lock();
    let scenario = match args.scenario {
        Some(ScenarioArg::Run(scenario)) if !args.list => scenario,
        _ => return Ok(bench::output::write_list(&mut stdout, bench::SCENARIOS)?),
    };
    let is_scale = scenario.name == bench::names::scale::NAME;
    if args.scale.given() && !is_scale {
        usage_error(format!(
            "--guest-gib, --backing, --vcpus, --slots, --mmu and --no-eager-split are flags \
             of `vmmu bench scale`, not of `{}`",
            scenario.name
        ));
    }
    let config = BenchConfig {
        quick: args.quick,
        scale: args.scale.config(),
        ..BenchConfig::new(args.mem_gib)
    };
    if is_scale {
        if let Err(e) = bench::scale::check(&config.scale, config.quick) {
            usage_error(e);
        }
    }
    let progress = Progress::new(scenario.name);
    let records = bench::run(scenario, &config, args.runs, |i, n| progress.run(i, n))?;
    progress.done();
    if args.json {
        bench::output::write_json(&mut stdout, &records)?;
    } else {
        bench::output::write_table(&mut stdout, &records)?;
    }
    Ok(stdout.flush()?)
}

/// Exit with clap's usage-error status (2) and `message`.
fn usage_error(message: String) -> ! {
    use clap::CommandFactory;
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

/// Run-by-run progress on stderr: one line rewritten in place on a terminal, nothing when
/// stderr is redirected (so logs hold only what matters).
struct Progress {
    scenario: &'static str,
    live: bool,
}

impl Progress {
    fn new(scenario: &'static str) -> Self {
        Progress {
            scenario,
            live: io::stderr().is_terminal(),
        }
    }

    fn run(&self, i: u32, runs: u32) {
        if self.live {
            eprint!("\r\x1b[2K{}: run {i}/{runs}", self.scenario);
        }
    }

    fn done(&self) {
        if self.live {
            eprint!("\r\x1b[2K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli = Cli::try_parse_from(["vmmu", "bench"].iter().chain(args))?;
        let Command::Bench(b) = cli.command else {
            unreachable!("parsed `bench`")
        };
        Ok(b)
    }

    #[test]
    fn defaults() {
        let b = parse(&["zap"]).unwrap();
        assert!(matches!(b.scenario, Some(ScenarioArg::Run(s)) if s.name == "zap"));
        assert_eq!((b.mem_gib, b.runs, b.json, b.quick), (1, 5, false, false));
        assert!(parse(&["zap", "--quick"]).unwrap().quick);
    }

    #[test]
    fn list_forms() {
        assert!(matches!(
            parse(&["list"]).unwrap().scenario,
            Some(ScenarioArg::List)
        ));
        assert!(parse(&["--list"]).unwrap().list);
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["no-such"][..],
            &["zap", "--mem-gib", "0"],
            &["zap", "--mem-gib", "65"],
            &["zap", "--runs", "0"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let msg = parse(&["no-such"]).unwrap_err().to_string();
        assert!(msg.contains("fault-in") && msg.contains("zap"), "{msg}");
    }

    #[test]
    fn perf_flags_parse_as_the_selftests_and_bad_ones_exit_2() {
        let ok = Cli::try_parse_from([
            "vmmu",
            "perf",
            "dirty-log",
            "-v",
            "2",
            "-b",
            "64M",
            "-i",
            "3",
            "-g",
            "-s",
            "anonymous_thp",
            "-x",
            "2",
            "-w",
            "50",
            "-a",
            "-o",
            "-e",
            "-r",
            "7",
            "--target",
            "vmmu",
            "--mmu",
            "shadow",
            "--json",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        for args in [
            &["dirty-log", "-v", "0"][..],
            &["dirty-log", "-i", "1"],
            &["dirty-log", "-w", "101"],
            &["dirty-log", "-b", "1X"],
            &["dirty-log", "-s", "shm"],
            &["dirty-log", "-x", "0"],
            &["dirty-log", "-q"],
            &["dirty-log", "--mmu", "ept"],
            &["pre-fault", "-v", "0"],
            &["page-table", "-b", "lots"],
            &["no-such-test"],
        ] {
            let err = Cli::try_parse_from(["vmmu", "perf"].iter().chain(args)).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let msg = Cli::try_parse_from(["vmmu", "perf", "dirty-log", "-v", "0"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("between 1 and"), "{msg}");
    }
}
