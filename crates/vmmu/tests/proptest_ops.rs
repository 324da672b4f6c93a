//! Differential property tests: random sequences of operations applied to a VM and to the
//! reference model side by side (`vmmu_testing`), for every MMU.
//!
//! Operations: memslot create / delete / move / flag changes (and arbitrary, malformed
//! regions), guest reads, writes and fetches from several vCPUs, dirty-log harvests in
//! every mode (GET; GET + CLEAR of whole and partial, misaligned and oversized ranges;
//! ring harvest + reset), notifier unmap / age / test_age / change_pte with the host
//! remapping, protecting, unmapping and splitting pages, open invalidation windows, zaps
//! of ranges, slots and everything (in place and fast), write tracking, new vCPUs; table
//! memory running out at any allocation of the next operations; the host changing pages
//! inside an open invalidation; a second VM whose vCPUs cross over (and outlive it);
//! malformed VM configurations.
//!
//! After every step (see `vmmu_testing::interp`): every call returned what the model
//! says, a rejected call changed nothing, the audit holds, slots and bitmaps equal the
//! model's, every leaf under every root maps the host's current frame and is never more
//! permissive than the model allows (writable only where the write is already logged),
//! and every vCPU reads every touched page exactly as the model says. At the end every
//! table is freed.
//!
//! Each MMU runs `PROPTEST_CASES` sequences (default 24) of up to `VMMU_PROPTEST_OPS`
//! operations (default 64). Set `VMMU_PROPTEST_STATS=1` to print what ran. Failures
//! shrink to a minimal sequence, saved in `proptest_ops.proptest-regressions`; each real
//! bug found also has a named test below.

use std::sync::Mutex;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use vmmu::types::{AccessKind, Level};
use vmmu::MmuKind;
use vmmu_testing::interp::{algorithms, RunConfig, WIN, WIN_SIZE};
use vmmu_testing::{DirtyMode, Interp, Op, RunStats, MMUS};

fn kind() -> impl Strategy<Value = AccessKind> {
    prop_oneof![
        3 => Just(AccessKind::Read),
        4 => Just(AccessKind::Write),
        1 => Just(AccessKind::Fetch)
    ]
}

/// A window offset: a 512 KiB grid point plus 0-2 pages (some 2M-aligned bases, some
/// not even 64 KiB-aligned).
fn at() -> impl Strategy<Value = u64> {
    (0..112u64, 0..3u64).prop_map(|(a, b)| a * (512 << 10) + b * 4096)
}

fn page() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..1400u64, 1 => any::<u64>()]
}

fn slot() -> impl Strategy<Value = u8> {
    prop_oneof![8 => 0..4u8, 1 => 4..8u8]
}

