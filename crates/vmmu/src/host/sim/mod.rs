//! The simulated host memory: regions of 4 KiB, THP or 1 GiB hugetlb pages with fake,
//! never-reused pfns, and the host events the MMU must follow (munmap, page migration,
//! THP splits, mprotect). Tests, benchmarks and the examples run on it; a real host
//! implements [`HostMemory`] over its own memory map instead.
//!
//! - this file: [`SimHostMemory`], its operations and errors, the backings it simulates;
//! - `regions`: the region map itself (lookup, mapping level, frame allocation, splits);
//! - `seqlock`: the lock-free copy of the region map that `translate` reads.
//!
//! # Invariants
//! See [`SimHostMemory`]: regions are disjoint, every pfn handed out is fresh, and
//! translations keep the [`HostPage`] contract.
//!
//! # Locking
//! [`SimHostMemory`] keeps its state behind one [`RwLock`]: every change takes it
//! exclusive, so a translation sees the state before or after a change, never a mix.
//! [`HostMemory::translate`] reads the lock-free copy (`seqlock`), republished before the
//! write lock is released, and falls back to the lock taken shared (faults on many vCPUs
//! translate concurrently) when a writer is active, the region has per-page overrides or
//! the map has outgrown the copy.
//! As with a real host, a translation can be stale as soon as it returns.

use alloc::collections::{BTreeMap, BTreeSet};
use core::fmt;

use super::{HostMemory, HostPage};
use crate::sync::{RwLock, RwLockWriteGuard};
use crate::types::{Hva, Level, Pfn, PAGE_SHIFT, PAGE_SIZE};

mod regions;
mod seqlock;
use regions::{is_aligned, State, GIB};
use seqlock::{FastRegions, Published};

/// How a simulated region is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Ordinary 4 KiB pages.
    Page4K,
    /// Transparent huge pages: every 2 MiB-aligned 2 MiB chunk wholly inside the region is
    /// mapped at 2 MiB, the rest at 4 KiB.
    Thp,
    /// hugetlbfs with 1 GiB pages: the region is a whole number of 1 GiB pages, each
    /// mapped at 1 GiB.
    HugeTlb1G,
}

impl Backing {
    /// Size in bytes of the largest page this backing maps (4 KiB, 2 MiB, 1 GiB).
    #[inline]
    pub const fn page_size(self) -> u64 {
        self.level().bytes()
    }

    /// Level of the largest page this backing maps.
    #[inline]
    pub const fn level(self) -> Level {
        match self {
            Backing::Page4K => Level::L4K,
            Backing::Thp => Level::L2M,
            Backing::HugeTlb1G => Level::L1G,
        }
    }
}

/// Why a [`SimHostMemory`] operation was refused. Every error leaves the state unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// A size of zero.
    ZeroSize,
    /// An address or size (`addr`) that is not a multiple of `align` bytes.
    Unaligned {
        /// The offending address or size.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// The address is not mapped (the first unmapped address of a range).
    NotMapped(Hva),
    /// A fixed mapping would overlap an existing one.
    Overlap,
    /// The range runs past the simulated address space, or the frame space is exhausted.
    TooLarge,
}

#[cfg(feature = "std")]
impl std::error::Error for HostError {}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::ZeroSize => f.write_str("size is zero"),
            HostError::Unaligned { addr, align } => {
                write!(f, "{addr:#x} is not aligned to {align:#x} bytes")
            }
            HostError::NotMapped(hva) => write!(f, "host-virtual address {hva} is not mapped"),
            HostError::Overlap => f.write_str("range overlaps an existing mapping"),
            HostError::TooLarge => {
                f.write_str("range exceeds the host-virtual address space or frame space")
            }
        }
    }
}

/// First host-virtual address [`SimHostMemory::mmap`] hands out.
pub const SIM_HVA_BASE: u64 = 0x7f00_0000_0000;
/// End of the simulated host-virtual address space (the user half of a 5-level address
/// space, so the bump allocator does not run out).
pub const SIM_HVA_LIMIT: u64 = 1 << 56;
/// First pfn the simulation hands out (4 GiB: nonzero, and 1 GiB-aligned).
pub const SIM_PFN_BASE: u64 = 0x10_0000;
/// End of the simulated frame space (40-bit pfns, what an SPTE can hold).
pub const SIM_PFN_LIMIT: u64 = 1 << 40;

