//! The guest kernel's shared state and its boot: the direct map, the idle address space,
//! the frame allocator and counters. One [`Kernel`] serves every vCPU thread.
//!
//! Boot lays out guest RAM as:
//!
//! ```text
//! gfn 0            never used (a present record never names gfn 0)
//! gfn 1            the idle PML4 (init_mm's): only the direct-map slot
//! gfn 2            the direct map's PDPT, shared by every process
//! gfn 3 ..         the direct map's PDs, one per GiB of RAM, shared by every process
//! the rest         the frame allocator's
//! ```
//!
//! The direct map maps gva `DIRECT_MAP_BASE + gpa` to `gpa` with 2 MiB pages (PS=1),
//! supervisor-only, writable, NX (Linux's `__PAGE_KERNEL_LARGE` without the global bit:
//! the model does not use global pages). Its PDPT and PDs are linked from the same PML4
//! slot of every process, so the MMU shadows them once. Boot writes them straight into
//! guest memory (paging is off at that point); after boot the kernel touches guest memory
//! only through a [`Cpu`](super::cpu::Cpu).
//!
//! Invariant (checked by [`Kernel::check_free_frames_zero`]): every free frame reads as
//! zero, so a page table needs no clearing when it is allocated.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vmmu::guest::{pte, GuestMemory};
use vmmu::types::{Gfn, Gpa, Level, PAGE_SHIFT, PAGE_SIZE};

use super::frames::FrameAllocator;
use super::layout::{entry_gpa, DIRECT_MAP_PML4_SLOT, ENTRIES, HUGE_2M};
use super::OsError;

/// Bits of a kernel upper-level entry (`_KERNPG_TABLE`).
pub const KERNEL_TABLE: u64 = pte::P | pte::RW | pte::A | pte::D;
/// Bits of a direct-map 2 MiB leaf.
pub const DIRECT_MAP_LEAF: u64 = pte::P | pte::RW | pte::A | pte::D | pte::PS | pte::NX;

/// Counters of the kernel's work, over every vCPU.
#[derive(Debug, Default)]
pub struct KernelCounters {
    /// User page faults handled (not-present or copy-on-write).
    pub page_faults: AtomicU64,
    /// Copy-on-write faults that copied the page.
    pub cow_copies: AtomicU64,
    /// Copy-on-write faults that reused the page (last reference).
    pub cow_reuses: AtomicU64,
    /// Faults on an access the guest's tables already allowed (a stale translation).
    pub spurious_faults: AtomicU64,
    /// Page tables allocated (PDPT, PD, PT; PML4s aside).
    pub tables_allocated: AtomicU64,
    /// Page tables freed.
    pub tables_freed: AtomicU64,
    /// Processes created (spawn and fork).
    pub processes: AtomicU64,
}

/// A snapshot of [`KernelCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// See [`KernelCounters::page_faults`].
    pub page_faults: u64,
    /// See [`KernelCounters::cow_copies`].
    pub cow_copies: u64,
    /// See [`KernelCounters::cow_reuses`].
    pub cow_reuses: u64,
    /// See [`KernelCounters::spurious_faults`].
    pub spurious_faults: u64,
    /// See [`KernelCounters::tables_allocated`].
    pub tables_allocated: u64,
    /// See [`KernelCounters::tables_freed`].
    pub tables_freed: u64,
    /// See [`KernelCounters::processes`].
    pub processes: u64,
}

/// The guest kernel: what every vCPU shares.
pub struct Kernel {
    pub(crate) mem: Arc<dyn GuestMemory>,
    pub(crate) frames: FrameAllocator,
    ram_bytes: u64,
    idle_pml4: Gpa,
    kernel_pml4e: u64,
    next_pid: AtomicU32,
    pub(crate) counters: KernelCounters,
}

impl Kernel {
    /// Boots on `ram_bytes` of `mem` (a multiple of 2 MiB, at most 512 GiB): builds the
    /// direct map and the idle PML4.
    pub fn boot(mem: Arc<dyn GuestMemory>, ram_bytes: u64) -> Result<Kernel, OsError> {
        if !ram_bytes.is_multiple_of(HUGE_2M) || ram_bytes == 0 || ram_bytes > 512 << 30 {
            return Err(OsError::BadArgument(
                "RAM must be a nonzero multiple of 2 MiB",
            ));
        }
        let gib = ram_bytes.div_ceil(Level::L1G.bytes());
        let idle = Gpa(PAGE_SIZE);
        let pdpt = Gpa(2 * PAGE_SIZE);
        let first_free = 3 + gib;
        let end = ram_bytes >> PAGE_SHIFT;
        if first_free + 16 > end {
            return Err(OsError::OutOfMemory);
        }
        let write = |gpa: Gpa, val: u64| mem.write_u64(gpa, val).map_err(OsError::Vm);
        for g in 0..gib {
            let pd = Gpa((3 + g) << PAGE_SHIFT);
            for i in 0..ENTRIES as u64 {
                let gpa = (g * ENTRIES as u64 + i) * HUGE_2M;
                if gpa < ram_bytes {
                    write(entry_gpa(pd, i as usize), gpa | DIRECT_MAP_LEAF)?;
                }
            }
            write(entry_gpa(pdpt, g as usize), pd.0 | KERNEL_TABLE)?;
        }
        let kernel_pml4e = pdpt.0 | KERNEL_TABLE;
        write(entry_gpa(idle, DIRECT_MAP_PML4_SLOT), kernel_pml4e)?;
        Ok(Kernel {
            mem,
            frames: FrameAllocator::new(Gfn(first_free), Gfn(end)),
            ram_bytes,
            idle_pml4: idle,
            kernel_pml4e,
            next_pid: AtomicU32::new(1),
            counters: KernelCounters::default(),
        })
    }

