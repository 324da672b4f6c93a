//! Guest-physical accesses and the faults they take: the CPU model's TLB lookup and EPT
//! walk in guest mode, the lockless fast path for write-protected pages, and the MMU's
//! fault handler on an exit, retried until the access completes or goes to the VMM
//! (KVM's `vcpu_enter_guest` -> `kvm_mmu_page_fault` loop).
//!
//! # Locking
//! Translation takes no lock (the vCPU is in guest mode, see `hw::vcpu`); a fault takes
//! the lock its MMU needs (see `vm/mmu.rs`).
//!
//! # Progress
//! A lockless try can lose its race: the fault maps the page and lets the lock go, and
//! another thread zaps the page (or invalidates the root) again before the retried walk
//! reaches it. KVM retries for ever; so does a guest, which runs the instruction again.
//! vmmu retries [`LOCKLESS_RETRIES`] times, then takes the MMU lock exclusively (for TDP
//! that closes the fault gate too, see `vm/lock.rs`) and, under that one guard, reloads
//! the root if it must, faults, enters guest mode and walks: every table change but the
//! fast path's (which only makes a present page writable) needs that lock or the gate,
//! so nothing can undo the fault before the walk, and the access completes in a try or
//! two. [`MAX_LOCKED_RETRIES`] bounds that loop only to catch an MMU bug
//! ([`Error::FaultLoop`]). The exclusive guard is taken outside guest mode and held
//! across the walk: the vCPU waits for nothing while in guest mode, so a remote flush
//! never waits for a vCPU that waits for the lock. An invalidation in progress
//! ([`FaultOutcome::Retry`]) is waited out without the lock, as on the lockless path.
//! Gva accesses under shadow paging (`vm/paging.rs`) follow the same protocol
//! ([`Vm::retry_access`]).

use core::sync::atomic::Ordering;

use crate::error::Error;

use super::qualification::EptViolation;
use super::run::{ExitAction, VmExit};
use super::Vcpu;
use crate::mmu::FaultOutcome;
use crate::types::{AccessKind, ErrorCode, Gpa, Hpa, PAGE_SHIFT};

use super::{Exit, MmuKind, Vm, VmState};

/// Faults in a row an access retries on the lockless path (the TDP MMU's fault gate, or
/// the shadow MMU's lock taken per fault) while other threads keep zapping what each one
/// mapped, before it takes the exclusive lock, under which nothing can (see the module
/// docs). High enough that the exclusive lock is taken only under heavy zapping of the
/// page being accessed (`VmStats::locked_accesses` counts it), low enough that such an
/// access is not starved for long.
pub const LOCKLESS_RETRIES: u32 = 16;

/// Tries an access makes under the exclusive lock before it gives up with
/// [`Error::FaultLoop`]: under that lock one fault maps what the walk needs (a pending
/// flush or root reload is serviced on the way), so a second try completes. Reaching the
/// bound means an MMU bug, never contention.
pub(crate) const MAX_LOCKED_RETRIES: u32 = 4;

/// What an access does after a try that did not complete.
pub(crate) enum Again {
    /// A fault mapped (or found mapped) the page, the fast path fixed it, or the root
    /// was reloaded: retry. On the lockless path another thread may zap the page (or
    /// invalidate the root) again first: a lost race.
    Lost,
    /// The host is invalidating the page at this gpa: wait for the invalidation to end
    /// (without the lock), then retry.
    Wait(Gpa),
}

/// [`wait_for_invalidation`], or [`Error::InvalidationInProgress`] once waited too long.
pub(crate) fn wait_or_fail(waits: &mut u32, gpa: Gpa) -> Result<(), Exit> {
    if wait_for_invalidation(waits) {
        Ok(())
    } else {
        Err(Exit::Error(Error::InvalidationInProgress { gpa }))
    }
}

/// How long an access waits for the host's invalidation of its page to end before it
/// gives up with [`Error::InvalidationInProgress`], in waits: the first [`SPIN_WAITS`]
/// spin, the others yield the CPU (with `std`; without, each spins [`SPIN_WAITS`] times),
/// so the thread closing the window gets to run. About a second with nothing else to run
/// (much longer when other threads run meanwhile): an invalidation window is short, but
/// one the accessing thread itself holds open never closes.
pub(crate) const MAX_INVALIDATION_WAITS: u32 = 1 << 20;
const SPIN_WAITS: u32 = 64;

