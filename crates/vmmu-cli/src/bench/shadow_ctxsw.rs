//! `shadow-ctxsw`: context switches under shadow paging, and the vCPU's cache of previous
//! roots.
//!
//! `processes` processes (2, 4, 16) each map and touch a small working set (16 pages);
//! then, timed, the vCPU switches between them round-robin, each switch a MOV CR3 and
//! one user read of the next page of the working set (the TLB is cold after the switch,
//! so the read walks the shadow tables of the new root). With 3 previous roots cached
//! (KVM's `prev_roots`), up to 4 processes switch without a root lookup; 16 miss every
//! time.
//!
//! Variants: `root-cache` (3 previous roots, KVM) and `no-root-cache` (none: every CR3
//! load looks its root up). Metrics: `us_per_switch` (wall clock per switch),
//! `mmu_us_per_switch` (MMU time per switch), `root_cache_hit_ratio` (hits over CR3 loads
//! in the timed loop). `--quick` does 16 times fewer switches.

use serde_json::json;
use std::time::Instant;

use vmmu::types::{AccessKind, Gva, PAGE_SIZE};
use vmmu::{Algorithms, PagingConfig};
use vmmu_testing::guest_os::{Process, Prot};

use super::names::shadow_ctxsw as names;
use super::shadow_guest::{machine, mmu_ns, ram_for, us};
use super::{params, BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "shadow paging: round-robin context switches (MOV CR3 + one user read) among 2/4/16 processes, with and without the previous-roots cache",
    run,
};

/// Processes switched among.
const PROCESSES: [u64; 3] = [2, 4, 16];
/// Pages in each process's working set.
const WORKING_SET: u64 = 16;
/// Switches timed.
const SWITCHES: usize = 200_000;

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let switches = config.scaled(SWITCHES) as u64;
    let mut samples = Vec::new();
    for processes in PROCESSES {
        for (variant, prev_roots) in [(names::ROOT_CACHE, 3u8), (names::NO_ROOT_CACHE, 0)] {
            let paging = PagingConfig {
                prev_roots,
                ..PagingConfig::default()
            };
            let bytes = WORKING_SET * PAGE_SIZE;
            let m = machine(
                ram_for(bytes, processes, 4 << 20),
                paging,
                Algorithms::default(),
            )?;
            let k = &m.kernel;
            let mut cpu = m.cpu().context("create the vCPU")?;
            let mut procs: Vec<(Process, Gva)> = Vec::new();
            for _ in 0..processes {
                let mut p = k.spawn(&mut cpu).context("spawn")?;
                let base = k.mmap(&mut p, bytes, Prot::RW).context("mmap")?;
                for i in 0..WORKING_SET {
                    k.access(
                        &mut cpu,
                        &mut p,
                        Gva(base.0 + i * PAGE_SIZE),
                        AccessKind::Write,
                    )
                    .context("touch")?;
                }
                procs.push((p, base));
            }
            // One warm lap: every root built.
            for (p, base) in procs.iter_mut() {
                k.access(&mut cpu, p, *base, AccessKind::Read)
                    .context("warm lap")?;
            }
            let before = m.vm.stats().paging;
            let t = mmu_ns(&m);
            let start = Instant::now();
            for s in 0..switches {
                let n = procs.len() as u64;
                let (p, base) = &mut procs[(s % n) as usize];
                let page = (s / n) % WORKING_SET;
                k.switch_to(&mut cpu, p).context("switch")?;
                k.access(
                    &mut cpu,
                    p,
                    Gva(base.0 + page * PAGE_SIZE),
                    AccessKind::Read,
                )
                .context("user read")?;
            }
            let wall_ns = start.elapsed().as_nanos() as u64;
            let mmu = mmu_ns(&m) - t;
            let after = m.vm.stats().paging;
            let hits = after.root_cache_hits - before.root_cache_hits;
            let loads = hits + after.root_cache_misses - before.root_cache_misses;
            let p = params([
                ("processes", json!(processes)),
                ("prev_roots", json!(prev_roots)),
                ("switches", json!(switches)),
            ]);
            let per = |ns: u64| us(ns) / switches as f64;
            samples.push(Sample::new(
                variant,
                names::US_PER_SWITCH,
                p.clone(),
                per(wall_ns),
                "us",
            ));
            samples.push(Sample::new(
                variant,
                names::MMU_US_PER_SWITCH,
                p.clone(),
                per(mmu),
                "us",
            ));
            samples.push(Sample::new(
                variant,
                names::ROOT_CACHE_HIT_RATIO,
                p,
                if loads == 0 {
                    0.0
                } else {
                    hits as f64 / loads as f64
                },
                "ratio",
            ));
            for (p, _) in procs {
                k.exit(&mut cpu, p).context("exit")?;
            }
        }
    }
    Ok(samples)
}
