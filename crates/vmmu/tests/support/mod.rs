//! Helpers for the dirty-log, dirty-ring and notifier tests: the algorithm sets to run
//! over, views of the dirty bitmap and of the writable leaves (read under the MMU lock),
//! and the concurrent harness that checks the properties of KVM's `dirty_log_test`.
//!
//! Used next to `common` (each test file declares `mod common; mod support;`).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};

use crate::common::*;
use vmmu::host::{Backing, HostMemory};
use vmmu::types::{Gpa, Hva, Level, PAGE_SIZE};
use vmmu::DirtyGfn;
use vmmu::{
    Algorithms, DirtyLogConfig, DirtyWrprot, Exit, MemslotFlags, PageWrprot, RmapDrop,
    RmapIteration, VmConfig,
};

/// Every combination of the seeds' algorithm switches (2 x 2 x 2 x 4 = 32).
pub fn all_algorithms() -> Vec<Algorithms> {
    let mut v = Vec::new();
    for rmap_iteration in [RmapIteration::RestartScan, RmapIteration::Iterator] {
        for rmap_drop in [RmapDrop::OneByOne, RmapDrop::Destroy] {
            for page_wrprot in [PageWrprot::Scan512, PageWrprot::Bitmap] {
                for dirty_wrprot in [
                    DirtyWrprot::PerGfn,
                    DirtyWrprot::WalkPages,
                    DirtyWrprot::Kvm2012,
                    DirtyWrprot::Adaptive,
                ] {
                    v.push(Algorithms {
                        rmap_iteration,
                        rmap_drop,
                        page_wrprot,
                        dirty_wrprot,
                    });
                }
            }
        }
    }
    v
}

/// The reverse-map switches (drop x iteration), the rest at their defaults.
pub fn rmap_algorithms() -> Vec<Algorithms> {
    let mut v = Vec::new();
    for rmap_iteration in [RmapIteration::RestartScan, RmapIteration::Iterator] {
        for rmap_drop in [RmapDrop::OneByOne, RmapDrop::Destroy] {
            v.push(Algorithms {
                rmap_iteration,
                rmap_drop,
                ..Algorithms::default()
            });
        }
    }
    v
}

/// A VM configuration with these dirty-log settings and algorithms.
pub fn config(dirty_log: DirtyLogConfig, algorithms: Algorithms) -> VmConfig {
    VmConfig {
        dirty_log,
        algorithms,
        ..VmConfig::default()
    }
}

/// The words of slot `id`'s dirty bitmap, read under the MMU lock (`None` while the slot
/// does not log).
pub fn dirty_words(vm: &TestVm, id: u32) -> Option<Vec<u64>> {
    with_slots(vm, |slots| {
        slots
            .by_id(id)
            .and_then(|s| s.dirty_bitmap())
            .map(|b| b.words().iter().map(|w| w.load(Ordering::SeqCst)).collect())
    })
}

/// The page offsets whose bits are set.
pub fn bitmap_pages(words: &[u64]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (k, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            out.insert(64 * k as u64 + w.trailing_zeros() as u64);
            w &= w - 1;
        }
    }
    out
}

/// A bitmap of `npages` pages with `pages` set.
pub fn pages_bitmap<'a>(pages: impl IntoIterator<Item = &'a u64>, npages: u64) -> Vec<u64> {
    let mut w = vec![0u64; npages.div_ceil(64) as usize];
    for &p in pages {
        assert!(p < npages, "page {p} outside a bitmap of {npages}");
        w[(p / 64) as usize] |= 1 << (p % 64);
    }
    w
}

/// Offsets (pages from the slot's start) of slot `spec`'s writable 4K leaves.
pub fn writable_pages(vm: &TestVm, spec: &SlotSpec) -> BTreeSet<u64> {
    writable_pages_in(&leaves(vm), spec)
}

