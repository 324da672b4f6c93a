//! Regression tests for bug shapes known from KVM's shadow MMU, through the public API only:
//! after every step the audit must hold and every access must match the reference walker
//! (`vmmu_testing::reference_walk`) exactly (gpa or #PF error code, A/D bits).
//!
//! - a huge guest PDE turned into a pointer to a page table and back while shadow mappings
//!   of the huge page exist (flushed with INVLPG, then with MOV CR3), and a write to a
//!   page table through a huge guest mapping of it;
//! - roots in use (and roots in a vCPU's cache of previous roots) zapped by reclaim;
//! - an emulated page-table write racing a zap of the page it targets;
//! - accessed/dirty bits the guest clears in a PTE it used, set again after a flush;
//! - offsets inside guest huge pages over 4 KiB host pages;
//! - CR0.WP = 0 supervisor writes to read-only pages, then user accesses and WP back on;
//! - a PTE change shot down on two vCPUs;
//! - a recursive PML4 slot (guest tables shadowed at several levels at once);
//! - reserved bits (RSVD faults) set and cleared again;
//! - vCPU threads with private PTEs under a shared PD, racing reclaim and zaps.

mod paging_rig;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use paging_rig::*;
use vmmu::guest::pte;
use vmmu::guest::PagingState;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gva};
use vmmu::Exit;
use vmmu::PagingConfig;
use vmmu_testing::Rng;

const ACCESSES: [(AccessKind, u8); 6] = [
    (AccessKind::Read, 0),
    (AccessKind::Write, 0),
    (AccessKind::Fetch, 0),
    (AccessKind::Read, 3),
    (AccessKind::Write, 3),
    (AccessKind::Fetch, 3),
];

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

/// Check every access kind at every gva in `gvas` (empty watch: the walk's entries), then
/// the audit; failures go to `fails` labelled with `what`.
fn round(rig: &mut Rig, fails: &mut Failures, gvas: &[Gva], what: &str) {
    if rig.broken.is_some() {
        return;
    }
    for &gva in gvas {
        for (kind, cpl) in ACCESSES {
            let r = rig.check_access(gva, kind, cpl, &[]);
            fails.note(r, || {
                format!(
                    "[unsync={}] {what}: {} at {gva}",
                    rig.config.unsync,
                    access_name(kind, cpl)
                )
            });
        }
    }
    let r = rig.audit();
    fails.note(r, || {
        format!("[unsync={}] audit after {what}", rig.config.unsync)
    });
}

/// (a) A 2 MiB guest page becomes a page table and back while shadow mappings of it exist.
fn huge_pde_to_table_and_back(config: PagingConfig, backing: Backing) -> Failures {
    let mut g = Guest::new();
    let pdpt = g.alloc_table();
    let pd = g.alloc_table();
    let pt = g.alloc_table();
    g.poke(g.pml4 + 8, pdpt | FULL);
    g.poke(pdpt + 8 * 3, pd | FULL);
    // The page table: 4K pages with varied rights, none of them at the huge frame.
    for j in 0..512u64 {
        let mut v = (DATA4K + ((j * 7) % DATA4K_PAGES) * K4) | FULL;
        if j % 5 == 1 {
            v &= !pte::RW;
        }
        if j % 7 == 2 {
            v &= !pte::US;
        }
        if j % 11 == 3 {
            v |= pte::NX;
        }
        if j % 13 == 4 {
            v &= !pte::P;
        }
        g.poke(pt + 8 * j, v);
    }
    let pde = pd + 8 * 5;
    let huge1 = (DATA2M + M2) | pte::PS | FULL;
    let huge2 = (DATA2M + 3 * M2) | pte::PS | FULL | pte::NX;
    g.poke(pde, huge1);
    let base = gva_of(1, 3, 5, 0, 0);
    let gvas: Vec<Gva> = [0u64, 1, 2, 3, 4, 100, 255, 511]
        .iter()
        .map(|&j| Gva(base.0 + j * K4 + 0x5a8))
        .collect();
    let table = pt | FULL;

    let mut rig = Rig::start(g, config, backing);
    let mut fails = Failures::default();
    let b = format!("{backing:?}");
    round(&mut rig, &mut fails, &gvas, &format!("{b}: huge PDE"));
    let r = rig.guest_write(pde, table);
    fails.note(r, || "huge -> table write".into());
    rig.invlpg(gvas[0]);
    round(
        &mut rig,
        &mut fails,
        &gvas,
        &format!("{b}: huge -> table, INVLPG"),
    );

    let r = rig.guest_write(pde, huge2);
    fails.note(r, || "table -> huge write".into());
    rig.invlpg(gvas[3]);
    round(
        &mut rig,
        &mut fails,
        &gvas,
        &format!("{b}: table -> huge, INVLPG"),
    );

    // The unused page table changes while the PDE is huge, then becomes used again.
    for j in [0u64, 1, 2] {
        let v = (DATA4K + (300 + j) * K4) | FULL;
        let r = rig.guest_write(pt + 8 * j, v);
        fails.note(r, || "write to the unlinked table".into());
    }
    let r = rig.guest_write(pde, table);
    fails.note(r, || "huge -> table write".into());
    rig.reload_cr3();
    round(
        &mut rig,
        &mut fails,
        &gvas,
        &format!("{b}: huge -> table, MOV CR3"),
    );

    let r = rig.guest_write(pde, huge1);
    fails.note(r, || "table -> huge write".into());
    rig.reload_cr3();
    round(
        &mut rig,
        &mut fails,
        &gvas,
        &format!("{b}: table -> huge, MOV CR3"),
    );

    // And once more with a full flush, the huge frame moved.
    let r = rig.guest_write(pde, table);
    fails.note(r, || "huge -> table write".into());
    rig.flush_all();
    round(
        &mut rig,
        &mut fails,
        &gvas,
        &format!("{b}: huge -> table, full flush"),
    );
    rig.teardown(&mut fails);
    fails
}

