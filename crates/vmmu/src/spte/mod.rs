//! The 64-bit shadow page-table entry (SPTE), encoded as KVM encodes it
//! (`arch/x86/kvm/mmu/spte.h`), in the two formats vmmu builds: Intel EPT with A/D bits
//! (the direct shadow MMU and the TDP MMU) and legacy x86-64 paging (shadow paging).
//!
//! An SPTE is one of four things, told apart by the low bits and the software
//! "shadow-present" bit [`bits::MMU_PRESENT`] (bits as in EPT):
//!
//! | kind | R W X (bits 0..=2) | MMU_PRESENT | meaning |
//! |------|--------------------|-------------|---------|
//! | none | 000 | 0 | [`Spte::NONE`]: nothing mapped, the CPU takes an EPT violation |
//! | present | R set (W, X optional) | 1 | a leaf (maps a frame) or a non-leaf (points to a child table) |
//! | MMIO | 110 (W+X, no R) | 0 | caches "this gfn is emulated MMIO"; hardware reports an EPT *misconfiguration* |
//! | frozen | 000 | 0 | [`FROZEN`]: an entry the TDP MMU is changing; hardware sees it as not present |
//!
//! # Invariants
//! Every constructor keeps (and the tests check bit by bit):
//! - a shadow-present SPTE is always readable (present) to hardware, so it is never an
//!   EPT misconfiguration (EPT forbids write without read);
//! - a writable leaf is also MMU-writable and host-writable (KVM never grants W without
//!   the software bits that say it may);
//! - only leaves carry a memory type, ignore-PAT and dirty bits; non-leaf SPTEs carry
//!   their format's non-leaf bits, MMU_PRESENT and the child table's frame number only;
//! - MMIO SPTEs and [`FROZEN`] are never shadow-present.
//!
//! Attribute predicates such as [`Spte::is_writable`] describe a *shadow-present* SPTE and
//! return false for anything else (an MMIO SPTE has bit 1 set and [`FROZEN`] has the
//! LARGE and ACCESSED bits set, but neither is writable, large or accessed). Each is still
//! one AND and one compare. The raw hardware view is [`SpteFormat::hw_present`] and
//! [`SpteFormat::is_misconfig`].
//!
//! # Formats
//! An SPTE does not know its format: whoever reads one asks its format
//! ([`SpteFormat`], KVM's runtime `shadow_*_mask` values) for every format-dependent bit.
//! The table of masks ([`FormatMasks`], one `const` per format):
//!
//! | mask | [`FormatMasks::EPT`] | [`FormatMasks::LEGACY`] |
//! |------|-----|--------|
//! | present (to hardware) | R\|W\|X (0..=2) | P (0) |
//! | leaf | R (0) | P (0) |
//! | non-leaf | R\|W\|X | P\|RW\|US\|A |
//! | readable | R (0) | P (0) |
//! | exec / NX | X (2) / none | none / NX (63) |
//! | user | none (every entry is the user's) | US (2) |
//! | accessed / dirty | 8 / 9 | 5 / 6 |
//! | memory type / ignore PAT | 3..=5 / 6 | none / none |
//! | misconfiguration (bits 0..=5) | W without R; reserved memory type | none |
//!
//! [`Spte`] keeps only what is the same in every format, because format-blind code
//! (reverse maps, zapping, write protection, the audit) reads it in both: W (bit 1,
//! [`Spte::is_writable`], the write-protect builders), LARGE (bit 7, [`Spte::is_large`],
//! [`Spte::is_leaf`]), the frame field (bits 12..=51), and the software bits vmmu owns in
//! both, MMU_PRESENT (11), HOST_WRITABLE (57) and MMU_WRITABLE (58). W and LARGE are the
//! same bit in every x86 format (EPT, legacy, AMD NPT), as KVM's `PT_WRITABLE_MASK` and
//! `PT_PAGE_SIZE_MASK` are fixed. One MMIO encoding ([`Spte::new_mmio`]) serves both: P
//! is clear, so legacy hardware sees it as not present, and EPT sees a misconfiguration.
//! [`FROZEN`] is the TDP MMU's (EPT only). `Spte`'s `Debug` decodes the EPT bits.
//!
//! To add a format (AMD NPT, EPT without A/D bits): write one more `FormatMasks`
//! constant and one `SpteFormat::new` of it; [`SpteFormat::new`] checks at compile time
//! that it claims no shared bit and that MMIO SPTEs fault in it. No caller changes: each
//! already names the format it reads.

use core::fmt;

use crate::types::{Gfn, Level, Pfn};

mod format;
pub mod legacy;

pub use format::{FormatMasks, SpteFormat};

/// The SPTE bit layout in EPT format, as `u64` masks (and shifts where a field is wider
/// than a bit). W, LARGE, the frame field and the software bits are every format's;
/// the others are EPT's only: read them through [`SpteFormat::EPT`] (or raw, in EPT-only
/// code such as the CPU's EPT walker).
pub mod bits {
    /// Read access (EPT bit 0).
    pub const READABLE: u64 = 1 << 0;
    /// Write access (EPT bit 1). Hardware forbids W without R.
    pub const WRITABLE: u64 = 1 << 1;
    /// Execute access (EPT bit 2).
    pub const EXECUTABLE: u64 = 1 << 2;
    /// All three access bits; an entry is present to hardware iff any of them is set.
    pub const RWX_MASK: u64 = READABLE | WRITABLE | EXECUTABLE;

    /// Shift of the 3-bit EPT memory type of a leaf (bits 3..=5).
    pub const MT_SHIFT: u32 = 3;
    /// The EPT memory type field of a leaf (bits 3..=5).
    pub const MT_MASK: u64 = 0b111 << MT_SHIFT;
    /// Ignore the guest PAT: the EPT memory type alone decides (bit 6).
    pub const IGNORE_PAT: u64 = 1 << 6;

