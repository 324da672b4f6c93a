//! Page-table edits through a [`Cpu`]: finding (and allocating) the last-level table of a
//! user address, and freeing the tables of a range no VMA covers any more.
//!
//! Every read and write here is a kernel access through the direct map, so under shadow
//! paging each write to a shadowed guest table is emulated by the MMU (or lands in an
//! unsync last-level table).
//!
//! Invariant kept with [`crate::guest_os::vma`]: a user page table exists only while the
//! range its entry covers (2 MiB for a PT, 1 GiB for a PD, 512 GiB for a PDPT) overlaps a
//! VMA. Tables are allocated only on the way to a page inside a VMA, and
//! [`free_tables`] frees those whose range no longer overlaps one; so a freed table has no
//! present entry left, and frees back to the allocator as zeros.

use std::sync::atomic::Ordering;

use vmmu::guest::pte;
use vmmu::types::{Gfn, Gpa, Level};

use super::cpu::Cpu;
use super::kernel::Kernel;
use super::layout::{entry_gpa, entry_span, index, regions};
use super::vma::AddressSpace;
use super::OsError;

/// Bits of a user upper-level entry (`_PAGE_TABLE`): the leaf decides the permissions.
pub const USER_TABLE: u64 = pte::P | pte::RW | pte::US | pte::A | pte::D;

/// The address bits of an entry, as a gpa.
#[inline]
pub fn entry_addr(e: u64) -> Gpa {
    Gpa(e & pte::ADDR_MASK)
}

/// Finds the PT of a user address in one address space, remembering the last one (a
/// kernel walking a range touches the same PT 512 times in a row).
pub struct PtCursor {
    pml4: Gpa,
    region: u64,
    pt: Option<Gpa>,
}

impl PtCursor {
    /// A cursor over the tables under `pml4`.
    pub fn new(pml4: Gpa) -> Self {
        PtCursor {
            pml4,
            region: u64::MAX,
            pt: None,
        }
    }

    /// The guest-physical address of the PTE of `addr`: `None` when a table on the way is
    /// missing and `alloc` is false; with `alloc`, missing tables are allocated (zeroed)
    /// and linked.
    pub fn pte_gpa(
        &mut self,
        k: &Kernel,
        cpu: &mut impl Cpu,
        addr: u64,
        alloc: bool,
    ) -> Result<Option<Gpa>, OsError> {
        let region = addr & !(entry_span(Level::L2M) - 1);
        if region != self.region || (self.pt.is_none() && alloc) {
            self.pt = walk_to(k, cpu, self.pml4, addr, Level::L4K, alloc)?;
            self.region = region;
        }
        Ok(self.pt.map(|pt| entry_gpa(pt, index(addr, Level::L4K))))
    }
}

/// The table of `level` on the way to `addr` under `pml4` (`Level::L4K`: the PT), walking
/// through the kernel's view; `None` when one above it is missing and `alloc` is false.
pub fn walk_to(
    k: &Kernel,
    cpu: &mut impl Cpu,
    pml4: Gpa,
    addr: u64,
    level: Level,
    alloc: bool,
) -> Result<Option<Gpa>, OsError> {
    let mut table = pml4;
    let mut at = Level::L512G;
    while at > level {
        let e_gpa = entry_gpa(table, index(addr, at));
        let e = cpu.kernel_read(e_gpa)?;
        table = if e & pte::P != 0 {
            if e & pte::PS != 0 {
                return Err(OsError::Inconsistent(format!(
                    "huge user entry {e:#x} at {e_gpa:?}"
                )));
            }
            entry_addr(e)
        } else if alloc {
            let t = k.alloc_frame()?.gpa();
            k.counters.tables_allocated.fetch_add(1, Ordering::Relaxed);
            cpu.kernel_write(e_gpa, t.0 | USER_TABLE)?;
            t
        } else {
            return Ok(None);
        };
        at = at.below().expect("above level 1");
    }
    Ok(Some(table))
}

/// After the `ranges` left the VMAs of `mm`: unlinks every table under `pml4` whose range
/// overlaps one of them but no VMA of `mm`, and adds its frame to `freed` (to be freed
/// after the TLB flush). The PML4 itself stays.
///
/// Levels go lowest first over all the ranges together, so a table is unlinked only
/// after every table below it that the ranges reach (two ranges may share a PD).
pub fn free_tables(
    k: &Kernel,
    cpu: &mut impl Cpu,
    pml4: Gpa,
    mm: &AddressSpace,
    ranges: &[(u64, u64)],
    freed: &mut Vec<Gfn>,
) -> Result<(), OsError> {
    // The entry at `parent_level` maps a table of the level below it.
    for parent_level in [Level::L2M, Level::L1G, Level::L512G] {
        let span = entry_span(parent_level);
        let mut last = u64::MAX;
        for region in ranges
            .iter()
            .flat_map(|&(start, end)| regions(start, end, span))
        {
            if region == last {
                continue;
            }
            last = region;
            if mm.overlaps(region, region + span) {
                continue;
            }
            let Some(parent) = walk_to(k, cpu, pml4, region, parent_level, false)? else {
                continue;
            };
            let e_gpa = entry_gpa(parent, index(region, parent_level));
            let e = cpu.kernel_read(e_gpa)?;
            if e & pte::P != 0 {
                cpu.kernel_write(e_gpa, 0)?;
                freed.push(entry_addr(e).gfn());
                k.counters.tables_freed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}
