//! The MMU's walk of the guest's own 4-level tables (KVM's `FNAME(walk_addr_generic)`
//! and `permission_fault`): read each entry, check reserved bits, accumulate the rights,
//! check the access against them, and only then set the guest's A/D bits with
//! compare-exchange (restarting the walk if an entry changed under it).
//!
//! The result records every table and entry on the way: the fault path builds one shadow
//! page per guest table and needs their gfns and rights.

use super::{pte, GuestMemory, PagingState};
use crate::error::Error;
use crate::types::{AccessFlags, AccessKind, ErrorCode, Gfn, Gpa, Gva, Level, PAGE_SHIFT};

/// A successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestWalk {
    /// The 4 KiB guest frame the address translates to.
    pub gfn: Gfn,
    /// Level of the guest's leaf: 4K, 2M (PS in a PDE) or 1G (PS in a PDPTE).
    pub level: Level,
    /// Rights of the whole walk: W if every level has RW, USER if every level has US,
    /// EXEC unless some level has NX (with EFER.NX).
    pub access: AccessFlags,
    /// `pt_access[l - 1]`: the rights accumulated from the top down to and including the
    /// entry at level `l` (KVM's `pt_access`): a shadow page for the table that entry
    /// points at is created with these rights in its role.
    pub pt_access: [AccessFlags; 4],
    /// `table_gfns[l - 1]`: the gfn of the guest table at level `l` (index 3 is CR3's).
    /// Meaningful from the top down to the leaf level.
    pub table_gfns: [Gfn; 4],
    /// `ptes[l - 1]`: the entry read at level `l`, with the A/D bits the walk set.
    pub ptes: [u64; 4],
}

impl GuestWalk {
    /// The guest leaf entry.
    #[inline]
    pub fn leaf_pte(&self) -> u64 {
        self.ptes[self.level as usize - 1]
    }
    /// Whether the guest leaf is dirty (after the walk).
    #[inline]
    pub fn dirty(&self) -> bool {
        self.leaf_pte() & pte::D != 0
    }
    /// The first gfn of the guest's leaf page.
    #[inline]
    pub fn leaf_base_gfn(&self) -> Gfn {
        self.gfn.align_down(self.level)
    }
}

/// The rights one guest entry grants.
#[inline]
pub fn pte_access(gpte: u64, efer_nx: bool) -> AccessFlags {
    let mut a = AccessFlags::NONE;
    if gpte & pte::RW != 0 {
        a = a.union(AccessFlags::WRITE);
    }
    if gpte & pte::US != 0 {
        a = a.union(AccessFlags::USER);
    }
    if !efer_nx || gpte & pte::NX == 0 {
        a = a.union(AccessFlags::EXEC);
    }
    a
}

/// Whether a present guest entry at `level` has a reserved bit set (so the walk reports a
/// reserved-bit fault): NX without EFER.NX, PS in a PML4E, and the bits between PAT and
/// the page size in a huge leaf. MAXPHYADDR is 52, so no address bit is reserved.
#[inline]
pub fn is_rsvd(gpte: u64, level: Level, efer_nx: bool) -> bool {
    if !efer_nx && gpte & pte::NX != 0 {
        return true;
    }
    let ps = gpte & pte::PS != 0;
    match level {
        Level::L512G => ps,
        Level::L1G | Level::L2M if ps => {
            // Bits 13 ..= (page shift - 1) of the frame are reserved in a huge leaf.
            let mask = ((1u64 << (PAGE_SHIFT + level.gfn_shift())) - 1) & !((1 << 13) - 1);
            gpte & mask != 0
        }
        _ => false,
    }
}

/// Whether an access of `kind` by a user (`user`) is forbidden by `access`, as
/// `permission_fault` decides it (CR0.WP lets supervisor writes through read-only pages
/// when clear; SMEP/SMAP are not modelled).
#[inline]
pub fn permission_fault(access: AccessFlags, kind: AccessKind, user: bool, cr0_wp: bool) -> bool {
    (user && !access.contains(AccessFlags::USER))
        || (kind == AccessKind::Write && !access.contains(AccessFlags::WRITE) && (user || cr0_wp))
        || (kind == AccessKind::Fetch && !access.contains(AccessFlags::EXEC))
}

