//! The dirty ring's newer rules (issue 16): KVM's entry protocol through
//! [`vmmu::DirtyRingView`] (read with acquire, mark harvested with release, reset), with a
//! VMM harvesting while the vCPU runs (KVM_CAP_DIRTY_LOG_RING_ACQ_REL); a VMM misusing the
//! view gets typed errors and changes nothing; KVM's ring sizes
//! ([`vmmu::RingLimits::Kvm`]); the backup bitmap for pages dirtied outside any vCPU
//! context (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) and its rules.
//!
//! The loom model of the same protocol is `tests/loom_ring.rs`.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{Gpa, PAGE_SIZE};
use vmmu::{
    DirtyGfn, DirtyLogConfig, Error, Exit, MemslotFlags, RingEntry, RingLimits, Vm, VmConfig,
};

const PAGES: u64 = 256;

fn ring_vm(dirty_log: DirtyLogConfig) -> (Arc<SimHostMemory>, TestVm, SlotSpec) {
    let (host, vm) = new_vm(VmConfig {
        dirty_log,
        ..VmConfig::default()
    });
    let s = logging_slot(&host, &vm);
    (host, vm, s)
}

/// Slot 0: `PAGES` 4K host pages at gpa 1 GiB, logging dirty pages.
fn logging_slot(host: &SimHostMemory, vm: &TestVm) -> SlotSpec {
    let h = mmap(host, PAGES * PAGE_SIZE, Backing::Page4K);
    add_slot(
        vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: PAGES * PAGE_SIZE,
            hva: h,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
        },
    )
}

fn ring(size: u32) -> DirtyLogConfig {
    DirtyLogConfig {
        ring_size: Some(size),
        ..DirtyLogConfig::default()
    }
}

fn page(p: u64) -> DirtyGfn {
    DirtyGfn { slot: 0, offset: p }
}

/// The KVM loop on the view: read each entry from the fetch index on, mark it, reset;
/// the reset write-protects what was marked (the next write faults and is logged again)
/// and frees the room; `harvest_dirty_ring` does not report what the view marked.
#[test]
fn view_reads_marks_and_resets_by_index() {
    let (_host, vm, s) = ring_vm(ring(16));
    let mut v = vm.create_vcpu().unwrap();
    let view = vm.dirty_ring(0).unwrap();
    assert_eq!((view.vcpu(), view.size(), view.soft_limit()), (0, 16, 15));
    for p in [3, 1, 4] {
        vm.write(&mut v, Gpa(s.page_gpa(p))).unwrap();
    }
    vm.write(&mut v, Gpa(s.page_gpa(3))).unwrap(); // writable already: no entry
    let mut fetch = 0;
    let mut got = Vec::new();
    while let RingEntry::Dirty(e) = view.read(fetch) {
        got.push(e);
        assert_eq!(view.mark_harvested(fetch), Ok(true));
        fetch += 1;
    }
    assert_eq!(got, [page(3), page(1), page(4)]);
    assert_eq!(view.read(1), RingEntry::Harvested(page(1)));
    let mut out = Vec::new();
    assert_eq!(
        vm.harvest_dirty_ring(0, &mut out),
        Ok(0),
        "marked by the view"
    );
    let exits = v.exits;
    vm.write(&mut v, Gpa(s.page_gpa(4))).unwrap();
    assert_eq!(v.exits, exits, "not reset yet: still writable");
    assert_eq!(vm.reset_dirty_rings(), Ok(3));
    assert_eq!(view.read(0), RingEntry::Empty, "freed");
    assert_eq!(view.counters(), (3, 3, 3));
    vm.write(&mut v, Gpa(s.page_gpa(4))).unwrap();
    assert_eq!(v.exits, exits + 1, "the reset write-protected it again");
    assert_eq!(view.read(3), RingEntry::Dirty(page(4)));
    audit(&vm);
}