/// [`writable_pages`] over leaves already collected.
pub fn writable_pages_in(
    leaves: &std::collections::BTreeMap<(u64, Level), vmmu::spte::Spte>,
    spec: &SlotSpec,
) -> BTreeSet<u64> {
    let (lo, hi) = (spec.base_gfn().0, spec.end_gfn().0);
    leaves
        .iter()
        .map(|(&k, &v)| (k, v))
        .filter(|&((g, level), spte)| {
            g >= lo && g < hi && spte.is_writable() && {
                assert_eq!(level, Level::L4K, "writable huge leaf at gfn {g:#x}");
                true
            }
        })
        .map(|((g, _), _)| g - lo)
        .collect()
}

/// Leaves above 4K that map gfns of `spec`.
pub fn huge_leaves_in(vm: &TestVm, spec: &SlotSpec) -> usize {
    huge_leaves_of(&leaves(vm), spec)
}

/// [`huge_leaves_in`] over leaves already collected.
pub fn huge_leaves_of(
    leaves: &std::collections::BTreeMap<(u64, Level), vmmu::spte::Spte>,
    spec: &SlotSpec,
) -> usize {
    let (lo, hi) = (spec.base_gfn().0, spec.end_gfn().0);
    leaves
        .keys()
        .filter(|&&(g, level)| level > Level::L4K && g < hi && g + level.pages() > lo)
        .count()
}

/// Leaves (any level) that map gfns of `spec`.
pub fn leaves_in(vm: &TestVm, spec: &SlotSpec) -> usize {
    let (lo, hi) = (spec.base_gfn().0, spec.end_gfn().0);
    leaves(vm)
        .keys()
        .filter(|&&(g, level)| g < hi && g + level.pages() > lo)
        .count()
}

/// `spec` with LOG_DIRTY_PAGES set or cleared, applied to the VM.
#[track_caller]
pub fn set_logging(vm: &TestVm, spec: &mut SlotSpec, on: bool) {
    let log = MemslotFlags::LOG_DIRTY_PAGES;
    let ro = spec.flags.contains(MemslotFlags::READONLY);
    spec.flags = match (on, ro) {
        (true, true) => log | MemslotFlags::READONLY,
        (true, false) => log,
        (false, true) => MemslotFlags::READONLY,
        (false, false) => MemslotFlags::empty(),
    };
    vm.set_user_memory_region(spec.region())
        .unwrap_or_else(|e| panic!("set logging {on} on slot {}: {e}", spec.id));
}

// ---------------------------------------------------------------------------------------
// The concurrent dirty_log_test harness.
// ---------------------------------------------------------------------------------------

/// How the harvester collects dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HarvestMode {
    /// `get_dirty_log` in the default mode (returns and clears, re-protects).
    Get,
    /// Manual protect: `get_dirty_log` copies, then `clear_dirty_log` of every page got.
    GetClear,
    /// Manual protect: `get_dirty_log` copies, then `clear_dirty_log` of random 64-page
    /// aligned runs only (the pages outside stay set and are reported again).
    GetClearPartial,
    /// Dirty rings of this many entries: harvest every vCPU's ring, then reset.
    Ring(u32),
}

/// One concurrent run.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// The harvest mode.
    pub mode: HarvestMode,
    /// The algorithms.
    pub algorithms: Algorithms,
    /// Rounds (each: writers write, the harvester collects mid-round and after).
    pub rounds: u64,
    /// Accesses per writer per round (about one in five is a read).
    pub accesses: u64,
    /// Seed for the writers' and the harvester's choices.
    pub seed: u64,
}

/// What a concurrent run did (for the test to check that it exercised what it claims).
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Harvests in all.
    pub harvests: u64,
    /// Harvests that completed while writers were still writing in their round.
    pub mid_round_harvests: u64,
    /// Completed writes.
    pub writes: u64,
    /// Pages reported (summed over harvests).
    pub reported: u64,
    /// DirtyRingFull exits the writers saw.
    pub ring_full_exits: u64,
    /// Ring entries harvested / reset.
    pub ring_harvested: u64,
    /// Ring entries reset.
    pub ring_reset: u64,
}

