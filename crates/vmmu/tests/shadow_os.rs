//! Shadow paging under a guest OS: the guest OS model (`vmmu_testing::guest_os`) runs
//! fork, exec, exit, mmap, munmap, page faults and context switches on several vCPU
//! threads of one shadow-paging VM, as Linux would, with unsync pages on and off.
//!
//! After every step: `vm.audit()` passes, and every page of every VMA of the process that
//! ran translates (through the vCPU: `gva_access`) exactly as the model's record and the
//! guest's own tables in guest memory say (the reference walk never asks the MMU):
//! present pages to their frame, read-only pages fault on writes, absent pages and the
//! pages around each VMA fault not-present; the frames' reference counts equal the PTEs
//! mapping them. At the end every frame is free and zero, and the audit still passes.
//!
//! `VMMU_SHADOW_OS_STEPS` (default 150 a thread) and `VMMU_SHADOW_OS_SEED` (default 0)
//! make it a longer soak over other scripts, e.g. in release:
//! `VMMU_SHADOW_OS_STEPS=2000 VMMU_SHADOW_OS_SEED=7 cargo test --release -p vmmu --test shadow_os`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmmu::guest::{GuestMemory, SimGuestMemory};
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gfn, Gva, PAGE_SIZE};
use vmmu::{PagingConfig, VmConfig};
use vmmu_testing::guest_os::check::{check_process, check_refcounts};
use vmmu_testing::guest_os::{Cpu, Image, Kernel, Machine, OsError, Process, Prot, SoftCpu};

/// Guest RAM for the default run; a longer soak (`VMMU_SHADOW_OS_STEPS`) gets more, as
/// its processes hold more memory at once (see [`ram`]).
const RAM_DEFAULT: u64 = 32 << 20;

/// Guest RAM: 32 MiB, growing with the steps of a longer soak so the guest does not run
/// out of memory (which the scripts treat as a failure).
fn ram() -> u64 {
    RAM_DEFAULT.max(((steps() as u64 * 64) << 10).next_power_of_two())
}
const THREADS: u64 = 3;
/// Steps per thread; `VMMU_SHADOW_OS_STEPS` overrides (a longer soak).
fn steps() -> usize {
    env_u64("VMMU_SHADOW_OS_STEPS").map_or(150, |n| n as usize)
}

/// Added to every thread's seed; `VMMU_SHADOW_OS_SEED` sets it (other scripts).
fn seed_base() -> u64 {
    env_u64("VMMU_SHADOW_OS_SEED").unwrap_or(0)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}
const MAX_PROCS: usize = 5;

/// xorshift64*: a fixed-seed script per thread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// What the threads did, over the run.
#[derive(Default)]
struct Ops {
    forks: AtomicU64,
    execs: AtomicU64,
    exits: AtomicU64,
    mmaps: AtomicU64,
    munmaps: AtomicU64,
    switches: AtomicU64,
    touches: AtomicU64,
    segfaults: AtomicU64,
    host_unmaps: AtomicU64,
    reclaims: AtomicU64,
}

fn audit(m: Option<&Machine>, what: &str) {
    if let Some(Err(e)) = m.map(|m| m.vm.audit()) {
        panic!("audit after {what}: {e:?}");
    }
}

fn check(
    k: &Kernel,
    cpu: &mut impl Cpu,
    m: Option<&Machine>,
    procs: &[Process],
    cur: usize,
    what: &str,
) {
    if let Err(e) = check_process(k, cpu, &procs[cur]) {
        // Where the stale translation lives: gone after a full flush (it was in the TLB,
        // or in an unsync page the flush syncs), or still there (the shadow tables).
        let audit = m.map(|m| m.vm.audit().map(|_| ()));
        let flushed = cpu.flush_tlb().map(|()| check_process(k, cpu, &procs[cur]));
        panic!(
            "after {what}: {e}\n  audit: {audit:?}\n  after a full guest TLB flush: {flushed:?}"
        );
    }
    if let Err(e) = check_refcounts(k, procs) {
        panic!("after {what}: {e}");
    }
}

/// A random page of a random VMA of `p`, if it has any.
fn some_page(rng: &mut Rng, p: &Process) -> Option<u64> {
    let vmas = p.mm().vmas();
    if vmas.is_empty() {
        return None;
    }
    let v = &vmas[rng.below(vmas.len() as u64) as usize];
    Some(v.start + rng.below(v.pages.len() as u64) * PAGE_SIZE)
}

