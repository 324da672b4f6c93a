//! Partial invalidations under huge mappings (issue 13, finding 5), on every MMU.
//!
//! The host may invalidate and change one 4 KiB page inside a huge page it maps (a THP
//! split, migration of one page, a COW break): `invalidate_range_start(H, H + 4K)`, the
//! change, `invalidate_range_end`. A fault elsewhere in the same huge page while that
//! window is open must not install a leaf whose range covers H: the leaf would carry H's
//! old frame past the change. And the audit must catch such a leaf: every leaf maps, page
//! by page, the frame the host maps now.

use std::sync::Arc;

use vmmu::host::{Backing, HostMemory, SimHostMemory};
use vmmu::types::{Gpa, Hva, PAGE_SIZE};
use vmmu::{MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};
use vmmu_testing::view::SimVm;
use vmmu_testing::MMUS;

const G1: u64 = 1 << 30;
const M2: u64 = 2 << 20;

/// A VM on `mmu` with one slot at 1 GiB over `size` bytes of `backing`.
fn vm_over(mmu: MmuKind, backing: Backing, size: u64) -> (Arc<SimHostMemory>, SimVm, u64) {
    let host = Arc::new(SimHostMemory::new());
    let hva = host.mmap(size, backing, true).unwrap().0;
    let vm = Vm::new(
        VmConfig {
            mmu,
            ..VmConfig::default()
        },
        host.clone(),
    );
    vm.set_user_memory_region(MemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: G1,
        memory_size: size,
        userspace_addr: hva,
    })
    .unwrap();
    (host, vm, hva)
}

/// The host-physical address page `page` of the slot must reach now.
fn host_hpa(host: &SimHostMemory, hva: u64, page: u64) -> u64 {
    host.translate(Hva(hva + page * PAGE_SIZE)).unwrap().pfn.0 * PAGE_SIZE
}

/// The sequence: an invalidation of page `hole`, a write to page `at` of the same
/// host huge page while it is open, the host gives `hole` a new frame, the invalidation
/// ends. The audit passes and every page reaches the host's current frame (the hole its
/// new one).
#[test]
fn fault_beside_a_partial_invalidation_maps_no_stale_huge_leaf() {
    if vmmu_testing::skip_rerun("fault_beside_a_partial_invalidation_maps_no_stale_huge_leaf") {
        return;
    }
    let cases: &[(Backing, u64, u64, u64)] = &[
        // (backing, size, hole page, page written while the hole is invalidated)
        (Backing::Thp, 2 * M2, 0, 1),
        (Backing::Thp, 2 * M2, 7, 3),
        (Backing::Thp, 2 * M2, 512 + 511, 512),
        (Backing::HugeTlb1G, G1, 0, 1),
        (Backing::HugeTlb1G, G1, 0, 513),
        (Backing::HugeTlb1G, G1, 262_143, 0),
    ];
    for &(name, mmu) in MMUS {
        for &(backing, size, hole, at) in cases {
            let what = format!("{name}, {backing:?}, hole {hole}, write at {at}");
            let (host, vm, hva) = vm_over(mmu, backing, size);
            let mut vcpu = vm.create_vcpu().unwrap();
            let h = hva + hole * PAGE_SIZE;
            vm.invalidate_range_start(Hva(h), Hva(h + PAGE_SIZE))
                .unwrap();
            let got = vm.write(&mut vcpu, Gpa(G1 + at * PAGE_SIZE)).unwrap();
            assert_eq!(got.0, host_hpa(&host, hva, at), "{what}: the write");
            let new = host.remap_page(Hva(h)).unwrap();
            vm.invalidate_range_end().unwrap();
            vm.audit()
                .unwrap_or_else(|e| panic!("{what}: after the window: {e}"));
            let got = vm.read(&mut vcpu, Gpa(G1 + hole * PAGE_SIZE)).unwrap();
            assert_eq!(
                got.0,
                new.0 * PAGE_SIZE,
                "{what}: the hole reached its old frame through a huge leaf installed during \
                 its invalidation"
            );
            for p in [at, hole ^ 1, 0, size / PAGE_SIZE - 1] {
                let got = vm.read(&mut vcpu, Gpa(G1 + p * PAGE_SIZE)).unwrap();
                assert_eq!(got.0, host_hpa(&host, hva, p), "{what}: page {p}");
            }
            vm.audit()
                .unwrap_or_else(|e| panic!("{what}: at the end: {e}"));
        }
    }
}

