//! A guest access always completes, however much other threads zap (issue 13, finding
//! 10). Each lockless try of an access can lose its race: the fault maps the page, the
//! MMU lock goes, another thread zaps the page again before the retried walk reaches it.
//! KVM has no limit on that; vmmu used to give up after 64 such faults with
//! `Error::FaultLoop` (`vmmu soak` counted 181 in ~570M accesses). Now an access that
//! lost `LOCKLESS_RETRIES` races faults and walks under one exclusive guard, which no
//! zap can overlap, and `FaultLoop` only means an MMU bug.
//!
//! Two ways to lose every race, each for each direct MMU by gpa and for shadow paging by
//! gva, each access checked against the page it must reach:
//! - deterministically: a lost-race hook (`Vm::set_lost_race_hook`, internals) zaps the
//!   pages after every try whose fault mapped one, so no lockless try can ever complete;
//!   every access must still complete, each through the exclusive-lock path (counted
//!   exactly). With the old bound this is `FaultLoop` on the first access.
//! - with real threads: a zapper thread zaps the pages in a tight loop (`zap_gfn_range`,
//!   and now and then the fast zap, which invalidates the root the vCPU is on) while a
//!   vCPU accesses them. How many accesses took the locked path depends on the
//!   scheduling, so it is printed, not asserted.

mod paging_rig;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gfn, Gpa, Gva, Hva, PAGE_SIZE};
use vmmu::{Exit, MemoryRegion, MemslotFlags, PagingConfig, Vm, VmConfig};
use vmmu_testing::MMUS;

use paging_rig::{Guest, Rig, DIRECT_MAP};

/// Accesses per case (two pages, reads and writes alternating).
const ACCESSES: u64 = 40_000;
const GPA: u64 = 1 << 30;
const SIZE: u64 = 2 << 20;

/// Run `access` `ACCESSES` times, alternating reads and writes over two pages, while a
/// zapper thread zaps the first page with `zap_gfn_range` and fast-zaps every VM
/// root now and then; `access` returns what it reached for page `i` or the exit.
fn under_constant_zapping<H, A, T>(
    name: &str,
    vm: &Vm<H, A>,
    gfns: [Gfn; 2],
    mut access: impl FnMut(usize, AccessKind) -> Result<T, Exit>,
    expected: impl Fn(usize) -> T,
) where
    H: vmmu::host::HostMemory + Sync,
    A: vmmu::table::TableAllocator + Send + Sync + 'static,
    T: PartialEq + std::fmt::Debug,
{
    let done = AtomicBool::new(false);
    let started = std::sync::Barrier::new(2);
    let zaps = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut n = 0u64;
            started.wait();
            while !done.load(Ordering::Relaxed) {
                if n % 64 == 63 {
                    vm.zap_all_fast().unwrap();
                } else {
                    vm.zap_gfn_range(gfns[0], Gfn(gfns[0].0 + 1)).unwrap();
                }
                n += 1;
            }
            zaps.store(n, Ordering::Relaxed);
        });
        started.wait();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for n in 0..ACCESSES {
                let i = (n % 3 == 2) as usize;
                let kind = if n % 2 == 0 {
                    AccessKind::Write
                } else {
                    AccessKind::Read
                };
                match access(i, kind) {
                    Ok(got) => assert_eq!(got, expected(i), "{name}: access {n} of page {i}"),
                    Err(e) => panic!("{name}: access {n} ({kind:?} of page {i}) gave {e:?}"),
                }
            }
        }));
        done.store(true, Ordering::Relaxed);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
    let locked = vm.stats().locked_accesses;
    eprintln!(
        "{name}: {ACCESSES} accesses, {} zaps, {locked} completed under the exclusive lock",
        zaps.load(Ordering::Relaxed)
    );
    vm.audit()
        .unwrap_or_else(|e| panic!("{name}: audit: {e:?}"));
}

/// Every direct MMU, by gpa: no access fails, each reaches its page's host frame.
#[test]
fn every_race_lost_still_completes_gpa_threads() {
    if vmmu_testing::skip_rerun("every_race_lost_still_completes_gpa_threads") {
        return;
    }
    for &(name, mmu) in MMUS {
        let host = Arc::new(SimHostMemory::new());
        let hva = host.mmap(SIZE, Backing::Page4K, true).unwrap().0;
        let vm = Vm::new(
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
            host.clone(),
        );
        vm.set_user_memory_region(MemoryRegion {
            slot: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: GPA,
            memory_size: SIZE,
            userspace_addr: hva,
        })
        .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        let page = |i: usize| GPA + i as u64 * 17 * PAGE_SIZE;
        let hpa = |i: usize| {
            let hp = vmmu::host::HostMemory::translate(&*host, Hva(hva + page(i) - GPA))
                .expect("mapped");
            hp.pfn.0 << 12
        };
        let gfns = [Gpa(page(0)).gfn(), Gpa(page(1)).gfn()];
        under_constant_zapping(
            name,
            &vm,
            gfns,
            |i, kind| vm.access(&mut vcpu, Gpa(page(i)), kind).map(|h| h.0),
            hpa,
        );
    }
}

