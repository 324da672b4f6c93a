//! A lock-free copy of the simulated host's region table, so that `translate` (called on
//! every MMU fault) takes no lock, as GUP-fast walks the host page tables without one.
//!
//! A sequence lock over atomic fields: the writer (holding the state's write lock, so one
//! at a time) makes the sequence odd, rewrites the fields and makes it even again; a reader
//! reads the sequence, the fields, and the sequence again, and trusts what it read only if
//! both sequences are the same even number. Every field is an atomic, so a torn read is
//! detected and thrown away, never undefined behaviour. Regions with per-page overrides
//! (remapped pages, split huge pages), and tables larger than the capacity, send the
//! reader to the locked path.

use alloc::boxed::Box;
use core::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

use super::Backing;
use crate::host::HostPage;
use crate::types::{Level, Pfn, PAGE_SHIFT};

/// Regions the lock-free table holds; beyond that every lookup takes the lock.
pub(super) const CAPACITY: usize = 256;
const UNUSABLE: usize = usize::MAX;

const WRITABLE: u64 = 1 << 2;
const OVERRIDES: u64 = 1 << 3;

#[derive(Default)]
struct Slot {
    start: AtomicU64,
    end: AtomicU64,
    pfn: AtomicU64,
    flags: AtomicU64,
}

/// One region as the writer publishes it.
pub(super) struct Published {
    pub start: u64,
    pub end: u64,
    pub pfn: u64,
    pub backing: Backing,
    pub writable: bool,
    /// Some page of the region has an override: look it up under the lock.
    pub overrides: bool,
}

/// The table.
pub(super) struct FastRegions {
    seq: AtomicU64,
    len: AtomicUsize,
    slots: Box<[Slot]>,
}

fn backing_bits(b: Backing) -> u64 {
    match b {
        Backing::Page4K => 0,
        Backing::Thp => 1,
        Backing::HugeTlb1G => 2,
    }
}

fn bits_backing(b: u64) -> Backing {
    match b & 3 {
        0 => Backing::Page4K,
        1 => Backing::Thp,
        _ => Backing::HugeTlb1G,
    }
}

impl FastRegions {
    pub(super) fn new() -> Self {
        FastRegions {
            seq: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            slots: (0..CAPACITY).map(|_| Slot::default()).collect(),
        }
    }

    /// Replace the table with `regions` (sorted by start). The caller holds the state's
    /// write lock, so there is one writer at a time.
    pub(super) fn publish(&self, regions: impl ExactSizeIterator<Item = Published>) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Relaxed);
        // Readers that see any field written below also see the odd sequence.
        fence(Ordering::Release);
        if regions.len() > CAPACITY {
            self.len.store(UNUSABLE, Ordering::Relaxed);
        } else {
            let n = regions.len();
            for (slot, r) in self.slots.iter().zip(regions) {
                slot.start.store(r.start, Ordering::Relaxed);
                slot.end.store(r.end, Ordering::Relaxed);
                slot.pfn.store(r.pfn, Ordering::Relaxed);
                let flags = backing_bits(r.backing)
                    | if r.writable { WRITABLE } else { 0 }
                    | if r.overrides { OVERRIDES } else { 0 };
                slot.flags.store(flags, Ordering::Relaxed);
            }
            self.len.store(n, Ordering::Relaxed);
        }
        self.seq.store(s + 2, Ordering::Release);
    }

    /// `Some(answer)` when the table could answer, `None` when the caller must take the
    /// lock (a writer was active, the region has overrides, or the table is unusable).
    #[inline]
    pub(super) fn translate(&self, hva: u64) -> Option<Option<HostPage>> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 != 0 {
            return None;
        }
        let n = self.len.load(Ordering::Relaxed);
        if n == UNUSABLE {
            return None;
        }
        let n = n.min(CAPACITY);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.slots[mid].start.load(Ordering::Relaxed) <= hva {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let found = lo.checked_sub(1).map(|i| {
            let s = &self.slots[i];
            (
                s.start.load(Ordering::Relaxed),
                s.end.load(Ordering::Relaxed),
                s.pfn.load(Ordering::Relaxed),
                s.flags.load(Ordering::Relaxed),
            )
        });
        // The reads above happen before the re-check of the sequence.
        fence(Ordering::Acquire);
        if self.seq.load(Ordering::Relaxed) != s1 {
            return None;
        }
        let Some((start, end, pfn, flags)) = found else {
            return Some(None);
        };
        if hva >= end {
            return Some(None);
        }
        if flags & OVERRIDES != 0 {
            return None;
        }
        let huge = bits_backing(flags).level();
        let base = hva & !(huge.bytes() - 1);
        let level = if huge != Level::L4K && base >= start && base + huge.bytes() <= end {
            huge
        } else {
            Level::L4K
        };
        Some(Some(HostPage {
            pfn: Pfn(pfn + ((hva - start) >> PAGE_SHIFT)),
            level,
            writable: flags & WRITABLE != 0,
        }))
    }
}
