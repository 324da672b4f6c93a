//! Concurrency smoke test: two vCPU threads access random pages of a shared 16 MiB slot
//! while a third thread zaps ranges (and toggles dirty logging). Every access must return
//! the host's translation; afterwards the audit passes and every translation is correct.
//! The vCPU threads run the run loop on the CPU model (`Vm::model_run`) and stay in guest
//! mode across their accesses, so every zap's flush kicks them. Bounded by iteration counts, not time. Runs against the MMU under test (see
//! `common::test_mmu`); `tdp_stress.rs` has the TDP MMU's own stress tests.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;

use common::*;
use vmmu::host::{Backing, HostMemory};
use vmmu::types::{AccessKind, Gfn, Gpa, Hva, PAGE_SIZE};
use vmmu::{MemslotFlags, VmConfig};

const ACCESSES_PER_VCPU: u64 = 20_000;
const ZAPS: u64 = 1_500;

fn run(backing: Backing, toggle_logging: bool) {
    let (host, mut vm) = new_vm(VmConfig::default());
    // The vCPU threads stay in guest mode for the whole run (the run loop on the CPU
    // model): every zap's flush kicks them.
    let kick = std::sync::Arc::new(vmmu::ModelKick::new());
    vm.set_kick(kick.clone());
    let h = mmap(&host, 16 * M1, backing);
    let spec = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 16 * M1,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    );
    // The expected frame of every page, from the host alone.
    let pfns: Vec<u64> = (0..spec.pages())
        .map(|i| host.translate(Hva(h + i * PAGE_SIZE)).unwrap().pfn.0)
        .collect();
    let mut vcpus: Vec<_> = (0..2)
        .map(|_| {
            let v = vm.create_run_loop_vcpu().unwrap();
            kick.register(&v);
            v
        })
        .collect();
    let failed = AtomicBool::new(false);
    // Progress of each thread (accesses or zaps done): each side waits for the other to
    // keep up, so the zaps spread over the whole run instead of finishing before (or
    // after) the vCPUs. Neither can deadlock: each waits for the other to reach a point
    // behind its own, with slack.
    let progress: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
    let zapped = AtomicU64::new(0);
    let start = Barrier::new(3);

    std::thread::scope(|sc| {
        for (t, vcpu) in vcpus.iter_mut().enumerate() {
            let (vm, pfns, failed, progress, start, zapped) =
                (&vm, &pfns, &failed, &progress, &start, &zapped);
            sc.spawn(move || {
                let mut rng = Rng::new(0x1234 + t as u64);
                let mut run = vm.model_run(vcpu, u64::MAX).unwrap();
                start.wait();
                for n in 0..ACCESSES_PER_VCPU {
                    progress[t].store(n, Ordering::Relaxed);
                    let due = (n * ZAPS / ACCESSES_PER_VCPU).saturating_sub(2);
                    if zapped.load(Ordering::Relaxed) < due {
                        // Out of guest mode to wait for the zapper (whose flush would
                        // otherwise wait for this vCPU).
                        run.exit();
                    }
                    while zapped.load(Ordering::Relaxed) < due && !failed.load(Ordering::Relaxed) {
                        std::thread::yield_now();
                    }
                    let page = rng.below(spec.pages());
                    let off = rng.below(PAGE_SIZE) & !7;
                    let gpa = spec.gpa + page * PAGE_SIZE + off;
                    let kind = if n % 4 == 3 {
                        AccessKind::Read
                    } else {
                        AccessKind::Write
                    };
                    match run.access(Gpa(gpa), kind) {
                        Ok(hpa) if hpa.0 == pfns[page as usize] * PAGE_SIZE + off => {}
                        other => {
                            run.exit();
                            failed.store(true, Ordering::Relaxed);
                            panic!("vCPU {t}: {kind:?} gpa {gpa:#x} gave {other:?}");
                        }
                    }
                }
                drop(run);
                progress[t].store(ACCESSES_PER_VCPU, Ordering::Relaxed);
            });
        }
        let (vm, failed, progress, start, zapped) = (&vm, &failed, &progress, &start, &zapped);
        sc.spawn(move || {
            let mut rng = Rng::new(0xdead);
            let base = spec.base_gfn().0;
            let mut logging = false;
            start.wait();
            for n in 0..ZAPS {
                // Wait (bounded: the vCPUs always make progress) until both vCPUs are
                // n/ZAPS of the way through.
                let due = n * ACCESSES_PER_VCPU / ZAPS;
                while progress.iter().any(|p| p.load(Ordering::Relaxed) < due) {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::yield_now();
                }
                if n % 500 == 249 {
                    vm.zap_all().unwrap();
                } else if n % 500 == 499 {
                    // The TDP MMU's fast zap: a new root, vCPUs reload mid-run.
                    vm.zap_all_fast().unwrap();
                } else if toggle_logging && n % 100 == 50 {
                    logging = !logging;
                    let flags = if logging {
                        MemslotFlags::LOG_DIRTY_PAGES
                    } else {
                        MemslotFlags::empty()
                    };
                    vm.set_user_memory_region(SlotSpec { flags, ..spec }.region())
                        .unwrap();
                } else {
                    let start = base + rng.below(spec.pages());
                    let len = 1 + rng.below(if n % 2 == 0 { 8 } else { 1024 });
                    vm.zap_gfn_range(Gfn(start), Gfn(start + len)).unwrap();
                }
                zapped.store(n + 1, Ordering::Relaxed);
            }
        });
    });

    let rep = audit(&vm);
    check_leaves_against_host(&vm, &host);
    let st = vm.stats();
    // The zaps overlapped the accesses: the vCPUs kept faulting pages back in.
    assert!(st.remote_tlb_flushes > ZAPS / 10, "{st:?}");
    // (Which vCPU re-faults a zapped page first is a race; count them together.)
    let exits: u64 = vcpus.iter().map(|v| v.exits).sum();
    assert!(exits > 200, "vCPU exits: {exits}");
    assert!(vcpus.iter().all(|v| v.accesses == ACCESSES_PER_VCPU));
    // Every page translates, from a fresh vCPU and from the two that ran.
    let mut fresh = vm.create_vcpu().unwrap();
    let final_spec = with_slots(&vm, |s| {
        let m = s.by_id(0).unwrap();
        SlotSpec {
            flags: m.flags,
            ..spec
        }
    });
    for i in 0..spec.pages() {
        for v in vcpus.iter_mut().chain(std::iter::once(&mut fresh)) {
            access_ok(
                &vm,
                v,
                &host,
                &final_spec,
                spec.page_gpa(i) + 0x18,
                kind_for(i),
            );
        }
    }
    let rep2 = audit(&vm);
    assert!(rep2.leaves >= rep.leaves);
    check_leaves_against_host(&vm, &host);
    vm.zap_all().unwrap();
    assert_eq!(table_count(&vm), 1, "zap_all left tables under the root");
    audit(&vm);
    // Every vCPU runs again; then the allocator holds exactly the tables the MMU reaches
    // (the TDP MMU frees through the epoch collector).
    for v in vcpus.iter_mut().chain(std::iter::once(&mut fresh)) {
        access_ok(&vm, v, &host, &final_spec, spec.gpa, AccessKind::Read);
    }
    audit(&vm);
    assert_eq!(settle_tables(&vm), table_count(&vm) as u64);
}

