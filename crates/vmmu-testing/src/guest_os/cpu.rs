//! The CPU the guest kernel runs on: what it needs from a vCPU, as a trait with two
//! implementations.
//!
//! - [`VcpuCpu`] runs on a real vmmu vCPU under shadow paging: every kernel page-table
//!   read and write is a CPL 0 guest access through the direct map
//!   (`gva_read_u64`/`gva_write_u64` at [`phys_to_virt`]), so the MMU sees it, emulates it
//!   (write-protected guest table) or lets it through (unsync table); user accesses are
//!   CPL 3 `gva_access`es; MOV CR3, INVLPG and full flushes go to the MMU.
//! - [`SoftCpu`] is the reference: it translates with [`walk::translate`] over guest memory
//!   and has no TLB, so the kernel's logic can be tested without the MMU.
//!
//! Invariant: the kernel reaches guest memory only through a [`Cpu`] (boot aside, which
//! writes the direct map with paging off).

use std::sync::Arc;

use vmmu::guest::{GuestMemory, PagingState};
use vmmu::host::HostMemory;
use vmmu::table::{HeapTableAllocator, TableAllocator};
use vmmu::types::{AccessKind, ErrorCode, Gpa, Gva};
use vmmu::Vcpu;
use vmmu::{Exit, Vm};

use super::layout::phys_to_virt;
use super::walk::{self, WalkError};
use super::OsError;

/// What the guest kernel needs from the CPU it runs on.
pub trait Cpu {
    /// CR3 now.
    fn cr3(&self) -> Gpa;
    /// A kernel (CPL 0) read of the 8-byte word at guest-physical `gpa`, through the direct
    /// map.
    fn kernel_read(&mut self, gpa: Gpa) -> Result<u64, OsError>;
    /// A kernel (CPL 0) write of the 8-byte word at guest-physical `gpa`, through the
    /// direct map.
    fn kernel_write(&mut self, gpa: Gpa, val: u64) -> Result<(), OsError>;
    /// A user (CPL 3) access: `Ok(Ok(gpa))` when it completes, `Ok(Err(error_code))` when
    /// it takes a page fault (the guest kernel's to handle), `Err` when the VM failed.
    fn user_access(
        &mut self,
        gva: Gva,
        kind: AccessKind,
    ) -> Result<Result<Gpa, ErrorCode>, OsError>;
    /// MOV to CR3.
    fn load_cr3(&mut self, cr3: Gpa) -> Result<(), OsError>;
    /// INVLPG.
    fn invlpg(&mut self, gva: Gva) -> Result<(), OsError>;
    /// A full TLB flush.
    fn flush_tlb(&mut self) -> Result<(), OsError>;
}

/// The paging registers every vCPU of the model runs with: long mode, CR0.WP, EFER.NX.
pub fn paging_state(cr3: Gpa, cpl: u8) -> PagingState {
    PagingState {
        cr3,
        cr0_wp: true,
        efer_nx: true,
        cpl,
    }
}

/// A vmmu vCPU under shadow paging. Dropping it gives the vCPU back to the VM
/// ([`Vm::release_vcpu`]), so the roots it held can go.
pub struct VcpuCpu<'vm, H: HostMemory, A: TableAllocator + 'static = HeapTableAllocator> {
    vm: &'vm Vm<H, A>,
    /// Always `Some` until drop.
    vcpu: Option<Vcpu>,
    cr3: Gpa,
    cpl: u8,
}

impl<'vm, H: HostMemory, A: TableAllocator + 'static> VcpuCpu<'vm, H, A> {
    /// A new vCPU of `vm`, in long mode at CPL 0 on the address space `cr3`.
    pub fn new(vm: &'vm Vm<H, A>, cr3: Gpa) -> Result<Self, OsError> {
        let mut vcpu = vm.create_vcpu().map_err(OsError::Vm)?;
        vm.set_paging(&mut vcpu, paging_state(cr3, 0))
            .map_err(OsError::Vm)?;
        Ok(VcpuCpu {
            vm,
            vcpu: Some(vcpu),
            cr3,
            cpl: 0,
        })
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &Vcpu {
        self.vcpu.as_ref().expect("live until drop")
    }

    #[inline]
    fn v(&mut self) -> &mut Vcpu {
        self.vcpu.as_mut().expect("live until drop")
    }

    /// The VM.
    pub fn vm(&self) -> &'vm Vm<H, A> {
        self.vm
    }

    #[inline]
    fn set_cpl(&mut self, cpl: u8) {
        if self.cpl != cpl {
            self.v().set_cpl(cpl);
            self.cpl = cpl;
        }
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Drop for VcpuCpu<'_, H, A> {
    fn drop(&mut self) {
        if let Some(v) = self.vcpu.take() {
            // The vCPU was made by this VM, so it is not refused.
            self.vm
                .release_vcpu(v)
                .expect("the vCPU belongs to this VM");
        }
    }
}

