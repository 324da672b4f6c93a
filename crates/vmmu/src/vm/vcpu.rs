//! vCPUs of the VM: creation and release (with the roots they hold), the remote TLB
//! flush that waits for every vCPU in guest mode, and the root reload a vCPU does when its
//! root was invalidated.
//!
//! # Locking
//! `Vm::vcpus` is read by every remote flush and written only when a vCPU is created; the
//! MMU lock is never taken while the list is held (a flush under the MMU lock reads it).

use alloc::sync::Arc;

use crate::error::Error;
use crate::hw::{flush_vcpus, Vcpu, VcpuShared};
use core::sync::atomic::Ordering;

use super::Vm;
use crate::host::HostMemory;
use crate::table::TableAllocator;

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// A new vCPU, with the VM's root loaded.
    ///
    /// Lock order: the MMU lock is never taken while the vCPU list is held (a remote
    /// flush under the MMU lock reads the list), so the root is taken first.
    pub fn create_vcpu(&self) -> Result<Vcpu, Error> {
        // Before any vCPU can enter guest mode (see `hw::vcpu`).
        crate::sync::init_asymmetric_fences();
        let root = self.lock_shared().mmu.take_root();
        let shared = Arc::new(VcpuShared::new(self.config.dirty_log.ring_size));
        let id = {
            let mut vcpus = self.vcpus.write();
            if vcpus.len() as u32 >= self.config.max_vcpus {
                drop(vcpus);
                self.lock_shared().mmu.put_root(root);
                return Err(Error::TooManyVcpus {
                    max: self.config.max_vcpus,
                });
            }
            vcpus.push(shared.clone());
            vcpus.len() as u32 - 1
        };
        // A fast zap between taking the root and joining the list did not reach this
        // vCPU: have it reload before it runs.
        if !self.lock_shared().mmu.is_valid_root(root) {
            crate::hw::request_vcpus(core::iter::once(&*shared), crate::hw::REQ_MMU_RELOAD);
        }
        Ok(Vcpu::new(id, shared, root))
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
        flush_vcpus(self.vcpus.read().iter().map(|v| &**v));
        self.remote_flushes.fetch_add(1, Ordering::Relaxed);
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
