//! The dirty-log half of the VM API (KVM's `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG` and
//! the dirty-ring ioctls): harvesting a slot's bitmap, clearing it in manual-protect mode,
//! reading and resetting the vCPUs' rings, and logging a page a fault made writable. The
//! bitmaps, the lockless index and the rings themselves live in [`crate::dirty`].
//!
//! # Invariants
//! Every path that may log a page takes a [`DirtyRoom`] before it can make the page
//! writable (the locked faults in `vm/mmu.rs`, the fast path in `vm/fault.rs`, the
//! shadow-paging fault and emulated writes in `vm/paging.rs`): with rings, a vCPU whose
//! ring has no room is refused (`Error::DirtyRingFull`, `Exit::DirtyRingFull`) and nothing
//! is made writable; so no write is writable without its entry.
//!
//! With rings and the backup bitmap (`DirtyLogConfig::ring_with_bitmap`), a page dirtied
//! outside any vCPU context ([`Vm::mark_page_dirty`]) goes into its slot's bitmap, which
//! GET (and CLEAR) harvest as in bitmap mode; without the bitmap such a write is refused
//! (`Error::DirtyWithoutVcpu`) rather than lost. Faults always log into their vCPU's ring.
//!
//! # Locking
//! GET, CLEAR and reset take the MMU lock exclusively and write-protect what they report
//! through the MMU dispatch; logging a page (and taking or giving back room for it) takes
//! only the ring's vCPU-side lock (or none, for a bitmap: its words are atomics). Reading
//! and marking ring entries ([`Vm::harvest_dirty_ring`], [`DirtyRingView`]) take only the
//! ring's VMM-side lock, never the vCPU's: the VMM harvests while the vCPU runs, ordered
//! by the entries' release/acquire flags (see `dirty::ring`). A locked fault logs its page
//! with the MMU lock held, and a reset takes the rings' VMM-side locks with it held: the
//! MMU lock always comes first.

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::Vcpu;
use crate::dirty::{DirtyMasks, DirtyRing, MarkError, MaskScratch, RingEntry};
use crate::error::Error;
use crate::flush::Removed;
use crate::host::HostMemory;
use crate::memslot::DirtyBitmap;
use crate::mmu::DirtyGfn;
use crate::shadow::DirtyWrprot;
use crate::table::TableAllocator;
use crate::types::{Gfn, Gpa};

use super::Vm;

/// What a harvest did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HarvestReport {
    /// Pages reported dirty.
    pub dirty_pages: u64,
    /// How the shadow MMU write-protected them again (seed 004's choice); `None` when
    /// nothing was protected, or on the TDP MMU, which always goes by 64-page masks.
    pub wrprot: Option<DirtyWrprot>,
}

/// Room for the one page a fault (or an emulated write) may log, taken before it can make
/// a page writable: a place in the vCPU's dirty ring when the VM uses rings (given back
/// on drop if unused), nothing to hold for a bitmap. So a page is never writable without
/// its entry, and a push never finds the ring full (see `dirty::ring`).
pub(crate) struct DirtyRoom {
    ring: Option<Arc<DirtyRing>>,
}

impl DirtyRoom {
    /// Room in `vcpu`'s ring, if it has one: [`Error::DirtyRingFull`] when the ring is
    /// soft-full counting what faults in flight reserved (the vCPU must stop first).
    #[inline]
    pub(crate) fn take(vcpu: &Vcpu) -> Result<DirtyRoom, Error> {
        match &vcpu.dirty_ring {
            None => Ok(DirtyRoom { ring: None }),
            Some(r) if r.reserve() => Ok(DirtyRoom {
                ring: Some(r.clone()),
            }),
            Some(_) => Err(Error::DirtyRingFull { vcpu: vcpu.id }),
        }
    }

    /// Log `d` as dirty: into the ring the room is in, else into `bitmap`.
    #[inline]
    pub(crate) fn log(mut self, d: DirtyGfn, bitmap: Option<&DirtyBitmap>) {
        match self.ring.take() {
            Some(ring) => ring.push_reserved(d),
            None => {
                if let Some(b) = bitmap {
                    b.mark(d.offset);
                }
            }
        }
    }
}

