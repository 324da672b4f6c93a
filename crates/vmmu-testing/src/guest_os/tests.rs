//! The guest OS model on the reference CPU ([`SoftCpu`]): its own logic, without the MMU.

use std::sync::Arc;

use vmmu::guest::{GuestMemory, SimGuestMemory};
use vmmu::types::{AccessKind, ErrorCode, Gva, PAGE_SIZE};

use super::check::{check_process, check_refcounts};
use super::*;

const RAM: u64 = 16 << 20;

fn boot() -> (Kernel, SoftCpu) {
    let mem: Arc<dyn GuestMemory> = Arc::new(SimGuestMemory::new(RAM));
    let k = Kernel::boot(mem.clone(), RAM).unwrap();
    let cpu = SoftCpu::new(mem, k.idle_pml4());
    (k, cpu)
}

fn all_free(k: &Kernel) {
    assert_eq!(k.frames().free_frames(), k.frames().total_frames(), "leak");
    k.check_free_frames_zero().unwrap();
}

#[test]
fn demand_paging_maps_inside_vmas_and_segfaults_outside() {
    let (k, mut cpu) = boot();
    let mut p = k.spawn(&mut cpu).unwrap();
    let a = k.mmap(&mut p, 8 * PAGE_SIZE, Prot::RW).unwrap();
    let r = k.mmap(&mut p, 2 * PAGE_SIZE, Prot::RO).unwrap();
    assert_eq!(r.0, a.0 + 8 * PAGE_SIZE);
    let g = k.access(&mut cpu, &mut p, a, AccessKind::Write).unwrap();
    assert_eq!(p.mm().find(a.0).unwrap().record(a.0).gfn(), Some(g.gfn()));
    k.access(&mut cpu, &mut p, Gva(a.0 + 3 * PAGE_SIZE), AccessKind::Read)
        .unwrap();
    k.access(&mut cpu, &mut p, r, AccessKind::Read).unwrap();
    let e = k
        .access(&mut cpu, &mut p, r, AccessKind::Write)
        .unwrap_err();
    assert!(matches!(e, OsError::Segfault { .. }), "{e}");
    let e = k
        .access(
            &mut cpu,
            &mut p,
            Gva(a.0 + 10 * PAGE_SIZE),
            AccessKind::Read,
        )
        .unwrap_err();
    assert!(matches!(e, OsError::Segfault { .. }), "{e}");
    let e = k
        .access(&mut cpu, &mut p, a, AccessKind::Fetch)
        .unwrap_err();
    assert!(matches!(e, OsError::Segfault { .. }), "{e}");
    let c = check_process(&k, &mut cpu, &p).unwrap();
    assert_eq!((c.present, c.absent), (3, 7));
    assert_eq!(check_refcounts(&k, [&p]).unwrap(), 3);
    // PML4 + PDPT + PD + PT + 3 pages.
    assert_eq!(k.frames().total_frames() - k.frames().free_frames(), 7);
    k.exit(&mut cpu, p).unwrap();
    assert_eq!(cpu.cr3(), k.idle_pml4());
    all_free(&k);
}

#[test]
fn fork_shares_read_only_and_cow_copies_or_reuses() {
    let (k, mut cpu) = boot();
    let mut parent = k.spawn(&mut cpu).unwrap();
    let a = k.mmap(&mut parent, 4 * PAGE_SIZE, Prot::RW).unwrap();
    for i in 0..4 {
        k.access(
            &mut cpu,
            &mut parent,
            Gva(a.0 + i * PAGE_SIZE),
            AccessKind::Write,
        )
        .unwrap();
    }
    let flushes = cpu.flushes;
    let mut child = k.fork(&mut cpu, &mut parent).unwrap();
    assert_eq!(cpu.flushes, flushes + 1, "the parent's TLB is flushed");
    check_refcounts(&k, [&parent, &child]).unwrap();
    let shared = parent.mm().vmas()[0].record(a.0).gfn().unwrap();
    assert_eq!(k.frames().refcount(shared), 2);
    for p in [&parent, &child] {
        check_process(&k, &mut cpu, p).unwrap();
        assert!(p.mm().vmas()[0].pages.iter().all(|r| !r.writable()));
    }
    // The child writes page 0: a copy. The parent writes page 0: the last reference,
    // reused in place.
    let cg = k
        .access(&mut cpu, &mut child, a, AccessKind::Write)
        .unwrap();
    assert_ne!(cg.gfn(), shared);
    assert_eq!(k.frames().refcount(shared), 1);
    let pg = k
        .access(&mut cpu, &mut parent, a, AccessKind::Write)
        .unwrap();
    assert_eq!(pg.gfn(), shared);
    let s = k.stats();
    assert_eq!((s.cow_copies, s.cow_reuses), (1, 1));
    for p in [&parent, &child] {
        check_process(&k, &mut cpu, p).unwrap();
    }
    check_refcounts(&k, [&parent, &child]).unwrap();
    // A grandchild, then everyone exits in a different order.
    let grandchild = k.fork(&mut cpu, &mut child).unwrap();
    check_refcounts(&k, [&parent, &child, &grandchild]).unwrap();
    k.exit(&mut cpu, child).unwrap();
    check_refcounts(&k, [&parent, &grandchild]).unwrap();
    k.exit(&mut cpu, parent).unwrap();
    check_process(&k, &mut cpu, &grandchild).unwrap();
    k.exit(&mut cpu, grandchild).unwrap();
    all_free(&k);
}

