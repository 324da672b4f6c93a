//! SPTE formats as tables of masks (KVM's runtime `shadow_present_mask`,
//! `shadow_x_mask`, `shadow_nx_mask`, `shadow_user_mask`, `shadow_accessed_mask`,
//! `shadow_dirty_mask`, ... set once per MMU): every bit whose meaning depends on the
//! format is asked through a [`SpteFormat`], so no caller can read an EPT bit in a legacy
//! SPTE or the reverse.
//!
//! # Invariants
//! - A [`FormatMasks`] never claims a bit [`Spte`] reads the same way in every format
//!   (MMU_PRESENT, LARGE, the frame field, HOST_WRITABLE, MMU_WRITABLE):
//!   [`SpteFormat::new`] refuses such a table (at compile time, for a `const`).
//! - Every leaf and non-leaf a format builds is present to hardware in that format, and
//!   every MMIO SPTE (one encoding, [`Spte::new_mmio`]) faults in it: not present, or a
//!   misconfiguration. [`SpteFormat::new`] checks this too.
//! - Predicates describe a *shadow-present* SPTE, as the shared ones on [`Spte`] do, and
//!   return false for anything else (except [`SpteFormat::hw_present`] and
//!   [`SpteFormat::is_misconfig`], the hardware's view).
//!
//! # Locking
//! None: formats are constants, predicates pure functions of one SPTE value.

use core::fmt;

use super::bits::{
    DIRTY as EPT_DIRTY, EXECUTABLE, HOST_WRITABLE, IGNORE_PAT, LARGE, MAX_PFN, MMIO_VALUE,
    MMU_PRESENT, MMU_WRITABLE, MT_MASK, PFN_MASK, PFN_SHIFT, READABLE, RWX_MASK, WRITABLE,
};
use super::{bit_if, debug_check_leaf, legacy, LeafAttrs, MemType, Spte};
use crate::guest::pte;
use crate::types::{Level, Pfn};

/// The format-dependent bits of one SPTE format. Every field is a mask of SPTE bits; a
/// zero mask means the format has no such bit (see each field for what that implies).
///
/// The bits *not* here are the same in every format vmmu builds (and in AMD NPT, which is
/// the legacy format): W (bit 1), PS / LARGE (bit 7), the frame field (bits 12..=51) and
/// vmmu's software bits MMU_PRESENT (11), HOST_WRITABLE (57), MMU_WRITABLE (58); they are
/// [`Spte`]'s own predicates.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FormatMasks {
    /// A short name ("EPT", "legacy").
    pub name: &'static str,
    /// Hardware treats the entry as present iff any of these bits is set (EPT: R, W or X;
    /// legacy: P). KVM's `shadow_present_mask` is the bit every entry the MMU builds has.
    pub present: u64,
    /// The bits set in every leaf, besides the software ones (EPT: R; legacy: P).
    pub leaf: u64,
    /// The bits of every non-leaf besides MMU_PRESENT and the child's frame: the rights
    /// it grants, all of them, since the leaf decides (EPT: R|W|X; legacy: P|RW|US|A).
    pub nonleaf: u64,
    /// Grants reads (EPT: R; legacy: P, since a present legacy entry is readable).
    pub readable: u64,
    /// Grants instruction fetch when set (EPT: X; legacy: 0, see [`Self::nx`]).
    pub exec: u64,
    /// Forbids instruction fetch when set (EPT: 0; legacy: NX, bit 63).
    pub nx: u64,
    /// Grants user-mode access when set (EPT: 0, it has no U/S bit, so every entry is
    /// the user's; legacy: US, bit 2).
    pub user: u64,
    /// Accessed, set by the CPU on a walk through the entry (EPT: bit 8; legacy: bit 5).
    /// A format without A/D bits (EPT without A/D) would need access tracking, not 0.
    pub accessed: u64,
    /// Dirty, set by the CPU on a write through a leaf (EPT: bit 9; legacy: bit 6).
    pub dirty: u64,
    /// The memory-type field of a leaf (EPT: bits 3..=5; legacy: 0, the guest PAT
    /// decides and every leaf is write-back).
    pub memtype: u64,
    /// Ignore the guest PAT (EPT: bit 6; legacy: 0).
    pub ignore_pat: u64,
    /// An access-bit combination hardware refuses as a misconfiguration: the entry is
    /// one when `s & bad_rights.0 == bad_rights.1` (EPT: W without R, `(R|W, W)`;
    /// legacy: `(0, 1)`, never).
    pub bad_rights: (u64, u64),
    /// The memory-type encodings hardware refuses in a present entry, one bit per
    /// encoding of [`Self::memtype`] (EPT: 2, 3 and 7; legacy: 0, none).
    pub bad_memtypes: u64,
}