    /// Page size: the entry at level 2 or 3 maps a 2 MiB or 1 GiB page (bit 7).
    pub const LARGE: u64 = 1 << 7;
    /// Accessed, set by the CPU on any access through the entry (bit 8).
    pub const ACCESSED: u64 = 1 << 8;
    /// Dirty, set by the CPU on a write through a leaf (bit 9).
    pub const DIRTY: u64 = 1 << 9;

    /// Software "shadow-present" bit (KVM's `SPTE_MMU_PRESENT_MASK`, bit 11, ignored by
    /// hardware): set on every leaf and non-leaf SPTE, clear on MMIO, frozen and none.
    pub const MMU_PRESENT: u64 = 1 << 11;

    /// Shift of the frame number (bits 12..=51).
    pub const PFN_SHIFT: u32 = 12;
    /// The frame number field (bits 12..=51): the mapped frame of a leaf, the child
    /// table's frame of a non-leaf, the gfn of an MMIO SPTE.
    pub const PFN_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// Largest frame number the field can hold (40 bits).
    pub const MAX_PFN: u64 = PFN_MASK >> PFN_SHIFT;

    /// Software bit: the host mapping is writable (KVM's `EPT_SPTE_HOST_WRITABLE`, bit 57).
    pub const HOST_WRITABLE: u64 = 1 << 57;
    /// Software bit: the MMU allows making this leaf writable, i.e. it is not
    /// write-tracked (KVM's `EPT_SPTE_MMU_WRITABLE`, bit 58).
    pub const MMU_WRITABLE: u64 = 1 << 58;

    /// Bits that decide whether an SPTE is MMIO: [`RWX_MASK`] and [`MMU_PRESENT`].
    pub const MMIO_MASK: u64 = RWX_MASK | MMU_PRESENT;
    /// Value of [`MMIO_MASK`] bits in an MMIO SPTE: W+X without R and not shadow-present.
    /// Write-without-read is an EPT misconfiguration, so every guest access to the gfn
    /// exits with a misconfig that KVM recognises as cached MMIO.
    pub const MMIO_VALUE: u64 = WRITABLE | EXECUTABLE;

    /// Number of memslot-generation bits stored in an MMIO SPTE.
    pub const MMIO_GEN_BITS: u32 = 19;
    /// Mask of a memslot generation as stored in an MMIO SPTE.
    pub const MMIO_GEN_MASK: u64 = (1 << MMIO_GEN_BITS) - 1;
    /// First SPTE bit of the low 8 generation bits (bits 3..=10).
    pub const MMIO_GEN_LOW_SHIFT: u32 = 3;
    /// Number of generation bits stored low (bits 3..=10).
    pub const MMIO_GEN_LOW_BITS: u32 = 8;
    /// Low generation bits in the SPTE (bits 3..=10).
    pub const MMIO_GEN_LOW_MASK: u64 = ((1 << MMIO_GEN_LOW_BITS) - 1) << MMIO_GEN_LOW_SHIFT;
    /// First SPTE bit of the high 11 generation bits (bits 52..=62).
    pub const MMIO_GEN_HIGH_SHIFT: u32 = 52;
    /// High generation bits in the SPTE (bits 52..=62).
    pub const MMIO_GEN_HIGH_MASK: u64 =
        ((1 << (MMIO_GEN_BITS - MMIO_GEN_LOW_BITS)) - 1) << MMIO_GEN_HIGH_SHIFT;
}

pub use bits::MMIO_GEN_MASK;

use bits::*;

/// The value the TDP MMU stores in an entry while it changes it (KVM's `FROZEN_SPTE`).
///
/// RWX is clear, so hardware sees it as not present (a vCPU touching it takes an EPT
/// violation and retries); MMU_PRESENT is clear and RWX is not the MMIO value, so it is
/// neither shadow-present nor MMIO. Other threads that read it must back off and retry.
pub const FROZEN: Spte = Spte(0x5a0);

/// An EPT memory type (the values hardware accepts; 2, 3 and 7 are reserved).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum MemType {
    /// Uncacheable.
    Uc = 0,
    /// Write-combining.
    Wc = 1,
    /// Write-through.
    Wt = 4,
    /// Write-protected.
    Wp = 5,
    /// Write-back: what KVM uses for ordinary RAM.
    Wb = 6,
}

impl MemType {
    /// The memory type with encoding `bits`, or `None` for a reserved encoding (2, 3, 7)
    /// or one wider than 3 bits.
    #[inline]
    pub const fn from_bits(bits: u8) -> Option<MemType> {
        match bits {
            0 => Some(MemType::Uc),
            1 => Some(MemType::Wc),
            4 => Some(MemType::Wt),
            5 => Some(MemType::Wp),
            6 => Some(MemType::Wb),
            _ => None,
        }
    }

    /// The 3-bit encoding.
    #[inline]
    pub const fn bits(self) -> u8 {
        self as u8
    }

    /// A short name ("UC", "WC", "WT", "WP", "WB").
    pub const fn name(self) -> &'static str {
        match self {
            MemType::Uc => "UC",
            MemType::Wc => "WC",
            MemType::Wt => "WT",
            MemType::Wp => "WP",
            MemType::Wb => "WB",
        }
    }
}

/// The attributes of a leaf SPTE besides its frame and level.
///
/// Leaves are always readable (EPT forbids W without R; a present legacy entry is
/// readable), so there is no `readable` field. `writable` requires `mmu_writable` and
/// `host_writable` (checked by [`SpteFormat::leaf`] in debug builds).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct LeafAttrs {
    /// Guest writes are allowed now (W, bit 1).
    pub writable: bool,
    /// Guest instruction fetches are allowed (EPT X set, legacy NX clear).
    pub executable: bool,
    /// The host mapping is writable ([`bits::HOST_WRITABLE`]).
    pub host_writable: bool,
    /// The MMU may make the leaf writable: not write-tracked ([`bits::MMU_WRITABLE`]).
    pub mmu_writable: bool,
    /// Pre-set the accessed bit.
    pub accessed: bool,
    /// Pre-set the dirty bit.
    pub dirty: bool,
    /// The EPT memory type (ignored by a format without the field).
    pub memtype: MemType,
    /// Ignore the guest PAT (ignored by a format without the bit).
    pub ignore_pat: bool,
}

