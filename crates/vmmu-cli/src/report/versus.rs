//! The report's opening: vmmu against the host's KVM, summed up from `kvm-compare`'s
//! records (`crate::kvm`), before the seeds.
//!
//! Two tables and a paragraph:
//! - harvests: a row per (mode, ratio) in the records' order, whatever the modes are (`get`,
//!   `get-clear`, any added later); KVM's time, vmmu's shadow MMU's and TDP MMU's, KVM's
//!   time over each (the speed-up; also over the fastest rounds where both records carry a
//!   minimum) and whether both vmmu bitmaps equalled KVM's;
//! - first touch (ns per page) and memslot delete (us) by host backing, KVM and vmmu;
//! - what the ratios mean, how the two were run, which MMU the host's KVM runs on, and the
//!   command that reproduces them.
//!
//! Where `kvm-compare` did not run, or reported nothing, the section is one line saying
//! why. Where it failed after reporting (the bitmaps differed), that line comes first and
//! the tables follow. Every value is also in the full kvm-compare tables further down.

use serde_json::Value;

use super::kvm;
use super::query;
use super::summary::{num, times};
use super::tables::show;
use super::{Source, SourceState};
use crate::bench::names::kvm_compare as kc;
use crate::bench::Record;

/// The section's heading, in both documents.
pub const HEADING: &str = "vmmu against the host's KVM";

/// One record's median and, if it carries one, its minimum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// The median over the rounds.
    pub median: f64,
    /// The fastest round, when the record says.
    pub min: Option<f64>,
}

impl Timing {
    fn of(r: &Record) -> Self {
        Timing {
            median: r.value,
            min: r.min,
        }
    }
}

/// KVM's time over vmmu's: above 1, vmmu is faster by that factor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speedup {
    /// Of the medians.
    pub median: f64,
    /// Of the minimums, when both records carry one.
    pub min: Option<f64>,
}

impl Speedup {
    /// KVM's over vmmu's, when both were measured.
    pub fn of(kvm: Option<Timing>, vmmu: Option<Timing>) -> Option<Self> {
        let (k, v) = (kvm?, vmmu?);
        Some(Speedup {
            median: k.median / v.median,
            min: k.min.zip(v.min).map(|(k, v)| k / v),
        })
    }

    /// `3.20x`, or `3.20x (min 3.50x)`.
    pub fn cell(&self) -> String {
        match self.min {
            Some(m) => format!("{} (min {})", times(self.median), times(m)),
            None => times(self.median),
        }
    }
}

/// One (mode, ratio) of the harvests.
#[derive(Clone, Debug, PartialEq)]
pub struct HarvestRow {
    /// The dirty-log mode, as the records name it.
    pub mode: String,
    /// The dirty ratio, as a table shows it.
    pub ratio: String,
    /// KVM's harvest.
    pub kvm: Option<Timing>,
    /// vmmu's shadow MMU's (its default configuration).
    pub shadow: Option<Timing>,
    /// vmmu's TDP MMU's.
    pub tdp: Option<Timing>,
    /// Per vmmu MMU with a `bitmap_equal` record: its name and whether its bitmap equalled
    /// KVM's in every round.
    pub bitmaps: Vec<(&'static str, bool)>,
}

impl HarvestRow {
    /// `yes` when every vmmu bitmap equalled KVM's, `NO (which)` when one did not, `-`
    /// without a record; and whether it is a `NO`.
    pub fn bitmaps_cell(&self) -> (String, bool) {
        let differ: Vec<&str> = self
            .bitmaps
            .iter()
            .filter(|(_, eq)| !eq)
            .map(|(n, _)| *n)
            .collect();
        if self.bitmaps.is_empty() {
            ("-".into(), false)
        } else if differ.is_empty() {
            ("yes".into(), false)
        } else {
            (format!("NO ({})", differ.join(", ")), true)
        }
    }
}

/// One host backing's first touch and memslot delete.
#[derive(Clone, Debug, PartialEq)]
pub struct BackingRow {
    /// `4k`, `2m`.
    pub backing: String,
    /// KVM's first touch, ns per page.
    pub kvm_fault: Option<Timing>,
    /// vmmu's.
    pub vmmu_fault: Option<Timing>,
    /// KVM's memslot delete, us.
    pub kvm_delete: Option<Timing>,
    /// vmmu's.
    pub vmmu_delete: Option<Timing>,
}

/// A table cell: its text, whether it is a number (right-aligned), whether it is an alarm
/// (a bitmap that differed).
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// What it shows.
    pub text: String,
    /// Right-aligned.
    pub number: bool,
    /// Shown as a failure.
    pub alarm: bool,
}

