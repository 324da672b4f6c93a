//! Dirty logging through the bitmap: `get_dirty_log` (KVM_GET_DIRTY_LOG), manual protect's
//! `clear_dirty_log` (KVM_CLEAR_DIRTY_LOG) and KVM_DIRTY_LOG_INITIALLY_SET, checked for the
//! properties of KVM's `dirty_log_test`:
//!
//! - single-threaded and exact, under every combination of the seeds' algorithms: each
//!   harvest reports exactly the pages written (not read, not fetched) since the pages were
//!   last cleared, the bitmap holds exactly those bits at every step, every write to a
//!   page the harvest re-protected exits to the MMU (no stale writable TLB entry) and no
//!   other write does, and the writable leaves are exactly the pages written since;
//! - concurrent: two writer vCPU threads and a harvester collecting mid-round and after
//!   the writers stop, for GET, GET + CLEAR and the ring (no lost write, no stale report;
//!   see `support::run_concurrent`);
//! - huge pages go when logging starts and come back when it stops;
//! - bad input returns its typed error and changes nothing.
//!
//! The audit runs after every step.

mod common;
mod support;

use std::collections::BTreeSet;

use common::*;
use support::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gfn, Level};
use vmmu::{Algorithms, DirtyLogConfig, DirtyWrprot, Error, MemslotFlags, VmConfig};

/// The bitmap modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// GET returns and clears, re-protecting what it returns.
    Get,
    /// Manual protect; CLEAR of the whole slot after each GET.
    GetClearWhole,
    /// Manual protect; CLEAR of random 64-page-aligned runs, with extra clean bits.
    GetClearPartial,
    /// Manual protect with KVM_DIRTY_LOG_INITIALLY_SET; partial CLEARs.
    InitiallySet,
}

impl Mode {
    fn dirty_log(self) -> DirtyLogConfig {
        DirtyLogConfig {
            manual_protect: self != Mode::Get,
            initially_all_set: self == Mode::InitiallySet,
            ring_size: None,
            ..DirtyLogConfig::default()
        }
    }
}

/// What the MMU must hold for one slot: the bits of its dirty bitmap, and which pages have
/// a writable SPTE (exactly the pages written since they were last protected).
struct SlotModel {
    spec: SlotSpec,
    logging: bool,
    bits: BTreeSet<u64>,
    writable: Vec<bool>,
}

impl SlotModel {
    fn new(spec: SlotSpec) -> Self {
        SlotModel {
            spec,
            logging: false,
            bits: BTreeSet::new(),
            writable: vec![false; spec.pages() as usize],
        }
    }
    /// Logging starts: a clean bitmap and every page protected, or (initially-set) every
    /// bit set and nothing protected.
    fn start_logging(&mut self, initially_set: bool) {
        self.logging = true;
        if initially_set {
            self.bits = (0..self.spec.pages()).collect();
        } else {
            self.bits.clear();
            self.writable.iter_mut().for_each(|w| *w = false);
        }
    }
    fn writable_set(&self) -> BTreeSet<u64> {
        (0..self.spec.pages())
            .filter(|&p| self.writable[p as usize])
            .collect()
    }
}

/// Logging just started on `m`'s slot, all of whose leaves were 2M: the shadow MMU zaps
/// them, so nothing is writable. The TDP MMU may split them instead (KVM's eager page
/// split), keeping W where nothing was protected (initially-set); then the model takes
/// what it finds, which must be 4K leaves, and none writable unless every bit is set.
fn huge_pages_gone(vm: &TestVm, m: &mut SlotModel, initially_set: bool) {
    m.start_logging(initially_set);
    let found = writable_pages(vm, &m.spec);
    if !is_tdp(vm) || !initially_set {
        assert!(
            found.is_empty(),
            "writable leaves after logging started: {found:?}"
        );
    }
    m.writable = (0..m.spec.pages()).map(|p| found.contains(&p)).collect();
}

