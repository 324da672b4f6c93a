//! `dirty-log`: one round of dirty logging, by how dirty pages are reported to the VMM:
//!
//! - `get`: the dirty bitmap, `KVM_GET_DIRTY_LOG` in the default mode (copy and clear the
//!   bitmap, write-protect the dirty pages, flush);
//! - `get-clear`: manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): GET copies the
//!   bitmap, then `KVM_CLEAR_DIRTY_LOG` of the whole slot with the bitmap GET returned
//!   clears and write-protects;
//! - `ring`: a per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING`): the VMM harvests the
//!   vCPU's ring and calls `KVM_RESET_DIRTY_RINGS`, which write-protects the entries.
//!
//! Each mode runs on the shadow MMU (`get`, `get-clear`, `ring`) and on the TDP MMU in
//! used-entries mode (`tdp-get`, `tdp-get-clear`, `tdp-ring`), whose write protection
//! goes by 64-page masks through its iterator under the shared lock.
//!
//! Per mode and dirty `ratio`, on a fresh VM with a `--mem-gib` GiB slot on 4 KiB host
//! pages (untimed): the guest writes every page (fault-in), LOG_DIRTY_PAGES goes on
//! (write-protecting the slot), and one harvest empties the log. Then, timed: the guest's
//! writes to `ratio` of the pages, distinct, chosen at random and in random order (the
//! same for every mode), each a write fault that restores W on the lockless fast path and
//! logs the page (`write_ns_per_page`: elapsed / pages written; not reported at ratio 0);
//! and the harvest (`harvest_us`).
//!
//! The random write order is what a ring records; its reset write-protects entries in that
//! order, merging only neighbours within 64 pages, so its cost depends on the order in a way
//! the bitmap modes' (which walk the bitmap in gfn order) does not.
//!
//! `shadow-get` is `get` under shadow paging, with a guest OS
//! (`vmmu_testing::guest_os`) on top: one process maps nearly all of the slot (RAM less
//! the kernel's page tables, about 0.2%) and writes every page through its own page
//! tables (fault-in, untimed); the timed writes are its user writes through the shadow
//! tables (gva accesses), the harvest is the same GET_DIRTY_LOG. Its `ratio` is of the
//! process's pages. To spare a 1 GiB fault-in per ratio, its rounds share one VM: each
//! round starts, as the others do, right after a harvest has emptied the log.
//!
//! The ring holds the whole round: the next power of two above the pages written plus 64,
//! at least 4096 entries, so no vCPU exits for a full ring. At ratio 1 on 1 GiB that is
//! 524,288 entries, above the 65,536 KVM allows; vmmu allows rings up to 2^20 entries
//! (`DirtyLogConfig::MAX_RING_ENTRIES`), so the ring modes run on slots up to 2 GiB and
//! refuse larger ones with an error (a round would need harvests while it writes). The
//! harvest cost does not depend on the capacity, only on the entries.

use std::time::Instant;

use serde_json::{Map, Value};
use vmmu::types::{AccessKind, Gva, PAGE_SIZE};
use vmmu::DirtyGfn;
use vmmu::{
    Algorithms, DirtyLogConfig, MemoryRegion, MemslotFlags, MmuKind, PagingConfig, VmConfig,
};
use vmmu_testing::guest_os::Prot;

use super::dirty_ratio::{dirty_count, random_pages, ratio_params, RATIOS};
use super::guest::{Guest, HostBacking, SLOT};
use super::names::dirty_log as names;
use super::shadow_guest;
use super::{BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "guest writes under dirty logging (ns per page) and their harvest (us): bitmap GET, GET+CLEAR, dirty ring, GET under shadow paging; by dirty ratio",
    run,
};

/// How dirty pages reach the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Get,
    GetClear,
    Ring,
}

/// Every mode on each MMU it runs on, with its variant name: the shadow MMU's variants
/// are plain (`get`), the TDP MMU's (used-entries mode) are `tdp-get` and so on.
const VARIANTS: [(MmuKind, Mode, &str); 6] = [
    (MmuKind::ShadowDirect, Mode::Get, names::GET),
    (MmuKind::ShadowDirect, Mode::GetClear, names::GET_CLEAR),
    (MmuKind::ShadowDirect, Mode::Ring, names::RING),
    (TDP, Mode::Get, names::TDP_GET),
    (TDP, Mode::GetClear, names::TDP_GET_CLEAR),
    (TDP, Mode::Ring, names::TDP_RING),
];