impl LeafAttrs {
    /// The default attributes, usable in `const` context: read+execute, not writable, no
    /// software writable bits, A and D clear, write-back with ignore-PAT (what KVM uses
    /// for RAM without non-coherent DMA).
    pub const DEFAULT: LeafAttrs = LeafAttrs {
        writable: false,
        executable: true,
        host_writable: false,
        mmu_writable: false,
        accessed: false,
        dirty: false,
        memtype: MemType::Wb,
        ignore_pat: true,
    };
}

impl Default for LeafAttrs {
    /// [`LeafAttrs::DEFAULT`].
    fn default() -> Self {
        LeafAttrs::DEFAULT
    }
}

/// A 64-bit SPTE in either format (see the module docs for the four kinds, the
/// invariants the constructors keep, and which bits are every format's).
///
/// This is a plain value; live entries are atomics in `table`, read into an `Spte` and
/// written back with a store, exchange or compare-exchange.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Spte(pub u64);

#[inline]
const fn bit_if(cond: bool, bit: u64) -> u64 {
    if cond {
        bit
    } else {
        0
    }
}

/// The debug checks every leaf constructor makes (every format): a leaf level, a pfn
/// that fits in 40 bits and is aligned to the level, and W only with MMU- and
/// host-writable.
#[inline]
const fn debug_check_leaf(pfn: Pfn, level: Level, attrs: &LeafAttrs) {
    debug_assert!(
        (level as u8) <= (Level::L1G as u8),
        "leaf SPTEs exist at 4K, 2M and 1G only"
    );
    debug_assert!(pfn.0 <= MAX_PFN, "pfn wider than 40 bits");
    debug_assert!(
        pfn.0 & (level.pages() - 1) == 0,
        "huge-page pfn not aligned to its level"
    );
    debug_assert!(
        !attrs.writable || (attrs.mmu_writable && attrs.host_writable),
        "writable leaf must be MMU-writable and host-writable"
    );
}

impl Spte {
    /// The empty entry: not present, not MMIO.
    pub const NONE: Spte = Spte(0);

    /// An MMIO SPTE caching "`gfn` is emulated MMIO as of memslot `generation`", in
    /// every format (one encoding for all: see [`SpteFormat::new`]).
    ///
    /// `generation` is truncated to [`MMIO_GEN_BITS`] bits; its low 8 bits go to SPTE
    /// bits 3..=10 and the high 11 to bits 52..=62. The result is never shadow-present;
    /// to EPT hardware it is a misconfiguration, to legacy hardware not present (P clear).
    #[inline]
    pub const fn new_mmio(gfn: Gfn, generation: u64) -> Spte {
        debug_assert!(gfn.0 <= MAX_PFN, "gfn wider than 40 bits");
        let gen = generation & MMIO_GEN_MASK;
        let low = (gen << MMIO_GEN_LOW_SHIFT) & MMIO_GEN_LOW_MASK;
        let high = ((gen >> MMIO_GEN_LOW_BITS) << MMIO_GEN_HIGH_SHIFT) & MMIO_GEN_HIGH_MASK;
        Spte(MMIO_VALUE | ((gfn.0 << PFN_SHIFT) & PFN_MASK) | low | high)
    }

    /// Whether every bit of `mask` is set together with [`bits::MMU_PRESENT`].
    #[inline]
    const fn present_with(self, mask: u64) -> bool {
        self.0 & (MMU_PRESENT | mask) == MMU_PRESENT | mask
    }

    /// Shadow-present: a leaf or non-leaf the MMU installed ([`bits::MMU_PRESENT`] set).
    #[inline]
    pub const fn is_shadow_present(self) -> bool {
        self.0 & MMU_PRESENT != 0
    }

    /// An MMIO SPTE made by [`Spte::new_mmio`].
    #[inline]
    pub const fn is_mmio(self) -> bool {
        self.0 & MMIO_MASK == MMIO_VALUE
    }

    /// Exactly [`FROZEN`].
    #[inline]
    pub const fn is_frozen(self) -> bool {
        self.0 == FROZEN.0
    }

    /// A shadow-present entry with the page-size bit set (a 2M or 1G leaf).
    #[inline]
    pub const fn is_large(self) -> bool {
        self.present_with(LARGE)
    }

    /// A shadow-present leaf, given the level of the table the entry lives in: every
    /// present entry at 4K, and present entries with LARGE set above it.
    #[inline]
    pub const fn is_leaf(self, level: Level) -> bool {
        self.is_shadow_present() && (matches!(level, Level::L4K) || self.0 & LARGE != 0)
    }

    /// Shadow-present and writable right now (W, bit 1 in every format).
    #[inline]
    pub const fn is_writable(self) -> bool {
        self.present_with(WRITABLE)
    }

    /// Shadow-present with [`bits::HOST_WRITABLE`] set.
    #[inline]
    pub const fn is_host_writable(self) -> bool {
        self.present_with(HOST_WRITABLE)
    }

    /// Shadow-present with [`bits::MMU_WRITABLE`] set (not write-tracked).
    #[inline]
    pub const fn is_mmu_writable(self) -> bool {
        self.present_with(MMU_WRITABLE)
    }

