//! A vCPU is tied to the VM that created it (issue 13, finding 1): every `Vm` method that
//! takes a vCPU refuses one of another VM with `Error::ForeignVcpu` and changes nothing.
//!
//! Before the tie, a vCPU outlived its VM: used on a second VM after the first was
//! dropped, a read returned a translation from the dead VM's TLB and a read of another
//! 2 MiB page walked the freed root (SIGSEGV); one VM's dirty entries landed in another
//! VM's rings; foreign shadow-paging root references reached the root counts.

mod paging;

use std::sync::Arc;

use vmmu::guest::PagingState;
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, ErrorCode, Gpa, Gva, Level};
use vmmu::{DirtyLogConfig, Error, Exit, MemoryRegion, MemslotFlags, Vcpu, Vm, VmConfig};
use vmmu_testing::view::{snapshot, SimVm};
use vmmu_testing::MMUS;

use paging::{Guest, UP};

const G1: u64 = 1 << 30;
const M2: u64 = 2 << 20;

/// A VM with one 8 MiB THP slot at 1 GiB (logging when `log`).
fn vm(mmu: vmmu::MmuKind, dirty_log: DirtyLogConfig, log: bool) -> SimVm {
    let host = Arc::new(SimHostMemory::new());
    let hva = host.mmap(4 * M2, Backing::Thp, true).unwrap();
    let vm = Vm::new(
        VmConfig {
            mmu,
            dirty_log,
            ..VmConfig::default()
        },
        host,
    );
    let flags = if log {
        MemslotFlags::LOG_DIRTY_PAGES
    } else {
        MemslotFlags::empty()
    };
    vm.set_user_memory_region(MemoryRegion {
        slot: 0,
        flags,
        guest_phys_addr: G1,
        memory_size: 4 * M2,
        userspace_addr: hva.0,
    })
    .unwrap();
    vm
}

/// Every guest-physical call `vm` offers, given `foreign`: each is refused with
/// `ForeignVcpu` and leaves `vm` (with its own vCPUs `own`) exactly as it was.
#[track_caller]
fn refuses_every_gpa_call(vm: &SimVm, own: &[Vcpu], foreign: &mut Vcpu, what: &str) {
    let want = Error::ForeignVcpu { vcpu: foreign.id };
    let before = snapshot(vm, own);
    let counters = (foreign.accesses, foreign.exits, foreign.root());
    for gpa in [Gpa(G1), Gpa(G1 + M2 + 0x123), Gpa(G1 + 3 * M2)] {
        assert_eq!(
            vm.read(foreign, gpa),
            Err(Exit::Error(want.clone())),
            "{what}"
        );
        assert_eq!(
            vm.write(foreign, gpa),
            Err(Exit::Error(want.clone())),
            "{what}"
        );
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            assert_eq!(
                vm.access(foreign, gpa, kind),
                Err(Exit::Error(want.clone())),
                "{what}"
            );
        }
        assert_eq!(
            vm.page_fault(foreign, gpa, ErrorCode::WRITE),
            Err(want.clone()),
            "{what}"
        );
    }
    assert_eq!(
        (foreign.accesses, foreign.exits, foreign.root()),
        counters,
        "{what}: the vCPU was not run"
    );
    let after = snapshot(vm, own);
    assert!(
        after == before,
        "{what}: refused, but changed the VM: {}",
        vmmu_testing::interp::diff(&before, &after)
    );
    vm.audit().unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// The reproducer: a vCPU of a dropped VM, used on another VM, is refused (it
