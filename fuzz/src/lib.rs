//! The fuzz target's body, shared by the libFuzzer entry point and the stable runner.
//!
//! An input is a run configuration (MMU, dirty-log mode, largest mapping level, the
//! shadow MMU's algorithm switches, guest-physical width, slot and vCPU limits, whether
//! a 1 GiB hugetlb slot exists) followed by up to [`MAX_OPS`] operations, all decoded from
//! the bytes by `vmmu_testing` (`RunConfig::decode`, `Op::decode_all`), malformed ones
//! included: overlapping and oversized slots, ranges past the end, misaligned and huge
//! clear-log ranges, reversed zap and host-virtual ranges, untracking untracked pages,
//! ending invalidations never started, harvesting vCPUs that do not exist.
//!
//! Every operation is checked against the reference model and followed by the full check
//! (audit, slots, bitmaps, every leaf, every vCPU's reads); teardown checks every table
//! was freed. Any difference panics, and so does any panic inside vmmu.

use vmmu_testing::interp::RunConfig;
use vmmu_testing::op::Bytes;
use vmmu_testing::{Interp, Op};

/// Most operations one input runs.
pub const MAX_OPS: usize = 256;

/// Run one input; panics on any broken property.
pub fn run_input(data: &[u8]) {
    let mut r = Bytes(data);
    let cfg = RunConfig::decode(&mut r);
    let ops = Op::decode_all(r.0, MAX_OPS);
    let mut it = match Interp::new(cfg) {
        Ok(it) => it,
        Err(f) => panic!("setup failed: {f}"),
    };
    // The shapes' slots first, so accesses land in memory.
    for (i, at) in [0u64, (16 << 20) + 3 * 4096, (32 << 20) + (1 << 20), 0]
        .into_iter()
        .take(cfg.nshapes())
        .enumerate()
    {
        let op = Op::Create {
            slot: i as u8,
            at,
            log: false,
            readonly: false,
        };
        if let Err(f) = it.apply(&op) {
            panic!("{cfg:?}: {f}");
        }
    }
    for op in &ops {
        if let Err(f) = it.apply(op) {
            panic!("{cfg:?}: {f}");
        }
    }
    if let Err(f) = it.teardown() {
        panic!("{cfg:?}: {f}");
    }
}