impl Drop for DirtyRoom {
    #[inline]
    fn drop(&mut self) {
        if let Some(ring) = &self.ring {
            ring.unreserve();
        }
    }
}

/// A vCPU's dirty ring as the VMM sees it ([`Vm::dirty_ring`]): KVM's mapped array of
/// `kvm_dirty_gfn`, by entry index (how many entries the vCPU pushed before it; KVM's VMM
/// keeps the same free-running fetch index). The KVM protocol, safely:
///
/// ```text
/// let ring = vm.dirty_ring(v)?;
/// let mut fetch = 0;
/// while let RingEntry::Dirty(e) = ring.read(fetch) {   // load-acquire of the flags
///     collect(e);
///     ring.mark_harvested(fetch)?;                       // store-release of RESET
///     fetch += 1;
/// }
/// vm.reset_dirty_rings()?;                               // KVM_RESET_DIRTY_RINGS
/// ```
///
/// # Ordering
/// An entry the view returns as [`RingEntry::Dirty`] is complete: the vCPU wrote its slot
/// and offset before it published the DIRTY flag with a release store, and `read` loads
/// the flag with acquire before it reads them (`tests/loom_ring.rs` checks this in every
/// interleaving). A reset frees only entries marked harvested, so an entry never changes
/// under a VMM that read it and has not marked it.
///
/// # Misuse
/// The ring is not memory the VMM writes, so nothing the VMM does through the view can
/// corrupt it: marking an entry that is not in the ring is [`Error::RingEntryNotDirty`],
/// one it never read [`Error::RingEntryNotRead`], both changing nothing; marking twice is
/// a no-op (`Ok(false)`).
#[derive(Clone)]
pub struct DirtyRingView {
    vcpu: u32,
    ring: Arc<DirtyRing>,
}

impl DirtyRingView {
    /// The vCPU whose ring this is.
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }
    /// Entries in the ring.
    pub fn size(&self) -> u64 {
        self.ring.size()
    }
    /// Entries used at which the vCPU stops (KVM_EXIT_DIRTY_RING_FULL).
    pub fn soft_limit(&self) -> u64 {
        self.ring.soft_limit()
    }
    /// Entry `index`: [`RingEntry::Dirty`] if the vCPU published it and it is not
    /// harvested (reading it lets [`mark_harvested`](Self::mark_harvested) accept it),
    /// [`RingEntry::Harvested`] if it waits for a reset, else [`RingEntry::Empty`].
    pub fn read(&self, index: u64) -> RingEntry {
        self.ring.read(index)
    }
    /// Mark entry `index`, which [`read`](Self::read) returned, harvested: the next
    /// [`Vm::reset_dirty_rings`] write-protects its page and frees its room. `Ok(false)`
    /// if it was already marked.
    pub fn mark_harvested(&self, index: u64) -> Result<bool, Error> {
        self.ring.mark_harvested(index).map_err(|e| match e {
            MarkError::NotDirty => Error::RingEntryNotDirty {
                vcpu: self.vcpu,
                index,
            },
            MarkError::NotRead => Error::RingEntryNotRead {
                vcpu: self.vcpu,
                index,
            },
        })
    }
    /// (pushed, harvested by [`Vm::harvest_dirty_ring`] or past reset, reset) so far.
    pub fn counters(&self) -> (u64, u64, u64) {
        self.ring.counters()
    }
}

impl<H: HostMemory, A: TableAllocator> Vm<H, A> {
    /// GET and CLEAR: bitmap mode, or rings with the backup bitmap.
    fn bitmap_mode(&self) -> Result<(), Error> {
        if self.config().dirty_log.ring_size.is_some() && !self.ring_bitmap() {
            return Err(Error::WrongDirtyLogMode(
                "the VM logs dirty pages in per-vCPU rings",
            ));
        }
        Ok(())
    }

