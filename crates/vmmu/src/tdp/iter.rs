//! The TDP MMU's one iterator (KVM's `tdp_iter`): a pre-order walk of the entries that map
//! `[start, end)`, down to `min_level`, stepping down, to the side and up. Every TDP
//! operation over a range is a loop body over it; none walks the tables itself.
//!
//! # Modes (seed 002)
//! - [`TdpIteration::ScanAll`]: visit every entry (KVM today).
//! - [`TdpIteration::SkipNonPresent`]: step over non-present entries inside the iterator
//!   (the seed's patch, and the only-present iterator of its review): they are still read,
//!   but not yielded.
//! - [`TdpIteration::UsedEntries`]: jump from set bit to set bit of each table's
//!   used-entries bitmap, never reading a non-present entry (the seed author's suggestion).
//!
//! # Yielding
//! A walk holds the MMU lock and an epoch guard. After `budget` steps the iterator stops
//! and reports where to resume ([`TdpIter::resume`]); the caller drops the lock and the
//! guard, takes them again and starts a new walk there. The resume point is past every
//! entry already yielded, so repeated yields still make progress.
//!
//! # Counters
//! `loops` counts the positions yielded (the seed's "loops"); `reads` counts SPTE reads.

use super::EpochGuard;

use super::page::TdpPage;
use crate::spte::Spte;
use crate::types::{Gfn, Level, SPTE_ENT_PER_PAGE};

/// How the iterator moves over a table (seed 002).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum TdpIteration {
    /// Visit every entry.
    #[default]
    ScanAll,
    /// Read every entry, yield only the present ones.
    SkipNonPresent,
    /// Read and yield only the entries the used-entries bitmap marks.
    UsedEntries,
}

/// The iterator. `spte` is the value read at the current position.
pub struct TdpIter<'g> {
    path: [Option<&'g TdpPage>; 5],
    root_level: Level,
    min_level: Level,
    level: Level,
    index: usize,
    gfn: Gfn,
    next_last_level_gfn: Gfn,
    end: Gfn,
    mode: TdpIteration,
    valid: bool,
    budget: u64,
    start: Gfn,
    resume: Option<Gfn>,
    guard: &'g EpochGuard,
    /// The entry at the current position, as last read.
    pub spte: Spte,
    /// Positions yielded.
    pub loops: u64,
    /// SPTEs read.
    pub reads: u64,
}

impl<'g> TdpIter<'g> {
    /// A walk of `[start, end)` under `root`, down to `min_level`, yielding at most
    /// `budget` positions before it stops with a resume point.
    pub fn new(
        root: &'g TdpPage,
        min_level: Level,
        start: Gfn,
        end: Gfn,
        mode: TdpIteration,
        budget: u64,
        guard: &'g EpochGuard,
    ) -> Self {
        let mut path = [None; 5];
        path[root.level as usize] = Some(root);
        let mut it = TdpIter {
            path,
            root_level: root.level,
            min_level,
            level: root.level,
            index: 0,
            gfn: start,
            next_last_level_gfn: start,
            end,
            mode,
            valid: start < end,
            budget,
            start,
            resume: None,
            guard,
            spte: Spte::NONE,
            loops: 0,
            reads: 0,
        };
        if it.valid {
            it.land(start.index_at(root.level));
            if !it.landed_ok() {
                it.advance_side_or_up();
            }
            it.count();
        }
        it
    }

