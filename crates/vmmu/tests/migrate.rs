//! Live migration end to end on real memory (`vmmu_testing::migrate`): vCPU threads write
//! a workload into `RealHostMemory` while pre-copy rounds harvest the dirty log and copy
//! dirty pages; after stop-and-copy the destination must be byte for byte the source.
//!
//! Every harvest mode on both direct MMUs, several workloads (a generated trace among
//! them), the host discarding, moving and splitting pages during the rounds, logging
//! toggled mid-migration, rings small enough that vCPUs keep reaping their own. A write
//! the dirty log loses (a page written after it was copied, not reported again) leaves a
//! page that differs, and fails these tests: removing the re-protection that a harvest
//! does (`write_protect_dirty` in `Vm::get_dirty_log`) makes
//! `destination_is_identical_in_every_mode_on_both_mmus` fail.
#![cfg(target_os = "linux")]

use std::sync::Arc;

use vmmu::host::RealBacking;
use vmmu::{MmuKind, TdpIteration};
use vmmu_testing::migrate::{
    migrate, HarvestMode, HostEvents, MigrateConfig, MigrateReport, Record, Trace, Workload,
};

fn mmus() -> [MmuKind; 2] {
    [
        MmuKind::ShadowDirect,
        MmuKind::Tdp(TdpIteration::UsedEntries),
    ]
}

/// A small trace with a phase structure nobody tuned: a loop over a working set that
/// drifts, with reads between writes (what `Trace::from_lackey` makes of a program).
fn drifting_trace() -> Arc<Trace> {
    let mut records = Vec::new();
    for i in 0..4000u64 {
        let phase = i / 500;
        let page = phase * 37 + (i * i) % 61;
        records.push(Record {
            time: i,
            vcpu: (i % 3) as u32,
            write: i % 4 != 0,
            page,
        });
    }
    Arc::new(Trace {
        name: "drift".into(),
        records,
    })
}

fn workloads() -> Vec<Workload> {
    vec![
        Workload::Uniform,
        Workload::Sequential,
        Workload::HotSet {
            hot_percent: 5,
            skew_percent: 90,
        },
        Workload::Trace(drifting_trace()),
    ]
}

fn small(mmu: MmuKind, mode: HarvestMode, workload: Workload, seed: u64) -> MigrateConfig {
    MigrateConfig {
        mmu,
        mode,
        guest_bytes: 4 << 20,
        vcpus: 2,
        workload,
        // 4 MiB crosses in 16 ms; the budget is a few pages: rounds run until the limit.
        bandwidth: 256 << 20,
        // Paced, so the vCPU threads of tests running side by side leave the CPUs to
        // the rounds (most pages are still dirty again each round).
        dirty_rate: 100_000,
        downtime_ms: 0.05,
        max_rounds: 3,
        ring_size: 64,
        seed,
        ..MigrateConfig::default()
    }
}

fn check(cfg: &MigrateConfig, r: &MigrateReport) {
    assert!(
        r.identical(),
        "{:?} {} {}: {} pages differ, first {:?} ({} rounds, {} writes)",
        cfg.mmu,
        cfg.mode.name(),
        cfg.workload.name(),
        r.differing_pages,
        r.first_difference,
        r.rounds.len(),
        r.writes
    );
    r.audit.as_ref().expect("audit after migration");
}

#[test]
fn destination_is_identical_in_every_mode_on_both_mmus() {
    if vmmu_testing::skip_rerun("destination_is_identical_in_every_mode_on_both_mmus") {
        return;
    }
    let mut writes = 0;
    let mut rounds = 0;
    let mut fast = 0;
    for mmu in mmus() {
        for mode in HarvestMode::ALL {
            for (k, w) in workloads().into_iter().enumerate() {
                let cfg = small(mmu, mode, w, k as u64 + 1);
                let r = migrate(&cfg).unwrap();
                check(&cfg, &r);
                writes += r.writes;
                rounds += r.rounds.len();
                fast += r.fast_page_faults;
            }
        }
    }
    // The migrations did real work: guests wrote while rounds ran.
    assert!(
        writes > 0 && rounds > 24,
        "{writes} writes, {rounds} rounds"
    );
    // And vCPUs wrote through the lockless fast path (re-protected pages made writable
    // again without the MMU lock), the path that races the harvests.
    assert!(fast > 0, "no write took the fast path");
}

