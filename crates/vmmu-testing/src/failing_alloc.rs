//! A table allocator that runs out of memory on demand: [`FailingAllocator`], for the
//! allocation-failure atomicity tests (`crates/vmmu/tests/alloc_failure.rs`).
//!
//! # Invariants
//! - Every frame it hands out comes from its [`HeapTableAllocator`] and goes back to it:
//!   refusing is the only thing it adds, so it keeps the heap allocator's contract.
//! - Once armed with [`FailingAllocator::fail_after`]`(n)`, the next `n` allocations
//!   succeed and every later one fails, until [`FailingAllocator::restore`] (memory that
//!   ran out stays out, as a real allocator's would, until it comes back).
//!
//! # Locking
//! None: the counters are atomics; the heap allocator locks its own pool.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use vmmu::table::{HeapTableAllocator, Table, TableAllocator};
use vmmu::types::Pfn;

/// A [`HeapTableAllocator`] that can be told to fail from the Nth allocation on.
pub struct FailingAllocator {
    inner: HeapTableAllocator,
    /// Allocation attempts so far (failed ones included).
    attempts: AtomicU64,
    /// Attempts at or past this number fail (`u64::MAX`: none does).
    fail_from: AtomicU64,
    /// Attempts refused.
    failures: AtomicU64,
}

impl Default for FailingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl FailingAllocator {
    /// An allocator that does not fail until armed.
    pub fn new() -> Self {
        FailingAllocator {
            inner: HeapTableAllocator::new(),
            attempts: AtomicU64::new(0),
            fail_from: AtomicU64::new(u64::MAX),
            failures: AtomicU64::new(0),
        }
    }

    /// Let the next `n` allocations succeed and fail every one after them, until
    /// [`restore`](Self::restore).
    pub fn fail_after(&self, n: u64) {
        let now = self.attempts.load(Ordering::SeqCst);
        self.fail_from
            .store(now.saturating_add(n), Ordering::SeqCst);
    }

    /// Memory comes back: no allocation fails any more.
    pub fn restore(&self) {
        self.fail_from.store(u64::MAX, Ordering::SeqCst);
    }

    /// Allocation attempts so far, failed ones included.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }

    /// Allocations refused so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Tables handed out and not yet freed.
    pub fn live(&self) -> u64 {
        self.inner.live()
    }

    /// The heap allocator underneath.
    pub fn heap(&self) -> &HeapTableAllocator {
        &self.inner
    }
}

// SAFETY: forwards to the heap allocator, which keeps the contract; it only refuses some
// allocations (returning `None` is always allowed).
unsafe impl TableAllocator for FailingAllocator {
    fn alloc_table(&self) -> Option<Pfn> {
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_from.load(Ordering::SeqCst) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        self.inner.alloc_table()
    }
    unsafe fn free_table(&self, frame: Pfn) {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.free_table(frame) }
    }
    fn table_ptr(&self, frame: Pfn) -> NonNull<Table> {
        self.inner.table_ptr(frame)
    }
}
