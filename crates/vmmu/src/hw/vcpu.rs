//! A CPU as the MMU sees it (its TLB, the root it walks, its paging registers) and the
//! mode/request protocol of KVM's `vcpu->mode` and `kvm_make_all_cpus_request`. The MMU's
//! state of a vCPU (the roots it holds references on, its dirty ring) is the VM's, in
//! `vm/vcpu.rs`; the public run loop built on this protocol is `vm/run.rs`.
//!
//! # Protocol
//! A vCPU's mode word holds a mode (outside guest mode, in guest mode, or reading tables
//! locklessly in an exit handler) and a count of its changes. Only the vCPU's own thread
//! writes it. A vCPU enters a protected mode by storing it, then a [`light_fence`], then
//! reading its requests (guest entry) or the tables (lockless reads); a flusher sets the
//! request bit, then a [`heavy_fence`], then reads each mode word. The fence pair orders
//! each side's store before its load (see [`crate::sync`]), so in any interleaving either
//! the vCPU sees the request (or the unlinked table) or the flusher sees the vCPU in its
//! protected mode. The flusher then kicks a vCPU in guest mode (the embedder's hook: an
//! IPI to the physical CPU, which makes it exit) and waits until the word changes, which
//! happens when the vCPU leaves that stretch: the acknowledgement. A later entry stores a
//! later value, after the flusher's load, so it sees the request. Hence, when
//! [`request_vcpus`] returns, no vCPU is using a translation or a table that was removed
//! before the call, and every vCPU services the request before it next runs the guest.
//!
//! A vCPU may stay in guest mode for as long as it likes (a real one stays for
//! milliseconds) provided the VM has a kick: without one the flusher waits until the vCPU
//! leaves on its own, so a VM without a kick has only vCPUs that stay for one access.
//! Every store of the mode word is a `Release` store that the flusher's `Acquire` load
//! pairs with, so the vCPU's table reads happen before the tables are freed, whichever
//! later value of the word the flusher reads first (a later entry's included).
//!
//! The TLB is not flushed by this protocol: a pending [`REQ_TLB_FLUSH`] becomes an owed
//! flush, which the entry reports (the INVEPT the embedder executes, `vm/run.rs`), and the
//! CPU model's TLB is flushed only when that INVEPT is performed ([`Cpu::invept`]).

use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use super::tlb::Tlb;
use crate::guest::PagingState;
use crate::sync::{heavy_fence, light_fence};
use crate::types::Pfn;

/// Mode: outside guest mode (nothing to wait for).
const OUTSIDE: u64 = 0;
/// Mode: in guest mode (may stay long: kick it).
const IN_GUEST: u64 = 1;
/// Mode: reading the tables locklessly outside guest mode (an exit handler's fast path;
/// short, not kicked).
const READING: u64 = 2;
const MODE_MASK: u64 = 3;
/// One change of the mode word.
const STEP: u64 = 4;

/// Spins a flusher waits for a vCPU's acknowledgement before it starts yielding its CPU.
const WAIT_SPINS: u32 = 1 << 10;

/// Request: flush the TLB before the next guest access.
pub const REQ_TLB_FLUSH: u32 = 1;
/// Request: load the MMU's current root before running (the old one was invalidated).
pub const REQ_MMU_RELOAD: u32 = 2;

/// The part of a CPU other threads touch: its mode word, its pending requests, and the
/// CPU model's interrupt line (what the model's kick raises).
pub struct CpuShared {
    state: AtomicU64,
    requests: AtomicU32,
    /// The model CPU's pending external interrupt: raised by a kick, taken by the next
    /// guest access, which exits instead.
    pub(crate) interrupt: AtomicBool,
}

impl CpuShared {
    /// A CPU outside guest mode with no request pending.
    pub fn new() -> Self {
        CpuShared {
            state: AtomicU64::new(OUTSIDE),
            requests: AtomicU32::new(0),
            interrupt: AtomicBool::new(false),
        }
    }

