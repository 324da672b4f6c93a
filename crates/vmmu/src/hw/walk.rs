//! The CPU's EPT walk: from the EPT pointer's root table down to a leaf, checking
//! permissions and setting accessed/dirty bits as the hardware does.
//!
//! The walker follows frame numbers through [`TableAllocator::table_ptr`] the way the
//! CPU follows physical addresses; it takes no lock. A/D updates are compare-exchanges
//! against the value read, so an entry the MMU changed in the meantime is never
//! resurrected: the walk restarts instead (hardware performs the same locked update).

use crate::spte::Spte;
use crate::table::{Table, TableAllocator};
use crate::types::{AccessKind, ErrorCode, Gfn, Gpa, Level, Pfn};

use super::tlb::{Tlb, TlbEntry};

/// Why a walk did not produce a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkExit {
    /// EPT violation: not present, or the access is not allowed. The error code says which
    /// (PRESENT set when a translation existed but forbade the access).
    Violation {
        /// The faulting address.
        gpa: Gpa,
        /// KVM-style error code derived from the exit qualification.
        error_code: ErrorCode,
    },
    /// EPT misconfiguration: the entry is malformed (MMIO SPTEs are made so on purpose).
    Misconfig {
        /// The faulting address.
        gpa: Gpa,
        /// The offending entry.
        spte: Spte,
    },
}

/// Walk the tables rooted at `root` for an access of `kind` to `gpa`. On success, returns
/// the TLB entry describing the leaf (already A/D-updated).
///
/// # Safety
/// The caller is in guest mode: every table reachable from `root` stays allocated until it
/// leaves (the MMU frees tables only after a remote flush, which waits for that).
pub unsafe fn ept_walk<A: TableAllocator + ?Sized>(
    alloc: &A,
    root: Pfn,
    gpa: Gpa,
    kind: AccessKind,
) -> Result<TlbEntry, WalkExit> {
    let gfn = gpa.gfn();
    'restart: loop {
        let mut frame = root;
        let mut level = Level::ROOT;
        // Permissions are the AND over the levels, as EPT defines them.
        let (mut r, mut w, mut x) = (true, true, true);
        loop {
            // SAFETY: guest mode keeps the frame allocated (function contract).
            let table: &Table = unsafe { alloc.table_ptr(frame).as_ref() };
            let i = gfn.index_at(level);
            let spte = table.get(i);
            if spte.is_ept_misconfig() {
                return Err(WalkExit::Misconfig { gpa, spte });
            }
            if !spte.hw_present() {
                return Err(violation(gpa, kind, false));
            }
            r &= spte.is_readable();
            w &= spte.is_writable();
            x &= spte.is_executable();
            if level != Level::L4K && !spte.is_large() {
                frame = spte.pfn();
                level = level.below().expect("non-leaf at 4K");
                continue;
            }
            let allowed = match kind {
                AccessKind::Read => r,
                AccessKind::Write => r && w,
                AccessKind::Fetch => x,
            };
            if !allowed {
                return Err(violation(gpa, kind, r || w || x));
            }
            let mut want = crate::spte::bits::ACCESSED;
            if kind == AccessKind::Write {
                want |= crate::spte::bits::DIRTY;
            }
            let spte = if spte.0 & want != want {
                match table.compare_exchange(i, spte, spte.with_bits(want)) {
                    Ok(_) => spte.with_bits(want),
                    Err(_) => continue 'restart,
                }
            } else {
                spte
            };
            return Ok(Tlb::entry(spte.pfn(), level, r && w, x, spte.is_dirty()));
        }
    }
}

#[inline]
fn violation(gpa: Gpa, kind: AccessKind, present: bool) -> WalkExit {
    let mut ec = ErrorCode::for_access(kind);
    if present {
        ec = ec | ErrorCode::PRESENT;
    }
    WalkExit::Violation {
        gpa,
        error_code: ec,
    }
}

/// The pfn backing `gfn` under a leaf entry.
#[inline]
pub fn leaf_pfn(e: &TlbEntry, gfn: Gfn) -> Pfn {
    Pfn(e.pfn.0 + (gfn.0 & (e.level.pages() - 1)))
}
