//! The page's figures: which records each one plots, how, and a paragraph on reading it.
//! Variants are named in legends as the scenarios and seeds name them, with the KVM
//! function each corresponds to. Records are found by the names of `bench::names`, the
//! ones the scenarios emit them with.

use serde_json::{json, Value};

use super::plots::{self, BarChart, Bars, Line, LineChart, Look};
use super::query;
use crate::bench::names::{
    dirty_log, fault_in, floor as fl, kvm_compare as kc, pte_list_destroy, rmap_iter, scale as sc,
    shadow_fork, tdp, tdp_fault_in, tdp_fault_parallel, tdp_zap, tdp_zap_hello, writable_bitmap,
    wrprot_slot, zap as zp,
};
use crate::bench::Record;

/// One figure of the page.
#[derive(Clone, Debug)]
pub struct Figure {
    /// HTML anchor.
    pub id: &'static str,
    /// Section heading.
    pub heading: String,
    /// The chart, or why there is none.
    pub svg: Result<String, String>,
    /// How to read it.
    pub reading: String,
    /// The tables shown under it: (scenario, metric or every metric).
    pub tables: Vec<(&'static str, Option<&'static str>)>,
}

/// Every figure, in page order. `kvm_note` says why KVM's lines are missing, if they are;
/// `quick` adds that vmmu's scenarios then ran smaller than kvm-compare.
pub fn figures(records: &[Record], kvm_note: Option<&str>, quick: bool) -> Vec<Figure> {
    let kvm_missing = |f: Figure| match kvm_note {
        Some(why) => Figure {
            reading: format!("{} KVM is not shown: kvm-compare {why}.", f.reading),
            ..f
        },
        None if quick => Figure {
            reading: format!(
                "{} Quick run: vmmu's scenarios ran on slots 16 times smaller than \
                 kvm-compare's, so compare KVM with the grey vmmu series only.",
                f.reading
            ),
            ..f
        },
        None => f,
    };
    vec![
        rmap_iter(records),
        writable_bitmap(records),
        zap_hello(records),
        destroy(records),
        kvm_missing(wrprot(records)),
        kvm_missing(harvest(records)),
        kvm_missing(zap(records)),
        kvm_missing(fault(records)),
        fork(records),
        scale(records),
        super::perf_figure::perf(records),
    ]
}

/// Draws `chart`, or says there was nothing to draw.
fn draw_lines(chart: LineChart) -> Result<String, String> {
    if chart.lines.iter().all(|l| l.points.is_empty()) {
        return Err("no records for this figure in this run".into());
    }
    plots::line_chart(&chart)
}

fn draw_bars(chart: BarChart) -> Result<String, String> {
    if chart
        .series
        .iter()
        .all(|s| s.values.iter().all(Option::is_none))
    {
        return Err("no records for this figure in this run".into());
    }
    plots::bar_chart(&chart)
}

/// A horizontal floor line across `xs`.
fn flat(label: &str, xs: &[f64], y: Option<f64>) -> Line {
    Line {
        label: label.into(),
        points: y.map_or(Vec::new(), |y| xs.iter().map(|&x| (x, y)).collect()),
        look: Look::Floor,
    }
}

fn rmap_iter(rs: &[Record]) -> Figure {
    let (s, m) = (rmap_iter::NAME, rmap_iter::NS_PER_SPTE);
    let line = |v: &str, label: &str, i| Line {
        label: label.into(),
        points: query::series(rs, s, v, m, "len", &[]),
        look: Look::Solid(i),
    };
    let it = line(
        rmap_iter::ITERATOR,
        "iterator (rmap_get_first/next, seed 000)",
        0,
    );
    let old = line(
        rmap_iter::RESTART_SCAN,
        "restart-scan (pte_list_next, before)",
        1,
    );
    let xs: Vec<f64> = it.points.iter().map(|p| p.0).collect();
    let floor = flat(
        "floor: read + atomic AND per SPTE",
        &xs,
        query::value(rs, fl::NAME, fl::AGE, fl::NS_PER_SPTE, &[]),
    );
    Figure {
        id: "seed-000",
        tables: vec![(rmap_iter::NAME, None)],
        heading: "Seed 000 — walking a reverse map: ns per SPTE against list length".into(),
        svg: draw_lines(LineChart {
            title: "rmap-iter: aging every SPTE of ~1M rmap entries".into(),
            x_desc: "reverse-map length (SPTEs per gfn, log)".into(),
            y_desc: "time per SPTE visited (ns, log)".into(),
            x_log: true,
            y_log: true,
            lines: vec![old, it, floor],
        }),
        reading: "Each point ages (reads, clears the accessed bit of) every SPTE of lists of one \
                  length. The iterator keeps its place, so its cost per SPTE should stay flat as \
                  lists grow; the restart scan walks from the head on every step, so its cost \
                  per SPTE grows with the length (quadratic per list). The gap at the right end \
                  is seed 000's ratio. The floor does the same read and AND over a flat array: \
                  the distance to it is what following the list through scattered tables costs."
            .into(),
    }
}

