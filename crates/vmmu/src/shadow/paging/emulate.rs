//! Writes to write-protected guest page tables (KVM's `kvm_mmu_track_write`): the write
//! faulted, the MMU performs it in guest memory, then drops the shadow entry it changed
//! in every page shadowing that table; the next access refaults it from the new guest
//! entry. A table written again and again without a fault using its shadow page in
//! between is probably no longer a page table (write flooding): its shadow page is
//! zapped, which ends the write protection.

use crate::error::Error;
use crate::flush::Flush;
use crate::guest::GuestMemory;
use crate::memslot::Memslots;
use crate::shadow::ShadowMmu;
use crate::table::TableAllocator;
use crate::types::{Gpa, Level};

/// Emulated writes, with no fault using the page in between, after which a page is
/// zapped (KVM's threshold).
const FLOODING_THRESHOLD: u8 = 3;

impl<A: TableAllocator> ShadowMmu<A> {
    /// Emulate the guest's 8-byte write of `val` at `gpa` (8-byte aligned), a guest page
    /// table. Returns the flush owed and whether a root in use was zapped (vCPUs must
    /// reload).
    pub fn emulate_pte_write(
        &mut self,
        slots: &mut Memslots,
        guest: &dyn GuestMemory,
        gpa: Gpa,
        val: u64,
    ) -> Result<(Flush, bool), Error> {
        guest.write_u64(gpa, val)?;
        self.paging_mut().stats.emulated_writes += 1;
        let (gfn, i) = (gpa.gfn(), (gpa.page_offset() / 8) as usize);
        let mut flush = Flush::NONE;
        let mut reload = false;
        let unsync_allowed = self.paging_mut().cfg.unsync;
        for id in self.pages_of_gfn(gfn) {
            let Some(sp) = self.pages.try_get(id) else {
                continue;
            };
            if sp.role.is_direct() || !sp.hashed {
                continue;
            }
            let level = sp.role.level();
            // A last-level table that may go unsync is not a flooding candidate (KVM);
            // without unsync every level is.
            if level > Level::L4K || !unsync_allowed {
                let sp = self.pages.get_mut(id);
                sp.write_flooding_count = sp.write_flooding_count.saturating_add(1);
                if sp.write_flooding_count >= FLOODING_THRESHOLD {
                    let (f, r) = self.prepare_zap(slots, id);
                    flush |= f;
                    reload |= r;
                    self.paging_mut().stats.flooded_pages += 1;
                    continue;
                }
            }
            // An unlinked child stays hashed, for whoever still links it.
            if self.zap_spte(slots, id, i).0 {
                flush.set();
            }
        }
        Ok((flush, reload))
    }
}
