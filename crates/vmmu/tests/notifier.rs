//! MMU-notifier operations (KVM's `kvm_mmu_notifier_*`): unmap, the invalidate_range
//! start/end window, age / test_age and change_pte. Every vCPU caches translations first,
//! and after each operation each vCPU must reach the host's *current* page: a TLB entry
//! surviving the operation shows up as a stale host-physical address, or as a write that
//! did not exit to the MMU. Pages outside the range keep their translations (no fault).
//!
//! The expected translation always comes from the host (`common::expected_hpa`), never
//! from the MMU. Each test runs under both reverse-map drop algorithms and both iteration
//! algorithms, and the audit runs after every step.

mod common;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use common::*;
use support::*;
use vmmu::host::{Backing, HostMemory, SimHostMemory};
use vmmu::spte::SpteFormat;
use vmmu::types::{AccessKind, Gfn, Gpa, Hpa, Hva, Level, Pfn, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{Algorithms, DirtyLogConfig, Error, Exit, MemslotFlags, VmConfig};

/// The SPTE format of every MMU these tests run (the shadow MMU direct, the TDP MMU).
const EPT: SpteFormat = SpteFormat::EPT;

struct Env {
    host: std::sync::Arc<SimHostMemory>,
    vm: TestVm,
    /// 512 pages of 4K host pages.
    s4k: SlotSpec,
    /// 4 MiB of THP, 2M-aligned: two 2M leaves.
    thp: SlotSpec,
}

fn env(algos: Algorithms) -> Env {
    env_with(algos, false)
}

/// [`env`] with the compatibility option `change_pte` (Linux's `.change_pte`, removed in
/// 6.10) on: every test that calls `change_pte` opts in.
fn env_compat(algos: Algorithms) -> Env {
    env_with(algos, true)
}

fn env_with(algos: Algorithms, change_pte: bool) -> Env {
    let (host, vm) = new_vm(VmConfig {
        change_pte,
        ..config(DirtyLogConfig::default(), algos)
    });
    let h0 = mmap(&host, 2 * M1, Backing::Page4K);
    let h1 = mmap(&host, 4 * M1, Backing::Thp);
    let s4k = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 2 * M1,
            hva: h0,
            flags: MemslotFlags::empty(),
        },
    );
    let thp = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 4 * M1,
            hva: h1,
            flags: MemslotFlags::empty(),
        },
    );
    Env { host, vm, s4k, thp }
}

fn hva_of(s: &SlotSpec, page: u64) -> Hva {
    Hva(s.hva + page * PAGE_SIZE)
}

fn gfn_of(s: &SlotSpec, page: u64) -> Gfn {
    Gfn(s.base_gfn().0 + page)
}

/// The host frame behind page `page` of `s`, now.
fn host_pfn(host: &SimHostMemory, s: &SlotSpec, page: u64) -> u64 {
    host.translate(hva_of(s, page)).unwrap().pfn.0
}

/// Access page `page` of `s` (at an offset inside it) and check the host's translation;
/// returns whether the vCPU exited to the MMU.
#[track_caller]
fn touch(
    vm: &TestVm,
    v: &mut Vcpu,
    host: &SimHostMemory,
    s: &SlotSpec,
    page: u64,
    kind: AccessKind,
) -> bool {
    let before = v.exits;
    access_ok(vm, v, host, s, s.page_gpa(page) + 0x88, kind);
    v.exits > before
}

/// Every vCPU reads and writes every page of both slots: each TLB holds writable
/// translations of everything.
fn warm(e: &Env, vcpus: &mut [Vcpu]) {
    for v in vcpus.iter_mut() {
        for s in [&e.s4k, &e.thp] {
            for p in 0..s.pages() {
                let kind = if p % 2 == 0 {
                    AccessKind::Write
                } else {
                    AccessKind::Read
                };
                touch(&e.vm, v, &e.host, s, p, kind);
            }
        }
    }
    audit(&e.vm);
}

/// Reading every page of `pages` causes no exit on any vCPU (the translation survived).
#[track_caller]
fn no_fault(e: &Env, vcpus: &mut [Vcpu], s: &SlotSpec, pages: impl Iterator<Item = u64> + Clone) {
    for v in vcpus.iter_mut() {
        for p in pages.clone() {
            assert!(
                !touch(&e.vm, v, &e.host, s, p, AccessKind::Read),
                "vCPU {}: page {p} of slot {} faulted though outside the range",
                v.id,
                s.id
            );
        }
    }
}

