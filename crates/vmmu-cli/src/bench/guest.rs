//! The guest most scenarios start from: one VM, one vCPU, one memslot of `--mem-gib` GiB
//! backed by simulated host memory.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gpa, Hva, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{Exit, MemoryRegion, MemslotFlags, MmuKind, TdpIteration, Vm, VmConfig};

use super::names::tdp;
use super::{params, BenchConfig, BenchError, Context};

/// Guest-physical address of the slot: above 4 GiB, as a VMM places high memory.
const SLOT_GPA: u64 = 1 << 32;
/// The slot every scenario uses.
pub const SLOT: u32 = 0;

/// How the host backs the slot, as the `backing` param names it.
#[derive(Clone, Copy, Debug)]
pub enum HostBacking {
    /// 4 KiB host pages: the MMU can only map 4 KiB.
    Page4K,
    /// Transparent huge pages: the MMU may map 2 MiB.
    Thp,
}

impl HostBacking {
    /// Backings that `fault-in` and `zap` compare.
    pub const ALL: [HostBacking; 2] = [HostBacking::Page4K, HostBacking::Thp];

    /// Value of the `backing` param.
    pub fn name(self) -> &'static str {
        match self {
            HostBacking::Page4K => "4k",
            HostBacking::Thp => "2m",
        }
    }

    /// The `params` of a record measured on this backing: `backing` and `mem_gib`.
    pub fn params(self, config: &BenchConfig) -> Map<String, Value> {
        params([
            ("backing", json!(self.name())),
            ("mem_gib", json!(config.mem_gib)),
        ])
    }

    fn backing(self) -> Backing {
        match self {
            HostBacking::Page4K => Backing::Page4K,
            HostBacking::Thp => Backing::Thp,
        }
    }
}

/// The TDP MMU's iteration modes with their variant names (seed 002).
pub const TDP_MODES: [(TdpIteration, &str); 3] = [
    (TdpIteration::ScanAll, tdp::SCAN_ALL),
    (TdpIteration::SkipNonPresent, tdp::SKIP_NON_PRESENT),
    (TdpIteration::UsedEntries, tdp::USED_ENTRIES),
];

/// The VM type scenarios drive: simulated host memory, tables from the heap.
pub type SimVm = Vm<Arc<SimHostMemory>>;

/// A VM with one memslot, and what is needed to drive it. Dropping it tears the VM and
/// its host memory down.
pub struct Guest {
    /// The VM under test.
    pub vm: SimVm,
    /// The vCPU that performs guest accesses.
    pub vcpu: Vcpu,
    /// Number of 4 KiB pages in the slot.
    pub pages: u64,
    /// The slot as registered (flags included).
    pub region: MemoryRegion,
}

impl Guest {
    /// Maps `--mem-gib` GiB of host memory with `backing` and registers it as slot 0.
    pub fn new(config: &BenchConfig, backing: HostBacking) -> Result<Self, BenchError> {
        Self::with_vm_config(config, backing, VmConfig::default())
    }

    /// As [`Guest::new`], on a VM configured with `vm_config` (algorithms, dirty-log mode).
    pub fn with_vm_config(
        config: &BenchConfig,
        backing: HostBacking,
        vm_config: VmConfig,
    ) -> Result<Self, BenchError> {
        let size = config.mem_bytes();
        let host = Arc::new(SimHostMemory::new());
        let hva = host
            .mmap(size, backing.backing(), true)
            .context("host mmap")?;
        let vm = Vm::new(vm_config, host);
        let region = MemoryRegion {
            slot: SLOT,
            flags: MemslotFlags::empty(),
            guest_phys_addr: SLOT_GPA,
            memory_size: size,
            userspace_addr: hva.0,
        };
        vm.set_user_memory_region(region)
            .context("set_user_memory_region")?;
        let vcpu = vm.create_vcpu().context("create_vcpu")?;
        Ok(Guest {
            vm,
            vcpu,
            pages: size / PAGE_SIZE,
            region,
        })
    }

    /// A VM configuration running the TDP MMU in `mode`.
    pub fn tdp_config(mode: TdpIteration) -> VmConfig {
        VmConfig {
            mmu: MmuKind::Tdp(mode),
            ..VmConfig::default()
        }
    }

    /// Guest-physical address of page `page` of the slot.
    pub fn gpa(&self, page: u64) -> Gpa {
        Gpa(SLOT_GPA + page * PAGE_SIZE)
    }

    /// Host-virtual address of page `page` of the slot.
    pub fn hva(&self, page: u64) -> Hva {
        Hva(self.region.userspace_addr + page * PAGE_SIZE)
    }

    /// Has the guest access page `page` of the slot once (a fault if it is not mapped for
    /// that access).
    pub fn access_page(&mut self, page: u64, kind: AccessKind) -> Result<(), BenchError> {
        let gpa = self.gpa(page);
        self.vm
            .access(&mut self.vcpu, gpa, kind)
            .map(drop)
            .map_err(|exit| exit_error("guest access", exit))
    }

    /// Turns LOG_DIRTY_PAGES on or off for the slot (`KVM_SET_USER_MEMORY_REGION` with the
    /// slot's flags changed). Turning it on write-protects the whole slot.
    pub fn set_logging(&mut self, on: bool) -> Result<(), BenchError> {
        let log = MemslotFlags::LOG_DIRTY_PAGES.bits();
        let bits = (self.region.flags.bits() & !log) | if on { log } else { 0 };
        self.region.flags = MemslotFlags::from_bits(bits).context("memslot flags")?;
        self.vm
            .set_user_memory_region(self.region)
            .context("set_user_memory_region (LOG_DIRTY_PAGES)")
    }

    /// Has the guest write every 4 KiB page of the slot once, in address order. On a fresh
    /// slot each first touch of a mapping faults: EPT violation -> MMU fault -> map -> retry.
    pub fn write_every_page(&mut self) -> Result<(), BenchError> {
        for page in 0..self.pages {
            let gpa = Gpa(SLOT_GPA + page * PAGE_SIZE);
            self.vm
                .access(&mut self.vcpu, gpa, AccessKind::Write)
                .map_err(|exit| exit_error("guest write", exit))?;
        }
        Ok(())
    }
}

/// A guest access that left guest mode for the VMM instead of completing. Inside the slot
/// no exit is expected (a scenario using dirty rings sizes them so none fills), so any one
/// ends the scenario.
fn exit_error(what: &str, exit: Exit) -> BenchError {
    match exit {
        Exit::Error(e) => BenchError::new(format!("{what}: {e}")),
        Exit::Mmio { gpa, .. } => BenchError::new(format!("{what}: unexpected MMIO exit at {gpa}")),
        other => BenchError::new(format!("{what}: unexpected exit: {other}")),
    }
}
