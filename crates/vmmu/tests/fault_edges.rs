//! The edges of a fault (issue 13, finding 9): what a hostile or careless host, VMM or
//! guest can hand the MMU, each answered with a typed error or the fault KVM reports,
//! never a corrupted SPTE, a panic or a hang.
//!
//! - a host frame number too wide for an SPTE (40 bits), from the host or `change_pte`;
//! - the shadow-paging write-track count (u16) already full when a guest table must be
//!   shadowed;
//! - a guest page-table entry that points outside guest memory, or outside every memslot
//!   (a guest page fault, as KVM's `walk_addr_generic` reports it);
//! - an access that hits its own embedder's open invalidation window (single-threaded: it
//!   can never close while the access waits).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
use vmmu::host::{Backing, HostMemory, HostPage, SimHostMemory};
use vmmu::types::{AccessKind, ErrorCode, Gfn, Gpa, Gva, Hva, Level, Pfn, PAGE_SIZE};
use vmmu::{Error, Exit, MemoryRegion, MemslotFlags, MmuKind, PagingConfig, Vm, VmConfig};
use vmmu_testing::MMUS;

const G1: u64 = 1 << 30;
const HVA: u64 = 0x7f00_0000_0000;
/// A frame with bits 45 and 46 set: shifted into an SPTE, they land on the host-writable
/// and MMU-writable software bits (57, 58).
const WIDE_PFN: u64 = (3 << 45) | 0x1234;

/// A host mapping 16 read-only 4K pages at `HVA` to frames far beyond 40 bits.
struct WideHost;

impl HostMemory for WideHost {
    fn translate(&self, hva: Hva) -> Option<HostPage> {
        let page = hva.0.checked_sub(HVA)? / PAGE_SIZE;
        (page < 16).then_some(HostPage {
            pfn: Pfn(WIDE_PFN + page),
            level: Level::L4K,
            writable: false,
        })
    }
}

fn region(slot: u32, gpa: u64, size: u64, hva: u64) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags: MemslotFlags::empty(),
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

