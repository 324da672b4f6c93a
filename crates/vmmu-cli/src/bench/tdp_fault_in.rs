//! `tdp-fault-in`: first touch of every 4 KiB page of a slot on the TDP MMU, with the
//! iterator scanning (`scan-all`) or keeping each table's used-entries bitmap
//! (`used-entries`): what maintaining the bitmap costs the fault path (seed 002).

use std::time::Instant;

use vmmu::TdpIteration;

use super::guest::{Guest, HostBacking};
use super::names::{tdp, tdp_fault_in as names};
use super::{BenchConfig, BenchError, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "first-touch write of every 4 KiB page on the TDP MMU (ns per page): scan-all vs used-entries bitmap upkeep",
    run,
};

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for (mode, name) in [
        (TdpIteration::ScanAll, tdp::SCAN_ALL),
        (TdpIteration::UsedEntries, tdp::USED_ENTRIES),
    ] {
        let backing = HostBacking::Page4K;
        let mut guest = Guest::with_vm_config(config, backing, Guest::tdp_config(mode))?;
        let start = Instant::now();
        guest.write_every_page()?;
        let ns = start.elapsed().as_nanos() as f64 / guest.pages as f64;
        samples.push(Sample::new(
            name,
            names::NS_PER_PAGE,
            backing.params(config),
            ns,
            "ns",
        ));
    }
    Ok(samples)
}
