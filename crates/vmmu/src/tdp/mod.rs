//! The TDP MMU (KVM's `tdp_mmu.c`, `tdp_iter.c`): two-dimensional paging without reverse
//! maps, with faults running in parallel.
//!
//! # Invariants
//! - There is always exactly one valid root; invalid roots stay listed until no vCPU
//!   holds them. Root pages are held as `RootRef`s, dereferenced in one place
//!   (`RootRef::page`) under an epoch guard.
//! - Every SPTE write, used-entries bit and `children` pointer change goes through the
//!   write funnel (`spte_write`), which keeps them consistent with each other; the
//!   iterator and the operations only read.
//!
//! # Locking
//! - The VM's MMU lock is a reader-writer lock (TDP faults enter through the fault gate
//!   beside it instead, see `vm::lock`). The lock mode is in the types: what needs the
//!   lock **exclusive** takes `&mut TdpMmu`, which only the exclusive lock gives
//!   (zapping roots and leaf ranges for the notifier and memslot changes, `change_pte`,
//!   dirty clearing, the fast zap and root reaping); what is correct under the lock
//!   **shared** takes `&self` (faults, write protection, eager splitting, huge-page
//!   recovery, aging), and may run under the exclusive lock too. A reader holding
//!   `&TdpMmu` cannot call a writer's operation.
//! - Under the shared lock every SPTE change is a compare-exchange against the value the
//!   iterator read (`TdpMmu::set_spte_atomic` in `spte_write`); a loser re-reads and
//!   retries, or gives up where KVM does (aging). Under the exclusive lock a write is a
//!   plain store, or an atomic one where a CPU may still set A/D bits (`ExclusiveMmu`,
//!   made only from `&mut TdpMmu`).
//! - An entry whose subtree is being taken out is first set to [`FROZEN`]; a walker that
//!   reads it retries. The removed subtree's entries are frozen one by one, so a fault
//!   racing inside it cannot install anything.
//! - Tables reached through `children` pointers are read under an epoch guard; a table
//!   unlinked from the tree is retired through the epoch collector only after the remote
//!   TLB flush that follows its removal, so neither a vCPU nor an MMU walker can see it
//!   freed (crossbeam-epoch; in the `no_std` core the collector is driven by explicit
//!   handles instead of thread locals).
//! - The used-entries bitmap (seed 002) is set by whoever made an entry present and
//!   cleared only under the exclusive lock (see `page`).
//! - Roots are counted: a vCPU holds a reference to the root it runs on. Invalidated roots
//!   (a fast zap of everything) are replaced at once and zapped when the last vCPU leaves.
//!
//! [`FROZEN`]: crate::spte::FROZEN

mod fault;
mod iter;
mod ops;
mod page;
mod spte_write;
mod zap;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_epoch::{Atomic, Guard, Shared};

pub use fault::TdpFault;
pub use iter::{Step, TdpIter, TdpIteration, Walked};
pub use ops::SplitProgress;
pub use page::TdpPage;
pub use zap::ZapCounts;

use crate::error::Error;
use crate::flush::Removed;
use crate::mmu::Invalidation;
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, Pfn};

/// Positions one walk yields before it stops to let the lock go.
pub const YIELD_BUDGET: u64 = 8192;

/// A pinned epoch of the one collector the TDP MMU retires its pages through.
///
/// # Invariants
/// Only [`pin`] makes one (the field is private), so every `EpochGuard` pins that
/// collector. Every TDP operation and accessor that reads pages without a lock takes an
/// `EpochGuard`, never a bare `crossbeam_epoch::Guard`: a guard of another collector
/// would not hold back the frees of [`TdpMmu::retire`], and a page it lets the caller
/// see could be freed (and its frame handed out again) while still in use.
///
/// It derefs to the crossbeam guard, for the crossbeam calls the MMU makes with it.
pub struct EpochGuard(Guard);

impl core::ops::Deref for EpochGuard {
    type Target = Guard;
    #[inline]
    fn deref(&self) -> &Guard {
        &self.0
    }
}

