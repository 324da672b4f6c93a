//! A per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING, with KVM_CAP_DIRTY_LOG_RING_ACQ_REL's
//! ordering): the write-fault paths push the pages they make writable; the VMM reads
//! entries, marks them harvested, and then asks for a reset, which write-protects them
//! again (so the next write is seen) and frees their room.
//!
//! # The protocol, entry by entry
//! Each entry carries a slot, an offset and a flags word (KVM's `struct kvm_dirty_gfn`,
//! `KVM_DIRTY_GFN_F_DIRTY` and `KVM_DIRTY_GFN_F_RESET`). An entry goes through
//! free -> DIRTY -> DIRTY|RESET -> free, each step by one party:
//! 1. the vCPU ([`push_reserved`](DirtyRing::push_reserved)) writes slot and offset, then
//!    publishes DIRTY with a **release** store of the flags word;
//! 2. the VMM ([`read`](DirtyRing::read), [`harvest`](DirtyRing::harvest)) loads the
//!    flags with **acquire**; seeing DIRTY, it reads slot and offset, which are then
//!    complete (the acquire synchronizes with the push's release); it marks the entry
//!    harvested by storing RESET with release ([`mark_harvested`](DirtyRing::mark_harvested));
//! 3. the reset ([`reset`](DirtyRing::reset), `KVM_RESET_DIRTY_RINGS`) takes, from the
//!    oldest unfreed entry on, each entry whose flags (acquire) say RESET, stopping at the
//!    first that does not: it reads the entry, hands it to the caller to write-protect,
//!    frees it (flags to 0), and then advances the reset count with a release store; the
//!    vCPU loads that count with acquire before it reuses a freed entry, so it never
//!    overwrites an entry the reset is still reading.
//!
//! The VMM side may run on any thread, concurrently with the vCPU pushing: the vCPU
//! takes only its own lock (`producer`), never the VMM's (`consumer`), so harvesting
//! never stalls a vCPU and a vCPU never sees a half-read entry. `tests/loom_ring.rs` runs
//! this code under loom: a harvester never observes an entry before its contents are
//! complete, and a reset never frees an entry the vCPU is rewriting.
//!
//! Unlike KVM's `u32` flags, the flags word also carries the entry's index (how many
//! entries were pushed before it) and a SEEN bit: the ring is not memory the VMM writes,
//! so a VMM that misuses it cannot corrupt it. Marking an entry that is not there (never
//! pushed, already reset, or the same place a lap earlier or later) is
//! [`MarkError::NotDirty`]; marking one the VMM never read is [`MarkError::NotRead`];
//! marking twice and resetting twice are no-ops. Every field is an atomic, so no misuse
//! from safe code is undefined behaviour either.
//!
//! Three counts, all increasing: `pushed` by the vCPU, the VMM's fetch position (of
//! [`harvest`](DirtyRing::harvest)), `reset` by resets, with
//! `reset <= pushed` and `pushed - reset <= size`: an entry's place is reused only after
//! it was harvested and reset. The ring is soft-full at [`DirtyRing::soft_limit`] entries
//! used; a vCPU finding it so exits to the VMM (KVM_EXIT_DIRTY_RING_FULL) instead of
//! running.
//!
//! # Invariants
//! A push never finds the ring full: every path that may log reserves room for its entry
//! first ([`DirtyRing::reserve`], refused once the entries used plus those reserved reach
//! the soft limit), before it can make a page writable, and pushes into that room or
//! gives it back. So `used + reserved <= soft_limit <= size - 1` always.
//!
//! # Sizes
//! A ring has a power of two of entries. Two rules ([`RingLimits`]):
//! - [`RingLimits::Vmmu`] (the default): from [`MIN_ENTRIES`] to [`MAX_ENTRIES`], soft-full
//!   one entry before full. KVM's lower bound comes from the ring being a page the VMM
//!   maps; vmmu's ring is not mapped, and rings of a few entries are what the tests use to
//!   reach soft-full, so the floor is 4 (three usable entries). The upper bound is raised
//!   to 2^20 entries (16 MiB per vCPU) so that one benchmark round over 1 GiB of 4 KiB
//!   pages at dirty ratio 1 fits a ring without exits. vmmu's rooms make KVM's slack
//!   unnecessary: a fault reserves its entry before it can make a page writable.
//! - [`RingLimits::Kvm`]: KVM's own (`kvm_vm_ioctl_enable_dirty_log_ring`, which takes
//!   the size in bytes of 16-byte entries): at least one 4 KiB page (256 entries), at
//!   most `KVM_DIRTY_RING_MAX_ENTRIES` (65536), and soft-full `KVM_DIRTY_RING_RSVD_ENTRIES`
//!   (64) entries before full (KVM's `soft_limit`; without PML, which vmmu's CPU model
//!   does not have, KVM reserves no more), so a vCPU exits where KVM's would.
//!
//! Any other size is refused with [`Error::InvalidRingSize`] before anything is
//! allocated.

