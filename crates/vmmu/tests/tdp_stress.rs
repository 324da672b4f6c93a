//! Stress tests of the TDP MMU (issue 4): several threads, each with its own vCPU,
//! fault and write at random over three slots while one thread zaps ranges, zaps
//! everything (in place and fast, with new roots) and starts and stops dirty logging on a
//! THP slot (eager split under the shared lock, racing the faults; recovery of huge pages),
//! and another harvests the dirty log of a logging slot (GET, or GET + CLEAR in
//! manual-protect mode). Every access must reach the host's page.
//!
//! The run is cut into rounds bounded by operation counts (never by time); between rounds
//! every thread has stopped, and the audit, the two views of the tables and the host
//! check the result. At the end: no write to the logging slot was lost (every page written
//! shows up in some harvest), every vCPU's translation of every page is the host's, and
//! the allocator holds exactly the tables the MMU reaches.
//!
//! One test per iteration mode, each with both harvest styles.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use common::*;
use vmmu::host::{Backing, HostMemory};
use vmmu::types::{AccessKind, Gfn, Gpa, Hva, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{DirtyLogConfig, MemslotFlags, MmuKind, TdpIteration, VmConfig};

const VCPU_THREADS: usize = 3;
const ROUNDS: u64 = 12;
const ACCESSES_PER_ROUND: u64 = 4_000;
const ZAPS_PER_ROUND: u64 = 60;
const HARVESTS_PER_ROUND: u64 = 40;
/// Pages at the start of each slot that half of the accesses go to, so faults race each
/// other (and the zaps) on the same tables.
const HOT_PAGES: u64 = 96;

/// Wait until the vCPU threads have done `due` accesses in all (or stopped).
fn pace(progress: &AtomicU64, due: u64, failed: &AtomicBool) {
    let total = VCPU_THREADS as u64 * ACCESSES_PER_ROUND;
    while progress.load(Ordering::Relaxed) < due.min(total) && !failed.load(Ordering::Relaxed) {
        std::thread::yield_now();
    }
}

/// The slots: 0 logs dirty pages all along (4K host pages), 1 is THP whose logging the
/// zapper turns on and off, 2 is THP starting 1 MiB into a huge page (4K edges).
fn slots(host: &vmmu::host::SimHostMemory) -> [SlotSpec; 3] {
    let h0 = mmap(host, 4 * M1, Backing::Page4K);
    let h1 = mmap(host, 8 * M1, Backing::Thp);
    let h2 = mmap(host, 8 * M1, Backing::Thp);
    [
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 4 * M1,
            hva: h0,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 8 * M1,
            hva: h1,
            flags: MemslotFlags::empty(),
        },
        SlotSpec {
            id: 2,
            gpa: 3 * G1 + M1,
            size: 6 * M1,
            hva: h2 + M1,
            flags: MemslotFlags::empty(),
        },
    ]
}

/// The host frame of every page of every slot, from the host alone.
fn host_pfns(host: &vmmu::host::SimHostMemory, specs: &[SlotSpec]) -> Vec<Vec<u64>> {
    specs
        .iter()
        .map(|s| {
            (0..s.pages())
                .map(|i| host.translate(Hva(s.hva + i * PAGE_SIZE)).unwrap().pfn.0)
                .collect()
        })
        .collect()
}

/// Harvest slot 0's dirty log once (GET; with manual protect, GET then CLEAR of what it
/// reported) and add the pages to `seen`.
fn harvest(vm: &TestVm, manual: bool, npages: u64, seen: &Mutex<BTreeSet<u64>>) {
    let mut bits = vec![0u64; npages.div_ceil(64) as usize];
    vm.get_dirty_log(0, &mut bits).unwrap();
    if manual {
        vm.clear_dirty_log(0, 0, npages, &bits).unwrap();
    }
    let mut seen = seen.lock().unwrap();
    for (k, &w) in bits.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            seen.insert(64 * k as u64 + w.trailing_zeros() as u64);
            w &= w - 1;
        }
    }
}

