//! Real host memory (Linux, `std`): guest RAM as anonymous memory mapped in this process,
//! whose bytes guest accesses really move (see [`Vm::write_bytes`](crate::Vm::write_bytes)).
//!
//! [`RealHostMemory`] maps one region: 4 KiB pages, transparent huge pages
//! (`MADV_HUGEPAGE`) or hugetlb 2 MiB pages (`MAP_HUGETLB`, where the host has some). It
//! answers [`HostMemory::translate`] from that mapping, and makes the host's own changes
//! that KVM learns through MMU notifiers ([`discard`](RealHostMemory::discard): a balloon
//! or free-page reporting's `madvise(MADV_DONTNEED)`; [`move_page`](RealHostMemory::move_page):
//! page migration or KSM giving a page a new frame; [`split_huge`](RealHostMemory::split_huge):
//! a THP split) through vmmu's notifier operations, so a test can drop a page under a
//! running guest.
//!
//! # Frame numbers
//! The pfn a translation reports is a *stand-in* that identifies the page:
//! `pfn = pfn_base + generation * stride + index`, where `index` is the 4 KiB page's index
//! in the mapping, `stride` the mapping's pages rounded up to 512, and `generation` a
//! per-page count of the host changes that gave the page a new frame (a discard or a
//! move). So a frame number, once replaced, never names the page again, and an access
//! through a stale translation is caught ([`DataError::StaleFrame`](crate::vm::DataError)).
//! `pfn_base` is congruent to the mapping's first page number modulo 512, so the 2 MiB
//! congruence of the [`HostPage`] contract holds.
//!
//! Why not the kernel's pfns from `/proc/self/pagemap`: they are readable only with
//! `CAP_SYS_ADMIN`, and even then the kernel migrates and compacts pages without telling
//! this process (its MMU notifiers reach KVM, not userspace), so a cached kernel pfn
//! would go stale, or name another page, with no notifier call. The kernel's pfn is still
//! reported where readable ([`kernel_pfn`](RealHostMemory::kernel_pfn)) and is what the
//! THP level is read from.
//!
//! # Mapping level
//! 4 KiB backing: always [`Level::L4K`]. hugetlb: [`Level::L2M`] (the kernel maps hugetlb
//! pages whole). THP: the kernel's answer at the first translation in each 2 MiB region
//! (the page is populated with `MADV_POPULATE_WRITE`, its kernel pfn read from
//! `/proc/self/pagemap` and its `KPF_THP` flag from `/proc/kpageflags`); where those are
//! not readable (no `CAP_SYS_ADMIN`), [`Level::L4K`], which is always safe (a smaller
//! level than the host's only costs the MMU huge pages). The answer is kept until one of
//! this type's own host changes touches the region: a split or a partial discard makes it
//! [`Level::L4K`] for good. A split or collapse the kernel does on its own (reclaim,
//! khugepaged) is not seen, but the stand-in frames stay contiguous, so the contract
//! holds for the numbers the MMU gets.
//!
//! # Invariants
//! - the mapping is owned by the value, `len` bytes from `base`, unmapped on drop;
//! - every Rust access to its bytes is atomic (so vCPU threads writing the same bytes,
//!   and a migration copying a page while a vCPU writes it, race without undefined
//!   behaviour), and bounds-checked against the mapping: no raw pointer leaves this file;
//! - `generation[i]` changes only under the exclusive `access` lock, between the
//!   notifier's `invalidate_range_start` and `invalidate_range_end` for page `i`.
//!
//! # Locking
//! `access` orders data accesses against host changes: a data access holds it shared
//! across its translation and its bytes (so the frame it reached is current while it
//! moves them, as a CPU's store completes before the TLB shootdown that precedes a free),
//! a host change holds it exclusively while it changes frames and bytes. Order: `access`
//! before the MMU lock (a host change calls the notifier with it held; an access faults
//! with it held). [`HostMemory::translate`] takes no lock (it runs under the MMU lock).

