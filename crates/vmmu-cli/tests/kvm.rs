//! `vmmu kvm`: the JSON contract of `compare`, and the error where there is no KVM.
//! No test here checks a measured value.

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

#[test]
fn without_kvm_compare_fails_and_says_why() {
    for cmd in [
        &["kvm", "compare"][..],
        &["kvm", "conformance", "--rounds", "1"],
    ] {
        let out = vmmu(cmd, Some("/nonexistent/kvm"));
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        assert!(out.stdout.is_empty(), "{cmd:?}: nothing may be reported");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("/nonexistent/kvm") && err.contains("nothing was compared"),
            "{err}"
        );
    }
}

#[test]
fn bad_ratios_are_usage_errors() {
    for r in ["1.5", "-1", "x"] {
        let out = vmmu(&["kvm", "compare", "--ratios", r], None);
        assert_eq!(out.status.code(), Some(2), "{r}");
    }
}

#[test]
fn compare_prints_the_contracts_records() {
    let out = vmmu(
        &[
            "kvm", "compare", "--json", "--rounds", "1", "--ratios", "0,0.5",
        ],
        None,
    );
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_opens {
        // Said on stderr, bypassing the harness's capture: this test compared nothing.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "vmmu kvm compare: NOT RUN, /dev/kvm cannot be opened; checked only that it fails"
        );
        assert_eq!(out.status.code(), Some(1));
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    let recs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    let count = |variant: &str, metric: &str| {
        recs.iter()
            .filter(|r| r["variant"] == variant && r["metric"] == metric)
            .count()
    };
    // get, get-clear and, where the host offers it, ring; each at 2 ratios. A host
    // without the ring says so.
    let mut modes: Vec<&str> = recs
        .iter()
        .filter(|r| r["metric"] == "harvest_us")
        .map(|r| r["params"]["mode"].as_str().unwrap())
        .collect();
    modes.sort_unstable();
    modes.dedup();
    if modes.len() == 2 {
        assert!(stderr.contains("ring: not measured"), "{stderr}");
    } else {
        assert_eq!(modes, ["get", "get-clear", "ring"]);
    }
    let harvests = 2 * modes.len();
    // 2 backings of fault-in and delete.
    for v in ["kvm", "vmmu"] {
        assert_eq!(count(v, "harvest_us"), harvests);
        assert_eq!(count(v, "fault_ns_per_page"), 2);
        assert_eq!(count(v, "delete_us"), 2);
    }
    assert_eq!(count("vmmu", "bitmap_equal"), harvests);
    assert_eq!(count("vmmu-tdp", "bitmap_equal"), harvests);
    for r in &recs {
        assert_eq!(r["scenario"], "kvm-compare");
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for k in ["scenario", "variant", "metric", "value", "unit", "params"] {
            assert!(keys.contains(&k), "{r}");
        }
        assert!(r["value"].as_f64().unwrap() >= 0.0, "{r}");
        if r["metric"] == "bitmap_equal" {
            assert_eq!(r["value"], 1.0, "{r}");
        }
    }
}
