//! A vCPU and the mode/request protocol of KVM's `vcpu->mode` and `kvm_make_all_cpus_request`.
//!
//! # Protocol
//! A vCPU enters guest mode by storing `IN_GUEST_MODE`, then a [`light_fence`], then
//! reading its requests; a flusher sets the request bit, then a [`heavy_fence`], then
//! reads the mode. The fence pair orders each side's store before its load (see
//! [`crate::sync`]), so in any interleaving either the vCPU sees the request (and flushes
//! its TLB before using it) or the flusher sees the vCPU in guest mode and waits until it
//! leaves. Hence, when [`flush_vcpus`] returns, no vCPU is using a translation or a table
//! that was removed before the call: tables unlinked before it can be freed.
//!
//! A vCPU stays in guest mode for the duration of one access (its walk and TLB use), so a
//! flusher never waits long. Leaving guest mode is a `Release` store that the flusher's
//! `Acquire` load pairs with, so the vCPU's table reads happen before the tables are freed.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use super::tlb::Tlb;
use crate::dirty::DirtyRing;
use crate::guest::PagingState;
use crate::shadow::RootRef;
use crate::sync::{heavy_fence, light_fence, Mutex};
use crate::types::Pfn;
use alloc::vec::Vec;

const OUTSIDE_GUEST_MODE: u8 = 0;
const IN_GUEST_MODE: u8 = 1;

/// Request: flush the TLB before the next guest access.
pub const REQ_TLB_FLUSH: u32 = 1;
/// Request: load the MMU's current root before running (the old one was invalidated).
pub const REQ_MMU_RELOAD: u32 = 2;

/// The part of a vCPU other threads touch.
pub struct VcpuShared {
    mode: AtomicU8,
    requests: AtomicU32,
    /// The dirty ring, when the VM uses rings: the vCPU pushes, the VMM harvests and
    /// resets. Its lock is taken by the vCPU only when logging a page.
    pub(crate) dirty_ring: Option<Mutex<DirtyRing>>,
}

impl VcpuShared {
    /// A vCPU's shared state, with a dirty ring of `ring_size` entries if given.
    pub fn new(ring_size: Option<u32>) -> Self {
        VcpuShared {
            mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
            requests: AtomicU32::new(0),
            dirty_ring: ring_size.map(|n| Mutex::new(DirtyRing::new(n))),
        }
    }
}

/// Ask every vCPU in `vcpus` to flush its TLB and wait until none is in guest mode with
/// its old translations (KVM's `kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH)` with wait).
pub fn flush_vcpus<'a>(vcpus: impl Iterator<Item = &'a VcpuShared> + Clone) {
    request_vcpus(vcpus, REQ_TLB_FLUSH);
}

/// Post `req` to every vCPU in `vcpus` and wait until none is in guest mode without
/// having seen it.
pub fn request_vcpus<'a>(vcpus: impl Iterator<Item = &'a VcpuShared> + Clone, req: u32) {
    for v in vcpus.clone() {
        v.requests.fetch_or(req, Ordering::Relaxed);
    }
    heavy_fence();
    for v in vcpus {
        while v.mode.load(Ordering::Acquire) == IN_GUEST_MODE {
            core::hint::spin_loop();
        }
    }
}

/// A virtual CPU: its TLB and its current root. Owned by the thread that runs it.
pub struct Vcpu {
    /// vCPU index.
    pub id: u32,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) tlb: Tlb,
    pub(crate) root: Pfn,
    /// Guest accesses made.
    pub accesses: u64,
    /// Exits to the MMU (EPT violations and misconfigurations).
    pub exits: u64,
    /// Paging registers (shadow paging).
    pub(crate) paging: PagingState,
    /// Shadow paging: the root for the current CR3, and the previous ones kept for
    /// switching back (most recent first).
    pub(crate) proot: Option<RootRef>,
    pub(crate) prev_roots: Vec<RootRef>,
}

impl Vcpu {
    pub(crate) fn new(id: u32, shared: Arc<VcpuShared>, root: Pfn) -> Self {
        Vcpu {
            id,
            shared,
            tlb: Tlb::new(),
            root,
            accesses: 0,
            exits: 0,
            paging: PagingState::default(),
            proot: None,
            prev_roots: Vec::new(),
        }
    }

    /// Enter guest mode, first handling pending TLB flushes (KVM's `vcpu_enter_guest`).
    /// Returns `false`, outside guest mode, when the root must be reloaded first.
    #[inline]
    pub(crate) fn enter_guest(&mut self) -> bool {
        loop {
            self.shared.mode.store(IN_GUEST_MODE, Ordering::Relaxed);
            light_fence();
            if self.shared.requests.load(Ordering::Relaxed) == 0 {
                return true;
            }
            self.shared
                .mode
                .store(OUTSIDE_GUEST_MODE, Ordering::Release);
            let req = self.shared.requests.swap(0, Ordering::AcqRel);
            if req & REQ_TLB_FLUSH != 0 {
                self.tlb.flush();
            }
            if req & REQ_MMU_RELOAD != 0 {
                return false;
            }
        }
    }

    /// Load a new root (after [`REQ_MMU_RELOAD`]); the TLB is flushed.
    pub(crate) fn set_root(&mut self, root: Pfn) {
        self.root = root;
        self.tlb.flush();
    }

    /// The root this vCPU runs on.
    pub fn root(&self) -> Pfn {
        self.root
    }

    /// Leave guest mode (a VM exit).
    #[inline]
    pub(crate) fn exit_guest(&mut self) {
        self.shared
            .mode
            .store(OUTSIDE_GUEST_MODE, Ordering::Release);
    }

    /// Whether this vCPU's dirty ring is too full to run (KVM_EXIT_DIRTY_RING_FULL).
    #[inline]
    pub fn dirty_ring_soft_full(&self) -> bool {
        self.shared
            .dirty_ring
            .as_ref()
            .is_some_and(|r| r.lock().is_soft_full())
    }

    /// The shared part (mode, requests, dirty ring).
    pub fn shared(&self) -> &VcpuShared {
        &self.shared
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