/// A host frame of 2^40 or more never reaches an SPTE: the fault fails with a typed error
/// (in release, the frame's high bits used to become the host-writable and MMU-writable
/// bits, and a write to the read-only page then went through the fast path).
#[test]
fn host_frame_too_wide_for_an_spte_is_a_typed_error() {
    if vmmu_testing::skip_rerun("host_frame_too_wide_for_an_spte_is_a_typed_error") {
        return;
    }
    for &(name, mmu) in MMUS {
        let vm = Vm::new(
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
            WideHost,
        );
        vm.set_user_memory_region(region(0, G1, 16 * PAGE_SIZE, HVA))
            .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        let gpa = Gpa(G1 + 3 * PAGE_SIZE);
        let want = Err(Exit::Error(Error::HostPfnTooLarge {
            hva: Hva(HVA + 3 * PAGE_SIZE),
            pfn: Pfn(WIDE_PFN + 3),
        }));
        assert_eq!(vm.read(&mut vcpu, gpa), want, "{name}: read");
        assert_eq!(vm.write(&mut vcpu, gpa), want, "{name}: write");
        assert_eq!(vm.read(&mut vcpu, gpa), want, "{name}: read again");
        assert_eq!(vm.stats().mmu.leaves_installed, 0, "{name}");
        vm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// `change_pte` with a frame too wide for an SPTE is refused before anything changes.
#[test]
fn change_pte_to_a_frame_too_wide_is_refused() {
    if vmmu_testing::skip_rerun("change_pte_to_a_frame_too_wide_is_refused") {
        return;
    }
    for &(name, mmu) in MMUS {
        let host = Arc::new(SimHostMemory::new());
        let hva = host.mmap(16 * PAGE_SIZE, Backing::Page4K, true).unwrap();
        let vm = Vm::new(
            VmConfig {
                mmu,
                // The compatibility option (Linux's `.change_pte`, gone since 6.10).
                change_pte: true,
                ..VmConfig::default()
            },
            host.clone(),
        );
        vm.set_user_memory_region(region(0, G1, 16 * PAGE_SIZE, hva.0))
            .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        let gpa = Gpa(G1 + 5 * PAGE_SIZE);
        let at = Hva(hva.0 + 5 * PAGE_SIZE);
        let before = vm.read(&mut vcpu, gpa).unwrap();
        let stats = vm.stats();
        assert_eq!(
            vm.change_pte(at, Pfn(WIDE_PFN), false),
            Err(Error::HostPfnTooLarge {
                hva: at,
                pfn: Pfn(WIDE_PFN)
            }),
            "{name}"
        );
        assert_eq!(
            vm.stats(),
            stats,
            "{name}: the refused call changed nothing"
        );
        assert_eq!(vm.read(&mut vcpu, gpa), Ok(before), "{name}");
        vm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// A shadow-paging guest with 16 MiB of memory and one memslot over its first 8 MiB.
/// Tables: PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000 -> PT at 0x4000, which maps
/// gva page i to frame 0x10_0000 + i pages (i < 16).
struct PagingGuest {
    mem: Arc<SimGuestMemory>,
    vm: Vm<Arc<SimHostMemory>>,
}

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const DATA: u64 = 0x10_0000;
const UP: u64 = pte::P | pte::RW;

fn paging_guest() -> PagingGuest {
    let host = Arc::new(SimHostMemory::new());
    let mem = Arc::new(SimGuestMemory::new(16 << 20));
    let hva = host.mmap(8 << 20, Backing::Page4K, true).unwrap();
    let config = VmConfig {
        mmu: MmuKind::ShadowPaging,
        paging: PagingConfig::default(),
        ..VmConfig::default()
    };
    let vm = Vm::new_paging(config, host, mem.clone());
    vm.set_user_memory_region(region(0, 0, 8 << 20, hva.0))
        .unwrap();
    mem.write_u64(Gpa(PML4), PDPT | UP).unwrap();
    mem.write_u64(Gpa(PDPT), PD | UP).unwrap();
    mem.write_u64(Gpa(PD), PT | UP).unwrap();
    for i in 0..16u64 {
        mem.write_u64(Gpa(PT + i * 8), (DATA + i * PAGE_SIZE) | UP)
            .unwrap();
    }
    PagingGuest { mem, vm }
}

impl PagingGuest {
    fn vcpu(&self) -> vmmu::Vcpu {
        let mut v = self.vm.create_vcpu().unwrap();
        self.vm
            .set_paging(
                &mut v,
                PagingState {
                    cr3: Gpa(PML4),
                    ..PagingState::default()
                },
            )
            .unwrap();
        v
    }
}

/// A guest table whose shadowing would push its gfn's write-track count past u16::MAX
/// (a VMM tracks it 65535 times): the fault fails with a typed error and shadows nothing
/// (the count was only debug-asserted: release builds shadowed the table without
/// counting it, so untracking it left a shadowed guest table unprotected).
#[test]
fn write_track_count_full_when_shadowing_a_guest_table_is_a_typed_error() {
    let g = paging_guest();
    let mut vcpu = g.vcpu();
    let pd = Gfn(PD / PAGE_SIZE);
    for _ in 0..u16::MAX {
        g.vm.track_write(pd).unwrap();
    }
    assert_eq!(
        g.vm.track_write(pd),
        Err(Error::WriteTrackCount { gfn: pd.0 }),
        "the count is full"
    );
    let got = g.vm.gva_read_u64(&mut vcpu, Gva(0));
    assert_eq!(
        got,
        Err(Exit::Error(Error::WriteTrackCount { gfn: pd.0 })),
        "shadowing the PD needs one more tracker"
    );
    g.vm.audit().unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..u16::MAX {
        g.vm.untrack_write(pd).unwrap();
    }
    g.vm.audit().unwrap_or_else(|e| panic!("{e}"));
    g.mem.write_u64(Gpa(DATA), 77).unwrap();
    assert_eq!(g.vm.gva_read_u64(&mut vcpu, Gva(0)), Ok(77));
    g.vm.audit().unwrap_or_else(|e| panic!("{e}"));
}

/// A guest entry pointing at a table outside guest memory, or outside every memslot, is
/// a page fault for the guest (KVM's `walk_addr_generic` cannot read the table and reports
/// a fault with the access's error code), not an error for the VMM.
#[test]
fn guest_table_outside_guest_memory_is_a_guest_page_fault() {
    for (what, table) in [
        ("outside guest memory", 1u64 << 30),
        ("in guest memory, outside every memslot", 12 << 20),
    ] {
        let g = paging_guest();
        let mut vcpu = g.vcpu();
        // gva 1 GiB goes through PDPT entry 1: point it at `table`. Where guest memory
        // holds the table, its entry 0 leads on to the PT (so the walk itself succeeds).
        g.mem.write_u64(Gpa(PDPT + 8), table | UP).unwrap();
        if table < 16 << 20 {
            g.mem.write_u64(Gpa(table), PT | UP).unwrap();
        }
        let gva = Gva(G1 + 0x10);
        assert_eq!(
            g.vm.gva_read_u64(&mut vcpu, gva),
            Err(Exit::GuestPageFault {
                gva,
                error_code: ErrorCode::empty()
            }),
            "{what}: read"
        );
        assert_eq!(
            g.vm.gva_write_u64(&mut vcpu, gva, 1),
            Err(Exit::GuestPageFault {
                gva,
                error_code: ErrorCode::WRITE
            }),
            "{what}: write"
        );
        // A last-level table out there too: PD entry 1 (gva 2 MiB); where guest memory
        // holds it, its entry 0 maps the PT's page.
        g.mem.write_u64(Gpa(PD + 8), table | UP).unwrap();
        let gva = Gva((2 << 20) + 0x18);
        assert_eq!(
            g.vm.gva_access(&mut vcpu, gva, AccessKind::Fetch),
            Err(Exit::GuestPageFault {
                gva,
                error_code: ErrorCode::FETCH
            }),
            "{what}: fetch through the PD"
        );
        // The rest of the guest still runs.
        g.mem.write_u64(Gpa(DATA + 8), 5).unwrap();
        assert_eq!(g.vm.gva_read_u64(&mut vcpu, Gva(8)), Ok(5), "{what}");
        g.vm.audit().unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// Run `f` on its own thread; panic if it does not finish within `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: still waiting after {secs} s: it hangs"))
}

/// A single-threaded embedder that accesses a page inside its own open invalidation
/// window: the window cannot close while the access waits, so the access gives up with a
/// typed error (it used to retry forever), and succeeds once the window is closed.
#[test]
fn access_inside_its_own_invalidation_window_does_not_hang() {
    if vmmu_testing::skip_rerun("access_inside_its_own_invalidation_window_does_not_hang") {
        return;
    }
    for &(name, mmu) in MMUS {
        let host = Arc::new(SimHostMemory::new());
        let hva = host.mmap(16 * PAGE_SIZE, Backing::Page4K, true).unwrap();
        let vm = Arc::new(Vm::new(
            VmConfig {
                mmu,
                ..VmConfig::default()
            },
            host.clone(),
        ));
        vm.set_user_memory_region(region(0, G1, 16 * PAGE_SIZE, hva.0))
            .unwrap();
        let gpa = Gpa(G1 + 2 * PAGE_SIZE);
        let at = Hva(hva.0 + 2 * PAGE_SIZE);
        vm.invalidate_range_start(at, Hva(at.0 + PAGE_SIZE))
            .unwrap();
        let v = vm.clone();
        let (got, mut vcpu) = within(60, name, move || {
            let mut vcpu = v.create_vcpu().unwrap();
            (v.read(&mut vcpu, gpa), vcpu)
        });
        assert_eq!(
            got,
            Err(Exit::Error(Error::InvalidationInProgress { gpa })),
            "{name}"
        );
        vm.invalidate_range_end().unwrap();
        assert!(vm.read(&mut vcpu, gpa).is_ok(), "{name}");
        vm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // Shadow paging: the same, by gva.
    let g = paging_guest();
    let vcpu = g.vcpu();
    let hva = with_first_slot_hva(&g.vm);
    let data = Hva(hva + DATA);
    g.vm.invalidate_range_start(data, Hva(data.0 + PAGE_SIZE))
        .unwrap();
    let vm = Arc::new(g.vm);
    let v = vm.clone();
    let (got, mut vcpu) = within(60, "shadow paging", move || {
        let mut vcpu = vcpu;
        (v.gva_read_u64(&mut vcpu, Gva(0)), vcpu)
    });
    assert_eq!(
        got,
        Err(Exit::Error(Error::InvalidationInProgress {
            gpa: Gpa(DATA)
        })),
        "shadow paging"
    );
    vm.invalidate_range_end().unwrap();
    assert!(vm.gva_read_u64(&mut vcpu, Gva(0)).is_ok());
    vm.audit().unwrap_or_else(|e| panic!("{e}"));
}

/// The hva behind gpa 0 of a VM.
fn with_first_slot_hva(vm: &Vm<Arc<SimHostMemory>>) -> u64 {
    vm.with_mmu(|slots, _| slots.lookup(Gfn(0)).unwrap().gfn_to_hva(Gfn(0)).0)
}