/// used to read the dead VM's TLB, then walk its freed root).
#[test]
fn a_vcpu_of_a_dropped_vm_is_refused() {
    if vmmu_testing::skip_rerun("a_vcpu_of_a_dropped_vm_is_refused") {
        return;
    }
    for &(name, mmu) in MMUS {
        let b = vm(mmu, DirtyLogConfig::default(), false);
        let mut own = vec![b.create_vcpu().unwrap()];
        b.write(&mut own[0], Gpa(G1 + 2 * M2)).unwrap();
        let mut stray = {
            let a = vm(mmu, DirtyLogConfig::default(), false);
            let mut v = a.create_vcpu().unwrap();
            // A write through it: its TLB now caches a translation of A's.
            a.write(&mut v, Gpa(G1)).unwrap();
            a.read(&mut v, Gpa(G1)).unwrap();
            v
        };
        refuses_every_gpa_call(&b, &own, &mut stray, name);
        assert_eq!(
            b.release_vcpu(stray),
            Err(Error::ForeignVcpu { vcpu: 0 }),
            "{name}"
        );
        // B's own vCPU still runs.
        b.read(&mut own[0], Gpa(G1 + 2 * M2 + 8)).unwrap();
        b.audit().unwrap();
    }
}

/// Both VMs alive: a vCPU of one is refused by the other, both ways, and each VM keeps
/// working with its own vCPUs.
#[test]
fn a_vcpu_of_a_live_vm_is_refused_by_another() {
    if vmmu_testing::skip_rerun("a_vcpu_of_a_live_vm_is_refused_by_another") {
        return;
    }
    for &(name, mmu) in MMUS {
        let a = vm(mmu, DirtyLogConfig::default(), false);
        let b = vm(mmu, DirtyLogConfig::default(), false);
        let mut va = vec![a.create_vcpu().unwrap()];
        let mut vb = vec![b.create_vcpu().unwrap()];
        a.write(&mut va[0], Gpa(G1)).unwrap();
        b.write(&mut vb[0], Gpa(G1 + M2)).unwrap();
        refuses_every_gpa_call(&b, &vb, &mut va[0], name);
        refuses_every_gpa_call(&a, &va, &mut vb[0], name);
        a.read(&mut va[0], Gpa(G1 + 8)).unwrap();
        b.read(&mut vb[0], Gpa(G1 + M2 + 8)).unwrap();
        a.release_vcpu(va.pop().unwrap()).unwrap();
        b.release_vcpu(vb.pop().unwrap()).unwrap();
        a.audit().unwrap();
        b.audit().unwrap();
    }
}

/// One VM's dirty pages never land in another VM's rings: a write through a foreign
/// vCPU to a logging slot is refused, and neither VM's ring holds an entry for it.
#[test]
fn dirty_entries_stay_in_their_own_vms_rings() {
    if vmmu_testing::skip_rerun("dirty_entries_stay_in_their_own_vms_rings") {
        return;
    }
    let rings = DirtyLogConfig {
        ring_size: Some(64),
        ..DirtyLogConfig::default()
    };
    for &(name, mmu) in MMUS {
        let a = vm(mmu, rings, true);
        let b = vm(mmu, rings, true);
        let mut va = vec![a.create_vcpu().unwrap()];
        let mut vb = vec![b.create_vcpu().unwrap()];
        // Map both slots (reads leave the pages write-protected while logging).
        a.read(&mut va[0], Gpa(G1)).unwrap();
        b.read(&mut vb[0], Gpa(G1)).unwrap();
        refuses_every_gpa_call(&b, &vb, &mut va[0], name);
        refuses_every_gpa_call(&a, &va, &mut vb[0], name);
        let mut got = Vec::new();
        assert_eq!(a.harvest_dirty_ring(0, &mut got), Ok(0), "{name}: A's ring");
        assert_eq!(b.harvest_dirty_ring(0, &mut got), Ok(0), "{name}: B's ring");
        // Each VM's own write lands in its own ring, once.
        b.write(&mut vb[0], Gpa(G1 + 5 * 4096)).unwrap();
        assert_eq!(a.harvest_dirty_ring(0, &mut got), Ok(0), "{name}: A's ring");
        assert_eq!(b.harvest_dirty_ring(0, &mut got), Ok(1), "{name}: B's ring");
        assert_eq!((got[0].slot, got[0].offset), (0, 5), "{name}");
        a.audit().unwrap();
        b.audit().unwrap();
    }
}