#[test]
fn huge_pde_becomes_table_and_back() {
    if vmmu_testing::skip_rerun("huge_pde_becomes_table_and_back") {
        return;
    }
    let mut runs = Vec::new();
    for config in configs() {
        for backing in [Backing::Page4K, Backing::Thp] {
            runs.push((
                format!("huge <-> table unsync={} {backing:?}", config.unsync),
                huge_pde_to_table_and_back(config, backing),
                0,
            ));
        }
    }
    Failures::finish_all(&runs);
}

/// (a') The guest maps its own page-table area with a 2 MiB page and writes a PTE through
/// it: the write must reach the MMU (emulated or unsync), never a writable huge shadow
/// mapping that bypasses write protection.
fn write_table_through_huge_alias(config: PagingConfig, backing: Backing) -> Failures {
    let mut g = Guest::new();
    let path = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
    g.poke(path.upper, path.upper_value(0b00111));
    g.poke(path.leaf, path.leaf_value(0b00111, DATA4K));
    // PML4[3] -> PDPT -> PD[0] = 2M page at gpa 0 (the first 512 table pages).
    let pdpt = g.alloc_table();
    let pd = g.alloc_table();
    g.poke(g.pml4 + 8 * 3, pdpt | FULL);
    g.poke(pdpt, pd | FULL);
    g.poke(pd, pte::PS | FULL);
    assert!(path.leaf < M2);
    let alias = |gpa: u64| gva_of(3, 0, 0, 0, 0).0 + gpa;

    let mut rig = Rig::start(g, config, backing);
    let mut fails = Failures::default();
    let mut rng = Rng::new(7);
    for i in 0..64u64 {
        if rig.broken.is_some() {
            break;
        }
        // Read through the alias (the MMU may map it now), then the tested address.
        let r = rig.check_access(Gva(alias(path.leaf)), AccessKind::Read, 0, &[]);
        fails.note(r, || format!("step {i}: read of the PTE through the alias"));
        round(&mut rig, &mut fails, &[path.gva], &format!("step {i}"));
        // A write through the alias: an ordinary data write at CPL 3 (US everywhere).
        let l = rng.below(64) as u32;
        let v = path.leaf_value(l, DATA4K + (i % 16) * K4);
        rig.set_cpl(3);
        let r = rig.guarded("gva_write_u64", |r| {
            r.vm.gva_write_u64(&mut r.vcpu, Gva(alias(path.leaf)), v)
        });
        rig.set_cpl(0);
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fails.push(format!("step {i}: write through the alias: {e:?}")),
            Err(e) => fails.push(format!("step {i}: write through the alias: {e}")),
        }
        if rig.guest.peek(path.leaf) != v {
            fails.push(format!(
                "step {i}: the write through the alias did not land"
            ));
        }
        rig.invlpg(path.gva);
        round(
            &mut rig,
            &mut fails,
            &[path.gva],
            &format!(
                "step {i}: after alias write of {}",
                vmmu_testing::reference_walk::describe_entry(v)
            ),
        );
    }
    rig.teardown(&mut fails);
    fails
}

#[test]
fn page_table_written_through_a_huge_alias() {
    if vmmu_testing::skip_rerun("page_table_written_through_a_huge_alias") {
        return;
    }
    let mut runs = Vec::new();
    for config in configs() {
        for backing in [Backing::Page4K, Backing::Thp] {
            runs.push((
                format!("huge alias unsync={} {backing:?}", config.unsync),
                write_table_through_huge_alias(config, backing),
                0,
            ));
        }
    }
    Failures::finish_all(&runs);
}

