//! `KVM_PRE_FAULT_MEMORY`: map a guest-physical range for a vCPU before the guest touches
//! it, as the vCPU's own read faults would (KVM's `kvm_arch_vcpu_pre_fault_memory`, Linux
//! 6.10).
//!
//! Semantics, as KVM's:
//! - The range must be page-aligned, nonzero and must not wrap
//!   ([`Error::InvalidPreFaultRange`], nothing done).
//! - Each step faults the page at the range's start as a read fault by `vcpu` (no guest
//!   access, no accessed or dirty bit set by a guest walk) and advances to the end of the
//!   page the MMU mapped there (a 2 MiB leaf advances 2 MiB), like KVM, which advances by
//!   the level it mapped at. The MMU maps writable where the slot and host allow, as a
//!   read fault does.
//! - A page outside every memslot stops the call with [`Error::PreFaultNoMemslot`]
//!   (KVM's `-ENOENT`, from `RET_PF_EMULATE`); a memslot change (any
//!   `set_user_memory_region` that changed the memslots) while the call runs stops it with
//!   [`Error::PreFaultRetry`] (KVM's `-EAGAIN` for a slot deleted or moved under it).
//! - If some of the range was done before a stop, the call succeeds with the progress
//!   ([`PreFault`]: what is left is `next..end`), as KVM returns 0 with the range updated;
//!   the caller calls again for the rest. The error comes only when nothing was done.
//!
//! # Locking
//! Each step is one fault through the MMU's own fault path: on the TDP MMU inside the
//! fault gate, so vCPUs pre-fault in parallel (and in parallel with guest faults); on the
//! shadow MMU under the exclusive lock. The memslot generation is read (acquire) before
//! the call and after each fault: a change between the two means the fault may have seen
//! the new memslots or the old ones, so the step is not counted.

use core::sync::atomic::Ordering;

use crate::error::Error;
use crate::host::HostMemory;
use crate::mmu::FaultOutcome;
use crate::table::TableAllocator;
use crate::types::{ErrorCode, Gpa, Level, PAGE_SIZE};

use super::fault::wait_for_invalidation;
use super::{MmuKind, Vcpu, Vm};

/// The progress of a [`Vm::pre_fault_memory`] call that did something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreFault {
    /// Bytes of the range done (mapped, or found mapped).
    pub done: u64,
    /// Where the rest of the range starts (`gpa + done`).
    pub next: Gpa,
    /// Bytes left (0: the whole range is done).
    pub left: u64,
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// `KVM_PRE_FAULT_MEMORY`: map `[gpa, gpa + size)` for `vcpu` as its read faults
    /// would, without a guest access (see the module docs of `vm/prefault.rs` for the
    /// rules). Returns the progress when anything was done; an error when nothing was.
    ///
    /// Errors: [`Error::InvalidPreFaultRange`] (zero, unaligned, wrapping or beyond the
    /// guest-physical width), [`Error::ForeignVcpu`], [`Error::WrongPagingMode`] (shadow
    /// paging maps guest-virtual addresses: KVM's `-EOPNOTSUPP` for an indirect MMU),
    /// [`Error::PreFaultNoMemslot`], [`Error::PreFaultRetry`], and the fault path's own
    /// (e.g. [`Error::NoHostMapping`], [`Error::InvalidationInProgress`] when the host's
    /// invalidation of a page does not end).
    pub fn pre_fault_memory(
        &self,
        vcpu: &mut Vcpu,
        gpa: Gpa,
        size: u64,
    ) -> Result<PreFault, Error> {
        self.check_vcpu(vcpu)?;
        if self.config.mmu == MmuKind::ShadowPaging {
            return Err(Error::WrongPagingMode(
                "pre_fault_memory needs a direct MMU; shadow paging maps guest-virtual addresses",
            ));
        }
        let end = gpa.0.checked_add(size);
        let why = if size == 0 {
            Some("the size is 0")
        } else if !gpa.0.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            Some("gpa and size must be multiples of 4 KiB")
        } else if end.is_none() {
            Some("gpa + size overflows 64 bits")
        } else if end.is_some_and(|e| e > 1u64 << self.config.limits.gpa_bits) {
            Some("the range goes beyond the guest-physical width")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::InvalidPreFaultRange { gpa, size, why });
        }
        let end = gpa.0 + size;
        let generation = self.mmio_generation.load(Ordering::Acquire);
        let mut at = gpa.0;
        let mut waits = 0;
        let stop = loop {
            if at >= end {
                break None;
            }
            // KVM's `kvm_mmu_reload`: a vCPU whose root was invalidated loads the new one.
            self.reload_root(vcpu);
            let outcome = self.mmu_page_fault(
                vcpu,
                Gpa(at),
                ErrorCode::for_access(crate::types::AccessKind::Read),
            );
            if self.mmio_generation.load(Ordering::Acquire) != generation {
                break Some(Error::PreFaultRetry { gpa: Gpa(at) });
            }
            let level = match outcome {
                Ok(FaultOutcome::Mapped(level)) => level,
                Ok(FaultOutcome::Spurious) => Level::L4K,
                Ok(FaultOutcome::Mmio) => break Some(Error::PreFaultNoMemslot { gpa: Gpa(at) }),
                Ok(FaultOutcome::Retry) => {
                    if wait_for_invalidation(&mut waits) {
                        continue;
                    }
                    break Some(Error::InvalidationInProgress { gpa: Gpa(at) });
                }
                Ok(other) => unreachable!("a direct MMU's read fault returned {other:?}"),
                Err(e) => break Some(e),
            };
            waits = 0;
            at = ((at & !(level.bytes() - 1)) + level.bytes()).min(end);
        };
        match stop {
            Some(e) if at == gpa.0 => Err(e),
            _ => Ok(PreFault {
                done: at - gpa.0,
                next: Gpa(at),
                left: end - at,
            }),
        }
    }
}
