//! Memslots, shaped like `KVM_SET_USER_MEMORY_REGION`: a guest-physical range backed by a
//! host-virtual range, with the MMU's per-slot metadata.
//!
//! Per slot: a reverse map per leaf level (4K, 2M, 1G; in chunks allocated as pages are
//! mapped, `heads`, and none at all for the TDP MMU), large-page disallow counts for the
//! huge pages that cross the slot's edges (or all of them when guest and host addresses
//! are not congruent; one count per huge page), a dirty bitmap while LOG_DIRTY_PAGES is
//! set, and write-tracking counts once a page of the slot is tracked. Nothing per 4 KiB
//! page is allocated for a feature the VM does not use.
//!
//! # Invariants
//! - Slots never overlap; `slots` is sorted by `base_gfn`.
//! - `generation` changes on every update (MMIO SPTEs cache it; see `spte`).
//! - Validation happens before any change: an `Err` leaves the set untouched.
//!
//! # Locking
//! The set lives inside the VM's MMU lock. Dirty bitmaps are atomic words because the
//! lockless write-fault fast path marks pages dirty without the lock.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

pub use crate::dirty::DirtyBitmap;
use crate::error::Error;
use crate::rmap::{self, DescPool, RmapHead, SpteRef};
use crate::types::{Gfn, Hva, Level, PAGE_SIZE};

mod heads;
pub use heads::RmapHeads;

/// Memslot flags, as KVM's `KVM_MEM_*`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct MemslotFlags(u32);

impl MemslotFlags {
    /// KVM_MEM_LOG_DIRTY_PAGES: track writes in a dirty bitmap.
    pub const LOG_DIRTY_PAGES: MemslotFlags = MemslotFlags(1);
    /// KVM_MEM_READONLY: guest writes exit to the VMM instead of being mapped.
    pub const READONLY: MemslotFlags = MemslotFlags(2);
    const VALID: u32 = 3;

    /// No flags.
    pub const fn empty() -> Self {
        MemslotFlags(0)
    }
    /// From raw bits; `Err` names unknown bits.
    pub const fn from_bits(bits: u32) -> Result<Self, Error> {
        if bits & !Self::VALID != 0 {
            Err(Error::InvalidFlags(bits))
        } else {
            Ok(MemslotFlags(bits))
        }
    }
    /// Raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: MemslotFlags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    pub const fn union(self, other: MemslotFlags) -> Self {
        MemslotFlags(self.0 | other.0)
    }
}

impl core::ops::BitOr for MemslotFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// The argument of `KVM_SET_USER_MEMORY_REGION`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemoryRegion {
    /// Slot id.
    pub slot: u32,
    /// LOG_DIRTY_PAGES / READONLY.
    pub flags: MemslotFlags,
    /// First guest-physical byte.
    pub guest_phys_addr: u64,
    /// Size in bytes (0 deletes the slot).
    pub memory_size: u64,
    /// First host-virtual byte backing it.
    pub userspace_addr: u64,
}

/// What a region update does to the slot set (KVM's `enum kvm_mr_change`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlotChange {
    /// A new slot.
    Create,
    /// The slot goes away.
    Delete,
    /// Same size and host range at a new guest-physical address.
    Move {
        /// The old first gfn.
        old_base: Gfn,
    },
    /// Only the flags change.
    FlagsOnly {
        /// The old flags.
        old: MemslotFlags,
    },
    /// Nothing changes.
    None,
}

/// One memslot.
pub struct Memslot {
    /// Slot id.
    pub id: u32,
    /// First gfn.
    pub base_gfn: Gfn,
    /// Number of 4 KiB pages.
    pub npages: u64,
    /// First host-virtual byte.
    pub userspace_addr: Hva,
    /// Flags.
    pub flags: MemslotFlags,
    rmap: [RmapHeads; 3],
    /// Entries in each level's reverse maps, so walks skip levels with nothing mapped.
    rmap_entries: [u64; 3],
    disallow_lpage: [Box<[u32]>; 2],
    /// Write-tracking counts per page (KVM's `gfn_write_track`), allocated on first use.
    write_track: Option<Box<[u16]>>,
    dirty_bitmap: Option<Arc<DirtyBitmap>>,
}