use alloc::boxed::Box;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{HostMemory, HostPage};
use crate::sync::{RwLock, RwLockReadGuard};
use crate::table::TableAllocator;
use crate::types::{Hva, Level, Pfn, PAGE_SHIFT, PAGE_SIZE};
use crate::vm::Vm;

const M2: u64 = 2 << 20;
const PAGES_2M: u64 = 512;
/// Lowest stand-in pfn (before the congruence offset): 4 GiB, nonzero.
const PFN_BASE: u64 = 0x10_0000;
/// Frame numbers must fit an SPTE (40 bits).
const PFN_LIMIT: u64 = 1 << 40;
/// `/proc/kpageflags` bit of a page that is part of a transparent huge page.
const KPF_THP: u64 = 22;

/// How a [`RealHostMemory`] region is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RealBacking {
    /// Ordinary 4 KiB anonymous pages.
    Page4K,
    /// Anonymous memory with `MADV_HUGEPAGE` (the kernel decides which 2 MiB regions are
    /// huge; see the module's "Mapping level").
    Thp,
    /// hugetlb 2 MiB pages (`MAP_HUGETLB`): only where the host has reserved some
    /// (`/proc/sys/vm/nr_hugepages`), otherwise creation fails with [`RealHostError::Os`].
    HugeTlb2M,
}

/// Why a [`RealHostMemory`] operation was refused. Checked before anything changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealHostError {
    /// A size of zero.
    ZeroSize,
    /// An address or size not a multiple of `align` bytes.
    Unaligned {
        /// The offending address or size.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A range not inside the mapping.
    OutOfRange {
        /// First address.
        hva: Hva,
        /// Size in bytes.
        size: u64,
    },
    /// The region is too large for 40-bit frame numbers, or a page has been given a new
    /// frame so many times that its generation would leave the frame space.
    FrameSpaceExhausted,
    /// A system call failed.
    Os {
        /// What was called.
        op: &'static str,
        /// `errno`.
        errno: i32,
    },
    /// The VM's notifier refused the range (a bug: the range was checked).
    Notifier(crate::Error),
}

impl core::fmt::Display for RealHostError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RealHostError::ZeroSize => f.write_str("size is zero"),
            RealHostError::Unaligned { addr, align } => {
                write!(f, "{addr:#x} is not aligned to {align:#x} bytes")
            }
            RealHostError::OutOfRange { hva, size } => {
                write!(
                    f,
                    "[{hva}, +{size:#x}) is not inside the guest memory mapping"
                )
            }
            RealHostError::FrameSpaceExhausted => {
                f.write_str("the stand-in frame space (40-bit pfns) is exhausted")
            }
            RealHostError::Os { op, errno } => {
                write!(
                    f,
                    "{op} failed: {}",
                    std::io::Error::from_raw_os_error(*errno)
                )
            }
            RealHostError::Notifier(e) => write!(f, "MMU notifier: {e}"),
        }
    }
}

impl std::error::Error for RealHostError {}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Per-2 MiB region level states (`RealHostMemory::level2m`).
const LV_UNKNOWN: u8 = 0;
const LV_4K: u8 = 1;
const LV_2M: u8 = 2;
/// Split by one of this type's host changes: 4 KiB for good.
const LV_SPLIT: u8 = 3;

/// Real anonymous host memory backing guest RAM (see the module docs).
pub struct RealHostMemory {
    base: NonNull<u8>,
    len: u64,
    /// What was mmapped (for THP the aligned region is trimmed out of a larger one).
    backing: RealBacking,
    npages: u64,
    pfn_base: u64,
    stride: u64,
    max_generation: u32,
    generation: Box<[AtomicU32]>,
    level2m: Box<[AtomicU8]>,
    access: RwLock<()>,
    pagemap: Option<File>,
    kpageflags: Option<File>,
}

// SAFETY: the mapping is owned by the value and lives until drop; every access to its
// bytes from Rust is an atomic access through `&self` (module invariants), so sharing
// between threads cannot produce a data race; the other fields are Send + Sync.
unsafe impl Send for RealHostMemory {}
// SAFETY: as above.
unsafe impl Sync for RealHostMemory {}

