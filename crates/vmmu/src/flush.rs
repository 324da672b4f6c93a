//! TLB flush requests.
//!
//! An operation that may leave stale translations in some vCPU's TLB returns a
//! [`Flush`]. It is `#[must_use]`: dropping one on the floor is a compile-time warning,
//! because a missing flush lets a guest keep using a mapping the MMU has removed (the x86_64
//! crate's `MapperFlush` and Redox `rmm`'s `PageFlush` follow the same idea). Flushes
//! combine with `|`; the VM turns the result into one remote TLB flush and only then frees
//! the tables the operation unlinked, which every MMU operation returns beside the flush
//! ([`Removed`]).

use alloc::vec::Vec;

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

/// What an MMU operation returns: the flush owed, and the tables it unlinked, which may be
/// freed once a remote TLB flush has completed after the unlink.
#[must_use = "removed tables must be retired after the flush"]
#[derive(Default, Debug)]
pub struct Removed {
    /// Addresses of the TDP MMU's unlinked tables (the shadow MMU keeps its own list).
    pub(crate) pages: Vec<usize>,
    /// Whether a flush is owed (mappings changed or tables were unlinked).
    pub flush: Flush,
    /// Whether vCPUs must load a new root before they run again (their roots were
    /// invalidated).
    pub(crate) reload: bool,
}

impl Removed {
    /// Only a flush owed (`flush`), nothing to free.
    pub fn flush_only(flush: Flush) -> Self {
        Removed {
            pages: Vec::new(),
            flush,
            reload: false,
        }
    }

    /// Record an unlinked table by its address (the TDP MMU's `push` names its type):
    /// a flush is now owed.
    pub(crate) fn push_unlinked(&mut self, page: usize) {
        self.pages.push(page);
        self.flush.set();
    }
    /// Merge another operation's removals.
    pub fn merge(&mut self, other: Removed) {
        self.pages.extend(other.pages);
        self.flush |= other.flush;
        self.reload |= other.reload;
    }
    /// Whether nothing needs a flush or a free.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty() && !self.flush.needed()
    }
}