impl Cell {
    fn text(s: &str) -> Self {
        Cell {
            text: s.to_owned(),
            number: false,
            alarm: false,
        }
    }

    fn value(t: Option<Timing>) -> Self {
        Cell {
            text: t.map_or("-".into(), |t| num(t.median)),
            number: true,
            alarm: false,
        }
    }

    fn speedup(s: Option<Speedup>) -> Self {
        Cell {
            text: s.map_or("-".into(), |s| s.cell()),
            number: true,
            alarm: false,
        }
    }
}

/// A table as both documents lay it out.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Its title.
    pub caption: String,
    /// Column heads.
    pub head: Vec<&'static str>,
    /// Rows of cells, as many as heads.
    pub rows: Vec<Vec<Cell>>,
}

/// The section.
#[derive(Clone, Debug, PartialEq)]
pub struct Versus {
    /// One line first: why nothing was measured, or that kvm-compare failed.
    pub note: Option<String>,
    /// The harvests.
    pub harvest: Vec<HarvestRow>,
    /// First touch and delete.
    pub backing: Vec<BackingRow>,
    /// The paragraph on reading the tables, when there are any.
    pub reading: Option<String>,
}

/// Builds the section from the report's sources and records; `host_mmu` is which MMU the
/// host's KVM runs on (`kvm::host_mmu`).
pub fn versus(sources: &[Source], records: &[Record], host_mmu: Option<&str>) -> Versus {
    let source = sources.iter().find(|s| s.name == kvm::NAME);
    let harvest = harvest_rows(records);
    let backing = backing_rows(records);
    let reported = !harvest.is_empty() || !backing.is_empty();
    let not_run = |why: String| Versus {
        note: Some(why),
        harvest: Vec::new(),
        backing: Vec::new(),
        reading: None,
    };
    let note = match source.map(|s| &s.state) {
        None => return not_run("Not measured: kvm-compare is not a source of this report.".into()),
        Some(SourceState::Skipped(why)) => {
            return not_run(format!("Not measured in this run: kvm-compare {why}."))
        }
        Some(SourceState::Failed(why)) if !reported => {
            return not_run(format!("Not measured: kvm-compare failed: {why}."))
        }
        Some(SourceState::Failed(why)) => Some(format!(
            "kvm-compare failed: {why}. The tables show what it reported before failing."
        )),
        Some(SourceState::Ok) if !reported => {
            return not_run("Not measured: kvm-compare ran but reported nothing.".into())
        }
        Some(SourceState::Ok) => None,
    };
    let rounds = source.map_or(0, |s| s.runs);
    let reading = reading(records, &harvest, rounds, host_mmu);
    Versus {
        note,
        harvest,
        backing,
        reading: Some(reading),
    }
}

/// A dirty ratio as the tables show it: `0`, `0.001`, `1`.
fn ratio_text(v: &Value) -> String {
    match v.as_f64() {
        Some(r) => format!("{r}"),
        None => show(v),
    }
}

fn timing(records: &[Record], variant: &str, metric: &str, p: &[(&str, Value)]) -> Option<Timing> {
    query::of(records, kc::NAME, metric)
        .find(|r| r.variant == variant && query::has_params(r, p))
        .map(Timing::of)
}