/// One vCPU's script: its own processes, random system calls, checks after each (the
/// audit too when there is a VM: `m`).
fn vcpu_thread(
    k: &Kernel,
    mut cpu: impl Cpu,
    m: Option<&Machine>,
    label: &str,
    seed: u64,
    ops: &Ops,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed * 0x1234_5678_9abc));
    let mut procs: Vec<Process> = Vec::new();
    let mut p = k.spawn(&mut cpu).unwrap();
    k.exec(&mut cpu, &mut p, &Image::default()).unwrap();
    procs.push(p);
    let mut cur = 0;
    for step in 0..steps() {
        let op = rng.below(100);
        let what = format!("{label}: thread {seed} step {step} op {op}");
        match op {
            // Touch a few pages: demand paging and copy-on-write.
            0..=29 => {
                for _ in 0..1 + rng.below(8) {
                    let Some(a) = some_page(&mut rng, &procs[cur]) else {
                        break;
                    };
                    let kind = if rng.below(2) == 0 {
                        AccessKind::Read
                    } else {
                        AccessKind::Write
                    };
                    match k.access(&mut cpu, &mut procs[cur], Gva(a), kind) {
                        Ok(_) => {}
                        // A write to the text or a read-only mapping.
                        Err(OsError::Segfault { .. }) => {
                            ops.segfaults.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("{what}: access {a:#x} {kind:?}: {e}"),
                    }
                    ops.touches.fetch_add(1, Ordering::Relaxed);
                }
            }
            30..=44 => {
                let pages = 1 + rng.below(600);
                let prot = if rng.below(4) == 0 {
                    Prot::RO
                } else {
                    Prot::RW
                };
                let a = k.mmap(&mut procs[cur], pages * PAGE_SIZE, prot).unwrap();
                // Populate part of it (MAP_POPULATE-like).
                for i in (0..pages).step_by(1 + rng.below(4) as usize) {
                    k.access(
                        &mut cpu,
                        &mut procs[cur],
                        Gva(a.0 + i * PAGE_SIZE),
                        AccessKind::Read,
                    )
                    .unwrap_or_else(|e| panic!("{what}: populate: {e}"));
                }
                ops.mmaps.fetch_add(1, Ordering::Relaxed);
            }
            45..=56 => {
                if let Some(a) = some_page(&mut rng, &procs[cur]) {
                    let v = procs[cur].mm().find(a).unwrap();
                    let max = (v.end() - a) / PAGE_SIZE;
                    let len = (1 + rng.below(max.min(80))) * PAGE_SIZE;
                    k.munmap(&mut cpu, &mut procs[cur], a, len)
                        .unwrap_or_else(|e| panic!("{what}: munmap: {e}"));
                    ops.munmaps.fetch_add(1, Ordering::Relaxed);
                }
            }
            57..=69 if procs.len() < MAX_PROCS => {
                let child = k
                    .fork(&mut cpu, &mut procs[cur])
                    .unwrap_or_else(|e| panic!("{what}: fork: {e}"));
                procs.push(child);
                check(k, &mut cpu, m, &procs, cur, &what);
                cur = procs.len() - 1;
                k.switch_to(&mut cpu, &procs[cur]).unwrap();
                if rng.below(2) == 0 {
                    // fork + exec, as a shell runs a command: the parent's pages are
                    // left read-only with one reference (reused on its next write).
                    k.exec(&mut cpu, &mut procs[cur], &Image::default())
                        .unwrap_or_else(|e| panic!("{what}: exec: {e}"));
                    ops.execs.fetch_add(1, Ordering::Relaxed);
                }
                ops.forks.fetch_add(1, Ordering::Relaxed);
            }
            70..=76 => {
                let img = Image {
                    text: 1 + rng.below(4),
                    data: 1 + rng.below(8),
                    stack: 1 + rng.below(8),
                };
                k.exec(&mut cpu, &mut procs[cur], &img)
                    .unwrap_or_else(|e| panic!("{what}: exec: {e}"));
                ops.execs.fetch_add(1, Ordering::Relaxed);
            }
            77..=84 if procs.len() > 1 => {
                let p = procs.swap_remove(cur);
                k.exit(&mut cpu, p)
                    .unwrap_or_else(|e| panic!("{what}: exit: {e}"));
                cur = rng.below(procs.len() as u64) as usize;
                k.switch_to(&mut cpu, &procs[cur]).unwrap();
                ops.exits.fetch_add(1, Ordering::Relaxed);
            }
            // The host reclaims 64 pages of guest RAM (MMU-notifier unmap): the guest
            // sees nothing, its next accesses fault them back in.
            95..=96 if m.is_some() => {
                let m = m.unwrap();
                let frames = ram() / PAGE_SIZE;
                let first = rng.below(frames - 64);
                m.vm.unmap_hva_range(m.hva_of(Gfn(first)), m.hva_of(Gfn(first + 64)))
                    .unwrap_or_else(|e| panic!("{what}: unmap_hva_range: {e}"));
                ops.host_unmaps.fetch_add(1, Ordering::Relaxed);
            }
            // The shrinker zaps a few shadow pages (roots in use are reloaded).
            97..=98 if m.is_some() => {
                m.unwrap()
                    .vm
                    .reclaim_shadow_pages(1 + rng.below(16) as usize);
                ops.reclaims.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                cur = rng.below(procs.len() as u64) as usize;
                k.switch_to(&mut cpu, &procs[cur]).unwrap();
                ops.switches.fetch_add(1, Ordering::Relaxed);
            }
        }
        audit(m, &what);
        check(k, &mut cpu, m, &procs, cur, &what);
    }
    // Every process, checked once more, then gone.
    for i in 0..procs.len() {
        check(k, &mut cpu, m, &procs, i, "the last step");
    }
    for p in procs {
        k.exit(&mut cpu, p).unwrap();
        ops.exits.fetch_add(1, Ordering::Relaxed);
    }
    audit(m, "the exits");
}

