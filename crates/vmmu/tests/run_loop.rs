//! The run loop (`vmmu::vm::run`) with the CPU model standing in for VMX: vCPUs that stay
//! in guest mode across many accesses, leave it only when kicked or when an access exits,
//! and flush their TLB only when an entry says INVEPT.
//!
//! Three tests each catch one omission in the library (each was shown by removing the
//! library's part and watching the test fail; see the CHANGELOG):
//! - [`remote_flush_kicks_a_vcpu_in_guest_mode`]: a remote flush that does not kick a
//!   vCPU in guest mode never completes (the vCPU never leaves): the watchdog fails it.
//! - [`entry_owes_invept_after_a_remote_flush`]: an entry that does not report the
//!   INVEPT a flush request owes leaves a stale translation of a deleted memslot.
//! - [`entry_reloads_an_invalidated_root`]: an entry that ignores a root reload keeps
//!   the vCPU on the fast-zapped root, where its faults never map anything.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gpa, Pfn};
use vmmu::{
    EntryState, EptViolation, Eptp, Error, Exit, ExitAction, Invept, MemslotFlags, MmuKind,
    ModelKick, TdpIteration, Vcpu, VmConfig, VmExit,
};

/// How long a vCPU thread waits in guest mode for the other thread's operation before
/// it declares the operation stuck (a deadlock detector, not a timing assertion: the
/// operation takes microseconds once the vCPU is kicked).
const WATCHDOG: Duration = Duration::from_secs(20);

struct Env {
    host: Arc<vmmu::host::SimHostMemory>,
    vm: TestVm,
    slot: SlotSpec,
    kick: Arc<ModelKick>,
}

fn env(config: VmConfig) -> Env {
    let (host, mut vm) = new_vm(config);
    let kick = Arc::new(ModelKick::new());
    vm.set_kick(kick.clone());
    let hva = mmap(&host, 4 * M1, Backing::Page4K);
    let slot = add_slot(
        &vm,
        SlotSpec {
            id: 0,
            gpa: G1,
            size: 4 * M1,
            hva,
            flags: MemslotFlags::empty(),
        },
    );
    Env {
        host,
        vm,
        slot,
        kick,
    }
}

impl Env {
    fn vcpu(&self) -> Vcpu {
        let v = self.vm.create_run_loop_vcpu().unwrap();
        self.kick.register(&v);
        v
    }
}

/// A vCPU thread in guest mode for the whole run: it reads `p` (so the TLB holds it),
/// meets `op` at the barrier, then keeps reading `p` from the TLB, in guest mode, until
/// `op` has returned; then reads `p` once more and returns that read with the kicks it
/// took and its exits since the barrier. `op` runs on this thread's peer.
fn race(
    e: &Env,
    vcpu: &mut Vcpu,
    p: u64,
    op: impl FnOnce() + Send,
) -> (Result<vmmu::types::Hpa, Exit>, u64, u64) {
    let ready = Barrier::new(2);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            ready.wait();
            op();
            done.store(true, Ordering::Release);
        });
        let mut run = e.vm.model_run(vcpu, u64::MAX).unwrap();
        run.read(Gpa(p)).unwrap();
        assert!(run.in_guest_mode(), "the model stays in guest mode");
        let exits = run.vcpu().exits;
        ready.wait();
        let t0 = Instant::now();
        while !done.load(Ordering::Acquire) {
            // Translations from the TLB while the operation runs: the old one is still
            // allowed until the operation returns.
            let _ = run.read(Gpa(p));
            if t0.elapsed() > WATCHDOG {
                run.exit();
                panic!(
                    "the operation did not complete while the vCPU stayed in guest mode: \
                     it was never kicked ({} kicks taken)",
                    run.kicks
                );
            }
        }
        let after = run.read(Gpa(p));
        let exits = run.vcpu().exits - exits;
        (after, run.kicks, exits)
    })
}