#[test]
fn host_discards_moves_and_splits_during_rounds_keep_it_identical() {
    if vmmu_testing::skip_rerun("host_discards_moves_and_splits_during_rounds_keep_it_identical") {
        return;
    }
    for mmu in mmus() {
        for mode in HarvestMode::ALL {
            for backing in [RealBacking::Page4K, RealBacking::Thp] {
                let cfg = MigrateConfig {
                    backing,
                    host_events: HostEvents {
                        discards: 8,
                        moves: 4,
                        splits: 2,
                    },
                    ..small(mmu, mode, Workload::Uniform, 7)
                };
                let r = migrate(&cfg).unwrap();
                check(&cfg, &r);
                assert!(r.host_changes > 0);
            }
        }
    }
}

#[test]
fn logging_toggled_mid_migration_keeps_it_identical() {
    if vmmu_testing::skip_rerun("logging_toggled_mid_migration_keeps_it_identical") {
        return;
    }
    for mmu in mmus() {
        for mode in HarvestMode::ALL {
            let cfg = MigrateConfig {
                toggle_logging_at: Some(2),
                ..small(mmu, mode, Workload::Sequential, 3)
            };
            let r = migrate(&cfg).unwrap();
            check(&cfg, &r);
        }
    }
}

#[test]
fn memslot_moved_mid_migration_keeps_it_identical() {
    if vmmu_testing::skip_rerun("memslot_moved_mid_migration_keeps_it_identical") {
        return;
    }
    for mmu in mmus() {
        for mode in HarvestMode::ALL {
            let cfg = MigrateConfig {
                move_slot_at: Some(2),
                ..small(mmu, mode, Workload::Uniform, 11)
            };
            let r = migrate(&cfg).unwrap();
            check(&cfg, &r);
            assert!(r.rounds.len() >= 2, "the move happened during the rounds");
        }
    }
}

#[test]
fn many_short_migrations_of_varied_workloads() {
    if vmmu_testing::skip_rerun("many_short_migrations_of_varied_workloads") {
        return;
    }
    // Many migrations in little time: a tiny guest, a fast link, one or two rounds.
    let mut n = 0;
    for seed in 0..6u64 {
        for mmu in mmus() {
            for mode in HarvestMode::ALL {
                let w = workloads()[(seed % 4) as usize].clone();
                let cfg = MigrateConfig {
                    guest_bytes: 2 << 20,
                    bandwidth: 1 << 30,
                    max_rounds: 1 + (seed % 2) as u32,
                    vcpus: 1 + (seed % 3) as u32,
                    ..small(mmu, mode, w, seed + 100)
                };
                check(&cfg, &migrate(&cfg).unwrap());
                n += 1;
            }
        }
    }
    assert_eq!(n, 36);
}

#[test]
fn bad_configurations_are_refused() {
    let ok = MigrateConfig::default();
    for bad in [
        MigrateConfig {
            guest_bytes: 4096,
            ..ok.clone()
        },
        MigrateConfig {
            vcpus: 0,
            ..ok.clone()
        },
        MigrateConfig {
            downtime_ms: f64::NAN,
            ..ok.clone()
        },
        MigrateConfig {
            mode: HarvestMode::Ring,
            ring_size: 3,
            ..ok.clone()
        },
        MigrateConfig {
            workload: Workload::HotSet {
                hot_percent: 0,
                skew_percent: 50,
            },
            ..ok.clone()
        },
    ] {
        assert!(migrate(&bad).is_err(), "{bad:?}");
    }
}

/// The traces recorded from real programs (`crates/vmmu-testing/traces/`, made with
/// `valgrind --tool=lackey --trace-mem=yes` and `vmmu migrate --lackey ... --save-trace`).
fn recorded_traces() -> Vec<Arc<Trace>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../vmmu-testing/traces");
    ["sort", "sqlite", "xz"]
        .iter()
        .map(|name| {
            let path = format!("{dir}/{name}.trace");
            let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            Arc::new(Trace::parse(name, std::io::BufReader::new(f)).unwrap())
        })
        .collect()
}

#[test]
fn recorded_program_traces_migrate_identically() {
    if vmmu_testing::skip_rerun("recorded_program_traces_migrate_identically") {
        return;
    }
    for t in recorded_traces() {
        assert!(
            t.pages_written() > 50,
            "{}: {} pages",
            t.name,
            t.pages_written()
        );
        for mmu in mmus() {
            for mode in HarvestMode::ALL {
                let cfg = MigrateConfig {
                    guest_bytes: 2 << 20,
                    ..small(mmu, mode, Workload::Trace(t.clone()), 5)
                };
                let r = migrate(&cfg).unwrap();
                check(&cfg, &r);
            }
        }
    }
}
