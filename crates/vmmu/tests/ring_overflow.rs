//! Dirty-ring overflow (issue 13, finding 6): on a 4-entry ring, through every public path
//! that logs, a write is never made writable without its ring entry, and no push ever finds
//! the ring full. A path that cannot log refuses first: `Exit::DirtyRingFull` from an
//! access, `Error::DirtyRingFull` from `Vm::page_fault`. After a harvest and a reset the
//! vCPU makes progress again. Run in debug (where a lost push used to panic) and in
//! release (where it used to drop the entry).
//!
//! Paths: the locked fault (`Vm::page_fault` and the fault of `Vm::access`), the lockless
//! fast path (a write to a page a reset write-protected), and under shadow paging the
//! fault of `Vm::gva_write_u64` and the emulated write to a guest page table.

use std::collections::BTreeSet;
use std::sync::Arc;

use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, ErrorCode, Gpa, Gva, PAGE_SIZE};
use vmmu::{
    DirtyGfn, DirtyLogConfig, Error, Exit, FaultOutcome, MemoryRegion, MemslotFlags, MmuKind,
    PagingConfig, Vcpu, Vm, VmConfig,
};
use vmmu_testing::view::{read_tables, SimVm};
use vmmu_testing::MMUS;

const RING: u32 = 4;
const G1: u64 = 1 << 30;
const PAGES: u64 = 64;

fn ring_config(mmu: MmuKind) -> VmConfig {
    VmConfig {
        mmu,
        dirty_log: DirtyLogConfig {
            ring_size: Some(RING),
            ..DirtyLogConfig::default()
        },
        ..VmConfig::default()
    }
}

/// A VM with a 4-entry ring per vCPU and one logging slot of `PAGES` 4K pages at 1 GiB.
fn ring_vm(mmu: MmuKind) -> SimVm {
    let host = Arc::new(SimHostMemory::new());
    let hva = host.mmap(PAGES * PAGE_SIZE, Backing::Page4K, true).unwrap();
    let vm = Vm::new(ring_config(mmu), host);
    vm.set_user_memory_region(MemoryRegion {
        slot: 0,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        guest_phys_addr: G1,
        memory_size: PAGES * PAGE_SIZE,
        userspace_addr: hva.0,
    })
    .unwrap();
    vm
}

fn gpa(page: u64) -> Gpa {
    Gpa(G1 + page * PAGE_SIZE)
}

/// The pages of the slot whose leaves are writable now.
fn writable_pages(vm: &SimVm, vcpu: &Vcpu) -> BTreeSet<u64> {
    read_tables(vm, [vcpu], &[])
        .entries
        .iter()
        .filter(|e| !e.spte.is_mmio() && e.spte.is_writable())
        .map(|e| e.gfn - G1 / PAGE_SIZE)
        .collect()
}

/// Harvest vCPU 0's ring: the pages of its entries, in order.
fn harvest(vm: &SimVm) -> Vec<u64> {
    let mut out = Vec::new();
    vm.harvest_dirty_ring(0, &mut out).unwrap();
    out.iter()
        .map(|&DirtyGfn { slot, offset }| {
            assert_eq!(slot, 0);
            offset
        })
        .collect()
}

