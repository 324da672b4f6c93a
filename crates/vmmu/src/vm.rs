//! The VM: memslots, the MMU, vCPUs and the remote TLB flush, behind one API.
//!
//! # Locking
//! `state` is KVM's `mmu_lock` (with `slots_lock` folded in): memslot updates, faults and
//! zaps take it exclusively. vCPUs take no lock to translate: they walk the tables in
//! guest mode and take the lock only on an exit. `vcpus` is read by every remote flush
//! and written only when a vCPU is created.
//!
//! Every operation that removes a translation ends with [`Vm::flush_remote_tlbs`] before
//! it releases the lock, and frees the tables it unlinked only after that flush.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::dirty::DirtyIndex;
use crate::error::Error;
use crate::flush::Flush;
use crate::host::HostMemory;
use crate::hw::{ept_walk, fast_page_fault, flush_vcpus, leaf_pfn, Vcpu, VcpuShared, WalkExit};
use crate::memslot::{MemoryRegion, MemslotFlags, MemslotLimits, Memslots, SlotChange};
use crate::shadow::{Algorithms, FaultOutcome, MmuStats, ShadowMmu};
use crate::sync::{Mutex, MutexGuard, RwLock};
use crate::table::{HeapTableAllocator, TableAllocator};
use crate::types::{AccessKind, ErrorCode, Gfn, Gpa, Hpa, Level, PAGE_SHIFT};

/// VM configuration.
#[derive(Clone, Copy, Debug)]
pub struct VmConfig {
    /// Largest mapping level the MMU uses (KVM's max huge page level).
    pub max_level: Level,
    /// Memslot limits and guest-physical width.
    pub limits: MemslotLimits,
    /// Most vCPUs.
    pub max_vcpus: u32,
    /// The algorithms where the seeds offer a choice.
    pub algorithms: Algorithms,
    /// How dirty pages are reported.
    pub dirty_log: DirtyLogConfig,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            max_level: Level::L1G,
            limits: MemslotLimits::default(),
            max_vcpus: 1024,
            algorithms: Algorithms::default(),
            dirty_log: DirtyLogConfig::default(),
        }
    }
}

/// How dirty pages are reported to the VMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyLogConfig {
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: `get_dirty_log` only copies the bitmap;
    /// `clear_dirty_log` clears bits and write-protects those pages.
    pub manual_protect: bool,
    /// With `manual_protect`: a slot starting to log has every bit set and nothing
    /// write-protected (KVM_DIRTY_LOG_INITIALLY_SET).
    pub initially_all_set: bool,
    /// KVM_CAP_DIRTY_LOG_RING: each vCPU pushes its dirty pages into a ring of this many
    /// entries instead of the bitmap.
    pub ring_size: Option<u32>,
}

/// Why a guest access did not complete in memory: it went to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// MMIO: the gpa is outside every memslot, or a write hit a READONLY slot
    /// (KVM_EXIT_MMIO).
    Mmio {
        /// The address.
        gpa: Gpa,
        /// Whether it was a write.
        write: bool,
    },
    /// A write to a write-tracked page: the tracker (the VMM) emulates it.
    WriteTracked {
        /// The address.
        gpa: Gpa,
    },
    /// The vCPU's dirty ring is (soft) full: harvest and reset before running it again
    /// (KVM_EXIT_DIRTY_RING_FULL).
    DirtyRingFull,
    /// The MMU could not map the page (the VMM gets the error, as KVM returns -EFAULT).
    Error(Error),
}