/// Index of `gfn` among the level-`level` pages that a slot starting at `base` spans.
#[inline]
fn level_index(gfn: Gfn, base: Gfn, level: Level) -> usize {
    ((gfn.0 >> level.gfn_shift()) - (base.0 >> level.gfn_shift())) as usize
}

impl Memslot {
    fn new(region: &MemoryRegion, all_set: bool, rmaps: bool) -> Self {
        let base_gfn = Gfn(region.guest_phys_addr / PAGE_SIZE);
        let npages = region.memory_size / PAGE_SIZE;
        let last = Gfn(base_gfn.0 + npages - 1);
        let hva_page = region.userspace_addr / PAGE_SIZE;
        let count = |l: Level| level_index(last, base_gfn, l) + 1;
        let rmap = Level::LEAF_LEVELS.map(|l| match rmaps {
            true => RmapHeads::new(base_gfn, npages, l),
            false => RmapHeads::none(l),
        });
        let disallow_lpage = [Level::L2M, Level::L1G].map(|l| {
            let n = count(l);
            let mut d = alloc::vec![0u32; n].into_boxed_slice();
            let mask = l.pages() - 1;
            if (base_gfn.0 ^ hva_page) & mask != 0 {
                // Guest and host huge pages do not line up: never map huge.
                d.iter_mut().for_each(|c| *c += 1);
            } else {
                if base_gfn.0 & mask != 0 {
                    d[0] += 1;
                }
                if (base_gfn.0 + npages) & mask != 0 {
                    d[n - 1] += 1;
                }
            }
            d
        });
        let mut slot = Memslot {
            id: region.slot,
            base_gfn,
            npages,
            userspace_addr: Hva(region.userspace_addr),
            flags: region.flags,
            rmap,
            rmap_entries: [0; 3],
            disallow_lpage,
            write_track: None,
            dirty_bitmap: None,
        };
        slot.sync_dirty_bitmap(all_set);
        slot
    }

    fn sync_dirty_bitmap(&mut self, all_set: bool) {
        let logging = self.flags.contains(MemslotFlags::LOG_DIRTY_PAGES);
        if logging && self.dirty_bitmap.is_none() {
            self.dirty_bitmap = Some(Arc::new(DirtyBitmap::new(self.npages, all_set)));
        } else if !logging {
            self.dirty_bitmap = None;
        }
    }