use alloc::boxed::Box;
use alloc::vec::Vec;

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
use loom::sync::Mutex;

#[cfg(not(loom))]
use crate::sync::Mutex;
#[cfg(not(loom))]
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::Error;
use crate::mmu::DirtyGfn;

/// Fewest entries a ring may have ([`RingLimits::Vmmu`]).
pub const MIN_ENTRIES: u32 = 4;
/// Most entries a ring may have ([`RingLimits::Vmmu`]).
pub const MAX_ENTRIES: u32 = 1 << 20;
/// KVM's fewest entries: one 4 KiB page of 16-byte `kvm_dirty_gfn`s.
pub const KVM_MIN_ENTRIES: u32 = 4096 / 16;
/// KVM's `KVM_DIRTY_RING_MAX_ENTRIES`.
pub const KVM_MAX_ENTRIES: u32 = 65536;
/// KVM's `KVM_DIRTY_RING_RSVD_ENTRIES`: how many entries before full KVM's ring is
/// soft-full (KVM adds the PML log's size on hosts that use PML).
pub const KVM_RSVD_ENTRIES: u32 = 64;

/// `KVM_DIRTY_GFN_F_DIRTY`: the vCPU pushed the entry.
pub const FLAG_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: the VMM harvested the entry; the next reset frees it.
pub const FLAG_RESET: u32 = 1 << 1;

/// The ordering the vCPU publishes an entry with (and the VMM marks it harvested with).
/// `tests/loom_ring.rs` fails with `Relaxed` here (see there).
const PUBLISH: Ordering = Ordering::Release;
/// The ordering the VMM and the reset load an entry's flags with.
const OBSERVE: Ordering = Ordering::Acquire;

/// Which size rule a ring follows (see the module's sizes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingLimits {
    /// vmmu's: 4 to 2^20 entries, soft-full one entry before full.
    #[default]
    Vmmu,
    /// KVM's: 256 to 65536 entries, soft-full 64 entries before full.
    Kvm,
}

impl RingLimits {
    /// The fewest and most entries.
    pub fn bounds(self) -> (u32, u32) {
        match self {
            RingLimits::Vmmu => (MIN_ENTRIES, MAX_ENTRIES),
            RingLimits::Kvm => (KVM_MIN_ENTRIES, KVM_MAX_ENTRIES),
        }
    }
    /// Entries used at which a ring of `size` entries is soft-full.
    pub fn soft_limit(self, size: u32) -> u32 {
        match self {
            RingLimits::Vmmu => size - 1,
            RingLimits::Kvm => size - KVM_RSVD_ENTRIES,
        }
    }
}

/// Whether `size` entries is a ring size vmmu accepts under its default rule (see the
/// module's sizes).
pub fn check_size(size: u32) -> Result<(), Error> {
    check_size_with(size, RingLimits::Vmmu)
}

