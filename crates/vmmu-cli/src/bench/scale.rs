//! `scale`: one VM of `--guest-gib` GiB (up to 1 TiB at 4 KiB, 12 TiB at 2 MiB) in
//! `--slots` memslots, through the life of a live migration, with the resident memory the
//! OS reports.
//!
//! Phases, each timed on its own: `fault-in` (every 4 KiB page written through the CPU
//! model at 4 KiB backing, one write per 2 MiB page at 2 MiB, by `--vcpus` vCPU threads,
//! each in its own share of the guest), `enable-logging` (LOG_DIRTY_PAGES on every slot:
//! eager split at 2 MiB unless `--no-eager-split`, then write protection), `dirty` (the
//! vCPU threads write 1 page in 1000), the harvest of those pages, `disable-logging`
//! (huge pages recovered), `teardown` (every slot deleted, then the VM dropped).
//!
//! The harvest runs in two VMs, one after the other (variant `harvest` param): `bitmap`,
//! a manual-protect VM, times `get` (KVM_GET_DIRTY_LOG of every slot, a copy of the
//! whole bitmap by its contract), `clear` (KVM_CLEAR_DIRTY_LOG of every slot with the
//! bitmap GET returned: what a VMM that clears whole bitmaps does), then, after the same
//! pages are written again, `get-ranges` (`Vm::get_dirty_ranges`) and `clear-ranges`
//! (`Vm::clear_dirty_ranges` of exactly those ranges); `ring`, a dirty-ring VM, times
//! `ring` (every vCPU's ring harvested, then KVM_RESET_DIRTY_RINGS). Then `harvest-1000`:
//! exactly 1000 pages spread over the guest are written and harvested, five times, by
//! ranges (get and clear) in the bitmap VM and by the ring in the ring VM: the figure
//! issue 17 wants flat from 1 GiB to 1 TiB.
//!
//! Last, `teardown-sparse`: a VM with the same slots of which only the first GiB is
//! mapped, torn down, beside `teardown-1g`, a VM of one fully mapped 1 GiB slot: zap and
//! teardown must cost what is mapped, not what the slots span.
//! And, at 4 KiB backing, `floor-1000`: the least work of the 1000-page harvest (a bitmap
//! RMW and an SPTE store per page, one flush) over tables laid out for the whole guest
//! (at 2 MiB they would be 4 KiB tables the MMU never has), so the part of
//! `harvest-1000`'s growth with the guest that is the memory's (tables that no longer fit
//! in the caches) shows beside the part that is the MMU's.
//!
//! Per phase: `s` (seconds), `ns_per_page` (per 4 KiB page of the guest, or per page
//! written for `dirty`, per page harvested for the harvests), `peak_rss_gib` (the OS's
//! high-water mark over the phase, `VmHWM` after writing 5 to `/proc/self/clear_refs`)
//! and `rss_bytes_per_page` (that peak less the resident memory before the VM existed,
//! per 4 KiB page of the guest). Freed heap is handed back to the OS between VMs
//! (`malloc_trim`), so each VM's figures are its own.
//!
//! KVM caps one slot at `KVM_MEM_MAX_NR_PAGES` (2^31 - 1 pages, 8 TiB less a page); vmmu
//! enforces the same cap, so a 12 TiB guest needs at least two slots (the default is 4).
//! Eager splitting a 12 TiB guest would need 24 GiB of 4 KiB tables, more than this
//! machine has: run it with `--no-eager-split` (KVM's `eager_page_split=N`).

use std::sync::{Arc, Barrier};
use std::time::Instant;

use serde_json::{json, Map, Value};
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gpa, PAGE_SIZE};
use vmmu::{
    DirtyGfn, DirtyLogConfig, DirtyRange, Exit, MemoryRegion, MemslotFlags, MmuKind, TdpIteration,
    Vcpu, Vm, VmConfig,
};

use super::guest::HostBacking;
use super::names::scale as names;
use super::{BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "a guest of --guest-gib GiB (to 1 TiB at 4k, 12 TiB at 2m) faulted in, logged, harvested (GET, CLEAR, ranges, ring) and torn down: time, ns/page and the OS's peak RSS per phase",
    run,
};