/// A remote flush kicks a vCPU that stays in guest mode and waits for it to leave; its
/// next access walks again. Without the kick the flush would wait for ever.
#[test]
fn remote_flush_kicks_a_vcpu_in_guest_mode() {
    let e = env(default_config());
    let mut vcpu = e.vcpu();
    let p = e.slot.gpa + 5 * K4;
    let gfn = Gpa(p).gfn();
    let (after, kicks, exits) = race(&e, &mut vcpu, p, || {
        e.vm.zap_gfn_range(gfn, vmmu::types::Gfn(gfn.0 + 1))
            .unwrap()
    });
    assert_eq!(after.unwrap(), expected_hpa(&e.host, &e.slot, p));
    assert!(kicks >= 1, "the flush did not kick the vCPU");
    assert!(exits >= 1, "the access after the zap hit a stale TLB entry");
    assert!(e.vm.stats().kicks >= 1);
    e.vm.release_vcpu(vcpu).unwrap();
    e.vm.audit().unwrap();
}

/// After a memslot is deleted, a vCPU that was in guest mode with its pages in the TLB
/// must see MMIO: the entry after the kick owes an INVEPT. Without it, the model's TLB
/// keeps translating the deleted slot.
#[test]
fn entry_owes_invept_after_a_remote_flush() {
    let e = env(default_config());
    let mut vcpu = e.vcpu();
    let p = e.slot.gpa + 9 * K4 + 0x18;
    let invepts = vcpu.invepts;
    let region = vmmu::MemoryRegion {
        memory_size: 0,
        ..e.slot.region()
    };
    let (after, kicks, _) = race(&e, &mut vcpu, p, || {
        e.vm.set_user_memory_region(region).unwrap()
    });
    assert_eq!(
        after,
        Err(Exit::Mmio {
            gpa: Gpa(p),
            write: false
        }),
        "a stale translation of the deleted slot"
    );
    assert!(kicks >= 1);
    assert!(
        vcpu.invepts >= invepts + 2,
        "the first entry and the one after the kick"
    );
    e.vm.release_vcpu(vcpu).unwrap();
    e.vm.audit().unwrap();
}

/// A fast zap invalidates the TDP MMU's root: the vCPU's entry after the kick loads the
/// new one (and flushes for it), and the access maps the page again there. An entry that
/// ignored the reload would leave the vCPU on the zapped root, where every fault is
/// spurious: the access never completes.
#[test]
fn entry_reloads_an_invalidated_root() {
    let e = env(VmConfig {
        mmu: MmuKind::Tdp(TdpIteration::UsedEntries),
        ..VmConfig::default()
    });
    let mut vcpu = e.vcpu();
    let p = e.slot.gpa + 3 * K4;
    let old_root = vcpu.root();
    let (after, kicks, exits) = race(&e, &mut vcpu, p, || e.vm.zap_all_fast().unwrap());
    assert_eq!(after.unwrap(), expected_hpa(&e.host, &e.slot, p));
    assert!(kicks >= 1);
    assert!(
        exits >= 1,
        "the access after the fast zap hit a stale TLB entry"
    );
    assert_ne!(
        vcpu.root(),
        old_root,
        "the vCPU still runs on the invalidated root"
    );
    e.vm.release_vcpu(vcpu).unwrap();
    settle_tables(&e.vm);
    e.vm.audit().unwrap();
}

/// The entry state: the EPTP (root, write-back, 4 levels, A/D), loaded and flushed on the
/// first entry; nothing owed on a quiet re-entry; an INVEPT after a flush request.
#[test]
fn entry_state_reports_eptp_reload_and_invept() {
    let e = env(default_config());
    let mut vcpu = e.vcpu();
    let first: EntryState = e.vm.enter_guest(&mut vcpu).unwrap();
    let eptp = first.eptp;
    assert_eq!(eptp.root(), vcpu.root());
    assert_eq!(eptp.memory_type(), Eptp::MEMORY_TYPE_WB);
    assert_eq!(eptp.walk_levels(), 4);
    assert!(eptp.ad_enabled());
    assert_eq!(eptp.bits() & 0xfff, 6 | 3 << 3 | 1 << 6);
    assert_eq!(Eptp::new(Pfn(0x1234)).root(), Pfn(0x1234));
    assert!(first.load_eptp);
    assert_eq!(first.invept, Invept::SingleContext(eptp));
    assert!(vcpu.in_guest_mode());
    e.vm.exit_guest(&mut vcpu).unwrap();
    let quiet = e.vm.enter_guest(&mut vcpu).unwrap();
    assert_eq!(
        quiet,
        EntryState {
            eptp,
            load_eptp: false,
            invept: Invept::None
        }
    );
    e.vm.exit_guest(&mut vcpu).unwrap();
    e.vm.flush_remote_tlbs();
    let after = e.vm.enter_guest(&mut vcpu).unwrap();
    assert_eq!(after.invept, Invept::SingleContext(eptp));
    assert!(!after.load_eptp);
    e.vm.exit_guest(&mut vcpu).unwrap();
    e.vm.release_vcpu(vcpu).unwrap();
}