/// Whether `size` entries is a ring size `limits` accepts.
pub fn check_size_with(size: u32, limits: RingLimits) -> Result<(), Error> {
    let (lo, hi) = limits.bounds();
    if size.is_power_of_two() && (lo..=hi).contains(&size) {
        Ok(())
    } else {
        Err(Error::InvalidRingSize { size })
    }
}

/// The flags word: the entry's index above [`SHIFT`] bits, then SEEN, RESET, DIRTY.
const SEEN: u64 = 1 << 2;
const SHIFT: u32 = 3;

fn stamp(index: u64, flags: u64) -> u64 {
    (index << SHIFT) | flags
}

struct Entry {
    flags: AtomicU64,
    slot: AtomicU32,
    offset: AtomicU64,
}

/// The vCPU's side, under `DirtyRing::producer`.
struct Producer {
    pushed: u64,
    /// Room promised to faults in flight (see the module's invariants).
    reserved: u64,
}

/// What the VMM sees at an index of the ring ([`DirtyRingView::read`](crate::DirtyRingView::read)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingEntry {
    /// Nothing there: not pushed yet, or already reset (KVM: flags without DIRTY).
    Empty,
    /// Pushed and not harvested yet (DIRTY): its contents are complete.
    Dirty(DirtyGfn),
    /// Harvested, waiting for a reset (DIRTY | RESET).
    Harvested(DirtyGfn),
}

/// Why [`DirtyRing::mark_harvested`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkError {
    /// No entry with that index is in the ring: not pushed yet, already reset, or the
    /// index names the same place a lap earlier or later.
    NotDirty,
    /// The entry is there but the VMM never read it ([`DirtyRing::read`]): marking it
    /// would reset a page nobody reported.
    NotRead,
}

/// The ring. Shared (by `Arc`) between its vCPU, which pushes, and the VMM, which reads,
/// marks and resets, on any threads.
pub struct DirtyRing {
    entries: Box<[Entry]>,
    soft_limit: u64,
    /// The vCPU side. The VMM side never takes it (but [`used`](Self::used) and
    /// [`counters`](Self::counters) do, briefly).
    producer: Mutex<Producer>,
    /// Entries freed by resets: written by a reset (release, under `consumer`) after it
    /// freed them, loaded by the vCPU (acquire) before it reuses their places.
    reset: AtomicU64,
    /// The VMM side: the fetch position of [`harvest`](Self::harvest). Held by every read,
    /// mark and reset, so those never overlap each other; the vCPU never takes it.
    consumer: Mutex<u64>,
}

#[cfg(not(loom))]
fn lock<T>(m: &Mutex<T>) -> crate::sync::MutexGuard<'_, T> {
    m.lock()
}
#[cfg(loom)]
fn lock<T>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}

impl DirtyRing {
    /// A ring of `size` entries under vmmu's size rule, or [`Error::InvalidRingSize`]
    /// (nothing allocated) for a size [`check_size`] refuses.
    pub fn new(size: u32) -> Result<Self, Error> {
        Self::with_limits(size, RingLimits::Vmmu)
    }

    /// A ring of `size` entries under `limits`, or [`Error::InvalidRingSize`] (checked
    /// before anything is allocated).
    pub fn with_limits(size: u32, limits: RingLimits) -> Result<Self, Error> {
        check_size_with(size, limits)?;
        let entries = (0..size)
            .map(|_| Entry {
                flags: AtomicU64::new(0),
                slot: AtomicU32::new(0),
                offset: AtomicU64::new(0),
            })
            .collect();
        Ok(DirtyRing {
            entries,
            soft_limit: u64::from(limits.soft_limit(size)),
            producer: Mutex::new(Producer {
                pushed: 0,
                reserved: 0,
            }),
            reset: AtomicU64::new(0),
            consumer: Mutex::new(0),
        })
    }

