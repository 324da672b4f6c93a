//! vCPUs of the VM: a vCPU is a CPU of the model ([`Cpu`]: TLB, loaded root, paging
//! registers) plus the MMU's state of it (the shadow-paging roots it holds references on,
//! its dirty ring, its exit counters). Here: creation and release (with the roots they
//! hold), the remote TLB flush that waits for every vCPU in guest mode, and the root
//! reload a vCPU does when its root was invalidated.
//!
//! # Locking
//! `Vm::vcpus` is read by every remote flush and written only when a vCPU is created; the
//! MMU lock is never taken while the list is held (a flush under the MMU lock reads it).

use alloc::sync::Arc;

use crate::error::Error;
use alloc::vec::Vec;

use crate::dirty::DirtyRing;
use crate::guest::PagingState;
use crate::hw::{flush_vcpus, Cpu, CpuShared, Tlb};
use crate::shadow::RootRef;
use crate::sync::Mutex;
use crate::types::Pfn;
use core::sync::atomic::Ordering;

use super::Vm;
use crate::host::HostMemory;
use crate::table::TableAllocator;

/// What the VM keeps of each vCPU, for other threads: the CPU's mode and requests (remote
/// flushes post to them) and the dirty ring (the VMM harvests it).
#[derive(Clone)]
pub(crate) struct VcpuHandle {
    pub(crate) cpu: Arc<CpuShared>,
    pub(crate) dirty_ring: Option<Arc<Mutex<DirtyRing>>>,
}

/// A virtual CPU of a VM. Owned by the thread that runs it.
pub struct Vcpu {
    /// vCPU index.
    pub id: u32,
    pub(crate) cpu: Cpu,
    /// Guest accesses made.
    pub accesses: u64,
    /// Exits to the MMU (EPT violations and misconfigurations).
    pub exits: u64,
    /// Shadow paging: the root for the current CR3, and the previous ones kept for
    /// switching back (most recent first). The vCPU holds a reference on each.
    pub(crate) proot: Option<RootRef>,
    pub(crate) prev_roots: Vec<RootRef>,
    /// The dirty ring, when the VM uses rings: the vCPU pushes, the VMM harvests and
    /// resets. Its lock is taken by the vCPU only when logging a page.
    pub(crate) dirty_ring: Option<Arc<Mutex<DirtyRing>>>,
}

impl Vcpu {
    /// The root this vCPU runs on.
    pub fn root(&self) -> Pfn {
        self.cpu.root()
    }

    /// The TLB.
    pub fn tlb(&self) -> &Tlb {
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
        self.dirty_ring
            .as_ref()
            .is_some_and(|r| r.lock().is_soft_full())
    }
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
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
            dirty_ring: self
                .config
                .dirty_log
                .ring_size
                .map(|n| Arc::new(Mutex::new(DirtyRing::new(n)))),
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
            crate::hw::request_vcpus(core::iter::once(&*handle.cpu), crate::hw::REQ_MMU_RELOAD);
        }
        Ok(Vcpu {
            id,
            cpu: Cpu::new(handle.cpu, root),
            accesses: 0,
            exits: 0,
            proot: None,
            prev_roots: Vec::new(),
            dirty_ring: handle.dirty_ring,
        })
    }

    /// Give back what `vcpu` holds (KVM's vCPU destruction): its references on roots, so
    /// a root zapped while it ran can be freed now rather than with the VM. The vCPU keeps
    /// its place in the flush list (ids are not reused).
    pub fn release_vcpu(&self, mut vcpu: Vcpu) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed = st.mmu.release_vcpu(&mut vcpu);
        self.commit(st, removed);
    }

    /// Flush every vCPU's TLB, waiting for vCPUs in guest mode (KVM's
    /// `kvm_flush_remote_tlbs`).
    pub fn flush_remote_tlbs(&self) {
        flush_vcpus(self.vcpus.read().iter().map(|v| &*v.cpu));
        self.remote_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Ask every vCPU to load the MMU's current root before it runs again.
    pub(crate) fn request_reload(&self) {
        crate::hw::request_vcpus(
            self.vcpus.read().iter().map(|v| &*v.cpu),
            crate::hw::REQ_MMU_RELOAD,
        );
    }

    /// Load the current root into `vcpu`, dropping its reference to the old one; zap
    /// invalid roots nobody holds any more.
    pub(super) fn reload_root(&self, vcpu: &mut Vcpu) {
        if !self.lock_shared().mmu.reload_root(vcpu) {
            return;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed = st.mmu.reap_invalid_roots();
        self.commit(st, removed);
    }
}