/// The run loop by hand, as an embedder writes it: exits in the form VMX reports them,
/// and the actions vmmu answers with.
#[test]
fn exits_as_the_hardware_reports_them() {
    let e = env(default_config());
    let ro_hva = mmap(&e.host, 2 * M1, Backing::Page4K);
    let ro = add_slot(
        &e.vm,
        SlotSpec {
            id: 1,
            gpa: 2 * G1,
            size: 2 * M1,
            hva: ro_hva,
            flags: MemslotFlags::READONLY,
        },
    );
    let mut vcpu = e.vcpu();
    // Run `gpa` until it completes or exits to the VMM; the exits it took.
    let run = |vcpu: &mut Vcpu, gpa: u64, kind: AccessKind| {
        let mut exits = Vec::new();
        loop {
            let entry = e.vm.enter_guest(vcpu).unwrap();
            vcpu.model_invept(entry.invept);
            let exit = match e.vm.model_access(vcpu, Gpa(gpa), kind).unwrap() {
                Ok(hpa) => {
                    e.vm.exit_guest(vcpu).unwrap();
                    return (Ok(hpa), exits);
                }
                Err(x) => x,
            };
            assert!(
                vcpu.in_guest_mode(),
                "software leaves guest mode, not the exit"
            );
            assert_eq!(
                e.vm.model_access(vcpu, Gpa(gpa), kind),
                Err(Error::NotInGuestMode { vcpu: vcpu.id }),
                "no access after a VM exit"
            );
            e.vm.exit_guest(vcpu).unwrap();
            let action = match exit {
                VmExit::EptViolation { gpa, qualification } => {
                    e.vm.handle_ept_violation(vcpu, gpa, qualification).unwrap()
                }
                VmExit::EptMisconfig { gpa } => e.vm.handle_ept_misconfig(vcpu, gpa).unwrap(),
                VmExit::ExternalInterrupt => ExitAction::Resume,
            };
            exits.push((exit, action.clone()));
            if action != ExitAction::Resume {
                return (Err(action), exits);
            }
        }
    };
    // A not-present write: the qualification says write, nothing permitted, final
    // translation of a linear address; the fault maps, the retry completes.
    let p = e.slot.gpa + 0x3008;
    let (hpa, exits) = run(&mut vcpu, p, AccessKind::Write);
    assert_eq!(hpa.unwrap(), expected_hpa(&e.host, &e.slot, p));
    let VmExit::EptViolation { qualification, .. } = exits[0].0 else {
        panic!("{exits:?}")
    };
    let q = EptViolation::decode(qualification).unwrap();
    assert!(q.write && !q.read && !q.present() && q.gla_valid && q.translated);
    // A write to a READONLY slot: present, readable, not writable: MMIO to emulate.
    let r = ro.gpa + 0x10;
    assert!(run(&mut vcpu, r, AccessKind::Read).0.is_ok());
    let (got, exits) = run(&mut vcpu, r, AccessKind::Write);
    assert_eq!(got, Err(ExitAction::EmulateMmio { gpa: Gpa(r) }));
    let VmExit::EptViolation { qualification, .. } = exits[0].0 else {
        panic!("{exits:?}")
    };
    let q = EptViolation::decode(qualification).unwrap();
    assert!(q.write && q.readable && !q.writable && q.present());
    // Outside every memslot: a violation the first time (the fault installs an MMIO
    // SPTE), a misconfiguration after, recognised from the SPTE alone.
    let m = 3 * G1 + 0x40;
    let (got, exits) = run(&mut vcpu, m, AccessKind::Read);
    assert_eq!(got, Err(ExitAction::EmulateMmio { gpa: Gpa(m) }));
    assert!(matches!(exits[0].0, VmExit::EptViolation { .. }));
    let fast = e.vm.stats().fast_mmio_exits;
    let (got, exits) = run(&mut vcpu, m, AccessKind::Read);
    assert_eq!(got, Err(ExitAction::EmulateMmio { gpa: Gpa(m) }));
    assert_eq!(exits[0].0, VmExit::EptMisconfig { gpa: Gpa(m) });
    assert_eq!(e.vm.stats().fast_mmio_exits, fast + 1);
    // A write-tracked page: the write is the tracker's to emulate.
    let t = e.slot.gpa + 7 * K4;
    e.vm.track_write(Gpa(t).gfn()).unwrap();
    let (got, _) = run(&mut vcpu, t, AccessKind::Write);
    assert_eq!(got, Err(ExitAction::EmulateWrite { gpa: Gpa(t) }));
    // A hand-made qualification, as a VMCS gives it: a fetch of a page not mapped yet.
    let f = e.slot.gpa + 11 * K4;
    let q = EptViolation::decode(1 << 2 | 1 << 7 | 1 << 8).unwrap();
    assert_eq!(
        e.vm.handle_ept_violation(&mut vcpu, Gpa(f), q.encode()),
        Ok(ExitAction::Resume)
    );
    assert!(
        run(&mut vcpu, f, AccessKind::Fetch).1.is_empty(),
        "mapped by the handler"
    );
    e.vm.release_vcpu(vcpu).unwrap();
    e.vm.audit().unwrap();
}

