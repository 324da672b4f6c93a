//! The one way a TDP SPTE changes (KVM's `tdp_mmu_set_spte`, `tdp_mmu_set_spte_atomic`
//! and `handle_changed_spte`, with `handle_removed_pt`).
//!
//! Every write to an entry of a TDP table goes through one of these:
//! - [`TdpMmu::set_spte_atomic`], under the shared lock: a compare-exchange against the
//!   value the caller read; it returns whether it won, and a loser re-reads and retries
//!   (or gives up, as aging does). [`TdpMmu::freeze`] and [`TdpMmu::link_table_atomic`]
//!   are built on it.
//! - [`ExclusiveMmu::set_spte`] and [`ExclusiveMmu::clear_bits`], under the exclusive
//!   lock: a plain store, or an atomic exchange / and-not where a CPU may still set A/D
//!   or the lockless fast path may set W in the entry ([`Spte::has_volatile_bits`]). An
//!   [`ExclusiveMmu`] is made only from `&mut TdpMmu`, which only the exclusive lock
//!   gives (see `vm::lock`): a shared-lock walker holding `&TdpMmu` cannot reach these.
//! - [`Frozen::install`]: the value that replaces an entry this thread froze.
//! - [`TdpMmu::init_spte`]: an entry of a table nobody else has seen (`&mut TdpPage`).
//!
//! After the write, [`TdpMmu::handle_changed`] does the upkeep that follows from the old
//! and new value alone, in one place for every caller:
//! - the used-entries bitmap (seed 002, `TdpIteration::UsedEntries` only): the bit is set
//!   when an entry becomes shadow-present, and cleared only by an exclusive write that
//!   makes it non-present;
//! - a child table whose non-leaf entry was replaced is taken out with its whole subtree:
//!   its `children` pointer is forgotten, and under the shared lock each of its entries
//!   is frozen first, so a fault racing inside it cannot install anything; the tables go
//!   into [`Removed`], to be retired after the flush.
//!
//! Whether a TLB flush is owed is left to the caller, as in KVM: it depends on what the
//! operation meant (a write-protect owes one only if W was set, a split none although a
//! leaf became a table, aging none), not on the two values. So are the operation
//! counters (`huge_split`, `huge_recovered`).
//!
//! # Invariants
//! - Outside this file no TDP code writes a table entry, a used-entries bit or a
//!   `children` pointer; the iterator and the operations only read.
//! - In `UsedEntries` mode a shadow-present entry's bit is set. A bit outlives its entry
//!   only while the entry is frozen (it is given a present value again) or its table is
//!   on its way out, so at every quiescent point the bitmap is exact.
//! - A shadow-present non-leaf SPTE and the `children` pointer under it name the same
//!   table (a walker that sees them differ is racing a change and retries).
//! - Under the shared lock a non-leaf entry is never replaced directly: it is frozen
//!   ([`TdpMmu::freeze`], which takes its subtree out), and only the thread that froze
//!   it writes it again ([`Frozen::install`]).
//!
//! # Locking
//! - Shared lock (`&TdpMmu`): [`TdpMmu::set_spte_atomic`], [`TdpMmu::freeze`],
//!   [`TdpMmu::link_table_atomic`], [`Frozen::install`]; also correct under the exclusive
//!   lock.
//! - Exclusive lock (`ExclusiveMmu`, from `&mut TdpMmu`): [`ExclusiveMmu::set_spte`],
//!   [`ExclusiveMmu::clear_bits`]. Nobody else writes the tables (vCPUs still set A/D
//!   and the fast path W, which the volatile-bits test covers), and plain reads find the
//!   children of a removed subtree.
//! - No lock: [`TdpMmu::init_spte`] on a table not yet linked anywhere.

use core::ops::Deref;

use super::EpochGuard;
use crossbeam_epoch::{Owned, Shared};

use super::iter::TdpIteration;
use super::page::TdpPage;
use super::{Removed, TdpMmu};
use crate::spte::{bits, Spte, SpteFormat, FROZEN};
use crate::table::TableAllocator;
use crate::types::{Level, SPTE_ENT_PER_PAGE};

/// The TDP MMU under the exclusive MMU lock. Made only by [`TdpMmu::exclusive`], from
/// `&mut TdpMmu`: holding one proves that no shared-lock walker (a fault, aging, a split)
/// runs, so the writes it offers may be plain stores. It derefs to the MMU for the rest
/// (walks, reads, the shared-lock writes). The field is private to this file, so no other
/// code can make one from `&TdpMmu`; copies live no longer than the `&mut` borrow.
pub(crate) struct ExclusiveMmu<'a, A: TableAllocator + 'static>(&'a TdpMmu<A>);

impl<A: TableAllocator + 'static> Clone for ExclusiveMmu<'_, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A: TableAllocator + 'static> Copy for ExclusiveMmu<'_, A> {}

impl<A: TableAllocator + 'static> Deref for ExclusiveMmu<'_, A> {
    type Target = TdpMmu<A>;
    #[inline]
    fn deref(&self) -> &TdpMmu<A> {
        self.0
    }
}

/// Whether `s`, an entry of a table of `level`, points at a child table.
#[inline]
fn is_table(s: Spte, level: Level) -> bool {
    s.is_shadow_present() && !s.is_leaf(level)
}

/// Which lock a write runs under (what the upkeep may assume).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lock {
    Shared,
    Exclusive,
}

