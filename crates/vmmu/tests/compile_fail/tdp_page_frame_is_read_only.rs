//! Issue 13, finding 3: `TdpPage.frame` was a public field; the frame a page frees is its
//! own, so it is read through `frame()` only.
//! expect: E0603 E0599 E0616
//! modes: default internals
use std::sync::Arc;
use vmmu::host::SimHostMemory;
use vmmu::types::Pfn;
use vmmu::{MmuKind, TdpIteration, Vm, VmConfig};

pub fn reproducer() {
    let vm = Vm::new(
        VmConfig {
            mmu: MmuKind::Tdp(TdpIteration::ScanAll),
            ..VmConfig::default()
        },
        Arc::new(SimHostMemory::new()),
    );
    let _: Pfn = vm.with_tdp(|_, m| m.root(&vmmu::tdp::pin()).frame);
}