/// KVM's `KVM_MEM_MAX_NR_PAGES`, which vmmu enforces too.
const MAX_SLOT_PAGES: u64 = vmmu::memslot::MAX_SLOT_PAGES;
/// First guest-physical address of the slots.
const BASE_GPA: u64 = 1 << 32;
/// One page in this many is written in the `dirty` phase.
const DIRTY_STRIDE: u64 = 1000;
/// Pages written and harvested in each `harvest-1000` round, and the rounds.
const HARVEST_PAGES: u64 = 1000;
const HARVEST_ROUNDS: usize = 5;

/// The MMU `scale` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleMmu {
    /// KVM's TDP MMU (used-entries iteration).
    Tdp,
    /// The shadow MMU in direct mode.
    Shadow,
}

impl ScaleMmu {
    fn kind(self) -> MmuKind {
        match self {
            ScaleMmu::Tdp => MmuKind::Tdp(TdpIteration::UsedEntries),
            ScaleMmu::Shadow => MmuKind::ShadowDirect,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ScaleMmu::Tdp => names::TDP,
            ScaleMmu::Shadow => names::SHADOW_DIRECT,
        }
    }
}

/// What `vmmu bench scale` takes beyond the common flags.
#[derive(Clone, Copy, Debug)]
pub struct ScaleConfig {
    /// Guest memory in GiB.
    pub guest_gib: u32,
    /// Host backing; `None`: 4k, then 2m.
    pub backing: Option<HostBacking>,
    /// vCPU threads.
    pub vcpus: u32,
    /// Memslots the guest is cut into.
    pub slots: u32,
    /// The MMU.
    pub mmu: ScaleMmu,
    /// KVM's `eager_page_split=N` (`VmConfig::eager_split` off).
    pub no_eager_split: bool,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            guest_gib: 16,
            backing: None,
            vcpus: 2,
            slots: 4,
            mmu: ScaleMmu::Tdp,
            no_eager_split: false,
        }
    }
}

/// The most GiB `--guest-gib` takes at each backing (the sizes: 1 TiB at 4 KiB,
/// 12 TiB at 2 MiB).
pub fn max_guest_gib(backing: HostBacking) -> u32 {
    match backing {
        HostBacking::Page4K => 1024,
        HostBacking::Thp => 12288,
    }
}

/// Checks `config` against the limits: slots no bigger than KVM's cap, at least one page
/// per vCPU and slot, sizes within [`max_guest_gib`]. The CLI calls it before any run.
pub fn check(config: &ScaleConfig, quick: bool) -> Result<(), String> {
    let gib = guest_gib(config, quick);
    for backing in backings(config) {
        if gib > max_guest_gib(backing) {
            return Err(format!(
                "--guest-gib {gib} is more than scale runs at {} backing ({} GiB)",
                backing.name(),
                max_guest_gib(backing)
            ));
        }
    }
    let pages = u64::from(gib) << 18;
    let per_slot = pages.div_ceil(u64::from(config.slots));
    if per_slot > MAX_SLOT_PAGES {
        return Err(format!(
            "{gib} GiB in {} slots is {per_slot} pages a slot, more than KVM's \
             KVM_MEM_MAX_NR_PAGES ({MAX_SLOT_PAGES}): use --slots {}",
            config.slots,
            pages.div_ceil(MAX_SLOT_PAGES)
        ));
    }
    if u64::from(config.slots) * 512 > pages {
        return Err(format!("{gib} GiB is too small for {} slots", config.slots));
    }
    Ok(())
}

fn guest_gib(config: &ScaleConfig, quick: bool) -> u32 {
    if quick {
        (config.guest_gib / super::QUICK_SCALE as u32).max(1)
    } else {
        config.guest_gib
    }
}

fn backings(config: &ScaleConfig) -> Vec<HostBacking> {
    match config.backing {
        Some(b) => vec![b],
        None => HostBacking::ALL.to_vec(),
    }
}

type ScaleVm = Vm<Arc<SimHostMemory>>;

/// The OS's view of this process's memory.
mod rss {
    /// Start a new high-water mark (`/proc/self/clear_refs`, 5: reset the peak RSS).
    /// `false` where the kernel does not offer it: the peak is then the process's.
    pub fn reset_peak() -> bool {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }

    fn status_kib(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Resident bytes now.
    pub fn current() -> u64 {
        status_kib("VmRSS:").unwrap_or(0) * 1024
    }

    /// Peak resident bytes since the last [`reset_peak`].
    pub fn peak() -> u64 {
        status_kib("VmHWM:").unwrap_or(0) * 1024
    }

    /// Give freed heap back to the OS, so the next VM's baseline is its own.
    pub fn trim() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator's heaps.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// One VM of the guest's size and its slots.
struct ScaleGuest {
    vm: ScaleVm,
    regions: Vec<MemoryRegion>,
    vcpus: Vec<Vcpu>,
    /// 4 KiB pages of the guest.
    pages: u64,
    backing: HostBacking,
}

impl ScaleGuest {
    fn new(
        sc: &ScaleConfig,
        gib: u32,
        backing: HostBacking,
        dirty_log: DirtyLogConfig,
        slots: u32,
    ) -> Result<Self, BenchError> {
        let bytes = u64::from(gib) << 30;
        let host = Arc::new(SimHostMemory::new());
        let hva = host
            .mmap(
                bytes,
                match backing {
                    HostBacking::Page4K => Backing::Page4K,
                    HostBacking::Thp => Backing::Thp,
                },
                true,
            )
            .context("host mmap")?;
        let vm = Vm::new(
            VmConfig {
                mmu: sc.mmu.kind(),
                dirty_log,
                eager_split: !sc.no_eager_split,
                max_vcpus: sc.vcpus.max(1),
                ..VmConfig::default()
            },
            host,
        );
        // Slots of whole 2 MiB pages; the last takes the rest.
        let pages = bytes / PAGE_SIZE;
        let per = (pages / u64::from(slots)) & !511;
        let mut regions = Vec::new();
        for i in 0..u64::from(slots) {
            let first = i * per;
            let n = if i + 1 == u64::from(slots) {
                pages - first
            } else {
                per
            };
            let region = MemoryRegion {
                slot: i as u32,
                flags: MemslotFlags::empty(),
                guest_phys_addr: BASE_GPA + first * PAGE_SIZE,
                memory_size: n * PAGE_SIZE,
                userspace_addr: hva.0 + first * PAGE_SIZE,
            };
            vm.set_user_memory_region(region)
                .context("set_user_memory_region")?;
            regions.push(region);
        }
        let vcpus = (0..sc.vcpus)
            .map(|_| vm.create_vcpu().context("create_vcpu"))
            .collect::<Result<_, _>>()?;
        Ok(ScaleGuest {
            vm,
            regions,
            vcpus,
            pages,
            backing,
        })
    }

    /// Has every vCPU thread write `pages(t)` (guest page numbers) in turn, in parallel;
    /// a ring that fills is harvested and reset by the thread that found it full, as a
    /// VMM does on the exit. Returns the seconds from the start barrier to the last join.
    fn write_pages<I: Iterator<Item = u64>>(
        &mut self,
        pages: impl Fn(usize, usize) -> I + Sync,
    ) -> Result<f64, BenchError> {
        let n = self.vcpus.len();
        let barrier = Barrier::new(n + 1);
        let vm = &self.vm;
        std::thread::scope(|s| {
            let workers: Vec<_> = self
                .vcpus
                .iter_mut()
                .enumerate()
                .map(|(t, vcpu)| {
                    let (barrier, pages) = (&barrier, &pages);
                    s.spawn(move || -> Result<(), String> {
                        barrier.wait();
                        let mut entries: Vec<DirtyGfn> = Vec::new();
                        for p in pages(t, n) {
                            let gpa = Gpa(BASE_GPA + p * PAGE_SIZE);
                            loop {
                                match vm.access(vcpu, gpa, AccessKind::Write) {
                                    Ok(_) => break,
                                    Err(Exit::DirtyRingFull) => {
                                        entries.clear();
                                        vm.harvest_dirty_ring(vcpu.id, &mut entries)
                                            .map_err(|e| e.to_string())?;
                                        vm.reset_dirty_rings().map_err(|e| e.to_string())?;
                                    }
                                    Err(e) => return Err(format!("guest write at {gpa}: {e}")),
                                }
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            for w in workers {
                w.join()
                    .map_err(|_| BenchError::new("vCPU thread panicked"))?
                    .map_err(BenchError::new)?;
            }
            Ok(start.elapsed().as_secs_f64())
        })
    }

    /// Every page of the guest (4 KiB backing) or the first of every 2 MiB page, vCPU `t`
    /// of `n` taking its contiguous share.
    fn fault_in(&mut self) -> Result<f64, BenchError> {
        let (pages, step) = (self.pages, self.step());
        self.write_pages(move |t, n| {
            let share = (pages / step).div_ceil(n as u64);
            let lo = t as u64 * share;
            let hi = (lo + share).min(pages / step);
            (lo..hi).map(move |i| i * step)
        })
    }

    fn step(&self) -> u64 {
        match self.backing {
            HostBacking::Page4K => 1,
            HostBacking::Thp => 512,
        }
    }

    /// One page in [`DIRTY_STRIDE`], vCPU `t` of `n` taking every `n`-th of them.
    fn dirty_stride(&mut self) -> Result<(u64, f64), BenchError> {
        let pages = self.pages;
        let count = pages.div_ceil(DIRTY_STRIDE);
        let s = self.write_pages(move |t, n| {
            (t as u64..count)
                .step_by(n)
                .map(|i| i * DIRTY_STRIDE)
                .filter(move |&p| p < pages)
        })?;
        Ok((count, s))
    }

    /// Exactly [`HARVEST_PAGES`] pages spread evenly over the guest, offset by `round` so
    /// each round writes new pages, on vCPU 0's thread.
    fn dirty_1000(&mut self, round: u64) -> Result<(), BenchError> {
        let pages = self.pages;
        self.write_pages(move |t, _| {
            let n = if t == 0 { HARVEST_PAGES } else { 0 };
            (0..n).map(move |i| (i * (pages / HARVEST_PAGES) + 1 + round * 7) % pages)
        })?;
        Ok(())
    }

    fn set_logging(&mut self, on: bool) -> Result<(), BenchError> {
        for r in &mut self.regions {
            r.flags = if on {
                MemslotFlags::LOG_DIRTY_PAGES
            } else {
                MemslotFlags::empty()
            };
            self.vm
                .set_user_memory_region(*r)
                .context("set_user_memory_region (LOG_DIRTY_PAGES)")?;
        }
        Ok(())
    }

    fn slot_words(&self) -> usize {
        self.regions
            .iter()
            .map(|r| (r.memory_size / PAGE_SIZE).div_ceil(64) as usize)
            .max()
            .unwrap_or(0)
    }

    /// GET of every slot into `bufs` (one per slot); pages reported.
    fn get_all(&self, bufs: &mut [Vec<u64>]) -> Result<u64, BenchError> {
        let mut n = 0;
        for (r, buf) in self.regions.iter().zip(bufs) {
            n += self
                .vm
                .get_dirty_log(r.slot, buf)
                .context("get_dirty_log")?
                .dirty_pages;
        }
        Ok(n)
    }

    /// CLEAR of every slot with the bitmaps GET returned; pages cleared.
    fn clear_all(&self, bufs: &[Vec<u64>]) -> Result<u64, BenchError> {
        let mut n = 0;
        for (r, buf) in self.regions.iter().zip(bufs) {
            n += self
                .vm
                .clear_dirty_log(r.slot, 0, r.memory_size / PAGE_SIZE, buf)
                .context("clear_dirty_log")?;
        }
        Ok(n)
    }

    /// Dirty ranges of every slot; pages reported.
    fn get_ranges_all(&self, ranges: &mut [Vec<DirtyRange>]) -> Result<u64, BenchError> {
        let mut n = 0;
        for (r, out) in self.regions.iter().zip(ranges) {
            out.clear();
            n += self
                .vm
                .get_dirty_ranges(r.slot, out)
                .context("get_dirty_ranges")?
                .dirty_pages;
        }
        Ok(n)
    }

    fn clear_ranges_all(&self, ranges: &[Vec<DirtyRange>]) -> Result<u64, BenchError> {
        let mut n = 0;
        for (r, rs) in self.regions.iter().zip(ranges) {
            n += self
                .vm
                .clear_dirty_ranges(r.slot, rs)
                .context("clear_dirty_ranges")?;
        }
        Ok(n)
    }

    /// Every vCPU's ring harvested, then reset; entries harvested.
    fn ring_all(&self, entries: &mut Vec<DirtyGfn>) -> Result<u64, BenchError> {
        entries.clear();
        for v in &self.vcpus {
            self.vm
                .harvest_dirty_ring(v.id, entries)
                .context("harvest_dirty_ring")?;
        }
        self.vm.reset_dirty_rings().context("reset_dirty_rings")?;
        Ok(entries.len() as u64)
    }

    /// Delete every slot, then drop the VM.
    fn teardown(self) -> Result<(), BenchError> {
        for r in &self.regions {
            self.vm
                .set_user_memory_region(MemoryRegion {
                    memory_size: 0,
                    ..*r
                })
                .context("delete memslot")?;
        }
        drop(self);
        Ok(())
    }
}

/// Times phases and takes the OS's memory figures for each.
struct Phases<'a> {
    samples: &'a mut Vec<Sample>,
    variant: &'static str,
    params: Map<String, Value>,
    baseline: u64,
    guest_pages: u64,
}

impl Phases<'_> {
    /// Runs `f` as phase `phase`; `f` returns how many pages the phase's `ns_per_page`
    /// divides by (0: the guest's pages).
    fn phase<T>(
        &mut self,
        phase: &str,
        f: impl FnOnce() -> Result<(T, u64, Option<f64>), BenchError>,
    ) -> Result<T, BenchError> {
        rss::reset_peak();
        let start = Instant::now();
        let (out, pages, timed) = f()?;
        let s = timed.unwrap_or_else(|| start.elapsed().as_secs_f64());
        let peak = rss::peak().max(rss::current());
        self.record(phase, s, pages, Some(peak));
        Ok(out)
    }

    fn record(&mut self, phase: &str, s: f64, pages: u64, peak: Option<u64>) {
        let mut p = self.params.clone();
        p.insert("phase".into(), json!(phase));
        let per = if pages == 0 { self.guest_pages } else { pages };
        let mut push = |metric: &str, value: f64, unit: &str| {
            self.samples
                .push(Sample::new(self.variant, metric, p.clone(), value, unit));
        };
        push(names::S, s, "s");
        push(names::NS_PER_PAGE, s * 1e9 / per.max(1) as f64, "ns");
        if let Some(peak) = peak {
            push(
                names::PEAK_RSS_GIB,
                peak as f64 / (1u64 << 30) as f64,
                "GiB",
            );
            push(
                names::RSS_BYTES_PER_PAGE,
                peak.saturating_sub(self.baseline) as f64 / self.guest_pages as f64,
                "B",
            );
        }
    }
}

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let sc = config.scale;
    check(&sc, config.quick).map_err(BenchError::new)?;
    let gib = guest_gib(&sc, config.quick);
    let mut samples = Vec::new();
    for backing in backings(&sc) {
        let base_params = super::params([
            ("backing", json!(backing.name())),
            ("guest_gib", json!(gib)),
            ("vcpus", json!(sc.vcpus)),
            ("slots", json!(sc.slots)),
            ("eager_split", json!(!sc.no_eager_split)),
        ]);
        for harvest in [names::BITMAP, names::RING] {
            let mut params = base_params.clone();
            params.insert("harvest".into(), json!(harvest));
            one_vm(&sc, gib, backing, harvest, params, &mut samples)?;
        }
        let mut params = base_params.clone();
        params.insert("harvest".into(), json!(names::BITMAP));
        teardown_sparse(&sc, gib, backing, params.clone(), &mut samples)?;
        if let HostBacking::Page4K = backing {
            floor_1000(&sc, gib, params, &mut samples)?;
        }
    }
    Ok(samples)
}

/// One VM through every phase, harvesting by bitmap (GET, CLEAR, ranges) or by ring.
fn one_vm(
    sc: &ScaleConfig,
    gib: u32,
    backing: HostBacking,
    harvest: &str,
    params: Map<String, Value>,
    samples: &mut Vec<Sample>,
) -> Result<(), BenchError> {
    let ring = harvest == names::RING;
    let pages = u64::from(gib) << 18;
    let per_vcpu = pages.div_ceil(DIRTY_STRIDE).div_ceil(u64::from(sc.vcpus));
    let dirty_log = DirtyLogConfig {
        manual_protect: !ring,
        ring_size: ring.then(|| {
            (per_vcpu + 64)
                .next_power_of_two()
                .clamp(1024, u64::from(DirtyLogConfig::MAX_RING_ENTRIES)) as u32
        }),
        ..DirtyLogConfig::default()
    };
    rss::trim();
    let mut ph = Phases {
        samples,
        variant: sc.mmu.name(),
        params,
        baseline: rss::current(),
        guest_pages: pages,
    };
    let mut g = ph.phase(names::SETUP, || {
        Ok((
            ScaleGuest::new(sc, gib, backing, dirty_log, sc.slots)?,
            0,
            None,
        ))
    })?;
    ph.phase(names::FAULT_IN, || Ok(((), 0, Some(g.fault_in()?))))?;
    ph.phase(names::ENABLE_LOGGING, || {
        Ok((g.set_logging(true)?, 0, None))
    })?;
    let (written, _) = ph.phase(names::DIRTY, || {
        let (n, s) = g.dirty_stride()?;
        Ok(((n, s), n, Some(s)))
    })?;
    let words = g.slot_words();
    let nslots = g.regions.len();
    let mut bufs = vec![vec![0u64; words]; nslots];
    let mut ranges: Vec<Vec<DirtyRange>> = vec![Vec::new(); nslots];
    let mut entries = Vec::new();
    let expect = |what: &str, got: u64, want: u64| {
        if got == want {
            Ok(())
        } else {
            Err(BenchError::new(format!(
                "{what} reported {got} dirty pages, the guest wrote {want}"
            )))
        }
    };
    if ring {
        let n = ph.phase(names::RING, || {
            let n = g.ring_all(&mut entries)?;
            Ok((n, n, None))
        })?;
        // Entries harvested by the vCPU threads on a full ring are not in `n`.
        if n > written {
            return Err(BenchError::new(format!("ring reported {n} of {written}")));
        }
    } else {
        let n = ph.phase(names::GET, || {
            let n = g.get_all(&mut bufs)?;
            Ok((n, n, None))
        })?;
        expect("GET", n, written)?;
        let n = ph.phase(names::CLEAR, || {
            let n = g.clear_all(&bufs)?;
            Ok((n, n, None))
        })?;
        expect("CLEAR", n, written)?;
        g.dirty_stride()?;
        let n = ph.phase(names::GET_RANGES, || {
            let n = g.get_ranges_all(&mut ranges)?;
            Ok((n, n, None))
        })?;
        expect("get_dirty_ranges", n, written)?;
        let n = ph.phase(names::CLEAR_RANGES, || {
            let n = g.clear_ranges_all(&ranges)?;
            Ok((n, n, None))
        })?;
        expect("clear_dirty_ranges", n, written)?;
    }
    // 1000 pages at a time: the cost must follow the pages, not the guest.
    let mut times: Vec<[f64; 2]> = Vec::new();
    for round in 0..HARVEST_ROUNDS {
        g.dirty_1000(round as u64)?;
        let t = Instant::now();
        if ring {
            let n = g.ring_all(&mut entries)?;
            expect("ring (1000)", n, HARVEST_PAGES)?;
            times.push([t.elapsed().as_secs_f64(), 0.0]);
        } else {
            let n = g.get_ranges_all(&mut ranges)?;
            let got = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let c = g.clear_ranges_all(&ranges)?;
            times.push([got, t.elapsed().as_secs_f64()]);
            expect("get_dirty_ranges (1000)", n, HARVEST_PAGES)?;
            expect("clear_dirty_ranges (1000)", c, HARVEST_PAGES)?;
        }
    }
    let best = |i: usize| times.iter().map(|t| t[i]).fold(f64::INFINITY, f64::min);
    if ring {
        ph.record(names::RING_1000, best(0), HARVEST_PAGES, None);
    } else {
        ph.record(names::GET_RANGES_1000, best(0), HARVEST_PAGES, None);
        ph.record(names::CLEAR_RANGES_1000, best(1), HARVEST_PAGES, None);
    }
    ph.phase(names::DISABLE_LOGGING, || {
        Ok((g.set_logging(false)?, 0, None))
    })?;
    ph.phase(names::TEARDOWN, || Ok((g.teardown()?, 0, None)))?;
    Ok(())
}

/// The guest's slots with only the first GiB mapped, torn down, beside a VM of one fully
/// mapped 1 GiB slot torn down: `teardown-sparse` and `teardown-1g`.
fn teardown_sparse(
    sc: &ScaleConfig,
    gib: u32,
    backing: HostBacking,
    params: Map<String, Value>,
    samples: &mut Vec<Sample>,
) -> Result<(), BenchError> {
    let one = ScaleConfig { vcpus: 1, ..*sc };
    let dirty_log = DirtyLogConfig::default();
    for (phase, size, slots) in [
        (names::TEARDOWN_SPARSE, gib, sc.slots),
        (names::TEARDOWN_1G, 1, 1),
    ] {
        rss::trim();
        let mut g = ScaleGuest::new(&one, size, backing, dirty_log, slots)?;
        let step = g.step();
        let mapped = (1u64 << 18).min(g.pages);
        g.write_pages(|_, _| (0..mapped / step).map(|i| i * step))?;
        let mut ph = Phases {
            samples,
            variant: sc.mmu.name(),
            params: params.clone(),
            baseline: rss::current(),
            guest_pages: mapped,
        };
        ph.phase(phase, || Ok((g.teardown()?, 0, None)))?;
    }
    Ok(())
}

/// `floor-1000`: the least work of harvesting [`HARVEST_PAGES`] pages spread over the
/// guest as `harvest-1000` spreads them, over tables laid out as the MMU's for the whole
/// guest (`floor::HarvestFloor::measure_sparse`: a bitmap RMW and an SPTE store per page,
/// one flush): how much of the 1000-page harvest's growth with the guest is the memory's
/// (tables no longer in the caches), not the MMU's. Best of [`HARVEST_ROUNDS`].
fn floor_1000(
    sc: &ScaleConfig,
    gib: u32,
    params: Map<String, Value>,
    samples: &mut Vec<Sample>,
) -> Result<(), BenchError> {
    rss::trim();
    let pages = u64::from(gib) << 18;
    let mut floor = super::floor::HarvestFloor::new(pages);
    let mut best = f64::INFINITY;
    for round in 0..HARVEST_ROUNDS as u64 {
        let set: Vec<u64> = (0..HARVEST_PAGES)
            .map(|i| (i * (pages / HARVEST_PAGES) + 1 + round * 7) % pages)
            .collect();
        best = best.min(floor.measure_sparse(&set)? / 1e6);
    }
    drop(floor);
    let mut ph = Phases {
        samples,
        variant: sc.mmu.name(),
        params,
        baseline: 0,
        guest_pages: pages,
    };
    ph.record(names::FLOOR_1000, best, HARVEST_PAGES, None);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_before_anything_runs() {
        let ok = ScaleConfig::default();
        assert_eq!(check(&ok, false), Ok(()));
        let at = |guest_gib, backing, slots| ScaleConfig {
            guest_gib,
            backing: Some(backing),
            slots,
            ..ok
        };
        assert!(check(&at(1024, HostBacking::Page4K, 4), false).is_ok());
        assert!(check(&at(1025, HostBacking::Page4K, 4), false).is_err());
        assert!(check(&at(12288, HostBacking::Thp, 4), false).is_ok());
        let e = check(&at(12288, HostBacking::Thp, 1), false).unwrap_err();
        assert!(
            e.contains("KVM_MEM_MAX_NR_PAGES") && e.contains("--slots 2"),
            "{e}"
        );
        assert!(check(&at(1, HostBacking::Thp, 600), false).is_err());
    }

    #[test]
    fn a_small_guest_runs_every_phase() {
        let config = BenchConfig {
            scale: ScaleConfig {
                guest_gib: 1,
                backing: Some(HostBacking::Page4K),
                vcpus: 2,
                slots: 2,
                ..ScaleConfig::default()
            },
            ..BenchConfig::new(1)
        };
        let samples = run(&config).unwrap();
        let phases: std::collections::BTreeSet<String> = samples
            .iter()
            .map(|s| s.params["phase"].as_str().unwrap().to_owned())
            .collect();
        for p in [
            names::FAULT_IN,
            names::ENABLE_LOGGING,
            names::DIRTY,
            names::GET,
            names::CLEAR,
            names::GET_RANGES,
            names::CLEAR_RANGES,
            names::RING,
            names::RING_1000,
            names::GET_RANGES_1000,
            names::CLEAR_RANGES_1000,
            names::DISABLE_LOGGING,
            names::TEARDOWN,
            names::TEARDOWN_SPARSE,
            names::TEARDOWN_1G,
            names::FLOOR_1000,
        ] {
            assert!(phases.contains(p), "phase {p} missing: {phases:?}");
        }
        assert!(samples
            .iter()
            .all(|s| s.value.is_finite() && s.value >= 0.0));
    }
}
