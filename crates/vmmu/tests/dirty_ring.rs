//! Dirty rings (KVM_CAP_DIRTY_LOG_RING): each vCPU pushes the pages its write faults make
//! writable; the VMM harvests the entries and resets the rings, which write-protects the
//! harvested pages again.
//!
//! - single-threaded and exact, under every combination of the seeds' algorithms: each
//!   harvest of a vCPU returns, in order, exactly the pages that vCPU's writes made
//!   writable since the pages were last reset; reads never push; a reset frees exactly the
//!   entries harvested (and re-protects them: the next write exits to the MMU);
//! - the ring-full exit: a vCPU whose ring is soft-full does not run until its entries are
//!   harvested *and* reset;
//! - two writer vCPU threads and a harvest-and-reset thread, with small rings so the
//!   writers keep hitting ring-full exits: no lost write, no stale report, entries reset
//!   equal entries harvested (see `support::run_concurrent`).
//!
//! The audit runs after every step.

mod common;
mod support;

use std::collections::BTreeSet;

use common::*;
use support::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gpa};
use vmmu::DirtyGfn;
use vmmu::{Algorithms, DirtyLogConfig, Error, Exit, MemslotFlags};

fn ring_config(size: u32, algorithms: Algorithms) -> vmmu::VmConfig {
    config(
        DirtyLogConfig {
            ring_size: Some(size),
            ..DirtyLogConfig::default()
        },
        algorithms,
    )
}

/// One vCPU's ring in the model: entries pushed and not harvested, harvested and not
/// reset.
#[derive(Default)]
struct RingModel {
    pending: Vec<DirtyGfn>,
    harvested: Vec<DirtyGfn>,
}

impl RingModel {
    fn used(&self) -> usize {
        self.pending.len() + self.harvested.len()
    }
}

struct Model {
    size: usize,
    rings: Vec<RingModel>,
    specs: Vec<SlotSpec>,
    logging: Vec<bool>,
    /// Per slot, per page: the SPTE is writable.
    writable: Vec<Vec<bool>>,
    harvested_total: usize,
    reset_total: usize,
}

impl Model {
    /// The ring is soft-full (one entry short of full): the vCPU must not run.
    fn soft_full(&self, v: usize) -> bool {
        self.rings[v].used() + 1 >= self.size
    }
}

/// The MMU's writable leaves match the model in every logging slot; the audit passes.
#[track_caller]
fn check(vm: &TestVm, m: &Model, what: &str) {
    let leaves = leaves(vm);
    for (k, s) in m.specs.iter().enumerate() {
        if m.logging[k] {
            let want: BTreeSet<u64> = (0..s.pages())
                .filter(|&p| m.writable[k][p as usize])
                .collect();
            assert_eq!(
                writable_pages_in(&leaves, s),
                want,
                "{what}: slot {} writable leaves",
                s.id
            );
            assert_eq!(
                huge_leaves_of(&leaves, s),
                0,
                "{what}: huge leaf while logging"
            );
        }
    }
    audit(vm);
}

/// One access in the model and in the VM. A vCPU with a soft-full ring exits at once. A
/// write to a logging page that is not writable exits to the MMU, which pushes the page;
/// if that push made the ring soft-full, the vCPU exits to the VMM before the write
/// completes (KVM raises KVM_REQ_DIRTY_RING_SOFT_FULL and checks it before re-entering the
/// guest), and the write is run again after the reset.
fn access(
    vm: &TestVm,
    host: &vmmu::host::SimHostMemory,
    vcpus: &mut [vmmu::Vcpu],
    m: &mut Model,
    v: usize,
    (k, p, kind): (usize, u64, AccessKind),
) {
    let spec = m.specs[k];
    let gpa = spec.page_gpa(p) + 0x18;
    let vcpu = &mut vcpus[v];
    let before = vcpu.exits;
    let got = vm.access(vcpu, Gpa(gpa), kind);
    let what = format!("vCPU {v} {kind:?} slot {} page {p}", spec.id);
    if m.soft_full(v) {
        assert_eq!(got, Err(Exit::DirtyRingFull), "{what}: ring soft-full");
        assert_eq!(vcpu.exits, before, "{what}: ran with a full ring");
        return;
    }
    let mut full_after_push = false;
    if kind == AccessKind::Write && m.logging[k] {
        let protected = !m.writable[k][p as usize];
        assert_eq!(
            vcpu.exits > before,
            protected,
            "{what}: exits iff protected"
        );
        if protected {
            m.rings[v].pending.push(DirtyGfn {
                slot: spec.id,
                offset: p,
            });
            m.writable[k][p as usize] = true;
            full_after_push = m.soft_full(v);
        }
    }
    if full_after_push {
        assert_eq!(
            got,
            Err(Exit::DirtyRingFull),
            "{what}: push filled the ring"
        );
    } else {
        assert_eq!(
            got,
            Ok(expected_hpa(host, &spec, gpa)),
            "{what}: wrong result"
        );
    }
}