/// (b) Roots in use, and roots in the vCPU's cache of previous roots, zapped by reclaim.
fn reclaim_roots(config: PagingConfig) -> Failures {
    let mut g = Guest::new();
    // Address space A (the guest's PML4) and B (a second PML4 sharing the direct map);
    // the same gva maps different frames in each.
    let pa = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
    g.poke(pa.upper, pa.upper_value(0b00111));
    g.poke(pa.leaf, pa.leaf_value(0b00111, DATA4K));
    let cr3_a = g.pml4;
    let cr3_b = g.alloc_table();
    g.poke(
        cr3_b + 8 * DIRECT_MAP_SLOT,
        g.peek(cr3_a + 8 * DIRECT_MAP_SLOT),
    );
    g.pml4 = cr3_b;
    let pb = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
    g.poke(pb.upper, pb.upper_value(0b00111));
    g.poke(pb.leaf, pb.leaf_value(0b00111, DATA4K + K4));
    g.pml4 = cr3_a;
    assert_eq!(pa.gva, pb.gva);
    let gva = pa.gva;

    let mut rig = Rig::start(g, config, Backing::Page4K);
    let mut fails = Failures::default();
    let mut rng = Rng::new(0xb);
    for i in 0..24u64 {
        if rig.broken.is_some() {
            break;
        }
        round(&mut rig, &mut fails, &[gva], &format!("iter {i}: A"));
        let n = rig.reclaim(usize::MAX);
        if n == 0 {
            fails.push(format!(
                "iter {i}: reclaim(MAX) zapped nothing with pages in use"
            ));
        }
        round(
            &mut rig,
            &mut fails,
            &[gva],
            &format!("iter {i}: A after reclaim(MAX)"),
        );
        rig.set_cr3(cr3_b);
        round(&mut rig, &mut fails, &[gva], &format!("iter {i}: B"));
        rig.set_cr3(cr3_a);
        round(
            &mut rig,
            &mut fails,
            &[gva],
            &format!("iter {i}: back to A"),
        );
        // Zap both roots (A in use, B cached), then switch to the cached one.
        rig.reclaim(usize::MAX);
        rig.set_cr3(cr3_b);
        round(
            &mut rig,
            &mut fails,
            &[gva],
            &format!("iter {i}: cached B after reclaim"),
        );
        // Change A's leaf while running B (through the shared direct map), reclaim a few
        // pages, then come back to A.
        let v = pa.leaf_value(rng.below(64) as u32 | 1, DATA4K + (2 + rng.below(8)) * K4);
        let r = rig.guest_write(pa.leaf, v);
        fails.note(r, || format!("iter {i}: write A's leaf from B"));
        rig.reclaim(1 + rng.below(4) as usize);
        rig.set_cr3(cr3_a);
        round(
            &mut rig,
            &mut fails,
            &[gva],
            &format!("iter {i}: A after its leaf changed"),
        );
        if i.is_multiple_of(3) {
            rig.zap_all();
            round(
                &mut rig,
                &mut fails,
                &[gva],
                &format!("iter {i}: A after zap_all"),
            );
        }
        // Reclaim oldest-first one page at a time between accesses.
        for k in 0..6 {
            rig.reclaim(1);
            round(
                &mut rig,
                &mut fails,
                &[gva],
                &format!("iter {i}: reclaim(1) #{k}"),
            );
        }
    }
    rig.teardown(&mut fails);
    fails
}

#[test]
fn reclaim_zaps_roots_in_use() {
    if vmmu_testing::skip_rerun("reclaim_zaps_roots_in_use") {
        return;
    }
    let runs: Vec<_> = configs()
        .into_iter()
        .map(|c| {
            (
                format!("reclaim roots unsync={}", c.unsync),
                reclaim_roots(c),
                0,
            )
        })
        .collect();
    Failures::finish_all(&runs);
}