fn run(mode: TdpIteration, manual: bool) {
    let (host, vm) = new_vm(VmConfig {
        mmu: MmuKind::Tdp(mode),
        dirty_log: DirtyLogConfig {
            manual_protect: manual,
            ..DirtyLogConfig::default()
        },
        ..VmConfig::default()
    });
    let specs = slots(&host);
    for s in &specs {
        add_slot(&vm, *s);
    }
    let pfns = host_pfns(&host, &specs);
    let mut vcpus: Vec<Vcpu> = (0..VCPU_THREADS)
        .map(|_| vm.create_vcpu().unwrap())
        .collect();
    // Pages of slot 0 written (by any vCPU) and pages reported by a harvest.
    let written: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
    let seen: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
    let failed = AtomicBool::new(false);
    let mut slot1_logging = false;
    let what = format!("{mode:?}, {}", if manual { "GET + CLEAR" } else { "GET" });

    for round in 0..ROUNDS {
        // Accesses done this round: the zapper and the harvester spread their work over it.
        let progress = AtomicU64::new(0);
        let slot1_flags = std::thread::scope(|sc| {
            for (t, vcpu) in vcpus.iter_mut().enumerate() {
                let (vm, specs, pfns, written, failed, what, progress) =
                    (&vm, &specs, &pfns, &written, &failed, &what, &progress);
                sc.spawn(move || {
                    let mut rng = Rng::new(0x51 + 977 * round + t as u64);
                    let mut mine = BTreeSet::new();
                    for n in 0..ACCESSES_PER_ROUND {
                        if failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let k = rng.below(3) as usize;
                        let s = &specs[k];
                        progress.fetch_add(1, Ordering::Relaxed);
                        let page = if n % 2 == 0 {
                            rng.below(HOT_PAGES)
                        } else {
                            rng.below(s.pages())
                        };
                        let off = rng.below(PAGE_SIZE) & !7;
                        let kind = if n % 3 == 0 {
                            AccessKind::Read
                        } else {
                            AccessKind::Write
                        };
                        let gpa = s.page_gpa(page) + off;
                        match vm.access(vcpu, Gpa(gpa), kind) {
                            Ok(hpa) if hpa.0 == pfns[k][page as usize] * PAGE_SIZE + off => {}
                            other => {
                                failed.store(true, Ordering::Relaxed);
                                panic!(
                                    "{what}: round {round}: vCPU {t}: {kind:?} of gpa {gpa:#x} gave {other:?}"
                                );
                            }
                        }
                        if k == 0 && kind == AccessKind::Write {
                            mine.insert(page);
                        }
                    }
                    written.lock().unwrap().extend(mine);
                });
            }
            let total = VCPU_THREADS as u64 * ACCESSES_PER_ROUND;
            let zapper = {
                let (vm, specs, failed, progress) = (&vm, &specs, &failed, &progress);
                let mut logging = slot1_logging;
                sc.spawn(move || {
                    let mut rng = Rng::new(0x2a9 + round);
                    for n in 0..ZAPS_PER_ROUND {
                        pace(progress, n * total / ZAPS_PER_ROUND, failed);
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        match n % 10 {
                            4 => vm.zap_all().unwrap(),
                            9 => vm.zap_all_fast().unwrap(),
                            2 | 7 => {
                                logging = !logging;
                                let flags = if logging {
                                    MemslotFlags::LOG_DIRTY_PAGES
                                } else {
                                    MemslotFlags::empty()
                                };
                                vm.set_user_memory_region(SlotSpec { flags, ..specs[1] }.region())
                                    .unwrap();
                            }
                            _ => {
                                let s = &specs[rng.below(3) as usize];
                                let start = s.base_gfn().0
                                    + if n % 3 == 0 {
                                        rng.below(s.pages())
                                    } else {
                                        rng.below(HOT_PAGES)
                                    };
                                let len = 1 + rng.below(if n % 2 == 0 { 16 } else { 2048 });
                                vm.zap_gfn_range(Gfn(start), Gfn(start + len)).unwrap();
                            }
                        }
                        std::thread::yield_now();
                    }
                    logging
                })
            };
            {
                let (vm, seen, failed, progress, specs) = (&vm, &seen, &failed, &progress, &specs);
                let npages = specs[0].pages();
                sc.spawn(move || {
                    for n in 0..HARVESTS_PER_ROUND {
                        pace(progress, n * total / HARVESTS_PER_ROUND, failed);
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        harvest(vm, manual, npages, seen);
                        // Lockless aging (no MMU lock on the TDP MMU) racing the faults,
                        // the zaps and the memslot updates.
                        let s = &specs[n as usize % 3];
                        let (lo, hi) = (vmmu::types::Hva(s.hva), vmmu::types::Hva(s.hva + s.size));
                        vm.age_hva_range(lo, hi).unwrap();
                        vm.test_age_hva_range(lo, hi).unwrap();
                        std::thread::yield_now();
                    }
                });
            }
            zapper.join().unwrap()
        });
        slot1_logging = slot1_flags;
        // Quiescent: everything stopped.
        if let Err(e) = vm.audit() {
            panic!("{what}: after round {round}: {e}");
        }
        check_leaves_against_host(&vm, &host);
    }

    // No write to the logging slot was lost: each shows up in some harvest.
    harvest(&vm, manual, specs[0].pages(), &seen);
    let written = written.into_inner().unwrap();
    let seen = seen.into_inner().unwrap();
    let lost: Vec<_> = written.difference(&seen).collect();
    assert!(
        lost.is_empty(),
        "{what}: pages written and never harvested: {lost:?}"
    );
    assert!(
        written.len() > 100,
        "{what}: only {} pages written",
        written.len()
    );
    // Every vCPU translates every page as the host does.
    let mut final_specs = specs;
    final_specs[1].flags = if slot1_logging {
        MemslotFlags::LOG_DIRTY_PAGES
    } else {
        MemslotFlags::empty()
    };
    for v in vcpus.iter_mut() {
        for s in &final_specs {
            for i in 0..s.pages() {
                access_ok(&vm, v, &host, s, s.page_gpa(i) + 0x28, kind_for(i));
            }
        }
    }
    audit(&vm);
    check_leaves_against_host(&vm, &host);
    let exits: u64 = vcpus.iter().map(|v| v.exits).sum();
    assert!(
        exits > 1000,
        "{what}: only {exits} exits: the zaps did not bite"
    );
    settle_tables(&vm);
}

#[test]
fn stress_scan_all() {
    run(TdpIteration::ScanAll, false);
    run(TdpIteration::ScanAll, true);
}

#[test]
fn stress_skip_non_present() {
    run(TdpIteration::SkipNonPresent, false);
    run(TdpIteration::SkipNonPresent, true);
}

#[test]
fn stress_used_entries() {
    run(TdpIteration::UsedEntries, false);
    run(TdpIteration::UsedEntries, true);
}