/// unmap_hva_range after the host moved pages: every vCPU faults on the range (each vCPU
/// is the first to touch its own page of the range, so each must exit) and reaches the new
/// frame; pages outside keep their translations without a fault. A range inside a 2M leaf
/// zaps the leaf whole; its other pages come back at 4K (the host split the huge page).
#[test]
fn unmap_refaults_every_vcpu_onto_the_new_page() {
    for algos in rmap_algorithms() {
        let e = env(algos);
        let mut vcpus: Vec<_> = (0..3).map(|_| e.vm.create_vcpu().unwrap()).collect();
        warm(&e, &mut vcpus);
        let (s, thp) = (e.s4k, e.thp);
        let old: Vec<u64> = (100..110).map(|p| host_pfn(&e.host, &s, p)).collect();
        let new: Vec<u64> = (100..110)
            .map(|p| e.host.remap_page(hva_of(&s, p)).unwrap().0)
            .collect();
        let flushes: Vec<u64> = vcpus.iter().map(|v| v.tlb().counters().2).collect();

        e.vm.unmap_hva_range(hva_of(&s, 100), hva_of(&s, 110))
            .unwrap();
        audit(&e.vm);
        // The THP page moves only now: until its unmap below, its 2M leaf is stale, which
        // the audit (it compares every leaf with the host) would report.
        let thp_old = host_pfn(&e.host, &thp, 700);
        let thp_new = e.host.remap_page(hva_of(&thp, 700)).unwrap().0;
        assert_ne!(thp_old, thp_new);
        // An unaligned range: it covers the page of its first byte through its last.
        e.vm.unmap_hva_range(
            Hva(hva_of(&thp, 700).0 + 0x10),
            Hva(hva_of(&thp, 700).0 + 0x20),
        )
        .unwrap();
        audit(&e.vm);
        for p in 100..110 {
            assert!(
                leaf_of(&e.vm, gfn_of(&s, p)).is_none(),
                "{algos:?}: page {p} mapped"
            );
        }
        assert!(leaf_of(&e.vm, gfn_of(&s, 99)).is_some());
        assert!(leaf_of(&e.vm, gfn_of(&s, 110)).is_some());
        assert!(
            leaf_of(&e.vm, gfn_of(&thp, 700)).is_none(),
            "2M leaf zapped whole"
        );
        assert_eq!(
            leaf_of(&e.vm, gfn_of(&thp, 3)).map(|l| l.1),
            Some(Level::L2M),
            "the other 2M leaf stays"
        );

        for (i, v) in vcpus.iter_mut().enumerate() {
            let p = 100 + i as u64;
            assert!(
                touch(&e.vm, v, &e.host, &s, p, AccessKind::Read),
                "{algos:?}: vCPU {i} did not fault on unmapped page {p}"
            );
            assert_eq!(host_pfn(&e.host, &s, p), new[i]);
        }
        for v in vcpus.iter_mut() {
            for p in 100..110u64 {
                let hpa = access_ok(&e.vm, v, &e.host, &s, s.page_gpa(p), AccessKind::Write);
                assert_ne!(hpa.0 >> 12, old[(p - 100) as usize], "stale page");
            }
            let hpa = access_ok(&e.vm, v, &e.host, &thp, thp.page_gpa(700), AccessKind::Read);
            assert_eq!(hpa.0 >> 12, thp_new);
        }
        for (v, f) in vcpus.iter().zip(&flushes) {
            assert!(v.tlb().counters().2 > *f, "vCPU {} never flushed", v.id);
        }
        no_fault(&e, &mut vcpus, &s, (0..100).chain(110..512));
        no_fault(&e, &mut vcpus, &thp, 0..512);
        for v in vcpus.iter_mut() {
            for p in 512..1024 {
                touch(&e.vm, v, &e.host, &thp, p, AccessKind::Write);
            }
        }
        assert_eq!(
            leaf_of(&e.vm, gfn_of(&thp, 600)).map(|l| l.1),
            Some(Level::L4K),
            "the host split the 2M page"
        );
        check_leaves_against_host(&e.vm, &e.host);
        audit(&e.vm);
    }
}

/// The host unmapped the memory: after the notifier, no vCPU reaches the old frame; the
/// access is an error (KVM: -EFAULT), on every vCPU, and maps nothing.
#[test]
fn unmap_after_munmap_leaves_no_translation() {
    let e = env(Algorithms::default());
    let mut vcpus: Vec<_> = (0..2).map(|_| e.vm.create_vcpu().unwrap()).collect();
    warm(&e, &mut vcpus);
    let s = e.s4k;
    e.host.munmap(hva_of(&s, 200), 3 * PAGE_SIZE).unwrap();
    e.vm.unmap_hva_range(hva_of(&s, 200), hva_of(&s, 203))
        .unwrap();
    audit(&e.vm);
    for v in vcpus.iter_mut() {
        for p in 200..203 {
            let gpa = Gpa(s.page_gpa(p));
            assert_eq!(
                e.vm.read(v, gpa),
                Err(Exit::Error(Error::NoHostMapping {
                    gpa,
                    hva: hva_of(&s, p)
                }))
            );
        }
    }
    for p in 200..203 {
        assert!(leaf_of(&e.vm, gfn_of(&s, p)).is_none());
    }
    no_fault(&e, &mut vcpus, &s, (0..200).chain(203..512));
    audit(&e.vm);
}

/// Faults the shadow MMU has handled (it counts every one, those told to retry included).
fn fault_attempts(vm: &TestVm) -> u64 {
    vm.stats().mmu.faults
}

/// A count-bounded wait for a vCPU thread blocked in an invalidation window: until the
/// shadow MMU has seen `target` faults (evidence that the thread is retrying), or the
/// access finished (a failure the caller asserts), or a fixed number of yields passed.
/// The TDP MMU does not count the faults it tells to retry, so under it the wait is only
/// the bounded one.
fn wait_for_attempts(vm: &TestVm, target: u64, finished: &AtomicBool) {
    let limit = if is_tdp(vm) { 20_000 } else { 2_000_000 };
    let mut spins = 0u32;
    while fault_attempts(vm) < target && !finished.load(Ordering::SeqCst) && spins < limit {
        spins += 1;
        std::thread::yield_now();
    }
    if !is_tdp(vm) {
        assert!(
            fault_attempts(vm) >= target,
            "the vCPU thread did not fault (or was not retrying) in the window"
        );
    }
}

/// Ends an invalidation if the test fails inside the window, so a vCPU thread waiting on
/// it finishes and the failure is reported instead of a hang.
struct EndOnDrop<'a>(&'a TestVm, bool);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        if !self.1 {
            let _ = self.0.invalidate_range_end();
        }
    }
}