fn harvest_rows(records: &[Record]) -> Vec<HarvestRow> {
    let mut keys: Vec<(Value, Value)> = Vec::new();
    for r in query::of(records, kc::NAME, kc::HARVEST_US) {
        let (Some(mode), Some(ratio)) = (r.params.get("mode"), r.params.get("ratio")) else {
            continue;
        };
        if !keys
            .iter()
            .any(|(m, x)| m == mode && query::same_value(x, ratio))
        {
            keys.push((mode.clone(), ratio.clone()));
        }
    }
    keys.into_iter()
        .map(|(mode, ratio)| {
            let p = [("mode", mode.clone()), ("ratio", ratio.clone())];
            let bitmaps = [(kc::VMMU, "shadow"), (kc::VMMU_TDP, "TDP")]
                .into_iter()
                .filter_map(|(variant, name)| {
                    let eq = timing(records, variant, kc::BITMAP_EQUAL, &p)?;
                    Some((name, eq.median == 1.0))
                })
                .collect();
            HarvestRow {
                mode: show(&mode),
                ratio: ratio_text(&ratio),
                kvm: timing(records, kc::KVM, kc::HARVEST_US, &p),
                shadow: timing(records, kc::VMMU, kc::HARVEST_US, &p),
                tdp: timing(records, kc::VMMU_TDP, kc::HARVEST_US, &p),
                bitmaps,
            }
        })
        .collect()
}

fn backing_rows(records: &[Record]) -> Vec<BackingRow> {
    let mut keys: Vec<Value> = Vec::new();
    for r in records.iter().filter(|r| {
        r.scenario == kc::NAME && (r.metric == kc::FAULT_NS_PER_PAGE || r.metric == kc::DELETE_US)
    }) {
        if let Some(b) = r.params.get("backing") {
            if !keys.contains(b) {
                keys.push(b.clone());
            }
        }
    }
    keys.into_iter()
        .map(|b| {
            let p = [("backing", b.clone())];
            BackingRow {
                backing: show(&b),
                kvm_fault: timing(records, kc::KVM, kc::FAULT_NS_PER_PAGE, &p),
                vmmu_fault: timing(records, kc::VMMU, kc::FAULT_NS_PER_PAGE, &p),
                kvm_delete: timing(records, kc::KVM, kc::DELETE_US, &p),
                vmmu_delete: timing(records, kc::VMMU, kc::DELETE_US, &p),
            }
        })
        .collect()
}

impl Versus {
    /// The tables, as both documents lay them out (none when nothing was measured).
    pub fn grids(&self) -> Vec<Grid> {
        let mut grids = Vec::new();
        if !self.harvest.is_empty() {
            grids.push(Grid {
                caption: "Dirty-log harvest: KVM and both vmmu MMUs (us, median)".into(),
                head: vec![
                    "mode",
                    "ratio",
                    "KVM us",
                    "vmmu shadow us",
                    "KVM/shadow",
                    "vmmu TDP us",
                    "KVM/TDP",
                    "bitmaps identical",
                ],
                rows: self
                    .harvest
                    .iter()
                    .map(|r| {
                        let (bitmaps, differ) = r.bitmaps_cell();
                        vec![
                            Cell::text(&r.mode),
                            Cell::text(&r.ratio),
                            Cell::value(r.kvm),
                            Cell::value(r.shadow),
                            Cell::speedup(Speedup::of(r.kvm, r.shadow)),
                            Cell::value(r.tdp),
                            Cell::speedup(Speedup::of(r.kvm, r.tdp)),
                            Cell {
                                text: bitmaps,
                                number: false,
                                alarm: differ,
                            },
                        ]
                    })
                    .collect(),
            });
        }
        if !self.backing.is_empty() {
            grids.push(Grid {
                caption: "First touch and memslot delete, by host backing (median)".into(),
                head: vec![
                    "backing",
                    "KVM first touch ns/page",
                    "vmmu first touch ns/page",
                    "KVM/vmmu",
                    "KVM delete us",
                    "vmmu delete us",
                    "KVM/vmmu",
                ],
                rows: self
                    .backing
                    .iter()
                    .map(|r| {
                        vec![
                            Cell::text(&r.backing),
                            Cell::value(r.kvm_fault),
                            Cell::value(r.vmmu_fault),
                            Cell::speedup(Speedup::of(r.kvm_fault, r.vmmu_fault)),
                            Cell::value(r.kvm_delete),
                            Cell::value(r.vmmu_delete),
                            Cell::speedup(Speedup::of(r.kvm_delete, r.vmmu_delete)),
                        ]
                    })
                    .collect(),
            });
        }
        grids
    }
}

