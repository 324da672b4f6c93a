//! Page-table memory: 4 KiB-aligned frames of 512 atomic SPTEs, and the allocator that
//! supplies them.
//!
//! A table is what the hardware loads: non-leaf SPTEs hold the child table's frame
//! number, and a CPU walker goes from frame to table through
//! [`TableAllocator::table_ptr`] exactly as hardware goes through physical memory.
//!
//! # Why atomics
//! The CPU model sets accessed and dirty bits in live tables while the MMU changes them
//! (and, later, lockless fast-path faults compare-exchange them). A `&mut` to a live SPTE
//! would be a lie, so every entry is an [`AtomicU64`] and every change says which ordering
//! it needs.
//!
//! # Lifetime
//! A table is freed only after the MMU has unlinked it and a remote TLB flush has made
//! every vCPU leave guest mode (see `hw`), so no walker can still be reading it.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::spte::Spte;
use crate::sync::Mutex;
use crate::types::{Pfn, PAGE_SHIFT, SPTE_ENT_PER_PAGE};
use alloc::vec::Vec;

/// One page table: 512 SPTEs in one 4 KiB-aligned frame.
#[repr(C, align(4096))]
pub struct Table {
    entries: [AtomicU64; SPTE_ENT_PER_PAGE],
}

const _: () = assert!(core::mem::size_of::<Table>() == 4096);

/// Every access to the entries is crate-private without the `internals` feature: safe
/// code outside vmmu cannot write a live table (a made-up non-leaf entry would send the
/// walkers into memory that is not a table).
impl Table {
    internal! {
        /// Read entry `i`.
        ///
        /// `Acquire` pairs with the `Release` that published a child table, so a walker that
        /// sees a non-leaf SPTE also sees the child's (zeroed or filled) contents.
        #[inline]
        pub fn get(&self, i: usize) -> Spte {
            Spte(self.entries[i].load(Ordering::Acquire))
        }
    }

    internal! {
        /// Store entry `i` (the MMU holds the lock; no concurrent writer can change bits the
        /// store would lose, because the old value had no volatile bits or is being replaced
        /// wholesale on a non-present entry).
        #[inline]
        pub fn set(&self, i: usize, v: Spte) {
            self.entries[i].store(v.0, Ordering::Release);
        }
    }

    internal! {
        /// Exchange entry `i`, returning the old value with every bit a CPU set until now.
        #[inline]
        pub fn swap(&self, i: usize, v: Spte) -> Spte {
            Spte(self.entries[i].swap(v.0, Ordering::AcqRel))
        }
    }

    internal! {
        /// Compare-exchange entry `i`.
        #[inline]
        pub fn compare_exchange(&self, i: usize, old: Spte, new: Spte) -> Result<Spte, Spte> {
            self.entries[i]
                .compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire)
                .map(Spte)
                .map_err(Spte)
        }
    }

    internal! {
        /// Atomically set bits in entry `i` (how a CPU sets A/D), returning the old value.
        #[inline]
        pub fn fetch_or(&self, i: usize, bits: u64) -> Spte {
            Spte(self.entries[i].fetch_or(bits, Ordering::AcqRel))
        }
    }

    internal! {
        /// Atomically clear bits in entry `i`, returning the old value.
        #[inline]
        pub fn fetch_and_not(&self, i: usize, bits: u64) -> Spte {
            Spte(self.entries[i].fetch_and(!bits, Ordering::AcqRel))
        }
    }

    internal! {
        /// The raw entries, for scans.
        #[inline]
        pub fn entries(&self) -> &[AtomicU64; SPTE_ENT_PER_PAGE] {
            &self.entries
        }
    }
}

/// Supplies table frames.
///
/// A hypervisor that owns the hardware implements this over its host-physical frame
/// allocator and its direct map; the `std` build (and any `alloc` user) has
/// [`HeapTableAllocator`].
///
/// # Safety
/// Implementors promise that `alloc_table` returns a frame not handed out before (or freed
/// since), whose 4 KiB are zeroed, and that `table_ptr(frame)` points at those 4 KiB for as
/// long as the frame is allocated. `free_table` is called once per allocated frame.
pub unsafe trait TableAllocator: Send + Sync {
    /// A zeroed 4 KiB frame, or `None` when out of memory.
    fn alloc_table(&self) -> Option<Pfn>;
    /// Give a frame back.
    ///
    /// # Safety
    /// `frame` came from `alloc_table`, is not freed yet, and nothing reads it any more.
    unsafe fn free_table(&self, frame: Pfn);
    /// Where the frame's table is mapped in this address space.
    fn table_ptr(&self, frame: Pfn) -> NonNull<Table>;
}

/// Tables from the global heap, carved out of 2 MiB chunks and recycled through a free
/// list, as KVM recycles shadow pages through a kmem cache. The "host-physical" frame
/// number of a table is its virtual address shifted right by 12, so `table_ptr` is a
/// shift, as a direct map would be.
///
/// Freed frames are kept for reuse and zeroed when handed out again; chunks go back to
/// the heap when the allocator is dropped (after every table is freed).
pub struct HeapTableAllocator {
    pool: Mutex<FramePool>,
    allocated: AtomicU64,
    freed: AtomicU64,
}

struct FramePool {
    chunks: Vec<NonNull<u8>>,
    /// Frames freed and not yet reused (dirty: zeroed on reuse).
    free: Vec<Pfn>,
    /// Frames of the newest chunk never handed out (still zero from the chunk's
    /// allocation): next one and end.
    fresh: (u64, u64),
}

// SAFETY: the chunk pointers are owned heap allocations, only touched under the mutex.
unsafe impl Send for FramePool {}