/// Dirty logging in the run loop: a write to a page write-protected for logging exits
/// with a present, readable, not writable violation that the lockless fast path fixes;
/// the page is logged.
#[test]
fn dirty_logging_through_the_run_loop() {
    let e = env(default_config());
    let mut vcpu = e.vcpu();
    let p = e.slot.gpa + 12 * K4;
    {
        let mut run = e.vm.model_run(&mut vcpu, 64).unwrap();
        run.write(Gpa(p)).unwrap();
    }
    let log = SlotSpec {
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        ..e.slot
    };
    e.vm.set_user_memory_region(log.region()).unwrap();
    let fast = e.vm.stats().fast_page_faults;
    {
        let mut run = e.vm.model_run(&mut vcpu, 64).unwrap();
        run.read(Gpa(p)).unwrap();
        run.write(Gpa(p)).unwrap();
    }
    let mut bitmap = vec![0u64; (log.pages() as usize).div_ceil(64)];
    e.vm.get_dirty_log(0, &mut bitmap).unwrap();
    assert_ne!(bitmap[0] & 1 << 12, 0, "the write was not logged");
    assert!(
        e.vm.stats().fast_page_faults > fast,
        "the write-protected page was not fixed by the fast path"
    );
    e.vm.release_vcpu(vcpu).unwrap();
    e.vm.audit().unwrap();
}