fn writable_bitmap(rs: &[Record]) -> Figure {
    let (s, m) = (writable_bitmap::NAME, writable_bitmap::NS_PER_PAGE);
    let mut ws: Vec<u64> = query::of(rs, s, m)
        .filter_map(|r| r.params.get("writable")?.as_u64())
        .collect();
    ws.dedup();
    let bars = |v: &str, label: &str, i| Bars {
        label: label.into(),
        values: ws
            .iter()
            .map(|&w| query::value(rs, s, v, m, &[("writable", json!(w))]))
            .collect(),
        look: Look::Solid(i),
    };
    let series = vec![
        bars(
            writable_bitmap::SCAN_512,
            "scan-512 (read all 512 SPTEs, before)",
            1,
        ),
        bars(
            writable_bitmap::BITMAP,
            "bitmap (possible_writable_spte_bitmap, seed 001)",
            0,
        ),
    ];
    let y_log = plots::spans_decades(
        series
            .iter()
            .flat_map(|s| s.values.iter().flatten().copied()),
    );
    Figure {
        id: "seed-001",
        tables: vec![(writable_bitmap::NAME, None)],
        heading:
            "Seed 001 — write-protecting a shadow page: scan all 512 entries or follow the bitmap"
                .into(),
        svg: draw_bars(BarChart {
            title: "writable-bitmap: turning dirty logging on, per leaf table".into(),
            x_desc: "possibly-writable SPTEs per 512-entry table".into(),
            y_desc: if y_log {
                "time per table (ns, log)"
            } else {
                "time per table (ns)"
            }
            .into(),
            groups: ws.iter().map(|w| w.to_string()).collect(),
            y_log,
            series,
        }),
        reading: "Each pair of bars write-protects every leaf table of the slot, with that many \
                  entries per table possibly writable. Without the bitmap every table costs a \
                  512-entry scan; with it, a table with nothing writable costs almost nothing and \
                  the cost grows with the writable entries. Seed 001's case is the left: few \
                  writable SPTEs per page."
            .into(),
    }
}

fn zap_hello(rs: &[Record]) -> Figure {
    let s = tdp_zap_hello::NAME;
    let modes = [tdp::SCAN_ALL, tdp::SKIP_NON_PRESENT, tdp::USED_ENTRIES];
    let vals = |m: &str| -> Vec<Option<f64>> {
        modes
            .iter()
            .map(|v| query::value(rs, s, v, m, &[]))
            .collect()
    };
    let series = vec![
        Bars {
            label: "iterator loops (vmmu)".into(),
            values: vals(tdp_zap_hello::LOOPS),
            look: Look::Solid(0),
        },
        Bars {
            label: "SPTE reads (vmmu)".into(),
            values: vals(tdp_zap_hello::READS),
            look: Look::Solid(3),
        },
        Bars {
            label: "loops in KVM (seed 002, first root)".into(),
            values: vec![Some(7168.0), Some(239.0), None],
            look: Look::Dashed(1),
        },
    ];
    Figure {
        id: "seed-002",
        tables: vec![(tdp_zap_hello::NAME, None)],
        heading: "Seed 002 — tearing down a tiny VM on the TDP MMU: iterator loops per mode".into(),
        svg: draw_bars(BarChart {
            title: "tdp-zap-hello: zap every root of the \"hello\" VM".into(),
            x_desc: "TDP iteration mode".into(),
            y_desc: "count (log)".into(),
            groups: modes.iter().map(|m| m.to_string()).collect(),
            y_log: true,
            series,
        }),
        reading: "Loops are the iterator's positions, reads the SPTEs it loaded. scan-all visits \
                  every entry of every table at every pass (the seed's 7168 on its first root); \
                  skip-non-present fast-forwards over empty entries (the patch: 239 in KVM) but \
                  still reads them; used-entries keeps a bitmap per table and reads only what is \
                  in use (the author's suggestion). The time of each teardown is in the table \
                  below and in the summary."
            .into(),
    }
}

