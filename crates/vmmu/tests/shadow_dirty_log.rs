//! The dirty-log property test under shadow paging: a guest maps a logging memslot
//! through its own page tables three ways at once (4 KiB pages, 2 MiB guest pages, and a
//! permuted 4 KiB alias), writes and reads by gva, while the VMM toggles logging,
//! harvests (GET, or GET + CLEAR with manual protect), reclaims shadow pages and the
//! guest reloads CR3. Every harvest must report exactly the pages written since the last
//! one, whichever alias wrote them, under every reverse-map and write-protect algorithm
//! and with unsync on or off; every read returns the last value written through any
//! alias; the audit holds after every step.

mod paging;

use std::collections::{BTreeMap, BTreeSet};

use paging::{Guest, UP};
use proptest::prelude::*;
use vmmu::host::Backing;
use vmmu::types::{AccessKind, Gva, Level};
use vmmu::{
    Algorithms, DirtyLogConfig, DirtyWrprot, MemoryRegion, MemslotFlags, PageWrprot, PagingConfig,
    RmapDrop, RmapIteration, VmConfig,
};

const DATA: u64 = 1 << 30;
const PAGES: u64 = 1024; // 4 MiB: two guest huge pages
const A: u64 = 0x10_0000_0000;
const B: u64 = 0x20_0000_0000;
const C: u64 = 0x30_0000_0000;

#[derive(Clone, Debug)]
enum Op {
    /// Write through alias `alias` (0 = 4K, 1 = 2M, 2 = permuted 4K) to page `page`.
    Write {
        alias: u8,
        page: u64,
        vcpu: u8,
    },
    Read {
        alias: u8,
        page: u64,
        vcpu: u8,
    },
    Harvest {
        clear_from: u64,
    },
    Logging(bool),
    Reclaim(u8),
    Flush {
        vcpu: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..3u8, 0..PAGES, 0..2u8).prop_map(|(alias, page, vcpu)| Op::Write { alias, page, vcpu }),
        3 => (0..3u8, 0..PAGES, 0..2u8).prop_map(|(alias, page, vcpu)| Op::Read { alias, page, vcpu }),
        2 => (0..PAGES / 64).prop_map(|w| Op::Harvest { clear_from: w * 64 }),
        1 => any::<bool>().prop_map(Op::Logging),
        1 => (1..40u8).prop_map(Op::Reclaim),
        1 => (0..2u8).prop_map(|vcpu| Op::Flush { vcpu }),
    ]
}

/// The permuted alias: region C page `p` maps data page `perm(p)`.
fn perm(p: u64) -> u64 {
    (p * 7 + 3) % PAGES
}

fn gva(alias: u8, page: u64) -> (Gva, u64) {
    match alias {
        0 => (Gva(A + page * 4096), page),
        1 => (Gva(B + page * 4096), page),
        _ => {
            // The C page whose target is `page`.
            let c = (0..PAGES)
                .find(|&c| perm(c) == page)
                .expect("a permutation");
            (Gva(C + c * 4096), page)
        }
    }
}

fn algorithms(i: usize) -> Algorithms {
    let its = [RmapIteration::RestartScan, RmapIteration::Iterator];
    let drops = [RmapDrop::OneByOne, RmapDrop::Destroy];
    let pws = [PageWrprot::Scan512, PageWrprot::Bitmap];
    let dws = [
        DirtyWrprot::PerGfn,
        DirtyWrprot::WalkPages,
        DirtyWrprot::Kvm2012,
        DirtyWrprot::Adaptive,
    ];
    Algorithms {
        rmap_iteration: its[i % 2],
        rmap_drop: drops[i / 2 % 2],
        page_wrprot: pws[i / 4 % 2],
        dirty_wrprot: dws[i / 8 % 4],
    }
}

