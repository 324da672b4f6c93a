//! The concurrent soak: one VM at a time, many threads at once, for a bounded time.
//!
//! Each VM ("phase") runs one MMU and one dirty-log mode (GET; GET + CLEAR of the whole
//! slot; GET + CLEAR of random 64-page runs; rings), rotating, over three slots:
//!
//! - A (slot 0): 8 MiB of THP at 1 GiB, whose dirty logging the memslot thread turns on
//!   and off;
//! - B (slot 1): 4 MiB of 4K pages at 1 GiB + 16 MiB, logging all along; the harvester
//!   collects it; the host remaps its first 64 pages now and then (inside an
//!   invalidation, or followed by `change_pte`);
//! - C (slot 2): 2 MiB of THP that the memslot thread creates, moves between three bases,
//!   re-flags and deletes.
//!
//! Threads: `vcpus` vCPU threads fault and write (60%), read and fetch at random pages of
//! all three, through the run loop on the CPU model (`Vm::model_run`): each stays in
//! guest mode across accesses (its whole round by default, `SoakConfig::stretch`), and
//! leaves it only when a remote flush kicks it or an access exits; a harvester; a notifier thread unmapping, aging, test-aging and remapping;
//! a memslot thread changing A's and C's slots and zapping ranges, everything, fast.
//! Each access is checked as it returns: the host's frame for A, B and C (for a remapped
//! page of B: one of the frames it had; for C: the frame at one of its bases, or MMIO).
//!
//! The run is cut into rounds of `round_ms`; at the end of each, every thread stops at a
//! barrier (a quiescent point) and the main thread checks: the audit; a final harvest, after
//! which every page of B written in the round must have been reported (no lost write) and
//! nothing reported that was not written; every leaf under every root against the
//! reference model (host frame, never more permissive, writable only where logged); every
//! vCPU's reads of a sample of pages. At the end of each VM, everything it allocated must
//! be freed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use vmmu::host::{Backing, SimHostMemory};
use vmmu::memslot::MemslotLimits;
use vmmu::table::HeapTableAllocator;
use vmmu::types::{AccessKind, Gfn, Gpa, Hpa, Hva, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{Exit, MemoryRegion, MemslotFlags, MmuKind, ModelKick, Vm, VmConfig};

use crate::model::{DirtyMode, Expect, Model, ModelSlot};
use crate::view::{self, SimVm};
use crate::Rng;

const MIB: u64 = 1 << 20;
const A_GPA: u64 = 1 << 30;
const A_SIZE: u64 = 8 * MIB;
const B_GPA: u64 = (1 << 30) + 16 * MIB;
const B_SIZE: u64 = 4 * MIB;
const B_PAGES: u64 = B_SIZE / PAGE_SIZE;
const C_BASES: [u64; 3] = [
    (1 << 30) + 32 * MIB,
    (1 << 30) + 40 * MIB,
    (1 << 30) + 48 * MIB,
];
const C_SIZE: u64 = 2 * MIB;
/// Pages of B the host remaps.
const CHURN: u64 = 64;

/// Nanoseconds since the first call: the VMs' clock.
fn now_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct SoakConfig {
    /// The MMUs, one per VM in turn.
    pub mmus: &'static [(&'static str, MmuKind)],
    /// How long in all.
    pub duration: Duration,
    /// Longest life of one VM.
    pub phase: Duration,
    /// Length of a round between quiescent points.
    pub round: Duration,
    /// vCPU threads.
    pub vcpus: usize,
    /// Accesses a vCPU makes per guest entry at most (`u64::MAX`: its whole round). The
    /// vCPU threads run the run loop on the CPU model (`Vm::model_run`): they stay in
    /// guest mode across accesses and leave it only when kicked, when an access exits,
    /// or after this many.
    pub stretch: u64,
    /// Seed.
    pub seed: u64,
}