/// Whatever the VMM does through the view, the ring stays consistent: marking an entry
/// not pushed, one already reset, or one of another lap is `RingEntryNotDirty`; one it
/// never read `RingEntryNotRead`; each changes nothing. Marking twice and resetting twice
/// are no-ops. A reset stops at the first entry not marked, as KVM's.
#[test]
fn view_misuse_is_typed_and_changes_nothing() {
    let (_host, vm, s) = ring_vm(ring(4));
    let mut v = vm.create_vcpu().unwrap();
    let view = vm.dirty_ring(0).unwrap();
    let not_dirty = |index| Err(Error::RingEntryNotDirty { vcpu: 0, index });
    assert_eq!(view.mark_harvested(0), not_dirty(0), "never pushed");
    vm.write(&mut v, Gpa(s.page_gpa(7))).unwrap();
    vm.write(&mut v, Gpa(s.page_gpa(8))).unwrap();
    let before = snapshot(&vm);
    assert_eq!(
        view.mark_harvested(1),
        Err(Error::RingEntryNotRead { vcpu: 0, index: 1 })
    );
    assert_eq!(
        view.mark_harvested(5),
        not_dirty(5),
        "entry 1's place, a lap on"
    );
    assert_eq!(view.mark_harvested(u64::MAX), not_dirty(u64::MAX));
    assert_eq!(vm.reset_dirty_rings(), Ok(0), "nothing marked");
    assert_eq!(snapshot(&vm), before, "refused marks changed the VM");
    // Entry 1 marked, entry 0 not: the reset frees nothing (KVM stops at the first
    // unharvested entry).
    assert_eq!(view.read(1), RingEntry::Dirty(page(8)));
    assert_eq!(view.mark_harvested(1), Ok(true));
    assert_eq!(view.mark_harvested(1), Ok(false), "twice: no-op");
    assert_eq!(vm.reset_dirty_rings(), Ok(0));
    assert_eq!(view.read(0), RingEntry::Dirty(page(7)));
    assert_eq!(view.mark_harvested(0), Ok(true));
    assert_eq!(vm.reset_dirty_rings(), Ok(2));
    assert_eq!(vm.reset_dirty_rings(), Ok(0), "reset twice: no-op");
    assert_eq!(view.mark_harvested(0), not_dirty(0), "reset already");
    assert_eq!(view.read(0), RingEntry::Empty);
    audit(&vm);
}

/// `dirty_ring` refuses a bitmap VM and a vCPU that does not exist, as `harvest_dirty_ring`.
#[test]
fn dirty_ring_view_errors() {
    let (_host, vm, _s) = ring_vm(DirtyLogConfig::default());
    vm.create_vcpu().unwrap();
    assert!(matches!(vm.dirty_ring(0), Err(Error::WrongDirtyLogMode(_))));
    let (_host, vm, _s) = ring_vm(ring(16));
    vm.create_vcpu().unwrap();
    assert!(matches!(vm.dirty_ring(1), Err(Error::NoSuchVcpu(1))));
}

/// A vCPU thread writes every page of the slot, over and over, exiting on ring-full,
/// while the main thread harvests through the view (and, every other round, through
/// `harvest_dirty_ring`) and resets, concurrently: every entry read is a page the vCPU
/// wrote (complete, never zeroes), and after the last reset every page written since it
/// was last reset was reported.
#[test]
fn harvest_while_the_vcpu_runs() {
    const ROUNDS: u64 = 6;
    let (_host, vm, s) = ring_vm(ring(64));
    let vm = Arc::new(vm);
    let done = Arc::new(AtomicBool::new(false));
    let full_exits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (vm, done, full_exits) = (vm.clone(), done.clone(), full_exits.clone());
        std::thread::spawn(move || {
            let mut v = vm.create_vcpu().unwrap();
            for _ in 0..ROUNDS {
                for p in 0..PAGES {
                    loop {
                        match vm.write(&mut v, Gpa(s.page_gpa(p))) {
                            Ok(_) => break,
                            Err(Exit::DirtyRingFull) => {
                                full_exits.fetch_add(1, Ordering::Relaxed);
                                std::thread::yield_now();
                            }
                            Err(e) => panic!("write: {e}"),
                        }
                    }
                }
            }
            done.store(true, Ordering::Release);
        })
    };
    while vm.dirty_ring(0).is_err() {
        std::thread::yield_now();
    }
    let view = vm.dirty_ring(0).unwrap();
    let mut fetch = 0u64;
    let mut reported = 0u64;
    let mut round = 0u64;
    let mut out = Vec::new();
    loop {
        let finished = done.load(Ordering::Acquire);
        round += 1;
        if round.is_multiple_of(2) {
            out.clear();
            vm.harvest_dirty_ring(0, &mut out).unwrap();
            for e in &out {
                assert!(e.slot == 0 && e.offset < PAGES, "{e:?}");
            }
            reported += out.len() as u64;
            fetch = view.counters().1;
        } else {
            while let RingEntry::Dirty(e) = view.read(fetch) {
                assert!(e.slot == 0 && e.offset < PAGES, "incomplete entry {e:?}");
                assert_eq!(view.mark_harvested(fetch), Ok(true));
                fetch += 1;
                reported += 1;
            }
        }
        vm.reset_dirty_rings().unwrap();
        if finished {
            break;
        }
        std::thread::yield_now();
    }
    writer.join().unwrap();
    // Everything the vCPU pushed was reported and reset; nothing is writable unlogged.
    let (pushed, _, reset) = view.counters();
    assert_eq!(pushed, reported, "entries pushed but never reported");
    assert_eq!(reset, pushed);
    assert!(pushed >= PAGES, "each page at least once: {pushed}");
    let mut left = Vec::new();
    assert_eq!(vm.harvest_dirty_ring(0, &mut left), Ok(0));
    audit(&vm);
    eprintln!(
        "{pushed} entries, {} ring-full exits",
        full_exits.load(Ordering::Relaxed)
    );
}

