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
use crate::guest::GuestMemory;
use crate::host::HostMemory;
use crate::hw::{ept_walk, fast_page_fault, flush_vcpus, leaf_pfn, Vcpu, VcpuShared, WalkExit};
use crate::memslot::{MemoryRegion, MemslotFlags, MemslotLimits, Memslots, SlotChange};
use crate::mmu::{Mmu, MmuKind};
use crate::shadow::{Algorithms, FaultOutcome, MmuStats, ShadowMmu};
use crate::sync::{RwLock, RwLockReadGuard};
use crate::table::{HeapTableAllocator, TableAllocator};
use crate::tdp::{self, Removed, TdpMmu, TdpPage};
use crate::types::{AccessKind, ErrorCode, Gfn, Gpa, Gva, Hpa, Level, PAGE_SHIFT};

mod lock;
mod paging;

pub use crate::shadow::{PagingConfig, PagingStats};

/// VM configuration.
#[derive(Clone, Copy, Debug)]
pub struct VmConfig {
    /// Which MMU runs the VM.
    pub mmu: MmuKind,
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
    /// Shadow paging's choices (used with [`MmuKind::ShadowPaging`]).
    pub paging: PagingConfig,
    /// A monotonic clock in nanoseconds. When given, the VM adds up the time its MMU
    /// spends handling exits and operations ([`VmStats::mmu_ns`]); `None` costs nothing.
    pub clock: Option<fn() -> u64>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mmu: MmuKind::ShadowDirect,
            max_level: Level::L1G,
            limits: MemslotLimits::default(),
            max_vcpus: 1024,
            algorithms: Algorithms::default(),
            dirty_log: DirtyLogConfig::default(),
            paging: PagingConfig::default(),
            clock: None,
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
    /// Shadow paging: the guest's own page tables forbid the access; the fault goes to
    /// the guest's handler (KVM injects #PF).
    GuestPageFault {
        /// The faulting address (the guest's CR2).
        gva: Gva,
        /// The page-fault error code.
        error_code: ErrorCode,
    },
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
            Exit::GuestPageFault { gva, error_code } => {
                write!(
                    f,
                    "guest page fault at gva {gva}, error code {:#x}",
                    error_code.bits()
                )
            }
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
    /// Shadow-paging counters.
    pub paging: PagingStats,
    /// Nanoseconds the MMU spent handling exits and operations (with
    /// [`VmConfig::clock`]; 0 without).
    pub mmu_ns: u64,
}

pub(crate) struct VmState<A: TableAllocator + 'static> {
    pub(crate) slots: Memslots,
    pub(crate) mmu: Mmu<A>,
}

/// A virtual machine's memory virtualization.
pub struct Vm<H: HostMemory, A: TableAllocator + 'static = HeapTableAllocator> {
    host: H,
    alloc: Arc<A>,
    state: RwLock<VmState<A>>,
    /// TDP VMs: the fault gate (see `lock`).
    fault_gate: Option<crate::brlock::BrLock<()>>,
    pub(crate) vcpus: RwLock<Vec<Arc<VcpuShared>>>,
    pub(crate) dirty_index: DirtyIndex,
    config: VmConfig,
    remote_flushes: AtomicU64,
    fast_mmio: AtomicU64,
    fast_faults: AtomicU64,
    mmio_generation: AtomicU64,
    mmu_ns: AtomicU64,
    /// Guest memory (shadow paging reads the guest's page tables there).
    pub(crate) guest: Option<Arc<dyn GuestMemory>>,
}

/// A lock guard that adds the time it was held to a counter, when the VM has a clock.
pub(crate) struct Timed<'a, G> {
    guard: G,
    clock: Option<fn() -> u64>,
    t0: u64,
    ns: &'a AtomicU64,
}

impl<'a, G> Timed<'a, G> {
    #[inline]
    fn new(guard: G, clock: Option<fn() -> u64>, ns: &'a AtomicU64) -> Self {
        let t0 = clock.map_or(0, |c| c());
        Timed {
            guard,
            clock,
            t0,
            ns,
        }
    }
}

