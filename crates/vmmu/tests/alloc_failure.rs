//! Allocation-failure atomicity (issue 13, finding 7): every public operation that
//! allocates tables, run with a [`FailingAllocator`] told to fail from its Nth allocation
//! on, for every N until the operation no longer meets a failure, either succeeds or
//! returns `OutOfTableMemory` with the VM as it was:
//!
//! - the audit passes;
//! - [`view::snapshot`] (every leaf and MMIO SPTE under every root a vCPU may use, the
//!   table count, the slots, the generation, the dirty bitmaps, the counters) is
//!   unchanged. A guest access is the one exception `error.rs` documents: a fault that
//!   fails may have linked empty intermediate tables and counted its exit, so for faults
//!   the translations, slots, generation and bitmaps are compared, not the table count or
//!   the counters;
//! - the same operation then succeeds once memory returns (the next N is that retry on
//!   the same VM: the failed attempt changed nothing, so it is the same operation on the
//!   same state; the last N meets no failure at all).
//!
//! An operation that succeeds although an allocation failed (eager splitting falls back
//! to zapping) gets a fresh VM for the next N, and must leave the audit passing. Every
//! VM's tables all go back to the allocator when it is dropped.
//!
//! Each MMU runs here (the file is skipped in `.ci/run`'s `VMMU_TEST_MMU` reruns).

use std::sync::Arc;

use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gpa, Gva};
use vmmu::{Error, Exit, MemoryRegion, MemslotFlags, MmuKind, TdpIteration, Vcpu, Vm, VmConfig};
use vmmu_testing::view::{self, Snapshot};
use vmmu_testing::FailingAllocator;

type FVm = Vm<Arc<SimHostMemory>, FailingAllocator>;

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

/// Fields drop in order: vCPUs before their VM.
struct Rig {
    vcpus: Vec<Vcpu>,
    vm: FVm,
    host: Arc<SimHostMemory>,
    alloc: Arc<FailingAllocator>,
    guest: Option<Arc<SimGuestMemory>>,
    /// Shadow paging: the next free guest page-table page.
    next_table: u64,
}

impl Rig {
    fn new(mmu: MmuKind) -> Rig {
        let host = Arc::new(SimHostMemory::new());
        let alloc = Arc::new(FailingAllocator::new());
        let config = VmConfig {
            mmu,
            ..VmConfig::default()
        };
        let (vm, guest) = if mmu == MmuKind::ShadowPaging {
            let g = Arc::new(SimGuestMemory::new(4 * G1));
            let vm = Vm::with_guest_memory(config, host.clone(), alloc.clone(), g.clone())
                .expect("a shadow-paging VM");
            (vm, Some(g))
        } else {
            let vm = Vm::with_allocator(config, host.clone(), alloc.clone()).expect("a VM");
            (vm, None)
        };
        let mut rig = Rig {
            vcpus: Vec::new(),
            vm,
            host,
            alloc,
            guest,
            next_table: 0x1000,
        };
        if rig.guest.is_some() {
            // The guest's page tables: slot 0 at [0, 16 MiB).
            rig.slot(0, 0, 16 << 20, Backing::Page4K, MemslotFlags::empty());
        }
        let v = rig.vm.create_vcpu().expect("a vCPU");
        rig.vcpus.push(v);
        rig
    }

    /// Memslot `id` at `gpa`, backed by fresh host memory.
    fn slot(&self, id: u32, gpa: u64, size: u64, backing: Backing, flags: MemslotFlags) {
        let hva = self.host.mmap(size, backing, true).expect("host memory");
        self.vm
            .set_user_memory_region(MemoryRegion {
                slot: id,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: hva.0,
            })
            .expect("a memslot");
    }

    fn region(&self, id: u32) -> MemoryRegion {
        view::with_tables(&self.vm, |slots, _| {
            let s = slots.by_id(id).expect("the slot");
            MemoryRegion {
                slot: id,
                flags: s.flags,
                guest_phys_addr: s.base_gfn.0 << 12,
                memory_size: s.npages << 12,
                userspace_addr: s.userspace_addr.0,
            }
        })
    }

    fn write(&mut self, gpa: u64) -> Result<(), Error> {
        access(&self.vm, &mut self.vcpus[0], gpa, AccessKind::Write)
    }

