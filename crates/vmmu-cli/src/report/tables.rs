//! Every record in tables, the same in `report.md` and `index.html`: one table per
//! (scenario, metric), a row per workload (the params that vary), a column per variant,
//! and, where the floor measures the same memory operations, a floor column and each
//! value's multiple of it.

use serde_json::Value;

use super::query;
use crate::bench::names::{
    dirty_log, floor as fl, kvm_compare as kc, pte_list_destroy, rmap_iter, tdp_zap, wrprot_slot,
    zap,
};
use crate::bench::Record;

/// One (scenario, metric) table.
#[derive(Clone, Debug)]
pub struct Table {
    /// Scenario name.
    pub scenario: String,
    /// Metric name; empty when the rows are metrics (one-row tables merged).
    pub metric: String,
    /// Unit of every value; empty when the rows are metrics.
    pub unit: String,
    /// Params with one value in every row, as `key=value`.
    pub constant: Vec<String>,
    /// Names of the params that vary: the first columns.
    pub keys: Vec<String>,
    /// Variant names: the value columns.
    pub variants: Vec<String>,
    /// Whether a floor column follows the variants.
    pub has_floor: bool,
    /// The rows, in the order the scenario reported them.
    pub rows: Vec<Row>,
}

/// One workload's row.
#[derive(Clone, Debug)]
pub struct Row {
    /// Values of [`Table::keys`], as text.
    pub key: Vec<String>,
    /// One value per variant.
    pub values: Vec<Option<f64>>,
    /// The floor for this workload, where there is one.
    pub floor: Option<f64>,
}

impl Row {
    /// `value / floor`, when both exist and the floor did some work.
    pub fn times_floor(&self, value: Option<f64>) -> Option<f64> {
        let f = self.floor.filter(|f| *f > 0.0)?;
        Some(value? / f)
    }
}

impl Table {
    /// `scenario · metric (unit)`, or the scenario alone when the rows are metrics.
    pub fn title(&self) -> String {
        if self.metric.is_empty() {
            self.scenario.clone()
        } else {
            format!("{} · {} ({})", self.scenario, self.metric, self.unit)
        }
    }
}

/// A measured value as a table shows it: booleans as yes / NO, numbers with the digits a
/// timer justifies.
pub fn show_value(v: f64, unit: &str) -> String {
    if unit == "bool" {
        if v == 1.0 { "yes" } else { "NO" }.into()
    } else {
        super::summary::num(v)
    }
}

/// A param value as a table shows it: strings bare, numbers as JSON.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The floor record measuring what a record of (`scenario`, `metric`) with `params` does,
/// if the floor has one: see `floor.rs`.
pub fn floor_for(
    records: &[Record],
    scenario: &str,
    metric: &str,
    params: &serde_json::Map<String, Value>,
) -> Option<f64> {
    // The floor of the same workload size: same `key`, same `mem_gib` where the record has
    // one, and both quick or both not (kvm-compare is never quick).
    let quick = |p: &serde_json::Map<String, Value>| p.get("quick").and_then(Value::as_bool);
    // `fixed`: params the floor's record must have that the measured record does not.
    let floor_where = |variant: &str, metric: &str, key: Option<&str>, fixed: &[(&str, &str)]| {
        records
            .iter()
            .filter(|r| r.scenario == fl::NAME && r.variant == variant && r.metric == metric)
            .filter(|r| quick(&r.params) == quick(params))
            .filter(|r| {
                fixed
                    .iter()
                    .all(|(k, v)| r.params.get(*k).and_then(Value::as_str) == Some(*v))
            })
            .filter(|r| {
                ["mem_gib"]
                    .into_iter()
                    .chain(key)
                    .all(|k| match params.get(k) {
                        Some(v) => r.params.get(k).is_some_and(|x| query::same_value(x, v)),
                        None => k == "mem_gib",
                    })
            })
            .map(|r| r.value)
            .next()
    };
    // The harvest floor of the measured workload's own pages (`floor.rs`).
    let harvest = |pattern: &str| {
        // At ratio 0 nothing is dirty and the floor is the copy alone: a multiple of it
        // would measure the fixed work only, and the summary skips it, so none is shown.
        if params.get("ratio")?.as_f64()? == 0.0 {
            return None;
        }
        floor_where(fl::HARVEST, fl::US, Some("ratio"), &[("pattern", pattern)])
    };
    match (scenario, metric) {
        (dirty_log::NAME, dirty_log::HARVEST_US) | (wrprot_slot::NAME, wrprot_slot::US) => {
            harvest(fl::RANDOM)
        }
        (kc::NAME, kc::HARVEST_US) => harvest(fl::STRIDE),
        (zap::NAME, zap::US) | (tdp_zap::NAME, tdp_zap::US) | (kc::NAME, kc::DELETE_US) => {
            floor_where(fl::ZAP, fl::US, Some("backing"), &[])
        }
        (rmap_iter::NAME, rmap_iter::NS_PER_SPTE) => {
            floor_where(fl::AGE, fl::NS_PER_SPTE, None, &[])
        }
        (pte_list_destroy::NAME, pte_list_destroy::NS_PER_SPTE) => {
            floor_where(fl::CLEAR, fl::NS_PER_SPTE, None, &[])
        }
        _ => None,
    }
}