/// The MMU matches the model: bitmap bits, writable leaves, no huge leaf while logging;
/// and the audit passes.
#[track_caller]
fn check(vm: &TestVm, models: &[SlotModel], what: &str) {
    let leaves = leaves(vm);
    for m in models {
        let id = m.spec.id;
        if m.logging {
            assert_eq!(
                bitmap_pages(&dirty_words(vm, id).expect("bitmap while logging")),
                m.bits,
                "{what}: slot {id}: dirty bitmap"
            );
            assert_eq!(
                writable_pages_in(&leaves, &m.spec),
                m.writable_set(),
                "{what}: slot {id}: writable leaves"
            );
            assert_eq!(huge_leaves_of(&leaves, &m.spec), 0, "{what}: huge leaf");
        } else {
            assert!(
                dirty_words(vm, id).is_none(),
                "{what}: bitmap while not logging"
            );
        }
    }
    audit(vm);
}

/// `n` random accesses (writes, reads, fetches) from random vCPUs to random pages, then a
/// few repeated writes. A write to a logging slot must exit to the MMU exactly when the
/// page is not writable in the model.
fn run_ops(
    vm: &TestVm,
    host: &vmmu::host::SimHostMemory,
    vcpus: &mut [vmmu::Vcpu],
    models: &mut [SlotModel],
    rng: &mut Rng,
    n: u64,
) {
    let mut written = Vec::new();
    for i in 0..n + 5 {
        let (k, p, kind) = if i < n || written.is_empty() {
            let k = if rng.below(3) == 0 { 1 } else { 0 };
            let p = rng.below(models[k].spec.pages());
            let kind = match rng.below(10) {
                0..=5 => AccessKind::Write,
                6..=8 => AccessKind::Read,
                _ => AccessKind::Fetch,
            };
            (k, p, kind)
        } else {
            // Repeated writes.
            let (k, p) = written[rng.below(written.len() as u64) as usize];
            (k, p, AccessKind::Write)
        };
        let m = &mut models[k];
        let v = &mut vcpus[rng.below(vcpus.len() as u64) as usize];
        let before = v.exits;
        let gpa = m.spec.page_gpa(p) + (rng.below(512) * 8);
        access_ok(vm, v, host, &m.spec, gpa, kind);
        if kind == AccessKind::Write && m.logging {
            assert_eq!(
                v.exits > before,
                !m.writable[p as usize],
                "write to slot {} page {p} by vCPU {}: exits {} -> {}, page writable: {}",
                m.spec.id,
                v.id,
                before,
                v.exits,
                m.writable[p as usize]
            );
            m.bits.insert(p);
            m.writable[p as usize] = true;
            written.push((k, p));
        }
    }
}

/// Harvest every logging slot as `mode` says, checking the report against the model and
/// updating the model. Returns the write-protect methods GET used.
fn harvest(
    vm: &TestVm,
    mode: Mode,
    algos: Algorithms,
    models: &mut [SlotModel],
    rng: &mut Rng,
) -> Vec<DirtyWrprot> {
    let mut methods = Vec::new();
    for m in models.iter_mut().filter(|m| m.logging) {
        let (id, npages) = (m.spec.id, m.spec.pages());
        let nwords = npages.div_ceil(64) as usize;
        // Garbage in, one spare word: every needed word is overwritten, the spare is not.
        let mut out = vec![0xa5a5_a5a5_a5a5_a5a5u64; nwords + 1];
        let shadow_pages = vm.stats().shadow_pages as u64;
        let rep = vm.get_dirty_log(id, &mut out).unwrap();
        assert_eq!(out[nwords], 0xa5a5_a5a5_a5a5_a5a5, "spare word written");
        let got = bitmap_pages(&out[..nwords]);
        assert_eq!(
            got, m.bits,
            "{mode:?} slot {id}: GET reported the wrong pages"
        );
        assert_eq!(rep.dirty_pages, got.len() as u64);
        if mode == Mode::Get {
            let n = got.len() as u64;
            // The write-protect methods (seed 004) are the shadow MMU's.
            match (n, algos.dirty_wrprot, rep.wrprot) {
                _ if is_tdp(vm) => {}
                (0, _, w) => assert_eq!(w, None, "nothing dirty, nothing to protect"),
                (_, DirtyWrprot::Kvm2012, w) => {
                    let want = if n < shadow_pages {
                        DirtyWrprot::PerGfn
                    } else {
                        DirtyWrprot::WalkPages
                    };
                    assert_eq!(
                        w,
                        Some(want),
                        "seed 004's rule: {n} dirty, {shadow_pages} pages"
                    );
                }
                (_, DirtyWrprot::Adaptive, w) => assert!(
                    matches!(w, Some(DirtyWrprot::PerGfn | DirtyWrprot::WalkPages)),
                    "adaptive chose {w:?}"
                ),
                (_, a, w) => assert_eq!(w, Some(a), "configured method not used"),
            }
            methods.extend(rep.wrprot.filter(|w| !methods.contains(w)));
            for &p in &got {
                m.writable[p as usize] = false;
            }
            m.bits.clear();
            continue;
        }
        assert_eq!(rep.wrprot, None, "manual protect: GET only copies");
        assert_eq!(
            bitmap_pages(&dirty_words(vm, id).unwrap()),
            m.bits,
            "manual protect: GET must not clear"
        );
        let chunks = npages.div_ceil(64);
        let mut c = 0;
        while c < chunks {
            let whole = mode == Mode::GetClearWhole;
            let len = if whole {
                chunks
            } else {
                1 + rng.below(chunks - c)
            };
            if whole || rng.below(3) != 0 {
                let first = c * 64;
                let num = (len * 64).min(npages - first);
                let mut mask = out[c as usize..(c + len) as usize].to_vec();
                if !whole {
                    // Extra bits of clean pages (and of pages past the range's end in a
                    // partial last word): clearing them must change nothing.
                    for w in mask.iter_mut() {
                        *w |= rng.next() & rng.next();
                    }
                }
                let range: BTreeSet<u64> = bitmap_pages(&mask)
                    .into_iter()
                    .filter(|&o| o < num)
                    .map(|o| first + o)
                    .collect();
                let hit: Vec<u64> = m.bits.intersection(&range).copied().collect();
                let n = vm.clear_dirty_log(id, first, num, &mask).unwrap();
                assert_eq!(
                    n,
                    hit.len() as u64,
                    "{mode:?} slot {id}: CLEAR [{first}, +{num}) cleared count"
                );
                for p in hit {
                    m.bits.remove(&p);
                    m.writable[p as usize] = false;
                }
                audit(vm);
            }
            c += len;
        }
    }
    methods
}

