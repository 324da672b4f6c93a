//! What a fault should map, decided once for every MMU (KVM's `struct kvm_page_fault`
//! filled by `kvm_faultin_pfn` and `kvm_mmu_max_mapping_level`), and what it did (KVM's
//! `RET_PF_*`).
//!
//! [`plan_map`] makes every decision that does not depend on the page-table format:
//! memslot lookup, the checks that end a fault without a mapping (a write to a READONLY
//! slot, an invalidation in progress, a host page missing, read-only or with a frame too
//! wide for an SPTE), the host page,
//! the level (never one whose aligned range an invalidation in progress intersects), the
//! writable states and the page to log. Each MMU then builds its format's
//! leaf from the plan ([`MapPlan::ept_leaf`] for the direct MMUs, through
//! [`plan_fault`]; shadow paging combines the plan with the guest's rights).
//!
//! Writability: a leaf is MMU-writable unless the slot is READONLY, the host page is
//! read-only or the gfn is write-tracked. While the slot logs dirty pages, only a write
//! fault makes it writable (so every write is seen, and logged, by a fault); otherwise a
//! read fault maps it writable at once, as KVM does, to spare a second fault.

use super::Invalidation;
use crate::error::Error;
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::spte::bits::MAX_PFN;
use crate::spte::{LeafAttrs, Spte, SpteFormat};
use crate::types::{ErrorCode, Gpa, Level, Pfn};

/// What a fault did, for every MMU (KVM's `RET_PF_*`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultOutcome {
    /// A leaf was installed (or made writable) at this level; retry the access.
    Mapped(Level),
    /// The mapping the access needs was already there; retry the access.
    Spurious,
    /// The gpa is outside every memslot: the access goes to the VMM (KVM_EXIT_MMIO). The
    /// direct MMUs install an MMIO SPTE so the next access is recognised from it alone.
    Mmio,
    /// A write to a READONLY memslot: not mapped writable; the access goes to the VMM.
    ReadOnlyWrite,
    /// A write to a write-tracked page: not mapped writable; the tracker emulates it
    /// (KVM's page-track write path).
    WriteTracked,
    /// The host is invalidating the page (an MMU-notifier range is in progress): nothing
    /// was mapped; retry once the invalidation ends (KVM's `mmu_invalidate_retry`).
    Retry,
    /// Shadow paging: the guest's own tables forbid the access; the guest's page-fault
    /// handler gets it with this error code (KVM injects #PF).
    GuestFault(ErrorCode),
    /// Shadow paging: a write to a guest page table the MMU write-protects; the MMU
    /// emulates it (KVM's `RET_PF_EMULATE`).
    Emulate,
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

/// What a fault maps when it maps something: the format-independent half of the leaf.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MapPlan {
    /// Index of the memslot (for `Memslots::at_mut`: one lookup per fault).
    pub(crate) slot: usize,
    /// Level of the leaf: the largest the memslot, the host page and the caller's cap
    /// allow.
    pub(crate) level: Level,
    /// The host frame, aligned to `level`.
    pub(crate) pfn: Pfn,
    /// The fault is a write.
    pub(crate) write: bool,
    /// The host mapping is writable.
    pub(crate) host_writable: bool,
    /// The slot is not READONLY.
    pub(crate) slot_writable: bool,
    /// The gfn is write-tracked (when the plan was made).
    pub(crate) tracked: bool,
    /// The slot logs dirty pages.
    pub(crate) logging: bool,
    /// The page, as the dirty log names it.
    pub(crate) page: DirtyGfn,
}

impl MapPlan {
    /// Whether the MMU may make the leaf writable (unless the MMU's own reasons forbid
    /// more).
    #[inline(always)]
    pub(crate) fn mmu_writable(&self) -> bool {
        self.slot_writable && self.host_writable && !self.tracked
    }

    /// Whether a leaf that is `mmu_writable` is mapped writable now: while the slot logs,
    /// only by a write fault.
    #[inline(always)]
    pub(crate) fn writable(&self, mmu_writable: bool) -> bool {
        mmu_writable && (self.write || !self.logging)
    }

    /// The page to log, when the fault maps it `writable` for a write in a logging slot.
    #[inline(always)]
    pub(crate) fn dirty(&self, writable: bool) -> Option<DirtyGfn> {
        (self.write && writable && self.logging).then_some(self.page)
    }