/// Simulated host memory: regions of 4 KiB, THP or 1 GiB hugetlb pages with fake,
/// never-reused pfns, and the host events that change them.
///
/// Invariants:
/// - regions are disjoint; every pfn handed out (by mmap or remap) is fresh: a bump
///   allocator from [`SIM_PFN_BASE`], aligned to the backing's page size, never reused;
/// - [`SimHostMemory::mmap`] places regions 1 GiB-aligned from [`SIM_HVA_BASE`] with at
///   least 1 GiB of unmapped space after each, so any guest alignment of a memslot on them
///   is possible and an overrun is caught as unmapped;
/// - translations keep the [`HostPage`] contract: a huge mapping is reported only where
///   the whole aligned huge page is in one region, unsplit and not remapped.
///
/// All methods take `&self`; see the module docs for the locking.
pub struct SimHostMemory {
    state: RwLock<State>,
    fast: FastRegions,
}

/// The state's write guard; dropping it republishes the lock-free region table, so every
/// change is visible to `translate` by the time the changing call returns.
struct StateWriter<'a> {
    guard: RwLockWriteGuard<'a, State>,
    fast: &'a FastRegions,
}

impl core::ops::Deref for StateWriter<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl core::ops::DerefMut for StateWriter<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for StateWriter<'_> {
    fn drop(&mut self) {
        let st = &*self.guard;
        self.fast.publish(st.regions.iter().map(|(&start, r)| {
            Published {
                start,
                end: r.end,
                pfn: r.pfn,
                backing: r.backing,
                writable: r.writable,
                overrides: st
                    .remapped
                    .range(start >> PAGE_SHIFT..r.end >> PAGE_SHIFT)
                    .next()
                    .is_some()
                    || st
                        .split
                        .range(start & !(Level::L1G.bytes() - 1)..r.end)
                        .next()
                        .is_some(),
            }
        }));
    }
}

impl Default for SimHostMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SimHostMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.read();
        f.debug_struct("SimHostMemory")
            .field("regions", &st.regions.len())
            .field("mapped_bytes", &st.mapped)
            .field("remapped_pages", &st.remapped.len())
            .field("split_huge_pages", &st.split.len())
            .finish()
    }
}

