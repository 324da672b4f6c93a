//! The shadow-paging fault path (KVM's `FNAME(page_fault)` and `FNAME(fetch)`).
//!
//! guest walk (rights, guest A/D) -> memslot and host page -> from the vCPU's root, one
//! shadow page per guest table (found by gfn and role, or created and write-protected) ->
//! below a guest huge page that cannot be mapped huge, direct pages -> the leaf, with the
//! guest's rights, read-only while the guest entry is clean, and never writable over a
//! guest page table that is in sync (the write is emulated, or the table goes unsync).

use crate::error::Error;
use crate::flush::Flush;
use crate::guest::{walk_addr, GuestMemory, PagingState};
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::mmu::{plan_map, DirtyGfn, FaultOutcome, MapDecision};
use crate::rmap::SpteRef;
use crate::shadow::ShadowMmu;
use crate::spte::{LeafAttrs, Spte};
use crate::table::TableAllocator;
use crate::types::{AccessFlags, AccessKind, ErrorCode, Gfn, Gpa, Gva, Level};

/// Longest reverse map a fault lets a gfn have (KVM's `RMAP_RECYCLE_THRESHOLD`).
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;

/// The result of a shadow-paging fault.
#[derive(Debug)]
pub struct PagingFault {
    /// What happened.
    pub outcome: FaultOutcome,
    /// The guest-physical address the guest's tables translate the gva to (`None` when
    /// they forbid the access): where an exit to the VMM or an emulated write goes.
    pub gpa: Option<Gpa>,
    /// The flush owed.
    pub flush: Flush,
    /// A page to log as dirty.
    pub dirty: Option<DirtyGfn>,
}

/// A guest-virtual access that faulted, as the vCPU made it.
#[derive(Clone, Copy, Debug)]
pub struct GvaFault<'a> {
    /// The root page the vCPU runs on.
    pub root: u32,
    /// The vCPU's paging registers.
    pub paging: &'a PagingState,
    /// The faulting address.
    pub gva: Gva,
    /// The access.
    pub kind: AccessKind,
}