const TDP: MmuKind = MmuKind::Tdp(vmmu::TdpIteration::UsedEntries);

impl Mode {
    /// The mode's name, as its shadow-MMU variant is named.
    fn name(self) -> &'static str {
        match self {
            Mode::Get => names::GET,
            Mode::GetClear => names::GET_CLEAR,
            Mode::Ring => names::RING,
        }
    }

    /// The VM's dirty-log configuration for a round that dirties `pages` pages.
    fn config(self, pages: u64) -> Result<DirtyLogConfig, BenchError> {
        Ok(match self {
            Mode::Get => DirtyLogConfig::default(),
            Mode::GetClear => DirtyLogConfig {
                manual_protect: true,
                ..DirtyLogConfig::default()
            },
            Mode::Ring => {
                let entries = (pages + 64).next_power_of_two().max(4096);
                let max = DirtyLogConfig::MAX_RING_ENTRIES;
                let size = u32::try_from(entries).ok().filter(|&n| n <= max);
                let Some(size) = size else {
                    return Err(BenchError::new(format!(
                        "dirty-log ring: a round writing {pages} pages needs a ring of \
                         {entries} entries, more than the {max} a ring may have: use \
                         --mem-gib 2 or less"
                    )));
                };
                DirtyLogConfig {
                    ring_size: Some(size),
                    ..DirtyLogConfig::default()
                }
            }
        })
    }
}

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for (ratio, round) in RATIOS.into_iter().zip(shadow_rounds(config)?) {
        push_round(
            &mut samples,
            names::SHADOW_GET,
            ratio_params(config, ratio),
            &round,
        );
    }
    for ratio in RATIOS {
        for (mmu, mode, variant) in VARIANTS {
            let round = round(config, mode, mmu, ratio)?;
            let p = ratio_params(config, ratio);
            push_round(&mut samples, variant, p, &round);
        }
    }
    Ok(samples)
}

/// The samples of one round: `write_ns_per_page` (not at ratio 0) and `harvest_us`.
fn push_round(samples: &mut Vec<Sample>, variant: &str, p: Map<String, Value>, round: &Round) {
    if round.written != 0 {
        let ns = round.write_ns / round.written as f64;
        samples.push(Sample::new(
            variant,
            names::WRITE_NS_PER_PAGE,
            p.clone(),
            ns,
            "ns",
        ));
    }
    samples.push(Sample::new(
        variant,
        names::HARVEST_US,
        p,
        round.harvest_ns / 1e3,
        "us",
    ));
}

/// `shadow-get`'s rounds, one per ratio of [`RATIOS`], on one VM: a shadow-paging VM with
/// a guest OS, one process mapping nearly all of RAM and writing every page, logging on
/// and the log emptied before each round (see the module doc).
fn shadow_rounds(config: &BenchConfig) -> Result<Vec<Round>, BenchError> {
    let ram = config.mem_bytes();
    let m = shadow_guest::machine(ram, PagingConfig::default(), Algorithms::default())?;
    let k = &m.kernel;
    let mut cpu = m.cpu().context("create the vCPU")?;
    let mut p = k.spawn(&mut cpu).context("spawn")?;
    // Room for the process's tables (a PT per 512 pages, a PD, a PDPT) and some slack.
    let free = k.frames().free_frames() as u64;
    let pages = (free - 16) * 512 / 513;
    let base = k
        .mmap(&mut p, pages * PAGE_SIZE, Prot::RW)
        .context("mmap")?;
    let gva = |page: u64| Gva(base.0 + page * PAGE_SIZE);
    for page in 0..pages {
        k.access(&mut cpu, &mut p, gva(page), AccessKind::Write)
            .context("fault-in")?;
    }
    m.vm.set_user_memory_region(MemoryRegion {
        slot: 0,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: ram,
        userspace_addr: m.hva.0,
    })
    .context("set_user_memory_region (LOG_DIRTY_PAGES)")?;
    let mut bitmap = vec![u64::MAX; (ram / PAGE_SIZE).div_ceil(64) as usize];
    m.vm.get_dirty_log(0, &mut bitmap)
        .context("get_dirty_log")?;
    let mut rounds = Vec::with_capacity(RATIOS.len());
    for ratio in RATIOS {
        let dirty = random_pages(pages, dirty_count(pages, ratio));
        let start = Instant::now();
        for &page in &dirty {
            k.access(&mut cpu, &mut p, gva(page), AccessKind::Write)
                .context("guest write")?;
        }
        let write_ns = start.elapsed().as_nanos() as f64;
        let start = Instant::now();
        let harvested =
            m.vm.get_dirty_log(0, &mut bitmap)
                .context("get_dirty_log")?
                .dirty_pages;
        let harvest_ns = start.elapsed().as_nanos() as f64;
        // Exactly the pages written: the kernel writes no page table during a round, and
        // its PTEs already have A and D set, so the walk dirties no table.
        if harvested != dirty.len() as u64 {
            return Err(BenchError::new(format!(
                "dirty-log shadow-get: wrote {} distinct pages, harvested {harvested}",
                dirty.len()
            )));
        }
        rounds.push(Round {
            written: dirty.len() as u64,
            write_ns,
            harvest_ns,
        });
    }
    k.exit(&mut cpu, p).context("exit")?;
    Ok(rounds)
}

