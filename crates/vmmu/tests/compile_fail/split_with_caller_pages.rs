//! Issue 13, finding 3: `split_huge_pages` linked pages the caller supplied into the live
//! tables. It is crate-private in every build (the VM allocates the pages itself).
//! expect: E0603 E0599 E0624
//! modes: default internals
use std::sync::Arc;
use vmmu::host::SimHostMemory;
use vmmu::types::Gfn;
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
        let mut pages = Vec::new();
        let _ = m.split_huge_pages(Gfn(0), Gfn(512), &mut pages, &vmmu::tdp::pin());
    });
}