/// The exact single-threaded dirty_log_test over one mode and one set of algorithms:
/// a THP-backed, 2M-aligned slot that starts without logging (mapped huge, then logging
/// turned on) and a 200-page slot created logging (its bitmap ends in a partial word);
/// rounds of random accesses of different sizes (so seed 004's rule picks both
/// methods), each followed by a harvest; then logging off (huge pages come back, writes
/// are not logged) and on again (a fresh bitmap), and more rounds.
fn exact(mode: Mode, algos: Algorithms, seed: u64) -> Vec<DirtyWrprot> {
    let initially = mode == Mode::InitiallySet;
    let tag = format!("{mode:?} {algos:?}");
    let (host, vm) = new_vm(config(mode.dirty_log(), algos));
    let h0 = mmap(&host, 4 * M1, Backing::Thp);
    let h1 = mmap(&host, 200 * K4, Backing::Page4K);
    let s0 = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 4 * M1,
            hva: h0,
            flags: MemslotFlags::empty(),
        },
    );
    let s1 = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1 + 128 * K4,
            size: 200 * K4,
            hva: h1,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    );
    let mut vcpus = vec![vm.create_vcpu().unwrap(), vm.create_vcpu().unwrap()];
    for i in (0..s0.pages()).step_by(64) {
        let v = &mut vcpus[(i / 64 % 2) as usize];
        access_ok(&vm, v, &host, &s0, s0.page_gpa(i), AccessKind::Write);
    }
    assert_eq!(
        huge_leaves_in(&vm, &s0),
        2,
        "THP slot maps 2M before logging"
    );
    audit(&vm);
    let mut models = [SlotModel::new(s0), SlotModel::new(s1)];
    models[1].start_logging(initially);
    check(&vm, &models, &format!("{tag}: slot created logging"));

    set_logging(&vm, &mut models[0].spec, true);
    huge_pages_gone(&vm, &mut models[0], initially);
    check(&vm, &models, &format!("{tag}: logging on"));

    let mut rng = Rng::new(seed);
    let mut methods = Vec::new();
    for (round, &n) in [8u64, 150, 40, 300, 3, 90].iter().enumerate() {
        run_ops(&vm, &host, &mut vcpus, &mut models, &mut rng, n);
        check(&vm, &models, &format!("{tag}: round {round} writes"));
        for w in harvest(&vm, mode, algos, &mut models, &mut rng) {
            if !methods.contains(&w) {
                methods.push(w);
            }
        }
        check(&vm, &models, &format!("{tag}: round {round} harvest"));
    }

    // Logging off: no bitmap, GET refused, writes not logged, and the 2M pages come back.
    for m in models.iter_mut() {
        set_logging(&vm, &mut m.spec, false);
        m.logging = false;
        let mut out = vec![0u64; 8];
        assert_eq!(
            vm.get_dirty_log(m.spec.id, &mut out),
            Err(Error::NotLogging(m.spec.id))
        );
    }
    check(&vm, &models, &format!("{tag}: logging off"));
    for i in (0..models[0].spec.pages()).step_by(5) {
        let s = models[0].spec;
        access_ok(
            &vm,
            &mut vcpus[0],
            &host,
            &s,
            s.page_gpa(i),
            AccessKind::Write,
        );
    }
    for i in (0..models[1].spec.pages()).step_by(3) {
        let s = models[1].spec;
        access_ok(
            &vm,
            &mut vcpus[1],
            &host,
            &s,
            s.page_gpa(i),
            AccessKind::Write,
        );
        models[1].writable[i as usize] = true;
    }
    assert_eq!(huge_leaves_in(&vm, &models[0].spec), 2, "2M leaves back");
    for i in (0..models[0].spec.pages()).step_by(5) {
        let s = &models[0].spec;
        let gpa = s.page_gpa(i);
        let (_, level, _) = leaf_of(&vm, Gfn(gpa >> 12)).expect("mapped");
        assert_eq!(level, expected_level(&host, s, gpa, Level::L1G));
    }
    check(&vm, &models, &format!("{tag}: writes while not logging"));

    // Logging on again: a fresh bitmap; the huge leaves go again.
    for m in models.iter_mut() {
        set_logging(&vm, &mut m.spec, true);
        m.start_logging(initially);
    }
    huge_pages_gone(&vm, &mut models[0], initially);
    check(&vm, &models, &format!("{tag}: logging on again"));
    for (round, &n) in [60u64, 5].iter().enumerate() {
        run_ops(&vm, &host, &mut vcpus, &mut models, &mut rng, n);
        check(
            &vm,
            &models,
            &format!("{tag}: second phase round {round} writes"),
        );
        for w in harvest(&vm, mode, algos, &mut models, &mut rng) {
            if !methods.contains(&w) {
                methods.push(w);
            }
        }
        check(
            &vm,
            &models,
            &format!("{tag}: second phase round {round} harvest"),
        );
    }
    methods
}