impl<A: TableAllocator> ShadowMmu<A> {
    /// Handle `fault`, taken by a vCPU on shadow tables over the guest's tables in
    /// `guest`.
    pub fn paging_fault<H: HostMemory + ?Sized>(
        &mut self,
        slots: &mut Memslots,
        host: &H,
        guest: &dyn GuestMemory,
        fault: GvaFault<'_>,
    ) -> Result<PagingFault, Error> {
        let GvaFault {
            root,
            paging,
            gva,
            kind,
        } = fault;
        self.stats.faults += 1;
        let mut flush = Flush::NONE;
        let mut gpa = None;
        let done = |outcome, gpa, flush| {
            Ok(PagingFault {
                outcome,
                gpa,
                flush,
                dirty: None,
            })
        };
        let walk = match walk_addr(guest, paging, gva, kind)? {
            Ok(w) => w,
            Err(ec) => {
                self.paging_mut().stats.guest_faults += 1;
                return done(FaultOutcome::GuestFault(ec), gpa, flush);
            }
        };
        let write = kind == AccessKind::Write;
        let user = paging.user();
        let gfn = walk.gfn;
        let at = Gpa(gfn.gpa().0 | gva.page_offset());
        gpa = Some(at);
        // Every guest table on the way must lie in a memslot: its shadow page protects it.
        // One that does not is a table the guest's walk could not read (KVM reads them
        // through the memslots): a page fault for the guest, as `walk_addr_generic`
        // reports it.
        for l in walk.level as usize..=4 {
            if slots.lookup(walk.table_gfns[l - 1]).is_none() {
                self.paging_mut().stats.guest_faults += 1;
                let ec = crate::guest::walk::fault_code(ErrorCode::empty(), kind, paging);
                return done(FaultOutcome::GuestFault(ec), None, flush);
            }
        }
        // The memslot, the host page and the checks every MMU makes (see `mmu::fault`),
        // at most at the guest's own mapping level.
        let max_level = walk.level.min(self.max_level);
        let plan = match plan_map(slots, host, at, write, max_level, &self.invalidation)? {
            MapDecision::Mmio => return done(FaultOutcome::Mmio, gpa, flush),
            MapDecision::Exit(outcome) => return done(outcome, gpa, flush),
            MapDecision::Map(plan) => plan,
        };
        // CR0.WP=0: a supervisor write through a read-only guest page is allowed; the
        // SPTE is made writable but not user-accessible, so a user access faults and
        // rebuilds it (KVM's trick for !cr0_wp).
        let mut access = walk.access;
        if write && !paging.cr0_wp && !user && !access.contains(AccessFlags::WRITE) {
            access = access.union(AccessFlags::WRITE).without(AccessFlags::USER);
        }
        let level = plan.level;

        // Down from the root: one shadow page per guest table above the guest leaf, then
        // direct pages under a guest huge page mapped smaller.
        let mut id = root;
        let mut cur = Level::ROOT;
        while cur > level {
            let below = cur.below().expect("above the leaf level");
            let i = gva.index_at(cur);
            let (child_gfn, direct, child_access) = if cur > walk.level {
                (
                    walk.table_gfns[below as usize - 1],
                    false,
                    walk.pt_access[cur as usize - 1],
                )
            } else {
                // A direct page covers this entry's span: its first gfn is aligned to it.
                (gfn.align_down(cur), true, access)
            };
            let role = self.pages.get(id).role.child(below, direct, child_access);
            let spte = self.pages.get(id).table().get(i);
            if spte.is_shadow_present() && !spte.is_large() {
                let c = self.pages.get(id).child(i);
                let csp = self.pages.get(c);
                if csp.role == role && csp.gfn == child_gfn {
                    self.pages.get_mut(c).write_flooding_count = 0;
                    id = c;
                    cur = below;
                    continue;
                }
            }
            // A huge leaf in the way, or a link the guest repointed (or whose rights
            // changed): drop it; an unlinked page stays hashed for whoever still uses it.
            if self.zap_spte(slots, id, i).0 {
                flush.set();
            }
            let (child, created, f) = self.get_shadow_page(slots, child_gfn, role)?;
            flush |= f;
            if !created && self.pages.get(child).unsync_children != 0 {
                // A subtree with unsync pages, linked again (its old root was zapped, or
                // another process's tables share it): no sync point covered it while it
                // was out of every root. Sync under the root before the vCPU runs again
                // (KVM's KVM_REQ_MMU_SYNC from its lookup).
                self.paging_mut().sync_needed = true;
            }
            if !created && self.pages.get(child).unsync {
                // Found unlinked and unsync: no sync point covered it while it was out of
                // every root, so bring its entries in line before linking (it stays
                // unsync; KVM syncs such a page in its lookup).
                flush |= self.refresh_unsync(slots, guest, child)?;
            }
            self.link_child(id, i, child);
            let csp = self.pages.get(child);
            if csp.unsync || csp.unsync_children != 0 {
                self.mark_unsync(id, i);
            }
            if created && !direct {
                // The table was not protected when the walk read it: a guest write since
                // then would be missed. Check the entry that led here (KVM's
                // `gpte_changed`).
                let at = Gpa(walk.table_gfns[cur as usize - 1].gpa().0 + i as u64 * 8);
                if guest.read_u64(at)? != walk.ptes[cur as usize - 1] {
                    return done(FaultOutcome::Spurious, gpa, flush);
                }
            }
            self.pages.get_mut(child).write_flooding_count = 0;
            id = child;
            cur = below;
        }

        // The leaf.
        let base = gfn.align_down(level);
        // A clean guest entry maps read-only, so the write that dirties it faults and
        // sets D (KVM's `protect_clean_gpte`).
        if !walk.dirty() {
            access = access.without(AccessFlags::WRITE);
        }
        let mut mmu_writable =
            access.contains(AccessFlags::WRITE) && plan.slot_writable && plan.host_writable;
        let mut protected = None;
        if mmu_writable && level == Level::L4K {
            // Read again, not from the plan: the walk down may have just shadowed this
            // very page as a guest table, and tracked it.
            let tracked = slots.lookup(gfn).is_some_and(|s| s.is_write_tracked(gfn));
            let shadowed = self.shadows_guest_table(gfn);
            if tracked || (shadowed && !self.paging_mut().cfg.unsync) {
                mmu_writable = false;
                protected = Some(if shadowed {
                    FaultOutcome::Emulate
                } else {
                    FaultOutcome::WriteTracked
                });
            } else if shadowed {
                self.unsync_gfn(gfn);
            }
        }
        let writable = plan.writable(mmu_writable);
        let new = self.format.leaf(
            plan.pfn,
            level,
            LeafAttrs {
                writable,
                executable: access.contains(AccessFlags::EXEC),
                host_writable: plan.host_writable,
                mmu_writable,
                accessed: true,
                dirty: write && writable,
                ..LeafAttrs::DEFAULT
            },
            access.contains(AccessFlags::USER),
        );
        let i = gva.index_at(level);
        let old = self.pages.get(id).table().get(i);
        let same = |s: Spte| {
            let ignore = self.format.accessed_dirty();
            s.0 & !ignore == new.0 & !ignore
        };
        let outcome_mapped = protected
            .filter(|_| write)
            .unwrap_or(FaultOutcome::Mapped(level));
        if old.is_leaf(level) && same(old) && self.pages.get(id).gfn_at(i) == base {
            self.stats.spurious_faults += 1;
            let outcome = protected
                .filter(|_| write)
                .unwrap_or(FaultOutcome::Spurious);
            return done(outcome, gpa, flush);
        }
        // A table where a huge leaf now fits, or a leaf that changed.
        if self.zap_spte(slots, id, i).0 {
            flush.set();
        }
        let sp = self.pages.get_mut(id);
        sp.spte_set(i, new);
        if sp.has_translations() {
            sp.set_gfn_at(i, base);
        }
        let slot = slots.lookup_mut(gfn).expect("slot found above");
        slot.rmap_add(base, level, SpteRef::new(id, i), &mut self.pool);
        self.stats.leaves_installed += 1;
        if crate::rmap::count(slot.rmap_head(base, level), &self.pool) > RMAP_RECYCLE_THRESHOLD {
            // One page mapped from too many places (a page shared by a thousand
            // processes): drop every mapping of it, the new one included, rather than let
            // the list grow (KVM's RMAP_RECYCLE_THRESHOLD). The access refaults.
            flush |= self.zap_gfn_range_levels(slots, base, Gfn(base.0 + 1), level);
            return done(FaultOutcome::Spurious, gpa, flush);
        }
        Ok(PagingFault {
            outcome: outcome_mapped,
            gpa,
            flush,
            dirty: plan.dirty(writable),
        })
    }
}