impl AsRef<RealHostMemory> for RealHostMemory {
    fn as_ref(&self) -> &RealHostMemory {
        self
    }
}

impl core::fmt::Debug for RealHostMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RealHostMemory")
            .field("base", &self.base())
            .field("len", &self.len)
            .field("backing", &self.backing)
            .finish()
    }
}

impl RealHostMemory {
    /// Map `size` bytes of anonymous, private, read-write memory backed as `backing`.
    /// `size` must be a nonzero multiple of 4 KiB (2 MiB for hugetlb). The memory reads
    /// as zeros. THP and hugetlb mappings start 2 MiB-aligned.
    pub fn new(size: u64, backing: RealBacking) -> Result<Self, RealHostError> {
        if size == 0 {
            return Err(RealHostError::ZeroSize);
        }
        let align = if backing == RealBacking::HugeTlb2M {
            M2
        } else {
            PAGE_SIZE
        };
        if !size.is_multiple_of(align) {
            return Err(RealHostError::Unaligned { addr: size, align });
        }
        let npages = size >> PAGE_SHIFT;
        let stride = npages.next_multiple_of(PAGES_2M);
        if PFN_BASE + 2 * stride > PFN_LIMIT || size > isize::MAX as u64 / 2 {
            return Err(RealHostError::FrameSpaceExhausted);
        }
        let base = map(size, backing)?;
        let first_page = base.as_ptr() as u64 >> PAGE_SHIFT;
        let pfn_base = PFN_BASE + (first_page & (PAGES_2M - 1));
        let max_generation = ((PFN_LIMIT - pfn_base) / stride - 1).min(u32::MAX as u64) as u32;
        let regions = size.div_ceil(M2) as usize;
        let initial = match backing {
            RealBacking::Page4K => LV_4K,
            RealBacking::HugeTlb2M => LV_2M,
            RealBacking::Thp => LV_UNKNOWN,
        };
        let level2m: Box<[AtomicU8]> = (0..regions)
            .map(|r| {
                // A region the mapping does not wholly cover is never huge.
                let whole = (r as u64 + 1) * M2 <= size;
                AtomicU8::new(if whole { initial } else { LV_4K })
            })
            .collect();
        Ok(RealHostMemory {
            base,
            len: size,
            backing,
            npages,
            pfn_base,
            stride,
            max_generation,
            generation: (0..npages).map(|_| AtomicU32::new(0)).collect(),
            level2m,
            access: RwLock::new(()),
            pagemap: File::open("/proc/self/pagemap").ok(),
            kpageflags: File::open("/proc/kpageflags").ok(),
        })
    }

    /// First host-virtual address of the mapping (a memslot's `userspace_addr`).
    pub fn base(&self) -> Hva {
        Hva(self.base.as_ptr() as u64)
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never: creation refuses a size of zero).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing.
    pub fn backing(&self) -> RealBacking {
        self.backing
    }

    /// The page index of `hva` in the mapping, if inside.
    fn index(&self, hva: Hva) -> Option<u64> {
        let off = hva.0.checked_sub(self.base().0)?;
        (off < self.len).then_some(off >> PAGE_SHIFT)
    }

    /// Check `[hva, hva + size)` is a nonzero, `align`-aligned range inside the mapping;
    /// its first page index and page count.
    fn check_range(&self, hva: Hva, size: u64, align: u64) -> Result<(u64, u64), RealHostError> {
        if size == 0 {
            return Err(RealHostError::ZeroSize);
        }
        for v in [hva.0, size] {
            if !v.is_multiple_of(align) {
                return Err(RealHostError::Unaligned { addr: v, align });
            }
        }
        let off = hva.0.wrapping_sub(self.base().0);
        if hva.0 < self.base().0 || off > self.len || size > self.len - off {
            return Err(RealHostError::OutOfRange { hva, size });
        }
        Ok((off >> PAGE_SHIFT, size >> PAGE_SHIFT))
    }