fn exact_all_algorithms(mode: Mode) {
    for (i, algos) in all_algorithms().into_iter().enumerate() {
        let methods = exact(mode, algos, 0x1000 + i as u64);
        if mode == Mode::Get && algos.dirty_wrprot == DirtyWrprot::Kvm2012 && !testing_tdp() {
            assert_eq!(
                methods.len(),
                2,
                "seed 004's rule should have chosen both methods: {methods:?}"
            );
        }
    }
}

#[test]
fn exact_get_every_algorithm() {
    exact_all_algorithms(Mode::Get);
}

#[test]
fn exact_get_clear_whole_slot_every_algorithm() {
    exact_all_algorithms(Mode::GetClearWhole);
}

#[test]
fn exact_get_clear_partial_every_algorithm() {
    exact_all_algorithms(Mode::GetClearPartial);
}

#[test]
fn exact_initially_all_set_every_algorithm() {
    exact_all_algorithms(Mode::InitiallySet);
}

/// The first GET with KVM_DIRTY_LOG_INITIALLY_SET reports every page, written or not,
/// and nothing was write-protected when logging started.
#[test]
fn initially_all_set_reports_everything_first() {
    let (host, vm) = new_vm(config(
        Mode::InitiallySet.dirty_log(),
        Algorithms::default(),
    ));
    let h = mmap(&host, 100 * K4, Backing::Page4K);
    let mut s = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 100 * K4,
            hva: h,
            flags: MemslotFlags::empty(),
        },
    );
    let mut v = vm.create_vcpu().unwrap();
    for i in 0..10 {
        access_ok(&vm, &mut v, &host, &s, s.page_gpa(i), AccessKind::Write);
    }
    set_logging(&vm, &mut s, true);
    audit(&vm);
    assert_eq!(writable_pages(&vm, &s).len(), 10, "nothing protected");
    let exits = v.exits;
    for i in 0..10 {
        access_ok(&vm, &mut v, &host, &s, s.page_gpa(i), AccessKind::Write);
    }
    assert_eq!(v.exits, exits, "writable pages stay writable");
    let mut out = [0u64; 2];
    let rep = vm.get_dirty_log(0, &mut out).unwrap();
    assert_eq!(rep.dirty_pages, 100);
    assert_eq!(out, [u64::MAX, (1 << 36) - 1]);
    assert_eq!(vm.clear_dirty_log(0, 0, 100, &out).unwrap(), 100);
    audit(&vm);
    assert!(writable_pages(&vm, &s).is_empty(), "CLEAR protects");
    assert_eq!(vm.get_dirty_log(0, &mut out).unwrap().dirty_pages, 0);
    access_ok(&vm, &mut v, &host, &s, s.page_gpa(99), AccessKind::Write);
    assert_eq!(v.exits, exits + 1);
    vm.get_dirty_log(0, &mut out).unwrap();
    assert_eq!(out, [0, 1 << 35]);
    audit(&vm);
}