/// The names of a record's params, sorted: records whose workloads are described by
/// different params (the floor's harvest by ratio, its zap by backing) get separate tables.
fn shape(r: &Record) -> Vec<&str> {
    let mut k: Vec<&str> = r.params.keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

/// The tables of every (scenario, metric, param names), in the order the records came;
/// then a scenario's one-row tables merged into one with a row per metric.
pub fn tables(records: &[Record]) -> Vec<Table> {
    let mut order: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for r in records {
        let k = (r.scenario.as_str(), r.metric.as_str(), shape(r));
        if !order.contains(&k) {
            order.push(k);
        }
    }
    let tables: Vec<Table> = order
        .into_iter()
        .map(|(s, m, keys)| {
            let group: Vec<&Record> = query::of(records, s, m)
                .filter(|r| shape(r) == keys)
                .collect();
            table(records, &group)
        })
        .collect();
    merge_single_rows(tables)
}

/// A scenario reporting several metrics of one workload (one row each, same variants)
/// reads better as one table whose rows are the metrics.
fn merge_single_rows(tables: Vec<Table>) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::new();
    for t in tables {
        let single = t.rows.len() == 1 && t.keys.is_empty() && !t.has_floor;
        if let Some(prev) = out.last_mut().filter(|p| {
            single
                && p.scenario == t.scenario
                && p.variants == t.variants
                && p.keys == ["metric (unit)"]
                && p.constant == t.constant
        }) {
            let mut row = t.rows[0].clone();
            row.key = vec![format!("{} ({})", t.metric, t.unit)];
            prev.rows.push(row);
            continue;
        }
        if let Some(prev) = out.last_mut().filter(|p| {
            single
                && p.scenario == t.scenario
                && p.rows.len() == 1
                && p.keys.is_empty()
                && !p.has_floor
                && p.variants == t.variants
                && p.constant == t.constant
        }) {
            prev.rows[0].key = vec![format!("{} ({})", prev.metric, prev.unit)];
            prev.keys = vec!["metric (unit)".into()];
            prev.metric = String::new();
            prev.unit = String::new();
            let mut row = t.rows[0].clone();
            row.key = vec![format!("{} ({})", t.metric, t.unit)];
            prev.rows.push(row);
            continue;
        }
        out.push(t);
    }
    out
}