impl<G: core::ops::Deref> core::ops::Deref for Timed<'_, G> {
    type Target = G::Target;
    #[inline]
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: core::ops::DerefMut> core::ops::DerefMut for Timed<'_, G> {
    #[inline]
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

impl<G> Drop for Timed<'_, G> {
    #[inline]
    fn drop(&mut self) {
        if let Some(c) = self.clock {
            self.ns
                .fetch_add(c().saturating_sub(self.t0), Ordering::Relaxed);
        }
    }
}

/// Guest-physical widths the 4-level tables can map.
const MIN_GPA_BITS: u8 = 32;
const MAX_GPA_BITS: u8 = 48;

/// Retries of one access before it is declared stuck.
pub(crate) const MAX_ACCESS_RETRIES: u32 = 64;

impl<H: HostMemory> Vm<H, HeapTableAllocator> {
    /// A VM whose tables come from the heap.
    ///
    /// # Panics
    /// If the configuration is invalid (see [`Vm::with_allocator`]) or the root table
    /// cannot be allocated.
    pub fn new(config: VmConfig, host: H) -> Self {
        Self::with_allocator(config, host, Arc::new(HeapTableAllocator::new()))
            .unwrap_or_else(|e| panic!("cannot create the VM: {e}"))
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// A VM whose tables come from `alloc`.
    pub fn with_allocator(config: VmConfig, host: H, alloc: Arc<A>) -> Result<Self, Error> {
        Self::build(config, host, alloc, None)
    }

    pub(crate) fn build(
        config: VmConfig,
        host: H,
        alloc: Arc<A>,
        guest: Option<Arc<dyn GuestMemory>>,
    ) -> Result<Self, Error> {
        // Before anything can take the fault gate or enter guest mode: every thread that
        // later uses this VM then sees the fence mode decided (see `sync`).
        crate::sync::init_asymmetric_fences();
        if guest.is_some() != (config.mmu == MmuKind::ShadowPaging) {
            // Checked before any table is allocated: an error changes nothing.
            return Err(Error::WrongPagingMode(if guest.is_some() {
                "guest memory is for shadow paging: set mmu to MmuKind::ShadowPaging"
            } else {
                "a shadow-paging VM needs guest memory: use Vm::with_guest_memory"
            }));
        }
        if !(MIN_GPA_BITS..=MAX_GPA_BITS).contains(&config.limits.gpa_bits) {
            return Err(Error::InvalidConfig(
                "gpa_bits must be 32..=48: the tables have 4 levels",
            ));
        }
        let mmu = match config.mmu {
            MmuKind::ShadowDirect => Mmu::Shadow(ShadowMmu::new(
                alloc.clone(),
                config.max_level,
                config.algorithms,
            )?),
            MmuKind::Tdp(mode) => Mmu::Tdp(TdpMmu::new(alloc.clone(), mode, config.max_level)?),
            MmuKind::ShadowPaging => Mmu::Shadow(ShadowMmu::new_paging(
                alloc.clone(),
                config.max_level,
                config.algorithms,
                config.paging,
            )),
        };
        let mut slots = Memslots::new(config.limits);
        slots.set_dirty_initially_set(
            config.dirty_log.manual_protect && config.dirty_log.initially_all_set,
        );
        Ok(Vm {
            host,
            alloc,
            state: RwLock::new(VmState { slots, mmu }),
            fault_gate: matches!(config.mmu, MmuKind::Tdp(_)).then(lock::gate),
            vcpus: RwLock::new(Vec::new()),
            dirty_index: DirtyIndex::default(),
            config,
            remote_flushes: AtomicU64::new(0),
            fast_mmio: AtomicU64::new(0),
            fast_faults: AtomicU64::new(0),
            mmio_generation: AtomicU64::new(0),
            mmu_ns: AtomicU64::new(0),
            guest,
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
    ///
    /// Lock order: the MMU lock is never taken while the vCPU list is held (a remote
    /// flush under the MMU lock reads the list), so the root is taken first.
    pub fn create_vcpu(&self) -> Result<Vcpu, Error> {
        // Before any vCPU can enter guest mode (see `hw::vcpu`).
        crate::sync::init_asymmetric_fences();
        let root = match &self.lock_shared().mmu {
            Mmu::Shadow(m) => m.root_frame(),
            Mmu::Tdp(m) => m.get_root(),
        };
        let shared = Arc::new(VcpuShared::new(self.config.dirty_log.ring_size));
        let id = {
            let mut vcpus = self.vcpus.write();
            if vcpus.len() as u32 >= self.config.max_vcpus {
                drop(vcpus);
                if let Mmu::Tdp(m) = &self.lock_shared().mmu {
                    m.put_root(root);
                }
                return Err(Error::TooManyVcpus {
                    max: self.config.max_vcpus,
                });
            }
            vcpus.push(shared.clone());
            vcpus.len() as u32 - 1
        };
        // A fast zap between taking the root and joining the list did not reach this
        // vCPU: have it reload before it runs.
        if let Mmu::Tdp(m) = &self.lock_shared().mmu {
            if !m.is_valid_root(root) {
                crate::hw::request_vcpus(core::iter::once(&*shared), crate::hw::REQ_MMU_RELOAD);
            }
        }
        Ok(Vcpu::new(id, shared, root))
    }

    /// Give back what `vcpu` holds (KVM's vCPU destruction): its references on roots, so
    /// a root zapped while it ran can be freed now rather than with the VM. The vCPU keeps
    /// its place in the flush list (ids are not reused).
    pub fn release_vcpu(&self, mut vcpu: Vcpu) {
        let mut guard = self.lock();
        let st = &mut *guard;
        match &mut st.mmu {
            Mmu::Tdp(m) => {
                m.put_root(vcpu.root());
                let epoch = tdp::pin();
                let (removed, _) = m.reap_invalid_roots(&epoch);
                drop(epoch);
                self.commit(st, removed);
            }
            Mmu::Shadow(m) if m.is_paging() => {
                for r in vcpu
                    .proot
                    .take()
                    .into_iter()
                    .chain(vcpu.prev_roots.drain(..))
                {
                    m.put_paging_root(&r);
                }
                self.commit(st, Removed::default());
            }
            Mmu::Shadow(_) => {}
        }
    }

    /// Flush every vCPU's TLB, waiting for vCPUs in guest mode (KVM's
    /// `kvm_flush_remote_tlbs`).
    pub fn flush_remote_tlbs(&self) {
        flush_vcpus(self.vcpus.read().iter().map(|v| &**v));
        self.remote_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Perform the flush an operation owes, then free the tables it unlinked (KVM's
    /// `kvm_mmu_commit_zap_page`). Exclusive lock.
    #[inline]
    pub(crate) fn commit(&self, st: &mut VmState<A>, removed: Removed) {
        if let Mmu::Shadow(m) = &mut st.mmu {
            if core::mem::take(&mut m.roots_invalidated) {
                // Shadow paging zapped roots vCPUs run on: they load new ones first.
                self.request_reload();
            }
        }
        if !st.mmu.pending(&removed) {
            return;
        }
        self.flush_remote_tlbs();
        // SAFETY: the flush above made every vCPU leave guest mode after the unlinks.
        unsafe { st.mmu.free_after_flush(removed) };
    }

    /// [`commit`](Self::commit) for a TDP operation run under the shared lock.
    pub(crate) fn commit_tdp(&self, tdp: &TdpMmu<A>, removed: Removed) {
        if !removed.is_empty() {
            self.flush_remote_tlbs();
            // SAFETY: flushed after the unlinks.
            unsafe { tdp.retire(removed) };
        }
    }

    /// The MMU lock, exclusive. The time it is held counts as MMU time
    /// ([`VmStats::mmu_ns`], with a clock).
    pub(crate) fn lock(&self) -> Timed<'_, lock::Exclusive<'_, VmState<A>>> {
        let rw = self.state.write();
        let gate = self.fault_gate.as_ref();
        if let Some(g) = gate {
            // SAFETY: every writer of the gate holds `state` exclusively, so writers are
            // serialized; the guard's drop unlocks.
            unsafe { g.write_raw() };
        }
        Timed::new(
            lock::Exclusive { rw, gate },
            self.config.clock,
            &self.mmu_ns,
        )
    }

    /// Shared access to a TDP VM's state through the fault gate, not the MMU lock: for a
    /// fault by vCPU `vcpu` (its own reader slot, so two vCPUs faulting at once write no
    /// common cache line; see [`lock`](lock)), or with `None` for lockless aging (the gate
    /// keeps memslots and roots from changing, as KVM's SRCU and RCU do). Timed as
    /// [`lock`](Self::lock).
    pub(crate) fn lock_gated(&self, vcpu: Option<u32>) -> Timed<'_, lock::Gated<'_, VmState<A>>> {
        let gate = self
            .fault_gate
            .as_ref()
            .expect("a TDP VM has a fault gate")
            .read(vcpu);
        // SAFETY: every exclusive holder of the state holds the gate exclusively too (see
        // `lock`), so while the gate is held shared the state is only read, or changed
        // through atomics as the TDP MMU's shared-lock rules allow.
        let data = unsafe { &*crate::sync::rwlock_data_ptr(&self.state) };
        Timed::new(
            lock::Gated { data, _gate: gate },
            self.config.clock,
            &self.mmu_ns,
        )
    }

    /// The MMU lock, shared (TDP faults and range operations), timed as [`lock`](Self::lock).
    pub(crate) fn lock_shared(&self) -> Timed<'_, RwLockReadGuard<'_, VmState<A>>> {
        let guard = self.state.read();
        Timed::new(guard, self.config.clock, &self.mmu_ns)
    }

    /// The MMU lock, shared, not timed: the CPU model's walks under shadow paging, which
    /// are the hardware's work, not the MMU's.
    pub(crate) fn lock_shared_untimed(&self) -> RwLockReadGuard<'_, VmState<A>> {
        self.state.read()
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
        let mut removed = Removed::default();
        if let (SlotChange::Delete | SlotChange::Move { .. }, Some((start, end, _))) = (change, old)
        {
            removed = if self.config.mmu == MmuKind::ShadowPaging {
                // Shadow pages of guest tables in the slot hang on its tracking counts:
                // zap everything, as KVM does for shadow paging.
                st.mmu.zap_all(&mut st.slots)
            } else {
                st.mmu.zap_gfn_range(&mut st.slots, start, end)
            };
        }
        self.commit(st, removed);
        st.slots.apply(&region, change);
        // Publish the logging slots before protecting anything: a lockless fast-path fault
        // that makes a page writable after the protection must find its slot to log it.
        self.dirty_index.publish(&st.slots);
        if st.slots.generation() & crate::spte::MMIO_GEN_MASK == 0 {
            // The generation MMIO SPTEs carry wrapped: an old one could match again. Zap
            // everything, as KVM's `kvm_mmu_invalidate_mmio_sptes` does.
            let removed = st.mmu.zap_all_fast(&mut st.slots)?;
            self.commit(st, removed);
            self.request_reload();
        }
        self.mmio_generation
            .store(st.slots.generation(), Ordering::Release);
        let initially_set = st.slots.dirty_initially_set();
        drop(guard);
        if let (SlotChange::FlagsOnly { old: old_flags }, Some((start, end, _))) = (change, old) {
            let log = MemslotFlags::LOG_DIRTY_PAGES;
            match (old_flags.contains(log), region.flags.contains(log)) {
                (false, true) => self.start_logging(region.slot, start, end, initially_set),
                (true, false) => self.stop_logging(start, end),
                _ => {}
            }
        }
        Ok(())
    }

    /// Logging starts on a slot: only 4K mappings may stay (the shadow MMU zaps huge
    /// leaves; the TDP MMU splits them eagerly, allocating tables outside the lock, and
    /// zaps those it could not get tables for), then every leaf is write-protected unless
    /// every bit starts set. It cannot fail: a lack of table memory costs faults, not
    /// logged writes.
    fn start_logging(&self, slot: u32, start: Gfn, end: Gfn, initially_set: bool) {
        let mut prealloc = Vec::new();
        let mut from = start;
        loop {
            let guard = self.lock_shared();
            let Mmu::Tdp(m) = &guard.mmu else {
                break;
            };
            let epoch = tdp::pin();
            match m.split_huge_pages(from, end, &mut prealloc, &epoch) {
                tdp::SplitProgress::Done(removed) => {
                    drop(epoch);
                    self.commit_tdp(m, removed);
                    break;
                }
                tdp::SplitProgress::NeedPages {
                    pages,
                    resume,
                    removed,
                } => {
                    drop(epoch);
                    self.commit_tdp(m, removed);
                    drop(guard);
                    // Out of the lock: the allocator may be slow (or sleep, in a kernel).
                    let before = prealloc.len();
                    for _ in 0..pages {
                        match TdpPage::new(&*self.alloc, Level::L2M, Gfn(0)) {
                            Some(p) => prealloc.push(p),
                            None => break,
                        }
                    }
                    if prealloc.len() == before {
                        // Out of table memory: what is left huge is zapped below instead
                        // (the next faults map it at 4K).
                        break;
                    }
                    from = resume;
                }
            }
        }
        for p in prealloc {
            // SAFETY: never linked: the frames were allocated above and only we know them.
            unsafe { self.alloc.free_table(p.frame) };
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut removed = st.mmu.zap_huge(&mut st.slots, start, end);
        if !initially_set {
            removed.merge(st.mmu.write_protect_slot(&st.slots, slot));
        }
        self.commit(st, removed);
    }

    /// Logging stopped: let huge mappings come back (the shadow MMU zaps the 4K leaves of
    /// huge-eligible ranges; the TDP MMU recovers huge leaves in place).
    fn stop_logging(&self, start: Gfn, end: Gfn) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed =
            st.mmu
                .recover_huge(&mut st.slots, &self.host, start, end, self.config.max_level);
        self.commit(st, removed);
    }

    /// Handle a fault taken by `vcpu` as the MMU's fault handler does, under the lock,
    /// logging the page if a write made it writable in a logging slot.
    pub fn page_fault(&self, vcpu: &Vcpu, gpa: Gpa, ec: ErrorCode) -> Result<FaultOutcome, Error> {
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
        if let MmuKind::Tdp(_) = self.config.mmu {
            let guard = self.lock_gated(Some(vcpu.id));
            let Mmu::Tdp(m) = &guard.mmu else {
                unreachable!("the VM's MMU kind does not change");
            };
            let epoch = tdp::pin();
            let Some(root) = m.valid_root(vcpu.root(), &epoch) else {
                // The vCPU's root was invalidated; it reloads before its next entry.
                return Ok(FaultOutcome::Spurious);
            };
            let fault = m.map(&guard.slots, &self.host, root, gpa, ec, &epoch)?;
            if let Some(d) = fault.dirty {
                let slot = guard
                    .slots
                    .by_id(d.slot)
                    .expect("the fault found this slot");
                self.log_dirty(vcpu, d, slot.dirty_bitmap());
            }
            drop(epoch);
            self.commit_tdp(m, fault.removed);
            return Ok(fault.outcome);
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let Mmu::Shadow(m) = &mut st.mmu else {
            unreachable!("the VM's MMU kind does not change");
        };
        let fault = m.direct_page_fault(&mut st.slots, &self.host, gpa, ec)?;
        if let Some(d) = fault.dirty {
            let slot = st.slots.by_id(d.slot).expect("the fault found this slot");
            self.log_dirty(vcpu, d, slot.dirty_bitmap());
        }
        self.commit(st, Removed::flush_only(fault.flush));
        Ok(fault.outcome)
    }

    /// Ask every vCPU to load the MMU's current root before it runs again.
    pub(crate) fn request_reload(&self) {
        crate::hw::request_vcpus(
            self.vcpus.read().iter().map(|v| &**v),
            crate::hw::REQ_MMU_RELOAD,
        );
    }

    /// Load the current root into `vcpu`, dropping its reference to the old one; zap
    /// invalid roots nobody holds any more.
    fn reload_root(&self, vcpu: &mut Vcpu) {
        let stale = {
            let guard = self.lock_shared();
            let Mmu::Tdp(m) = &guard.mmu else {
                return;
            };
            if m.is_valid_root(vcpu.root()) {
                return;
            }
            let new = m.get_root();
            m.put_root(vcpu.root());
            vcpu.set_root(new);
            true
        };
        if stale {
            let mut guard = self.lock();
            let st = &mut *guard;
            if let Mmu::Tdp(m) = &mut st.mmu {
                let epoch = tdp::pin();
                let (removed, _) = m.reap_invalid_roots(&epoch);
                drop(epoch);
                self.commit(st, removed);
            }
        }
    }

    /// One guest access through the CPU model: TLB hit, or walk, or exit to the MMU and
    /// retry. Returns the host-physical address the access reached.
    ///
    /// A write to a present page that may become writable (dirty-logging protection) is
    /// first tried on the lockless fast path, still in guest mode, as KVM's
    /// `fast_page_fault` runs with the shadow walk protected from frees.
    pub fn access(&self, vcpu: &mut Vcpu, gpa: Gpa, kind: AccessKind) -> Result<Hpa, Exit> {
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
        while retries < MAX_ACCESS_RETRIES {
            if vcpu.dirty_ring_soft_full() {
                return Err(Exit::DirtyRingFull);
            }
            if !vcpu.enter_guest() {
                self.reload_root(vcpu);
                continue;
            }
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
        self.zap_range_yielding(start, end);
        Ok(())
    }

    /// Zap every mapping of memslot `slot` (the slot stays).
    pub fn zap_memslot(&self, slot: u32) -> Result<(), Error> {
        let (start, end) = {
            let st = self.lock_shared();
            let s = st.slots.by_id(slot).ok_or(Error::NoSuchSlot(slot))?;
            (s.base_gfn, s.end_gfn())
        };
        self.zap_range_yielding(start, end);
        Ok(())
    }

    /// Zap `[start, end)`. The TDP MMU's walk stops every [`tdp::YIELD_BUDGET`] positions
    /// to flush, free and let the lock go (so faults and other operations get a turn, as
    /// KVM's `tdp_mmu_iter_cond_resched`), then resumes past everything already walked.
    fn zap_range_yielding(&self, mut start: Gfn, end: Gfn) {
        loop {
            let mut guard = self.lock();
            let st = &mut *guard;
            let (removed, resume) = match &mut st.mmu {
                Mmu::Tdp(m) => {
                    let epoch = tdp::pin();
                    m.zap_leafs(start, end, tdp::YIELD_BUDGET, &epoch)
                }
                Mmu::Shadow(_) => (st.mmu.zap_gfn_range(&mut st.slots, start, end), None),
            };
            self.commit(st, removed);
            match resume {
                Some(r) if r < end => start = r,
                _ => return,
            }
        }
    }

    /// Zap everything (KVM's `kvm_mmu_zap_all`); the roots stay (the TDP MMU zaps each
    /// in passes of increasing level).
    pub fn zap_all(&self) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed = st.mmu.zap_all(&mut st.slots);
        self.commit(st, removed);
        Ok(())
    }

    /// Zap everything fast (KVM's `kvm_mmu_zap_all_fast`): the TDP MMU invalidates its
    /// roots and hands vCPUs a new one; the old roots are zapped as soon as no vCPU runs
    /// on them. The shadow MMU zaps in place.
    pub fn zap_all_fast(&self) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed = st.mmu.zap_all_fast(&mut st.slots)?;
        self.commit(st, removed);
        if matches!(st.mmu, Mmu::Tdp(_)) {
            self.request_reload();
        }
        Ok(())
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
            end: gfn.0.saturating_add(1),
        })?;
        if !slot.track_write(gfn, true) {
            return Err(Error::WriteTrackCount { gfn: gfn.0 });
        }
        let removed = st.mmu.track_write(&mut st.slots, gfn);
        self.commit(st, removed);
        Ok(())
    }

    /// Drop one tracker of writes to `gfn`; when none is left, the next write fault maps
    /// it writable again.
    pub fn untrack_write(&self, gfn: Gfn) -> Result<(), Error> {
        let mut guard = self.lock();
        let slot = guard.slots.lookup_mut(gfn).ok_or(Error::InvalidRange {
            start: gfn.0,
            end: gfn.0.saturating_add(1),
        })?;
        if slot.track_write(gfn, false) {
            Ok(())
        } else {
            Err(Error::WriteTrackCount { gfn: gfn.0 })
        }
    }

    /// Counters.
    pub fn stats(&self) -> VmStats {
        let st = self.lock_shared();
        let (mmu, pages, descs) = match &st.mmu {
            Mmu::Shadow(m) => (m.stats(), m.pages().len(), m.pool().in_use()),
            Mmu::Tdp(m) => {
                let t = m.stats();
                let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
                // Fault counts are per vCPU (`Vcpu::exits`) on the TDP MMU.
                let s = MmuStats {
                    spurious_faults: ld(&t.spurious_faults) + ld(&t.retried_faults),
                    pages_freed: ld(&t.pages_freed),
                    ..MmuStats::default()
                };
                (s, m.live_pages() as usize, 0)
            }
        };
        VmStats {
            remote_tlb_flushes: self.remote_flushes.load(Ordering::Relaxed),
            fast_mmio_exits: self.fast_mmio.load(Ordering::Relaxed),
            fast_page_faults: self.fast_faults.load(Ordering::Relaxed),
            mmu,
            shadow_pages: pages,
            rmap_descs: descs,
            paging: match &st.mmu {
                Mmu::Shadow(m) => m.paging_stats(),
                Mmu::Tdp(_) => PagingStats::default(),
            },
            mmu_ns: self.mmu_ns.load(Ordering::Relaxed),
        }
    }

    /// Run the audit (see [`crate::audit`]) under the exclusive lock.
    pub fn audit(&self) -> Result<crate::audit::AuditReport, crate::audit::AuditError> {
        let st = self.lock();
        let bitmap_logging = self.config.dirty_log.ring_size.is_none();
        match &st.mmu {
            Mmu::Shadow(m) => {
                let rep = crate::audit::audit(&st.slots, m, bitmap_logging)?;
                if let (true, Some(g)) = (m.is_paging(), &self.guest) {
                    crate::audit::audit_paging(&st.slots, m, &**g)?;
                }
                Ok(rep)
            }
            Mmu::Tdp(m) => crate::audit::audit_tdp(&st.slots, m, bitmap_logging),
        }
    }

    /// Run `f` with the memslots and the shadow MMU under the lock (for tests, audits and
    /// benchmarks that look inside).
    ///
    /// # Panics
    /// If the VM runs the TDP MMU (see [`with_tdp`](Self::with_tdp)).
    pub fn with_mmu<R>(&self, f: impl FnOnce(&Memslots, &ShadowMmu<Arc<A>>) -> R) -> R {
        let st = self.lock();
        f(
            &st.slots,
            st.mmu.shadow().expect("with_mmu needs a shadow-MMU VM"),
        )
    }

    /// Run `f` with the memslots and the TDP MMU under the exclusive lock.
    ///
    /// # Panics
    /// If the VM runs the shadow MMU.
    pub fn with_tdp<R>(&self, f: impl FnOnce(&Memslots, &TdpMmu<A>) -> R) -> R {
        let st = self.lock();
        f(
            &st.slots,
            st.mmu.tdp().expect("with_tdp needs a TDP-MMU VM"),
        )
    }

    /// [`with_tdp`](Self::with_tdp) with the TDP MMU mutable, for tests and benchmarks
    /// that run an exclusive-lock TDP operation themselves (those take `&mut TdpMmu`).
    ///
    /// # Panics
    /// If the VM runs the shadow MMU.
    pub fn with_tdp_mut<R>(&self, f: impl FnOnce(&Memslots, &mut TdpMmu<A>) -> R) -> R {
        let mut guard = self.lock();
        let st = &mut *guard;
        match &mut st.mmu {
            Mmu::Tdp(m) => f(&st.slots, m),
            Mmu::Shadow(_) => panic!("with_tdp_mut needs a TDP-MMU VM"),
        }
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Drop for Vm<H, A> {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        // SAFETY: the VM is going away; vCPUs borrow it, so none can run.
        match &mut st.mmu {
            Mmu::Shadow(m) => unsafe { m.destroy(&mut st.slots) },
            Mmu::Tdp(m) => {
                unsafe { m.destroy() };
                // Give the memory back now rather than at some later pin.
                tdp::quiesce();
            }
        }
    }
}