impl SoakConfig {
    /// `seconds` in all, every MMU of `mmus` in turn.
    pub fn new(mmus: &'static [(&'static str, MmuKind)], seconds: f64) -> Self {
        let duration = Duration::from_secs_f64(seconds);
        SoakConfig {
            mmus,
            duration,
            phase: (duration / 8).clamp(Duration::from_millis(500), Duration::from_secs(20)),
            round: Duration::from_millis(150),
            vcpus: 3,
            stretch: u64::MAX,
            seed: 0x5eed,
        }
    }
}

/// What a soak did.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    /// Seconds it ran.
    pub seconds: f64,
    /// VMs created and torn down, by MMU and dirty-log mode.
    pub vms: BTreeMap<String, u64>,
    /// Quiescent points.
    pub rounds: u64,
    /// Operations, by kind.
    pub ops: BTreeMap<&'static str, u64>,
    /// Checks passed, by kind.
    pub checks: BTreeMap<&'static str, u64>,
    /// What broke, if anything (the soak stops at the first failure).
    pub failure: Option<String>,
    /// Exits to the MMU (EPT violations and misconfigurations handled), over every VM.
    pub faults: u64,
    /// Acquisitions of the MMU lock (or the TDP fault gate), over every VM.
    pub lock_acquisitions: u64,
    /// Nanoseconds spent waiting for them, over every VM and thread.
    pub lock_wait_ns: u64,
}

impl SoakReport {
    /// Operations in all.
    pub fn total_ops(&self) -> u64 {
        self.ops.values().sum()
    }
    /// Checks in all.
    pub fn total_checks(&self) -> u64 {
        self.checks.values().sum()
    }
    fn check(&mut self, what: &'static str, n: u64) {
        *self.checks.entry(what).or_default() += n;
    }
}

