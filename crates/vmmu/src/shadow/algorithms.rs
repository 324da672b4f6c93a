//! The algorithms the seeds changed, each selectable so that every seed's effect can be
//! measured against the algorithm it replaced. Each variant is a faithful implementation
//! of that algorithm, not an added delay.

/// How a reverse map is iterated (seed 000).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum RmapIteration {
    /// Before seed 000 (KVM's `pte_list_next`): every step restarts at the head and scans
    /// forward past the previous entry, so a full iteration is quadratic.
    RestartScan,
    /// Seed 000 (`rmap_get_first`/`rmap_get_next`): an iterator that keeps its place.
    #[default]
    Iterator,
}

/// How every SPTE of a reverse map is dropped (seed 003).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum RmapDrop {
    /// Before seed 003: drop the first SPTE through the full `drop_spte` path (find its
    /// page, gfn, memslot and list again, remove it, reshuffling descriptors), and repeat.
    OneByOne,
    /// Seed 003 (`pte_list_destroy`): clear every SPTE, then free all descriptors at once.
    #[default]
    Destroy,
}

/// How one shadow page is write-protected (seed 001).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum PageWrprot {
    /// Before seed 001: read all 512 entries.
    Scan512,
    /// Seed 001: visit only the possibly-writable entries; skip the page when none.
    #[default]
    Bitmap,
}

/// How `get_dirty_log` write-protects the pages it harvested (seed 004).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum DirtyWrprot {
    /// Through the reverse map of each dirty gfn (`kvm_mmu_rmap_write_protect`).
    PerGfn,
    /// Walk every shadow page mapping the slot (`kvm_mmu_slot_remove_write_access`).
    WalkPages,
    /// Seed 004's rule: per gfn when there are fewer dirty pages than shadow pages in use,
    /// else walk the pages.
    Kvm2012,
    /// vmmu's rule: whichever has the lower estimated cost (see `shadow::wrprot`).
    #[default]
    Adaptive,
}

/// The full set of choices.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Algorithms {
    /// Reverse-map iteration (seed 000).
    pub rmap_iteration: RmapIteration,
    /// Dropping a reverse map's SPTEs (seed 003).
    pub rmap_drop: RmapDrop,
    /// Write-protecting a shadow page (seed 001).
    pub page_wrprot: PageWrprot,
    /// Write protection behind `get_dirty_log` (seed 004).
    pub dirty_wrprot: DirtyWrprot,
}
