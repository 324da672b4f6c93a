//! Shadow paging's permission test, in the spirit of kvm-unit-tests' `x86/access.c`: for
//! every combination of guest PTE bits at the leaf {P, RW, US, NX, A, D} and at one upper
//! level {P, RW, US, NX, A}, every access (read, write, fetch) x (user, supervisor),
//! CR0.WP and EFER.NX, the outcome of the access through the shadow MMU and the CPU model
//! (`Vm::gva_access`: the gpa, or the #PF error code reflected into the guest) must be the
//! reference walker's (`vmmu_testing::reference_walk`, written from the SDM), and the
//! guest's A/D bits in every entry of the walk must be what the reference computed.
//!
//! Two families: a 4 KiB leaf with the PDE varied, and a 2 MiB leaf (PS in the PDE) with
//! the PDPTE varied.
//!
//! The guest changes its entries as an OS does: at CPL 0 through a supervisor direct map of
//! its page-table pages (`gva_write_u64`: the MMU emulates the write, or the page goes
//! unsync), then INVLPG of the tested address. One VM runs a whole family, so shadow state
//! left by a case meets the next one (a stale translation shows). The data frame changes
//! with every combination of bits, and the translated gpa is compared exactly.
//!
//! - `sampled_*`: a deterministic sample of the product that always runs (debug builds);
//! - `exhaustive_*`: the whole product, release builds only (`cargo test --release`);
//! - `first_touch_*`: every combination written straight into guest memory before the VM
//!   touches the address (fresh tables, one leaf per access);
//! - `random_transitions_*`: random changes of either entry (and of WP/NX), flushed with
//!   INVLPG, MOV CR3 or a full flush, and repeated accesses, on one VM.
//!
//! Everything runs with `PagingConfig { unsync: true }` and `{ unsync: false }`; the
//! outcomes of the two must be identical (both equal the reference, and the sequences are
//! compared too).

mod paging_rig;

use paging_rig::*;
use vmmu::guest::pte;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gva};
use vmmu::PagingConfig;
use vmmu_testing::reference_walk::describe_entry;
use vmmu_testing::Rng;

const ACCESSES: [(AccessKind, u8); 6] = [
    (AccessKind::Read, 0),
    (AccessKind::Write, 0),
    (AccessKind::Fetch, 0),
    (AccessKind::Read, 3),
    (AccessKind::Write, 3),
    (AccessKind::Fetch, 3),
];

/// (CR0.WP, EFER.NX) groups, in the order they run.
const REGS: [(bool, bool); 4] = [(true, true), (false, true), (true, false), (false, false)];

fn configs() -> [PagingConfig; 2] {
    [
        PagingConfig {
            unsync: true,
            ..PagingConfig::default()
        },
        PagingConfig {
            unsync: false,
            ..PagingConfig::default()
        },
    ]
}

/// What one permission run does.
#[derive(Clone, Copy)]
struct Plan {
    family: Family,
    config: PagingConfig,
    backing: Backing,
    /// Keep a (wp, nx, upper, leaf) combination with probability 1 / `sample` (1: all).
    sample: u64,
    /// Audit after every case when the upper bits are in this set (a bit per value).
    audit_upper: u32,
    /// Otherwise audit every this many cases.
    audit_every: u64,
    /// Also check a fixed neighbour of the tested address after each case.
    neighbour: bool,
}

/// One outcome, for comparing runs: gpa or error code.
type Outcome = Result<u64, u32>;

fn case_name(
    plan: &Plan,
    wp: bool,
    nx: bool,
    upper: u64,
    leaf: u64,
    kind: AccessKind,
    cpl: u8,
) -> String {
    format!(
        "[{} unsync={} {:?}] {} cr0.wp={} efer.nx={} {}={} leaf={}",
        plan.family.name(),
        plan.config.unsync,
        plan.backing,
        access_name(kind, cpl),
        wp as u8,
        nx as u8,
        plan.family.upper_name(),
        describe_entry(upper),
        describe_entry(leaf)
    )
}

