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
use core::sync::atomic::{AtomicU64, Ordering};

use crate::brlock::{BrLock, BrReadGuard};
use crate::host::HostMemory;
use crate::sync::{RwLockReadGuard, RwLockWriteGuard};
use crate::table::TableAllocator;

use super::{Vm, VmState};

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

/// Time spent waiting for the MMU lock and the number of acquisitions, when the VM has a
/// clock (`VmStats::lock_wait_ns`, `lock_acquisitions`).
#[derive(Default)]
pub(crate) struct WaitCounters {
    pub(crate) ns: AtomicU64,
    pub(crate) count: AtomicU64,
}

impl WaitCounters {
    /// Count an acquisition asked for at `asked` (a clock reading) and granted at `now`.
    #[inline]
    fn add(&self, asked: u64, now: u64) {
        self.ns
            .fetch_add(now.saturating_sub(asked), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// A lock guard that adds the time it was held to a counter, when the VM has a clock.
pub(crate) struct Timed<'a, G> {
    guard: G,
    clock: Option<fn() -> u64>,
    t0: u64,
    ns: &'a AtomicU64,
}

impl<'a, G> Timed<'a, G> {
    /// `guard`, asked for at `asked` (the clock's reading before the lock was taken):
    /// the wait is counted in `wait`, the hold will be in `ns`.
    #[inline]
    fn new(
        guard: G,
        clock: Option<fn() -> u64>,
        asked: u64,
        wait: &WaitCounters,
        ns: &'a AtomicU64,
    ) -> Self {
        let t0 = clock.map_or(0, |c| c());
        if clock.is_some() {
            wait.add(asked, t0);
        }
        Timed {
            guard,
            clock,
            t0,
            ns,
        }
    }
}

impl<G: core::ops::Deref> core::ops::Deref for Timed<'_, G> {
    type Target = G::Target;
    #[inline]
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: core::ops::DerefMut> core::ops::DerefMut for Timed<'_, G> {
    #[inline]
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

impl<G> Drop for Timed<'_, G> {
    #[inline]
    fn drop(&mut self) {
        if let Some(c) = self.clock {
            self.ns
                .fetch_add(c().saturating_sub(self.t0), Ordering::Relaxed);
        }
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// The MMU lock, exclusive. The time it is held counts as MMU time
    /// ([`VmStats::mmu_ns`], with a clock).
    pub(crate) fn lock(&self) -> Timed<'_, Exclusive<'_, VmState<A>>> {
        let asked = self.clock_now();
        let rw = self.state.write();
        let gate = self.fault_gate.as_ref();
        if let Some(g) = gate {
            // SAFETY: every writer of the gate holds `state` exclusively, so writers are
            // serialized; the guard's drop unlocks.
            unsafe { g.write_raw() };
        }
        Timed::new(
            Exclusive { rw, gate },
            self.config.clock,
            asked,
            &self.lock_wait,
            &self.mmu_ns,
        )
    }

    /// Shared access to a TDP VM's state through the fault gate, not the MMU lock: for a
    /// fault by vCPU `vcpu` (its own reader slot, so two vCPUs faulting at once write no
    /// common cache line; see the module docs), or with `None` for lockless aging (the gate
    /// keeps memslots and roots from changing, as KVM's SRCU and RCU do). Timed as
    /// [`lock`](Self::lock).
    pub(crate) fn lock_gated(&self, vcpu: Option<u32>) -> Timed<'_, Gated<'_, VmState<A>>> {
        let asked = self.clock_now();
        let gate = self
            .fault_gate
            .as_ref()
            .expect("a TDP VM has a fault gate")
            .read(vcpu);
        // SAFETY: every exclusive holder of the state holds the gate exclusively too (see
        // `lock`), so while the gate is held shared the state is only read, or changed
        // through atomics as the TDP MMU's shared-lock rules allow.
        let data = unsafe { &*crate::sync::rwlock_data_ptr(&self.state) };
        Timed::new(
            Gated { data, _gate: gate },
            self.config.clock,
            asked,
            &self.lock_wait,
            &self.mmu_ns,
        )
    }

    /// The MMU lock, shared (TDP faults and range operations), timed as [`lock`](Self::lock).
    pub(crate) fn lock_shared(&self) -> Timed<'_, RwLockReadGuard<'_, VmState<A>>> {
        let asked = self.clock_now();
        let guard = self.state.read();
        Timed::new(
            guard,
            self.config.clock,
            asked,
            &self.lock_wait,
            &self.mmu_ns,
        )
    }

    /// The VM's clock now, 0 without one.
    #[inline]
    fn clock_now(&self) -> u64 {
        self.config.clock.map_or(0, |c| c())
    }

    /// The MMU lock, shared, not timed: the CPU model's walks under shadow paging, which
    /// are the hardware's work, not the MMU's.
    pub(crate) fn lock_shared_untimed(&self) -> RwLockReadGuard<'_, VmState<A>> {
        self.state.read()
    }
}
