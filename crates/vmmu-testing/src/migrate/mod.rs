//! Live migration end to end on real memory (Linux): a source VM whose vCPU threads run
//! a write workload into [`RealHostMemory`], pre-copy rounds that harvest the dirty log
//! and copy the dirty pages to a destination buffer over a modelled link, stop-and-copy,
//! and a byte-for-byte comparison of the destination with the source.
//!
//! # The protocol (what QEMU does with KVM)
//! 1. The guest runs; the memory is prefilled with a per-page pattern (so a page never
//!    sent is a difference, not a coincidence of zeros).
//! 2. Dirty logging is turned on (`LOG_DIRTY_PAGES`: the slot is write-protected).
//!    Round 0 sends every page.
//! 3. Each later round: the host's own changes of this round (discards, moves, splits,
//!    through the notifier, see [`HostEvents`]); a harvest by the mode
//!    ([`HarvestMode`]); if the pages found would cross the link within the downtime
//!    budget, or the round limit is reached, go to 4; else send them and wait for the
//!    link.
//! 4. Stop-and-copy: stop the vCPUs (each finishes its access), harvest once more, send
//!    what is left. The downtime is this step: the vCPUs' stop, the harvest, and the
//!    copy or the link, whichever is longer.
//! 5. Compare every page of the destination with the source's memory.
//!
//! Harvest order (why no write is lost): a harvest reports pages and re-protects them
//! (GET; GET then CLEAR of the bits it got; ring entries read, then
//! `KVM_RESET_DIRTY_RINGS`) *before* they are copied, so a write after the copy faults
//! and logs the page again. A vCPU whose ring is full reaps its own ring (the entries go
//! to the migration's pending set before the reset), as QEMU's vCPU thread does on
//! KVM_EXIT_DIRTY_RING_FULL. Pages the host discarded are not guest writes and the dirty
//! log does not see them: the migration marks them pending itself, as a VMM that
//! discards memory must. Turning logging off and on again mid-migration
//! ([`MigrateConfig::toggle_logging_at`]) loses the log meanwhile: every page is resent.
//!
//! # Time
//! Wall-clock time, on the real vCPU threads; only the link is modelled: sending `n`
//! pages takes `n * 4096 / bandwidth` seconds (the round waits that long, from its
//! harvest, while the vCPUs keep running), and the copy into the destination overlaps
//! it. Figures come from `vmmu migrate` (a benchmark); tests assert only the outcome.

mod trace;
mod workload;

pub use trace::{Record, Trace};
pub use workload::{Rng, Stream, Workload};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmmu::host::{RealBacking, RealHostMemory};
use vmmu::types::{Gpa, Hva};
use vmmu::vm::DataError;
use vmmu::{DirtyLogConfig, Exit, MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};

const PAGE: u64 = 4096;

/// How the migration harvests dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HarvestMode {
    /// `KVM_GET_DIRTY_LOG`: fetch and clear the bitmap, re-protect, in one call.
    Get,
    /// Manual protect: `KVM_GET_DIRTY_LOG` fetches, `KVM_CLEAR_DIRTY_LOG` clears and
    /// re-protects the bits fetched.
    GetClear,
    /// Dirty rings: read every vCPU's ring, then `KVM_RESET_DIRTY_RINGS`.
    Ring,
}

impl HarvestMode {
    /// Every mode.
    pub const ALL: [HarvestMode; 3] = [HarvestMode::Get, HarvestMode::GetClear, HarvestMode::Ring];

    /// The mode's name (`get`, `get-clear`, `ring`).
    pub fn name(self) -> &'static str {
        match self {
            HarvestMode::Get => "get",
            HarvestMode::GetClear => "get-clear",
            HarvestMode::Ring => "ring",
        }
    }

    /// The mode named `s`.
    pub fn parse(s: &str) -> Option<HarvestMode> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// The host's own changes in each pre-copy round, made through [`RealHostMemory`]'s
