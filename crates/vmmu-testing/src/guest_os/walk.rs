//! The reference translation: a side-effect-free walk of the guest's 4-level tables, read
//! straight from guest memory (Intel SDM vol. 3, 4.5 and 4.6: permissions are the AND of
//! R/W and U/S over the levels and the OR of NX; CR0.WP makes supervisor writes honour
//! R/W; a PS bit in a PML4E is reserved).
//!
//! It never asks the MMU anything: it is what the checks compare the MMU's translations
//! with. It sets no accessed or dirty bit (the CPU model does that on real accesses).

use vmmu::guest::{pte, GuestMemory, PagingState};
use vmmu::types::{AccessKind, ErrorCode, Gpa, Gva, Level};

use super::layout::{entry_gpa, index};

/// What a successful walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address reached (with the page offset).
    pub gpa: Gpa,
    /// The leaf's level (4 KiB, 2 MiB or 1 GiB).
    pub level: Level,
    /// The guest-physical address of the leaf entry.
    pub leaf: Gpa,
    /// The leaf entry.
    pub entry: u64,
}

/// Why a walk failed: the page-fault error code the CPU would report, or a guest memory
/// read outside RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// #PF with this error code.
    Fault(ErrorCode),
    /// A table lies outside guest memory.
    BadTable(Gpa),
}

