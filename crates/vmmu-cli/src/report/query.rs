//! Finding records: by scenario, variant, metric and a subset of params.

use serde_json::Value;

use crate::bench::Record;

/// A param's value as the lookup wants it: numbers compare as numbers (so `1` equals
/// `1.0`), everything else exactly.
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
        _ => a == b,
    }
}

/// Records of `scenario` and `metric`, in report order.
pub fn of<'a>(
    records: &'a [Record],
    scenario: &'a str,
    metric: &'a str,
) -> impl Iterator<Item = &'a Record> + 'a {
    records
        .iter()
        .filter(move |r| r.scenario == scenario && r.metric == metric)
}

/// The value of the first record of (`scenario`, `variant`, `metric`) whose params include
/// every pair of `params`.
pub fn value(
    records: &[Record],
    scenario: &str,
    variant: &str,
    metric: &str,
    params: &[(&str, Value)],
) -> Option<f64> {
    of(records, scenario, metric)
        .find(|r| r.variant == variant && has_params(r, params))
        .map(|r| r.value)
}

/// Whether `r`'s params include every pair of `params`.
pub fn has_params(r: &Record, params: &[(&str, Value)]) -> bool {
    params
        .iter()
        .all(|(k, v)| r.params.get(*k).is_some_and(|x| same_value(x, v)))
}

/// `(x, value)` of every record of (`scenario`, `variant`, `metric`) matching `params`,
/// with `x` the number in param `x_key`, sorted by `x`.
pub fn series(
    records: &[Record],
    scenario: &str,
    variant: &str,
    metric: &str,
    x_key: &str,
    params: &[(&str, Value)],
) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = of(records, scenario, metric)
        .filter(|r| r.variant == variant && has_params(r, params))
        .filter_map(|r| Some((r.params.get(x_key)?.as_f64()?, r.value)))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Variants of (`scenario`, `metric`) in first-seen order.
pub fn variants(records: &[Record], scenario: &str, metric: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in of(records, scenario, metric) {
        if !v.contains(&r.variant) {
            v.push(r.variant.clone());
        }
    }
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::params;
    use serde_json::json;

    /// A record for tests.
    pub fn rec(scenario: &str, variant: &str, metric: &str, p: &[(&str, Value)], v: f64) -> Record {
        let mut m = params([]);
        for (k, x) in p {
            m.insert((*k).to_owned(), x.clone());
        }
        Record {
            scenario: scenario.into(),
            variant: variant.into(),
            metric: metric.into(),
            value: v,
            min: None,
            unit: "us".into(),
            params: m,
            ruler: None,
        }
    }

    #[test]
    fn lookups_match_params_as_numbers() {
        let rs = [
            rec(
                "s",
                "a",
                "m",
                &[("ratio", json!(0.5)), ("mem_gib", json!(1))],
                2.0,
            ),
            rec(
                "s",
                "a",
                "m",
                &[("ratio", json!(0.1)), ("mem_gib", json!(1))],
                1.0,
            ),
            rec("s", "b", "m", &[("ratio", json!(0.1))], 3.0),
        ];
        assert_eq!(
            value(&rs, "s", "a", "m", &[("ratio", json!(0.5))]),
            Some(2.0)
        );
        assert_eq!(
            value(&rs, "s", "a", "m", &[("mem_gib", json!(1.0))]),
            Some(2.0)
        );
        assert_eq!(value(&rs, "s", "a", "x", &[]), None);
        assert_eq!(
            series(&rs, "s", "a", "m", "ratio", &[]),
            [(0.1, 1.0), (0.5, 2.0)]
        );
        assert_eq!(variants(&rs, "s", "m"), ["a", "b"]);
    }
}