    /// Whether the rings have the backup bitmap (KVM's `dirty_ring_with_bitmap`).
    pub(crate) fn ring_bitmap(&self) -> bool {
        self.ring_bitmap.load(core::sync::atomic::Ordering::Acquire)
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)`: keep each logging slot's dirty
    /// bitmap beside the rings, for pages dirtied outside any vCPU context (see
    /// [`DirtyLogConfig::ring_with_bitmap`](crate::DirtyLogConfig::ring_with_bitmap)). As
    /// KVM: the VM must use rings ([`Error::WrongDirtyLogMode`]) and have no memslot yet
    /// ([`Error::MemslotsExist`]); enabling it again is a no-op.
    pub fn enable_dirty_ring_with_bitmap(&self) -> Result<(), Error> {
        if self.config().dirty_log.ring_size.is_none() {
            return Err(Error::WrongDirtyLogMode(
                "the backup bitmap is for dirty rings: the VM logs in bitmaps",
            ));
        }
        // Under the exclusive lock, so no memslot is created meanwhile.
        let st = self.lock();
        if self.ring_bitmap() {
            return Ok(());
        }
        if st.slots.iter().next().is_some() {
            return Err(Error::MemslotsExist);
        }
        self.ring_bitmap
            .store(true, core::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// A write to guest page `gpa` made outside any vCPU context (KVM's
    /// `mark_page_dirty_in_slot` with no running vCPU: the host or the VMM writing guest
    /// memory, e.g. device state during migration): mark it in its slot's dirty bitmap if
    /// the slot logs. Returns whether it was marked (`false` outside every memslot or in a
    /// slot that does not log, as KVM ignores those).
    ///
    /// On a ring VM the page goes into the backup bitmap
    /// ([`DirtyLogConfig::ring_with_bitmap`](crate::DirtyLogConfig::ring_with_bitmap)),
    /// harvested by [`get_dirty_log`](Self::get_dirty_log); without it there is no vCPU
    /// ring to push to and no bitmap, and the write is refused with
    /// [`Error::DirtyWithoutVcpu`] (KVM warns and loses it). Nothing is write-protected:
    /// the MMU maps nothing for such a write.
    pub fn mark_page_dirty(&self, gpa: Gpa) -> Result<bool, Error> {
        if self.config().dirty_log.ring_size.is_some() && !self.ring_bitmap() {
            return Err(Error::DirtyWithoutVcpu { gpa });
        }
        let gfn = gpa.gfn();
        let st = self.lock_shared();
        let Some(slot) = st.slots.lookup(gfn) else {
            return Ok(false);
        };
        Ok(match slot.dirty_bitmap() {
            Some(b) => {
                b.mark(gfn.0 - slot.base_gfn.0);
                true
            }
            None => false,
        })
    }

    /// `KVM_GET_DIRTY_LOG`: copy slot `slot`'s dirty bitmap into `out` (one bit per page,
    /// 64 pages a word). By default the bits are cleared and those pages write-protected
    /// again, with the flush, before this returns; in manual-protect mode this only copies.
    pub fn get_dirty_log(&self, slot: u32, out: &mut [u64]) -> Result<HarvestReport, Error> {
        self.bitmap_mode()?;
        let manual = self.config().dirty_log.manual_protect;
        let mut guard = self.lock();
        let st = &mut *guard;
        let s = st.slots.by_id(slot).ok_or(Error::NoSuchSlot(slot))?;
        let bitmap = s.dirty_bitmap().ok_or(Error::NotLogging(slot))?;
        let words = bitmap.words();
        if out.len() < words.len() {
            return Err(Error::BitmapTooSmall {
                needed: words.len(),
                got: out.len(),
            });
        }
        let out = &mut out[..words.len()];
        let mut nonzero = alloc::vec![0u64; bitmap.summary_len()];
        let nr = bitmap.harvest(out, &mut nonzero, !manual);
        if manual || nr == 0 {
            return Ok(HarvestReport {
                dirty_pages: nr,
                wrprot: None,
            });
        }
        let masks = DirtyMasks::new(s.base_gfn, out, &nonzero, nr);
        let (removed, how) = st.mmu.write_protect_dirty(&st.slots, slot, &masks);
        self.commit(st, removed);
        Ok(HarvestReport {
            dirty_pages: nr,
            wrprot: how,
        })
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual-protect mode): clear the bits of `bitmap` (bit `i` is
    /// page `first_page + i`) in slot `slot`'s dirty bitmap and write-protect the pages
    /// whose bits were really set, with the flush. `first_page` must be a multiple of 64
    /// and the range inside the slot; `num_pages` a multiple of 64 unless the range ends at
    /// the slot's end. Returns the number of pages cleared.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u64,
        bitmap: &[u64],
    ) -> Result<u64, Error> {
        self.bitmap_mode()?;
        if !self.config().dirty_log.manual_protect {
            return Err(Error::WrongDirtyLogMode(
                "clear_dirty_log needs manual protect",
            ));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let s = st.slots.by_id(slot).ok_or(Error::NoSuchSlot(slot))?;
        let dirty = s.dirty_bitmap().ok_or(Error::NotLogging(slot))?;
        if !first_page.is_multiple_of(64) {
            return Err(Error::ClearLogUnaligned { first_page });
        }
        let npages = s.npages;
        if first_page > npages
            || num_pages > npages - first_page
            || (!num_pages.is_multiple_of(64) && first_page + num_pages != npages)
        {
            return Err(Error::ClearLogRange {
                first_page,
                num_pages,
                npages,
            });
        }
        let nwords = num_pages.div_ceil(64) as usize;
        if bitmap.len() < nwords {
            return Err(Error::BitmapTooSmall {
                needed: nwords,
                got: bitmap.len(),
            });
        }
        let first_word = first_page as usize / 64;
        // The cleared bits go into the VM's zeroed scratch masks, which list the words
        // they set: the work follows the words the caller set, not the range.
        let scratch = &mut st.scratch;
        scratch.begin(nwords);
        for (k, &user) in bitmap[..nwords].iter().enumerate() {
            if user == 0 {
                continue;
            }
            // Only the last word of a range ending with the slot may be partial.
            let user = if k + 1 == nwords && !num_pages.is_multiple_of(64) {
                user & ((1u64 << (num_pages % 64)) - 1)
            } else {
                user
            };
            scratch.or(k, dirty.clear_word(first_word + k, user));
        }
        let base = Gfn(s.base_gfn.0 + first_page);
        Ok(self.protect_scratch(st, slot, base, nwords).dirty_pages)
    }

    /// `KVM_GET_DIRTY_LOG` in the form a VMM uses it: the dirty pages of slot `slot` as
    /// runs of consecutive pages, appended to `out` in increasing order, instead of a
    /// bitmap the VMM converts bit by bit. Semantics as [`get_dirty_log`](Self::get_dirty_log):
    /// by default the pages are taken out of the bitmap and write-protected again, with
    /// the flush, before this returns; in manual-protect mode this only copies (then
    /// [`clear_dirty_ranges`](Self::clear_dirty_ranges)).
    ///
    /// What it costs grows with the dirty words, not with the slot: it visits the bitmap's
    /// two summaries (one bit per 256 Ki pages, then one per 4096 pages where those are
    /// set) and the words they name; nothing slot-sized is copied, scanned or zeroed.
    pub fn get_dirty_ranges(
        &self,
        slot: u32,
        out: &mut Vec<DirtyRange>,
    ) -> Result<HarvestReport, Error> {
        self.bitmap_mode()?;
        let manual = self.config().dirty_log.manual_protect;
        let mut guard = self.lock();
        let st = &mut *guard;
        let s = st.slots.by_id(slot).ok_or(Error::NoSuchSlot(slot))?;
        let bitmap = s.dirty_bitmap().ok_or(Error::NotLogging(slot))?;
        let (base, nwords) = (s.base_gfn, bitmap.words().len());
        let scratch = &mut st.scratch;
        if !manual {
            scratch.begin(nwords);
        }
        let mut run: Option<DirtyRange> = None;
        bitmap.harvest_each(!manual, |w, mut v| {
            if !manual {
                scratch.or(w, v);
            }
            while v != 0 {
                let lo = v.trailing_zeros() as u64;
                let len = (!(v >> lo)).trailing_zeros().min(64 - lo as u32) as u64;
                let first = w as u64 * 64 + lo;
                match &mut run {
                    Some(r) if r.first_page + r.npages == first => r.npages += len,
                    _ => out.extend(run.replace(DirtyRange {
                        first_page: first,
                        npages: len,
                    })),
                }
                v &= !(((1u128 << (lo + len)) - 1) as u64);
            }
        });
        out.extend(run);
        if manual {
            let nr = out.iter().map(|r| r.npages).sum();
            return Ok(HarvestReport {
                dirty_pages: nr,
                wrprot: None,
            });
        }
        Ok(self.protect_scratch(st, slot, base, nwords))
    }

    /// `KVM_CLEAR_DIRTY_LOG` by page ranges (manual-protect mode): clear the pages of every
    /// range in slot `slot`'s dirty bitmap and write-protect those whose bits were really
    /// set, with one flush for them all. Ranges may come in any order and overlap; each
    /// must lie inside the slot ([`Error::ClearLogRange`] otherwise, checked for every
    /// range before anything changes). Returns the number of pages cleared. What it costs
    /// grows with the pages of the ranges, not with the slot.
    pub fn clear_dirty_ranges(&self, slot: u32, ranges: &[DirtyRange]) -> Result<u64, Error> {
        self.bitmap_mode()?;
        if !self.config().dirty_log.manual_protect {
            return Err(Error::WrongDirtyLogMode(
                "clear_dirty_ranges needs manual protect",
            ));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let s = st.slots.by_id(slot).ok_or(Error::NoSuchSlot(slot))?;
        let dirty = s.dirty_bitmap().ok_or(Error::NotLogging(slot))?;
        let npages = s.npages;
        if let Some(r) = ranges
            .iter()
            .find(|r| r.first_page > npages || r.npages > npages - r.first_page)
        {
            return Err(Error::ClearLogRange {
                first_page: r.first_page,
                num_pages: r.npages,
                npages,
            });
        }
        let (base, nwords) = (s.base_gfn, npages.div_ceil(64) as usize);
        let scratch = &mut st.scratch;
        scratch.begin(nwords);
        for r in ranges.iter().filter(|r| r.npages != 0) {
            let (first, end) = (r.first_page, r.first_page + r.npages);
            for w in first / 64..end.div_ceil(64) {
                let lo = first.max(w * 64) - w * 64;
                let hi = end.min(w * 64 + 64) - w * 64;
                let user = (u64::MAX >> (64 - (hi - lo))) << lo;
                scratch.or(w as usize, dirty.clear_word(w as usize, user));
            }
        }
        Ok(self.protect_scratch(st, slot, base, nwords).dirty_pages)
    }

    /// Write-protect the pages gathered in the VM's scratch masks (slot `slot`, `nwords`
    /// words from `base`), commit the flush and reset the scratch. Returns the pages and
    /// how they were protected.
    fn protect_scratch(
        &self,
        st: &mut super::VmState<A>,
        slot: u32,
        base: Gfn,
        nwords: usize,
    ) -> HarvestReport {
        let nr = st.scratch.nr();
        let (removed, how) = {
            let masks = st.scratch.masks(base, nwords);
            st.mmu.write_protect_dirty(&st.slots, slot, &masks)
        };
        st.scratch.reset();
        self.commit(st, removed);
        HarvestReport {
            dirty_pages: nr,
            wrprot: how,
        }
    }

    fn ring_of(&self, vcpu: u32) -> Result<Arc<DirtyRing>, Error> {
        let shared = self
            .vcpus
            .read()
            .get(vcpu as usize)
            .cloned()
            .ok_or(Error::NoSuchVcpu(vcpu))?;
        shared.dirty_ring.ok_or(Error::WrongDirtyLogMode(
            "the VM logs dirty pages in bitmaps, not rings",
        ))
    }

    /// Read the entries vCPU `vcpu` pushed since its last harvest into `out` and mark them
    /// harvested (the VMM reading `kvm_dirty_gfn`s and setting their RESET flags). Returns
    /// how many. May run while the vCPU runs: entries it is still publishing are left for
    /// the next harvest. Entries already marked through a [`DirtyRingView`] are not
    /// reported again.
    pub fn harvest_dirty_ring(&self, vcpu: u32, out: &mut Vec<DirtyGfn>) -> Result<usize, Error> {
        Ok(self.ring_of(vcpu)?.harvest(out))
    }

    /// vCPU `vcpu`'s ring, as the VMM sees the ring it mapped: entries by index, read with
    /// acquire and marked harvested with release, on any thread and concurrently with the
    /// vCPU (KVM_CAP_DIRTY_LOG_RING_ACQ_REL). The view stays valid as long as it is held.
    pub fn dirty_ring(&self, vcpu: u32) -> Result<DirtyRingView, Error> {
        Ok(DirtyRingView {
            vcpu,
            ring: self.ring_of(vcpu)?,
        })
    }

    /// `KVM_RESET_DIRTY_RINGS`: write-protect again every harvested entry of every vCPU's
    /// ring, coalescing the pages of each slot into 64-page masks, flush, and free the
    /// entries. Returns the number of entries reset.
    ///
    /// Under the MMU lock (taken before the rings', the order locked faults log in), the
    /// entries go straight from the rings into the VM's zeroed scratch masks
    /// (`RingScatter`, in `vm/dirty_log.rs`), with no copy of them and no allocation per call.
    pub fn reset_dirty_rings(&self) -> Result<usize, Error> {
        if self.config().dirty_log.ring_size.is_none() {
            return Err(Error::WrongDirtyLogMode(
                "the VM logs dirty pages in bitmaps, not rings",
            ));
        }
        let vcpus: Vec<_> = self.vcpus.read().iter().cloned().collect();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut scatter = RingScatter::new(core::mem::take(&mut st.scratch));
        let mut n = 0;
        for v in &vcpus {
            if let Some(r) = &v.dirty_ring {
                n += r.reset(|e| scatter.add(st, e));
            }
        }
        let (scratch, removed) = scatter.finish(st);
        st.scratch = scratch;
        self.commit(st, removed);
        Ok(n)
    }
}

/// The entries of a ring reset, scattered into one slot's 64-page masks at a time (KVM
/// coalesces only neighbours in ring order; a random write order would then cost one
/// walk per entry) and write-protected as GET does, each time the slot changes and at the
/// end. The VM's scratch masks list the words they set, so the protection and the
/// zeroing visit only those: a reset costs what its entries are, whatever the slot's size.
struct RingScatter {
    scratch: MaskScratch,
    /// The slot being gathered: id, first gfn, pages (0 for a slot gone since the push:
    /// nothing maps it, so its entries are dropped); `None` before the first entry.
    slot: Option<(u32, Gfn, u64)>,
    removed: Removed,
}

impl RingScatter {
    fn new(scratch: MaskScratch) -> Self {
        RingScatter {
            scratch,
            slot: None,
            removed: Removed::default(),
        }
    }

    fn add<A: TableAllocator>(&mut self, st: &mut super::VmState<A>, e: DirtyGfn) {
        let npages = match self.slot {
            Some((id, _, npages)) if id == e.slot => npages,
            _ => {
                self.protect(st);
                let (base, npages) = st
                    .slots
                    .by_id(e.slot)
                    .map_or((Gfn(0), 0), |s| (s.base_gfn, s.npages));
                self.slot = Some((e.slot, base, npages));
                self.scratch.begin(npages.div_ceil(64) as usize);
                npages
            }
        };
        if e.offset >= npages {
            return;
        }
        self.scratch
            .or((e.offset / 64) as usize, 1u64 << (e.offset % 64));
    }

    /// Write-protect what the current slot gathered, and zero the masks again.
    fn protect<A: TableAllocator>(&mut self, st: &mut super::VmState<A>) {
        let Some((id, base, npages)) = self.slot else {
            return;
        };
        if self.scratch.nr() != 0 {
            let masks = self.scratch.masks(base, npages.div_ceil(64) as usize);
            let (r, _) = st.mmu.write_protect_dirty(&st.slots, id, &masks);
            self.removed.merge(r);
        }
        self.scratch.reset();
    }

    /// Protect the last slot's pages; the zeroed scratch back, and what to commit.
    fn finish<A: TableAllocator>(mut self, st: &mut super::VmState<A>) -> (MaskScratch, Removed) {
        self.protect(st);
        (self.scratch, self.removed)
    }
}

/// A run of pages of a slot, `[first_page, first_page + npages)` by page offset in the
/// slot: what [`Vm::get_dirty_ranges`] reports and [`Vm::clear_dirty_ranges`] clears.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirtyRange {
    /// Offset of the first page in the slot.
    pub first_page: u64,
    /// Number of pages.
    pub npages: u64,
}
