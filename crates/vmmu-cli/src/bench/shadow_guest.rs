//! What the shadow-paging scenarios share: a guest OS (`vmmu_testing::guest_os`) booted
//! on a shadow-paging VM whose MMU time is counted, and the helpers they measure with.
//!
//! Guest RAM starts at gpa 0 and one memslot covers it, on 4 KiB host pages (the
//! reference machine's mappings). The VM's clock is on, so `vm.stats().mmu_ns` adds up
//! the time the MMU spends in exits and operations: the scenarios' `us` metrics.

use vmmu::host::Backing;
use vmmu::types::{Gfn, PAGE_SIZE};
use vmmu::{Algorithms, PagingConfig, VmConfig};
use vmmu_testing::guest_os::layout::HUGE_2M;
use vmmu_testing::guest_os::{clock_ns, Machine};

use super::{BenchError, Context};

/// A booted guest with `ram_bytes` of RAM (rounded up to 2 MiB), the MMU configured with
/// `paging` and `algorithms`, its clock on.
pub fn machine(
    ram_bytes: u64,
    paging: PagingConfig,
    algorithms: Algorithms,
) -> Result<Machine, BenchError> {
    let config = VmConfig {
        paging,
        algorithms,
        clock: Some(clock_ns),
        ..VmConfig::default()
    };
    Machine::new(ram_bytes.next_multiple_of(HUGE_2M), Backing::Page4K, config)
        .context("boot the guest OS")
}

/// RAM for `processes` processes each mapping `bytes` of data, with room for their page
/// tables (a PT per 2 MiB, a PD, a PDPT and a PML4 each), plus `slack` bytes.
pub fn ram_for(bytes: u64, processes: u64, slack: u64) -> u64 {
    let tables = (bytes.div_ceil(HUGE_2M) + 3) * PAGE_SIZE;
    bytes + processes * tables + slack
}

/// The VM's MMU time so far, in ns.
pub fn mmu_ns(m: &Machine) -> u64 {
    m.vm.stats().mmu_ns
}

/// Nanoseconds to microseconds.
pub fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// The host reclaims the guest frames `frames` (MMU-notifier unmap of their host pages),
/// one `unmap_hva_range` per run of consecutive frames.
pub fn reclaim(m: &Machine, frames: &mut [Gfn]) -> Result<usize, BenchError> {
    frames.sort_unstable();
    let mut calls = 0;
    let mut i = 0;
    while i < frames.len() {
        let mut j = i + 1;
        while j < frames.len() && frames[j].0 == frames[j - 1].0 + 1 {
            j += 1;
        }
        let start = m.hva_of(frames[i]);
        let end = m.hva_of(Gfn(frames[j - 1].0 + 1));
        m.vm.unmap_hva_range(start, end)
            .context("unmap_hva_range")?;
        calls += 1;
        i = j;
    }
    Ok(calls)
}
