//! The VM: memslots, the MMU, vCPUs and the remote TLB flush, behind one API.
//!
//! One file per mechanism, each calling the MMU through the one dispatch in `mmu.rs`:
//! `memslots.rs` (KVM_SET_USER_MEMORY_REGION, logging on and off), `fault.rs` (guest
//! accesses and their faults), `zap.rs`, `track.rs` (write tracking), `dirty_log.rs`
//! (GET/CLEAR, rings), `notifier.rs` (MMU-notifier operations), `prefault.rs`
//! (KVM_PRE_FAULT_MEMORY), `paging.rs` (the shadow-paging API), `vcpu.rs` (vCPUs, the
//! remote flush, root reload), `run.rs` (the public run loop: guest entry with its EPTP
//! and INVEPT, the exit handlers, the kick), `qualification.rs` (the EPT-violation exit
//! qualification), `model.rs` (the CPU model running the run loop as an embedder does)
//! and `lock.rs` (the MMU lock, the TDP fault gate, their timing); with `std` on Linux,
//! `data.rs` (guest accesses that move real bytes through `RealHostMemory`).
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

use crate::dirty::{DirtyIndex, RingLimits};
use crate::error::Error;
use crate::guest::GuestMemory;
use crate::host::HostMemory;

use crate::memslot::{MemslotLimits, Memslots};
use crate::mmu::MmuStats;
use crate::shadow::Algorithms;
use crate::sync::RwLock;
use crate::table::{HeapTableAllocator, TableAllocator};
use crate::types::{ErrorCode, Gpa, Gva, Level};

#[cfg(all(feature = "std", target_os = "linux"))]
mod data;
mod dirty_log;
mod fault;
mod lock;
mod memslots;
mod mmu;
mod model;
mod notifier;
mod paging;
mod prefault;
mod qualification;
mod run;
mod track;
mod vcpu;
mod zap;

#[cfg(all(feature = "std", target_os = "linux"))]
pub use data::DataError;
pub use dirty_log::{DirtyRange, DirtyRingView, HarvestReport};
pub use fault::LOCKLESS_RETRIES;
pub use prefault::PreFault;

pub use mmu::MmuKind;
internal! { pub use mmu::Mmu; }
pub use model::{ModelRun, MODEL_MAX_RESUMES};
pub use qualification::EptViolation;
pub use run::{EntryState, Eptp, ExitAction, InterruptLine, Invept, Kick, ModelKick, VmExit};
pub use vcpu::Vcpu;

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
    /// Compatibility: accept [`Vm::change_pte`], the `.change_pte` MMU notifier (KVM's
    /// `kvm_set_spte_gfn`: repoint the SPTEs of a page the host moved, for KSM, without
    /// zapping them). Off by default, as in a current kernel: Linux removed `.change_pte`
    /// in 2024 (Linux 6.10) because, called inside `invalidate_range_start`/`end` since
    /// 2012, it never found an SPTE to change. A current host announces a moved page with
    /// [`Vm::invalidate_range_start`] and [`Vm::invalidate_range_end`] only (the page
    /// faults back in at its new frame); without this option `change_pte` returns
    /// [`Error::ChangePteRemoved`] and changes nothing. With it, `change_pte` keeps its
    /// pre-2012 meaning: called on its own, after the host changed the page.
    pub change_pte: bool,
    /// TDP MMU: split huge leaves eagerly when dirty logging starts (KVM's
    /// `eager_page_split`, on by default), allocating the tables outside the MMU lock, so
    /// the first write to each page under logging takes only the fast path. Off, the
    /// huge leaves are zapped instead and the first writes fault the pages back at 4 KiB
    /// (KVM with `eager_page_split=N` splits on those faults instead). The shadow MMU
    /// always zaps.
    pub eager_split: bool,
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
            change_pte: false,
            eager_split: true,
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
    /// entries instead of the bitmap: a power of two from
    /// [`MIN_RING_ENTRIES`](Self::MIN_RING_ENTRIES) to
    /// [`MAX_RING_ENTRIES`](Self::MAX_RING_ENTRIES) (or within KVM's limits, with
    /// [`ring_limits`](Self::ring_limits)), or the VM is refused with
    /// [`Error::InvalidRingSize`] before anything is allocated. The VMM may harvest a
    /// ring concurrently with its vCPU (KVM_CAP_DIRTY_LOG_RING_ACQ_REL: see
    /// [`Vm::dirty_ring`]).
    pub ring_size: Option<u32>,
    /// Which size rule `ring_size` follows: vmmu's (4 to 2^20 entries, soft-full one
    /// entry before full) or KVM's (256 to 65536 entries, soft-full 64 before full, so
    /// vCPUs exit where KVM's do). See `dirty::ring`'s "Sizes" for why they differ.
    pub ring_limits: RingLimits,
    /// KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: with rings, every logging slot also keeps its
    /// dirty bitmap, for pages dirtied outside any vCPU context ([`Vm::mark_page_dirty`]:
    /// writes by the host or the VMM, e.g. device state saved into guest memory during
    /// migration), harvested by [`Vm::get_dirty_log`] (and [`Vm::clear_dirty_log`] with
    /// manual protect) as in bitmap mode. Needs `ring_size` ([`Error::InvalidConfig`]
    /// otherwise), as KVM needs the ring enabled first; may also be enabled later with
    /// [`Vm::enable_dirty_ring_with_bitmap`] while no memslot exists.
    pub ring_with_bitmap: bool,
}