impl SimHostMemory {
    fn write(&self) -> StateWriter<'_> {
        StateWriter {
            guard: self.state.write(),
            fast: &self.fast,
        }
    }

    /// Empty host memory.
    pub fn new() -> Self {
        SimHostMemory {
            fast: FastRegions::new(),
            state: RwLock::new(State {
                regions: BTreeMap::new(),
                remapped: BTreeMap::new(),
                split: BTreeSet::new(),
                next_hva: SIM_HVA_BASE,
                next_pfn: SIM_PFN_BASE,
                mapped: 0,
            }),
        }
    }

    fn check_size(size: u64, backing: Backing) -> Result<(), HostError> {
        if size == 0 {
            return Err(HostError::ZeroSize);
        }
        if !is_aligned(size, PAGE_SIZE) {
            return Err(HostError::Unaligned {
                addr: size,
                align: PAGE_SIZE,
            });
        }
        if backing == Backing::HugeTlb1G && !is_aligned(size, GIB) {
            return Err(HostError::Unaligned {
                addr: size,
                align: GIB,
            });
        }
        Ok(())
    }

    /// Map `size` bytes of fresh memory at a new 1 GiB-aligned address and return it.
    ///
    /// `size` must be a nonzero multiple of 4 KiB ([`HostError::ZeroSize`],
    /// [`HostError::Unaligned`]), and of 1 GiB for [`Backing::HugeTlb1G`].
    pub fn mmap(&self, size: u64, backing: Backing, writable: bool) -> Result<Hva, HostError> {
        Self::check_size(size, backing)?;
        let mut st = self.write();
        let hva = st.next_hva;
        match hva.checked_add(size) {
            Some(end) if end <= SIM_HVA_LIMIT => {}
            _ => return Err(HostError::TooLarge),
        }
        let pfn = st.alloc_pfns(size >> PAGE_SHIFT, backing.level().pages(), 0)?;
        st.insert(hva, size, backing, writable, pfn);
        Ok(Hva(hva))
    }

    /// Map `size` bytes of fresh memory at `hva` (MAP_FIXED_NOREPLACE).
    ///
    /// `hva` must be 4 KiB-aligned (1 GiB for hugetlb) and the range must not overlap a
    /// mapping ([`HostError::Overlap`]). For THP the pfns are chosen congruent to `hva`
    /// modulo 2 MiB, so 2 MiB-aligned chunks inside are mapped huge even when `hva` is not
    /// 2 MiB-aligned. Size rules as [`SimHostMemory::mmap`].
    pub fn mmap_fixed(
        &self,
        hva: Hva,
        size: u64,
        backing: Backing,
        writable: bool,
    ) -> Result<(), HostError> {
        Self::check_size(size, backing)?;
        let align = if backing == Backing::HugeTlb1G {
            GIB
        } else {
            PAGE_SIZE
        };
        if !is_aligned(hva.0, align) {
            return Err(HostError::Unaligned { addr: hva.0, align });
        }
        let end = match hva.0.checked_add(size) {
            Some(end) if end <= SIM_HVA_LIMIT => end,
            _ => return Err(HostError::TooLarge),
        };
        let mut st = self.write();
        if let Some((_, r)) = st.regions.range(..end).next_back() {
            if r.end > hva.0 {
                return Err(HostError::Overlap);
            }
        }
        let pfn = st.alloc_pfns(size >> PAGE_SHIFT, backing.level().pages(), hva.page())?;
        st.insert(hva.0, size, backing, writable, pfn);
        Ok(())
    }

    /// Unmap `[hva, hva + size)`, which may be part of a region (the region is split).
    ///
    /// The whole range must be mapped ([`HostError::NotMapped`] names the first hole),
    /// `hva` and `size` 4 KiB-aligned, and its ends 1 GiB-aligned where they fall inside a
    /// hugetlb region ([`HostError::Unaligned`]). A THP huge page partly unmapped has its
    /// remainder mapped at 4 KiB from now on (THP split).
    pub fn munmap(&self, hva: Hva, size: u64) -> Result<(), HostError> {
        let mut st = self.write();
        let end = st.check_range(hva.0, size)?;
        st.split_region_at(hva.0);
        st.split_region_at(end);
        let starts: alloc::vec::Vec<u64> = st.regions.range(hva.0..end).map(|(&s, _)| s).collect();
        for start in starts {
            let r = st.regions.remove(&start).expect("collected above");
            st.mapped -= r.end - start;
            let huge = r.backing.page_size();
            if huge > PAGE_SIZE {
                // Forget splits of huge pages that touched the removed piece: the rest of
                // such a huge page, if still mapped, is partial and so 4K by extent.
                let dead: alloc::vec::Vec<u64> = st
                    .split
                    .range(start & !(huge - 1)..r.end)
                    .copied()
                    .collect();
                for k in dead {
                    st.split.remove(&k);
                }
            }
        }
        let first_page = hva.0 >> PAGE_SHIFT;
        let dead: alloc::vec::Vec<u64> = st
            .remapped
            .range(first_page..first_page + (size >> PAGE_SHIFT))
            .map(|(&p, _)| p)
            .collect();
        for p in dead {
            st.remapped.remove(&p);
        }
        Ok(())
    }

    /// Give the 4 KiB page containing `hva` a fresh pfn, as page migration, KSM or a COW
    /// break would; the huge page around it, if any, is split to 4 KiB first. Returns the
    /// new pfn. [`HostError::NotMapped`] if `hva` is not mapped.
    pub fn remap_page(&self, hva: Hva) -> Result<Pfn, HostError> {
        let mut st = self.write();
        let cur = st.translate(hva.0).ok_or(HostError::NotMapped(hva))?;
        let pfn = st.alloc_pfns(1, 1, 0)?;
        if cur.level != Level::L4K {
            st.split.insert(hva.0 & !(cur.level.bytes() - 1));
        }
        st.remapped.insert(hva.page(), pfn);
        st.next_pfn = pfn + 1;
        Ok(Pfn(pfn))
    }

    /// Map the huge page containing `hva` at 4 KiB from now on, keeping its pfns (a THP
    /// split; the simulation allows it for hugetlb too). A no-op if `hva` is already
    /// mapped at 4 KiB; [`HostError::NotMapped`] if it is not mapped.
    pub fn split_huge(&self, hva: Hva) -> Result<(), HostError> {
        let mut st = self.write();
        let cur = st.translate(hva.0).ok_or(HostError::NotMapped(hva))?;
        if cur.level != Level::L4K {
            st.split.insert(hva.0 & !(cur.level.bytes() - 1));
        }
        Ok(())
    }

    /// Change the writability of `[hva, hva + size)` (mprotect). Range rules as
    /// [`SimHostMemory::munmap`]. Regions already at the requested writability are left
    /// alone; otherwise a THP huge page straddling an end of the range is split to 4 KiB,
    /// since one huge mapping cannot have two protections.
    pub fn set_writable(&self, hva: Hva, size: u64, writable: bool) -> Result<(), HostError> {
        let mut st = self.write();
        let end = st.check_range(hva.0, size)?;
        for at in [hva.0, end] {
            if st
                .region_at(at)
                .is_some_and(|(_, r)| r.writable != writable)
            {
                st.split_region_at(at);
            }
        }
        let first = st.region_at(hva.0).map_or(hva.0, |(s, _)| s);
        for (_, r) in st.regions.range_mut(first..end) {
            r.writable = writable;
        }
        Ok(())
    }

    /// Total bytes currently mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.state.read().mapped
    }
}

