//! Issue 13, finding 3: `TdpMmu::map` took any `&TdpPage` as the root, so a fault could
//! be installed under another VM's root (and its tables retired through this VM's
//! allocator). It is crate-private in every build.
//! expect: E0603 E0599 E0624
//! modes: default internals
use std::sync::Arc;
use vmmu::host::SimHostMemory;
use vmmu::types::{ErrorCode, Gpa};
use vmmu::{MmuKind, TdpIteration, Vm, VmConfig};

pub fn reproducer() {
    let config = VmConfig {
        mmu: MmuKind::Tdp(TdpIteration::ScanAll),
        ..VmConfig::default()
    };
    let host = Arc::new(SimHostMemory::new());
    let a = Vm::new(config, host.clone());
    let b = Vm::new(config, host.clone());
    a.with_tdp(|slots, ma| {
        b.with_tdp(|_, mb| {
            let g = vmmu::tdp::pin();
            let _ = ma.map(slots, &*host, mb.root(&g), Gpa(0), ErrorCode::WRITE, &g);
        })
    });
}