/// What one round measured.
struct Round {
    written: u64,
    write_ns: f64,
    harvest_ns: f64,
}

/// One round on a fresh VM: see the module doc.
fn round(config: &BenchConfig, mode: Mode, mmu: MmuKind, ratio: f64) -> Result<Round, BenchError> {
    let npages = config.mem_bytes() / vmmu::types::PAGE_SIZE;
    let dirty = random_pages(npages, dirty_count(npages, ratio));
    let vm_config = VmConfig {
        mmu,
        dirty_log: mode.config(dirty.len() as u64)?,
        ..VmConfig::default()
    };
    let mut guest = Guest::with_vm_config(config, HostBacking::Page4K, vm_config)?;
    guest.write_every_page()?;
    guest.set_logging(true)?;
    let mut harvester = Harvester::new(mode, guest.pages, dirty.len());
    harvester.harvest(&guest)?;

    let start = Instant::now();
    for &page in &dirty {
        guest.access_page(page, AccessKind::Write)?;
    }
    let write_ns = start.elapsed().as_nanos() as f64;

    let start = Instant::now();
    let harvested = harvester.harvest(&guest)?;
    let harvest_ns = start.elapsed().as_nanos() as f64;

    if harvested != dirty.len() as u64 {
        return Err(BenchError::new(format!(
            "dirty-log {}: wrote {} distinct pages, harvested {harvested}",
            mode.name(),
            dirty.len()
        )));
    }
    Ok(Round {
        written: dirty.len() as u64,
        write_ns,
        harvest_ns,
    })
}

/// The VMM's side of one mode, with its buffers allocated up front (outside the timing).
struct Harvester {
    mode: Mode,
    npages: u64,
    bitmap: Vec<u64>,
    entries: Vec<DirtyGfn>,
}

impl Harvester {
    fn new(mode: Mode, npages: u64, max_entries: usize) -> Self {
        Harvester {
            mode,
            npages,
            // Filled, not zeroed, so its memory is touched now, not in a timed harvest.
            bitmap: vec![u64::MAX; npages.div_ceil(64) as usize],
            entries: Vec::with_capacity(if mode == Mode::Ring { max_entries } else { 0 }),
        }
    }

    /// Collects the dirty pages and re-protects them; returns how many were reported.
    fn harvest(&mut self, guest: &Guest) -> Result<u64, BenchError> {
        let vm = &guest.vm;
        match self.mode {
            Mode::Get => Ok(vm
                .get_dirty_log(SLOT, &mut self.bitmap)
                .context("get_dirty_log")?
                .dirty_pages),
            Mode::GetClear => {
                let got = vm
                    .get_dirty_log(SLOT, &mut self.bitmap)
                    .context("get_dirty_log")?
                    .dirty_pages;
                let cleared = vm
                    .clear_dirty_log(SLOT, 0, self.npages, &self.bitmap)
                    .context("clear_dirty_log")?;
                if cleared != got {
                    return Err(BenchError::new(format!(
                        "dirty-log get-clear: GET reported {got} pages, CLEAR cleared {cleared}"
                    )));
                }
                Ok(got)
            }
            Mode::Ring => {
                self.entries.clear();
                let n = vm
                    .harvest_dirty_ring(guest.vcpu.id, &mut self.entries)
                    .context("harvest_dirty_ring")?;
                vm.reset_dirty_rings().context("reset_dirty_rings")?;
                Ok(n as u64)
            }
        }
    }
}
