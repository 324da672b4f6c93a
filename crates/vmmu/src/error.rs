//! Every error the public API returns, in one enum.
//!
//! An operation that returns an error has changed nothing: inputs are validated before
//! any state is touched. (A guest access is not an operation on the VM's state: a fault
//! that fails may have built intermediate tables, but nothing the guest can see changed.)
//!
//! Every variant, and the calls that return it:
//!
//! | Variant | Returned by |
//! | --- | --- |
//! | [`InvalidSlotId`](Error::InvalidSlotId) | `Vm::set_user_memory_region` |
//! | [`InvalidFlags`](Error::InvalidFlags) | `MemslotFlags::from_bits` (and so `set_user_memory_region`) |
//! | [`UnalignedGuestPhysAddr`](Error::UnalignedGuestPhysAddr) | `set_user_memory_region` |
//! | [`UnalignedSize`](Error::UnalignedSize) | `set_user_memory_region` |
//! | [`UnalignedUserspaceAddr`](Error::UnalignedUserspaceAddr) | `set_user_memory_region` |
//! | [`ZeroSize`](Error::ZeroSize) | `set_user_memory_region` (deleting a slot that does not exist) |
//! | [`AddressOverflow`](Error::AddressOverflow) | `set_user_memory_region` |
//! | [`SlotTooLarge`](Error::SlotTooLarge) | `set_user_memory_region` |
//! | [`BeyondGuestPhysWidth`](Error::BeyondGuestPhysWidth) | `set_user_memory_region` |
//! | [`Overlap`](Error::Overlap) | `set_user_memory_region` (create, move) |
//! | [`TooManySlots`](Error::TooManySlots) | `set_user_memory_region` (create) |
//! | [`SlotResize`](Error::SlotResize) | `set_user_memory_region` |
//! | [`SlotHvaChange`](Error::SlotHvaChange) | `set_user_memory_region` |
//! | [`ReadonlyFlagChange`](Error::ReadonlyFlagChange) | `set_user_memory_region` |
//! | [`NoSuchSlot`](Error::NoSuchSlot) | `zap_memslot`, `get_dirty_log`, `clear_dirty_log` |
//! | [`InvalidRange`](Error::InvalidRange) | `zap_gfn_range`, `track_write`, `untrack_write`, `page_fault`, `access` (as `Exit::Error`), `handle_ept_violation`, `handle_ept_misconfig`, `model_access` (a gpa beyond the guest-physical width) |
//! | [`InvalidPreFaultRange`](Error::InvalidPreFaultRange) | `pre_fault_memory` |
//! | [`PreFaultNoMemslot`](Error::PreFaultNoMemslot) | `pre_fault_memory` |
//! | [`PreFaultRetry`](Error::PreFaultRetry) | `pre_fault_memory` |
//! | [`NoHostMapping`](Error::NoHostMapping) | `access` (as `Exit::Error`), `page_fault` |
//! | [`HostReadOnly`](Error::HostReadOnly) | `access` (as `Exit::Error`), `page_fault` |
//! | [`HostPfnTooLarge`](Error::HostPfnTooLarge) | `access`, `gva_*` (as `Exit::Error`), `page_fault`, `change_pte` |
//! | [`InvalidationInProgress`](Error::InvalidationInProgress) | `access`, `gva_*` (as `Exit::Error`) |
//! | [`OutOfTableMemory`](Error::OutOfTableMemory) | `Vm::with_allocator`, `access`, `page_fault`, `zap_all_fast` |
//! | [`FaultLoop`](Error::FaultLoop) | `access`, `gva_*` (as `Exit::Error`): an MMU bug, never contention |
//! | [`NotLogging`](Error::NotLogging) | `get_dirty_log`, `clear_dirty_log` |
//! | [`BitmapTooSmall`](Error::BitmapTooSmall) | `get_dirty_log`, `clear_dirty_log` |
//! | [`ClearLogUnaligned`](Error::ClearLogUnaligned) | `clear_dirty_log` |
//! | [`ClearLogRange`](Error::ClearLogRange) | `clear_dirty_log` |
//! | [`WrongDirtyLogMode`](Error::WrongDirtyLogMode) | `get_dirty_log`, `clear_dirty_log` (on a ring VM without the backup bitmap), `harvest_dirty_ring`, `dirty_ring`, `reset_dirty_rings`, `enable_dirty_ring_with_bitmap` |
//! | [`NoSuchVcpu`](Error::NoSuchVcpu) | `harvest_dirty_ring`, `dirty_ring` |
//! | [`RingEntryNotDirty`](Error::RingEntryNotDirty) | `DirtyRingView::mark_harvested` |
//! | [`RingEntryNotRead`](Error::RingEntryNotRead) | `DirtyRingView::mark_harvested` |
//! | [`DirtyWithoutVcpu`](Error::DirtyWithoutVcpu) | `mark_page_dirty` (a ring VM without the backup bitmap) |
//! | [`MemslotsExist`](Error::MemslotsExist) | `enable_dirty_ring_with_bitmap` |
//! | [`ChangePteRemoved`](Error::ChangePteRemoved) | `change_pte` (without `VmConfig::change_pte`) |
//! | [`ForeignVcpu`](Error::ForeignVcpu) | every call that takes a `Vcpu` (`access`, `read`, `write`, `page_fault`, `release_vcpu`, `set_paging`, `load_cr3`, `invlpg`, `flush_guest_tlb`, `gva_*`, the run loop's `enter_guest`, `exit_guest`, `handle_ept_violation`, `handle_ept_misconfig`, `model_access`, `model_run`; as `Exit::Error` for the accesses and `enter_guest`) given a vCPU another VM created |
//! | [`DirtyRingFull`](Error::DirtyRingFull) | `page_fault` (an access exits with `Exit::DirtyRingFull` instead) |
//! | [`InvalidHvaRange`](Error::InvalidHvaRange) | `invalidate_range_start`, `unmap_hva_range`, `age_hva_range`, `test_age_hva_range`, `change_pte` |
//! | [`WriteTrackCount`](Error::WriteTrackCount) | `track_write`, `untrack_write`; shadow paging's `set_paging`, `load_cr3` and `gva_*` (as `Exit::Error`) when a guest table to shadow has 65535 trackers already |
//! | [`NoInvalidationInProgress`](Error::NoInvalidationInProgress) | `invalidate_range_end` |
//! | [`InvalidConfig`](Error::InvalidConfig) | `Vm::with_allocator` (`Vm::new` panics with it); `model_run` (a stretch of 0) |
//! | [`InvalidRingSize`](Error::InvalidRingSize) | `Vm::with_allocator`, `Vm::with_guest_memory` (`Vm::new` panics with it) |
//! | [`TooManyVcpus`](Error::TooManyVcpus) | `create_vcpu`, `create_run_loop_vcpu` |
//! | [`NoKick`](Error::NoKick) | `create_run_loop_vcpu` on a VM without a kick |
//! | [`NotRunLoopVcpu`](Error::NotRunLoopVcpu) | `enter_guest` (as `Exit::Error`), `model_run`, given a vCPU from `create_vcpu` |
//! | [`InGuestMode`](Error::InGuestMode) | `enter_guest` (as `Exit::Error`), `handle_ept_violation`, `handle_ept_misconfig`, `page_fault`, `access` (as `Exit::Error`) on a vCPU in guest mode |
//! | [`NotInGuestMode`](Error::NotInGuestMode) | `model_access` on a vCPU not running the guest |
//! | [`InvalidExitQualification`](Error::InvalidExitQualification) | `EptViolation::decode`, `handle_ept_violation` |
//! | [`GuestMemory`](Error::GuestMemory) | `GuestMemory` accesses; `set_paging`, `load_cr3` (CR3 outside every memslot); `gva_read_u64`, `gva_write_u64` of data outside guest memory (as `Exit::Error`). A guest table outside guest memory or the memslots is a guest page fault (`Exit::GuestPageFault`), not this |
//! | [`NonCanonical`](Error::NonCanonical) | `invlpg`, `gva_*` (as `Exit::Error`) |
//! | [`Unaligned`](Error::Unaligned) | `gva_read_u64`, `gva_write_u64` (as `Exit::Error`) |
//! | [`WrongPagingMode`](Error::WrongPagingMode) | `set_paging`, `load_cr3`, `invlpg`, `flush_guest_tlb`, `gva_*` (on a VM without shadow paging); `access`, `create_run_loop_vcpu`, `handle_ept_violation`, `handle_ept_misconfig` (on one with it) |
//!
//! The differential tests (`tests/proptest_ops.rs`), the fuzz target (`fuzz/`) and
//! `tests/errors.rs` check that each rejected call returns the variant the reference
//! model predicts, payload included, and leaves the VM exactly as it was.

