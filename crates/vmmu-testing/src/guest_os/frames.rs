//! The guest kernel's physical frame allocator, shared by every vCPU.
//!
//! Frames `[first, end)` of guest RAM are managed; the ones below `first` belong to the
//! boot image (the idle PML4 and the direct map's tables) and are never handed out, so
//! gfn 0 never names an allocated frame.
//!
//! Invariants:
//! - a frame is free exactly when its reference count is 0, and then it is on the free
//!   list once;
//! - a frame is handed out with count 1; only a holder of a reference takes another
//!   ([`FrameAllocator::get`]), so a count never rises from 0 (no resurrection race);
//! - the free list is a stack that starts in ascending order: a fresh allocator hands out
//!   consecutive frames, which keeps a process's first pages contiguous in guest RAM.
//!
//! Frames are not zeroed here: the kernel keeps every free frame zero (tables are cleared
//! before they are freed; data pages are never written, their contents are not modelled).
//!
//! Locking: the free list is one mutex (allocation and freeing are rare next to guest
//! accesses); the counts are atomics updated without it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use vmmu::types::Gfn;

/// A thread-safe frame allocator with per-frame reference counts (for copy-on-write).
pub struct FrameAllocator {
    first: u64,
    refs: Box<[AtomicU32]>,
    free: Mutex<Vec<u32>>,
}

impl FrameAllocator {
    /// Manages frames `[first, end)`.
    ///
    /// # Panics
    /// If the range is empty or a gfn does not fit in 31 bits.
    pub fn new(first: Gfn, end: Gfn) -> Self {
        assert!(
            first.0 < end.0 && end.0 <= 1 << 31,
            "frames {first:?}..{end:?}"
        );
        let n = (end.0 - first.0) as usize;
        let mut refs = Vec::with_capacity(n);
        refs.resize_with(n, || AtomicU32::new(0));
        FrameAllocator {
            first: first.0,
            refs: refs.into_boxed_slice(),
            // Popped from the end: the lowest frame comes out first.
            free: Mutex::new((first.0..end.0).rev().map(|g| g as u32).collect()),
        }
    }

    fn slot(&self, gfn: Gfn) -> &AtomicU32 {
        let i = gfn
            .0
            .checked_sub(self.first)
            .unwrap_or_else(|| panic!("{gfn:?} is not managed (boot frame)"));
        &self.refs[i as usize]
    }

    /// A free frame, now with reference count 1; `None` when guest RAM is exhausted.
    pub fn alloc(&self) -> Option<Gfn> {
        let gfn = Gfn(u64::from(self.free.lock().unwrap().pop()?));
        let old = self.slot(gfn).swap(1, Ordering::AcqRel);
        debug_assert_eq!(old, 0, "{gfn:?} was on the free list with count {old}");
        Some(gfn)
    }

    /// Takes another reference to `gfn`, which the caller holds one of.
    ///
    /// # Panics
    /// If `gfn` is free.
    pub fn get(&self, gfn: Gfn) {
        let old = self.slot(gfn).fetch_add(1, Ordering::AcqRel);
        assert!(old != 0, "get of free frame {gfn:?}");
    }

    /// Drops a reference to `gfn`; frees it when it was the last. Returns whether it was
    /// freed.
    ///
    /// # Panics
    /// If `gfn` is already free.
    pub fn put(&self, gfn: Gfn) -> bool {
        let old = self.slot(gfn).fetch_sub(1, Ordering::AcqRel);
        assert!(old != 0, "put of free frame {gfn:?}");
        if old == 1 {
            self.free.lock().unwrap().push(gfn.0 as u32);
            true
        } else {
            false
        }
    }

    /// The reference count of `gfn` (0: free).
    pub fn refcount(&self, gfn: Gfn) -> u32 {
        self.slot(gfn).load(Ordering::Acquire)
    }

    /// Frames free now.
    pub fn free_frames(&self) -> usize {
        self.free.lock().unwrap().len()
    }

    /// Frames managed.
    pub fn total_frames(&self) -> usize {
        self.refs.len()
    }

    /// The managed range `[first, end)`.
    pub fn range(&self) -> (Gfn, Gfn) {
        (Gfn(self.first), Gfn(self.first + self.refs.len() as u64))
    }

    /// The frames free now, for checks.
    pub fn free_list(&self) -> Vec<Gfn> {
        let free = self.free.lock().unwrap();
        free.iter().map(|&g| Gfn(u64::from(g))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn hands_out_ascending_then_lifo() {
        let a = FrameAllocator::new(Gfn(10), Gfn(14));
        assert_eq!(a.total_frames(), 4);
        let got: Vec<Gfn> = (0..4).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, [Gfn(10), Gfn(11), Gfn(12), Gfn(13)]);
        assert_eq!(a.alloc(), None);
        assert!(a.put(Gfn(12)));
        assert_eq!(a.free_frames(), 1);
        assert_eq!(a.alloc(), Some(Gfn(12)));
    }

    #[test]
    fn refcounts_free_on_last_put() {
        let a = FrameAllocator::new(Gfn(1), Gfn(3));
        let f = a.alloc().unwrap();
        assert_eq!(a.refcount(f), 1);
        a.get(f);
        a.get(f);
        assert_eq!(a.refcount(f), 3);
        assert!(!a.put(f));
        assert!(!a.put(f));
        assert_eq!(a.free_frames(), 1);
        assert!(a.put(f));
        assert_eq!(a.refcount(f), 0);
        assert_eq!(a.free_frames(), 2);
    }

    #[test]
    #[should_panic(expected = "put of free frame")]
    fn double_free_panics() {
        let a = FrameAllocator::new(Gfn(1), Gfn(3));
        let f = a.alloc().unwrap();
        a.put(f);
        a.put(f);
    }

    #[test]
    #[should_panic(expected = "not managed")]
    fn boot_frames_are_not_managed() {
        FrameAllocator::new(Gfn(4), Gfn(8)).refcount(Gfn(3));
    }

    #[test]
    fn threads_never_get_the_same_frame() {
        // Room for what the threads keep plus one transient frame each.
        let a = FrameAllocator::new(Gfn(1), Gfn(4005));
        let per_thread: Vec<Vec<Gfn>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        for i in 0..2000 {
                            let f = a.alloc().unwrap();
                            if i % 2 == 0 {
                                a.get(f);
                                a.put(f);
                                mine.push(f);
                            } else {
                                a.put(f);
                            }
                        }
                        mine
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: Vec<Gfn> = per_thread.into_iter().flatten().collect();
        let distinct: HashSet<Gfn> = all.iter().copied().collect();
        assert_eq!(all.len(), 4000);
        assert_eq!(distinct.len(), 4000, "a frame was handed out twice");
        assert_eq!(a.free_frames(), 4);
        for f in all {
            assert_eq!(a.refcount(f), 1);
            a.put(f);
        }
        assert_eq!(a.free_frames(), 4004);
    }
}
