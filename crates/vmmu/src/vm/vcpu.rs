//! vCPUs of the VM: a vCPU is a CPU of the model ([`Cpu`]: TLB, loaded root, paging
//! registers) plus the MMU's state of it (the shadow-paging roots it holds references on,
//! its dirty ring, its exit counters). Here: creation and release (with the roots they
//! hold), the tie of each vCPU to its VM, the remote TLB flush that waits for every vCPU
//! in guest mode, and the root reload a vCPU does when its root was invalidated.
//!
//! # Invariants
//! - Every VM has a [`VmId`] no other VM of the process has (a global counter that
//!   refuses to wrap), and every vCPU carries its VM's id, which safe code cannot change.
//! - Every `Vm` method that takes a `Vcpu` checks the id first ([`Vm::check_vcpu`]) and
//!   returns [`Error::ForeignVcpu`] before it touches anything. So a vCPU runs only on the
//!   VM that made it: its root, TLB and shadow-paging roots name that VM's tables, its
//!   mode is in that VM's flush list (a remote flush waits for it), its dirty ring is one
//!   that VM's VMM harvests. Once the VM is dropped no `Vm` method accepts the vCPU, so
//!   nothing walks the freed tables (`Vm::drop`'s safety argument).
//!
//! # Locking
//! `Vm::vcpus` is read by every remote flush and written only when a vCPU is created; the
//! MMU lock is never taken while the list is held (a flush under the MMU lock reads it).

use alloc::sync::Arc;

use crate::error::Error;
use alloc::vec::Vec;

use crate::dirty::DirtyRing;
use crate::guest::PagingState;
use crate::hw::{Cpu, CpuShared, REQ_MMU_RELOAD, REQ_TLB_FLUSH};
use crate::shadow::RootRef;
use crate::types::Pfn;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{Vm, VmState};
use crate::host::HostMemory;
use crate::table::TableAllocator;

/// What the VM keeps of each vCPU, for other threads: the CPU's mode and requests (remote
/// flushes post to them) and the dirty ring (the VMM harvests it).
#[derive(Clone)]
pub(crate) struct VcpuHandle {
    pub(crate) cpu: Arc<CpuShared>,
    pub(crate) dirty_ring: Option<Arc<DirtyRing>>,
}

/// A VM's identity, unique among the VMs of this process (see the module's invariants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VmId(u64);

impl VmId {
    /// An id no VM had before. Panics rather than wrap (after 2^64 - 1 VMs: never, but
    /// the vCPU check's soundness rests on uniqueness, so it is not left to chance).
    pub(crate) fn next() -> VmId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .expect("VM ids exhausted");
        VmId(id)
    }
}

/// A virtual CPU of a VM. Owned by the thread that runs it.
///
/// A vCPU belongs to the VM that created it: every `Vm` method taking a vCPU of another
/// VM (even one that was dropped) returns [`Error::ForeignVcpu`] and does nothing.
pub struct Vcpu {
    /// vCPU index.
    pub id: u32,
    /// The VM that created this vCPU (private: safe code cannot move a vCPU to another VM).
    vm: VmId,
    pub(crate) cpu: Cpu,
    /// Guest accesses made: [`Vm::access`] calls, and accesses the CPU model completed
    /// in guest mode ([`Vm::model_access`]; one that exits is counted when it completes).
    pub accesses: u64,
    /// Exits to the MMU (EPT violations and misconfigurations).
    pub exits: u64,
    /// Guest entries (the run loop's `enter_guest`, and one per try of an access).
    pub entries: u64,
    /// INVEPTs performed on the CPU model ([`Vcpu::model_invept`]).
    pub invepts: u64,
    /// Made for the run loop (`create_run_loop_vcpu`): may stay in guest mode long.
    pub(crate) run_loop: bool,
    /// Shadow paging: the root for the current CR3, and the previous ones kept for
    /// switching back (most recent first). The vCPU holds a reference on each.
    pub(crate) proot: Option<RootRef>,
    pub(crate) prev_roots: Vec<RootRef>,
    /// The dirty ring, when the VM uses rings: the vCPU pushes (taking the ring's vCPU-side
    /// lock only when it reserves room or logs a page), the VMM reads, marks and resets
    /// on its own side, concurrently (see `dirty::ring`).
    pub(crate) dirty_ring: Option<Arc<DirtyRing>>,
}

impl Vcpu {
    /// The root this vCPU runs on.
    pub fn root(&self) -> Pfn {
        self.cpu.root()
    }

    /// The TLB (`internals`: the CPU model is not part of the embedder's API).
    #[cfg(feature = "internals")]
    pub fn tlb(&self) -> &crate::hw::Tlb {
        self.cpu.tlb()
    }

    /// The paging registers (shadow paging).
    pub fn paging(&self) -> PagingState {
        self.cpu.paging()
    }

