//! Typed errors: every error path of the public API returns its `vmmu::Error` variant, with
//! a clear message, and changes nothing (the tables with their A/D bits, the slots and
//! their generation, the dirty bitmaps and the counters are identical before and after;
//! `vmmu_testing::view::snapshot`). The differential tests check the same for random
//! calls against the reference model; this file names each path once.

use std::sync::Arc;

use vmmu::host::{Backing, SimHostMemory};
use vmmu::memslot::MemslotLimits;
use vmmu::types::{Gfn, Gpa, Hva};
use vmmu::Vcpu;
use vmmu::{DirtyLogConfig, Error, Exit, MemoryRegion, MemslotFlags, Vm, VmConfig};
use vmmu_testing::view::{snapshot, SimVm};
use vmmu_testing::MMUS;

const G1: u64 = 1 << 30;
const M1: u64 = 1 << 20;

/// The variant's name: an exhaustive match, so a new variant does not compile until it is
/// named here, in the docs' table (error.rs) and in `every_variant_has_a_message`.
fn name(e: &Error) -> &'static str {
    match e {
        Error::InvalidSlotId { .. } => "InvalidSlotId",
        Error::InvalidFlags(_) => "InvalidFlags",
        Error::UnalignedGuestPhysAddr(_) => "UnalignedGuestPhysAddr",
        Error::UnalignedSize(_) => "UnalignedSize",
        Error::UnalignedUserspaceAddr(_) => "UnalignedUserspaceAddr",
        Error::ZeroSize { .. } => "ZeroSize",
        Error::AddressOverflow => "AddressOverflow",
        Error::SlotTooLarge { .. } => "SlotTooLarge",
        Error::BeyondGuestPhysWidth { .. } => "BeyondGuestPhysWidth",
        Error::Overlap { .. } => "Overlap",
        Error::NoSuchSlot(_) => "NoSuchSlot",
        Error::TooManySlots { .. } => "TooManySlots",
        Error::SlotResize { .. } => "SlotResize",
        Error::SlotHvaChange { .. } => "SlotHvaChange",
        Error::ReadonlyFlagChange { .. } => "ReadonlyFlagChange",
        Error::InvalidRange { .. } => "InvalidRange",
        Error::InvalidPreFaultRange { .. } => "InvalidPreFaultRange",
        Error::PreFaultNoMemslot { .. } => "PreFaultNoMemslot",
        Error::PreFaultRetry { .. } => "PreFaultRetry",
        Error::NoHostMapping { .. } => "NoHostMapping",
        Error::HostReadOnly { .. } => "HostReadOnly",
        Error::HostPfnTooLarge { .. } => "HostPfnTooLarge",
        Error::InvalidationInProgress { .. } => "InvalidationInProgress",
        Error::OutOfTableMemory => "OutOfTableMemory",
        Error::FaultLoop { .. } => "FaultLoop",
        Error::NotLogging(_) => "NotLogging",
        Error::BitmapTooSmall { .. } => "BitmapTooSmall",
        Error::ClearLogUnaligned { .. } => "ClearLogUnaligned",
        Error::ClearLogRange { .. } => "ClearLogRange",
        Error::WrongDirtyLogMode(_) => "WrongDirtyLogMode",
        Error::NoSuchVcpu(_) => "NoSuchVcpu",
        Error::ForeignVcpu { .. } => "ForeignVcpu",
        Error::DirtyRingFull { .. } => "DirtyRingFull",
        Error::InvalidHvaRange { .. } => "InvalidHvaRange",
        Error::WriteTrackCount { .. } => "WriteTrackCount",
        Error::NoInvalidationInProgress => "NoInvalidationInProgress",
        Error::InvalidConfig(_) => "InvalidConfig",
        Error::InvalidRingSize { .. } => "InvalidRingSize",
        Error::TooManyVcpus { .. } => "TooManyVcpus",
        Error::GuestMemory { .. } => "GuestMemory",
        Error::WrongPagingMode(_) => "WrongPagingMode",
        Error::NonCanonical { .. } => "NonCanonical",
        Error::Unaligned { .. } => "Unaligned",
        Error::RingEntryNotDirty { .. } => "RingEntryNotDirty",
        Error::RingEntryNotRead { .. } => "RingEntryNotRead",
        Error::DirtyWithoutVcpu { .. } => "DirtyWithoutVcpu",
        Error::MemslotsExist => "MemslotsExist",
        Error::ChangePteRemoved => "ChangePteRemoved",
        Error::NoKick => "NoKick",
        Error::NotRunLoopVcpu { .. } => "NotRunLoopVcpu",
        Error::InGuestMode { .. } => "InGuestMode",
        Error::NotInGuestMode { .. } => "NotInGuestMode",
        Error::InvalidExitQualification { .. } => "InvalidExitQualification",
    }
}

