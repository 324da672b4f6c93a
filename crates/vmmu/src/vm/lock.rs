//! The VM's MMU lock (KVM's `mmu_lock`): a reader-writer lock around the VM's state, and,
//! for the TDP MMU, a fault gate beside it.
//!
//! The shadow MMU takes the lock exclusively on every fault, so a plain reader-writer lock
//! suits it. The TDP MMU takes it shared on every fault, and a shared reader-writer lock
//! makes every fault write the lock's one cache line: two vCPUs faulting at once bounce it
//! between their cores. So TDP faults enter through a big-reader lock instead
//! ([`crate::brlock`], one cache line per vCPU), and whoever takes the state exclusively
//! takes the gate exclusively too. Then a fault and an exclusive holder never overlap, a
//! fault and a shared holder of the reader-writer lock may (both only read, or change
//! SPTEs by compare-exchange, as the TDP MMU's shared-lock rules allow), and faults never
//! touch the reader-writer lock, so there is no lock-order cycle.

use core::ops::{Deref, DerefMut};

use crate::brlock::{BrLock, BrReadGuard};
use crate::sync::RwLockWriteGuard;

/// Reader slots of the fault gate (vCPU ids share them beyond this).
pub(crate) const GATE_SLOTS: usize = 64;

/// Exclusive access to the state: the reader-writer lock, and the fault gate if the VM
/// has one (taken with `BrLock::write_raw`: the reader-writer lock already serializes its
/// writers).
pub(crate) struct Exclusive<'a, T> {
    pub(crate) rw: RwLockWriteGuard<'a, T>,
    pub(crate) gate: Option<&'a BrLock<()>>,
}

impl<T> Drop for Exclusive<'_, T> {
    #[inline]
    fn drop(&mut self) {
        if let Some(g) = self.gate {
            // SAFETY: `Vm::lock` took the gate's writer side for this guard.
            unsafe { g.write_unlock_raw() };
        }
    }
}

impl<T> Deref for Exclusive<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.rw
    }
}

impl<T> DerefMut for Exclusive<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.rw
    }
}

/// Shared access to the state for one TDP fault, through the fault gate.
pub(crate) struct Gated<'a, T> {
    pub(crate) data: &'a T,
    pub(crate) _gate: BrReadGuard<'a, ()>,
}

impl<T> Deref for Gated<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        self.data
    }
}

/// A new fault gate.
pub(crate) fn gate() -> BrLock<()> {
    BrLock::new((), GATE_SLOTS)
}