    /// The kernel's pfn for the page at `hva`, where `/proc/self/pagemap` reports pfns
    /// (with `CAP_SYS_ADMIN`) and the page is present; `None` otherwise. Diagnostic only:
    /// the MMU gets stand-in frames (see the module docs).
    pub fn kernel_pfn(&self, hva: Hva) -> Option<u64> {
        self.index(hva)?;
        let f = self.pagemap.as_ref()?;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, (hva.0 >> PAGE_SHIFT) * 8).ok()?;
        let e = u64::from_ne_bytes(e);
        let pfn = e & ((1 << 55) - 1);
        (e >> 63 == 1 && pfn != 0).then_some(pfn)
    }

    /// Whether the kernel maps the page at `hva` as part of a THP (`KPF_THP`), where
    /// readable; `None` where `/proc/self/pagemap` or `/proc/kpageflags` is not.
    pub fn kernel_thp(&self, hva: Hva) -> Option<bool> {
        let pfn = self.kernel_pfn(hva)?;
        let mut e = [0u8; 8];
        self.kpageflags
            .as_ref()?
            .read_exact_at(&mut e, pfn * 8)
            .ok()?;
        Some(u64::from_ne_bytes(e) >> KPF_THP & 1 == 1)
    }

    /// The level of 2 MiB region `r`, asking the kernel the first time (THP).
    fn region_level(&self, r: usize) -> Level {
        match self.level2m[r].load(Ordering::Acquire) {
            LV_2M => return Level::L2M,
            LV_UNKNOWN => {}
            _ => return Level::L4K,
        }
        let start = self.base().0 + r as u64 * M2;
        // Populate the region (the fault allocates a THP where the kernel can), then ask.
        // SAFETY: the range is inside the mapping this value owns; populating changes no
        // byte (MADV_POPULATE_WRITE faults pages in as a write would, without writing).
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                M2 as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        let huge = self.kernel_thp(Hva(start)).unwrap_or(false);
        let lv = if huge { LV_2M } else { LV_4K };
        // A host change may have split the region meanwhile: it wins.
        match self.level2m[r].compare_exchange(LV_UNKNOWN, lv, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) if huge => Level::L2M,
            Ok(_) => Level::L4K,
            Err(LV_2M) => Level::L2M,
            Err(_) => Level::L4K,
        }
    }

    /// The stand-in frame of page `i` now.
    fn pfn_of(&self, i: u64) -> u64 {
        self.pfn_base + self.generation[i as usize].load(Ordering::Acquire) as u64 * self.stride + i
    }

    /// The page index a stand-in frame names, if it is a current frame of this mapping.
    /// `Err(index)` for a frame this page had before a host change (stale).
    fn frame_index(&self, pfn: u64) -> Option<Result<u64, u64>> {
        let rel = pfn.checked_sub(self.pfn_base)?;
        let (generation, i) = (rel / self.stride, rel % self.stride);
        if i >= self.npages || generation > self.max_generation as u64 {
            return None;
        }
        let now = self.generation[i as usize].load(Ordering::Acquire) as u64;
        Some(if now == generation { Ok(i) } else { Err(i) })
    }

    /// Run the host change `change` on pages `[first, first + n)` as the kernel does:
    /// `invalidate_range_start` on the VM, the change under the exclusive access lock,
    /// `invalidate_range_end`.
    fn host_change<H: HostMemory, A: TableAllocator + 'static>(
        &self,
        vm: &Vm<H, A>,
        first: u64,
        n: u64,
        change: impl FnOnce(),
    ) -> Result<(), RealHostError> {
        let start = Hva(self.base().0 + (first << PAGE_SHIFT));
        let end = Hva(start.0 + (n << PAGE_SHIFT));
        let _g = self.access.write();
        vm.invalidate_range_start(start, end)
            .map_err(RealHostError::Notifier)?;
        change();
        vm.invalidate_range_end().map_err(RealHostError::Notifier)
    }

    /// Give pages `[first, first + n)` new frames (generation + 1), and split the 2 MiB
    /// regions they cover only partly (`whole_regions_keep`: a region discarded whole
    /// is asked again).
    fn renumber(&self, first: u64, n: u64, whole_regions_keep: bool) {
        for i in first..first + n {
            self.generation[i as usize].fetch_add(1, Ordering::AcqRel);
        }
        if self.backing == RealBacking::Page4K {
            return;
        }
        let (r0, r1) = (first / PAGES_2M, (first + n).div_ceil(PAGES_2M));
        for r in r0..r1 {
            let whole = r * PAGES_2M >= first && (r + 1) * PAGES_2M <= first + n;
            let cell = &self.level2m[r as usize];
            if !(whole && whole_regions_keep) {
                cell.store(LV_SPLIT, Ordering::Release);
            } else if self.backing == RealBacking::Thp && cell.load(Ordering::Acquire) != LV_SPLIT {
                // Discarded whole: the kernel may fault it back huge; ask again.
                cell.store(LV_UNKNOWN, Ordering::Release);
            }
        }
    }

    fn check_generations(&self, first: u64, n: u64) -> Result<(), RealHostError> {
        let full = (first..first + n)
            .any(|i| self.generation[i as usize].load(Ordering::Acquire) >= self.max_generation);
        if full {
            Err(RealHostError::FrameSpaceExhausted)
        } else {
            Ok(())
        }
    }

    /// `madvise(MADV_DONTNEED)` on `[hva, hva + size)`, announced to `vm` through its MMU
    /// notifier (a balloon inflating, free-page reporting): the pages read as zeros from
    /// now on, at new frames. A THP region discarded in part is split. The range must be
    /// inside the mapping and 4 KiB-aligned (2 MiB for hugetlb); `vm` is the VM whose
    /// memslots map this memory.
    ///
    /// The contents are gone: a VMM migrating the guest must send these pages again (the
    /// dirty log does not see a host change).
    pub fn discard<H: HostMemory, A: TableAllocator + 'static>(
        &self,
        vm: &Vm<H, A>,
        hva: Hva,
        size: u64,
    ) -> Result<(), RealHostError> {
        let align = if self.backing == RealBacking::HugeTlb2M {
            M2
        } else {
            PAGE_SIZE
        };
        let (first, n) = self.check_range(hva, size, align)?;
        self.check_generations(first, n)?;
        let mut rc = 0;
        self.host_change(vm, first, n, || {
            self.renumber(first, n, true);
            // SAFETY: the range is inside the owned mapping (checked above); no Rust
            // access to it is in progress (the exclusive access lock is held).
            rc = unsafe {
                libc::madvise(
                    hva.0 as *mut libc::c_void,
                    size as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                rc = errno();
            }
        })?;
        if rc != 0 {
            return Err(RealHostError::Os {
                op: "madvise(MADV_DONTNEED)",
                errno: rc,
            });
        }
        Ok(())
    }

    /// Give the page at `hva` a new frame with the same contents (page migration, a KSM
    /// merge or a COW break), announced to `vm` through its notifier; the THP region
    /// around it is split. Returns the new frame.
    pub fn move_page<H: HostMemory, A: TableAllocator + 'static>(
        &self,
        vm: &Vm<H, A>,
        hva: Hva,
    ) -> Result<Pfn, RealHostError> {
        let (first, _) = self.check_range(Hva(hva.0 & !(PAGE_SIZE - 1)), PAGE_SIZE, PAGE_SIZE)?;
        if self.backing == RealBacking::HugeTlb2M {
            // hugetlb pages move whole: the region gets new frames, contiguous again.
            let r = first & !(PAGES_2M - 1);
            self.check_generations(r, PAGES_2M)?;
            self.host_change(vm, r, PAGES_2M, || self.renumber(r, PAGES_2M, true))?;
            return Ok(Pfn(self.pfn_of(first)));
        }
        self.check_generations(first, 1)?;
        self.host_change(vm, first, 1, || self.renumber(first, 1, false))?;
        Ok(Pfn(self.pfn_of(first)))
    }

    /// Map the THP region containing `hva` at 4 KiB from now on, keeping its frames (a
    /// THP split), announced to `vm` for that page. A no-op on a 4 KiB region; hugetlb
    /// pages do not split ([`RealHostError::Unaligned`] is not returned: nothing happens).
    pub fn split_huge<H: HostMemory, A: TableAllocator + 'static>(
        &self,
        vm: &Vm<H, A>,
        hva: Hva,
    ) -> Result<(), RealHostError> {
        let (first, _) = self.check_range(Hva(hva.0 & !(PAGE_SIZE - 1)), PAGE_SIZE, PAGE_SIZE)?;
        if self.backing != RealBacking::Thp {
            return Ok(());
        }
        let r = (first / PAGES_2M) as usize;
        self.host_change(vm, first, 1, || {
            self.level2m[r].store(LV_SPLIT, Ordering::Release)
        })
    }

    /// Hold off host changes while a data access translates and moves bytes.
    pub(crate) fn access_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.access.read()
    }

    /// The byte offset in the mapping that host-physical address `hpa` reaches, for an
    /// access of `len` bytes that must stay in its page: `Err(true)` for a frame this
    /// mapping replaced (stale), `Err(false)` for one it never had or a page overrun.
    pub(crate) fn offset_of_hpa(&self, hpa: u64, len: usize) -> Result<u64, bool> {
        let in_page = hpa & (PAGE_SIZE - 1);
        if in_page + len as u64 > PAGE_SIZE {
            return Err(false);
        }
        match self.frame_index(hpa >> PAGE_SHIFT) {
            Some(Ok(i)) => Ok((i << PAGE_SHIFT) + in_page),
            Some(Err(_)) => Err(true),
            None => Err(false),
        }
    }

    /// The atomic byte at offset `off`. Private: bounds are the caller's to check.
    fn byte(&self, off: u64) -> &AtomicU8 {
        assert!(off < self.len, "offset {off:#x} outside the mapping");
        // SAFETY: `off` is inside the mapping, which lives as long as `self`; every Rust
        // access to these bytes is atomic (module invariants), and AtomicU8 has the
        // layout of u8 with alignment 1.
        unsafe { &*(self.base.as_ptr().add(off as usize) as *const AtomicU8) }
    }

    /// The atomic words `[off, off + 8 * n)` (8-aligned, inside the mapping: checked).
    fn words(&self, off: u64, n: usize) -> &[AtomicU64] {
        assert!(
            off.is_multiple_of(8) && off.checked_add(8 * n as u64).is_some_and(|e| e <= self.len),
            "words at {off:#x} unaligned or outside the mapping"
        );
        // SAFETY: the range is inside the mapping, which lives as long as `self`; every
        // Rust access to these bytes is atomic (module invariants); the mapping is
        // page-aligned, so an 8-aligned offset is AtomicU64-aligned.
        unsafe {
            core::slice::from_raw_parts(self.base.as_ptr().add(off as usize) as *const AtomicU64, n)
        }
    }

    /// Write `data` at byte offset `off` of the mapping (bounds-checked: panics outside).
    pub(crate) fn store(&self, off: u64, data: &[u8]) {
        assert!(off
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= self.len));
        if off.is_multiple_of(8) && data.len().is_multiple_of(8) {
            let words = self.words(off, data.len() / 8);
            for (w, c) in words.iter().zip(data.chunks_exact(8)) {
                w.store(
                    u64::from_ne_bytes(c.try_into().expect("8 bytes")),
                    Ordering::Relaxed,
                );
            }
            return;
        }
        for (k, &b) in data.iter().enumerate() {
            self.byte(off + k as u64).store(b, Ordering::Relaxed);
        }
    }

    /// Read into `buf` from byte offset `off` of the mapping (bounds-checked).
    pub(crate) fn load(&self, off: u64, buf: &mut [u8]) {
        assert!(off
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= self.len));
        if off.is_multiple_of(8) && buf.len().is_multiple_of(8) {
            let words = self.words(off, buf.len() / 8);
            for (w, c) in words.iter().zip(buf.chunks_exact_mut(8)) {
                c.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
            }
            return;
        }
        for (k, b) in buf.iter_mut().enumerate() {
            *b = self.byte(off + k as u64).load(Ordering::Relaxed);
        }
    }

    /// Copy the 4 KiB page at host-virtual `hva` into `out`, as the host sees it (the VMM
    /// reading guest RAM through its own mapping, e.g. to send it during migration).
    /// Takes the access lock shared, so a host change is not half-seen.
    pub fn read_page(&self, hva: Hva, out: &mut [u8; 4096]) -> Result<(), RealHostError> {
        let (first, _) = self.check_range(hva, PAGE_SIZE, PAGE_SIZE)?;
        let _g = self.access.read();
        self.load(first << PAGE_SHIFT, out);
        Ok(())
    }

    /// Write `data` at host-virtual `hva` as the host (the VMM writing guest RAM through
    /// its own mapping, e.g. a destination filling pages it received). Must stay inside
    /// the mapping.
    pub fn write_host(&self, hva: Hva, data: &[u8]) -> Result<(), RealHostError> {
        let size = data.len() as u64;
        let off = hva.0.wrapping_sub(self.base().0);
        if hva.0 < self.base().0 || off > self.len || size > self.len - off {
            return Err(RealHostError::OutOfRange { hva, size });
        }
        let _g = self.access.read();
        self.store(off, data);
        Ok(())
    }
}

