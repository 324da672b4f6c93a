//! The MMU's vocabulary: frame numbers, addresses, page-table levels, access kinds and
//! fault error codes, named as KVM names them.
//!
//! Every address type is a transparent `u64` newtype so that a gfn can never be passed
//! where a pfn is expected; conversions are explicit and free.

use core::fmt;

/// Size of the base page, 4 KiB.
pub const PAGE_SHIFT: u32 = 12;
/// Size of the base page in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Entries in one page table.
pub const SPTE_ENT_PER_PAGE: usize = 512;

macro_rules! frame_or_addr {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

frame_or_addr!(
    /// Guest frame number: a guest-physical address shifted right by 12.
    Gfn
);
frame_or_addr!(
    /// Host frame number: a host-physical address shifted right by 12.
    Pfn
);
frame_or_addr!(
    /// Guest-physical address.
    Gpa
);
frame_or_addr!(
    /// Host-virtual address (the VMM's `userspace_addr` space).
    Hva
);
frame_or_addr!(
    /// Host-physical address.
    Hpa
);
frame_or_addr!(
    /// Guest-virtual address (shadow paging: what the guest's own page tables map).
    Gva
);

impl Gva {
    /// Offset inside the 4 KiB page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
    /// The 4 KiB virtual page number (the address shifted right by 12).
    #[inline]
    pub const fn vpn(self) -> u64 {
        (self.0 & ((1 << 48) - 1)) >> PAGE_SHIFT
    }
    /// Index of this address in a table of `level` (the 9 bits that select the entry).
    #[inline]
    pub const fn index_at(self, level: Level) -> usize {
        ((self.0 >> (PAGE_SHIFT + level.gfn_shift())) & 511) as usize
    }
    /// Whether the address is canonical for 4-level paging (bits 63..=47 all equal).
    #[inline]
    pub const fn is_canonical(self) -> bool {
        let top = self.0 >> 47;
        top == 0 || top == (1 << 17) - 1
    }
}

impl Gpa {
    /// The frame this address lies in.
    #[inline]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
    /// Offset inside the 4 KiB page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
}

impl Gfn {
    /// First byte of the frame.
    #[inline]
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
    /// Round down to the first gfn of the page of `level` containing this gfn.
    #[inline]
    pub const fn align_down(self, level: Level) -> Gfn {
        Gfn(self.0 & !(level.pages() - 1))
    }
    /// Index of this gfn in a table of `level` (bits of the gfn that select the entry).
    #[inline]
    pub const fn index_at(self, level: Level) -> usize {
        ((self.0 >> level.gfn_shift()) & 511) as usize
    }
}

impl Pfn {
    /// First byte of the frame.
    #[inline]
    pub const fn hpa(self) -> Hpa {
        Hpa(self.0 << PAGE_SHIFT)
    }
}

impl Hva {
    /// Frame-sized index of this host-virtual address.
    #[inline]
    pub const fn page(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
}

/// A page-table level in KVM's numbering: 1 maps 4 KiB, 2 maps 2 MiB, 3 maps 1 GiB, 4 is
/// the top of a 4-level table (512 GiB per entry).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[repr(u8)]
pub enum Level {
    /// 4 KiB leaf (PTE).
    L4K = 1,
    /// 2 MiB (PDE).
    L2M = 2,
    /// 1 GiB (PDPTE).
    L1G = 3,
    /// 512 GiB (PML4E); never a leaf.
    L512G = 4,
}

impl Level {
    /// Levels that may hold a leaf, smallest first.
    pub const LEAF_LEVELS: [Level; 3] = [Level::L4K, Level::L2M, Level::L1G];
    /// The top level of the 4-level tables vmmu builds.
    pub const ROOT: Level = Level::L512G;

    /// The level with KVM number `n` (1..=4).
    #[inline]
    pub const fn from_u8(n: u8) -> Option<Level> {
        match n {
            1 => Some(Level::L4K),
            2 => Some(Level::L2M),
            3 => Some(Level::L1G),
            4 => Some(Level::L512G),
            _ => None,
        }
    }
    /// KVM's number for this level.
    #[inline]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }
    /// Index (0-based) into per-leaf-level arrays such as rmaps.
    #[inline]
    pub const fn leaf_index(self) -> usize {
        self as usize - 1
    }
    /// Shift from gfn to the index of this level's entries (0, 9, 18, 27).
    #[inline]
    pub const fn gfn_shift(self) -> u32 {
        (self as u32 - 1) * 9
    }
    /// 4 KiB pages covered by one entry at this level.
    #[inline]
    pub const fn pages(self) -> u64 {
        1 << self.gfn_shift()
    }
    /// Bytes covered by one entry at this level.
    #[inline]
    pub const fn bytes(self) -> u64 {
        self.pages() << PAGE_SHIFT
    }
    /// The level below, if any.
    #[inline]
    pub const fn below(self) -> Option<Level> {
        Level::from_u8(self as u8 - 1)
    }
    /// The level above, if any.
    #[inline]
    pub const fn above(self) -> Option<Level> {
        Level::from_u8(self as u8 + 1)
    }
    /// A short human name ("4K", "2M", "1G", "512G").
    pub const fn name(self) -> &'static str {
        match self {
            Level::L4K => "4K",
            Level::L2M => "2M",
            Level::L1G => "1G",
            Level::L512G => "512G",
        }
    }
}

/// What a guest access does with the memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// Rights a mapping grants, as KVM's `ACC_*` bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AccessFlags(u8);

impl AccessFlags {
    /// Executable (KVM's ACC_EXEC_MASK).
    pub const EXEC: AccessFlags = AccessFlags(1);
    /// Writable (KVM's ACC_WRITE_MASK).
    pub const WRITE: AccessFlags = AccessFlags(2);
    /// User-accessible (KVM's ACC_USER_MASK); always set for EPT.
    pub const USER: AccessFlags = AccessFlags(4);
    /// Everything.
    pub const ALL: AccessFlags = AccessFlags(7);
    /// Nothing beyond read.
    pub const NONE: AccessFlags = AccessFlags(0);

    /// Raw bits.
    #[inline]
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// From raw bits (extra bits dropped).
    #[inline]
    pub const fn from_bits_truncate(b: u8) -> Self {
        AccessFlags(b & 7)
    }
    /// Whether every right in `other` is granted.
    #[inline]
    pub const fn contains(self, other: AccessFlags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    #[inline]
    pub const fn union(self, other: AccessFlags) -> Self {
        AccessFlags(self.0 | other.0)
    }
    /// Intersection.
    #[inline]
    pub const fn intersect(self, other: AccessFlags) -> Self {
        AccessFlags(self.0 & other.0)
    }
    /// Without the rights in `other`.
    #[inline]
    pub const fn without(self, other: AccessFlags) -> Self {
        AccessFlags(self.0 & !other.0)
    }
}

impl fmt::Debug for AccessFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AccessFlags(r{}{}{})",
            if self.contains(Self::WRITE) { "w" } else { "-" },
            if self.contains(Self::EXEC) { "x" } else { "-" },
            if self.contains(Self::USER) { "u" } else { "-" }
        )
    }
}