    /// Shadow paging: map `gva` to `frame` at 4 KiB in the tables under `cr3`, straight in
    /// guest memory.
    fn map(&mut self, cr3: u64, gva: u64, frame: u64) {
        let mem = self.guest.clone().expect("guest memory");
        let mut t = cr3;
        for shift in [39u32, 30, 21] {
            let at = Gpa(t + ((gva >> shift) & 511) * 8);
            let e = mem.read_u64(at).unwrap();
            t = if e & pte::P != 0 {
                e & pte::ADDR_MASK
            } else {
                let n = self.next_table;
                self.next_table += 0x1000;
                mem.write_u64(at, n | pte::P | pte::RW | pte::US).unwrap();
                n
            };
        }
        let at = Gpa(t + ((gva >> 12) & 511) * 8);
        mem.write_u64(at, frame | pte::P | pte::RW | pte::US)
            .unwrap();
    }

    /// A fresh guest page-table root page.
    fn table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += 0x1000;
        t
    }

    fn set_cr3(&mut self, cr3: u64) -> Result<(), Error> {
        let state = PagingState {
            cr3: Gpa(cr3),
            ..PagingState::default()
        };
        self.vm.set_paging(&mut self.vcpus[0], state)
    }

    fn gva_write(&mut self, gva: u64) -> Result<(), Error> {
        match self
            .vm
            .gva_access(&mut self.vcpus[0], Gva(gva), AccessKind::Write)
        {
            Ok(_) => Ok(()),
            Err(Exit::Error(e)) => Err(e),
            Err(other) => panic!("gva write {gva:#x}: unexpected exit {other:?}"),
        }
    }

    fn snapshot(&self) -> Snapshot {
        view::snapshot(&self.vm, &self.vcpus)
    }

    fn audit(&self, what: &str) {
        if let Err(e) = self.vm.audit() {
            panic!("{what}: audit: {e}");
        }
    }

    /// Release the vCPUs, drop the VM, and check every table went back.
    fn finish(mut self, what: &str) {
        for v in std::mem::take(&mut self.vcpus) {
            self.vm.release_vcpu(v).expect("the vCPU is this VM's");
        }
        let alloc = self.alloc.clone();
        drop(self);
        assert_eq!(
            view::settle_live(alloc.heap()),
            0,
            "{what}: tables leaked after the VM was dropped"
        );
    }
}

/// A guest access; an exit to the VMM (MMIO) counts as success, an error is returned.
fn access(vm: &FVm, vcpu: &mut Vcpu, gpa: u64, kind: AccessKind) -> Result<(), Error> {
    match vm.access(vcpu, Gpa(gpa), kind) {
        Ok(_) | Err(Exit::Mmio { .. }) => Ok(()),
        Err(Exit::Error(e)) => Err(e),
        Err(other) => panic!("access {gpa:#x}: unexpected exit {other:?}"),
    }
}

/// Whether the operation is a guest access (see the module docs for what it may change).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Operation,
    Fault,
}

/// Run `op` on a fresh rig from `build` with the allocator failing from the Nth
/// allocation on, for N = 0, 1, ... until the operation meets no failure (see the module
/// docs). After each success, and after the retry that follows each failure, `after` runs
/// with memory back (the VM must go on working). Returns how many allocations the
/// operation made when none failed.
fn for_every_failure(
    what: &str,
    kind: Kind,
    build: impl Fn() -> Rig,
    op: impl Fn(&mut Rig) -> Result<(), Error>,
    after: impl Fn(&mut Rig) -> Result<(), Error>,
) -> u64 {
    for n in 0..10_000u64 {
        let mut rig = build();
        let before = rig.snapshot();
        let attempts = rig.alloc.attempts();
        let failures = rig.alloc.failures();
        rig.alloc.fail_after(n);
        let result = op(&mut rig);
        rig.alloc.restore();
        let injected = rig.alloc.failures() > failures;
        let made = rig.alloc.attempts() - attempts;
        let what_n = format!("{what} (allocation {n} fails)");
        rig.audit(&what_n);
        match result {
            Err(Error::OutOfTableMemory) => {
                assert!(injected, "{what_n}: OutOfTableMemory without a failure");
                let now = rig.snapshot();
                if kind == Kind::Fault {
                    let (b, a) = (&before.tables, &now.tables);
                    assert_eq!(b.entries, a.entries, "{what_n}: a translation changed");
                    assert_eq!(
                        (&b.slots, b.generation, &b.bitmaps),
                        (&a.slots, a.generation, &a.bitmaps),
                        "{what_n}: memslots or dirty state changed"
                    );
                } else {
                    assert_eq!(before, now, "{what_n}: the VM changed");
                }
                op(&mut rig).unwrap_or_else(|e| panic!("{what_n}: retry with memory: {e:?}"));
                rig.audit(&format!("{what_n}, retried"));
            }
            Err(e) => panic!("{what_n}: {e:?}"),
            Ok(()) => {}
        }
        after(&mut rig).unwrap_or_else(|e| panic!("{what_n}: afterwards: {e:?}"));
        rig.audit(&format!("{what_n}, afterwards"));
        rig.finish(&what_n);
        if !injected {
            return made;
        }
    }
    panic!("{what}: still failing after 10000 allocations");
}

