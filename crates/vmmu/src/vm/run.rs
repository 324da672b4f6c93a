//! The run loop: the contract between vmmu and a hypervisor that runs real vCPUs on
//! vmmu's tables (KVM's `vcpu_enter_guest`, `handle_ept_violation` and
//! `handle_ept_misconfig`), and the kick through which a remote flush interrupts a vCPU
//! in guest mode. The guide to it is [`crate::embedding`].
//!
//! # The protocol, for each vCPU thread
//! 1. [`Vm::enter_guest`]: vmmu services the vCPU's pending requests (a root reload, a
//!    TLB flush), stores the vCPU's mode as in guest mode, then a fence, then checks that
//!    no request came meanwhile (if one did it leaves guest mode and starts over). It
//!    returns the [`EntryState`]: the [`Eptp`] to load, whether it changed since the
//!    last entry, and the [`Invept`] the entry owes. The embedder then, with interrupts
//!    disabled since before the call (so a kick's IPI that arrives now makes the
//!    VMLAUNCH/VMRESUME exit at once), writes the EPTP into the VMCS if it changed,
//!    executes the INVEPT if one is owed, and enters the guest.
//! 2. On a VM exit, [`Vm::exit_guest`] before anything else: it stores the mode as
//!    outside guest mode with release ordering, which is the acknowledgement a waiting
//!    flusher needs. Only then may the thread take locks or call into the VM.
//! 3. Handle the exit: [`Vm::handle_ept_violation`] with the guest-physical address and
//!    the exit qualification the VMCS reports, [`Vm::handle_ept_misconfig`] with the
//!    address; an external interrupt (the kick) needs nothing from vmmu. The
//!    [`ExitAction`] says what to do next: resume (go to 1), retry later, emulate MMIO or
//!    a write-tracked write, or exit to the VMM.
//!
//! # What vmmu guarantees
//! - From `enter_guest` until `exit_guest`, every table reachable from the EPTP the entry
//!   returned stays allocated and is never reused: vmmu frees a table only after a remote
//!   flush, and a remote flush waits for every vCPU in guest mode to call `exit_guest`.
//! - A remote flush (every operation that removes a translation ends with one) posts a
//!   request to every vCPU, then calls the kick ([`Kick::kick`]) for each vCPU it finds
//!   in guest mode and waits until that vCPU has called `exit_guest`, as
//!   `kvm_make_all_cpus_request` with wait does. When the operation returns, no vCPU
//!   uses a removed translation: each one in guest mode has left it, and its next entry
//!   owes the INVEPT (or loads a new root).
//! - An entry whose [`EntryState::invept`] is [`Invept::None`] owes nothing: no flush was
//!   requested since the last INVEPT the vCPU was told to execute.
//!
//! # What the embedder guarantees
//! - A kick makes the vCPU leave guest mode promptly (an IPI to its physical CPU), and
//!   never blocks or calls into the VM (it may run under the MMU lock).
//! - Between `enter_guest` and `exit_guest` the vCPU's thread runs the guest only: it
//!   takes no lock and calls no VM method (a remote flush it waited for would wait for
//!   it).
//! - It loads the entry's EPTP and executes the entry's INVEPT before VM entry.
//!
//! Without a kick ([`Vm::set_kick`]) a VM creates only vCPUs that stay in guest mode for
//! one access ([`Vm::create_vcpu`], used by [`Vm::access`]); [`Vm::create_run_loop_vcpu`]
//! refuses with [`Error::NoKick`].

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use super::dirty_log::DirtyRoom;
use super::qualification::EptViolation;
use super::{Exit, MmuKind, Vcpu, Vm, VmState};
use crate::error::Error;
use crate::host::HostMemory;
use crate::hw::{
    ept_walk, fast_page_fault, leaf_pfn, lockless_walk, CpuShared, GuestState, WalkExit,
};
use crate::mmu::FaultOutcome;
use crate::spte::SpteFormat;
use crate::sync::RwLock;
use crate::table::TableAllocator;
use crate::types::{AccessKind, ErrorCode, Gpa, Hpa, Pfn, PAGE_SHIFT};

/// The EPT pointer (Intel SDM vol. 3C, "Extended-Page-Table Pointer"): what the VMCS's
/// EPTP field holds for a vCPU's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Eptp(u64);

