//! Guest-physical accesses and the faults they take: the CPU model's TLB lookup and EPT
//! walk in guest mode, the lockless fast path for write-protected pages, and the MMU's
//! fault handler on an exit, retried until the access completes or goes to the VMM
//! (KVM's `vcpu_enter_guest` -> `kvm_mmu_page_fault` loop).
//!
//! # Locking
//! Translation takes no lock (the vCPU is in guest mode, see `hw::vcpu`); a fault takes
//! the lock its MMU needs (see `vm/mmu.rs`).

use core::sync::atomic::Ordering;

use crate::error::Error;
use crate::hw::{ept_walk, fast_page_fault, leaf_pfn, WalkExit};

use super::dirty_log::DirtyRoom;
use super::Vcpu;
use crate::mmu::FaultOutcome;
use crate::types::{AccessKind, ErrorCode, Gpa, Hpa, PAGE_SHIFT};

use super::{Exit, MmuKind, Vm};

/// Retries of one access before it is declared stuck.
pub(crate) const MAX_ACCESS_RETRIES: u32 = 64;

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
        let gfn = gpa.gfn();
        let mut retries = 0;
        let mut waits = 0;
        while retries < MAX_ACCESS_RETRIES {
            if vcpu.dirty_ring_soft_full() {
                return Err(Exit::DirtyRingFull);
            }
            if !vcpu.cpu.enter_guest() {
                self.reload_root(vcpu);
                continue;
            }
            let mut result = match vcpu.cpu.tlb.lookup(gfn, kind) {
                Some(pfn) => Ok(pfn),
                // SAFETY: in guest mode (entered above, left below) on this VM: the vCPU is
                // this VM's (`check_vcpu` above), so its root is one of this VM's tables,
                // from `self.alloc`, and this VM's remote flushes wait for its mode.
                None => unsafe { ept_walk(&*self.alloc, vcpu.cpu.root, gpa, kind) }.map(|e| {
                    vcpu.cpu.tlb.fill(gfn, e);
                    leaf_pfn(&e, gfn)
                }),
            };
            if let Err(WalkExit::Violation { error_code, .. }) = result {
                if error_code.contains(ErrorCode::PRESENT | ErrorCode::WRITE) {
                    // Room for the page first: without it the fault goes to the locked
                    // path, which refuses (DirtyRingFull) rather than make the page
                    // writable unlogged.
                    if let Ok(room) = DirtyRoom::take(vcpu) {
                        // SAFETY: still in guest mode.
                        if unsafe { fast_page_fault(&*self.alloc, vcpu.cpu.root, gpa) } {
                            // Still a VM exit (an EPT violation), handled without the MMU
                            // lock.
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
            let outcome = match result {
                Ok(pfn) => return Ok(Hpa((pfn.0 << PAGE_SHIFT) | gpa.page_offset())),
                Err(WalkExit::Retry) => FaultOutcome::Spurious,
                Err(WalkExit::Violation { gpa, error_code }) => {
                    vcpu.exits += 1;
                    self.page_fault(vcpu, gpa, error_code)?
                }
                Err(WalkExit::Misconfig { gpa, spte }) => {
                    vcpu.exits += 1;
                    let gen = self.mmio_generation.load(Ordering::Acquire);
                    if spte.is_mmio() && spte.mmio_generation() == gen & crate::spte::MMIO_GEN_MASK
                    {
                        // KVM's handle_mmio_page_fault: no memslot lookup needed.
                        self.fast_mmio.fetch_add(1, Ordering::Relaxed);
                        FaultOutcome::Mmio
                    } else {
                        // Stale MMIO SPTE: the fault path replaces it.
                        self.page_fault(vcpu, gpa, ErrorCode::for_access(kind))?
                    }
                }
            };
            match outcome {
                FaultOutcome::Mapped(_) | FaultOutcome::Spurious => retries += 1,
                // The host is changing this page; wait for the invalidation to end, for
                // a while.
                FaultOutcome::Retry => {
                    if !wait_for_invalidation(&mut waits) {
                        return Err(Exit::Error(Error::InvalidationInProgress { gpa }));
                    }
                }
                FaultOutcome::Mmio | FaultOutcome::ReadOnlyWrite => {
                    return Err(Exit::Mmio {
                        gpa,
                        write: kind == AccessKind::Write,
                    })
                }
                FaultOutcome::WriteTracked => return Err(Exit::WriteTracked { gpa }),
                FaultOutcome::GuestFault(_) | FaultOutcome::Emulate => {
                    unreachable!("a direct MMU's fault has no guest tables to fault on or emulate")
                }
            }
        }
        Err(Exit::Error(Error::FaultLoop { gpa }))
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
