//! `memory`: peak MMU metadata bytes per mapped 4 KiB page, after the guest has written
//! every page of a `--mem-gib` GiB slot, for each MMU and host backing.
//!
//! Counted: page tables (4096 B each, `HeapTableAllocator::live`), the MMU's per-table
//! structures (shadow: `Pages::metadata_bytes`, the page structs and the child-id arrays
//! of non-leaf pages; TDP: one `TdpPage` per table plus its 512-pointer `children` array
//! when the table is not a leaf table), reverse-map descriptors
//! (`DescPool::capacity_bytes`) and the memslot's own metadata (`Memslot::metadata_bytes`:
//! reverse-map heads for every level, large-page disallow counts, the dirty bitmap). KVM
//! spends 8 B of SPTE and 8 B of reverse-map head per 4 KiB page, plus its shadow-page
//! structures: 16+ B per page.
//!
//! Metrics: `bytes_per_page` (all of it) and its parts `table_bytes_per_page`,
//! `struct_bytes_per_page` (per-table structures), `rmap_bytes_per_page` (heads and
//! descriptors), `slot_bytes_per_page` (the rest of the memslot's metadata).

use serde_json::json;
use vmmu::tdp::TdpPage;
use vmmu::types::Level;
use vmmu::{MmuKind, TdpIteration, VmConfig};

use super::guest::{Guest, HostBacking};
use super::names::memory as names;
use super::{params, BenchConfig, BenchError, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "peak MMU metadata bytes per mapped 4 KiB page (tables, page structs, rmaps, slot metadata), per MMU, 4k and 2m host backing",
    run,
};

/// Bytes of metadata by part.
#[derive(Default, Debug)]
struct Bytes {
    tables: usize,
    structs: usize,
    rmap: usize,
    slot: usize,
}

fn shadow_bytes(guest: &Guest) -> Bytes {
    let tables = guest.vm.allocator().live() as usize * 4096;
    guest.vm.with_mmu(|slots, m| {
        let heads: usize = slots.iter().map(|s| s.rmap_head_bytes()).sum();
        let slot: usize = slots.iter().map(|s| s.metadata_bytes()).sum();
        Bytes {
            tables,
            structs: m.pages().metadata_bytes(),
            rmap: heads + m.pool().capacity_bytes(),
            slot: slot - heads,
        }
    })
}

fn tdp_bytes(guest: &Guest) -> Bytes {
    let tables = guest.vm.allocator().live() as usize;
    guest.vm.with_tdp(|slots, m| {
        let g = vmmu::tdp::pin();
        // Tables above 4K carry a children array of 512 epoch pointers.
        let mut nonleaf = 0usize;
        let mut stack: Vec<&TdpPage> = m.roots(&g).map(|(r, _)| r).collect();
        while let Some(p) = stack.pop() {
            if p.level == Level::L4K {
                continue;
            }
            nonleaf += 1;
            for i in 0..512 {
                let s = p.table().get(i);
                if s.is_shadow_present() && !s.is_leaf(p.level) {
                    // SAFETY: pinned, under the MMU lock.
                    if let Some(c) = unsafe { p.child(i, &g).as_ref() } {
                        stack.push(c);
                    }
                }
            }
        }
        let heads: usize = slots.iter().map(|s| s.rmap_head_bytes()).sum();
        let slot: usize = slots.iter().map(|s| s.metadata_bytes()).sum();
        Bytes {
            tables: tables * 4096,
            structs: tables * std::mem::size_of::<TdpPage>()
                + nonleaf * 512 * std::mem::size_of::<usize>(),
            // The memslot allocates reverse-map heads even though the TDP MMU has no
            // reverse maps.
            rmap: heads,
            slot: slot - heads,
        }
    })
}

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    let mmus = [
        (names::SHADOW_DIRECT, MmuKind::ShadowDirect),
        (names::TDP, MmuKind::Tdp(TdpIteration::default())),
    ];
    for backing in HostBacking::ALL {
        for (name, mmu) in mmus {
            let vm_config = VmConfig {
                mmu,
                ..VmConfig::default()
            };
            let mut guest = Guest::with_vm_config(config, backing, vm_config)?;
            guest.write_every_page()?;
            let b = match mmu {
                MmuKind::ShadowDirect | MmuKind::ShadowPaging => shadow_bytes(&guest),
                MmuKind::Tdp(_) => tdp_bytes(&guest),
            };
            let pages = guest.pages as f64;
            let p = params([
                ("backing", json!(backing.name())),
                ("mmu", json!(name)),
                ("mem_gib", json!(config.mem_gib)),
            ]);
            let total = b.tables + b.structs + b.rmap + b.slot;
            for (metric, v) in [
                (names::BYTES_PER_PAGE, total),
                (names::TABLE_BYTES_PER_PAGE, b.tables),
                (names::STRUCT_BYTES_PER_PAGE, b.structs),
                (names::RMAP_BYTES_PER_PAGE, b.rmap),
                (names::SLOT_BYTES_PER_PAGE, b.slot),
            ] {
                samples.push(Sample::new(name, metric, p.clone(), v as f64 / pages, "B"));
            }
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a quick (64 MiB) slot: every metric for every (MMU, backing), and fewer bytes
    /// per 4 KiB page than KVM's 16 (8 B of SPTE and 8 B of reverse-map head) at 4K.
    #[test]
    fn reports_every_mmu_and_backing_below_kvm() {
        let config = BenchConfig {
            quick: true,
            ..BenchConfig::new(1)
        };
        let samples = run(&config).unwrap();
        assert_eq!(samples.len(), 2 * 2 * 5);
        for s in samples.iter().filter(|s| s.metric == "bytes_per_page") {
            assert!(s.value > 0.0, "{s:?}");
            if s.params["backing"] == "4k" {
                assert!(s.value > 8.0 && s.value < 16.0, "{s:?}");
            }
        }
    }
}