    /// Whether the iterator is at an entry of the range.
    #[inline]
    pub fn valid(&self) -> bool {
        self.valid
    }
    /// Level of the current entry's table.
    #[inline]
    pub fn level(&self) -> Level {
        self.level
    }
    /// Index of the current entry in its table.
    #[inline]
    pub fn index(&self) -> usize {
        self.index
    }
    /// First gfn the current entry maps.
    #[inline]
    pub fn gfn(&self) -> Gfn {
        self.gfn
    }
    /// The page holding the current entry.
    #[inline]
    pub fn page(&self) -> &'g TdpPage {
        self.path[self.level as usize].expect("iterator path")
    }
    /// Where to start the next walk if this one stopped for yielding.
    pub fn resume(&self) -> Option<Gfn> {
        self.resume
    }
    /// The epoch guard the walk holds.
    pub fn guard(&self) -> &'g EpochGuard {
        self.guard
    }

    /// The table the current entry links to, if it is a present non-leaf entry whose
    /// child is still the one recorded (a concurrent split or collapse may have changed
    /// the entry under the walk: then `None`, and the entry is skipped).
    #[inline]
    pub fn child_table(&self) -> Option<&'g TdpPage> {
        if !self.spte.is_shadow_present() || self.spte.is_leaf(self.level) {
            return None;
        }
        let child = self.page().child(self.index, self.guard);
        // SAFETY: the guard pins the epoch of the collector pages are retired through
        // (an `EpochGuard` comes only from `pin`).
        let child = unsafe { child.as_ref() }?;
        (child.frame() == self.spte.pfn()).then_some(child)
    }

    /// Read the current entry again (after a failed compare-exchange).
    #[inline]
    pub fn reread(&mut self) -> Spte {
        self.spte = self.page().table().get(self.index);
        self.reads += 1;
        self.spte
    }

    /// Move to the next position.
    #[inline]
    pub fn next(&mut self) {
        if !self.valid {
            return;
        }
        if self.loops >= self.budget {
            // Resume at the current entry if the walk would step into it (its subtree is
            // not visited yet), else just past it. Stop only if that is past where this
            // walk started, so repeated yields still make progress.
            let descends = self.level > self.min_level
                && self.spte.is_shadow_present()
                && !self.spte.is_leaf(self.level);
            let resume = if descends {
                self.gfn
            } else {
                Gfn(self.gfn.0 + self.level.pages())
            };
            if resume > self.start {
                self.valid = false;
                self.resume = Some(resume);
                return;
            }
        }
        // (The level test is the common "at the bottom" case, kept inline.)
        if self.level > self.min_level && self.try_step_down() && self.landed_ok() {
            self.count();
            return;
        }
        self.advance_side_or_up();
        self.count();
    }

    #[inline]
    fn count(&mut self) {
        if self.valid && self.gfn >= self.end {
            self.valid = false;
        }
        if self.valid {
            self.loops += 1;
        }
    }

    #[inline]
    fn advance_side_or_up(&mut self) {
        loop {
            if self.try_step_side() {
                return;
            }
            if !self.try_step_up() {
                self.valid = false;
                return;
            }
        }
    }

    #[inline]
    fn land(&mut self, index: usize) {
        self.index = index;
        let page = self.page();
        self.gfn = page.gfn_at(index);
        self.spte = page.table().get(index);
        self.reads += 1;
    }

    /// In the only-present modes, an entry reached by stepping down may be non-present:
    /// move to the next present one of the same table, if any.
    #[inline]
    fn landed_ok(&mut self) -> bool {
        match self.mode {
            TdpIteration::ScanAll => true,
            _ if self.spte.is_shadow_present() => true,
            _ => self.try_step_side(),
        }
    }

    #[inline(never)]
    fn try_step_down(&mut self) -> bool {
        if self.level <= self.min_level
            || !self.spte.is_shadow_present()
            || self.spte.is_leaf(self.level)
        {
            return false;
        }
        let Some(child) = self.child_table() else {
            return false;
        };
        self.level = child.level;
        self.path[self.level as usize] = Some(child);
        let idx = self.next_last_level_gfn.max(child.gfn).index_at(self.level);
        let idx = if self.next_last_level_gfn < child.gfn {
            0
        } else {
            idx
        };
        match self.mode {
            TdpIteration::UsedEntries if !child.is_used(idx) => match child.next_used(idx) {
                Some(j) => self.land(j),
                None => {
                    // Nothing marked here: come back up to the parent entry.
                    self.level = self.level.above().expect("child below parent");
                    self.spte = self.page().table().get(self.index);
                    return false;
                }
            },
            _ => self.land(idx),
        }
        true
    }

    #[inline]
    fn try_step_side(&mut self) -> bool {
        loop {
            if self.index == SPTE_ENT_PER_PAGE - 1 {
                return false;
            }
            match self.mode {
                TdpIteration::UsedEntries => match self.page().next_used(self.index + 1) {
                    Some(j) => self.land(j),
                    None => return false,
                },
                _ => self.land(self.index + 1),
            }
            self.next_last_level_gfn = self.gfn;
            if self.mode != TdpIteration::SkipNonPresent || self.spte.is_shadow_present() {
                return true;
            }
        }
    }

    #[inline(never)]
    fn try_step_up(&mut self) -> bool {
        if self.level == self.root_level {
            return false;
        }
        self.level = self.level.above().expect("below root");
        self.index = self.gfn.index_at(self.level);
        self.gfn = self.page().gfn_at(self.index);
        self.spte = self.page().table().get(self.index);
        self.reads += 1;
        true
    }
}