#[test]
fn every_variant_has_a_message() {
    let all = [
        Error::InvalidSlotId { slot: 9, limit: 8 },
        Error::InvalidFlags(4),
        Error::UnalignedGuestPhysAddr(1),
        Error::UnalignedSize(1),
        Error::UnalignedUserspaceAddr(1),
        Error::ZeroSize { slot: 1 },
        Error::AddressOverflow,
        Error::SlotTooLarge {
            slot: 1,
            pages: 1 << 36,
            max: (1 << 31) - 1,
        },
        Error::BeyondGuestPhysWidth {
            end: 1 << 49,
            width_bits: 48,
        },
        Error::Overlap { slot: 1, other: 0 },
        Error::NoSuchSlot(3),
        Error::TooManySlots { max: 2 },
        Error::SlotResize { slot: 1 },
        Error::SlotHvaChange { slot: 1 },
        Error::ReadonlyFlagChange { slot: 1 },
        Error::InvalidRange { start: 5, end: 5 },
        Error::InvalidPreFaultRange {
            gpa: Gpa(0x1001),
            size: 0x1000,
            why: "gpa and size must be multiples of 4 KiB",
        },
        Error::PreFaultNoMemslot { gpa: Gpa(0x1000) },
        Error::PreFaultRetry { gpa: Gpa(0x1000) },
        Error::NoHostMapping {
            gpa: Gpa(0x1000),
            hva: Hva(0x2000),
        },
        Error::HostReadOnly {
            gpa: Gpa(0x1000),
            hva: Hva(0x2000),
        },
        Error::HostPfnTooLarge {
            hva: Hva(0x2000),
            pfn: vmmu::types::Pfn(1 << 40),
        },
        Error::InvalidationInProgress { gpa: Gpa(0x1000) },
        Error::OutOfTableMemory,
        Error::FaultLoop { gpa: Gpa(0x1000) },
        Error::NotLogging(2),
        Error::BitmapTooSmall { needed: 4, got: 1 },
        Error::ClearLogUnaligned { first_page: 3 },
        Error::ClearLogRange {
            first_page: 64,
            num_pages: 9,
            npages: 100,
        },
        Error::WrongDirtyLogMode("why"),
        Error::NoSuchVcpu(7),
        Error::ForeignVcpu { vcpu: 3 },
        Error::DirtyRingFull { vcpu: 3 },
        Error::InvalidHvaRange { start: 9, end: 1 },
        Error::WriteTrackCount { gfn: 5 },
        Error::NoInvalidationInProgress,
        Error::InvalidConfig("why"),
        Error::InvalidRingSize { size: 3 },
        Error::TooManyVcpus { max: 1 },
        Error::GuestMemory {
            gpa: vmmu::types::Gpa(0x1004),
        },
        Error::WrongPagingMode("why"),
        Error::NonCanonical {
            gva: vmmu::types::Gva(1 << 50),
        },
        Error::Unaligned {
            gva: vmmu::types::Gva(4),
        },
        Error::RingEntryNotDirty { vcpu: 1, index: 9 },
        Error::RingEntryNotRead { vcpu: 1, index: 9 },
        Error::DirtyWithoutVcpu { gpa: Gpa(0x1000) },
        Error::MemslotsExist,
        Error::ChangePteRemoved,
        Error::NoKick,
        Error::NotRunLoopVcpu { vcpu: 1 },
        Error::InGuestMode { vcpu: 1 },
        Error::NotInGuestMode { vcpu: 1 },
        Error::InvalidExitQualification {
            qualification: 0,
            why: "why",
        },
    ];
    let mut seen = std::collections::BTreeSet::new();
    for e in &all {
        assert!(seen.insert(name(e)), "{} twice", name(e));
        let msg = e.to_string();
        assert!(msg.len() > 15, "{}: message too short: {msg:?}", name(e));
        assert!(
            !msg.contains("Error"),
            "{}: message is a Debug dump: {msg:?}",
            name(e)
        );
        // std::error::Error is implemented, and the message is what an Exit shows too.
        let dynerr: &dyn std::error::Error = e;
        assert_eq!(dynerr.to_string(), Exit::Error(e.clone()).to_string());
    }
    let doc = include_str!("../src/error.rs");
    for e in &all {
        assert!(
            doc.contains(&format!("[`{}`](Error::{})", name(e), name(e))),
            "{} missing from error.rs's table",
            name(e)
        );
    }
}