/// A page-fault error code in x86's `PFERR_*` layout, which KVM uses internally for every
/// fault kind (EPT violations are converted into it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ErrorCode(u32);

impl ErrorCode {
    /// The translation was present (a protection fault, not a not-present fault).
    pub const PRESENT: ErrorCode = ErrorCode(1 << 0);
    /// The access was a write.
    pub const WRITE: ErrorCode = ErrorCode(1 << 1);
    /// The access came from CPL 3.
    pub const USER: ErrorCode = ErrorCode(1 << 2);
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: ErrorCode = ErrorCode(1 << 3);
    /// The access was an instruction fetch.
    pub const FETCH: ErrorCode = ErrorCode(1 << 4);

    /// No bits.
    pub const fn empty() -> Self {
        ErrorCode(0)
    }
    /// Raw bits.
    #[inline]
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// From raw bits (undefined bits dropped).
    #[inline]
    pub const fn from_bits_truncate(b: u32) -> Self {
        ErrorCode(b & 0x1f)
    }
    /// Whether every bit of `other` is set.
    #[inline]
    pub const fn contains(self, other: ErrorCode) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    #[inline]
    pub const fn union(self, other: ErrorCode) -> Self {
        ErrorCode(self.0 | other.0)
    }
    /// The error code of a not-present fault for an access of `kind`.
    #[inline]
    pub const fn for_access(kind: AccessKind) -> Self {
        match kind {
            AccessKind::Read => ErrorCode(0),
            AccessKind::Write => ErrorCode::WRITE,
            AccessKind::Fetch => ErrorCode::FETCH,
        }
    }
    /// The kind of access that faulted.
    #[inline]
    pub const fn access(self) -> AccessKind {
        if self.contains(ErrorCode::WRITE) {
            AccessKind::Write
        } else if self.contains(ErrorCode::FETCH) {
            AccessKind::Fetch
        } else {
            AccessKind::Read
        }
    }
}