    /// Bytes of guest RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// The idle PML4 (init_mm): what a vCPU runs on between processes.
    pub fn idle_pml4(&self) -> Gpa {
        self.idle_pml4
    }

    /// The PML4 entry every address space has in slot `DIRECT_MAP_PML4_SLOT`.
    pub fn kernel_pml4e(&self) -> u64 {
        self.kernel_pml4e
    }

    /// The frame allocator.
    pub fn frames(&self) -> &FrameAllocator {
        &self.frames
    }

    /// Guest memory, for checks (the kernel itself goes through a CPU).
    pub fn memory(&self) -> &Arc<dyn GuestMemory> {
        &self.mem
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> KernelStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KernelStats {
            page_faults: l(&c.page_faults),
            cow_copies: l(&c.cow_copies),
            cow_reuses: l(&c.cow_reuses),
            spurious_faults: l(&c.spurious_faults),
            tables_allocated: l(&c.tables_allocated),
            tables_freed: l(&c.tables_freed),
            processes: l(&c.processes),
        }
    }

    pub(crate) fn next_pid(&self) -> u32 {
        self.next_pid.fetch_add(1, Ordering::Relaxed)
    }

    /// A frame with reference count 1 (zero-filled by the free-frame invariant).
    pub(crate) fn alloc_frame(&self) -> Result<Gfn, OsError> {
        self.frames.alloc().ok_or(OsError::OutOfMemory)
    }

    /// Checks that every free frame reads as zero in guest memory; returns the first that
    /// does not, with the offending word.
    pub fn check_free_frames_zero(&self) -> Result<(), String> {
        for gfn in self.frames.free_list() {
            for i in 0..ENTRIES {
                let at = entry_gpa(gfn.gpa(), i);
                let v = self.mem.read_u64(at).map_err(|e| e.to_string())?;
                if v != 0 {
                    return Err(format!("free frame {gfn:?} holds {v:#x} at {at:?}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_os::cpu::paging_state;
    use crate::guest_os::layout::phys_to_virt;
    use crate::guest_os::walk::translate;
    use vmmu::guest::SimGuestMemory;
    use vmmu::types::AccessKind;

    #[test]
    fn direct_map_translates_every_2m_of_ram() {
        let ram = 1 << 30 | 4 << 20; // 1 GiB + 4 MiB: two PDs, the last partly filled
        let mem: Arc<dyn GuestMemory> = Arc::new(SimGuestMemory::new(ram));
        let k = Kernel::boot(mem.clone(), ram).unwrap();
        let st = paging_state(k.idle_pml4(), 0);
        for gpa in (0..ram)
            .step_by(HUGE_2M as usize)
            .chain([ram - 8, 0x1234_5678])
        {
            let gpa = gpa & !7;
            let t = translate(&*mem, &st, phys_to_virt(Gpa(gpa)), AccessKind::Write).unwrap();
            assert_eq!(t.gpa, Gpa(gpa));
            assert_eq!(t.level, Level::L2M);
        }
        // Beyond RAM: not present. Supervisor-only, not executable.
        assert!(translate(&*mem, &st, phys_to_virt(Gpa(ram)), AccessKind::Read).is_err());
        let user = paging_state(k.idle_pml4(), 3);
        assert!(translate(&*mem, &user, phys_to_virt(Gpa(0)), AccessKind::Read).is_err());
        assert!(translate(&*mem, &st, phys_to_virt(Gpa(0)), AccessKind::Fetch).is_err());
        assert_eq!(k.frames().range().0, Gfn(5));
        assert_eq!(k.frames().free_frames() as u64, (ram >> 12) - 5);
    }

    #[test]
    fn rejects_odd_sizes() {
        let mem: Arc<dyn GuestMemory> = Arc::new(SimGuestMemory::new(1 << 20));
        assert!(Kernel::boot(mem.clone(), 1 << 20).is_err());
        assert!(Kernel::boot(mem, 0).is_err());
    }
}