/// Pages of the shapes (1024, 771, 1280) so "to the slot's end" ranges come up.
fn clear_range() -> impl Strategy<Value = (u64, u64)> {
    let first =
        prop_oneof![6 => (0..20u64).prop_map(|k| k * 64), 1 => 0..2000u64, 1 => any::<u64>()];
    (first, 0..8u32, 0..20u64).prop_map(|(first, how, k)| {
        let num = match how {
            0 => 1024u64.wrapping_sub(first),
            1 => 771u64.wrapping_sub(first),
            2 => 1280u64.wrapping_sub(first),
            3 => k,
            4 => u64::MAX - k,
            _ => k * 64,
        };
        (first, num)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        16 => (0..4u8, slot(), page(), 0..4096u16, kind())
            .prop_map(|(vcpu, slot, page, off, kind)| Op::Access { vcpu, slot, page, off, kind }),
        1 => (0..4u8, prop_oneof![3 => (WIN - (4 << 20))..(WIN + WIN_SIZE + (8 << 20)), 1 => any::<u64>()], kind())
            .prop_map(|(vcpu, gpa, kind)| Op::AccessGpa { vcpu, gpa, kind }),
        3 => (0..4u8, at(), prop::bool::weighted(0.4), prop::bool::weighted(0.15))
            .prop_map(|(slot, at, log, readonly)| Op::Create { slot, at, log, readonly }),
        1 => slot().prop_map(|slot| Op::Delete { slot }),
        2 => (slot(), at()).prop_map(|(slot, at)| Op::Move { slot, at }),
        3 => (slot(), any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(slot, log, readonly)| Op::Flags { slot, log, readonly }),
        1 => (0..10u32, 0..5u32, prop_oneof![Just(WIN), Just(WIN + 0x1001), any::<u64>(), WIN..WIN + WIN_SIZE],
              prop_oneof![Just(0u64), Just(4096u64), Just(0x1001u64), 1..(1u64 << 30), Just(!0xfffu64)],
              prop::option::weighted(0.2, any::<u64>()), prop_oneof![Just(0u64), Just(512u64), Just(4096u64)])
            .prop_map(|(slot, flags, gpa, size, hva, hva_off)| Op::Region { slot, flags, gpa, size, hva, hva_off }),
        3 => (0..5u32, prop_oneof![6 => Just(0u8), 1 => 1..3u8]).prop_map(|(slot, short)| Op::GetLog { slot, short }),
        3 => (0..5u32, clear_range(), 0..4u64, prop_oneof![6 => Just(0u8), 1 => 1..3u8])
            .prop_map(|(slot, (first, num), pattern, short)| Op::ClearLog { slot, first, num, pattern, short }),
        2 => (0..5u32).prop_map(|slot| Op::GetRanges { slot }),
        2 => (0..5u32, prop_oneof![2 => Just(0u64), 1 => 1..8u64])
            .prop_map(|(slot, pattern)| Op::ClearRanges { slot, pattern }),
        2 => (0..5u8).prop_map(|vcpu| Op::Harvest { vcpu }),
        1 => (0..5u8, 0..8u8).prop_map(|(vcpu, count)| Op::RingView { vcpu, count }),
        2 => Just(Op::Reset),
        1 => (slot(), page(), prop_oneof![Just(0u64), 1..8u64, 1..1200u64])
            .prop_map(|(slot, page, pages)| Op::Unmap { slot, page, pages }),
        2 => (slot(), page(), 0..600u64, any::<bool>())
            .prop_map(|(slot, page, pages, test)| Op::Age { slot, page, pages, test }),
        1 => (slot(), page()).prop_map(|(slot, page)| Op::ChangePte { slot, page }),
        1 => (slot(), page()).prop_map(|(slot, page)| Op::HostRemap { slot, page }),
        1 => (slot(), page(), 1..600u64, any::<bool>(), any::<bool>())
            .prop_map(|(slot, page, pages, writable, notify)| Op::HostProtect { slot, page, pages, writable, notify }),
        1 => (slot(), page(), 1..300u64).prop_map(|(slot, page, pages)| Op::HostUnmap { slot, page, pages }),
        1 => slot().prop_map(|slot| Op::HostRestore { slot }),
        1 => (slot(), page()).prop_map(|(slot, page)| Op::HostSplit { slot, page }),
        1 => (slot(), page(), 0..64u64).prop_map(|(slot, page, pages)| Op::InvalidateStart { slot, page, pages }),
        1 => Just(Op::InvalidateEnd),
        1 => (0..3u8, any::<u64>(), any::<u64>()).prop_map(|(which, start, end)| Op::HvaRange { which, start, end }),
        2 => (0..18000u64, prop_oneof![Just(0i64), -8..0i64, 1..16i64, 1..2048i64, 1..20000i64])
            .prop_map(|(start, len)| Op::Zap { start, len }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(start, end)| Op::ZapRaw { start, end }),
        1 => (0..6u32).prop_map(|slot| Op::ZapSlot { slot }),
        1 => Just(Op::ZapAll),
        1 => Just(Op::ZapAllFast),
        2 => (slot(), page(), prop::bool::weighted(0.4))
            .prop_map(|(slot, page, untrack)| Op::Track { slot, page, untrack }),
        1 => (prop_oneof![Just(u64::MAX), any::<u64>(), (WIN >> 12)..((WIN + WIN_SIZE) >> 12)], any::<bool>())
            .prop_map(|(gfn, untrack)| Op::TrackGfn { gfn, untrack }),
        1 => Just(Op::CreateVcpu),
        2 => prop_oneof![3 => Just(0u8), 2 => 1..6u8].prop_map(|after| Op::FailAlloc { after }),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(page, unmap)| Op::HostChangeInWindow { page, unmap }),
        1 => (0..5u8, any::<u16>()).prop_map(|(call, page)| Op::OtherVm { call, page }),
        1 => any::<u64>().prop_map(|bits| Op::BadConfig { bits }),
    ]
}