/// Pin the epoch of the TDP MMU's collector. With `std`, through the global collector's
/// thread-local handle; without, through a handle of a static collector registered for
/// the occasion.
pub fn pin() -> EpochGuard {
    #[cfg(feature = "std")]
    {
        EpochGuard(crossbeam_epoch::pin())
    }
    #[cfg(not(feature = "std"))]
    {
        static COLLECTOR: spin::Once<crossbeam_epoch::Collector> = spin::Once::new();
        EpochGuard(
            COLLECTOR
                .call_once(crossbeam_epoch::Collector::new)
                .register()
                .pin(),
        )
    }
}

/// The earlier of two resume points (a walk over several roots resumes where the first
/// of them stopped; `None` means finished).
pub(crate) fn earliest(a: Option<Gfn>, b: Option<Gfn>) -> Option<Gfn> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) | (None, x) => x,
    }
}

/// Run the frees the epoch collector still holds back, as far as this thread can make the
/// epoch advance (each pin-and-flush may advance it one step; three steps free everything
/// retired before the call when no other thread is pinned).
pub fn quiesce() {
    for _ in 0..4 {
        pin().flush();
    }
}

impl Removed {
    /// Record that `page` was unlinked: it is retired after the flush this makes owed.
    pub(crate) fn push(&mut self, page: Shared<'_, TdpPage>) {
        self.push_unlinked(page.as_raw() as usize);
    }
}

/// Counters of TDP MMU work.
#[derive(Default, Debug)]
pub struct TdpStats {
    /// Faults that found the mapping there.
    pub spurious_faults: AtomicU64,
    /// Faults that lost a race and were retried.
    pub retried_faults: AtomicU64,
    /// Tables allocated.
    pub pages_allocated: AtomicU64,
    /// Tables freed.
    pub pages_freed: Arc<AtomicU64>,
    /// Huge pages split.
    pub huge_split: AtomicU64,
    /// Huge pages recovered in place.
    pub huge_recovered: AtomicU64,
    /// Iterator positions walked by root zaps (seed 002's "loops").
    pub zap_loops: AtomicU64,
    /// SPTEs read by root zaps.
    pub zap_reads: AtomicU64,
}

/// A pointer to a root page, owned by the root list until the page is retired.
///
/// # Invariants
/// - The pointer is never null: [`RootRef::new`] makes it from a live page.
/// - The page is freed only by [`TdpMmu::retire`] (through the epoch collector) after
///   [`RootRef::into_retired`] consumed the `RootRef`, which `reap_invalid_roots` does
///   under the exclusive lock (`&mut TdpMmu`) once the root left the root list. So while
///   a `&RootRef` exists, the page has not been handed to the collector yet.
struct RootRef(Atomic<TdpPage>);

impl RootRef {
    fn new(page: TdpPage) -> Self {
        RootRef(Atomic::new(page))
    }

    /// The root page, for as long as `guard` pins the epoch. The one place a root is
    /// dereferenced.
    #[inline]
    fn page<'g>(&self, guard: &'g EpochGuard) -> &'g TdpPage {
        // The pointer never changes after `new`, and the root list is changed only under
        // `&mut TdpMmu`: a relaxed load reads the value `new` stored.
        let page = self.0.load(Ordering::Relaxed, guard);
        // SAFETY: non-null and live when `page` is called (see the invariants: a `&self`
        // means it is not retired yet). `guard` pins the collector pages are retired
        // through (an `EpochGuard` comes only from `pin`), before any later retirement,
        // and that collector frees a retired page only after every guard pinned before
        // its retirement is dropped, so the page outlives `'g`.
        unsafe { page.deref() }
    }

    /// Hand the root page over for retirement (with the other pages of a [`Removed`]).
    fn into_retired<'g>(self, guard: &'g EpochGuard) -> Shared<'g, TdpPage> {
        self.0.load(Ordering::Relaxed, guard)
    }
}

struct Root {
    page: RootRef,
    /// The root page's frame (immutable; kept here so vCPU reference counting needs no
    /// epoch guard).
    frame: Pfn,
    refs: AtomicU32,
    invalid: bool,
}

