//! The `vmmu` binary's public contract: scenario names, exit codes, and the JSON lines.
//! No test here checks a measured value, only the shape of the output.

use std::process::{Command, Output};

use serde_json::Value;

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
        assert_eq!(names, ["fault-in", "zap"]);
    }
}

#[test]
fn unknown_scenario_is_a_usage_error_naming_the_valid_ones() {
    let out = vmmu(&["bench", "no-such-scenario"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fault-in") && err.contains("zap"), "{err}");
}

#[test]
fn out_of_range_options_are_usage_errors() {
    for args in [
        &["bench", "zap", "--mem-gib", "0"][..],
        &["bench", "zap", "--mem-gib", "65"],
        &["bench", "zap", "--runs", "0"],
    ] {
        assert_eq!(vmmu(args).status.code(), Some(2), "{args:?}");
    }
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
            ["metric", "params", "scenario", "unit", "value", "variant"]
        );
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