/// Translates `gva` for an access of `kind` under `paging` (CR3, CR0.WP, EFER.NX, CPL).
pub fn translate(
    mem: &dyn GuestMemory,
    paging: &PagingState,
    gva: Gva,
    kind: AccessKind,
) -> Result<Translation, WalkError> {
    let user = paging.user();
    let mut ec = ErrorCode::for_access(kind);
    if user {
        ec = ec.union(ErrorCode::USER);
    }
    if kind == AccessKind::Fetch && !paging.efer_nx {
        // Without NX a fetch faults like a read (the I/D bit is not reported).
        ec = if user {
            ErrorCode::USER
        } else {
            ErrorCode::empty()
        };
    }
    if !gva.is_canonical() {
        // A #GP on hardware; reported here as a not-present fault.
        return Err(WalkError::Fault(ec));
    }
    let mut table = Gpa(paging.cr3.0 & pte::ADDR_MASK);
    let (mut writable, mut usr, mut nx) = (true, true, false);
    let mut level = Level::L512G;
    loop {
        let at = entry_gpa(table, index(gva.0, level));
        let e = mem.read_u64(at).map_err(|_| WalkError::BadTable(at))?;
        if e & pte::P == 0 {
            return Err(WalkError::Fault(ec));
        }
        let rsvd =
            (level == Level::L512G && e & pte::PS != 0) || (!paging.efer_nx && e & pte::NX != 0);
        if rsvd {
            return Err(WalkError::Fault(
                ec.union(ErrorCode::PRESENT).union(ErrorCode::RSVD),
            ));
        }
        writable &= e & pte::RW != 0;
        usr &= e & pte::US != 0;
        nx |= paging.efer_nx && e & pte::NX != 0;
        let leaf = level == Level::L4K || (e & pte::PS != 0);
        if leaf {
            let allowed = match kind {
                AccessKind::Read => !user || usr,
                AccessKind::Write => (!user || usr) && (writable || (!user && !paging.cr0_wp)),
                AccessKind::Fetch => (!user || usr) && !nx,
            };
            if !allowed {
                return Err(WalkError::Fault(ec.union(ErrorCode::PRESENT)));
            }
            let size = level.bytes();
            let base = e & pte::ADDR_MASK & !(size - 1);
            return Ok(Translation {
                gpa: Gpa(base | (gva.0 & (size - 1))),
                level,
                leaf: at,
                entry: e,
            });
        }
        table = Gpa(e & pte::ADDR_MASK);
        level = level.below().expect("level 1 entries are leaves");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmu::guest::SimGuestMemory;

    const T: u64 = pte::P | pte::RW | pte::US | pte::A;

    /// PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; gva 0x40_1000 -> 0x9000.
    fn tables(mem: &SimGuestMemory, leaf: u64) {
        let gva = 0x40_1000u64;
        mem.write_u64(entry_gpa(Gpa(0x1000), index(gva, Level::L512G)), 0x2000 | T)
            .unwrap();
        mem.write_u64(entry_gpa(Gpa(0x2000), index(gva, Level::L1G)), 0x3000 | T)
            .unwrap();
        mem.write_u64(entry_gpa(Gpa(0x3000), index(gva, Level::L2M)), 0x4000 | T)
            .unwrap();
        mem.write_u64(
            entry_gpa(Gpa(0x4000), index(gva, Level::L4K)),
            0x9000 | leaf,
        )
        .unwrap();
    }

    fn state(cpl: u8) -> PagingState {
        PagingState {
            cr3: Gpa(0x1000),
            cpl,
            ..PagingState::default()
        }
    }

    #[test]
    fn user_rw_page() {
        let mem = SimGuestMemory::new(0x10000);
        tables(&mem, pte::P | pte::RW | pte::US | pte::NX);
        let t = translate(&mem, &state(3), Gva(0x40_1008), AccessKind::Write).unwrap();
        assert_eq!(t.gpa, Gpa(0x9008));
        assert_eq!(t.level, Level::L4K);
        assert_eq!(t.leaf, Gpa(0x4008));
        let e = translate(&mem, &state(3), Gva(0x40_1000), AccessKind::Fetch).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(
                ErrorCode::PRESENT
                    .union(ErrorCode::USER)
                    .union(ErrorCode::FETCH)
            )
        );
        let e = translate(&mem, &state(3), Gva(0x40_2000), AccessKind::Read).unwrap_err();
        assert_eq!(e, WalkError::Fault(ErrorCode::USER));
    }

    #[test]
    fn read_only_and_supervisor_pages() {
        let mem = SimGuestMemory::new(0x10000);
        tables(&mem, pte::P | pte::US);
        let e = translate(&mem, &state(3), Gva(0x40_1000), AccessKind::Write).unwrap_err();
        let want = ErrorCode::PRESENT
            .union(ErrorCode::WRITE)
            .union(ErrorCode::USER);
        assert_eq!(e, WalkError::Fault(want));
        // CR0.WP: the kernel cannot write it either; without WP it can.
        assert!(translate(&mem, &state(0), Gva(0x40_1000), AccessKind::Write).is_err());
        let no_wp = PagingState {
            cr0_wp: false,
            ..state(0)
        };
        assert!(translate(&mem, &no_wp, Gva(0x40_1000), AccessKind::Write).is_ok());
        tables(&mem, pte::P | pte::RW);
        assert!(translate(&mem, &state(3), Gva(0x40_1000), AccessKind::Read).is_err());
        assert!(translate(&mem, &state(0), Gva(0x40_1000), AccessKind::Write).is_ok());
    }

    #[test]
    fn huge_leaf_and_reserved_ps_in_pml4() {
        let mem = SimGuestMemory::new(0x10000);
        let gva = 0xffff_8880_0060_1234u64;
        mem.write_u64(entry_gpa(Gpa(0x1000), index(gva, Level::L512G)), 0x2000 | T)
            .unwrap();
        mem.write_u64(entry_gpa(Gpa(0x2000), index(gva, Level::L1G)), 0x3000 | T)
            .unwrap();
        mem.write_u64(
            entry_gpa(Gpa(0x3000), index(gva, Level::L2M)),
            0x60_0000 | pte::P | pte::RW | pte::PS,
        )
        .unwrap();
        let t = translate(&mem, &state(0), Gva(gva), AccessKind::Write).unwrap();
        assert_eq!(t.gpa, Gpa(0x60_1234));
        assert_eq!(t.level, Level::L2M);
        mem.write_u64(
            entry_gpa(Gpa(0x1000), index(gva, Level::L512G)),
            0x2000 | T | pte::PS,
        )
        .unwrap();
        let e = translate(&mem, &state(0), Gva(gva), AccessKind::Read).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(ErrorCode::PRESENT.union(ErrorCode::RSVD))
        );
    }
}