impl HostMemory for RealHostMemory {
    fn translate(&self, hva: Hva) -> Option<HostPage> {
        let i = self.index(hva)?;
        let level = self.region_level((i / PAGES_2M) as usize);
        Some(HostPage {
            pfn: Pfn(self.pfn_of(i)),
            level,
            writable: true,
        })
    }
}

impl Drop for RealHostMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this base and length and is owned by
        // this value; nothing borrows it any more (`&mut self`).
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len as usize) };
    }
}

/// mmap `size` bytes backed as `backing` (THP: 2 MiB-aligned, trimmed out of a larger
/// mapping, with MADV_HUGEPAGE).
fn map(size: u64, backing: RealBacking) -> Result<NonNull<u8>, RealHostError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let fail = |op| RealHostError::Os { op, errno: errno() };
    match backing {
        RealBacking::Page4K | RealBacking::HugeTlb2M => {
            let extra = if backing == RealBacking::HugeTlb2M {
                libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT)
            } else {
                0
            };
            // SAFETY: a fresh anonymous mapping chosen by the kernel: nothing aliases it.
            let p = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    size as usize,
                    prot,
                    flags | extra,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(fail("mmap"));
            }
            Ok(NonNull::new(p as *mut u8).expect("mmap does not return null"))
        }
        RealBacking::Thp => {
            let big = size + M2;
            // SAFETY: as above.
            let p = unsafe { libc::mmap(core::ptr::null_mut(), big as usize, prot, flags, -1, 0) };
            if p == libc::MAP_FAILED {
                return Err(fail("mmap"));
            }
            let start = p as u64;
            let aligned = start.next_multiple_of(M2);
            // SAFETY: trimming the parts of our own fresh mapping outside
            // [aligned, aligned + size); the advice applies to what remains.
            unsafe {
                if aligned > start {
                    libc::munmap(p, (aligned - start) as usize);
                }
                let tail = start + big - (aligned + size);
                if tail > 0 {
                    libc::munmap((aligned + size) as *mut libc::c_void, tail as usize);
                }
                if libc::madvise(
                    aligned as *mut libc::c_void,
                    size as usize,
                    libc::MADV_HUGEPAGE,
                ) != 0
                {
                    let e = fail("madvise(MADV_HUGEPAGE)");
                    libc::munmap(aligned as *mut libc::c_void, size as usize);
                    return Err(e);
                }
            }
            Ok(NonNull::new(aligned as *mut u8).expect("nonzero"))
        }
    }
}
