//! A loom model of the TDP MMU's concurrency protocol (issue 4): a fault racing a zap and
//! a write-protect on a small table set.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p vmmu --test loom_tdp --release`
//! (`LOOM_MAX_PREEMPTIONS` overrides each model's preemption bound).
//!
//! # What this is
//! The library uses `core`'s atomics directly, so loom cannot run its code. This file is a
//! faithful miniature of the protocol instead, written with loom's atomics, lock and
//! cells: the same steps, in the same order, with the same memory orderings as the
//! library code named beside each step below. A change to one of those functions should
//! be mirrored here. The table set is one root entry pointing at one 4K table with one
//! entry (one gfn, in a slot that logs dirty pages), and up to three more tables for the
//! faults to allocate.
//!
//! | model | library |
//! | --- | --- |
//! | `Mmu::lock` (`RwLock`) | `Vm::lock` / `Vm::lock_shared` (`vm.rs`): faults shared, zap and GET exclusive |
//! | `Table::get/set/cmpxchg/swap/fetch_and` | `table::Table` (Acquire / Release / AcqRel) |
//! | `Table::children`, `claim_child`, `clear_child` | `tdp::page::TdpPage` |
//! | `Table::used`, `set_used`, `clear_used` | the used-entries bitmap (`TdpPage`, seed 002) |
//! | `Mmu::alloc_page`, `free_unpublished` | `TdpMmu::alloc_page`, `TdpMmu::free_unpublished` |
//! | `Mmu::fault` | `TdpMmu::map` (`tdp/fault.rs`) then `Vm::log_dirty` and `Vm::commit_tdp` |
//! | `Mmu::zap_root_entry` | `ExclusiveMmu::zap_spte` (`tdp/zap.rs`) -> `set_spte` + `remove_subtree` + `handle_removed` (`tdp/spte_write.rs`), then `Vm::commit` |
//! | `Mmu::get_dirty_log` | `Vm::get_dirty_log` (`dirty/mod.rs`) + `TdpMmu::clear_dirty` (`tdp/ops.rs`) -> `ExclusiveMmu::clear_bits` (`tdp/spte_write.rs`) |
//! | `Mmu::flush_remote_tlbs` | `Vm::flush_remote_tlbs` -> `hw::request_vcpus` (fetch_or, `heavy_fence`, kick, wait for the mode word to change) |
//! | `Mmu::retire` | `TdpMmu::retire` after the flush (the table's memory is freed) |
//! | `Vcpu::enter_guest/exit_guest` | `Vm::enter` (`vm/run.rs`) -> `hw::vcpu::Cpu::service_requests`/`try_enter`, `Cpu::exit_guest` (`light_fence`) |
//! | `Vcpu::walk` | `hw::walk::lockless_walk` / `ept_walk` (A/D by compare-exchange) |
//! | `Vcpu::fast_page_fault` | `hw::walk::fast_page_fault`, then the dirty mark in `Vm::ept_violation` (`vm/run.rs`) |
//! | `Vcpu::write` | `Vm::access`: entry, TLB, walk, exit, fast path, slow fault, retry |
//!
//! Simplifications, each on the safe side of what it leaves out: the asymmetric fence pair
//! is modelled as two `SeqCst` fences (what the library uses without membarrier); epoch
//! reclamation is not modelled: in these scenarios only vCPUs walk tables without the MMU
//! lock, and they are covered by the flush, which is what the model checks; a table's
//! memory is a cell that `retire` writes and every access reads, so loom reports a use
//! after free as a race (and the `alive` flag catches a use ordered after the free); the
//! vCPU has a one-entry TLB; the mode is a flag (the library's mode word also counts its
//! changes, so a flusher can tell a later entry from the one it saw, and kicks a vCPU it
//! finds in guest mode: with one access per entry, as here, the kick changes nothing).
//!
//! # What is checked, in every interleaving
//! - no use of a freed table (by a vCPU's walk, a fault, a zap or a write-protect);
//! - no lost write: every write the vCPU made is either reported by a GET that completed
//!   after it, or still marked in the bitmap at the end;
//! - no lost write-protection: at the end, a writable leaf is marked dirty (a harvest's
//!   protection can only be undone by a fault or the fast path, which log the page);
//! - at the quiescent end, the used-entries bits mark exactly the present entries, no
//!   entry is frozen, and the root's child pointer matches its SPTE; every table the
//!   faults allocated is linked or freed.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use loom::sync::{Arc, RwLock};
use loom::thread;

use Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

