//! x86-64 page-table entry bits (Intel SDM vol. 3, 4.5): the guest's own tables use them,
//! and so do the shadow tables of a shadow-paging MMU (with KVM's software bits, see
//! `spte::legacy`).

/// Present.
pub const P: u64 = 1 << 0;
/// Read/write: writes allowed.
pub const RW: u64 = 1 << 1;
/// User/supervisor: CPL 3 may access.
pub const US: u64 = 1 << 2;
/// Page-level write-through.
pub const PWT: u64 = 1 << 3;
/// Page-level cache disable.
pub const PCD: u64 = 1 << 4;
/// Accessed: set by the CPU on every walk through the entry.
pub const A: u64 = 1 << 5;
/// Dirty: set by the CPU on a write through a leaf.
pub const D: u64 = 1 << 6;
/// Page size: the entry maps a 2 MiB (PDE) or 1 GiB (PDPTE) page; reserved in a PML4E.
pub const PS: u64 = 1 << 7;
/// Global (leaf only).
pub const G: u64 = 1 << 8;
/// Execute disable (reserved unless EFER.NXE).
pub const NX: u64 = 1 << 63;
/// The frame address of a 4 KiB page or of the next table (MAXPHYADDR 52).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bit 12 of a huge leaf: PAT; the bits above it up to the page size are reserved.
pub const HUGE_PAT: u64 = 1 << 12;