    /// Change the privilege level (a syscall, an interrupt, IRET): user accesses are the
    /// ones made at CPL 3. No MMU work: the shadow tables carry the U/S bit.
    pub fn set_cpl(&mut self, cpl: u8) {
        self.cpu.set_cpl(cpl);
    }

    /// Whether this vCPU's dirty ring is too full to run (KVM_EXIT_DIRTY_RING_FULL).
    #[inline]
    pub fn dirty_ring_soft_full(&self) -> bool {
        self.dirty_ring.as_ref().is_some_and(|r| r.is_soft_full())
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// Whether `vcpu` was created by this VM: [`Error::ForeignVcpu`] if not. Every method
    /// taking a vCPU calls this before anything else (see the module's invariants).
    #[inline]
    pub(crate) fn check_vcpu(&self, vcpu: &Vcpu) -> Result<(), Error> {
        if vcpu.vm == self.id {
            Ok(())
        } else {
            Err(Error::ForeignVcpu { vcpu: vcpu.id })
        }
    }

    /// A new vCPU, with the VM's root loaded.
    ///
    /// Lock order: the MMU lock is never taken while the vCPU list is held (a remote
    /// flush under the MMU lock reads the list), so the root is taken first.
    pub fn create_vcpu(&self) -> Result<Vcpu, Error> {
        // Before any vCPU can enter guest mode (see `hw::vcpu`).
        crate::sync::init_asymmetric_fences();
        let root = self.lock_shared().mmu.take_root();
        let handle = VcpuHandle {
            cpu: Arc::new(CpuShared::new()),
            dirty_ring: self.config.dirty_log.ring_size.map(|n| {
                let ring = DirtyRing::with_limits(n, self.config.dirty_log.ring_limits)
                    .expect("the VM checked its ring size");
                Arc::new(ring)
            }),
        };
        let id = {
            let mut vcpus = self.vcpus.write();
            if vcpus.len() as u32 >= self.config.max_vcpus {
                drop(vcpus);
                self.lock_shared().mmu.put_root(root);
                return Err(Error::TooManyVcpus {
                    max: self.config.max_vcpus,
                });
            }
            vcpus.push(handle.clone());
            vcpus.len() as u32 - 1
        };
        // A fast zap between taking the root and joining the list did not reach this
        // vCPU: have it reload before it runs.
        if !self.lock_shared().mmu.is_valid_root(root) {
            crate::hw::request_vcpus(core::iter::once((id, &*handle.cpu)), REQ_MMU_RELOAD, None);
        }
        Ok(Vcpu {
            id,
            vm: self.id,
            cpu: Cpu::new(handle.cpu, root),
            accesses: 0,
            exits: 0,
            entries: 0,
            invepts: 0,
            run_loop: false,
            proot: None,
            prev_roots: Vec::new(),
            dirty_ring: handle.dirty_ring,
        })
    }

    /// Give back what `vcpu` holds (KVM's vCPU destruction): its references on roots, so
    /// a root zapped while it ran can be freed now rather than with the VM. The vCPU keeps
    /// its place in the flush list (ids are not reused).
    ///
    /// A vCPU of another VM is refused ([`Error::ForeignVcpu`]) and dropped: this VM is
    /// untouched, and what the vCPU held in its own VM goes when that VM does.
    pub fn release_vcpu(&self, mut vcpu: Vcpu) -> Result<(), Error> {
        self.check_vcpu(&vcpu)?;
        // Owned here, so run by no one: out of guest mode before the lock.
        vcpu.cpu.exit_guest();
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed = st.mmu.release_vcpu(&mut vcpu);
        self.commit(st, removed);
        Ok(())
    }

    /// Flush every vCPU's TLB (KVM's `kvm_flush_remote_tlbs`): post the request, kick
    /// every vCPU in guest mode (with the VM's kick) and wait until each has left it.
    /// Each vCPU's next entry owes an INVEPT (see `vm::run`).
    pub fn flush_remote_tlbs(&self) {
        self.request_all(REQ_TLB_FLUSH);
        self.remote_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Ask every vCPU to load the MMU's current root before it runs again (kicking and
    /// waiting for those in guest mode, as a flush does).
    pub(crate) fn request_reload(&self) {
        self.request_all(REQ_MMU_RELOAD);
    }

    /// Load the current root into `vcpu`, dropping its reference to the old one; zap
    /// invalid roots nobody holds any more.
    pub(super) fn reload_root(&self, vcpu: &mut Vcpu) {
        if !self.lock_shared().mmu.reload_root(vcpu) {
            return;
        }
        let mut guard = self.lock();
        let removed = guard.mmu.reap_invalid_roots();
        self.commit(&mut guard, removed);
    }

    /// [`reload_root`](Self::reload_root) under the exclusive lock, held by the caller.
    pub(super) fn reload_root_under(&self, st: &mut VmState<A>, vcpu: &mut Vcpu) {
        if st.mmu.reload_root(vcpu) {
            let removed = st.mmu.reap_invalid_roots();
            self.commit(st, removed);
        }
    }
}