// SPTE bits: a subset of `spte.rs`, renumbered.
const PRESENT: u64 = 1 << 0; // MMU_PRESENT: shadow-present
const W: u64 = 1 << 1; // WRITABLE
const MMU_W: u64 = 1 << 2; // MMU_WRITABLE | HOST_WRITABLE: W may be restored locklessly
const A: u64 = 1 << 3; // ACCESSED
const D: u64 = 1 << 4; // DIRTY
const LEAF: u64 = 1 << 5; // a leaf (the model's 4K level)
const FROZEN: u64 = 1 << 6; // `spte::FROZEN`: not present, being changed
const CHILD_SHIFT: u32 = 8; // a non-leaf holds its child's table id here
const NONE: u64 = 0;

/// Tables: the root (0) and three for the faults to allocate.
const TABLES: usize = 4;

fn nonleaf(child: usize) -> u64 {
    PRESENT | ((child as u64) << CHILD_SHIFT)
}
fn child_of(s: u64) -> usize {
    (s >> CHILD_SHIFT) as usize
}
fn present(s: u64) -> bool {
    s & PRESENT != 0
}
/// `SpteFormat::EPT.has_volatile_bits`: bits a CPU or the fast path may still set.
fn has_volatile_bits(s: u64) -> bool {
    present(s) && (s & A == 0 || (s & W != 0 && s & D == 0) || (s & W == 0 && s & MMU_W != 0))
}

/// One table of one entry, with what `TdpPage` keeps beside it.
struct Table {
    entry: AtomicU64,
    /// `TdpPage::children[0]`: child id + 1, 0 for none.
    child: AtomicUsize,
    /// `TdpPage::used`, bit 0.
    used: AtomicU64,
    /// The table's memory: `retire` writes it, every access reads it.
    alive: UnsafeCell<bool>,
}

impl Table {
    fn new() -> Self {
        Table {
            entry: AtomicU64::new(NONE),
            child: AtomicUsize::new(0),
            used: AtomicU64::new(0),
            alive: UnsafeCell::new(true),
        }
    }
    fn touch(&self, id: usize) {
        // SAFETY: a loom cell; loom checks that no free races this read.
        self.alive
            .with(|a| assert!(unsafe { *a }, "use of freed table {id}"));
    }
}

const OUTSIDE_GUEST_MODE: u8 = 0;
const IN_GUEST_MODE: u8 = 1;
const REQ_TLB_FLUSH: u32 = 1;

struct Mmu {
    lock: RwLock<()>,
    tables: Vec<Table>,
    /// Next table to hand out (`TdpMmu::alloc_page`); `TABLES` means out of memory.
    next: AtomicUsize,
    /// Tables freed (published and retired, or never published).
    freed: AtomicUsize,
    /// The slot's dirty bitmap word (`DirtyBitmap`), bit 0 for the model's gfn.
    dirty: AtomicU64,
    /// `CpuShared::mode` and `requests` of the one vCPU.
    mode: AtomicU8,
    requests: AtomicU32,
    /// Writes the vCPU completed (the model's observation, not library state).
    writes: AtomicU32,
}

impl Mmu {
    fn new() -> Self {
        Mmu {
            lock: RwLock::new(()),
            tables: (0..TABLES).map(|_| Table::new()).collect(),
            next: AtomicUsize::new(1),
            freed: AtomicUsize::new(0),
            dirty: AtomicU64::new(0),
            mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
            requests: AtomicU32::new(0),
            writes: AtomicU32::new(0),
        }
    }

    fn t(&self, id: usize) -> &Table {
        let t = &self.tables[id];
        t.touch(id);
        t
    }

    /// `TdpMmu::alloc_page`: a fresh zeroed table.
    fn alloc_page(&self) -> Option<usize> {
        let id = self.next.fetch_add(1, Relaxed);
        (id < TABLES).then_some(id)
    }

    /// Free a table's memory (`TableAllocator::free_table` via `TdpMmu::retire`, or
    /// `free_unpublished`).
    fn free(&self, id: usize) {
        // SAFETY: a loom cell; loom checks that no access races this write.
        self.tables[id].alive.with_mut(|a| unsafe { *a = false });
        self.freed.fetch_add(1, Relaxed);
    }

    /// `Vm::flush_remote_tlbs` -> `hw::request_vcpus`: post the request, `heavy_fence`,
    /// wait until the vCPU is not in guest mode without having seen it.
    fn flush_remote_tlbs(&self) {
        self.requests.fetch_or(REQ_TLB_FLUSH, Relaxed);
        fence(SeqCst);
        while self.mode.load(Acquire) == IN_GUEST_MODE {
            thread::yield_now();
        }
    }

