//! Reducing repeated runs to one number per measurement: the median.
//!
//! A scenario reports, per run, a list of [`Sample`]s. Samples that measure the same thing
//! share a key — (variant, metric, params) — and [`median_by_key`] folds the runs into one
//! sample per key (and its minimum), keeping keys in the order they were first seen so that output order is
//! the scenario's own order, stable from one invocation to the next.

use super::Sample;

/// Median of `values`: the middle value for an odd count, the mean of the two middle values
/// for an even count. `None` for an empty slice. NaNs sort last (`f64::total_cmp`).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Groups samples by (variant, metric, params) in first-seen order and replaces each group
/// by one sample carrying the median value, paired with the group's minimum. The unit is
/// taken from the group's first sample.
pub fn median_by_key(samples: impl IntoIterator<Item = Sample>) -> Vec<(Sample, f64)> {
    // Linear search: a scenario reports a handful of keys, so a map buys nothing and would
    // need `params` (a JSON map) to be hashable or ordered.
    let mut groups: Vec<(Sample, Vec<f64>)> = Vec::new();
    for sample in samples {
        match groups.iter_mut().find(|(first, _)| first.same_key(&sample)) {
            Some((_, values)) => values.push(sample.value),
            None => {
                let value = sample.value;
                groups.push((sample, vec![value]));
            }
        }
    }
    groups
        .into_iter()
        .map(|(first, values)| {
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let s = Sample {
                // A group holds at least its first sample, so the median exists.
                value: median(&values).unwrap_or(f64::NAN),
                ..first
            };
            (s, min)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    fn params(backing: &str) -> Map<String, Value> {
        let mut p = Map::new();
        p.insert("backing".into(), json!(backing));
        p
    }

    fn sample(variant: &str, metric: &str, backing: &str, value: f64) -> Sample {
        Sample::new(variant, metric, params(backing), value, "ns")
    }

    #[test]
    fn median_of_empty_is_none() {
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn median_of_odd_count_is_middle_value() {
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[9.0, 2.0, 4.0, 100.0, 3.0]), Some(4.0));
    }

    #[test]
    fn median_of_even_count_is_mean_of_middle_values() {
        assert_eq!(median(&[1.0, 2.0]), Some(1.5));
        assert_eq!(median(&[10.0, 1.0, 4.0, 2.0]), Some(3.0));
    }

    #[test]
    fn median_does_not_reorder_input() {
        let v = [3.0, 1.0, 2.0];
        assert_eq!(median(&v), Some(2.0));
        assert_eq!(v, [3.0, 1.0, 2.0]);
    }

    #[test]
    fn groups_keep_first_seen_order_and_take_medians() {
        // Three runs, each reporting the same three keys; the third key differs from the
        // first only in params, the second only in metric.
        let runs = [[1.0, 10.0, 100.0], [3.0, 30.0, 300.0], [2.0, 20.0, 200.0]];
        let samples = runs.iter().flat_map(|r| {
            [
                sample("v", "ns_per_page", "4k", r[0]),
                sample("v", "us", "4k", r[1]),
                sample("v", "ns_per_page", "2m", r[2]),
            ]
        });
        let out = median_by_key(samples);
        let keys: Vec<_> = out
            .iter()
            .map(|(s, min)| {
                (
                    s.metric.as_str(),
                    s.params["backing"].as_str().unwrap(),
                    s.value,
                    *min,
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("ns_per_page", "4k", 2.0, 1.0),
                ("us", "4k", 20.0, 10.0),
                ("ns_per_page", "2m", 200.0, 100.0)
            ]
        );
    }

    #[test]
    fn variants_are_separate_keys() {
        let out = median_by_key([
            sample("a", "m", "4k", 1.0),
            sample("b", "m", "4k", 5.0),
            sample("a", "m", "4k", 2.0),
            sample("b", "m", "4k", 6.0),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].0.variant.as_str(), out[0].0.value, out[0].1),
            ("a", 1.5, 1.0)
        );
        assert_eq!(
            (out[1].0.variant.as_str(), out[1].0.value, out[1].1),
            ("b", 5.5, 5.0)
        );
        assert_eq!(out[0].0.unit, "ns");
    }

    #[test]
    fn no_samples_no_groups() {
        assert!(median_by_key(Vec::new()).is_empty());
    }
}
