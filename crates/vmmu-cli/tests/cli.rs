//! The `vmmu` binary's public contract: scenario names, exit codes, and the JSON lines.
//! No test here checks a measured value, only the shape of the output.

use std::process::{Command, Output};

use serde_json::{json, Value};

fn vmmu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .output()
        .expect("run vmmu")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

#[test]
fn list_prints_the_public_scenarios() {
    for args in [&["bench", "list"][..], &["bench", "--list"]] {
        let out = vmmu(args);
        assert!(out.status.success(), "{args:?}");
        let names: Vec<String> = stdout(&out)
            .lines()
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "fault-in",
                "zap",
                "rmap-iter",
                "pte-list-destroy",
                "writable-bitmap",
                "wrprot-slot",
                "dirty-log",
                "tdp-zap-hello",
                "tdp-zap",
                "tdp-fault-in",
                "tdp-fault-parallel",
                "memory",
                "shadow-fork",
                "shadow-ctxsw",
                "shadow-pt-churn",
                "perf-dirty-log",
                "perf-pre-fault",
                "perf-page-table",
                "perf-access-tracking",
                "perf-memslot",
                "floor",
                "scale"
            ]
        );
    }
}

#[test]
fn unknown_scenario_is_a_usage_error_naming_the_valid_ones() {
    let out = vmmu(&["bench", "no-such-scenario"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "fault-in",
        "zap",
        "rmap-iter",
        "pte-list-destroy",
        "writable-bitmap",
        "wrprot-slot",
        "dirty-log",
        "tdp-zap-hello",
        "tdp-zap",
        "tdp-fault-in",
        "tdp-fault-parallel",
    ] {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn out_of_range_options_are_usage_errors() {
    for args in [
        &["bench", "zap", "--mem-gib", "0"][..],
        &["bench", "zap", "--mem-gib", "65"],
        &["bench", "zap", "--runs", "0"],
        // `scale`'s own flags: out of range, too big for a backing, past KVM's slot cap,
        // or given to another scenario.
        &["bench", "scale", "-v", "0"],
        &["bench", "scale", "--vcpus", "257"],
        &["bench", "scale", "--guest-gib", "0"],
        &["bench", "scale", "--guest-gib", "12289"],
        &["bench", "scale", "--guest-gib", "2048", "--backing", "4k"],
        &[
            "bench",
            "scale",
            "--guest-gib",
            "12288",
            "--backing",
            "2m",
            "--slots",
            "1",
        ],
        &["bench", "scale", "--backing", "1g"],
        &["bench", "scale", "--mmu", "ept"],
        &["bench", "zap", "--guest-gib", "4"],
        &["bench", "zap", "--no-eager-split"],
        &["soak", "--vcpus", "257"],
    ] {
        let out = vmmu(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
}

/// A record's minimum is at most its median; its CPU ruler was timed before the one run
/// and after it.
fn check_min_and_ruler(v: &Value) {
    let (min, median) = (v["min"].as_f64().unwrap(), v["value"].as_f64().unwrap());
    assert!(min.is_finite() && min <= median, "{v}");
    let r = &v["ruler"];
    assert_eq!(r["samples"], 2, "{v}");
    let (lo, hi) = (r["min_us"].as_f64().unwrap(), r["max_us"].as_f64().unwrap());
    assert!(lo > 0.0 && lo <= hi, "{v}");
}

/// Every stdout line is one record with exactly the contract's fields, for both backings.
fn check_json_lines(scenario: &str, metric: &str, unit: &str) {
    let out = vmmu(&["bench", scenario, "--json", "--runs", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    let mut backings = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("each line is JSON");
        let obj = v.as_object().expect("each line is an object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["metric", "min", "params", "ruler", "scenario", "unit", "value", "variant"]
        );
        check_min_and_ruler(&v);
        assert_eq!(v["scenario"], scenario);
        assert_eq!(v["variant"], "shadow-direct");
        assert_eq!(v["metric"], metric);
        assert_eq!(v["unit"], unit);
        assert!(v["value"]
            .as_f64()
            .is_some_and(|x| x.is_finite() && x >= 0.0));
        assert_eq!(v["params"]["mem_gib"], 1);
        backings.push(v["params"]["backing"].as_str().unwrap().to_owned());
    }
    assert_eq!(backings, ["4k", "2m"]);
}

#[test]
fn fault_in_json_lines() {
    check_json_lines("fault-in", "ns_per_page", "ns");
}

#[test]
fn zap_json_lines() {
    check_json_lines("zap", "us", "us");
}

#[test]
fn tdp_zap_hello_reports_loops_reads_and_ns_per_mode() {
    let out = vmmu(&["bench", "tdp-zap-hello", "--json", "--runs", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for line in stdout(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["scenario"], "tdp-zap-hello");
        seen.push((
            v["variant"].as_str().unwrap().to_owned(),
            v["metric"].as_str().unwrap().to_owned(),
        ));
        assert!(v["value"].as_f64().unwrap() > 0.0, "{line}");
    }
    for variant in ["scan-all", "skip-non-present", "used-entries"] {
        for metric in ["loops", "reads", "ns"] {
            assert!(
                seen.contains(&(variant.to_owned(), metric.to_owned())),
                "{variant} {metric}: {seen:?}"
            );
        }
    }
}

/// Every stdout line is one record with exactly the contract's fields: `ns_per_spte` for
/// each (variant, len) pair, variants in the given order within each len, and no
/// `mem_gib` (the reverse-map scenarios do not use the slot).
fn check_rmap_json_lines(scenario: &str, variants: &[&str], lens: &[u64]) {
    let out = vmmu(&["bench", scenario, "--json", "--runs", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for line in stdout(&out).lines() {
        let v: Value = serde_json::from_str(line).expect("each line is JSON");
        let obj = v.as_object().expect("each line is an object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["metric", "min", "params", "ruler", "scenario", "unit", "value", "variant"]
        );
        check_min_and_ruler(&v);
        assert_eq!(v["scenario"], scenario);
        assert_eq!(v["metric"], "ns_per_spte");
        assert_eq!(v["unit"], "ns");
        assert!(v["value"]
            .as_f64()
            .is_some_and(|x| x.is_finite() && x >= 0.0));
        let params = v["params"].as_object().expect("params is an object");
        assert_eq!(params.keys().collect::<Vec<_>>(), ["len"]);
        seen.push((
            v["variant"].as_str().unwrap().to_owned(),
            params["len"].as_u64().unwrap(),
        ));
    }
    let want: Vec<(String, u64)> = lens
        .iter()
        .flat_map(|&len| variants.iter().map(move |&v| (v.to_owned(), len)))
        .collect();
    assert_eq!(seen, want);
}

#[test]
fn rmap_iter_json_lines() {
    check_rmap_json_lines(
        "rmap-iter",
        &["restart-scan", "iterator"],
        &[1, 2, 4, 16, 64, 256, 1024],
    );
}

#[test]
fn pte_list_destroy_json_lines() {
    check_rmap_json_lines("pte-list-destroy", &["one-by-one", "destroy"], &[200, 1000]);
}

/// Runs `scenario` once on a 1 GiB slot and checks that stdout is exactly `want`, in order:
/// one record a line with the contract's fields, as (variant, metric, unit, params), each
/// value finite and non-negative.
fn check_records(scenario: &str, want: &[(&str, &str, &str, Value)]) {
    let out = vmmu(&["bench", scenario, "--json", "--mem-gib", "1", "--runs", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for line in stdout(&out).lines() {
        let v: Value = serde_json::from_str(line).expect("each line is JSON");
        let obj = v.as_object().expect("each line is an object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["metric", "min", "params", "ruler", "scenario", "unit", "value", "variant"]
        );
        check_min_and_ruler(&v);
        assert_eq!(v["scenario"], scenario);
        assert!(
            v["value"]
                .as_f64()
                .is_some_and(|x| x.is_finite() && x >= 0.0),
            "{line}"
        );
        seen.push((
            v["variant"].as_str().unwrap().to_owned(),
            v["metric"].as_str().unwrap().to_owned(),
            v["unit"].as_str().unwrap().to_owned(),
            v["params"].clone(),
        ));
    }
    let want: Vec<(String, String, String, Value)> = want
        .iter()
        .map(|(v, m, u, p)| ((*v).to_owned(), (*m).to_owned(), (*u).to_owned(), p.clone()))
        .collect();
    assert_eq!(seen, want);
}

/// The dirty ratios `wrprot-slot` and `dirty-log` sweep.
const RATIOS: [f64; 7] = [0.0, 0.0001, 0.001, 0.01, 0.1, 0.5, 1.0];

#[test]
fn writable_bitmap_json_lines() {
    let mut want = Vec::new();
    for writable in [0, 1, 64, 512] {
        for variant in ["scan-512", "bitmap"] {
            let p = json!({"mem_gib": 1, "writable": writable});
            want.push((variant, "ns_per_page", "ns", p));
        }
    }
    check_records("writable-bitmap", &want);
}

#[test]
#[ignore = "about 12 s in a debug build; run with `cargo test --release -- --ignored`"]
fn wrprot_slot_json_lines() {
    let mut want = Vec::new();
    for ratio in RATIOS {
        for variant in ["per-gfn", "walk-pages", "kvm-2012", "adaptive"] {
            let p = json!({"mem_gib": 1, "ratio": ratio});
            want.push((variant, "us", "us", p));
        }
    }
    check_records("wrprot-slot", &want);
}

#[test]
#[ignore = "about 9 s in a debug build; run with `cargo test --release -- --ignored`"]
fn dirty_log_json_lines() {
    let mut want = Vec::new();
    for ratio in RATIOS {
        for variant in ["get", "get-clear", "ring"] {
            let p = json!({"mem_gib": 1, "ratio": ratio});
            if ratio > 0.0 {
                want.push((variant, "write_ns_per_page", "ns", p.clone()));
            }
            want.push((variant, "harvest_us", "us", p));
        }
    }
    check_records("dirty-log", &want);
}

#[test]
fn soak_prints_what_it_ran_as_json() {
    let out = vmmu(&["soak", "--seconds", "1", "--mmu", "shadow", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(v["failures"], 0, "{v}");
    assert!(v["operations"].as_u64().unwrap() > 0, "{v}");
    assert!(v["checks_passed"].as_u64().unwrap() > 0, "{v}");
    assert!(v["ops"]["write"].as_u64().unwrap() > 0, "{v}");
    assert!(v["checks"]["audit"].as_u64().unwrap() > 0, "{v}");
    let bad = vmmu(&["soak", "--seconds", "1", "--mmu", "nested"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// `vmmu perf`: the selftest's lines on vmmu's side, and usage errors (parsed or found
/// after parsing, as too much memory) exit 2 with a message naming the problem.
#[test]
fn perf_prints_the_selftest_lines_and_usage_errors_exit_2() {
    let out = vmmu(&[
        "perf",
        "dirty-log",
        "--target",
        "vmmu",
        "-b",
        "8M",
        "-v",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    for line in [
        "Test iterations: 2",
        "[vmmu-tdp-used] Populate memory time: ",
        "[vmmu-tdp-used] Enabling dirty logging time: ",
        "[vmmu-tdp-used] Iteration 2 dirty memory time: ",
        "[vmmu-tdp-used] Iteration 1 clear dirty log time: ",
        "[vmmu-tdp-used] Disabling dirty logging time: ",
        "[vmmu-tdp-used] Get dirty log over 2 iterations took ",
        "faults 4096 (fast 0)",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    for args in [
        &["perf", "dirty-log", "-v", "0"][..],
        &["perf", "dirty-log", "-b", "1000"],
        &["perf", "dirty-log", "-v", "512", "-b", "1T"],
        &[
            "perf",
            "dirty-log",
            "-v",
            "64",
            "-b",
            "1G",
            "--target",
            "kvm",
        ],
        &["perf", "page-table", "-b", "3M", "-s", "anonymous_thp"],
    ] {
        let out = vmmu(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error:") && err.len() > 30, "{args:?}: {err}");
    }
}

/// `vmmu perf memslot` on vmmu: the selftest's lines for a move and the RW test (one
/// second each), and its usage errors exit 2.
#[test]
fn perf_memslot_prints_the_selftest_lines() {
    let out = vmmu(&[
        "perf", "memslot", "--target", "vmmu", "-l", "1", "-f", "4", "-e", "5", "-s", "8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    for line in [
        "Testing move inactive area performance with 1 runs, 1 seconds each",
        "Testing RW performance with 1 runs, 1 seconds each",
        "[vmmu-tdp-used] Test took ",
        " for slot setup + ",
        "[vmmu-tdp-used] Done ",
        "[vmmu-tdp-used] Best runtime result was ",
        "Best slot setup time for the whole test area",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    for args in [
        &["perf", "memslot", "-s", "3"][..],
        &["perf", "memslot", "-s", "1024"],
        &["perf", "memslot", "-f", "5", "-e", "1"],
        &["perf", "memslot", "-l", "0"],
    ] {
        assert_eq!(vmmu(args).status.code(), Some(2), "{args:?}");
    }
}