// ---------------------------------------------------------------------------------------
// Concurrent: two writers and a harvester.
// ---------------------------------------------------------------------------------------

fn concurrent(mode: HarvestMode, algorithms: Algorithms, seed: u64) -> Outcome {
    let out = run_concurrent(&Params {
        mode,
        algorithms,
        rounds: 10,
        accesses: 1000,
        seed,
    });
    assert!(out.reported > 0 && out.writes > 0, "{out:?}");
    out
}

#[test]
fn concurrent_get() {
    for (i, dirty_wrprot) in [
        DirtyWrprot::PerGfn,
        DirtyWrprot::WalkPages,
        DirtyWrprot::Adaptive,
    ]
    .into_iter()
    .enumerate()
    {
        let algos = Algorithms {
            dirty_wrprot,
            ..Algorithms::default()
        };
        concurrent(HarvestMode::Get, algos, 11 + i as u64);
    }
    // The quadratic iteration and the 512-entry scan, under the walk.
    concurrent(
        HarvestMode::Get,
        Algorithms {
            rmap_iteration: vmmu::RmapIteration::RestartScan,
            page_wrprot: vmmu::PageWrprot::Scan512,
            dirty_wrprot: DirtyWrprot::WalkPages,
            ..Algorithms::default()
        },
        19,
    );
}

#[test]
fn concurrent_get_clear_whole_slot() {
    concurrent(HarvestMode::GetClear, Algorithms::default(), 21);
    concurrent(
        HarvestMode::GetClear,
        Algorithms {
            rmap_iteration: vmmu::RmapIteration::RestartScan,
            ..Algorithms::default()
        },
        22,
    );
}

#[test]
fn concurrent_get_clear_partial() {
    concurrent(HarvestMode::GetClearPartial, Algorithms::default(), 31);
}

#[test]
fn concurrent_ring() {
    let out = concurrent(HarvestMode::Ring(1024), Algorithms::default(), 41);
    assert_eq!(out.ring_harvested, out.ring_reset);
}

// ---------------------------------------------------------------------------------------
// Huge pages and logging.
// ---------------------------------------------------------------------------------------

