//! A process's virtual memory areas and the kernel's record of what each page maps.
//!
//! A [`Vma`] is a page-aligned range of anonymous private memory with one protection,
//! and a record per page: not present, or the frame it maps and whether its PTE is
//! writable. The record is the model's own bookkeeping (a real kernel reads its page
//! tables instead); the checks compare it with the guest's tables in guest memory and
//! with what the MMU translates.
//!
//! Invariants of an [`AddressSpace`]:
//! - VMAs are sorted by start, non-empty, page-aligned, disjoint, inside user space;
//! - a page's record is present exactly when its PTE in the process's tables is present,
//!   and then names the same frame and writability.

use vmmu::types::{Gfn, PAGE_SIZE};

use super::layout::{user_range_ok, USER_END};

/// What user code may do in a VMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prot {
    /// Writes allowed (private: copy-on-write after fork).
    pub write: bool,
    /// Instruction fetches allowed.
    pub exec: bool,
}

impl Prot {
    /// Read/write data (`PROT_READ | PROT_WRITE`).
    pub const RW: Prot = Prot {
        write: true,
        exec: false,
    };
    /// Read-only data.
    pub const RO: Prot = Prot {
        write: false,
        exec: false,
    };
    /// Text (`PROT_READ | PROT_EXEC`).
    pub const RX: Prot = Prot {
        write: false,
        exec: true,
    };
}

/// One page's record: 0 when not present, else the gfn, with bit 31 set
/// when the PTE is writable. Gfn 0 is a boot frame, never a user page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRecord(u32);

impl PageRecord {
    const WRITABLE: u32 = 1 << 31;
    /// Not present.
    pub const NONE: PageRecord = PageRecord(0);

    /// Present, mapping `gfn`.
    pub fn new(gfn: Gfn, writable: bool) -> Self {
        debug_assert!(gfn.0 != 0 && gfn.0 < u64::from(Self::WRITABLE));
        PageRecord(gfn.0 as u32 | if writable { Self::WRITABLE } else { 0 })
    }

    /// The frame, when present.
    pub fn gfn(self) -> Option<Gfn> {
        (self.0 != 0).then_some(Gfn(u64::from(self.0 & !Self::WRITABLE)))
    }

    /// Whether the PTE is writable.
    pub fn writable(self) -> bool {
        self.0 & Self::WRITABLE != 0
    }
}

/// A virtual memory area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address (page-aligned).
    pub start: u64,
    /// Protection.
    pub prot: Prot,
    /// One record per page.
    pub pages: Vec<PageRecord>,
}

impl Vma {
    /// An area of `len` bytes at `start`, nothing present.
    pub fn new(start: u64, len: u64, prot: Prot) -> Self {
        Vma {
            start,
            prot,
            pages: vec![PageRecord::NONE; (len / PAGE_SIZE) as usize],
        }
    }

    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.pages.len() as u64 * PAGE_SIZE
    }

    /// Whether `addr` is inside.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end()).contains(&addr)
    }

    /// The record of the page holding `addr` (inside).
    pub fn record(&self, addr: u64) -> PageRecord {
        self.pages[((addr - self.start) / PAGE_SIZE) as usize]
    }

    /// Sets the record of the page holding `addr` (inside).
    pub fn set_record(&mut self, addr: u64, r: PageRecord) {
        self.pages[((addr - self.start) / PAGE_SIZE) as usize] = r;
    }

    /// `(address, record)` of every present page.
    pub fn present(&self) -> impl Iterator<Item = (u64, PageRecord)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, r)| r.gfn().is_some())
            .map(|(i, r)| (self.start + i as u64 * PAGE_SIZE, *r))
    }
}

/// A process's VMAs, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressSpace {
    vmas: Vec<Vma>,
}

impl AddressSpace {
    /// No VMA.
    pub fn new() -> Self {
        AddressSpace::default()
    }

    /// The VMAs, sorted by address.
    pub fn vmas(&self) -> &[Vma] {
        &self.vmas
    }

    /// The VMAs, mutably (records only: callers must not move them).
    pub fn vmas_mut(&mut self) -> &mut [Vma] {
        &mut self.vmas
    }