    /// One past the last gfn.
    #[inline]
    pub fn end_gfn(&self) -> Gfn {
        Gfn(self.base_gfn.0 + self.npages)
    }
    /// Whether `gfn` is in the slot.
    #[inline]
    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn.0.wrapping_sub(self.base_gfn.0) < self.npages
    }
    /// The host-virtual address backing `gfn` (which must be in the slot).
    #[inline]
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Hva {
        Hva(self.userspace_addr.0 + (gfn.0 - self.base_gfn.0) * PAGE_SIZE)
    }
    /// Whether writes are logged.
    #[inline]
    pub fn is_logging(&self) -> bool {
        self.dirty_bitmap.is_some()
    }
    /// Whether the slot is read-only to the guest.
    #[inline]
    pub fn is_readonly(&self) -> bool {
        self.flags.contains(MemslotFlags::READONLY)
    }
    /// The reverse-map head for `gfn` at `level`.
    #[inline]
    pub fn rmap_head(&self, gfn: Gfn, level: Level) -> RmapHead {
        self.rmap[level.leaf_index()].get(gfn)
    }
    /// The reverse-map heads at `level` (see [`RmapHeads`]: allocated in chunks).
    #[inline]
    pub fn rmaps(&self, level: Level) -> &RmapHeads {
        &self.rmap[level.leaf_index()]
    }
    /// Entries in the reverse maps of `level`.
    #[inline]
    pub fn rmap_entries(&self, level: Level) -> u64 {
        self.rmap_entries[level.leaf_index()]
    }
    /// Add `sref` to the reverse map of `gfn` at `level` (KVM's `rmap_add`).
    #[inline]
    pub fn rmap_add(&mut self, gfn: Gfn, level: Level, sref: SpteRef, pool: &mut DescPool) {
        let l = level.leaf_index();
        rmap::add(self.rmap[l].get_mut(gfn), sref, pool);
        self.rmap_entries[l] += 1;
    }
    /// Remove `sref` from the reverse map of `gfn` at `level` (KVM's `rmap_remove`);
    /// false if it was not there.
    #[inline]
    pub fn rmap_remove(
        &mut self,
        gfn: Gfn,
        level: Level,
        sref: SpteRef,
        pool: &mut DescPool,
    ) -> bool {
        let l = level.leaf_index();
        let removed = self.rmap[l]
            .get_existing_mut(gfn)
            .is_some_and(|head| rmap::remove(head, sref, pool));
        self.rmap_entries[l] -= removed as u64;
        removed
    }
    /// Remove from the 4 KiB reverse maps of the 512 gfns from `first` (512-aligned, in
    /// the slot) the leaves of the direct last-level table `table_id` mapping them, entry
    /// `i` for gfn `first + i`: a whole table's leaves at once, for a zap that visits
    /// tables instead of reverse maps. When every head names its leaf alone (the table is
    /// full and no other SPTE maps its gfns) the run is checked and emptied in two passes
    /// ([`rmap::clear_table_run`]); otherwise head by head, leaving alone a gfn whose head
    /// does not name the table's entry (it was not present). Returns the entries removed.
    pub fn rmap_remove_table(&mut self, first: Gfn, table_id: u32, pool: &mut DescPool) -> u64 {
        let l = Level::L4K.leaf_index();
        let Some(heads) = self.rmap[l].table_run_mut(first) else {
            return 0;
        };
        let removed = if rmap::clear_table_run(heads, table_id) {
            heads::CHUNK as u64
        } else {
            let mut removed = 0u64;
            for (i, head) in heads.iter_mut().enumerate() {
                if !head.is_empty() {
                    removed += u64::from(rmap::remove(head, SpteRef::new(table_id, i), pool));
                }
            }
            removed
        };
        self.rmap_entries[l] -= removed;
        removed
    }
    /// Empty the reverse maps of `level` covering gfns `[lo, hi)` (which must lie in the
    /// slot), calling `f` on every entry before its list is destroyed in one pass
    /// (seed 003). Returns the number of entries.
    #[inline]
    pub fn rmap_destroy_range(
        &mut self,
        level: Level,
        lo: Gfn,
        hi: Gfn,
        pool: &mut DescPool,
        mut f: impl FnMut(SpteRef),
    ) -> u64 {
        let l = level.leaf_index();
        if self.rmap_entries[l] == 0 || lo >= hi {
            return 0;
        }
        let mut n = 0u64;
        self.rmap[l].for_each_mut(lo, hi, true, |_, head| {
            n += rmap::for_each_destroy(head, pool, &mut f) as u64;
        });
        self.rmap_entries[l] -= n;
        n
    }
    /// Reasons not to map the huge page of `level` containing `gfn` (0 = may map huge).
    #[inline]
    pub fn disallow_lpage(&self, gfn: Gfn, level: Level) -> u32 {
        match level {
            Level::L4K => 0,
            Level::L2M | Level::L1G => {
                self.disallow_lpage[level.leaf_index() - 1][level_index(gfn, self.base_gfn, level)]
            }
            Level::L512G => 1,
        }
    }
    /// Add (`delta` = 1) or drop (-1) a reason not to map the huge pages containing `gfn`.
    pub fn account_disallow_lpage(&mut self, gfn: Gfn, delta: i32) {
        for (i, l) in [Level::L2M, Level::L1G].into_iter().enumerate() {
            let c = &mut self.disallow_lpage[i][level_index(gfn, self.base_gfn, l)];
            *c = c
                .checked_add_signed(delta)
                .expect("disallow_lpage count underflow");
        }
    }
    /// Whether writes to `gfn` are tracked (then no SPTE may make it writable).
    #[inline]
    pub fn is_write_tracked(&self, gfn: Gfn) -> bool {
        self.write_track
            .as_ref()
            .is_some_and(|t| t[(gfn.0 - self.base_gfn.0) as usize] != 0)
    }
    /// Whether `gfn` has `u16::MAX` trackers, so [`track_write`](Self::track_write) would
    /// refuse another.
    #[inline]
    pub(crate) fn write_track_full(&self, gfn: Gfn) -> bool {
        self.write_track
            .as_ref()
            .is_some_and(|t| t[(gfn.0 - self.base_gfn.0) as usize] == u16::MAX)
    }
    /// Add (`true`) or drop a tracker of writes to `gfn`; huge pages over a tracked page
    /// are disallowed. Returns `false`, changing nothing, when dropping an untracked page
    /// or when a page already has `u16::MAX` trackers.
    pub fn track_write(&mut self, gfn: Gfn, add: bool) -> bool {
        let npages = self.npages as usize;
        let t = self
            .write_track
            .get_or_insert_with(|| alloc::vec![0u16; npages].into_boxed_slice());
        let c = &mut t[(gfn.0 - self.base_gfn.0) as usize];
        match (add, *c) {
            (true, u16::MAX) | (false, 0) => return false,
            (true, _) => *c += 1,
            (false, _) => *c -= 1,
        }
        self.account_disallow_lpage(gfn, if add { 1 } else { -1 });
        true
    }
    /// The dirty bitmap, while logging.
    #[inline]
    pub fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.dirty_bitmap.as_deref()
    }
    /// The dirty bitmap, shared (for the lock-free index of the fast path).
    pub fn dirty_bitmap_arc(&self) -> Option<Arc<DirtyBitmap>> {
        self.dirty_bitmap.clone()
    }
    /// The largest level at which `gfn` may be mapped as far as this slot is concerned
    /// (alignment, disallow counts, dirty logging), capped at `max`.
    #[inline]
    pub fn max_mapping_level(&self, gfn: Gfn, max: Level) -> Level {
        if self.is_logging() {
            return Level::L4K;
        }
        let mut level = max.min(Level::L1G);
        while level > Level::L4K && self.disallow_lpage(gfn, level) != 0 {
            level = level.below().expect("level above 4K");
        }
        level
    }
    /// Bytes of reverse-map heads (chunks and their arrays).
    pub fn rmap_head_bytes(&self) -> usize {
        self.rmap.iter().map(|r| r.bytes()).sum()
    }
    /// Bytes of metadata (reverse-map heads, disallow counts, write tracking, dirty
    /// bitmap).
    pub fn metadata_bytes(&self) -> usize {
        self.rmap_head_bytes()
            + self.write_track.as_ref().map_or(0, |t| t.len() * 2)
            + self
                .disallow_lpage
                .iter()
                .map(|d| d.len() * 4)
                .sum::<usize>()
            + self.dirty_bitmap.as_ref().map_or(0, |b| b.bytes())
    }
}

