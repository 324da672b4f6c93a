//! `vmmu`: benchmarks for the vmmu MMU.
//!
//! `vmmu bench <scenario> [--mem-gib N] [--runs R] [--json]` runs a scenario and prints the
//! median of each measurement; `vmmu bench list` prints the scenarios. With `--json`, stdout
//! carries only the records, one JSON object a line; progress goes to stderr. Exit codes:
//! 0 success, 1 a scenario or output failed, 2 a usage error (clap's convention).

mod bench;
mod kvm;
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
    /// Every scenario, the floor and KVM in one run: writes index.html, report.md and
    /// results.json, and prints the seeds' claims against the measurements.
    Report(report::ReportArgs),
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
        Command::Report(args) => report::run(&args),
        Command::Soak(args) => soak::run(&args),
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
    let config = BenchConfig {
        quick: args.quick,
        ..BenchConfig::new(args.mem_gib)
    };
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
}