fn harvest(vm: &TestVm, m: &mut Model, v: usize) {
    let mut out = vec![DirtyGfn {
        slot: 99,
        offset: 0,
    }];
    let n = vm.harvest_dirty_ring(v as u32, &mut out).unwrap();
    assert_eq!(out.remove(0).slot, 99, "harvest appends");
    assert_eq!(n, out.len());
    let ring = &mut m.rings[v];
    assert_eq!(out, ring.pending, "vCPU {v}: harvested entries");
    ring.harvested.append(&mut ring.pending);
    m.harvested_total += n;
}

fn reset(vm: &TestVm, m: &mut Model) {
    let n = vm.reset_dirty_rings().unwrap();
    let mut want = 0;
    for r in m.rings.iter_mut() {
        want += r.harvested.len();
        for e in r.harvested.drain(..) {
            let k = m.specs.iter().position(|s| s.id == e.slot).unwrap();
            m.writable[k][e.offset as usize] = false;
        }
    }
    assert_eq!(n, want, "reset frees exactly the harvested entries");
    m.reset_total += n;
}

/// The exact model over one set of algorithms: three vCPUs with 64-entry rings, a
/// 300-page slot logging from its creation and a THP slot mapped huge first and logging
/// later; random accesses, harvests of random vCPUs and resets; a final harvest and reset
/// of everything.
fn exact(algos: Algorithms, seed: u64) {
    const SIZE: u32 = 64;
    let (host, vm) = new_vm(ring_config(SIZE, algos));
    let h0 = mmap(&host, 300 * K4, Backing::Page4K);
    let h1 = mmap(&host, 2 * M2, Backing::Thp);
    let s0 = add_slot(
        &vm,
        SlotSpec {
            id: 4,
            gpa: G1,
            size: 300 * K4,
            hva: h0,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    );
    let mut s1 = add_slot(
        &vm,
        SlotSpec {
            id: 9,
            gpa: 3 * G1,
            size: 2 * M2,
            hva: h1,
            flags: MemslotFlags::empty(),
        },
    );
    let mut vcpus: Vec<_> = (0..3).map(|_| vm.create_vcpu().unwrap()).collect();
    // Slot 9 is not logging: its writes push nothing and it maps 2M.
    for i in (0..s1.pages()).step_by(50) {
        access_ok(
            &vm,
            &mut vcpus[0],
            &host,
            &s1,
            s1.page_gpa(i),
            AccessKind::Write,
        );
    }
    assert_eq!(huge_leaves_in(&vm, &s1), 2);
    let mut out = Vec::new();
    assert_eq!(vm.harvest_dirty_ring(0, &mut out).unwrap(), 0);
    let mut m = Model {
        size: SIZE as usize,
        rings: (0..3).map(|_| RingModel::default()).collect(),
        specs: vec![s0, s1],
        logging: vec![true, false],
        writable: vec![vec![false; 300], vec![false; 1024]],
        harvested_total: 0,
        reset_total: 0,
    };
    check(&vm, &m, "setup");
    let mut rng = Rng::new(seed);
    for step in 0..1500u64 {
        if step == 400 {
            set_logging(&vm, &mut s1, true);
            m.specs[1] = s1;
            m.logging[1] = true;
            // Its 2M leaves were zapped: nothing mapped, nothing writable.
            check(&vm, &m, "slot 9 logging");
        }
        match rng.below(100) {
            0..=5 => {
                harvest(&vm, &mut m, rng.below(3) as usize);
                check(&vm, &m, &format!("step {step} harvest"));
            }
            6..=8 => {
                reset(&vm, &mut m);
                check(&vm, &m, &format!("step {step} reset"));
            }
            r => {
                let k = if m.logging[1] && r % 2 == 0 { 1 } else { 0 };
                let p = rng.below(m.specs[k].pages());
                let kind = match rng.below(10) {
                    0..=5 => AccessKind::Write,
                    6..=8 => AccessKind::Read,
                    _ => AccessKind::Fetch,
                };
                let v = rng.below(3) as usize;
                access(&vm, &host, &mut vcpus, &mut m, v, (k, p, kind));
            }
        }
    }
    for v in 0..3 {
        harvest(&vm, &mut m, v);
    }
    reset(&vm, &mut m);
    check(&vm, &m, "final");
    assert!(m.writable.iter().flatten().all(|w| !w), "all protected");
    assert!(m.harvested_total > 100, "exercised: {}", m.harvested_total);
    assert_eq!(m.harvested_total, m.reset_total, "ring accounting");
    for v in 0..3 {
        assert_eq!(vm.harvest_dirty_ring(v, &mut out).unwrap(), 0);
    }
    assert_eq!(vm.reset_dirty_rings().unwrap(), 0);
}

/// Every combination of the switches a ring VM uses: reverse-map iteration (the reset
/// write-protects through the reverse maps), reverse-map drop and the page write-protect
/// (logging on zaps the huge leaves and protects the slot). `dirty_wrprot` chooses how
/// GET protects, which a ring VM never calls.
#[test]
fn exact_ring_every_algorithm() {
    let algos = all_algorithms()
        .into_iter()
        .filter(|a| a.dirty_wrprot == vmmu::DirtyWrprot::default());
    for (i, algos) in algos.enumerate() {
        exact(algos, 0x7000 + i as u64);
    }
}

/// A 16-entry ring: the 15th push makes it soft-full and the vCPU exits with
/// DirtyRingFull (before that write completes); it stays out, for writes and reads alike,
/// after a harvest alone (harvested entries hold their slots until reset); other vCPUs run
/// on; after the reset it runs again, and the write that was cut short faults again (the
/// reset re-protected it) and completes.
#[test]
fn ring_full_exit_until_harvest_and_reset() {
    const SIZE: u64 = 16;
    let (host, vm) = new_vm(ring_config(SIZE as u32, Algorithms::default()));
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
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    let mut ok = 0u64;
    let full_at = loop {
        assert!(ok < SIZE, "the ring never filled");
        match vm.write(&mut v0, Gpa(s.page_gpa(ok))) {
            Ok(hpa) => {
                assert_eq!(hpa, expected_hpa(&host, &s, s.page_gpa(ok)));
                ok += 1;
            }
            Err(Exit::DirtyRingFull) => break ok,
            Err(e) => panic!("write {ok}: {e:?}"),
        }
    };
    audit(&vm);
    // Soft-full is one entry short of full: SIZE - 1 pushes, the last of them by the write
    // that got the exit.
    assert_eq!(full_at, SIZE - 2);
    let exits = v0.exits;
    assert_eq!(
        vm.write(&mut v0, Gpa(s.page_gpa(40))),
        Err(Exit::DirtyRingFull)
    );
    assert_eq!(
        vm.read(&mut v0, Gpa(s.page_gpa(0))),
        Err(Exit::DirtyRingFull)
    );
    assert_eq!(v0.exits, exits, "a full vCPU does not run");
    // Another vCPU has its own ring.
    access_ok(&vm, &mut v1, &host, &s, s.page_gpa(50), AccessKind::Write);
    let mut out = Vec::new();
    assert_eq!(
        vm.harvest_dirty_ring(0, &mut out).unwrap(),
        (SIZE - 1) as usize
    );
    let want: Vec<DirtyGfn> = (0..SIZE - 1)
        .map(|offset| DirtyGfn { slot: 0, offset })
        .collect();
    assert_eq!(out, want);
    assert_eq!(
        vm.write(&mut v0, Gpa(s.page_gpa(full_at))),
        Err(Exit::DirtyRingFull),
        "harvested entries hold their slots until reset"
    );
    audit(&vm);
    // The reset frees v0's 15 entries (v1's entry was not harvested: it stays).
    assert_eq!(vm.reset_dirty_rings().unwrap(), (SIZE - 1) as usize);
    audit(&vm);
    let exits = v0.exits;
    access_ok(
        &vm,
        &mut v0,
        &host,
        &s,
        s.page_gpa(full_at),
        AccessKind::Write,
    );
    assert_eq!(v0.exits, exits + 1, "the reset re-protected the page");
    // 14 more pushes: one short of soft-full again.
    for p in 0..full_at - 1 {
        let e = v0.exits;
        access_ok(&vm, &mut v0, &host, &s, s.page_gpa(p), AccessKind::Write);
        assert_eq!(v0.exits, e + 1, "page {p} re-protected");
    }
    out.clear();
    assert_eq!(
        vm.harvest_dirty_ring(0, &mut out).unwrap(),
        full_at as usize
    );
    assert_eq!(
        out[0],
        DirtyGfn {
            slot: 0,
            offset: full_at
        }
    );
    out.clear();
    assert_eq!(vm.harvest_dirty_ring(1, &mut out).unwrap(), 1);
    assert_eq!(
        out,
        [DirtyGfn {
            slot: 0,
            offset: 50
        }]
    );
    assert_eq!(vm.reset_dirty_rings().unwrap(), (full_at + 1) as usize);
    audit(&vm);
    assert!(writable_pages(&vm, &s).is_empty());
}

/// Entries of a slot deleted before the reset: the reset skips them; a slot created in its
/// place is not disturbed.
#[test]
fn reset_after_slot_deleted() {
    let (host, vm) = new_vm(ring_config(64, Algorithms::default()));
    let h = mmap(&host, 32 * K4, Backing::Page4K);
    let s = add_slot(
        &vm,
        SlotSpec {
            id: 2,
            gpa: G1,
            size: 32 * K4,
            hva: h,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    );
    let mut v = vm.create_vcpu().unwrap();
    for p in 0..10 {
        access_ok(&vm, &mut v, &host, &s, s.page_gpa(p), AccessKind::Write);
    }
    let mut out = Vec::new();
    assert_eq!(vm.harvest_dirty_ring(0, &mut out).unwrap(), 10);
    vm.set_user_memory_region(region(2, G1, 0, h, MemslotFlags::empty()))
        .unwrap();
    audit(&vm);
    assert_eq!(vm.reset_dirty_rings().unwrap(), 10);
    audit(&vm);
    let s2 = add_slot(
        &vm,
        SlotSpec {
            id: 2,
            gpa: 2 * G1,
            size: 32 * K4,
            hva: h,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    );
    for p in 0..4 {
        access_ok(&vm, &mut v, &host, &s2, s2.page_gpa(p), AccessKind::Write);
    }
    out.clear();
    assert_eq!(vm.harvest_dirty_ring(0, &mut out).unwrap(), 4);
    assert_eq!(vm.reset_dirty_rings().unwrap(), 4);
    audit(&vm);
    assert!(writable_pages(&vm, &s2).is_empty());
}

#[test]
fn wrong_mode_and_unknown_vcpu_are_rejected() {
    let (host, vm) = new_vm(ring_config(64, Algorithms::default()));
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
    access_ok(&vm, &mut v, &host, &s, s.gpa, AccessKind::Write);
    let before = snapshot(&vm);
    let mut buf = [0u64; 1];
    assert!(matches!(
        vm.get_dirty_log(0, &mut buf),
        Err(Error::WrongDirtyLogMode(_))
    ));
    assert!(matches!(
        vm.clear_dirty_log(0, 0, 64, &buf),
        Err(Error::WrongDirtyLogMode(_))
    ));
    let mut out = Vec::new();
    assert_eq!(
        vm.harvest_dirty_ring(1, &mut out),
        Err(Error::NoSuchVcpu(1))
    );
    assert!(out.is_empty());
    assert_eq!(snapshot(&vm), before);
    assert_eq!(vm.harvest_dirty_ring(0, &mut out).unwrap(), 1);
    assert_eq!(vm.reset_dirty_rings().unwrap(), 1);
    audit(&vm);
}

/// Two writer vCPU threads, one harvest-and-reset thread, rings of 16 and 64 entries: the
/// writers keep exiting with DirtyRingFull and wait for the resets.
#[test]
fn concurrent_writers_and_harvester_small_rings() {
    for (i, size) in [16u32, 64].into_iter().enumerate() {
        let out = run_concurrent(&Params {
            mode: HarvestMode::Ring(size),
            algorithms: Algorithms::default(),
            rounds: 10,
            accesses: 1000,
            seed: 0x4242 + i as u64,
        });
        assert_eq!(out.ring_harvested, out.ring_reset, "ring accounting");
        assert!(out.ring_harvested > 0);
    }
}

/// The same under the quadratic reverse-map iteration (the reset write-protects through
/// the reverse maps).
#[test]
fn concurrent_small_rings_restart_scan() {
    let out = run_concurrent(&Params {
        mode: HarvestMode::Ring(32),
        algorithms: Algorithms {
            rmap_iteration: vmmu::RmapIteration::RestartScan,
            ..Algorithms::default()
        },
        rounds: 4,
        accesses: 300,
        seed: 0x99,
    });
    assert_eq!(out.ring_harvested, out.ring_reset, "ring accounting");
}