/// A completed write: the page, and the phase read just before it started and just
/// after it completed (see [`run_concurrent`]).
#[derive(Clone, Copy, Debug)]
struct WriteRec {
    page: u32,
    start: u64,
    end: u64,
}

/// The harvest phase counter: `2k - 1` while harvest `k` runs, `2k` once it has completed.
/// Read with a read-modify-write so that a read ordered before the harvester's increment
/// in the counter's modification order also happens before it (the writer's RMW heads a
/// release sequence the harvester's acquiring increment reads from), and a read that sees
/// an increment happens after it: "before" and "after" below are real orders.
struct Phase(AtomicU64);

impl Phase {
    fn read(&self) -> u64 {
        self.0.fetch_add(0, Ordering::SeqCst)
    }
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The two logging slots of the concurrent run, with pages numbered globally.
struct Layout {
    slots: Vec<SlotSpec>,
    /// Global number of each slot's first page.
    first: Vec<u64>,
    /// The host frame behind every global page (the host does not change in these runs).
    pfn: Vec<u64>,
}

impl Layout {
    fn new(vm: &TestVm, host: &vmmu::host::SimHostMemory) -> Layout {
        let log = MemslotFlags::LOG_DIRTY_PAGES;
        let h0 = mmap(host, 2 * M1, Backing::Page4K);
        let h1 = mmap(host, 200 * K4, Backing::Page4K);
        let slots = vec![
            add_slot(
                vm,
                SlotSpec {
                    id: 3,
                    gpa: G1,
                    size: 2 * M1,
                    hva: h0,
                    flags: log,
                },
            ),
            // 200 pages: the last bitmap word is partial.
            add_slot(
                vm,
                SlotSpec {
                    id: 5,
                    gpa: 2 * G1 + 64 * K4,
                    size: 200 * K4,
                    hva: h1,
                    flags: log,
                },
            ),
        ];
        let mut first = Vec::new();
        let mut pfn = Vec::new();
        for s in &slots {
            first.push(pfn.len() as u64);
            for i in 0..s.pages() {
                pfn.push(host.translate(Hva(s.hva + i * PAGE_SIZE)).unwrap().pfn.0);
            }
        }
        Layout { slots, first, pfn }
    }
    fn pages(&self) -> u64 {
        self.pfn.len() as u64
    }
    fn gpa(&self, p: u64) -> u64 {
        let k = self.first.partition_point(|&f| f <= p) - 1;
        self.slots[k].page_gpa(p - self.first[k])
    }
    fn global(&self, slot: u32, offset: u64) -> Option<u64> {
        let k = self.slots.iter().position(|s| s.id == slot)?;
        (offset < self.slots[k].pages()).then(|| self.first[k] + offset)
    }
}

/// Errors seen by the threads. A thread that fails records why and carries on (skipping
/// work), so the others never wait at a barrier for it; the test asserts at the end.
#[derive(Default)]
struct Failures {
    failed: AtomicBool,
    msgs: Mutex<Vec<String>>,
}

impl Failures {
    fn fail(&self, msg: String) {
        self.failed.store(true, Ordering::SeqCst);
        let mut m = self.msgs.lock().unwrap();
        if m.len() < 20 {
            m.push(msg);
        }
    }
    fn any(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

/// KVM's `dirty_log_test`, with the CPU model: two writer threads (one vCPU each) write
/// the current round number into random pages of two logging slots, while a harvester
/// thread collects dirty pages mid-round (it harvests in a loop while the writers run, and
/// each writer waits at its half-way point for a harvest to complete) and again after the
/// writers have stopped. At that quiescent point the harvester checks that its copy of
/// guest memory equals guest memory, runs the audit, and (except with partial clears)
/// checks that no leaf of the slots is writable; then the next round starts.
///
/// Guest memory is modelled by one `AtomicU64` per page. A writer stores the round into it
/// *before* its `vm.write` call: the data of a guest store lands while the instruction
/// executes, so before the access returns. (Storing after the return would let a harvest
/// that correctly reported the write, and its copy, run between the return and the store.)
/// After each harvest the harvester copies every reported page (the migration's copy).
///
/// Harvest `k` (from 1) runs while the phase counter is `2k - 1`. A writer reads the phase
/// before a write starts (`s`) and after it completes (`e`). Properties checked at the end:
///
/// - **No lost write**: a write is reported by some harvest `k` with
///   `s / 2 < k <= ceil(e / 2) + 1`: by a harvest that had not completed when the write
///   started, and no later than the first harvest to start after the write completed.
///   Why KVM semantics guarantee it: the translation the write completes through is
///   writable, so either the page's bit (ring entry) is set, and the next harvest to read
///   the bitmap (ring) reports it, or a harvest has already taken the bit and has not yet
///   finished write-protecting and flushing (its flush waits for the vCPU to leave guest
///   mode, i.e. for the write to complete), and that harvest reported it.
/// - **No stale report**: a page reported by harvest `k` had a write that started before
///   harvest `k` ended (`s <= 2k - 1`) and completed after harvest `j` started
///   (`e >= 2j - 1`), where `j` is the last harvest before `k` that cleared the page:
///   `k - 1` for GET (it takes every bit) and rings (each harvest reads every ring); for
///   manual protect, the last CLEAR that covered the page while it was reported (none:
///   any write). A write marks the page (a fault) before it completes, and after the
///   clear that preceded the mark; a write whose fault was in flight during harvest
///   `k - 1` may legitimately be reported by `k`, which is why the bound is on the
///   write's completion, not its start.
/// - **Copies**: at every quiescent point, the copy equals guest memory (the
///   `dirty_log_test` check).
/// - **Ring accounting**: each reset frees exactly the entries harvested just before, so
///   the entries reset equal the entries harvested.
///
/// Bounded by counts: rounds and accesses; the harvester loops only while writers are
/// writing, and a writer waits only for a harvest, which the harvester then makes.
pub fn run_concurrent(p: &Params) -> Outcome {
    const WRITERS: usize = 2;
    let dirty_log = match p.mode {
        HarvestMode::Get => DirtyLogConfig::default(),
        HarvestMode::GetClear | HarvestMode::GetClearPartial => DirtyLogConfig {
            manual_protect: true,
            ..DirtyLogConfig::default()
        },
        HarvestMode::Ring(n) => DirtyLogConfig {
            ring_size: Some(n),
            ..DirtyLogConfig::default()
        },
    };
    let (host, vm) = new_vm(config(dirty_log, p.algorithms));
    let layout = Layout::new(&vm, &host);
    let npages = layout.pages();
    let mem: Vec<AtomicU64> = (0..npages).map(|_| AtomicU64::new(0)).collect();
    let phase = Phase(AtomicU64::new(0));
    let done = AtomicU64::new(0);
    let round_end = Barrier::new(WRITERS + 1);
    let failures = Failures::default();
    let mut vcpus: Vec<_> = (0..WRITERS).map(|_| vm.create_vcpu().unwrap()).collect();

    let (write_logs, harvested) = std::thread::scope(|sc| {
        let mut writers = Vec::new();
        for (t, vcpu) in vcpus.iter_mut().enumerate() {
            let (vm, layout, mem, phase, done, round_end, failures) =
                (&vm, &layout, &mem, &phase, &done, &round_end, &failures);
            writers.push(sc.spawn(move || {
                let mut rng = Rng::new(p.seed ^ (0x9e37_79b9 * (t as u64 + 1)));
                let mut log = Vec::new();
                let mut ring_full = 0u64;
                for round in 1..=p.rounds {
                    for n in 0..p.accesses {
                        if n == p.accesses / 2 {
                            // Mid-round: wait for a harvest to complete while we write.
                            let now = phase.read();
                            let need = if now % 2 == 0 { now + 2 } else { now + 1 };
                            while phase.read() < need && !failures.any() {
                                std::thread::yield_now();
                            }
                        }
                        let page = rng.below(npages);
                        let gpa = layout.gpa(page) + (rng.below(PAGE_SIZE) & !7);
                        let write = rng.below(5) != 0;
                        if write {
                            mem[page as usize].store(round, Ordering::SeqCst);
                        }
                        let start = phase.read();
                        let kind = if write {
                            vmmu::types::AccessKind::Write
                        } else {
                            vmmu::types::AccessKind::Read
                        };
                        let res = loop {
                            match vm.access(vcpu, Gpa(gpa), kind) {
                                Err(Exit::DirtyRingFull) if !failures.any() => {
                                    // KVM_EXIT_DIRTY_RING_FULL: wait for the harvester's
                                    // reset, then run the access again.
                                    ring_full += 1;
                                    std::thread::yield_now();
                                }
                                r => break r,
                            }
                        };
                        let end = phase.read();
                        let want = layout.pfn[page as usize] * PAGE_SIZE + gpa % PAGE_SIZE;
                        match res {
                            Ok(hpa) if hpa.0 == want => {
                                if write {
                                    log.push(WriteRec {
                                        page: page as u32,
                                        start,
                                        end,
                                    });
                                }
                            }
                            other => failures.fail(format!(
                                "writer {t}: {kind:?} gpa {gpa:#x}: {other:?}, want hpa {want:#x}"
                            )),
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    round_end.wait();
                }
                (log, ring_full)
            }));
        }

        let harvester = {
            let (vm, layout, mem, phase, done, round_end, failures) =
                (&vm, &layout, &mem, &phase, &done, &round_end, &failures);
            sc.spawn(move || {
                let mut h = Harvester {
                    vm,
                    layout,
                    mode: p.mode,
                    rng: Rng::new(p.seed ^ 0x5151),
                    k: 0,
                    reports: vec![Vec::new(); npages as usize],
                    obligations: Vec::new(),
                    last_cleared: vec![0; npages as usize],
                    copy: vec![0; npages as usize],
                    outcome: Outcome::default(),
                };
                for round in 1..=p.rounds {
                    let target = WRITERS as u64 * round;
                    loop {
                        let active = done.load(Ordering::SeqCst) < target;
                        if let Err(e) = h.harvest(phase, mem) {
                            failures.fail(format!("round {round} harvest {}: {e}", h.k));
                        }
                        if !active || failures.any() {
                            break;
                        }
                        // This harvest started while writers were still in the round.
                        // (Counting after it would race with writers finishing: they wait
                        // mid-round for a harvest, so every round has at least one.)
                        h.outcome.mid_round_harvests += 1;
                        std::thread::yield_now();
                    }
                    // The writers have stopped (they wait at the barrier): harvest again.
                    if let Err(e) = h.harvest(phase, mem).and_then(|()| h.quiescent(mem)) {
                        failures.fail(format!("round {round}, writers stopped: {e}"));
                    }
                    round_end.wait();
                }
                h
            })
        };
        let logs: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        let h = harvester.join().unwrap();
        (logs, h)
    });
    let msgs = failures.msgs.into_inner().unwrap();
    assert!(msgs.is_empty(), "{:?}: {}", p.mode, msgs.join("\n"));

    let mut out = harvested.outcome;
    let mut writes_by_page: Vec<Vec<WriteRec>> = vec![Vec::new(); npages as usize];
    for (log, full) in &write_logs {
        out.ring_full_exits += full;
        out.writes += log.len() as u64;
        for w in log {
            writes_by_page[w.page as usize].push(*w);
        }
    }
    // No lost write.
    for (page, ws) in writes_by_page.iter().enumerate() {
        let reports = &harvested.reports[page];
        for w in ws {
            let (lo, hi) = (w.start / 2 + 1, w.end.div_ceil(2) + 1);
            let i = reports.partition_point(|&k| k < lo);
            assert!(
                reports.get(i).is_some_and(|&k| k <= hi),
                "{:?}: lost write: page {page} (gpa {:#x}) written between phases {} and {} \
                 must be reported by a harvest in [{lo}, {hi}]; reported by {reports:?}",
                p.mode,
                layout.gpa(page as u64),
                w.start,
                w.end
            );
        }
    }
    // No stale report.
    for &(k, j, page) in &harvested.obligations {
        let ok = writes_by_page[page as usize]
            .iter()
            .any(|w| w.start < 2 * k && w.end + 1 >= 2 * j);
        assert!(
            ok,
            "{:?}: stale report: page {page} (gpa {:#x}) reported by harvest {k} without a \
             write that completed after harvest {j} started and started before harvest {k} \
             ended; writes (start, end): {:?}",
            p.mode,
            layout.gpa(page as u64),
            writes_by_page[page as usize]
                .iter()
                .map(|w| (w.start, w.end))
                .collect::<Vec<_>>()
        );
    }
    if let HarvestMode::Ring(_) = p.mode {
        assert_eq!(
            out.ring_harvested, out.ring_reset,
            "entries reset != entries harvested"
        );
    }
    assert!(
        out.mid_round_harvests >= p.rounds,
        "{:?}: only {} mid-round harvests in {} rounds",
        p.mode,
        out.mid_round_harvests,
        p.rounds
    );
    audit(&vm);
    out
}

struct Harvester<'a> {
    vm: &'a TestVm,
    layout: &'a Layout,
    mode: HarvestMode,
    rng: Rng,
    /// Harvests done.
    k: u64,
    /// Per global page: the harvests that reported it, increasing.
    reports: Vec<Vec<u64>>,
    /// (k, j, page): page reported by harvest k, last cleared by harvest j (0: never).
    obligations: Vec<(u64, u64, u32)>,
    /// Per page: the last harvest whose clear cleared it (0: none).
    last_cleared: Vec<u64>,
    /// The migration's copy of guest memory.
    copy: Vec<u64>,
    outcome: Outcome,
}

impl Harvester<'_> {
    /// One harvest: reported pages (global numbers) and the pages it cleared.
    fn collect(&mut self) -> Result<(BTreeSet<u64>, BTreeSet<u64>), String> {
        let mut reported = BTreeSet::new();
        let mut cleared = BTreeSet::new();
        match self.mode {
            HarvestMode::Ring(_) => {
                let mut entries: Vec<DirtyGfn> = Vec::new();
                let mut n = 0;
                for v in 0..2u32 {
                    n += self
                        .vm
                        .harvest_dirty_ring(v, &mut entries)
                        .map_err(|e| format!("harvest vCPU {v}: {e}"))?;
                }
                if n != entries.len() {
                    return Err(format!("harvest said {n}, gave {}", entries.len()));
                }
                let reset = self.vm.reset_dirty_rings().map_err(|e| e.to_string())?;
                if reset != n {
                    return Err(format!("reset {reset} entries after harvesting {n}"));
                }
                self.outcome.ring_harvested += n as u64;
                self.outcome.ring_reset += reset as u64;
                for e in entries {
                    let g = self
                        .layout
                        .global(e.slot, e.offset)
                        .ok_or_else(|| format!("ring entry {e:?} outside the slots"))?;
                    reported.insert(g);
                    cleared.insert(g);
                }
            }
            mode => {
                for (k, s) in self.layout.slots.iter().enumerate() {
                    let base = self.layout.first[k];
                    let npages = s.pages();
                    let mut words = vec![0u64; npages.div_ceil(64) as usize];
                    let rep = self
                        .vm
                        .get_dirty_log(s.id, &mut words)
                        .map_err(|e| format!("get slot {}: {e}", s.id))?;
                    let got = bitmap_pages(&words);
                    if got.iter().any(|&o| o >= npages) {
                        return Err(format!("slot {}: bit past the slot's end", s.id));
                    }
                    if rep.dirty_pages != got.len() as u64 {
                        return Err(format!(
                            "slot {}: report says {} dirty, bitmap has {}",
                            s.id,
                            rep.dirty_pages,
                            got.len()
                        ));
                    }
                    reported.extend(got.iter().map(|o| base + o));
                    if mode == HarvestMode::Get {
                        cleared.extend(got.iter().map(|o| base + o));
                        continue;
                    }
                    // Clear: the whole slot, or 64-page-aligned runs chosen at random
                    // (each run ends at a chunk boundary or at the slot's end).
                    let chunks = npages.div_ceil(64);
                    let mut c = 0;
                    while c < chunks {
                        let whole = mode == HarvestMode::GetClear;
                        let take = whole || self.rng.below(2) == 0;
                        let len = if whole {
                            chunks
                        } else {
                            1 + self.rng.below(chunks - c)
                        };
                        if take {
                            let first = c * 64;
                            let num = (len * 64).min(npages - first);
                            let mask = &words[c as usize..(c + len) as usize];
                            let want =
                                bitmap_pages(mask).into_iter().filter(|&o| o < num).count() as u64;
                            let n =
                                self.vm
                                    .clear_dirty_log(s.id, first, num, mask)
                                    .map_err(|e| {
                                        format!("clear slot {} [{first}, +{num}): {e}", s.id)
                                    })?;
                            if n != want {
                                return Err(format!(
                                    "clear slot {} [{first}, +{num}) cleared {n}, want {want}",
                                    s.id
                                ));
                            }
                            cleared.extend(
                                bitmap_pages(mask)
                                    .into_iter()
                                    .filter(|&o| o < num)
                                    .map(|o| base + first + o),
                            );
                        }
                        c += len;
                    }
                }
            }
        }
        Ok((reported, cleared))
    }

    fn harvest(&mut self, phase: &Phase, mem: &[AtomicU64]) -> Result<(), String> {
        phase.bump();
        self.k += 1;
        let r = self.collect();
        phase.bump();
        let (reported, cleared) = r?;
        let k = self.k;
        for &g in &reported {
            let j = match self.mode {
                HarvestMode::Get | HarvestMode::Ring(_) => k - 1,
                _ => self.last_cleared[g as usize],
            };
            self.obligations.push((k, j, g as u32));
            self.reports[g as usize].push(k);
            // The copy, after the harvest (and its clear) completed.
            self.copy[g as usize] = mem[g as usize].load(Ordering::SeqCst);
        }
        for &g in &cleared {
            self.last_cleared[g as usize] = k;
        }
        self.outcome.harvests += 1;
        self.outcome.reported += reported.len() as u64;
        Ok(())
    }

    /// Checks while the writers are stopped, right after a harvest.
    fn quiescent(&mut self, mem: &[AtomicU64]) -> Result<(), String> {
        for (g, m) in mem.iter().enumerate() {
            let m = m.load(Ordering::SeqCst);
            if self.copy[g] != m {
                return Err(format!(
                    "page {g} (gpa {:#x}): guest memory holds round {m}, the copy round {}: \
                     a write was never reported",
                    self.layout.gpa(g as u64),
                    self.copy[g]
                ));
            }
        }
        self.vm.audit().map_err(|e| e.to_string())?;
        if self.mode != HarvestMode::GetClearPartial {
            for s in &self.layout.slots {
                let w = writable_pages(self.vm, s);
                if !w.is_empty() {
                    return Err(format!(
                        "slot {}: pages {w:?} still writable after the final harvest",
                        s.id
                    ));
                }
            }
        }
        Ok(())
    }
}
