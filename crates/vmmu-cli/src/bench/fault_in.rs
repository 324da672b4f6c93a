//! `fault-in`: the cost of first touch. The guest writes every 4 KiB page of a fresh slot
//! once; each write that finds no mapping takes an EPT violation, the MMU maps the page (4 KiB
//! or, over THP, 2 MiB), and the access retries.

use std::time::Instant;

use super::guest::{Guest, HostBacking};
use super::names::fault_in as names;
use super::{BenchConfig, BenchError, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "first-touch write of every 4 KiB page of a fresh slot (ns per page), 4k and 2m host backing",
    run,
};

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for backing in HostBacking::ALL {
        let mut guest = Guest::new(config, backing)?;
        let start = Instant::now();
        guest.write_every_page()?;
        let elapsed = start.elapsed();
        let ns_per_page = elapsed.as_nanos() as f64 / guest.pages as f64;
        samples.push(Sample::new(
            names::SHADOW_DIRECT,
            names::NS_PER_PAGE,
            backing.params(config),
            ns_per_page,
            "ns",
        ));
        drop(guest); // teardown, outside the timed window
    }
    Ok(samples)
}