struct Env {
    host: Arc<SimHostMemory>,
    vm: SimVm,
    vcpus: Vec<Vcpu>,
    hva: u64,
}

/// A VM with slot 0 (4 MiB THP at 1 GiB, logging, some pages written and mapped) and
/// slot 1 (1 MiB of 4K pages at 1 GiB + 8 MiB, not logging), two vCPUs.
fn env(mmu: vmmu::MmuKind, dirty_log: DirtyLogConfig) -> Env {
    let host = Arc::new(SimHostMemory::new());
    let hva = host.mmap(4 * M1, Backing::Thp, true).unwrap().0;
    let h1 = host.mmap(M1, Backing::Page4K, true).unwrap().0;
    let config = VmConfig {
        mmu,
        dirty_log,
        limits: MemslotLimits {
            max_slots: 3,
            ..MemslotLimits::default()
        },
        max_vcpus: 2,
        ..VmConfig::default()
    };
    let vm = Vm::new(config, host.clone());
    vm.set_user_memory_region(region(0, G1, 4 * M1, hva, MemslotFlags::LOG_DIRTY_PAGES))
        .unwrap();
    vm.set_user_memory_region(region(1, G1 + 8 * M1, M1, h1, MemslotFlags::empty()))
        .unwrap();
    let mut vcpus: Vec<Vcpu> = (0..2).map(|_| vm.create_vcpu().unwrap()).collect();
    for p in 0..40u64 {
        let v = &mut vcpus[(p % 2) as usize];
        if p % 3 == 0 {
            vm.write(v, Gpa(G1 + p * 4096)).unwrap();
        } else {
            vm.read(v, Gpa(G1 + 8 * M1 + p * 4096)).unwrap();
        }
    }
    vm.track_write(Gfn((G1 >> 12) + 100)).unwrap();
    Env {
        host,
        vm,
        vcpus,
        hva,
    }
}

fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: MemslotFlags) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

/// `f` fails with `want` and the VM is exactly as before.
#[track_caller]
fn rejects<T: std::fmt::Debug>(
    e: &mut Env,
    what: &str,
    want: Error,
    f: impl FnOnce(&mut Env) -> Result<T, Error>,
) {
    let before = snapshot(&e.vm, &e.vcpus);
    let got = f(e);
    match got {
        Err(g) => assert_eq!(g, want, "{what}"),
        Ok(v) => panic!("{what}: accepted ({v:?}), expected {want:?}"),
    }
    let after = snapshot(&e.vm, &e.vcpus);
    assert!(
        after == before,
        "{what}: rejected with {want:?} but changed the VM: {}",
        vmmu_testing::interp::diff(&before, &after)
    );
}