impl HostMemory for SimHostMemory {
    /// O(log regions) under the shared lock, no allocation; two more O(log) lookups only
    /// when some page was remapped or some huge page split.
    #[inline]
    fn translate(&self, hva: Hva) -> Option<HostPage> {
        match self.fast.translate(hva.0) {
            Some(answer) => answer,
            None => self.state.read().translate(hva.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::regions::align_up;
    use super::*;
    use alloc::vec::Vec;

    const K4: u64 = 4 << 10;
    const M2: u64 = 2 << 20;
    const G1: u64 = 1 << 30;

    fn tr(m: &SimHostMemory, hva: u64) -> Option<HostPage> {
        m.translate(Hva(hva))
    }

    fn level_at(m: &SimHostMemory, hva: u64) -> Level {
        tr(m, hva).expect("mapped").level
    }

    /// Check the [`HostPage`] contract for every page of `[hva, hva + size)`.
    fn check_contract(m: &SimHostMemory, hva: u64, size: u64) {
        for a in (hva..hva + size).step_by(K4 as usize) {
            let Some(p) = tr(m, a) else { continue };
            let pages = p.level.pages();
            assert_eq!(p.pfn.0 % pages, (a >> 12) % pages, "congruence at {a:#x}");
            if p.level != Level::L4K {
                let base_hva = a & !(p.level.bytes() - 1);
                let base_pfn = p.pfn.0 & !(pages - 1);
                // Spot-check the whole huge page from its first page only (it is large).
                if a == base_hva {
                    for i in 0..pages {
                        let q = tr(m, base_hva + i * K4).expect("huge page fully mapped");
                        assert_eq!(q.level, p.level, "level inside huge page");
                        assert_eq!(q.pfn.0, base_pfn + i, "contiguity inside huge page");
                        assert_eq!(q.writable, p.writable);
                    }
                }
            }
        }
    }

    fn snapshot(m: &SimHostMemory, addrs: &[u64]) -> (Vec<Option<HostPage>>, u64) {
        (addrs.iter().map(|&a| tr(m, a)).collect(), m.mapped_bytes())
    }

    #[test]
    fn backing_sizes() {
        assert_eq!(Backing::Page4K.page_size(), K4);
        assert_eq!(Backing::Thp.page_size(), M2);
        assert_eq!(Backing::HugeTlb1G.page_size(), G1);
        assert_eq!(Backing::Thp.level(), Level::L2M);
    }

    #[test]
    fn page4k_maps_at_4k() {
        let m = SimHostMemory::new();
        let h = m.mmap(4 * M2, Backing::Page4K, true).unwrap().0;
        assert_eq!(h % G1, 0);
        assert!(h >= SIM_HVA_BASE);
        for a in (h..h + 4 * M2).step_by(K4 as usize) {
            let p = tr(&m, a).unwrap();
            assert_eq!(p.level, Level::L4K);
            assert!(p.writable);
        }
        assert_eq!(tr(&m, h + 4 * M2), None);
        assert_eq!(tr(&m, h - 1), None);
        assert!(tr(&m, h).unwrap().pfn.0 >= SIM_PFN_BASE);
        assert_eq!(
            tr(&m, h + 5 * K4 + 17).unwrap().pfn.0,
            tr(&m, h).unwrap().pfn.0 + 5
        );
        check_contract(&m, h, 4 * M2);
    }

    #[test]
    fn thp_maps_full_chunks_huge_and_the_tail_4k() {
        let m = SimHostMemory::new();
        let size = 2 * M2 + M2 / 2 + 3 * K4; // two full chunks and a 1 MiB + 12 KiB tail
        let h = m.mmap(size, Backing::Thp, false).unwrap().0;
        assert_eq!(level_at(&m, h), Level::L2M);
        assert_eq!(level_at(&m, h + M2 - K4), Level::L2M);
        assert_eq!(level_at(&m, h + M2), Level::L2M);
        assert_eq!(level_at(&m, h + 2 * M2), Level::L4K);
        assert_eq!(level_at(&m, h + size - K4), Level::L4K);
        assert_eq!(tr(&m, h + size), None);
        assert!(!tr(&m, h).unwrap().writable);
        assert_eq!(tr(&m, h).unwrap().pfn.0 % 512, 0, "THP pfns are 2M-aligned");
        check_contract(&m, h, size);
        // A THP region smaller than 2 MiB is all 4K.
        let s = m.mmap(M2 - K4, Backing::Thp, true).unwrap().0;
        assert_eq!(level_at(&m, s), Level::L4K);
        check_contract(&m, s, M2 - K4);
    }

    #[test]
    fn hugetlb_maps_at_1g() {
        let m = SimHostMemory::new();
        let h = m.mmap(G1, Backing::HugeTlb1G, true).unwrap().0;
        let p = tr(&m, h + 12345 * K4).unwrap();
        assert_eq!(p.level, Level::L1G);
        assert_eq!(p.pfn.0 % Level::L1G.pages(), 12345);
        check_contract(&m, h, G1);
    }

    #[test]
    fn mmap_size_errors() {
        let m = SimHostMemory::new();
        assert_eq!(m.mmap(0, Backing::Page4K, true), Err(HostError::ZeroSize));
        assert_eq!(
            m.mmap(K4 + 1, Backing::Thp, true),
            Err(HostError::Unaligned {
                addr: K4 + 1,
                align: K4
            })
        );
        assert_eq!(
            m.mmap(M2, Backing::HugeTlb1G, true),
            Err(HostError::Unaligned {
                addr: M2,
                align: G1
            })
        );
        assert_eq!(
            m.mmap(SIM_HVA_LIMIT, Backing::Page4K, true),
            Err(HostError::TooLarge)
        );
        assert_eq!(m.mapped_bytes(), 0);
    }

    #[test]
    fn regions_are_apart_and_pfns_fresh() {
        let m = SimHostMemory::new();
        let a = m.mmap(G1, Backing::Page4K, true).unwrap().0;
        let b = m.mmap(K4, Backing::Page4K, true).unwrap().0;
        assert!(b >= a + 2 * G1, "1 GiB guard gap after a 1 GiB region");
        assert_eq!(b % G1, 0);
        let pa = tr(&m, a + G1 - K4).unwrap().pfn.0;
        let pb = tr(&m, b).unwrap().pfn.0;
        assert!(pb > pa);
        m.munmap(Hva(b), K4).unwrap();
        let c = m.mmap(K4, Backing::Page4K, true).unwrap().0;
        assert_ne!(c, b);
        assert!(tr(&m, c).unwrap().pfn.0 > pb, "pfns never reused");
        assert_eq!(m.mapped_bytes(), G1 + K4);
    }

    #[test]
    fn munmap_middle_splits_and_demotes() {
        let m = SimHostMemory::new();
        let h = m.mmap(8 * M2 / 2, Backing::Thp, true).unwrap().0; // 8 MiB
        let before: Vec<_> = (0..1024).map(|i| tr(&m, h + i * K4).unwrap()).collect();
        // Unmap [3M, 5M): chunks [2M,4M) and [4M,6M) become partial.
        m.munmap(Hva(h + 3 * M2 / 2), M2).unwrap();
        assert_eq!(m.mapped_bytes(), 6 << 20);
        for i in 0..1024u64 {
            let a = h + i * K4;
            let off = i * K4;
            let p = tr(&m, a);
            if (3 << 20..5 << 20).contains(&off) {
                assert_eq!(p, None, "{off:#x}");
                continue;
            }
            let p = p.unwrap();
            assert_eq!(p.pfn, before[i as usize].pfn, "pfns survive a split");
            let expect = if !(M2..3 * M2).contains(&off) {
                Level::L2M
            } else {
                Level::L4K
            };
            assert_eq!(p.level, expect, "{off:#x}");
        }
        check_contract(&m, h, 4 * M2);
        // Unmapping the rest piece by piece empties it.
        m.munmap(Hva(h), 3 * M2 / 2).unwrap();
        m.munmap(Hva(h + 5 * M2 / 2), 3 * M2 / 2).unwrap();
        assert_eq!(m.mapped_bytes(), 0);
        assert_eq!(tr(&m, h), None);
        assert!(m.state.read().regions.is_empty());
    }

    #[test]
    fn munmap_across_regions_and_of_hugetlb() {
        let m = SimHostMemory::new();
        let h = m.mmap(2 * G1, Backing::HugeTlb1G, true).unwrap().0;
        let before = snapshot(&m, &[h, h + G1, h + 2 * G1 - K4]);
        assert_eq!(
            m.munmap(Hva(h + M2), G1),
            Err(HostError::Unaligned {
                addr: h + M2,
                align: G1
            })
        );
        assert_eq!(
            m.munmap(Hva(h), G1 + M2),
            Err(HostError::Unaligned {
                addr: h + G1 + M2,
                align: G1
            })
        );
        assert_eq!(before, snapshot(&m, &[h, h + G1, h + 2 * G1 - K4]));
        m.munmap(Hva(h), G1).unwrap();
        assert_eq!(tr(&m, h), None);
        assert_eq!(level_at(&m, h + G1), Level::L1G);
        // A range covering two adjacent regions (made by set_writable) is one munmap.
        let t = m.mmap(4 * M2, Backing::Page4K, true).unwrap().0;
        m.set_writable(Hva(t + M2), M2, false).unwrap();
        m.munmap(Hva(t), 4 * M2).unwrap();
        assert_eq!(m.mapped_bytes(), G1);
    }

    #[test]
    fn remap_page_gives_fresh_pfn_and_splits() {
        let m = SimHostMemory::new();
        let h = m.mmap(2 * M2, Backing::Thp, true).unwrap().0;
        let old: Vec<_> = (0..1024).map(|i| tr(&m, h + i * K4).unwrap().pfn).collect();
        let target = h + M2 + 2 * K4;
        let new = m.remap_page(Hva(target + 5)).unwrap();
        assert!(!old.contains(&new));
        let p = tr(&m, target).unwrap();
        assert_eq!(
            p,
            HostPage {
                pfn: new,
                level: Level::L4K,
                writable: true
            }
        );
        for i in 0..1024u64 {
            let a = h + i * K4;
            if a == target {
                continue;
            }
            let q = tr(&m, a).unwrap();
            assert_eq!(q.pfn, old[i as usize]);
            assert_eq!(q.level, if i < 512 { Level::L2M } else { Level::L4K });
        }
        let newer = m.remap_page(Hva(target)).unwrap();
        assert_ne!(newer, new);
        assert_eq!(tr(&m, target).unwrap().pfn, newer);
        check_contract(&m, h, 2 * M2);
        // On 4K and hugetlb backings too.
        let s = m.mmap(K4, Backing::Page4K, true).unwrap().0;
        let before = tr(&m, s).unwrap().pfn;
        assert_ne!(m.remap_page(Hva(s)).unwrap(), before);
        let g = m.mmap(G1, Backing::HugeTlb1G, true).unwrap().0;
        let np = m.remap_page(Hva(g + G1 / 2)).unwrap();
        assert_eq!(tr(&m, g + G1 / 2).unwrap().pfn, np);
        assert_eq!(level_at(&m, g), Level::L4K);
        // Unmapping forgets the override.
        m.munmap(Hva(h), 2 * M2).unwrap();
        assert!(m
            .state
            .read()
            .remapped
            .keys()
            .all(|&p| p < h >> 12 || p >= (h + 2 * M2) >> 12));
        assert!(m
            .state
            .read()
            .split
            .iter()
            .all(|&k| k < h || k >= h + 2 * M2));
        assert_eq!(m.remap_page(Hva(h)), Err(HostError::NotMapped(Hva(h))));
    }

    #[test]
    fn split_huge_keeps_pfns() {
        let m = SimHostMemory::new();
        let h = m.mmap(2 * M2, Backing::Thp, true).unwrap().0;
        let before: Vec<_> = (0..1024).map(|i| tr(&m, h + i * K4).unwrap()).collect();
        m.split_huge(Hva(h + M2 + 77)).unwrap();
        for (i, b) in before.iter().enumerate() {
            let q = tr(&m, h + i as u64 * K4).unwrap();
            assert_eq!(q.pfn, b.pfn);
            assert_eq!(q.level, if i < 512 { Level::L2M } else { Level::L4K });
        }
        m.split_huge(Hva(h + M2)).unwrap(); // idempotent
        assert_eq!(m.state.read().split.len(), 1);
        let g = m.mmap(G1, Backing::HugeTlb1G, true).unwrap().0;
        m.split_huge(Hva(g)).unwrap();
        assert_eq!(level_at(&m, g + G1 - K4), Level::L4K);
        check_contract(&m, h, 2 * M2);
        check_contract(&m, g, G1);
    }

    #[test]
    fn set_writable_changes_protection_and_splits_straddled_thp() {
        let m = SimHostMemory::new();
        let h = m.mmap(4 * M2, Backing::Thp, true).unwrap().0;
        // Same value: nothing changes, nothing splits.
        m.set_writable(Hva(h + K4), K4, true).unwrap();
        assert_eq!(level_at(&m, h), Level::L2M);
        // Write-protect [1M, 2M + 4K): chunks 0 and 1 straddle the ends.
        m.set_writable(Hva(h + M2 / 2), M2 / 2 + K4, false).unwrap();
        for i in 0..2048u64 {
            let off = i * K4;
            let p = tr(&m, h + off).unwrap();
            let ro = (M2 / 2..M2 + K4).contains(&off);
            assert_eq!(p.writable, !ro, "{off:#x}");
            let expect = if off < 2 * M2 { Level::L4K } else { Level::L2M };
            assert_eq!(p.level, expect, "{off:#x}");
        }
        check_contract(&m, h, 4 * M2);
        // Whole chunk protection change keeps it huge.
        m.set_writable(Hva(h + 2 * M2), M2, false).unwrap();
        assert_eq!(level_at(&m, h + 2 * M2), Level::L2M);
        assert!(!tr(&m, h + 2 * M2).unwrap().writable);
        assert!(tr(&m, h + 3 * M2).unwrap().writable);
        // Across several regions at once.
        m.set_writable(Hva(h), 4 * M2, true).unwrap();
        assert!((0..2048).all(|i| tr(&m, h + i * K4).unwrap().writable));
        assert_eq!(m.mapped_bytes(), 4 * M2);
    }

    #[test]
    fn mmap_fixed_places_and_refuses_overlap() {
        let m = SimHostMemory::new();
        let at = 0x1000_0000_0000 + K4 * 3; // not 2M-aligned
        m.mmap_fixed(Hva(at), 3 * M2, Backing::Thp, true).unwrap();
        let first_chunk = align_up(at, M2);
        assert_eq!(level_at(&m, at), Level::L4K);
        assert_eq!(level_at(&m, first_chunk), Level::L2M);
        check_contract(&m, at, 3 * M2);
        let snap_addrs = [at, first_chunk, at + 3 * M2 - K4, at + 3 * M2];
        let before = snapshot(&m, &snap_addrs);
        assert_eq!(
            m.mmap_fixed(Hva(at - K4), 2 * K4, Backing::Page4K, true),
            Err(HostError::Overlap)
        );
        assert_eq!(
            m.mmap_fixed(Hva(at + M2), K4, Backing::Page4K, true),
            Err(HostError::Overlap)
        );
        assert_eq!(
            m.mmap_fixed(Hva(at + 1), K4, Backing::Page4K, true),
            Err(HostError::Unaligned {
                addr: at + 1,
                align: K4
            })
        );
        assert_eq!(
            m.mmap_fixed(Hva(M2), G1, Backing::HugeTlb1G, true),
            Err(HostError::Unaligned {
                addr: M2,
                align: G1
            })
        );
        assert_eq!(
            m.mmap_fixed(Hva(SIM_HVA_LIMIT - K4), 2 * K4, Backing::Page4K, true),
            Err(HostError::TooLarge)
        );
        assert_eq!(before, snapshot(&m, &snap_addrs));
        // Adjacent is fine; bump mmap stays above fixed mappings.
        m.mmap_fixed(Hva(at - K4), K4, Backing::Page4K, true)
            .unwrap();
        let b = m.mmap(K4, Backing::Page4K, true).unwrap().0;
        assert!(b > at + 3 * M2);
    }

    #[test]
    fn errors_leave_state_unchanged() {
        let m = SimHostMemory::new();
        let t = m.mmap(3 * M2, Backing::Thp, true).unwrap().0;
        let g = m.mmap(G1, Backing::HugeTlb1G, false).unwrap().0;
        let p = m.mmap(4 * K4, Backing::Page4K, true).unwrap().0;
        m.remap_page(Hva(p + K4)).unwrap();
        let addrs: Vec<u64> = [
            t,
            t + M2 - K4,
            t + M2,
            t + 2 * M2,
            t + 3 * M2 - K4,
            t + 3 * M2,
        ]
        .into_iter()
        .chain([
            g,
            g + M2,
            g + G1 - K4,
            g + G1,
            p,
            p + K4,
            p + 3 * K4,
            p + 4 * K4,
            0,
        ])
        .collect();
        let before = snapshot(&m, &addrs);
        let errs = [
            m.munmap(Hva(t), 0),
            m.munmap(Hva(t + 1), K4),
            m.munmap(Hva(t), K4 + 1),
            m.munmap(Hva(t), 4 * M2),
            m.munmap(Hva(t + M2), u64::MAX - K4 + 1),
            m.munmap(Hva(g + M2), M2),
            m.munmap(Hva(p + 2 * K4), 3 * K4),
            m.munmap(Hva(0), K4),
            m.set_writable(Hva(t), 4 * M2, false),
            m.set_writable(Hva(g), M2, true),
            m.set_writable(Hva(t + K4 / 2), K4, false),
            m.set_writable(Hva(p), 0, false),
            m.remap_page(Hva(t + 3 * M2)).map(|_| ()),
            m.split_huge(Hva(g + G1)),
            m.mmap(0, Backing::Thp, true).map(|_| ()),
            m.mmap(M2, Backing::HugeTlb1G, true).map(|_| ()),
            m.mmap_fixed(Hva(t), K4, Backing::Page4K, true),
        ];
        for (i, e) in errs.iter().enumerate() {
            assert!(e.is_err(), "case {i} should fail");
        }
        assert_eq!(errs[3], Err(HostError::NotMapped(Hva(t + 3 * M2))));
        assert_eq!(errs[4], Err(HostError::TooLarge));
        assert_eq!(errs[7], Err(HostError::NotMapped(Hva(0))));
        assert_eq!(before, snapshot(&m, &addrs));
        let st = m.state.read();
        assert_eq!(st.regions.len(), 3);
        assert_eq!(st.remapped.len(), 1);
        assert_eq!(st.split.len(), 0);
    }

    #[test]
    fn error_messages() {
        use alloc::string::ToString;
        assert_eq!(HostError::ZeroSize.to_string(), "size is zero");
        assert_eq!(
            HostError::Unaligned {
                addr: 0x1001,
                align: 0x1000
            }
            .to_string(),
            "0x1001 is not aligned to 0x1000 bytes"
        );
        assert_eq!(
            HostError::NotMapped(Hva(0x5000)).to_string(),
            "host-virtual address 0x5000 is not mapped"
        );
        assert!(HostError::Overlap.to_string().contains("overlaps"));
        assert!(HostError::TooLarge.to_string().contains("exceeds"));
    }
}
