//! Roots and reclaim under shadow paging (KVM's `mmu_alloc_shadow_roots`,
//! `kvm_mmu_free_roots`, `kvm_mmu_zap_oldest_mmu_pages`).
//!
//! A root is the shadow page of a guest top-level table (per CR3 and role), shared by
//! every vCPU on that CR3 and counted in `root_count`. Zapping a page
//! (`ShadowMmu::prepare_zap`, in `shadow/zap.rs`) unlinks it from every parent and drops
//! its entries; a root still in use is only marked invalid (its entries gone, out of the
//! hash) and freed when its last vCPU lets go of it: vCPUs are asked to reload first.

use crate::error::Error;
use crate::flush::Flush;
use crate::memslot::Memslots;
use crate::page::Role;
use crate::shadow::ShadowMmu;
use crate::table::TableAllocator;
use crate::types::{AccessFlags, Gfn, Pfn};

/// A vCPU's hold on a root: the page, its frame (what the CPU walks from) and what it
/// shadows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootRef {
    /// Shadow page id.
    pub id: u32,
    /// Frame of the root table.
    pub frame: Pfn,
    /// The guest top-level table.
    pub gfn: Gfn,
    /// The root's role.
    pub role: Role,
}

impl<A: TableAllocator> ShadowMmu<A> {
    /// Take a reference on the root for the guest top-level table `gfn` in a context with
    /// CR0.WP `wp` and EFER.NX `nx`, building it if needed. Returns it and the flush owed.
    pub fn get_paging_root(
        &mut self,
        slots: &mut Memslots,
        gfn: Gfn,
        wp: bool,
        nx: bool,
    ) -> Result<(RootRef, Flush), Error> {
        if slots.lookup(gfn).is_none() {
            return Err(Error::GuestMemory { gpa: gfn.gpa() });
        }
        let role = Role::paging(crate::types::Level::ROOT, false, AccessFlags::ALL, wp, nx);
        let (id, _, flush) = self.get_shadow_page(slots, gfn, role)?;
        let sp = self.pages.get_mut(id);
        sp.root_count += 1;
        Ok((
            RootRef {
                id,
                frame: sp.frame,
                gfn,
                role,
            },
            flush,
        ))
    }

    /// Whether `root` is still valid (not zapped while in use).
    pub fn paging_root_valid(&self, root: &RootRef) -> bool {
        self.pages
            .try_get(root.id)
            .is_some_and(|sp| sp.frame == root.frame && !sp.role.is_invalid())
    }

    /// Drop a vCPU's reference on `root`; an invalid root nobody holds goes to the invalid
    /// list (freed after the caller's flush).
    pub fn put_paging_root(&mut self, root: &RootRef) {
        let sp = self.pages.get_mut(root.id);
        debug_assert!(sp.root_count > 0, "root reference underflow");
        sp.root_count -= 1;
        if sp.root_count == 0 && sp.role.is_invalid() {
            self.invalid_list.push(root.id);
        }
    }

    /// Zap every page (KVM's `kvm_mmu_zap_all` under shadow paging). Returns the flush
    /// owed and whether roots in use were invalidated.
    pub(crate) fn zap_all_paging(&mut self, slots: &mut Memslots) -> (Flush, bool) {
        self.zap_oldest(slots, usize::MAX)
    }

    /// Reclaim: zap up to `n` hashed pages, oldest first (counted in the stats). Returns
    /// the flush owed and whether roots in use were invalidated.
    pub(crate) fn reclaim(&mut self, slots: &mut Memslots, n: usize) -> (Flush, bool) {
        let (flush, reload, zapped) = self.zap_oldest_counted(slots, n);
        self.paging_mut().stats.reclaimed_pages += zapped as u64;
        (flush, reload)
    }

    fn zap_oldest(&mut self, slots: &mut Memslots, n: usize) -> (Flush, bool) {
        let (flush, reload, _) = self.zap_oldest_counted(slots, n);
        (flush, reload)
    }

    /// Zap up to `n` hashed pages, oldest first: the flush owed, whether roots in use
    /// were invalidated, and how many pages went.
    fn zap_oldest_counted(&mut self, slots: &mut Memslots, n: usize) -> (Flush, bool, usize) {
        let mut flush = Flush::NONE;
        let mut reload = false;
        let mut zapped = 0;
        for id in self.hashed_pages() {
            if zapped == n {
                break;
            }
            // An earlier zap in this loop may have taken it already.
            if !self.pages.try_get(id).is_some_and(|sp| sp.hashed) {
                continue;
            }
            let (f, r) = self.prepare_zap(slots, id);
            flush |= f;
            reload |= r;
            zapped += 1;
        }
        (flush, reload, zapped)
    }
}
