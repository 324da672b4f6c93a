//! A per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING): the write-fault paths push the pages
//! they make writable; the VMM harvests entries and then asks for a reset, which
//! write-protects them again so the next write is seen.
//!
//! Three counters, all increasing: `pushed` by the vCPU, `harvested` by the VMM's reads,
//! `reset` by resets, with `reset <= harvested <= pushed` and `pushed - reset <= size`:
//! an entry's slot is reused only after it was harvested and reset. The ring is "soft
//! full" one entry before it is full; a vCPU finding it so exits to the VMM
//! (KVM_EXIT_DIRTY_RING_FULL) instead of running.
//!
//! # Invariants
//! A push never finds the ring full: every path that may log reserves room for its entry
//! first ([`DirtyRing::reserve`], refused once the entries used plus those reserved reach
//! soft-full), before it can make a page writable, and pushes into that room or gives it
//! back. So `used + reserved <= size - 1` always.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::mmu::DirtyGfn;

/// The ring.
pub struct DirtyRing {
    entries: Box<[DirtyGfn]>,
    pushed: u64,
    harvested: u64,
    reset: u64,
    /// Room promised to faults in flight (see the module's invariants).
    reserved: u64,
}

impl DirtyRing {
    /// A ring of `size` entries (at least 2).
    pub fn new(size: u32) -> Self {
        let size = size.max(2) as usize;
        DirtyRing {
            entries: alloc::vec![DirtyGfn { slot: 0, offset: 0 }; size].into_boxed_slice(),
            pushed: 0,
            harvested: 0,
            reset: 0,
            reserved: 0,
        }
    }
    /// Capacity.
    pub fn size(&self) -> u64 {
        self.entries.len() as u64
    }
    /// Entries not yet reset (they hold their slots).
    pub fn used(&self) -> u64 {
        self.pushed - self.reset
    }
    /// Whether the vCPU must stop and let the VMM harvest and reset.
    pub fn is_soft_full(&self) -> bool {
        self.used() + 1 >= self.size()
    }
    /// Reserve room for one entry, for a fault that may log a page: `false`, reserving
    /// nothing, when the entries used and those already reserved make the ring soft-full
    /// (the vCPU must stop). The room is used by [`push_reserved`](Self::push_reserved) or
    /// given back by [`unreserve`](Self::unreserve).
    pub(crate) fn reserve(&mut self) -> bool {
        if self.used() + self.reserved + 1 >= self.size() {
            return false;
        }
        self.reserved += 1;
        true
    }
    /// Give back room [`reserve`](Self::reserve) took and no entry used.
    pub(crate) fn unreserve(&mut self) {
        debug_assert!(self.reserved != 0, "no room reserved");
        self.reserved -= 1;
    }
    /// Record `e` in room [`reserve`](Self::reserve) took: it always fits.
    pub(crate) fn push_reserved(&mut self, e: DirtyGfn) {
        debug_assert!(self.reserved != 0, "no room reserved");
        self.reserved -= 1;
        let pushed = self.push(e);
        debug_assert!(pushed, "reserved room was taken");
    }
    /// Record a dirty page. `false` if the ring is full (the entry is lost: the MMU's
    /// paths reserve room first, see [`reserve`](Self::reserve)).
    pub fn push(&mut self, e: DirtyGfn) -> bool {
        if self.used() >= self.size() {
            return false;
        }
        let i = (self.pushed % self.size()) as usize;
        self.entries[i] = e;
        self.pushed += 1;
        true
    }
    /// Append the entries pushed since the last harvest to `out`; returns how many.
    pub fn harvest(&mut self, out: &mut Vec<DirtyGfn>) -> usize {
        let n = self.pushed - self.harvested;
        for k in self.harvested..self.pushed {
            out.push(self.entries[(k % self.size()) as usize]);
        }
        self.harvested = self.pushed;
        n as usize
    }
    /// Free the slots of every harvested entry, calling `f` on each in push order so the
    /// caller can write-protect them again.
    pub fn reset(&mut self, mut f: impl FnMut(DirtyGfn)) -> usize {
        let n = self.harvested - self.reset;
        for k in self.reset..self.harvested {
            f(self.entries[(k % self.size()) as usize]);
        }
        self.reset = self.harvested;
        n as usize
    }
    /// (pushed, harvested, reset) so far.
    pub fn counters(&self) -> (u64, u64, u64) {
        (self.pushed, self.harvested, self.reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64) -> DirtyGfn {
        DirtyGfn { slot: 1, offset }
    }

    #[test]
    fn push_harvest_reset_and_soft_full() {
        let mut r = DirtyRing::new(4);
        assert!(r.push(e(1)) && r.push(e(2)));
        assert!(!r.is_soft_full());
        assert!(r.push(e(3)));
        assert!(r.is_soft_full());
        assert!(r.push(e(4)));
        assert!(!r.push(e(5)), "a full ring refuses");
        let mut out = Vec::new();
        assert_eq!(r.harvest(&mut out), 4);
        assert_eq!(out, [e(1), e(2), e(3), e(4)]);
        assert!(
            !r.push(e(5)),
            "harvested but not reset entries still hold their slots"
        );
        let mut seen = Vec::new();
        assert_eq!(r.reset(|x| seen.push(x)), 4);
        assert_eq!(seen, out);
        assert!(r.push(e(5)));
        out.clear();
        assert_eq!(r.harvest(&mut out), 1);
        assert_eq!(out, [e(5)], "wraps around");
        assert_eq!(r.counters(), (5, 5, 4));
    }

    #[test]
    fn reservations_count_toward_soft_full() {
        let mut r = DirtyRing::new(4);
        assert!(r.reserve() && r.reserve() && r.reserve());
        assert!(!r.reserve(), "three promised: soft-full");
        r.push_reserved(e(1));
        r.unreserve();
        assert!(r.reserve(), "room given back");
        r.push_reserved(e(2));
        r.push_reserved(e(3));
        assert!(r.is_soft_full());
        assert!(!r.reserve());
        let mut out = Vec::new();
        r.harvest(&mut out);
        r.reset(|_| {});
        assert!(r.reserve(), "a reset frees room");
        r.unreserve();
        assert_eq!(out, [e(1), e(2), e(3)]);
    }
}
