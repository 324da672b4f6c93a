//! Guest memory as the MMU reads it: 64-bit page-table entries by guest-physical address,
//! read and compare-exchanged (KVM reads them through the memslot's host mapping, with
//! `__get_user` and a `cmpxchg` on the user address for A/D bits). The shape follows
//! rust-vmm's `GuestMemory`: the hypervisor owns the memory, the MMU borrows accesses.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::error::Error;
use crate::types::{Gpa, PAGE_SHIFT};

/// Guest memory, by guest-physical address. Accesses are 8 bytes and 8-byte aligned;
/// an access outside the memory or unaligned is [`Error::GuestMemory`].
///
/// Implementations must make every access atomic: vCPUs write their page tables while
/// the MMU reads them (unsync pages), and set A/D bits concurrently.
pub trait GuestMemory: Send + Sync {
    /// Read the 64-bit word at `gpa`.
    fn read_u64(&self, gpa: Gpa) -> Result<u64, Error>;
    /// Write the 64-bit word at `gpa`.
    fn write_u64(&self, gpa: Gpa, val: u64) -> Result<(), Error>;
    /// Compare-exchange the 64-bit word at `gpa`: `Ok(Ok(old))` when it held `old` and now
    /// holds `new`, `Ok(Err(current))` when it held something else.
    fn cmpxchg_u64(&self, gpa: Gpa, old: u64, new: u64) -> Result<Result<u64, u64>, Error>;
}

const WORDS: usize = 512;
type Page = [AtomicU64; WORDS];

/// Zero-filled guest memory of a fixed size starting at gpa 0, a page allocated on its
/// first write (reads of an untouched page return zeros without allocating). Lock-free.
pub struct SimGuestMemory {
    pages: Box<[AtomicPtr<Page>]>,
    size: u64,
}

impl SimGuestMemory {
    /// `size` bytes of guest memory (rounded up to 4 KiB).
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(1 << PAGE_SHIFT) as usize;
        let mut pages = Vec::with_capacity(n);
        pages.resize_with(n, || AtomicPtr::new(ptr::null_mut()));
        SimGuestMemory {
            pages: pages.into_boxed_slice(),
            size: (n as u64) << PAGE_SHIFT,
        }
    }

    /// Bytes of guest memory.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages written so far (allocated).
    pub fn pages_allocated(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| !p.load(Ordering::Relaxed).is_null())
            .count()
    }

    #[inline]
    fn check(&self, gpa: Gpa) -> Result<(usize, usize), Error> {
        if !gpa.0.is_multiple_of(8) || gpa.0 >= self.size {
            return Err(Error::GuestMemory { gpa });
        }
        Ok((
            (gpa.0 >> PAGE_SHIFT) as usize,
            (gpa.page_offset() / 8) as usize,
        ))
    }

    #[inline]
    fn page(&self, i: usize) -> Option<&Page> {
        let p = self.pages[i].load(Ordering::Acquire);
        // SAFETY: a non-null pointer came from `Box::into_raw` in `page_or_alloc` and is
        // freed only in `drop`, which has `&mut self`.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    fn page_or_alloc(&self, i: usize) -> &Page {
        if let Some(p) = self.page(i) {
            return p;
        }
        let new = Box::into_raw(Box::new([const { AtomicU64::new(0) }; WORDS]));
        match self.pages[i].compare_exchange(
            ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: just published; lives until drop.
            Ok(_) => unsafe { &*new },
            Err(cur) => {
                // SAFETY: `new` was never shared; `cur` is the published page.
                unsafe {
                    drop(Box::from_raw(new));
                    &*cur
                }
            }
        }
    }
}

impl GuestMemory for SimGuestMemory {
    #[inline]
    fn read_u64(&self, gpa: Gpa) -> Result<u64, Error> {
        let (p, w) = self.check(gpa)?;
        Ok(self.page(p).map_or(0, |pg| pg[w].load(Ordering::Acquire)))
    }

    #[inline]
    fn write_u64(&self, gpa: Gpa, val: u64) -> Result<(), Error> {
        let (p, w) = self.check(gpa)?;
        if val == 0 && self.page(p).is_none() {
            return Ok(());
        }
        self.page_or_alloc(p)[w].store(val, Ordering::Release);
        Ok(())
    }

    #[inline]
    fn cmpxchg_u64(&self, gpa: Gpa, old: u64, new: u64) -> Result<Result<u64, u64>, Error> {
        let (p, w) = self.check(gpa)?;
        Ok(
            self.page_or_alloc(p)[w].compare_exchange(
                old,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ),
        )
    }
}

impl Drop for SimGuestMemory {
    fn drop(&mut self) {
        for p in self.pages.iter() {
            let p = p.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: allocated by `page_or_alloc`, no reference outlives `&mut self`.
                unsafe { drop(Box::from_raw(p)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zero_writes_and_cmpxchg() {
        let m = SimGuestMemory::new(3 << 12);
        assert_eq!(m.size(), 3 << 12);
        assert_eq!(m.read_u64(Gpa(0x1008)).unwrap(), 0);
        assert_eq!(m.pages_allocated(), 0);
        m.write_u64(Gpa(0x1008), 0).unwrap();
        assert_eq!(
            m.pages_allocated(),
            0,
            "writing zero to an untouched page is a no-op"
        );
        m.write_u64(Gpa(0x1008), 7).unwrap();
        assert_eq!(m.read_u64(Gpa(0x1008)).unwrap(), 7);
        assert_eq!(m.cmpxchg_u64(Gpa(0x1008), 7, 9).unwrap(), Ok(7));
        assert_eq!(m.cmpxchg_u64(Gpa(0x1008), 7, 10).unwrap(), Err(9));
        assert_eq!(m.read_u64(Gpa(0x1008)).unwrap(), 9);
        assert_eq!(m.pages_allocated(), 1);
    }

    #[test]
    fn rejects_unaligned_and_out_of_range() {
        let m = SimGuestMemory::new(4096);
        for gpa in [Gpa(4), Gpa(4096), Gpa(!7)] {
            assert_eq!(m.read_u64(gpa), Err(Error::GuestMemory { gpa }));
            assert_eq!(m.write_u64(gpa, 1), Err(Error::GuestMemory { gpa }));
            assert_eq!(m.cmpxchg_u64(gpa, 0, 1), Err(Error::GuestMemory { gpa }));
        }
        assert_eq!(m.pages_allocated(), 0);
    }
}