/// Between invalidate_range_start and _end, a fault on the range installs nothing: a vCPU
/// thread touching it keeps retrying (its faults are counted) while no leaf appears; pages
/// outside the range work meanwhile. The host changes the page inside the window, and once
/// the window ends the vCPU completes on the new frame.
#[test]
fn invalidate_window_holds_faults_until_end() {
    for algos in rmap_algorithms() {
        let e = env(algos);
        let mut vcpus: Vec<_> = (0..2).map(|_| e.vm.create_vcpu().unwrap()).collect();
        warm(&e, &mut vcpus);
        let s = e.s4k;
        let p = 42u64;
        let (mut v0, mut v1) = {
            let mut it = vcpus.into_iter();
            (it.next().unwrap(), it.next().unwrap())
        };
        e.vm.invalidate_range_start(hva_of(&s, p), hva_of(&s, p + 1))
            .unwrap();
        let mut guard = EndOnDrop(&e.vm, false);
        audit(&e.vm);
        assert!(leaf_of(&e.vm, gfn_of(&s, p)).is_none(), "start zaps");
        let new = e.host.remap_page(hva_of(&s, p)).unwrap();
        let finished = AtomicBool::new(false);
        let faults0 = fault_attempts(&e.vm);
        let got = std::thread::scope(|sc| {
            let (vm, finished) = (&e.vm, &finished);
            let h = sc.spawn(move || {
                let r = vm.write(&mut v1, Gpa(s.page_gpa(p) + 0x40));
                finished.store(true, Ordering::SeqCst);
                r
            });
            // Wait (bounded by the vCPU's own attempts) until it has faulted a few times.
            wait_for_attempts(&e.vm, faults0 + 5, finished);
            assert!(
                !finished.load(Ordering::SeqCst),
                "access completed in the window"
            );
            assert!(
                leaf_of(&e.vm, gfn_of(&s, p)).is_none(),
                "fault mapped in the window"
            );
            audit(&e.vm);
            // Outside the range, faults proceed.
            e.vm.zap_gfn_range(gfn_of(&s, 300), gfn_of(&s, 301))
                .unwrap();
            assert!(touch(&e.vm, &mut v0, &e.host, &s, 300, AccessKind::Write));
            assert!(!finished.load(Ordering::SeqCst));
            e.vm.invalidate_range_end().unwrap();
            guard.1 = true;
            h.join().unwrap()
        });
        assert_eq!(got, Ok(Hpa(new.0 * PAGE_SIZE + 0x40)), "{algos:?}");
        audit(&e.vm);
        let (_, level, spte) = leaf_of(&e.vm, gfn_of(&s, p)).unwrap();
        assert_eq!((level, spte.pfn()), (Level::L4K, new));
        assert_eq!(
            e.vm.invalidate_range_end(),
            Err(Error::NoInvalidationInProgress)
        );
        let hpa = access_ok(&e.vm, &mut v0, &e.host, &s, s.page_gpa(p), AccessKind::Read);
        assert_eq!(Pfn(hpa.0 >> 12), new);
    }
}

/// Overlapping invalidations: faults on either range wait until the last one ends; bad
/// ranges and unmatched ends are refused and change nothing.
#[test]
fn nested_invalidations_and_bad_ranges() {
    let e = env(Algorithms::default());
    let mut vcpus: Vec<_> = (0..1).map(|_| e.vm.create_vcpu().unwrap()).collect();
    warm(&e, &mut vcpus);
    let s = e.s4k;
    let before = snapshot(&e.vm);
    assert_eq!(
        e.vm.invalidate_range_end(),
        Err(Error::NoInvalidationInProgress)
    );
    let bad = (hva_of(&s, 5), hva_of(&s, 5));
    let want = Err(Error::InvalidHvaRange {
        start: bad.0 .0,
        end: bad.1 .0,
    });
    assert_eq!(e.vm.invalidate_range_start(bad.0, bad.1), want);
    assert_eq!(e.vm.unmap_hva_range(bad.0, bad.1), want);
    assert_eq!(
        e.vm.age_hva_range(bad.0, bad.1),
        want.clone().map(|()| false)
    );
    assert_eq!(e.vm.test_age_hva_range(bad.0, bad.1), want.map(|()| false));
    assert_eq!(
        e.vm.unmap_hva_range(hva_of(&s, 9), hva_of(&s, 8)),
        Err(Error::InvalidHvaRange {
            start: hva_of(&s, 9).0,
            end: hva_of(&s, 8).0
        })
    );
    assert_eq!(snapshot(&e.vm), before, "refused calls changed something");
    // A range no slot maps: nothing happens (but the flush, if any, is harmless).
    e.vm.unmap_hva_range(Hva(1 << 46), Hva((1 << 46) + M2))
        .unwrap();
    assert_eq!(leaves(&e.vm), before.leaves);

    e.vm.invalidate_range_start(hva_of(&s, 10), hva_of(&s, 12))
        .unwrap();
    e.vm.invalidate_range_start(hva_of(&s, 11), hva_of(&s, 14))
        .unwrap();
    audit(&e.vm);
    for p in 10..14 {
        assert!(leaf_of(&e.vm, gfn_of(&s, p)).is_none());
    }
    e.vm.invalidate_range_end().unwrap();
    // One still in progress: the union of the ranges stays held (KVM keeps the union too).
    let faults = fault_attempts(&e.vm);
    let mut out = None;
    let finished = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let vm = &e.vm;
        let v = &mut vcpus[0];
        let fin = &finished;
        let h = sc.spawn(move || {
            let r = vm.read(v, Gpa(s.page_gpa(10)));
            fin.store(true, Ordering::SeqCst);
            r
        });
        let mut guard = EndOnDrop(&e.vm, false);
        wait_for_attempts(&e.vm, faults + 3, &finished);
        assert!(
            !finished.load(Ordering::SeqCst),
            "access completed in the window"
        );
        assert!(leaf_of(&e.vm, gfn_of(&s, 10)).is_none());
        e.vm.invalidate_range_end().unwrap();
        guard.1 = true;
        out = Some(h.join().unwrap());
    });
    assert_eq!(out.unwrap(), Ok(expected_hpa(&e.host, &s, s.page_gpa(10))));
    assert_eq!(
        e.vm.invalidate_range_end(),
        Err(Error::NoInvalidationInProgress)
    );
    for p in 10..14 {
        touch(&e.vm, &mut vcpus[0], &e.host, &s, p, AccessKind::Write);
    }
    check_leaves_against_host(&e.vm, &e.host);
    audit(&e.vm);
}

