//! Unsync and resync (KVM's `mmu_try_to_unsync_pages`, `mmu_sync_children`,
//! `kvm_sync_page`, `FNAME(invlpg)`).
//!
//! A fault that maps a last-level guest table writable makes every shadow page of that
//! table unsync instead of emulating each write: the guest then writes the table directly,
//! and the shadow entries may lag behind until the guest flushes its TLB, which it must
//! do after changing an entry anyway. At that point (CR3 load, INVLPG, a full flush) the
//! unsync pages under the vCPU's root are write-protected again, every vCPU's TLB is
//! flushed, and each of their entries is checked against the guest's: an entry granting
//! more than the guest entry now allows, or mapping another gfn, is dropped.

use alloc::vec::Vec;

use crate::error::Error;
use crate::flush::Flush;
use crate::guest::walk::{is_rsvd, pte_access};
use crate::guest::{pte, GuestMemory};
use crate::memslot::Memslots;
use crate::shadow::ShadowMmu;
use crate::spte::Spte;
use crate::table::TableAllocator;
use crate::types::{AccessFlags, Gfn, Gpa, Gva, Level, PAGE_SHIFT, SPTE_ENT_PER_PAGE};

impl<A: TableAllocator> ShadowMmu<A> {
    /// Make every sync shadow page of the last-level guest table `gfn` unsync.
    pub(crate) fn unsync_gfn(&mut self, gfn: Gfn) {
        for id in self.pages_of_gfn(gfn) {
            let sp = self.pages.get(id);
            if sp.role.is_direct() || sp.unsync {
                continue;
            }
            debug_assert_eq!(
                sp.role.level(),
                Level::L4K,
                "only last-level pages go unsync"
            );
            self.pages.get_mut(id).unsync = true;
            self.paging_mut().stats.unsynced_pages += 1;
            self.mark_parents_unsync(id);
        }
    }

