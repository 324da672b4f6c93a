//! The real host-memory backend (`RealHostMemory`, Linux): guest accesses move real bytes
//! through the translation the CPU model produced, and host changes made through the
//! backend's notifier API (discard, move, THP split) never let the guest see a frame the
//! host replaced. On both direct MMUs; the audit runs after every step.
#![cfg(target_os = "linux")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmmu::host::{HostMemory, RealBacking, RealHostError, RealHostMemory};
use vmmu::types::{Gpa, Hva, Level};
use vmmu::vm::DataError;
use vmmu::{MemoryRegion, MemslotFlags, MmuKind, TdpIteration, Vm, VmConfig};

const PAGE: u64 = 4096;
const M2: u64 = 2 << 20;

fn mmus() -> [MmuKind; 2] {
    [
        MmuKind::ShadowDirect,
        MmuKind::Tdp(TdpIteration::UsedEntries),
    ]
}

fn vm_on(mmu: MmuKind, size: u64, backing: RealBacking) -> Vm<Arc<RealHostMemory>> {
    let mem = Arc::new(RealHostMemory::new(size, backing).expect("mmap"));
    let vm = Vm::new(
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
        mem.clone(),
    );
    vm.set_user_memory_region(MemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: mem.base().0,
    })
    .unwrap();
    vm
}

fn audit(vm: &Vm<Arc<RealHostMemory>>) {
    vm.audit().expect("audit");
}