fn table(records: &[Record], group: &[&Record]) -> Table {
    let (scenario, metric) = (group[0].scenario.as_str(), group[0].metric.as_str());
    // Param names in first-seen order; constant when every record has the same value.
    let mut names: Vec<&str> = Vec::new();
    for r in group {
        for k in r.params.keys() {
            if !names.contains(&k.as_str()) {
                names.push(k);
            }
        }
    }
    let first = group[0];
    let is_constant = |k: &str| {
        group
            .iter()
            .all(|r| r.params.get(k).is_some() && r.params.get(k) == first.params.get(k))
    };
    // A param the variant decides (the algorithm a variant names, e.g. `rmap_drop`) would
    // give each variant rows of its own: it is no row key, the header says so.
    let by_variant = |k: &str| {
        !is_constant(k)
            && group.iter().all(|r| {
                group
                    .iter()
                    .filter(|o| o.variant == r.variant)
                    .all(|o| o.params.get(k) == r.params.get(k))
            })
    };
    let constant: Vec<String> = names
        .iter()
        .filter(|k| is_constant(k))
        .map(|k| format!("{k}={}", show(&first.params[*k])))
        .chain(
            names
                .iter()
                .filter(|k| by_variant(k))
                .map(|k| format!("{k} by variant")),
        )
        .collect();
    let keys: Vec<String> = names
        .iter()
        .filter(|k| !is_constant(k) && !by_variant(k))
        .map(|k| (*k).to_owned())
        .collect();
    let mut variants: Vec<String> = Vec::new();
    for r in group {
        if !variants.contains(&r.variant) {
            variants.push(r.variant.clone());
        }
    }
    let key_of = |r: &Record| -> Vec<String> {
        keys.iter()
            .map(|k| r.params.get(k).map(show).unwrap_or_default())
            .collect()
    };
    let mut rows: Vec<Row> = Vec::new();
    for r in group {
        let key = key_of(r);
        let i = match rows.iter().position(|row| row.key == key) {
            Some(i) => i,
            None => {
                rows.push(Row {
                    key,
                    values: vec![None; variants.len()],
                    floor: floor_for(records, scenario, metric, &r.params),
                });
                rows.len() - 1
            }
        };
        if let Some(j) = variants.iter().position(|v| *v == r.variant) {
            rows[i].values[j] = Some(r.value);
        }
    }
    Table {
        scenario: scenario.to_owned(),
        metric: metric.to_owned(),
        unit: first.unit.clone(),
        constant,
        keys,
        variants,
        has_floor: rows.iter().any(|r| r.floor.is_some()),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::super::query::tests::rec;
    use super::*;
    use serde_json::json;

    #[test]
    fn pivots_variants_into_columns_with_the_floor() {
        let p = |ratio: f64| [("mem_gib", json!(1)), ("ratio", json!(ratio))];
        let f = |ratio: f64, pattern: &str| {
            [
                ("mem_gib", json!(1)),
                ("ratio", json!(ratio)),
                ("pattern", json!(pattern)),
            ]
        };
        let rs = vec![
            rec("dirty-log", "get", "harvest_us", &p(0.0), 0.25),
            rec("dirty-log", "ring", "harvest_us", &p(0.0), 0.12),
            rec("dirty-log", "get", "harvest_us", &p(0.5), 500.0),
            rec("dirty-log", "ring", "harvest_us", &p(0.5), 700.0),
            rec("dirty-log", "get", "write_ns_per_page", &p(0.5), 90.0),
            rec("floor", "harvest", "us", &f(0.0, "random"), 0.01),
            rec("floor", "harvest", "us", &f(0.5, "random"), 100.0),
            rec("floor", "harvest", "us", &f(0.5, "stride"), 250.0),
            rec("kvm-compare", "vmmu", "harvest_us", &p(0.5), 500.0),
        ];
        let ts = tables(&rs);
        assert_eq!(ts.len(), 4);
        let t = &ts[0];
        assert_eq!(
            (t.scenario.as_str(), t.metric.as_str()),
            ("dirty-log", "harvest_us")
        );
        assert_eq!(t.constant, ["mem_gib=1"]);
        assert_eq!(t.keys, ["ratio"]);
        assert_eq!(t.variants, ["get", "ring"]);
        assert!(t.has_floor);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0].key, ["0.0"]);
        assert_eq!(t.rows[0].floor, None, "no floor at ratio 0");
        assert_eq!(t.rows[1].values, [Some(500.0), Some(700.0)]);
        assert_eq!(t.rows[1].times_floor(Some(500.0)), Some(5.0));
        assert!(!ts[1].has_floor);
        // kvm-compare writes a stride: its floor is the stride's, not the random pages'.
        let kc = ts.iter().find(|t| t.scenario == "kvm-compare").unwrap();
        assert_eq!(kc.rows[0].floor, Some(250.0));
    }

    #[test]
    fn floors_match_the_workload_size_and_shapes_split_tables() {
        let q = json!(true);
        let rs = vec![
            rec(
                "zap",
                "shadow-direct",
                "us",
                &[
                    ("backing", json!("4k")),
                    ("mem_gib", json!(1)),
                    ("quick", q.clone()),
                ],
                80.0,
            ),
            rec(
                "kvm-compare",
                "kvm",
                "delete_us",
                &[("backing", json!("4k")), ("mem_gib", json!(1))],
                9000.0,
            ),
            rec(
                "floor",
                "harvest",
                "us",
                &[
                    ("mem_gib", json!(1)),
                    ("ratio", json!(0.5)),
                    ("pattern", json!("random")),
                    ("quick", q.clone()),
                ],
                1.0,
            ),
            rec(
                "floor",
                "zap",
                "us",
                &[
                    ("backing", json!("4k")),
                    ("mem_gib", json!(1)),
                    ("quick", q),
                ],
                4.0,
            ),
        ];
        let ts = tables(&rs);
        assert_eq!(ts[0].rows[0].floor, Some(4.0));
        assert_eq!(
            ts[1].rows[0].floor, None,
            "a quick floor is not kvm-compare's"
        );
        let floors: Vec<&Table> = ts.iter().filter(|t| t.scenario == "floor").collect();
        assert_eq!(floors.len(), 2, "harvest and zap have different params");
    }

    #[test]
    fn one_row_metrics_merge_into_one_table() {
        let p = [("touched_pages", json!(11))];
        let rs = vec![
            rec("tdp-zap-hello", "scan-all", "loops", &p, 7168.0),
            rec("tdp-zap-hello", "used-entries", "loops", &p, 27.0),
            rec("tdp-zap-hello", "scan-all", "ns", &p, 35000.0),
            rec("tdp-zap-hello", "used-entries", "ns", &p, 3600.0),
        ];
        let ts = tables(&rs);
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].keys, ["metric (unit)"]);
        assert_eq!(ts[0].rows.len(), 2);
        assert_eq!(ts[0].rows[1].key, ["ns (us)"]);
        assert_eq!(ts[0].rows[1].values, [Some(35000.0), Some(3600.0)]);
    }

    #[test]
    fn params_the_variant_decides_are_no_row_keys() {
        let p = |c: u64, drop: &str| [("children", json!(c)), ("rmap_drop", json!(drop))];
        let rs = vec![
            rec(
                "shadow-fork",
                "restart-scan",
                "unmap_us",
                &p(1, "OneByOne"),
                3.0,
            ),
            rec("shadow-fork", "iterator", "unmap_us", &p(1, "Destroy"), 1.0),
            rec(
                "shadow-fork",
                "restart-scan",
                "unmap_us",
                &p(500, "OneByOne"),
                900.0,
            ),
            rec(
                "shadow-fork",
                "iterator",
                "unmap_us",
                &p(500, "Destroy"),
                300.0,
            ),
        ];
        let t = &tables(&rs)[0];
        assert_eq!(t.keys, ["children"]);
        assert_eq!(t.constant, ["rmap_drop by variant"]);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[1].values, [Some(900.0), Some(300.0)]);
    }
}