fn bitmap_mode_paths(mmu: vmmu::MmuKind, manual: bool) {
    let mut e = env(
        mmu,
        DirtyLogConfig {
            manual_protect: manual,
            ..DirtyLogConfig::default()
        },
    );
    let hva = e.hva;
    let set = |r: MemoryRegion| move |e: &mut Env| e.vm.set_user_memory_region(r);
    let log = MemslotFlags::LOG_DIRTY_PAGES;
    rejects(
        &mut e,
        "slot id",
        Error::InvalidSlotId {
            slot: 40000,
            limit: 32768,
        },
        set(region(40000, 0, 4096, hva, log)),
    );
    rejects(
        &mut e,
        "unaligned size",
        Error::UnalignedSize(4097),
        set(region(2, 0, 4097, hva, log)),
    );
    rejects(
        &mut e,
        "unaligned gpa",
        Error::UnalignedGuestPhysAddr(0x1001),
        set(region(2, 0x1001, 4096, hva, log)),
    );
    rejects(
        &mut e,
        "unaligned hva",
        Error::UnalignedUserspaceAddr(hva + 8),
        set(region(2, 0, 4096, hva + 8, log)),
    );
    rejects(
        &mut e,
        "delete missing",
        Error::ZeroSize { slot: 2 },
        set(region(2, 0, 0, hva, log)),
    );
    rejects(
        &mut e,
        "overflow",
        Error::AddressOverflow,
        set(region(2, !0xfff, 0x2000, hva, log)),
    );
    rejects(
        &mut e,
        "width",
        Error::BeyondGuestPhysWidth {
            end: (1 << 48) + 4096,
            width_bits: 48,
        },
        set(region(2, 1 << 48, 4096, hva, log)),
    );
    rejects(
        &mut e,
        "overlap",
        Error::Overlap { slot: 2, other: 0 },
        set(region(2, G1 + M1, 4096, hva, log)),
    );
    rejects(
        &mut e,
        "resize",
        Error::SlotResize { slot: 0 },
        set(region(0, G1, 2 * M1, hva, log)),
    );
    rejects(
        &mut e,
        "hva change",
        Error::SlotHvaChange { slot: 0 },
        set(region(0, G1, 4 * M1, hva + 4096, log)),
    );
    rejects(
        &mut e,
        "readonly change",
        Error::ReadonlyFlagChange { slot: 0 },
        set(region(0, G1, 4 * M1, hva, log | MemslotFlags::READONLY)),
    );
    let h1 = e.host_hva_of_slot1(0);
    rejects(
        &mut e,
        "move onto another",
        Error::Overlap { slot: 1, other: 0 },
        set(region(1, G1, M1, h1, MemslotFlags::empty())),
    );
    e.vm.set_user_memory_region(region(2, 3 * G1, 4096, hva, MemslotFlags::empty()))
        .unwrap();
    rejects(
        &mut e,
        "too many",
        Error::TooManySlots { max: 3 },
        set(region(3, 4 * G1, 4096, hva, log)),
    );
    assert_eq!(MemslotFlags::from_bits(8), Err(Error::InvalidFlags(8)));

    rejects(
        &mut e,
        "zap empty",
        Error::InvalidRange { start: 5, end: 5 },
        |e| e.vm.zap_gfn_range(Gfn(5), Gfn(5)),
    );
    rejects(
        &mut e,
        "zap reversed",
        Error::InvalidRange { start: 9, end: 2 },
        |e| e.vm.zap_gfn_range(Gfn(9), Gfn(2)),
    );
    rejects(
        &mut e,
        "zap past width",
        Error::InvalidRange {
            start: 0,
            end: (1 << 36) + 1,
        },
        |e| e.vm.zap_gfn_range(Gfn(0), Gfn((1 << 36) + 1)),
    );
    rejects(&mut e, "zap slot", Error::NoSuchSlot(7), |e| {
        e.vm.zap_memslot(7)
    });
    rejects(
        &mut e,
        "track outside",
        Error::InvalidRange { start: 5, end: 6 },
        |e| e.vm.track_write(Gfn(5)),
    );
    rejects(
        &mut e,
        "track last gfn",
        Error::InvalidRange {
            start: u64::MAX,
            end: u64::MAX,
        },
        |e| e.vm.track_write(Gfn(u64::MAX)),
    );
    rejects(
        &mut e,
        "untrack untracked",
        Error::WriteTrackCount {
            gfn: (G1 >> 12) + 101,
        },
        |e| e.vm.untrack_write(Gfn((G1 >> 12) + 101)),
    );
    rejects(
        &mut e,
        "untrack outside",
        Error::InvalidRange { start: 5, end: 6 },
        |e| e.vm.untrack_write(Gfn(5)),
    );
    rejects(
        &mut e,
        "invalidate reversed",
        Error::InvalidHvaRange {
            start: hva + 4096,
            end: hva,
        },
        |e| e.vm.invalidate_range_start(Hva(hva + 4096), Hva(hva)),
    );
    rejects(
        &mut e,
        "unmap empty",
        Error::InvalidHvaRange {
            start: hva,
            end: hva,
        },
        |e| e.vm.unmap_hva_range(Hva(hva), Hva(hva)),
    );
    rejects(
        &mut e,
        "age reversed",
        Error::InvalidHvaRange { start: 9, end: 1 },
        |e| e.vm.age_hva_range(Hva(9), Hva(1)),
    );
    rejects(
        &mut e,
        "test_age reversed",
        Error::InvalidHvaRange { start: 9, end: 1 },
        |e| e.vm.test_age_hva_range(Hva(9), Hva(1)),
    );
    // change_pte is a compatibility option, off here (its own errors are checked with
    // it on in tests/notifier.rs): refused before its arguments are looked at.
    rejects(
        &mut e,
        "change_pte without the compatibility option",
        Error::ChangePteRemoved,
        |e| e.vm.change_pte(Hva(u64::MAX), vmmu::types::Pfn(1), true),
    );
    rejects(
        &mut e,
        "change_pte of a mapped page without the compatibility option",
        Error::ChangePteRemoved,
        |e| e.vm.change_pte(Hva(hva), vmmu::types::Pfn(1), false),
    );
    rejects(
        &mut e,
        "end without start",
        Error::NoInvalidationInProgress,
        |e| e.vm.invalidate_range_end(),
    );
    rejects(&mut e, "third vCPU", Error::TooManyVcpus { max: 2 }, |e| {
        e.vm.create_vcpu().map(|v| v.id)
    });

    let mut big = vec![0u64; 64];
    rejects(&mut e, "get no slot", Error::NoSuchSlot(9), |e| {
        e.vm.get_dirty_log(9, &mut big)
    });
    rejects(&mut e, "get not logging", Error::NotLogging(1), |e| {
        e.vm.get_dirty_log(1, &mut big)
    });
    rejects(
        &mut e,
        "get short",
        Error::BitmapTooSmall {
            needed: 16,
            got: 15,
        },
        |e| e.vm.get_dirty_log(0, &mut big[..15]),
    );
    rejects(
        &mut e,
        "harvest ring",
        Error::WrongDirtyLogMode("the VM logs dirty pages in bitmaps, not rings"),
        |e| e.vm.harvest_dirty_ring(0, &mut Vec::new()),
    );
    rejects(&mut e, "harvest no vCPU", Error::NoSuchVcpu(5), |e| {
        e.vm.harvest_dirty_ring(5, &mut Vec::new())
    });
    rejects(
        &mut e,
        "reset",
        Error::WrongDirtyLogMode("the VM logs dirty pages in bitmaps, not rings"),
        |e| e.vm.reset_dirty_rings(),
    );
    let ones = vec![u64::MAX; 64];
    if !manual {
        rejects(
            &mut e,
            "clear without manual",
            Error::WrongDirtyLogMode("clear_dirty_log needs manual protect"),
            |e| e.vm.clear_dirty_log(0, 0, 64, &ones),
        );
        return;
    }
    rejects(&mut e, "clear no slot", Error::NoSuchSlot(9), |e| {
        e.vm.clear_dirty_log(9, 0, 64, &ones)
    });
    rejects(&mut e, "clear not logging", Error::NotLogging(1), |e| {
        e.vm.clear_dirty_log(1, 0, 64, &ones)
    });
    rejects(
        &mut e,
        "clear misaligned",
        Error::ClearLogUnaligned { first_page: 3 },
        |e| e.vm.clear_dirty_log(0, 3, 64, &ones),
    );
    rejects(
        &mut e,
        "clear past the end",
        Error::ClearLogRange {
            first_page: 1024,
            num_pages: 64,
            npages: 1024,
        },
        |e| e.vm.clear_dirty_log(0, 1024, 64, &ones),
    );
    rejects(
        &mut e,
        "clear huge count",
        Error::ClearLogRange {
            first_page: 64,
            num_pages: u64::MAX,
            npages: 1024,
        },
        |e| e.vm.clear_dirty_log(0, 64, u64::MAX, &ones),
    );
    rejects(
        &mut e,
        "clear odd count",
        Error::ClearLogRange {
            first_page: 0,
            num_pages: 65,
            npages: 1024,
        },
        |e| e.vm.clear_dirty_log(0, 0, 65, &ones),
    );
    rejects(
        &mut e,
        "clear short",
        Error::BitmapTooSmall { needed: 2, got: 1 },
        |e| e.vm.clear_dirty_log(0, 0, 128, &ones[..1]),
    );
    let _ = &e.host;
}