/// KVM's ring sizes: 256 to 65536 entries (one page of 16-byte entries up to
/// KVM_DIRTY_RING_MAX_ENTRIES), refused otherwise before anything is allocated; the
/// vCPU exits 64 entries before full (KVM_DIRTY_RING_RSVD_ENTRIES), where KVM's would.
#[test]
fn kvm_ring_limits() {
    let kvm = |size| DirtyLogConfig {
        ring_size: Some(size),
        ring_limits: RingLimits::Kvm,
        ..DirtyLogConfig::default()
    };
    for bad in [4, 128, 255, 300, 1 << 17, 1 << 20] {
        let got = Vm::with_allocator(
            VmConfig {
                dirty_log: kvm(bad),
                ..VmConfig::default()
            },
            Arc::new(SimHostMemory::new()),
            Arc::new(vmmu_testing::FailingAllocator::new()),
        );
        assert!(
            matches!(got, Err(Error::InvalidRingSize { size }) if size == bad),
            "{bad}"
        );
    }
    assert_eq!(RingLimits::Kvm.bounds(), (256, 65536));
    assert_eq!(RingLimits::Vmmu.bounds(), (4, 1 << 20));
    let (_host, vm, s) = ring_vm(kvm(256));
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(vm.dirty_ring(0).unwrap().soft_limit(), 192);
    for p in 0..191 {
        vm.write(&mut v, Gpa(s.page_gpa(p))).unwrap();
    }
    assert!(!v.dirty_ring_soft_full());
    // The 192nd entry makes the ring soft-full: the vCPU exits before the write completes.
    assert_eq!(
        vm.write(&mut v, Gpa(s.page_gpa(191))),
        Err(Exit::DirtyRingFull)
    );
    assert!(v.dirty_ring_soft_full());
    assert_eq!(
        vm.write(&mut v, Gpa(s.page_gpa(200))),
        Err(Exit::DirtyRingFull)
    );
    let mut out = Vec::new();
    assert_eq!(vm.harvest_dirty_ring(0, &mut out), Ok(192));
    assert_eq!(vm.reset_dirty_rings(), Ok(192));
    vm.write(&mut v, Gpa(s.page_gpa(200))).unwrap();
    audit(&vm);
}

/// The backup bitmap's rules, as KVM's: only with a ring (in the config, or enabled
/// later), and enabled only while no memslot exists.
#[test]
fn ring_with_bitmap_rules() {
    let got = Vm::with_allocator(
        VmConfig {
            dirty_log: DirtyLogConfig {
                ring_with_bitmap: true,
                ..DirtyLogConfig::default()
            },
            ..VmConfig::default()
        },
        Arc::new(SimHostMemory::new()),
        Arc::new(vmmu_testing::FailingAllocator::new()),
    );
    assert!(matches!(got, Err(Error::InvalidConfig(_))), "no ring");
    // Enabled later: not on a bitmap VM, not once a memslot exists.
    let (_host, vm) = new_vm(VmConfig::default());
    assert!(matches!(
        vm.enable_dirty_ring_with_bitmap(),
        Err(Error::WrongDirtyLogMode(_))
    ));
    let (_host, vm, _s) = ring_vm(ring(16));
    assert_eq!(
        vm.enable_dirty_ring_with_bitmap(),
        Err(Error::MemslotsExist)
    );
    assert_eq!(
        vm.mark_page_dirty(Gpa(G1)),
        Err(Error::DirtyWithoutVcpu { gpa: Gpa(G1) }),
        "still without the bitmap"
    );
    let (_host, vm) = new_vm(VmConfig {
        dirty_log: ring(16),
        ..VmConfig::default()
    });
    assert_eq!(vm.enable_dirty_ring_with_bitmap(), Ok(()));
    assert_eq!(vm.enable_dirty_ring_with_bitmap(), Ok(()), "again: no-op");
    let mut bits = [0u64; 4];
    assert!(
        matches!(vm.get_dirty_log(0, &mut bits), Err(Error::NoSuchSlot(0))),
        "GET is open now"
    );
}