/// (c) The vCPU thread rewrites a guest PTE through the direct map (an emulated write, or
/// an unsync page) and accesses the address, checking each access against the reference;
/// another thread reclaims shadow pages and zaps everything meanwhile. Guest memory is
/// only changed by the vCPU thread, so its checks are exact despite the race.
fn emulated_write_races_zap(config: PagingConfig, iters: u64) -> Failures {
    let mut g = Guest::new();
    let p4 = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
    let p2 = Path::build(&mut g, Family::Pde2M, 2, (4, 6, 0), 0x1a_b5a8);
    for p in [&p4, &p2] {
        g.poke(p.upper, p.upper_value(0b00111));
        g.poke(p.leaf, p.leaf_value(0b00111, p.family.frame(0)));
    }
    let mut rig = Rig::start(g, config, Backing::Page4K);
    let vm = std::sync::Arc::clone(&rig.vm);
    let done = AtomicBool::new(false);
    let zaps = AtomicU64::new(0);
    let mut fails = Failures::default();
    std::thread::scope(|s| {
        let zapper = s.spawn(|| {
            let mut rng = Rng::new(0x2a9);
            while !done.load(Ordering::Acquire) {
                match rng.below(8) {
                    0 => vm.zap_all().expect("zap_all"),
                    1 => {
                        vm.reclaim_shadow_pages(usize::MAX);
                    }
                    _ => {
                        vm.reclaim_shadow_pages(1 + rng.below(3) as usize);
                    }
                }
                zaps.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
        });
        let mut rng = Rng::new(0xc0de);
        // At least `iters` iterations, and on until the zapper has zapped `iters / 4`
        // times (a fast vCPU loop would otherwise finish before the race starts).
        for i in 0..iters * 50 {
            if i >= iters && zaps.load(Ordering::Relaxed) >= iters / 4 {
                break;
            }
            if rig.broken.is_some() {
                break;
            }
            let p = if rng.chance(1, 2) { &p4 } else { &p2 };
            let l = rng.below(64) as u32 | 1; // present, so something maps now and then
            let v = p.leaf_value(l, p.family.frame(rng.below(4)));
            let r = rig.guest_write(p.leaf, v);
            fails.note(r, || format!("iter {i}: PTE write"));
            if rng.chance(1, 8) {
                let u = p.upper_value(rng.below(32) as u32 | 1);
                let r = rig.guest_write(p.upper, u);
                fails.note(r, || format!("iter {i}: upper write"));
            }
            rig.invlpg(p.gva);
            for _ in 0..2 {
                let (kind, cpl) = ACCESSES[rng.below(6) as usize];
                let r = rig.check_access(p.gva, kind, cpl, &p.entries);
                fails.note(r, || {
                    format!(
                        "[unsync={}] iter {i} ({}): {} at {}",
                        config.unsync,
                        p.family.name(),
                        access_name(kind, cpl),
                        p.gva
                    )
                });
            }
            if i % 64 == 63 {
                let r = rig.audit();
                fails.note(r, || format!("audit at iter {i} (racing)"));
            }
        }
        done.store(true, Ordering::Release);
        zapper.join().expect("zapper panicked");
        eprintln!(
            "unsync={}: {} checked accesses raced {} zaps",
            config.unsync,
            rig.checks,
            zaps.load(Ordering::Relaxed)
        );
    });
    let r = rig.audit();
    fails.note(r, || "final audit".into());
    for p in [&p4, &p2] {
        rig.invlpg(p.gva);
        round(&mut rig, &mut fails, &[p.gva], "after the race");
    }
    rig.teardown(&mut fails);
    fails
}

#[test]
fn emulated_pte_write_races_zap() {
    if vmmu_testing::skip_rerun("emulated_pte_write_races_zap") {
        return;
    }
    let iters = if cfg!(debug_assertions) { 2000 } else { 20000 };
    let runs: Vec<_> = configs()
        .into_iter()
        .map(|c| {
            (
                format!("write/zap race unsync={}", c.unsync),
                emulated_write_races_zap(c, iters),
                0,
            )
        })
        .collect();
    Failures::finish_all(&runs);
}

/// The guest clears the accessed (or dirty) bit of a PTE it used, keeping the frame, and
/// flushes (INVLPG, MOV CR3 or a full flush): the next access must set the bit again, as
/// a CPU's fresh walk does (KVM's sync drops an SPTE whose gPTE is not accessed). With
/// unsync pages the write goes straight to the table, so only the sync sees it.
#[test]
fn cleared_accessed_and_dirty_bits_are_set_again() {
    if vmmu_testing::skip_rerun("cleared_accessed_and_dirty_bits_are_set_again") {
        return;
    }
    let mut runs = Vec::new();
    for config in configs() {
        for flush in ["invlpg", "mov cr3", "full flush"] {
            for (clear, first, then) in [
                (pte::A, AccessKind::Read, AccessKind::Read),
                (pte::A, AccessKind::Write, AccessKind::Fetch),
                (pte::D, AccessKind::Write, AccessKind::Write),
            ] {
                let mut g = Guest::new();
                let p = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
                g.poke(p.upper, p.upper_value(0b00111));
                g.poke(p.leaf, p.leaf_value(0b00111, DATA4K));
                let mut rig = Rig::start(g, config, Backing::Page4K);
                let mut fails = Failures::default();
                let what = format!(
                    "user {first:?}, clear {}, {flush}, user {then:?}",
                    if clear == pte::A { "A" } else { "D" }
                );
                let r = rig.check_access(p.gva, first, 3, &p.entries);
                fails.note(r, || format!("{what}: the first access"));
                let v = rig.guest.peek(p.leaf) & !clear;
                let r = rig.guest_write(p.leaf, v);
                fails.note(r, || format!("{what}: the write"));
                match flush {
                    "invlpg" => rig.invlpg(p.gva),
                    "mov cr3" => rig.reload_cr3(),
                    _ => rig.flush_all(),
                }
                let r = rig.check_access(p.gva, then, 3, &p.entries);
                fails.note(r, || format!("{what}: the access after the flush"));
                let r = rig.audit();
                fails.note(r, || format!("{what}: audit"));
                rig.teardown(&mut fails);
                runs.push((format!("unsync={} {what}", config.unsync), fails, 0));
            }
        }
    }
    Failures::finish_all(&runs);
}

/// An access inside a 2 MiB guest page backed by 4 KiB host pages reaches the page's
/// frame plus the offset (the MMU splits the guest's huge page into a direct shadow page).
#[test]
fn offsets_inside_guest_huge_pages_over_small_host_pages() {
    if vmmu_testing::skip_rerun("offsets_inside_guest_huge_pages_over_small_host_pages") {
        return;
    }
    let mut runs = Vec::new();
    for config in configs() {
        for backing in [Backing::Page4K, Backing::Thp] {
            let mut g = Guest::new();
            let p = Path::build(&mut g, Family::Pde2M, 2, (4, 6, 0), 0);
            g.poke(p.upper, p.upper_value(0b00111));
            g.poke(p.leaf, p.leaf_value(0b11_0111, DATA2M));
            let mut rig = Rig::start(g, config, backing);
            let mut fails = Failures::default();
            let gvas: Vec<Gva> = [0u64, 0x5a8, 0x1000, 0x1a_b5a8, M2 - 8]
                .iter()
                .map(|&o| Gva(p.gva.0 + o))
                .collect();
            round(&mut rig, &mut fails, &gvas, "2M leaf");
            rig.teardown(&mut fails);
            runs.push((format!("unsync={} {backing:?}", config.unsync), fails, 0));
        }
    }
    Failures::finish_all(&runs);
}

/// CR0.WP = 0 lets the supervisor write a read-only page; KVM maps that with a writable,
/// supervisor-only shadow entry. Without any change to the guest's tables, a user read
/// must still work, a user write must fault, and once WP is back a supervisor write must
/// fault too (no writable shadow entry may survive the WP change).
#[test]
fn cr0_wp_off_supervisor_write_then_user_accesses() {
    if vmmu_testing::skip_rerun("cr0_wp_off_supervisor_write_then_user_accesses") {
        return;
    }
    let mut runs = Vec::new();
    for config in configs() {
        for leaf in [
            pte::P | pte::US,
            pte::P | pte::US | pte::A,
            pte::P,
            pte::P | pte::US | pte::A | pte::D,
        ] {
            let mut g = Guest::new();
            let p = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
            g.poke(p.upper, p.upper_value(0b00111));
            g.poke(p.leaf, DATA4K | leaf);
            let mut rig = Rig::start(g, config, Backing::Page4K);
            let mut fails = Failures::default();
            let steps: [(Option<bool>, AccessKind, u8); 9] = [
                (Some(false), AccessKind::Read, 3),
                (None, AccessKind::Write, 0),
                (None, AccessKind::Read, 3),
                (None, AccessKind::Write, 3),
                (None, AccessKind::Fetch, 3),
                (None, AccessKind::Write, 0),
                (Some(true), AccessKind::Write, 0),
                (None, AccessKind::Read, 3),
                (Some(false), AccessKind::Write, 0),
            ];
            for (i, (wp, kind, cpl)) in steps.into_iter().enumerate() {
                if let Some(wp) = wp {
                    rig.set_wp_nx(wp, true);
                }
                let r = rig.check_access(p.gva, kind, cpl, &p.entries);
                fails.note(r, || {
                    format!(
                        "leaf {} step {i}: wp={} {}",
                        vmmu_testing::reference_walk::describe_entry(leaf),
                        rig.regs.cr0_wp as u8,
                        access_name(kind, cpl)
                    )
                });
            }
            let r = rig.audit();
            fails.note(r, || "audit".into());
            rig.teardown(&mut fails);
            runs.push((
                format!(
                    "unsync={} leaf {}",
                    config.unsync,
                    vmmu_testing::reference_walk::describe_entry(leaf)
                ),
                fails,
                0,
            ));
        }
    }
    Failures::finish_all(&runs);
}

/// Two vCPUs share the shadow tables. vCPU 0 changes a PTE (through the direct map) and
/// the guest shoots the TLBs down (INVLPG on each vCPU, as an OS's IPI does): both must
/// then translate with the new entry.
#[test]
fn pte_change_with_shootdown_on_two_vcpus() {
    if vmmu_testing::skip_rerun("pte_change_with_shootdown_on_two_vcpus") {
        return;
    }
    let mut runs = Vec::new();
    for config in configs() {
        let mut g = Guest::new();
        let p = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
        g.poke(p.upper, p.upper_value(0b00111));
        g.poke(p.leaf, p.leaf_value(0b00111, DATA4K));
        let mut rig = Rig::start(g, config, Backing::Page4K);
        let mut other = rig.vm.create_vcpu().expect("vcpu");
        rig.vm.set_paging(&mut other, rig.regs).expect("set_paging");
        let mut fails = Failures::default();
        let mut rng = Rng::new(0x5407);
        for i in 0..400u64 {
            if rig.broken.is_some() {
                break;
            }
            // Both vCPUs use the current translation.
            for v in 0..2 {
                if v == 1 {
                    std::mem::swap(&mut rig.vcpu, &mut other);
                }
                let (kind, cpl) = ACCESSES[rng.below(6) as usize];
                let r = rig.check_access(p.gva, kind, cpl, &p.entries);
                fails.note(r, || {
                    format!("iter {i} vCPU {v}: {}", access_name(kind, cpl))
                });
                if v == 1 {
                    std::mem::swap(&mut rig.vcpu, &mut other);
                }
            }
            // vCPU 0 changes the leaf (or the PDE), then INVLPG everywhere.
            if rng.chance(1, 4) {
                let u = p.upper_value(rng.below(32) as u32);
                let r = rig.guest_write(p.upper, u);
                fails.note(r, || format!("iter {i}: PDE write"));
            } else {
                let l = p.leaf_value(rng.below(64) as u32, p.family.frame(rng.below(8)));
                let r = rig.guest_write(p.leaf, l);
                fails.note(r, || format!("iter {i}: PTE write"));
            }
            rig.invlpg(p.gva);
            std::mem::swap(&mut rig.vcpu, &mut other);
            rig.invlpg(p.gva);
            std::mem::swap(&mut rig.vcpu, &mut other);
            if i % 32 == 31 {
                let r = rig.audit();
                fails.note(r, || format!("audit at iter {i}"));
            }
        }
        drop(other);
        rig.teardown(&mut fails);
        runs.push((format!("two vCPUs unsync={}", config.unsync), fails, 0));
    }
    Failures::finish_all(&runs);
}

/// A recursive PML4 slot (PML4[510] points back at the PML4, supervisor-only), as Windows
/// and some kernels use to reach their own page tables: the same guest pages are then
/// shadowed at several levels at once. The guest reads and rewrites the test path's PTE
/// and PDE through the recursive window; the path's translation must follow.
#[test]
fn recursive_pml4_slot() {
    if vmmu_testing::skip_rerun("recursive_pml4_slot") {
        return;
    }
    const R: u64 = 510;
    // The gva at which the entry of `gva` at `level` appears through the recursive slot.
    fn window(gva: Gva, level: u32) -> Gva {
        let mut v = gva.0 & ((1 << 48) - 1);
        for _ in 0..level {
            v = (R << 39) | (v >> 9);
        }
        v &= !7;
        Gva(if v & (1 << 47) != 0 {
            v | 0xffff_0000_0000_0000
        } else {
            v
        })
    }
    let mut runs = Vec::new();
    for config in configs() {
        let mut g = Guest::new();
        let p = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
        g.poke(p.upper, p.upper_value(0b00111));
        g.poke(p.leaf, p.leaf_value(0b00111, DATA4K));
        g.poke(g.pml4 + 8 * R, g.pml4 | pte::P | pte::RW);
        let pte_window = window(p.gva, 1);
        let pde_window = window(p.gva, 2);
        let mut rig = Rig::start(g, config, Backing::Page4K);
        let mut fails = Failures::default();
        let mut rng = Rng::new(0x7ec);
        // The windows reach the entries themselves.
        for (w, gpa) in [(pte_window, p.leaf), (pde_window, p.upper)] {
            let r = rig.check_access(w, AccessKind::Read, 0, &[]);
            match r {
                Ok(ref walk) if walk.gpa().map(|g| g.0) != Some(gpa) => fails.push(format!(
                    "the window {w} does not reach {gpa:#x} (test bug): {walk}"
                )),
                _ => {}
            }
            fails.note(r, || format!("read of the window {w}"));
        }
        for i in 0..300u64 {
            if rig.broken.is_some() {
                break;
            }
            round(&mut rig, &mut fails, &[p.gva], &format!("iter {i}"));
            // Rewrite the PTE (mostly) or the PDE through the window, at CPL 0.
            let (w, v) = if rng.chance(1, 4) {
                (pde_window, p.upper_value(rng.below(32) as u32))
            } else {
                (
                    pte_window,
                    p.leaf_value(rng.below(64) as u32, p.family.frame(rng.below(8))),
                )
            };
            let want = vmmu_testing::reference_walk::walk(
                &*rig.guest.mem,
                &PagingState { cpl: 0, ..rig.regs },
                w,
                AccessKind::Write,
            );
            rig.set_cpl(0);
            let r = rig.guarded("gva_write_u64", |r| r.vm.gva_write_u64(&mut r.vcpu, w, v));
            match (r, want.result.is_ok()) {
                (Ok(Ok(())), true) => {}
                (Ok(Err(Exit::GuestPageFault { .. })), false) => {}
                (r, _) => fails.push(format!(
                    "iter {i}: write of {v:#x} through the window {w}: got {r:?}; reference: {want}"
                )),
            }
            if want.result.is_ok() {
                let now = rig.guest.peek(want.gpa().unwrap().0);
                if now != v {
                    fails.push(format!(
                        "iter {i}: the window write did not land: {now:#x} != {v:#x}"
                    ));
                }
            } else {
                // The PDE was made unusable for the window: restore it directly... as the
                // guest would through its direct map.
                let r = rig.guest_write(p.upper, p.upper_value(0b00111));
                fails.note(r, || format!("iter {i}: PDE restore"));
            }
            rig.invlpg(p.gva);
            rig.invlpg(pte_window);
            rig.invlpg(pde_window);
            if i % 32 == 31 {
                let r = rig.audit();
                fails.note(r, || format!("audit at iter {i}"));
            }
        }
        rig.teardown(&mut fails);
        runs.push((format!("recursive slot unsync={}", config.unsync), fails, 0));
    }
    Failures::finish_all(&runs);
}

/// Reserved bits in the guest's entries fault with RSVD (PS in a PML4E, bits 13.. of huge
/// leaves, NX without EFER.NX); after the guest fixes the entry the address translates.
#[test]
fn reserved_bits_fault_then_fixed() {
    if vmmu_testing::skip_rerun("reserved_bits_fault_then_fixed") {
        return;
    }
    let mut runs = Vec::new();
    for config in configs() {
        let mut g = Guest::new();
        let p4 = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
        let p2 = Path::build(&mut g, Family::Pde2M, 2, (4, 6, 0), 0x1a_b5a8);
        let p1 = Path::build(&mut g, Family::Pdpte1G, 3, (5, 0, 0), 0x0b6a_b5a8);
        for p in [&p4, &p2, &p1] {
            g.poke(p.upper, p.upper_value(0b00111));
            g.poke(p.leaf, p.leaf_value(0b11_0111, p.family.frame(1)));
        }
        let mut rig = Rig::start(g, config, Backing::Page4K);
        let mut fails = Failures::default();
        // (the entry, the reserved bit, the path it is on)
        let cases = [
            (p4.entries[0], pte::PS, &p4),
            (p2.leaf, 1 << 13, &p2),
            (p2.leaf, 1 << 20, &p2),
            (p1.leaf, 1 << 13, &p1),
            (p1.leaf, 1 << 29, &p1),
        ];
        for (entry, bit, p) in cases {
            for nx in [true, false] {
                rig.set_wp_nx(true, nx);
                let good = rig.guest.peek(entry) & !(pte::A | pte::D);
                round(&mut rig, &mut fails, &[p.gva], "before");
                let r = rig.guest_write(entry, good | bit);
                fails.note(r, || format!("setting bit {bit:#x} at {entry:#x}"));
                rig.invlpg(p.gva);
                round(
                    &mut rig,
                    &mut fails,
                    &[p.gva],
                    &format!("bit {bit:#x} set at {entry:#x}"),
                );
                let r = rig.guest_write(entry, good);
                fails.note(r, || format!("clearing bit {bit:#x} at {entry:#x}"));
                rig.invlpg(p.gva);
                round(&mut rig, &mut fails, &[p.gva], "fixed again");
                // NX in the leaf while EFER.NX is off.
                let r = rig.guest_write(p.leaf, rig.guest.peek(p.leaf) | pte::NX);
                fails.note(r, || "NX in the leaf".into());
                rig.invlpg(p.gva);
                round(&mut rig, &mut fails, &[p.gva], "NX in the leaf");
                let r = rig.guest_write(p.leaf, rig.guest.peek(p.leaf) & !pte::NX);
                fails.note(r, || "NX out of the leaf".into());
                rig.invlpg(p.gva);
            }
        }
        rig.teardown(&mut fails);
        runs.push((format!("reserved bits unsync={}", config.unsync), fails, 0));
    }
    Failures::finish_all(&runs);
}

/// vCPU threads fault, rewrite their own PTEs and PDEs (through the shared direct map:
/// emulated writes to a PD page they all share, unsync PT pages of their own) and check
/// every access against the reference, while another thread reclaims and zaps. Each
/// thread owns its entries, and the shared ones start with A set (bits only get set), so
/// every thread's reference is exact despite the concurrency.
#[test]
fn vcpu_threads_with_private_ptes_and_a_shared_pd() {
    if vmmu_testing::skip_rerun("vcpu_threads_with_private_ptes_and_a_shared_pd") {
        return;
    }
    const THREADS: u64 = 2;
    let iters: u64 = if cfg!(debug_assertions) { 5000 } else { 50000 };
    let mut runs = Vec::new();
    for config in configs() {
        let mut g = Guest::new();
        let first = Path::build(&mut g, Family::Pte4K, 1, (3, 5, 7), 0x5a8);
        // The other threads' paths share the PML4E, PDPTE and PD page of the first, with
        // a PDE (and so a PT) of their own.
        let mut paths = vec![first.clone()];
        for t in 1..THREADS {
            let pt = g.alloc_table();
            let i2 = 5 + t;
            let mut p = first.clone();
            p.gva = gva_of(1, 3, i2, 7, 0x5a8);
            p.upper = first.upper - 8 * 5 + 8 * i2;
            p.upper_target = pt;
            p.leaf = pt + 8 * 7;
            p.entries = vec![first.entries[0], first.entries[1], p.upper, p.leaf];
            paths.push(p);
        }
        for &e in &first.entries[..2] {
            g.poke(e, g.peek(e) | pte::A);
        }
        for p in &paths {
            g.poke(p.upper, p.upper_value(0b10111));
            g.poke(p.leaf, p.leaf_value(0b11_0111, p.family.frame(0)));
        }
        let rig = Rig::start(g, config, Backing::Page4K);
        let mut rigs: Vec<Rig> = (1..THREADS).map(|_| rig.another_vcpu()).collect();
        rigs.insert(0, rig);
        let vm = std::sync::Arc::clone(&rigs[0].vm);
        let done = AtomicBool::new(false);
        let results: Vec<(Failures, u64)> = std::thread::scope(|s| {
            let zapper = s.spawn(|| {
                let mut rng = Rng::new(0x2a9);
                while !done.load(Ordering::Acquire) {
                    match rng.below(16) {
                        0 => vm.zap_all().expect("zap_all"),
                        1..=3 => {
                            vm.reclaim_shadow_pages(1 + rng.below(4) as usize);
                        }
                        _ => {}
                    }
                    std::thread::yield_now();
                }
            });
            let handles: Vec<_> = rigs
                .iter_mut()
                .zip(&paths)
                .enumerate()
                .map(|(t, (rig, p))| {
                    s.spawn(move || {
                        let mut fails = Failures::default();
                        let mut rng = Rng::new(0x7417 + t as u64);
                        for i in 0..iters {
                            if rig.broken.is_some() {
                                break;
                            }
                            if rng.chance(1, 3) {
                                let v = if rng.chance(1, 4) {
                                    (p.upper, p.upper_value(rng.below(32) as u32))
                                } else {
                                    (
                                        p.leaf,
                                        p.leaf_value(
                                            rng.below(64) as u32,
                                            p.family.frame(t as u64 * 64 + rng.below(8)),
                                        ),
                                    )
                                };
                                let r = rig.guest_write(v.0, v.1);
                                fails.note(r, || format!("thread {t} iter {i}: write"));
                                rig.invlpg(p.gva);
                            }
                            let (kind, cpl) = ACCESSES[rng.below(6) as usize];
                            let r = rig.check_access(p.gva, kind, cpl, &p.entries);
                            fails.note(r, || {
                                format!("thread {t} iter {i}: {}", access_name(kind, cpl))
                            });
                        }
                        (fails, rig.checks)
                    })
                })
                .collect();
            let results = handles
                .into_iter()
                .map(|h| h.join().expect("vCPU thread panicked"))
                .collect();
            done.store(true, Ordering::Release);
            zapper.join().expect("zapper panicked");
            results
        });
        drop(vm);
        let mut rig0 = rigs.remove(0);
        drop(rigs);
        for (t, (mut fails, checks)) in results.into_iter().enumerate() {
            if t == 0 {
                let r = rig0.audit();
                fails.note(r, || "audit after the threads".into());
                rig0.teardown(&mut fails);
            }
            runs.push((
                format!("vCPU thread {t} unsync={}", config.unsync),
                fails,
                checks,
            ));
        }
    }
    Failures::finish_all(&runs);
}