/// notifier API on random pages while the vCPUs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostEvents {
    /// Pages discarded (`MADV_DONTNEED`: they read zero after).
    pub discards: u32,
    /// Pages moved to a new frame (contents kept).
    pub moves: u32,
    /// THP regions split.
    pub splits: u32,
}

/// One migration.
#[derive(Clone, Debug)]
pub struct MigrateConfig {
    /// The source's MMU.
    pub mmu: MmuKind,
    /// How dirty pages are harvested.
    pub mode: HarvestMode,
    /// Guest RAM in bytes (a multiple of 2 MiB).
    pub guest_bytes: u64,
    /// How the guest RAM is backed.
    pub backing: RealBacking,
    /// vCPU threads running the workload.
    pub vcpus: u32,
    /// Which pages they touch.
    pub workload: Workload,
    /// Accesses per second over all vCPUs (0: as fast as they run).
    pub dirty_rate: u64,
    /// The link, bytes per second (0: infinitely fast).
    pub bandwidth: u64,
    /// The downtime budget: stop-and-copy once the pages found would cross the link in
    /// this long.
    pub downtime_ms: f64,
    /// Most pre-copy rounds after round 0 before stop-and-copy anyway.
    pub max_rounds: u32,
    /// Entries per vCPU dirty ring (ring mode).
    pub ring_size: u32,
    /// The host's changes each round.
    pub host_events: HostEvents,
    /// Turn logging off and on again at the start of this round.
    pub toggle_logging_at: Option<u32>,
    /// Move the memslot to another guest-physical address (`KVM_MR_MOVE`: its dirty
    /// bitmap moves with it) at the start of this round; the vCPUs follow it.
    pub move_slot_at: Option<u32>,
    /// Seed of the workload and the host events.
    pub seed: u64,
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            mmu: MmuKind::ShadowDirect,
            mode: HarvestMode::Get,
            guest_bytes: 8 << 20,
            backing: RealBacking::Page4K,
            vcpus: 2,
            workload: Workload::Uniform,
            dirty_rate: 0,
            bandwidth: 1 << 30,
            downtime_ms: 1.0,
            max_rounds: 8,
            ring_size: 1024,
            host_events: HostEvents::default(),
            toggle_logging_at: None,
            move_slot_at: None,
            seed: 1,
        }
    }
}

/// One round's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Pages the harvest found (round 0: every page).
    pub dirty_pages: u64,
    /// Pages sent (the stop-and-copy round also sends what the last harvest found).
    pub pages_sent: u64,
    /// Time of the harvest.
    pub harvest_ns: u64,
    /// Time copying the pages into the destination.
    pub copy_ns: u64,
    /// Modelled time on the link.
    pub link_ns: u64,
}

/// What a migration did.
#[derive(Clone, Debug)]
pub struct MigrateReport {
    /// Pre-copy rounds, round 0 first.
    pub rounds: Vec<Round>,
    /// The stop-and-copy round.
    pub stop_copy: Round,
    /// Whether the dirty set fit the downtime budget (else the round limit ended it).
    pub converged: bool,
    /// From logging on to the destination complete.
    pub total_ns: u64,
    /// Stop-and-copy: vCPUs stopped until the destination is complete.
    pub downtime_ns: u64,
    /// Guest writes and reads the vCPUs made while logging.
    pub writes: u64,
    /// Guest reads.
    pub reads: u64,
    /// Host changes made (discards, moves, splits).
    pub host_changes: u64,
    /// Time the source's MMU spent handling exits and operations (`VmStats::mmu_ns`).
    pub mmu_ns: u64,
    /// Write faults the lockless fast path fixed (`VmStats::fast_page_faults`): writes to
    /// pages a harvest had write-protected, made writable again without the MMU lock.
    pub fast_page_faults: u64,
    /// Pages that differ between destination and source (0: identical).
    pub differing_pages: u64,
    /// The first differing page.
    pub first_difference: Option<u64>,
    /// The source VM's audit after the migration (`Err` names the broken invariant).
    pub audit: Result<(), String>,
}