#[test]
fn vcpus_and_zapper_thp() {
    run(Backing::Thp, false);
}

#[test]
fn vcpus_and_zapper_4k() {
    run(Backing::Page4K, false);
}

#[test]
fn vcpus_zapper_and_dirty_logging_toggles() {
    run(Backing::Thp, true);
}

/// vCPUs created while another thread zaps (KVM creates vCPUs while the VM runs). Both
/// take the VM's two locks (the vCPU list and the MMU lock): they must not wait on each
/// other. Rounds of a creator against a zapper that maps and zaps in a loop; a watchdog
/// turns a deadlock into a failure instead of a hang (the stuck threads are left behind).
#[test]
fn creating_vcpus_while_zapping_does_not_deadlock() {
    const ROUNDS: usize = 40;
    const VCPUS: usize = 64;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for round in 0..ROUNDS {
            let (host, vm) = new_vm(VmConfig {
                max_vcpus: VCPUS as u32 + 1,
                ..VmConfig::default()
            });
            let vm = std::sync::Arc::new(vm);
            let h = mmap(&host, 2 * M1, Backing::Page4K);
            let spec = add_slot(
                &vm,
                SlotSpec {
                    id: 0,
                    gpa: G1,
                    size: 2 * M1,
                    hva: h,
                    flags: MemslotFlags::empty(),
                },
            );
            let done = std::sync::Arc::new(AtomicBool::new(false));
            let zaps = std::sync::Arc::new(AtomicU64::new(0));
            let zapper = {
                let (vm, done, zaps) = (vm.clone(), done.clone(), zaps.clone());
                std::thread::spawn(move || {
                    let mut v = vm.create_vcpu().unwrap();
                    let mut n = 0u64;
                    while !done.load(Ordering::Relaxed) || n < 4 {
                        zaps.store(n, Ordering::Relaxed);
                        vm.write(&mut v, Gpa(spec.page_gpa(n % 8))).unwrap();
                        match n % 3 {
                            0 => vm.zap_all().unwrap(),
                            1 => vm.zap_all_fast().unwrap(),
                            _ => vm.zap_gfn_range(spec.base_gfn(), spec.end_gfn()).unwrap(),
                        }
                        n += 1;
                    }
                })
            };
            // Each creation overlaps a different zap (the zapper runs before the first).
            for _ in 0..VCPUS {
                let z = zaps.load(Ordering::Relaxed);
                vm.create_vcpu().unwrap();
                while zaps.load(Ordering::Relaxed) == z {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::Relaxed);
            zapper.join().unwrap();
            tx.send(round).unwrap();
        }
    });
    for round in 0..ROUNDS {
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(r) => assert_eq!(r, round),
            Err(e) => panic!(
                "round {round}: no progress for 20 s ({e}): create_vcpu and a zap deadlocked \
                 (create_vcpu holds the vCPU list and waits for the MMU lock; the zap holds the \
                 MMU lock and waits for the vCPU list to flush)"
            ),
        }
    }
}