/// The error code of a guest page fault for an access of `kind`, with `extra` (PRESENT,
/// RSVD) added: W for writes, U at CPL 3, I/D for fetches only with EFER.NX (as x86
/// reports it).
#[inline]
pub fn fault_code(extra: ErrorCode, kind: AccessKind, paging: &PagingState) -> ErrorCode {
    let mut ec = extra;
    if kind == AccessKind::Write {
        ec = ec | ErrorCode::WRITE;
    }
    if paging.user() {
        ec = ec | ErrorCode::USER;
    }
    if kind == AccessKind::Fetch && paging.efer_nx {
        ec = ec | ErrorCode::FETCH;
    }
    ec
}

/// Walk the guest's tables for an access of `kind` to `gva` (canonical) in `paging`'s
/// context. `Ok(Ok(walk))` when the guest allows it (A set on every entry walked, D on
/// the leaf of a write), `Ok(Err(error_code))` for a guest page fault (nothing changed),
/// a table outside guest memory included (KVM's `walk_addr_generic` reports a fault with
/// the access's error code when it cannot read a table). `Err` for any other error of
/// the guest memory.
pub fn walk_addr(
    mem: &dyn GuestMemory,
    paging: &PagingState,
    gva: Gva,
    kind: AccessKind,
) -> Result<Result<GuestWalk, ErrorCode>, Error> {
    'retry: loop {
        let mut w = GuestWalk {
            gfn: Gfn(0),
            level: Level::L4K,
            access: AccessFlags::ALL,
            pt_access: [AccessFlags::ALL; 4],
            table_gfns: [Gfn(0); 4],
            ptes: [0; 4],
        };
        let mut table = paging.root_gfn();
        let mut level = Level::ROOT;
        loop {
            let l = level as usize - 1;
            w.table_gfns[l] = table;
            let gpa = Gpa(table.gpa().0 + gva.index_at(level) as u64 * 8);
            let gpte = match mem.read_u64(gpa) {
                Ok(v) => v,
                Err(Error::GuestMemory { .. }) => {
                    return Ok(Err(fault_code(ErrorCode::empty(), kind, paging)))
                }
                Err(e) => return Err(e),
            };
            w.ptes[l] = gpte;
            if gpte & pte::P == 0 {
                return Ok(Err(fault_code(ErrorCode::empty(), kind, paging)));
            }
            if is_rsvd(gpte, level, paging.efer_nx) {
                return Ok(Err(fault_code(
                    ErrorCode::PRESENT | ErrorCode::RSVD,
                    kind,
                    paging,
                )));
            }
            w.access = w.access.intersect(pte_access(gpte, paging.efer_nx));
            w.pt_access[l] = w.access;
            let frame = Gfn((gpte & pte::ADDR_MASK) >> PAGE_SHIFT);
            if level == Level::L4K || gpte & pte::PS != 0 {
                w.level = level;
                let base = frame.align_down(level);
                w.gfn = Gfn(base.0 + ((gva.vpn()) & (level.pages() - 1)));
                break;
            }
            table = frame;
            level = level.below().expect("above 4K");
        }
        if permission_fault(w.access, kind, paging.user(), paging.cr0_wp) {
            return Ok(Err(fault_code(ErrorCode::PRESENT, kind, paging)));
        }
        // A on every entry, D on the leaf of a write: compare-exchange against what was
        // read, as the CPU's locked update does; a changed entry means walking again.
        let mut level = Level::ROOT;
        loop {
            let l = level as usize - 1;
            let old = w.ptes[l];
            let mut new = old | pte::A;
            if level == w.level && kind == AccessKind::Write {
                new |= pte::D;
            }
            if new != old {
                let gpa = Gpa(w.table_gfns[l].gpa().0 + gva.index_at(level) as u64 * 8);
                if mem.cmpxchg_u64(gpa, old, new)?.is_err() {
                    continue 'retry;
                }
                w.ptes[l] = new;
            }
            if level == w.level {
                break;
            }
            level = level.below().expect("above the leaf");
        }
        return Ok(Ok(w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::SimGuestMemory;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    fn tables(leaf: u64, pde_extra: u64) -> SimGuestMemory {
        let m = SimGuestMemory::new(1 << 30);
        let gva = Gva(0x40_2000_3000);
        let put =
            |t: u64, l: Level, v: u64| m.write_u64(Gpa(t + gva.index_at(l) as u64 * 8), v).unwrap();
        let up = pte::P | pte::RW | pte::US;
        put(PML4, Level::L512G, PDPT | up);
        put(PDPT, Level::L1G, PD | up);
        put(PD, Level::L2M, PT | up | pde_extra);
        put(PT, Level::L4K, leaf);
        m
    }

    fn state(cpl: u8) -> PagingState {
        PagingState {
            cr3: Gpa(PML4),
            cpl,
            ..PagingState::default()
        }
    }

    #[test]
    fn walks_4k_and_sets_a_d() {
        let m = tables(0x9000 | pte::P | pte::RW | pte::US, 0);
        let gva = Gva(0x40_2000_3abc);
        let w = walk_addr(&m, &state(3), gva, AccessKind::Write)
            .unwrap()
            .unwrap();
        assert_eq!(w.gfn, Gfn(9));
        assert_eq!(w.level, Level::L4K);
        assert_eq!(w.access, AccessFlags::ALL);
        assert!(w.dirty());
        assert_eq!(w.table_gfns, [Gfn(4), Gfn(3), Gfn(2), Gfn(1)]);
        let leaf = m
            .read_u64(Gpa(PT + gva.index_at(Level::L4K) as u64 * 8))
            .unwrap();
        assert_eq!(leaf & (pte::A | pte::D), pte::A | pte::D);
        let pde = m
            .read_u64(Gpa(PD + gva.index_at(Level::L2M) as u64 * 8))
            .unwrap();
        assert_eq!(pde & (pte::A | pte::D), pte::A, "D only on the leaf");
    }

    #[test]
    fn faults_change_nothing_and_carry_the_right_code() {
        let m = tables(0x9000 | pte::P | pte::US, 0);
        let gva = Gva(0x40_2000_3000);
        let ec = walk_addr(&m, &state(3), gva, AccessKind::Write)
            .unwrap()
            .unwrap_err();
        assert_eq!(ec, ErrorCode::PRESENT | ErrorCode::WRITE | ErrorCode::USER);
        let leaf = m
            .read_u64(Gpa(PT + gva.index_at(Level::L4K) as u64 * 8))
            .unwrap();
        assert_eq!(leaf & pte::A, 0, "no A bit on a fault");
        // Supervisor write with CR0.WP=0 goes through.
        let mut s = state(0);
        s.cr0_wp = false;
        assert!(walk_addr(&m, &s, gva, AccessKind::Write).unwrap().is_ok());
        // Not present.
        let m = tables(0, 0);
        let ec = walk_addr(&m, &state(0), gva, AccessKind::Fetch)
            .unwrap()
            .unwrap_err();
        assert_eq!(ec, ErrorCode::FETCH);
        // NX with EFER.NX off is reserved; I/D is not reported then.
        let m = tables(0x9000 | pte::P | pte::NX, 0);
        let mut s = state(0);
        s.efer_nx = false;
        let ec = walk_addr(&m, &s, gva, AccessKind::Fetch)
            .unwrap()
            .unwrap_err();
        assert_eq!(ec, ErrorCode::PRESENT | ErrorCode::RSVD);
        // NX with EFER.NX on forbids fetches.
        let ec = walk_addr(&m, &state(0), gva, AccessKind::Fetch)
            .unwrap()
            .unwrap_err();
        assert_eq!(ec, ErrorCode::PRESENT | ErrorCode::FETCH);
    }

    #[test]
    fn huge_pages_and_their_reserved_bits() {
        // A 2M leaf in the PD: PDE frame 0x4000 is not 2M-aligned -> reserved bits.
        let m = tables(0, pte::PS);
        let gva = Gva(0x40_2000_3000);
        let ec = walk_addr(&m, &state(0), gva, AccessKind::Read)
            .unwrap()
            .unwrap_err();
        assert_eq!(ec, ErrorCode::PRESENT | ErrorCode::RSVD);
        let m = SimGuestMemory::new(1 << 30);
        let put =
            |t: u64, l: Level, v: u64| m.write_u64(Gpa(t + gva.index_at(l) as u64 * 8), v).unwrap();
        put(PML4, Level::L512G, PDPT | pte::P | pte::RW);
        put(PDPT, Level::L1G, PD | pte::P | pte::RW);
        put(PD, Level::L2M, 0x60_0000 | pte::P | pte::PS);
        let w = walk_addr(&m, &state(0), gva, AccessKind::Read)
            .unwrap()
            .unwrap();
        assert_eq!(w.level, Level::L2M);
        assert_eq!(w.gfn, Gfn(0x600 + 3));
        assert!(!w.access.contains(AccessFlags::WRITE));
        // PS in a PML4E is reserved.
        put(PML4, Level::L512G, PDPT | pte::P | pte::PS);
        let ec = walk_addr(&m, &state(0), gva, AccessKind::Read)
            .unwrap()
            .unwrap_err();
        assert_eq!(ec, ErrorCode::PRESENT | ErrorCode::RSVD);
    }
}