    /// The frame field (bits 12..=51): the mapped frame of a leaf, the child table's
    /// frame of a non-leaf. Meaningful only for shadow-present SPTEs.
    #[inline]
    pub const fn pfn(self) -> Pfn {
        Pfn((self.0 & PFN_MASK) >> PFN_SHIFT)
    }

    /// The gfn of an MMIO SPTE. Meaningful only when [`Spte::is_mmio`].
    #[inline]
    pub const fn mmio_gfn(self) -> Gfn {
        Gfn((self.0 & PFN_MASK) >> PFN_SHIFT)
    }

    /// The memslot generation of an MMIO SPTE (19 bits). Meaningful only when
    /// [`Spte::is_mmio`].
    #[inline]
    pub const fn mmio_generation(self) -> u64 {
        ((self.0 & MMIO_GEN_LOW_MASK) >> MMIO_GEN_LOW_SHIFT)
            | (((self.0 & MMIO_GEN_HIGH_MASK) >> MMIO_GEN_HIGH_SHIFT) << MMIO_GEN_LOW_BITS)
    }

    /// KVM's fast-page-fault condition: host-writable and MMU-writable, so a write fault
    /// on this (write-protected) leaf may be fixed by setting W with a compare-exchange
    /// and no MMU lock.
    #[inline]
    pub const fn can_be_made_writable_locklessly(self) -> bool {
        self.present_with(HOST_WRITABLE | MMU_WRITABLE)
    }

    /// This SPTE with `mask` set.
    #[inline]
    #[must_use]
    pub const fn with_bits(self, mask: u64) -> Spte {
        Spte(self.0 | mask)
    }

    /// This SPTE with `mask` cleared.
    #[inline]
    #[must_use]
    pub const fn without_bits(self, mask: u64) -> Spte {
        Spte(self.0 & !mask)
    }

    /// Write-protected for dirty logging: W cleared, MMU_WRITABLE kept, so the next write
    /// fault may restore W through the lockless fast path.
    #[inline]
    #[must_use]
    pub const fn write_protected(self) -> Spte {
        self.without_bits(WRITABLE)
    }

    /// Write-protected for write tracking (e.g. a shadowed guest page table): W and
    /// MMU_WRITABLE cleared, so only the MMU, under its lock, may make it writable again.
    #[inline]
    #[must_use]
    pub const fn write_tracked(self) -> Spte {
        self.without_bits(WRITABLE | MMU_WRITABLE)
    }

    /// With W set (only W: the CPU sets D when it writes). Debug builds check that the
    /// SPTE [can be made writable locklessly](Spte::can_be_made_writable_locklessly).
    #[inline]
    #[must_use]
    pub const fn made_writable(self) -> Spte {
        debug_assert!(
            self.can_be_made_writable_locklessly(),
            "making writable an SPTE that is not host- and MMU-writable"
        );
        self.with_bits(WRITABLE)
    }

    /// With the frame field replaced by `pfn` (debug builds check it fits in 40 bits).
    #[inline]
    #[must_use]
    pub const fn with_pfn(self, pfn: Pfn) -> Spte {
        debug_assert!(pfn.0 <= MAX_PFN, "pfn wider than 40 bits");
        Spte((self.0 & !PFN_MASK) | ((pfn.0 << PFN_SHIFT) & PFN_MASK))
    }
}