impl core::ops::BitOr for ErrorCode {
    type Output = ErrorCode;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ErrorCode(")?;
        let names = [
            (Self::PRESENT, "P"),
            (Self::WRITE, "W"),
            (Self::USER, "U"),
            (Self::RSVD, "RSVD"),
            (Self::FETCH, "F"),
        ];
        let mut first = true;
        for (bit, name) in names {
            if self.contains(bit) && bit.0 != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_cover_the_right_sizes() {
        assert_eq!(Level::L4K.bytes(), 4096);
        assert_eq!(Level::L2M.bytes(), 2 << 20);
        assert_eq!(Level::L1G.bytes(), 1 << 30);
        assert_eq!(Level::L512G.bytes(), 512 << 30);
        assert_eq!(Level::L4K.below(), None);
        assert_eq!(Level::L2M.below(), Some(Level::L4K));
        assert_eq!(Level::ROOT.above(), None);
        for l in 1..=4 {
            assert_eq!(Level::from_u8(l).unwrap().as_u8(), l);
        }
        assert_eq!(Level::from_u8(0), None);
        assert_eq!(Level::from_u8(5), None);
    }

    #[test]
    fn gfn_indexing_matches_ept_bit_ranges() {
        // gpa bits 47:39, 38:30, 29:21, 20:12 select the entries of levels 4..1.
        let gpa = Gpa((3u64 << 39) | (5 << 30) | (7 << 21) | (11 << 12) | 0x123);
        let gfn = gpa.gfn();
        assert_eq!(gfn.index_at(Level::L512G), 3);
        assert_eq!(gfn.index_at(Level::L1G), 5);
        assert_eq!(gfn.index_at(Level::L2M), 7);
        assert_eq!(gfn.index_at(Level::L4K), 11);
        assert_eq!(gpa.page_offset(), 0x123);
        assert_eq!(gfn.align_down(Level::L2M).0 & 511, 0);
        assert_eq!(gfn.gpa().0, gpa.0 & !0xfff);
    }

    #[test]
    fn error_code_access_kind_round_trips() {
        for k in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            assert_eq!(ErrorCode::for_access(k).access(), k);
            assert_eq!((ErrorCode::for_access(k) | ErrorCode::PRESENT).access(), k);
        }
        assert_eq!(ErrorCode::from_bits_truncate(0xff).bits(), 0x1f);
    }

    #[test]
    fn access_flags_set_operations() {
        let rw = AccessFlags::WRITE;
        assert!(AccessFlags::ALL.contains(rw));
        assert!(!AccessFlags::NONE.contains(rw));
        assert_eq!(AccessFlags::ALL.without(rw).bits(), 5);
        assert_eq!(
            rw.union(AccessFlags::EXEC).intersect(AccessFlags::EXEC),
            AccessFlags::EXEC
        );
    }
}
