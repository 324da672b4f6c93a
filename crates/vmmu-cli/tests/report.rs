//! `vmmu report`: the files it writes and what they hold. No test here checks a measured
//! value, only that everything measured is there and in the contract's shape.
//!
//! The always-on test runs `--quick` on the debug binary (about 10 s: slots and fixed
//! workloads 16 times smaller, one run) with `VMMU_KVM_DEVICE` pointing nowhere, so it
//! also checks that an unavailable KVM is reported as skipped. The test with the host's
//! KVM is ignored: in a debug build vmmu's side of the comparison takes most of a minute.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn vmmu(args: &[&str], device: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmmu"));
    c.args(args);
    if let Some(d) = device {
        c.env("VMMU_KVM_DEVICE", d);
    }
    c.output().expect("run vmmu")
}

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmmu-report-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The registry's scenario names, as `vmmu bench list` prints them.
fn scenario_names() -> Vec<String> {
    let out = vmmu(&["bench", "list"], None);
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// The first section of a document: `heading`, the first of its headings (each starts
/// with `h2`), must come before the seeds' claims. Returns its text, up to the seeds'
/// heading.
fn opening<'a>(doc: &'a str, h2: &str, heading: &str, seeds: &str, what: &str) -> &'a str {
    let at = doc
        .find(heading)
        .unwrap_or_else(|| panic!("{what}: no section {heading:?}"));
    let end = doc
        .find(seeds)
        .unwrap_or_else(|| panic!("{what}: no section {seeds:?}"));
    assert!(
        at < end,
        "{what}: KVM's section must come before the seeds'"
    );
    assert_eq!(
        doc.find(h2),
        Some(at),
        "{what}: KVM's section must be the first"
    );
    &doc[at..end]
}

/// The KVM section of both documents, as (report.md's, index.html's).
fn openings<'a>(md: &'a str, html: &'a str) -> (&'a str, &'a str) {
    (
        opening(
            md,
            "## ",
            "## vmmu against the host's KVM",
            "## The seeds' claims",
            "report.md",
        ),
        opening(
            html,
            "<h2",
            "<h2 id=\"kvm\">vmmu against the host&#39;s KVM</h2>",
            "<h2 id=\"seeds\">",
            "index.html",
        ),
    )
}