impl core::fmt::Display for Exit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Exit::Mmio { gpa, write } => write!(
                f,
                "MMIO {} at gpa {gpa}: outside every memslot or a write to a READONLY slot",
                if *write { "write" } else { "read" }
            ),
            Exit::WriteTracked { gpa } => write!(f, "write to write-tracked gpa {gpa}"),
            Exit::DirtyRingFull => write!(f, "the vCPU's dirty ring is full: harvest and reset it"),
            Exit::Error(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Exit {}

impl From<Error> for Exit {
    fn from(e: Error) -> Self {
        Exit::Error(e)
    }
}

/// VM-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Remote TLB flushes performed.
    pub remote_tlb_flushes: u64,
    /// MMIO exits recognised from the SPTE alone (no memslot lookup).
    pub fast_mmio_exits: u64,
    /// Write faults fixed by the lockless fast path.
    pub fast_page_faults: u64,
    /// MMU work counters.
    pub mmu: MmuStats,
    /// Shadow pages now.
    pub shadow_pages: usize,
    /// Reverse-map descriptors in use now.
    pub rmap_descs: usize,
}

pub(crate) struct VmState<A: TableAllocator> {
    pub(crate) slots: Memslots,
    pub(crate) mmu: ShadowMmu<Arc<A>>,
}

/// A virtual machine's memory virtualization.
pub struct Vm<H: HostMemory, A: TableAllocator = HeapTableAllocator> {
    host: H,
    alloc: Arc<A>,
    state: Mutex<VmState<A>>,
    pub(crate) vcpus: RwLock<Vec<Arc<VcpuShared>>>,
    pub(crate) dirty_index: DirtyIndex,
    root: crate::types::Pfn,
    config: VmConfig,
    remote_flushes: AtomicU64,
    fast_mmio: AtomicU64,
    fast_faults: AtomicU64,
    mmio_generation: AtomicU64,
}

/// Retries of one access before it is declared stuck.
const MAX_ACCESS_RETRIES: u32 = 64;

impl<H: HostMemory> Vm<H, HeapTableAllocator> {
    /// A VM whose tables come from the heap.
    ///
    /// # Panics
    /// If the root table cannot be allocated.
    pub fn new(config: VmConfig, host: H) -> Self {
        Self::with_allocator(config, host, Arc::new(HeapTableAllocator::new()))
            .expect("allocate the root table")
    }
}