/// The shift of the field `mask` (0 for an absent field).
#[inline(always)]
const fn shift_of(mask: u64) -> u32 {
    if mask == 0 {
        0
    } else {
        mask.trailing_zeros()
    }
}

/// Whether hardware refuses `s` as a misconfiguration in the format `m`.
#[inline(always)]
const fn misconfig_in(m: &FormatMasks, s: u64) -> bool {
    if s & m.bad_rights.0 == m.bad_rights.1 {
        return true;
    }
    s & m.present != 0 && (m.bad_memtypes >> ((s & m.memtype) >> shift_of(m.memtype))) & 1 != 0
}

impl FormatMasks {
    /// Intel EPT with A/D bits (KVM's `kvm_mmu_set_ept_masks`): the direct shadow MMU's
    /// and the TDP MMU's format.
    pub const EPT: FormatMasks = FormatMasks {
        name: "EPT",
        present: RWX_MASK,
        leaf: READABLE,
        nonleaf: RWX_MASK,
        readable: READABLE,
        exec: EXECUTABLE,
        nx: 0,
        user: 0,
        accessed: super::bits::ACCESSED,
        dirty: EPT_DIRTY,
        memtype: MT_MASK,
        ignore_pat: IGNORE_PAT,
        bad_rights: (READABLE | WRITABLE, WRITABLE),
        bad_memtypes: (1 << 2) | (1 << 3) | (1 << 7),
    };

    /// Legacy x86-64 paging (KVM's masks with EPT off): shadow paging's format, the
    /// guest's own PTE layout ([`crate::guest::pte`]).
    pub const LEGACY: FormatMasks = FormatMasks {
        name: "legacy",
        present: pte::P,
        leaf: pte::P,
        nonleaf: pte::P | pte::RW | pte::US | pte::A,
        readable: pte::P,
        exec: 0,
        nx: legacy::NX,
        user: legacy::USER,
        accessed: legacy::ACCESSED,
        dirty: legacy::DIRTY,
        memtype: 0,
        ignore_pat: 0,
        bad_rights: (0, 1),
        bad_memtypes: 0,
    };
}

/// The bits [`Spte`] reads the same way in every format; no format mask may claim them.
const SHARED: u64 = MMU_PRESENT | PFN_MASK | HOST_WRITABLE | MMU_WRITABLE | LARGE;

/// The SPTE format an MMU builds and reads: a reference to its [`FormatMasks`].
///
/// Every format-dependent constructor and predicate is a method here, so asking one
/// names the format: the shadow MMU asks its `format`, EPT-only code (the TDP MMU, the
/// CPU's EPT walker) [`SpteFormat::EPT`]. Adding a format (NPT, EPT without A/D) is one
/// new [`FormatMasks`] constant and one `SpteFormat::new` of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SpteFormat(&'static FormatMasks);

impl fmt::Debug for SpteFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpteFormat({})", self.0.name)
    }
}

impl SpteFormat {
    /// Intel EPT ([`FormatMasks::EPT`]).
    pub const EPT: SpteFormat = SpteFormat::new(&FormatMasks::EPT);
    /// Legacy x86-64 paging ([`FormatMasks::LEGACY`]).
    pub const LEGACY: SpteFormat = SpteFormat::new(&FormatMasks::LEGACY);

