//! The legacy x86-64 SPTE bits a shadow-paging MMU uses (KVM's shadow masks when EPT is
//! off): the guest's own PTE layout ([`crate::guest::pte`]) plus KVM's software bits.
//! The format itself is [`FormatMasks::LEGACY`](super::FormatMasks::LEGACY); read legacy
//! SPTEs through [`SpteFormat::LEGACY`](super::SpteFormat::LEGACY).
//!
//! Bits shared with the EPT format, so that every format-blind path (reverse maps,
//! zapping, write protection, the audit) reads both the same way: bit 0 (R / P), bit 1
//! (W / RW), bit 7 (LARGE / PS), the frame field, and the software bits MMU_PRESENT (11),
//! HOST_WRITABLE (57) and MMU_WRITABLE (58). The bits that differ: user (bit 2, the EPT X
//! bit), execute-disable (bit 63), accessed (5) and dirty (6) instead of EPT's 8 and 9.
//!
//! MMIO SPTEs keep the EPT encoding: P is clear there, so hardware sees them as not
//! present.

use crate::guest::pte;

/// Accessed (legacy bit 5).
pub const ACCESSED: u64 = pte::A;
/// Dirty (legacy bit 6).
pub const DIRTY: u64 = pte::D;
/// User-accessible (legacy bit 2).
pub const USER: u64 = pte::US;
/// Execute-disable (legacy bit 63).
pub const NX: u64 = pte::NX;