impl<H: HostMemory, A: TableAllocator> Vm<H, A> {
    /// A VM whose tables come from `alloc`.
    pub fn with_allocator(config: VmConfig, host: H, alloc: Arc<A>) -> Result<Self, Error> {
        let mmu = ShadowMmu::new(alloc.clone(), config.max_level, config.algorithms)?;
        let mut slots = Memslots::new(config.limits);
        slots.set_dirty_initially_set(
            config.dirty_log.manual_protect && config.dirty_log.initially_all_set,
        );
        let root = mmu.root_frame();
        Ok(Vm {
            host,
            alloc,
            state: Mutex::new(VmState { slots, mmu }),
            vcpus: RwLock::new(Vec::new()),
            dirty_index: DirtyIndex::default(),
            root,
            config,
            remote_flushes: AtomicU64::new(0),
            fast_mmio: AtomicU64::new(0),
            fast_faults: AtomicU64::new(0),
            mmio_generation: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> VmConfig {
        self.config
    }
    /// The host memory.
    pub fn host(&self) -> &H {
        &self.host
    }
    /// The table allocator.
    pub fn allocator(&self) -> &Arc<A> {
        &self.alloc
    }

    /// A new vCPU, with the VM's root loaded.
    pub fn create_vcpu(&self) -> Result<Vcpu, Error> {
        // Before any vCPU can enter guest mode (see `hw::vcpu`).
        crate::sync::init_asymmetric_fences();
        let mut vcpus = self.vcpus.write();
        if vcpus.len() as u32 >= self.config.max_vcpus {
            return Err(Error::TooManyVcpus {
                max: self.config.max_vcpus,
            });
        }
        let shared = Arc::new(VcpuShared::new(self.config.dirty_log.ring_size));
        vcpus.push(shared.clone());
        Ok(Vcpu::new(vcpus.len() as u32 - 1, shared, self.root))
    }

    /// Flush every vCPU's TLB, waiting for vCPUs in guest mode (KVM's
    /// `kvm_flush_remote_tlbs`).
    pub fn flush_remote_tlbs(&self) {
        flush_vcpus(self.vcpus.read().iter().map(|v| &**v));
        self.remote_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Perform `flush` if owed, then free the tables unlinked before it (KVM's
    /// `kvm_mmu_commit_zap_page`).
    pub(crate) fn commit(&self, st: &mut VmState<A>, flush: Flush) {
        if flush.needed() || st.mmu.invalid_pages() != 0 {
            self.flush_remote_tlbs();
        }
        // SAFETY: the flush above made every vCPU leave guest mode after the unlinks.
        unsafe { st.mmu.free_invalid_pages() };
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, VmState<A>> {
        self.state.lock()
    }

    /// `KVM_SET_USER_MEMORY_REGION`: create, delete (size 0), move or change the flags of
    /// a slot. Invalid input returns an error and changes nothing.
    ///
    /// A deleted or moved slot's mappings are zapped. Turning LOG_DIRTY_PAGES on drops
    /// huge mappings and write-protects the slot (unless every bit starts set); turning it
    /// off zaps the 4K mappings that could be huge, so faults map them huge again.
    pub fn set_user_memory_region(&self, region: MemoryRegion) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let change = st.slots.check(&region)?;
        let old = st
            .slots
            .by_id(region.slot)
            .map(|s| (s.base_gfn, s.end_gfn(), s.flags));
        let mut flush = Flush::NONE;
        if let (SlotChange::Delete | SlotChange::Move { .. }, Some((start, end, _))) = (change, old)
        {
            flush |= st.mmu.zap_gfn_range(&mut st.slots, start, end);
        }
        self.commit(st, flush);
        st.slots.apply(&region, change);
        // Publish the logging slots before protecting anything: a lockless fast-path fault
        // that makes a page writable after the protection must find its slot to log it.
        self.dirty_index.publish(&st.slots);
        if let (SlotChange::FlagsOnly { old: old_flags }, Some((start, end, _))) = (change, old) {
            let log = MemslotFlags::LOG_DIRTY_PAGES;
            let (was, is) = (old_flags.contains(log), region.flags.contains(log));
            let mut flush = Flush::NONE;
            if !was && is {
                flush |= st
                    .mmu
                    .zap_gfn_range_levels(&mut st.slots, start, end, Level::L2M);
                if !st.slots.dirty_initially_set() {
                    flush |= st.mmu.slot_remove_write_access(&st.slots, region.slot);
                }
            } else if was && !is {
                flush |= self.zap_collapsible(st, region.slot);
            }
            self.commit(st, flush);
        }
        if st.slots.generation() & crate::spte::MMIO_GEN_MASK == 0 {
            // The generation MMIO SPTEs carry wrapped: an old one could match again. Zap
            // everything, as KVM's `kvm_mmu_invalidate_mmio_sptes` does.
            let flush = st.mmu.zap_all(&mut st.slots);
            self.commit(st, flush);
        }
        self.mmio_generation
            .store(st.slots.generation(), Ordering::Release);
        Ok(())
    }

    /// Zap the 4K leaves of `slot` that lie in 2 MiB pages the slot and the host would now
    /// map huge (KVM's `kvm_mmu_zap_collapsible_sptes`).
    fn zap_collapsible(&self, st: &mut VmState<A>, slot: u32) -> Flush {
        let Some(s) = st.slots.by_id(slot) else {
            return Flush::NONE;
        };
        let mut ranges = Vec::new();
        let mut g = s.base_gfn.align_down(Level::L2M);
        while g < s.end_gfn() {
            let huge = s.contains(g)
                && s.max_mapping_level(g, self.config.max_level) >= Level::L2M
                && self
                    .host
                    .translate(s.gfn_to_hva(g))
                    .is_some_and(|h| h.level >= Level::L2M);
            if huge && s.rmap_entries(Level::L4K) != 0 {
                ranges.push(g);
            }
            g = Gfn(g.0 + Level::L2M.pages());
        }
        let mut flush = Flush::NONE;
        for g in ranges {
            flush |= st
                .mmu
                .zap_gfn_range(&mut st.slots, g, Gfn(g.0 + Level::L2M.pages()));
        }
        flush
    }

    /// Handle a fault taken by `vcpu` as the MMU's fault handler does, under the lock,
    /// logging the page if a write made it writable in a logging slot.
    pub fn page_fault(&self, vcpu: &Vcpu, gpa: Gpa, ec: ErrorCode) -> Result<FaultOutcome, Error> {
        if gpa.0 >> PAGE_SHIFT >= 1u64 << (self.config.limits.gpa_bits - PAGE_SHIFT as u8) {
            return Err(Error::InvalidRange {
                start: gpa.gfn().0,
                end: gpa.gfn().0 + 1,
            });
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let fault = st
            .mmu
            .direct_page_fault(&mut st.slots, &self.host, gpa, ec)?;
        if let Some(d) = fault.dirty {
            let slot = st.slots.by_id(d.slot).expect("the fault found this slot");
            self.log_dirty(vcpu, d, slot.dirty_bitmap());
        }
        self.commit(st, fault.flush);
        Ok(fault.outcome)
    }

    /// One guest access through the CPU model: TLB hit, or walk, or exit to the MMU and
    /// retry. Returns the host-physical address the access reached.
    ///
    /// A write to a present page that may become writable (dirty-logging protection) is
    /// first tried on the lockless fast path, still in guest mode, as KVM's
    /// `fast_page_fault` runs with the shadow walk protected from frees.
    pub fn access(&self, vcpu: &mut Vcpu, gpa: Gpa, kind: AccessKind) -> Result<Hpa, Exit> {
        vcpu.accesses += 1;
        let gfn = gpa.gfn();
        let mut retries = 0;
        while retries < MAX_ACCESS_RETRIES {
            if vcpu.dirty_ring_soft_full() {
                return Err(Exit::DirtyRingFull);
            }
            vcpu.enter_guest();
            let mut result = match vcpu.tlb.lookup(gfn, kind) {
                Some(pfn) => Ok(pfn),
                // SAFETY: in guest mode (entered above, left below).
                None => unsafe { ept_walk(&*self.alloc, vcpu.root, gpa, kind) }.map(|e| {
                    vcpu.tlb.fill(gfn, e);
                    leaf_pfn(&e, gfn)
                }),
            };
            if let Err(WalkExit::Violation { error_code, .. }) = result {
                if error_code.contains(ErrorCode::PRESENT | ErrorCode::WRITE)
                    // SAFETY: still in guest mode.
                    && unsafe { fast_page_fault(&*self.alloc, vcpu.root, gpa) }
                {
                    // Still a VM exit (an EPT violation), handled without the MMU lock.
                    vcpu.exits += 1;
                    self.fast_faults.fetch_add(1, Ordering::Relaxed);
                    self.dirty_index
                        .with(gfn, |d, bitmap| self.log_dirty(vcpu, d, Some(bitmap)));
                    result = Err(WalkExit::Retry);
                }
            }
            vcpu.exit_guest();
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
                // The host is changing this page; wait for the invalidation to end.
                FaultOutcome::Retry => core::hint::spin_loop(),
                FaultOutcome::Mmio | FaultOutcome::ReadOnlyWrite => {
                    return Err(Exit::Mmio {
                        gpa,
                        write: kind == AccessKind::Write,
                    })
                }
                FaultOutcome::WriteTracked => return Err(Exit::WriteTracked { gpa }),
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

    fn check_range(&self, start: Gfn, end: Gfn) -> Result<(), Error> {
        let max = 1u64 << (self.config.limits.gpa_bits - PAGE_SHIFT as u8);
        if start >= end || end.0 > max {
            return Err(Error::InvalidRange {
                start: start.0,
                end: end.0,
            });
        }
        Ok(())
    }

    /// Zap every mapping of gfns in `[start, end)`, flush, free emptied tables.
    pub fn zap_gfn_range(&self, start: Gfn, end: Gfn) -> Result<(), Error> {
        self.check_range(start, end)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        let flush = st.mmu.zap_gfn_range(&mut st.slots, start, end);
        self.commit(st, flush);
        Ok(())
    }

    /// Zap every mapping of memslot `slot` (the slot stays).
    pub fn zap_memslot(&self, slot: u32) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let s = st.slots.by_id(slot).ok_or(Error::NoSuchSlot(slot))?;
        let (start, end) = (s.base_gfn, s.end_gfn());
        let flush = st.mmu.zap_gfn_range(&mut st.slots, start, end);
        self.commit(st, flush);
        Ok(())
    }

    /// Zap everything (KVM's `kvm_mmu_zap_all`); the root stays.
    pub fn zap_all(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let flush = st.mmu.zap_all(&mut st.slots);
        self.commit(st, flush);
    }

    /// Track writes to `gfn` (KVM's `kvm_write_track_add_gfn`, used by shadow paging for
    /// guest page tables and by VMMs for device tables): its SPTEs lose W and
    /// MMU-writable (so not even the fast path can restore W), huge mappings over it are
    /// dropped and disallowed, and guest writes to it exit with [`Exit::WriteTracked`].
    pub fn track_write(&self, gfn: Gfn) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let slot = st.slots.lookup_mut(gfn).ok_or(Error::InvalidRange {
            start: gfn.0,
            end: gfn.0 + 1,
        })?;
        if !slot.track_write(gfn, true) {
            return Err(Error::WriteTrackCount { gfn: gfn.0 });
        }
        let flush = st
            .mmu
            .zap_gfn_range_levels(&mut st.slots, gfn, Gfn(gfn.0 + 1), Level::L2M)
            | st.mmu.rmap_write_protect(&st.slots, gfn, Level::L4K, true);
        self.commit(st, flush);
        Ok(())
    }

    /// Drop one tracker of writes to `gfn`; when none is left, the next write fault maps
    /// it writable again.
    pub fn untrack_write(&self, gfn: Gfn) -> Result<(), Error> {
        let mut guard = self.lock();
        let slot = guard.slots.lookup_mut(gfn).ok_or(Error::InvalidRange {
            start: gfn.0,
            end: gfn.0 + 1,
        })?;
        if slot.track_write(gfn, false) {
            Ok(())
        } else {
            Err(Error::WriteTrackCount { gfn: gfn.0 })
        }
    }

    /// Counters.
    pub fn stats(&self) -> VmStats {
        let st = self.lock();
        VmStats {
            remote_tlb_flushes: self.remote_flushes.load(Ordering::Relaxed),
            fast_mmio_exits: self.fast_mmio.load(Ordering::Relaxed),
            fast_page_faults: self.fast_faults.load(Ordering::Relaxed),
            mmu: st.mmu.stats(),
            shadow_pages: st.mmu.pages().len(),
            rmap_descs: st.mmu.pool().in_use(),
        }
    }

    /// Run the audit (see [`crate::audit`]) under the lock.
    pub fn audit(&self) -> Result<crate::audit::AuditReport, crate::audit::AuditError> {
        let st = self.lock();
        crate::audit::audit(
            &st.slots,
            &st.mmu,
            self.config.dirty_log.ring_size.is_none(),
        )
    }

    /// Run `f` with the memslots and the MMU under the lock (for tests, audits and
    /// benchmarks that look inside).
    pub fn with_mmu<R>(&self, f: impl FnOnce(&Memslots, &ShadowMmu<Arc<A>>) -> R) -> R {
        let st = self.lock();
        f(&st.slots, &st.mmu)
    }
}

impl<H: HostMemory, A: TableAllocator> Drop for Vm<H, A> {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        // SAFETY: the VM is going away; vCPUs borrow it, so none can run.
        unsafe { st.mmu.destroy(&mut st.slots) };
    }
}
