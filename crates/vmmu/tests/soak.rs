//! A short run of the concurrent soak (`vmmu_testing::soak`, also `vmmu soak`): vCPU
//! threads faulting and writing, a harvester, a notifier thread, a memslot thread, on each
//! MMU and in every dirty-log mode, with the audit and the model's checks at every
//! quiescent point and exact accounting when each VM goes. `VMMU_SOAK_SECONDS` sets the
//! length (default 4 seconds in all).

use vmmu_testing::soak::{run, SoakConfig};
use vmmu_testing::MMUS;

#[test]
fn short_soak_on_every_mmu() {
    if vmmu_testing::skip_rerun("short_soak_on_every_mmu") {
        return;
    }
    let secs: f64 = std::env::var("VMMU_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let mut cfg = SoakConfig::new(MMUS, secs);
    // Every MMU in every mode at least once: 16 VMs.
    cfg.phase = cfg
        .phase
        .min(std::time::Duration::from_secs_f64(secs / 16.0));
    cfg.round = std::time::Duration::from_millis(60);
    let r = run(&cfg);
    eprintln!(
        "soak: {:.1} s, {} VMs, {} rounds, {} operations, {} checks passed",
        r.seconds,
        r.vms.values().sum::<u64>(),
        r.rounds,
        r.total_ops(),
        r.total_checks()
    );
    if let Some(f) = &r.failure {
        panic!("soak failed: {f}\n{r:#?}");
    }
    assert!(r.vms.len() >= 4, "{:?}", r.vms);
    for kind in ["write", "read", "unmap", "zap all fast", "memslot move"] {
        assert!(
            r.ops.get(kind).copied().unwrap_or(0) > 0,
            "no {kind}: {:?}",
            r.ops
        );
    }
}

/// Many more vCPU threads than cores (64 and 256 on CI's 2): faults, harvests and
/// notifier operations oversubscribed, on the shadow MMU and the TDP MMU, with the audit,
/// the model's checks and exact accounting as in the short soak; the VMs count their lock
/// waits (`VmStats::lock_wait_ns`), which must be there.
#[test]
fn oversubscribed_soak_with_64_and_256_vcpus() {
    if vmmu_testing::skip_rerun("oversubscribed_soak_with_64_and_256_vcpus") {
        return;
    }
    for vcpus in [64, 256] {
        for mmu in [&MMUS[0..1], &MMUS[MMUS.len() - 1..]] {
            let mut cfg = SoakConfig::new(mmu, 1.0);
            cfg.vcpus = vcpus;
            cfg.phase = std::time::Duration::from_millis(500);
            cfg.round = std::time::Duration::from_millis(100);
            let r = run(&cfg);
            if let Some(f) = &r.failure {
                panic!("soak with {vcpus} vCPUs on {:?} failed: {f}", mmu[0].0);
            }
            assert!(r.rounds > 0 && r.ops.get("write").copied().unwrap_or(0) > 0);
            assert!(r.faults > 0 && r.lock_acquisitions > 0, "{vcpus}: {r:?}");
            eprintln!(
                "{vcpus} vCPUs on {}: {} faults, {} rounds, lock waited {:.1} ms over {} acquisitions",
                mmu[0].0,
                r.faults,
                r.rounds,
                r.lock_wait_ns as f64 / 1e6,
                r.lock_acquisitions
            );
        }
    }
}

/// Found by the soak: the TDP MMU's eager split (logging turned on, shared lock) lost a
/// race to a fault linking a table over the same huge leaf and then cleared the *fault's*
/// child pointer (`split_huge_pages` called `clear_child` although its own
/// `claim_child` had failed). The non-leaf SPTE was left without its child page: faults
/// under it could not descend (then `Error::FaultLoop`), and the next zap of the root hit
/// `unreachable!("a non-leaf SPTE without its child page")`. Two vCPU threads fault
/// 2 MiB and 4 KiB mappings over a THP slot while a third turns logging on and off; then
/// the audit, the model's check of every leaf and exact accounting at teardown.
#[test]
fn tdp_eager_split_racing_faults_keeps_child_links() {
    if vmmu_testing::skip_rerun("tdp_eager_split_racing_faults_keeps_child_links") {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vmmu::host::{Backing, SimHostMemory};
    use vmmu::table::HeapTableAllocator;
    use vmmu::types::{AccessKind, Gpa, PAGE_SIZE};
    use vmmu::{MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};

    const SIZE: u64 = 8 << 20;
    const GPA: u64 = 1 << 30;
    for &(name, mmu) in MMUS.iter().filter(|(_, m)| matches!(m, MmuKind::Tdp(_))) {
        let host = Arc::new(SimHostMemory::new());
        let hva = host.mmap(SIZE, Backing::Thp, true).unwrap().0;
        let alloc = Arc::new(HeapTableAllocator::new());
        let config = VmConfig {
            mmu,
            ..VmConfig::default()
        };
        let vm = Vm::with_allocator(config, host.clone(), alloc.clone()).unwrap();
        let region = |log: bool| MemoryRegion {
            slot: 0,
            flags: if log {
                MemslotFlags::LOG_DIRTY_PAGES
            } else {
                MemslotFlags::empty()
            },
            guest_phys_addr: GPA,
            memory_size: SIZE,
            userspace_addr: hva,
        };
        vm.set_user_memory_region(region(false)).unwrap();
        let mut vcpus: Vec<_> = (0..2).map(|_| vm.create_vcpu().unwrap()).collect();
        let done = AtomicBool::new(false);
        std::thread::scope(|sc| {
            for (t, vcpu) in vcpus.iter_mut().enumerate() {
                let (vm, done) = (&vm, &done);
                sc.spawn(move || {
                    let mut rng = vmmu_testing::Rng::new(t as u64 + 1);
                    while !done.load(Ordering::Relaxed) {
                        let gpa = GPA + rng.below(SIZE / PAGE_SIZE) * PAGE_SIZE;
                        let kind = if rng.chance(1, 2) {
                            AccessKind::Write
                        } else {
                            AccessKind::Read
                        };
                        match vm.access(vcpu, Gpa(gpa), kind) {
                            Ok(_) => {}
                            Err(e) => panic!("{name}: {kind:?} {gpa:#x}: {e:?}"),
                        }
                    }
                });
            }
            for i in 0..60 {
                vm.set_user_memory_region(region(i % 2 == 0)).unwrap();
                std::thread::yield_now();
            }
            done.store(true, Ordering::Relaxed);
        });
        vm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut model = vmmu_testing::Model::new(
            vmmu::memslot::MemslotLimits::default(),
            vmmu_testing::DirtyMode::Get,
            2,
        );
        let t = vmmu_testing::view::read_tables(&vm, &vcpus, &[]);
        let r = region(false);
        model.slots.insert(
            0,
            vmmu_testing::model::ModelSlot {
                id: 0,
                base: GPA / PAGE_SIZE,
                npages: SIZE / PAGE_SIZE,
                hva,
                flags: r.flags,
            },
        );
        vmmu_testing::view::check_entries(&t, &model, &host, &Default::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Every page still faults in (no stuck subtree), then everything is freed.
        for p in (0..SIZE / PAGE_SIZE).step_by(7) {
            vm.write(&mut vcpus[0], Gpa(GPA + p * PAGE_SIZE))
                .unwrap_or_else(|e| panic!("{name}: write page {p}: {e:?}"));
        }
        drop(vcpus);
        drop(vm);
        assert_eq!(vmmu_testing::view::settle_live(&alloc), 0, "{name}");
    }
}
