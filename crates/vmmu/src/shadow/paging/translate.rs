//! The CPU's walk of shadow tables in legacy format, by guest-virtual address, as
//! hardware runs shadow paging (CR0.WP and EFER.NX forced on: the shadow entries carry
//! the guest's rights already): P at every level, RW/US/NX combined, A set on the leaf
//! and D on a write by compare-exchange.
//!
//! Runs under the shared MMU lock (and in guest mode): besides the frame it reads the
//! gfn the leaf maps from the shadow page, which the simulation needs to reach guest
//! memory (hardware would only produce the host address).

use crate::hw::{Tlb, TlbEntry};
use crate::shadow::ShadowMmu;
use crate::table::TableAllocator;
use crate::types::{AccessKind, ErrorCode, Gfn, Gva, Level};

impl<A: TableAllocator> ShadowMmu<A> {
    /// Walk the shadow tables of `root` for an access of `kind` to `gva` (`user` at CPL
    /// 3). On success, the TLB entry of the leaf (gfn included); else the hardware
    /// page-fault error code.
    pub fn translate(
        &self,
        root: u32,
        gva: Gva,
        kind: AccessKind,
        user: bool,
    ) -> Result<TlbEntry, ErrorCode> {
        'walk: loop {
            let mut id = root;
            let mut level = Level::ROOT;
            let (mut w, mut u, mut x) = (true, true, true);
            loop {
                let sp = self.pages.get(id);
                let i = gva.index_at(level);
                let spte = sp.table().get(i);
                let mut ec = ErrorCode::for_access(kind);
                if user {
                    ec = ec | ErrorCode::USER;
                }
                if !self.format.hw_present(spte) {
                    return Err(ec);
                }
                w &= spte.is_writable();
                u &= self.format.is_user(spte);
                x &= self.format.is_executable(spte);
                if level != Level::L4K && !spte.is_large() {
                    id = sp.child(i);
                    level = level.below().expect("above 4K");
                    continue;
                }
                let allowed = (!user || u)
                    && match kind {
                        AccessKind::Read => true,
                        AccessKind::Write => w,
                        AccessKind::Fetch => x,
                    };
                if !allowed {
                    return Err(ec | ErrorCode::PRESENT);
                }
                let mut want = self.format.accessed();
                if kind == AccessKind::Write {
                    want |= self.format.dirty();
                }
                let spte = if spte.0 & want != want {
                    match sp.table().compare_exchange(i, spte, spte.with_bits(want)) {
                        Ok(_) => spte.with_bits(want),
                        Err(_) => continue 'walk,
                    }
                } else {
                    spte
                };
                let mut e = Tlb::entry(spte.pfn(), level, w, x, self.format.is_dirty(spte));
                e.user = u;
                e.gfn = Gfn(sp.gfn_at(i).0);
                return Ok(e);
            }
        }
    }
}