fn reading(records: &[Record], harvest: &[HarvestRow], rounds: u32, host: Option<&str>) -> String {
    let with_min = harvest.iter().any(|r| {
        [r.shadow, r.tdp]
            .iter()
            .any(|v| Speedup::of(r.kvm, *v).is_some_and(|s| s.min.is_some()))
    });
    let mins = if with_min {
        "; `(min ...)` is the same ratio over the fastest rounds"
    } else {
        " (of the medians: KVM's records carry no minimum)"
    };
    let mem = records
        .iter()
        .filter(|r| r.scenario == kc::NAME)
        .find_map(|r| r.params.get("mem_gib").map(show))
        .map_or(String::new(), |g| format!(" of a {g} GiB data memslot"));
    let host = match host {
        Some(h) => format!("The host's KVM ran it on {h}."),
        None => "Which MMU the host's KVM ran it on could not be read from its module \
                 parameters."
            .into(),
    };
    let differ = harvest.iter().any(|r| r.bitmaps_cell().1);
    let bitmaps = if differ {
        "`NO` marks a mode and ratio where a vmmu bitmap differed from KVM's in some round \
         (kvm-compare's error says where)."
    } else {
        "Every harvested bitmap of both vmmu MMUs equalled KVM's, word for word, in every \
         round."
    };
    let rounds = match rounds {
        1 => "one round each".to_owned(),
        n => format!("each value the median of {n} rounds"),
    };
    format!(
        "Each ratio is KVM's time over vmmu's for the same operation: above 1x vmmu is faster \
         by that factor, below 1x KVM is{mins}. KVM and vmmu ran in this same run, their \
         rounds interleaved ({rounds}), on the same workload: \
         a stride of pages{mem} (dirty ratio r writes every round(1/r)-th page; 4 KiB host \
         pages for the harvests), written on /dev/kvm by one vCPU at CPL 3 on 2 MiB guest \
         pages with host memory populated before the VM starts (no host page faults in the \
         figures), and through vmmu's CPU model over the same slot. {host} vmmu shadow is \
         vmmu's default configuration (the shadow MMU, direct) and vmmu TDP its TDP MMU; \
         first touch and delete are the default's. {bitmaps} To reproduce: `vmmu kvm compare` (under \
         `chrt -f 20`, or on an idle machine, for figures to quote). The full kvm-compare \
         tables are further down, under the figures."
    )
}

#[cfg(test)]
mod tests {
    use super::super::query::tests::rec;
    use super::*;
    use serde_json::json;

    fn source(state: SourceState) -> Vec<Source> {
        vec![Source {
            name: kc::NAME.into(),
            state,
            runs: 5,
            records: 0,
            seconds: 1.0,
            ruler: None,
        }]
    }