impl Default for MigrateReport {
    fn default() -> Self {
        MigrateReport {
            rounds: Vec::new(),
            stop_copy: Round::default(),
            converged: false,
            total_ns: 0,
            downtime_ns: 0,
            writes: 0,
            reads: 0,
            host_changes: 0,
            mmu_ns: 0,
            fast_page_faults: 0,
            differing_pages: 0,
            first_difference: None,
            audit: Ok(()),
        }
    }
}

impl MigrateReport {
    /// Whether the destination is byte for byte the source.
    pub fn identical(&self) -> bool {
        self.differing_pages == 0
    }

    /// Pages sent in all.
    pub fn pages_sent(&self) -> u64 {
        self.rounds.iter().map(|r| r.pages_sent).sum::<u64>() + self.stop_copy.pages_sent
    }
}

/// A monotonic clock for `VmConfig::clock`.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Check a configuration before anything is allocated.
pub fn check(cfg: &MigrateConfig) -> Result<(), String> {
    if cfg.guest_bytes == 0 || !cfg.guest_bytes.is_multiple_of(2 << 20) {
        return Err(format!(
            "guest size {} bytes: must be a nonzero multiple of 2 MiB",
            cfg.guest_bytes
        ));
    }
    if cfg.guest_bytes > 64 << 30 {
        return Err("guest size: at most 64 GiB".into());
    }
    if cfg.vcpus == 0 || cfg.vcpus > 64 {
        return Err(format!("{} vCPUs: must be 1..=64", cfg.vcpus));
    }
    if !cfg.downtime_ms.is_finite() || cfg.downtime_ms < 0.0 {
        return Err(format!("downtime {} ms: must be >= 0", cfg.downtime_ms));
    }
    if cfg.mode == HarvestMode::Ring {
        vmmu::dirty::ring::check_size(cfg.ring_size).map_err(|e| format!("ring size: {e}"))?;
    }
    if matches!(cfg.mmu, MmuKind::ShadowPaging) {
        return Err("migration runs a direct MMU (shadow or tdp)".into());
    }
    cfg.workload.check()
}

type SourceVm = Vm<Arc<RealHostMemory>>;

/// The migration's pending set shared with the vCPU threads (ring reaps) and host
/// changes: one bit per page.
struct Pending {
    words: Vec<AtomicU64>,
}