/// Runs `vmmu report --quick --out DIR` and checks everything but KVM; returns the parsed
/// results.json, the page and the document.
fn quick_report(dir: &Path, device: Option<&str>) -> (Value, String, String) {
    let out = vmmu(
        &["report", "--quick", "--out", dir.to_str().unwrap()],
        device,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for f in ["index.html", "report.md", "results.json"] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }

    // results.json: the run, every source, the seed rows and every record in the contract.
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
            .expect("results.json parses");
    assert_eq!(json["meta"]["quick"], true);
    let records = json["records"].as_array().expect("records");
    for r in records {
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        if r["scenario"] == "kvm-compare" {
            // Medians over interleaved rounds, not the harness's runs: no CPU ruler, and a
            // minimum only on the harvests (KVM's and vmmu's).
            if r["metric"] == "harvest_us" {
                assert!(
                    r["min"].as_f64().unwrap() <= r["value"].as_f64().unwrap(),
                    "{r}"
                );
                keys.retain(|k| *k != "min");
            }
            assert_eq!(
                keys,
                ["metric", "params", "scenario", "unit", "value", "variant"],
                "{r}"
            );
        } else if r["scenario"] == "migrate" {
            // `vmmu migrate`'s: medians and minimums over its runs, no CPU ruler.
            assert_eq!(
                keys,
                ["metric", "min", "params", "scenario", "unit", "value", "variant"],
                "{r}"
            );
            if r["metric"] == "identical" {
                assert_eq!(r["value"].as_f64(), Some(1.0), "{r}");
            }
        } else {
            // The harness's: the minimum and the CPU ruler beside the median.
            assert_eq!(
                keys,
                ["metric", "min", "params", "ruler", "scenario", "unit", "value", "variant"]
            );
            assert!(
                r["min"].as_f64().unwrap() <= r["value"].as_f64().unwrap(),
                "{r}"
            );
        }
        assert!(r["value"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    let sources = json["sources"].as_array().expect("sources");
    let status = |name: &str| {
        sources
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["state"]["status"].as_str().unwrap().to_owned())
    };
    for name in scenario_names().iter().map(String::as_str) {
        assert_eq!(status(name).as_deref(), Some("ok"), "{name}");
        let source = sources.iter().find(|s| s["name"] == name).unwrap();
        assert!(source["ruler"]["samples"].as_u64() >= Some(2), "{source}");
        assert!(
            records.iter().any(|r| r["scenario"] == name),
            "no record of {name}"
        );
    }
    // Quick records say so; kvm-compare's (full size, fewer rounds) do not.
    assert!(records
        .iter()
        .filter(|r| r["scenario"] != "kvm-compare")
        .all(|r| r["params"]["quick"] == true));
    let seeds = json["seeds"].as_array().expect("seeds");
    let ids: Vec<&str> = seeds.iter().map(|s| s["seed"].as_str().unwrap()).collect();
    assert_eq!(ids, ["000", "001", "002", "003", "004"]);
    assert!(seeds.iter().all(|s| s["verdict"] != "no-data"), "{seeds:?}");

    // index.html: self-contained, with a plot per figure that has data.
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    for banned in ["<script", "<link", "<img", "src="] {
        assert!(
            !html.contains(banned),
            "the page must not load anything: {banned}"
        );
    }
    assert!(html.matches("<svg").count() >= 8, "plots missing");
    for text in [
        "reverse-map length (SPTEs per gfn, log)",
        "time per SPTE visited (ns, log)",
        "iterator (rmap_get_first/next, seed 000)",
        "restart-scan (pte_list_next, before)",
        "pages written, log)",
        "per-gfn (rmap_write_protect, seed 004)",
        "ring (harvest + KVM_RESET_DIRTY_RINGS)",
        "floor: bitmap copy, RMW per dirty word, store per dirty SPTE, flush",
        "TDP iteration mode",
        "children forked, each reading every page (log)",
        "CPU ruler spread</th>",
        "CPU ruler spread: the slowest over the fastest timing",
    ] {
        assert!(html.contains(text), "index.html lacks {text:?}");
    }

    // report.md: the same seed table and tables.
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| seed | claim | variants compared | measured | rule | held |"));
    assert!(md.contains("**rmap-iter · ns_per_spte (ns)**"));
    assert!(md.contains("| seconds | CPU ruler spread |"));

    // stdout ends with the seed table.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: Vec<&str> = stdout.lines().rev().take(6).collect();
    assert!(
        last[5].starts_with("seed") && last[5].ends_with("held"),
        "{stdout}"
    );
    for (line, seed) in last[..5]
        .iter()
        .rev()
        .zip(["000", "001", "002", "003", "004"])
    {
        assert!(line.starts_with(seed), "{stdout}");
    }
    (json, html, md)
}

#[test]
fn quick_report_writes_the_page_the_document_and_the_data() {
    let dir = TempDir::new("quick");
    let (json, html, md) = quick_report(&dir.0, Some("/nonexistent/kvm"));
    let kvm = json["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "kvm-compare")
        .expect("kvm-compare is listed");
    assert_eq!(kvm["state"]["status"], "skipped");
    let reason = kvm["state"]["reason"].as_str().unwrap();
    if cfg!(feature = "kvm") {
        assert!(reason.contains("/nonexistent/kvm"), "{reason}");
        assert!(html.contains("kvm-compare skipped: cannot open /nonexistent/kvm"));
    } else {
        assert!(
            reason.starts_with("not available in this build"),
            "{reason}"
        );
    }
    // The page still opens with KVM's section, one line saying why, and no table.
    let why = format!("Not measured in this run: kvm-compare {reason}");
    let (md_kvm, html_kvm) = openings(&md, &html);
    assert!(md_kvm.contains(&why), "{md_kvm}");
    assert!(!md_kvm.contains("| mode |"), "{md_kvm}");
    assert!(
        html_kvm.contains("<p class=\"note\">Not measured in this run"),
        "{html_kvm}"
    );
    assert!(!html_kvm.contains("<table"), "{html_kvm}");
}

#[test]
#[ignore = "runs the KVM comparison: most of a minute in a debug build, needs /dev/kvm"]
fn quick_report_with_the_hosts_kvm() {
    let dir = TempDir::new("kvm");
    let (json, html, md) = quick_report(&dir.0, None);
    let records = json["records"].as_array().unwrap();
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let kvm: Vec<&Value> = records
        .iter()
        .filter(|r| r["scenario"] == "kvm-compare")
        .collect();
    let (md_kvm, html_kvm) = openings(&md, &html);
    if !kvm_opens {
        assert!(kvm.is_empty());
        assert!(
            md_kvm.contains("Not measured in this run: kvm-compare"),
            "{md_kvm}"
        );
        assert!(html_kvm.contains("Not measured in this run: kvm-compare"));
        return;
    }
    // The opening: both MMUs in every mode, first touch and delete, and how to read them.
    assert!(
        md_kvm.contains("| mode | ratio | KVM us | vmmu shadow us | KVM/shadow | vmmu TDP us | KVM/TDP | bitmaps identical |"),
        "{md_kvm}"
    );
    for mode in ["get", "get-clear"] {
        assert!(
            md_kvm.contains(&format!("\n| {mode} | 0 | ")),
            "{mode}: {md_kvm}"
        );
    }
    assert!(
        md_kvm.contains("| backing | KVM first touch ns/page |"),
        "{md_kvm}"
    );
    assert!(
        md_kvm.contains("\n| 4k | ") && md_kvm.contains("\n| 2m | "),
        "{md_kvm}"
    );
    assert!(md_kvm.contains("`vmmu kvm compare`"), "{md_kvm}");
    assert!(!md_kvm.contains("Not measured"), "{md_kvm}");
    assert_eq!(html_kvm.matches("<table>").count(), 2, "{html_kvm}");
    assert!(
        html_kvm.contains("<th>KVM/TDP</th>") && html_kvm.contains("<code>vmmu kvm compare</code>")
    );
    for (variant, metric) in [
        ("kvm", "harvest_us"),
        ("vmmu", "harvest_us"),
        ("kvm", "delete_us"),
        ("kvm", "fault_ns_per_page"),
    ] {
        assert!(
            kvm.iter()
                .any(|r| r["variant"] == variant && r["metric"] == metric),
            "{variant} {metric}"
        );
    }
    assert!(html.contains("KVM get (/dev/kvm)"));
}

#[test]
fn report_options_are_checked() {
    for args in [
        &["report", "--mem-gib", "0"][..],
        &["report", "--mem-gib", "65"],
        &["report", "--runs", "0"],
    ] {
        assert_eq!(vmmu(args, None).status.code(), Some(2), "{args:?}");
    }
}