/// The most 4 KiB pages one memslot may have: KVM's `KVM_MEM_MAX_NR_PAGES`,
/// `(1 << 31) - 1` (8 TiB less a page). KVM bounds it so that a page index fits the
/// `int`/`unsigned long` arithmetic of its per-slot arrays (the dirty bitmap's bit
/// offsets, the reverse maps); here it bounds what one call can make the VM allocate:
/// a slot's metadata (reverse-map heads, disallow counts, the dirty bitmap) grows with
/// its pages, and a caller's size must get a typed error, not an aborting allocation.
/// [`Memslots::check`] refuses bigger slots with [`Error::SlotTooLarge`] before anything
/// is allocated.
pub const MAX_SLOT_PAGES: u64 = (1 << 31) - 1;

/// Limits of the slot set.
#[derive(Clone, Copy, Debug)]
pub struct MemslotLimits {
    /// Slot ids must be below this (KVM: 32768 with address-space ids in the high bits).
    pub id_limit: u32,
    /// At most this many slots at once (KVM_CAP_NR_MEMSLOTS).
    pub max_slots: u32,
    /// Guest-physical address width in bits.
    pub gpa_bits: u8,
}

impl Default for MemslotLimits {
    fn default() -> Self {
        MemslotLimits {
            id_limit: 32768,
            max_slots: 32764,
            gpa_bits: 48,
        }
    }
}