    /// `Vm::commit` / `commit_tdp`: flush if owed, then retire the removed tables.
    fn commit(&self, flush: bool, removed: &[usize]) {
        if flush || !removed.is_empty() {
            self.flush_remote_tlbs();
        }
        for &id in removed {
            self.free(id);
        }
    }

    /// `Vm::page_fault` on the TDP MMU for a write to the model's gfn: `TdpMmu::map`
    /// under the shared lock, `log_dirty`, `commit_tdp`. The slot logs dirty pages, so a
    /// write fault maps the page writable and marks it (`writable: mmu_writable && (write
    /// || !logging)`, `dirty: write`).
    fn fault(&self) {
        let _shared = self.lock.read().unwrap();
        let mut removed = Vec::new();
        let mut flush = false;
        let mut mapped = false;
        let root = self.t(0);
        // Bounded: a lost race re-reads, and each loss is another thread's progress.
        for _ in 0..3 {
            let e = root.entry.load(Acquire);
            if e == FROZEN {
                break; // Spurious: the vCPU retries.
            }
            if !present(e) {
                // Link a new table (fault.rs: alloc, claim_child, compare-exchange).
                let Some(id) = self.alloc_page() else {
                    break; // OutOfTableMemory
                };
                if root
                    .child
                    .compare_exchange(0, id + 1, AcqRel, Acquire)
                    .is_err()
                {
                    self.free(id); // free_unpublished
                    continue;
                }
                if root
                    .entry
                    .compare_exchange(e, nonleaf(id), AcqRel, Acquire)
                    .is_err()
                {
                    root.child.store(0, Release); // clear_child
                    removed.push(id);
                    continue;
                }
                root.used.fetch_or(1, Release); // set_used
                continue; // it.reread(); it.next(): step down
            }
            // try_step_down: the recorded child must be the SPTE's.
            let id = child_of(e);
            if root.child.load(Acquire) != id + 1 {
                break; // the walk ends without reaching the level: Spurious
            }
            let t = self.t(id);
            let s = t.entry.load(Acquire);
            if s == FROZEN {
                break;
            }
            if present(s) && s & W != 0 {
                break; // Spurious: mapped writable already
            }
            let new = PRESENT | LEAF | W | MMU_W | A | D;
            if t.entry.compare_exchange(s, new, AcqRel, Acquire).is_err() {
                continue;
            }
            if !present(s) {
                t.used.fetch_or(1, Release);
            } else {
                flush = true;
            }
            mapped = true;
            break;
        }
        if mapped {
            self.dirty.fetch_or(1, AcqRel); // log_dirty: DirtyBitmap::mark
        }
        drop(_shared);
        self.commit(flush, &removed);
    }

    /// A zap of the root's entry under the exclusive lock (`zap_spte`, as `zap_root` and
    /// `zap_all` do it): clear the entry and its used bit, take the child out
    /// (`remove_subtree`: forget it, freeze its entries in `handle_removed`), flush, and
    /// only then free it.
    fn zap_root_entry(&self) {
        let _excl = self.lock.write().unwrap();
        let root = self.t(0);
        let old = root.entry.swap(NONE, AcqRel);
        root.used.fetch_and(!1, Release); // clear_used
        let mut removed = Vec::new();
        if present(old) {
            let id = root.child.load(Acquire);
            root.child.store(0, Release);
            assert_eq!(id, child_of(old) + 1, "non-leaf without its child page");
            let t = self.t(child_of(old));
            loop {
                let s = t.entry.load(Acquire);
                if s == FROZEN || t.entry.compare_exchange(s, FROZEN, AcqRel, Acquire).is_ok() {
                    break;
                }
            }
            removed.push(child_of(old));
        }
        self.commit(present(old), &removed);
    }

