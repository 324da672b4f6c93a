//! Limits on sizes a caller gives (issue 13, finding 8): each gets a typed error before
//! anything is allocated, and the VM is left as it was.

use std::sync::Arc;

use vmmu::host::{Backing, SimHostMemory};
use vmmu::memslot::MAX_SLOT_PAGES;
use vmmu::{Error, MemoryRegion, MemslotFlags, Vm, VmConfig};

/// A 2^48-byte slot (2^36 pages) used to allocate 256 GiB of reverse maps and abort.
#[test]
fn a_slot_beyond_kvm_mem_max_nr_pages_is_refused() {
    let host = Arc::new(SimHostMemory::new());
    let vm = Vm::new(VmConfig::default(), host.clone());
    let region = |size: u64| MemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0x1000_0000_0000,
    };
    assert_eq!(
        vm.set_user_memory_region(region(1 << 48)),
        Err(Error::SlotTooLarge {
            slot: 0,
            pages: 1 << 36,
            max: MAX_SLOT_PAGES,
        })
    );
    assert_eq!(
        vm.set_user_memory_region(region((MAX_SLOT_PAGES + 1) << 12)),
        Err(Error::SlotTooLarge {
            slot: 0,
            pages: MAX_SLOT_PAGES + 1,
            max: MAX_SLOT_PAGES,
        })
    );
    assert_eq!(vm.with_mmu(|s, _| (s.len(), s.generation())), (0, 0));
    // A slot at the limit is fine to check; a real one works as before.
    let hva = host.mmap(2 << 20, Backing::Page4K, true).unwrap();
    vm.set_user_memory_region(MemoryRegion {
        userspace_addr: hva.0,
        ..region(2 << 20)
    })
    .unwrap();
    vm.audit().unwrap();
}
