//! The vmmu peer: a [`Vm`] with the KVM peer's data slot (same id, guest-physical
//! address, size, flags and host backing) over simulated host memory, whose CPU model
//! stores to the scheduled pages one by one (`Vm::write`: TLB, EPT walk, violation,
//! fault, retry), as the KVM guest's loop does.
//!
//! The system slot has no counterpart: vmmu's CPU model takes guest-physical addresses,
//! so there are no guest page tables or code to hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::Gpa;
use vmmu::Vcpu;
use vmmu::{DirtyGfn, DirtyLogConfig, MemoryRegion, MemslotFlags, Vm, VmConfig};

use crate::image::{DATA_GPA, DATA_SLOT};
use crate::{DirtyLog, Error, HostBacking, Peer, Schedule, SlotConfig, RING_ENTRIES};

fn vmmu_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Vmmu {
        what,
        err: e.to_string(),
    }
}

/// A vmmu VM with the data slot of a [`SlotConfig`] and one vCPU.
pub struct VmmuGuest {
    vcpu: Vcpu,
    vm: Vm<Arc<SimHostMemory>>,
    hva: u64,
    present: bool,
    config: SlotConfig,
    /// The ring harvest's buffer, allocated once for a full ring.
    entries: Vec<DirtyGfn>,
}

impl VmmuGuest {
    /// Build the VM (vmmu's default configuration), its data slot and its vCPU.
    pub fn new(config: &SlotConfig) -> Result<Self, Error> {
        Self::with_vm_config(config, VmConfig::default())
    }

    /// Build the VM from `vm_config` (e.g. another MMU or algorithm choice), its data slot
    /// and its vCPU. The dirty-log mode comes from `config`, replacing `vm_config`'s.
    pub fn with_vm_config(config: &SlotConfig, vm_config: VmConfig) -> Result<Self, Error> {
        let host = Arc::new(SimHostMemory::new());
        let backing = match config.backing {
            HostBacking::Page4K => Backing::Page4K,
            HostBacking::Thp => Backing::Thp,
        };
        let hva = host
            .mmap(config.bytes, backing, true)
            .map_err(vmmu_err("host mmap"))?;
        let vm_config = VmConfig {
            dirty_log: DirtyLogConfig {
                manual_protect: config.log == DirtyLog::GetClear,
                ring_size: (config.log == DirtyLog::Ring).then_some(RING_ENTRIES),
                ..DirtyLogConfig::default()
            },
            ..vm_config
        };
        let vm = Vm::new(vm_config, host);
        let flags = if config.log == DirtyLog::Off {
            MemslotFlags::empty()
        } else {
            MemslotFlags::LOG_DIRTY_PAGES
        };
        vm.set_user_memory_region(MemoryRegion {
            slot: DATA_SLOT,
            flags,
            guest_phys_addr: DATA_GPA,
            memory_size: config.bytes,
            userspace_addr: hva.0,
        })
        .map_err(vmmu_err("set_user_memory_region"))?;
        let vcpu = vm.create_vcpu().map_err(vmmu_err("create_vcpu"))?;
        Ok(VmmuGuest {
            vcpu,
            vm,
            hva: hva.0,
            present: true,
            config: *config,
            entries: Vec::with_capacity(if config.log == DirtyLog::Ring {
                RING_ENTRIES as usize
            } else {
                0
            }),
        })
    }

    /// The VM, to look inside (stats, audit).
    pub fn vm(&self) -> &Vm<Arc<SimHostMemory>> {
        &self.vm
    }
}

impl Peer for VmmuGuest {
    fn name(&self) -> &'static str {
        "vmmu"
    }

    fn config(&self) -> &SlotConfig {
        &self.config
    }

    fn run(&mut self, schedule: &Schedule) -> Result<Duration, Error> {
        let start = Instant::now();
        for page in schedule.pages() {
            let gpa = Gpa(DATA_GPA + page * 4096);
            self.vm
                .write(&mut self.vcpu, gpa)
                .map_err(vmmu_err("guest write"))?;
        }
        Ok(start.elapsed())
    }

    fn get_dirty_log(&mut self, out: &mut [u64]) -> Result<Duration, Error> {
        let start = Instant::now();
        let r = self.vm.get_dirty_log(DATA_SLOT, out);
        let elapsed = start.elapsed();
        r.map_err(vmmu_err("get_dirty_log"))?;
        Ok(elapsed)
    }

    fn clear_dirty_log(
        &mut self,
        first_page: u64,
        num_pages: u64,
        bitmap: &[u64],
    ) -> Result<Duration, Error> {
        let start = Instant::now();
        let r = self
            .vm
            .clear_dirty_log(DATA_SLOT, first_page, num_pages, bitmap);
        let elapsed = start.elapsed();
        r.map_err(vmmu_err("clear_dirty_log"))?;
        Ok(elapsed)
    }

    fn harvest_ring(&mut self, out: &mut [u64]) -> Result<Duration, Error> {
        self.entries.clear();
        let start = Instant::now();
        let r = self.vm.harvest_dirty_ring(self.vcpu.id, &mut self.entries);
        for e in &self.entries {
            if e.slot == DATA_SLOT {
                out[(e.offset / 64) as usize] |= 1 << (e.offset % 64);
            }
        }
        let reset = r.and_then(|_| self.vm.reset_dirty_rings());
        let elapsed = start.elapsed();
        reset.map_err(vmmu_err("harvest_dirty_ring and reset_dirty_rings"))?;
        Ok(elapsed)
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<Duration, Error> {
        assert!(self.present, "the data slot was deleted");
        let region = MemoryRegion {
            slot: DATA_SLOT,
            flags: if on {
                MemslotFlags::LOG_DIRTY_PAGES
            } else {
                MemslotFlags::empty()
            },
            guest_phys_addr: DATA_GPA,
            memory_size: self.config.bytes,
            userspace_addr: self.hva,
        };
        let start = Instant::now();
        let r = self.vm.set_user_memory_region(region);
        let elapsed = start.elapsed();
        r.map_err(vmmu_err("set_user_memory_region (flags)"))?;
        Ok(elapsed)
    }

    fn delete_slot(&mut self) -> Result<Duration, Error> {
        if !self.present {
            return Ok(Duration::ZERO);
        }
        let region = MemoryRegion {
            slot: DATA_SLOT,
            flags: MemslotFlags::empty(),
            guest_phys_addr: DATA_GPA,
            memory_size: 0,
            userspace_addr: self.hva,
        };
        let start = Instant::now();
        let r = self.vm.set_user_memory_region(region);
        let elapsed = start.elapsed();
        r.map_err(vmmu_err("set_user_memory_region (delete)"))?;
        self.present = false;
        Ok(elapsed)
    }
}