/// The A bit of every leaf mapping pages `pages` of `s`.
fn accessed(vm: &TestVm, s: &SlotSpec, pages: std::ops::Range<u64>) -> Vec<bool> {
    pages
        .map(|p| EPT.is_accessed(leaf_of(vm, gfn_of(s, p)).expect("mapped").2))
        .collect()
}

/// Leaves with the A bit masked out: what aging must not change.
fn leaves_but_a(vm: &TestVm) -> Vec<((u64, Level), u64)> {
    leaves(vm)
        .into_iter()
        .map(|(k, s)| (k, s.0 & !EPT.accessed()))
        .collect()
}

/// Young after an access; aging clears it (a second age finds nothing, test_age says old);
/// an access that walks the tables makes it young again. Aging does not flush (KVM's
/// clear_young on x86), so a vCPU that hits its TLB does not set A; one that walks does.
/// Aging changes nothing but A bits, and only in the range.
#[test]
fn age_and_test_age() {
    for algos in rmap_algorithms() {
        let e = env(algos);
        let (s, thp) = (e.s4k, e.thp);
        let mut v0 = e.vm.create_vcpu().unwrap();
        let mut v1 = e.vm.create_vcpu().unwrap();
        let (lo, hi) = (hva_of(&s, 10), hva_of(&s, 20));
        assert!(!e.vm.test_age_hva_range(lo, hi).unwrap(), "nothing mapped");
        assert!(!e.vm.age_hva_range(lo, hi).unwrap());
        for p in 0..40 {
            touch(&e.vm, &mut v0, &e.host, &s, p, AccessKind::Read);
        }
        assert!(
            e.vm.test_age_hva_range(lo, hi).unwrap(),
            "{algos:?}: young after access"
        );
        let shape = leaves_but_a(&e.vm);
        assert!(e.vm.age_hva_range(lo, hi).unwrap(), "aging finds it young");
        audit(&e.vm);
        assert_eq!(accessed(&e.vm, &s, 10..20), vec![false; 10]);
        assert_eq!(
            accessed(&e.vm, &s, 0..10),
            vec![true; 10],
            "outside the range"
        );
        assert_eq!(
            accessed(&e.vm, &s, 20..40),
            vec![true; 20],
            "outside the range"
        );
        assert!(!e.vm.test_age_hva_range(lo, hi).unwrap(), "old after aging");
        assert!(
            !e.vm.age_hva_range(lo, hi).unwrap(),
            "second age: nothing young"
        );
        assert_eq!(leaves_but_a(&e.vm), shape, "aging changed a translation");
        audit(&e.vm);

        // v0 still caches the translations: a hit does not set A.
        for p in 10..20 {
            assert!(!touch(&e.vm, &mut v0, &e.host, &s, p, AccessKind::Read));
        }
        assert!(!e.vm.test_age_hva_range(lo, hi).unwrap(), "a TLB hit set A");
        // v1 walks: A is set on the page it touched, and only there.
        assert!(!touch(&e.vm, &mut v1, &e.host, &s, 12, AccessKind::Read));
        assert!(e.vm.test_age_hva_range(lo, hi).unwrap(), "a walk sets A");
        assert!(e
            .vm
            .test_age_hva_range(hva_of(&s, 12), hva_of(&s, 13))
            .unwrap());
        assert!(!e
            .vm
            .test_age_hva_range(hva_of(&s, 13), hva_of(&s, 20))
            .unwrap());
        assert!(e.vm.age_hva_range(lo, hi).unwrap());
        // After a flush v0 walks again.
        e.vm.flush_remote_tlbs();
        touch(&e.vm, &mut v0, &e.host, &s, 15, AccessKind::Write);
        assert_eq!(
            accessed(&e.vm, &s, 10..20),
            (10..20).map(|p| p == 15).collect::<Vec<_>>()
        );
        assert!(EPT.is_dirty(leaf_of(&e.vm, gfn_of(&s, 15)).unwrap().2));
        audit(&e.vm);

        // A huge leaf: aging 4K of it clears the A bit of the whole leaf, which stays.
        touch(&e.vm, &mut v1, &e.host, &thp, 5, AccessKind::Read);
        let h = (hva_of(&thp, 300), hva_of(&thp, 301));
        assert!(e.vm.test_age_hva_range(h.0, h.1).unwrap());
        assert!(e.vm.age_hva_range(h.0, h.1).unwrap());
        assert!(!e
            .vm
            .test_age_hva_range(hva_of(&thp, 0), hva_of(&thp, 512))
            .unwrap());
        let (_, level, spte) = leaf_of(&e.vm, gfn_of(&thp, 300)).unwrap();
        assert_eq!(level, Level::L2M);
        assert!(spte.is_shadow_present() && !EPT.is_accessed(spte));
        audit(&e.vm);
        for p in [0, 300, 511] {
            touch(&e.vm, &mut v0, &e.host, &thp, p, AccessKind::Read);
        }
        assert!(e.vm.test_age_hva_range(h.0, h.1).unwrap());
        check_leaves_against_host(&e.vm, &e.host);
        audit(&e.vm);
    }
}