impl DirtyLogConfig {
    /// Fewest entries a dirty ring may have (three usable before it is soft-full; KVM's
    /// floor, one 4 KiB page of entries, comes from mapping the ring, which vmmu does not).
    pub const MIN_RING_ENTRIES: u32 = crate::dirty::ring::MIN_ENTRIES;
    /// Most entries a dirty ring may have (KVM's `KVM_DIRTY_RING_MAX_ENTRIES` is 65536;
    /// vmmu allows 2^20, 16 MiB per vCPU).
    pub const MAX_RING_ENTRIES: u32 = crate::dirty::ring::MAX_ENTRIES;
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

/// An error ends the access with [`Exit::Error`], but a full dirty ring is the exit the
/// VMM expects for it, [`Exit::DirtyRingFull`].
impl From<Error> for Exit {
    fn from(e: Error) -> Self {
        match e {
            Error::DirtyRingFull { .. } => Exit::DirtyRingFull,
            e => Exit::Error(e),
        }
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
    /// Accesses that lost [`LOCKLESS_RETRIES`] races in a
    /// row (each fault's mapping zapped again before the retried walk used it) and
    /// completed under the exclusive MMU lock instead.
    pub locked_accesses: u64,
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
    /// Nanoseconds spent waiting for the MMU lock (or, for TDP faults, the fault gate)
    /// before holding it, summed over every acquisition (with [`VmConfig::clock`]).
    pub lock_wait_ns: u64,
    /// Acquisitions of the MMU lock or the fault gate (with [`VmConfig::clock`]).
    pub lock_acquisitions: u64,
    /// Kicks remote flushes and reload requests sent to vCPUs in guest mode (with a
    /// kick, [`Vm::set_kick`]).
    pub kicks: u64,
}

pub(crate) struct VmState<A: TableAllocator + 'static> {
    pub(crate) slots: Memslots,
    pub(crate) mmu: Mmu<A>,
    /// The masks sparse harvests gather into (CLEAR, ring resets, dirty ranges), all
    /// zero between calls: a harvest of a few pages neither allocates nor zeroes a
    /// slot-sized buffer (see `vm/dirty_log.rs`).
    pub(crate) scratch: crate::dirty::MaskScratch,
}

/// A virtual machine's memory virtualization.
pub struct Vm<H: HostMemory, A: TableAllocator + 'static = HeapTableAllocator> {
    /// This VM's identity, carried by its vCPUs (see `vcpu`).
    id: vcpu::VmId,
    host: H,
    alloc: Arc<A>,
    state: RwLock<VmState<A>>,
    /// TDP VMs: the fault gate (see `lock`).
    fault_gate: Option<crate::brlock::BrLock<()>>,
    pub(crate) vcpus: RwLock<Vec<vcpu::VcpuHandle>>,
    pub(crate) dirty_index: DirtyIndex,
    /// Rings with the backup bitmap (`DirtyLogConfig::ring_with_bitmap`, or enabled by
    /// `enable_dirty_ring_with_bitmap`): set under the exclusive MMU lock while no
    /// memslot exists, never cleared, so once a slot exists it no longer changes.
    pub(crate) ring_bitmap: core::sync::atomic::AtomicBool,
    config: VmConfig,
    remote_flushes: AtomicU64,
    fast_mmio: AtomicU64,
    fast_faults: AtomicU64,
    locked_accesses: AtomicU64,
    mmio_generation: AtomicU64,
    mmu_ns: AtomicU64,
    /// See [`VmStats::lock_wait_ns`] and [`VmStats::lock_acquisitions`].
    lock_wait: lock::WaitCounters,
    /// The embedder's kick (see `run`), called by remote requests for vCPUs in guest mode.
    kick: Option<Arc<dyn run::Kick>>,
    kicks: AtomicU64,
    /// Guest memory (shadow paging reads the guest's page tables there).
    pub(crate) guest: Option<Arc<dyn GuestMemory>>,
    /// Tests: run after every lost race of an access (see `Vm::set_lost_race_hook`).
    #[cfg(feature = "internals")]
    pub(crate) lost_race_hook: Option<LostRaceHook<H, A>>,
}