/// Logging on: no huge leaf remains and every later fault maps 4K. Logging off: the 4K
/// leaves that could be huge are zapped and re-touching maps huge again (2M on THP, 1G on
/// hugetlb). Under both reverse-map drop and iteration algorithms.
#[test]
fn logging_drops_huge_pages_and_stopping_brings_them_back() {
    for algos in rmap_algorithms() {
        let (host, vm) = new_vm(config(DirtyLogConfig::default(), algos));
        let thp = mmap(&host, 8 * M1, Backing::Thp);
        let g1 = mmap(&host, G1, Backing::HugeTlb1G);
        let mut specs = [
            add_slot(
                &vm,
                SlotSpec {
                    id: 0,
                    gpa: G1,
                    size: 8 * M1,
                    hva: thp,
                    flags: MemslotFlags::empty(),
                },
            ),
            add_slot(
                &vm,
                SlotSpec {
                    id: 1,
                    gpa: 4 * G1,
                    size: G1,
                    hva: g1,
                    flags: MemslotFlags::empty(),
                },
            ),
        ];
        let mut v = vm.create_vcpu().unwrap();
        let touch = |vm: &TestVm, v: &mut vmmu::Vcpu, s: &SlotSpec, step: u64| {
            for i in (0..s.pages()).step_by(step as usize) {
                access_ok(vm, v, &host, s, s.page_gpa(i) + 8, AccessKind::Write);
            }
        };
        touch(&vm, &mut v, &specs[0], 97);
        touch(&vm, &mut v, &specs[1], 4099);
        assert_eq!(huge_leaves_in(&vm, &specs[0]), 4);
        assert_eq!(leaf_counts(&vm), [0, 4, 1]);
        audit(&vm);
        for s in specs.iter_mut() {
            set_logging(&vm, s, true);
            assert_eq!(
                huge_leaves_in(&vm, s),
                0,
                "{algos:?}: huge leaf while logging"
            );
            audit(&vm);
        }
        touch(&vm, &mut v, &specs[0], 97);
        touch(&vm, &mut v, &specs[1], 4099);
        for s in &specs {
            assert_eq!(huge_leaves_in(&vm, s), 0, "{algos:?}: fault mapped huge");
            assert!(leaves_in(&vm, s) > 0);
        }
        check_leaves_against_host(&vm, &host);
        audit(&vm);
        for s in specs.iter_mut() {
            set_logging(&vm, s, false);
            audit(&vm);
        }
        touch(&vm, &mut v, &specs[0], 97);
        touch(&vm, &mut v, &specs[1], 4099);
        assert_eq!(
            leaf_counts(&vm),
            [0, 4, 1],
            "{algos:?}: huge pages came back"
        );
        for s in &specs {
            for i in (0..s.pages()).step_by(97) {
                let gpa = s.page_gpa(i);
                let (_, level, _) = leaf_of(&vm, Gfn(gpa >> 12)).expect("mapped");
                assert_eq!(level, expected_level(&host, s, gpa, Level::L1G));
            }
        }
        check_leaves_against_host(&vm, &host);
        audit(&vm);
    }
}

// ---------------------------------------------------------------------------------------
// Bad input.
// ---------------------------------------------------------------------------------------

/// Everything an error must leave alone: the MMU snapshot and every slot's bitmap.
fn state(vm: &TestVm) -> (Snapshot, Vec<Option<Vec<u64>>>) {
    (snapshot(vm), (0..4).map(|id| dirty_words(vm, id)).collect())
}

/// A VM in `mode` with slot 0 (200 pages, logging, some pages dirty and some of them
/// writable) and slot 1 (not logging).
fn bad_input_vm(dirty_log: DirtyLogConfig) -> TestVm {
    let (host, vm) = new_vm(VmConfig {
        dirty_log,
        ..VmConfig::default()
    });
    let h0 = mmap(&host, 200 * K4, Backing::Page4K);
    let h1 = mmap(&host, 64 * K4, Backing::Page4K);
    let s0 = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 200 * K4,
            hva: h0,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    );
    let s1 = add_slot(
        &vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 64 * K4,
            hva: h1,
            flags: MemslotFlags::empty(),
        },
    );
    let mut v = vm.create_vcpu().unwrap();
    for i in (0..200).step_by(3) {
        access_ok(&vm, &mut v, &host, &s0, s0.page_gpa(i), AccessKind::Write);
    }
    for i in (1..200).step_by(7) {
        access_ok(&vm, &mut v, &host, &s0, s0.page_gpa(i), AccessKind::Read);
    }
    for i in 0..64 {
        access_ok(&vm, &mut v, &host, &s1, s1.page_gpa(i), AccessKind::Write);
    }
    audit(&vm);
    vm
}

#[track_caller]
fn rejects<T: std::fmt::Debug + PartialEq>(
    vm: &TestVm,
    what: &str,
    want: Error,
    f: impl FnOnce() -> Result<T, Error>,
) {
    let before = state(vm);
    let got = f().unwrap_err();
    // The mode errors carry a message; the variant is the contract.
    let same = match (&got, &want) {
        (Error::WrongDirtyLogMode(_), Error::WrongDirtyLogMode(_)) => true,
        (a, b) => a == b,
    };
    assert!(same, "{what}: got {got:?}, want {want:?}");
    assert_eq!(state(vm), before, "{what} changed something");
    audit(vm);
}

