//! The report's `migrate` source: `vmmu migrate --json` as a child process of this same
//! binary (live migration on real memory, every harvest mode on both MMUs; with the host's
//! KVM where it opens, `--target both`), so the report shows what that command measures.
//! Its records go into the report's tables like any scenario's (scenario `migrate`).
//! Where it cannot run (not Linux), the report says why.

use std::path::Path;

use super::kvm::Outcome;

/// The scenario name of the records `vmmu migrate --json` prints.
pub const NAME: &str = "migrate";

/// The command line: a 32 MiB guest with `quick`, else 64 MiB, once per MMU and mode; a
/// uniform workload at a million accesses a second over a 1 GiB/s link with a 30 ms
/// budget, at most 5 rounds; on KVM too when `kvm`. (256 MiB three times took 264 s of a
/// 513 s report on this 2-core machine: `vmmu migrate` is where the large runs are.)
pub fn args(quick: bool, kvm: bool) -> Vec<String> {
    let (mib, runs) = if quick { ("32", "1") } else { ("64", "1") };
    let mut a: Vec<String> = [
        "migrate",
        "--json",
        "--mmu",
        "both",
        "--mode",
        "all",
        "--mem-mib",
        mib,
        "--runs",
        runs,
        "--dirty-rate",
        "1000000",
        "--bandwidth",
        "1024",
        "--downtime-ms",
        "30",
        "--max-rounds",
        "5",
        "--target",
        if kvm { "both" } else { "vmmu" },
    ]
    .map(String::from)
    .to_vec();
    if quick {
        a.push("--quick".into());
    }
    a
}

/// Runs `exe migrate --json ...` and collects its records.
pub fn run(exe: &Path, args: &[String]) -> Outcome {
    super::kvm::run_child(exe, args, "vmmu migrate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_the_migrate_command_line() {
        let a = args(true, false);
        assert_eq!(&a[..2], ["migrate", "--json"]);
        assert_eq!(a.last().map(String::as_str), Some("--quick"));
        assert!(a.contains(&"vmmu".to_string()));
        assert_eq!(args(false, true).last().map(String::as_str), Some("both"));
    }
}
