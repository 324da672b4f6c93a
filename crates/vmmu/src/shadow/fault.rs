//! The direct-map fault path (KVM's `direct_page_fault` / `direct_map`).
//!
//! memslot lookup -> host page lookup (pfn, mapping level) -> pick the level -> walk down
//! from the root creating tables -> install the leaf -> reverse-map add.
//!
//! A gfn outside every memslot gets an MMIO SPTE tagged with the memslot generation, so
//! the next access is recognised from the SPTE alone (an EPT misconfiguration) until a
//! memslot update changes the generation.

use crate::error::Error;
use crate::flush::Flush;
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::mmu::{plan_fault, DirtyGfn, FaultOutcome, FaultPlan};
use crate::page::Role;
use crate::rmap::SpteRef;
use crate::spte::Spte;
use crate::table::TableAllocator;
use crate::types::{ErrorCode, Gfn, Gpa, Level};

use super::ShadowMmu;

/// The result of a fault.
#[derive(Debug)]
pub struct Fault {
    /// What happened.
    pub outcome: FaultOutcome,
    /// A flush owed (a mapping was replaced).
    pub flush: Flush,
    /// A page to log as dirty.
    pub dirty: Option<DirtyGfn>,
}

impl Fault {
    fn new(outcome: FaultOutcome, flush: Flush) -> Self {
        Fault {
            outcome,
            flush,
            dirty: None,
        }
    }
}

impl<A: TableAllocator> ShadowMmu<A> {
    /// Handle a fault at `gpa` with error code `ec`, in direct mode.
    ///
    /// Returns the outcome and whether a flush is owed (when a mapping was replaced: a huge
    /// page split into a table, or a table replaced by a huge page). On `Err`, nothing the
    /// guest can see has changed (intermediate tables may have been created).
    pub fn direct_page_fault<H: HostMemory + ?Sized>(
        &mut self,
        slots: &mut Memslots,
        host: &H,
        gpa: Gpa,
        ec: ErrorCode,
    ) -> Result<Fault, Error> {
        self.stats.faults += 1;
        let gfn = gpa.gfn();
        let write = ec.contains(ErrorCode::WRITE);
        let mut flush = Flush::NONE;
        let (slot_idx, level, new, dirty) =
            match plan_fault(slots, host, gpa, ec, self.max_level, &self.invalidation)? {
                FaultPlan::Exit(outcome) => return Ok(Fault::new(outcome, flush)),
                FaultPlan::Mmio(mmio) => {
                    let id = self.walk_to(slots, gfn, Level::L4K, &mut flush)?;
                    let i = gfn.index_at(Level::L4K);
                    let sp = self.pages.get_mut(id);
                    let old = sp.table().get(i);
                    if old.is_mmio() {
                        sp.spte_update(i, mmio);
                    } else {
                        debug_assert!(
                            old == Spte::NONE,
                            "non-MMIO SPTE for a gfn outside every slot"
                        );
                        sp.spte_set(i, mmio);
                    }
                    self.stats.mmio_faults += 1;
                    return Ok(Fault::new(FaultOutcome::Mmio, flush));
                }
                FaultPlan::Map {
                    slot,
                    level,
                    spte,
                    dirty,
                } => (slot, level, spte, dirty),
            };
        let base_gfn = gfn.align_down(level);
        let pfn = new.pfn();

        let id = self.walk_to(slots, gfn, level, &mut flush)?;
        let i = gfn.index_at(level);
        let old = self.pages.get(id).table().get(i);
        if old.is_shadow_present() {
            if !old.is_leaf(level) {
                // A table where a huge page now fits: zap the subtree, map huge.
                let child = self.unlink_child(id, i);
                self.zap_page(slots, child);
                flush.set();
            } else if old.pfn() == pfn {
                if !write || old.is_writable() {
                    self.stats.spurious_faults += 1;
                    return Ok(Fault::new(FaultOutcome::Spurious, flush));
                }
                // A write to a present read-only leaf: rebuild it from the fresh host
                // answer (the host may have made the page writable since), as KVM's slow
                // path does.
                self.pages.get_mut(id).spte_update(i, new);
                return Ok(Fault {
                    outcome: FaultOutcome::Mapped(level),
                    flush,
                    dirty,
                });
            } else {
                // The host moved the page under us without an invalidation: replace it.
                self.drop_leaf(slots, id, i, level);
                flush.set();
            }
        } else if old.is_mmio() {
            self.pages.get_mut(id).spte_clear(i);
        }
        self.pages.get_mut(id).spte_set(i, new);
        slots
            .at_mut(slot_idx)
            .rmap_add(base_gfn, level, SpteRef::new(id, i), &mut self.pool);
        self.stats.leaves_installed += 1;
        Ok(Fault {
            outcome: FaultOutcome::Mapped(level),
            flush,
            dirty,
        })
    }

    /// Walk from the root to the table of `level` that maps `gfn`, creating missing tables
    /// and dropping huge leaves in the way (KVM's `for_each_shadow_entry` with
    /// `kvm_mmu_get_child_sp`). This is the shadow MMU's one walker toward an address.
    /// Returns the id of the table at `level`.
    pub(crate) fn walk_to(
        &mut self,
        slots: &mut Memslots,
        gfn: Gfn,
        level: Level,
        flush: &mut Flush,
    ) -> Result<u32, Error> {
        let mut id = self.root;
        let mut cur = Level::ROOT;
        while cur > level {
            let i = gfn.index_at(cur);
            let sp = self.pages.get(id);
            let spte = sp.table().get(i);
            if spte.is_shadow_present() {
                if !spte.is_large() {
                    id = sp.child(i);
                    cur = cur.below().expect("above target level");
                    continue;
                }
                // A huge page in the way of a smaller mapping (dirty logging started, or
                // a disallow count appeared): drop it and build a table.
                self.drop_leaf(slots, id, i, cur);
                flush.set();
            } else if spte.is_mmio() {
                self.pages.get_mut(id).spte_clear(i);
            }
            let below = cur.below().expect("above target level");
            let child = self
                .pages
                .create(&self.alloc, Role::direct(below), gfn.align_down(cur), 0)
                .ok_or(Error::OutOfTableMemory)?;
            self.link_child(id, i, child);
            id = child;
            cur = below;
        }
        Ok(id)
    }
}