fn run(unsync: bool, backing: Backing) {
    let config = VmConfig {
        paging: PagingConfig {
            unsync,
            prev_roots: 3,
        },
        ..VmConfig::default()
    };
    let m = Machine::new(ram(), backing, config).unwrap();
    let ops = Ops::default();
    let label = format!("unsync={unsync} {backing:?}");
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (m, ops, label) = (&m, &ops, &label);
            s.spawn(move || {
                vcpu_thread(
                    &m.kernel,
                    m.cpu().unwrap(),
                    Some(m),
                    label,
                    seed_base() + t + 1,
                    ops,
                )
            });
        }
    });
    let k = &m.kernel;
    assert_eq!(
        k.frames().free_frames(),
        k.frames().total_frames(),
        "frames leaked"
    );
    k.check_free_frames_zero().unwrap();
    audit(Some(&m), "the end");
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let st = m.vm.stats();
    eprintln!(
        "unsync={unsync} {backing:?}: forks {} execs {} exits {} mmaps {} munmaps {} switches {} touches {} \
         segfaults {}; kernel {:?}; paging {:?}",
        l(&ops.forks),
        l(&ops.execs),
        l(&ops.exits),
        l(&ops.mmaps),
        l(&ops.munmaps),
        l(&ops.switches),
        l(&ops.touches),
        l(&ops.segfaults),
        k.stats(),
        st.paging
    );
    eprintln!(
        "  host unmaps {}, shadow-page reclaims {}",
        l(&ops.host_unmaps),
        l(&ops.reclaims)
    );
    for (name, n) in [
        ("fork", &ops.forks),
        ("exec", &ops.execs),
        ("mmap", &ops.mmaps),
        ("munmap", &ops.munmaps),
    ] {
        assert!(l(n) > 0, "the script never ran {name}");
    }
    assert!(k.stats().cow_copies + k.stats().cow_reuses > 0);
    assert!(st.paging.guest_faults > 0, "{:?}", st.paging);
    if unsync {
        assert!(st.paging.unsynced_pages > 0, "{:?}", st.paging);
    } else {
        assert_eq!(st.paging.unsynced_pages, 0, "{:?}", st.paging);
        assert!(st.paging.emulated_writes > 0, "{:?}", st.paging);
    }
}

/// The same scripts on the reference CPU (no MMU): the model and the scripts themselves
/// are right, so a failure of the tests below is the MMU's.
#[test]
fn scripts_on_the_reference_cpu() {
    let mem: Arc<dyn GuestMemory> = Arc::new(SimGuestMemory::new(ram()));
    let k = Kernel::boot(mem.clone(), ram()).unwrap();
    let ops = Ops::default();
    for t in 0..THREADS {
        let cpu = SoftCpu::new(mem.clone(), k.idle_pml4());
        vcpu_thread(&k, cpu, None, "reference", seed_base() + t + 1, &ops);
    }
    assert_eq!(k.frames().free_frames(), k.frames().total_frames());
    k.check_free_frames_zero().unwrap();
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "reference: forks {} execs {} exits {} mmaps {} munmaps {} switches {} touches {} segfaults {}; {:?}",
        l(&ops.forks), l(&ops.execs), l(&ops.exits), l(&ops.mmaps), l(&ops.munmaps),
        l(&ops.switches), l(&ops.touches), l(&ops.segfaults), k.stats()
    );
    for n in [
        &ops.forks,
        &ops.execs,
        &ops.mmaps,
        &ops.munmaps,
        &ops.switches,
    ] {
        assert!(l(n) > 0);
    }
    assert!(k.stats().cow_copies > 0 && k.stats().cow_reuses > 0);
}