/// Wait a little for an invalidation in progress to end (a fault reported
/// [`FaultOutcome::Retry`]); `false` once the access has waited as long as it may.
pub(crate) fn wait_for_invalidation(waits: &mut u32) -> bool {
    *waits += 1;
    if *waits > MAX_INVALIDATION_WAITS {
        return false;
    }
    if *waits <= SPIN_WAITS {
        core::hint::spin_loop();
    } else {
        #[cfg(feature = "std")]
        std::thread::yield_now();
        #[cfg(not(feature = "std"))]
        for _ in 0..SPIN_WAITS {
            core::hint::spin_loop();
        }
    }
    true
}
use crate::host::HostMemory;
use crate::table::TableAllocator;

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// Handle a fault taken by `vcpu` as the MMU's fault handler does, under the lock,
    /// logging the page if a write made it writable in a logging slot. With dirty rings,
    /// a vCPU whose ring is soft-full gets [`Error::DirtyRingFull`] and nothing is mapped
    /// (it could not have run to take the fault: harvest and reset first).
    pub fn page_fault(&self, vcpu: &Vcpu, gpa: Gpa, ec: ErrorCode) -> Result<FaultOutcome, Error> {
        self.check_vcpu(vcpu)?;
        if vcpu.in_guest_mode() {
            // The lock a fault takes may be held by a flusher waiting for this vCPU.
            return Err(Error::InGuestMode { vcpu: vcpu.id });
        }
        if self.config.mmu == MmuKind::ShadowPaging {
            return Err(Error::WrongPagingMode(
                "guest-physical faults need a direct MMU; shadow paging faults by gva",
            ));
        }
        if gpa.0 >> PAGE_SHIFT >= 1u64 << (self.config.limits.gpa_bits - PAGE_SHIFT as u8) {
            return Err(Error::InvalidRange {
                start: gpa.gfn().0,
                end: gpa.gfn().0 + 1,
            });
        }
        self.mmu_page_fault(vcpu, gpa, ec)
    }

    /// One guest access through the CPU model: enter guest mode, TLB hit or walk, leave
    /// guest mode; on an exit, the run loop's handlers and a retry. Returns the
    /// host-physical address the access reached. A thin use of the run loop (`vm/run.rs`)
    /// that stays in guest mode for one try, so it needs no kick; a vCPU that stays
    /// longer runs [`Vm::model_run`].
    ///
    /// A write to a present page that may become writable (dirty-logging protection) is
    /// first tried on the lockless fast path, in the lockless-read mode that keeps the
    /// tables from being freed, as KVM's `fast_page_fault` runs with the shadow walk
    /// protected from frees.
    ///
    /// An access always completes, however much other threads zap: after
    /// [`LOCKLESS_RETRIES`] faults in a row whose mapping was gone again before the
    /// retried walk used it, it takes the exclusive lock and faults and walks under one
    /// guard (see the module docs).
    pub fn access(&self, vcpu: &mut Vcpu, gpa: Gpa, kind: AccessKind) -> Result<Hpa, Exit> {
        self.check_vcpu(vcpu)?;
        if vcpu.in_guest_mode() {
            return Err(Exit::Error(Error::InGuestMode { vcpu: vcpu.id }));
        }
        vcpu.accesses += 1;
        if self.config.mmu == MmuKind::ShadowPaging {
            return Err(Exit::Error(Error::WrongPagingMode(
                "guest-physical accesses need a direct MMU; use gva_access under shadow paging",
            )));
        }
        if gpa.0 >> self.config.limits.gpa_bits != 0 {
            // Beyond the guest-physical width: the walk would alias a lower address.
            return Err(Exit::Error(Error::InvalidRange {
                start: gpa.gfn().0,
                end: gpa.gfn().0 + 1,
            }));
        }
        self.retry_access(gpa, |held| self.try_access(vcpu, gpa, kind, held))
    }

    /// An access's retry protocol (see the module docs), for gpa and gva accesses alike:
    /// `attempt` tries once, without the lock or under the exclusive lock it is given,
    /// and says whether the access completed, must be retried or ends with an exit.
    /// `stuck` names the access in [`Error::FaultLoop`] (an MMU bug, see
    /// [`MAX_LOCKED_RETRIES`]).
    pub(super) fn retry_access<T>(
        &self,
        stuck: Gpa,
        mut attempt: impl FnMut(Option<&mut VmState<A>>) -> Result<Result<T, Again>, Exit>,
    ) -> Result<T, Exit> {
        let mut waits = 0;
        let mut lost = 0;
        while lost < LOCKLESS_RETRIES {
            match attempt(None)? {
                Ok(done) => return Ok(done),
                Err(Again::Lost) => {
                    lost += 1;
                    #[cfg(feature = "internals")]
                    if let Some(hook) = &self.lost_race_hook {
                        hook(self);
                    }
                }
                Err(Again::Wait(gpa)) => wait_or_fail(&mut waits, gpa)?,
            }
        }
        // Lost every race: fault and walk under one exclusive guard, which no zap,
        // invalidation, aging or memslot change can overlap.
        self.locked_accesses.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.lock();
        let mut tries = 0;
        loop {
            match attempt(Some(&mut guard))? {
                Ok(done) => return Ok(done),
                Err(Again::Lost) => {
                    tries += 1;
                    if tries >= MAX_LOCKED_RETRIES {
                        return Err(Exit::Error(Error::FaultLoop { gpa: stuck }));
                    }
                }
                Err(Again::Wait(gpa)) => {
                    // The host's invalidation ends under this lock: let it go meanwhile.
                    drop(guard);
                    wait_or_fail(&mut waits, gpa)?;
                    guard = self.lock();
                }
            }
        }
    }

    /// One try of an access, through the run loop's protocol (`vm/run.rs`) with the CPU
    /// model as the hardware: enter guest mode (servicing requests: a reload loads the
    /// current root), perform the INVEPT the entry owes on the model, TLB lookup or walk,
    /// leave guest mode, and on an exit the run loop's handlers (the fast path, the MMU's
    /// fault handler). `Ok(Ok(hpa))` when the access completed; `Ok(Err(again))` when it
    /// must be retried. With `held` (the exclusive lock, taken by the caller) nothing
    /// else changes the tables, so a fault's mapping is still there for the next try.
    fn try_access(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        kind: AccessKind,
        mut held: Option<&mut VmState<A>>,
    ) -> Result<Result<Hpa, Again>, Exit> {
        if vcpu.dirty_ring_soft_full() {
            return Err(Exit::DirtyRingFull);
        }
        if let Some(st) = held.as_deref_mut() {
            // No reload request can be missed here: invalidating a root takes this lock.
            self.reload_root_under(st, vcpu);
        }
        let entry = self.enter(vcpu, held.as_deref_mut());
        vcpu.model_invept(entry.invept);
        let result = self.model_walk(vcpu, gpa, kind);
        vcpu.cpu.exit_guest();
        let action = match result {
            Ok(hpa) => return Ok(Ok(hpa)),
            Err(VmExit::EptViolation { gpa, qualification }) => {
                vcpu.exits += 1;
                let v = EptViolation::decode(qualification).expect("the model's qualification");
                self.ept_violation(vcpu, gpa, v.error_code(), held)
            }
            Err(VmExit::EptMisconfig { gpa }) => {
                vcpu.exits += 1;
                self.ept_misconfig(vcpu, gpa, kind, held)
            }
            Err(VmExit::ExternalInterrupt) => ExitAction::Resume,
        };
        match action {
            ExitAction::Resume => Ok(Err(Again::Lost)),
            ExitAction::Retry { gpa } => Ok(Err(Again::Wait(gpa))),
            ExitAction::EmulateMmio { gpa } => Err(Exit::Mmio {
                gpa,
                write: kind == AccessKind::Write,
            }),
            ExitAction::EmulateWrite { gpa } => Err(Exit::WriteTracked { gpa }),
            ExitAction::DirtyRingFull => Err(Exit::DirtyRingFull),
            ExitAction::MemoryFault { error, .. } => Err(Exit::from(error)),
        }
    }

    /// A guest read of `gpa`.
    pub fn read(&self, vcpu: &mut Vcpu, gpa: Gpa) -> Result<Hpa, Exit> {
        self.access(vcpu, gpa, AccessKind::Read)
    }

    /// A guest write of `gpa`.
    pub fn write(&self, vcpu: &mut Vcpu, gpa: Gpa) -> Result<Hpa, Exit> {
        self.access(vcpu, gpa, AccessKind::Write)
    }
}