/// The access.c loop over one family on one VM. Returns the failures, the outcomes and
/// the number of checked accesses.
fn run(plan: Plan) -> (Failures, Vec<Outcome>, u64) {
    let mut g = Guest::new();
    let path = match plan.family {
        Family::Pte4K => Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8),
        Family::Pde2M => Path::build(&mut g, Family::Pde2M, 1, (3, 5, 0), 0x1a_b5a8),
        Family::Pdpte1G => Path::build(&mut g, Family::Pdpte1G, 1, (3, 0, 0), 0x0b6a_b5a8),
    };
    // A fixed neighbour in the same table as the leaf (the next entry), always FULL|A|D:
    // its rights follow the varied upper entry alone.
    let nb_leaf = path.leaf + 8;
    let nb_gva = Gva(path.gva.0 + path.family.leaf_level().bytes());
    let nb_frame = path.family.frame(u64::MAX / 2);
    g.poke(nb_leaf, path.leaf_value(0b11_0111, nb_frame));
    let mut nb_entries = path.entries.clone();
    *nb_entries.last_mut().unwrap() = nb_leaf;

    let mut rig = Rig::start(g, plan.config, plan.backing);
    let mut rng = Rng::new(0x5eed ^ plan.family as u64);
    let mut fails = Failures::default();
    let mut outcomes = Vec::new();
    let mut frame_i = 0u64;
    let mut cases = 0u64;
    'all: for (wp, nx) in REGS {
        rig.set_wp_nx(wp, nx);
        for u in 0..32u32 {
            for l in 0..64u32 {
                if rig.broken.is_some() {
                    break 'all;
                }
                if plan.sample > 1 && !rng.chance(1, plan.sample) {
                    continue;
                }
                frame_i += 1;
                let frame = plan.family.frame(frame_i);
                let upper = path.upper_value(u);
                let leaf = path.leaf_value(l, frame);
                for (kind, cpl) in ACCESSES {
                    let name = || case_name(&plan, wp, nx, upper, leaf, kind, cpl);
                    cases += 1;
                    // Reset the entries (the last access may have set A/D), as the guest.
                    let r = rig.guest_set(path.upper, upper, false);
                    fails.note(r, || format!("{}: setting the upper entry", name()));
                    let r = rig.guest_set(path.leaf, leaf, true);
                    fails.note(r, || format!("{}: setting the leaf", name()));
                    rig.invlpg(path.gva);
                    let r = rig.check_access(path.gva, kind, cpl, &path.entries);
                    outcomes.push(match &r {
                        Ok(w) => w
                            .gpa()
                            .map(|g| g.0)
                            .ok_or_else(|| w.error_code().map_or(u32::MAX, |e| e.bits())),
                        Err(_) => Err(u32::MAX),
                    });
                    fails.note(r, name);
                    if plan.neighbour {
                        rig.invlpg(nb_gva);
                        let r = rig.check_access(nb_gva, kind, cpl, &nb_entries);
                        fails.note(r, || format!("{} (the neighbour at {nb_gva})", name()));
                    }
                    if plan.audit_upper & (1 << u) != 0 || cases.is_multiple_of(plan.audit_every) {
                        let r = rig.audit();
                        fails.note(r, || format!("audit after {}", name()));
                    }
                }
            }
        }
    }
    let r = rig.audit();
    fails.note(r, || "final audit".to_string());
    let stats = rig.guarded("stats", |r| r.vm.stats().paging);
    eprintln!(
        "{} unsync={} {:?}: {} accesses, {:?}",
        plan.family.name(),
        plan.config.unsync,
        plan.backing,
        rig.checks,
        stats
    );
    rig.teardown(&mut fails);
    (fails, outcomes, rig.checks)
}

fn run_both_configs(family: Family, backing: Backing, sample: u64, audit_upper: u32) {
    let mut all = Vec::new();
    let mut runs = Vec::new();
    for config in configs() {
        let plan = Plan {
            family,
            config,
            backing,
            sample,
            audit_upper,
            audit_every: 64,
            neighbour: true,
        };
        let t = std::time::Instant::now();
        let (fails, outcomes, checks) = run(plan);
        eprintln!("  took {:?}", t.elapsed());
        runs.push((
            format!("{} unsync={} {backing:?}", family.name(), config.unsync),
            fails,
            checks,
        ));
        all.push(outcomes);
    }
    Failures::finish_all(&runs);
    assert_eq!(
        all[0], all[1],
        "unsync=true and unsync=false differ (both matched the reference?)"
    );
}