    /// Whether the CPU is in guest mode now (a racy snapshot, for tests and reports).
    pub fn in_guest_mode(&self) -> bool {
        self.state.load(Ordering::Relaxed) & MODE_MASK == IN_GUEST
    }
}

impl Default for CpuShared {
    fn default() -> Self {
        Self::new()
    }
}

/// Ask every vCPU in `vcpus` to flush its TLB and wait until none is in guest mode with
/// its old translations (KVM's `kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH)` with wait).
pub fn flush_vcpus<'a>(
    vcpus: impl Iterator<Item = (u32, &'a CpuShared)> + Clone,
    kick: Option<&dyn Fn(u32)>,
) {
    request_vcpus(vcpus, REQ_TLB_FLUSH, kick);
}

/// Post `req` to every vCPU in `vcpus` (each with its id), kick each one found in guest
/// mode (with `kick`, the embedder's hook), and wait until each one found in a protected
/// mode has left it (see the module docs). One vCPU at a time: kick, then wait for its
/// acknowledgement.
pub fn request_vcpus<'a>(
    vcpus: impl Iterator<Item = (u32, &'a CpuShared)> + Clone,
    req: u32,
    kick: Option<&dyn Fn(u32)>,
) {
    for (_, v) in vcpus.clone() {
        v.requests.fetch_or(req, Ordering::Relaxed);
    }
    heavy_fence();
    for (id, v) in vcpus {
        let s = v.state.load(Ordering::Acquire);
        if s & MODE_MASK == OUTSIDE {
            continue;
        }
        if s & MODE_MASK == IN_GUEST {
            if let Some(kick) = kick {
                kick(id);
            }
        }
        let mut spins = 0u32;
        while v.state.load(Ordering::Acquire) == s {
            spins = spins.saturating_add(1);
            if spins < WAIT_SPINS {
                core::hint::spin_loop();
            } else {
                // The vCPU's thread may need this CPU to run (more threads than CPUs):
                // let it, with `std`; without, keep spinning (an embedder's vCPUs own
                // their physical CPUs).
                #[cfg(feature = "std")]
                std::thread::yield_now();
                #[cfg(not(feature = "std"))]
                core::hint::spin_loop();
            }
        }
    }
}

/// Where the CPU is in the run loop (the vCPU thread's own view; the shared mode word is
/// what other threads see).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GuestState {
    /// Outside guest mode.
    Outside,
    /// In guest mode, running the guest.
    InGuest,
    /// The hardware exited (a VM exit) and software has not yet left guest mode: the mode
    /// word still says guest mode, as KVM's `vcpu->mode` does until the exit path stores
    /// `OUTSIDE_GUEST_MODE`.
    Exited,
}

/// A CPU: its TLB, the root it walks (the EPT pointer, or CR3's shadow root) and its
/// paging registers. Owned by the thread that runs it.
pub struct Cpu {
    pub(crate) shared: Arc<CpuShared>,
    pub(crate) tlb: Tlb,
    pub(crate) root: Pfn,
    /// Paging registers (shadow paging).
    pub(crate) paging: PagingState,
    /// Where the CPU is in the run loop.
    pub(crate) guest: GuestState,
    /// A TLB flush is owed: a flush request was serviced, or a new root was loaded, and
    /// the INVEPT has not been reported by an entry yet.
    pub(crate) owed_flush: bool,
    /// The root changed since the last entry reported it (the embedder must load the new
    /// EPTP; the first entry counts).
    pub(crate) root_changed: bool,
}

impl Cpu {
    pub(crate) fn new(shared: Arc<CpuShared>, root: Pfn) -> Self {
        Cpu {
            shared,
            tlb: Tlb::new(),
            root,
            paging: PagingState::default(),
            guest: GuestState::Outside,
            // The first entry flushes the root it loads: its provenance is unknown to the
            // TLB (KVM flushes the current root on every `kvm_mmu_load`).
            owed_flush: true,
            root_changed: true,
        }
    }

    #[inline]
    fn set_mode(&self, mode: u64, order: Ordering) {
        let s = self.shared.state.load(Ordering::Relaxed);
        self.shared
            .state
            .store(((s & !MODE_MASK) + STEP) | mode, order);
    }

