//! A per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING): the write-fault paths push the pages
//! they make writable; the VMM harvests entries and then asks for a reset, which
//! write-protects them again so the next write is seen.
//!
//! Three counters, all increasing: `pushed` by the vCPU, `harvested` by the VMM's reads,
//! `reset` by resets, with `reset <= harvested <= pushed` and `pushed - reset <= size`:
//! an entry's slot is reused only after it was harvested and reset. The ring is "soft
//! full" one entry before it is full; a vCPU finding it so exits to the VMM
//! (KVM_EXIT_DIRTY_RING_FULL) instead of running, so a push never finds it full.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::mmu::DirtyGfn;

/// The ring.
pub struct DirtyRing {
    entries: Box<[DirtyGfn]>,
    pushed: u64,
    harvested: u64,
    reset: u64,
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
    /// Record a dirty page. `false` if the ring is full (the entry is lost: a caller bug,
    /// since vCPUs stop at soft-full).
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
}