#[test]
fn rejected_calls_change_nothing_bitmap_modes() {
    if vmmu_testing::skip_rerun("rejected_calls_change_nothing_bitmap_modes") {
        return;
    }
    for &(name, mmu) in MMUS {
        for manual in [false, true] {
            eprintln!("{name}, manual protect {manual}");
            bitmap_mode_paths(mmu, manual);
        }
    }
}

#[test]
fn rejected_calls_change_nothing_ring_mode() {
    if vmmu_testing::skip_rerun("rejected_calls_change_nothing_ring_mode") {
        return;
    }
    for &(_, mmu) in MMUS {
        let mut e = env(
            mmu,
            DirtyLogConfig {
                ring_size: Some(64),
                ..DirtyLogConfig::default()
            },
        );
        let ring = "the VM logs dirty pages in per-vCPU rings";
        rejects(&mut e, "get", Error::WrongDirtyLogMode(ring), |e| {
            e.vm.get_dirty_log(0, &mut [0; 64])
        });
        rejects(&mut e, "clear", Error::WrongDirtyLogMode(ring), |e| {
            e.vm.clear_dirty_log(0, 0, 64, &[0; 1])
        });
        rejects(&mut e, "harvest no vCPU", Error::NoSuchVcpu(2), |e| {
            e.vm.harvest_dirty_ring(2, &mut Vec::new())
        });
    }
}

