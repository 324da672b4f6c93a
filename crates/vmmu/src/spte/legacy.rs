//! The legacy x86-64 SPTE format a shadow-paging MMU uses (KVM's shadow masks when EPT is
//! off): the guest's own PTE layout ([`crate::guest::pte`]) plus KVM's software bits.
//!
//! Bits shared with the EPT format, so that every format-blind path (reverse maps,
//! zapping, write protection, the audit) reads both the same way: bit 0 (R / P), bit 1
//! (W / RW), bit 7 (LARGE / PS), the frame field, and the software bits MMU_PRESENT (11),
//! HOST_WRITABLE (57) and MMU_WRITABLE (58). The bits that differ: user (bit 2, the EPT X
//! bit), execute-disable (bit 63), accessed (5) and dirty (6) instead of EPT's 8 and 9.
//!
//! MMIO SPTEs keep the EPT encoding: P is clear there, so hardware sees them as not
//! present, and EPT's bits 8 and 9 (A/D in EPT) are never set in a legacy SPTE, so
//! [`Spte::has_volatile_bits`] always answers "volatile" for a legacy leaf: every clear
//! is an atomic exchange, which is what the legacy A/D bits need.

use super::bits::{HOST_WRITABLE, MMU_PRESENT, MMU_WRITABLE, PFN_SHIFT};
use super::{LeafAttrs, Spte};
use crate::guest::pte;
use crate::types::{Level, Pfn};

/// Accessed (legacy bit 5).
pub const ACCESSED: u64 = pte::A;
/// Dirty (legacy bit 6).
pub const DIRTY: u64 = pte::D;
/// User-accessible (legacy bit 2).
pub const USER: u64 = pte::US;
/// Execute-disable (legacy bit 63).
pub const NX: u64 = pte::NX;

#[inline]
const fn bit_if(cond: bool, bit: u64) -> u64 {
    if cond {
        bit
    } else {
        0
    }
}

impl Spte {
    /// A legacy-format leaf mapping `pfn` at `level`: present, user-accessible iff `user`,
    /// NX unless `attrs.executable`; the memory type fields of `attrs` are ignored
    /// (write-back). The same debug checks as [`Spte::new_leaf`].
    #[inline]
    pub const fn new_legacy_leaf(pfn: Pfn, level: Level, attrs: LeafAttrs, user: bool) -> Spte {
        super::debug_check_leaf(pfn, level, &attrs);
        Spte(
            pte::P
                | MMU_PRESENT
                | (pfn.0 << PFN_SHIFT)
                | bit_if(attrs.writable, pte::RW)
                | bit_if(user, USER)
                | bit_if(!attrs.executable, NX)
                | bit_if((level as u8) > (Level::L4K as u8), pte::PS)
                | bit_if(attrs.accessed, ACCESSED)
                | bit_if(attrs.dirty, DIRTY)
                | bit_if(attrs.host_writable, HOST_WRITABLE)
                | bit_if(attrs.mmu_writable, MMU_WRITABLE),
        )
    }

    /// A legacy-format non-leaf entry pointing at the table in frame `child`: P, RW, US
    /// and A set, NX clear (KVM's `make_nonleaf_spte`: the leaf decides the rights).
    #[inline]
    pub const fn new_legacy_nonleaf(child: Pfn) -> Spte {
        Spte(pte::P | pte::RW | pte::US | pte::A | MMU_PRESENT | (child.0 << PFN_SHIFT))
    }

    /// Legacy view: present to hardware (P).
    #[inline]
    pub const fn legacy_present(self) -> bool {
        self.0 & pte::P != 0
    }
    /// Legacy view: user-accessible.
    #[inline]
    pub const fn legacy_user(self) -> bool {
        self.0 & USER != 0
    }
    /// Legacy view: executable (NX clear).
    #[inline]
    pub const fn legacy_executable(self) -> bool {
        self.0 & NX == 0
    }
}

/// Which SPTE format an MMU builds (KVM's shadow masks, set per MMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpteFormat {
    /// Intel EPT: the TDP formats of the direct shadow MMU and the TDP MMU.
    Ept,
    /// Legacy x86-64 paging: shadow paging.
    Legacy,
}

impl SpteFormat {
    /// The accessed bit.
    #[inline]
    pub const fn accessed(self) -> u64 {
        match self {
            SpteFormat::Ept => super::bits::ACCESSED,
            SpteFormat::Legacy => ACCESSED,
        }
    }
    /// The dirty bit.
    #[inline]
    pub const fn dirty(self) -> u64 {
        match self {
            SpteFormat::Ept => super::bits::DIRTY,
            SpteFormat::Legacy => DIRTY,
        }
    }
    /// A non-leaf entry pointing at `child`.
    #[inline]
    pub const fn nonleaf(self, child: Pfn) -> Spte {
        match self {
            SpteFormat::Ept => Spte::new_nonleaf(child),
            SpteFormat::Legacy => Spte::new_legacy_nonleaf(child),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spte::bits;

    #[test]
    fn legacy_leaf_bits() {
        let attrs = LeafAttrs {
            writable: true,
            executable: false,
            host_writable: true,
            mmu_writable: true,
            accessed: true,
            dirty: false,
            ..LeafAttrs::DEFAULT
        };
        let s = Spte::new_legacy_leaf(Pfn(0x200), Level::L2M, attrs, true);
        assert!(s.is_shadow_present() && s.legacy_present());
        assert!(s.is_writable() && s.is_large() && s.is_leaf(Level::L2M));
        assert!(s.legacy_user() && !s.legacy_executable());
        assert!(s.is_host_writable() && s.is_mmu_writable());
        assert_eq!(s.pfn(), Pfn(0x200));
        assert_eq!(s.0 & ACCESSED, ACCESSED);
        assert_eq!(s.0 & DIRTY, 0);
        assert!(!s.is_mmio());
        // EPT's A bit is the legacy G bit: never set, so clears always exchange.
        assert_eq!(s.0 & bits::ACCESSED, 0);
        assert!(s.has_volatile_bits());
        let r = Spte::new_legacy_leaf(Pfn(7), Level::L4K, LeafAttrs::DEFAULT, false);
        assert!(!r.is_writable() && !r.legacy_user() && r.legacy_executable() && !r.is_large());
        assert!(r.write_tracked() == r);
    }

    #[test]
    fn legacy_nonleaf_grants_everything() {
        let n = Spte::new_legacy_nonleaf(Pfn(0x1234));
        assert!(n.is_shadow_present() && n.legacy_present() && n.is_writable());
        assert!(n.legacy_user() && n.legacy_executable() && !n.is_large());
        assert_eq!(n.pfn(), Pfn(0x1234));
        assert_eq!(
            SpteFormat::Legacy.nonleaf(Pfn(3)),
            Spte::new_legacy_nonleaf(Pfn(3))
        );
        assert_eq!(SpteFormat::Ept.nonleaf(Pfn(3)), Spte::new_nonleaf(Pfn(3)));
    }

    #[test]
    fn mmio_is_not_present_to_legacy_hardware() {
        let m = Spte::new_mmio(crate::types::Gfn(0x55), 0x7ffff);
        assert!(m.is_mmio() && !m.legacy_present() && !m.is_shadow_present());
    }
}