#[test]
fn clear_dirty_log_rejects_bad_input_and_changes_nothing() {
    let vm = bad_input_vm(DirtyLogConfig {
        manual_protect: true,
        ..DirtyLogConfig::default()
    });
    let all = [u64::MAX; 8];
    rejects(
        &vm,
        "first_page not a multiple of 64",
        Error::ClearLogUnaligned { first_page: 1 },
        || vm.clear_dirty_log(0, 1, 64, &all),
    );
    rejects(
        &vm,
        "first_page 32",
        Error::ClearLogUnaligned { first_page: 32 },
        || vm.clear_dirty_log(0, 32, 64, &all),
    );
    let range = |first_page, num_pages| Error::ClearLogRange {
        first_page,
        num_pages,
        npages: 200,
    };
    rejects(&vm, "first_page past the slot", range(256, 64), || {
        vm.clear_dirty_log(0, 256, 64, &all)
    });
    rejects(
        &vm,
        "range runs past the slot's end",
        range(192, 64),
        || vm.clear_dirty_log(0, 192, 64, &all),
    );
    rejects(&vm, "whole slot plus one", range(0, 201), || {
        vm.clear_dirty_log(0, 0, 201, &all)
    });
    rejects(
        &vm,
        "num_pages not a multiple of 64, short of the end",
        range(0, 100),
        || vm.clear_dirty_log(0, 0, 100, &all),
    );
    rejects(&vm, "num_pages 65 from 64", range(64, 65), || {
        vm.clear_dirty_log(0, 64, 65, &all)
    });
    rejects(&vm, "huge num_pages", range(64, u64::MAX), || {
        vm.clear_dirty_log(0, 64, u64::MAX, &all)
    });
    rejects(
        &vm,
        "short bitmap",
        Error::BitmapTooSmall { needed: 4, got: 3 },
        || vm.clear_dirty_log(0, 0, 200, &all[..3]),
    );
    rejects(
        &vm,
        "short bitmap for a tail range",
        Error::BitmapTooSmall { needed: 2, got: 1 },
        || vm.clear_dirty_log(0, 128, 72, &all[..1]),
    );
    rejects(&vm, "slot not logging", Error::NotLogging(1), || {
        vm.clear_dirty_log(1, 0, 64, &all)
    });
    rejects(&vm, "unknown slot", Error::NoSuchSlot(3), || {
        vm.clear_dirty_log(3, 0, 64, &all)
    });
    // The edges that are valid: an empty range, a tail range that is not a multiple of 64.
    assert_eq!(vm.clear_dirty_log(0, 192, 0, &[]).unwrap(), 0);
    assert_eq!(vm.clear_dirty_log(0, 192, 8, &[u64::MAX]).unwrap(), 3);
    audit(&vm);
}

#[test]
fn get_dirty_log_rejects_bad_input_and_changes_nothing() {
    for manual_protect in [false, true] {
        let vm = bad_input_vm(DirtyLogConfig {
            manual_protect,
            ..DirtyLogConfig::default()
        });
        let mut short = [0u64; 3];
        rejects(
            &vm,
            "short buffer",
            Error::BitmapTooSmall { needed: 4, got: 3 },
            || vm.get_dirty_log(0, &mut short),
        );
        assert_eq!(short, [0; 3], "short buffer written");
        let mut buf = [0u64; 8];
        rejects(&vm, "slot not logging", Error::NotLogging(1), || {
            vm.get_dirty_log(1, &mut buf)
        });
        rejects(&vm, "unknown slot", Error::NoSuchSlot(2), || {
            vm.get_dirty_log(2, &mut buf)
        });
        if !manual_protect {
            rejects(
                &vm,
                "CLEAR without manual protect",
                Error::WrongDirtyLogMode(""),
                || vm.clear_dirty_log(0, 0, 200, &[u64::MAX; 4]),
            );
        }
        rejects(
            &vm,
            "ring calls in a bitmap VM",
            Error::WrongDirtyLogMode(""),
            || vm.reset_dirty_rings(),
        );
        let mut entries = Vec::new();
        rejects(
            &vm,
            "harvest in a bitmap VM",
            Error::WrongDirtyLogMode(""),
            || vm.harvest_dirty_ring(0, &mut entries),
        );
        // And the good call still reports the 67 pages written.
        assert_eq!(vm.get_dirty_log(0, &mut buf).unwrap().dirty_pages, 67);
        audit(&vm);
    }
}

