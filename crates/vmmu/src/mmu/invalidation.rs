//! The MMU-notifier invalidation bookkeeping both MMUs keep (KVM's
//! `mmu_invalidate_in_progress`, `mmu_invalidate_range_start/end` and `mmu_invalidate_seq`):
//! while the host changes a range, a fault on it must not install a mapping, and no fault
//! may install a leaf whose range (a huge leaf's whole aligned range) intersects it.
//!
//! # Locking
//! Changed under the VM's MMU lock held exclusively (`invalidate_range_start/end`); read by
//! faults under the lock in whichever mode their MMU faults (a TDP fault reads it through the
//! fault gate, which excludes every exclusive holder).

use crate::types::Hva;

/// Host-virtual ranges being invalidated (between `invalidate_range_start` and `_end`).
/// Several may overlap; like KVM, vmmu keeps their union as one range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Invalidation {
    in_progress: u32,
    start: u64,
    end: u64,
    seq: u64,
}

impl Invalidation {
    /// Whether a fault on `hva` must not install a mapping now.
    #[inline]
    pub fn covers(&self, hva: Hva) -> bool {
        self.in_progress != 0 && hva.0 >= self.start && hva.0 < self.end
    }
    /// Whether a leaf mapping host-virtual `[start, end)` must not be installed now: an
    /// invalidation in progress intersects the range. A huge leaf maps its whole aligned
    /// range, so a fault checks that range, not only the page it faulted on (the host may
    /// invalidate a single 4 KiB page inside a huge page it is changing).
    #[inline]
    pub fn covers_range(&self, start: u64, end: u64) -> bool {
        self.in_progress != 0 && start < self.end && end > self.start
    }
    /// Invalidations begun and not ended.
    pub fn in_progress(&self) -> u32 {
        self.in_progress
    }
    /// Invalidations ended so far (KVM's `mmu_invalidate_seq`).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    pub(crate) fn begin(&mut self, start: u64, end: u64) {
        if self.in_progress == 0 {
            (self.start, self.end) = (start, end);
        } else {
            self.start = self.start.min(start);
            self.end = self.end.max(end);
        }
        self.in_progress += 1;
    }
    /// `false` if no invalidation was in progress.
    pub(crate) fn end(&mut self) -> bool {
        if self.in_progress == 0 {
            return false;
        }
        self.in_progress -= 1;
        self.seq += 1;
        if self.in_progress == 0 {
            (self.start, self.end) = (0, 0);
        }
        true
    }
}