fn nothing(_: &mut Rig) -> Result<(), Error> {
    Ok(())
}

fn direct_mmus() -> Vec<(&'static str, MmuKind)> {
    vmmu_testing::MMUS.to_vec()
}

/// A rig with a data slot (slot 1) at 1 GiB of 2 GiB, backed by `backing`.
fn with_data(mmu: MmuKind, backing: Backing) -> Rig {
    let rig = Rig::new(mmu);
    rig.slot(1, G1, 2 * G1, backing, MemslotFlags::empty());
    rig
}

/// `with_data` with a few pages written (huge leaves where the backing allows).
fn mapped(mmu: MmuKind, backing: Backing) -> Rig {
    let mut r = with_data(mmu, backing);
    for i in 0..4 {
        r.write(G1 + i * (G1 / 2) + i * M2 + 0x3000).unwrap();
    }
    r
}

/// Faults at every level: a 4 KiB, 2 MiB and 1 GiB leaf into empty tables, then one more
/// beside an existing leaf, and an MMIO SPTE, on every direct MMU.
#[test]
fn faults_fail_atomically_at_every_level() {
    if vmmu_testing::skip_rerun("faults_fail_atomically_at_every_level") {
        return;
    }
    for (name, mmu) in direct_mmus() {
        for backing in [Backing::Page4K, Backing::Thp, Backing::HugeTlb1G] {
            let what = format!("{name}: first fault, {backing:?}");
            let made = for_every_failure(
                &what,
                Kind::Fault,
                || with_data(mmu, backing),
                |r| r.write(G1 + 0x1234_5000),
                nothing,
            );
            assert!(made > 0, "{what}: the fault allocated nothing");
            for_every_failure(
                &format!("{name}: second fault, {backing:?}"),
                Kind::Fault,
                || {
                    let mut r = with_data(mmu, backing);
                    r.write(G1).unwrap();
                    r
                },
                |r| r.write(G1 + G1 / 2 + 0x5000),
                nothing,
            );
        }
        for_every_failure(
            &format!("{name}: MMIO fault"),
            Kind::Fault,
            || with_data(mmu, Backing::Page4K),
            |r| r.write(8 * G1),
            nothing,
        );
    }
}

/// The fast zap: the TDP MMU needs a new root; a failure must leave the old one valid,
/// and the vCPU must go on running either way.
#[test]
fn zap_all_fast_fails_atomically() {
    if vmmu_testing::skip_rerun("zap_all_fast_fails_atomically") {
        return;
    }
    for (name, mmu) in direct_mmus() {
        let what = format!("{name}: zap_all_fast");
        let made = for_every_failure(
            &what,
            Kind::Operation,
            || mapped(mmu, Backing::Thp),
            |r| r.vm.zap_all_fast(),
            |r| r.write(G1 + M2),
        );
        if matches!(mmu, MmuKind::Tdp(_)) {
            assert!(made > 0, "{what}: no new root was allocated");
        }
    }
}

fn set_logging(r: &mut Rig, on: bool) -> Result<(), Error> {
    let mut region = r.region(1);
    region.flags = if on {
        MemslotFlags::LOG_DIRTY_PAGES
    } else {
        MemslotFlags::empty()
    };
    r.vm.set_user_memory_region(region)
}

/// No huge leaf maps slot 1 (at [1 GiB, 3 GiB)).
fn no_huge_leaf_in_slot(r: &mut Rig) -> Result<(), Error> {
    let t = view::read_tables(&r.vm, &r.vcpus, &[]);
    for e in &t.entries {
        let inside = e.gfn + e.level.pages() > G1 >> 12 && e.gfn < (3 * G1) >> 12;
        assert!(
            e.spte.is_mmio() || e.level == vmmu::types::Level::L4K || !inside,
            "a {} leaf at gfn {:#x} survived logging",
            e.level.name(),
            e.gfn
        );
    }
    r.write(G1 + 0x3000)
}