/// A kernel access through the direct map failed: the direct map is broken (or the VM
/// exited).
fn kernel_exit(exit: Exit) -> OsError {
    match exit {
        Exit::GuestPageFault { gva, error_code } => OsError::KernelFault { gva, error_code },
        other => OsError::Exit(other),
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Cpu for VcpuCpu<'_, H, A> {
    fn cr3(&self) -> Gpa {
        self.cr3
    }

    #[inline]
    fn kernel_read(&mut self, gpa: Gpa) -> Result<u64, OsError> {
        self.set_cpl(0);
        self.vm
            .gva_read_u64(self.vcpu.as_mut().expect("live"), phys_to_virt(gpa))
            .map_err(kernel_exit)
    }

    #[inline]
    fn kernel_write(&mut self, gpa: Gpa, val: u64) -> Result<(), OsError> {
        self.set_cpl(0);
        self.vm
            .gva_write_u64(self.vcpu.as_mut().expect("live"), phys_to_virt(gpa), val)
            .map_err(kernel_exit)
    }

    #[inline]
    fn user_access(
        &mut self,
        gva: Gva,
        kind: AccessKind,
    ) -> Result<Result<Gpa, ErrorCode>, OsError> {
        self.set_cpl(3);
        match self
            .vm
            .gva_access(self.vcpu.as_mut().expect("live"), gva, kind)
        {
            Ok(gpa) => Ok(Ok(gpa)),
            Err(Exit::GuestPageFault { error_code, .. }) => Ok(Err(error_code)),
            Err(other) => Err(OsError::Exit(other)),
        }
    }

    fn load_cr3(&mut self, cr3: Gpa) -> Result<(), OsError> {
        self.vm
            .load_cr3(self.vcpu.as_mut().expect("live"), cr3)
            .map_err(OsError::Vm)?;
        self.cr3 = cr3;
        Ok(())
    }

    fn invlpg(&mut self, gva: Gva) -> Result<(), OsError> {
        self.vm
            .invlpg(self.vcpu.as_mut().expect("live"), gva)
            .map_err(OsError::Vm)
    }

    fn flush_tlb(&mut self) -> Result<(), OsError> {
        self.vm
            .flush_guest_tlb(self.vcpu.as_mut().expect("live"))
            .map_err(OsError::Vm)
    }
}

/// The reference CPU: translations by [`walk::translate`] over guest memory, no TLB.
pub struct SoftCpu {
    mem: Arc<dyn GuestMemory>,
    cr3: Gpa,
    /// INVLPGs executed.
    pub invlpgs: u64,
    /// Full flushes executed.
    pub flushes: u64,
    /// CR3 loads.
    pub cr3_loads: u64,
}

impl SoftCpu {
    /// A CPU on the address space `cr3` of `mem`.
    pub fn new(mem: Arc<dyn GuestMemory>, cr3: Gpa) -> Self {
        SoftCpu {
            mem,
            cr3,
            invlpgs: 0,
            flushes: 0,
            cr3_loads: 0,
        }
    }

    fn kernel_gpa(&self, gpa: Gpa, kind: AccessKind) -> Result<Gpa, OsError> {
        let gva = phys_to_virt(gpa);
        match walk::translate(&*self.mem, &paging_state(self.cr3, 0), gva, kind) {
            Ok(t) => Ok(t.gpa),
            Err(WalkError::Fault(error_code)) => Err(OsError::KernelFault { gva, error_code }),
            Err(WalkError::BadTable(at)) => Err(OsError::Vm(vmmu::Error::GuestMemory { gpa: at })),
        }
    }
}

impl Cpu for SoftCpu {
    fn cr3(&self) -> Gpa {
        self.cr3
    }

    fn kernel_read(&mut self, gpa: Gpa) -> Result<u64, OsError> {
        let at = self.kernel_gpa(gpa, AccessKind::Read)?;
        self.mem.read_u64(at).map_err(OsError::Vm)
    }

    fn kernel_write(&mut self, gpa: Gpa, val: u64) -> Result<(), OsError> {
        let at = self.kernel_gpa(gpa, AccessKind::Write)?;
        self.mem.write_u64(at, val).map_err(OsError::Vm)
    }

    fn user_access(
        &mut self,
        gva: Gva,
        kind: AccessKind,
    ) -> Result<Result<Gpa, ErrorCode>, OsError> {
        match walk::translate(&*self.mem, &paging_state(self.cr3, 3), gva, kind) {
            Ok(t) => Ok(Ok(t.gpa)),
            Err(WalkError::Fault(ec)) => Ok(Err(ec)),
            Err(WalkError::BadTable(at)) => Err(OsError::Vm(vmmu::Error::GuestMemory { gpa: at })),
        }
    }

    fn load_cr3(&mut self, cr3: Gpa) -> Result<(), OsError> {
        self.cr3 = cr3;
        self.cr3_loads += 1;
        Ok(())
    }

    fn invlpg(&mut self, _gva: Gva) -> Result<(), OsError> {
        self.invlpgs += 1;
        Ok(())
    }

    fn flush_tlb(&mut self) -> Result<(), OsError> {
        self.flushes += 1;
        Ok(())
    }
}