#[test]
fn guest_writes_land_in_the_host_mapping_and_read_back() {
    for mmu in mmus() {
        let vm = vm_on(mmu, 4 * M2, RealBacking::Page4K);
        let mut cpu = vm.create_vcpu().unwrap();
        for p in 0..64u64 {
            let gpa = Gpa(p * 3 * PAGE + 8 * p);
            let hpa = vm.write_u64(&mut cpu, gpa, 0xdead_0000 + p).unwrap();
            // The hpa is the host's frame for the page's hva.
            let hva = Hva(vm.host().base().0 + gpa.0);
            assert_eq!(hpa.0 >> 12, vm.host().translate(hva).unwrap().pfn.0);
            // The bytes are in the host's own mapping.
            let mut page = [0u8; 4096];
            vm.host()
                .read_page(Hva(hva.0 & !(PAGE - 1)), &mut page)
                .unwrap();
            let off = (gpa.0 % PAGE) as usize;
            assert_eq!(
                u64::from_le_bytes(page[off..off + 8].try_into().unwrap()),
                0xdead_0000 + p
            );
            assert_eq!(vm.read_u64(&mut cpu, gpa).unwrap(), 0xdead_0000 + p);
        }
        // A host write is what the guest reads.
        vm.host()
            .write_host(Hva(vm.host().base().0 + 5 * PAGE), &[7u8; 16])
            .unwrap();
        let mut b = [0u8; 16];
        vm.read_bytes(&mut cpu, Gpa(5 * PAGE), &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
        audit(&vm);
    }
}

#[test]
fn discarded_page_reads_zero_never_the_old_contents() {
    for mmu in mmus() {
        let vm = vm_on(mmu, 4 * M2, RealBacking::Page4K);
        let mem = vm.host().clone();
        let mut cpu = vm.create_vcpu().unwrap();
        for p in 0..32u64 {
            vm.write_u64(&mut cpu, Gpa(p * PAGE), 0x1111 * (p + 1))
                .unwrap();
        }
        let old = mem.translate(Hva(mem.base().0 + 3 * PAGE)).unwrap().pfn;
        // Balloon: drop pages 3..6 under the running guest (its TLB holds them).
        mem.discard(&vm, Hva(mem.base().0 + 3 * PAGE), 3 * PAGE)
            .unwrap();
        audit(&vm);
        let new = mem.translate(Hva(mem.base().0 + 3 * PAGE)).unwrap().pfn;
        assert_ne!(old, new, "a discarded page gets a new frame");
        for p in 0..32u64 {
            let v = vm.read_u64(&mut cpu, Gpa(p * PAGE)).unwrap();
            let want = if (3..6).contains(&p) {
                0
            } else {
                0x1111 * (p + 1)
            };
            assert_eq!(v, want, "page {p} on {mmu:?}");
        }
        // And the page works again at its new frame.
        let hpa = vm.write_u64(&mut cpu, Gpa(4 * PAGE), 42).unwrap();
        assert_eq!(
            hpa.0 >> 12,
            mem.translate(Hva(mem.base().0 + 4 * PAGE)).unwrap().pfn.0
        );
        assert_eq!(vm.read_u64(&mut cpu, Gpa(4 * PAGE)).unwrap(), 42);
        audit(&vm);
    }
}

#[test]
fn a_mapping_the_notifier_missed_is_refused_not_read() {
    // The discard is announced to another VM: the guest's VM keeps a stale mapping. The
    // data path refuses the stale frame and the audit reports the leaf.
    for mmu in mmus() {
        let vm = vm_on(mmu, 2 * M2, RealBacking::Page4K);
        let mem = vm.host().clone();
        let other = Vm::new(VmConfig::default(), mem.clone());
        let mut cpu = vm.create_vcpu().unwrap();
        vm.write_u64(&mut cpu, Gpa(7 * PAGE), 99).unwrap();
        mem.discard(&other, Hva(mem.base().0 + 7 * PAGE), PAGE)
            .unwrap();
        match vm.read_u64(&mut cpu, Gpa(7 * PAGE)) {
            Err(DataError::StaleFrame { gpa, .. }) => assert_eq!(gpa, Gpa(7 * PAGE)),
            r => panic!("stale mapping not refused on {mmu:?}: {r:?}"),
        }
        assert!(vm.audit().is_err(), "the audit must see the stale leaf");
        // The notifier on the right VM repairs it.
        vm.unmap_hva_range(Hva(mem.base().0 + 7 * PAGE), Hva(mem.base().0 + 8 * PAGE))
            .unwrap();
        assert_eq!(vm.read_u64(&mut cpu, Gpa(7 * PAGE)).unwrap(), 0);
        audit(&vm);
    }
}

#[test]
fn moved_page_keeps_its_contents_at_a_new_frame() {
    for mmu in mmus() {
        let vm = vm_on(mmu, 2 * M2, RealBacking::Page4K);
        let mem = vm.host().clone();
        let mut cpu = vm.create_vcpu().unwrap();
        vm.write_u64(&mut cpu, Gpa(9 * PAGE + 16), 1234).unwrap();
        let hva = Hva(mem.base().0 + 9 * PAGE);
        let old = mem.translate(hva).unwrap().pfn;
        let new = mem.move_page(&vm, hva).unwrap();
        assert_ne!(old, new);
        audit(&vm);
        let hpa = vm.write_u64(&mut cpu, Gpa(9 * PAGE + 24), 5).unwrap();
        assert_eq!(hpa.0 >> 12, new.0);
        assert_eq!(vm.read_u64(&mut cpu, Gpa(9 * PAGE + 16)).unwrap(), 1234);
        audit(&vm);
    }
}

#[test]
fn thp_level_follows_the_kernel_and_splits_on_partial_discard() {
    for mmu in mmus() {
        let vm = vm_on(mmu, 8 * M2, RealBacking::Thp);
        let mem = vm.host().clone();
        let mut cpu = vm.create_vcpu().unwrap();
        for p in (0..8 * 512u64).step_by(97) {
            vm.write_u64(&mut cpu, Gpa(p * PAGE), p + 1).unwrap();
        }
        audit(&vm);
        let base = mem.base().0;
        for r in 0..8u64 {
            let hva = Hva(base + r * M2 + 5 * PAGE);
            let level = mem.translate(hva).unwrap().level;
            // The backend reports huge only where the kernel says THP; where the kernel's
            // flags are not readable it reports 4K.
            match mem.kernel_thp(hva) {
                Some(true) => assert_eq!(level, Level::L2M, "region {r}"),
                _ => assert_eq!(level, Level::L4K, "region {r}"),
            }
        }
        eprintln!(
            "THP: kernel flags readable: {}, region 0 huge: {:?}",
            mem.kernel_thp(Hva(base)).is_some(),
            mem.translate(Hva(base)).unwrap().level
        );
        // Drop one page of region 1: the region is 4K from now on, the page reads zero.
        mem.discard(&vm, Hva(base + M2 + 10 * PAGE), PAGE).unwrap();
        assert_eq!(mem.translate(Hva(base + M2)).unwrap().level, Level::L4K);
        audit(&vm);
        for p in (0..8 * 512u64).step_by(97) {
            let want = if p == 512 + 10 { 0 } else { p + 1 };
            assert_eq!(vm.read_u64(&mut cpu, Gpa(p * PAGE)).unwrap(), want);
        }
        assert_eq!(vm.read_u64(&mut cpu, Gpa(M2 + 10 * PAGE)).unwrap(), 0);
        // A split keeps frames and contents.
        mem.split_huge(&vm, Hva(base + 3 * M2)).unwrap();
        assert_eq!(mem.translate(Hva(base + 3 * M2)).unwrap().level, Level::L4K);
        audit(&vm);
        // Page 1552 = 97 * 16 is in region 3 (pages 1536..2048).
        assert_eq!(vm.read_u64(&mut cpu, Gpa(1552 * PAGE)).unwrap(), 1553);
        audit(&vm);
    }
}

#[test]
fn bad_input_is_refused_before_anything_changes() {
    let vm = vm_on(MmuKind::ShadowDirect, 2 * M2, RealBacking::Page4K);
    let mem = vm.host().clone();
    let base = mem.base().0;
    assert_eq!(
        RealHostMemory::new(0, RealBacking::Page4K).unwrap_err(),
        RealHostError::ZeroSize
    );
    assert!(matches!(
        RealHostMemory::new(4097, RealBacking::Page4K),
        Err(RealHostError::Unaligned { .. })
    ));
    assert!(matches!(
        mem.discard(&vm, Hva(base + 1), PAGE),
        Err(RealHostError::Unaligned { .. })
    ));
    assert!(matches!(
        mem.discard(&vm, Hva(base + 2 * M2), PAGE),
        Err(RealHostError::OutOfRange { .. })
    ));
    assert!(matches!(
        mem.discard(&vm, Hva(base), 4 * M2),
        Err(RealHostError::OutOfRange { .. })
    ));
    assert!(matches!(
        mem.discard(&vm, Hva(base), 0),
        Err(RealHostError::ZeroSize)
    ));
    assert!(matches!(
        mem.move_page(&vm, Hva(base - PAGE)),
        Err(RealHostError::OutOfRange { .. })
    ));
    let mut cpu = vm.create_vcpu().unwrap();
    assert!(matches!(
        vm.write_bytes(&mut cpu, Gpa(PAGE - 4), &[0u8; 8]),
        Err(DataError::CrossesPage { .. })
    ));
    assert_eq!(cpu.accesses, 0, "refused before any access");
    // Outside every memslot: MMIO, nothing stored.
    assert!(matches!(
        vm.write_u64(&mut cpu, Gpa(4 * M2), 1),
        Err(DataError::Exit(vmmu::Exit::Mmio { .. }))
    ));
    audit(&vm);
}

#[test]
fn concurrent_discards_under_writing_vcpus_never_reach_a_stale_frame() {
    for mmu in mmus() {
        let vm = Arc::new(vm_on(mmu, 2 * M2, RealBacking::Page4K));
        let mem = vm.host().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (vm, stop) = (vm.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut cpu = vm.create_vcpu().unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) || n < 2000 {
                        let p = (n * 7 + t) % 64;
                        // Each thread owns its 8-byte slot in the page.
                        let gpa = Gpa(p * PAGE + 8 * t);
                        vm.write_u64(&mut cpu, gpa, n).unwrap();
                        let v = vm.read_u64(&mut cpu, gpa).unwrap();
                        // Either our value or zero (a discard in between), never older.
                        assert!(v == n || v == 0, "read {v} after writing {n}");
                        n += 1;
                    }
                })
            })
            .collect();
        for k in 0..300u64 {
            let p = k * 13 % 64;
            mem.discard(&vm, Hva(mem.base().0 + p * PAGE), PAGE)
                .unwrap();
            if k % 50 == 0 {
                audit(&vm);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        audit(&vm);
    }
}