    fn hp(mode: &str, ratio: f64) -> [(&'static str, Value); 3] {
        [
            ("mode", json!(mode)),
            ("ratio", json!(ratio)),
            ("mem_gib", json!(1)),
        ]
    }

    fn with_min(mut r: Record, min: f64) -> Record {
        r.min = Some(min);
        r
    }

    /// Two modes (one of them a mode this module has never heard of), in the records' order.
    fn records() -> Vec<Record> {
        let mut v = Vec::new();
        for (mode, ratio, k, s, t, eq_t) in [
            ("get", 0.001, 32.0, 10.0, 16.0, 1.0),
            ("get", 1.0, 900.0, 300.0, 450.0, 1.0),
            ("ring", 0.5, 500.0, 100.0, 250.0, 0.0),
        ] {
            let p = hp(mode, ratio);
            v.push(rec(kc::NAME, kc::KVM, kc::HARVEST_US, &p, k));
            v.push(with_min(
                rec(kc::NAME, kc::VMMU, kc::HARVEST_US, &p, s),
                s * 0.8,
            ));
            v.push(rec(kc::NAME, kc::VMMU, kc::BITMAP_EQUAL, &p, 1.0));
            v.push(with_min(
                rec(kc::NAME, kc::VMMU_TDP, kc::HARVEST_US, &p, t),
                t * 0.8,
            ));
            v.push(rec(kc::NAME, kc::VMMU_TDP, kc::BITMAP_EQUAL, &p, eq_t));
        }
        for (b, kf, vf, kd, vd) in [
            ("4k", 1700.0, 100.0, 3900.0, 1000.0),
            ("2m", 50.0, 5.0, 2290.0, 100.0),
        ] {
            let p = [("backing", json!(b)), ("mem_gib", json!(1))];
            v.push(rec(kc::NAME, kc::KVM, kc::FAULT_NS_PER_PAGE, &p, kf));
            v.push(rec(kc::NAME, kc::VMMU, kc::FAULT_NS_PER_PAGE, &p, vf));
            v.push(rec(kc::NAME, kc::KVM, kc::DELETE_US, &p, kd));
            v.push(rec(kc::NAME, kc::VMMU, kc::DELETE_US, &p, vd));
        }
        // Another scenario's harvest is not kvm-compare's.
        v.push(rec(
            "dirty-log",
            "get",
            kc::HARVEST_US,
            &hp("get", 0.1),
            1.0,
        ));
        v
    }

    #[test]
    fn harvest_rows_follow_the_records_with_both_mmus() {
        let v = versus(
            &source(SourceState::Ok),
            &records(),
            Some("its shadow MMU (x)"),
        );
        assert_eq!(v.note, None);
        let keys: Vec<(&str, &str)> = v
            .harvest
            .iter()
            .map(|r| (r.mode.as_str(), r.ratio.as_str()))
            .collect();
        assert_eq!(keys, [("get", "0.001"), ("get", "1"), ("ring", "0.5")]);
        let r = &v.harvest[0];
        let s = Speedup::of(r.kvm, r.shadow).unwrap();
        assert_eq!(s.median, 3.2);
        // KVM's records carry no minimum: medians only.
        assert_eq!(s.min, None);
        assert_eq!(s.cell(), "3.20x");
        assert_eq!(Speedup::of(r.kvm, r.tdp).unwrap().cell(), "2.00x");
        assert_eq!(r.bitmaps_cell(), ("yes".into(), false));
        assert_eq!(v.harvest[2].bitmaps_cell(), ("NO (TDP)".into(), true));

        let grids = v.grids();
        assert_eq!(grids.len(), 2);
        let h = &grids[0];
        assert_eq!(h.head[2..5], ["KVM us", "vmmu shadow us", "KVM/shadow"]);
        let texts: Vec<&str> = h.rows[1].iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            ["get", "1", "900", "300", "3.00x", "450", "2.00x", "yes"]
        );
        assert!(h.rows[2][7].alarm && !h.rows[1][7].alarm);
        assert!(h.rows.iter().all(|r| r.len() == h.head.len()));

        let reading = v.reading.unwrap();
        assert!(reading.contains("above 1x vmmu is faster"), "{reading}");
        assert!(
            reading.contains("KVM's records carry no minimum"),
            "{reading}"
        );
        assert!(reading.contains("median of 5 rounds"), "{reading}");
        assert!(
            reading.contains("a stride of pages of a 1 GiB data memslot"),
            "{reading}"
        );
        assert!(
            reading.contains("ran it on its shadow MMU (x)."),
            "{reading}"
        );
        assert!(reading.contains("`vmmu kvm compare`"), "{reading}");
        assert!(reading.contains("`NO` marks"), "{reading}");
    }

