//! `tdp-fault-parallel`: TDP faults in parallel. The slot is split in two halves; with
//! `threads` = 1 one vCPU thread faults in its half, with 2 two vCPU threads fault in one
//! half each at the same time (faults run under the shared MMU lock). Reports faults per
//! second over all threads, 4 KiB host backing, used-entries mode.

use std::sync::Barrier;
use std::time::Instant;

use serde_json::json;
use vmmu::types::{AccessKind, Gpa, PAGE_SIZE};
use vmmu::TdpIteration;

use super::guest::{Guest, HostBacking};
use super::names::{tdp, tdp_fault_parallel as names};
use super::{params, BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about:
        "TDP faults from 1 and 2 vCPU threads, each in its own half of the slot (faults per second)",
    run,
};

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for threads in [1u64, 2] {
        let guest = Guest::with_vm_config(
            config,
            HostBacking::Page4K,
            Guest::tdp_config(TdpIteration::UsedEntries),
        )?;
        let half = guest.pages / 2;
        let base = guest.gpa(0).0;
        let vm = &guest.vm;
        let mut vcpus = Vec::new();
        for _ in 0..threads {
            vcpus.push(vm.create_vcpu().context("create_vcpu")?);
        }
        let barrier = Barrier::new(threads as usize + 1);
        let elapsed = std::thread::scope(|s| -> Result<f64, BenchError> {
            let workers: Vec<_> = vcpus
                .into_iter()
                .enumerate()
                .map(|(t, mut vcpu)| {
                    let barrier = &barrier;
                    s.spawn(move || -> Result<(), String> {
                        barrier.wait();
                        let first = base + t as u64 * half * PAGE_SIZE;
                        for p in 0..half {
                            vm.access(&mut vcpu, Gpa(first + p * PAGE_SIZE), AccessKind::Write)
                                .map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            for w in workers {
                w.join()
                    .map_err(|_| BenchError::new("worker panicked"))?
                    .map_err(|e| BenchError::new(format!("guest write: {e}")))?;
            }
            Ok(start.elapsed().as_secs_f64())
        })?;
        let faults = (half * threads) as f64;
        samples.push(Sample::new(
            tdp::USED_ENTRIES,
            names::FAULTS_PER_S,
            params([
                ("threads", json!(threads)),
                ("mem_gib", json!(config.mem_gib)),
            ]),
            faults / elapsed,
            "faults/s",
        ));
    }
    Ok(samples)
}
