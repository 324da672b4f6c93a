//! `shadow-fork`: fork under shadow paging, and the reverse maps it leaves behind.
//!
//! A process maps 64 MiB of anonymous memory and writes every page; it forks `children`
//! children (1, 32, 500), each of which runs (context switch) and reads every page; then
//! the parent runs again and reads every page, so each of its frames ends up mapped by
//! `children + 1` shadow PTEs (the reverse map of one gfn is that long). Then the host reclaims the parent's 64 MiB: an
//! MMU-notifier `unmap_hva_range` over its host pages zaps every one of those long
//! reverse maps, which is where seed 000 (iterate without restarting) and seed 003 (drop
//! a whole list at once) matter. Then every child exits, and the parent.
//!
//! Variants, the 2×2 grid of the reverse-map algorithms (also in the `rmap_iteration`
//! and `rmap_drop` params): `restart-scan` (restart scan, one by one: KVM before both
//! seeds), `one-by-one` (iterator, one by one: seed 000 only), `destroy` (restart scan,
//! destroy: seed 003 only), `iterator` (iterator, destroy: KVM today).
//!
//! Metrics, MMU time from `vm.stats().mmu_ns`: `us` (the whole run, boot to the last
//! exit), `unmap_us` (the host's unmap alone), `exit_us` (the exits); `unmap_wall_us`
//! (the unmap's wall-clock time, a cross-check); `max_rmap_len` (the longest reverse map
//! just before the unmap) and `faults` (MMU faults over the run). `--quick` maps 4 MiB
//! instead of 64.

use serde_json::json;
use std::time::Instant;

use vmmu::types::{AccessKind, Gfn, Gva, PAGE_SIZE};
use vmmu::{Algorithms, PagingConfig, RmapDrop, RmapIteration};
use vmmu_testing::guest_os::{Cpu, Process, Prot};

use super::names::shadow_fork as names;
use super::shadow_guest::{machine, mmu_ns, ram_for, reclaim, us};
use super::{params, BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "shadow paging: a 64 MiB process forks 1/32/500 readers, the host unmaps its memory, all exit (MMU us), by rmap algorithm",
    run,
};

/// Children forked.
pub const CHILDREN: [u64; 3] = [1, 32, 500];

/// Bytes the parent maps and touches.
const PARENT_BYTES: usize = 64 << 20;

/// The variants: name, iteration, drop.
pub const VARIANTS: [(&str, RmapIteration, RmapDrop); 4] = [
    (
        names::RESTART_SCAN,
        RmapIteration::RestartScan,
        RmapDrop::OneByOne,
    ),
    (
        names::ONE_BY_ONE,
        RmapIteration::Iterator,
        RmapDrop::OneByOne,
    ),
    (
        names::DESTROY,
        RmapIteration::RestartScan,
        RmapDrop::Destroy,
    ),
    (names::ITERATOR, RmapIteration::Iterator, RmapDrop::Destroy),
];

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let bytes = config.scaled(PARENT_BYTES) as u64;
    let mut samples = Vec::new();
    for children in CHILDREN {
        for (variant, iteration, drop) in VARIANTS {
            let algorithms = Algorithms {
                rmap_iteration: iteration,
                rmap_drop: drop,
                ..Algorithms::default()
            };
            let r = one_run(bytes, children, algorithms)?;
            let p = params([
                ("children", json!(children)),
                ("mem_mib", json!(bytes >> 20)),
                ("rmap_iteration", json!(format!("{iteration:?}"))),
                ("rmap_drop", json!(format!("{drop:?}"))),
            ]);
            for (metric, value, unit) in [
                (names::US, us(r.total_ns), "us"),
                (names::UNMAP_US, us(r.unmap_ns), "us"),
                (names::EXIT_US, us(r.exit_ns), "us"),
                (names::UNMAP_WALL_US, us(r.unmap_wall_ns), "us"),
                (names::MAX_RMAP_LEN, r.max_rmap_len as f64, "sptes"),
                (names::FAULTS, r.faults as f64, "faults"),
            ] {
                samples.push(Sample::new(variant, metric, p.clone(), value, unit));
            }
        }
    }
    Ok(samples)
}

/// What one run measured.
struct ForkRun {
    total_ns: u64,
    unmap_ns: u64,
    exit_ns: u64,
    unmap_wall_ns: u64,
    max_rmap_len: usize,
    faults: u64,
}

fn one_run(bytes: u64, children: u64, algorithms: Algorithms) -> Result<ForkRun, BenchError> {
    let paging = PagingConfig::default();
    let m = machine(ram_for(bytes, children + 1, 8 << 20), paging, algorithms)?;
    let k = &m.kernel;
    let mut cpu = m.cpu().context("create the vCPU")?;
    let mut parent = k.spawn(&mut cpu).context("spawn")?;
    let base = k.mmap(&mut parent, bytes, Prot::RW).context("mmap")?;
    let pages = bytes / PAGE_SIZE;
    touch_all(k, &mut cpu, &mut parent, base, pages, AccessKind::Write)?;

    let mut kids: Vec<Process> = Vec::with_capacity(children as usize);
    for _ in 0..children {
        let mut child = k.fork(&mut cpu, &mut parent).context("fork")?;
        k.switch_to(&mut cpu, &child)
            .context("switch to the child")?;
        touch_all(k, &mut cpu, &mut child, base, pages, AccessKind::Read)?;
        kids.push(child);
    }
    // The parent runs again and reads its memory: its own SPTEs, dropped when fork
    // write-protected its PTEs, come back, so each gfn is mapped by children + 1.
    k.switch_to(&mut cpu, &parent)
        .context("switch to the parent")?;
    touch_all(k, &mut cpu, &mut parent, base, pages, AccessKind::Read)?;
    let max_rmap_len = m.vm.max_rmap_len();

    // The host reclaims the parent's memory: every frame its VMA maps.
    let mut frames: Vec<Gfn> = parent.mm().vmas()[0]
        .present()
        .filter_map(|(_, r)| r.gfn())
        .collect();
    let (t, wall) = (mmu_ns(&m), Instant::now());
    reclaim(&m, &mut frames)?;
    let unmap_wall_ns = wall.elapsed().as_nanos() as u64;
    let unmap_ns = mmu_ns(&m) - t;

    let t = mmu_ns(&m);
    for child in kids {
        k.exit(&mut cpu, child).context("child exit")?;
    }
    k.exit(&mut cpu, parent).context("parent exit")?;
    let exit_ns = mmu_ns(&m) - t;
    let st = m.vm.stats();
    Ok(ForkRun {
        total_ns: st.mmu_ns,
        unmap_ns,
        exit_ns,
        unmap_wall_ns,
        max_rmap_len,
        faults: st.mmu.faults,
    })
}

/// `p` accesses each of the `pages` pages from `base` once.
fn touch_all(
    k: &vmmu_testing::guest_os::Kernel,
    cpu: &mut impl Cpu,
    p: &mut Process,
    base: Gva,
    pages: u64,
    kind: AccessKind,
) -> Result<(), BenchError> {
    for i in 0..pages {
        k.access(cpu, p, Gva(base.0 + i * PAGE_SIZE), kind)
            .context("guest access")?;
    }
    Ok(())
}
