//! The CPU model as the first embedder of the run loop (`vm/run.rs`): a vCPU that stays
//! in guest mode across many accesses, as a real one does, leaves it only when kicked or
//! when an access exits, and flushes its TLB only when an entry says INVEPT. It uses
//! nothing but the public run-loop API, so what it shows holds for any embedder: a kick
//! left out, an INVEPT left out or a reload ignored shows up as a stale translation (or
//! an access that never completes) in the tests that run on it (tests/run_loop.rs).

use super::fault::wait_or_fail;
use super::run::{ExitAction, VmExit};
use super::{Exit, Vcpu, Vm};
use crate::error::Error;
use crate::host::HostMemory;
use crate::table::TableAllocator;
use crate::types::{AccessKind, Gpa, Hpa};

/// Resumes in a row one access of the model may take without completing before it gives
/// up with [`Error::FaultLoop`]: a guest retries for ever, but a test must fail rather
/// than hang when the library leaves a vCPU faulting on a root it never reloads. Far
/// above what racing zaps cause (each resume follows a fault that mapped the page).
pub const MODEL_MAX_RESUMES: u32 = 1 << 16;

/// A vCPU run by the CPU model through the run loop ([`Vm::model_run`]): every access
/// runs in guest mode, entered once and kept for up to `stretch` accesses. Dropping it
/// leaves guest mode.
///
/// Between accesses the vCPU stays in guest mode: its thread must not call into the VM
/// (or wait for a thread that does) while a `ModelRun` is in guest mode; an access that
/// returns an error has left guest mode, and [`exit`](Self::exit) leaves it on purpose.
pub struct ModelRun<'a, H: HostMemory, A: TableAllocator + 'static> {
    vm: &'a Vm<H, A>,
    vcpu: &'a mut Vcpu,
    stretch: u64,
    left: u64,
    /// Kicks taken (external-interrupt exits).
    pub kicks: u64,
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// Run `vcpu` (made by [`create_run_loop_vcpu`](Self::create_run_loop_vcpu)) on the
    /// CPU model, staying in guest mode for up to `stretch` accesses at a time
    /// (`u64::MAX`: until kicked or an exit). [`Error::InvalidConfig`] for a stretch of 0;
    /// the vCPU checks happen at the first entry.
    pub fn model_run<'a>(
        &'a self,
        vcpu: &'a mut Vcpu,
        stretch: u64,
    ) -> Result<ModelRun<'a, H, A>, Error> {
        self.check_vcpu(vcpu)?;
        if stretch == 0 {
            return Err(Error::InvalidConfig(
                "a model run's stretch is at least one access",
            ));
        }
        if !vcpu.run_loop {
            return Err(Error::NotRunLoopVcpu { vcpu: vcpu.id });
        }
        Ok(ModelRun {
            vm: self,
            vcpu,
            stretch,
            left: 0,
            kicks: 0,
        })
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> ModelRun<'_, H, A> {
    /// One guest access: enter guest mode if not in it (loading the EPTP and performing
    /// the INVEPT the entry owes), access through the model; on a VM exit leave guest
    /// mode, handle the exit and go again, until the access completes or exits to the
    /// VMM (as [`Vm::access`] reports it).
    pub fn access(&mut self, gpa: Gpa, kind: AccessKind) -> Result<Hpa, Exit> {
        let mut resumes = 0;
        let mut waits = 0;
        loop {
            if !self.vcpu.in_guest_mode() {
                let entry = self.vm.enter_guest(self.vcpu)?;
                self.vcpu.model_invept(entry.invept);
                self.left = self.stretch;
            }
            let exit = match self.vm.model_access(self.vcpu, gpa, kind) {
                Ok(Ok(hpa)) => {
                    self.left -= 1;
                    if self.left == 0 {
                        self.exit();
                    }
                    return Ok(hpa);
                }
                Ok(Err(exit)) => exit,
                Err(e) => {
                    self.exit();
                    return Err(Exit::Error(e));
                }
            };
            // The VM exit: leave guest mode first (the acknowledgement a flusher waits
            // for), then handle it.
            self.exit();
            let action = match exit {
                VmExit::ExternalInterrupt => {
                    self.kicks += 1;
                    continue;
                }
                VmExit::EptViolation { gpa, qualification } => {
                    self.vm
                        .handle_ept_violation(self.vcpu, gpa, qualification)?
                }
                VmExit::EptMisconfig { gpa } => self.vm.handle_ept_misconfig(self.vcpu, gpa)?,
            };
            match action {
                ExitAction::Resume => {
                    resumes += 1;
                    if resumes >= MODEL_MAX_RESUMES {
                        return Err(Exit::Error(Error::FaultLoop { gpa }));
                    }
                }
                ExitAction::Retry { gpa } => wait_or_fail(&mut waits, gpa)?,
                ExitAction::EmulateMmio { gpa } => {
                    return Err(Exit::Mmio {
                        gpa,
                        write: kind == AccessKind::Write,
                    })
                }
                ExitAction::EmulateWrite { gpa } => return Err(Exit::WriteTracked { gpa }),
                ExitAction::DirtyRingFull => return Err(Exit::DirtyRingFull),
                ExitAction::MemoryFault { error, .. } => return Err(Exit::from(error)),
            }
        }
    }

    /// A guest read.
    pub fn read(&mut self, gpa: Gpa) -> Result<Hpa, Exit> {
        self.access(gpa, AccessKind::Read)
    }

    /// A guest write.
    pub fn write(&mut self, gpa: Gpa) -> Result<Hpa, Exit> {
        self.access(gpa, AccessKind::Write)
    }

    /// Leave guest mode (the next access enters again).
    pub fn exit(&mut self) {
        self.vcpu.cpu.exit_guest();
    }

    /// Whether the vCPU is in guest mode now.
    pub fn in_guest_mode(&self) -> bool {
        self.vcpu.in_guest_mode()
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &Vcpu {
        self.vcpu
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Drop for ModelRun<'_, H, A> {
    fn drop(&mut self) {
        self.exit();
    }
}