fn destroy(rs: &[Record]) -> Figure {
    let (s, m) = (pte_list_destroy::NAME, pte_list_destroy::NS_PER_SPTE);
    let mut lens: Vec<u64> = query::of(rs, s, m)
        .filter_map(|r| r.params.get("len")?.as_u64())
        .collect();
    lens.dedup();
    let bars = |v: &str, label: &str, i| Bars {
        label: label.into(),
        values: lens
            .iter()
            .map(|&l| query::value(rs, s, v, m, &[("len", json!(l))]))
            .collect(),
        look: Look::Solid(i),
    };
    let floor = query::value(rs, fl::NAME, fl::CLEAR, fl::NS_PER_SPTE, &[]);
    Figure {
        id: "seed-003",
        tables: vec![(pte_list_destroy::NAME, None)],
        heading: "Seed 003 — dropping long reverse maps: one by one or in one pass".into(),
        svg: draw_bars(BarChart {
            title: "pte-list-destroy: clear and unlink ~1M rmap entries".into(),
            x_desc: "reverse-map length (SPTEs per gfn)".into(),
            y_desc: "time per SPTE (ns)".into(),
            groups: lens.iter().map(|l| l.to_string()).collect(),
            y_log: false,
            series: vec![
                bars(
                    pte_list_destroy::ONE_BY_ONE,
                    "one-by-one (pte_list_remove, before)",
                    1,
                ),
                bars(
                    pte_list_destroy::DESTROY,
                    "destroy (pte_list_destroy, seed 003)",
                    0,
                ),
                Bars {
                    label: "floor: atomic swap per SPTE".into(),
                    values: lens.iter().map(|_| floor).collect(),
                    look: Look::Floor,
                },
            ],
        }),
        reading:
            "Both clear every SPTE of lists as long as shadow paging makes them (the seed saw \
                  200+). One by one removes the head entry and moves entries between descriptors \
                  each time; destroy clears in one walk and frees the descriptors together. Lower \
                  is better; the floor is one atomic swap per SPTE over a flat array."
                .into(),
    }
}

/// kvm-compare's harvest line of `variant` ([`kc::KVM`] or [`kc::VMMU`]) in `mode`.
fn kvm_harvest(rs: &[Record], variant: &str, mode: &str, label: &str, look: Look) -> Line {
    Line {
        label: label.into(),
        points: query::series(
            rs,
            kc::NAME,
            variant,
            kc::HARVEST_US,
            "ratio",
            &[("mode", Value::from(mode))],
        ),
        look,
    }
}

fn floor_harvest(rs: &[Record]) -> Line {
    Line {
        label: "floor: bitmap copy, RMW per dirty word, store per dirty SPTE, flush".into(),
        points: query::series(
            rs,
            fl::NAME,
            fl::HARVEST,
            fl::US,
            "ratio",
            &[("pattern", Value::from(fl::RANDOM))],
        ),
        look: Look::Floor,
    }
}

fn wrprot(rs: &[Record]) -> Figure {
    let (s, m) = (wrprot_slot::NAME, wrprot_slot::US);
    let line = |v: &str, label: &str, i| Line {
        label: label.into(),
        points: query::series(rs, s, v, m, "ratio", &[]),
        look: Look::Solid(i),
    };
    Figure {
        id: "seed-004",
        tables: vec![(wrprot_slot::NAME, None)],
        heading:
            "Seed 004 — GET_DIRTY_LOG: write-protect through the rmaps or walk every shadow page"
                .into(),
        svg: draw_lines(LineChart {
            title: "wrprot-slot: KVM_GET_DIRTY_LOG after dirtying a fraction of 4 KiB pages".into(),
            x_desc: "dirty ratio (fraction of the slot's pages written, log)".into(),
            y_desc: "GET_DIRTY_LOG time (us, log)".into(),
            x_log: true,
            y_log: true,
            lines: vec![
                line(
                    wrprot_slot::WALK_PAGES,
                    "walk-pages (slot_remove_write_access)",
                    1,
                ),
                line(
                    wrprot_slot::PER_GFN,
                    "per-gfn (rmap_write_protect, seed 004)",
                    0,
                ),
                line(wrprot_slot::KVM_2012, "kvm-2012 (seed 004's rule)", 2),
                line(wrprot_slot::ADAPTIVE, "adaptive (vmmu's cost estimate)", 4),
                kvm_harvest(rs, kc::KVM, "get", "KVM get (/dev/kvm)", Look::Dashed(6)),
                floor_harvest(rs),
            ],
        }),
        reading: "Per gfn costs grow with the dirty pages; walking every shadow page costs about \
                  the same at any ratio. Seed 004 claims per-gfn is some times faster at low \
                  ratios and no worse near its rule's switch (dirty pages = shadow pages, a \
                  ratio of about 1/512 here). kvm-2012 should follow the lower of the two on each \
                  side of that switch; adaptive switches where vmmu's own costs cross. Ratio 0 \
                  (nothing dirty) cannot sit on a log axis: it is in the table. The floor is the \
                  least any harvest does: see the dirty-logging section."
            .into(),
    }
}

