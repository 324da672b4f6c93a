//! One row per seed: its claim, the variant pair that tests it, the ratio measured in this
//! run, and whether the claim held by a rule read from the seed's own words.
//!
//! | seed | measured | held when |
//! |---|---|---|
//! | 000 | `perf-dirty-log -g` on the shadow MMU (GET_DIRTY_LOG of 1 GB dirty, one SPTE per reverse map): restart-scan / iterator, get dirty log total; `rmap-iter`'s longest list beside it | at least 1.15 (the seed's "15% faster") |
//! | 001 | `writable-bitmap` scan-512 / bitmap at 0 and 1 writable entries | at least 1.1 at both (the bitmap avoids the scan) |
//! | 002 | `tdp-zap-hello` loops, scan-all / skip-non-present (and used-entries) | at least the seed's 7168 / 239 on its first root, and both fast modes zap faster than scan-all |
//! | 003 | `pte-list-destroy` one-by-one / destroy at len 1000 | at least 1.1 |
//! | 004 | `wrprot-slot` walk-pages / per-gfn at the lowest nonzero ratio, and at the highest ratio below the rule's switch | at least 2 ("some times faster"), and at least 1/1.1 near the switch ("not worse") |
//!
//! A ratio above 1 means the seed's algorithm is faster by that factor. Noise on a shared
//! machine moves ratios near 1, hence the 10% margins where the seed gives no figure.

use std::fmt;

use serde::Serialize;
use serde_json::{json, Value};

use super::query;
use crate::bench::names::{
    pte_list_destroy, rmap_iter, tdp, tdp_zap_hello, writable_bitmap, wrprot_slot,
};
use crate::bench::Record;

/// The seed's first-root loop counts: 3584 + 2048 + 1024 + 512 before, 118 + 69 + 35 + 17
/// with the fast-forward.
const SEED_002_LOOPS: (f64, f64) = (7168.0, 239.0);

/// The fraction of a fully mapped 4 KiB slot's pages at which seed 004's rule switches from
/// per-gfn to walking the pages: dirty pages = shadow pages, about one leaf table per 512
/// pages.
pub const SEED_004_SWITCH: f64 = 1.0 / 512.0;

/// Whether the claim held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The measured ratio meets the rule.
    Held,
    /// It does not.
    NotHeld,
    /// A record the rule needs is missing (its scenario failed or is not in this build).
    NoData,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Held => "yes",
            Verdict::NotHeld => "NO",
            Verdict::NoData => "no data",
        })
    }
}

/// One seed's row.
#[derive(Clone, Debug, Serialize)]
pub struct SeedRow {
    /// `000` .. `004`.
    pub seed: &'static str,
    /// The patch's claim, shortened.
    pub claim: &'static str,
    /// The scenario and variant pair that test it.
    pub pair: String,
    /// The headline ratio (the seed's algorithm's advantage), if measured.
    pub ratio: Option<f64>,
    /// The figures behind it, in words.
    pub measured: String,
    /// The rule deciding `verdict`.
    pub rule: String,
    /// Whether the claim held.
    pub verdict: Verdict,
}

/// The rows for seeds 000 to 004.
pub fn seeds(records: &[Record]) -> Vec<SeedRow> {
    vec![
        seed_000(records),
        seed_001(records),
        seed_002(records),
        seed_003(records),
        seed_004(records),
    ]
}

fn verdict(ok: Option<bool>) -> Verdict {
    match ok {
        Some(true) => Verdict::Held,
        Some(false) => Verdict::NotHeld,
        None => Verdict::NoData,
    }
}

/// `12.3x`, `0.78x`: two significant digits below 10.
pub fn times(r: f64) -> String {
    if !r.is_finite() {
        "-".into()
    } else if r >= 10.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.2}x")
    }
}