/// An entry this thread froze under the shared lock: nobody else writes it until
/// [`install`](Frozen::install) (other threads that read [`FROZEN`] back off).
#[must_use = "a frozen entry must be given its new value"]
pub(crate) struct Frozen<'p> {
    page: &'p TdpPage,
    index: usize,
    /// The value the entry held before it was frozen.
    was: Spte,
    used: bool,
}

impl Frozen<'_> {
    /// Give the frozen entry its new value. A plain store: only the freezer writes a
    /// frozen entry.
    #[inline]
    pub(crate) fn install(self, new: Spte) {
        // A bit cannot be cleared under the shared lock: a frozen entry comes back present.
        debug_assert!(
            new.is_shadow_present(),
            "a frozen entry is given a present value"
        );
        self.page.table().set(self.index, new);
        if self.used && !self.was.is_shadow_present() && new.is_shadow_present() {
            self.page.set_used(self.index);
        }
    }
}

/// How linking a new table went ([`TdpMmu::link_table_atomic`]).
pub(crate) enum Link<'g> {
    /// The entry points at the new table.
    Linked,
    /// Another thread records its own table under the entry: the new table was never
    /// published and is handed back.
    Busy(Shared<'g, TdpPage>),
    /// The entry changed since it was read: the new table was recorded and forgotten
    /// again, so it is in the [`Removed`] (a walker may have seen it).
    Lost,
}