    /// The EPT leaf the direct MMUs install (KVM's `make_spte`).
    #[inline(always)]
    pub(crate) fn ept_leaf(&self) -> Spte {
        let mmu_writable = self.mmu_writable();
        SpteFormat::EPT.leaf(
            self.pfn,
            self.level,
            LeafAttrs {
                writable: self.writable(mmu_writable),
                executable: true,
                host_writable: self.host_writable,
                mmu_writable,
                accessed: true,
                dirty: self.write,
                ..LeafAttrs::default()
            },
            // EPT has no user bit: every leaf is the guest's.
            true,
        )
    }
}

/// What [`plan_map`] decided.
#[derive(Clone, Copy, Debug)]
pub(crate) enum MapDecision {
    /// The gpa is in no memslot: MMIO.
    Mmio,
    /// Map nothing; the fault ends with this outcome.
    Exit(FaultOutcome),
    /// Map this.
    Map(MapPlan),
}

/// Decide what a fault at `gpa` maps, for a write if `write`, at most at `max_level`
/// (every MMU's half of the decision; see the module docs).
#[inline(always)]
pub(crate) fn plan_map<H: HostMemory + ?Sized>(
    slots: &Memslots,
    host: &H,
    gpa: Gpa,
    write: bool,
    max_level: Level,
    invalidation: &Invalidation,
) -> Result<MapDecision, Error> {
    let gfn = gpa.gfn();
    let Some(slot_idx) = slots.position_of_gfn(gfn) else {
        return Ok(MapDecision::Mmio);
    };
    let slot = slots.at(slot_idx);
    if write && slot.is_readonly() {
        return Ok(MapDecision::Exit(FaultOutcome::ReadOnlyWrite));
    }
    let hva = slot.gfn_to_hva(gfn);
    if invalidation.covers(hva) {
        return Ok(MapDecision::Exit(FaultOutcome::Retry));
    }
    let host_page = host
        .translate(hva)
        .ok_or(Error::NoHostMapping { gpa, hva })?;
    if host_page.pfn.0 > MAX_PFN {
        // It would spill out of the SPTE's frame field into its software bits.
        return Err(Error::HostPfnTooLarge {
            hva,
            pfn: host_page.pfn,
        });
    }
    if write && !host_page.writable {
        return Err(Error::HostReadOnly { gpa, hva });
    }
    let mut level = slot.max_mapping_level(gfn, max_level.min(host_page.level));
    // A leaf maps its whole level-aligned range: none of it may be under invalidation. A
    // host may invalidate (and change) one 4 KiB page inside a huge page it maps; a huge
    // leaf installed meanwhile from the answer above would keep that page's old frame
    // after the change. Map smaller instead (the 4 KiB page itself was checked above).
    while level > Level::L4K {
        let start = slot.gfn_to_hva(gfn.align_down(level)).0;
        if !invalidation.covers_range(start, start + level.bytes()) {
            break;
        }
        level = level.below().expect("above 4K");
    }
    Ok(MapDecision::Map(MapPlan {
        slot: slot_idx,
        level,
        pfn: Pfn(host_page.pfn.0 & !(level.pages() - 1)),
        write,
        host_writable: host_page.writable,
        slot_writable: !slot.is_readonly(),
        tracked: slot.is_write_tracked(gfn),
        logging: slot.is_logging(),
        page: DirtyGfn {
            slot: slot.id,
            offset: gfn.0 - slot.base_gfn.0,
        },
    }))
}

/// What a direct MMU's fault does (the shadow MMU in direct mode, the TDP MMU).
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

/// Decide what a direct MMU's fault at `gpa` with error code `ec` does, mapping at most
/// `max_level`: [`plan_map`], then the MMIO SPTE, the exit of a write to a write-tracked
/// page (for its tracker) and the EPT leaf.
#[inline(always)]
pub(crate) fn plan_fault<H: HostMemory + ?Sized>(
    slots: &Memslots,
    host: &H,
    gpa: Gpa,
    ec: ErrorCode,
    max_level: Level,
    invalidation: &Invalidation,
) -> Result<FaultPlan, Error> {
    let write = ec.contains(ErrorCode::WRITE);
    Ok(
        match plan_map(slots, host, gpa, write, max_level, invalidation)? {
            MapDecision::Mmio => FaultPlan::Mmio(Spte::new_mmio(gpa.gfn(), slots.generation())),
            MapDecision::Exit(outcome) => FaultPlan::Exit(outcome),
            MapDecision::Map(p) if write && p.tracked => {
                FaultPlan::Exit(FaultOutcome::WriteTracked)
            }
            MapDecision::Map(p) => FaultPlan::Map {
                slot: p.slot,
                level: p.level,
                spte: p.ept_leaf(),
                // A direct write fault maps writable: READONLY, a read-only host page and
                // a tracked page ended the fault above.
                dirty: p.dirty(true),
            },
        },
    )
}