    /// The format described by `m`, after checking the module's invariants (a panic, so
    /// a compile error when used in a `const`): no mask claims a shared bit; leaves and
    /// non-leaves are present to hardware; exec and NX are not both bits; every MMIO SPTE
    /// faults.
    pub const fn new(m: &'static FormatMasks) -> SpteFormat {
        let own = m.present
            | m.leaf
            | m.nonleaf
            | m.readable
            | m.exec
            | m.nx
            | m.user
            | m.accessed
            | m.dirty
            | m.memtype
            | m.ignore_pat;
        assert!(own & SHARED == 0, "a format mask claims a shared SPTE bit");
        assert!(
            m.leaf & m.present != 0 && m.nonleaf & m.present != 0,
            "leaves and non-leaves must be present to hardware"
        );
        assert!(
            m.exec == 0 || m.nx == 0,
            "a format has an exec bit or an NX bit"
        );
        // An MMIO SPTE has W|X in bits 0..=2 and generation bits in 3..=5.
        let mut gen = 0;
        while gen < 8 {
            let low6 = (MMIO_VALUE | (gen << 3)) & 0x3f;
            let faults = MMIO_VALUE & m.present == 0 || misconfig_in(m, low6);
            assert!(faults, "an MMIO SPTE must fault in every format");
            gen += 1;
        }
        SpteFormat(m)
    }