#[test]
fn guest_access_errors_are_typed() {
    if vmmu_testing::skip_rerun("guest_access_errors_are_typed") {
        return;
    }
    for &(_, mmu) in MMUS {
        let mut e = env(mmu, DirtyLogConfig::default());
        let gpa = Gpa(G1 + 8 * M1 + 5 * 4096 + 8);
        let hva = Hva(e.host_hva_of_slot1(5));
        // The host unmaps the page (and says so): the access is an error, not a mapping.
        e.vm.invalidate_range_start(hva, Hva(hva.0 + 4096)).unwrap();
        e.host.munmap(hva, 4096).unwrap();
        e.vm.invalidate_range_end().unwrap();
        let (vm, v) = (&e.vm, &mut e.vcpus[0]);
        assert_eq!(
            vm.read(v, gpa),
            Err(Exit::Error(Error::NoHostMapping { gpa, hva }))
        );
        // Read-only host memory: a write is an error.
        let gpa2 = Gpa(G1 + 8 * M1 + 9 * 4096);
        let hva2 = Hva(hva.0 + 4 * 4096);
        vm.invalidate_range_start(hva2, Hva(hva2.0 + 4096)).unwrap();
        e.host.set_writable(hva2, 4096, false).unwrap();
        vm.invalidate_range_end().unwrap();
        assert_eq!(
            vm.write(v, gpa2),
            Err(Exit::Error(Error::HostReadOnly {
                gpa: gpa2,
                hva: hva2
            }))
        );
        assert!(vm.read(v, gpa2).is_ok());
        // Beyond the guest-physical width.
        let far = Gpa(1 << 48);
        assert_eq!(
            vm.read(v, far),
            Err(Exit::Error(Error::InvalidRange {
                start: 1 << 36,
                end: (1 << 36) + 1
            }))
        );
        vm.audit().unwrap();
    }
}

