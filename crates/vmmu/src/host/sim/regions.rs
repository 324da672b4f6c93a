//! The simulated host's region map: disjoint regions keyed by start address, the per-page
//! overrides (remapped pages, split huge pages), lookup and mapping level, the bump
//! allocators of addresses and frames, and the region splits a partial munmap or mprotect
//! makes.
//!
//! # Invariants
//! Regions are disjoint; a region's first pfn is congruent to its start's page number
//! modulo its backing's huge page size; a remapped page's huge page is in `split` or
//! already mapped at 4 KiB by extent; `mapped` is the sum of the regions' sizes.
//!
//! # Locking
//! None here: [`State`] lives behind [`super::SimHostMemory`]'s lock, read shared by
//! `translate`, changed only under the write guard.

use alloc::collections::{BTreeMap, BTreeSet};

use super::{Backing, HostError, SIM_PFN_LIMIT};
use crate::host::HostPage;
use crate::types::{Hva, Level, Pfn, PAGE_SHIFT, PAGE_SIZE};

pub(super) const GIB: u64 = 1 << 30;

/// Whether `x` is a multiple of `align` (a power of two).
#[inline]
pub(super) const fn is_aligned(x: u64, align: u64) -> bool {
    x & (align - 1) == 0
}

#[inline]
pub(super) const fn align_up(x: u64, align: u64) -> u64 {
    (x + align - 1) & !(align - 1)
}

/// One mapped range `[start, end)` (the start is the key in [`State::regions`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Region {
    /// One past the last byte.
    pub(super) end: u64,
    pub(super) backing: Backing,
    pub(super) writable: bool,
    /// The pfn of the region's first page; page `i` is backed by `pfn + i` unless
    /// remapped. Congruent to `start`'s page number modulo `backing.level().pages()`.
    pub(super) pfn: u64,
}

#[derive(Debug)]
pub(super) struct State {
    /// Disjoint regions keyed by start address.
    pub(super) regions: BTreeMap<u64, Region>,
    /// Pages (by hva page number) that got a fresh pfn from [`super::SimHostMemory::remap_page`].
    /// Their huge page is always in `split` or already mapped at 4K.
    pub(super) remapped: BTreeMap<u64, u64>,
    /// First addresses of huge pages mapped at 4 KiB after a split.
    pub(super) split: BTreeSet<u64>,
    pub(super) next_hva: u64,
    pub(super) next_pfn: u64,
    pub(super) mapped: u64,
}

impl State {
    /// The region containing `hva`, with its start.
    #[inline]
    pub(super) fn region_at(&self, hva: u64) -> Option<(u64, &Region)> {
        let (&start, r) = self.regions.range(..=hva).next_back()?;
        (hva < r.end).then_some((start, r))
    }

    /// The mapping level at `hva`, from the region's backing and extent alone (before
    /// per-page overrides): huge iff the aligned huge page lies wholly inside the region.
    #[inline]
    fn region_level(start: u64, r: &Region, hva: u64) -> Level {
        let huge = r.backing.level();
        if huge == Level::L4K {
            return Level::L4K;
        }
        let base = hva & !(huge.bytes() - 1);
        if base >= start && base + huge.bytes() <= r.end {
            huge
        } else {
            Level::L4K
        }
    }

    #[inline]
    pub(super) fn translate(&self, hva: u64) -> Option<HostPage> {
        let (start, r) = self.region_at(hva)?;
        let page = hva >> PAGE_SHIFT;
        let mut pfn = r.pfn + (page - (start >> PAGE_SHIFT));
        let mut level = Self::region_level(start, r, hva);
        // Fast path: no per-page overrides anywhere, no lookups.
        if !(self.remapped.is_empty() && self.split.is_empty()) {
            if level != Level::L4K && self.split.contains(&(hva & !(level.bytes() - 1))) {
                level = Level::L4K;
            }
            if let Some(&p) = self.remapped.get(&page) {
                pfn = p;
                level = Level::L4K;
            }
        }
        Some(HostPage {
            pfn: Pfn(pfn),
            level,
            writable: r.writable,
        })
    }

    /// Allocate `pages` fresh frames whose first is congruent to `congruent_to` modulo
    /// `align` pages (a power of two); returns the first.
    pub(super) fn alloc_pfns(
        &self,
        pages: u64,
        align: u64,
        congruent_to: u64,
    ) -> Result<u64, HostError> {
        let pfn = align_up(self.next_pfn, align) + (congruent_to & (align - 1));
        match pfn.checked_add(pages) {
            Some(end) if end <= SIM_PFN_LIMIT => Ok(pfn),
            _ => Err(HostError::TooLarge),
        }
    }

    pub(super) fn insert(
        &mut self,
        start: u64,
        size: u64,
        backing: Backing,
        writable: bool,
        pfn: u64,
    ) {
        let end = start + size;
        self.regions.insert(
            start,
            Region {
                end,
                backing,
                writable,
                pfn,
            },
        );
        self.mapped += size;
        self.next_pfn = self.next_pfn.max(pfn + (size >> PAGE_SHIFT));
        // Leave at least 1 GiB unmapped after every region, so an access just past the
        // end finds nothing, and keep every bump-allocated start 1 GiB-aligned.
        self.next_hva = self.next_hva.max(align_up(end, GIB) + GIB);
    }

    /// Check that `[hva, hva + size)` is a nonempty, page-aligned, fully mapped range
    /// whose ends are 1 GiB-aligned where they fall in hugetlb regions. Returns the end.
    pub(super) fn check_range(&self, hva: u64, size: u64) -> Result<u64, HostError> {
        if size == 0 {
            return Err(HostError::ZeroSize);
        }
        if !is_aligned(hva, PAGE_SIZE) {
            return Err(HostError::Unaligned {
                addr: hva,
                align: PAGE_SIZE,
            });
        }
        if !is_aligned(size, PAGE_SIZE) {
            return Err(HostError::Unaligned {
                addr: size,
                align: PAGE_SIZE,
            });
        }
        let end = hva.checked_add(size).ok_or(HostError::TooLarge)?;
        let mut cur = hva;
        while cur < end {
            let (_, r) = self.region_at(cur).ok_or(HostError::NotMapped(Hva(cur)))?;
            cur = r.end;
        }
        for (addr, inside) in [(hva, hva), (end, end - 1)] {
            let (_, r) = self.region_at(inside).expect("checked mapped above");
            let align = r.backing.page_size();
            if r.backing == Backing::HugeTlb1G && !is_aligned(addr, align) {
                return Err(HostError::Unaligned { addr, align });
            }
        }
        Ok(end)
    }

    /// Split the region strictly containing `at` (if any) into `[start, at)` and
    /// `[at, end)`. A THP chunk straddling `at` is then in neither piece wholly, so it is
    /// mapped at 4 KiB from now on: the THP split a partial munmap/mprotect causes.
    pub(super) fn split_region_at(&mut self, at: u64) {
        let Some((start, r)) = self.region_at(at) else {
            return;
        };
        if start == at {
            return;
        }
        let mut right = *r;
        right.pfn = r.pfn + ((at - start) >> PAGE_SHIFT);
        self.regions.get_mut(&start).expect("found above").end = at;
        self.regions.insert(at, right);
    }
}