    /// `KVM_GET_DIRTY_LOG` without manual protect: exchange the bitmap word, then
    /// write-protect the harvested page (`clear_dirty`: W cleared by an atomic and-not
    /// when the SPTE has volatile bits, else by a plain store, under the exclusive lock),
    /// flush. Returns the word harvested and the writes done when the GET returned.
    fn get_dirty_log(&self) -> (u64, u32) {
        let _excl = self.lock.write().unwrap();
        let v = self.dirty.load(Relaxed);
        let got = if v != 0 {
            self.dirty.swap(0, AcqRel)
        } else {
            v
        };
        let mut flush = false;
        if got & 1 != 0 {
            let e = self.t(0).entry.load(Acquire);
            if present(e) {
                let t = self.t(child_of(e));
                let s = t.entry.load(Acquire);
                if present(s) && s & W != 0 {
                    if has_volatile_bits(s) {
                        t.entry.fetch_and(!W, AcqRel);
                    } else {
                        t.entry.store(s & !W, Release);
                    }
                    flush = true;
                }
            }
        }
        self.commit(flush, &[]);
        (got, self.writes.load(Acquire))
    }
}

/// The vCPU: its TLB (one entry: whether the gfn is cached writable) and the mode
/// protocol.
struct Vcpu<'a> {
    mmu: &'a Mmu,
    tlb_writable: bool,
}

enum Walk {
    Done,
    /// An EPT violation; `present` as in the error code's PRESENT bit.
    Violation {
        present: bool,
    },
}

impl Vcpu<'_> {
    /// `Vcpu::enter_guest`: store the mode, `light_fence`, read the requests; handle them
    /// outside guest mode and try again.
    fn enter_guest(&mut self) {
        loop {
            self.mmu.mode.store(IN_GUEST_MODE, Relaxed);
            fence(SeqCst);
            if self.mmu.requests.load(Relaxed) == 0 {
                return;
            }
            self.mmu.mode.store(OUTSIDE_GUEST_MODE, Release);
            let req = self.mmu.requests.swap(0, AcqRel);
            if req & REQ_TLB_FLUSH != 0 {
                self.tlb_writable = false;
            }
        }
    }

    fn exit_guest(&mut self) {
        self.mmu.mode.store(OUTSIDE_GUEST_MODE, Release);
    }

    /// `lockless_walk` to the leaf: (table, SPTE), or `None` at a non-present root entry.
    fn lockless_walk(&self) -> Option<(usize, u64)> {
        let e = self.mmu.t(0).entry.load(Acquire);
        if !present(e) {
            return None;
        }
        let id = child_of(e);
        Some((id, self.mmu.t(id).entry.load(Acquire)))
    }

    /// `ept_walk` for a write: the leaf must be present and writable; A and D are set by
    /// compare-exchange against the value read (walk again on failure). Fills the TLB.
    fn ept_walk_write(&mut self) -> Walk {
        loop {
            let Some((id, s)) = self.lockless_walk() else {
                return Walk::Violation { present: false };
            };
            if !present(s) {
                return Walk::Violation { present: false };
            }
            if s & W == 0 {
                return Walk::Violation { present: true };
            }
            if s & (A | D) != A | D
                && self
                    .mmu
                    .t(id)
                    .entry
                    .compare_exchange(s, s | A | D, AcqRel, Acquire)
                    .is_err()
            {
                continue;
            }
            self.tlb_writable = true;
            return Walk::Done;
        }
    }

    /// `fast_page_fault`: make a present, MMU-writable leaf writable with one
    /// compare-exchange, without the lock. Whether the access can be retried.
    fn fast_page_fault(&self) -> bool {
        loop {
            let Some((id, s)) = self.lockless_walk() else {
                return false;
            };
            if !present(s) || s & MMU_W == 0 {
                return false;
            }
            if s & W != 0 {
                return true;
            }
            if self
                .mmu
                .t(id)
                .entry
                .compare_exchange(s, s | W, AcqRel, Acquire)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// `Vm::access` for a write, with at most `tries` entries: TLB hit, or walk, or the
    /// fast path (which logs the page while still in guest mode), or the slow fault.
    /// Returns whether the write completed.
    fn write(&mut self, tries: usize) -> bool {
        for _ in 0..tries {
            self.enter_guest();
            let walked = if self.tlb_writable {
                Walk::Done
            } else {
                self.ept_walk_write()
            };
            match walked {
                Walk::Done => {
                    // The write itself, in guest mode.
                    self.mmu.writes.fetch_add(1, Release);
                    self.exit_guest();
                    return true;
                }
                Walk::Violation { present: true } if self.fast_page_fault() => {
                    // dirty_index.with(.., log_dirty): marked before leaving guest mode.
                    self.mmu.dirty.fetch_or(1, AcqRel);
                    self.exit_guest();
                }
                Walk::Violation { .. } => {
                    self.exit_guest();
                    self.mmu.fault();
                }
            }
        }
        false
    }
}

/// The checks at the quiescent end (see the module doc).
fn check_end(mmu: &Mmu, harvests: &[(u64, u32)]) {
    let root = mmu.t(0);
    let e = root.entry.load(Acquire);
    assert_ne!(e, FROZEN, "frozen root entry at the end");
    assert_eq!(
        root.used.load(Acquire) & 1 != 0,
        present(e),
        "root used bit"
    );
    if present(e) {
        assert_eq!(root.child.load(Acquire), child_of(e) + 1, "child pointer");
        let t = mmu.t(child_of(e));
        let s = t.entry.load(Acquire);
        assert_ne!(s, FROZEN, "frozen leaf at the end");
        assert_eq!(t.used.load(Acquire) & 1 != 0, present(s), "leaf used bit");
        if present(s) && s & W != 0 {
            assert!(
                mmu.dirty.load(Acquire) & 1 != 0,
                "lost write-protection: a writable leaf is not marked dirty"
            );
        }
    } else {
        assert_eq!(
            root.child.load(Acquire),
            0,
            "child recorded under an empty entry"
        );
    }
    // Every table handed out is linked (at most one) or freed.
    let handed = mmu.next.load(Relaxed).min(TABLES) - 1;
    let linked = usize::from(present(e));
    assert_eq!(handed, linked + mmu.freed.load(Relaxed), "a table leaked");
    // No lost write.
    let writes = mmu.writes.load(Acquire);
    let covered = mmu.dirty.load(Acquire) & 1 != 0
        || harvests
            .iter()
            .any(|&(got, seen)| got & 1 != 0 && seen == writes);
    assert!(
        writes == 0 || covered,
        "a write was lost: {writes} writes, harvests {harvests:?}"
    );
}

fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(preemptions);
    }
    b.check(f);
}