impl Env {
    fn host_hva_of_slot1(&self, page: u64) -> u64 {
        let t = vmmu_testing::view::read_tables(&self.vm, &self.vcpus, &[]);
        t.slots.iter().find(|s| s.0 == 1).unwrap().3 + page * 4096
    }
}

#[test]
fn invalid_configurations_are_typed() {
    for gpa_bits in [31u8, 49] {
        let r = Vm::with_allocator(
            VmConfig {
                limits: MemslotLimits {
                    gpa_bits,
                    ..MemslotLimits::default()
                },
                ..VmConfig::default()
            },
            Arc::new(SimHostMemory::new()),
            Arc::new(vmmu::table::HeapTableAllocator::new()),
        );
        assert!(
            matches!(r, Err(Error::InvalidConfig(_))),
            "gpa_bits {gpa_bits}"
        );
    }
}

/// A dirty-ring size that is not a power of two from 4 to 2^20 entries is refused when
/// the VM is created, before any table or ring is allocated (0 used to become 2,
/// `u32::MAX` aborted on a 64 GiB ring in `create_vcpu`).
#[test]
fn ring_sizes_are_validated_before_anything_is_allocated() {
    let min = DirtyLogConfig::MIN_RING_ENTRIES;
    let max = DirtyLogConfig::MAX_RING_ENTRIES;
    assert_eq!((min, max), (4, 1 << 20));
    for &(name, mmu) in MMUS {
        for size in [0, 1, 2, 3, 48, 1000, max + 1, max << 1, 1 << 31, u32::MAX] {
            let alloc = Arc::new(vmmu_testing::FailingAllocator::new());
            let r = Vm::with_allocator(
                VmConfig {
                    mmu,
                    dirty_log: DirtyLogConfig {
                        ring_size: Some(size),
                        ..DirtyLogConfig::default()
                    },
                    ..VmConfig::default()
                },
                Arc::new(SimHostMemory::new()),
                alloc.clone(),
            );
            assert_eq!(
                r.err(),
                Some(Error::InvalidRingSize { size }),
                "{name}: ring size {size}"
            );
            assert_eq!(
                alloc.attempts(),
                0,
                "{name}: ring size {size}: allocated a table"
            );
        }
        for size in [min, 256, max] {
            let vm = Vm::with_allocator(
                VmConfig {
                    mmu,
                    dirty_log: DirtyLogConfig {
                        ring_size: Some(size),
                        ..DirtyLogConfig::default()
                    },
                    ..VmConfig::default()
                },
                Arc::new(SimHostMemory::new()),
                Arc::new(vmmu::table::HeapTableAllocator::new()),
            )
            .unwrap_or_else(|e| panic!("{name}: ring size {size}: {e}"));
            vm.create_vcpu().unwrap();
        }
    }
}