/// With the backup bitmap, a write outside any vCPU context lands in the slot's bitmap
/// and GET harvests it (and write-protects as in bitmap mode); the vCPUs' writes still go
/// to their rings only. Without it, such a write is refused with a typed error (KVM would
/// lose it), and GET stays closed.
#[test]
fn ring_with_bitmap_logs_writes_without_a_vcpu() {
    for enable_later in [false, true] {
        let config = DirtyLogConfig {
            ring_size: Some(16),
            ring_with_bitmap: !enable_later,
            ..DirtyLogConfig::default()
        };
        let (host, vm) = new_vm(VmConfig {
            dirty_log: config,
            ..VmConfig::default()
        });
        if enable_later {
            vm.enable_dirty_ring_with_bitmap().unwrap();
        }
        let s = logging_slot(&host, &vm);
        let h2 = mmap(&host, 16 * PAGE_SIZE, Backing::Page4K);
        add_slot(
            &vm,
            SlotSpec {
                id: 1,
                gpa: 2 * G1,
                size: 16 * PAGE_SIZE,
                hva: h2,
                flags: MemslotFlags::empty(),
            },
        );
        let mut v = vm.create_vcpu().unwrap();
        vm.write(&mut v, Gpa(s.page_gpa(2))).unwrap();
        assert_eq!(vm.mark_page_dirty(Gpa(s.page_gpa(9) + 8)), Ok(true));
        assert_eq!(vm.mark_page_dirty(Gpa(s.page_gpa(70))), Ok(true));
        assert_eq!(vm.mark_page_dirty(Gpa(2 * G1)), Ok(false), "not logging");
        assert_eq!(vm.mark_page_dirty(Gpa(5 * G1)), Ok(false), "no memslot");
        let mut bits = [0u64; 4];
        let r = vm.get_dirty_log(0, &mut bits).unwrap();
        assert_eq!(r.dirty_pages, 2);
        assert_eq!(
            bits,
            [1 << 9, 1 << (70 - 64), 0, 0],
            "the vCPU's write is not here"
        );
        let mut out = Vec::new();
        assert_eq!(vm.harvest_dirty_ring(0, &mut out), Ok(1));
        assert_eq!(out, [page(2)], "the host's writes are not in the ring");
        assert_eq!(vm.get_dirty_log(0, &mut bits).unwrap().dirty_pages, 0);
        assert_eq!(vm.reset_dirty_rings(), Ok(1));
        audit(&vm);
    }
    // Without the bitmap.
    let (_host, vm, s) = ring_vm(ring(16));
    let before = snapshot(&vm);
    let gpa = Gpa(s.page_gpa(9));
    assert_eq!(
        vm.mark_page_dirty(gpa),
        Err(Error::DirtyWithoutVcpu { gpa })
    );
    assert_eq!(snapshot(&vm), before);
    let mut bits = [0u64; 4];
    assert!(matches!(
        vm.get_dirty_log(0, &mut bits),
        Err(Error::WrongDirtyLogMode(_))
    ));
}

/// In bitmap mode `mark_page_dirty` marks the bitmap too (KVM's `mark_page_dirty` with
/// no vCPU), and GET reports it with the vCPUs' writes.
#[test]
fn mark_page_dirty_in_bitmap_mode() {
    let (_host, vm, s) = ring_vm(DirtyLogConfig::default());
    let mut v = vm.create_vcpu().unwrap();
    vm.write(&mut v, Gpa(s.page_gpa(1))).unwrap();
    assert_eq!(vm.mark_page_dirty(Gpa(s.page_gpa(5))), Ok(true));
    let mut bits = [0u64; 4];
    vm.get_dirty_log(0, &mut bits).unwrap();
    let pages: BTreeSet<u64> = (0..PAGES)
        .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    assert_eq!(pages, [1, 5].into_iter().collect());
    audit(&vm);
}