/// Upper-entry values audited after every case in the sampled runs: the present ones with
/// RW|US (with and without A and NX).
const AUDIT_UPPER: u32 = (1 << 0b00111) | (1 << 0b10111) | (1 << 0b01111) | (1 << 0b11111);

#[test]
fn sampled_4k_leaf_pde_varied() {
    if vmmu_testing::skip_rerun("sampled_4k_leaf_pde_varied") {
        return;
    }
    run_both_configs(Family::Pte4K, Backing::Page4K, 12, AUDIT_UPPER);
}

#[test]
fn sampled_2m_leaf_pdpte_varied() {
    if vmmu_testing::skip_rerun("sampled_2m_leaf_pdpte_varied") {
        return;
    }
    run_both_configs(Family::Pde2M, Backing::Page4K, 12, AUDIT_UPPER);
}

/// The 2M family over transparent huge pages: the MMU may map the guest's 2 MiB pages
/// with 2 MiB shadow leaves.
#[test]
fn sampled_2m_leaf_pdpte_varied_thp() {
    if vmmu_testing::skip_rerun("sampled_2m_leaf_pdpte_varied_thp") {
        return;
    }
    run_both_configs(Family::Pde2M, Backing::Thp, 24, 0);
}

/// A 1 GiB leaf with the PML4E varied (beyond access.c's two families): 4 KiB host
/// pages (the MMU splits the guest's 1 GiB page) and hugetlbfs 1 GiB pages.
#[test]
fn sampled_1g_leaf_pml4e_varied() {
    if vmmu_testing::skip_rerun("sampled_1g_leaf_pml4e_varied") {
        return;
    }
    run_both_configs(Family::Pdpte1G, Backing::Page4K, 24, 0);
    run_both_configs(Family::Pdpte1G, Backing::HugeTlb1G, 24, 0);
}

#[test]
#[cfg_attr(debug_assertions, ignore = "the whole product: run with --release")]
fn exhaustive_1g_leaf_pml4e_varied() {
    if vmmu_testing::skip_rerun("exhaustive_1g_leaf_pml4e_varied") {
        return;
    }
    run_both_configs(Family::Pdpte1G, Backing::Page4K, 1, AUDIT_UPPER);
    run_both_configs(Family::Pdpte1G, Backing::HugeTlb1G, 1, 0);
}

#[test]
#[cfg_attr(debug_assertions, ignore = "the whole product: run with --release")]
fn exhaustive_4k_leaf_pde_varied() {
    if vmmu_testing::skip_rerun("exhaustive_4k_leaf_pde_varied") {
        return;
    }
    run_both_configs(Family::Pte4K, Backing::Page4K, 1, AUDIT_UPPER);
}

#[test]
#[cfg_attr(debug_assertions, ignore = "the whole product: run with --release")]
fn exhaustive_2m_leaf_pdpte_varied() {
    if vmmu_testing::skip_rerun("exhaustive_2m_leaf_pdpte_varied") {
        return;
    }
    run_both_configs(Family::Pde2M, Backing::Page4K, 1, AUDIT_UPPER);
    run_both_configs(Family::Pde2M, Backing::Thp, 1, 0);
}

/// One first-touch access.
#[derive(Clone, Debug)]
struct Case {
    gva: Gva,
    entries: Vec<u64>,
    kind: AccessKind,
    cpl: u8,
    upper: u64,
    leaf: u64,
}