/// What [`Vm::set_lost_race_hook`] installs.
#[cfg(feature = "internals")]
pub type LostRaceHook<H, A> = alloc::boxed::Box<dyn Fn(&Vm<H, A>) + Send + Sync>;

/// Guest-physical widths the 4-level tables can map.
const MIN_GPA_BITS: u8 = 32;
const MAX_GPA_BITS: u8 = 48;

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
        if let Some(size) = config.dirty_log.ring_size {
            crate::dirty::ring::check_size_with(size, config.dirty_log.ring_limits)?;
        } else if config.dirty_log.ring_with_bitmap {
            // KVM refuses KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP before the ring is enabled.
            return Err(Error::InvalidConfig(
                "ring_with_bitmap needs ring_size: the backup bitmap is for dirty rings",
            ));
        }
        let mmu = Mmu::new(&config, &alloc)?;
        let mut slots = Memslots::new(config.limits);
        slots.set_reverse_maps(!matches!(config.mmu, MmuKind::Tdp(_)));
        slots.set_dirty_initially_set(
            config.dirty_log.manual_protect && config.dirty_log.initially_all_set,
        );
        Ok(Vm {
            id: vcpu::VmId::next(),
            host,
            alloc,
            state: RwLock::new(VmState {
                slots,
                mmu,
                scratch: crate::dirty::MaskScratch::new(),
            }),
            fault_gate: matches!(config.mmu, MmuKind::Tdp(_)).then(lock::gate),
            vcpus: RwLock::new(Vec::new()),
            dirty_index: DirtyIndex::default(),
            ring_bitmap: core::sync::atomic::AtomicBool::new(config.dirty_log.ring_with_bitmap),
            config,
            remote_flushes: AtomicU64::new(0),
            fast_mmio: AtomicU64::new(0),
            fast_faults: AtomicU64::new(0),
            locked_accesses: AtomicU64::new(0),
            mmio_generation: AtomicU64::new(0),
            mmu_ns: AtomicU64::new(0),
            lock_wait: lock::WaitCounters::default(),
            kick: None,
            kicks: AtomicU64::new(0),
            guest,
            #[cfg(feature = "internals")]
            lost_race_hook: None,
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

    /// Counters.
    pub fn stats(&self) -> VmStats {
        let st = self.lock_shared();
        let (mmu, pages, descs) = st.mmu.stats();
        VmStats {
            remote_tlb_flushes: self.remote_flushes.load(Ordering::Relaxed),
            fast_mmio_exits: self.fast_mmio.load(Ordering::Relaxed),
            fast_page_faults: self.fast_faults.load(Ordering::Relaxed),
            locked_accesses: self.locked_accesses.load(Ordering::Relaxed),
            mmu,
            shadow_pages: pages,
            rmap_descs: descs,
            paging: st.mmu.paging_stats(),
            mmu_ns: self.mmu_ns.load(Ordering::Relaxed),
            lock_wait_ns: self.lock_wait.ns.load(Ordering::Relaxed),
            lock_acquisitions: self.lock_wait.count.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
        }
    }

    /// Run the audit (see [`crate::audit`]) under the exclusive lock.
    pub fn audit(&self) -> Result<crate::audit::AuditReport, crate::audit::AuditError> {
        let st = self.lock();
        let bitmap_logging = self.config.dirty_log.ring_size.is_none();
        st.mmu
            .audit(&st.slots, &self.host, bitmap_logging, self.guest.as_deref())
    }

    /// Run `f` with the memslots and the shadow MMU under the lock (for tests, audits and
    /// benchmarks that look inside).
    ///
    /// # Panics
    /// If the VM runs the TDP MMU (see [`with_tdp`](Self::with_tdp)).
    #[cfg(feature = "internals")]
    pub fn with_mmu<R>(
        &self,
        f: impl FnOnce(&Memslots, &crate::shadow::ShadowMmu<Arc<A>>) -> R,
    ) -> R {
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
    #[cfg(feature = "internals")]
    pub fn with_tdp<R>(&self, f: impl FnOnce(&Memslots, &crate::tdp::TdpMmu<A>) -> R) -> R {
        let st = self.lock();
        f(
            &st.slots,
            st.mmu.tdp().expect("with_tdp needs a TDP-MMU VM"),
        )
    }

    /// Have `hook` run each time an access loses a race on the lockless path: after a
    /// try whose fault mapped the page (or the fast path fixed it, or the root was
    /// reloaded), before the retry, with no lock held and the vCPU outside guest mode, so
    /// `hook` may call any method of the VM, as another thread could at that moment. A
    /// test that zaps the page there makes every lockless try lose, deterministically,
    /// and so reaches the exclusive-lock path (`LOCKLESS_RETRIES`) on every access.
    #[cfg(feature = "internals")]
    pub fn set_lost_race_hook(&mut self, hook: LostRaceHook<H, A>) {
        self.lost_race_hook = Some(hook);
    }

    /// [`with_tdp`](Self::with_tdp) with the TDP MMU mutable, for tests and benchmarks
    /// that run an exclusive-lock TDP operation themselves (those take `&mut TdpMmu`).
    ///
    /// # Panics
    /// If the VM runs the shadow MMU.
    #[cfg(feature = "internals")]
    pub fn with_tdp_mut<R>(&self, f: impl FnOnce(&Memslots, &mut crate::tdp::TdpMmu<A>) -> R) -> R {
        let mut guard = self.lock();
        let st = &mut *guard;
        let m = st.mmu.tdp_mut().expect("with_tdp_mut needs a TDP-MMU VM");
        f(&st.slots, m)
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Drop for Vm<H, A> {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        // SAFETY: the VM is going away (`&mut self`: no method of it runs), and a vCPU
        // runs only inside a method of its own VM, which refuses it once this VM is gone
        // (`Vm::check_vcpu`, see `vcpu`): no vCPU will run on these tables again.
        unsafe { st.mmu.destroy(&mut st.slots) };
    }
}
