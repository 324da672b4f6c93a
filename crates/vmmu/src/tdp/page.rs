//! A TDP MMU page: one table and what the TDP MMU keeps beside it.
//!
//! Unlike the shadow MMU's pages, these are reached without a lock: walkers go from a
//! page to its children through `children`, an array of epoch-managed pointers parallel to
//! the table, and check each child against the SPTE they read (a child whose frame differs
//! from the SPTE's is stale: retry). A page is freed through the epoch collector after it
//! is unlinked and a remote TLB flush has completed.
//!
//! `used` is the bitmap of shadow-present entries that the `used-entries` iteration mode
//! (seed 002, the author's suggestion) walks instead of reading every entry. Invariant,
//! maintained only in that mode: a present entry's bit is set. A bit is set by the thread
//! whose write made the entry present (right after it), and cleared only under the
//! exclusive MMU lock, so at every quiescent point the bitmap is exact. Both happen only
//! in the SPTE write funnel ([`super::spte_write`]), as do the changes of `children`.

use alloc::boxed::Box;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use super::EpochGuard;
use crossbeam_epoch::{Atomic, Shared};

use crate::table::{Table, TableAllocator};
use crate::types::{Gfn, Level, Pfn, SPTE_ENT_PER_PAGE};

const WORDS: usize = SPTE_ENT_PER_PAGE / 64;

/// A TDP MMU page.
///
/// # Invariants
/// Made only inside the crate (`TdpPage::new` is crate-private), by an MMU that keeps
/// the allocator alive (it holds an `Arc` of it, and so does every deferred free) until
/// the page is freed; `frame` (private) is the frame the allocator gave, so the free
/// gives back exactly that frame. So `table()` always points into allocated memory.
pub struct TdpPage {
    table: NonNull<Table>,
    frame: Pfn,
    /// Level of the table.
    pub level: Level,
    /// First gfn the table maps.
    pub gfn: Gfn,
    used: [AtomicU64; WORDS],
    children: Option<Box<[Atomic<TdpPage>]>>,
}

// SAFETY: the table is owned by the page for its life; every field is immutable or atomic.
unsafe impl Send for TdpPage {}
// SAFETY: as above.
unsafe impl Sync for TdpPage {}

impl TdpPage {
    /// A page with a fresh zeroed table, or `None` when the allocator is out of frames.
    /// The caller keeps `alloc` alive until the page's frame is freed (see the type's
    /// invariants).
    pub(crate) fn new<A: TableAllocator + ?Sized>(
        alloc: &A,
        level: Level,
        gfn: Gfn,
    ) -> Option<TdpPage> {
        let frame = alloc.alloc_table()?;
        Some(TdpPage {
            table: alloc.table_ptr(frame),
            frame,
            level,
            gfn,
            used: Default::default(),
            children: (level > Level::L4K)
                .then(|| (0..SPTE_ENT_PER_PAGE).map(|_| Atomic::null()).collect()),
        })
    }

    /// Frame of the table.
    #[inline]
    pub fn frame(&self) -> Pfn {
        self.frame
    }

    /// The table.
    #[inline]
    pub fn table(&self) -> &Table {
        // SAFETY: the frame is allocated for as long as the page exists.
        unsafe { self.table.as_ref() }
    }

    /// The child page recorded under entry `i` (null if none). Callers check it against
    /// the SPTE they read.
    #[inline]
    pub fn child<'g>(&self, i: usize, guard: &'g EpochGuard) -> Shared<'g, TdpPage> {
        match &self.children {
            Some(c) => c[i].load(Ordering::Acquire, guard),
            None => Shared::null(),
        }
    }

    /// Record `child` under entry `i` if nothing is recorded; `false` if another thread
    /// is linking a child there.
    #[inline]
    pub(super) fn claim_child(
        &self,
        i: usize,
        child: Shared<'_, TdpPage>,
        guard: &EpochGuard,
    ) -> bool {
        self.children.as_ref().expect("leaf table has no children")[i]
            .compare_exchange(
                Shared::null(),
                child,
                Ordering::AcqRel,
                Ordering::Acquire,
                guard,
            )
            .is_ok()
    }

    /// Forget the child under entry `i` (its SPTE no longer points at it).
    #[inline]
    pub(super) fn clear_child(&self, i: usize) {
        if let Some(c) = &self.children {
            c[i].store(Shared::null(), Ordering::Release);
        }
    }

    /// Mark entry `i` present in the used-entries bitmap.
    #[inline]
    pub(super) fn set_used(&self, i: usize) {
        self.used[i / 64].fetch_or(1 << (i % 64), Ordering::Release);
    }

    /// Mark entry `i` not present (exclusive MMU lock only).
    #[inline]
    pub(super) fn clear_used(&self, i: usize) {
        self.used[i / 64].fetch_and(!(1 << (i % 64)), Ordering::Release);
    }

    /// Whether entry `i` is marked present.
    #[inline]
    pub fn is_used(&self, i: usize) -> bool {
        self.used[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// The first marked entry at or after `from`.
    #[inline]
    pub fn next_used(&self, from: usize) -> Option<usize> {
        let mut w = from / 64;
        if w >= WORDS {
            return None;
        }
        let mut bits = self.used[w].load(Ordering::Acquire) & (!0u64 << (from % 64));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            if w == WORDS {
                return None;
            }
            bits = self.used[w].load(Ordering::Acquire);
        }
    }

    /// Marked entries.
    pub fn used_count(&self) -> u32 {
        self.used
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
    }

    /// The gfn mapped by entry `i`.
    #[inline]
    pub fn gfn_at(&self, i: usize) -> Gfn {
        Gfn(self.gfn.0 + ((i as u64) << self.level.gfn_shift()))
    }
}