/// Operation counters shared by the threads.
#[derive(Default)]
struct Counters(Mutex<BTreeMap<&'static str, u64>>);

impl Counters {
    fn add(&self, local: &mut BTreeMap<&'static str, u64>) {
        let mut m = self.0.lock().unwrap();
        for (k, v) in std::mem::take(local) {
            *m.entry(k).or_default() += v;
        }
    }
}

fn bump(local: &mut BTreeMap<&'static str, u64>, k: &'static str) {
    *local.entry(k).or_default() += 1;
}

/// The state of the slots the memslot thread changes.
#[derive(Clone, Copy, Debug)]
struct SlotState {
    a_log: bool,
    c: Option<(u64, bool)>,
}

/// Everything the threads of one VM share.
struct Shared {
    vm: SimVm,
    host: Arc<SimHostMemory>,
    mode: DirtyMode,
    partial: bool,
    vcpus: Vec<Mutex<Vcpu>>,
    hva: [u64; 3],
    /// Accesses per guest entry at most (`SoakConfig::stretch`).
    stretch: u64,
    /// The frames of A, B and C's pages when the VM started.
    pfns: [Vec<u64>; 3],
    /// Every frame each churn page of B has had.
    hist: Mutex<Vec<Vec<u64>>>,
    /// Pages of B written (or tried) this round.
    written: Vec<AtomicU64>,
    /// Pages of B a harvest reported this round.
    reported: Mutex<BTreeSet<u64>>,
    slots: Mutex<SlotState>,
    round_over: AtomicBool,
    phase_over: AtomicBool,
    failed: Mutex<Option<String>>,
    ops: Counters,
}

impl Shared {
    fn fail(&self, what: String) {
        let mut f = self.failed.lock().unwrap();
        if f.is_none() {
            *f = Some(what);
        }
    }
    fn failed(&self) -> bool {
        self.failed.lock().unwrap().is_some()
    }
    fn mark_written(&self, page: u64) {
        self.written[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }
    fn written_pages(&self) -> BTreeSet<u64> {
        (0..B_PAGES)
            .filter(|&p| {
                self.written[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0
            })
            .collect()
    }
}

fn region(slot: u32, gpa: u64, size: u64, hva: u64, log: bool) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags: if log {
            MemslotFlags::LOG_DIRTY_PAGES
        } else {
            MemslotFlags::empty()
        },
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

/// Run the soak.
pub fn run(cfg: &SoakConfig) -> SoakReport {
    let start = Instant::now();
    let mut report = SoakReport::default();
    let modes = [
        (DirtyMode::Get, false),
        (DirtyMode::Manual, false),
        (DirtyMode::Manual, true),
        (DirtyMode::Ring(1024), false),
    ];
    let mut phase = 0u64;
    while start.elapsed() < cfg.duration && report.failure.is_none() {
        let (name, mmu) = cfg.mmus[phase as usize % cfg.mmus.len()];
        let (mode, partial) = modes[(phase as usize / cfg.mmus.len()) % modes.len()];
        let left = cfg.duration.saturating_sub(start.elapsed());
        let len = cfg.phase.min(left).max(cfg.round);
        let key = format!(
            "{name} {}{}",
            mode.name(),
            if partial { " (partial clears)" } else { "" }
        );
        *report.vms.entry(key).or_default() += 1;
        if let Err(e) = run_vm(cfg, mmu, mode, partial, len, cfg.seed ^ phase, &mut report) {
            report.failure = Some(format!("{name}, {}: {e}", mode.name()));
        }
        phase += 1;
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

fn run_vm(
    cfg: &SoakConfig,
    mmu: MmuKind,
    mode: DirtyMode,
    partial: bool,
    len: Duration,
    seed: u64,
    report: &mut SoakReport,
) -> Result<(), String> {
    let host = Arc::new(SimHostMemory::new());
    let mm = |size, backing| {
        host.mmap(size, backing, true)
            .map(|h| h.0)
            .map_err(|e| format!("host mmap: {e}"))
    };
    let hva = [
        mm(A_SIZE, Backing::Thp)?,
        mm(B_SIZE, Backing::Page4K)?,
        mm(C_SIZE, Backing::Thp)?,
    ];
    let pfns = [A_SIZE, B_SIZE, C_SIZE].map(|_| Vec::new());
    let mut pfns = pfns;
    for (i, size) in [A_SIZE, B_SIZE, C_SIZE].into_iter().enumerate() {
        pfns[i] = (0..size / PAGE_SIZE)
            .map(|p| view::host_pfn(&host, hva[i] + p * PAGE_SIZE).expect("mapped"))
            .collect();
    }
    let alloc = Arc::new(HeapTableAllocator::new());
    let config = VmConfig {
        mmu,
        dirty_log: mode.config(),
        // The churn thread moves pages both ways: inside invalidate_range_start/end (a
        // current kernel) and with change_pte after the move (the compatibility option,
        // Linux before 6.10), so both stay under load.
        change_pte: true,
        // Lock waits and MMU time are counted (VmStats::lock_wait_ns).
        clock: Some(now_ns),
        ..VmConfig::default()
    };
    let mut vm =
        Vm::with_allocator(config, host.clone(), alloc.clone()).map_err(|e| e.to_string())?;
    // The vCPUs stay in guest mode: remote flushes kick them through the model's lines.
    let kick = Arc::new(ModelKick::new());
    vm.set_kick(kick.clone());
    vm.set_user_memory_region(region(0, A_GPA, A_SIZE, hva[0], false))
        .map_err(|e| e.to_string())?;
    vm.set_user_memory_region(region(1, B_GPA, B_SIZE, hva[1], true))
        .map_err(|e| e.to_string())?;
    vm.set_user_memory_region(region(2, C_BASES[0], C_SIZE, hva[2], false))
        .map_err(|e| e.to_string())?;
    let vcpus = (0..cfg.vcpus)
        .map(|_| {
            vm.create_run_loop_vcpu().map(|v| {
                kick.register(&v);
                Mutex::new(v)
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let hist = (0..CHURN).map(|p| vec![pfns[1][p as usize]]).collect();
    let sh = Shared {
        vm,
        host,
        mode,
        partial,
        vcpus,
        hva,
        stretch: cfg.stretch,
        pfns,
        hist: Mutex::new(hist),
        written: (0..B_PAGES.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
        reported: Mutex::new(BTreeSet::new()),
        slots: Mutex::new(SlotState {
            a_log: false,
            c: Some((C_BASES[0], false)),
        }),
        round_over: AtomicBool::new(false),
        phase_over: AtomicBool::new(false),
        failed: Mutex::new(None),
        ops: Counters::default(),
    };
    let workers = cfg.vcpus + 3;
    let start_b = Barrier::new(workers + 1);
    let end_b = Barrier::new(workers + 1);
    let t0 = Instant::now();
    let result = std::thread::scope(|sc| {
        for w in 0..workers {
            let (sh, start_b, end_b) = (&sh, &start_b, &end_b);
            let seed = seed.wrapping_mul(31).wrapping_add(w as u64);
            sc.spawn(move || {
                let mut rng = Rng::new(seed);
                let mut local = BTreeMap::new();
                loop {
                    start_b.wait();
                    if sh.phase_over.load(Ordering::Acquire) {
                        break;
                    }
                    if w < cfg.vcpus {
                        vcpu_round(sh, w, &mut rng, &mut local);
                    } else if w == cfg.vcpus {
                        harvester_round(sh, &mut rng, &mut local);
                    } else if w == cfg.vcpus + 1 {
                        notifier_round(sh, &mut rng, &mut local);
                    } else {
                        memslot_round(sh, &mut rng, &mut local);
                    }
                    sh.ops.add(&mut local);
                    end_b.wait();
                }
            });
        }
        let mut result = Ok(());
        while result.is_ok() {
            sh.round_over.store(false, Ordering::Release);
            start_b.wait();
            let until = Instant::now() + cfg.round;
            while Instant::now() < until && !sh.failed() {
                std::thread::sleep(Duration::from_millis(5));
            }
            sh.round_over.store(true, Ordering::Release);
            end_b.wait();
            report.rounds += 1;
            result = match sh.failed.lock().unwrap().take() {
                Some(f) => Err(f),
                None => quiescent_checks(&sh, report),
            };
            if t0.elapsed() >= len {
                break;
            }
        }
        sh.phase_over.store(true, Ordering::Release);
        start_b.wait();
        result
    });
    for (k, v) in std::mem::take(&mut *sh.ops.0.lock().unwrap()) {
        *report.ops.entry(k).or_default() += v;
    }
    // Accesses that lost every lockless race and completed under the exclusive lock (a
    // `FaultLoop` exit is a failure: check_access sees it).
    let stats = sh.vm.stats();
    *report.ops.entry("locked access").or_default() += stats.locked_accesses;
    // Exits to the MMU (EPT violations and misconfigurations), counted by the vCPUs:
    // both MMUs' faults, the lockless ones included.
    report.faults += sh
        .vcpus
        .iter()
        .map(|v| v.lock().unwrap().exits)
        .sum::<u64>();
    report.lock_acquisitions += stats.lock_acquisitions;
    report.lock_wait_ns += stats.lock_wait_ns;
    // Kicks remote flushes sent to vCPUs they found in guest mode.
    *report.ops.entry("kick").or_default() += stats.kicks;
    result?;
    // Teardown: after zap_all the MMU holds only its roots; once dropped, nothing.
    sh.vm.zap_all().map_err(|e| e.to_string())?;
    if let MmuKind::ShadowDirect = mmu {
        let (pages, descs) = sh.vm.with_mmu(|_, m| (m.pages().len(), m.pool().in_use()));
        if pages != 1 || descs != 0 {
            return Err(format!(
                "after zap_all the shadow MMU holds {pages} pages and {descs} descriptors"
            ));
        }
    }
    drop(sh);
    let live = view::settle_live(&alloc);
    if live != 0 {
        return Err(format!("{live} tables leaked after the VM was dropped"));
    }
    report.check("accounting (every table freed)", 1);
    Ok(())
}

/// Validate an access's result as it returns (see the module docs).
fn check_access(
    sh: &Shared,
    gpa: u64,
    kind: AccessKind,
    got: &Result<Hpa, Exit>,
) -> Result<(), String> {
    let write = kind == AccessKind::Write;
    let pfn = |h: &Hpa| h.0 / PAGE_SIZE;
    let bad = || format!("{kind:?} of gpa {gpa:#x}: {got:?}");
    if (A_GPA..A_GPA + A_SIZE).contains(&gpa) {
        let want = sh.pfns[0][((gpa - A_GPA) / PAGE_SIZE) as usize];
        return match got {
            Ok(h) if pfn(h) == want => Ok(()),
            Err(Exit::DirtyRingFull) => Ok(()),
            _ => Err(format!("{} (slot A, host frame {want:#x})", bad())),
        };
    }
    if (B_GPA..B_GPA + B_SIZE).contains(&gpa) {
        let page = (gpa - B_GPA) / PAGE_SIZE;
        let ok = match got {
            Ok(h) if page < CHURN => sh.hist.lock().unwrap()[page as usize].contains(&pfn(h)),
            Ok(h) => pfn(h) == sh.pfns[1][page as usize],
            Err(Exit::DirtyRingFull) => true,
            Err(_) => false,
        };
        return if ok {
            Ok(())
        } else {
            Err(format!("{} (slot B)", bad()))
        };
    }
    let ok = match got {
        Err(Exit::Mmio { gpa: g, write: w }) => g.0 == gpa && *w == write,
        Err(Exit::DirtyRingFull) => true,
        Ok(h) => C_BASES.iter().any(|&b| {
            (b..b + C_SIZE).contains(&gpa) && sh.pfns[2][((gpa - b) / PAGE_SIZE) as usize] == pfn(h)
        }),
        Err(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{} (slot C's window)", bad()))
    }
}

fn vcpu_round(sh: &Shared, v: usize, rng: &mut Rng, local: &mut BTreeMap<&'static str, u64>) {
    let mut vcpu = sh.vcpus[v].lock().unwrap();
    // In guest mode across accesses until kicked, an access exits, or `stretch` of them;
    // the thread takes no lock a VM operation holds while it is (`sh.hist` is held only
    // around the host's remap, never across a VM call).
    let mut run = sh
        .vm
        .model_run(&mut vcpu, sh.stretch)
        .expect("a run-loop vCPU");
    while !sh.round_over.load(Ordering::Acquire) {
        let gpa = match rng.below(8) {
            0..=2 => A_GPA + rng.below(A_SIZE / PAGE_SIZE) * PAGE_SIZE,
            3..=5 => {
                // Half of B's accesses go to the churn pages, so remaps race faults.
                let p = if rng.chance(1, 2) {
                    rng.below(CHURN)
                } else {
                    rng.below(B_PAGES)
                };
                B_GPA + p * PAGE_SIZE
            }
            _ => C_BASES[rng.below(3) as usize] + rng.below(C_SIZE / PAGE_SIZE + 8) * PAGE_SIZE,
        } + rng.below(PAGE_SIZE / 8) * 8;
        let kind = match rng.below(10) {
            0..=5 => AccessKind::Write,
            6..=8 => AccessKind::Read,
            _ => AccessKind::Fetch,
        };
        let got = run.access(Gpa(gpa), kind);
        bump(
            local,
            match kind {
                AccessKind::Read => "read",
                AccessKind::Write => "write",
                AccessKind::Fetch => "fetch",
            },
        );
        if let Err(e) = check_access(sh, gpa, kind, &got) {
            // Out of guest mode before taking a lock the memslot thread holds across VM
            // calls.
            run.exit();
            let st = *sh.slots.lock().unwrap();
            let again: Vec<_> = (0..3).map(|_| run.access(Gpa(gpa), kind)).collect();
            run.exit();
            let path = tdp_path(&sh.vm, run.vcpu().root(), Gfn(gpa >> 12));
            sh.fail(format!(
                "vCPU {v}: {e}; slots then {st:?}; tried again: {again:?}; stats {:?}; path {path}",
                sh.vm.stats()
            ));
            return;
        }
        let in_b = (B_GPA..B_GPA + B_SIZE).contains(&gpa);
        if in_b && kind == AccessKind::Write {
            // A write that exited with DirtyRingFull may have pushed its page already.
            sh.mark_written((gpa - B_GPA) / PAGE_SIZE);
        }
        if got == Err(Exit::DirtyRingFull) {
            bump(local, "dirty-ring-full exit");
            // The exit left guest mode: the harvester's reset may flush meanwhile.
            while run.vcpu().dirty_ring_soft_full() && !sh.round_over.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }
}

/// One harvest of B (and, with rings, every ring) as the mode says; the pages of B
/// reported go into `reported`.
fn harvest(
    sh: &Shared,
    rng: Option<&mut Rng>,
    local: &mut BTreeMap<&'static str, u64>,
) -> Result<(), String> {
    let vm = &sh.vm;
    let mut got = BTreeSet::new();
    match sh.mode {
        DirtyMode::Ring(_) => {
            let mut out = Vec::new();
            for v in 0..sh.vcpus.len() {
                vm.harvest_dirty_ring(v as u32, &mut out)
                    .map_err(|e| e.to_string())?;
                bump(local, "ring harvest");
            }
            got.extend(out.iter().filter(|e| e.slot == 1).map(|e| e.offset));
            vm.reset_dirty_rings().map_err(|e| e.to_string())?;
            bump(local, "ring reset");
        }
        _ => {
            let mut words = vec![0u64; B_PAGES.div_ceil(64) as usize];
            vm.get_dirty_log(1, &mut words).map_err(|e| e.to_string())?;
            bump(local, "get-dirty-log");
            if sh.mode.manual() {
                let mut clear = words.clone();
                if let Some(rng) = rng.filter(|_| sh.partial) {
                    // Clear random 64-page runs only: the rest is reported again.
                    for w in clear.iter_mut() {
                        if rng.chance(1, 2) {
                            *w = 0;
                        }
                    }
                }
                vm.clear_dirty_log(1, 0, B_PAGES, &clear)
                    .map_err(|e| e.to_string())?;
                bump(local, "clear-dirty-log");
                words = clear;
            }
            for (k, w) in words.iter().enumerate() {
                for b in 0..64 {
                    if w & (1 << b) != 0 {
                        got.insert(k as u64 * 64 + b);
                    }
                }
            }
        }
    }
    sh.reported.lock().unwrap().extend(got);
    Ok(())
}

fn harvester_round(sh: &Shared, rng: &mut Rng, local: &mut BTreeMap<&'static str, u64>) {
    while !sh.round_over.load(Ordering::Acquire) {
        if let Err(e) = harvest(sh, Some(rng), local) {
            sh.fail(format!("harvester: {e}"));
            return;
        }
        std::thread::sleep(Duration::from_micros(200 + rng.below(800)));
    }
}

fn notifier_round(sh: &Shared, rng: &mut Rng, local: &mut BTreeMap<&'static str, u64>) {
    let vm = &sh.vm;
    while !sh.round_over.load(Ordering::Acquire) {
        let i = rng.below(3) as usize;
        let size = [A_SIZE, B_SIZE, C_SIZE][i];
        let start = sh.hva[i] + rng.below(size / PAGE_SIZE) * PAGE_SIZE;
        let end = (start + (1 + rng.below(64)) * PAGE_SIZE).min(sh.hva[i] + size);
        let r = match rng.below(6) {
            0 => {
                bump(local, "unmap");
                vm.unmap_hva_range(Hva(start), Hva(end))
            }
            1 => {
                bump(local, "age");
                vm.age_hva_range(Hva(start), Hva(end)).map(|_| ())
            }
            2 => {
                bump(local, "test-age");
                vm.test_age_hva_range(Hva(start), Hva(end)).map(|_| ())
            }
            3 | 4 => {
                // The host moves a churn page of B, inside an invalidation.
                let page = rng.below(CHURN);
                let h = sh.hva[1] + page * PAGE_SIZE;
                bump(local, "host remap (invalidate start/end)");
                vm.invalidate_range_start(Hva(h), Hva(h + PAGE_SIZE))
                    .and_then(|_| {
                        let mut hist = sh.hist.lock().unwrap();
                        let new = sh.host.remap_page(Hva(h)).expect("mapped");
                        hist[page as usize].push(new.0);
                        drop(hist);
                        vm.invalidate_range_end()
                    })
            }
            _ => {
                // KSM-style, as before Linux 6.10 (the compatibility option): the host
                // remaps, then tells the MMU where the page went.
                let page = rng.below(CHURN);
                let h = sh.hva[1] + page * PAGE_SIZE;
                bump(local, "change-pte");
                let mut hist = sh.hist.lock().unwrap();
                let new = sh.host.remap_page(Hva(h)).expect("mapped");
                hist[page as usize].push(new.0);
                drop(hist);
                vm.change_pte(Hva(h), new, true)
            }
        };
        if let Err(e) = r {
            sh.fail(format!("notifier: {e}"));
            return;
        }
        std::thread::sleep(Duration::from_micros(100 + rng.below(400)));
    }
}

fn memslot_round(sh: &Shared, rng: &mut Rng, local: &mut BTreeMap<&'static str, u64>) {
    let vm = &sh.vm;
    while !sh.round_over.load(Ordering::Acquire) {
        let mut st = sh.slots.lock().unwrap();
        let r = match rng.below(9) {
            0 | 1 => {
                st.a_log = !st.a_log;
                bump(local, "memslot flags (logging on/off)");
                vm.set_user_memory_region(region(0, A_GPA, A_SIZE, sh.hva[0], st.a_log))
            }
            2 => match st.c {
                Some((base, log)) => {
                    let mut to = C_BASES[rng.below(3) as usize];
                    if to == base {
                        to = C_BASES[(C_BASES.iter().position(|&b| b == base).unwrap() + 1) % 3];
                    }
                    st.c = Some((to, log));
                    bump(local, "memslot move");
                    vm.set_user_memory_region(region(2, to, C_SIZE, sh.hva[2], log))
                }
                None => {
                    let base = C_BASES[rng.below(3) as usize];
                    st.c = Some((base, false));
                    bump(local, "memslot create");
                    vm.set_user_memory_region(region(2, base, C_SIZE, sh.hva[2], false))
                }
            },
            3 => match st.c {
                Some((base, log)) if rng.chance(1, 2) => {
                    st.c = Some((base, !log));
                    bump(local, "memslot flags (logging on/off)");
                    vm.set_user_memory_region(region(2, base, C_SIZE, sh.hva[2], !log))
                }
                Some((base, _)) => {
                    st.c = None;
                    bump(local, "memslot delete");
                    vm.set_user_memory_region(region(2, base, 0, sh.hva[2], false))
                }
                None => Ok(()),
            },
            4..=6 => {
                let s = (A_GPA >> 12) + rng.below((24 * MIB) >> 12);
                bump(local, "zap range");
                vm.zap_gfn_range(Gfn(s), Gfn(s + 1 + rng.below(1024)))
            }
            7 => {
                bump(local, "zap all");
                vm.zap_all()
            }
            _ => {
                bump(local, "zap all fast");
                vm.zap_all_fast()
            }
        };
        drop(st);
        if let Err(e) = r {
            sh.fail(format!("memslot thread: {e}"));
            return;
        }
        std::thread::sleep(Duration::from_micros(500 + rng.below(3000)));
    }
}

/// The checks at a quiescent point (see the module docs).
fn quiescent_checks(sh: &Shared, report: &mut SoakReport) -> Result<(), String> {
    let vm = &sh.vm;
    vm.audit().map_err(|e| e.to_string())?;
    report.check("audit", 1);
    let mut local = BTreeMap::new();
    harvest(sh, None, &mut local)?;
    if sh.mode.manual() && sh.partial {
        // The partial clears may have left bits: clear everything once more.
        harvest(sh, None, &mut local)?;
    }
    let written = sh.written_pages();
    let reported = std::mem::take(&mut *sh.reported.lock().unwrap());
    if let Some(p) = written.difference(&reported).next() {
        return Err(format!(
            "page {p} of B was written this round but no harvest reported it (a lost dirty page; {} written, {} reported)",
            written.len(),
            reported.len()
        ));
    }
    if let Some(p) = reported.difference(&written).next() {
        return Err(format!(
            "page {p} of B was reported dirty but not written this round"
        ));
    }
    sh.written
        .iter()
        .for_each(|w| w.store(0, Ordering::Relaxed));
    report.check("dirty log: no lost or invented page", 1);

    // The model at this point.
    let st = *sh.slots.lock().unwrap();
    let mut model = Model::new(MemslotLimits::default(), sh.mode, 1024);
    let mut add = |id, gpa: u64, size: u64, hva, log: bool| {
        model.slots.insert(
            id,
            ModelSlot {
                id,
                base: gpa / PAGE_SIZE,
                npages: size / PAGE_SIZE,
                hva,
                flags: region(id, gpa, size, hva, log).flags,
            },
        );
    };
    add(0, A_GPA, A_SIZE, sh.hva[0], st.a_log);
    add(1, B_GPA, B_SIZE, sh.hva[1], true);
    if let Some((base, log)) = st.c {
        add(2, base, C_SIZE, sh.hva[2], log);
    }
    let vcpus: Vec<_> = sh.vcpus.iter().map(|v| v.lock().unwrap()).collect();
    let t = view::read_tables(vm, vcpus.iter().map(|v| &**v), &[]);
    let rows: Vec<u32> = t.slots.iter().map(|r| r.0).collect();
    let want: Vec<u32> = model.slots.values().map(|s| s.id).collect();
    let mut sorted = rows.clone();
    sorted.sort();
    if sorted != want {
        return Err(format!("slots {rows:?}, the memslot thread made {want:?}"));
    }
    if !sh.mode.is_ring() {
        for (&id, words) in &t.bitmaps {
            let bits: BTreeSet<u64> = (0..words.len() as u64 * 64)
                .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
                .collect();
            if id == 1 && !bits.is_empty() {
                return Err(format!(
                    "B's bitmap holds {} pages after the final harvest",
                    bits.len()
                ));
            }
            model.dirty.insert(id, bits);
        }
    }
    view::check_entries(&t, &model, &sh.host, &BTreeSet::new())?;
    report.check("tables against the model", 1);
    drop(vcpus);
    let mut rng = Rng::new(report.rounds);
    for (v, vcpu) in sh.vcpus.iter().enumerate() {
        let mut vcpu = vcpu.lock().unwrap();
        for _ in 0..32 {
            let s = model
                .slots
                .values()
                .nth(rng.below(model.slots.len() as u64) as usize)
                .copied()
                .expect("slots");
            let gpa = (s.base + rng.below(s.npages)) * PAGE_SIZE;
            let want = model.expect_access(&sh.host, gpa, AccessKind::Read);
            let got = vm.access(&mut vcpu, Gpa(gpa), AccessKind::Read);
            if Expect::Done(got.clone()) != want {
                return Err(format!(
                    "vCPU {v} read {gpa:#x}: {got:?}, the model says {want:?}"
                ));
            }
        }
        report.check("vCPU reads against the model", 32);
    }
    Ok(())
}

/// The TDP entries from `root` toward `gfn`, each with whether its child pointer matches
/// (for failure reports).
fn tdp_path(vm: &SimVm, root: vmmu::types::Pfn, gfn: Gfn) -> String {
    if !matches!(vm.config().mmu, MmuKind::Tdp(_)) {
        return String::new();
    }
    vm.with_tdp(|_, m| {
        let g = vmmu::tdp::pin();
        let mut out = String::new();
        let Some((mut page, valid)) = m.roots(&g).find(|(r, _)| r.frame() == root) else {
            return format!("root {root:?} not found");
        };
        out += &format!("root valid={valid}; ");
        loop {
            let i = gfn.index_at(page.level);
            let s = page.table().get(i);
            let child = page.child(i, &g);
            // SAFETY: pinned, under the lock.
            let c = unsafe { child.as_ref() };
            out += &format!(
                "L{} [{i}] {s:?} child={:?}; ",
                page.level.as_u8(),
                c.map(|c| (c.frame(), c.level))
            );
            if !s.is_shadow_present() || s.is_leaf(page.level) {
                break;
            }
            match c {
                Some(c) if c.frame() == s.pfn() => page = c,
                _ => break,
            }
        }
        out
    })
}