/// Memslot changes: create, move, delete (with mappings), logging on (eager split of 2 MiB
/// and 1 GiB leaves on the TDP MMU) and off (huge-page recovery).
#[test]
fn memslot_changes_fail_atomically() {
    if vmmu_testing::skip_rerun("memslot_changes_fail_atomically") {
        return;
    }
    for (name, mmu) in direct_mmus() {
        // 2 MiB leaves: a 1 GiB split needs 513 tables, a fresh VM for each N is too slow.
        {
            let backing = Backing::Thp;
            for_every_failure(
                &format!("{name}: logging on, {backing:?}"),
                Kind::Operation,
                || mapped(mmu, backing),
                |r| set_logging(r, true),
                no_huge_leaf_in_slot,
            );
            for_every_failure(
                &format!("{name}: logging off, {backing:?}"),
                Kind::Operation,
                || {
                    let mut r = mapped(mmu, backing);
                    set_logging(&mut r, true).unwrap();
                    for i in 0..8 {
                        r.write(G1 + i * 0x1000).unwrap();
                    }
                    r
                },
                |r| set_logging(r, false),
                |r| r.write(G1 + 0x3000),
            );
            for_every_failure(
                &format!("{name}: delete, {backing:?}"),
                Kind::Operation,
                || mapped(mmu, backing),
                |r| {
                    let mut region = r.region(1);
                    region.memory_size = 0;
                    r.vm.set_user_memory_region(region)
                },
                |r| r.write(G1 + 0x3000),
            );
            for_every_failure(
                &format!("{name}: move, {backing:?}"),
                Kind::Operation,
                || mapped(mmu, backing),
                |r| {
                    let mut region = r.region(1);
                    region.guest_phys_addr = 4 * G1;
                    r.vm.set_user_memory_region(region)
                },
                |r| r.write(4 * G1 + 0x3000),
            );
            for_every_failure(
                &format!("{name}: create, {backing:?}"),
                Kind::Operation,
                || mapped(mmu, backing),
                |r| {
                    let hva = r.host.mmap(G1, backing, true).expect("host memory");
                    r.vm.set_user_memory_region(MemoryRegion {
                        slot: 2,
                        flags: MemslotFlags::empty(),
                        guest_phys_addr: 8 * G1,
                        memory_size: G1,
                        userspace_addr: hva.0,
                    })
                },
                |r| r.write(8 * G1 + 0x3000),
            );
        }
    }
}

impl Rig {
    fn generation(&self) -> u64 {
        view::with_tables(&self.vm, |s, _| s.generation())
    }
}

/// A mapped slot 1, an MMIO SPTE for gpa 8 GiB, and memslot updates (a one-page slot 7
/// created and deleted) up to one short of wrapping the MMIO SPTEs' generation bits.
fn near_wrap(mmu: MmuKind) -> Rig {
    let mut r = mapped(mmu, Backing::Thp);
    r.write(8 * G1).unwrap();
    let hva = r.host.mmap(0x1000, Backing::Page4K, true).unwrap();
    let wrap = vmmu::spte::MMIO_GEN_MASK + 1;
    let mut exists = false;
    while r.generation() % wrap != wrap - 1 {
        r.vm.set_user_memory_region(MemoryRegion {
            slot: 7,
            flags: MemslotFlags::empty(),
            guest_phys_addr: 16 * G1,
            memory_size: if exists { 0 } else { 0x1000 },
            userspace_addr: hva.0,
        })
        .unwrap();
        exists = !exists;
    }
    r
}

/// The MMIO generation wraps on a slot deletion: everything is zapped (the TDP MMU's fast
/// zap needs a new root), and a failure must neither delete the slot nor move the
/// generation. Once it succeeds, MMIO SPTEs of the new generation are recognised from the
/// SPTE (the VM stored the new generation).
#[test]
fn memslot_update_that_wraps_the_mmio_generation_fails_atomically() {
    if vmmu_testing::skip_rerun("memslot_update_that_wraps_the_mmio_generation_fails_atomically") {
        return;
    }
    for mmu in [
        MmuKind::ShadowDirect,
        MmuKind::Tdp(TdpIteration::UsedEntries),
    ] {
        let what = format!("{mmu:?}: delete wrapping the MMIO generation");
        for_every_failure(
            &what,
            Kind::Operation,
            || near_wrap(mmu),
            |r| {
                let mut region = r.region(1);
                region.memory_size = 0;
                r.vm.set_user_memory_region(region)
            },
            |r| {
                assert_eq!(
                    r.generation() & vmmu::spte::MMIO_GEN_MASK,
                    0,
                    "{what}: did not wrap"
                );
                // The deleted slot's gpa is MMIO now: the first access installs an MMIO
                // SPTE, the second is recognised from it.
                r.write(G1)?;
                let fast = r.vm.stats().fast_mmio_exits;
                r.write(G1)?;
                assert_eq!(
                    r.vm.stats().fast_mmio_exits,
                    fast + 1,
                    "{what}: the MMIO SPTE's generation is not the VM's"
                );
                r.write(G1 + G1 + 0x3000)
            },
        );
    }
}

