//! Processes and the system calls that change their address spaces, with the page-fault
//! handler, as Linux runs them on x86-64:
//!
//! - [`Kernel::spawn`]: a new PML4 with the direct-map slot copied, no VMA;
//! - [`Kernel::mmap`] / [`Kernel::mmap_fixed`]: a VMA, nothing mapped (demand paging);
//! - [`Kernel::access`]: a user access, with the guest's page-fault handler behind it:
//!   not present inside a VMA allocates a frame and installs the PTE; a write to a
//!   present read-only page of a writable VMA is copy-on-write (copy, or reuse when the
//!   frame's count is 1); anything else is a segfault;
//! - [`Kernel::fork`]: the child gets new tables; every writable private page becomes
//!   read-only in both and the frame's count goes up; the parent's TLB is flushed;
//! - [`Kernel::munmap`]: PTEs cleared, INVLPG per page (a full flush above 33 pages, Linux's
//!   `tlb_single_page_flush_ceiling`), then frames and now-empty tables freed;
//! - [`Kernel::exec`]: the user address space dropped, a small fresh image mapped;
//! - [`Kernel::exit`]: every user PTE cleared, frame references dropped, tables cleared
//!   and freed, the vCPU moved to the idle PML4, the PML4 cleared and freed;
//! - [`Kernel::switch_to`]: MOV CR3 to the next process.
//!
//! Operations that change a process's tables make it current on the CPU first, so its TLB
//! flushes reach the right address space; a process runs on one CPU only (the caller's
//! contract: `Process` is not shared between threads while in use).
//!
//! Invariants after every call (checked by [`crate::guest_os::check`]): each VMA page
//! record matches its PTE; each frame's reference count is the number of PTEs mapping it;
//! a PTE is writable only when its frame's count is 1 and the VMA is writable.

use std::sync::atomic::Ordering;

use vmmu::guest::pte;
use vmmu::types::{AccessKind, ErrorCode, Gfn, Gpa, Gva, PAGE_SIZE};

use super::cpu::Cpu;
use super::kernel::Kernel;
use super::layout::{
    entry_gpa, user_range_ok, DIRECT_MAP_PML4_SLOT, IMAGE_BASE, MMAP_BASE, STACK_TOP,
};
use super::pgtable::{entry_addr, free_tables, PtCursor};
use super::vma::{AddressSpace, PageRecord, Prot, Vma};
use super::OsError;

/// Linux's `tlb_single_page_flush_ceiling`: above this many pages a range flush becomes a
/// full flush.
pub const FLUSH_CEILING_PAGES: u64 = 33;

/// A process: its PML4 and its VMAs.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    pml4: Gpa,
    mm: AddressSpace,
}

impl Process {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// Guest-physical address of its PML4 (its CR3).
    pub fn pml4(&self) -> Gpa {
        self.pml4
    }
    /// Its VMAs and page records.
    pub fn mm(&self) -> &AddressSpace {
        &self.mm
    }
}

/// What [`Kernel::exec`] maps: text (r-x), data (rw-) and a stack (rw-), in pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    /// Pages of text at [`IMAGE_BASE`].
    pub text: u64,
    /// Pages of data after the text (2 MiB-aligned).
    pub data: u64,
    /// Pages of stack below [`STACK_TOP`].
    pub stack: u64,
}

impl Default for Image {
    /// A small program: 4 pages of text, 4 of data, 8 of stack.
    fn default() -> Self {
        Image {
            text: 4,
            data: 4,
            stack: 8,
        }
    }
}

impl Image {
    /// Where the data starts.
    pub fn data_start(&self) -> u64 {
        (IMAGE_BASE + self.text * PAGE_SIZE).next_multiple_of(2 << 20)
    }
    /// Where the stack starts.
    pub fn stack_start(&self) -> u64 {
        STACK_TOP - self.stack * PAGE_SIZE
    }
}

/// What an unmap leaves to do after the TLB flush.
#[derive(Default)]
struct Released {
    /// Data frames whose PTE was cleared: one reference each to drop.
    frames: Vec<Gfn>,
    /// Tables unlinked: cleared, to free.
    tables: Vec<Gfn>,
}

