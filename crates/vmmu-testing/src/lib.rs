//! Test support for vmmu: a reference model of what the guest must see, an operation
//! interpreter that drives a real [`vmmu::Vm`] and the model side by side, and a
//! concurrent soak.
//!
//! Used by the differential property tests (`crates/vmmu/tests/proptest_ops.rs`), the fuzz
//! target (`fuzz/`), the short soak test and `vmmu soak`. Nothing here is part
//! of the library: it only uses vmmu's public API.
//!
//! - [`model`]: the simplest thing that could be right: memslots as plain ranges, the
//!   host's translation as the ground truth for gfn -> (pfn, writable, executable), a set
//!   of dirty pages per logging slot (or, with dirty rings, the pages each ring owes),
//!   write-tracking counts, the open invalidation window. It predicts the result of every
//!   public call, errors included.
//! - [`op`]: the operations ([`Op`]) and their decoding from arbitrary bytes (the fuzz
//!   target's input), malformed ones included.
//! - [`view`]: what the MMU holds, read side-effect free under the MMU lock: every leaf
//!   reachable from every root any vCPU may use, and a [`view::Snapshot`] for "a rejected
//!   call changed nothing".
//! - [`interp`]: the [`Interp`]reter: applies an [`Op`] to the VM and the model, compares
//!   the results, then checks the audit, the slot set, the dirty bitmaps, every leaf against
//!   the model (never a stale pfn, never more permissive) and every vCPU's translation of
//!   every touched page. At teardown it checks that every table was freed.
//! - [`reference_walk`]: an x86-64 4-level guest page walker from the Intel SDM rules, the
//!   oracle of the shadow-paging tests (translation, #PF error code, A/D updates).
//! - [`failing_alloc`]: a table allocator told to fail from its Nth allocation on, for
//!   the allocation-failure atomicity tests.
//! - `migrate` (Linux): live migration end to end on real memory (`RealHostMemory`):
//!   vCPU threads writing a workload, pre-copy rounds by dirty-log mode, stop-and-copy,
//!   the destination compared byte for byte; workloads and replayable traces.
//! - [`soak`]: vCPU threads, a harvester, a notifier thread and a memslot thread on one VM
//!   for a bounded time, with the audit and the model's checks at quiescent points.
//!
//! # Which MMUs
//! [`MMUS`] lists the MMUs the tests run. The model knows nothing about MMUs; the
//! interpreter's only MMU-specific code is [`view::with_tables`] (take the lock, name the
//! roots) and the accounting in [`interp::Interp::teardown`]. Shadow paging (issue 5)
//! adds an entry to [`MMUS`] and an arm to each of those two matches.

pub mod failing_alloc;
pub mod guest_os;
pub mod interp;
#[cfg(target_os = "linux")]
pub mod migrate;
pub mod model;
pub mod op;
pub mod reference_walk;
pub mod soak;
pub mod view;

pub use failing_alloc::FailingAllocator;
pub use interp::{Failure, Interp, RunConfig, RunStats};
pub use model::{DirtyMode, Model};
pub use op::Op;

use vmmu::{MmuKind, TdpIteration};

/// Every MMU the differential tests run, with its name.
pub const MMUS: &[(&str, MmuKind)] = &[
    ("shadow-direct", MmuKind::ShadowDirect),
    ("tdp-scan", MmuKind::Tdp(TdpIteration::ScanAll)),
    ("tdp-skip", MmuKind::Tdp(TdpIteration::SkipNonPresent)),
    ("tdp-used", MmuKind::Tdp(TdpIteration::UsedEntries)),
];

/// The MMU named `name` (one of [`MMUS`], or `shadow` / `tdp` for short).
pub fn mmu_by_name(name: &str) -> Option<MmuKind> {
    match name {
        "shadow" => Some(MmuKind::ShadowDirect),
        "tdp" => Some(MmuKind::Tdp(TdpIteration::SkipNonPresent)),
        _ => MMUS.iter().find(|(n, _)| *n == name).map(|&(_, k)| k),
    }
}

/// The name of `kind` in [`MMUS`].
pub fn mmu_name(kind: MmuKind) -> &'static str {
    MMUS.iter()
        .find(|(_, k)| *k == kind)
        .map_or("unknown", |&(n, _)| n)
}

/// Whether a test that runs every MMU itself should skip this run: the integration tests
/// are run again with `VMMU_TEST_MMU` naming a TDP mode (`.ci/run`), and these need not.
/// Prints why when it says so.
pub fn skip_rerun(test: &str) -> bool {
    match std::env::var("VMMU_TEST_MMU").as_deref() {
        Err(_) | Ok("") | Ok("shadow") => false,
        Ok(other) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "note: {test}: skipped under VMMU_TEST_MMU={other}: it runs every MMU itself"
            );
            true
        }
    }
}

/// A small deterministic PRNG (xorshift64*), so nothing here needs a dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; a zero seed is replaced.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// In `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}
