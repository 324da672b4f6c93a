//! The report's `kvm-compare` source: `vmmu kvm compare --json`, run as a child process of
//! this same binary so that the report shows exactly what that command measures.
//!
//! Where it cannot run, the report says why and measures everything else:
//! - built without the `kvm` feature: "not available in this build";
//! - the KVM device cannot be opened (no `/dev/kvm`, no permission, not x86-64 Linux):
//!   "skipped: cannot open ...". `VMMU_KVM_DEVICE` names another device path, as for
//!   `vmmu kvm` (a test uses it to check the skip).
//!
//! When the child fails after printing records (the bitmaps differed), the records are kept
//! and the source is reported failed with the child's error.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::bench::dirty_ratio::RATIOS;
use crate::bench::Record;

/// The scenario name of the records `vmmu kvm compare --json` prints.
pub const NAME: &str = crate::bench::names::kvm_compare::NAME;

/// Whether the comparison can run here.
#[derive(Clone, Debug, PartialEq)]
pub enum Availability {
    /// The KVM device opens.
    #[cfg_attr(not(feature = "kvm"), allow(dead_code))]
    Available,
    /// The KVM device does not open; the reason.
    #[cfg_attr(not(feature = "kvm"), allow(dead_code))]
    NoDevice(String),
    /// This binary was built without the `kvm` feature.
    #[cfg_attr(feature = "kvm", allow(dead_code))]
    NotBuilt,
}

impl Availability {
    /// Asks the host, without creating a VM.
    pub fn probe() -> Self {
        #[cfg(feature = "kvm")]
        {
            match vmmu_kvm::kvm_available() {
                Ok(()) => Availability::Available,
                Err(vmmu_kvm::Error::KvmUnavailable(why)) => Availability::NoDevice(why),
                Err(e) => Availability::NoDevice(e.to_string()),
            }
        }
        #[cfg(not(feature = "kvm"))]
        {
            Availability::NotBuilt
        }
    }

    /// Why it was not run, as the report says it (`None` when available).
    pub fn skip_reason(&self) -> Option<String> {
        match self {
            Availability::Available => None,
            Availability::NoDevice(why) => Some(format!("skipped: cannot open {why}")),
            Availability::NotBuilt => {
                Some("not available in this build (built without the `kvm` feature)".to_owned())
            }
        }
    }
}

/// The command-line arguments after the binary: a quick run measures fewer ratios.
pub fn args(mem_gib: u32, rounds: u32, quick: bool) -> Vec<String> {
    let ratios: Vec<String> = if quick {
        ["0", "0.001", "0.1", "1"].map(String::from).to_vec()
    } else {
        RATIOS.iter().map(|r| r.to_string()).collect()
    };
    vec![
        "kvm".into(),
        "compare".into(),
        "--json".into(),
        "--mem-gib".into(),
        mem_gib.to_string(),
        "--rounds".into(),
        rounds.to_string(),
        "--ratios".into(),
        ratios.join(","),
    ]
}

/// What the child produced: its records, and its error when it failed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Records parsed from its stdout.
    pub records: Vec<Record>,
    /// Set when it exited unsuccessfully or printed something that is not a record.
    pub error: Option<String>,
}

/// Runs `exe kvm compare --json ...` and collects its records.
pub fn run(exe: &Path, args: &[String]) -> Outcome {
    let out = match Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            return Outcome {
                records: Vec::new(),
                error: Some(format!("cannot run {}: {e}", exe.display())),
            }
        }
    };
    let mut outcome = parse(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let why = last.unwrap_or("no message").trim();
        let why = why.strip_prefix("vmmu: error: ").unwrap_or(why);
        outcome.error = Some(format!("`vmmu kvm compare` failed ({}): {why}", out.status));
    }
    outcome
}

/// Parses JSON lines into records; a line that is not a record is an error.
pub fn parse(stdout: &str) -> Outcome {
    let mut outcome = Outcome::default();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Record>(line) {
            Ok(r) => outcome.records.push(r),
            Err(e) => {
                outcome.error = Some(format!("not a record: {line:?}: {e}"));
                break;
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_say_why() {
        assert_eq!(Availability::Available.skip_reason(), None);
        let no = Availability::NoDevice("/dev/kvm: No such file or directory (os error 2)".into());
        assert_eq!(
            no.skip_reason().unwrap(),
            "skipped: cannot open /dev/kvm: No such file or directory (os error 2)"
        );
        assert!(Availability::NotBuilt
            .skip_reason()
            .unwrap()
            .starts_with("not available in this build"));
    }

    #[test]
    fn args_follow_the_kvm_compare_command_line() {
        let a = args(2, 5, false);
        assert_eq!(&a[..3], ["kvm", "compare", "--json"]);
        assert_eq!(a[4], "2");
        assert_eq!(a[6], "5");
        assert_eq!(a[8], "0,0.0001,0.001,0.01,0.1,0.5,1");
        assert_eq!(args(1, 1, true)[8], "0,0.001,0.1,1");
    }

    #[test]
    fn parses_the_contracts_records() {
        let text = concat!(
            r#"{"scenario":"kvm-compare","variant":"kvm","metric":"harvest_us","value":12.5,"unit":"us","params":{"mode":"get","ratio":0.01}}"#,
            "\n",
            r#"{"scenario":"kvm-compare","variant":"vmmu","metric":"bitmap_equal","value":1.0,"unit":"bool","params":{"mode":"get","ratio":0.01}}"#,
            "\n"
        );
        let o = parse(text);
        assert!(o.error.is_none());
        assert_eq!(o.records.len(), 2);
        assert_eq!(o.records[0].variant, "kvm");
        assert_eq!(o.records[0].value, 12.5);
        assert_eq!(o.records[1].params["mode"], "get");
        let bad = parse("{\"scenario\": 1}\n");
        assert!(bad.error.is_some() && bad.records.is_empty());
    }

    #[test]
    fn a_missing_binary_is_an_error_not_a_panic() {
        let o = run(Path::new("/nonexistent/vmmu"), &args(1, 1, true));
        assert!(o.records.is_empty());
        assert!(o.error.unwrap().contains("cannot run"));
    }
}