/// `Vm::page_fault`, the public fault handler, never checked the ring: the fifth logged
/// fault panicked in debug and in release made its page writable with no entry.
#[test]
fn page_fault_refuses_before_the_ring_overflows() {
    if vmmu_testing::skip_rerun("page_fault_refuses_before_the_ring_overflows") {
        return;
    }
    for &(name, mmu) in MMUS {
        let vm = ring_vm(mmu);
        let vcpu = vm.create_vcpu().unwrap();
        let mut logged = Vec::new();
        for p in 0..2 * u64::from(RING) {
            match vm.page_fault(&vcpu, gpa(p), ErrorCode::for_access(AccessKind::Write)) {
                Ok(FaultOutcome::Mapped(_)) => logged.push(p),
                Err(Error::DirtyRingFull { vcpu: 0 }) => {}
                other => panic!("{name}: write fault on page {p}: {other:?}"),
            }
        }
        assert_eq!(
            logged.len() as u32,
            RING - 1,
            "{name}: faults logged until the ring was soft-full, then refused"
        );
        assert!(vcpu.dirty_ring_soft_full(), "{name}");
        assert_eq!(
            writable_pages(&vm, &vcpu),
            logged.iter().copied().collect(),
            "{name}: a page was made writable without its ring entry"
        );
        assert_eq!(harvest(&vm), logged, "{name}: the ring's entries");
        // A read fault, which logs nothing, is refused too while the ring is full: the
        // vCPU could not have run to take it.
        assert_eq!(
            vm.page_fault(&vcpu, gpa(40), ErrorCode::for_access(AccessKind::Read)),
            Err(Error::DirtyRingFull { vcpu: 0 }),
            "{name}"
        );
        vm.reset_dirty_rings().unwrap();
        assert_eq!(
            vm.page_fault(&vcpu, gpa(50), ErrorCode::for_access(AccessKind::Write)),
            Ok(FaultOutcome::Mapped(vmmu::types::Level::L4K)),
            "{name}: after the reset"
        );
        assert_eq!(harvest(&vm), [50], "{name}");
        vm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// `Vm::access`: its fault logs, and a write to a page a reset protected goes through
/// the lockless fast path, which logs too. Neither runs past soft-full.
#[test]
fn access_and_fast_path_exit_before_the_ring_overflows() {
    if vmmu_testing::skip_rerun("access_and_fast_path_exit_before_the_ring_overflows") {
        return;
    }
    for &(name, mmu) in MMUS {
        let vm = ring_vm(mmu);
        let mut vcpu = vm.create_vcpu().unwrap();
        for round in 0..3 {
            // Round 0 faults the pages in; rounds 1 and 2 write pages the reset before
            // protected again (the fast path), plus new ones.
            let mut done = BTreeSet::new();
            for p in 0..2 * u64::from(RING) {
                match vm.write(&mut vcpu, gpa(p)) {
                    Ok(_) => {
                        done.insert(p);
                    }
                    // The write that fills the ring to soft-full exits too, after its
                    // fault logged it (as KVM exits after the fault); the guest retries.
                    Err(Exit::DirtyRingFull) => {}
                    Err(e) => panic!("{name}: round {round}: write of page {p}: {e:?}"),
                }
            }
            let entries = harvest(&vm);
            assert_eq!(entries.len() as u32, RING - 1, "{name}: round {round}");
            let logged: BTreeSet<u64> = entries.iter().copied().collect();
            assert_eq!(logged.len(), entries.len(), "{name}: round {round}");
            assert!(done.is_subset(&logged), "{name}: round {round}: {done:?}");
            assert_eq!(
                writable_pages(&vm, &vcpu),
                logged,
                "{name}: round {round}: a page was made writable without its ring entry"
            );
            vm.reset_dirty_rings().unwrap();
            assert!(writable_pages(&vm, &vcpu).is_empty(), "{name}");
            vm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(
            vm.stats().fast_page_faults > 0,
            "{name}: the fast path was not taken"
        );
    }
}

/// Shadow paging: the guest's writes fault (and log) through `gva_write_u64`, and a write
/// to a guest page table is emulated (and logs the table's page). A guest with its tables
/// and data in one logging slot; a gva maps the PD itself, so the guest can write it.
#[test]
fn shadow_paging_fault_and_emulated_write_exit_before_the_ring_overflows() {
    const DATA: u64 = 0x10_0000;
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    let host = Arc::new(SimHostMemory::new());
    let mem = Arc::new(SimGuestMemory::new(16 << 20));
    let hva = host.mmap(16 << 20, Backing::Page4K, true).unwrap();
    let config = VmConfig {
        paging: PagingConfig {
            unsync: false,
            ..PagingConfig::default()
        },
        ..ring_config(MmuKind::ShadowPaging)
    };
    let vm = Vm::new_paging(config, host, mem.clone());
    vm.set_user_memory_region(MemoryRegion {
        slot: 0,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: 16 << 20,
        userspace_addr: hva.0,
    })
    .unwrap();
    // gva page i (i < 16) maps DATA + i pages; gva page 16 maps the PD.
    let up = pte::P | pte::RW;
    mem.write_u64(Gpa(PML4), PDPT | up).unwrap();
    mem.write_u64(Gpa(PDPT), PD | up).unwrap();
    mem.write_u64(Gpa(PD), PT | up).unwrap();
    for i in 0..16u64 {
        mem.write_u64(Gpa(PT + i * 8), (DATA + i * PAGE_SIZE) | up)
            .unwrap();
    }
    mem.write_u64(Gpa(PT + 16 * 8), PD | up).unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    vm.set_paging(
        &mut vcpu,
        PagingState {
            cr3: Gpa(PML4),
            ..PagingState::default()
        },
    )
    .unwrap();
    let harvest = |vm: &Vm<Arc<SimHostMemory>>| {
        let mut out = Vec::new();
        vm.harvest_dirty_ring(0, &mut out).unwrap();
        out.iter().map(|e| e.offset).collect::<Vec<_>>()
    };
    // Faults: each write to a new data page logs it (the one that fills the ring to
    // soft-full exits after its fault logged it).
    let mut done = Vec::new();
    for i in 0..8u64 {
        match vm.gva_write_u64(&mut vcpu, Gva(i * PAGE_SIZE), i) {
            Ok(()) => done.push(DATA / PAGE_SIZE + i),
            Err(Exit::DirtyRingFull) => {}
            Err(e) => panic!("write of data page {i}: {e:?}"),
        }
    }
    let entries = harvest(&vm);
    assert_eq!(entries.len() as u32, RING - 1);
    assert!(entries.starts_with(&done), "{entries:?} {done:?}");
    assert_eq!(
        entries,
        (0..u64::from(RING - 1))
            .map(|i| DATA / PAGE_SIZE + i)
            .collect::<Vec<_>>()
    );
    vm.reset_dirty_rings().unwrap();
    vm.audit().unwrap_or_else(|e| panic!("{e}"));
    // Emulated writes to the PD (an unused entry): each logs the PD's page.
    let entry = Gva(16 * PAGE_SIZE + 511 * 8);
    let mut emulated = 0;
    let mut exits = 0;
    for k in 0..8u64 {
        match vm.gva_write_u64(&mut vcpu, entry, 0) {
            Ok(()) => emulated += 1,
            Err(Exit::DirtyRingFull) => exits += 1,
            Err(e) => panic!("emulated write {k}: {e:?}"),
        }
    }
    assert_eq!((emulated, exits), (RING - 1, 8 - (RING - 1)));
    assert_eq!(harvest(&vm), vec![PD / PAGE_SIZE; (RING - 1) as usize]);
    assert!(vm.stats().paging.emulated_writes >= u64::from(RING - 1));
    vm.reset_dirty_rings().unwrap();
    assert_eq!(vm.gva_write_u64(&mut vcpu, entry, 0), Ok(()));
    assert_eq!(vm.gva_write_u64(&mut vcpu, Gva(0), 7), Ok(()));
    assert_eq!(mem.read_u64(Gpa(DATA)).unwrap(), 7);
    vm.audit().unwrap_or_else(|e| panic!("{e}"));
}