    #[test]
    fn minimums_are_compared_where_both_sides_have_one() {
        let p = hp("get-clear", 0.0);
        let rs = vec![
            with_min(rec(kc::NAME, kc::KVM, kc::HARVEST_US, &p, 10.0), 8.0),
            with_min(rec(kc::NAME, kc::VMMU, kc::HARVEST_US, &p, 4.0), 2.0),
            rec(kc::NAME, kc::VMMU_TDP, kc::HARVEST_US, &p, 5.0),
        ];
        let v = versus(&source(SourceState::Ok), &rs, None);
        let r = &v.harvest[0];
        assert_eq!((r.mode.as_str(), r.ratio.as_str()), ("get-clear", "0"));
        assert_eq!(
            Speedup::of(r.kvm, r.shadow).unwrap().cell(),
            "2.50x (min 4.00x)"
        );
        assert_eq!(Speedup::of(r.kvm, r.tdp).unwrap().cell(), "2.00x");
        assert_eq!(r.bitmaps_cell(), ("-".into(), false));
        let reading = v.reading.clone().unwrap();
        assert!(reading.contains("`(min ...)`"), "{reading}");
        assert!(reading.contains("could not be read"), "{reading}");
        // No fault or delete records: one table.
        assert_eq!(v.grids().len(), 1);
    }

    #[test]
    fn first_touch_and_delete_by_backing() {
        let v = versus(&source(SourceState::Ok), &records(), None);
        let b: Vec<&str> = v.backing.iter().map(|r| r.backing.as_str()).collect();
        assert_eq!(b, ["4k", "2m"]);
        let g = &v.grids()[1];
        let texts: Vec<&str> = g.rows[0].iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["4k", "1700", "100", "17x", "3900", "1000", "3.90x"]);
        assert_eq!(g.rows[1][6].text, "23x");
    }

    #[test]
    fn says_why_in_one_line_where_kvm_compare_did_not_run() {
        let skipped = versus(
            &source(SourceState::Skipped(
                "skipped: cannot open /dev/kvm: No such file".into(),
            )),
            &[],
            None,
        );
        assert_eq!(
            skipped.note.as_deref(),
            Some("Not measured in this run: kvm-compare skipped: cannot open /dev/kvm: No such file.")
        );
        assert!(skipped.grids().is_empty() && skipped.reading.is_none());
        let not_built = versus(
            &source(SourceState::Skipped(
                "not available in this build (x)".into(),
            )),
            &[],
            None,
        );
        assert!(not_built
            .note
            .unwrap()
            .ends_with("kvm-compare not available in this build (x)."));
        let failed = versus(&source(SourceState::Failed("boom".into())), &[], None);
        assert_eq!(
            failed.note.as_deref(),
            Some("Not measured: kvm-compare failed: boom.")
        );
        assert!(failed.grids().is_empty());
        let nothing = versus(&source(SourceState::Ok), &[], None);
        assert!(nothing.note.unwrap().contains("reported nothing"));
        assert!(versus(&[], &records(), None).grids().is_empty());
    }

    #[test]
    fn a_failure_after_records_keeps_the_tables() {
        let v = versus(
            &source(SourceState::Failed("bitmaps differ".into())),
            &records(),
            None,
        );
        assert!(v
            .note
            .as_deref()
            .unwrap()
            .starts_with("kvm-compare failed: bitmaps differ."));
        assert_eq!(v.grids().len(), 2);
        assert!(v.reading.is_some());
    }
}