impl Pending {
    fn new(npages: u64) -> Self {
        Pending {
            words: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
    fn mark(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }
    /// Move every bit into `into`.
    fn take_into(&self, into: &mut [u64]) {
        for (w, o) in self.words.iter().zip(into.iter_mut()) {
            *o |= w.swap(0, Ordering::AcqRel);
        }
    }
}

/// What the vCPU threads share.
struct Shared {
    stop: AtomicBool,
    pending: Pending,
    writes: AtomicU64,
    reads: AtomicU64,
    /// Where the slot starts in guest-physical memory now.
    base: AtomicU64,
    /// Odd while the slot is being moved (an access may exit as MMIO meanwhile).
    moving: AtomicU64,
}

/// Reap this vCPU's own ring into the pending set, then reset (the ring-full exit).
fn reap(
    vm: &SourceVm,
    id: u32,
    shared: &Shared,
    buf: &mut Vec<vmmu::DirtyGfn>,
) -> Result<(), String> {
    buf.clear();
    vm.harvest_dirty_ring(id, buf).map_err(|e| e.to_string())?;
    for e in buf.iter() {
        shared.pending.mark(e.offset);
    }
    vm.reset_dirty_rings().map_err(|e| e.to_string())?;
    Ok(())
}

fn vcpu_thread(
    vm: Arc<SourceVm>,
    mut cpu: vmmu::Vcpu,
    shared: Arc<Shared>,
    cfg: MigrateConfig,
    npages: u64,
) -> Result<(), String> {
    let id = cpu.id;
    let mut stream = Stream::new(&cfg.workload, npages, id, cfg.vcpus, cfg.seed);
    let mut rng = Rng::new(cfg.seed.wrapping_mul(31).wrapping_add(id as u64));
    let per_sec = cfg.dirty_rate / cfg.vcpus as u64;
    let start = Instant::now();
    let mut ring = Vec::new();
    let (mut writes, mut reads) = (0u64, 0u64);
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if per_sec > 0 && n.is_multiple_of(16) {
            let due = (start.elapsed().as_nanos() as u64).saturating_mul(per_sec) / 1_000_000_000;
            if n > due {
                let ahead = (n - due) * 1_000_000_000 / per_sec;
                std::thread::sleep(Duration::from_nanos(ahead.min(1_000_000)));
                continue;
            }
        }
        let (page, write) = stream.next_access();
        let offset = page * PAGE + rng.below(PAGE / 8) * 8;
        let value = ((id as u64 + 1) << 48) | (n & ((1 << 48) - 1));
        n += 1;
        loop {
            let moves = shared.moving.load(Ordering::Acquire);
            let gpa = Gpa(shared.base.load(Ordering::Acquire) + offset);
            let r = if write {
                vm.write_u64(&mut cpu, gpa, value).map(|_| ())
            } else {
                vm.read_u64(&mut cpu, gpa).map(|_| ())
            };
            match r {
                Ok(()) => break,
                Err(DataError::Exit(Exit::DirtyRingFull)) => reap(&vm, id, &shared, &mut ring)?,
                Err(DataError::Exit(Exit::Mmio { .. })) if moved(&shared, moves) => {
                    // The slot moved under the access: run it again at the new address.
                    std::thread::yield_now();
                }
                Err(DataError::StoredRingFull { .. }) => {
                    // Retire the store: translate again once the ring has room.
                    loop {
                        reap(&vm, id, &shared, &mut ring)?;
                        let moves = shared.moving.load(Ordering::Acquire);
                        let gpa = Gpa(shared.base.load(Ordering::Acquire) + offset);
                        match vm.write(&mut cpu, gpa) {
                            Ok(_) => break,
                            Err(Exit::DirtyRingFull) => continue,
                            Err(Exit::Mmio { .. }) if moved(&shared, moves) => continue,
                            Err(e) => return Err(format!("vCPU {id}: write at {gpa}: {e}")),
                        }
                    }
                    break;
                }
                Err(e) => return Err(format!("vCPU {id}: access at {gpa}: {e}")),
            }
        }
        if write {
            writes += 1;
        } else {
            reads += 1;
        }
    }
    shared.writes.fetch_add(writes, Ordering::Relaxed);
    shared.reads.fetch_add(reads, Ordering::Relaxed);
    vm.release_vcpu(cpu).map_err(|e| e.to_string())
}

/// Whether the slot is moving, or moved since `moves` was read.
fn moved(shared: &Shared, moves: u64) -> bool {
    let now = shared.moving.load(Ordering::Acquire);
    now % 2 == 1 || now != moves
}

/// The per-page prefill pattern.
fn pattern(page: u64, out: &mut [u8; 4096]) {
    for (k, c) in out.chunks_exact_mut(8).enumerate() {
        let v = (page << 20 | k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        c.copy_from_slice(&v.to_le_bytes());
    }
}

struct Source {
    vm: Arc<SourceVm>,
    mem: Arc<RealHostMemory>,
    npages: u64,
    mode: HarvestMode,
    vcpus: u32,
    bitmap: Vec<u64>,
    /// The slot's guest-physical address.
    base: u64,
}

impl Source {
    fn set_logging(&self, on: bool) -> Result<(), String> {
        self.vm
            .set_user_memory_region(MemoryRegion {
                slot: 0,
                flags: if on {
                    MemslotFlags::LOG_DIRTY_PAGES
                } else {
                    MemslotFlags::empty()
                },
                guest_phys_addr: self.base,
                memory_size: self.npages * PAGE,
                userspace_addr: self.mem.base().0,
            })
            .map_err(|e| format!("memslot: {e}"))
    }

    /// Harvest into `into` (OR), re-protecting what is reported, and take the pending
    /// set (see the module docs for the order).
    fn harvest(&mut self, shared: &Shared, into: &mut [u64]) -> Result<(), String> {
        let e = |e: vmmu::Error| format!("harvest: {e}");
        match self.mode {
            HarvestMode::Get => {
                self.vm.get_dirty_log(0, &mut self.bitmap).map_err(e)?;
                shared.pending.take_into(into);
            }
            HarvestMode::GetClear => {
                self.vm.get_dirty_log(0, &mut self.bitmap).map_err(e)?;
                self.vm
                    .clear_dirty_log(0, 0, self.npages, &self.bitmap)
                    .map_err(e)?;
                shared.pending.take_into(into);
            }
            HarvestMode::Ring => {
                let mut buf = Vec::new();
                for v in 0..self.vcpus {
                    buf.clear();
                    self.vm.harvest_dirty_ring(v, &mut buf).map_err(e)?;
                    for g in &buf {
                        shared.pending.mark(g.offset);
                    }
                }
                shared.pending.take_into(into);
                self.vm.reset_dirty_rings().map_err(e)?;
                return Ok(());
            }
        }
        for (o, b) in into.iter_mut().zip(&self.bitmap) {
            *o |= *b;
        }
        Ok(())
    }

    /// Copy the pages set in `set` into `dest`; the number copied.
    fn copy(&self, set: &[u64], dest: &mut [u8]) -> Result<u64, String> {
        let mut page = [0u8; 4096];
        let mut n = 0;
        for (w, &bits) in set.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let p = w as u64 * 64 + bits.trailing_zeros() as u64;
                bits &= bits - 1;
                self.mem
                    .read_page(Hva(self.mem.base().0 + p * PAGE), &mut page)
                    .map_err(|e| e.to_string())?;
                dest[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(&page);
                n += 1;
            }
        }
        Ok(n)
    }
}

fn link_ns(pages: u64, bandwidth: u64) -> u64 {
    if bandwidth == 0 {
        return 0;
    }
    ((pages * PAGE) as u128 * 1_000_000_000 / bandwidth as u128) as u64
}

fn elapsed(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

/// Run one migration on vmmu (see the module docs).
pub fn migrate(cfg: &MigrateConfig) -> Result<MigrateReport, String> {
    check(cfg)?;
    let npages = cfg.guest_bytes / PAGE;
    let mem =
        Arc::new(RealHostMemory::new(cfg.guest_bytes, cfg.backing).map_err(|e| e.to_string())?);
    let mut page = [0u8; 4096];
    for p in 0..npages {
        pattern(p, &mut page);
        mem.write_host(Hva(mem.base().0 + p * PAGE), &page)
            .map_err(|e| e.to_string())?;
    }
    let dirty_log = match cfg.mode {
        HarvestMode::Get => DirtyLogConfig::default(),
        HarvestMode::GetClear => DirtyLogConfig {
            manual_protect: true,
            ..DirtyLogConfig::default()
        },
        HarvestMode::Ring => DirtyLogConfig {
            ring_size: Some(cfg.ring_size),
            ..DirtyLogConfig::default()
        },
    };
    let vm = Arc::new(
        Vm::with_allocator(
            VmConfig {
                mmu: cfg.mmu,
                dirty_log,
                clock: Some(now_ns),
                ..VmConfig::default()
            },
            mem.clone(),
            Arc::new(vmmu::table::HeapTableAllocator::new()),
        )
        .map_err(|e| format!("VM: {e}"))?,
    );
    let mut src = Source {
        vm: vm.clone(),
        mem: mem.clone(),
        npages,
        mode: cfg.mode,
        vcpus: cfg.vcpus,
        bitmap: vec![0u64; npages.div_ceil(64) as usize],
        base: 0,
    };
    src.set_logging(false)?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        pending: Pending::new(npages),
        writes: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        base: AtomicU64::new(0),
        moving: AtomicU64::new(0),
    });
    // Every vCPU exists before any harvest reads the rings.
    let cpus = (0..cfg.vcpus)
        .map(|_| vm.create_vcpu().map_err(|e| format!("vCPU: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let threads: Vec<_> = cpus
        .into_iter()
        .map(|cpu| {
            let (vm, shared, cfg) = (vm.clone(), shared.clone(), cfg.clone());
            std::thread::spawn(move || vcpu_thread(vm, cpu, shared, cfg, npages))
        })
        .collect();
    let result = run_rounds(cfg, &mut src, &shared, threads);
    result.map(|mut r| {
        let stats = vm.stats();
        r.mmu_ns = stats.mmu_ns;
        r.fast_page_faults = stats.fast_page_faults;
        r
    })
}

fn run_rounds(
    cfg: &MigrateConfig,
    src: &mut Source,
    shared: &Shared,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
) -> Result<MigrateReport, String> {
    let npages = src.npages;
    let mut dest = vec![0u8; (npages * PAGE) as usize];
    // Fault the destination in before the clock (every page is written in round 0).
    for b in dest.iter_mut().step_by(PAGE as usize) {
        *b = 0xff;
    }
    let mut report = MigrateReport::default();
    let mut rng = Rng::new(cfg.seed ^ 0x5eed);
    let stop_and_join = |threads: Vec<std::thread::JoinHandle<Result<(), String>>>| {
        shared.stop.store(true, Ordering::Relaxed);
        let mut err = Ok(());
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => err = Err(e),
                Err(_) => err = Err("a vCPU thread panicked".to_string()),
            }
        }
        err
    };
    let mut set = vec![0u64; npages.div_ceil(64) as usize];
    let pre = (|| -> Result<(), String> {
        // Round 0: logging on, every page sent.
        let t0 = Instant::now();
        src.set_logging(true)?;
        let harvest_ns = elapsed(t0);
        set.iter_mut().for_each(|w| *w = !0);
        if !npages.is_multiple_of(64) {
            *set.last_mut().expect("a page") = (1 << (npages % 64)) - 1;
        }
        send_round(
            cfg,
            src,
            &mut set,
            &mut dest,
            harvest_ns,
            npages,
            &mut report,
        )?;
        for round in 1.. {
            if cfg.move_slot_at == Some(round) {
                // KVM_MR_MOVE: same host range and flags, a new guest-physical address
                // (64 GiB away, beyond any guest this runs).
                shared.moving.fetch_add(1, Ordering::AcqRel);
                src.base = if src.base == 0 { 64 << 30 } else { 0 };
                let moved = src.set_logging(true);
                shared.base.store(src.base, Ordering::Release);
                shared.moving.fetch_add(1, Ordering::AcqRel);
                moved?;
            }
            if cfg.toggle_logging_at == Some(round) {
                src.set_logging(false)?;
                src.set_logging(true)?;
                for p in 0..npages {
                    shared.pending.mark(p);
                }
            }
            report.host_changes += host_changes(cfg, src, shared, &mut rng)?;
            let t = Instant::now();
            src.harvest(shared, &mut set)?;
            let harvest_ns = elapsed(t);
            let found: u64 = set.iter().map(|w| w.count_ones() as u64).sum();
            let fits = link_ns(found, cfg.bandwidth) as f64 <= cfg.downtime_ms * 1e6;
            if fits || round > cfg.max_rounds {
                report.converged = fits;
                report.stop_copy.dirty_pages = found;
                report.stop_copy.harvest_ns = harvest_ns;
                return Ok(());
            }
            send_round(
                cfg,
                src,
                &mut set,
                &mut dest,
                harvest_ns,
                found,
                &mut report,
            )?;
        }
        unreachable!("the loop returns")
    })();
    // Stop-and-copy (also on an error, so the vCPU threads end).
    let t = Instant::now();
    let joined = stop_and_join(threads);
    pre?;
    joined?;
    src.harvest(shared, &mut set)?;
    let stop_harvest = elapsed(t);
    let tc = Instant::now();
    let sent = src.copy(&set, &mut dest)?;
    let copy_ns = elapsed(tc);
    let link = link_ns(sent, cfg.bandwidth);
    report.stop_copy.harvest_ns += stop_harvest;
    report.stop_copy.pages_sent = sent;
    report.stop_copy.copy_ns = copy_ns;
    report.stop_copy.link_ns = link;
    report.downtime_ns = stop_harvest + copy_ns.max(link);
    report.total_ns = report
        .rounds
        .iter()
        .map(|r| r.harvest_ns + r.copy_ns.max(r.link_ns))
        .sum::<u64>()
        + report.stop_copy.harvest_ns
        + copy_ns.max(link);
    report.writes = shared.writes.load(Ordering::Relaxed);
    report.reads = shared.reads.load(Ordering::Relaxed);
    // Compare.
    let mut page = [0u8; 4096];
    for p in 0..npages {
        src.mem
            .read_page(Hva(src.mem.base().0 + p * PAGE), &mut page)
            .map_err(|e| e.to_string())?;
        if page[..] != dest[(p * PAGE) as usize..((p + 1) * PAGE) as usize] {
            report.differing_pages += 1;
            report.first_difference.get_or_insert(p);
        }
    }
    report.audit = src.vm.audit().map(|_| ()).map_err(|e| e.to_string());
    Ok(report)
}

/// Send the pages in `set` (and clear it), waiting for the link while the vCPUs run.
fn send_round(
    cfg: &MigrateConfig,
    src: &Source,
    set: &mut [u64],
    dest: &mut [u8],
    harvest_ns: u64,
    found: u64,
    report: &mut MigrateReport,
) -> Result<(), String> {
    let t = Instant::now();
    let sent = src.copy(set, dest)?;
    let copy_ns = elapsed(t);
    set.iter_mut().for_each(|w| *w = 0);
    let link = link_ns(sent, cfg.bandwidth);
    if link > copy_ns {
        std::thread::sleep(Duration::from_nanos(link - copy_ns));
    }
    report.rounds.push(Round {
        dirty_pages: found,
        pages_sent: sent,
        harvest_ns,
        copy_ns,
        link_ns: link,
    });
    Ok(())
}

/// This round's host changes on random pages; the number made.
fn host_changes(
    cfg: &MigrateConfig,
    src: &Source,
    shared: &Shared,
    rng: &mut Rng,
) -> Result<u64, String> {
    let ev = cfg.host_events;
    let base = src.mem.base().0;
    let e = |e: vmmu::host::RealHostError| format!("host change: {e}");
    let hugetlb = cfg.backing == RealBacking::HugeTlb2M;
    for _ in 0..ev.discards {
        let (p, n) = if hugetlb {
            (rng.below(src.npages / 512) * 512, 512)
        } else {
            (rng.below(src.npages), 1)
        };
        src.mem
            .discard(&src.vm, Hva(base + p * PAGE), n * PAGE)
            .map_err(e)?;
        // The contents changed without a guest write: send the pages again.
        for q in p..p + n {
            shared.pending.mark(q);
        }
    }
    for _ in 0..ev.moves {
        let p = rng.below(src.npages);
        src.mem
            .move_page(&src.vm, Hva(base + p * PAGE))
            .map_err(e)?;
    }
    for _ in 0..ev.splits {
        let p = rng.below(src.npages);
        src.mem
            .split_huge(&src.vm, Hva(base + p * PAGE))
            .map_err(e)?;
    }
    Ok((ev.discards + ev.moves + ev.splits) as u64)
}
