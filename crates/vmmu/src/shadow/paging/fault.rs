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
use crate::mmu::DirtyGfn;
use crate::rmap::SpteRef;
use crate::shadow::ShadowMmu;
use crate::spte::{LeafAttrs, Spte};
use crate::table::TableAllocator;
use crate::types::{AccessFlags, AccessKind, ErrorCode, Gfn, Gpa, Gva, Level, Pfn};

/// Longest reverse map a fault lets a gfn have (KVM's `RMAP_RECYCLE_THRESHOLD`).
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;

/// What a shadow-paging fault did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PagingOutcome {
    /// A leaf was installed at this level; retry the access.
    Mapped(Level),
    /// The mapping was already there; retry.
    Spurious,
    /// The guest's tables forbid the access: inject #PF with this error code.
    GuestFault(ErrorCode),
    /// The gva maps a gpa outside every memslot: MMIO, for the VMM.
    Mmio(Gpa),
    /// A write to a READONLY memslot: for the VMM.
    ReadOnlyWrite(Gpa),
    /// A write to a page a VMM tracks (not a shadowed guest table): for the VMM.
    WriteTracked(Gpa),
    /// A write to a write-protected guest page table: the MMU emulates it.
    Emulate(Gpa),
    /// The host is invalidating the page; retry once it is done.
    Retry,
}

/// The result of a shadow-paging fault.
#[derive(Debug)]
pub struct PagingFault {
    /// What happened.
    pub outcome: PagingOutcome,
    /// The flush owed.
    pub flush: Flush,
    /// A page to log as dirty.
    pub dirty: Option<DirtyGfn>,
}

impl<A: TableAllocator> ShadowMmu<A> {
    /// Handle a fault on `gva` for an access of `kind` by a vCPU in `paging` context on the
    /// root page `root`.
    #[allow(clippy::too_many_arguments)]
    pub fn paging_fault<H: HostMemory + ?Sized>(
        &mut self,
        slots: &mut Memslots,
        host: &H,
        guest: &dyn GuestMemory,
        root: u32,
        paging: &PagingState,
        gva: Gva,
        kind: AccessKind,
    ) -> Result<PagingFault, Error> {
        self.stats.faults += 1;
        let mut flush = Flush::NONE;
        let done = |outcome, flush| {
            Ok(PagingFault {
                outcome,
                flush,
                dirty: None,
            })
        };
        let walk = match walk_addr(guest, paging, gva, kind)? {
            Ok(w) => w,
            Err(ec) => {
                self.paging_mut().stats.guest_faults += 1;
                return done(PagingOutcome::GuestFault(ec), flush);
            }
        };
        let write = kind == AccessKind::Write;
        let user = paging.user();
        let gfn = walk.gfn;
        let gpa = Gpa(gfn.gpa().0 | gva.page_offset());
        // Every guest table on the way must lie in a memslot: its shadow page protects it.
        for l in walk.level as usize..=4 {
            let t = walk.table_gfns[l - 1];
            if slots.lookup(t).is_none() {
                return Err(Error::GuestMemory { gpa: t.gpa() });
            }
        }
        let Some(slot) = slots.lookup(gfn) else {
            return done(PagingOutcome::Mmio(gpa), flush);
        };
        if write && slot.is_readonly() {
            return done(PagingOutcome::ReadOnlyWrite(gpa), flush);
        }
        let hva = slot.gfn_to_hva(gfn);
        if self.invalidation.covers(hva) {
            return done(PagingOutcome::Retry, flush);
        }
        let host_page = host
            .translate(hva)
            .ok_or(Error::NoHostMapping { gpa, hva })?;
        if write && !host_page.writable {
            return Err(Error::HostReadOnly { gpa, hva });
        }
        // CR0.WP=0: a supervisor write through a read-only guest page is allowed; the
        // SPTE is made writable but not user-accessible, so a user access faults and
        // rebuilds it (KVM's trick for !cr0_wp).
        let mut access = walk.access;
        if write && !paging.cr0_wp && !user && !access.contains(AccessFlags::WRITE) {
            access = access.union(AccessFlags::WRITE).without(AccessFlags::USER);
        }
        let max = walk
            .level
            .min(self.max_level)
            .min(host_page.level)
            .min(Level::L1G);
        let level = slot.max_mapping_level(gfn, max);
        let (logging, readonly, slot_id, slot_base) = (
            slot.is_logging(),
            slot.is_readonly(),
            slot.id,
            slot.base_gfn,
        );

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
                    return done(PagingOutcome::Spurious, flush);
                }
            }
            self.pages.get_mut(child).write_flooding_count = 0;
            id = child;
            cur = below;
        }

        // The leaf.
        let base = gfn.align_down(level);
        let pfn = Pfn(host_page.pfn.0 & !(level.pages() - 1));
        // A clean guest entry maps read-only, so the write that dirties it faults and
        // sets D (KVM's `protect_clean_gpte`).
        if !walk.dirty() {
            access = access.without(AccessFlags::WRITE);
        }
        let mut mmu_writable =
            access.contains(AccessFlags::WRITE) && !readonly && host_page.writable;
        let mut protected = None;
        if mmu_writable && level == Level::L4K {
            let tracked = slots.lookup(gfn).is_some_and(|s| s.is_write_tracked(gfn));
            let shadowed = self.shadows_guest_table(gfn);
            if tracked || (shadowed && !self.paging_mut().cfg.unsync) {
                mmu_writable = false;
                protected = Some(if shadowed {
                    PagingOutcome::Emulate(gpa)
                } else {
                    PagingOutcome::WriteTracked(gpa)
                });
            } else if shadowed {
                self.unsync_gfn(gfn);
            }
        }
        let writable = mmu_writable && (write || !logging);
        let new = self.format.leaf(
            pfn,
            level,
            LeafAttrs {
                writable,
                executable: access.contains(AccessFlags::EXEC),
                host_writable: host_page.writable,
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
            .unwrap_or(PagingOutcome::Mapped(level));
        if old.is_leaf(level) && same(old) && self.pages.get(id).gfn_at(i) == base {
            self.stats.spurious_faults += 1;
            let outcome = protected
                .filter(|_| write)
                .unwrap_or(PagingOutcome::Spurious);
            return done(outcome, flush);
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
            return done(PagingOutcome::Spurious, flush);
        }
        let dirty = (write && writable && logging).then(|| DirtyGfn {
            slot: slot_id,
            offset: gfn.0 - slot_base.0,
        });
        Ok(PagingFault {
            outcome: outcome_mapped,
            flush,
            dirty,
        })
    }
}
