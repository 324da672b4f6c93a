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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmmu::guest::{GuestMemory, SimGuestMemory};
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gva, PAGE_SIZE};
use vmmu::{PagingConfig, VmConfig};
use vmmu_testing::guest_os::check::{check_process, check_refcounts};
use vmmu_testing::guest_os::{Cpu, Image, Kernel, Machine, OsError, Process, Prot, SoftCpu};

const RAM: u64 = 32 << 20;
const THREADS: u64 = 3;
const STEPS: usize = 60;
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
}

fn audit(m: Option<&Machine>, what: &str) {
    if let Some(Err(e)) = m.map(|m| m.vm.audit()) {
        panic!("audit after {what}: {e:?}");
    }
}

fn check(k: &Kernel, cpu: &mut impl Cpu, procs: &[Process], cur: usize, what: &str) {
    if let Err(e) = check_process(k, cpu, &procs[cur]) {
        panic!("after {what}: {e}");
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
fn vcpu_thread(k: &Kernel, mut cpu: impl Cpu, m: Option<&Machine>, seed: u64, ops: &Ops) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed * 0x1234_5678_9abc));
    let mut procs: Vec<Process> = Vec::new();
    let mut p = k.spawn(&mut cpu).unwrap();
    k.exec(&mut cpu, &mut p, &Image::default()).unwrap();
    procs.push(p);
    let mut cur = 0;
    for step in 0..STEPS {
        let op = rng.below(100);
        let what = format!("thread {seed} step {step} op {op}");
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
                check(k, &mut cpu, &procs, cur, &what);
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
            _ => {
                cur = rng.below(procs.len() as u64) as usize;
                k.switch_to(&mut cpu, &procs[cur]).unwrap();
                ops.switches.fetch_add(1, Ordering::Relaxed);
            }
        }
        audit(m, &what);
        check(k, &mut cpu, &procs, cur, &what);
    }
    // Every process, checked once more, then gone.
    for i in 0..procs.len() {
        check(k, &mut cpu, &procs, i, "the last step");
    }
    for p in procs {
        k.exit(&mut cpu, p).unwrap();
        ops.exits.fetch_add(1, Ordering::Relaxed);
    }
    audit(m, "the exits");
}

fn run(unsync: bool) {
    let config = VmConfig {
        paging: PagingConfig {
            unsync,
            prev_roots: 3,
        },
        ..VmConfig::default()
    };
    let m = Machine::new(RAM, Backing::Page4K, config).unwrap();
    let ops = Ops::default();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (m, ops) = (&m, &ops);
            s.spawn(move || vcpu_thread(&m.kernel, m.cpu().unwrap(), Some(m), t + 1, ops));
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
        "unsync={unsync}: forks {} execs {} exits {} mmaps {} munmaps {} switches {} touches {} \
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
    let mem: Arc<dyn GuestMemory> = Arc::new(SimGuestMemory::new(RAM));
    let k = Kernel::boot(mem.clone(), RAM).unwrap();
    let ops = Ops::default();
    for t in 0..THREADS {
        let cpu = SoftCpu::new(mem.clone(), k.idle_pml4());
        vcpu_thread(&k, cpu, None, t + 1, &ops);
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
    run(true);
}

#[test]
fn guest_os_on_vcpu_threads_all_tables_write_protected() {
    run(false);
}