fn run_config(mmu: MmuKind) -> impl Strategy<Value = RunConfig> {
    (
        prop_oneof![
            Just(DirtyMode::Get),
            Just(DirtyMode::Manual),
            Just(DirtyMode::ManualInitSet),
            Just(DirtyMode::Ring(4096)),
            Just(DirtyMode::Ring(16)),
        ],
        prop_oneof![3 => Just(Level::L1G), 1 => Just(Level::L2M), 1 => Just(Level::L4K)],
        any::<u8>(),
        prop_oneof![4 => Just(48u8), 1 => Just(36u8)],
        prop_oneof![4 => Just(32764u32), 1 => Just(3u32)],
        prop_oneof![4 => Just(1024u32), 1 => Just(4u32)],
        2..4usize,
        prop::bool::weighted(0.15),
    )
        .prop_map(
            move |(dirty, max_level, algos, gpa_bits, max_slots, max_vcpus, vcpus, hugetlb)| {
                RunConfig {
                    dirty,
                    max_level,
                    algorithms: algorithms(algos),
                    // A bit `algorithms` leaves alone, as `RunConfig::decode`: half the
                    // runs with the change_pte compatibility option (Linux before 6.10).
                    change_pte: algos & 0x80 != 0,
                    gpa_bits,
                    max_slots,
                    max_vcpus,
                    vcpus,
                    // A moved slot keeps its dirty bitmap, as in KVM (see
                    // `move_keeps_the_dirty_bitmap`).
                    move_keeps_dirty: true,
                    hugetlb,
                    ..RunConfig::new(mmu)
                }
            },
        )
}

/// Every shape's slot first, so accesses hit mapped memory from the start.
fn with_slots(cfg: &RunConfig, ops: &[Op]) -> Vec<Op> {
    let mut v: Vec<Op> = [0u64, (16 << 20) + 3 * 4096, (32 << 20) + (1 << 20), 0]
        .iter()
        .take(cfg.nshapes())
        .enumerate()
        .map(|(i, &at)| Op::Create {
            slot: i as u8,
            at,
            log: false,
            readonly: false,
        })
        .collect();
    v.extend_from_slice(ops);
    v
}

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

static TOTALS: Mutex<(u64, RunStats)> = Mutex::new((
    0,
    RunStats {
        ops: std::collections::BTreeMap::new(),
        checks: 0,
        rejected: 0,
        accesses: 0,
        skipped: 0,
        out_of_memory: 0,
        foreign: 0,
    },
));