/// The audit compares every leaf with the host, page by page: a host that changes a
/// page without telling the MMU (no notifier call) leaves a leaf the audit reports, at
/// every level; so does a writable leaf over a page the host made read-only.
#[test]
fn audit_reports_a_leaf_the_host_no_longer_maps() {
    if vmmu_testing::skip_rerun("audit_reports_a_leaf_the_host_no_longer_maps") {
        return;
    }
    let cases: &[(Backing, u64, u64)] = &[
        // (backing, size, page changed behind the MMU's back)
        (Backing::Page4K, M2, 3),
        (Backing::Thp, M2, 300),
        (Backing::HugeTlb1G, G1, 100_000),
    ];
    for &(name, mmu) in MMUS {
        for &(backing, size, page) in cases {
            let what = format!("{name}, {backing:?}, page {page}");
            // A new frame.
            let (host, vm, hva) = vm_over(mmu, backing, size);
            let mut vcpu = vm.create_vcpu().unwrap();
            vm.read(&mut vcpu, Gpa(G1 + page * PAGE_SIZE)).unwrap();
            vm.audit().unwrap_or_else(|e| panic!("{what}: {e}"));
            host.remap_page(Hva(hva + page * PAGE_SIZE)).unwrap();
            let e = vm
                .audit()
                .expect_err(&format!("{what}: a leaf maps a frame the host took away"));
            assert!(e.0.contains("host"), "{what}: {e}");
            // Unmapped.
            let (host, vm, hva) = vm_over(mmu, backing, size);
            let mut vcpu = vm.create_vcpu().unwrap();
            vm.read(&mut vcpu, Gpa(G1 + page * PAGE_SIZE)).unwrap();
            let hole = if backing == Backing::HugeTlb1G {
                G1
            } else {
                PAGE_SIZE
            };
            host.munmap(Hva((hva + page * PAGE_SIZE) & !(hole - 1)), hole)
                .unwrap();
            let e = vm
                .audit()
                .expect_err(&format!("{what}: a leaf maps a page the host unmapped"));
            assert!(e.0.contains("host"), "{what}: {e}");
            // Made read-only under a writable leaf.
            let (host, vm, hva) = vm_over(mmu, backing, size);
            let mut vcpu = vm.create_vcpu().unwrap();
            vm.write(&mut vcpu, Gpa(G1 + page * PAGE_SIZE)).unwrap();
            host.set_writable(Hva(hva), size, false).unwrap();
            let e = vm.audit().expect_err(&format!(
                "{what}: a writable leaf over a read-only host page"
            ));
            assert!(e.0.contains("host"), "{what}: {e}");
        }
    }
}

/// The same window around huge-page recovery: logging stops on a slot while the host has
/// one of its pages under invalidation. The TDP MMU rebuilds huge leaves in place from the
/// host's answer (the shadow MMU zaps, and the next fault maps huge): neither may cover the
/// page being changed.
#[test]
fn huge_page_recovery_skips_a_range_under_invalidation() {
    if vmmu_testing::skip_rerun("huge_page_recovery_skips_a_range_under_invalidation") {
        return;
    }
    for &(name, mmu) in MMUS {
        let (host, vm, hva) = vm_over(mmu, Backing::Thp, 2 * M2);
        let region = |flags| MemoryRegion {
            slot: 0,
            flags,
            guest_phys_addr: G1,
            memory_size: 2 * M2,
            userspace_addr: hva,
        };
        vm.set_user_memory_region(region(MemslotFlags::LOG_DIRTY_PAGES))
            .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        for p in (0..1024).step_by(3) {
            vm.write(&mut vcpu, Gpa(G1 + p * PAGE_SIZE)).unwrap();
        }
        let hole = 512 + 9;
        let h = hva + hole * PAGE_SIZE;
        vm.invalidate_range_start(Hva(h), Hva(h + PAGE_SIZE))
            .unwrap();
        vm.set_user_memory_region(region(MemslotFlags::empty()))
            .unwrap();
        for p in [1, 512 + 10] {
            vm.read(&mut vcpu, Gpa(G1 + p * PAGE_SIZE)).unwrap();
        }
        let new = host.remap_page(Hva(h)).unwrap();
        vm.invalidate_range_end().unwrap();
        vm.audit()
            .unwrap_or_else(|e| panic!("{name}: after the window: {e}"));
        let got = vm.read(&mut vcpu, Gpa(G1 + hole * PAGE_SIZE)).unwrap();
        assert_eq!(got.0, new.0 * PAGE_SIZE, "{name}: the hole's old frame");
        for p in (0..1024).step_by(5) {
            let got = vm.read(&mut vcpu, Gpa(G1 + p * PAGE_SIZE)).unwrap();
            assert_eq!(got.0, host_hpa(&host, hva, p), "{name}: page {p}");
        }
        vm.audit()
            .unwrap_or_else(|e| panic!("{name}: at the end: {e}"));
    }
}
