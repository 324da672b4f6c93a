//! The CPU's EPT walk: from the EPT pointer's root table down to a leaf, checking
//! permissions and setting accessed/dirty bits as the hardware does.
//!
//! The walker follows frame numbers through [`TableAllocator::table_ptr`] the way the
//! CPU follows physical addresses; it takes no lock. A/D updates are compare-exchanges
//! against the value read, so an entry the MMU changed in the meantime is never
//! resurrected: the walk restarts instead (hardware performs the same locked update).

use crate::spte::{Spte, SpteFormat};
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
        /// The permissions of the translation the walk found, ANDed over the levels
        /// (bit 0 readable, bit 1 writable, bit 2 executable: the exit qualification's
        /// bits 3 to 5); 0 when an entry on the way was not present.
        rwx: u8,
    },
    /// EPT misconfiguration: the entry is malformed (MMIO SPTEs are made so on purpose).
    Misconfig {
        /// The faulting address.
        gpa: Gpa,
        /// The offending entry.
        spte: Spte,
    },
    /// The fault was fixed without the MMU lock (the fast path); retry the access.
    Retry,
}

/// Where a lockless walk stopped: the last entry it read, its table and level, and the
/// permissions accumulated down to it.
pub struct WalkPoint<'a> {
    /// The table holding the entry.
    pub table: &'a Table,
    /// Index of the entry.
    pub index: usize,
    /// Level of the table.
    pub level: Level,
    /// The entry as read.
    pub spte: Spte,
    /// Readable, writable, executable: the AND over the levels walked, this one included.
    pub rwx: (bool, bool, bool),
}

/// Walk from the table at `root` toward `gfn`, without a lock, and stop at the first entry
/// that is a leaf, not present to the hardware, or misconfigured (KVM's
/// `for_each_shadow_entry_lockless`; the CPU's walk is the same loop). The one walker of
/// the tables for lockless users: the CPU model and the fast page fault.
///
/// # Safety
/// The caller is in guest mode on a vCPU of the VM whose MMU allocated `root` from
/// `alloc` (so that VM's remote flushes wait for it): every table reachable from `root`
/// stays allocated until it leaves (the MMU frees tables only after a remote flush, which
/// waits for that). `vm::Vm` makes sure of the VM by its vCPU check (`vm::vcpu`).
#[inline]
pub unsafe fn lockless_walk<A: TableAllocator + ?Sized>(
    alloc: &A,
    root: Pfn,
    gfn: Gfn,
) -> WalkPoint<'_> {
    let mut frame = root;
    let mut level = Level::ROOT;
    // The hardware's view: the raw R/W/X bits ANDed over the levels (it knows nothing of
    // the software bits).
    let mut rwx = crate::spte::bits::RWX_MASK;
    loop {
        // SAFETY: guest mode keeps the frame allocated (function contract).
        let table: &Table = unsafe { alloc.table_ptr(frame).as_ref() };
        let index = gfn.index_at(level);
        let spte = table.get(index);
        rwx &= spte.0;
        if SpteFormat::EPT.is_misconfig(spte)
            || !SpteFormat::EPT.hw_present(spte)
            || level == Level::L4K
            || spte.is_large()
        {
            use crate::spte::bits::{EXECUTABLE, READABLE, WRITABLE};
            return WalkPoint {
                table,
                index,
                level,
                spte,
                rwx: (
                    rwx & READABLE != 0,
                    rwx & WRITABLE != 0,
                    rwx & EXECUTABLE != 0,
                ),
            };
        }
        frame = spte.pfn();
        level = level.below().expect("non-leaf at 4K");
    }
}

/// Walk the tables rooted at `root` for an access of `kind` to `gpa`, as the CPU does. On
/// success, returns the TLB entry describing the leaf (already A/D-updated).
///
/// # Safety
/// As [`lockless_walk`].
#[inline]
pub unsafe fn ept_walk<A: TableAllocator + ?Sized>(
    alloc: &A,
    root: Pfn,
    gpa: Gpa,
    kind: AccessKind,
) -> Result<TlbEntry, WalkExit> {
    loop {
        // SAFETY: forwarded contract.
        let p = unsafe { lockless_walk(alloc, root, gpa.gfn()) };
        if SpteFormat::EPT.is_misconfig(p.spte) {
            return Err(WalkExit::Misconfig { gpa, spte: p.spte });
        }
        if !SpteFormat::EPT.hw_present(p.spte) {
            return Err(violation(gpa, kind, 0));
        }
        let (r, w, x) = p.rwx;
        let allowed = match kind {
            AccessKind::Read => r,
            AccessKind::Write => r && w,
            AccessKind::Fetch => x,
        };
        if !allowed {
            return Err(violation(gpa, kind, r as u8 | (w as u8) << 1 | (x as u8) << 2));
        }
        let mut want = SpteFormat::EPT.accessed();
        if kind == AccessKind::Write {
            want |= SpteFormat::EPT.dirty();
        }
        let spte = if p.spte.0 & want != want {
            // The CPU's locked A/D update: against the value read, or walk again.
            match p
                .table
                .compare_exchange(p.index, p.spte, p.spte.with_bits(want))
            {
                Ok(_) => p.spte.with_bits(want),
                Err(_) => continue,
            }
        } else {
            p.spte
        };
        return Ok(Tlb::entry(
            spte.pfn(),
            p.level,
            r && w,
            x,
            SpteFormat::EPT.is_dirty(spte),
        ));
    }
}

/// KVM's `fast_page_fault`: a write hit a present 4K leaf that is write-protected only for
/// dirty logging (MMU-writable and host-writable kept); make it writable with one
/// compare-exchange, without the MMU lock. Returns whether the access can be retried
/// (fixed here, or already writable). The caller logs the page as dirty.
///
/// Membership in a page's possibly-writable set (seed 001) does not change, so no
/// metadata needs the lock.
///
/// # Safety
/// As [`lockless_walk`].
#[inline]
pub unsafe fn fast_page_fault<A: TableAllocator + ?Sized>(alloc: &A, root: Pfn, gpa: Gpa) -> bool {
    loop {
        // SAFETY: forwarded contract.
        let p = unsafe { lockless_walk(alloc, root, gpa.gfn()) };
        let s = p.spte;
        if p.level != Level::L4K || !s.is_shadow_present() || !s.can_be_made_writable_locklessly() {
            return false;
        }
        if s.is_writable() {
            return true;
        }
        if p.table
            .compare_exchange(p.index, s, s.with_bits(crate::spte::bits::WRITABLE))
            .is_ok()
        {
            return true;
        }
    }
}

#[inline]
fn violation(gpa: Gpa, kind: AccessKind, rwx: u8) -> WalkExit {
    let mut ec = ErrorCode::for_access(kind);
    if rwx != 0 {
        ec = ec.union(ErrorCode::PRESENT);
    }
    WalkExit::Violation {
        gpa,
        error_code: ec,
        rwx,
    }
}

/// The pfn backing `gfn` under a leaf entry.
#[inline]
pub fn leaf_pfn(e: &TlbEntry, gfn: Gfn) -> Pfn {
    Pfn(e.pfn.0 + (gfn.0 & (e.level.pages() - 1)))
}