/// The TDP MMU's state.
pub struct TdpMmu<A: TableAllocator + 'static> {
    alloc: Arc<A>,
    roots: Vec<Root>,
    mode: TdpIteration,
    max_level: Level,
    pub(crate) invalidation: Invalidation,
    stats: TdpStats,
}

impl<A: TableAllocator + 'static> TdpMmu<A> {
    /// A TDP MMU with one valid root, iterating in `mode`, mapping up to `max_level`.
    pub fn new(alloc: Arc<A>, mode: TdpIteration, max_level: Level) -> Result<Self, Error> {
        let mut mmu = TdpMmu {
            alloc,
            roots: Vec::new(),
            mode,
            max_level: max_level.min(Level::L1G),
            invalidation: Invalidation::default(),
            stats: TdpStats::default(),
        };
        mmu.new_root()?;
        Ok(mmu)
    }

    fn new_root(&mut self) -> Result<(), Error> {
        let page = self.alloc_root()?;
        self.push_root(page);
        Ok(())
    }

    /// A root page, not yet listed: what a fast zap needs, allocated before anything
    /// changes so that running out of table memory leaves the roots as they were.
    pub(crate) fn alloc_root(&self) -> Result<TdpPage, Error> {
        self.alloc_page(Level::ROOT, Gfn(0))
    }

    /// List `page` (from [`alloc_root`](Self::alloc_root)) as a valid root.
    fn push_root(&mut self, page: TdpPage) {
        let frame = page.frame();
        self.roots.push(Root {
            page: RootRef::new(page),
            frame,
            refs: AtomicU32::new(0),
            invalid: false,
        });
    }

    pub(crate) fn alloc_page(&self, level: Level, gfn: Gfn) -> Result<TdpPage, Error> {
        let p = TdpPage::new(&*self.alloc, level, gfn).ok_or(Error::OutOfTableMemory)?;
        self.stats.pages_allocated.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }

    /// The iteration mode.
    pub fn mode(&self) -> TdpIteration {
        self.mode
    }
    /// Work counters.
    pub fn stats(&self) -> &TdpStats {
        &self.stats
    }
    /// The largest mapping level.
    pub fn max_level(&self) -> Level {
        self.max_level
    }

    /// The valid root (there is always exactly one).
    pub fn root<'g>(&self, guard: &'g EpochGuard) -> &'g TdpPage {
        self.roots
            .iter()
            .find(|r| !r.invalid)
            .expect("a valid root")
            .page
            .page(guard)
    }

    /// Every root, valid or not, with whether it is valid.
    pub fn roots<'g>(
        &self,
        guard: &'g EpochGuard,
    ) -> impl Iterator<Item = (&'g TdpPage, bool)> + use<'_, 'g, A> {
        self.roots
            .iter()
            .map(move |r| (r.page.page(guard), !r.invalid))
    }

    /// The valid root whose frame is `frame` (a vCPU's root), if it is still valid.
    #[inline]
    pub fn valid_root<'g>(&self, frame: Pfn, guard: &'g EpochGuard) -> Option<&'g TdpPage> {
        self.roots
            .iter()
            .find(|r| !r.invalid && r.frame == frame)
            .map(|r| r.page.page(guard))
    }

    /// Take a reference to the valid root for a vCPU; returns its frame.
    pub fn get_root(&self) -> Pfn {
        let r = self
            .roots
            .iter()
            .find(|r| !r.invalid)
            .expect("a valid root");
        r.refs.fetch_add(1, Ordering::AcqRel);
        r.frame
    }

    /// Drop a vCPU's reference to the root with frame `frame`.
    pub fn put_root(&self, frame: Pfn) {
        for r in &self.roots {
            if r.frame == frame {
                r.refs.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }

    /// Whether `frame` is the valid root.
    pub fn is_valid_root(&self, frame: Pfn) -> bool {
        self.roots.iter().any(|r| !r.invalid && r.frame == frame)
    }

    /// Zap every root in place, in passes of increasing level (exclusive lock; KVM's
    /// teardown path). The roots stay valid and referenced.
    pub fn zap_all_roots(&mut self, guard: &EpochGuard) -> (Removed, ZapCounts) {
        let mmu = self.exclusive();
        let mut removed = Removed::default();
        let mut counts = ZapCounts::default();
        for (root, _) in mmu.roots(guard) {
            let (r, c) = mmu.zap_root(root, guard);
            removed.merge(r);
            counts.add(c);
        }
        (removed, counts)
    }

    /// KVM's fast zap: mark every root invalid, make a new one (vCPUs must reload) and
    /// zap what the invalid roots map at once (`kvm_tdp_mmu_zap_invalidated_roots`), so an
    /// idle vCPU holds only an empty root page. The page itself is freed by
    /// [`reap_invalid_roots`](Self::reap_invalid_roots) once no vCPU holds it. Exclusive
    /// lock.
    ///
    /// The new root is allocated first: out of table memory, nothing changed (the old
    /// root stays valid, as the one-valid-root invariant needs).
    pub fn invalidate_all_roots(&mut self, guard: &EpochGuard) -> Result<Removed, Error> {
        let page = self.alloc_root()?;
        Ok(self.invalidate_all_roots_with(page, guard))
    }

    /// [`invalidate_all_roots`](Self::invalidate_all_roots) with the new root already
    /// allocated ([`alloc_root`](Self::alloc_root)): cannot fail.
    pub(crate) fn invalidate_all_roots_with(&mut self, page: TdpPage, guard: &EpochGuard) -> Removed {
        for r in &mut self.roots {
            r.invalid = true;
        }
        self.push_root(page);
        let mmu = self.exclusive();
        let mut removed = Removed::default();
        for (root, valid) in mmu.roots(guard) {
            if !valid {
                removed.merge(mmu.zap_root(root, guard).0);
            }
        }
        removed
    }

    /// Zap and unlink invalid roots no vCPU holds any more (exclusive lock). The root
    /// pages themselves are among the removed pages.
    pub fn reap_invalid_roots(&mut self, guard: &EpochGuard) -> (Removed, ZapCounts) {
        let mut removed = Removed::default();
        let mut counts = ZapCounts::default();
        let mut keep = Vec::new();
        for r in core::mem::take(&mut self.roots) {
            if r.invalid && r.refs.load(Ordering::Acquire) == 0 {
                let (rm, c) = self.zap_root(r.page.page(guard), guard);
                removed.merge(rm);
                counts.add(c);
                removed.push(r.page.into_retired(guard));
            } else {
                keep.push(r);
            }
        }
        self.roots = keep;
        (removed, counts)
    }

    /// Free the pages of `removed`.
    ///
    /// # Safety
    /// A remote TLB flush has completed since they were unlinked.
    pub unsafe fn retire(&self, removed: Removed) {
        if removed.pages.is_empty() {
            return;
        }
        let guard = pin();
        let alloc = self.alloc.clone();
        let freed = self.stats.pages_freed.clone();
        let pages = removed.pages;
        let n = pages.len() as u64;
        // SAFETY: the pages are unlinked and a flush completed; walkers that might still
        // read them are pinned, and the epoch runs this only after they are done.
        unsafe {
            guard.defer_unchecked(move || {
                // Counted before the frames go back: whoever sees the allocator's live
                // count drop (any thread may run this) sees the MMU's count drop too.
                freed.fetch_add(n, Ordering::Release);
                for p in pages {
                    let page = crossbeam_epoch::Owned::from_raw(p as *mut TdpPage);
                    alloc.free_table(page.frame());
                    drop(page);
                }
            });
        }
        guard.flush();
    }

    /// Tear everything down (VM destruction).
    ///
    /// # Safety
    /// No vCPU will run again and no other thread uses the MMU.
    pub unsafe fn destroy(&mut self) {
        let guard = pin();
        for r in &mut self.roots {
            r.invalid = true;
            r.refs.store(0, Ordering::Relaxed);
        }
        let (removed, _) = self.reap_invalid_roots(&guard);
        drop(guard);
        // SAFETY: forwarded from the caller.
        unsafe { self.retire(removed) };
    }

    /// Pages allocated and not yet freed (freeing is deferred by the epoch collector).
    pub fn live_pages(&self) -> u64 {
        self.stats.pages_allocated.load(Ordering::Relaxed)
            - self.stats.pages_freed.load(Ordering::Acquire)
    }
}
