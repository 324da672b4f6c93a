//! The control: an embedder's program over the default surface (a VM, a memslot, a vCPU,
//! accesses, the dirty log, the audit) compiles in every build.
//! modes: default internals
use std::sync::Arc;
use vmmu::host::{Backing, HostMemory, SimHostMemory};
use vmmu::table::{HeapTableAllocator, TableAllocator};
use vmmu::types::Gpa;
use vmmu::{
    AuditReport, DirtyLogConfig, Error, Exit, MemoryRegion, MemslotFlags, MemslotLimits,
    MmuKind, TdpIteration, Vcpu, Vm, VmConfig, VmStats,
};

pub fn embedder() -> Result<(), Exit> {
    let host = Arc::new(SimHostMemory::new());
    let hva = host.mmap(4 << 20, Backing::Thp, true).unwrap();
    let _ = host.translate(hva);
    let config = VmConfig {
        mmu: MmuKind::Tdp(TdpIteration::UsedEntries),
        limits: MemslotLimits::default(),
        dirty_log: DirtyLogConfig::default(),
        ..VmConfig::default()
    };
    let vm = Vm::with_allocator(config, host.clone(), Arc::new(HeapTableAllocator::new()))?;
    vm.set_user_memory_region(MemoryRegion {
        slot: 0,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        guest_phys_addr: 1 << 30,
        memory_size: 4 << 20,
        userspace_addr: hva.0,
    })?;
    let mut vcpu: Vcpu = vm.create_vcpu()?;
    vm.write(&mut vcpu, Gpa(1 << 30))?;
    let mut bitmap = vec![0u64; 16];
    vm.get_dirty_log(0, &mut bitmap)?;
    let _: VmStats = vm.stats();
    let _: AuditReport = vm.audit().unwrap();
    let _ = vm.allocator().live();
    vm.release_vcpu(vcpu)?;
    let e: Error = Error::OutOfTableMemory;
    let _ = e.to_string();
    fn frames<A: TableAllocator>(a: &A) -> Option<vmmu::types::Pfn> {
        a.alloc_table()
    }
    let _ = frames(&HeapTableAllocator::new());
    Ok(())
}