/// The default notifier set is a current kernel's: `change_pte` (removed from Linux in
/// 6.10) is refused with `ChangePteRemoved` and changes nothing, whatever its arguments;
/// the host moves a page (KSM, migration) inside `invalidate_range_start`/`end`, and every
/// vCPU faults onto the new frame.
#[test]
fn default_notifiers_are_a_current_kernels() {
    for algos in [Algorithms::default(), rmap_algorithms()[0]] {
        let e = env(algos);
        assert!(!e.vm.config().change_pte, "off by default");
        let mut vcpus: Vec<_> = (0..2).map(|_| e.vm.create_vcpu().unwrap()).collect();
        warm(&e, &mut vcpus);
        let s = e.s4k;
        let before = snapshot(&e.vm);
        let old = Pfn(host_pfn(&e.host, &s, 30));
        for (hva, writable) in [(hva_of(&s, 30), false), (Hva(u64::MAX), true)] {
            assert_eq!(
                e.vm.change_pte(hva, Pfn(1), writable),
                Err(Error::ChangePteRemoved)
            );
        }
        assert_eq!(
            snapshot(&e.vm),
            before,
            "a refused change_pte changed the VM"
        );
        // A current host: the window, the move inside it, the end.
        e.vm.invalidate_range_start(hva_of(&s, 30), hva_of(&s, 31))
            .unwrap();
        assert!(leaf_of(&e.vm, gfn_of(&s, 30)).is_none(), "zapped at start");
        let pfn = e.host.remap_page(hva_of(&s, 30)).unwrap();
        assert_ne!(pfn, old);
        e.vm.invalidate_range_end().unwrap();
        for v in vcpus.iter_mut() {
            let hpa = access_ok(&e.vm, v, &e.host, &s, s.page_gpa(30), AccessKind::Read);
            assert_eq!(Pfn(hpa.0 >> 12), pfn, "vCPU {} reached the old frame", v.id);
        }
        no_fault(&e, &mut vcpus, &s, (0..30).chain(31..512));
        check_leaves_against_host(&e.vm, &e.host);
        audit(&e.vm);
    }
}

/// With the compatibility option, `change_pte` checks its arguments as before, and called
/// where Linux called it since 2012 (inside the invalidation of the page) it finds no SPTE
/// to change: `invalidate_range_start` zapped it, which is why Linux removed it.
#[test]
fn change_pte_compat_inside_the_window_changes_nothing() {
    let e = env_compat(Algorithms::default());
    let mut vcpus: Vec<_> = (0..2).map(|_| e.vm.create_vcpu().unwrap()).collect();
    warm(&e, &mut vcpus);
    assert_eq!(
        e.vm.change_pte(Hva(u64::MAX), Pfn(1), true),
        Err(Error::InvalidHvaRange {
            start: u64::MAX,
            end: u64::MAX
        })
    );
    let s = e.s4k;
    e.vm.invalidate_range_start(hva_of(&s, 40), hva_of(&s, 41))
        .unwrap();
    let pfn = e.host.remap_page(hva_of(&s, 40)).unwrap();
    let before = snapshot(&e.vm);
    e.vm.change_pte(hva_of(&s, 40), pfn, false).unwrap();
    let after = snapshot(&e.vm);
    assert_eq!(
        after.leaves, before.leaves,
        "change_pte found an SPTE in the window"
    );
    assert!(leaf_of(&e.vm, gfn_of(&s, 40)).is_none());
    e.vm.invalidate_range_end().unwrap();
    for v in vcpus.iter_mut() {
        let hpa = access_ok(&e.vm, v, &e.host, &s, s.page_gpa(40), AccessKind::Write);
        assert_eq!(Pfn(hpa.0 >> 12), pfn);
    }
    audit(&e.vm);
}

/// change_pte with a read-only new mapping: the SPTEs point at the new frame without
/// write permission and the flush reaches every vCPU: each reads the new frame without a
/// fault, each vCPU's first write to its own changed page exits (none kept a writable TLB
/// entry) and then maps the host's page writable. Other pages keep their translations.
#[test]
fn change_pte_read_only_points_every_vcpu_at_the_new_page() {
    for algos in rmap_algorithms() {
        let e = env_compat(algos);
        let mut vcpus: Vec<_> = (0..3).map(|_| e.vm.create_vcpu().unwrap()).collect();
        warm(&e, &mut vcpus);
        let s = e.s4k;
        let mut new = Vec::new();
        for p in 20..23 {
            let pfn = e.host.remap_page(hva_of(&s, p)).unwrap();
            e.vm.change_pte(hva_of(&s, p), pfn, false).unwrap();
            audit(&e.vm);
            let (_, level, spte) = leaf_of(&e.vm, gfn_of(&s, p)).unwrap();
            assert_eq!((level, spte.pfn()), (Level::L4K, pfn), "{algos:?}");
            assert!(!spte.is_writable() && !spte.is_host_writable());
            new.push(pfn);
        }
        for v in vcpus.iter_mut() {
            for p in 20..23 {
                assert!(
                    !touch(&e.vm, v, &e.host, &s, p, AccessKind::Read),
                    "a read of the read-only SPTE faulted"
                );
            }
        }
        for (i, v) in vcpus.iter_mut().enumerate() {
            let p = 20 + i as u64;
            assert!(
                touch(&e.vm, v, &e.host, &s, p, AccessKind::Write),
                "{algos:?}: vCPU {i} wrote page {p} through a stale writable entry"
            );
            let (_, _, spte) = leaf_of(&e.vm, gfn_of(&s, p)).unwrap();
            assert!(spte.is_writable() && spte.pfn() == new[i]);
        }
        audit(&e.vm);
        no_fault(&e, &mut vcpus, &s, (0..20).chain(23..512));
        let (_, _, spte) = leaf_of(&e.vm, gfn_of(&s, 19)).unwrap();
        assert!(spte.is_writable(), "neighbour lost W");
        check_leaves_against_host(&e.vm, &e.host);
        audit(&e.vm);
    }
}

