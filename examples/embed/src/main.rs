//! Embedding vmmu, as a Rust hypervisor that owns the hardware would, on vmmu's `no_std`
//! public API only (vmmu is built without `std` and without `internals` here). The CPU
//! model stands in for VMX: where a VMX host executes VMLAUNCH/VMRESUME, INVEPT and reads
//! the VMCS exit fields, this program calls `Vm::model_access` and `Vcpu::model_invept`.
//! Everything else is what a real host does:
//!
//! - page tables from a fixed arena of frames the hypervisor owns (no heap for tables):
//!   [`Arena`], a `TableAllocator`;
//! - host memory from its own memory map: [`MemoryMap`], a `HostMemory`;
//! - a kick that interrupts a vCPU's physical CPU: [`Ipi`], a `Kick` (here it raises the
//!   model CPU's interrupt line, where a host sends an IPI);
//! - vCPU threads running the run loop (enter, load the EPTP, INVEPT, run, exit, handle);
//! - the VMM thread turning dirty logging on during the run and harvesting it.
//!
//! The guide is vmmu's rustdoc, "Embedding vmmu" (`vmmu::embedding`).

use std::cell::UnsafeCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmmu::host::{HostMemory, HostPage};
use vmmu::table::{Table, TableAllocator};
use vmmu::types::{AccessKind, Gpa, Hpa, Hva, Level, Pfn, PAGE_SIZE};
use vmmu::{
    ExitAction, InterruptLine, Invept, Kick, MemoryRegion, MemslotFlags, MmuKind, TdpIteration,
    Vcpu, Vm, VmConfig, VmExit,
};

// ---------------------------------------------------------------------------------------
// The hypervisor's physical memory: a fixed arena of page-table frames.

/// Frames in the table arena (2 MiB).
const ARENA_FRAMES: usize = 512;
/// The arena's first host-physical frame number (where the hypervisor's loader put it).
const ARENA_BASE: u64 = 0x10_0000;

#[repr(C, align(4096))]
struct Frame(UnsafeCell<[u8; 4096]>);

/// Page-table frames from a fixed arena (in the program's .bss: no heap), with a free
/// stack of frame indices. Host-physical frame `ARENA_BASE + i` is arena frame `i`, as a
/// direct map would have it.
struct Arena {
    frames: &'static Frames,
    free: Mutex<FreeStack>,
    peak: AtomicU64,
}

struct FreeStack {
    idx: [u16; ARENA_FRAMES],
    len: usize,
}

struct Frames([Frame; ARENA_FRAMES]);
// SAFETY: a frame is touched by one owner at a time: the arena while it is free (zeroing
// it), vmmu (through `table_ptr`, as atomics) while it is allocated.
unsafe impl Sync for Frames {}

static FRAMES: Frames = Frames([const { Frame(UnsafeCell::new([0; 4096])) }; ARENA_FRAMES]);

impl Arena {
    fn new() -> Arena {
        let mut idx = [0u16; ARENA_FRAMES];
        for (i, v) in idx.iter_mut().enumerate() {
            *v = (ARENA_FRAMES - 1 - i) as u16;
        }
        Arena {
            frames: &FRAMES,
            free: Mutex::new(FreeStack {
                idx,
                len: ARENA_FRAMES,
            }),
            peak: AtomicU64::new(0),
        }
    }
    fn in_use(&self) -> usize {
        ARENA_FRAMES - self.free.lock().unwrap().len
    }
}

// SAFETY: `alloc_table` hands out a frame off the free stack (so not handed out since it
// was last freed), zeroed here; `table_ptr` maps frame numbers of the arena to its frames,
// which live for the whole program; `free_table` puts the frame back once.
unsafe impl TableAllocator for Arena {
    fn alloc_table(&self) -> Option<Pfn> {
        let mut free = self.free.lock().unwrap();
        if free.len == 0 {
            return None;
        }
        free.len -= 1;
        let i = free.idx[free.len] as usize;
        let used = (ARENA_FRAMES - free.len) as u64;
        self.peak.fetch_max(used, Ordering::Relaxed);
        drop(free);
        // SAFETY: the frame is free: nothing else references it.
        unsafe { self.frames.0[i].0.get().write_bytes(0, 1) };
        Some(Pfn(ARENA_BASE + i as u64))
    }

    unsafe fn free_table(&self, frame: Pfn) {
        let mut free = self.free.lock().unwrap();
        let n = free.len;
        free.idx[n] = (frame.0 - ARENA_BASE) as u16;
        free.len += 1;
    }

    fn table_ptr(&self, frame: Pfn) -> NonNull<Table> {
        let i = (frame.0 - ARENA_BASE) as usize;
        NonNull::from(&self.frames.0[i]).cast()
    }
}

// ---------------------------------------------------------------------------------------
// The hypervisor's memory map: where guest RAM lives in its address space.