    /// The format's masks.
    #[inline]
    pub const fn masks(self) -> &'static FormatMasks {
        self.0
    }

    /// The format's short name.
    #[inline]
    pub const fn name(self) -> &'static str {
        self.0.name
    }

    /// A leaf mapping `pfn` at `level` (KVM's `make_spte`): present and readable; W,
    /// host- and MMU-writable, A and D as `attrs` says; executable (X set, or NX clear)
    /// iff `attrs.executable`; user-accessible iff `user`, in a format with a U/S bit
    /// (EPT has none: every leaf is the user's, and `user` is ignored); the memory type
    /// and ignore-PAT of `attrs` in a format with those fields (legacy: ignored,
    /// write-back); LARGE iff `level` is above 4K.
    ///
    /// Debug builds check that `level` can hold a leaf (4K, 2M, 1G), that `pfn` fits in
    /// 40 bits and is aligned to `level.pages()`, and that `writable` comes with
    /// `mmu_writable` and `host_writable`.
    ///
    /// Always inlined: with a constant format (EPT code names [`SpteFormat::EPT`]) the
    /// masks fold away and the leaf is built as a hand-written one would be.
    #[inline(always)]
    pub const fn leaf(self, pfn: Pfn, level: Level, attrs: LeafAttrs, user: bool) -> Spte {
        debug_check_leaf(pfn, level, &attrs);
        let m = self.0;
        let mt_shift = shift_of(m.memtype);
        Spte(
            m.leaf
                | MMU_PRESENT
                | (pfn.0 << PFN_SHIFT)
                | bit_if(attrs.writable, WRITABLE)
                | bit_if(attrs.executable, m.exec)
                | bit_if(!attrs.executable, m.nx)
                | bit_if(user, m.user)
                | (((attrs.memtype as u64) << mt_shift) & m.memtype)
                | bit_if(attrs.ignore_pat, m.ignore_pat)
                | bit_if((level as u8) > (Level::L4K as u8), LARGE)
                | bit_if(attrs.accessed, m.accessed)
                | bit_if(attrs.dirty, m.dirty)
                | bit_if(attrs.host_writable, HOST_WRITABLE)
                | bit_if(attrs.mmu_writable, MMU_WRITABLE),
        )
    }

    /// A non-leaf entry pointing at the table in frame `child` (KVM's
    /// `make_nonleaf_spte`): the format's non-leaf bits, MMU_PRESENT and the frame; never
    /// LARGE, no memory type; A only where the format's non-leaf bits include it.
    #[inline]
    pub const fn nonleaf(self, child: Pfn) -> Spte {
        debug_assert!(child.0 <= MAX_PFN, "table pfn wider than 40 bits");
        Spte(self.0.nonleaf | MMU_PRESENT | (child.0 << PFN_SHIFT))
    }

    /// The accessed mask (to set or clear it).
    #[inline]
    pub const fn accessed(self) -> u64 {
        self.0.accessed
    }

    /// The dirty mask (to set or clear it).
    #[inline]
    pub const fn dirty(self) -> u64 {
        self.0.dirty
    }

    /// Accessed and dirty together: what the CPU may add to a leaf after it is built.
    #[inline]
    pub const fn accessed_dirty(self) -> u64 {
        self.0.accessed | self.0.dirty
    }

    /// Present to hardware: any of the format's present bits set (hardware ignores
    /// MMU_PRESENT). True for MMIO SPTEs in EPT (which makes them misconfigurations),
    /// false in legacy.
    #[inline]
    pub const fn hw_present(self, s: Spte) -> bool {
        s.0 & self.0.present != 0
    }

    /// Shadow-present and readable (always true for a shadow-present SPTE of the formats
    /// vmmu has).
    #[inline]
    pub const fn is_readable(self, s: Spte) -> bool {
        s.present_with(self.0.readable)
    }

    /// Shadow-present and executable: the exec bit set, the NX bit clear.
    #[inline]
    pub const fn is_executable(self, s: Spte) -> bool {
        let m = self.0;
        s.0 & (MMU_PRESENT | m.exec | m.nx) == MMU_PRESENT | m.exec
    }

    /// Shadow-present and user-accessible (every shadow-present SPTE in a format without
    /// a U/S bit).
    #[inline]
    pub const fn is_user(self, s: Spte) -> bool {
        s.present_with(self.0.user)
    }

    /// Shadow-present with the accessed bit set.
    #[inline]
    pub const fn is_accessed(self, s: Spte) -> bool {
        s.present_with(self.0.accessed)
    }

    /// Shadow-present with the dirty bit set.
    #[inline]
    pub const fn is_dirty(self, s: Spte) -> bool {
        s.present_with(self.0.dirty)
    }

    /// The memory type of a shadow-present SPTE; `None` if not present, in a format
    /// without the field, or for a reserved encoding. (A non-leaf has 0 there, which
    /// reads as UC: the field is meaningful for leaves only.)
    #[inline]
    pub const fn memtype(self, s: Spte) -> Option<MemType> {
        let m = self.0.memtype;
        if m == 0 || !s.is_shadow_present() {
            return None;
        }
        MemType::from_bits(((s.0 & m) >> shift_of(m)) as u8)
    }

    /// Shadow-present with ignore-PAT set (false in a format without it).
    #[inline]
    pub const fn ignore_pat(self, s: Spte) -> bool {
        self.0.ignore_pat != 0 && s.present_with(self.0.ignore_pat)
    }

    /// What hardware does with this entry: a misconfiguration (EPT: W without R, or
    /// present with a reserved memory type, 2, 3 or 7) rather than a fault or a walk.
    ///
    /// MMIO SPTEs are EPT misconfigurations by construction; every other SPTE the
    /// constructors make is not. The memory-type check applies to any present entry: in
    /// a non-leaf those bits are reserved and KVM keeps them zero, so a reserved value
    /// there is a misconfiguration too.
    #[inline]
    pub const fn is_misconfig(self, s: Spte) -> bool {
        misconfig_in(self.0, s.0)
    }

    /// Whether bits of this SPTE may change under the MMU's feet, so that clearing or
    /// replacing it must use an atomic exchange (keeping the bits returned) rather than a
    /// plain store that could lose them (KVM's `spte_has_volatile_bits`).
    ///
    /// True for a shadow-present SPTE that:
    /// - is not accessed: a CPU walking through it may set A at any moment;
    /// - is writable but not dirty: a CPU writing through it may set D at any moment,
    ///   and losing that D bit would lose a dirty page from the dirty log;
    /// - is not writable but can be made writable locklessly: the fast page-fault path may
    ///   set W concurrently with a compare-exchange, without the MMU lock. (Once W is set,
    ///   only D can still change, covered above; this is KVM's rule.)
    ///
    /// Not-present, MMIO and frozen SPTEs have no volatile bits: no CPU or lockless path
    /// writes them.
    #[inline]
    pub const fn has_volatile_bits(self, s: Spte) -> bool {
        s.is_shadow_present()
            && (!self.is_accessed(s)
                || (s.is_writable() && !self.is_dirty(s))
                || (!s.is_writable() && s.can_be_made_writable_locklessly()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spte::bits;
    use crate::types::Gfn;
    use alloc::format;

    const EPT: SpteFormat = SpteFormat::EPT;
    const LEGACY: SpteFormat = SpteFormat::LEGACY;
    const P: u64 = MMU_PRESENT;

    #[test]
    fn mask_table_is_kvms() {
        let e = EPT.masks();
        assert_eq!(
            (e.present, e.leaf, e.nonleaf, e.readable),
            (0x7, 0x1, 0x7, 0x1)
        );
        assert_eq!((e.exec, e.nx, e.user), (0x4, 0, 0));
        assert_eq!((e.accessed, e.dirty), (0x100, 0x200));
        assert_eq!((e.memtype, e.ignore_pat), (0x38, 0x40));
        let l = LEGACY.masks();
        assert_eq!(
            (l.present, l.leaf, l.nonleaf, l.readable),
            (0x1, 0x1, 0x27, 0x1)
        );
        assert_eq!((l.exec, l.nx, l.user), (0, 1 << 63, 0x4));
        assert_eq!((l.accessed, l.dirty), (0x20, 0x40));
        assert_eq!((l.memtype, l.ignore_pat, l.bad_memtypes), (0, 0, 0));
        assert_eq!((e.bad_rights, e.bad_memtypes), ((0x3, 0x2), 0x8c));
        assert_eq!(l.bad_rights, (0, 1));
        assert_eq!((EPT.name(), LEGACY.name()), ("EPT", "legacy"));
        assert_eq!(
            format!("{EPT:?} {LEGACY:?}"),
            "SpteFormat(EPT) SpteFormat(legacy)"
        );
        assert_eq!(EPT.accessed_dirty(), 0x300);
        assert_eq!(LEGACY.accessed_dirty(), 0x60);
        assert_ne!(EPT, LEGACY);
        assert_eq!(SpteFormat::new(&FormatMasks::EPT), EPT);
    }

    #[test]
    fn ept_predicates_read_ept_bits() {
        let f = EPT;
        assert!(f.is_readable(Spte(P | 0x1)) && !f.is_readable(Spte(P)));
        assert!(f.is_executable(Spte(P | 0x4)) && !f.is_executable(Spte(P | 0x3)));
        assert!(f.is_accessed(Spte(P | 0x100)) && !f.is_accessed(Spte(P | 0xff)));
        assert!(f.is_dirty(Spte(P | 0x200)) && !f.is_dirty(Spte(P | 0x1ff)));
        assert!(f.ignore_pat(Spte(P | 0x40)) && !f.ignore_pat(Spte(P)));
        assert_eq!(f.memtype(Spte(P | (6 << 3))), Some(MemType::Wb));
        // No U/S bit: every shadow-present entry is the user's.
        assert!(f.is_user(Spte(P)));
        // Present to hardware: any of R, W, X.
        for b in [0x1, 0x2, 0x4] {
            assert!(f.hw_present(Spte(b)));
        }
        assert!(!f.hw_present(Spte(!0x7)));
        // Shadow-present predicates need MMU_PRESENT.
        let raw = Spte(0x1 | 0x4 | 0x100 | 0x200 | 0x40);
        assert!(!f.is_readable(raw) && !f.is_executable(raw) && !f.is_user(raw));
        assert!(!f.is_accessed(raw) && !f.is_dirty(raw) && !f.ignore_pat(raw));
        assert_eq!(f.memtype(raw), None);
    }

    #[test]
    fn legacy_predicates_read_legacy_bits() {
        let f = LEGACY;
        assert!(f.is_readable(Spte(P | 0x1)) && !f.is_readable(Spte(P)));
        // Executable unless NX.
        assert!(f.is_executable(Spte(P)) && !f.is_executable(Spte(P | (1 << 63))));
        assert!(f.is_user(Spte(P | 0x4)) && !f.is_user(Spte(P | 0x3)));
        assert!(f.is_accessed(Spte(P | 0x20)) && !f.is_accessed(Spte(P | 0x1f)));
        assert!(f.is_dirty(Spte(P | 0x40)) && !f.is_dirty(Spte(P | 0x3f)));
        // No memory type, no ignore-PAT, no misconfiguration.
        assert_eq!(f.memtype(Spte(P | 0x38)), None);
        assert!(!f.ignore_pat(Spte(P | 0x40)));
        for v in 0..64 {
            assert!(!f.is_misconfig(Spte(v)) && !f.is_misconfig(Spte(v | P)));
        }
        // Present to hardware: P only.
        assert!(f.hw_present(Spte(0x1)) && !f.hw_present(Spte(0x6)));
        let raw = Spte(0x1 | 0x4 | 0x20 | 0x40);
        assert!(!f.is_readable(raw) && !f.is_executable(raw) && !f.is_user(raw));
        assert!(!f.is_accessed(raw) && !f.is_dirty(raw));
    }

    /// The bug class the formats prevent: one format's bit read in the other's SPTE.
    #[test]
    fn a_format_never_reads_the_other_formats_bits() {
        // EPT's A (bit 8, legacy G), D (bit 9, ignored) and X (bit 2, legacy US) in a
        // legacy leaf that is NX and neither accessed nor dirty in legacy terms.
        let nx = LeafAttrs {
            executable: false,
            ..LeafAttrs::DEFAULT
        };
        let leaf = LEGACY
            .leaf(Pfn(0x42), Level::L4K, nx, true)
            .with_bits(bits::ACCESSED | bits::DIRTY);
        assert!(!LEGACY.is_executable(leaf) && EPT.is_executable(leaf));
        assert!(!LEGACY.is_accessed(leaf), "EPT's A bit is not legacy's");
        assert!(!LEGACY.is_dirty(leaf), "EPT's D bit is not legacy's");
        assert!(EPT.is_accessed(leaf) && EPT.is_dirty(leaf));
        let nx_user = Spte(P | pte::P | legacy::USER | legacy::NX);
        assert!(!LEGACY.is_executable(nx_user), "EPT's X bit is legacy's US");
        assert!(EPT.is_executable(nx_user));
        // The other way: legacy A (bit 5, in EPT's memory type) and D (bit 6, EPT's
        // ignore-PAT) in an EPT leaf.
        let ept = EPT
            .leaf(Pfn(0x42), Level::L4K, LeafAttrs::DEFAULT, true)
            .with_bits(legacy::ACCESSED | legacy::DIRTY);
        assert!(!EPT.is_accessed(ept) && !EPT.is_dirty(ept));
        assert!(LEGACY.is_accessed(ept) && LEGACY.is_dirty(ept));
        // A legacy leaf's own A bit makes it non-volatile once D is set too, where the EPT
        // reading would call it never accessed.
        let ad = LEGACY.leaf(
            Pfn(0x42),
            Level::L4K,
            LeafAttrs {
                accessed: true,
                dirty: true,
                writable: true,
                host_writable: true,
                mmu_writable: true,
                ..LeafAttrs::DEFAULT
            },
            true,
        );
        assert!(!LEGACY.has_volatile_bits(ad) && EPT.has_volatile_bits(ad));
    }

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
        let s = LEGACY.leaf(Pfn(0x200), Level::L2M, attrs, true);
        assert_eq!(
            s.0,
            pte::P
                | pte::RW
                | pte::US
                | pte::PS
                | pte::A
                | pte::NX
                | P
                | (0x200 << 12)
                | HOST_WRITABLE
                | MMU_WRITABLE,
            "memory type and ignore-PAT are EPT's: not in a legacy leaf"
        );
        assert!(s.is_shadow_present() && LEGACY.hw_present(s));
        assert!(s.is_writable() && s.is_large() && s.is_leaf(Level::L2M));
        assert!(LEGACY.is_user(s) && !LEGACY.is_executable(s));
        assert!(s.is_host_writable() && s.is_mmu_writable());
        assert_eq!(s.pfn(), Pfn(0x200));
        assert!(LEGACY.is_accessed(s) && !LEGACY.is_dirty(s));
        assert!(!s.is_mmio());
        // EPT's A bit is the legacy G bit: never set by the builder.
        assert_eq!(s.0 & bits::ACCESSED, 0);
        // Writable and clean: the CPU may set D.
        assert!(LEGACY.has_volatile_bits(s));
        let r = LEGACY.leaf(Pfn(7), Level::L4K, LeafAttrs::DEFAULT, false);
        assert_eq!(r.0, pte::P | P | (7 << 12));
        assert!(!r.is_writable() && !LEGACY.is_user(r) && LEGACY.is_executable(r));
        assert!(!r.is_large() && LEGACY.is_readable(r));
        assert!(r.write_tracked() == r);
        // Not accessed: the CPU may set A.
        assert!(LEGACY.has_volatile_bits(r));
    }

    #[test]
    fn ept_leaf_ignores_user() {
        for attrs in [
            LeafAttrs::DEFAULT,
            LeafAttrs {
                executable: false,
                ..LeafAttrs::DEFAULT
            },
        ] {
            let a = EPT.leaf(Pfn(9), Level::L4K, attrs, true);
            assert_eq!(a, EPT.leaf(Pfn(9), Level::L4K, attrs, false));
            assert!(EPT.is_user(a));
        }
    }

    #[test]
    fn nonleaves_grant_everything() {
        let n = LEGACY.nonleaf(Pfn(0x1234));
        assert_eq!(
            n.0,
            pte::P | pte::RW | pte::US | pte::A | P | (0x1234 << 12)
        );
        assert!(n.is_shadow_present() && LEGACY.hw_present(n) && n.is_writable());
        assert!(LEGACY.is_user(n) && LEGACY.is_executable(n) && !n.is_large());
        assert_eq!(n.pfn(), Pfn(0x1234));
        let e = EPT.nonleaf(Pfn(0x1234));
        assert_eq!(e.0, 0x7 | P | (0x1234 << 12));
        assert!(EPT.is_readable(e) && e.is_writable() && EPT.is_executable(e));
        assert!(EPT.is_user(e) && !EPT.is_accessed(e) && !e.is_large());
    }

    #[test]
    fn mmio_faults_in_both_formats() {
        for gen in [0, 1, 0x7f, 0xff, 0x7_ffff] {
            let m = Spte::new_mmio(Gfn(0x55), gen);
            assert!(m.is_mmio() && !m.is_shadow_present());
            assert!(!LEGACY.hw_present(m), "not present to legacy hardware");
            assert!(
                EPT.hw_present(m) && EPT.is_misconfig(m),
                "an EPT misconfiguration"
            );
            for f in [EPT, LEGACY] {
                assert!(!f.is_readable(m) && !f.is_executable(m) && !f.is_user(m));
                assert!(!f.is_accessed(m) && !f.is_dirty(m) && !f.has_volatile_bits(m));
            }
        }
    }

    /// The misconfiguration rule, for every value of bits 0..=5 (and whatever lies above
    /// them): W without R at any memory type, a reserved memory type if present.
    #[test]
    fn ept_misconfig_matches_the_rule() {
        for v in 0..64u64 {
            let w_without_r = v & 0b011 == 0b010;
            let reserved_mt = v & 7 != 0 && matches!(v >> 3, 2 | 3 | 7);
            for high in [0, P, bits::PFN_MASK, HOST_WRITABLE | MMU_WRITABLE, !0x3f] {
                assert_eq!(
                    EPT.is_misconfig(Spte(v | high)),
                    w_without_r || reserved_mt,
                    "{v:#x}"
                );
            }
        }
    }

    #[test]
    fn legacy_volatile_bits_use_legacy_a_d() {
        for a in [false, true] {
            for w in [false, true] {
                for d in [false, true] {
                    for hw in [false, true] {
                        for mw in [false, true] {
                            if w && !(hw && mw) {
                                continue;
                            }
                            let s = LEGACY.leaf(
                                Pfn(1),
                                Level::L4K,
                                LeafAttrs {
                                    writable: w,
                                    accessed: a,
                                    dirty: d,
                                    host_writable: hw,
                                    mmu_writable: mw,
                                    ..LeafAttrs::DEFAULT
                                },
                                true,
                            );
                            let expect = !a || (w && !d) || (!w && hw && mw);
                            assert_eq!(LEGACY.has_volatile_bits(s), expect, "{s:?}");
                        }
                    }
                }
            }
        }
        assert!(!LEGACY.has_volatile_bits(Spte::NONE));
        assert!(!LEGACY.has_volatile_bits(crate::spte::FROZEN));
    }

    static CLAIMS_PRESENT: FormatMasks = FormatMasks {
        accessed: MMU_PRESENT,
        ..FormatMasks::LEGACY
    };
    static MMIO_PRESENT: FormatMasks = FormatMasks {
        present: RWX_MASK,
        ..FormatMasks::LEGACY
    };
    static NOT_PRESENT_LEAF: FormatMasks = FormatMasks {
        leaf: WRITABLE,
        ..FormatMasks::LEGACY
    };

    #[test]
    #[should_panic(expected = "shared SPTE bit")]
    fn a_format_may_not_claim_a_shared_bit() {
        let _ = SpteFormat::new(&CLAIMS_PRESENT);
    }

    #[test]
    #[should_panic(expected = "MMIO SPTE must fault")]
    fn mmio_must_fault_in_a_new_format() {
        let _ = SpteFormat::new(&MMIO_PRESENT);
    }

    #[test]
    #[should_panic(expected = "present to hardware")]
    fn leaves_must_be_present_in_a_new_format() {
        let _ = SpteFormat::new(&NOT_PRESENT_LEAF);
    }
}
