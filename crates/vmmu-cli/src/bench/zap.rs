//! `zap`: the cost of zapping a fully mapped memslot — clearing every SPTE, emptying the
//! reverse maps, freeing the tables and flushing — as a memslot delete or move does.

use std::time::Instant;

use super::guest::{Guest, HostBacking, SLOT};
use super::names::zap as names;
use super::{BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "zap every mapping of a fully faulted-in slot (us), 4k and 2m host backing",
    run,
};

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for backing in HostBacking::ALL {
        let mut guest = Guest::new(config, backing)?;
        guest.write_every_page()?; // untimed: the state being zapped
        let start = Instant::now();
        guest.vm.zap_memslot(SLOT).context("zap_memslot")?;
        let elapsed = start.elapsed();
        let us = elapsed.as_nanos() as f64 / 1e3;
        samples.push(Sample::new(
            names::SHADOW_DIRECT,
            names::US,
            backing.params(config),
            us,
            "us",
        ));
        drop(guest); // teardown, outside the timed window
    }
    Ok(samples)
}
