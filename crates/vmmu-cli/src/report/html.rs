//! `index.html`: one self-contained page (inline CSS and SVG, no scripts, nothing fetched).

use std::fmt::Write;

use super::figures::Figure;
use super::summary::{num, times, Verdict};
use super::tables::{show_value, Table};
use super::versus::{self, Versus};
use super::{Report, SourceState};

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto;
       max-width: 1120px; color: #222; line-height: 1.45; padding: 0 16px; }
h1 { margin-bottom: 4px; }
h2 { margin-top: 40px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { text-align: left; font-weight: 600; padding: 4px 0; white-space: nowrap; }
caption span { font-weight: normal; color: #666; }
.x { color: #777; font-size: 12px; }
.held { background: #e3f4e1; font-weight: 600; }
.not-held { background: #fbe3e1; font-weight: 600; }
.no-data { background: #f0f0f0; color: #666; }
.skip { color: #8a5a00; }
.fail { color: #b00020; font-weight: 600; }
.figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { background: #fafafa; border-left: 3px solid #ccc; padding: 8px 12px; color: #555; }
";

/// Renders the page.
pub fn page(report: &Report, versus: &Versus, figures: &[Figure], tables: &[Table]) -> String {
    let m = &report.meta;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>vmmu report</title><style>{STYLE}</style></head><body>\n"
    );
    let _ = write!(
        h,
        "<h1>vmmu report</h1>\n<p class=\"meta\">{} · {} · {} CPUs · {} GiB slots{} · \
         median of {} runs per value{} · {:.0} s in all · <code>{}</code></p>\n",
        esc(&m.generated),
        esc(&m.version),
        m.cpus,
        m.mem_gib,
        if m.quick {
            " (quick: slots and fixed workloads 16x smaller)"
        } else {
            ""
        },
        m.runs,
        if m.warm_up {
            " after a warm-up run"
        } else {
            ""
        },
        m.seconds,
        esc(&m.command)
    );
    h.push_str(
        "<p>Does each of the five KVM optimizations vmmu carries do what its patch claimed, by \
         how much, and on which workload; how vmmu compares with the host's KVM and with the \
         floor (the least work of the same operations, in a tight loop over memory laid out as \
         the MMU's). Every number is \
         measured in this run on this machine; times on a shared machine are noisy, so look at \
         ratios and shapes more than at the last digit. Lower is better everywhere except \
         faults per second. Every measurement is in <code>results.json</code>; the same tables \
         are in <code>report.md</code>.</p>\n",
    );
    opening(&mut h, versus);

    h.push_str("<h2 id=\"seeds\">The seeds' claims</h2>\n");
    h.push_str(
        "<p>One row per seed: the ratio is the old algorithm's cost over the seed's (above 1: \
         the seed's is faster by that factor), decided by the rule shown.</p>\n<table>\
         <tr><th>seed</th><th>claim</th><th>variants compared</th><th>measured</th>\
         <th>rule</th><th>held</th></tr>\n",
    );
    for s in &report.seeds {
        let class = match s.verdict {
            Verdict::Held => "held",
            Verdict::NotHeld => "not-held",
            Verdict::NoData => "no-data",
        };
        let _ = writeln!(
            h,
            "<tr><td><a href=\"#seed-{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td>\
             <td>{4}</td><td class=\"{class}\">{5}</td></tr>",
            esc(s.seed),
            esc(s.claim),
            esc(&s.pair),
            esc(&s.measured),
            esc(&s.rule),
            s.verdict
        );
    }
    h.push_str("</table>\n");

    h.push_str(
        "<h2 id=\"sources\">What ran</h2>\n<table><tr><th>scenario</th><th>status</th>\
                <th>runs</th><th>records</th><th>seconds</th><th>CPU ruler spread</th></tr>\n",
    );
    for s in &report.sources {
        let (class, text) = match &s.state {
            SourceState::Ok => ("", "ok".to_owned()),
            SourceState::Skipped(why) => ("skip", why.clone()),
            SourceState::Failed(why) => ("fail", format!("failed: {why}")),
        };
        let (ruler, moved) = super::ruler_cell(s);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"{class}\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n{}\">{}</td></tr>",
            esc(&s.name),
            esc(&text),
            s.runs,
            s.records,
            if s.seconds > 0.0 {
                format!("{:.2}", s.seconds)
            } else {
                "-".into()
            },
            if moved { " fail" } else { "" },
            ruler
        );
    }
    h.push_str("</table>\n");
    let _ = writeln!(h, "<p>{}</p>", esc(&super::ruler_note(&report.sources)));

    let mut shown = vec![false; tables.len()];
    for f in figures {
        let _ = write!(
            h,
            "<h2 id=\"{}\">{}</h2>\n<div class=\"figure\">",
            f.id,
            esc(&f.heading)
        );
        match &f.svg {
            Ok(svg) => h.push_str(svg),
            Err(why) => {
                let _ = write!(h, "<p class=\"note\">No plot: {}.</p>", esc(why));
            }
        }
        let _ = writeln!(h, "</div>\n<p>{}</p>", esc(&f.reading));
        for (scenario, metric) in &f.tables {
            for (i, t) in tables.iter().enumerate() {
                if t.scenario == *scenario && metric.is_none_or(|m| t.metric == m) && !shown[i] {
                    shown[i] = true;
                    table(&mut h, t);
                }
            }
        }
    }
    if shown.iter().any(|s| !s) {
        h.push_str("<h2 id=\"other\">Other measurements</h2>\n");
        for (t, _) in tables.iter().zip(&shown).filter(|(_, s)| !**s) {
            table(&mut h, t);
        }
    }
    h.push_str("</body></html>\n");
    h
}

/// Escapes text and shows its `code` spans as code.
fn esc_code(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", esc(part));
        } else {
            out.push_str(&esc(part));
        }
    }
    out
}

/// The first section: vmmu against the host's KVM (`versus.rs`).
fn opening(h: &mut String, v: &Versus) {
    let _ = writeln!(h, "<h2 id=\"kvm\">{}</h2>", esc(versus::HEADING));
    if let Some(note) = &v.note {
        let _ = writeln!(h, "<p class=\"note\">{}</p>", esc(note));
    }
    for g in v.grids() {
        let _ = write!(h, "<table><caption>{}</caption><tr>", esc(&g.caption));
        for c in &g.head {
            let _ = write!(h, "<th>{}</th>", esc(c));
        }
        h.push_str("</tr>\n");
        for r in &g.rows {
            h.push_str("<tr>");
            for c in r {
                let class = match (c.number, c.alarm) {
                    (_, true) => " class=\"not-held\"",
                    (true, false) => " class=\"n\"",
                    (false, false) => "",
                };
                let _ = write!(h, "<td{class}>{}</td>", esc(&c.text));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</table>\n");
    }
    if let Some(r) = &v.reading {
        let _ = writeln!(h, "<p>{}</p>", esc_code(r));
    }
}

fn table(h: &mut String, t: &Table) {
    let constant = if t.constant.is_empty() {
        String::new()
    } else {
        format!(" · {}", t.constant.join(" "))
    };
    let _ = write!(
        h,
        "<table><caption>{}<span>{}</span></caption><tr>",
        esc(&t.title()),
        esc(&constant)
    );
    for k in &t.keys {
        let _ = write!(h, "<th>{}</th>", esc(k));
    }
    for v in &t.variants {
        let _ = write!(h, "<th>{}</th>", esc(v));
    }
    if t.has_floor {
        h.push_str("<th>floor</th>");
    }
    h.push_str("</tr>\n");
    for r in &t.rows {
        h.push_str("<tr>");
        for k in &r.key {
            let _ = write!(h, "<td>{}</td>", esc(k));
        }
        for v in &r.values {
            let cell = v.map_or("-".into(), |v| show_value(v, &t.unit));
            let x = r.times_floor(*v).map_or(String::new(), |x| {
                format!(" <span class=\"x\">{}</span>", times(x))
            });
            let _ = write!(h, "<td class=\"n\">{cell}{x}</td>");
        }
        if t.has_floor {
            let _ = write!(
                h,
                "<td class=\"n\">{}</td>",
                r.floor.map_or("-".into(), num)
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    if t.has_floor {
        h.push_str(
            "<p class=\"x\">Small figures after a value: its multiple of the floor in the same row.</p>\n",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_become_code() {
        assert_eq!(
            esc_code("run `a <b>` then `c`."),
            "run <code>a &lt;b&gt;</code> then <code>c</code>."
        );
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