/// Every combination written straight into guest memory before the VM first touches the
/// address: one PML4 slot per (WP, NX), one upper entry per upper-bit value, one leaf per
/// (leaf bits, access) under it; one case in `keep` is kept. Returns the guest and the
/// cases of each (WP, NX) group in a shuffled order.
fn first_touch_guest(family: Family, keep: u64) -> (Guest, Vec<Vec<Case>>) {
    let mut g = Guest::new();
    let mut groups: Vec<Vec<Case>> = Vec::new();
    let mut n = 0u64;
    let mut rng = Rng::new(0xf1257 ^ family as u64);
    g.one_gib_frames = family == Family::Pdpte1G;
    for gi in 0..REGS.len() as u64 {
        // 4K and 2M: PML4 slot 1 + gi per group; 1G: a PML4 slot per upper value.
        let pdpt = g.alloc_table();
        let pd4k = g.alloc_table();
        if family != Family::Pdpte1G {
            g.poke(g.pml4 + 8 * (1 + gi), pdpt | FULL);
        }
        if family == Family::Pte4K {
            g.poke(pdpt, pd4k | FULL);
        }
        let mut cases = Vec::new();
        for u in 0..32u64 {
            let next = g.alloc_table();
            let upper = next | upper_bits(u as u32);
            let (l4, upper_gpa) = match family {
                Family::Pte4K => (1 + gi, pd4k + 8 * u),
                Family::Pde2M => (1 + gi, pdpt + 8 * u),
                Family::Pdpte1G => (1 + gi * 32 + u, g.pml4 + 8 * (1 + gi * 32 + u)),
            };
            g.poke(upper_gpa, upper);
            for l in 0..64u64 {
                for (a, &(kind, cpl)) in ACCESSES.iter().enumerate() {
                    let j = l * 6 + a as u64;
                    n += 1;
                    if keep > 1 && !rng.chance(1, keep) {
                        continue;
                    }
                    let frame = family.frame(n);
                    // A different 4K page of the frame every time (no rmap grows long).
                    let off = ((n * 7919) << 12) | ((n * 8) & 0xff8);
                    let (leaf, gva, entries) = match family {
                        Family::Pte4K => (
                            frame | leaf_bits(l as u32),
                            gva_of(l4, 0, u, j, off & 0xfff),
                            vec![g.pml4 + 8 * l4, pdpt, upper_gpa, next + 8 * j],
                        ),
                        Family::Pde2M => (
                            frame | leaf_bits(l as u32) | pte::PS,
                            gva_of(l4, u, j, 0, off & (M2 - 1)),
                            vec![g.pml4 + 8 * l4, upper_gpa, next + 8 * j],
                        ),
                        Family::Pdpte1G => (
                            frame | leaf_bits(l as u32) | pte::PS,
                            gva_of(l4, j, 0, 0, off & (G1 - 1)),
                            vec![upper_gpa, next + 8 * j],
                        ),
                    };
                    g.poke(*entries.last().unwrap(), leaf);
                    if upper & pte::P != 0 {
                        assert_eq!(
                            g.entry_gpa(gva, family.leaf_level()),
                            entries.last().copied(),
                            "the first-touch case at {gva} walks someone else's leaf"
                        );
                    }
                    cases.push(Case {
                        gva,
                        entries,
                        kind,
                        cpl,
                        upper,
                        leaf,
                    });
                }
            }
        }
        // Shuffle (Fisher-Yates).
        for i in (1..cases.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            cases.swap(i, j);
        }
        groups.push(cases);
    }
    (g, groups)
}

fn first_touch(family: Family, config: PagingConfig, backing: Backing, keep: u64) -> Failures {
    let (g, groups) = first_touch_guest(family, keep);
    let mut rig = Rig::start(g, config, backing);
    let mut fails = Failures::default();
    for (gi, cases) in groups.into_iter().enumerate() {
        let (wp, nx) = REGS[gi];
        rig.set_wp_nx(wp, nx);
        for (i, c) in cases.iter().enumerate() {
            if rig.broken.is_some() {
                break;
            }
            let r = rig.check_access(c.gva, c.kind, c.cpl, &c.entries);
            fails.note(r, || {
                format!(
                    "first touch [{} unsync={} {backing:?}] {} cr0.wp={} efer.nx={} upper={} leaf={} at {}",
                    family.name(),
                    config.unsync,
                    access_name(c.kind, c.cpl),
                    wp as u8,
                    nx as u8,
                    describe_entry(c.upper),
                    describe_entry(c.leaf),
                    c.gva
                )
            });
            // The audit's cost grows with the shadow pages (tens of thousands here).
            if i.is_multiple_of(2048) {
                let r = rig.audit();
                fails.note(r, || "audit".to_string());
            }
        }
    }
    let r = rig.audit();
    fails.note(r, || "final audit".to_string());
    rig.teardown(&mut fails);
    fails
}