/// Shadow paging, by gva through the guest's own tables: no access fails, each reaches
/// its page's gpa.
#[test]
fn every_race_lost_still_completes_gva_threads() {
    if vmmu_testing::skip_rerun("every_race_lost_still_completes_gva_threads") {
        return;
    }
    let mut rig = Rig::start(Guest::new(), PagingConfig::default(), Backing::Page4K);
    // Data pages of the direct map (beyond the page-table pages the rig allocated).
    let gpa = |i: usize| (8 << 20) + i as u64 * 17 * PAGE_SIZE;
    let gfns = [Gpa(gpa(0)).gfn(), Gpa(gpa(1)).gfn()];
    let vm = Arc::clone(&rig.vm);
    let vcpu = &mut rig.vcpu;
    under_constant_zapping(
        "shadow-paging",
        &*vm,
        gfns,
        |i, kind| {
            vm.gva_access(vcpu, Gva(DIRECT_MAP + gpa(i)), kind)
                .map(|g| g.0)
        },
        gpa,
    );
    drop(vm);
    let mut fails = paging_rig::Failures::default();
    rig.teardown(&mut fails);
    assert!(fails.list.is_empty(), "teardown: {:?}", fails.list);
}

/// Accesses per deterministic case.
const FORCED: u64 = 200;

/// Install a hook that zaps `[start, end)` after every lost race, then make `FORCED`
/// accesses alternating between two pages (so each finds its page zapped by the other's
/// hook calls): each must complete, through the exclusive-lock path.
fn every_try_lost<H, A, T>(
    name: &str,
    vm: &mut Vm<H, A>,
    zap: (Gfn, Gfn),
    mut access: impl FnMut(&Vm<H, A>, usize, AccessKind) -> Result<T, Exit>,
    expected: impl Fn(usize) -> T,
) where
    H: vmmu::host::HostMemory,
    A: vmmu::table::TableAllocator + 'static,
    T: PartialEq + std::fmt::Debug,
{
    let (start, end) = zap;
    vm.set_lost_race_hook(Box::new(move |vm| vm.zap_gfn_range(start, end).unwrap()));
    let before = vm.stats().locked_accesses;
    for n in 0..FORCED {
        let i = (n % 2) as usize;
        let kind = if n / 2 % 2 == 0 {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        match access(vm, i, kind) {
            Ok(got) => assert_eq!(got, expected(i), "{name}: access {n} of page {i}"),
            Err(e) => panic!("{name}: access {n} ({kind:?} of page {i}) gave {e:?}"),
        }
    }
    assert_eq!(
        vm.stats().locked_accesses - before,
        FORCED,
        "{name}: every access lost every lockless race, so each completed under the lock"
    );
    vm.audit()
        .unwrap_or_else(|e| panic!("{name}: audit: {e:?}"));
}

/// Every direct MMU, by gpa, every lockless try lost.
#[test]
fn every_race_lost_still_completes_gpa_forced() {
    if vmmu_testing::skip_rerun("every_race_lost_still_completes_gpa_forced") {
        return;
    }
    for &(name, mmu) in MMUS {
        let host = Arc::new(SimHostMemory::new());
        let hva = host.mmap(SIZE, Backing::Page4K, true).unwrap().0;
        let mut vm = Vm::new(
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
            host.clone(),
        );
        vm.set_user_memory_region(MemoryRegion {
            slot: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: GPA,
            memory_size: SIZE,
            userspace_addr: hva,
        })
        .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        let page = |i: usize| GPA + i as u64 * 17 * PAGE_SIZE;
        let hpa = |i: usize| {
            let hp = vmmu::host::HostMemory::translate(&*host, Hva(hva + page(i) - GPA))
                .expect("mapped");
            hp.pfn.0 << 12
        };
        let zap = (Gpa(page(0)).gfn(), Gfn(Gpa(page(1)).gfn().0 + 1));
        every_try_lost(
            name,
            &mut vm,
            zap,
            |vm, i, kind| vm.access(&mut vcpu, Gpa(page(i)), kind).map(|h| h.0),
            hpa,
        );
    }
}

/// Shadow paging, by gva, every lockless try lost.
#[test]
fn every_race_lost_still_completes_gva_forced() {
    if vmmu_testing::skip_rerun("every_race_lost_still_completes_gva_forced") {
        return;
    }
    let mut rig = Rig::start(Guest::new(), PagingConfig::default(), Backing::Page4K);
    let gpa = |i: usize| (8 << 20) + i as u64 * 17 * PAGE_SIZE;
    let zap = (Gpa(gpa(0)).gfn(), Gfn(Gpa(gpa(1)).gfn().0 + 1));
    let vcpu = &mut rig.vcpu;
    let vm = Arc::get_mut(&mut rig.vm).expect("the rig holds the only reference");
    every_try_lost(
        "shadow-paging",
        vm,
        zap,
        |vm, i, kind| {
            vm.gva_access(vcpu, Gva(DIRECT_MAP + gpa(i)), kind)
                .map(|g| g.0)
        },
        gpa,
    );
    let mut fails = paging_rig::Failures::default();
    rig.teardown(&mut fails);
    assert!(fails.list.is_empty(), "teardown: {:?}", fails.list);
}
