//! Dirty logging for live migration: the dirty bitmap with KVM's `KVM_GET_DIRTY_LOG`
//! semantics, manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: GET copies, CLEAR
//! re-protects), and per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`).
//!
//! # How a write gets logged
//! While a slot logs, its leaves are 4K and a leaf is writable only after a write fault
//! on it, and every such fault logs the page: the locked fault path (`page_fault`) and the
//! lockless fast path (`fast_page_fault`, which finds the slot's bitmap through
//! [`DirtyIndex`] without the MMU lock). Harvesting write-protects the pages it reports
//! (GET, CLEAR, ring reset), so the next write faults and is logged again. A page is
//! marked before the guest's write completes, so a harvest that misses the mark is
//! followed by one that reports it: no write is lost.
//!
//! # Locking
//! GET, CLEAR and reset take the MMU lock; bitmap words are atomics exchanged or
//! and-ed, because fast-path faults set bits without the lock. The index is read-locked
//! by fast-path faults and write-locked only while memslots change, never across a flush.

pub mod bitmap;
pub mod ring;

use alloc::sync::Arc;
use alloc::vec::Vec;

pub use bitmap::{DirtyBitmap, DirtyMasks, MaskScratch};
pub use ring::{DirtyRing, MarkError, RingEntry, RingLimits};

use crate::memslot::Memslots;
use crate::mmu::DirtyGfn;
use crate::sync::RwLock;
use crate::types::Gfn;

/// The logging memslots' bitmaps by gfn, readable without the MMU lock.
#[derive(Default)]
pub struct DirtyIndex {
    slots: RwLock<Vec<IndexEntry>>,
}

struct IndexEntry {
    base: Gfn,
    npages: u64,
    id: u32,
    bitmap: Arc<DirtyBitmap>,
}

impl DirtyIndex {
    /// Rebuild from the memslots (after every memslot change, under the MMU lock).
    pub(crate) fn publish(&self, slots: &Memslots) {
        let v = slots
            .iter()
            .filter_map(|s| {
                s.dirty_bitmap_arc().map(|bitmap| IndexEntry {
                    base: s.base_gfn,
                    npages: s.npages,
                    id: s.id,
                    bitmap,
                })
            })
            .collect();
        *self.slots.write() = v;
    }

    /// Call `f` with the logging slot's page and bitmap for `gfn`, if it is in one.
    #[inline]
    pub(crate) fn with(&self, gfn: Gfn, f: impl FnOnce(DirtyGfn, &DirtyBitmap)) {
        let slots = self.slots.read();
        if let Some(e) = slots
            .iter()
            .find(|e| gfn.0.wrapping_sub(e.base.0) < e.npages)
        {
            f(
                DirtyGfn {
                    slot: e.id,
                    offset: gfn.0 - e.base.0,
                },
                &e.bitmap,
            );
        }
    }
}