impl Eptp {
    /// Memory type of the paging structures: write-back (bits 2:0 = 6).
    pub const MEMORY_TYPE_WB: u8 = 6;
    /// Levels of the walk vmmu's tables have (bits 5:3 hold it minus one).
    pub const WALK_LEVELS: u8 = 4;
    const AD_ENABLE: u64 = 1 << 6;

    /// The EPTP vmmu loads for `root`: write-back, a 4-level walk, accessed and dirty
    /// flags enabled (vmmu's tables use the A/D bits, and the CPU model sets them).
    pub const fn new(root: Pfn) -> Eptp {
        Eptp(
            (root.0 << PAGE_SHIFT)
                | Self::MEMORY_TYPE_WB as u64
                | ((Self::WALK_LEVELS as u64 - 1) << 3)
                | Self::AD_ENABLE,
        )
    }
    /// The raw value, for the VMCS.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// The root table's frame (bits 51:12).
    pub const fn root(self) -> Pfn {
        Pfn((self.0 & ((1 << 52) - 1)) >> PAGE_SHIFT)
    }
    /// The memory type (bits 2:0).
    pub const fn memory_type(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// The walk length in levels (bits 5:3, plus one).
    pub const fn walk_levels(self) -> u8 {
        ((self.0 >> 3) & 7) as u8 + 1
    }
    /// Whether accessed and dirty flags are enabled (bit 6).
    pub const fn ad_enabled(self) -> bool {
        self.0 & Self::AD_ENABLE != 0
    }
}

/// The INVEPT an entry owes before VM entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invept {
    /// Nothing to invalidate.
    None,
    /// INVEPT type 1 (single-context) for this EPTP: translations derived from it may be
    /// stale (a flush was requested, or the root is new to this vCPU).
    SingleContext(Eptp),
}

/// What a vCPU's VM entry needs, from [`Vm::enter_guest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    /// The EPTP to run on.
    pub eptp: Eptp,
    /// Whether the EPTP changed since the last entry (the first entry included): write it
    /// into the VMCS.
    pub load_eptp: bool,
    /// The INVEPT to execute before entry.
    pub invept: Invept,
}

/// A VM exit of the CPU model ([`Vm::model_access`]), in the form VMX reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// EPT violation (exit reason 48): the guest-physical address and the exit
    /// qualification ([`EptViolation`]).
    EptViolation {
        /// The guest-physical address field of the VMCS.
        gpa: Gpa,
        /// The exit qualification.
        qualification: u64,
    },
    /// EPT misconfiguration (exit reason 49): an entry on the walk is malformed (vmmu's
    /// MMIO SPTEs are made so on purpose).
    EptMisconfig {
        /// The guest-physical address field of the VMCS.
        gpa: Gpa,
    },
    /// External interrupt (exit reason 1): the vCPU was kicked.
    ExternalInterrupt,
}

/// What the embedder does after vmmu handled an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest (from [`Vm::enter_guest`]): the fault is fixed, or was
    /// spurious, or another thread changed the tables meanwhile (the access faults again
    /// if it must).
    Resume,
    /// The host is invalidating the page at `gpa` (an MMU notifier is in progress):
    /// re-enter after a short pause, as KVM's `RET_PF_RETRY` does.
    Retry {
        /// The address.
        gpa: Gpa,
    },
    /// Emulate the instruction as an MMIO access (KVM_EXIT_MMIO): the address is outside
    /// every memslot, or a write hit a READONLY slot.
    EmulateMmio {
        /// The address.
        gpa: Gpa,
    },
    /// Emulate the write: its page is write-tracked, and the tracker (the VMM) emulates
    /// writes to it.
    EmulateWrite {
        /// The address.
        gpa: Gpa,
    },
    /// Exit to the VMM: the vCPU's dirty ring is (soft) full (KVM_EXIT_DIRTY_RING_FULL).
    DirtyRingFull,
    /// Exit to the VMM with a memory fault (KVM_EXIT_MEMORY_FAULT, or -EFAULT): the MMU
    /// could not map the page.
    MemoryFault {
        /// The address.
        gpa: Gpa,
        /// Why.
        error: Error,
    },
}

/// The embedder's kick: interrupt the physical CPU running a vCPU, so the vCPU leaves
/// guest mode (an IPI, as KVM's `kvm_vcpu_kick`).
///
/// Called by remote flushes, for each vCPU found in guest mode, possibly under the MMU
/// lock and from any thread: it must not block, take a lock a vCPU may hold, or call into
/// the VM. It need not wait: vmmu waits for the vCPU's [`Vm::exit_guest`] afterwards.
pub trait Kick: Send + Sync {
    /// Make vCPU `vcpu` (its [`Vcpu::id`]) leave guest mode soon.
    fn kick(&self, vcpu: u32);
}