    /// The unsync pages reachable from `root`, following the unsync-child marks.
    pub(crate) fn unsync_pages_under(&self, root: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut stack = alloc::vec![root];
        while let Some(id) = stack.pop() {
            let sp = self.pages.get(id);
            if sp.unsync {
                out.push(id);
            }
            if sp.unsync_children == 0 {
                continue;
            }
            for (w, &bits) in sp.unsync_child_bitmap.iter().enumerate() {
                let mut b = bits;
                while b != 0 {
                    let i = w * 64 + b.trailing_zeros() as usize;
                    b &= b - 1;
                    stack.push(sp.child(i));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// First half of a sync: write-protect the gfns of `pages` again (the caller then
    /// flushes every vCPU's TLB, so no guest write can slip past the sync's reads).
    pub(crate) fn protect_for_sync(&mut self, slots: &Memslots, pages: &[u32]) -> Flush {
        let mut flush = Flush::NONE;
        for &id in pages {
            let gfn = self.pages.get(id).gfn;
            flush |= self.rmap_write_protect(slots, gfn, Level::L4K, true);
        }
        flush
    }

    /// Second half: bring each unsync page of `pages` in line with its guest table and
    /// mark it sync (KVM's `kvm_sync_page`).
    pub(crate) fn sync_pages(
        &mut self,
        slots: &mut Memslots,
        guest: &dyn GuestMemory,
        pages: &[u32],
    ) -> Result<Flush, Error> {
        let mut flush = Flush::NONE;
        for &id in pages {
            let Some(sp) = self.pages.try_get(id) else {
                continue;
            };
            if !sp.unsync {
                continue;
            }
            flush |= self.refresh_unsync(slots, guest, id)?;
            self.pages.get_mut(id).unsync = false;
            self.paging_mut().stats.synced_pages += 1;
            self.clear_parents_unsync(id);
        }
        Ok(flush)
    }

    /// Drop every entry of the unsync page `id` that no longer agrees with its guest
    /// entry, leaving the page unsync.
    pub(crate) fn refresh_unsync(
        &mut self,
        slots: &mut Memslots,
        guest: &dyn GuestMemory,
        id: u32,
    ) -> Result<Flush, Error> {
        let mut flush = Flush::NONE;
        for i in 0..SPTE_ENT_PER_PAGE {
            flush |= self.sync_entry(slots, guest, id, i)?;
        }
        Ok(flush)
    }

    /// Check entry `i` of the indirect last-level page `id` against its guest entry; drop
    /// it unless the guest entry still maps the same gfn with at least its rights (KVM's
    /// `FNAME(sync_spte)`, in its conservative form: drop rather than rebuild).
    fn sync_entry(
        &mut self,
        slots: &mut Memslots,
        guest: &dyn GuestMemory,
        id: u32,
        i: usize,
    ) -> Result<Flush, Error> {
        let sp = self.pages.get(id);
        let spte = sp.table().get(i);
        if spte.is_mmio() {
            self.pages.get_mut(id).spte_clear(i);
            return Ok(Flush::NONE);
        }
        if !spte.is_shadow_present() {
            return Ok(Flush::NONE);
        }
        let gpte = guest.read_u64(Gpa(sp.gfn.gpa().0 + i as u64 * 8))?;
        if !spte_allowed_by(spte, gpte, sp.gfn_at(i), sp.role) {
            self.drop_leaf(slots, id, i, Level::L4K);
            return Ok(Flush::new(true));
        }
        Ok(Flush::NONE)
    }

    /// INVLPG: sync the shadow entry that maps `gva` under `root` if its page is unsync.
    pub(crate) fn invlpg_sync(
        &mut self,
        slots: &mut Memslots,
        guest: &dyn GuestMemory,
        root: u32,
        gva: Gva,
    ) -> Result<Flush, Error> {
        let mut id = root;
        let mut level = Level::ROOT;
        loop {
            let sp = self.pages.get(id);
            let i = gva.index_at(level);
            let spte = sp.table().get(i);
            if level == Level::L4K {
                if sp.unsync {
                    return self.sync_entry(slots, guest, id, i);
                }
                return Ok(Flush::NONE);
            }
            if !spte.is_shadow_present() || spte.is_large() {
                return Ok(Flush::NONE);
            }
            id = sp.child(i);
            level = level.below().expect("above 4K");
        }
    }
}

/// Whether the shadow leaf `spte`, built for `gfn` in a page of `role`, grants no more
/// than the guest entry `gpte` does now (in the page's context), maps the same gfn, and
/// the guest entry is still accessed (and dirty, if the SPTE may be written).
pub(crate) fn spte_allowed_by(spte: Spte, gpte: u64, gfn: Gfn, role: crate::page::Role) -> bool {
    // A guest entry whose A bit the guest cleared must fault again, so the walk sets A
    // again (KVM's sync drops entries the guest has not accessed).
    if gpte & pte::P == 0 || gpte & pte::A == 0 || is_rsvd(gpte, Level::L4K, role.efer_nx()) {
        return false;
    }
    if Gfn((gpte & pte::ADDR_MASK) >> PAGE_SHIFT) != gfn {
        return false;
    }
    let access = role.access().intersect(pte_access(gpte, role.efer_nx()));
    let format = role.format();
    let user = format.is_user(spte);
    if user && !access.contains(AccessFlags::USER) {
        return false;
    }
    if format.is_executable(spte) && !access.contains(AccessFlags::EXEC) {
        return false;
    }
    if spte.is_writable() || spte.is_mmu_writable() {
        let guest_w = access.contains(AccessFlags::WRITE);
        // CR0.WP=0: a supervisor-only writable SPTE stands for supervisor writes.
        let wp_trick = !role.cr0_wp() && !user;
        if gpte & pte::D == 0 || !(guest_w || wp_trick) {
            return false;
        }
    }
    true
}
