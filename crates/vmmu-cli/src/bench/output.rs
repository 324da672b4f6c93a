//! Printing records: JSON lines for machines, an aligned table for people.

use std::io::{self, Write};

use serde_json::Value;

use super::ruler::{self, Ruler};
use super::{Record, Scenario};

/// Writes one JSON object per record, one per line, and nothing else.
pub fn write_json(out: &mut impl Write, records: &[Record]) -> io::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *out, r)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Writes records as a table with a header row (the median, then the minimum over the
/// runs); text columns are left-aligned, numbers right-aligned. Then one line per scenario
/// with its CPU ruler (see [`super::ruler`]), flagged when the machine moved.
pub fn write_table(out: &mut impl Write, records: &[Record]) -> io::Result<()> {
    const HEADER: [&str; 7] = [
        "scenario", "variant", "params", "metric", "median", "min", "unit",
    ];
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.variant.clone(),
                format_params(&r.params),
                r.metric.clone(),
                format_value(r.value),
                r.min.map_or_else(|| "-".into(), format_value),
                r.unit.clone(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let header = HEADER.map(String::from);
    for row in std::iter::once(&header).chain(&rows) {
        let [scenario, variant, params, metric, value, min, unit] = row;
        let [w0, w1, w2, w3, w4, w5, _] = widths;
        let line = format!(
            "{scenario:<w0$}  {variant:<w1$}  {params:<w2$}  {metric:<w3$}  {value:>w4$}  \
             {min:>w5$}  {unit}"
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    let mut seen: Vec<&str> = Vec::new();
    for r in records {
        if let (Some(ruler), false) = (r.ruler, seen.contains(&r.scenario.as_str())) {
            seen.push(&r.scenario);
            writeln!(out, "{}", ruler_line(&r.scenario, &ruler))?;
        }
    }
    Ok(())
}

/// One scenario's CPU ruler, said for people.
pub fn ruler_line(scenario: &str, r: &Ruler) -> String {
    let moved = if r.moved() {
        format!(
            ": the machine moved more than {}x while it ran, compare its figures with care",
            ruler::SPREAD_WARN
        )
    } else {
        String::new()
    };
    format!(
        "cpu ruler ({scenario}): {:.0} to {:.0} us over {} timings, spread {:.2}x{moved}",
        r.min_us,
        r.max_us,
        r.samples,
        r.spread()
    )
}

/// Writes the registry: one scenario a line, name then description.
pub fn write_list(out: &mut impl Write, scenarios: &[Scenario]) -> io::Result<()> {
    let width = scenarios.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in scenarios {
        writeln!(out, "{:<width$}  {}", s.name, s.about)?;
    }
    Ok(())
}

/// `backing=4k mem_gib=1`: strings without quotes, other values as JSON.
fn format_params(params: &serde_json::Map<String, Value>) -> String {
    let pairs: Vec<String> = params
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    pairs.join(" ")
}

/// Three decimals below 100, one above: enough to compare, not more than a timer gives.
fn format_value(v: f64) -> String {
    if v.abs() < 100.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::params;
    use serde_json::json;

    fn records() -> Vec<Record> {
        let rec = |backing: &str, value: f64| Record {
            scenario: "fault-in".into(),
            variant: "shadow-direct".into(),
            metric: "ns_per_page".into(),
            value,
            min: Some(value * 0.9),
            unit: "ns".into(),
            params: params([("backing", json!(backing)), ("mem_gib", json!(1))]),
            ruler: None,
        };
        vec![rec("4k", 512.4), rec("2m", 3.5)]
    }

    #[test]
    fn json_is_one_object_per_line() {
        let mut buf = Vec::new();
        write_json(&mut buf, &records()).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(text.ends_with('\n'));
        let first: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["value"], json!(512.4));
        assert_eq!(first["params"]["backing"], json!("4k"));
    }

    #[test]
    fn table_is_aligned() {
        let mut buf = Vec::new();
        write_table(&mut buf, &records()).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("scenario"));
        assert!(lines[1].contains("backing=4k mem_gib=1"));
        // The unit column starts at the same offset on every row.
        let unit_at: Vec<usize> = lines.iter().map(|l| l.rfind(' ').unwrap()).collect();
        assert!(unit_at.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(lines[1].contains("512.4") && lines[2].contains("3.500"));
        // The minimum beside the median.
        assert!(lines[0].contains("median") && lines[0].contains("min"));
        assert!(lines[1].contains("461.2"), "{text}");
    }

    #[test]
    fn ruler_is_one_line_per_scenario_and_flags_a_moving_machine() {
        let mut rs = records();
        let calm = Ruler {
            min_us: 1000.0,
            max_us: 1200.0,
            samples: 6,
        };
        for r in &mut rs {
            r.ruler = Some(calm);
        }
        let mut buf = Vec::new();
        write_table(&mut buf, &rs).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let rulers: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("cpu ruler"))
            .collect();
        assert_eq!(rulers.len(), 1, "{text}");
        assert!(rulers[0].contains("1000 to 1200 us over 6 timings, spread 1.20x"));
        assert!(!rulers[0].contains("moved"));
        let moved = Ruler {
            max_us: 1600.0,
            ..calm
        };
        assert!(ruler_line("fault-in", &moved).contains("moved more than 1.5x"));
    }

    #[test]
    fn list_has_one_line_per_scenario() {
        let mut buf = Vec::new();
        write_list(&mut buf, crate::bench::SCENARIOS).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), crate::bench::SCENARIOS.len());
        assert!(text.lines().next().unwrap().starts_with("fault-in "));
    }
}