use core::fmt;

use crate::types::{Gpa, Gva, Hva, Pfn};

/// An error from the vmmu public API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The slot id is outside the id space.
    InvalidSlotId {
        /// The id given.
        slot: u32,
        /// Ids must be below this.
        limit: u32,
    },
    /// Flags other than LOG_DIRTY_PAGES and READONLY were given.
    InvalidFlags(u32),
    /// guest_phys_addr is not 4 KiB-aligned.
    UnalignedGuestPhysAddr(u64),
    /// memory_size is not a multiple of 4 KiB.
    UnalignedSize(u64),
    /// userspace_addr is not 4 KiB-aligned.
    UnalignedUserspaceAddr(u64),
    /// A slot was created with memory_size 0 (0 means delete, and the slot does not exist).
    ZeroSize {
        /// The slot id.
        slot: u32,
    },
    /// guest_phys_addr + memory_size (or userspace_addr + memory_size) overflows.
    AddressOverflow,
    /// The region has more pages than one memslot may
    /// (2^31 - 1, `memslot::MAX_SLOT_PAGES`, KVM's `KVM_MEM_MAX_NR_PAGES`).
    SlotTooLarge {
        /// The slot id.
        slot: u32,
        /// Pages asked for.
        pages: u64,
        /// The most a slot may have.
        max: u64,
    },
    /// The region ends beyond the configured guest-physical address width.
    BeyondGuestPhysWidth {
        /// First byte past the region.
        end: u64,
        /// Configured width in bits.
        width_bits: u8,
    },
    /// The region overlaps another slot.
    Overlap {
        /// The slot being set.
        slot: u32,
        /// The slot it overlaps.
        other: u32,
    },
    /// No slot has this id.
    NoSuchSlot(u32),
    /// Creating another slot would exceed the configured number of slots.
    TooManySlots {
        /// Configured maximum.
        max: u32,
    },
    /// An existing slot's size cannot change (delete and re-create it).
    SlotResize {
        /// The slot id.
        slot: u32,
    },
    /// An existing slot's userspace_addr cannot change.
    SlotHvaChange {
        /// The slot id.
        slot: u32,
    },
    /// READONLY cannot be toggled on an existing slot.
    ReadonlyFlagChange {
        /// The slot id.
        slot: u32,
    },
    /// A gfn range is empty, reversed, or outside the guest-physical address width.
    InvalidRange {
        /// First gfn.
        start: u64,
        /// One past the last gfn.
        end: u64,
    },
    /// `pre_fault_memory` was given a range it cannot take (KVM's `-EINVAL`): nothing done.
    InvalidPreFaultRange {
        /// Start of the range.
        gpa: Gpa,
        /// Its size in bytes.
        size: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `pre_fault_memory` reached a page outside every memslot before doing anything
    /// (KVM's `-ENOENT`).
    PreFaultNoMemslot {
        /// The page.
        gpa: Gpa,
    },
    /// The memslots changed while `pre_fault_memory` ran, before it did anything (KVM's
    /// `-EAGAIN` for a slot deleted or moved under it): call it again.
    PreFaultRetry {
        /// Where it stopped.
        gpa: Gpa,
    },
    /// The host has nothing mapped at the address backing this guest page.
    NoHostMapping {
        /// Faulting guest-physical address.
        gpa: Gpa,
        /// Host-virtual address backing it.
        hva: Hva,
    },
    /// A write to a page the host maps read-only.
    HostReadOnly {
        /// Faulting guest-physical address.
        gpa: Gpa,
        /// Host-virtual address backing it.
        hva: Hva,
    },
    /// The host gave a frame number that does not fit the 40 bits an SPTE holds
    /// (`crate::spte::bits::MAX_PFN`): nothing was mapped.
    HostPfnTooLarge {
        /// Host-virtual address the frame backs.
        hva: Hva,
        /// The frame.
        pfn: Pfn,
    },
    /// A guest access waited for the host's invalidation of the page behind it
    /// (`invalidate_range_start` without its `_end` yet) for as long as an access waits,
    /// and gave up: end the invalidation first (a single-threaded embedder touching its
    /// own invalidation window would otherwise wait forever).
    InvalidationInProgress {
        /// The address.
        gpa: Gpa,
    },
    /// The table allocator is out of frames (or the 22-bit table id space is used up).
    OutOfTableMemory,
    /// A guest access kept faulting without making progress although it held the MMU lock
    /// exclusively, so no other thread could undo its faults: an MMU bug. Contention never
    /// gives this: an access that keeps losing races to other threads' zaps completes under
    /// the exclusive lock (`vm::LOCKLESS_RETRIES`).
    FaultLoop {
        /// The address that kept faulting.
        gpa: Gpa,
    },
    /// The memslot does not log dirty pages.
    NotLogging(u32),
    /// A bitmap argument is shorter than the slot or range needs.
    BitmapTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        got: usize,
    },
    /// clear_dirty_log's first_page is not a multiple of 64.
    ClearLogUnaligned {
        /// The page given.
        first_page: u64,
    },
    /// clear_dirty_log's range is outside the slot, or not a multiple of 64 pages short of
    /// the slot's end.
    ClearLogRange {
        /// First page.
        first_page: u64,
        /// Pages.
        num_pages: u64,
        /// Pages in the slot.
        npages: u64,
    },
    /// The call does not fit the VM's dirty-log mode.
    WrongDirtyLogMode(&'static str),
    /// No vCPU has this index.
    NoSuchVcpu(u32),
    /// The vCPU was created by another VM (perhaps one already dropped): a vCPU runs only
    /// on its own VM.
    ForeignVcpu {
        /// The vCPU's index (in the VM that created it).
        vcpu: u32,
    },
    /// The vCPU's dirty ring has no room for the entry the fault may log (it is soft-full):
    /// nothing was mapped; harvest and reset the rings first (KVM_EXIT_DIRTY_RING_FULL).
    /// Converted into an exit, it becomes `Exit::DirtyRingFull`.
    DirtyRingFull {
        /// The vCPU.
        vcpu: u32,
    },
    /// `DirtyRingView::mark_harvested` of an entry that is not in the ring: never pushed,
    /// already reset, or the index names its place a lap earlier or later. Nothing
    /// changed.
    RingEntryNotDirty {
        /// The vCPU whose ring it is.
        vcpu: u32,
        /// The entry's index (entries pushed before it).
        index: u64,
    },
    /// `DirtyRingView::mark_harvested` of an entry the VMM never read
    /// (`DirtyRingView::read`): resetting it would write-protect a page nobody reported.
    /// Nothing changed.
    RingEntryNotRead {
        /// The vCPU whose ring it is.
        vcpu: u32,
        /// The entry's index.
        index: u64,
    },
    /// `mark_page_dirty` (a write outside any vCPU context) on a VM whose rings have no
    /// backup bitmap: the page could be logged nowhere (KVM warns and drops it; enable
    /// `DirtyLogConfig::ring_with_bitmap`, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP). Nothing
    /// changed.
    DirtyWithoutVcpu {
        /// The address written.
        gpa: Gpa,
    },
    /// `enable_dirty_ring_with_bitmap` after a memslot was created: as KVM, the backup
    /// bitmap must be chosen while there are no memslots (so every slot has one).
    MemslotsExist,
    /// `change_pte` on a VM without the compatibility option `VmConfig::change_pte`:
    /// Linux removed the `.change_pte` MMU notifier in 2024; a current host announces the
    /// change with `invalidate_range_start` / `invalidate_range_end` only. Nothing changed.
    ChangePteRemoved,
    /// A host-virtual range is empty or reversed.
    InvalidHvaRange {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// untrack_write of a page nobody tracks, or track_write past 65535 trackers (also
    /// when shadow paging must track a guest table that has 65535 already).
    WriteTrackCount {
        /// The gfn.
        gfn: u64,
    },
    /// invalidate_range_end without a matching start.
    NoInvalidationInProgress,
    /// A VM configuration value is out of range.
    InvalidConfig(&'static str),
    /// `DirtyLogConfig::ring_size` is not a power of two from
    /// [`DirtyLogConfig::MIN_RING_ENTRIES`](crate::DirtyLogConfig::MIN_RING_ENTRIES) to
    /// [`DirtyLogConfig::MAX_RING_ENTRIES`](crate::DirtyLogConfig::MAX_RING_ENTRIES)
    /// (KVM's `KVM_CAP_DIRTY_LOG_RING` also wants a power of two within limits).
    InvalidRingSize {
        /// The size asked for, in entries.
        size: u32,
    },
    /// A guest-memory access outside the guest's memory, or not 8-byte aligned.
    GuestMemory {
        /// The address.
        gpa: Gpa,
    },
    /// A guest-virtual address that is not canonical (bits 63..=47 differ): the CPU
    /// raises #GP, not a page fault.
    NonCanonical {
        /// The address.
        gva: Gva,
    },
    /// A guest-virtual data access (`gva_read_u64`, `gva_write_u64`) not 8-byte aligned.
    Unaligned {
        /// The address.
        gva: Gva,
    },
    /// A shadow-paging operation on a VM whose MMU does not shadow guest page tables, or
    /// a guest-physical access on one that does.
    WrongPagingMode(&'static str),
    /// A vCPU limit was reached.
    TooManyVcpus {
        /// Configured maximum.
        max: u32,
    },
    /// A vCPU that stays in guest mode across many accesses needs a kick
    /// ([`Vm::set_kick`](crate::Vm::set_kick)): without one a remote flush would wait
    /// until the vCPU left guest mode on its own.
    NoKick,
    /// The run loop's guest entry was asked of a vCPU created by `create_vcpu` (which
    /// stays in guest mode for one access only): create it with `create_run_loop_vcpu`.
    NotRunLoopVcpu {
        /// The vCPU.
        vcpu: u32,
    },
    /// The vCPU is in guest mode (entered and not yet left with `exit_guest`): the call
    /// is for a vCPU outside guest mode (an exit handler, an access through the VM, a
    /// second entry).
    InGuestMode {
        /// The vCPU.
        vcpu: u32,
    },
    /// The CPU model's guest access was asked of a vCPU not running the guest (never
    /// entered, left, or stopped by a VM exit the embedder has not handled yet).
    NotInGuestMode {
        /// The vCPU.
        vcpu: u32,
    },
    /// An exit qualification no processor reports for an EPT violation.
    InvalidExitQualification {
        /// The qualification given.
        qualification: u64,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidSlotId { slot, limit } => {
                write!(f, "memslot id {slot} is invalid: ids must be below {limit}")
            }
            Error::InvalidFlags(fl) => write!(
                f,
                "memslot flags {fl:#x} are invalid: only LOG_DIRTY_PAGES (0x1) and READONLY (0x2) exist"
            ),
            Error::UnalignedGuestPhysAddr(a) => {
                write!(f, "guest_phys_addr {a:#x} is not 4 KiB-aligned")
            }
            Error::UnalignedSize(s) => write!(f, "memory_size {s:#x} is not a multiple of 4 KiB"),
            Error::UnalignedUserspaceAddr(a) => {
                write!(f, "userspace_addr {a:#x} is not 4 KiB-aligned")
            }
            Error::ZeroSize { slot } => write!(
                f,
                "memslot {slot} does not exist and memory_size is 0 (a zero size deletes a slot)"
            ),
            Error::AddressOverflow => write!(f, "address + memory_size overflows 64 bits"),
            Error::SlotTooLarge { slot, pages, max } => write!(
                f,
                "memslot {slot}: {pages} pages is more than a memslot may have ({max})"
            ),
            Error::BeyondGuestPhysWidth { end, width_bits } => write!(
                f,
                "region ends at {end:#x}, beyond the {width_bits}-bit guest-physical address width"
            ),
            Error::Overlap { slot, other } => {
                write!(f, "memslot {slot} would overlap memslot {other}")
            }
            Error::NoSuchSlot(s) => write!(f, "memslot {s} does not exist"),
            Error::TooManySlots { max } => write!(f, "too many memslots: at most {max}"),
            Error::SlotResize { slot } => write!(
                f,
                "memslot {slot}: memory_size of an existing slot cannot change; delete it first"
            ),
            Error::SlotHvaChange { slot } => write!(
                f,
                "memslot {slot}: userspace_addr of an existing slot cannot change; delete it first"
            ),
            Error::ReadonlyFlagChange { slot } => write!(
                f,
                "memslot {slot}: READONLY cannot be changed on an existing slot"
            ),
            Error::InvalidRange { start, end } => write!(
                f,
                "gfn range [{start:#x}, {end:#x}) is empty, reversed or beyond the guest-physical width"
            ),
            Error::InvalidPreFaultRange { gpa, size, why } => write!(
                f,
                "pre-fault range of {size:#x} bytes at gpa {gpa}: {why}"
            ),
            Error::PreFaultNoMemslot { gpa } => {
                write!(f, "pre-fault: gpa {gpa} is outside every memslot")
            }
            Error::PreFaultRetry { gpa } => write!(
                f,
                "pre-fault stopped at gpa {gpa}: the memslots changed meanwhile; call it again"
            ),
            Error::NoHostMapping { gpa, hva } => {
                write!(f, "no host memory at hva {hva} backing gpa {gpa}")
            }
            Error::HostReadOnly { gpa, hva } => {
                write!(f, "write to gpa {gpa}, backed by read-only host memory at hva {hva}")
            }
            Error::HostPfnTooLarge { hva, pfn } => write!(
                f,
                "host frame {:#x} behind hva {hva} does not fit the 40 bits of an SPTE",
                pfn.0
            ),
            Error::InvalidationInProgress { gpa } => write!(
                f,
                "guest access to gpa {gpa} gave up waiting for the host's invalidation of its page to end"
            ),
            Error::OutOfTableMemory => write!(f, "out of page-table memory"),
            Error::FaultLoop { gpa } => {
                write!(
                    f,
                    "guest access to gpa {gpa} kept faulting under the exclusive MMU lock (an MMU bug)"
                )
            }
            Error::TooManyVcpus { max } => write!(f, "too many vCPUs: at most {max}"),
            Error::NoKick => write!(
                f,
                "a vCPU that stays in guest mode needs a kick: set one with Vm::set_kick first"
            ),
            Error::NotRunLoopVcpu { vcpu } => write!(
                f,
                "vCPU {vcpu} stays in guest mode for one access only: create it with create_run_loop_vcpu to run the run loop"
            ),
            Error::InGuestMode { vcpu } => write!(
                f,
                "vCPU {vcpu} is in guest mode: leave it with exit_guest first"
            ),
            Error::NotInGuestMode { vcpu } => write!(
                f,
                "vCPU {vcpu} is not running the guest: enter it with enter_guest first"
            ),
            Error::InvalidExitQualification { qualification, why } => write!(
                f,
                "invalid EPT-violation exit qualification {qualification:#x}: {why}"
            ),
            Error::InvalidConfig(why) => write!(f, "invalid VM configuration: {why}"),
            Error::InvalidRingSize { size } => write!(
                f,
                "dirty ring size {size}: a ring has a power of two of entries, from {} to {}",
                crate::DirtyLogConfig::MIN_RING_ENTRIES,
                crate::DirtyLogConfig::MAX_RING_ENTRIES
            ),
            Error::GuestMemory { gpa } => write!(
                f,
                "guest memory access at gpa {gpa} is outside the guest's memory or not 8-byte aligned"
            ),
            Error::WrongPagingMode(why) => write!(f, "wrong paging mode: {why}"),
            Error::NonCanonical { gva } => {
                write!(f, "guest-virtual address {gva} is not canonical (#GP)")
            }
            Error::Unaligned { gva } => {
                write!(f, "guest-virtual word access at {gva} is not 8-byte aligned")
            }
            Error::NotLogging(s) => write!(f, "memslot {s} does not log dirty pages (LOG_DIRTY_PAGES is off)"),
            Error::BitmapTooSmall { needed, got } => {
                write!(f, "bitmap of {got} words is too small: {needed} needed")
            }
            Error::ClearLogUnaligned { first_page } => {
                write!(f, "clear_dirty_log first_page {first_page} is not a multiple of 64")
            }
            Error::ClearLogRange { first_page, num_pages, npages } => write!(
                f,
                "clear_dirty_log range [{first_page}, +{num_pages}) does not fit a slot of {npages} pages (or is not a multiple of 64 pages short of its end)"
            ),
            Error::WrongDirtyLogMode(why) => write!(f, "wrong dirty-log mode: {why}"),
            Error::NoSuchVcpu(v) => write!(f, "vCPU {v} does not exist"),
            Error::ForeignVcpu { vcpu } => write!(
                f,
                "vCPU {vcpu} was created by another VM: a vCPU runs only on its own VM"
            ),
            Error::DirtyRingFull { vcpu } => write!(
                f,
                "vCPU {vcpu}'s dirty ring is full: harvest and reset the rings before it faults again"
            ),
            Error::InvalidHvaRange { start, end } => {
                write!(f, "host-virtual range [{start:#x}, {end:#x}) is empty or reversed")
            }
            Error::WriteTrackCount { gfn } => write!(
                f,
                "gfn {gfn:#x}: untracking a page nobody tracks, or more than 65535 trackers"
            ),
            Error::NoInvalidationInProgress => {
                write!(f, "invalidate_range_end without a matching invalidate_range_start")
            }
            Error::RingEntryNotDirty { vcpu, index } => write!(
                f,
                "vCPU {vcpu}'s dirty ring has no entry {index} to mark harvested (not pushed yet, or reset already)"
            ),
            Error::RingEntryNotRead { vcpu, index } => write!(
                f,
                "vCPU {vcpu}'s dirty ring entry {index} was never read: marking it would reset an unreported page"
            ),
            Error::DirtyWithoutVcpu { gpa } => write!(
                f,
                "write to gpa {gpa} outside any vCPU context on a ring VM without the backup bitmap (ring_with_bitmap): it cannot be logged"
            ),
            Error::MemslotsExist => write!(
                f,
                "the dirty ring's backup bitmap must be enabled before any memslot exists"
            ),
            Error::ChangePteRemoved => write!(
                f,
                "change_pte was removed from Linux in 2024 (6.10): announce host changes with invalidate_range_start/end, or enable VmConfig::change_pte"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