#[test]
fn munmap_frees_frames_and_empty_tables_and_flushes() {
    let (k, mut cpu) = boot();
    let mut p = k.spawn(&mut cpu).unwrap();
    // 4 MiB + 4 KiB: three PTs.
    let len = (4 << 20) + PAGE_SIZE;
    let a = k.mmap(&mut p, len, Prot::RW).unwrap();
    for off in (0..len).step_by(PAGE_SIZE as usize) {
        k.access(&mut cpu, &mut p, Gva(a.0 + off), AccessKind::Write)
            .unwrap();
    }
    let used = k.frames().total_frames() - k.frames().free_frames();
    assert_eq!(used as u64, 1 + 1 + 1 + 3 + len / PAGE_SIZE);
    // A hole of two pages: two INVLPGs, no table freed.
    let inv = cpu.invlpgs;
    k.munmap(&mut cpu, &mut p, a.0 + PAGE_SIZE, 2 * PAGE_SIZE)
        .unwrap();
    assert_eq!(cpu.invlpgs, inv + 2);
    assert_eq!(p.mm().vmas().len(), 2);
    check_process(&k, &mut cpu, &p).unwrap();
    let e = k
        .access(&mut cpu, &mut p, Gva(a.0 + PAGE_SIZE), AccessKind::Read)
        .unwrap_err();
    assert!(
        matches!(e, OsError::Segfault { error_code, .. } if !error_code.contains(ErrorCode::PRESENT))
    );
    // The first 2 MiB whole: a full flush, its PT freed.
    let fl = cpu.flushes;
    let freed_before = k.stats().tables_freed;
    k.munmap(&mut cpu, &mut p, a.0, 2 << 20).unwrap();
    assert_eq!(cpu.flushes, fl + 1);
    assert_eq!(k.stats().tables_freed, freed_before + 1);
    check_process(&k, &mut cpu, &p).unwrap();
    check_refcounts(&k, [&p]).unwrap();
    k.check_free_frames_zero().unwrap();
    // The rest: every user table goes, the PML4 stays.
    k.munmap(&mut cpu, &mut p, a.0 + (2 << 20), len - (2 << 20))
        .unwrap();
    assert_eq!(k.frames().total_frames() - k.frames().free_frames(), 1);
    k.exit(&mut cpu, p).unwrap();
    all_free(&k);
}

#[test]
fn exec_replaces_the_address_space() {
    let (k, mut cpu) = boot();
    let mut p = k.spawn(&mut cpu).unwrap();
    let a = k.mmap(&mut p, 16 * PAGE_SIZE, Prot::RW).unwrap();
    k.access(&mut cpu, &mut p, a, AccessKind::Write).unwrap();
    let img = Image::default();
    k.exec(&mut cpu, &mut p, &img).unwrap();
    assert_eq!(p.mm().vmas().len(), 3);
    assert!(p.mm().find(a.0).is_none());
    let text = Gva(layout::IMAGE_BASE);
    k.access(&mut cpu, &mut p, text, AccessKind::Fetch).unwrap();
    assert!(k.access(&mut cpu, &mut p, text, AccessKind::Write).is_err());
    k.access(&mut cpu, &mut p, Gva(img.data_start()), AccessKind::Write)
        .unwrap();
    k.access(
        &mut cpu,
        &mut p,
        Gva(layout::STACK_TOP - 8),
        AccessKind::Write,
    )
    .unwrap();
    check_process(&k, &mut cpu, &p).unwrap();
    check_refcounts(&k, [&p]).unwrap();
    k.exit(&mut cpu, p).unwrap();
    all_free(&k);
}

#[test]
fn out_of_memory_is_an_error_not_a_panic() {
    let mem: Arc<dyn GuestMemory> = Arc::new(SimGuestMemory::new(2 << 20));
    let k = Kernel::boot(mem.clone(), 2 << 20).unwrap();
    let mut cpu = SoftCpu::new(mem, k.idle_pml4());
    let mut p = k.spawn(&mut cpu).unwrap();
    let a = k.mmap(&mut p, 4 << 20, Prot::RW).unwrap();
    let mut err = None;
    for i in 0..1024 {
        if let Err(e) = k.access(
            &mut cpu,
            &mut p,
            Gva(a.0 + i * PAGE_SIZE),
            AccessKind::Write,
        ) {
            err = Some(e);
            break;
        }
    }
    assert_eq!(err, Some(OsError::OutOfMemory));
    check_process(&k, &mut cpu, &p).unwrap();
    k.exit(&mut cpu, p).unwrap();
    all_free(&k);
}