/// A vCPU writing twice (slow fault linking the table and installing the leaf, then a
/// TLB or walk hit) races a zap of the root entry that frees the table.
#[test]
fn fault_races_zap() {
    model(3, || {
        let mmu = Arc::new(Mmu::new());
        let m = mmu.clone();
        let zapper = thread::spawn(move || m.zap_root_entry());
        let mut v = Vcpu {
            mmu: &mmu,
            tlb_writable: false,
        };
        v.write(3);
        v.write(2);
        zapper.join().unwrap();
        check_end(&mmu, &[]);
    });
}

/// The page is mapped, written and logged; the vCPU writes again (TLB hit, or after the
/// harvest's protection, the fast path) while a GET harvests and write-protects it.
#[test]
fn write_races_write_protect() {
    model(3, || {
        let mmu = Arc::new(Mmu::new());
        {
            let mut v = Vcpu {
                mmu: &mmu,
                tlb_writable: false,
            };
            assert!(v.write(3));
        }
        let m = mmu.clone();
        let harvester = thread::spawn(move || {
            let a = m.get_dirty_log();
            let b = m.get_dirty_log();
            vec![a, b]
        });
        let mut v = Vcpu {
            mmu: &mmu,
            tlb_writable: true,
        };
        v.write(3);
        v.write(3);
        let harvests = harvester.join().unwrap();
        check_end(&mmu, &harvests);
    });
}

/// All three: the vCPU faults the page in and writes while one thread zaps the root entry
/// and another harvests and write-protects. (The zap and the GET are serialised by the
/// lock; what interleaves is the vCPU's lockless part with both.)
#[test]
fn fault_races_zap_and_write_protect() {
    model(2, || {
        let mmu = Arc::new(Mmu::new());
        let m = mmu.clone();
        let zapper = thread::spawn(move || m.zap_root_entry());
        let m = mmu.clone();
        let harvester = thread::spawn(move || vec![m.get_dirty_log()]);
        let mut v = Vcpu {
            mmu: &mmu,
            tlb_writable: false,
        };
        v.write(3);
        v.write(2);
        zapper.join().unwrap();
        let harvests = harvester.join().unwrap();
        check_end(&mmu, &harvests);
    });
}

/// Two faults (two vCPUs' slow paths, shared lock) race to link the one table and
/// install the leaf: one link wins, the loser's table is freed unpublished, the used bits
/// are exact and nothing leaks.
#[test]
fn two_faults_link_one_table() {
    model(3, || {
        let mmu = Arc::new(Mmu::new());
        let m = mmu.clone();
        let other = thread::spawn(move || m.fault());
        mmu.fault();
        other.join().unwrap();
        check_end(&mmu, &[]);
        let e = mmu.t(0).entry.load(Acquire);
        assert!(present(e), "neither fault linked the table");
    });
}