/// Decodes the EPT bits (an SPTE does not know its format; a legacy SPTE prints its raw
/// value and EPT names for its bits).
impl fmt::Debug for Spte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Spte({:#x}", self.0)?;
        if self.0 == 0 {
            return f.write_str(" none)");
        }
        if self.is_frozen() {
            return f.write_str(" frozen)");
        }
        if self.is_mmio() {
            return write!(
                f,
                " mmio gfn={:#x} gen={:#x})",
                self.mmio_gfn().0,
                self.mmio_generation()
            );
        }
        if !self.is_shadow_present() {
            f.write_str(" not-present")?;
            if SpteFormat::EPT.hw_present(*self) {
                f.write_str(" hw-present")?;
            }
            if SpteFormat::EPT.is_misconfig(*self) {
                f.write_str(" misconfig")?;
            }
            return f.write_str(")");
        }
        let s = self.0;
        f.write_str(if s & LARGE != 0 { " large" } else { " present" })?;
        write!(f, " pfn={:#x} ", self.pfn().0)?;
        for (bit, name) in [(READABLE, "R"), (WRITABLE, "W"), (EXECUTABLE, "X")] {
            f.write_str(if s & bit != 0 { name } else { "-" })?;
        }
        if s & ACCESSED != 0 {
            f.write_str(" A")?;
        }
        if s & DIRTY != 0 {
            f.write_str(" D")?;
        }
        let mt = ((s & MT_MASK) >> MT_SHIFT) as u8;
        match MemType::from_bits(mt) {
            Some(m) => write!(f, " mt={}", m.name())?,
            None => write!(f, " mt=reserved({mt})")?,
        }
        if s & IGNORE_PAT != 0 {
            f.write_str(" ipat")?;
        }
        if s & HOST_WRITABLE != 0 {
            f.write_str(" hw")?;
        }
        if s & MMU_WRITABLE != 0 {
            f.write_str(" mw")?;
        }
        if SpteFormat::EPT.is_misconfig(*self) {
            f.write_str(" misconfig")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use proptest::prelude::*;

    const PFN: Pfn = Pfn(0x1234);
    const EPT: SpteFormat = SpteFormat::EPT;

    /// An EPT leaf (the tests of this module are EPT's; see `format` for legacy).
    fn new_leaf(pfn: Pfn, level: Level, attrs: LeafAttrs) -> Spte {
        EPT.leaf(pfn, level, attrs, true)
    }

    fn rw_attrs() -> LeafAttrs {
        LeafAttrs {
            writable: true,
            host_writable: true,
            mmu_writable: true,
            ..LeafAttrs::default()
        }
    }

    #[test]
    fn bit_layout_is_kvm_ept() {
        assert_eq!(READABLE, 0x1);
        assert_eq!(WRITABLE, 0x2);
        assert_eq!(EXECUTABLE, 0x4);
        assert_eq!(RWX_MASK, 0x7);
        assert_eq!(MT_MASK, 0x38);
        assert_eq!(IGNORE_PAT, 0x40);
        assert_eq!(LARGE, 0x80);
        assert_eq!(ACCESSED, 0x100);
        assert_eq!(DIRTY, 0x200);
        assert_eq!(MMU_PRESENT, 0x800);
        assert_eq!(PFN_MASK, 0x000f_ffff_ffff_f000);
        assert_eq!(MAX_PFN, (1 << 40) - 1);
        assert_eq!(HOST_WRITABLE, 1 << 57);
        assert_eq!(MMU_WRITABLE, 1 << 58);
        assert_eq!(MMIO_MASK, 0x807);
        assert_eq!(MMIO_VALUE, 0x6);
        assert_eq!(MMIO_GEN_MASK, 0x7_ffff);
        assert_eq!(MMIO_GEN_LOW_MASK, 0x7f8);
        assert_eq!(MMIO_GEN_HIGH_MASK, 0x7ff0_0000_0000_0000);
        // The generation fields, the gfn and the MMIO value do not overlap.
        assert_eq!(MMIO_GEN_LOW_MASK & MMIO_GEN_HIGH_MASK, 0);
        assert_eq!(
            (MMIO_GEN_LOW_MASK | MMIO_GEN_HIGH_MASK) & (PFN_MASK | MMIO_MASK),
            0
        );
        assert_eq!(MMIO_GEN_LOW_MASK & MMU_PRESENT, 0);
    }

    #[test]
    fn default_attrs() {
        let a = LeafAttrs::default();
        assert!(!a.writable && a.executable);
        assert!(!a.host_writable && !a.mmu_writable);
        assert!(!a.accessed && !a.dirty);
        assert_eq!(a.memtype, MemType::Wb);
        assert!(a.ignore_pat);
    }

    #[test]
    fn default_leaf_sets_exactly_r_x_wb_ipat_present() {
        let s = new_leaf(PFN, Level::L4K, LeafAttrs::default());
        assert_eq!(s.0, 0x1 | 0x4 | (6 << 3) | 0x40 | 0x800 | (0x1234 << 12));
    }

    #[test]
    fn each_leaf_attribute_sets_exactly_its_bit() {
        let base = LeafAttrs {
            writable: false,
            executable: false,
            host_writable: false,
            mmu_writable: false,
            accessed: false,
            dirty: false,
            memtype: MemType::Uc,
            ignore_pat: false,
        };
        let b = new_leaf(Pfn(0), Level::L4K, base).0;
        assert_eq!(b, 0x801, "bare leaf is R + MMU_PRESENT");
        let one = |a: LeafAttrs| new_leaf(Pfn(0), Level::L4K, a).0 ^ b;
        assert_eq!(
            one(LeafAttrs {
                executable: true,
                ..base
            }),
            0x4
        );
        assert_eq!(
            one(LeafAttrs {
                host_writable: true,
                ..base
            }),
            1 << 57
        );
        assert_eq!(
            one(LeafAttrs {
                mmu_writable: true,
                ..base
            }),
            1 << 58
        );
        assert_eq!(
            one(LeafAttrs {
                accessed: true,
                ..base
            }),
            0x100
        );
        assert_eq!(
            one(LeafAttrs {
                dirty: true,
                ..base
            }),
            0x200
        );
        assert_eq!(
            one(LeafAttrs {
                ignore_pat: true,
                ..base
            }),
            0x40
        );
        assert_eq!(
            one(LeafAttrs {
                writable: true,
                host_writable: true,
                mmu_writable: true,
                ..base
            }),
            0x2 | (1 << 57) | (1 << 58)
        );
        for (mt, v) in [
            (MemType::Uc, 0),
            (MemType::Wc, 1),
            (MemType::Wt, 4),
            (MemType::Wp, 5),
            (MemType::Wb, 6),
        ] {
            assert_eq!(
                one(LeafAttrs {
                    memtype: mt,
                    ..base
                }),
                v << 3
            );
            assert_eq!(
                EPT.memtype(new_leaf(
                    PFN,
                    Level::L4K,
                    LeafAttrs {
                        memtype: mt,
                        ..base
                    }
                )),
                Some(mt)
            );
        }
        assert_eq!(new_leaf(Pfn(1), Level::L4K, base).0 ^ b, 0x1000);
    }

    #[test]
    fn large_leaves_at_2m_and_1g() {
        let s4 = new_leaf(Pfn(0x200), Level::L4K, LeafAttrs::default());
        let s2 = new_leaf(Pfn(0x200), Level::L2M, LeafAttrs::default());
        let s1 = new_leaf(Pfn(0x40000), Level::L1G, LeafAttrs::default());
        assert_eq!(s2.0 ^ s4.0, 0x80);
        assert!(!s4.is_large() && s2.is_large() && s1.is_large());
        assert_eq!(s2.pfn(), Pfn(0x200));
        assert_eq!(s1.pfn(), Pfn(0x40000));
        assert!(s4.is_leaf(Level::L4K));
        assert!(s2.is_leaf(Level::L2M));
        assert!(s1.is_leaf(Level::L1G));
    }

    #[test]
    #[should_panic(expected = "not aligned")]
    #[cfg(debug_assertions)]
    fn misaligned_huge_pfn_is_caught() {
        let _ = new_leaf(Pfn(0x201), Level::L2M, LeafAttrs::default());
    }

    #[test]
    #[should_panic(expected = "MMU-writable")]
    #[cfg(debug_assertions)]
    fn writable_without_mmu_writable_is_caught() {
        let a = LeafAttrs {
            writable: true,
            host_writable: true,
            ..LeafAttrs::default()
        };
        let _ = new_leaf(PFN, Level::L4K, a);
    }

    #[test]
    #[should_panic(expected = "4K, 2M and 1G")]
    #[cfg(debug_assertions)]
    fn leaf_at_512g_is_caught() {
        let _ = new_leaf(Pfn(0), Level::L512G, LeafAttrs::default());
    }

    #[test]
    fn nonleaf_sets_rwx_present_and_child() {
        let s = EPT.nonleaf(Pfn(0xabcde));
        assert_eq!(s.0, 0x7 | 0x800 | (0xabcde << 12));
        assert!(s.is_shadow_present() && !s.is_large() && !s.is_mmio());
        assert!(!s.is_leaf(Level::L2M) && !s.is_leaf(Level::L512G));
        assert!(s.is_leaf(Level::L4K), "at 4K every present entry is a leaf");
        assert!(!EPT.is_accessed(s) && !EPT.is_dirty(s));
        assert_eq!(s.pfn(), Pfn(0xabcde));
        assert!(!EPT.is_misconfig(s) && EPT.hw_present(s));
    }

    #[test]
    fn pfn_round_trip_at_max_40_bits() {
        for pfn in [0, 1, MAX_PFN, MAX_PFN & !511, MAX_PFN & !((1 << 18) - 1)] {
            let level = if pfn & ((1 << 18) - 1) == 0 {
                Level::L1G
            } else if pfn & 511 == 0 {
                Level::L2M
            } else {
                Level::L4K
            };
            let s = new_leaf(Pfn(pfn), level, rw_attrs());
            assert_eq!(s.pfn(), Pfn(pfn));
            // Nothing of the pfn leaks outside the field.
            assert_eq!(s.0 & !PFN_MASK, new_leaf(Pfn(0), level, rw_attrs()).0);
            assert_eq!(EPT.nonleaf(Pfn(pfn)).pfn(), Pfn(pfn));
            assert_eq!(
                new_leaf(Pfn(0), Level::L4K, rw_attrs())
                    .with_pfn(Pfn(pfn))
                    .pfn(),
                Pfn(pfn)
            );
        }
        let s = new_leaf(Pfn(MAX_PFN), Level::L4K, LeafAttrs::default());
        assert_eq!(s.0 & PFN_MASK, PFN_MASK);
        assert_eq!(s.with_pfn(Pfn(5)).0, (s.0 & !PFN_MASK) | (5 << 12));
    }

    #[test]
    fn mmio_round_trips_gfn_and_generation() {
        let gens = [
            0,
            1,
            0xff,
            0x100,
            0x101,
            0x7f_ff,
            0x4_0000,
            MMIO_GEN_MASK - 1,
            MMIO_GEN_MASK,
        ];
        let gfns = [0, 1, 0x1234, MAX_PFN];
        for &gen in &gens {
            for &gfn in &gfns {
                let s = Spte::new_mmio(Gfn(gfn), gen);
                assert!(s.is_mmio(), "{s:?}");
                assert!(!s.is_shadow_present());
                assert!(!s.is_frozen());
                assert!(EPT.is_misconfig(s));
                assert!(EPT.hw_present(s));
                assert_eq!(s.mmio_gfn(), Gfn(gfn));
                assert_eq!(s.mmio_generation(), gen);
                assert_eq!(s.0 & MMIO_MASK, 0b110);
                // Present-only predicates say no, though bits 1 and 2 are set.
                assert!(!s.is_writable() && !EPT.is_executable(s) && !EPT.is_readable(s));
                assert!(!s.is_large() && !EPT.is_accessed(s) && !EPT.is_dirty(s));
                assert!(!s.is_leaf(Level::L4K) && !EPT.has_volatile_bits(s));
                assert_eq!(EPT.memtype(s), None);
            }
        }
        // A generation above the mask is truncated.
        assert_eq!(
            Spte::new_mmio(Gfn(7), MMIO_GEN_MASK + 1).mmio_generation(),
            0
        );
        assert_eq!(
            Spte::new_mmio(Gfn(7), (MMIO_GEN_MASK + 1) | 5).mmio_generation(),
            5
        );
        assert_eq!(
            Spte::new_mmio(Gfn(7), u64::MAX).mmio_generation(),
            MMIO_GEN_MASK
        );
        // Exact placement: low 8 bits at 3..=10, high 11 at 52..=62.
        assert_eq!(Spte::new_mmio(Gfn(0), 0xff).0, 0x6 | (0xff << 3));
        assert_eq!(Spte::new_mmio(Gfn(0), 0x100).0, 0x6 | (1 << 52));
        assert_eq!(
            Spte::new_mmio(Gfn(0), MMIO_GEN_MASK).0,
            0x6 | 0x7f8 | (0x7ff << 52)
        );
        assert_eq!(
            Spte::new_mmio(Gfn(0), MMIO_GEN_MASK).0 >> 63,
            0,
            "bit 63 stays clear"
        );
        assert_eq!(Spte::new_mmio(Gfn(0x1234), 0).0, 0x6 | (0x1234 << 12));
    }

    #[test]
    fn frozen_is_neither_present_nor_mmio() {
        assert!(!FROZEN.is_shadow_present());
        assert!(!FROZEN.is_mmio());
        assert!(!EPT.hw_present(FROZEN));
        assert!(!EPT.is_misconfig(FROZEN));
        assert!(FROZEN.is_frozen());
        assert!(!FROZEN.is_large() && !EPT.is_accessed(FROZEN));
        assert!(!FROZEN.is_leaf(Level::L4K) && !FROZEN.is_leaf(Level::L2M));
        assert!(!EPT.has_volatile_bits(FROZEN));
        assert!(!Spte::NONE.is_frozen());
        assert!(!new_leaf(PFN, Level::L4K, LeafAttrs::default()).is_frozen());
    }

    #[test]
    fn none_is_nothing() {
        let s = Spte::NONE;
        assert_eq!(s, Spte::default());
        assert!(!s.is_shadow_present() && !s.is_mmio() && !s.is_frozen());
        assert!(!EPT.hw_present(s) && !EPT.is_misconfig(s) && !EPT.has_volatile_bits(s));
        assert!(!s.is_leaf(Level::L4K));
        assert_eq!(EPT.memtype(s), None);
    }

    #[test]
    fn predicates_true_and_false() {
        let ro = new_leaf(
            PFN,
            Level::L4K,
            LeafAttrs {
                executable: false,
                ignore_pat: false,
                ..LeafAttrs::default()
            },
        );
        let full = new_leaf(
            PFN,
            Level::L4K,
            LeafAttrs {
                accessed: true,
                dirty: true,
                ..rw_attrs()
            },
        );
        assert!(ro.is_shadow_present() && full.is_shadow_present());
        assert!(EPT.is_readable(ro) && EPT.is_readable(full));
        assert!(!ro.is_writable() && full.is_writable());
        assert!(!EPT.is_executable(ro) && EPT.is_executable(full));
        assert!(!EPT.is_accessed(ro) && EPT.is_accessed(full));
        assert!(!EPT.is_dirty(ro) && EPT.is_dirty(full));
        assert!(!ro.is_host_writable() && full.is_host_writable());
        assert!(!ro.is_mmu_writable() && full.is_mmu_writable());
        assert!(!EPT.ignore_pat(ro) && EPT.ignore_pat(full));
        assert!(!ro.is_large() && !full.is_large());
        assert!(!ro.can_be_made_writable_locklessly() && full.can_be_made_writable_locklessly());
        assert!(!ro.is_mmio() && !full.is_mmio());
        assert!(!ro.is_leaf(Level::L2M) && ro.is_leaf(Level::L4K));
        // The software writable bits alone.
        let hw_only = ro.with_bits(HOST_WRITABLE);
        let mw_only = ro.with_bits(MMU_WRITABLE);
        assert!(hw_only.is_host_writable() && !hw_only.is_mmu_writable());
        assert!(!hw_only.can_be_made_writable_locklessly());
        assert!(mw_only.is_mmu_writable() && !mw_only.is_host_writable());
        assert!(!mw_only.can_be_made_writable_locklessly());
        // Raw bits without MMU_PRESENT do not count.
        let raw =
            Spte(RWX_MASK | ACCESSED | DIRTY | LARGE | HOST_WRITABLE | MMU_WRITABLE | IGNORE_PAT);
        assert!(!raw.is_shadow_present() && !EPT.is_readable(raw) && !raw.is_writable());
        assert!(
            !EPT.is_executable(raw)
                && !EPT.is_accessed(raw)
                && !EPT.is_dirty(raw)
                && !raw.is_large()
        );
        assert!(!raw.is_host_writable() && !raw.is_mmu_writable() && !EPT.ignore_pat(raw));
        assert!(!raw.can_be_made_writable_locklessly());
        assert!(EPT.hw_present(raw));
    }

    #[test]
    fn builders_change_only_their_bits() {
        let full = new_leaf(
            PFN,
            Level::L4K,
            LeafAttrs {
                accessed: true,
                dirty: true,
                ..rw_attrs()
            },
        );
        assert_eq!(full.write_protected().0, full.0 & !0x2);
        assert!(full.write_protected().is_mmu_writable());
        assert!(full.write_protected().can_be_made_writable_locklessly());
        assert_eq!(full.write_tracked().0, full.0 & !(0x2 | (1 << 58)));
        assert!(!full.write_tracked().can_be_made_writable_locklessly());
        assert_eq!(full.write_protected().made_writable(), full);
        assert_eq!(full.without_bits(ACCESSED | DIRTY).0, full.0 & !0x300);
        assert_eq!(full.without_bits(ACCESSED).with_bits(ACCESSED), full);
        assert_eq!(full.with_pfn(Pfn(9)).0, (full.0 & !PFN_MASK) | 0x9000);
    }

    #[test]
    #[should_panic(expected = "not host- and MMU-writable")]
    #[cfg(debug_assertions)]
    fn made_writable_of_tracked_is_caught() {
        let _ = new_leaf(PFN, Level::L4K, rw_attrs())
            .write_tracked()
            .made_writable();
    }

    #[test]
    fn volatile_bits_truth_table() {
        // (accessed, writable, dirty, host_writable, mmu_writable) -> volatile
        for a in [false, true] {
            for w in [false, true] {
                for d in [false, true] {
                    for hw in [false, true] {
                        for mw in [false, true] {
                            if w && !(hw && mw) {
                                continue; // not constructible
                            }
                            let s = new_leaf(
                                PFN,
                                Level::L4K,
                                LeafAttrs {
                                    writable: w,
                                    accessed: a,
                                    dirty: d,
                                    host_writable: hw,
                                    mmu_writable: mw,
                                    ..LeafAttrs::default()
                                },
                            );
                            let expect = !a || (w && !d) || (!w && hw && mw);
                            assert_eq!(
                                EPT.has_volatile_bits(s),
                                expect,
                                "a={a} w={w} d={d} hw={hw} mw={mw}"
                            );
                        }
                    }
                }
            }
        }
        // Non-volatile leaves: accessed, and neither writable-clean nor waiting to be made
        // writable locklessly. A writable, dirty, accessed leaf is stable too.
        let stable = new_leaf(
            PFN,
            Level::L4K,
            LeafAttrs {
                accessed: true,
                ..LeafAttrs::default()
            },
        );
        assert!(!EPT.has_volatile_bits(stable));
        assert!(EPT.has_volatile_bits(stable.without_bits(ACCESSED)));
        // A non-leaf has no A bit set, so it is volatile (the CPU may set A).
        assert!(EPT.has_volatile_bits(EPT.nonleaf(PFN)));
    }

    #[test]
    fn misconfig_detection() {
        // W without R, with and without X.
        assert!(EPT.is_misconfig(Spte(0b010)));
        assert!(EPT.is_misconfig(Spte(0b110)));
        assert!(EPT.is_misconfig(Spte(0b010 | MMU_PRESENT)));
        // Legal access combinations.
        for rwx in [0b000, 0b001, 0b011, 0b100, 0b101, 0b111] {
            assert!(!EPT.is_misconfig(Spte(rwx | (6 << 3))), "rwx={rwx:03b}");
        }
        // Reserved memory types in a present entry.
        for mt in 0..8u64 {
            let s = Spte(READABLE | MMU_PRESENT | (mt << 3));
            let reserved = matches!(mt, 2 | 3 | 7);
            assert_eq!(EPT.is_misconfig(s), reserved, "mt={mt}");
            assert_eq!(EPT.memtype(s).is_none(), reserved);
            assert_eq!(MemType::from_bits(mt as u8).is_none(), reserved);
            // Not present to hardware: nothing is checked.
            assert!(!EPT.is_misconfig(Spte(mt << 3)));
        }
        assert_eq!(MemType::from_bits(8), None);
        // Constructors never produce a misconfig except MMIO.
        assert!(!EPT.is_misconfig(new_leaf(PFN, Level::L4K, rw_attrs())));
        assert!(!EPT.is_misconfig(EPT.nonleaf(PFN)));
        assert!(EPT.is_misconfig(Spte::new_mmio(Gfn(1), 1)));
    }

    #[test]
    fn hw_present_is_any_rwx() {
        assert!(!EPT.hw_present(Spte(0)));
        assert!(!EPT.hw_present(Spte(!RWX_MASK)));
        for b in [READABLE, WRITABLE, EXECUTABLE] {
            assert!(EPT.hw_present(Spte(b)));
        }
    }

    #[test]
    fn debug_decodes() {
        let s = new_leaf(
            Pfn(0x1234),
            Level::L4K,
            LeafAttrs {
                accessed: true,
                dirty: true,
                ..rw_attrs()
            },
        );
        let d = format!("{s:?}");
        assert!(
            d.contains("present pfn=0x1234 RWX A D mt=WB ipat hw mw"),
            "{d}"
        );
        let l = new_leaf(Pfn(0x200), Level::L2M, LeafAttrs::default());
        assert!(
            format!("{l:?}").contains("large pfn=0x200 R-X mt=WB ipat)"),
            "{l:?}"
        );
        assert_eq!(format!("{:?}", Spte::NONE), "Spte(0x0 none)");
        assert_eq!(format!("{FROZEN:?}"), "Spte(0x5a0 frozen)");
        let m = format!("{:?}", Spte::new_mmio(Gfn(0x42), 0x101));
        assert!(m.contains("mmio gfn=0x42 gen=0x101"), "{m}");
        assert!(format!("{:?}", Spte(0x2)).contains("misconfig"));
    }

    fn memtype_strategy() -> impl Strategy<Value = MemType> {
        prop_oneof![
            Just(MemType::Uc),
            Just(MemType::Wc),
            Just(MemType::Wt),
            Just(MemType::Wp),
            Just(MemType::Wb),
        ]
    }

    fn attrs_strategy() -> impl Strategy<Value = LeafAttrs> {
        (any::<[bool; 7]>(), memtype_strategy()).prop_map(|(b, memtype)| {
            let (host_writable, mmu_writable) = (b[1], b[2]);
            LeafAttrs {
                writable: b[0] && host_writable && mmu_writable,
                executable: b[3],
                host_writable,
                mmu_writable,
                accessed: b[4],
                dirty: b[5],
                memtype,
                ignore_pat: b[6],
            }
        })
    }

    proptest! {
        #[test]
        fn new_leaf_round_trips_every_field(
            raw_pfn in 0..=MAX_PFN,
            level in prop_oneof![Just(Level::L4K), Just(Level::L2M), Just(Level::L1G)],
            attrs in attrs_strategy(),
        ) {
            let pfn = Pfn(raw_pfn & !(level.pages() - 1));
            let s = new_leaf(pfn, level, attrs);
            prop_assert!(s.is_shadow_present());
            prop_assert!(s.is_leaf(level));
            prop_assert!(!s.is_mmio() && !s.is_frozen() && !EPT.is_misconfig(s));
            prop_assert!(EPT.is_readable(s));
            prop_assert_eq!(s.pfn(), pfn);
            prop_assert_eq!(s.is_large(), level != Level::L4K);
            prop_assert_eq!(s.is_writable(), attrs.writable);
            prop_assert_eq!(EPT.is_executable(s), attrs.executable);
            prop_assert_eq!(s.is_host_writable(), attrs.host_writable);
            prop_assert_eq!(s.is_mmu_writable(), attrs.mmu_writable);
            prop_assert_eq!(EPT.is_accessed(s), attrs.accessed);
            prop_assert_eq!(EPT.is_dirty(s), attrs.dirty);
            prop_assert_eq!(EPT.memtype(s), Some(attrs.memtype));
            prop_assert_eq!(EPT.ignore_pat(s), attrs.ignore_pat);
            // No stray bits: everything outside the known fields is zero.
            let known = RWX_MASK | MT_MASK | IGNORE_PAT | LARGE | ACCESSED | DIRTY
                | MMU_PRESENT | PFN_MASK | HOST_WRITABLE | MMU_WRITABLE;
            prop_assert_eq!(s.0 & !known, 0);
            prop_assert_eq!(s.with_pfn(pfn), s);
        }
    }
}