    /// The VMA holding `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        let i = self.vmas.partition_point(|v| v.end() <= addr);
        self.vmas.get(i).filter(|v| v.contains(addr))
    }

    /// The VMA holding `addr`, mutably.
    pub fn find_mut(&mut self, addr: u64) -> Option<&mut Vma> {
        let i = self.vmas.partition_point(|v| v.end() <= addr);
        self.vmas.get_mut(i).filter(|v| v.contains(addr))
    }

    /// Whether some VMA overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        let i = self.vmas.partition_point(|v| v.end() <= start);
        self.vmas.get(i).is_some_and(|v| v.start < end)
    }

    /// Adds `vma`.
    ///
    /// # Panics
    /// If it is empty, outside user space or overlaps a VMA.
    pub fn insert(&mut self, vma: Vma) {
        let (start, end) = (vma.start, vma.end());
        assert!(
            user_range_ok(start, end - start),
            "bad VMA {start:#x}..{end:#x}"
        );
        assert!(
            !self.overlaps(start, end),
            "VMA {start:#x}..{end:#x} overlaps"
        );
        let i = self.vmas.partition_point(|v| v.end() <= start);
        self.vmas.insert(i, vma);
    }

    /// The lowest address at or above `base` where `len` bytes fit between VMAs.
    pub fn find_free(&self, base: u64, len: u64) -> Option<u64> {
        let mut at = base;
        for v in &self.vmas {
            if v.end() <= at {
                continue;
            }
            if v.start >= at + len {
                break;
            }
            at = v.end();
        }
        (at.checked_add(len)? <= USER_END).then_some(at)
    }

    /// Takes `[start, end)` out of the VMAs, splitting those that straddle its ends, and
    /// returns the parts removed (with their records), sorted.
    pub fn remove_range(&mut self, start: u64, end: u64) -> Vec<Vma> {
        let mut kept = Vec::with_capacity(self.vmas.len() + 1);
        let mut removed = Vec::new();
        for v in self.vmas.drain(..) {
            if v.end() <= start || v.start >= end {
                kept.push(v);
                continue;
            }
            let (vs, ve) = (v.start, v.end());
            let page = |a: u64| ((a - vs) / PAGE_SIZE) as usize;
            let (cut_s, cut_e) = (start.max(vs), end.min(ve));
            if vs < cut_s {
                kept.push(Vma {
                    start: vs,
                    prot: v.prot,
                    pages: v.pages[..page(cut_s)].to_vec(),
                });
            }
            removed.push(Vma {
                start: cut_s,
                prot: v.prot,
                pages: v.pages[page(cut_s)..page(cut_e)].to_vec(),
            });
            if cut_e < ve {
                kept.push(Vma {
                    start: cut_e,
                    prot: v.prot,
                    pages: v.pages[page(cut_e)..].to_vec(),
                });
            }
        }
        self.vmas = kept;
        removed
    }

    /// Takes every VMA out.
    pub fn take_all(&mut self) -> Vec<Vma> {
        std::mem::take(&mut self.vmas)
    }

    /// Present pages over all VMAs.
    pub fn resident_pages(&self) -> usize {
        self.vmas.iter().map(|v| v.present().count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_os::layout::MMAP_BASE;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn records_encode_frame_and_writability() {
        assert_eq!(PageRecord::NONE.gfn(), None);
        let r = PageRecord::new(Gfn(0x7fff_ffff), true);
        assert_eq!(r.gfn(), Some(Gfn(0x7fff_ffff)));
        assert!(r.writable());
        assert!(!PageRecord::new(Gfn(5), false).writable());
    }

    #[test]
    fn insert_find_overlap() {
        let mut mm = AddressSpace::new();
        mm.insert(Vma::new(MMAP_BASE + 4 * P, 2 * P, Prot::RW));
        mm.insert(Vma::new(MMAP_BASE, 2 * P, Prot::RO));
        assert_eq!(mm.vmas()[0].start, MMAP_BASE);
        assert!(mm.find(MMAP_BASE + P).is_some());
        assert!(mm.find(MMAP_BASE + 2 * P).is_none());
        assert_eq!(mm.find(MMAP_BASE + 5 * P).unwrap().prot, Prot::RW);
        assert!(mm.find(MMAP_BASE + 6 * P).is_none());
        assert!(mm.overlaps(MMAP_BASE + P, MMAP_BASE + 3 * P));
        assert!(!mm.overlaps(MMAP_BASE + 2 * P, MMAP_BASE + 4 * P));
        assert_eq!(mm.find_free(MMAP_BASE, 2 * P), Some(MMAP_BASE + 2 * P));
        assert_eq!(mm.find_free(MMAP_BASE, 3 * P), Some(MMAP_BASE + 6 * P));
        assert_eq!(mm.find_free(MMAP_BASE - P, P), Some(MMAP_BASE - P));
        assert_eq!(mm.find_free(USER_END - P, 2 * P), None);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn overlapping_insert_panics() {
        let mut mm = AddressSpace::new();
        mm.insert(Vma::new(MMAP_BASE, 2 * P, Prot::RW));
        mm.insert(Vma::new(MMAP_BASE + P, 2 * P, Prot::RW));
    }

    #[test]
    fn remove_range_splits_and_keeps_records() {
        let mut mm = AddressSpace::new();
        let mut v = Vma::new(MMAP_BASE, 8 * P, Prot::RW);
        for i in 0..8 {
            v.set_record(MMAP_BASE + i * P, PageRecord::new(Gfn(100 + i), i % 2 == 0));
        }
        mm.insert(v);
        mm.insert(Vma::new(MMAP_BASE + 10 * P, P, Prot::RO));
        let removed = mm.remove_range(MMAP_BASE + 2 * P, MMAP_BASE + 11 * P);
        assert_eq!(removed.len(), 2);
        assert_eq!(removed[0].start, MMAP_BASE + 2 * P);
        assert_eq!(removed[0].end(), MMAP_BASE + 8 * P);
        assert_eq!(removed[0].pages[0].gfn(), Some(Gfn(102)));
        assert_eq!(removed[1].start, MMAP_BASE + 10 * P);
        assert_eq!(mm.vmas().len(), 1);
        assert_eq!(mm.vmas()[0].end(), MMAP_BASE + 2 * P);
        assert_eq!(mm.resident_pages(), 2);

        let mut mm = AddressSpace::new();
        mm.insert(Vma::new(MMAP_BASE, 8 * P, Prot::RW));
        let removed = mm.remove_range(MMAP_BASE + 3 * P, MMAP_BASE + 4 * P);
        assert_eq!(removed.len(), 1);
        assert_eq!(mm.vmas().len(), 2, "a hole splits the VMA in two");
        assert_eq!(mm.vmas()[1].start, MMAP_BASE + 4 * P);
        assert_eq!(mm.vmas()[1].pages.len(), 4);
        assert!(mm.remove_range(0, MMAP_BASE).is_empty());
    }
}