/// A number with as many digits as a timer justifies.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "-".into()
    } else if a >= 1000.0 || a == 0.0 || (v.fract() == 0.0 && a < 1e15) {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn seed_000(rs: &[Record]) -> SeedRow {
    // The seed's own workload: GET_DIRTY_LOG of 1 GB of dirty memory on the shadow MMU
    // (EPT, direct mode: one SPTE per reverse map), `perf-dirty-log` with `-g`.
    let dl = crate::bench::names::perf::dirty_log::NAME;
    let total = crate::bench::names::perf::dirty_log::GET_DIRTY_LOG_TOTAL;
    let p = [("g", json!(true)), ("mmu", json!("shadow"))];
    let get = |v: &str| query::value(rs, dl, v, total, &p);
    let (old_get, new_get) = (get(SHADOW_RESTART_SCAN), get(SHADOW_ITERATOR));
    let ratio = old_get.zip(new_get).map(|(o, n)| o / n);
    // The long-list figure beside it: rmap-iter at its longest list.
    let (s, m) = (rmap_iter::NAME, rmap_iter::NS_PER_SPTE);
    let len = query::of(rs, s, m)
        .filter_map(|r| r.params.get("len")?.as_u64())
        .max();
    let at = |v: &str| len.and_then(|l| query::value(rs, s, v, m, &[("len", json!(l))]));
    let (old, new) = (at(rmap_iter::RESTART_SCAN), at(rmap_iter::ITERATOR));
    let long = match (old, new, len) {
        (Some(o), Some(n), Some(l)) => format!(
            "; lists of {l}: {} ({} vs {} ns/spte)",
            times(o / n),
            num(o),
            num(n)
        ),
        _ => String::new(),
    };
    SeedRow {
        seed: "000",
        claim: "rmap iterator: GET_DIRTY_LOG of 1 GB dirty 15% faster",
        pair: "perf-dirty-log -g, shadow MMU: iterator vs restart-scan (get dirty log total)"
            .into(),
        ratio,
        measured: match (old_get, new_get) {
            (Some(o), Some(n)) => format!(
                "{} ({} vs {} us){long}",
                times(o / n),
                num(o * 1e6),
                num(n * 1e6)
            ),
            _ if !long.is_empty() => format!("-{long}"),
            _ => "-".into(),
        },
        rule: "restart-scan / iterator >= 1.15 on GET_DIRTY_LOG of 1 GB dirty".into(),
        verdict: verdict(ratio.map(|r| r >= 1.15)),
    }
}

/// `perf-dirty-log`'s variants on the shadow MMU with each reverse-map iteration.
const SHADOW_ITERATOR: &str = "vmmu-shadow";
const SHADOW_RESTART_SCAN: &str = "vmmu-shadow-restart-scan";

fn seed_001(rs: &[Record]) -> SeedRow {
    let (s, m) = (writable_bitmap::NAME, writable_bitmap::NS_PER_PAGE);
    let at = |v: &str, w: u64| query::value(rs, s, v, m, &[("writable", json!(w))]);
    let (old, new) = (writable_bitmap::SCAN_512, writable_bitmap::BITMAP);
    let r0 = at(old, 0).zip(at(new, 0)).map(|(o, n)| o / n);
    let r1 = at(old, 1).zip(at(new, 1)).map(|(o, n)| o / n);
    let both = r0.zip(r1);
    SeedRow {
        seed: "001",
        claim: "writable bitmap: write-protect without scanning 512 SPTEs",
        pair: "writable-bitmap: bitmap vs scan-512, writable 0 and 1".into(),
        ratio: both.map(|(a, b)| a.min(b)),
        measured: match both {
            Some((a, b)) => format!("{} at 0, {} at 1", times(a), times(b)),
            None => "-".into(),
        },
        rule: "scan-512 / bitmap >= 1.1 at writable 0 and at 1".into(),
        verdict: verdict(both.map(|(a, b)| a >= 1.1 && b >= 1.1)),
    }
}

fn seed_002(rs: &[Record]) -> SeedRow {
    let s = tdp_zap_hello::NAME;
    let modes = [tdp::SCAN_ALL, tdp::SKIP_NON_PRESENT, tdp::USED_ENTRIES];
    let at = |m: &str| modes.map(|v| query::value(rs, s, v, m, &[]));
    let loops = at(tdp_zap_hello::LOOPS);
    let ns = at(tdp_zap_hello::NS);
    let ratio = loops[0].zip(loops[1]).map(|(o, n)| o / n.max(1.0));
    let need = SEED_002_LOOPS.0 / SEED_002_LOOPS.1;
    let ok = match (ratio, ns) {
        (Some(r), [Some(a), Some(b), Some(c)]) => Some(r >= need && b < a && c < a),
        _ => None,
    };
    let measured = match (loops, ns) {
        ([Some(l0), Some(l1), Some(l2)], [Some(a), Some(b), Some(c)]) => format!(
            "loops {} -> {} ({}), used-entries {}; zap {} -> {} -> {} us",
            num(l0),
            num(l1),
            times(l0 / l1.max(1.0)),
            num(l2),
            num(a / 1e3),
            num(b / 1e3),
            num(c / 1e3)
        ),
        _ => "-".into(),
    };
    SeedRow {
        seed: "002",
        claim: "zap fast-forward: tiny VM teardown 9216 -> 303 loops",
        pair: "tdp-zap-hello: scan-all vs skip-non-present vs used-entries".into(),
        ratio,
        measured,
        rule: format!(
            "scan-all / skip-non-present loops >= {} (seed: {} -> {} on its first root), and both fast modes zap faster",
            times(need),
            SEED_002_LOOPS.0,
            SEED_002_LOOPS.1
        ),
        verdict: verdict(ok),
    }
}

fn seed_003(rs: &[Record]) -> SeedRow {
    let (s, m) = (pte_list_destroy::NAME, pte_list_destroy::NS_PER_SPTE);
    let at = |v: &str, len: u64| query::value(rs, s, v, m, &[("len", json!(len))]);
    let r = |len| at(pte_list_destroy::ONE_BY_ONE, len).zip(at(pte_list_destroy::DESTROY, len));
    let ratio = r(1000).map(|(o, n)| o / n);
    SeedRow {
        seed: "003",
        claim: "pte_list_destroy: long rmaps (200+) dropped in one pass",
        pair: "pte-list-destroy: destroy vs one-by-one, len 1000".into(),
        ratio,
        measured: match (r(1000), r(200)) {
            (Some((o, n)), other) => {
                let mut s = format!("{} ({} vs {} ns/spte)", times(o / n), num(o), num(n));
                if let Some((o2, n2)) = other {
                    s += &format!("; {} at len 200", times(o2 / n2));
                }
                s
            }
            _ => "-".into(),
        },
        rule: "one-by-one / destroy >= 1.1 at len 1000".into(),
        verdict: verdict(ratio.map(|r| r >= 1.1)),
    }
}

fn seed_004(rs: &[Record]) -> SeedRow {
    let (s, m) = (wrprot_slot::NAME, wrprot_slot::US);
    let mut ratios: Vec<f64> = query::of(rs, s, m)
        .filter_map(|r| r.params.get("ratio")?.as_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios.dedup();
    let at = |v: &str, ratio: f64| query::value(rs, s, v, m, &[("ratio", Value::from(ratio))]);
    let adv = |ratio: f64| {
        at(wrprot_slot::WALK_PAGES, ratio)
            .zip(at(wrprot_slot::PER_GFN, ratio))
            .map(|(o, n)| o / n)
    };
    let low = ratios.iter().copied().find(|&r| r > 0.0);
    let near = ratios
        .iter()
        .copied()
        .rfind(|&r| r > 0.0 && r < SEED_004_SWITCH);
    let (ra, rb) = (low.and_then(adv), near.and_then(adv));
    let measured = match (low, ra, near, rb) {
        (Some(l), Some(a), Some(n), Some(b)) => format!(
            "{} at ratio {l}; {} at {n} (the rule switches at ~{:.4})",
            times(a),
            times(b),
            SEED_004_SWITCH
        ),
        _ => "-".into(),
    };
    SeedRow {
        seed: "004",
        claim: "rmap write protect: some times faster at low ratios, not worse near the switch",
        pair: "wrprot-slot: per-gfn vs walk-pages".into(),
        ratio: ra,
        measured,
        rule: "walk-pages / per-gfn >= 2 at the lowest nonzero ratio, >= 1/1.1 at the highest ratio below the switch".into(),
        verdict: verdict(ra.zip(rb).map(|(a, b)| a >= 2.0 && b >= 1.0 / 1.1)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::query::tests::rec;
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(times(20.76), "21x");
        assert_eq!(times(0.781), "0.78x");
        assert_eq!(num(5535.2), "5535");
        assert_eq!(num(75.463), "75.46");
        assert_eq!(num(27.0), "27");
        assert_eq!(num(0.25), "0.250");
        assert_eq!(num(7168.0), "7168");
    }

    #[test]
    fn missing_records_give_no_data() {
        let rows = seeds(&[]);
        assert_eq!(rows.len(), 5);
        assert!(rows
            .iter()
            .all(|r| r.verdict == Verdict::NoData && r.ratio.is_none()));
    }

    #[test]
    fn rules_follow_the_claims() {
        let len = |l: u64| [("len", json!(l))];
        let rs = vec![
            rec("rmap-iter", "restart-scan", "ns_per_spte", &len(1), 9.0),
            rec("rmap-iter", "iterator", "ns_per_spte", &len(1), 9.0),
            rec(
                "rmap-iter",
                "restart-scan",
                "ns_per_spte",
                &len(1024),
                300.0,
            ),
            rec("rmap-iter", "iterator", "ns_per_spte", &len(1024), 15.0),
            rec(
                "pte-list-destroy",
                "one-by-one",
                "ns_per_spte",
                &len(1000),
                6.0,
            ),
            rec(
                "pte-list-destroy",
                "destroy",
                "ns_per_spte",
                &len(1000),
                7.5,
            ),
        ];
        // Without the seed's own workload: no verdict, the long-list figure still shown.
        let rows = seeds(&rs);
        assert_eq!(rows[0].verdict, Verdict::NoData);
        assert!(
            rows[0].measured.contains("lists of 1024: 20x"),
            "{}",
            rows[0].measured
        );
        let mut with_perf = rs.clone();
        let p = [("g", json!(true)), ("mmu", json!("shadow"))];
        with_perf.push(rec(
            "perf-dirty-log",
            "vmmu-shadow",
            "get_dirty_log_total",
            &p,
            0.001,
        ));
        with_perf.push(rec(
            "perf-dirty-log",
            "vmmu-shadow-restart-scan",
            "get_dirty_log_total",
            &p,
            0.00105,
        ));
        let rows = seeds(&with_perf);
        assert_eq!(rows[0].verdict, Verdict::NotHeld);
        assert!((rows[0].ratio.unwrap() - 1.05).abs() < 1e-9);
        assert!(
            rows[0].measured.contains("lists of 1024"),
            "{}",
            rows[0].measured
        );
        let rows = seeds(&rs);
        assert_eq!(rows[3].verdict, Verdict::NotHeld);

        let hello = |v: &str, loops: f64, ns: f64| {
            [
                rec("tdp-zap-hello", v, "loops", &[], loops),
                rec("tdp-zap-hello", v, "ns", &[], ns),
            ]
        };
        let mut rs: Vec<Record> = Vec::new();
        rs.extend(hello("scan-all", 7168.0, 35000.0));
        rs.extend(hello("skip-non-present", 27.0, 13000.0));
        rs.extend(hello("used-entries", 27.0, 3600.0));
        assert_eq!(seed_002(&rs).verdict, Verdict::Held);
        rs[2].value = 300.0; // skip-non-present loops: only 24x fewer
        assert_eq!(seed_002(&rs).verdict, Verdict::NotHeld);

        let w = |v: &str, ratio: f64, us: f64| {
            rec("wrprot-slot", v, "us", &[("ratio", json!(ratio))], us)
        };
        let rs = vec![
            w("per-gfn", 0.0, 0.5),
            w("walk-pages", 0.0, 0.4),
            w("per-gfn", 0.0001, 9.0),
            w("walk-pages", 0.0001, 136.0),
            w("per-gfn", 0.001, 16.0),
            w("walk-pages", 0.001, 144.0),
            w("per-gfn", 0.01, 300.0),
            w("walk-pages", 0.01, 200.0),
        ];
        let row = seed_004(&rs);
        assert_eq!(row.verdict, Verdict::Held, "{row:?}");
        assert!(row.measured.contains("at 0.001"), "{}", row.measured);
    }
}
