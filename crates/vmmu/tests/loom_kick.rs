//! A loom model of the run loop's kick protocol (`hw/vcpu.rs`, `vm/run.rs`): a vCPU that
//! stays in guest mode across accesses, and a remote flush that unlinks a table, posts
//! the flush request, kicks the vCPU it finds in guest mode, waits for the vCPU's mode
//! word to change (its exit, the acknowledgement), then frees the table.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p vmmu --test loom_kick --release`.
//!
//! As `loom_tdp.rs`, a miniature written with loom's atomics, step for step:
//!
//! | model | library |
//! | --- | --- |
//! | `Vcpu::enter` | `Vm::enter` -> `Cpu::service_requests`, `Cpu::try_enter` (mode word: count and mode; `light_fence`), then the entry's INVEPT (`Vcpu::model_invept`) |
//! | `Vcpu::access` | `Vm::model_access`: the interrupt line first (a kick: exit, enter again), then the TLB or a walk |
//! | `Vcpu::exit` | `Cpu::exit_guest` (release store of the mode word) |
//! | `flush` | `hw::request_vcpus`: `fetch_or` of the request, `heavy_fence`, load of the mode word, the kick (`ModelKick`: raise the line), wait until the word changes; then `TdpMmu::retire` |
//!
//! The asymmetric fence pair is modelled as two `SeqCst` fences (the library's fallback
//! without membarrier). The table's memory is a loom cell that the flusher's free writes
//! and every walk reads, so a walk of a freed table is reported as a race. The second
//! property is freshness: an access that starts after the flush returned must not use
//! the removed translation (the kick made the vCPU leave guest mode, and its next entry
//! owed the INVEPT).
//!
//! What it caught and what it catches: with the guest-mode store `Relaxed` (as the
//! library had it at first), a flusher that waited on one entry's value and then read a
//! later entry's freed the table without a happens-before edge from the vCPU's walk
//! (loom: "Concurrent read and write accesses to `UnsafeCell`"); the library's stores of
//! the mode word are all `Release` now. Without the entry's INVEPT, the last access
//! returns the removed translation.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

use Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

const OUTSIDE: u64 = 0;
const IN_GUEST: u64 = 1;
const MODE_MASK: u64 = 3;
const STEP: u64 = 4;
const REQ_TLB_FLUSH: u32 = 1;
/// The translation the table holds.
const MAPPED: u64 = 7;

struct Shared {
    /// `CpuShared::state`, `requests`, `interrupt`.
    state: AtomicU64,
    requests: AtomicU32,
    interrupt: AtomicBool,
    /// The parent entry: whether the table is linked.
    linked: AtomicBool,
    /// The table's memory (its one leaf): `false` once freed.
    table: UnsafeCell<bool>,
    /// The flush has returned (the operation completed).
    done: AtomicBool,
}

/// The vCPU's own state (`Cpu`): the mode word's count, the TLB, the owed flush.
struct Vcpu<'a> {
    sh: &'a Shared,
    count: u64,
    tlb: Option<u64>,
    owed_flush: bool,
}

impl Vcpu<'_> {
    fn set_mode(&mut self, mode: u64, order: Ordering) {
        self.count += STEP;
        self.sh.state.store(self.count | mode, order);
    }

    /// `Vm::enter`, then the INVEPT the entry owes.
    fn enter(&mut self) {
        self.sh.interrupt.store(false, Relaxed);
        loop {
            if self.sh.requests.load(Relaxed) != 0
                && self.sh.requests.swap(0, AcqRel) & REQ_TLB_FLUSH != 0
            {
                self.owed_flush = true;
            }
            self.set_mode(IN_GUEST, Release);
            fence(SeqCst); // light_fence
            if self.sh.requests.load(Relaxed) == 0 {
                break;
            }
            self.set_mode(OUTSIDE, Release);
        }
        if std::mem::take(&mut self.owed_flush) {
            self.tlb = None; // INVEPT
        }
    }

    fn exit(&mut self) {
        self.set_mode(OUTSIDE, Release);
    }

    /// `Vm::model_access` in guest mode, with the model's run loop around it: a kick
    /// exits and enters again; a TLB miss walks.
    fn access(&mut self) -> u64 {
        if self.sh.interrupt.load(Relaxed) && self.sh.interrupt.swap(false, Acquire) {
            self.exit();
            self.enter();
        }
        if let Some(v) = self.tlb {
            return v;
        }
        if !self.sh.linked.load(Acquire) {
            return 0; // an EPT violation: unmapped now
        }
        // SAFETY: a loom cell; loom reports a read racing the free.
        let alive = self.sh.table.with(|a| unsafe { *a });
        assert!(alive, "walked a freed table");
        self.tlb = Some(MAPPED);
        MAPPED
    }
}

/// The remote flush of an operation that unlinked the table, then the free.
fn flush_and_free(sh: &Shared) {
    sh.linked.store(false, Release);
    sh.requests.fetch_or(REQ_TLB_FLUSH, Relaxed);
    fence(SeqCst); // heavy_fence
    let s = sh.state.load(Acquire);
    if s & MODE_MASK != OUTSIDE {
        if s & MODE_MASK == IN_GUEST {
            sh.interrupt.store(true, Release); // the kick
        }
        while sh.state.load(Acquire) == s {
            thread::yield_now();
        }
    }
    // SAFETY: a loom cell; loom reports a free racing a walk.
    sh.table.with_mut(|a| unsafe { *a = false });
    sh.done.store(true, Release);
}

#[test]
fn kicked_vcpu_leaves_guest_mode_and_flushes_before_reuse() {
    // Three preemptions cover every interleaving the properties need (the kick seen by
    // either access, the flusher's load before, between or after the entry's stores) and
    // keep a debug run, as CI does, to seconds.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let sh = Arc::new(Shared {
            state: AtomicU64::new(OUTSIDE),
            requests: AtomicU32::new(0),
            interrupt: AtomicBool::new(false),
            linked: AtomicBool::new(true),
            table: UnsafeCell::new(true),
            done: AtomicBool::new(false),
        });
        let flusher = {
            let sh = sh.clone();
            thread::spawn(move || flush_and_free(&sh))
        };
        let mut v = Vcpu {
            sh: &sh,
            count: 0,
            tlb: None,
            owed_flush: true,
        };
        v.enter();
        // Two accesses (the first may fill the TLB, either may take the kick), then one
        // that must be fresh if it starts after the flush returned.
        let _ = v.access();
        let _ = v.access();
        let after_flush = sh.done.load(Acquire);
        let last = v.access();
        if after_flush {
            assert_eq!(last, 0, "a stale translation after the flush returned");
        }
        // The end of the stretch: leave guest mode.
        v.exit();
        flusher.join().unwrap();
    });
}