fn run(ops: &[Op], algos: Algorithms, manual: bool, unsync: bool) {
    let mut g = Guest::new(VmConfig {
        algorithms: algos,
        dirty_log: DirtyLogConfig {
            manual_protect: manual,
            ..DirtyLogConfig::default()
        },
        paging: PagingConfig {
            unsync,
            ..PagingConfig::default()
        },
        ..VmConfig::default()
    });
    let hva = g.add_slot(1, DATA, PAGES * 4096, Backing::Thp, MemslotFlags::empty());
    let cr3 = g.table();
    for p in 0..PAGES {
        g.map(cr3, Gva(A + p * 4096), DATA + p * 4096, UP, Level::L4K);
        g.map(
            cr3,
            Gva(C + p * 4096),
            DATA + perm(p) * 4096,
            UP,
            Level::L4K,
        );
    }
    for h in 0..PAGES / 512 {
        g.map(
            cr3,
            Gva(B + h * (2 << 20)),
            DATA + h * (2 << 20),
            UP,
            Level::L2M,
        );
    }
    let mut vcpus = [g.vcpu(cr3), g.vcpu(cr3)];
    let mut logging = false;
    let mut bits = BTreeSet::new();
    let mut values: BTreeMap<u64, u64> = BTreeMap::new();
    let mut stamp = 0u64;
    let nwords = (PAGES / 64) as usize;
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { alias, page, vcpu } => {
                let (va, p) = gva(alias, page);
                stamp += 1;
                let v = &mut vcpus[vcpu as usize];
                g.vm.gva_write_u64(v, Gva(va.0 + 8 * (stamp % 512)), stamp)
                    .unwrap_or_else(|e| panic!("step {step} {op:?}: {e}"));
                values.insert(p * 512 + stamp % 512, stamp);
                if logging {
                    bits.insert(p);
                }
            }
            Op::Read { alias, page, vcpu } => {
                let (va, p) = gva(alias, page);
                let v = &mut vcpus[vcpu as usize];
                for (&k, &want) in values.range(p * 512..(p + 1) * 512).take(3) {
                    let got = g.vm.gva_read_u64(v, Gva(va.0 + 8 * (k % 512))).unwrap();
                    assert_eq!(got, want, "step {step} {op:?}: word {k}");
                }
                g.vm.gva_access(v, va, AccessKind::Read).unwrap();
            }
            Op::Harvest { clear_from } => {
                if !logging {
                    continue;
                }
                let mut out = vec![0u64; nwords];
                g.vm.get_dirty_log(1, &mut out).unwrap();
                let got: BTreeSet<u64> = (0..PAGES)
                    .filter(|&p| out[(p / 64) as usize] & (1 << (p % 64)) != 0)
                    .collect();
                assert_eq!(got, bits, "step {step}: GET after {:?}", &ops[..step]);
                if manual {
                    // Clear [clear_from, end).
                    let n = PAGES - clear_from;
                    let words = &out[(clear_from / 64) as usize..];
                    g.vm.clear_dirty_log(1, clear_from, n, words).unwrap();
                    bits.retain(|&p| p < clear_from);
                } else {
                    bits.clear();
                }
            }
            Op::Logging(on) => {
                if on == logging {
                    continue;
                }
                let flags = if on {
                    MemslotFlags::LOG_DIRTY_PAGES
                } else {
                    MemslotFlags::empty()
                };
                g.vm.set_user_memory_region(MemoryRegion {
                    slot: 1,
                    flags,
                    guest_phys_addr: DATA,
                    memory_size: PAGES * 4096,
                    userspace_addr: hva,
                })
                .unwrap();
                logging = on;
                bits.clear();
            }
            Op::Reclaim(n) => {
                g.vm.reclaim_shadow_pages(n as usize);
            }
            Op::Flush { vcpu } => {
                g.vm.flush_guest_tlb(&mut vcpus[vcpu as usize]).unwrap();
            }
        }
        g.audit();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dirty_log_is_exact_under_shadow_paging(
        ops in proptest::collection::vec(op(), 1..60),
        algo in 0..32usize,
        manual in any::<bool>(),
        unsync in any::<bool>(),
    ) {
        run(&ops, algorithms(algo), manual, unsync);
    }
}

/// A fixed long run over every algorithm: logging on, write everything through all
/// three aliases, harvest, write a pattern, harvest again.
#[test]
fn every_algorithm_harvests_exactly() {
    let mut ops = vec![Op::Logging(true)];
    for p in (0..PAGES).step_by(3) {
        ops.push(Op::Write {
            alias: (p % 3) as u8,
            page: p,
            vcpu: (p % 2) as u8,
        });
    }
    ops.push(Op::Harvest { clear_from: 0 });
    for p in (0..PAGES).step_by(17) {
        ops.push(Op::Write {
            alias: ((p + 1) % 3) as u8,
            page: p,
            vcpu: 0,
        });
        ops.push(Op::Read {
            alias: (p % 3) as u8,
            page: p,
            vcpu: 1,
        });
    }
    ops.push(Op::Reclaim(30));
    ops.push(Op::Harvest { clear_from: 128 });
    ops.push(Op::Harvest { clear_from: 0 });
    for algo in 0..32 {
        for (manual, unsync) in [(false, true), (true, false)] {
            run(&ops, algorithms(algo), manual, unsync);
        }
    }
}
