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
//!
//! # Sizes
//! A ring has a power of two of entries, from [`MIN_ENTRIES`] to [`MAX_ENTRIES`]; any
//! other size is refused with [`Error::InvalidRingSize`] before anything is allocated.
//! KVM (`kvm_vm_ioctl_enable_dirty_log_ring`) also wants a power of two, between one
//! page and `KVM_DIRTY_RING_MAX_ENTRIES` (65536) of its 16-byte entries, i.e. 256 to
//! 65536 entries. Its lower bound comes from the ring being a page the VMM maps; vmmu's
//! ring is not mapped, and rings of a few entries are what the tests use to reach
//! soft-full, so the floor is 4 (three usable entries). Its upper bound is raised to 2^20
//! entries (16 MiB per vCPU) so that one benchmark round over 1 GiB of 4 KiB pages at
//! dirty ratio 1 fits a ring without exits.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::error::Error;
use crate::mmu::DirtyGfn;

/// Fewest entries a ring may have.
pub const MIN_ENTRIES: u32 = 4;
/// Most entries a ring may have.
pub const MAX_ENTRIES: u32 = 1 << 20;

/// Whether `size` entries is a ring size vmmu accepts (see the module's sizes).
pub fn check_size(size: u32) -> Result<(), Error> {
    if size.is_power_of_two() && (MIN_ENTRIES..=MAX_ENTRIES).contains(&size) {
        Ok(())
    } else {
        Err(Error::InvalidRingSize { size })
    }
}

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
    /// A ring of `size` entries, or [`Error::InvalidRingSize`] (nothing allocated) for a
    /// size [`check_size`] refuses.
    pub fn new(size: u32) -> Result<Self, Error> {
        check_size(size)?;
        Ok(DirtyRing {
            entries: alloc::vec![DirtyGfn { slot: 0, offset: 0 }; size as usize].into_boxed_slice(),
            pushed: 0,
            harvested: 0,
            reset: 0,
            reserved: 0,
        })
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
    fn sizes_are_powers_of_two_within_the_limits() {
        for ok in [4, 8, 256, 65536, 1 << 20] {
            assert_eq!(check_size(ok), Ok(()), "{ok}");
        }
        for bad in [0, 1, 2, 3, 5, 48, 65535, (1 << 20) + 1, 1 << 21, 1 << 31, u32::MAX] {
            assert_eq!(
                check_size(bad),
                Err(Error::InvalidRingSize { size: bad }),
                "{bad}"
            );
            assert!(DirtyRing::new(bad).is_err());
        }
    }

    #[test]
    fn push_harvest_reset_and_soft_full() {
        let mut r = DirtyRing::new(4).unwrap();
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
        let mut r = DirtyRing::new(4).unwrap();
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