const DATA: u64 = G1 + 0x80_0000;
const VA1: u64 = 0x40_0000_1000;
const VA2: u64 = 0x40_0020_1000;
const VA3: u64 = 0x50_0000_1000;
const CR3A: u64 = 0x1000;
const CR3B: u64 = 0x6000;

/// Shadow paging: two address spaces in guest memory (CR3A maps VA1 and VA2, CR3B maps
/// VA3), a data slot; with `loaded`, the vCPU runs on CR3A.
fn paging_rig(loaded: bool) -> Rig {
    let mut r = Rig::new(MmuKind::ShadowPaging);
    r.slot(1, G1, G1, Backing::Thp, MemslotFlags::empty());
    assert_eq!(r.table(), CR3A);
    r.map(CR3A, VA1, DATA);
    r.map(CR3A, VA2, DATA + M2);
    assert_eq!(r.table(), CR3B);
    r.map(CR3B, VA3, DATA + 2 * M2);
    if loaded {
        r.set_cr3(CR3A).unwrap();
    }
    r
}

/// `paging_rig(true)` with VA1 written (shadow pages for each level of CR3A).
fn paging_rig_mapped() -> Rig {
    let mut r = paging_rig(true);
    r.gva_write(VA1 + 8).unwrap();
    r
}

/// Shadow paging: the first CR3 load (a root), a fault building shadow pages for every
/// level of the guest's tables, another beside it, a switch to a second address space,
/// the fast zap.
#[test]
fn shadow_paging_fails_atomically() {
    if vmmu_testing::skip_rerun("shadow_paging_fails_atomically") {
        return;
    }
    let made = for_every_failure(
        "shadow paging: first CR3 load",
        Kind::Operation,
        || paging_rig(false),
        |r| r.set_cr3(CR3A),
        |r| r.gva_write(VA1 + 8),
    );
    assert!(made > 0, "the CR3 load allocated no root");
    let made = for_every_failure(
        "shadow paging: fault",
        Kind::Fault,
        || paging_rig(true),
        |r| r.gva_write(VA1 + 8),
        nothing,
    );
    assert!(made > 0, "the fault allocated nothing");
    for_every_failure(
        "shadow paging: fault beside a mapping",
        Kind::Fault,
        paging_rig_mapped,
        |r| r.gva_write(VA2 + 8),
        nothing,
    );
    for_every_failure(
        "shadow paging: CR3 switch",
        Kind::Operation,
        paging_rig_mapped,
        |r| r.set_cr3(CR3B),
        |r| r.gva_write(VA3 + 8),
    );
    for_every_failure(
        "shadow paging: zap_all_fast",
        Kind::Operation,
        paging_rig_mapped,
        |r| r.vm.zap_all_fast(),
        |r| r.gva_write(VA1 + 8),
    );
}

/// Creating a vCPU allocates no table, and must work after a failed fast zap (which
/// used to leave the TDP MMU without a valid root: `create_vcpu` panicked).
#[test]
fn create_vcpu_fails_atomically() {
    if vmmu_testing::skip_rerun("create_vcpu_fails_atomically") {
        return;
    }
    for (name, mmu) in direct_mmus() {
        let failed_fast_zap = move || {
            let r = mapped(mmu, Backing::Thp);
            r.alloc.fail_after(0);
            let res = r.vm.zap_all_fast();
            r.alloc.restore();
            if matches!(mmu, MmuKind::Tdp(_)) {
                assert_eq!(res, Err(Error::OutOfTableMemory), "{name}");
            }
            r
        };
        for_every_failure(
            &format!("{name}: create_vcpu after a failed fast zap"),
            Kind::Operation,
            failed_fast_zap,
            |r| {
                let v = r.vm.create_vcpu()?;
                r.vcpus.push(v);
                Ok(())
            },
            |r| {
                let v = r.vcpus.last_mut().expect("the new vCPU");
                access(&r.vm, v, G1 + 0x2000, AccessKind::Write)
            },
        );
    }
}