const PML4: u64 = 0x1000;

/// A shadow-paging guest with a data slot at 1 GiB and one page mapped at `VA`.
const VA: Gva = Gva(0x40_0000_0000);

fn paging_guest() -> Guest {
    let mut g = Guest::new(VmConfig::default());
    assert_eq!(g.table(), PML4);
    g.add_slot(1, G1, 4 * M2, Backing::Thp, MemslotFlags::empty());
    g.map(PML4, VA, G1, UP, Level::L4K);
    g
}

/// Shadow paging: a foreign vCPU's root references never reach this VM's root counts
/// (a `release_vcpu` or root switch of a foreign vCPU used to drop references on this
/// VM's roots by the other VM's root ids); every paging call refuses it.
#[test]
fn foreign_roots_never_reach_shadow_paging_root_counts() {
    let a = paging_guest();
    let b = paging_guest();
    let mut va = a.vcpu(PML4);
    let mut vb = b.vcpu(PML4);
    assert_eq!(a.vm.gva_read_u64(&mut va, VA), Ok(0));
    assert_eq!(b.vm.gva_read_u64(&mut vb, VA), Ok(0));
    let want = Error::ForeignVcpu { vcpu: 0 };
    for (g, foreign) in [(&b, &mut va), (&a, &mut vb)] {
        let before = (g.vm.stats(), foreign.paging(), foreign.root());
        let vm = &g.vm;
        let state = PagingState {
            cr3: Gpa(PML4),
            ..PagingState::default()
        };
        assert_eq!(vm.set_paging(foreign, state), Err(want.clone()));
        assert_eq!(vm.load_cr3(foreign, Gpa(PML4)), Err(want.clone()));
        assert_eq!(vm.invlpg(foreign, VA), Err(want.clone()));
        assert_eq!(vm.flush_guest_tlb(foreign), Err(want.clone()));
        assert_eq!(
            vm.gva_access(foreign, VA, AccessKind::Write),
            Err(Exit::Error(want.clone()))
        );
        assert_eq!(vm.gva_read_u64(foreign, VA), Err(Exit::Error(want.clone())));
        assert_eq!(
            vm.gva_write_u64(foreign, VA, 7),
            Err(Exit::Error(want.clone()))
        );
        // Refused before the alignment check: the vCPU is the first thing looked at.
        assert_eq!(
            vm.gva_read_u64(foreign, Gva(VA.0 + 4)),
            Err(Exit::Error(want.clone()))
        );
        assert_eq!(
            (g.vm.stats(), foreign.paging(), foreign.root()),
            before,
            "refused calls changed nothing"
        );
        g.audit();
    }
    // A stray release: refused, this VM's root counts untouched.
    let stray = a.vcpu(PML4);
    let shadow_pages = b.vm.stats().shadow_pages;
    assert_eq!(
        b.vm.release_vcpu(stray),
        Err(Error::ForeignVcpu { vcpu: 1 })
    );
    assert_eq!(b.vm.stats().shadow_pages, shadow_pages);
    b.audit();
    // Each VM's roots are freed when its own vCPUs let go of them, and only then.
    for (g, v) in [(&a, va), (&b, vb)] {
        g.vm.reclaim_shadow_pages(usize::MAX);
        assert!(g.vm.stats().shadow_pages > 0, "held roots survive the zap");
        g.vm.release_vcpu(v).unwrap();
        g.audit();
    }
    // A's stray vCPU was dropped by B without releasing: its root in A stays held.
    assert!(
        a.vm.stats().shadow_pages > 0,
        "the stray vCPU's root is still held"
    );
    assert_eq!(b.vm.stats().shadow_pages, 0, "released roots are freed");
}
