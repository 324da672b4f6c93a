//! `writable-bitmap` (seed 001): the cost of write-protecting one shadow page when reading
//! all 512 entries (`scan-512`, before the seed) or only the entries its possibly-writable
//! bitmap names (`bitmap`, the seed), as a function of how many entries of each page are
//! possibly writable (`writable`: 0, 1, 64, 512).
//!
//! Setup (untimed), per variant and `writable`, on a fresh VM: a `--mem-gib` GiB slot on
//! 4 KiB host pages, of which the first `writable` pages of every 2 MiB (one leaf table) are
//! host-writable and the rest host-read-only (`mprotect`); the guest reads every page. A
//! read fault in a slot that does not log maps a host-writable page writable at once, as
//! KVM does, and a host-read-only page neither writable nor MMU-writable, so it is not
//! possibly writable. The setup checks that every leaf table has exactly `writable`
//! possibly-writable entries.
//!
//! Timed: turning LOG_DIRTY_PAGES on for the slot, which walks every shadow page and
//! write-protects those mapping the slot (KVM's `kvm_mmu_slot_remove_write_access`). No
//! public call reaches `write_protect_page` more directly. The value is that time divided by
//! the number of leaf tables, so it also carries the call's small fixed costs (memslot
//! update, an empty pass over the huge-page reverse maps, allocating the dirty bitmap, one
//! remote flush) and the look at the few upper-level pages: an upper bound on the per-page
//! cost, fair to both variants, whose ratio is the point. A VM cannot be reused: write
//! protection keeps SPTEs MMU-writable, so their bits stay set (as the seed defines the
//! bitmap), but a second pass would find nothing writable.

use std::time::Instant;

use serde_json::json;

use vmmu::types::{AccessKind, Level, PAGE_SIZE, SPTE_ENT_PER_PAGE};
use vmmu::{Algorithms, MmuKind, PageWrprot, VmConfig};

use super::guest::{Guest, HostBacking};
use super::names::writable_bitmap as names;
use super::{params, BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "write-protect a slot's shadow pages, all 512 entries scanned vs the possibly-writable bitmap (ns per page), by writable entries per page",
    run,
};

/// Possibly-writable entries per leaf table (the `writable` param).
const WRITABLE: [u64; 4] = [0, 1, 64, 512];

const VARIANTS: [(&str, PageWrprot); 2] = [
    (names::SCAN_512, PageWrprot::Scan512),
    (names::BITMAP, PageWrprot::Bitmap),
];

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for writable in WRITABLE {
        for (name, page_wrprot) in VARIANTS {
            let ns = ns_per_page(config, page_wrprot, writable)?;
            let p = params([
                ("mem_gib", json!(config.mem_gib)),
                ("writable", json!(writable)),
            ]);
            samples.push(Sample::new(name, names::NS_PER_PAGE, p, ns, "ns"));
        }
    }
    Ok(samples)
}

/// One measurement on a fresh VM: see the module doc.
fn ns_per_page(
    config: &BenchConfig,
    page_wrprot: PageWrprot,
    writable: u64,
) -> Result<f64, BenchError> {
    let vm_config = VmConfig {
        // The seeds' mechanisms live in the shadow MMU (KVM's mmu.c).
        mmu: MmuKind::ShadowDirect,
        algorithms: Algorithms {
            page_wrprot,
            ..Algorithms::default()
        },
        ..VmConfig::default()
    };
    let mut guest = Guest::with_vm_config(config, HostBacking::Page4K, vm_config)?;
    let per_table = SPTE_ENT_PER_PAGE as u64;
    let tables = guest.pages / per_table;
    if writable == 0 {
        let (hva, size) = (guest.hva(0), guest.pages * PAGE_SIZE);
        guest
            .vm
            .host()
            .set_writable(hva, size, false)
            .context("host mprotect")?;
    } else if writable < per_table {
        for t in 0..tables {
            let hva = guest.hva(t * per_table + writable);
            let size = (per_table - writable) * PAGE_SIZE;
            guest
                .vm
                .host()
                .set_writable(hva, size, false)
                .context("host mprotect")?;
        }
    }
    for page in 0..guest.pages {
        guest.access_page(page, AccessKind::Read)?;
    }
    let counts = guest.vm.with_mmu(|_, mmu| {
        let leaves = mmu
            .pages()
            .iter()
            .filter(|(_, sp)| sp.role.level() == Level::L4K);
        leaves.fold((0u64, 0u64, true), |(n, sum, exact), (_, sp)| {
            let w = u64::from(sp.possible_writable);
            (n + 1, sum + w, exact && w == writable)
        })
    });
    if counts != (tables, tables * writable, true) {
        return Err(BenchError::new(format!(
            "writable-bitmap setup: expected {tables} leaf tables with {writable} possibly-writable \
             entries each, found {} tables with {} in all",
            counts.0, counts.1
        )));
    }

    let start = Instant::now();
    guest.set_logging(true)?;
    let elapsed = start.elapsed();
    Ok(elapsed.as_nanos() as f64 / tables as f64)
}
