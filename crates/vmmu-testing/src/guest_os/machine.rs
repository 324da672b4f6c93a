//! A shadow-paging VM over simulated memory with the guest kernel booted on it: guest RAM
//! at gpa 0 ([`SimGuestMemory`], where the guest's tables live), one memslot covering it,
//! backed by simulated host memory.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use vmmu::guest::{GuestMemory, SimGuestMemory};
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{Gfn, Hva, PAGE_SHIFT};
use vmmu::{MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};

use super::cpu::VcpuCpu;
use super::kernel::Kernel;
use super::OsError;

/// The VM type of a [`Machine`].
pub type MachineVm = Vm<Arc<SimHostMemory>>;

/// A booted guest: the VM, its memory and its kernel.
pub struct Machine {
    /// The VM (shadow paging).
    pub vm: MachineVm,
    /// Guest RAM.
    pub mem: Arc<SimGuestMemory>,
    /// The guest kernel.
    pub kernel: Kernel,
    /// Host address of guest RAM (slot 0's `userspace_addr`).
    pub hva: Hva,
}

impl Machine {
    /// `ram_bytes` of guest RAM (a multiple of 2 MiB) backed by `backing`, on a VM with
    /// `config` switched to [`MmuKind::ShadowPaging`].
    pub fn new(ram_bytes: u64, backing: Backing, config: VmConfig) -> Result<Self, OsError> {
        let mem = Arc::new(SimGuestMemory::new(ram_bytes));
        let kernel = Kernel::boot(mem.clone() as Arc<dyn GuestMemory>, ram_bytes)?;
        let host = Arc::new(SimHostMemory::new());
        let hva = host
            .mmap(ram_bytes, backing, true)
            .map_err(|e| OsError::Host(e.to_string()))?;
        let config = VmConfig {
            mmu: MmuKind::ShadowPaging,
            ..config
        };
        let vm = Vm::new_paging(config, host, mem.clone() as Arc<dyn GuestMemory>);
        vm.set_user_memory_region(MemoryRegion {
            slot: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: 0,
            memory_size: ram_bytes,
            userspace_addr: hva.0,
        })
        .map_err(OsError::Vm)?;
        Ok(Machine {
            vm,
            mem,
            kernel,
            hva,
        })
    }

    /// A new vCPU running the idle address space at CPL 0.
    pub fn cpu(&self) -> Result<VcpuCpu<'_, Arc<SimHostMemory>>, OsError> {
        VcpuCpu::new(&self.vm, self.kernel.idle_pml4())
    }

    /// The host address backing guest frame `gfn`.
    pub fn hva_of(&self, gfn: Gfn) -> Hva {
        Hva(self.hva.0 + (gfn.0 << PAGE_SHIFT))
    }
}

/// Monotonic nanoseconds since the first call: a [`VmConfig::clock`].
pub fn clock_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
