//! Issue 13, finding 4: `TdpMmu::root/roots` accepted a guard of any crossbeam-epoch
//! collector, which does not hold back the TDP MMU's frees: the root could be freed and
//! its frame handed out again while the caller held `&TdpPage`. They take a
//! `tdp::EpochGuard`, which only `tdp::pin()` makes, in every build.
//! expect: E0603 E0599 E0308
//! modes: default internals
extern crate crossbeam_epoch;

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
    let collector = crossbeam_epoch::Collector::new();
    let handle = collector.register();
    let foreign = handle.pin();
    vm.with_tdp(|_, m| {
        let _ = m.root(&foreign).level;
        let _ = m.roots(&foreign).count();
    });
}