/// KSM: the new page is read-only on the host too. Reads reach it; writes are refused
/// (the host would break the COW first) and leave the SPTE as it was.
#[test]
fn change_pte_to_a_read_only_host_page_refuses_writes() {
    let e = env_compat(Algorithms::default());
    let mut vcpus: Vec<_> = (0..2).map(|_| e.vm.create_vcpu().unwrap()).collect();
    warm(&e, &mut vcpus);
    let s = e.s4k;
    let p = 77;
    let pfn = e.host.remap_page(hva_of(&s, p)).unwrap();
    e.host
        .set_writable(hva_of(&s, p), PAGE_SIZE, false)
        .unwrap();
    e.vm.change_pte(hva_of(&s, p), pfn, false).unwrap();
    audit(&e.vm);
    let before = leaf_of(&e.vm, gfn_of(&s, p)).unwrap();
    for v in vcpus.iter_mut() {
        let hpa = access_ok(&e.vm, v, &e.host, &s, s.page_gpa(p), AccessKind::Read);
        assert_eq!(Pfn(hpa.0 >> 12), pfn);
        let gpa = Gpa(s.page_gpa(p));
        assert_eq!(
            e.vm.write(v, gpa),
            Err(Exit::Error(Error::HostReadOnly {
                gpa,
                hva: hva_of(&s, p)
            }))
        );
        audit(&e.vm);
    }
    let after = leaf_of(&e.vm, gfn_of(&s, p)).unwrap();
    assert_eq!(
        (after.0, after.1, after.2.pfn()),
        (before.0, before.1, before.2.pfn())
    );
    assert!(!after.2.is_writable());
    // COW broken: a fresh writable page, announced as writable: the SPTE is dropped.
    let pfn2 = e.host.remap_page(hva_of(&s, p)).unwrap();
    e.host.set_writable(hva_of(&s, p), PAGE_SIZE, true).unwrap();
    e.vm.change_pte(hva_of(&s, p), pfn2, true).unwrap();
    assert!(leaf_of(&e.vm, gfn_of(&s, p)).is_none());
    for v in vcpus.iter_mut() {
        let hpa = access_ok(&e.vm, v, &e.host, &s, s.page_gpa(p), AccessKind::Write);
        assert_eq!(Pfn(hpa.0 >> 12), pfn2);
    }
    audit(&e.vm);
}

/// change_pte with a writable new mapping drops the SPTEs: every vCPU faults on its own
/// changed page and maps the host's current frame.
#[test]
fn change_pte_writable_drops_the_sptes() {
    for algos in rmap_algorithms() {
        let e = env_compat(algos);
        let mut vcpus: Vec<_> = (0..3).map(|_| e.vm.create_vcpu().unwrap()).collect();
        warm(&e, &mut vcpus);
        let s = e.s4k;
        let mut new = Vec::new();
        for p in 30..33 {
            let pfn = e.host.remap_page(hva_of(&s, p)).unwrap();
            e.vm.change_pte(hva_of(&s, p), pfn, true).unwrap();
            audit(&e.vm);
            assert!(leaf_of(&e.vm, gfn_of(&s, p)).is_none(), "{algos:?}");
            new.push(pfn);
        }
        for (i, v) in vcpus.iter_mut().enumerate() {
            let p = 30 + i as u64;
            let kind = if i == 0 {
                AccessKind::Read
            } else {
                AccessKind::Write
            };
            assert!(
                touch(&e.vm, v, &e.host, &s, p, kind),
                "{algos:?}: vCPU {i} used a stale translation of page {p}"
            );
            let (_, _, spte) = leaf_of(&e.vm, gfn_of(&s, p)).unwrap();
            assert_eq!(spte.pfn(), new[i]);
        }
        for v in vcpus.iter_mut() {
            for (i, p) in (30..33).enumerate() {
                let hpa = access_ok(&e.vm, v, &e.host, &s, s.page_gpa(p), AccessKind::Write);
                assert_eq!(Pfn(hpa.0 >> 12), new[i]);
            }
        }
        no_fault(&e, &mut vcpus, &s, (0..30).chain(33..512));
        check_leaves_against_host(&e.vm, &e.host);
        audit(&e.vm);
    }
}

