//! A big-reader lock (Linux's brlock, userspace RCU's reader slots) for the TDP MMU's lock:
//! readers (faults, one per vCPU) each count themselves in their own cache line, so two
//! vCPUs faulting in parallel never write the same line; a writer (a memslot update, a
//! zap) raises a flag and waits until every slot is empty.
//!
//! # Protocol
//! A reader increments its slot, then [`light_fence`], then reads the writer flag; a
//! writer sets the flag, then [`heavy_fence`], then reads every slot. The fence pair
//! orders each side's store before its load (as in the vCPU mode protocol, see
//! [`crate::sync`]), so in any interleaving at least one side sees the other: the reader
//! backs off, or the writer waits for it. The writer's unlock is a `Release` store of the
//! flag that a reader's `Acquire` load pairs with; a reader's unlock is a `Release`
//! decrement that the writer's `Acquire` scan pairs with. Writers are serialised by a
//! mutex.
//!
//! The read side costs one uncontended atomic add and a compiler fence; the write side a
//! `membarrier` and a scan of the slots, so it suits a lock taken shared on every fault and
//! exclusively rarely (the TDP MMU), not one taken exclusively on every fault (the shadow
//! MMU, which keeps a plain reader-writer lock).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::sync::{heavy_fence, light_fence, Mutex, MutexGuard};

/// One reader slot, alone in its cache line (two lines: adjacent-line prefetch).
#[repr(align(128))]
struct Slot(AtomicU32);

/// The lock. Slot 0 is for readers without a slot of their own; the others are spread
/// over vCPU ids.
pub struct BrLock<T> {
    writers: Mutex<()>,
    writer: AtomicBool,
    slots: Box<[Slot]>,
    data: UnsafeCell<T>,
}

// SAFETY: the protocol gives readers shared and writers exclusive access to `data`.
unsafe impl<T: Send> Send for BrLock<T> {}
// SAFETY: as above; `T: Sync` for the shared readers.
unsafe impl<T: Send + Sync> Sync for BrLock<T> {}

impl<T> BrLock<T> {
    /// A lock around `data` with `slots` reader slots (at least 2).
    pub fn new(data: T, slots: usize) -> Self {
        let mut v = Vec::with_capacity(slots.max(2));
        v.resize_with(slots.max(2), || Slot(AtomicU32::new(0)));
        BrLock {
            writers: Mutex::new(()),
            writer: AtomicBool::new(false),
            slots: v.into_boxed_slice(),
            data: UnsafeCell::new(data),
        }
    }

    /// The slot for reader `id` (a vCPU id; other readers pass `None` and share slot 0).
    #[inline]
    fn slot(&self, id: Option<u32>) -> &AtomicU32 {
        let i = match id {
            None => 0,
            Some(v) => 1 + v as usize % (self.slots.len() - 1),
        };
        &self.slots[i].0
    }

    /// Shared access, counted in reader `id`'s slot.
    #[inline]
    pub fn read(&self, id: Option<u32>) -> BrReadGuard<'_, T> {
        let slot = self.slot(id);
        loop {
            slot.fetch_add(1, Ordering::Relaxed);
            light_fence();
            if !self.writer.load(Ordering::Acquire) {
                return BrReadGuard { lock: self, slot };
            }
            // A writer is in or coming: step aside until it is done.
            slot.fetch_sub(1, Ordering::Release);
            let mut spins = 0u32;
            while self.writer.load(Ordering::Acquire) {
                backoff(&mut spins);
            }
        }
    }

    /// Exclusive access.
    pub fn write(&self) -> BrWriteGuard<'_, T> {
        let serial = self.writers.lock();
        // SAFETY: the mutex keeps other writers out; the guard's drop unlocks.
        unsafe { self.write_raw() };
        BrWriteGuard {
            lock: self,
            _serial: serial,
        }
    }

    /// The writer side without its serializing mutex, for a caller whose writers are
    /// serialized already (by another lock they all hold): raise the flag and wait for
    /// every reader to leave. Out of line: the caller's fast path stays small.
    ///
    /// # Safety
    /// No other writer is in, and [`write_unlock_raw`](Self::write_unlock_raw) follows.
    #[inline(never)]
    pub unsafe fn write_raw(&self) {
        self.writer.store(true, Ordering::Relaxed);
        heavy_fence();
        for s in self.slots.iter() {
            let mut spins = 0u32;
            while s.0.load(Ordering::Acquire) != 0 {
                backoff(&mut spins);
            }
        }
    }

    /// End a [`write_raw`](Self::write_raw).
    ///
    /// # Safety
    /// This thread holds the writer side through `write_raw`.
    #[inline]
    pub unsafe fn write_unlock_raw(&self) {
        self.writer.store(false, Ordering::Release);
    }

    /// The data, through exclusive ownership of the lock.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

/// Spin a while, then let other threads run (a reader holding the lock may be descheduled).
#[inline]
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 128 {
        core::hint::spin_loop();
    } else {
        #[cfg(feature = "std")]
        std::thread::yield_now();
        #[cfg(not(feature = "std"))]
        core::hint::spin_loop();
    }
}

/// Shared access to a [`BrLock`]'s data.
pub struct BrReadGuard<'a, T> {
    lock: &'a BrLock<T>,
    slot: &'a AtomicU32,
}

impl<T> Deref for BrReadGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: a counted reader with no writer in (the protocol above).
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> Drop for BrReadGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.slot.fetch_sub(1, Ordering::Release);
    }
}

/// Exclusive access to a [`BrLock`]'s data.
pub struct BrWriteGuard<'a, T> {
    lock: &'a BrLock<T>,
    _serial: MutexGuard<'a, ()>,
}

impl<T> Deref for BrWriteGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the writer, with every reader slot drained.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for BrWriteGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for BrWriteGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: this guard's `write` took the writer side.
        unsafe { self.lock.write_unlock_raw() };
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn readers_and_writers_exclude() {
        crate::sync::init_asymmetric_fences();
        let lock = Arc::new(BrLock::new((0u64, 0u64), 8));
        std::thread::scope(|s| {
            for t in 0..3u32 {
                let lock = lock.clone();
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        if i % 16 == 0 {
                            let mut g = lock.write();
                            g.0 += 1;
                            g.1 += 1;
                        } else {
                            let g = lock.read(Some(t));
                            assert_eq!(g.0, g.1, "a reader saw a half-done write");
                        }
                    }
                });
            }
        });
        let g = lock.read(None);
        assert_eq!(g.0, 3 * 20_000 / 16);
    }
}