/// One mapping of the hypervisor's memory map.
struct Mapping {
    hva: u64,
    size: u64,
    /// First host-physical frame.
    pfn: u64,
    /// The page size the hypervisor maps it with.
    level: Level,
}

/// Guest RAM, as the hypervisor mapped it: 32 MiB with 2 MiB pages, then 4 MiB with 4 KiB
/// pages (a region it keeps fine-grained).
struct MemoryMap {
    maps: Vec<Mapping>,
}

const GUEST_HVA: u64 = 0x7f00_0000_0000;
const RAM: u64 = 36 << 20;

impl MemoryMap {
    fn new() -> MemoryMap {
        MemoryMap {
            maps: vec![
                Mapping {
                    hva: GUEST_HVA,
                    size: 32 << 20,
                    pfn: 0x40_0000,
                    level: Level::L2M,
                },
                Mapping {
                    hva: GUEST_HVA + (32 << 20),
                    size: 4 << 20,
                    pfn: 0x80_0000,
                    level: Level::L4K,
                },
            ],
        }
    }
}

impl HostMemory for MemoryMap {
    fn translate(&self, hva: Hva) -> Option<HostPage> {
        let m = self
            .maps
            .iter()
            .find(|m| (m.hva..m.hva + m.size).contains(&hva.0))?;
        // Each mapping starts at a 2 MiB-aligned frame: huge pages are contiguous and
        // congruent, as the HostPage contract asks.
        Some(HostPage {
            pfn: Pfn(m.pfn + (hva.0 - m.hva) / PAGE_SIZE),
            level: m.level,
            writable: true,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The kick: an IPI to the physical CPU that runs the vCPU.

/// Interrupts vCPUs by their id. On VMX this sends an IPI (the vector makes the CPU exit
/// guest mode); on the model it raises the vCPU's interrupt line.
#[derive(Default)]
struct Ipi {
    lines: Mutex<Vec<InterruptLine>>,
    sent: AtomicU64,
}

impl Kick for Ipi {
    fn kick(&self, vcpu: u32) {
        // Never blocks for long: the lock is only taken to register vCPUs at start-up.
        if let Some(line) = self.lines.lock().unwrap().get(vcpu as usize) {
            self.sent.fetch_add(1, Ordering::Relaxed);
            line.raise();
        }
    }
}

// ---------------------------------------------------------------------------------------
// vCPU threads: the run loop.

type HostVm = Vm<MemoryMap, Arena>;

#[derive(Default, Debug)]
struct RunStats {
    accesses: u64,
    entries: u64,
    eptp_loads: u64,
    invepts: u64,
    violations: u64,
    misconfigs: u64,
    interrupts: u64,
    mmio: u64,
    bad: u64,
}

/// The run loop of one vCPU: the guest writes its 8 MiB window page by page, round and
/// round, until the VMM asks it to stop (a flag it sees when an exit brings it out).
fn run_vcpu(vm: &HostVm, vcpu: &mut Vcpu, stop: &AtomicBool, map: &MemoryMap) -> RunStats {
    let mut st = RunStats::default();
    let window = 8 << 20;
    let base = vcpu.id as u64 * window;
    let mut next = 0u64;
    let mut eptp = None;
    'run: loop {
        // 1. Enter: the entry state says what VM entry needs. (Interrupts are off on a
        //    real host from here to VMRESUME, so a kick now exits at once.)
        let entry = match vm.enter_guest(vcpu) {
            Ok(e) => e,
            Err(e) => panic!("vCPU {}: cannot enter: {e}", vcpu.id),
        };
        st.entries += 1;
        if entry.load_eptp {
            // vmcs_write64(EPT_POINTER, entry.eptp.bits())
            eptp = Some(entry.eptp);
            st.eptp_loads += 1;
        }
        if let Invept::SingleContext(_) = entry.invept {
            // invept(SINGLE_CONTEXT, entry.eptp)
            vcpu.model_invept(entry.invept);
            st.invepts += 1;
        }
        debug_assert_eq!(eptp, Some(entry.eptp));
        // VMRESUME: the guest runs until something exits.
        let exit = loop {
            let gpa = Gpa(base + next * PAGE_SIZE + 8);
            match vm.model_access(vcpu, gpa, AccessKind::Write) {
                Ok(Ok(hpa)) => {
                    st.accesses += 1;
                    if hpa != expected(map, gpa) {
                        st.bad += 1;
                    }
                    next = (next + 1) % (window / PAGE_SIZE);
                }
                Ok(Err(exit)) => break exit,
                Err(e) => panic!("vCPU {}: {e}", vcpu.id),
            }
        };
        // 2. VM exit: leave guest mode before anything else (the acknowledgement a
        //    remote flush waits for).
        vm.exit_guest(vcpu).unwrap();
        // 3. Handle it.
        let action = match exit {
            VmExit::EptViolation { gpa, qualification } => {
                st.violations += 1;
                vm.handle_ept_violation(vcpu, gpa, qualification).unwrap()
            }
            VmExit::EptMisconfig { gpa } => {
                st.misconfigs += 1;
                vm.handle_ept_misconfig(vcpu, gpa).unwrap()
            }
            VmExit::ExternalInterrupt => {
                st.interrupts += 1;
                if stop.load(Ordering::Acquire) {
                    break 'run;
                }
                ExitAction::Resume
            }
        };
        match action {
            ExitAction::Resume => {}
            ExitAction::Retry { .. } => std::thread::yield_now(),
            ExitAction::EmulateMmio { .. } | ExitAction::EmulateWrite { .. } => st.mmio += 1,
            other => panic!("vCPU {}: exit to the VMM: {other:?}", vcpu.id),
        }
    }
    st
}

/// The host-physical address guest RAM at `gpa` has (gpa 0 is the map's first byte).
fn expected(map: &MemoryMap, gpa: Gpa) -> Hpa {
    let p = map.translate(Hva(GUEST_HVA + gpa.0)).unwrap();
    Hpa(p.pfn.0 * PAGE_SIZE + gpa.0 % PAGE_SIZE)
}

fn main() {
    let vcpus = 2;
    let arena = Arc::new(Arena::new());
    let ipi = Arc::new(Ipi::default());
    let config = VmConfig {
        mmu: MmuKind::Tdp(TdpIteration::UsedEntries),
        ..VmConfig::default()
    };
    let mut vm = Vm::with_allocator(config, MemoryMap::new(), arena.clone()).expect("the VM");
    vm.set_kick(ipi.clone());
    let ram = MemoryRegion {
        slot: 0,
        flags: MemslotFlags::empty(),
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: GUEST_HVA,
    };
    vm.set_user_memory_region(ram).unwrap();
    let mut cpus: Vec<Vcpu> = (0..vcpus)
        .map(|_| vm.create_run_loop_vcpu().expect("a vCPU"))
        .collect();
    *ipi.lines.lock().unwrap() = cpus.iter().map(|v| v.interrupt_line()).collect();
    println!(
        "embed: {} vCPUs on vmmu (no_std API), TDP MMU, {} MiB of guest RAM, tables from a {}-frame arena",
        vcpus,
        RAM >> 20,
        ARENA_FRAMES
    );
    let stop = AtomicBool::new(false);
    let vm = &vm;
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = cpus
            .iter_mut()
            .map(|v| {
                let (stop, map) = (&stop, vm.host());
                s.spawn(move || run_vcpu(vm, v, stop, map))
            })
            .collect();
        // The VMM: let the guest run, then log dirty pages during the run.
        std::thread::sleep(Duration::from_millis(50));
        vm.set_user_memory_region(MemoryRegion {
            flags: MemslotFlags::LOG_DIRTY_PAGES,
            ..ram
        })
        .unwrap();
        println!(
            "dirty logging on (the slot's 2 MiB pages are split to 4 KiB and write-protected)"
        );
        let mut bitmap = vec![0u64; (RAM / PAGE_SIZE) as usize / 64];
        for round in 1..=4 {
            std::thread::sleep(Duration::from_millis(30));
            let kicks = ipi.sent.load(Ordering::Relaxed);
            let r = vm.get_dirty_log(0, &mut bitmap).unwrap();
            let per_vcpu: Vec<u64> = (0..vcpus)
                .map(|v| {
                    let words = (8 << 20) / PAGE_SIZE as usize / 64;
                    bitmap[v * words..(v + 1) * words]
                        .iter()
                        .map(|w| u64::from(w.count_ones()))
                        .sum()
                })
                .collect();
            println!(
                "harvest {round}: {} dirty pages (by vCPU {:?}); the harvest's flush kicked {} vCPUs in guest mode",
                r.dirty_pages,
                per_vcpu,
                ipi.sent.load(Ordering::Relaxed) - kicks
            );
        }
        stop.store(true, Ordering::Release);
        for id in 0..vcpus {
            ipi.kick(id as u32);
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (id, st) in results.iter().enumerate() {
        println!(
            "vCPU {id}: {} accesses, {} entries ({} EPTP loads, {} INVEPTs), exits: {} EPT violations, {} misconfigs, {} interrupts; {} wrong translations",
            st.accesses,
            st.entries,
            st.eptp_loads,
            st.invepts,
            st.violations,
            st.misconfigs,
            st.interrupts,
            st.bad
        );
        assert_eq!(st.bad, 0, "a translation differed from the memory map");
        assert_eq!(st.mmio, 0);
    }
    let stats = vm.stats();
    println!(
        "VM: {} remote flushes, {} kicks, {} lockless fast-path faults; table frames in use {} (peak {})",
        stats.remote_tlb_flushes,
        stats.kicks,
        stats.fast_page_faults,
        arena.in_use(),
        arena.peak.load(Ordering::Relaxed)
    );
    for v in cpus {
        vm.release_vcpu(v).unwrap();
    }
}
