//! `shadow-pt-churn`: page-table churn under shadow paging, with and without unsync pages.
//!
//! A process loops: mmap `size_kib` KiB (2 MiB), write every page (demand paging: each
//! fault installs a PTE, the first one of a fresh PT also links it into the PD), munmap
//! (every PTE cleared, a full flush, the PT unlinked and freed). The guest's PTE writes
//! are what shadow paging pays for: with `sync` every guest table stays write-protected
//! and each PTE write is emulated by the MMU (PagingConfig.unsync = false); with `unsync`
//! the last-level table goes unsync on its first write and the guest writes it directly,
//! the MMU resyncing it at the flush (KVM's default).
//!
//! Metrics: `us` (MMU time of the loop, from `vm.stats().mmu_ns`) and `wall_us`; params
//! `iterations` and `size_kib`. `--quick` runs 16 times fewer iterations.

use serde_json::json;
use std::time::Instant;

use vmmu::types::{AccessKind, Gva, PAGE_SIZE};
use vmmu::{Algorithms, PagingConfig};
use vmmu_testing::guest_os::Prot;

use super::names::shadow_pt_churn as names;
use super::shadow_guest::{machine, mmu_ns, ram_for, us};
use super::{params, BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "shadow paging: mmap 2 MiB, write every page, munmap, in a loop (MMU us): every PTE write emulated (sync) or unsync tables",
    run,
};

/// Bytes mapped per iteration.
const SIZE: u64 = 2 << 20;
/// Iterations of the loop.
const ITERATIONS: usize = 256;

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let iterations = config.scaled(ITERATIONS) as u64;
    let mut samples = Vec::new();
    for (variant, unsync) in [(names::SYNC, false), (names::UNSYNC, true)] {
        let paging = PagingConfig {
            unsync,
            ..PagingConfig::default()
        };
        let m = machine(ram_for(SIZE, 1, 4 << 20), paging, Algorithms::default())?;
        let k = &m.kernel;
        let mut cpu = m.cpu().context("create the vCPU")?;
        let mut p = k.spawn(&mut cpu).context("spawn")?;
        let t = mmu_ns(&m);
        let start = Instant::now();
        for _ in 0..iterations {
            let base = k.mmap(&mut p, SIZE, Prot::RW).context("mmap")?;
            for i in 0..SIZE / PAGE_SIZE {
                k.access(
                    &mut cpu,
                    &mut p,
                    Gva(base.0 + i * PAGE_SIZE),
                    AccessKind::Write,
                )
                .context("write")?;
            }
            k.munmap(&mut cpu, &mut p, base.0, SIZE).context("munmap")?;
        }
        let wall_ns = start.elapsed().as_nanos() as u64;
        let mmu = mmu_ns(&m) - t;
        k.exit(&mut cpu, p).context("exit")?;
        let pr = params([
            ("iterations", json!(iterations)),
            ("size_kib", json!(SIZE >> 10)),
        ]);
        samples.push(Sample::new(variant, names::US, pr.clone(), us(mmu), "us"));
        samples.push(Sample::new(variant, names::WALL_US, pr, us(wall_ns), "us"));
    }
    Ok(samples)
}