/// Run `cases` (group `gi`) on a fresh VM; true if some access fails or the MMU panics.
fn first_touch_fails(
    family: Family,
    config: PagingConfig,
    backing: Backing,
    gi: usize,
    cases: &[Case],
) -> bool {
    let (g, _) = first_touch_guest(family, 1);
    let mut rig = Rig::start(g, config, backing);
    let (wp, nx) = REGS[gi];
    rig.set_wp_nx(wp, nx);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cases
            .iter()
            .any(|c| rig.check_access(c.gva, c.kind, c.cpl, &c.entries).is_err())
            || rig.audit().is_err()
    }));
    // A broken MMU may panic in its Drop too: leak it (this is a tool).
    std::mem::forget(rig);
    r.unwrap_or(true)
}

/// Shrink a failing first-touch run to a minimal sequence of accesses (delta debugging)
/// and print it: `VMMU_MIN_FAMILY=2m|4k|1g VMMU_MIN_UNSYNC=0|1 VMMU_MIN_THP=0|1`.
#[test]
#[ignore = "a tool: shrinks a failing first-touch run"]
fn minimize_first_touch() {
    let family = match std::env::var("VMMU_MIN_FAMILY").as_deref() {
        Ok("4k") => Family::Pte4K,
        Ok("1g") => Family::Pdpte1G,
        _ => Family::Pde2M,
    };
    let config = PagingConfig {
        unsync: std::env::var("VMMU_MIN_UNSYNC").as_deref() != Ok("0"),
        ..PagingConfig::default()
    };
    let backing = if std::env::var("VMMU_MIN_THP").as_deref() == Ok("1") {
        Backing::Thp
    } else {
        Backing::Page4K
    };
    if std::env::var_os("VMMU_MIN_LOUD").is_none() {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let (_, groups) = first_touch_guest(family, 1);
    for (gi, cases) in groups.iter().enumerate() {
        if !first_touch_fails(family, config, backing, gi, cases) {
            continue;
        }
        // Shortest failing prefix, then ddmin over it.
        let (mut lo, mut hi) = (1, cases.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if first_touch_fails(family, config, backing, gi, &cases[..mid]) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let mut cur: Vec<Case> = cases[..lo].to_vec();
        let mut chunk = cur.len() / 2;
        while chunk >= 1 {
            let mut i = 0;
            while i < cur.len() {
                let mut cand = cur.clone();
                let end = (i + chunk).min(cand.len());
                // Never drop the last access (it is the failing one).
                if end == cand.len() && i == 0 {
                    i += chunk;
                    continue;
                }
                cand.drain(i..end.min(cand.len() - 1).max(i));
                if cand.len() < cur.len() && first_touch_fails(family, config, backing, gi, &cand) {
                    cur = cand;
                } else {
                    i += chunk;
                }
            }
            chunk /= 2;
        }
        let _ = std::panic::take_hook();
        eprintln!(
            "minimal failing first-touch sequence ({:?} unsync={} {backing:?} wp/nx={:?}):",
            family, config.unsync, REGS[gi]
        );
        for c in &cur {
            eprintln!(
                "  {} at {} upper={:#x} {} leaf={:#x} {} entries {:x?}",
                access_name(c.kind, c.cpl),
                c.gva,
                c.upper,
                describe_entry(c.upper),
                c.leaf,
                describe_entry(c.leaf),
                c.entries
            );
        }
        // Run it once more with the trace on, to show what the MMU answered.
        let (g, _) = first_touch_guest(family, 1);
        let mut rig = Rig::start(g, config, backing);
        rig.trace = true;
        rig.set_wp_nx(REGS[gi].0, REGS[gi].1);
        for c in &cur {
            if let Err(e) = rig.check_access(c.gva, c.kind, c.cpl, &c.entries) {
                eprintln!("FAILED: {e}");
            }
        }
        std::mem::forget(rig);
        return;
    }
    eprintln!("no failure to minimize");
}

#[test]
fn first_touch_4k_leaf_pde_varied() {
    if vmmu_testing::skip_rerun("first_touch_4k_leaf_pde_varied") {
        return;
    }
    let runs: Vec<_> = configs()
        .into_iter()
        .map(|config| {
            (
                format!("first touch 4K unsync={}", config.unsync),
                first_touch(Family::Pte4K, config, Backing::Page4K, 1),
                0,
            )
        })
        .collect();
    Failures::finish_all(&runs);
}

#[test]
fn first_touch_2m_leaf_pdpte_varied() {
    if vmmu_testing::skip_rerun("first_touch_2m_leaf_pdpte_varied") {
        return;
    }
    let runs: Vec<_> = [
        (configs()[0], Backing::Page4K),
        (configs()[1], Backing::Page4K),
        (configs()[0], Backing::Thp),
        (configs()[1], Backing::Thp),
    ]
    .into_iter()
    // Over THP each 2 MiB frame is mapped by ~1500 huge shadow leaves (long rmaps): one
    // configuration is enough in debug builds (6 s each).
    .filter(|(c, b)| !(cfg!(debug_assertions) && *b == Backing::Thp && !c.unsync))
    .map(|(config, backing)| {
        let t = std::time::Instant::now();
        let f = first_touch(Family::Pde2M, config, backing, 1);
        eprintln!(
            "first touch 2M unsync={} {backing:?}: {:?}",
            config.unsync,
            t.elapsed()
        );
        (
            format!("first touch 2M unsync={} {backing:?}", config.unsync),
            f,
            0,
        )
    })
    .collect();
    Failures::finish_all(&runs);
}

#[test]
fn first_touch_1g_leaf_pml4e_varied() {
    if vmmu_testing::skip_rerun("first_touch_1g_leaf_pml4e_varied") {
        return;
    }
    // A quarter of the cases over split pages (two shadow pages each); over hugetlbfs
    // every leaf lands in the rmap of one of two 1 GiB frames, and faults slow down with
    // the rmap's length: a sixteenth in debug builds.
    let huge_keep = if cfg!(debug_assertions) { 16 } else { 4 };
    let runs: Vec<_> = [
        (configs()[0], Backing::Page4K, 4),
        (configs()[1], Backing::HugeTlb1G, huge_keep),
    ]
    .into_iter()
    .map(|(config, backing, keep)| {
        let t = std::time::Instant::now();
        let f = first_touch(Family::Pdpte1G, config, backing, keep);
        eprintln!(
            "first touch 1G unsync={} {backing:?}: {:?}",
            config.unsync,
            t.elapsed()
        );
        (
            format!("first touch 1G unsync={} {backing:?}", config.unsync),
            f,
            0,
        )
    })
    .collect();
    Failures::finish_all(&runs);
}

/// Random changes on one VM without re-creating it: either entry of either path changes
/// (bits and frame), the guest flushes with INVLPG, MOV CR3 or a full flush, WP/NX change
/// now and then, the guest switches between two address spaces sharing their lower
/// tables, the host reclaims shadow pages or zaps them all, and accesses repeat without
/// changes (TLB and shadow hits after A/D were set). Every access is checked against the reference. Returns the outcomes, the failures
/// and the number of checked accesses.
fn random_transitions(
    config: PagingConfig,
    steps: u64,
    seed: u64,
    families: &[Family],
) -> (Vec<Outcome>, Failures, u64) {
    let mut g = Guest::new();
    let paths: Vec<Path> = families
        .iter()
        .map(|&f| match f {
            Family::Pte4K => Path::build(&mut g, f, 1, (3, 5, 7), 0x5a8),
            Family::Pde2M => Path::build(&mut g, f, 2, (4, 6, 0), 0x1a_b5a8),
            Family::Pdpte1G => Path::build(&mut g, f, 3, (5, 0, 0), 0x0b6a_b5a8),
        })
        .collect();
    for p in &paths {
        g.poke(p.upper, p.upper_value(0b00111));
        g.poke(p.leaf, p.leaf_value(0b00111, p.family.frame(0)));
    }
    // A second address space: a copy of the PML4 (same PDPTs, so the same lower tables
    // are reachable from two roots; its PML4Es are not the ones the test varies).
    let (pml4a, pml4b) = (g.pml4, g.alloc_table());
    for i in 0..512 {
        let e = g.peek(pml4a + 8 * i);
        if e != 0 {
            g.poke(pml4b + 8 * i, e);
        }
    }
    let mut on_b = false;
    // The 1 GiB frames' memslot makes audits slow: audit less often with it.
    let audit_every = if g.one_gib_frames { 64 } else { 16 };
    let mut rig = Rig::start(g, config, Backing::Page4K);
    let mut rng = Rng::new(seed);
    let mut fails = Failures::default();
    let mut outcomes = Vec::new();
    let mut log: Vec<String> = Vec::new();
    for step in 0..steps {
        if rig.broken.is_some() {
            break;
        }
        let p = &paths[rng.below(paths.len() as u64) as usize];
        let what = rng.below(100);
        let mut changed = true;
        if what < 40 {
            let v = p.leaf_value(rng.below(64) as u32, p.family.frame(rng.below(4)));
            log.push(format!("leaf of {:?} := {}", p.family, describe_entry(v)));
            let r = rig.guest_write(p.leaf, v);
            fails.note(r, || format!("step {step}: leaf write"));
        } else if what < 55 {
            let mut v = p.upper_value(rng.below(32) as u32);
            if p.family == Family::Pte4K && rng.chance(1, 4) {
                // The PDE becomes a 2 MiB leaf (and later a table pointer again).
                v = (v & !pte::ADDR_MASK) | Family::Pde2M.frame(rng.below(4)) | pte::PS;
                if rng.chance(1, 2) {
                    v |= pte::D;
                }
            }
            log.push(format!("upper of {:?} := {}", p.family, describe_entry(v)));
            let r = rig.guest_write(p.upper, v);
            fails.note(r, || format!("step {step}: upper write"));
        } else if what < 63 {
            let u = p.upper_value(rng.below(32) as u32);
            let l = p.leaf_value(rng.below(64) as u32, p.family.frame(rng.below(4)));
            log.push(format!(
                "{:?}: upper := {} leaf := {}",
                p.family,
                describe_entry(u),
                describe_entry(l)
            ));
            let r = rig.guest_write(p.leaf, l);
            fails.note(r, || format!("step {step}: leaf write"));
            let r = rig.guest_write(p.upper, u);
            fails.note(r, || format!("step {step}: upper write"));
        } else if what < 67 {
            let (wp, nx) = (rng.chance(1, 2), rng.chance(1, 2));
            log.push(format!("wp={} nx={}", wp as u8, nx as u8));
            rig.set_wp_nx(wp, nx);
            changed = false;
        } else if what < 72 {
            on_b = !on_b;
            let cr3 = if on_b { pml4b } else { pml4a };
            log.push(format!("mov cr3 {cr3:#x}"));
            rig.set_cr3(cr3);
            changed = false;
        } else if what < 76 {
            let n = 1 + rng.below(8) as usize;
            log.push(format!("reclaim {n}"));
            rig.reclaim(n);
            changed = false;
        } else if what < 77 {
            log.push("zap all".into());
            rig.zap_all();
            changed = false;
        } else {
            changed = false;
        }
        if changed {
            match rng.below(10) {
                0 => {
                    log.push("mov cr3".into());
                    rig.reload_cr3();
                }
                1 => {
                    log.push("full flush".into());
                    rig.flush_all();
                }
                _ => {
                    log.push(format!("invlpg {}", p.gva));
                    rig.invlpg(p.gva);
                }
            }
        }
        // The path's entries, with the PML4E of the address space in use.
        let watch: Vec<u64> = p
            .entries
            .iter()
            .map(|&e| {
                if on_b && (pml4a..pml4a + K4).contains(&e) {
                    e - pml4a + pml4b
                } else {
                    e
                }
            })
            .collect();
        for _ in 0..1 + rng.below(3) {
            let (kind, cpl) = ACCESSES[rng.below(6) as usize];
            log.push(format!("{} at {}", access_name(kind, cpl), p.gva));
            let r = rig.check_access(p.gva, kind, cpl, &watch);
            outcomes.push(match &r {
                Ok(w) => w
                    .gpa()
                    .map(|g| g.0)
                    .ok_or_else(|| w.error_code().map_or(u32::MAX, |e| e.bits())),
                Err(_) => Err(u32::MAX),
            });
            let had = fails.count;
            fails.note(r, || {
                format!(
                    "step {step} unsync={} {families:?} (seed {seed:#x}); the last steps:\n    {}",
                    config.unsync,
                    log[log.len().saturating_sub(12)..].join("\n    ")
                )
            });
            if fails.count > had {
                // The state has diverged: keep going, but the log says where.
                log.push("^^^ failed".into());
            }
        }
        if step.is_multiple_of(audit_every) {
            let r = rig.audit();
            fails.note(r, || format!("audit at step {step}"));
        }
        if log.len() > 64 {
            log.drain(..32);
        }
    }
    let r = rig.audit();
    fails.note(r, || "final audit".to_string());
    rig.teardown(&mut fails);
    (outcomes, fails, rig.checks)
}

fn random_transitions_both_configs(name: &str, families: &[Family]) {
    if vmmu_testing::skip_rerun(name) {
        return;
    }
    let steps = if cfg!(debug_assertions) { 3000 } else { 30000 };
    // More seeds for a longer soak: VMMU_PAGING_SEEDS=n runs seeds 1..=n.
    let seeds: u64 = std::env::var("VMMU_PAGING_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut runs = Vec::new();
    let mut outcomes = Vec::new();
    for seed in 1..=seeds {
        for config in configs() {
            let (o, fails, checks) = random_transitions(config, steps, seed, families);
            runs.push((
                format!(
                    "random transitions unsync={} {families:?} seed {seed}",
                    config.unsync
                ),
                fails,
                checks,
            ));
            outcomes.push(o);
        }
    }
    Failures::finish_all(&runs);
    for (i, pair) in outcomes.chunks(2).enumerate() {
        assert_eq!(
            pair[0],
            pair[1],
            "unsync=true and unsync=false differ (seed {})",
            i + 1
        );
    }
}

#[test]
fn random_transitions_4k_without_recreating_the_vm() {
    random_transitions_both_configs("random_transitions_4k", &[Family::Pte4K]);
}

#[test]
fn random_transitions_2m_without_recreating_the_vm() {
    random_transitions_both_configs("random_transitions_2m", &[Family::Pde2M]);
}

#[test]
fn random_transitions_1g_without_recreating_the_vm() {
    random_transitions_both_configs("random_transitions_1g", &[Family::Pdpte1G]);
}

#[test]
fn random_transitions_mixed_without_recreating_the_vm() {
    random_transitions_both_configs(
        "random_transitions_mixed",
        &[Family::Pte4K, Family::Pde2M, Family::Pdpte1G],
    );
}

/// The rig's plumbing, without the MMU: the direct map reaches every table page, each
/// family's path walks the entries the test watches and translates to the frame plus the
/// offset, and every first-touch case's walk reads its own leaf.
#[test]
fn rig_self_check_against_the_reference() {
    use vmmu::guest::PagingState;
    use vmmu::types::Gpa;
    use vmmu_testing::reference_walk as rw;
    let mut g = Guest::new();
    let paths = [
        Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8),
        Path::build(&mut g, Family::Pde2M, 2, (4, 6, 0), 0x1a_b5a8),
        Path::build(&mut g, Family::Pdpte1G, 3, (5, 0, 0), 0x0b6a_b5a8),
    ];
    let st = PagingState {
        cr3: Gpa(g.pml4),
        cr0_wp: true,
        efer_nx: true,
        cpl: 0,
    };
    for gpa in (0..TABLE_AREA).step_by(K4 as usize) {
        let w = rw::walk(&*g.mem, &st, Gva(DIRECT_MAP + gpa + 8), AccessKind::Write);
        assert_eq!(w.gpa(), Some(Gpa(gpa + 8)), "{w}");
    }
    for p in &paths {
        g.poke(p.upper, p.upper_value(0b11111));
        let frame = p.family.frame(3);
        g.poke(p.leaf, p.leaf_value(0b111111, frame));
        let w = rw::walk(&*g.mem, &st, p.gva, AccessKind::Read);
        let off = p.gva.0 & (p.family.leaf_level().bytes() - 1);
        assert_eq!(w.gpa(), Some(Gpa(frame + off)), "{w}");
        assert_eq!(
            w.entries.iter().map(|e| e.gpa.0).collect::<Vec<_>>(),
            p.entries
        );
        assert_eq!(w.result.unwrap().level, p.family.leaf_level());
        for e in &p.entries {
            assert!(e % 8 == 0 && *e < TABLE_AREA);
        }
        // Every frame lies in a memslot, above the tables, aligned to its size.
        for i in 0..DATA4K_PAGES.max(DATA2M_FRAMES) {
            let (f, size) = (p.family.frame(i), p.family.leaf_level().bytes());
            assert_eq!(f % size, 0);
            assert!(f >= TABLE_AREA);
            assert!(
                f + size <= GUEST_MEM || (f >= DATA1G && f + size <= DATA1G + DATA1G_FRAMES * G1)
            );
        }
    }
}
