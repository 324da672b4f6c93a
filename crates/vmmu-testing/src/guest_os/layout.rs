//! The guest's virtual address layout and the arithmetic of 4-level page tables.
//!
//! ```text
//! 0x0000_0000_0040_0000  exec image: text (r-x), then data (rw-)
//! 0x0000_1000_0000_0000  mmap area, first fit upward
//! 0x0000_7fff_f000_0000  stack top (the stack VMA lies below it)
//! 0x0000_8000_0000_0000  end of user space (PML4 slots 0..256)
//! 0xffff_8880_0000_0000  kernel direct map: gva = DIRECT_MAP_BASE + gpa (PML4 slot 273)
//! ```
//!
//! Invariants: user addresses are below [`USER_END`]; the direct map sits alone in PML4
//! slot [`DIRECT_MAP_PML4_SLOT`] and starts at PDPT index 0, so guest RAM up to 512 GiB is
//! mapped by one PDPT.

use vmmu::types::{Gpa, Gva, Level, PAGE_SIZE};

/// Where the kernel direct map starts (Linux's `__PAGE_OFFSET` without KASLR).
pub const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;
/// The PML4 slot of the direct map.
pub const DIRECT_MAP_PML4_SLOT: usize = index(DIRECT_MAP_BASE, Level::L512G);
/// One past the last user address.
pub const USER_END: u64 = 0x0000_8000_0000_0000;
/// PML4 slots user space uses: `0..USER_PML4_SLOTS`.
pub const USER_PML4_SLOTS: usize = 256;
/// Where an exec image's text starts.
pub const IMAGE_BASE: u64 = 0x40_0000;
/// Where the mmap area starts.
pub const MMAP_BASE: u64 = 0x0000_1000_0000_0000;
/// The top of the user stack.
pub const STACK_TOP: u64 = 0x0000_7fff_f000_0000;
/// 2 MiB.
pub const HUGE_2M: u64 = 2 << 20;
/// Entries per table.
pub const ENTRIES: usize = 512;

/// The gva through which the kernel reaches guest-physical `gpa`.
#[inline]
pub const fn phys_to_virt(gpa: Gpa) -> Gva {
    Gva(DIRECT_MAP_BASE + gpa.0)
}

/// Index of `addr` in a table of `level` (level 4 = PML4, 1 = PT).
#[inline]
pub const fn index(addr: u64, level: Level) -> usize {
    ((addr >> (12 + 9 * (level.as_u8() as u32 - 1))) & 511) as usize
}

/// Bytes one entry of a table of `level` covers (4 KiB at level 1, 512 GiB at level 4).
#[inline]
pub const fn entry_span(level: Level) -> u64 {
    PAGE_SIZE << (9 * (level.as_u8() as u32 - 1))
}

/// The guest-physical address of entry `idx` of the table in frame `table`.
#[inline]
pub const fn entry_gpa(table: Gpa, idx: usize) -> Gpa {
    Gpa(table.0 + 8 * idx as u64)
}

/// Sign-extends a 48-bit address to canonical form.
#[inline]
pub const fn canonical(addr: u64) -> u64 {
    (((addr << 16) as i64) >> 16) as u64
}

/// Whether `[start, start + len)` is a page-aligned, non-empty range of user space.
#[inline]
pub fn user_range_ok(start: u64, len: u64) -> bool {
    start.is_multiple_of(PAGE_SIZE)
        && len.is_multiple_of(PAGE_SIZE)
        && len != 0
        && start.checked_add(len).is_some_and(|end| end <= USER_END)
}

/// The regions of `span` bytes (aligned) that `[start, end)` overlaps, as their starts.
pub fn regions(start: u64, end: u64, span: u64) -> impl Iterator<Item = u64> {
    let first = start & !(span - 1);
    (first..end).step_by(span as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_map_is_pml4_slot_273_pdpt_0() {
        assert_eq!(DIRECT_MAP_PML4_SLOT, 273);
        assert_eq!(index(DIRECT_MAP_BASE, Level::L1G), 0);
        assert_eq!(index(DIRECT_MAP_BASE, Level::L2M), 0);
        assert!(Gva(DIRECT_MAP_BASE).is_canonical());
        assert_eq!(
            canonical(DIRECT_MAP_BASE & ((1 << 48) - 1)),
            DIRECT_MAP_BASE
        );
        assert_eq!(phys_to_virt(Gpa(0x1234_5000)).0, 0xffff_8880_1234_5000);
    }

    #[test]
    fn user_layout_is_below_the_kernel_half() {
        for a in [IMAGE_BASE, MMAP_BASE, STACK_TOP - 1] {
            assert!(a < USER_END);
            assert!(index(a, Level::L512G) < USER_PML4_SLOTS);
        }
        assert_eq!(index(USER_END - 1, Level::L512G), USER_PML4_SLOTS - 1);
    }

    #[test]
    fn index_and_span_arithmetic() {
        let a = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x123;
        assert_eq!(index(a, Level::L512G), 3);
        assert_eq!(index(a, Level::L1G), 5);
        assert_eq!(index(a, Level::L2M), 7);
        assert_eq!(index(a, Level::L4K), 9);
        assert_eq!(entry_span(Level::L4K), 4096);
        assert_eq!(entry_span(Level::L2M), HUGE_2M);
        assert_eq!(entry_span(Level::L512G), 1 << 39);
        assert_eq!(entry_gpa(Gpa(0x5000), 3), Gpa(0x5018));
        let rs: Vec<u64> = regions(HUGE_2M - 4096, 2 * HUGE_2M + 1, HUGE_2M).collect();
        assert_eq!(rs, [0, HUGE_2M, 2 * HUGE_2M]);
        assert_eq!(regions(HUGE_2M, 2 * HUGE_2M, HUGE_2M).count(), 1);
    }

    #[test]
    fn user_ranges() {
        assert!(user_range_ok(MMAP_BASE, 4096));
        assert!(!user_range_ok(MMAP_BASE + 1, 4096));
        assert!(!user_range_ok(MMAP_BASE, 0));
        assert!(!user_range_ok(USER_END - 4096, 8192));
        assert!(user_range_ok(USER_END - 4096, 4096));
    }
}