#[test]
fn guest_os_on_vcpu_threads_with_unsync_pages() {
    run(true, Backing::Page4K);
    run(true, Backing::Thp);
}

#[test]
fn guest_os_on_vcpu_threads_all_tables_write_protected() {
    run(false, Backing::Page4K);
    run(false, Backing::Thp);
}

/// Minimal reproducers of core bugs the guest OS model hit, on the raw API (no model):
/// each builds its guest tables in guest memory by hand.
mod repro {
    use std::sync::Arc;

    use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
    use vmmu::host::{Backing, SimHostMemory};
    use vmmu::types::{AccessKind, Gpa, Gva};
    use vmmu::Vcpu;
    use vmmu::{Exit, MemoryRegion, MemslotFlags, MmuKind, PagingConfig, Vm, VmConfig};

    const RAM: u64 = 8 << 20;
    const KERNEL: u64 = 0xffff_8880_0000_0000;
    const TABLE: u64 = pte::P | pte::RW | pte::US | pte::A | pte::D;
    const KTABLE: u64 = pte::P | pte::RW | pte::A | pte::D;

    /// A shadow-paging VM over `RAM` of 4 KiB host pages, guest tables at gfns 1..=7:
    /// PML4 0x1000; a direct map (gva KERNEL + gpa -> gpa, one 2 MiB supervisor page per
    /// 2 MiB: PDPT 0x6000, PD 0x7000); user PDPT 0x2000, PD 0x3000, PT 0x4000 for the
    /// user gva 0x20_0000 (PD index 1). A vCPU at CPL 0 on CR3 0x1000.
    fn vm(unsync: bool) -> (Arc<SimGuestMemory>, Vm<Arc<SimHostMemory>>, Vcpu) {
        let mem = Arc::new(SimGuestMemory::new(RAM));
        let w = |gpa: u64, v: u64| mem.write_u64(Gpa(gpa), v).unwrap();
        w(0x1000 + 273 * 8, 0x6000 | KTABLE);
        w(0x6000, 0x7000 | KTABLE);
        for i in 0..RAM >> 21 {
            w(0x7000 + i * 8, (i << 21) | KTABLE | pte::PS | pte::NX);
        }
        w(0x1000, 0x2000 | TABLE);
        w(0x2000, 0x3000 | TABLE);
        w(0x3000 + 8, 0x4000 | TABLE);
        let host = Arc::new(SimHostMemory::new());
        let hva = host.mmap(RAM, Backing::Page4K, true).unwrap();
        let config = VmConfig {
            mmu: MmuKind::ShadowPaging,
            paging: PagingConfig {
                unsync,
                prev_roots: 3,
            },
            ..VmConfig::default()
        };
        let vm = Vm::new_paging(config, host, mem.clone() as Arc<dyn GuestMemory>);
        vm.set_user_memory_region(MemoryRegion {
            slot: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: 0,
            memory_size: RAM,
            userspace_addr: hva.0,
        })
        .unwrap();
        let mut vcpu = vm.create_vcpu().unwrap();
        let paging = PagingState {
            cr3: Gpa(0x1000),
            ..PagingState::default()
        };
        vm.set_paging(&mut vcpu, paging).unwrap();
        (mem, vm, vcpu)
    }

    /// A kernel read through a 2 MiB guest page mapped with 4 KiB SPTEs (direct shadow
    /// pages under a guest huge page) must reach the gpa the guest entry names. The direct
    /// page's gfn must be the 2 MiB-aligned base (KVM: `gfn_round_for_level(gfn,
    /// it.level)` in `FNAME(fetch)`), not the faulting gfn; else `gfn_at` is off by the
    /// first faulting page's offset and the rmap bookkeeping of later faults breaks
    /// ("leaf SPTE missing from its reverse map").
    #[test]
    fn kernel_reads_through_a_2m_guest_page_reach_the_right_gpa() {
        let (mem, vm, mut vcpu) = vm(true);
        for gpa in [0x5008u64, 0x9010, 0x10_0000, 0x1f_f000] {
            mem.write_u64(Gpa(gpa), 0xabc0 + gpa).unwrap();
        }
        for gpa in [0x5008u64, 0x9010, 0x10_0000, 0x1f_f000] {
            assert_eq!(
                vm.gva_read_u64(&mut vcpu, Gva(KERNEL + gpa)),
                Ok(0xabc0 + gpa),
                "gpa {gpa:#x}"
            );
        }
        vm.audit().unwrap();
    }