impl<A: TableAllocator + 'static> TdpMmu<A> {
    /// The proof of the exclusive lock that the exclusive writes take.
    #[inline]
    pub(crate) fn exclusive(&mut self) -> ExclusiveMmu<'_, A> {
        ExclusiveMmu(self)
    }

    #[inline]
    fn used_mode(&self) -> bool {
        self.mode == TdpIteration::UsedEntries
    }

    /// Replace `old`, which the caller read in entry `i` of `page`, by `new` with a
    /// compare-exchange (shared lock); whether it won. On a win the upkeep is done (a
    /// replaced table goes into `removed`); on a loss nothing changed.
    #[inline]
    pub(crate) fn set_spte_atomic(
        &self,
        page: &TdpPage,
        i: usize,
        old: Spte,
        new: Spte,
        removed: &mut Removed,
        guard: &EpochGuard,
    ) -> bool {
        debug_assert!(
            !is_table(old, page.level) || new == FROZEN,
            "a table entry is frozen before it changes under the shared lock"
        );
        if page.table().compare_exchange(i, old, new).is_err() {
            return false;
        }
        self.handle_changed(page, i, old, new, Lock::Shared, removed, guard);
        true
    }

    /// Freeze entry `i` of `page`, which held `old` (shared lock): on success its old
    /// subtree, if it pointed at a table, is taken out into `removed`, and the returned
    /// [`Frozen`] is the only way to write the entry again. `None` if the entry changed.
    #[inline]
    pub(crate) fn freeze<'p>(
        &self,
        page: &'p TdpPage,
        i: usize,
        old: Spte,
        removed: &mut Removed,
        guard: &EpochGuard,
    ) -> Option<Frozen<'p>> {
        self.set_spte_atomic(page, i, old, FROZEN, removed, guard)
            .then(|| Frozen {
                page,
                index: i,
                was: old,
                used: self.used_mode(),
            })
    }

    /// Link `child`, a table nobody has seen, under entry `i` of `page` in place of `old`
    /// (shared lock): record it as the entry's child, then point the entry at it.
    pub(crate) fn link_table_atomic<'g>(
        &self,
        page: &TdpPage,
        i: usize,
        old: Spte,
        child: Owned<TdpPage>,
        removed: &mut Removed,
        guard: &'g EpochGuard,
    ) -> Link<'g> {
        let frame = child.frame();
        let child = child.into_shared(guard);
        if !page.claim_child(i, child, guard) {
            return Link::Busy(child);
        }
        if !self.set_spte_atomic(page, i, old, SpteFormat::EPT.nonleaf(frame), removed, guard) {
            page.clear_child(i);
            removed.push(child);
            return Link::Lost;
        }
        Link::Linked
    }

    /// Set entry `i` of `child`, a table not linked anywhere yet (the `&mut` says nobody
    /// else can see it), to `spte`.
    #[inline]
    pub(crate) fn init_spte(&self, child: &mut TdpPage, i: usize, spte: Spte) {
        child.table().set(i, spte);
        if self.used_mode() && spte.is_shadow_present() {
            child.set_used(i);
        }
    }

    /// The upkeep after entry `i` of `page` went from `old` to `new` (KVM's
    /// `handle_changed_spte`). Inlined into every write: on the fault path (an entry
    /// made present) it is a test or two; taking a subtree out is out of line.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn handle_changed(
        &self,
        page: &TdpPage,
        i: usize,
        old: Spte,
        new: Spte,
        lock: Lock,
        removed: &mut Removed,
        guard: &EpochGuard,
    ) {
        if self.used_mode() {
            if !old.is_shadow_present() && new.is_shadow_present() {
                page.set_used(i);
            } else if lock == Lock::Exclusive && !new.is_shadow_present() {
                page.clear_used(i);
            }
        }
        if is_table(old, page.level) && !(is_table(new, page.level) && new.pfn() == old.pfn()) {
            self.remove_subtree(page, i, old, lock, removed, guard);
        }
    }

    /// Entry `i` of `page`, which held the non-leaf `s`, no longer points at its child:
    /// queue the child's subtree for retirement.
    #[inline(never)]
    fn remove_subtree(
        &self,
        page: &TdpPage,
        i: usize,
        s: Spte,
        lock: Lock,
        removed: &mut Removed,
        guard: &EpochGuard,
    ) {
        let child = page.child(i, guard);
        page.clear_child(i);
        // SAFETY: the guard pins the epoch (of the one collector: an `EpochGuard`); the
        // child is retired only through it.
        match unsafe { child.as_ref() } {
            Some(c) if c.frame() == s.pfn() => self.handle_removed(child, lock, removed, guard),
            _ => unreachable!("a non-leaf SPTE without its child page"),
        }
    }

    /// Take out `table`, just unlinked (KVM's `handle_removed_pt`): under the shared
    /// lock freeze every entry, so nothing can be installed in it any more; recurse into
    /// its child tables; queue it for retirement.
    fn handle_removed(
        &self,
        table: Shared<'_, TdpPage>,
        lock: Lock,
        removed: &mut Removed,
        guard: &EpochGuard,
    ) {
        // SAFETY: pinned; retired only through the epoch.
        let t = unsafe { table.deref() };
        let exclusive = lock == Lock::Exclusive;
        if t.level > Level::L4K {
            for j in 0..SPTE_ENT_PER_PAGE {
                let old = if exclusive {
                    t.table().get(j)
                } else {
                    loop {
                        let old = t.table().get(j);
                        if old == FROZEN || t.table().compare_exchange(j, old, FROZEN).is_ok() {
                            break old;
                        }
                    }
                };
                if is_table(old, t.level) {
                    let grand = t.child(j, guard);
                    t.clear_child(j);
                    self.handle_removed(grand, lock, removed, guard);
                }
            }
        } else if !exclusive {
            for j in 0..SPTE_ENT_PER_PAGE {
                while {
                    let old = t.table().get(j);
                    old != FROZEN && t.table().compare_exchange(j, old, FROZEN).is_err()
                } {}
            }
        }
        removed.push(table);
    }
}

impl<A: TableAllocator + 'static> ExclusiveMmu<'_, A> {
    /// Set entry `i` of `page`, which the caller read as `old`, to `new` (exclusive
    /// lock); returns the value replaced (`old`, plus any A/D bit a CPU set since). The
    /// upkeep is done: a replaced table goes into `removed`.
    #[inline]
    pub(crate) fn set_spte(
        self,
        page: &TdpPage,
        i: usize,
        old: Spte,
        new: Spte,
        removed: &mut Removed,
        guard: &EpochGuard,
    ) -> Spte {
        let old = if SpteFormat::EPT.has_volatile_bits(old) {
            page.table().swap(i, new)
        } else {
            page.table().set(i, new);
            old
        };
        self.0
            .handle_changed(page, i, old, new, Lock::Exclusive, removed, guard);
        old
    }

    /// Clear the attribute bits `mask` of the present entry `i` of `page`, read as `old`
    /// (exclusive lock; KVM's `tdp_mmu_clear_spte_bits`). An atomic and-not where a CPU
    /// may set A/D meanwhile, else a plain store. The entry stays present: no upkeep.
    #[inline]
    pub(crate) fn clear_bits(self, page: &TdpPage, i: usize, old: Spte, mask: u64) {
        debug_assert!(
            mask & (bits::MMU_PRESENT | bits::PFN_MASK | bits::LARGE) == 0,
            "clear_bits changes attributes only"
        );
        if SpteFormat::EPT.has_volatile_bits(old) {
            page.table().fetch_and_not(i, mask);
        } else {
            page.table().set(i, old.without_bits(mask));
        }
    }
}
