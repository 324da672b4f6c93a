//! TLB flush requests.
//!
//! An operation that may leave stale translations in some vCPU's TLB returns a
//! [`Flush`]. It is `#[must_use]`: dropping one on the floor is a compile-time warning,
//! because a missing flush lets a guest keep using a mapping the MMU has removed (the x86_64
//! crate's `MapperFlush` and Redox `rmm`'s `PageFlush` follow the same idea). Flushes
//! combine with `|`; the VM turns the result into one remote TLB flush and only then frees
//! the tables the operation unlinked.

/// Whether a remote TLB flush is owed.
#[must_use = "stale translations stay in vCPU TLBs until this flush is performed"]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Flush(bool);

impl Flush {
    /// Nothing to flush.
    pub const NONE: Flush = Flush(false);
    /// A flush is owed.
    pub const NEEDED: Flush = Flush(true);

    /// A flush owed iff `needed`.
    #[inline]
    pub const fn new(needed: bool) -> Self {
        Flush(needed)
    }
    /// Whether a flush is owed. Consumes the token: whoever asks performs the flush.
    #[inline]
    pub const fn needed(self) -> bool {
        self.0
    }
    /// Record that a flush is owed.
    #[inline]
    pub fn set(&mut self) {
        self.0 = true;
    }
    /// Drop the token knowing no vCPU can hold the translation (for example, before any
    /// vCPU has run). The name makes the reason visible at the call site.
    #[inline]
    pub const fn ignore_no_vcpu_ran(self) {}
}

impl core::ops::BitOr for Flush {
    type Output = Flush;
    #[inline]
    fn bitor(self, rhs: Flush) -> Flush {
        Flush(self.0 | rhs.0)
    }
}

impl core::ops::BitOrAssign for Flush {
    #[inline]
    fn bitor_assign(&mut self, rhs: Flush) {
        self.0 |= rhs.0;
    }
}