/// change_pte inside a 2M leaf: the huge leaf goes; the changed page maps the new frame
/// at 4K, its neighbours at 4K too (the host split the huge page), and the other 2M leaf
/// is untouched.
#[test]
fn change_pte_inside_a_huge_page() {
    for algos in rmap_algorithms() {
        for writable in [false, true] {
            let e = env_compat(algos);
            let mut vcpus: Vec<_> = (0..2).map(|_| e.vm.create_vcpu().unwrap()).collect();
            warm(&e, &mut vcpus);
            let thp = e.thp;
            let pfn = e.host.remap_page(hva_of(&thp, 600)).unwrap();
            e.vm.change_pte(hva_of(&thp, 600), pfn, writable).unwrap();
            audit(&e.vm);
            assert!(
                leaf_of(&e.vm, gfn_of(&thp, 601)).is_none(),
                "2M leaf dropped"
            );
            assert_eq!(leaf_of(&e.vm, gfn_of(&thp, 1)).unwrap().1, Level::L2M);
            for v in vcpus.iter_mut() {
                let hpa = access_ok(&e.vm, v, &e.host, &thp, thp.page_gpa(600), AccessKind::Read);
                assert_eq!(Pfn(hpa.0 >> 12), pfn, "{algos:?} writable {writable}");
            }
            no_fault(&e, &mut vcpus, &thp, 0..512);
            for v in vcpus.iter_mut() {
                for p in 512..1024 {
                    touch(&e.vm, v, &e.host, &thp, p, AccessKind::Write);
                }
            }
            assert_eq!(leaf_of(&e.vm, gfn_of(&thp, 601)).unwrap().1, Level::L4K);
            check_leaves_against_host(&e.vm, &e.host);
            audit(&e.vm);
        }
    }
}

/// Two slots backed by the same host memory: every notifier reaches both guest pages.
#[test]
fn notifiers_reach_every_alias() {
    for algos in rmap_algorithms() {
        let (host, vm) = new_vm(VmConfig {
            change_pte: true,
            ..config(DirtyLogConfig::default(), algos)
        });
        let h = mmap(&host, 16 * K4, Backing::Page4K);
        let a = add_slot(
            &vm,
            SlotSpec {
                id: 0,
                gpa: G1,
                size: 16 * K4,
                hva: h,
                flags: MemslotFlags::empty(),
            },
        );
        let b = add_slot(
            &vm,
            SlotSpec {
                id: 1,
                gpa: 3 * G1,
                size: 16 * K4,
                hva: h,
                flags: MemslotFlags::empty(),
            },
        );
        let mut vcpus: Vec<_> = (0..2).map(|_| vm.create_vcpu().unwrap()).collect();
        let warm = |vcpus: &mut [Vcpu]| {
            for v in vcpus.iter_mut() {
                for s in [&a, &b] {
                    for p in 0..16 {
                        touch(&vm, v, &host, s, p, AccessKind::Write);
                    }
                }
            }
        };
        warm(&mut vcpus);
        audit(&vm);
        // unmap
        let pfn = host.remap_page(hva_of(&a, 3)).unwrap();
        vm.unmap_hva_range(hva_of(&a, 3), hva_of(&a, 4)).unwrap();
        audit(&vm);
        assert!(leaf_of(&vm, gfn_of(&a, 3)).is_none() && leaf_of(&vm, gfn_of(&b, 3)).is_none());
        assert!(touch(&vm, &mut vcpus[0], &host, &a, 3, AccessKind::Read));
        assert!(touch(&vm, &mut vcpus[1], &host, &b, 3, AccessKind::Read));
        for v in vcpus.iter_mut() {
            for s in [&a, &b] {
                let hpa = access_ok(&vm, v, &host, s, s.page_gpa(3), AccessKind::Write);
                assert_eq!(Pfn(hpa.0 >> 12), pfn);
            }
        }
        // age
        assert!(vm.age_hva_range(hva_of(&a, 0), hva_of(&a, 16)).unwrap());
        assert!(!EPT.is_accessed(leaf_of(&vm, gfn_of(&a, 7)).unwrap().2));
        assert!(!EPT.is_accessed(leaf_of(&vm, gfn_of(&b, 7)).unwrap().2));
        assert!(!vm
            .test_age_hva_range(hva_of(&a, 0), hva_of(&a, 16))
            .unwrap());
        audit(&vm);
        // change_pte, read-only
        let pfn = host.remap_page(hva_of(&a, 5)).unwrap();
        vm.change_pte(hva_of(&a, 5), pfn, false).unwrap();
        audit(&vm);
        for s in [&a, &b] {
            let (_, _, spte) = leaf_of(&vm, gfn_of(s, 5)).unwrap();
            assert_eq!(spte.pfn(), pfn, "slot {}", s.id);
            assert!(!spte.is_writable());
        }
        assert!(touch(&vm, &mut vcpus[0], &host, &a, 5, AccessKind::Write));
        assert!(touch(&vm, &mut vcpus[1], &host, &b, 5, AccessKind::Write));
        warm(&mut vcpus);
        check_leaves_against_host(&vm, &host);
        audit(&vm);
    }
}

/// Notifiers on a logging slot: a page written after its SPTE was dropped or repointed is
/// still logged (the write faults), and the audit's "writable implies dirty" holds.
#[test]
fn notifiers_on_a_logging_slot_lose_no_write() {
    let (host, vm) = new_vm(VmConfig {
        change_pte: true,
        ..VmConfig::default()
    });
    let h = mmap(&host, 64 * K4, Backing::Page4K);
    let s = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 64 * K4,
            hva: h,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    );
    let mut v = vm.create_vcpu().unwrap();
    for p in 0..64 {
        touch(&vm, &mut v, &host, &s, p, AccessKind::Write);
    }
    let mut out = [0u64];
    assert_eq!(vm.get_dirty_log(0, &mut out).unwrap().dirty_pages, 64);
    audit(&vm);
    let pfn = host.remap_page(hva_of(&s, 4)).unwrap();
    vm.change_pte(hva_of(&s, 4), pfn, false).unwrap();
    host.remap_page(hva_of(&s, 9)).unwrap();
    vm.unmap_hva_range(hva_of(&s, 9), hva_of(&s, 10)).unwrap();
    vm.age_hva_range(hva_of(&s, 0), hva_of(&s, 64)).unwrap();
    audit(&vm);
    for p in [4, 9, 20] {
        assert!(
            touch(&vm, &mut v, &host, &s, p, AccessKind::Write),
            "page {p}"
        );
        audit(&vm);
    }
    vm.get_dirty_log(0, &mut out).unwrap();
    assert_eq!(bitmap_pages(&out), [4, 9, 20].into_iter().collect());
    audit(&vm);
}

