//! Issue 13, finding 3: the same through the shadow MMU (`Vm::with_mmu`): a shadow page's
//! table was writable from safe code.
//! expect: E0599 E0624
//! modes: default
use std::sync::Arc;
use vmmu::host::SimHostMemory;
use vmmu::{Vm, VmConfig};

pub fn reproducer() {
    let vm = Vm::new(VmConfig::default(), Arc::new(SimHostMemory::new()));
    vm.with_mmu(|_, m| {
        let (_, page) = m.pages().iter().next().unwrap();
        page.table().swap(0, page.table().get(0));
    });
}