#[test]
fn dirty_ranges_are_the_bitmaps_runs_and_clear_by_ranges_reprotects() {
    use vmmu::DirtyRange;
    let run = |first_page, npages| DirtyRange { first_page, npages };
    for manual_protect in [false, true] {
        let vm = bad_input_vm(DirtyLogConfig {
            manual_protect,
            ..DirtyLogConfig::default()
        });
        // bad_input_vm wrote every third page of slot 0's 200: runs of one page.
        let mut ranges = Vec::new();
        let rep = vm.get_dirty_ranges(0, &mut ranges).unwrap();
        assert_eq!(rep.dirty_pages, 67);
        assert_eq!(
            ranges,
            (0..200).step_by(3).map(|p| run(p, 1)).collect::<Vec<_>>()
        );
        audit(&vm);
        let mut again = Vec::new();
        vm.get_dirty_ranges(0, &mut again).unwrap();
        if !manual_protect {
            // Taken and re-protected, as GET does: the next write faults and is logged.
            assert!(again.is_empty());
        } else {
            assert_eq!(again, ranges, "manual protect only copies");
            // Bad ranges: a typed error before anything changes.
            let range = |first_page, num_pages| Error::ClearLogRange {
                first_page,
                num_pages,
                npages: 200,
            };
            rejects(&vm, "range past the end", range(190, 11), || {
                vm.clear_dirty_ranges(0, &[run(0, 3), run(190, 11)])
            });
            rejects(&vm, "first page past the end", range(201, 0), || {
                vm.clear_dirty_ranges(0, &[run(201, 0)])
            });
            rejects(&vm, "huge length", range(3, u64::MAX), || {
                vm.clear_dirty_ranges(0, &[run(3, u64::MAX)])
            });
            rejects(&vm, "slot not logging", Error::NotLogging(1), || {
                vm.clear_dirty_ranges(1, &[run(0, 1)])
            });
            // Unordered, overlapping, across words: pages 60..=70 hold 60, 63, 66, 69.
            assert_eq!(
                vm.clear_dirty_ranges(0, &[run(64, 7), run(60, 8)]).unwrap(),
                4
            );
            assert_eq!(vm.clear_dirty_ranges(0, &[run(60, 11)]).unwrap(), 0);
            audit(&vm);
            let mut left = Vec::new();
            vm.get_dirty_ranges(0, &mut left).unwrap();
            assert_eq!(left.len(), 63);
            assert!(left.iter().all(|r| !(60..=70).contains(&r.first_page)));
        }
    }
    // A write to a re-protected page is logged again; neighbours coalesce into one run.
    let (host, vm) = new_vm(VmConfig {
        dirty_log: DirtyLogConfig {
            manual_protect: true,
            ..DirtyLogConfig::default()
        },
        ..VmConfig::default()
    });
    let h = mmap(&host, 512 * K4, Backing::Page4K);
    let s = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 512 * K4,
            hva: h,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    );
    let mut v = vm.create_vcpu().unwrap();
    for p in (60..140).chain(300..301) {
        access_ok(&vm, &mut v, &host, &s, s.page_gpa(p), AccessKind::Write);
    }
    let mut got = Vec::new();
    vm.get_dirty_ranges(0, &mut got).unwrap();
    assert_eq!(got, [run(60, 80), run(300, 1)]);
    assert_eq!(vm.clear_dirty_ranges(0, &got).unwrap(), 81);
    audit(&vm);
    let exits = v.exits;
    access_ok(&vm, &mut v, &host, &s, s.page_gpa(100), AccessKind::Write);
    assert_eq!(
        v.exits,
        exits + 1,
        "the cleared page was write-protected again"
    );
    got.clear();
    vm.get_dirty_ranges(0, &mut got).unwrap();
    assert_eq!(got, [run(100, 1)]);
    // Not manual protect: CLEAR by ranges is a mode error.
    let (_, get_vm) = new_vm(VmConfig::default());
    assert!(matches!(
        get_vm.clear_dirty_ranges(0, &[]),
        Err(Error::WrongDirtyLogMode(_))
    ));
}