/// The set of memslots.
pub struct Memslots {
    slots: Vec<Memslot>,
    dirty_initially_set: bool,
    /// Slots carry reverse maps (the shadow MMU's); the TDP MMU's slots have none.
    rmaps: bool,
    generation: u64,
    limits: MemslotLimits,
    last_hit: AtomicUsize,
}

impl Memslots {
    /// An empty set with these limits.
    pub fn new(limits: MemslotLimits) -> Self {
        Memslots {
            slots: Vec::new(),
            dirty_initially_set: false,
            rmaps: true,
            generation: 0,
            limits,
            last_hit: AtomicUsize::new(0),
        }
    }

    /// Give slots made from now on reverse maps (`true`, the default: the shadow MMU's)
    /// or none (the TDP MMU, which finds SPTEs by walking its tables). Set before the
    /// first slot is made.
    pub fn set_reverse_maps(&mut self, on: bool) {
        debug_assert!(self.slots.is_empty(), "reverse maps chosen after slots exist");
        self.rmaps = on;
    }

    /// Start dirty bitmaps with every bit set (KVM_DIRTY_LOG_INITIALLY_SET).
    pub fn set_dirty_initially_set(&mut self, on: bool) {
        self.dirty_initially_set = on;
    }
    /// Whether dirty bitmaps start with every bit set.
    pub fn dirty_initially_set(&self) -> bool {
        self.dirty_initially_set
    }

    /// The generation, changed by every update.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The limits.
    pub fn limits(&self) -> MemslotLimits {
        self.limits
    }
    /// One past the largest gfn the guest-physical width allows.
    #[inline]
    pub fn max_gfn(&self) -> u64 {
        1u64 << (self.limits.gpa_bits as u32 - crate::types::PAGE_SHIFT)
    }

    /// The index of the slot containing `gfn` (for [`at_mut`](Self::at_mut)).
    #[inline]
    pub fn position_of_gfn(&self, gfn: Gfn) -> Option<usize> {
        let hint = self.last_hit.load(Ordering::Relaxed);
        if let Some(s) = self.slots.get(hint) {
            if s.contains(gfn) {
                return Some(hint);
            }
        }
        let i = self.slots.partition_point(|s| s.end_gfn() <= gfn);
        let found = self.slots.get(i).filter(|s| s.contains(gfn)).map(|_| i);
        if let Some(i) = found {
            // A hint only; any value is safe.
            self.last_hit.store(i, Ordering::Relaxed);
        }
        found
    }

