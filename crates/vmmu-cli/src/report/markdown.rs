//! `report.md`: the page's tables and words, without the plots.

use std::fmt::Write;

use super::figures::Figure;
use super::summary::{num, times};
use super::tables::{show_value, Table};
use super::versus::{self, Versus};
use super::{Report, SourceState};

/// Escapes the characters that would break a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Renders the document.
pub fn document(report: &Report, versus: &Versus, figures: &[Figure], tables: &[Table]) -> String {
    let m = &report.meta;
    let mut d = String::new();
    let _ = writeln!(d, "# vmmu report\n");
    let _ = writeln!(
        d,
        "{} · {} · {} CPUs · {} GiB slots{} · median of {} runs per value{} · {:.0} s in all · `{}`\n",
        m.generated,
        m.version,
        m.cpus,
        m.mem_gib,
        if m.quick { " (quick: 16x smaller)" } else { "" },
        m.runs,
        if m.warm_up { " after a warm-up run" } else { "" },
        m.seconds,
        m.command
    );
    d.push_str(
        "The plots are in `index.html`; every measurement is in `results.json`. Ratios above 1 \
         mean the seed's algorithm is faster by that factor; `(N x)` after a value is its \
         multiple of the floor (the least work of the same operations, in a tight loop over \
         memory laid out as the MMU's).\n\n",
    );
    opening(&mut d, versus);
    d.push_str("## The seeds' claims\n\n| seed | claim | variants compared | measured | rule | held |\n|---|---|---|---|---|---|\n");
    for s in &report.seeds {
        let _ = writeln!(
            d,
            "| {} | {} | {} | {} | {} | {} |",
            s.seed,
            cell(s.claim),
            cell(&s.pair),
            cell(&s.measured),
            cell(&s.rule),
            s.verdict
        );
    }
    d.push_str(
        "\n## What ran\n\n| scenario | status | runs | records | seconds | CPU ruler spread |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for s in &report.sources {
        let status = match &s.state {
            SourceState::Ok => "ok".to_owned(),
            SourceState::Skipped(why) => why.clone(),
            SourceState::Failed(why) => format!("**failed**: {why}"),
        };
        let (ruler, moved) = super::ruler_cell(s);
        let _ = writeln!(
            d,
            "| {} | {} | {} | {} | {:.2} | {} |",
            s.name,
            cell(&status),
            s.runs,
            s.records,
            s.seconds,
            if moved { format!("**{ruler}**") } else { ruler }
        );
    }
    let _ = writeln!(d, "\n{}", super::ruler_note(&report.sources));
    let mut shown = vec![false; tables.len()];
    for f in figures {
        let _ = writeln!(d, "\n## {}\n", f.heading);
        if let Err(why) = &f.svg {
            let _ = writeln!(d, "_No plot: {why}._\n");
        }
        let _ = writeln!(d, "{}\n", f.reading);
        for (scenario, metric) in &f.tables {
            for (i, t) in tables.iter().enumerate() {
                if t.scenario == *scenario && metric.is_none_or(|m| t.metric == m) && !shown[i] {
                    shown[i] = true;
                    table(&mut d, t);
                }
            }
        }
    }
    if shown.iter().any(|s| !s) {
        d.push_str("\n## Other measurements\n\n");
        for (t, _) in tables.iter().zip(&shown).filter(|(_, s)| !**s) {
            table(&mut d, t);
        }
    }
    d
}

/// The first section: vmmu against the host's KVM (`versus.rs`).
fn opening(d: &mut String, v: &Versus) {
    let _ = writeln!(d, "## {}\n", versus::HEADING);
    if let Some(note) = &v.note {
        let _ = writeln!(d, "_{}_\n", note.trim_end_matches('.'));
    }
    for g in v.grids() {
        let _ = writeln!(d, "**{}**\n", g.caption);
        let _ = writeln!(d, "| {} |", g.head.join(" | "));
        let align: Vec<&str> = g.rows.first().map_or(Vec::new(), |r| {
            r.iter()
                .map(|c| if c.number { "---:" } else { "---" })
                .collect()
        });
        let _ = writeln!(d, "|{}|", align.join("|"));
        for r in &g.rows {
            let cells: Vec<String> = r
                .iter()
                .map(|c| {
                    if c.alarm {
                        format!("**{}**", cell(&c.text))
                    } else {
                        cell(&c.text)
                    }
                })
                .collect();
            let _ = writeln!(d, "| {} |", cells.join(" | "));
        }
        d.push('\n');
    }
    if let Some(r) = &v.reading {
        let _ = writeln!(d, "{r}\n");
    }
}

fn table(d: &mut String, t: &Table) {
    let constant = if t.constant.is_empty() {
        String::new()
    } else {
        format!(" — {}", t.constant.join(" "))
    };
    let _ = writeln!(d, "**{}**{}\n", t.title(), constant);
    let mut head: Vec<String> = t.keys.clone();
    head.extend(t.variants.iter().cloned());
    if t.has_floor {
        head.push("floor".into());
    }
    let _ = writeln!(d, "| {} |", head.join(" | "));
    let align: Vec<&str> = head
        .iter()
        .enumerate()
        .map(|(i, _)| if i < t.keys.len() { "---" } else { "---:" })
        .collect();
    let _ = writeln!(d, "|{}|", align.join("|"));
    for r in &t.rows {
        let mut cells: Vec<String> = r.key.iter().map(|k| cell(k)).collect();
        for v in &r.values {
            let mut c = v.map_or("-".into(), |v| show_value(v, &t.unit));
            if let Some(x) = r.times_floor(*v) {
                let _ = write!(c, " ({})", times(x));
            }
            cells.push(c);
        }
        if t.has_floor {
            cells.push(r.floor.map_or("-".into(), num));
        }
        let _ = writeln!(d, "| {} |", cells.join(" | "));
    }
    d.push('\n');
}