/// What a loop body tells [`TdpMmu::walk`](super::TdpMmu::walk).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Step {
    /// Go on to the next position.
    Next,
    /// Read the entry again and run the body on it again (a compare-exchange lost).
    Retry,
    /// End the walk.
    Stop,
}

/// How a walk ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Walked {
    /// Where to start again, if the walk stopped to yield.
    pub resume: Option<Gfn>,
    /// Whether a body ended the walk with [`Step::Stop`].
    pub stopped: bool,
    /// Positions yielded.
    pub loops: u64,
    /// SPTEs read.
    pub reads: u64,
}

impl<A: crate::table::TableAllocator + 'static> super::TdpMmu<A> {
    /// The one loop over the iterator: run `body` at every position of a walk of
    /// `[start, end)` down to `min_level` under `root`, yielding after `budget`
    /// positions. Every TDP operation over a range is a body given to this.
    ///
    /// Always inlined, so each operation gets the loop with its body and the iterator's
    /// step inlined together (left to the inliner, whether it does depends on how the
    /// caller's crate splits into codegen units).
    #[inline(always)]
    pub fn walk_root<'g>(
        &self,
        root: &'g TdpPage,
        range: core::ops::Range<Gfn>,
        min_level: Level,
        budget: u64,
        guard: &'g EpochGuard,
        mut body: impl FnMut(&mut TdpIter<'g>) -> Step,
    ) -> Walked {
        let mut it = TdpIter::new(
            root,
            min_level,
            range.start,
            range.end,
            self.mode(),
            budget,
            guard,
        );
        let mut stopped = false;
        while it.valid() {
            match body(&mut it) {
                Step::Next => it.next(),
                Step::Retry => {
                    it.reread();
                }
                Step::Stop => {
                    stopped = true;
                    break;
                }
            }
        }
        Walked {
            resume: it.resume(),
            stopped,
            loops: it.loops,
            reads: it.reads,
        }
    }

    /// [`walk_root`](Self::walk_root) under every root (only the valid one with
    /// `valid_only`), resuming where the earliest walk stopped and ending at the first
    /// [`Step::Stop`].
    pub fn walk<'g>(
        &self,
        range: core::ops::Range<Gfn>,
        min_level: Level,
        budget: u64,
        valid_only: bool,
        guard: &'g EpochGuard,
        mut body: impl FnMut(&mut TdpIter<'g>) -> Step,
    ) -> Walked {
        let mut all = Walked::default();
        for (root, valid) in self.roots(guard) {
            if valid_only && !valid {
                continue;
            }
            let w = self.walk_root(root, range.clone(), min_level, budget, guard, &mut body);
            all.resume = super::earliest(all.resume, w.resume);
            all.loops += w.loops;
            all.reads += w.reads;
            if w.stopped {
                all.stopped = true;
                break;
            }
        }
        all
    }
}
