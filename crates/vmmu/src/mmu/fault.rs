//! What a fault should map, decided the same way for both MMUs (KVM's
//! `kvm_faultin_pfn`, `kvm_mmu_max_mapping_level` and `make_spte`): memslot lookup, the
//! checks that end a fault without a mapping, the host page, the level, and the leaf SPTE
//! with its writable states.
//!
//! Writability: a leaf is MMU-writable unless the slot is READONLY, the host page is
//! read-only or the gfn is write-tracked. While the slot logs dirty pages, only a write
//! fault makes it writable (so every write is seen, and logged, by a fault); otherwise a
//! read fault maps it writable at once, as KVM does, to spare a second fault.

use super::Invalidation;
use crate::error::Error;
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::spte::{LeafAttrs, Spte, SpteFormat};
use crate::types::{ErrorCode, Gpa, Level, Pfn};

/// What a fault did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultOutcome {
    /// A leaf was installed (or made writable) at this level; retry the access.
    Mapped(Level),
    /// The mapping the access needs was already there; retry the access.
    Spurious,
    /// The gpa is outside every memslot: an MMIO SPTE was installed; the access goes to
    /// the VMM (KVM_EXIT_MMIO).
    Mmio,
    /// A write to a READONLY memslot: not mapped writable; the access goes to the VMM.
    ReadOnlyWrite,
    /// A write to a write-tracked page: not mapped writable; the tracker emulates it
    /// (KVM's page-track write path).
    WriteTracked,
    /// The host is invalidating the page (an MMU-notifier range is in progress): nothing
    /// was mapped; retry once the invalidation ends (KVM's `mmu_invalidate_retry`).
    Retry,
}

/// A page a write fault made writable while its memslot logs dirty pages: the caller
/// logs it (dirty bitmap or the vCPU's dirty ring).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DirtyGfn {
    /// Memslot id.
    pub slot: u32,
    /// Page offset in the memslot.
    pub offset: u64,
}

/// What a fault does.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FaultPlan {
    /// The gpa is in no memslot: install this MMIO SPTE (4K), tagged with the memslot
    /// generation.
    Mmio(Spte),
    /// Map nothing; the fault ends with this outcome.
    Exit(FaultOutcome),
    /// Install the leaf `spte` of `level`, and log `dirty` if given.
    Map {
        /// Index of the memslot (for `Memslots::at_mut`: one lookup per fault).
        slot: usize,
        /// Level of the leaf.
        level: Level,
        /// The leaf.
        spte: Spte,
        /// The page to log as dirty.
        dirty: Option<DirtyGfn>,
    },
}

/// Decide what a fault at `gpa` with error code `ec` maps, mapping at most `max_level`.
#[inline(always)]
pub(crate) fn plan_fault<H: HostMemory + ?Sized>(
    slots: &Memslots,
    host: &H,
    gpa: Gpa,
    ec: ErrorCode,
    max_level: Level,
    invalidation: &Invalidation,
) -> Result<FaultPlan, Error> {
    let gfn = gpa.gfn();
    let write = ec.contains(ErrorCode::WRITE);
    let Some(slot_idx) = slots.position_of_gfn(gfn) else {
        return Ok(FaultPlan::Mmio(Spte::new_mmio(gfn, slots.generation())));
    };
    let slot = slots.at(slot_idx);
    if write && slot.is_readonly() {
        return Ok(FaultPlan::Exit(FaultOutcome::ReadOnlyWrite));
    }
    let hva = slot.gfn_to_hva(gfn);
    if invalidation.covers(hva) {
        return Ok(FaultPlan::Exit(FaultOutcome::Retry));
    }
    let host_page = host
        .translate(hva)
        .ok_or(Error::NoHostMapping { gpa, hva })?;
    if write && !host_page.writable {
        return Err(Error::HostReadOnly { gpa, hva });
    }
    let tracked = slot.is_write_tracked(gfn);
    if write && tracked {
        return Ok(FaultPlan::Exit(FaultOutcome::WriteTracked));
    }
    let level = slot.max_mapping_level(gfn, max_level.min(host_page.level));
    let logging = slot.is_logging();
    let mmu_writable = !slot.is_readonly() && host_page.writable && !tracked;
    // Both MMUs that plan with this build EPT leaves.
    let spte = SpteFormat::EPT.leaf(
        Pfn(host_page.pfn.0 & !(level.pages() - 1)),
        level,
        LeafAttrs {
            writable: mmu_writable && (write || !logging),
            executable: true,
            host_writable: host_page.writable,
            mmu_writable,
            accessed: true,
            dirty: write,
            ..LeafAttrs::default()
        },
        true,
    );
    let dirty = (write && logging).then(|| DirtyGfn {
        slot: slot.id,
        offset: gfn.0 - slot.base_gfn.0,
    });
    Ok(FaultPlan::Map {
        slot: slot_idx,
        level,
        spte,
        dirty,
    })
}