impl Kernel {
    /// A new process with an empty user address space.
    pub fn spawn(&self, cpu: &mut impl Cpu) -> Result<Process, OsError> {
        let pml4 = self.alloc_frame()?.gpa();
        cpu.kernel_write(entry_gpa(pml4, DIRECT_MAP_PML4_SLOT), self.kernel_pml4e())?;
        self.counters.processes.fetch_add(1, Ordering::Relaxed);
        Ok(Process {
            pid: self.next_pid(),
            pml4,
            mm: AddressSpace::new(),
        })
    }

    /// Context switch to `p` (MOV CR3; nothing when it is already current, as Linux skips
    /// the reload for the same mm).
    pub fn switch_to(&self, cpu: &mut impl Cpu, p: &Process) -> Result<(), OsError> {
        if cpu.cr3() != p.pml4 {
            cpu.load_cr3(p.pml4)?;
        }
        Ok(())
    }

    /// Maps `len` bytes of anonymous memory at the lowest free address of the mmap area.
    pub fn mmap(&self, p: &mut Process, len: u64, prot: Prot) -> Result<Gva, OsError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(OsError::BadArgument("mmap length"));
        }
        let at =
            p.mm.find_free(MMAP_BASE, len)
                .ok_or(OsError::BadArgument("no room in the mmap area"))?;
        p.mm.insert(Vma::new(at, len, prot));
        Ok(Gva(at))
    }

    /// Maps `len` bytes of anonymous memory at `addr` (MAP_FIXED_NOREPLACE).
    pub fn mmap_fixed(
        &self,
        p: &mut Process,
        addr: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), OsError> {
        if !user_range_ok(addr, len) || p.mm.overlaps(addr, addr + len) {
            return Err(OsError::BadArgument("mmap_fixed range"));
        }
        p.mm.insert(Vma::new(addr, len, prot));
        Ok(())
    }

    /// A user access by `p` (made current) to `gva`, faulting pages in as needed; returns
    /// the guest-physical address reached.
    pub fn access(
        &self,
        cpu: &mut impl Cpu,
        p: &mut Process,
        gva: Gva,
        kind: AccessKind,
    ) -> Result<Gpa, OsError> {
        self.switch_to(cpu, p)?;
        let mut spurious = 0;
        loop {
            let ec = match cpu.user_access(gva, kind)? {
                Ok(gpa) => return Ok(gpa),
                Err(ec) => ec,
            };
            if self.handle_fault(cpu, p, gva, ec)? {
                spurious = 0;
            } else {
                spurious += 1;
                if spurious > 2 {
                    return Err(OsError::Stuck {
                        gva,
                        kind,
                        error_code: ec,
                    });
                }
            }
        }
    }

    /// The guest's page-fault handler for `p` (current) at `gva` with `ec`. Returns
    /// whether it changed a PTE (`false`: the tables already allow the access, a spurious
    /// fault).
    pub fn handle_fault(
        &self,
        cpu: &mut impl Cpu,
        p: &mut Process,
        gva: Gva,
        ec: ErrorCode,
    ) -> Result<bool, OsError> {
        let segv = OsError::Segfault {
            gva,
            error_code: ec,
        };
        let addr = gva.0 & !(PAGE_SIZE - 1);
        let Some(vma) = p.mm.find_mut(addr) else {
            return Err(segv);
        };
        let kind = ec.access();
        let allowed = match kind {
            AccessKind::Read => true,
            AccessKind::Write => vma.prot.write,
            AccessKind::Fetch => vma.prot.exec,
        };
        if !allowed {
            return Err(segv);
        }
        self.counters.page_faults.fetch_add(1, Ordering::Relaxed);
        let rec = vma.record(addr);
        let pte_gpa = PtCursor::new(p.pml4)
            .pte_gpa(self, cpu, addr, true)?
            .expect("allocated");
        let e = cpu.kernel_read(pte_gpa)?;
        if (e & pte::P != 0) != rec.gfn().is_some()
            || rec.gfn().is_some_and(|g| entry_addr(e) != g.gpa())
        {
            return Err(OsError::Inconsistent(format!(
                "pid {} gva {addr:#x}: PTE {e:#x} at {pte_gpa:?}, record {rec:?}",
                p.pid
            )));
        }
        let write = vma.prot.write;
        let nx = if vma.prot.exec { 0 } else { pte::NX };
        if e & pte::P == 0 {
            // Demand paging: a fresh anonymous page, writable when the VMA is (Linux
            // maps a new private page dirty and writable even on a read fault when it
            // does not use the zero page).
            let f = self.alloc_frame()?;
            let rw = if write { pte::RW | pte::D } else { 0 };
            cpu.kernel_write(pte_gpa, f.gpa().0 | pte::P | pte::US | pte::A | rw | nx)?;
            vma.set_record(addr, PageRecord::new(f, write));
            return Ok(true);
        }
        if kind == AccessKind::Write && e & pte::RW == 0 {
            let old = entry_addr(e).gfn();
            if self.frames.refcount(old) == 1 {
                // The last reference: take the page over (wp_page_reuse; no flush, a
                // permission upgrade needs none on x86).
                cpu.kernel_write(pte_gpa, e | pte::RW | pte::D | pte::A)?;
                self.counters.cow_reuses.fetch_add(1, Ordering::Relaxed);
            } else {
                // Copy (wp_page_copy): the new PTE replaces the old one, with a flush
                // of the old translation, then the old page loses a reference.
                let f = self.alloc_frame()?;
                let flags = e & !pte::ADDR_MASK;
                cpu.kernel_write(pte_gpa, f.gpa().0 | flags | pte::RW | pte::D | pte::A)?;
                cpu.invlpg(Gva(addr))?;
                self.frames.put(old);
                self.counters.cow_copies.fetch_add(1, Ordering::Relaxed);
                vma.set_record(addr, PageRecord::new(f, true));
                return Ok(true);
            }
            vma.set_record(addr, PageRecord::new(old, true));
            return Ok(true);
        }
        self.counters
            .spurious_faults
            .fetch_add(1, Ordering::Relaxed);
        Ok(false)
    }

    /// Forks `parent` (made current): the child has the same VMAs and maps the same
    /// frames, every private writable page read-only in both (copy-on-write).
    pub fn fork(&self, cpu: &mut impl Cpu, parent: &mut Process) -> Result<Process, OsError> {
        self.switch_to(cpu, parent)?;
        let mut child = self.spawn(cpu)?;
        let mut pc = PtCursor::new(parent.pml4);
        let mut cc = PtCursor::new(child.pml4);
        let mut wrprotected = false;
        for vma in parent.mm.vmas_mut() {
            let mut cv = Vma::new(vma.start, vma.end() - vma.start, vma.prot);
            for i in 0..vma.pages.len() {
                let rec = vma.pages[i];
                let Some(gfn) = rec.gfn() else { continue };
                let addr = vma.start + i as u64 * PAGE_SIZE;
                let pg = pc.pte_gpa(self, cpu, addr, false)?.ok_or_else(|| {
                    OsError::Inconsistent(format!("pid {} {addr:#x}: no PT", parent.pid))
                })?;
                let mut e = cpu.kernel_read(pg)?;
                if e & pte::P == 0 || entry_addr(e) != gfn.gpa() {
                    return Err(OsError::Inconsistent(format!(
                        "pid {} {addr:#x}: PTE {e:#x}, record {rec:?}",
                        parent.pid
                    )));
                }
                if e & pte::RW != 0 {
                    e &= !pte::RW;
                    cpu.kernel_write(pg, e)?;
                    vma.pages[i] = PageRecord::new(gfn, false);
                    wrprotected = true;
                }
                let cg = cc.pte_gpa(self, cpu, addr, true)?.expect("allocated");
                cpu.kernel_write(cg, e & !pte::A)?;
                self.frames.get(gfn);
                cv.pages[i] = PageRecord::new(gfn, false);
            }
            child.mm.insert(cv);
        }
        if wrprotected {
            cpu.flush_tlb()?;
        }
        Ok(child)
    }

    /// Unmaps `[addr, addr + len)` of `p` (made current).
    pub fn munmap(
        &self,
        cpu: &mut impl Cpu,
        p: &mut Process,
        addr: u64,
        len: u64,
    ) -> Result<(), OsError> {
        if !user_range_ok(addr, len) {
            return Err(OsError::BadArgument("munmap range"));
        }
        self.switch_to(cpu, p)?;
        let removed = p.mm.remove_range(addr, addr + len);
        let mut rel = Released::default();
        self.clear_ptes(cpu, p, &removed, &mut rel)?;
        free_tables(
            self,
            cpu,
            p.pml4,
            &p.mm,
            &[(addr, addr + len)],
            &mut rel.tables,
        )?;
        if len / PAGE_SIZE <= FLUSH_CEILING_PAGES {
            for a in (addr..addr + len).step_by(PAGE_SIZE as usize) {
                cpu.invlpg(Gva(a))?;
            }
        } else {
            cpu.flush_tlb()?;
        }
        self.release(rel);
        Ok(())
    }

    /// Replaces `p`'s user address space (made current) by a fresh `image`.
    pub fn exec(&self, cpu: &mut impl Cpu, p: &mut Process, image: &Image) -> Result<(), OsError> {
        self.switch_to(cpu, p)?;
        self.drop_user(cpu, p)?;
        if image.text != 0 {
            p.mm.insert(Vma::new(IMAGE_BASE, image.text * PAGE_SIZE, Prot::RX));
        }
        if image.data != 0 {
            p.mm.insert(Vma::new(
                image.data_start(),
                image.data * PAGE_SIZE,
                Prot::RW,
            ));
        }
        if image.stack != 0 {
            p.mm.insert(Vma::new(
                image.stack_start(),
                image.stack * PAGE_SIZE,
                Prot::RW,
            ));
        }
        Ok(())
    }

    /// Ends `p`: its user address space goes, the CPU moves to the idle PML4, and the PML4
    /// is cleared and freed.
    pub fn exit(&self, cpu: &mut impl Cpu, mut p: Process) -> Result<(), OsError> {
        self.switch_to(cpu, &p)?;
        self.drop_user(cpu, &mut p)?;
        cpu.load_cr3(self.idle_pml4())?;
        cpu.kernel_write(entry_gpa(p.pml4, DIRECT_MAP_PML4_SLOT), 0)?;
        self.frames.put(p.pml4.gfn());
        Ok(())
    }

    /// Clears every user PTE of `p` (current) and frees its user tables, one full flush.
    fn drop_user(&self, cpu: &mut impl Cpu, p: &mut Process) -> Result<(), OsError> {
        let removed = p.mm.take_all();
        if removed.is_empty() {
            return Ok(());
        }
        let mut rel = Released::default();
        self.clear_ptes(cpu, p, &removed, &mut rel)?;
        let ranges: Vec<(u64, u64)> = removed.iter().map(|v| (v.start, v.end())).collect();
        free_tables(self, cpu, p.pml4, &p.mm, &ranges, &mut rel.tables)?;
        cpu.flush_tlb()?;
        self.release(rel);
        Ok(())
    }

    /// Clears the PTE of every present page of `removed` (taken out of `p`'s VMAs).
    fn clear_ptes(
        &self,
        cpu: &mut impl Cpu,
        p: &Process,
        removed: &[Vma],
        rel: &mut Released,
    ) -> Result<(), OsError> {
        let mut cur = PtCursor::new(p.pml4);
        for v in removed {
            for (addr, rec) in v.present() {
                let gfn = rec.gfn().expect("present");
                let pg = cur.pte_gpa(self, cpu, addr, false)?.ok_or_else(|| {
                    OsError::Inconsistent(format!("pid {} {addr:#x}: no PT", p.pid))
                })?;
                let e = cpu.kernel_read(pg)?;
                if e & pte::P == 0 || entry_addr(e) != gfn.gpa() {
                    return Err(OsError::Inconsistent(format!(
                        "pid {} {addr:#x}: PTE {e:#x}, record {rec:?}",
                        p.pid
                    )));
                }
                cpu.kernel_write(pg, 0)?;
                rel.frames.push(gfn);
            }
        }
        Ok(())
    }

    /// Drops the references an unmap released, after its TLB flush.
    fn release(&self, rel: Released) {
        for f in rel.frames {
            self.frames.put(f);
        }
        for t in rel.tables {
            let freed = self.frames.put(t);
            debug_assert!(freed, "table {t:?} had other references");
        }
    }
}