fn harvest(rs: &[Record]) -> Figure {
    let (s, m) = (dirty_log::NAME, dirty_log::HARVEST_US);
    let labels = [
        (dirty_log::GET, "get (KVM_GET_DIRTY_LOG)"),
        (
            dirty_log::GET_CLEAR,
            "get-clear (manual protect: GET + CLEAR)",
        ),
        (dirty_log::RING, "ring (harvest + KVM_RESET_DIRTY_RINGS)"),
        (dirty_log::TDP_GET, "tdp-get (TDP MMU)"),
        (dirty_log::TDP_GET_CLEAR, "tdp-get-clear (TDP MMU)"),
        (dirty_log::TDP_RING, "tdp-ring (TDP MMU)"),
    ];
    let mut lines: Vec<Line> = labels
        .iter()
        .enumerate()
        .map(|(i, (v, label))| Line {
            label: (*label).into(),
            points: query::series(rs, s, v, m, "ratio", &[]),
            look: Look::Solid(i),
        })
        .collect();
    // Variants added after this file was written still get a line.
    for v in query::variants(rs, s, m) {
        if !labels.iter().any(|(l, _)| *l == v) {
            lines.push(Line {
                label: v.clone(),
                points: query::series(rs, s, &v, m, "ratio", &[]),
                look: Look::Solid(lines.len()),
            });
        }
    }
    // KVM's modes dashed in the colour of vmmu's same mode.
    lines.push(kvm_harvest(
        rs,
        kc::KVM,
        "get",
        "KVM get (/dev/kvm)",
        Look::Dashed(0),
    ));
    lines.push(kvm_harvest(
        rs,
        kc::VMMU,
        "get",
        "vmmu get on kvm-compare's workload",
        Look::Solid(9),
    ));
    lines.push(kvm_harvest(
        rs,
        kc::KVM,
        "get-clear",
        "KVM get-clear (/dev/kvm)",
        Look::Dashed(1),
    ));
    lines.push(kvm_harvest(
        rs,
        kc::KVM,
        "ring",
        "KVM ring (/dev/kvm)",
        Look::Dashed(2),
    ));
    lines.push(floor_harvest(rs));
    Figure {
        id: "harvest",
        tables: vec![
            (dirty_log::NAME, Some(dirty_log::HARVEST_US)),
            (kc::NAME, Some(kc::HARVEST_US)),
            (kc::NAME, Some(kc::BITMAP_EQUAL)),
            (dirty_log::NAME, Some(dirty_log::WRITE_NS_PER_PAGE)),
        ],
        heading: "Dirty logging — harvest time against dirty ratio, every mode".into(),
        svg: draw_lines(LineChart {
            title: "dirty-log: collect and re-protect the pages a round dirtied".into(),
            x_desc: "dirty ratio (fraction of the slot's pages written, log)".into(),
            y_desc: "harvest time (us, log)".into(),
            x_log: true,
            y_log: true,
            lines,
        }),
        reading: "One round: the guest writes a fraction of a logging slot, then the VMM collects \
                  the dirty pages and write-protects them again. Bitmap modes walk the bitmap in \
                  gfn order; the ring visits entries in write order. The coloured dashed lines are \
                  the host's KVM in the same mode as vmmu's line of that colour (kvm-compare: a stride of pages rather than random \
                  ones, real guest writes, median of its rounds); the grey line is vmmu's get on \
                  that same workload, the like-for-like comparison with KVM. The black dashed line \
                  is the floor, the least any harvest does over the same pages laid out as the \
                  MMU's: copy the bitmap to the caller, one read-modify-write per non-zero bitmap \
                  word, one store per dirty SPTE at an address computed from its gfn, one flush \
                  request. The tables give each mode's multiple of it (kvm-compare's against the \
                  floor of its own stride of pages). The ring copies entries, not a bitmap, so \
                  it can go below 1x at low ratios."
            .into(),
    }
}