    /// An unsync last-level shadow page unlinked by an emulated PDE clear stays hashed
    /// with stale SPTEs (the flush syncs only pages under the root). When the guest links
    /// the same table again and a fault finds that page in the hash, it must be synced
    /// before use (KVM's `kvm_mmu_find_shadow_page` calls `kvm_sync_page` on an unsync
    /// page); else the stale SPTE still translates a PTE the guest cleared.
    #[test]
    fn an_unsync_page_found_in_the_hash_is_synced_before_reuse() {
        let (mem, vm, mut vcpu) = vm(true);
        let user = 0x20_0000u64;
        mem.write_u64(Gpa(0x4000), 0x10_0000 | TABLE | pte::NX)
            .unwrap();
        mem.write_u64(Gpa(0x4008), 0x10_1000 | TABLE | pte::NX)
            .unwrap();
        vcpu.set_cpl(3);
        assert_eq!(
            vm.gva_access(&mut vcpu, Gva(user), AccessKind::Read),
            Ok(Gpa(0x10_0000))
        );
        vcpu.set_cpl(0);
        // The kernel clears PTE 0 (the PT goes unsync), then the PDE (emulated), flushes,
        // and links the same PT again.
        vm.gva_write_u64(&mut vcpu, Gva(KERNEL + 0x4000), 0)
            .unwrap();
        vm.gva_write_u64(&mut vcpu, Gva(KERNEL + 0x3008), 0)
            .unwrap();
        vm.flush_guest_tlb(&mut vcpu).unwrap();
        vm.gva_write_u64(&mut vcpu, Gva(KERNEL + 0x3008), 0x4000 | TABLE)
            .unwrap();
        vcpu.set_cpl(3);
        // A fault through PTE 1 finds the old shadow PT in the hash.
        assert_eq!(
            vm.gva_access(&mut vcpu, Gva(user + 0x1000), AccessKind::Read),
            Ok(Gpa(0x10_1000))
        );
        // PTE 0 is clear in the guest's table: not present.
        let got = vm.gva_access(&mut vcpu, Gva(user), AccessKind::Read);
        assert!(
            matches!(got, Err(Exit::GuestPageFault { .. })),
            "stale translation: {got:?}"
        );
        vm.audit().unwrap();
    }

    /// A root zapped (here by reclaim) while a last-level page under it is unsync leaves
    /// the subtree below it linked and marked unsync-children. The guest's flush then
    /// loads a new root and syncs under it, when nothing is linked yet; the next fault
    /// links the old subtree back as it is, and its stale SPTE serves the access until
    /// the next flush (here: a fault on the next page links the subtree, then a write
    /// through the PTE the guest write-protected succeeds). KVM's `FNAME(fetch)` syncs a
    /// found upper-level page that has unsync children (`mmu_sync_children`) before
    /// linking it.
    #[test]
    fn a_subtree_with_unsync_children_is_synced_when_a_new_root_links_it() {
        let (mem, vm, mut vcpu) = vm(true);
        let user = 0x20_0000u64;
        let rw = 0x10_0000 | TABLE | pte::NX;
        mem.write_u64(Gpa(0x4000), rw).unwrap();
        mem.write_u64(Gpa(0x4008), 0x10_1000 | TABLE | pte::NX)
            .unwrap();
        vcpu.set_cpl(3);
        assert_eq!(
            vm.gva_access(&mut vcpu, Gva(user), AccessKind::Write),
            Ok(Gpa(0x10_0000))
        );
        // The kernel write-protects the PTE (the PT goes unsync, the write lands).
        vcpu.set_cpl(0);
        vm.gva_write_u64(&mut vcpu, Gva(KERNEL + 0x4000), rw & !pte::RW)
            .unwrap();
        // The host's shrinker zaps the oldest shadow page: the root.
        assert!(vm.reclaim_shadow_pages(1) >= 1);
        // The guest flushes, as it must after write-protecting a PTE.
        vm.flush_guest_tlb(&mut vcpu).unwrap();
        vcpu.set_cpl(3);
        // A fault on the next page links the old subtree under the new root.
        assert_eq!(
            vm.gva_access(&mut vcpu, Gva(user + 0x1000), AccessKind::Read),
            Ok(Gpa(0x10_1000))
        );
        let got = vm.gva_access(&mut vcpu, Gva(user), AccessKind::Write);
        assert!(
            matches!(got, Err(Exit::GuestPageFault { .. })),
            "write through a read-only PTE after the flush: {got:?}"
        );
        vm.audit().unwrap();
    }
}