    /// The slot containing `gfn` (KVM's gfn_to_memslot), with a last-hit cache.
    #[inline]
    pub fn lookup(&self, gfn: Gfn) -> Option<&Memslot> {
        self.position_of_gfn(gfn).map(|i| &self.slots[i])
    }
    /// The slot containing `gfn`, mutably.
    #[inline]
    pub fn lookup_mut(&mut self, gfn: Gfn) -> Option<&mut Memslot> {
        self.position_of_gfn(gfn).map(move |i| &mut self.slots[i])
    }
    /// The slot at index `i` (from [`position_of_gfn`](Self::position_of_gfn), with no
    /// memslot update since).
    #[inline]
    pub fn at(&self, i: usize) -> &Memslot {
        &self.slots[i]
    }
    /// The slot at index `i`, mutably (see [`at`](Self::at)).
    #[inline]
    pub fn at_mut(&mut self, i: usize) -> &mut Memslot {
        &mut self.slots[i]
    }
    /// The slot with id `id`.
    pub fn by_id(&self, id: u32) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.id == id)
    }
    /// The slot with id `id`, mutably.
    pub fn by_id_mut(&mut self, id: u32) -> Option<&mut Memslot> {
        self.slots.iter_mut().find(|s| s.id == id)
    }
    /// Every slot, by increasing gfn.
    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter()
    }
    /// Every slot, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Memslot> {
        self.slots.iter_mut()
    }
    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Check `region` against the set and say what applying it would do, changing nothing
    /// (KVM's `__kvm_set_memory_region` checks, in order).
    pub fn check(&self, region: &MemoryRegion) -> Result<SlotChange, Error> {
        let r = region;
        if r.slot >= self.limits.id_limit {
            return Err(Error::InvalidSlotId {
                slot: r.slot,
                limit: self.limits.id_limit,
            });
        }
        MemslotFlags::from_bits(r.flags.bits())?;
        if !r.memory_size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedSize(r.memory_size));
        }
        if !r.guest_phys_addr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedGuestPhysAddr(r.guest_phys_addr));
        }
        if !r.userspace_addr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedUserspaceAddr(r.userspace_addr));
        }
        let old = self.by_id(r.slot);
        if r.memory_size == 0 {
            return match old {
                Some(_) => Ok(SlotChange::Delete),
                None => Err(Error::ZeroSize { slot: r.slot }),
            };
        }
        let end = r
            .guest_phys_addr
            .checked_add(r.memory_size)
            .ok_or(Error::AddressOverflow)?;
        r.userspace_addr
            .checked_add(r.memory_size)
            .ok_or(Error::AddressOverflow)?;
        if r.memory_size / PAGE_SIZE > MAX_SLOT_PAGES {
            return Err(Error::SlotTooLarge {
                slot: r.slot,
                pages: r.memory_size / PAGE_SIZE,
                max: MAX_SLOT_PAGES,
            });
        }
        if end > self.max_gfn() * PAGE_SIZE {
            return Err(Error::BeyondGuestPhysWidth {
                end,
                width_bits: self.limits.gpa_bits,
            });
        }
        let base = Gfn(r.guest_phys_addr / PAGE_SIZE);
        let change = match old {
            None => {
                if self.slots.len() as u32 >= self.limits.max_slots {
                    return Err(Error::TooManySlots {
                        max: self.limits.max_slots,
                    });
                }
                SlotChange::Create
            }
            Some(old) => {
                if old.npages * PAGE_SIZE != r.memory_size {
                    return Err(Error::SlotResize { slot: r.slot });
                }
                if old.userspace_addr.0 != r.userspace_addr {
                    return Err(Error::SlotHvaChange { slot: r.slot });
                }
                if (old.flags.bits() ^ r.flags.bits()) & MemslotFlags::READONLY.bits() != 0 {
                    return Err(Error::ReadonlyFlagChange { slot: r.slot });
                }
                if old.base_gfn != base {
                    SlotChange::Move {
                        old_base: old.base_gfn,
                    }
                } else if old.flags != r.flags {
                    SlotChange::FlagsOnly { old: old.flags }
                } else {
                    SlotChange::None
                }
            }
        };
        if matches!(change, SlotChange::Create | SlotChange::Move { .. }) {
            let end_gfn = base.0 + r.memory_size / PAGE_SIZE;
            if let Some(other) = self
                .slots
                .iter()
                .find(|s| s.id != r.slot && s.base_gfn.0 < end_gfn && base.0 < s.end_gfn().0)
            {
                return Err(Error::Overlap {
                    slot: r.slot,
                    other: other.id,
                });
            }
        }
        Ok(change)
    }

    /// Apply a region that [`check`](Self::check) accepted as `change`. The caller has
    /// already zapped whatever the change invalidates (a deleted or moved slot's mappings).
    pub fn apply(&mut self, region: &MemoryRegion, change: SlotChange) {
        match change {
            SlotChange::None => return,
            SlotChange::Create => {
                let slot = Memslot::new(region, self.dirty_initially_set, self.rmaps);
                let i = self.slots.partition_point(|s| s.base_gfn < slot.base_gfn);
                self.slots.insert(i, slot);
            }
            SlotChange::Delete => self.slots.retain(|s| s.id != region.slot),
            SlotChange::Move { .. } => {
                // The dirty bitmap moves with the slot, as in KVM: pages written and not
                // yet harvested must still be reported (its bits are page offsets, which
                // a move keeps).
                let i = self
                    .slots
                    .iter()
                    .position(|s| s.id == region.slot)
                    .expect("checked slot");
                let bitmap = self.slots.remove(i).dirty_bitmap;
                self.apply(region, SlotChange::Create);
                if let Some(b) = bitmap {
                    let s = self.by_id_mut(region.slot).expect("just created");
                    if s.flags.contains(MemslotFlags::LOG_DIRTY_PAGES) {
                        s.dirty_bitmap = Some(b);
                    }
                }
                return;
            }
            SlotChange::FlagsOnly { .. } => {
                let all_set = self.dirty_initially_set;
                let s = self.by_id_mut(region.slot).expect("checked slot");
                s.flags = region.flags;
                s.sync_dirty_bitmap(all_set);
            }
        }
        self.generation = self.generation.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, size: u64) -> MemoryRegion {
        MemoryRegion {
            slot,
            flags: MemslotFlags::empty(),
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: 0x7f00_0000_0000u64.wrapping_add(gpa),
        }
    }

    fn set(slots: &mut Memslots, r: MemoryRegion) -> Result<SlotChange, Error> {
        let c = slots.check(&r)?;
        slots.apply(&r, c);
        Ok(c)
    }

    #[test]
    fn create_lookup_delete() {
        let mut s = Memslots::new(MemslotLimits::default());
        assert_eq!(
            set(&mut s, region(0, 0x10_0000, 0x20_0000)),
            Ok(SlotChange::Create)
        );
        assert_eq!(
            set(&mut s, region(1, 0x100_0000, 0x1000)),
            Ok(SlotChange::Create)
        );
        assert_eq!(s.generation(), 2);
        assert_eq!(s.lookup(Gfn(0x100)).unwrap().id, 0);
        assert_eq!(s.lookup(Gfn(0x2ff)).unwrap().id, 0);
        assert!(s.lookup(Gfn(0x300)).is_none());
        assert_eq!(s.lookup(Gfn(0x1000)).unwrap().id, 1);
        assert_eq!(set(&mut s, region(0, 0, 0)), Ok(SlotChange::Delete));
        assert!(s.lookup(Gfn(0x100)).is_none());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn bad_regions_are_rejected_without_change() {
        let mut s = Memslots::new(MemslotLimits {
            max_slots: 2,
            ..MemslotLimits::default()
        });
        set(&mut s, region(0, 0x10_0000, 0x20_0000)).unwrap();
        let gen = s.generation();
        let cases = [
            (
                region(40000, 0, 0x1000),
                Error::InvalidSlotId {
                    slot: 40000,
                    limit: 32768,
                },
            ),
            (
                region(1, 0x1001, 0x1000),
                Error::UnalignedGuestPhysAddr(0x1001),
            ),
            (region(1, 0, 0x1001), Error::UnalignedSize(0x1001)),
            (region(1, 0, 0), Error::ZeroSize { slot: 1 }),
            (
                region(1, 0x1f_f000, 0x2000),
                Error::Overlap { slot: 1, other: 0 },
            ),
            (region(0, 0x10_0000, 0x1000), Error::SlotResize { slot: 0 }),
            (
                region(1, 1 << 48, 0x1000),
                Error::BeyondGuestPhysWidth {
                    end: (1 << 48) + 0x1000,
                    width_bits: 48,
                },
            ),
            (region(1, !0xfff, 0x2000), Error::AddressOverflow),
        ];
        for (r, e) in cases {
            assert_eq!(s.check(&r), Err(e));
        }
        let mut bad_hva = region(1, 0, 0x1000);
        bad_hva.userspace_addr += 8;
        assert_eq!(
            s.check(&bad_hva),
            Err(Error::UnalignedUserspaceAddr(bad_hva.userspace_addr))
        );
        let mut ro = region(0, 0x10_0000, 0x20_0000);
        ro.flags = MemslotFlags::READONLY;
        assert_eq!(s.check(&ro), Err(Error::ReadonlyFlagChange { slot: 0 }));
        let mut moved_hva = region(0, 0x10_0000, 0x20_0000);
        moved_hva.userspace_addr += 0x1000;
        assert_eq!(s.check(&moved_hva), Err(Error::SlotHvaChange { slot: 0 }));
        set(&mut s, region(1, 0, 0x1000)).unwrap();
        assert_eq!(
            s.check(&region(2, 0x100_0000, 0x1000)),
            Err(Error::TooManySlots { max: 2 })
        );
        assert_eq!(MemslotFlags::from_bits(4), Err(Error::InvalidFlags(4)));
        assert_eq!(s.generation(), gen + 1);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn move_and_flags() {
        let mut s = Memslots::new(MemslotLimits::default());
        set(&mut s, region(3, 0x20_0000, 0x40_0000)).unwrap();
        let mut r = region(3, 0x80_0000, 0x40_0000);
        r.userspace_addr = 0x7f00_0000_0000 + 0x20_0000;
        assert_eq!(
            set(&mut s, r),
            Ok(SlotChange::Move {
                old_base: Gfn(0x200)
            })
        );
        assert_eq!(s.by_id(3).unwrap().base_gfn, Gfn(0x800));
        r.flags = MemslotFlags::LOG_DIRTY_PAGES;
        assert_eq!(
            set(&mut s, r),
            Ok(SlotChange::FlagsOnly {
                old: MemslotFlags::empty()
            })
        );
        let slot = s.by_id(3).unwrap();
        assert!(slot.is_logging());
        assert_eq!(slot.max_mapping_level(Gfn(0x800), Level::L1G), Level::L4K);
        assert!(slot.dirty_bitmap().unwrap().mark(5));
        assert!(!slot.dirty_bitmap().unwrap().mark(5));
        assert_eq!(set(&mut s, r), Ok(SlotChange::None));
    }

    #[test]
    fn huge_pages_disallowed_at_unaligned_edges() {
        let mut s = Memslots::new(MemslotLimits::default());
        // Slot [1 MiB, 7 MiB): 2M pages at 0 and 6 MiB cross the edges; 2 and 4 MiB fit.
        let r = MemoryRegion {
            slot: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: 0x10_0000,
            memory_size: 0x60_0000,
            userspace_addr: 0x7f00_0010_0000,
        };
        set(&mut s, r).unwrap();
        let slot = s.by_id(0).unwrap();
        let gfn = |mib: u64| Gfn(mib * 256);
        assert_eq!(slot.max_mapping_level(gfn(1), Level::L1G), Level::L4K);
        assert_eq!(slot.max_mapping_level(gfn(2), Level::L1G), Level::L2M);
        assert_eq!(slot.max_mapping_level(gfn(4), Level::L1G), Level::L2M);
        assert_eq!(slot.max_mapping_level(gfn(6), Level::L1G), Level::L4K);
        assert_eq!(slot.rmaps(Level::L2M).bytes(), 8, "one chunk slot, none allocated");
        // Guest and host not congruent modulo 2 MiB: nothing huge.
        let mut s = Memslots::new(MemslotLimits::default());
        set(
            &mut s,
            MemoryRegion {
                userspace_addr: 0x7f00_0000_1000,
                guest_phys_addr: 0,
                ..r
            },
        )
        .unwrap();
        let slot = s.by_id(0).unwrap();
        assert!((0..3).all(|i| slot.max_mapping_level(gfn(2 * i), Level::L1G) == Level::L4K));
    }
}