fn zap(rs: &[Record]) -> Figure {
    let backings = ["4k", "2m"];
    let per = |s: &str, v: &str, m: &str| -> Vec<Option<f64>> {
        backings
            .iter()
            .map(|b| query::value(rs, s, v, m, &[("backing", Value::from(*b))]))
            .collect()
    };
    let mut series = vec![Bars {
        label: "zap (shadow MMU, zap_memslot)".into(),
        values: per(zp::NAME, zp::SHADOW_DIRECT, zp::US),
        look: Look::Solid(0),
    }];
    for (i, mode) in [tdp::SCAN_ALL, tdp::SKIP_NON_PRESENT, tdp::USED_ENTRIES]
        .iter()
        .enumerate()
    {
        series.push(Bars {
            label: format!("tdp-zap {mode} (TDP MMU)"),
            values: per(tdp_zap::NAME, mode, tdp_zap::US),
            look: Look::Solid(i + 1),
        });
    }
    series.push(Bars {
        label: "KVM memslot delete (/dev/kvm)".into(),
        values: per(kc::NAME, kc::KVM, kc::DELETE_US),
        look: Look::Dashed(6),
    });
    series.push(Bars {
        label: "vmmu memslot delete, kvm-compare".into(),
        values: per(kc::NAME, kc::VMMU, kc::DELETE_US),
        look: Look::Solid(9),
    });
    series.push(Bars {
        label: "floor: read per present entry".into(),
        values: per(fl::NAME, fl::ZAP, fl::US),
        look: Look::Floor,
    });
    Figure {
        id: "zap",
        tables: vec![
            (zp::NAME, None),
            (tdp_zap::NAME, None),
            (kc::NAME, Some(kc::DELETE_US)),
        ],
        heading: "Zapping a fully mapped slot — vmmu's MMUs, KVM and the floor".into(),
        svg: draw_bars(BarChart {
            title: "zap / tdp-zap: clear every mapping of the slot, free the tables".into(),
            x_desc: "host backing of the slot (4 KiB pages, or THP mapped 2 MiB)".into(),
            y_desc: "time (us, log)".into(),
            groups: backings.iter().map(|b| b.to_string()).collect(),
            y_log: true,
            series,
        }),
        reading: "Each bar zaps every SPTE of a fully faulted-in slot, as deleting the memslot \
                  does. KVM's bar is its whole KVM_SET_USER_MEMORY_REGION delete, and the grey bar \
                  vmmu's delete of the same slot in kvm-compare. The floor reads each present \
                  entry once over a flat array; a zap must at least do that."
            .into(),
    }
}

fn fault(rs: &[Record]) -> Figure {
    let backings = ["4k", "2m"];
    let per = |s: &str, v: &str, m: &str| -> Vec<Option<f64>> {
        backings
            .iter()
            .map(|b| query::value(rs, s, v, m, &[("backing", Value::from(*b))]))
            .collect()
    };
    let series = vec![
        Bars {
            label: "fault-in (shadow MMU)".into(),
            values: per(
                fault_in::NAME,
                fault_in::SHADOW_DIRECT,
                fault_in::NS_PER_PAGE,
            ),
            look: Look::Solid(0),
        },
        Bars {
            label: "tdp-fault-in scan-all (TDP MMU)".into(),
            values: per(tdp_fault_in::NAME, tdp::SCAN_ALL, tdp_fault_in::NS_PER_PAGE),
            look: Look::Solid(1),
        },
        Bars {
            label: "tdp-fault-in used-entries (TDP MMU)".into(),
            values: per(
                tdp_fault_in::NAME,
                tdp::USED_ENTRIES,
                tdp_fault_in::NS_PER_PAGE,
            ),
            look: Look::Solid(3),
        },
        Bars {
            label: "KVM first touch (/dev/kvm)".into(),
            values: per(kc::NAME, kc::KVM, kc::FAULT_NS_PER_PAGE),
            look: Look::Dashed(6),
        },
        Bars {
            label: "vmmu first touch, kvm-compare".into(),
            values: per(kc::NAME, kc::VMMU, kc::FAULT_NS_PER_PAGE),
            look: Look::Solid(9),
        },
    ];
    Figure {
        id: "fault",
        tables: vec![
            (fault_in::NAME, None),
            (tdp_fault_in::NAME, None),
            (tdp_fault_parallel::NAME, None),
            (kc::NAME, Some(kc::FAULT_NS_PER_PAGE)),
        ],
        heading: "First touch — faulting in every page of a fresh slot".into(),
        svg: draw_bars(BarChart {
            title: "fault-in / tdp-fault-in: guest writes every 4 KiB page once".into(),
            x_desc: "host backing of the slot".into(),
            y_desc: "time per 4 KiB page (ns, log)".into(),
            groups: backings.iter().map(|b| b.to_string()).collect(),
            y_log: true,
            series,
        }),
        reading: "vmmu's figures are the MMU's work for an EPT violation through its CPU model, \
                  with no VM exit; KVM's include the exit, the host's page lookup and the \
                  re-entry (its host memory is populated first, so no host page fault is \
                  counted). The grey bar is vmmu on kvm-compare's slot. Over THP one fault maps \
                  2 MiB, so the cost per 4 KiB page drops by about 512. tdp-fault-in runs on \
                  4 KiB pages only."
            .into(),
    }
}