    /// Capacity.
    pub fn size(&self) -> u64 {
        self.entries.len() as u64
    }
    /// Entries used at which the ring is soft-full.
    pub fn soft_limit(&self) -> u64 {
        self.soft_limit
    }
    fn entry(&self, index: u64) -> &Entry {
        &self.entries[(index & (self.size() - 1)) as usize]
    }
    fn used_by(&self, p: &Producer) -> u64 {
        p.pushed - self.reset.load(Ordering::Acquire)
    }
    /// Entries not yet reset (they hold their places).
    pub fn used(&self) -> u64 {
        self.used_by(&lock(&self.producer))
    }
    /// Whether the vCPU must stop and let the VMM harvest and reset.
    pub fn is_soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }
    /// Reserve room for one entry, for a fault that may log a page: `false`, reserving
    /// nothing, when the entries used and those already reserved reach the soft limit
    /// (the vCPU must stop). The room is used by [`push_reserved`](Self::push_reserved) or
    /// given back by [`unreserve`](Self::unreserve).
    pub fn reserve(&self) -> bool {
        let mut p = lock(&self.producer);
        if self.used_by(&p) + p.reserved >= self.soft_limit {
            return false;
        }
        p.reserved += 1;
        true
    }
    /// Give back room [`reserve`](Self::reserve) took and no entry used.
    pub fn unreserve(&self) {
        let mut p = lock(&self.producer);
        debug_assert!(p.reserved != 0, "no room reserved");
        p.reserved = p.reserved.saturating_sub(1);
    }
    /// Record `e` in room [`reserve`](Self::reserve) took: it always fits.
    pub fn push_reserved(&self, e: DirtyGfn) {
        let mut p = lock(&self.producer);
        debug_assert!(p.reserved != 0, "no room reserved");
        p.reserved = p.reserved.saturating_sub(1);
        let pushed = self.push_locked(&mut p, e);
        debug_assert!(pushed, "reserved room was taken");
    }
    /// Record a dirty page. `false` if the ring is full (the entry is lost: the MMU's
    /// paths reserve room first, see [`reserve`](Self::reserve)).
    pub fn push(&self, e: DirtyGfn) -> bool {
        self.push_locked(&mut lock(&self.producer), e)
    }
    fn push_locked(&self, p: &mut Producer, e: DirtyGfn) -> bool {
        // Acquire (in `used_by`): the reset that freed this place finished reading it.
        if self.used_by(p) >= self.size() {
            return false;
        }
        let i = p.pushed;
        let slot = self.entry(i);
        debug_assert_eq!(slot.flags.load(Ordering::Relaxed) & 7, 0, "reused unfreed");
        slot.slot.store(e.slot, Ordering::Relaxed);
        slot.offset.store(e.offset, Ordering::Relaxed);
        // Publish: a VMM that sees DIRTY (acquire) sees the slot and offset above.
        slot.flags.store(stamp(i, FLAG_DIRTY as u64), PUBLISH);
        p.pushed = i + 1;
        true
    }

    /// The entry at `index` (how many entries were pushed before it), as the VMM reads a
    /// `kvm_dirty_gfn`: flags with acquire, then the contents. Reading a dirty entry
    /// records that the VMM saw it, so that [`mark_harvested`](Self::mark_harvested)
    /// accepts it.
    pub fn read(&self, index: u64) -> RingEntry {
        let _vmm = lock(&self.consumer);
        self.read_locked(index, true)
    }
    fn read_locked(&self, index: u64, see: bool) -> RingEntry {
        if index >= 1 << (64 - SHIFT) {
            return RingEntry::Empty;
        }
        let e = self.entry(index);
        let f = e.flags.load(OBSERVE);
        if f >> SHIFT != index || f & FLAG_DIRTY as u64 == 0 {
            return RingEntry::Empty;
        }
        let d = DirtyGfn {
            slot: e.slot.load(Ordering::Relaxed),
            offset: e.offset.load(Ordering::Relaxed),
        };
        if f & FLAG_RESET as u64 != 0 {
            return RingEntry::Harvested(d);
        }
        if see && f & SEEN == 0 {
            // Only this side writes a pushed entry's flags, and it holds `consumer`.
            e.flags.store(f | SEEN, Ordering::Relaxed);
        }
        RingEntry::Dirty(d)
    }

    /// Mark entry `index`, which the VMM read, harvested (KVM's VMM storing
    /// `KVM_DIRTY_GFN_F_RESET`): the next reset frees it. `Ok(false)` if it already was.
    pub fn mark_harvested(&self, index: u64) -> Result<bool, MarkError> {
        let _vmm = lock(&self.consumer);
        if index >= 1 << (64 - SHIFT) {
            return Err(MarkError::NotDirty);
        }
        let e = self.entry(index);
        let f = e.flags.load(OBSERVE);
        if f >> SHIFT != index || f & FLAG_DIRTY as u64 == 0 {
            return Err(MarkError::NotDirty);
        }
        if f & FLAG_RESET as u64 != 0 {
            return Ok(false);
        }
        if f & SEEN == 0 {
            return Err(MarkError::NotRead);
        }
        e.flags.store(f | FLAG_RESET as u64, PUBLISH);
        Ok(true)
    }

    /// Append the entries pushed since the last harvest to `out`, marking each harvested;
    /// returns how many. Entries already marked through [`read`](Self::read) and
    /// [`mark_harvested`](Self::mark_harvested) are passed over, not reported again. May
    /// run while the vCPU pushes: it stops at the first entry not yet published.
    pub fn harvest(&self, out: &mut Vec<DirtyGfn>) -> usize {
        let mut fetch = lock(&self.consumer);
        // Entries reset since (marked by `mark_harvested`) are behind us.
        let mut k = (*fetch).max(self.reset.load(Ordering::Acquire));
        let mut n = 0;
        loop {
            match self.read_locked(k, false) {
                RingEntry::Empty => break,
                RingEntry::Harvested(_) => {}
                RingEntry::Dirty(d) => {
                    out.push(d);
                    n += 1;
                    let e = self.entry(k);
                    let f = e.flags.load(Ordering::Relaxed);
                    e.flags.store(f | SEEN | FLAG_RESET as u64, PUBLISH);
                }
            }
            k += 1;
        }
        *fetch = k;
        n
    }

    /// Free every harvested entry from the oldest on, stopping at the first that is not
    /// harvested (as KVM's `kvm_dirty_ring_reset`), calling `f` on each in push order so
    /// the caller can write-protect them again. Returns how many were freed; a second
    /// reset with nothing newly harvested frees nothing.
    pub fn reset(&self, mut f: impl FnMut(DirtyGfn)) -> usize {
        let _vmm = lock(&self.consumer);
        let start = self.reset.load(Ordering::Relaxed);
        let mut k = start;
        while let RingEntry::Harvested(d) = self.read_locked(k, false) {
            f(d);
            self.entry(k).flags.store(0, Ordering::Relaxed);
            k += 1;
        }
        if k != start {
            // Release: the vCPU reuses these places only after this (acquire in
            // `used_by`), so it never overwrites an entry read above.
            self.reset.store(k, Ordering::Release);
        }
        (k - start) as usize
    }

    /// (pushed, the fetch position of [`harvest`](Self::harvest), reset) so far.
    pub fn counters(&self) -> (u64, u64, u64) {
        let fetch = *lock(&self.consumer);
        let pushed = lock(&self.producer).pushed;
        let reset = self.reset.load(Ordering::Acquire);
        (pushed, fetch.max(reset), reset)
    }
}