/// The CPU model's interrupt line of one vCPU: raising it makes the vCPU's next
/// [`Vm::model_access`] exit with [`VmExit::ExternalInterrupt`] (from
/// [`Vcpu::interrupt_line`]).
#[derive(Clone)]
pub struct InterruptLine(Arc<CpuShared>);

impl InterruptLine {
    /// Raise the line (an IPI to the model CPU).
    pub fn raise(&self) {
        self.0.interrupt.store(true, Ordering::Release);
    }
}

/// A kick for vCPUs run by the CPU model: raises the interrupt line of each vCPU
/// registered with it (what an embedder's kick does with an IPI).
#[derive(Default)]
pub struct ModelKick {
    lines: RwLock<Vec<Option<InterruptLine>>>,
}

impl ModelKick {
    /// A kick with no vCPU registered.
    pub fn new() -> Self {
        Self::default()
    }
    /// Kick `vcpu` through its interrupt line from now on.
    pub fn register(&self, vcpu: &Vcpu) {
        let mut lines = self.lines.write();
        let i = vcpu.id as usize;
        if lines.len() <= i {
            lines.resize(i + 1, None);
        }
        lines[i] = Some(vcpu.interrupt_line());
    }
}

impl Kick for ModelKick {
    fn kick(&self, vcpu: u32) {
        if let Some(Some(line)) = self.lines.read().get(vcpu as usize) {
            line.raise();
        }
    }
}

impl Vcpu {
    /// The CPU model's interrupt line of this vCPU (for a kick, see [`ModelKick`]).
    pub fn interrupt_line(&self) -> InterruptLine {
        InterruptLine(self.cpu.shared.clone())
    }

    /// Whether the vCPU is in guest mode (entered, and not yet left with
    /// [`Vm::exit_guest`]).
    pub fn in_guest_mode(&self) -> bool {
        self.cpu.guest != GuestState::Outside
    }

    /// Whether the vCPU was made for the run loop ([`Vm::create_run_loop_vcpu`]).
    pub fn is_run_loop(&self) -> bool {
        self.run_loop
    }

    /// The CPU model's INVEPT: drop the cached translations of `invept`'s context (the
    /// model caches one context, so all of them). What an embedder running on the model
    /// does where a VMX host executes INVEPT; [`Invept::None`] does nothing.
    pub fn model_invept(&mut self, invept: Invept) {
        if let Invept::SingleContext(_) = invept {
            self.cpu.invept();
            self.invepts += 1;
        }
    }
}

/// The action a direct MMU's fault outcome asks for.
fn action(outcome: FaultOutcome, gpa: Gpa) -> ExitAction {
    match outcome {
        FaultOutcome::Mapped(_) | FaultOutcome::Spurious => ExitAction::Resume,
        FaultOutcome::Retry => ExitAction::Retry { gpa },
        FaultOutcome::Mmio | FaultOutcome::ReadOnlyWrite => ExitAction::EmulateMmio { gpa },
        FaultOutcome::WriteTracked => ExitAction::EmulateWrite { gpa },
        FaultOutcome::GuestFault(_) | FaultOutcome::Emulate => {
            unreachable!("a direct MMU's fault has no guest tables to fault on or emulate")
        }
    }
}

