//! `tdp-zap`: a fully mapped slot of `--mem-gib` GiB zapped on the TDP MMU (every root in
//! passes of increasing level, tables freed after the flush), per iteration mode and host
//! backing.

use std::time::Instant;

use super::guest::{Guest, HostBacking, TDP_MODES};
use super::names::tdp_zap as names;
use super::{BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about:
        "zap a fully mapped slot on the TDP MMU (us), per iteration mode, 4k and 2m host backing",
    run,
};

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for backing in HostBacking::ALL {
        for (mode, name) in TDP_MODES {
            let mut guest = Guest::with_vm_config(config, backing, Guest::tdp_config(mode))?;
            guest.write_every_page()?;
            let start = Instant::now();
            guest.vm.zap_all().context("zap_all")?;
            let us = start.elapsed().as_nanos() as f64 / 1e3;
            samples.push(Sample::new(
                name,
                names::US,
                backing.params(config),
                us,
                "us",
            ));
        }
    }
    Ok(samples)
}