fn scale(rs: &[Record]) -> Figure {
    let phases: [(&str, &str); 11] = [
        (sc::FAULT_IN, sc::BITMAP),
        (sc::ENABLE_LOGGING, sc::BITMAP),
        (sc::DIRTY, sc::BITMAP),
        (sc::GET, sc::BITMAP),
        (sc::CLEAR, sc::BITMAP),
        (sc::GET_RANGES, sc::BITMAP),
        (sc::CLEAR_RANGES, sc::BITMAP),
        (sc::RING, sc::RING),
        (sc::DISABLE_LOGGING, sc::BITMAP),
        (sc::TEARDOWN, sc::BITMAP),
        (sc::TEARDOWN_SPARSE, sc::BITMAP),
    ];
    let gib = query::of(rs, sc::NAME, sc::NS_PER_PAGE)
        .filter_map(|r| r.params.get("guest_gib")?.as_u64())
        .max();
    let series = ["4k", "2m"]
        .iter()
        .enumerate()
        .map(|(i, backing)| Bars {
            label: format!("{backing} host backing"),
            values: phases
                .iter()
                .map(|(phase, harvest)| {
                    query::value(
                        rs,
                        sc::NAME,
                        sc::TDP,
                        sc::NS_PER_PAGE,
                        &[
                            ("backing", json!(backing)),
                            ("phase", json!(phase)),
                            ("harvest", json!(harvest)),
                        ],
                    )
                })
                .collect(),
            look: Look::Solid(i),
        })
        .collect();
    Figure {
        id: "scale",
        tables: vec![(sc::NAME, None)],
        heading: "Scale — a guest through the phases of a live migration".into(),
        svg: draw_bars(BarChart {
            title: format!(
                "scale: TDP MMU, {} GiB guest in 4 slots, 2 vCPU threads",
                gib.map_or("?".into(), |g| g.to_string())
            ),
            x_desc: "phase".into(),
            y_desc: "ns per 4 KiB page of the guest (per page written or harvested, log)".into(),
            groups: phases.iter().map(|(p, _)| (*p).into()).collect(),
            y_log: true,
            series,
        }),
        reading: "One VM per harvest mode goes through a migration's phases: fault in every \
                  page, start logging (eager split at 2 MiB), write 1 page in 1000, harvest \
                  them (GET and CLEAR of whole bitmaps, dirty ranges, or the ring), stop \
                  logging, tear down; then a VM of the same slots with one GiB mapped is torn \
                  down (teardown-sparse, per mapped page). The table gives each phase's time, \
                  the OS's peak resident memory and the bytes per guest page; `vmmu bench \
                  scale --guest-gib 1024 --backing 4k` and `--guest-gib 12288 --backing 2m \
                  --no-eager-split` run the largest guests this machine holds."
            .into(),
    }
}

