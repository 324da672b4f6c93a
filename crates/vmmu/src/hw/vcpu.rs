//! A CPU as the MMU sees it (its TLB, the root it walks, its paging registers) and the
//! mode/request protocol of KVM's `vcpu->mode` and `kvm_make_all_cpus_request`. The MMU's
//! state of a vCPU (the roots it holds references on, its dirty ring) is the VM's, in
//! `vm/vcpu.rs`.
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
use crate::guest::PagingState;
use crate::sync::{heavy_fence, light_fence};
use crate::types::Pfn;

const OUTSIDE_GUEST_MODE: u8 = 0;
const IN_GUEST_MODE: u8 = 1;

/// Request: flush the TLB before the next guest access.
pub const REQ_TLB_FLUSH: u32 = 1;
/// Request: load the MMU's current root before running (the old one was invalidated).
pub const REQ_MMU_RELOAD: u32 = 2;

/// The part of a CPU other threads touch: its mode and its pending requests.
pub struct CpuShared {
    mode: AtomicU8,
    requests: AtomicU32,
}

impl CpuShared {
    /// A CPU outside guest mode with no request pending.
    pub fn new() -> Self {
        CpuShared {
            mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
            requests: AtomicU32::new(0),
        }
    }
}

impl Default for CpuShared {
    fn default() -> Self {
        Self::new()
    }
}

/// Ask every vCPU in `vcpus` to flush its TLB and wait until none is in guest mode with
/// its old translations (KVM's `kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH)` with wait).
pub fn flush_vcpus<'a>(vcpus: impl Iterator<Item = &'a CpuShared> + Clone) {
    request_vcpus(vcpus, REQ_TLB_FLUSH);
}

/// Post `req` to every vCPU in `vcpus` and wait until none is in guest mode without
/// having seen it.
pub fn request_vcpus<'a>(vcpus: impl Iterator<Item = &'a CpuShared> + Clone, req: u32) {
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

/// A CPU: its TLB, the root it walks (the EPT pointer, or CR3's shadow root) and its
/// paging registers. Owned by the thread that runs it.
pub struct Cpu {
    pub(crate) shared: Arc<CpuShared>,
    pub(crate) tlb: Tlb,
    pub(crate) root: Pfn,
    /// Paging registers (shadow paging).
    pub(crate) paging: PagingState,
}

impl Cpu {
    pub(crate) fn new(shared: Arc<CpuShared>, root: Pfn) -> Self {
        Cpu {
            shared,
            tlb: Tlb::new(),
            root,
            paging: PagingState::default(),
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
