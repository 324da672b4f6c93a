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
//!
//! [`host_mmu`] says which of its MMUs the host's KVM runs the comparison on (its shadow MMU
//! under PVM or with `tdp_mmu=N`), from the module parameters, for the report's opening.

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

/// Which of its MMUs the host's KVM runs guests on, read from its module parameters
/// (`/sys/module/...`, no device opened), as the report's KVM section states it; `None`
/// where the parameters cannot be read (not Linux, KVM not loaded).
pub fn host_mmu() -> Option<String> {
    let param = |module: &str, name: &str| {
        std::fs::read_to_string(format!("/sys/module/{module}/parameters/{name}"))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    // With PVM beside a hardware vendor module, which one /dev/kvm serves is not said here:
    // only the `tdp_mmu` parameter is read.
    let vendor = match (pvm, param("kvm_intel", "ept"), param("kvm_amd", "npt")) {
        (true, None, None) => Vendor::Pvm,
        (false, Some(ept), _) => Vendor::TwoDimensional("kvm_intel", "ept", ept),
        (false, None, Some(npt)) => Vendor::TwoDimensional("kvm_amd", "npt", npt),
        _ => Vendor::Unknown,
    };
    describe_host_mmu(param("kvm", "tdp_mmu").as_deref(), &vendor)
}

/// The host's KVM vendor module, as [`host_mmu`] finds it.
#[derive(Clone, Debug, PartialEq)]
enum Vendor {
    /// `kvm_pvm`: guests run on shadow page tables, never on EPT or NPT.
    Pvm,
    /// `kvm_intel` or `kvm_amd`, the name of its two-dimensional paging parameter and
    /// that parameter's value (`Y`/`N` or `1`/`0`).
    TwoDimensional(&'static str, &'static str, String),
    /// None found, or PVM beside a hardware one.
    Unknown,
}

/// `its shadow MMU (kvm_pvm, kvm.tdp_mmu=N: PVM has no EPT or NPT, ...)`: the MMU, then
/// the parameters it is read from and why they mean it.
fn describe_host_mmu(tdp_mmu: Option<&str>, vendor: &Vendor) -> Option<String> {
    let on = |v: &str| matches!(v, "Y" | "y" | "1");
    let tdp = tdp_mmu.map(|v| format!("kvm.tdp_mmu={v}"));
    let shadowing = "KVM shadows the guest's page tables";
    let (facts, mmu, why): (Vec<String>, &str, String) = match vendor {
        Vendor::Pvm => (
            ["kvm_pvm".to_owned()].into_iter().chain(tdp).collect(),
            "its shadow MMU",
            format!("PVM has no EPT or NPT, {shadowing}"),
        ),
        Vendor::TwoDimensional(module, name, v) => {
            let facts = [format!("{module}.{name}={v}")]
                .into_iter()
                .chain(tdp)
                .collect();
            let (mmu, why) = if !on(v) {
                (
                    "its shadow MMU",
                    format!("no two-dimensional paging, {shadowing}"),
                )
            } else if tdp_mmu.is_some_and(on) {
                ("its TDP MMU", "tdp_mmu.c over EPT/NPT".to_owned())
            } else if tdp_mmu.is_some() {
                (
                    "its shadow MMU in direct mode",
                    "mmu.c over EPT/NPT, the TDP MMU off".to_owned(),
                )
            } else {
                ("EPT/NPT", "which of its MMUs is not said".to_owned())
            };
            (facts, mmu, why)
        }
        Vendor::Unknown => {
            let (mmu, why) = if tdp_mmu.is_some_and(on) {
                ("its TDP MMU", "where the CPU has EPT or NPT")
            } else {
                ("its shadow MMU", "the TDP MMU off")
            };
            (vec![tdp?], mmu, why.to_owned())
        }
    };
    Some(format!("{mmu} ({}: {why})", facts.join(", ")))
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
    run_child(exe, args, "vmmu kvm compare")
}

/// Runs `exe` with `args` (a `--json` command of this binary, named `what` in errors) and
/// collects the records it prints; its last stderr line says why when it fails.
pub fn run_child(exe: &Path, args: &[String], what: &str) -> Outcome {
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
        outcome.error = Some(format!("`{what}` failed ({}): {why}", out.status));
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
    fn the_hosts_mmu_follows_its_module_parameters() {
        let d = |t: Option<&str>, v: Vendor| describe_host_mmu(t, &v).unwrap();
        assert_eq!(
            d(Some("N"), Vendor::Pvm),
            "its shadow MMU (kvm_pvm, kvm.tdp_mmu=N: PVM has no EPT or NPT, KVM shadows \
             the guest's page tables)"
        );
        let ept = |v: &str| Vendor::TwoDimensional("kvm_intel", "ept", v.into());
        assert!(d(Some("Y"), ept("Y")).starts_with("its TDP MMU (kvm_intel.ept=Y, kvm.tdp_mmu=Y:"));
        assert!(d(Some("N"), ept("Y")).starts_with("its shadow MMU in direct mode"));
        let no_ept = d(Some("Y"), ept("N"));
        assert!(
            no_ept.starts_with("its shadow MMU (kvm_intel.ept=N, kvm.tdp_mmu=Y: no two-"),
            "{no_ept}"
        );
        let npt = Vendor::TwoDimensional("kvm_amd", "npt", "1".into());
        assert!(d(Some("1"), npt).starts_with("its TDP MMU"));
        assert_eq!(describe_host_mmu(None, &Vendor::Unknown), None);
        assert_eq!(
            d(Some("N"), Vendor::Unknown),
            "its shadow MMU (kvm.tdp_mmu=N: the TDP MMU off)"
        );
    }

    #[test]
    fn a_missing_binary_is_an_error_not_a_panic() {
        let o = run(Path::new("/nonexistent/vmmu"), &args(1, 1, true));
        assert!(o.records.is_empty());
        assert!(o.error.unwrap().contains("cannot run"));
    }
}
