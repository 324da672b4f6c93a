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
use crate::hw::{ept_walk, fast_page_fault, leaf_pfn, WalkExit};

use super::dirty_log::DirtyRoom;
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

/// What a direct MMU's fault `outcome` means for an access of `kind` to `gpa`: retry, or
/// the exit the access ends with.
fn again(outcome: FaultOutcome, gpa: Gpa, kind: AccessKind) -> Result<Again, Exit> {
    match outcome {
        FaultOutcome::Mapped(_) | FaultOutcome::Spurious => Ok(Again::Lost),
        FaultOutcome::Retry => Ok(Again::Wait(gpa)),
        FaultOutcome::Mmio | FaultOutcome::ReadOnlyWrite => Err(Exit::Mmio {
            gpa,
            write: kind == AccessKind::Write,
        }),
        FaultOutcome::WriteTracked => Err(Exit::WriteTracked { gpa }),
        FaultOutcome::GuestFault(_) | FaultOutcome::Emulate => {
            unreachable!("a direct MMU's fault has no guest tables to fault on or emulate")
        }
    }
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

    /// One guest access through the CPU model: TLB hit, or walk, or exit to the MMU and
    /// retry. Returns the host-physical address the access reached.
    ///
    /// A write to a present page that may become writable (dirty-logging protection) is
    /// first tried on the lockless fast path, still in guest mode, as KVM's
    /// `fast_page_fault` runs with the shadow walk protected from frees.
    ///
    /// An access always completes, however much other threads zap: after
    /// [`LOCKLESS_RETRIES`] faults in a row whose mapping was gone again before the
    /// retried walk used it, it takes the exclusive lock and faults and walks under one
    /// guard (see the module docs).
    pub fn access(&self, vcpu: &mut Vcpu, gpa: Gpa, kind: AccessKind) -> Result<Hpa, Exit> {
        self.check_vcpu(vcpu)?;
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

    /// One try of an access: enter guest mode (or reload the root), TLB lookup or walk,
    /// the fast path, and on an exit the MMU's fault handler. `Ok(Ok(hpa))` when the
    /// access completed; `Ok(Err(again))` when it must be retried. With `held`
    /// (the exclusive lock, taken by the caller) nothing else changes the tables, so a
    /// fault's mapping is still there for the next try.
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
        if !vcpu.cpu.enter_guest() {
            match held {
                Some(st) => self.reload_root_under(st, vcpu),
                None => self.reload_root(vcpu),
            }
            return Ok(Err(Again::Lost));
        }
        let gfn = gpa.gfn();
        let mut result = match vcpu.cpu.tlb.lookup(gfn, kind) {
            Some(pfn) => Ok(pfn),
            // SAFETY: in guest mode (entered above, left below) on this VM: the vCPU is
            // this VM's (`check_vcpu` in `access`), so its root is one of this VM's
            // tables, from `self.alloc`, and this VM's remote flushes wait for its mode.
            None => unsafe { ept_walk(&*self.alloc, vcpu.cpu.root, gpa, kind) }.map(|e| {
                vcpu.cpu.tlb.fill(gfn, e);
                leaf_pfn(&e, gfn)
            }),
        };
        if let Err(WalkExit::Violation { error_code, .. }) = result {
            if error_code.contains(ErrorCode::PRESENT | ErrorCode::WRITE) {
                // Room for the page first: without it the fault goes to the locked path,
                // which refuses (DirtyRingFull) rather than make the page writable
                // unlogged.
                if let Ok(room) = DirtyRoom::take(vcpu) {
                    // SAFETY: still in guest mode.
                    if unsafe { fast_page_fault(&*self.alloc, vcpu.cpu.root, gpa) } {
                        // Still a VM exit (an EPT violation), handled without the MMU lock.
                        self.fast_faults.fetch_add(1, Ordering::Relaxed);
                        self.dirty_index
                            .with(gfn, |d, bitmap| room.log(d, Some(bitmap)));
                        vcpu.exits += 1;
                        result = Err(WalkExit::Retry);
                    }
                }
            }
        }
        vcpu.cpu.exit_guest();
        let fault = |vcpu: &mut Vcpu, gpa, ec| match held {
            Some(st) => {
                let room = DirtyRoom::take(vcpu)?;
                self.page_fault_under(st, vcpu, gpa, ec, room)
            }
            None => self.page_fault(vcpu, gpa, ec),
        };
        let outcome = match result {
            Ok(pfn) => return Ok(Ok(Hpa((pfn.0 << PAGE_SHIFT) | gpa.page_offset()))),
            Err(WalkExit::Retry) => FaultOutcome::Spurious,
            Err(WalkExit::Violation { gpa, error_code }) => {
                vcpu.exits += 1;
                fault(vcpu, gpa, error_code)?
            }
            Err(WalkExit::Misconfig { gpa, spte }) => {
                vcpu.exits += 1;
                let gen = self.mmio_generation.load(Ordering::Acquire);
                if spte.is_mmio() && spte.mmio_generation() == gen & crate::spte::MMIO_GEN_MASK {
                    // KVM's handle_mmio_page_fault: no memslot lookup needed.
                    self.fast_mmio.fetch_add(1, Ordering::Relaxed);
                    FaultOutcome::Mmio
                } else {
                    // Stale MMIO SPTE: the fault path replaces it.
                    fault(vcpu, gpa, ErrorCode::for_access(kind))?
                }
            }
        };
        again(outcome, gpa, kind).map(Err)
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