/// Tables per chunk (2 MiB).
const CHUNK_TABLES: usize = 512;
const CHUNK_LAYOUT: Layout = match Layout::from_size_align(CHUNK_TABLES * 4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("chunk layout"),
};

impl Default for HeapTableAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl HeapTableAllocator {
    /// A new allocator.
    pub const fn new() -> Self {
        HeapTableAllocator {
            pool: Mutex::new(FramePool {
                chunks: Vec::new(),
                free: Vec::new(),
                fresh: (0, 0),
            }),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
        }
    }
    /// Tables handed out so far.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }
    /// Tables given back so far.
    pub fn freed(&self) -> u64 {
        self.freed.load(Ordering::Relaxed)
    }
    /// Tables handed out and not given back.
    pub fn live(&self) -> u64 {
        self.allocated() - self.freed()
    }
    /// Bytes of heap the allocator holds (chunks), in use or not.
    pub fn reserved_bytes(&self) -> usize {
        self.pool.lock().chunks.len() * CHUNK_LAYOUT.size()
    }
}

impl Drop for HeapTableAllocator {
    fn drop(&mut self) {
        for c in self.pool.get_mut().chunks.drain(..) {
            // SAFETY: every chunk was allocated with CHUNK_LAYOUT and is freed once.
            unsafe { alloc::alloc::dealloc(c.as_ptr(), CHUNK_LAYOUT) }
        }
    }
}

// SAFETY: frames are 4 KiB pieces of chunks this allocator owns, zeroed before they are
// handed out (fresh chunk memory is zero; reused frames are cleared), and identity-mapped.
unsafe impl TableAllocator for HeapTableAllocator {
    fn alloc_table(&self) -> Option<Pfn> {
        let mut pool = self.pool.lock();
        let frame = if let Some(f) = pool.free.pop() {
            // SAFETY: a freed frame of a live chunk; nobody else references it.
            unsafe { core::ptr::write_bytes((f.0 << PAGE_SHIFT) as *mut u8, 0, 4096) };
            f
        } else {
            if pool.fresh.0 == pool.fresh.1 {
                // SAFETY: the layout has non-zero size.
                let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(CHUNK_LAYOUT) })?;
                pool.chunks.push(p);
                let first = p.as_ptr() as u64 >> PAGE_SHIFT;
                pool.fresh = (first, first + CHUNK_TABLES as u64);
            }
            let f = Pfn(pool.fresh.0);
            pool.fresh.0 += 1;
            f
        };
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Some(frame)
    }

    unsafe fn free_table(&self, frame: Pfn) {
        self.freed.fetch_add(1, Ordering::Relaxed);
        self.pool.lock().free.push(frame);
    }

    #[inline]
    fn table_ptr(&self, frame: Pfn) -> NonNull<Table> {
        // The frame number is the address shifted; it is never zero for a live allocation.
        NonNull::new((frame.0 << PAGE_SHIFT) as *mut Table).expect("null table frame")
    }
}

// SAFETY-relevant: a shared allocator behind Arc is still one allocator.
unsafe impl<A: TableAllocator + ?Sized> TableAllocator for alloc::sync::Arc<A> {
    fn alloc_table(&self) -> Option<Pfn> {
        (**self).alloc_table()
    }
    unsafe fn free_table(&self, frame: Pfn) {
        // SAFETY: forwarded contract.
        unsafe { (**self).free_table(frame) }
    }
    fn table_ptr(&self, frame: Pfn) -> NonNull<Table> {
        (**self).table_ptr(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_tables_are_zeroed_aligned_and_counted() {
        let a = HeapTableAllocator::new();
        let f = a.alloc_table().unwrap();
        let t = a.table_ptr(f);
        assert_eq!(t.as_ptr() as u64 % 4096, 0);
        // SAFETY: just allocated, not freed.
        let t = unsafe { t.as_ref() };
        assert!((0..512).all(|i| t.get(i) == Spte::NONE));
        t.set(3, Spte(0x1234));
        t.set(511, Spte(0x99));
        assert_eq!(t.fetch_or(3, 1 << 8), Spte(0x1234));
        assert_eq!(t.get(3), Spte(0x1334));
        assert_eq!(t.fetch_and_not(3, 1 << 8), Spte(0x1334));
        assert_eq!(
            t.compare_exchange(3, Spte(0x1234), Spte(7)),
            Ok(Spte(0x1234))
        );
        assert_eq!(t.compare_exchange(3, Spte(0x1234), Spte(8)), Err(Spte(7)));
        assert_eq!(t.swap(3, Spte::NONE), Spte(7));
        assert_eq!((a.allocated(), a.freed()), (1, 0));
        // SAFETY: allocated above, no reference used after this.
        unsafe { a.free_table(f) };
        assert_eq!((a.allocated(), a.freed()), (1, 1));
        // A reused frame comes back zeroed.
        let g = a.alloc_table().unwrap();
        assert_eq!(g, f, "freed frames are reused");
        // SAFETY: just allocated.
        let t = unsafe { a.table_ptr(g).as_ref() };
        assert!((0..512).all(|i| t.get(i) == Spte::NONE));
        // A chunk's worth and more: every frame distinct and aligned.
        let frames: Vec<Pfn> = (0..CHUNK_TABLES + 3)
            .map(|_| a.alloc_table().unwrap())
            .collect();
        let mut sorted = frames.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), frames.len());
        assert_eq!(a.live(), CHUNK_TABLES as u64 + 4);
        assert_eq!(a.reserved_bytes(), 2 * CHUNK_LAYOUT.size());
    }
}
