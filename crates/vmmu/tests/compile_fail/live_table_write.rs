//! Issue 13, finding 3: live tables were writable from safe code: a non-leaf SPTE with a
//! made-up frame written into the root, then a flush and a guest read walked into memory
//! that is no table (SIGSEGV in the EPT walk). `Vm::with_tdp` and the table writes are
//! internals.
//! expect: E0603 E0599 E0624
//! modes: default
use std::sync::Arc;
use vmmu::host::SimHostMemory;
use vmmu::{MmuKind, TdpIteration, Vm, VmConfig};

pub fn reproducer() {
    let vm = Vm::new(
        VmConfig {
            mmu: MmuKind::Tdp(TdpIteration::ScanAll),
            ..VmConfig::default()
        },
        Arc::new(SimHostMemory::new()),
    );
    vm.with_tdp(|_, m| {
        let guard = vmmu::tdp::pin();
        let root = m.root(&guard);
        root.table().set(0, vmmu::spte::Spte(0xdead_b000 | 7));
    });
}
