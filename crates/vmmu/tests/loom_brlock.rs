//! A loom model of the TDP fault gate (`brlock.rs`, `vm/lock.rs`): faults enter through a
//! big-reader lock, one reader slot per vCPU; an exclusive holder of the MMU takes the
//! reader-writer lock, then the gate's writer side.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p vmmu --test loom_brlock --release`.
//!
//! As `loom_tdp.rs`, a miniature written with loom's atomics: the same steps and memory
//! orderings as `BrLock::read`, `BrReadGuard::drop`, `BrLock::write_raw` and
//! `write_unlock_raw`, with the asymmetric fence pair modelled as two `SeqCst` fences (the
//! library's fallback without membarrier). The protected state is a loom cell, so a fault
//! reading it while a writer writes it is reported as a race; the writer also checks, by a
//! counter the faults raise while inside, that no fault overlaps it.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

use Ordering::{Acquire, Relaxed, Release, SeqCst};

struct Gate {
    writer: AtomicBool,
    slots: [AtomicU32; 3],
    /// The reader-writer lock every writer holds first (serializes writers).
    rw: Mutex<()>,
    state: UnsafeCell<u64>,
    inside: AtomicU32,
}

impl Gate {
    fn new() -> Self {
        Gate {
            writer: AtomicBool::new(false),
            slots: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            rw: Mutex::new(()),
            state: UnsafeCell::new(0),
            inside: AtomicU32::new(0),
        }
    }

    /// `BrLock::read` then the fault's reads, then `BrReadGuard::drop`.
    fn fault(&self, slot: usize) -> u64 {
        let s = &self.slots[slot];
        loop {
            s.fetch_add(1, Relaxed);
            fence(SeqCst); // light_fence
            if !self.writer.load(Acquire) {
                break;
            }
            s.fetch_sub(1, Release);
            while self.writer.load(Acquire) {
                thread::yield_now();
            }
        }
        self.inside.fetch_add(1, Relaxed);
        let v = self.state.with(|p| unsafe { *p });
        self.inside.fetch_sub(1, Relaxed);
        s.fetch_sub(1, Release);
        v
    }

    /// `Vm::lock` (rw write, then `write_raw`), a write of the state, then the unlocks.
    fn exclusive(&self) {
        let _rw = self.rw.lock().unwrap();
        self.writer.store(true, Relaxed);
        fence(SeqCst); // heavy_fence
        for s in &self.slots {
            while s.load(Acquire) != 0 {
                thread::yield_now();
            }
        }
        assert_eq!(self.inside.load(Relaxed), 0, "a fault is inside the gate");
        self.state.with_mut(|p| unsafe { *p += 1 });
        self.writer.store(false, Release);
    }
}

/// Run `f` under loom with at most `preemptions` preemptions (unless
/// `LOOM_MAX_PREEMPTIONS` says otherwise): the spin loops make unbounded runs explode.
fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(preemptions);
    }
    // A reader backing off and retrying while the writer waits can go round a few times.
    b.max_branches = 50_000;
    b.check(f);
}

#[test]
fn faults_and_an_exclusive_holder_never_overlap() {
    model(2, || {
        let g = Arc::new(Gate::new());
        let f = {
            let g = g.clone();
            thread::spawn(move || (g.fault(1), g.fault(2)))
        };
        g.exclusive();
        let (a, b) = f.join().unwrap();
        assert!(a <= b && b <= 1, "a later fault saw an older state");
        assert_eq!(g.state.with(|p| unsafe { *p }), 1);
    });
}

#[test]
fn two_writers_and_a_fault() {
    model(2, || {
        let g = Arc::new(Gate::new());
        let w = {
            let g = g.clone();
            thread::spawn(move || g.exclusive())
        };
        let f = {
            let g = g.clone();
            thread::spawn(move || g.fault(1))
        };
        g.exclusive();
        w.join().unwrap();
        let v = f.join().unwrap();
        assert!(v <= 2);
        assert_eq!(g.state.with(|p| unsafe { *p }), 2);
    });
}