/// Misuse of the run loop gets typed errors and changes nothing.
#[test]
fn run_loop_misuse_is_refused() {
    // No kick: no vCPU that stays in guest mode.
    let (_h, vm) = new_vm(default_config());
    assert_eq!(vm.create_run_loop_vcpu().err(), Some(Error::NoKick));
    let mut plain = vm.create_vcpu().unwrap();
    assert_eq!(
        vm.enter_guest(&mut plain),
        Err(Exit::Error(Error::NotRunLoopVcpu { vcpu: plain.id }))
    );
    assert!(!plain.in_guest_mode());
    let e = env(default_config());
    // A vCPU of another VM.
    assert_eq!(
        e.vm.enter_guest(&mut plain),
        Err(Exit::Error(Error::ForeignVcpu { vcpu: plain.id }))
    );
    let mut vcpu = e.vcpu();
    let p = Gpa(e.slot.gpa);
    assert_eq!(
        e.vm.model_access(&mut vcpu, p, AccessKind::Read),
        Err(Error::NotInGuestMode { vcpu: vcpu.id })
    );
    e.vm.enter_guest(&mut vcpu).unwrap();
    let in_guest = Error::InGuestMode { vcpu: vcpu.id };
    assert_eq!(
        e.vm.enter_guest(&mut vcpu),
        Err(Exit::Error(in_guest.clone()))
    );
    assert_eq!(
        e.vm.handle_ept_violation(&mut vcpu, p, 1),
        Err(in_guest.clone())
    );
    assert_eq!(
        e.vm.handle_ept_misconfig(&mut vcpu, p),
        Err(in_guest.clone())
    );
    assert_eq!(e.vm.read(&mut vcpu, p), Err(Exit::Error(in_guest.clone())));
    assert_eq!(
        e.vm.page_fault(&vcpu, p, vmmu::types::ErrorCode::empty()),
        Err(in_guest)
    );
    e.vm.exit_guest(&mut vcpu).unwrap();
    assert!(matches!(
        e.vm.handle_ept_violation(&mut vcpu, p, 0),
        Err(Error::InvalidExitQualification { .. })
    ));
    assert!(matches!(
        e.vm.handle_ept_violation(&mut vcpu, p, 1 << 40 | 1),
        Err(Error::InvalidExitQualification { .. })
    ));
    assert!(matches!(
        e.vm.handle_ept_violation(&mut vcpu, Gpa(1 << 52), 1),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        e.vm.model_run(&mut vcpu, 0),
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(vcpu.exits, 0, "nothing was handled");
    // A vCPU dropped in guest mode leaves it: flushes do not wait for it.
    let mut gone = e.vcpu();
    e.vm.enter_guest(&mut gone).unwrap();
    drop(gone);
    e.vm.flush_remote_tlbs();
    e.vm.release_vcpu(vcpu).unwrap();
    e.vm.audit().unwrap();
}

/// Sets its flag if the thread unwinds past it (so the other side stops waiting).
struct FailOnPanic<'a>(&'a AtomicBool);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Many vCPU threads in long guest-mode stretches while another thread zaps, moves and
/// deletes what they use: every access returns the translation the host gives now, or
/// one the operation in progress may still leave (checked after each operation returns).
#[test]
fn long_stretches_under_concurrent_zaps() {
    let e = env(default_config());
    let stop = AtomicBool::new(false);
    let rounds = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let pages = 64;
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let mut vcpu = e.vcpu();
            let (e, stop, rounds, done, failed) = (&e, &stop, &rounds, &done, &failed);
            s.spawn(move || {
                let _flag = FailOnPanic(failed);
                let mut run = e.vm.model_run(&mut vcpu, u64::MAX).unwrap();
                let mut i = t;
                let mut seen = (0, Instant::now());
                while !stop.load(Ordering::Acquire) {
                    let r = rounds.load(Ordering::Relaxed);
                    if r != seen.0 {
                        seen = (r, Instant::now());
                    } else if seen.1.elapsed() > WATCHDOG {
                        run.exit();
                        panic!("no operation completed while this vCPU was in guest mode");
                    }
                    let gpa = e.slot.gpa + (i % pages) * K4;
                    let kind = if i % 3 == 0 {
                        AccessKind::Write
                    } else {
                        AccessKind::Read
                    };
                    let hpa = run.access(Gpa(gpa), kind).unwrap();
                    assert_eq!(hpa, expected_hpa(&e.host, &e.slot, gpa));
                    done.fetch_add(1, Ordering::Relaxed);
                    i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407)
                        >> 3;
                }
                drop(run);
                e.vm.release_vcpu(vcpu).unwrap();
            });
        }
        for round in 0..200u64 {
            // Let the vCPUs run between operations, so they are in guest mode for them.
            let seen = done.load(Ordering::Relaxed);
            while done.load(Ordering::Relaxed) < seen + 16 {
                if failed.load(Ordering::Acquire) {
                    break;
                }
                std::thread::yield_now();
            }
            if failed.load(Ordering::Acquire) {
                break;
            }
            let g = Gpa(e.slot.gpa + (round % pages) * K4).gfn();
            match round % 4 {
                0 | 1 => e.vm.zap_gfn_range(g, vmmu::types::Gfn(g.0 + 8)).unwrap(),
                2 => e.vm.zap_all().unwrap(),
                _ => e.vm.zap_all_fast().unwrap(),
            }
            rounds.fetch_add(1, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Release);
    });
    assert!(e.vm.stats().kicks > 0);
    e.vm.audit().unwrap();
}