/// vCPU threads read and write a few hot pages while the main thread moves them on the
/// host and tells the MMU (unmap, change_pte read-only, change_pte writable, in turn) and
/// ages the slot. An access that starts after the notifier returned must reach the frame
/// the host had then or a later one: never an older one (a stale TLB entry or SPTE).
/// Bounded by rounds: after each round the main thread waits until every vCPU has made
/// an access that started after it.
#[test]
fn concurrent_vcpus_never_see_a_moved_page() {
    const HOT: u64 = 8;
    const ROUNDS: u64 = 150;
    // A current kernel's flow (the move inside invalidate_range_start/end), then the
    // compatibility option's (change_pte after the move, as before Linux 6.10).
    for (algos, compat) in [
        (Algorithms::default(), false),
        (Algorithms::default(), true),
        (rmap_algorithms()[0], true),
    ] {
        let e = env_with(algos, compat);
        let s = e.s4k;
        // Per hot page: (round, pfn) in order; round 0 is the initial frame.
        let history: Mutex<Vec<Vec<(u64, u64)>>> = Mutex::new(
            (0..HOT)
                .map(|p| vec![(0, host_pfn(&e.host, &s, p))])
                .collect(),
        );
        let done_round = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let seen: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
        let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let mut vcpus: Vec<_> = (0..2).map(|_| e.vm.create_vcpu().unwrap()).collect();

        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }

        std::thread::scope(|sc| {
            let _stop = StopOnDrop(&stop);
            for (t, v) in vcpus.iter_mut().enumerate() {
                let (vm, history, done_round, stop, seen, errors) =
                    (&e.vm, &history, &done_round, &stop, &seen, &errors);
                sc.spawn(move || {
                    let mut rng = Rng::new(77 + t as u64);
                    while !stop.load(Ordering::SeqCst) {
                        let p = rng.below(HOT);
                        let kind = if rng.below(3) == 0 {
                            AccessKind::Write
                        } else {
                            AccessKind::Read
                        };
                        let g = done_round.fetch_add(0, Ordering::SeqCst);
                        let r = vm.access(v, Gpa(s.page_gpa(p) + 8), kind);
                        let h = history.lock().unwrap();
                        let hist = &h[p as usize];
                        // The frame the host had when round g completed, or a later one.
                        let first = hist.partition_point(|&(n, _)| n <= g) - 1;
                        let ok = matches!(r, Ok(hpa) if hpa.0 & 0xfff == 8
                            && hist[first..].iter().any(|&(_, f)| f == hpa.0 >> 12));
                        if !ok {
                            let mut e = errors.lock().unwrap();
                            if e.len() < 10 {
                                e.push(format!(
                                    "vCPU {t}: {kind:?} page {p} after round {g}: {r:?}, \
                                     frames since: {:x?}",
                                    &hist[first..]
                                ));
                            }
                        }
                        drop(h);
                        seen[t].store(g, Ordering::SeqCst);
                        if rng.below(4) == 0 {
                            // Few cores, three threads: let the notifier thread run.
                            std::thread::yield_now();
                        }
                    }
                });
            }
            for n in 1..=ROUNDS {
                let p = n % HOT;
                let hva = hva_of(&s, p);
                let end = Hva(hva.0 + PAGE_SIZE);
                let window = !compat && n % 3 != 0;
                if window {
                    e.vm.invalidate_range_start(hva, end).unwrap();
                }
                let pfn = {
                    // Hold the history while the host moves the page, so a vCPU that
                    // reaches the new frame finds it listed.
                    let mut h = history.lock().unwrap();
                    let pfn = e.host.remap_page(hva).unwrap();
                    h[p as usize].push((n, pfn.0));
                    pfn
                };
                match n % 3 {
                    0 => e.vm.unmap_hva_range(hva, end).unwrap(),
                    _ if window => e.vm.invalidate_range_end().unwrap(),
                    1 => e.vm.change_pte(hva, pfn, false).unwrap(),
                    _ => e.vm.change_pte(hva, pfn, true).unwrap(),
                }
                if n % 16 == 0 {
                    e.vm.age_hva_range(hva_of(&s, 0), hva_of(&s, HOT)).unwrap();
                }
                done_round.store(n, Ordering::SeqCst);
                for t in seen.iter() {
                    while t.load(Ordering::SeqCst) < n && errors.lock().unwrap().is_empty() {
                        // Sleep rather than yield: give the core to a vCPU thread.
                        std::thread::sleep(std::time::Duration::from_micros(20));
                    }
                }
                if n % 50 == 0 {
                    audit(&e.vm);
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
        let errors = errors.into_inner().unwrap();
        assert!(errors.is_empty(), "{algos:?}:\n{}", errors.join("\n"));
        audit(&e.vm);
        check_leaves_against_host(&e.vm, &e.host);
    }
}