fn fork(rs: &[Record]) -> Figure {
    let (s, m) = (shadow_fork::NAME, shadow_fork::UNMAP_US);
    let names = [
        (
            shadow_fork::RESTART_SCAN,
            "restart-scan, one by one (before seeds 000 and 003)",
        ),
        (
            shadow_fork::ONE_BY_ONE,
            "iterator, one by one (seed 000 only)",
        ),
        (
            shadow_fork::DESTROY,
            "restart-scan, destroy (seed 003 only)",
        ),
        (
            shadow_fork::ITERATOR,
            "iterator, destroy (both seeds: KVM today)",
        ),
    ];
    let lines = names
        .iter()
        .enumerate()
        .map(|(i, (v, label))| Line {
            label: (*label).into(),
            points: query::series(rs, s, v, m, "children", &[]),
            look: Look::Solid(i),
        })
        .collect();
    let longest = query::of(rs, s, shadow_fork::MAX_RMAP_LEN)
        .map(|r| r.value)
        .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
    Figure {
        id: "fork",
        tables: vec![(shadow_fork::NAME, None)],
        heading: "Shadow paging — unmapping a forked process's memory against children".into(),
        svg: draw_lines(LineChart {
            title: "shadow-fork: the host unmaps the parent's memory (MMU-notifier unmap)".into(),
            x_desc: "children forked, each reading every page (log)".into(),
            y_desc: "MMU time of the unmap (us, log)".into(),
            x_log: true,
            y_log: true,
            lines,
        }),
        reading: format!(
            "A process maps 64 MiB (4 MiB in a quick run) and forks that many children, each \
             reading every page, so every gfn is mapped by children + 1 shadow PTEs{}; the \
             host then unmaps the parent's memory, zapping each of those reverse maps. \
             Before seed 003 every SPTE is dropped through the full drop path, the list \
             searched and reshuffled each time; seed 003 clears the whole list in one pass \
             and frees its descriptors together; seed 000 decides whether a walk of the \
             list keeps its place or restarts from the head. The literature's case for reverse-map \
             descriptors: forking 500 children under shadow paging went from 473.9 to 351.0 \
             with the 2021 rmap descriptor rework.",
            longest.map_or(String::new(), |l| format!(
                " (longest reverse map here: {l:.0})"
            ))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::query::tests::rec;
    use super::*;

    #[test]
    fn every_figure_is_drawn_or_says_why_not() {
        let rs = vec![
            rec(
                "rmap-iter",
                "iterator",
                "ns_per_spte",
                &[("len", json!(1))],
                9.0,
            ),
            rec(
                "rmap-iter",
                "iterator",
                "ns_per_spte",
                &[("len", json!(1024))],
                15.0,
            ),
            rec(
                "rmap-iter",
                "restart-scan",
                "ns_per_spte",
                &[("len", json!(1024))],
                300.0,
            ),
        ];
        let figs = figures(&rs, Some("skipped: cannot open /dev/kvm"), false);
        assert_eq!(figs.len(), 11);
        let perf = figs.iter().find(|f| f.id == "perf").unwrap();
        assert!(perf.svg.as_ref().unwrap_err().contains("no records"));
        assert!(figs[0].svg.as_ref().unwrap().contains("restart-scan"));
        let scale = figs.iter().find(|f| f.id == "scale").unwrap();
        assert!(scale.svg.as_ref().unwrap_err().contains("no records"));
        assert!(figs[1].svg.is_err());
        let fork = figs.iter().find(|f| f.id == "fork").unwrap();
        assert!(fork.svg.as_ref().unwrap_err().contains("no records"));
        let harvest = figs.iter().find(|f| f.id == "harvest").unwrap();
        assert!(harvest.reading.contains("kvm-compare skipped"));
    }

    #[test]
    fn fork_plots_unmap_us_by_children_for_every_variant() {
        let mut rs = Vec::new();
        for (v, k) in [
            ("restart-scan", 9.0),
            ("one-by-one", 5.0),
            ("destroy", 4.0),
            ("iterator", 1.0),
        ] {
            for c in [1u64, 32, 500] {
                let p = [("children", json!(c)), ("rmap_drop", json!("Destroy"))];
                rs.push(rec("shadow-fork", v, "unmap_us", &p, k * c as f64));
                rs.push(rec("shadow-fork", v, "max_rmap_len", &p, c as f64 + 1.0));
            }
        }
        let fig = fork(&rs);
        let svg = fig.svg.unwrap();
        for label in [
            "seed 000 only",
            "seed 003 only",
            "KVM today",
            "before seeds",
        ] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(fig.reading.contains("longest reverse map here: 501"));
    }
}