    /// Take the pending requests (outside guest mode): a flush request becomes an owed
    /// flush. Returns whether a root reload was requested.
    #[inline]
    pub(crate) fn service_requests(&mut self) -> bool {
        debug_assert_eq!(self.guest, GuestState::Outside);
        if self.shared.requests.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let req = self.shared.requests.swap(0, Ordering::AcqRel);
        if req & REQ_TLB_FLUSH != 0 {
            self.owed_flush = true;
        }
        req & REQ_MMU_RELOAD != 0
    }

    /// Store guest mode, then the light fence, then read the requests: `true` in guest
    /// mode with none pending; `false` back outside guest mode when one came (service it
    /// and try again).
    #[inline]
    pub(crate) fn try_enter(&mut self) -> bool {
        debug_assert_eq!(self.guest, GuestState::Outside);
        // Release, not Relaxed: a flusher that waited on an earlier value of the word may
        // read this one first, and must then see every table read made before it (a
        // relaxed store would break that chain; found by tests/loom_kick.rs).
        self.set_mode(IN_GUEST, Ordering::Release);
        light_fence();
        if self.shared.requests.load(Ordering::Relaxed) == 0 {
            self.guest = GuestState::InGuest;
            return true;
        }
        self.set_mode(OUTSIDE, Ordering::Release);
        false
    }

    /// Shadow paging's entry (its own TLB rules: a flush request flushes at once): enter
    /// guest mode, first handling pending flush requests. Returns `false`, outside guest
    /// mode, when the root must be reloaded first.
    #[inline]
    pub(crate) fn enter_guest(&mut self) -> bool {
        loop {
            let reload = self.service_requests();
            if core::mem::take(&mut self.owed_flush) {
                self.tlb.flush();
            }
            if reload {
                return false;
            }
            if self.try_enter() {
                return true;
            }
        }
    }

    /// Leave guest mode (after a VM exit, or at the end of a stretch).
    #[inline]
    pub(crate) fn exit_guest(&mut self) {
        if self.guest != GuestState::Outside {
            self.set_mode(OUTSIDE, Ordering::Release);
            self.guest = GuestState::Outside;
        }
    }

    /// Enter the lockless-read mode outside guest mode (an exit handler's walk of the
    /// tables): the flusher waits for it as for guest mode, but does not kick it.
    #[inline]
    pub(crate) fn begin_lockless(&mut self) {
        debug_assert_eq!(self.guest, GuestState::Outside);
        self.set_mode(READING, Ordering::Release);
        light_fence();
    }

    /// Leave the lockless-read mode.
    #[inline]
    pub(crate) fn end_lockless(&mut self) {
        self.set_mode(OUTSIDE, Ordering::Release);
    }

    /// Load a new root (after [`REQ_MMU_RELOAD`]). The TLB is not flushed here: the next
    /// entry owes an INVEPT of the new root.
    pub(crate) fn set_root(&mut self, root: Pfn) {
        self.root = root;
        self.owed_flush = true;
        self.root_changed = true;
    }

    /// The model's INVEPT: drop every cached translation (a single-context INVEPT of the
    /// one context the model caches).
    #[inline]
    pub(crate) fn invept(&mut self) {
        self.tlb.flush();
    }

    /// The root this vCPU runs on.
    pub fn root(&self) -> Pfn {
        self.root
    }

    /// The TLB.
    pub fn tlb(&self) -> &Tlb {
        &self.tlb
    }

    /// The paging registers (shadow paging).
    pub fn paging(&self) -> PagingState {
        self.paging
    }

    /// Change the privilege level (a syscall, an interrupt, IRET): user accesses are the
    /// ones made at CPL 3. No MMU work: the shadow tables carry the U/S bit.
    pub fn set_cpl(&mut self, cpl: u8) {
        self.paging.cpl = cpl & 3;
    }
}

impl Drop for Cpu {
    /// A CPU that goes away leaves guest mode: it walks nothing any more, and a flusher
    /// must not wait for it.
    fn drop(&mut self) {
        self.exit_guest();
    }
}