fn differential(name: &str) {
    if vmmu_testing::skip_rerun("differential") {
        return;
    }
    let mmu = MMUS.iter().find(|(n, _)| *n == name).expect("an MMU").1;
    let config = Config {
        cases: env("PROPTEST_CASES", 24),
        source_file: Some(file!()),
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let max_ops = env("VMMU_PROPTEST_OPS", 64) as usize;
    let mut runner = TestRunner::new(config);
    let mine = Mutex::new((0u64, RunStats::default()));
    let result = runner.run(
        &(run_config(mmu), prop::collection::vec(op(), 1..max_ops)),
        |(cfg, ops)| {
            let ops = with_slots(&cfg, &ops);
            match Interp::run(cfg, &ops) {
                Ok(stats) => {
                    let mut m = mine.lock().unwrap();
                    m.0 += 1;
                    m.1.add(&stats);
                    Ok(())
                }
                Err(f) => Err(TestCaseError::fail(format!("{cfg:?}: {f}"))),
            }
        },
    );
    let (cases, stats) = mine.into_inner().unwrap();
    if std::env::var_os("VMMU_PROPTEST_STATS").is_some() {
        eprintln!(
            "{name}: {cases} sequences, {} operations, {} checks passed, {} rejected calls unchanged, {} accesses checked, {} skipped, {} out of table memory and unchanged, {} foreign vCPU uses refused; by kind: {:?}",
            stats.total_ops(),
            stats.checks,
            stats.rejected,
            stats.accesses,
            stats.skipped,
            stats.out_of_memory,
            stats.foreign,
            stats.ops
        );
        let mut t = TOTALS.lock().unwrap();
        t.0 += cases;
        t.1.add(&stats);
        eprintln!(
            "all MMUs so far: {} sequences, {} operations",
            t.0,
            t.1.total_ops()
        );
    }
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn differential_shadow_direct() {
    differential("shadow-direct");
}

#[test]
fn differential_tdp_scan_all() {
    differential("tdp-scan");
}

#[test]
fn differential_tdp_skip_non_present() {
    differential("tdp-skip");
}

#[test]
fn differential_tdp_used_entries() {
    differential("tdp-used");
}

// ---------------------------------------------------------------------------------------
// Shrunk failing cases, one named test each (run on every MMU).
// ---------------------------------------------------------------------------------------

/// Run `ops` (after the default slots) on every MMU with `cfg`'s other settings.
fn case(cfg: impl Fn(MmuKind) -> RunConfig, ops: &[Op]) {
    if vmmu_testing::skip_rerun("case") {
        return;
    }
    for &(name, mmu) in MMUS {
        let cfg = cfg(mmu);
        let ops = with_slots(&cfg, ops);
        if let Err(f) = Interp::run(cfg, &ops) {
            panic!("{name}: {f}");
        }
    }
}

/// The first read of a THP slot maps 2M (from the old proptest's regressions).
#[test]
fn first_read_maps_huge() {
    case(
        RunConfig::new,
        &[Op::Access {
            vcpu: 0,
            slot: 0,
            page: 0,
            off: 0,
            kind: AccessKind::Read,
        }],
    );
}

/// A fast zap, then logging starts on a slot that had a 2M leaf under the old root (from
/// the old proptest's regressions).
#[test]
fn fast_zap_then_logging() {
    case(
        RunConfig::new,
        &[
            Op::Access {
                vcpu: 0,
                slot: 2,
                page: 146996244944896,
                off: 0,
                kind: AccessKind::Read,
            },
            Op::ZapAllFast,
            Op::Flags {
                slot: 2,
                log: true,
                readonly: false,
            },
        ],
    );
}

/// A page written while its slot logs must still be reported after the slot moves: KVM
/// keeps the dirty bitmap across KVM_MR_MOVE (`kvm_prepare_memory_region`), vmmu gives the
/// moved slot a fresh one (`Memslots::apply`, `SlotChange::Move` re-creates the slot), so
/// the write is lost to a migration. Found by `differential_*`.
#[test]
fn move_keeps_the_dirty_bitmap() {
    case(
        RunConfig::new,
        &[
            Op::Flags {
                slot: 0,
                log: true,
                readonly: false,
            },
            Op::Access {
                vcpu: 0,
                slot: 0,
                page: 0,
                off: 0,
                kind: AccessKind::Write,
            },
            Op::Move {
                slot: 0,
                at: 524288,
            },
            Op::GetLog { slot: 0, short: 0 },
        ],
    );
}

/// `track_write` / `untrack_write` of gfn `u64::MAX` overflowed computing the error's
/// range (`gfn + 1`, vm.rs) and panicked in debug builds instead of returning
/// `InvalidRange`. Fixed (saturating add). Found by `differential_*`.
#[test]
fn track_write_of_the_last_gfn_is_an_error_not_a_panic() {
    case(
        RunConfig::new,
        &[
            Op::TrackGfn {
                gfn: u64::MAX,
                untrack: false,
            },
            Op::TrackGfn {
                gfn: u64::MAX,
                untrack: true,
            },
        ],
    );
}

/// A 1 GiB hugetlb slot mapped huge, then logging on (the TDP MMU splits the 1G leaf
/// eagerly, down to 4K), then `zap_memslot`: the 4K leaf at gfn 0x135e00 survives the zap
/// (TDP only; the shadow MMU passes). The zap walk yields every `YIELD_BUDGET` positions;
/// when the budget runs out on a non-leaf entry not yet descended into, `TdpIter::next`
/// sets the resume point past the entry's first gfn (`next_last_level_gfn.max(gfn + 1)`),
/// so the next walk skips the first 4K entry of that table. Found by `differential_tdp_*`.
#[test]
fn zap_memslot_after_eager_split_of_a_1g_leaf() {
    if vmmu_testing::skip_rerun("zap_memslot_after_eager_split_of_a_1g_leaf") {
        return;
    }
    case(
        |mmu| RunConfig {
            hugetlb: true,
            vcpus: 2,
            ..RunConfig::new(mmu)
        },
        &[
            Op::Create {
                slot: 3,
                at: 0,
                log: true,
                readonly: false,
            },
            Op::ZapSlot { slot: 3 },
        ],
    );
}

/// A write that fills a tiny dirty ring: the fault made the page writable and pushed it,
/// then the vCPU stopped with DirtyRingFull before completing the write. The page is
/// logged (the next harvest returns it) and may stay writable until the reset. Found by
/// the fuzz target (a model bug: it took DirtyRingFull for "nothing happened").
#[test]
fn a_write_that_fills_the_ring_is_logged() {
    if vmmu_testing::skip_rerun("a_write_that_fills_the_ring_is_logged") {
        return;
    }
    let write = |page| Op::Access {
        vcpu: 0,
        slot: 1,
        page,
        off: 0,
        kind: AccessKind::Write,
    };
    case(
        |mmu| RunConfig {
            dirty: DirtyMode::Ring(4),
            vcpus: 1,
            ..RunConfig::new(mmu)
        },
        &[
            Op::Flags {
                slot: 1,
                log: true,
                readonly: false,
            },
            write(0),
            write(1),
            write(2),
            write(3),
            Op::Harvest { vcpu: 0 },
            Op::Reset,
            write(2),
            write(3),
            Op::Harvest { vcpu: 0 },
            Op::Reset,
        ],
    );
}

/// The VMM's entry-by-entry harvest (`Vm::dirty_ring`, KVM's protocol) mixed with the
/// whole-ring harvest and resets, on each MMU: what the view takes is not reported again,
/// what it leaves the next harvest returns, its refused marks change nothing, and a
/// reset frees exactly what either harvested.
#[test]
fn the_ring_view_beside_harvest_and_reset() {
    if vmmu_testing::skip_rerun("the_ring_view_beside_harvest_and_reset") {
        return;
    }
    let write = |vcpu, page| Op::Access {
        vcpu,
        slot: 1,
        page,
        off: 0,
        kind: AccessKind::Write,
    };
    let cfg = |mmu| RunConfig {
        dirty: DirtyMode::Ring(16),
        vcpus: 2,
        ..RunConfig::new(mmu)
    };
    let ops = [
        Op::Flags {
            slot: 1,
            log: true,
            readonly: false,
        },
        Op::RingView { vcpu: 0, count: 3 },
        write(0, 0),
        write(0, 1),
        write(0, 2),
        write(1, 3),
        Op::RingView { vcpu: 0, count: 2 },
        Op::RingView { vcpu: 1, count: 0 },
        write(0, 4),
        Op::Reset,
        Op::Harvest { vcpu: 0 },
        Op::RingView { vcpu: 1, count: 5 },
        Op::Reset,
        write(0, 0),
        write(0, 2),
        Op::RingView { vcpu: 0, count: 7 },
        Op::RingView { vcpu: 4, count: 1 },
        Op::Harvest { vcpu: 0 },
        Op::Reset,
        Op::Reset,
    ];
    for &(name, mmu) in MMUS {
        let cfg = cfg(mmu);
        let ops = with_slots(&cfg, &ops);
        let stats = Interp::run(cfg, &ops).unwrap_or_else(|f| panic!("{name}: {f}"));
        assert_eq!(stats.ops.get("ring-view"), Some(&6), "{name}: {stats:?}");
        // Each view's closing mark is refused and checked to change nothing (and the
        // view of vCPU 4, which does not exist, is refused too).
        assert!(stats.rejected >= 6, "{name}: {stats:?}");
    }
}