/// The action an error of the fault handler asks for.
fn fault_error(e: Error, gpa: Gpa) -> ExitAction {
    match e {
        Error::DirtyRingFull { .. } => ExitAction::DirtyRingFull,
        error => ExitAction::MemoryFault { gpa, error },
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// Install the kick remote flushes call for each vCPU they find in guest mode (see
    /// [`Kick`]). Needed before [`create_run_loop_vcpu`](Self::create_run_loop_vcpu).
    pub fn set_kick(&mut self, kick: Arc<dyn Kick>) {
        self.kick = Some(kick);
    }

    /// A vCPU for the run loop: it may stay in guest mode as long as its embedder likes
    /// (see the module docs). [`Error::NoKick`] without a kick, [`Error::WrongPagingMode`]
    /// under shadow paging (the run loop runs EPT), and the errors of
    /// [`create_vcpu`](Self::create_vcpu).
    pub fn create_run_loop_vcpu(&self) -> Result<Vcpu, Error> {
        if self.config.mmu == MmuKind::ShadowPaging {
            return Err(Error::WrongPagingMode(
                "the run loop runs EPT: shadow paging's vCPUs use the gva_* accesses",
            ));
        }
        if self.kick.is_none() {
            return Err(Error::NoKick);
        }
        let mut vcpu = self.create_vcpu()?;
        vcpu.run_loop = true;
        Ok(vcpu)
    }

    /// Step 1 of the run loop (see the module docs): service `vcpu`'s requests and enter
    /// guest mode. Returns what the VM entry needs; the vCPU is in guest mode until
    /// [`exit_guest`](Self::exit_guest).
    ///
    /// Refused (as `Exit::Error`, nothing changed): a vCPU of another VM
    /// ([`Error::ForeignVcpu`]), one not made for the run loop
    /// ([`Error::NotRunLoopVcpu`]), one already in guest mode ([`Error::InGuestMode`]).
    /// A vCPU whose dirty ring is soft-full gets [`Exit::DirtyRingFull`] and stays out.
    pub fn enter_guest(&self, vcpu: &mut Vcpu) -> Result<EntryState, Exit> {
        self.check_vcpu(vcpu)?;
        if !vcpu.run_loop {
            return Err(Error::NotRunLoopVcpu { vcpu: vcpu.id }.into());
        }
        if vcpu.in_guest_mode() {
            return Err(Error::InGuestMode { vcpu: vcpu.id }.into());
        }
        if vcpu.dirty_ring_soft_full() {
            return Err(Exit::DirtyRingFull);
        }
        Ok(self.enter(vcpu, None))
    }

    /// The entry protocol (KVM's `vcpu_enter_guest` up to VM entry), for the run loop and
    /// for [`access`](Self::access): service the requests outside guest mode (a reload
    /// loads the current root, under `held` if given), store guest mode, fence, and start
    /// over if a request came meanwhile.
    pub(super) fn enter(&self, vcpu: &mut Vcpu, mut held: Option<&mut VmState<A>>) -> EntryState {
        // A kick raised while the vCPU was outside guest mode is for an entry that has
        // ended: this one services the request it announced.
        if vcpu.cpu.shared.interrupt.load(Ordering::Relaxed) {
            vcpu.cpu.shared.interrupt.store(false, Ordering::Relaxed);
        }
        loop {
            if vcpu.cpu.service_requests() {
                match held.as_deref_mut() {
                    Some(st) => self.reload_root_under(st, vcpu),
                    None => self.reload_root(vcpu),
                }
            }
            if vcpu.cpu.try_enter() {
                break;
            }
        }
        vcpu.entries += 1;
        let eptp = Eptp::new(vcpu.cpu.root);
        EntryState {
            eptp,
            load_eptp: core::mem::take(&mut vcpu.cpu.root_changed),
            invept: if core::mem::take(&mut vcpu.cpu.owed_flush) {
                Invept::SingleContext(eptp)
            } else {
                Invept::None
            },
        }
    }

    /// Step 2 of the run loop: leave guest mode (after a VM exit, or to stop running the
    /// guest). Nothing to do for a vCPU outside guest mode. [`Error::ForeignVcpu`] for a
    /// vCPU of another VM.
    pub fn exit_guest(&self, vcpu: &mut Vcpu) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        vcpu.cpu.exit_guest();
        Ok(())
    }

    /// Checks every exit handler makes: the vCPU is this VM's, outside guest mode, on a
    /// direct MMU, and `gpa` is within the guest-physical width.
    fn check_exit(&self, vcpu: &Vcpu, gpa: Gpa) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        if vcpu.in_guest_mode() {
            return Err(Error::InGuestMode { vcpu: vcpu.id });
        }
        if self.config.mmu == MmuKind::ShadowPaging {
            return Err(Error::WrongPagingMode(
                "EPT exits need a direct MMU; shadow paging faults by gva",
            ));
        }
        if gpa.0 >> self.config.limits.gpa_bits != 0 {
            return Err(Error::InvalidRange {
                start: gpa.gfn().0,
                end: gpa.gfn().0 + 1,
            });
        }
        Ok(())
    }

    /// Step 3 of the run loop, for an EPT violation (KVM's `handle_ept_violation`):
    /// decode `exit_qualification` as the SDM defines it ([`EptViolation`]), try the
    /// lockless fast path for a write to a page write-protected for dirty logging, else
    /// run the MMU's fault handler. Returns what to do next.
    ///
    /// Refused, with nothing changed: a vCPU of another VM, one in guest mode
    /// ([`Error::InGuestMode`]: call [`exit_guest`](Self::exit_guest) first), a
    /// shadow-paging VM, a gpa beyond the guest-physical width ([`Error::InvalidRange`]),
    /// a qualification no processor reports ([`Error::InvalidExitQualification`]).
    pub fn handle_ept_violation(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        exit_qualification: u64,
    ) -> Result<ExitAction, Error> {
        self.check_exit(vcpu, gpa)?;
        let v = EptViolation::decode(exit_qualification)?;
        vcpu.exits += 1;
        Ok(self.ept_violation(vcpu, gpa, v.error_code(), None))
    }

    /// The EPT-violation handler: the fast path, then the fault (under `held`, the
    /// exclusive lock the caller holds, if given).
    pub(super) fn ept_violation(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        ec: ErrorCode,
        held: Option<&mut VmState<A>>,
    ) -> ExitAction {
        if ec.contains(ErrorCode::PRESENT.union(ErrorCode::WRITE)) {
            // Room for the page first: without it the fault goes to the locked path,
            // which refuses (DirtyRingFull) rather than make the page writable unlogged.
            if let Ok(room) = DirtyRoom::take(vcpu) {
                vcpu.cpu.begin_lockless();
                // SAFETY: in the lockless-read mode (entered above, left below) on this
                // VM's vCPU (`check_vcpu` by every caller): its root is one of this VM's
                // tables, from `self.alloc`, and this VM's remote flushes wait for it.
                let fixed = unsafe { fast_page_fault(&*self.alloc, vcpu.cpu.root, gpa) };
                if fixed {
                    // Logged before the mode is left, as a write in guest mode would be.
                    self.fast_faults.fetch_add(1, Ordering::Relaxed);
                    self.dirty_index
                        .with(gpa.gfn(), |d, bitmap| room.log(d, Some(bitmap)));
                }
                vcpu.cpu.end_lockless();
                if fixed {
                    return ExitAction::Resume;
                }
            }
        }
        self.fault(vcpu, gpa, ec, held)
    }

    /// The MMU's fault handler, under `held` if given; its outcome as an action.
    fn fault(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        ec: ErrorCode,
        held: Option<&mut VmState<A>>,
    ) -> ExitAction {
        let outcome = match held {
            Some(st) => DirtyRoom::take(vcpu)
                .and_then(|room| self.page_fault_under(st, vcpu, gpa, ec, room)),
            None => self.mmu_page_fault(vcpu, gpa, ec),
        };
        match outcome {
            Ok(o) => action(o, gpa),
            Err(e) => fault_error(e, gpa),
        }
    }

    /// Step 3 of the run loop, for an EPT misconfiguration (KVM's
    /// `handle_ept_misconfig`): an MMIO SPTE of the current generation is MMIO at once,
    /// without a memslot lookup; a stale one is replaced by the fault handler. Refused as
    /// [`handle_ept_violation`](Self::handle_ept_violation) is.
    pub fn handle_ept_misconfig(&self, vcpu: &mut Vcpu, gpa: Gpa) -> Result<ExitAction, Error> {
        self.check_exit(vcpu, gpa)?;
        vcpu.exits += 1;
        Ok(self.ept_misconfig(vcpu, gpa, AccessKind::Read, None))
    }

    /// The EPT-misconfiguration handler; a stale MMIO SPTE is faulted as an access of
    /// `kind` (the run loop does not know the access: a read, and a write faults again).
    pub(super) fn ept_misconfig(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        kind: AccessKind,
        held: Option<&mut VmState<A>>,
    ) -> ExitAction {
        vcpu.cpu.begin_lockless();
        // SAFETY: in the lockless-read mode on this VM's vCPU (as in `ept_violation`).
        let spte = unsafe { lockless_walk(&*self.alloc, vcpu.cpu.root, gpa.gfn()) }.spte;
        vcpu.cpu.end_lockless();
        let gen = self.mmio_generation.load(Ordering::Acquire);
        if spte.is_mmio() && spte.mmio_generation() == gen & crate::spte::MMIO_GEN_MASK {
            // KVM's handle_mmio_page_fault: no memslot lookup needed.
            self.fast_mmio.fetch_add(1, Ordering::Relaxed);
            return ExitAction::EmulateMmio { gpa };
        }
        if !SpteFormat::EPT.is_misconfig(spte) {
            // Changed since the exit: the access walks again.
            return ExitAction::Resume;
        }
        // A stale MMIO SPTE: the fault path replaces it.
        self.fault(vcpu, gpa, ErrorCode::for_access(kind), held)
    }

    /// The CPU model's guest access, standing in for the hardware: `vcpu` (in guest mode,
    /// from [`enter_guest`](Self::enter_guest)) reads, writes or fetches `gpa` through its
    /// TLB or, on a miss, a walk of its EPT root that sets accessed and dirty bits. A
    /// raised interrupt line ([`Vcpu::interrupt_line`], what a kick raises) exits first.
    /// `Ok(Ok(hpa))`: the host-physical address reached. `Ok(Err(exit))`: a VM exit, after
    /// which the vCPU runs no more accesses until it has left guest mode and entered again.
    ///
    /// The model's TLB is flushed only by [`Vcpu::model_invept`]: an entry's INVEPT left
    /// out shows as a stale translation.
    ///
    /// Refused: a vCPU of another VM, one not running the guest
    /// ([`Error::NotInGuestMode`]), a gpa beyond the guest-physical width.
    pub fn model_access(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        kind: AccessKind,
    ) -> Result<Result<Hpa, VmExit>, Error> {
        self.check_vcpu(vcpu)?;
        if vcpu.cpu.guest != GuestState::InGuest {
            return Err(Error::NotInGuestMode { vcpu: vcpu.id });
        }
        if gpa.0 >> self.config.limits.gpa_bits != 0 {
            // Beyond the guest-physical width: the walk would alias a lower address.
            return Err(Error::InvalidRange {
                start: gpa.gfn().0,
                end: gpa.gfn().0 + 1,
            });
        }
        let line = &vcpu.cpu.shared.interrupt;
        let r = if line.load(Ordering::Relaxed) && line.swap(false, Ordering::Acquire) {
            Err(VmExit::ExternalInterrupt)
        } else {
            self.model_walk(vcpu, gpa, kind)
        };
        match r {
            Ok(_) => vcpu.accesses += 1,
            Err(_) => vcpu.cpu.guest = GuestState::Exited,
        }
        Ok(r)
    }

    /// The model's TLB lookup or walk, in guest mode (the caller checked the vCPU).
    #[inline]
    pub(super) fn model_walk(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        kind: AccessKind,
    ) -> Result<Hpa, VmExit> {
        debug_assert_eq!(vcpu.cpu.guest, GuestState::InGuest);
        let gfn = gpa.gfn();
        let pfn = match vcpu.cpu.tlb.lookup(gfn, kind) {
            Some(pfn) => pfn,
            // SAFETY: in guest mode on this VM: the vCPU is this VM's (every caller checks
            // it), so its root is one of this VM's tables, from `self.alloc`, and this
            // VM's remote flushes wait for it to leave guest mode.
            None => match unsafe { ept_walk(&*self.alloc, vcpu.cpu.root, gpa, kind) } {
                Ok(e) => {
                    vcpu.cpu.tlb.fill(gfn, e);
                    leaf_pfn(&e, gfn)
                }
                Err(WalkExit::Violation { gpa, rwx, .. }) => {
                    return Err(VmExit::EptViolation {
                        gpa,
                        qualification: EptViolation::for_access(kind, rwx).encode(),
                    })
                }
                Err(WalkExit::Misconfig { gpa, .. }) => return Err(VmExit::EptMisconfig { gpa }),
                Err(WalkExit::Retry) => unreachable!("the walk fixes nothing"),
            },
        };
        Ok(Hpa((pfn.0 << PAGE_SHIFT) | gpa.page_offset()))
    }

    /// Every vCPU's mode word and id, and the kick, for a remote request.
    pub(crate) fn request_all(&self, req: u32) {
        let kicks = &self.kicks;
        let kick = self.kick.as_deref();
        let f = |id: u32| {
            if let Some(k) = kick {
                kicks.fetch_add(1, Ordering::Relaxed);
                k.kick(id);
            }
        };
        let vcpus = self.vcpus.read();
        crate::hw::request_vcpus(
            vcpus.iter().enumerate().map(|(i, v)| (i as u32, &*v.cpu)),
            req,
            kick.map(|_| &f as &dyn Fn(u32)),
        );
    }
}