#[cfg(all(test, not(loom)))]
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
    fn kvm_sizes_are_kvms() {
        for ok in [256, 512, 4096, 65536] {
            assert_eq!(check_size_with(ok, RingLimits::Kvm), Ok(()), "{ok}");
        }
        for bad in [0, 4, 128, 255, 257, 1 << 17, 1 << 20, u32::MAX] {
            assert_eq!(
                check_size_with(bad, RingLimits::Kvm),
                Err(Error::InvalidRingSize { size: bad }),
                "{bad}"
            );
            assert!(DirtyRing::with_limits(bad, RingLimits::Kvm).is_err());
        }
        let r = DirtyRing::with_limits(256, RingLimits::Kvm).unwrap();
        assert_eq!(r.soft_limit(), 256 - 64);
        for k in 0..192 {
            assert!(r.reserve(), "{k}");
            r.push_reserved(e(k));
        }
        assert!(r.is_soft_full(), "KVM's soft limit: 64 entries before full");
        assert!(!r.reserve());
    }

    #[test]
    fn push_harvest_reset_and_soft_full() {
        let r = DirtyRing::new(4).unwrap();
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
        assert_eq!(r.reset(|_| panic!("nothing harvested")), 0, "reset twice");
        assert!(r.push(e(5)));
        out.clear();
        assert_eq!(r.harvest(&mut out), 1);
        assert_eq!(out, [e(5)], "wraps around");
        assert_eq!(r.counters(), (5, 5, 4));
    }

    #[test]
    fn reservations_count_toward_soft_full() {
        let r = DirtyRing::new(4).unwrap();
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

    #[test]
    fn read_mark_reset_by_index() {
        let r = DirtyRing::new(4).unwrap();
        assert_eq!(r.read(0), RingEntry::Empty);
        assert_eq!(r.mark_harvested(0), Err(MarkError::NotDirty), "never pushed");
        r.push(e(10));
        r.push(e(11));
        assert_eq!(r.mark_harvested(0), Err(MarkError::NotRead), "never read");
        assert_eq!(r.read(0), RingEntry::Dirty(e(10)));
        assert_eq!(r.mark_harvested(0), Ok(true));
        assert_eq!(r.mark_harvested(0), Ok(false), "twice: a no-op");
        assert_eq!(r.read(0), RingEntry::Harvested(e(10)));
        // Index 1 is not marked: a reset frees 0 only.
        assert_eq!(r.reset(|x| assert_eq!(x, e(10))), 1);
        assert_eq!(r.read(0), RingEntry::Empty, "reset");
        assert_eq!(r.mark_harvested(0), Err(MarkError::NotDirty), "reset already");
        assert_eq!(r.read(1), RingEntry::Dirty(e(11)));
        // A harvest after: reports 1 only.
        let mut out = Vec::new();
        assert_eq!(r.harvest(&mut out), 1);
        assert_eq!(out, [e(11)]);
        assert_eq!(r.reset(|_| {}), 1);
        // Index 4 is the place of index 0, a lap later.
        r.push(e(12));
        r.push(e(13));
        r.push(e(14));
        assert_eq!(r.read(4), RingEntry::Dirty(e(14)));
        assert_eq!(r.mark_harvested(0), Err(MarkError::NotDirty), "a lap late");
        assert_eq!(r.mark_harvested(8), Err(MarkError::NotDirty), "a lap early");
        assert_eq!(r.mark_harvested(u64::MAX), Err(MarkError::NotDirty));
        assert_eq!(r.read(u64::MAX), RingEntry::Empty);
        // Marked out of order: the reset stops at the first unmarked (index 2).
        assert_eq!(r.mark_harvested(4), Ok(true));
        assert_eq!(r.reset(|_| panic!("2 is not harvested")), 0);
        out.clear();
        assert_eq!(r.harvest(&mut out), 2, "2 and 3; 4 was marked already");
        assert_eq!(out, [e(12), e(13)]);
        assert_eq!(r.reset(|_| {}), 3);
        assert_eq!(r.counters(), (5, 5, 5));
    }
}
