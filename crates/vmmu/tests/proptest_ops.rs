//! Random sequences of guest accesses, zaps and memslot updates on a VM with up to three
//! small slots, against a model of the slot set. After every step: the audit passes, every
//! leaf maps the host frame of its slot, the VM's slots match the model, and every access
//! returned exactly what the model says (the host's translation, or an MMIO exit).

mod common;

use common::*;
use proptest::prelude::*;
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gfn, Gpa, PAGE_SIZE};
use vmmu::{Error, Exit, MemslotFlags, VmConfig};

/// Guest-physical window the slots live in: 64 MiB from 1 GiB.
const WIN: u64 = G1;
const WIN_SIZE: u64 = 64 * M1;

#[derive(Clone, Debug)]
enum Op {
    /// Access page `frac` (scaled to the slot) of slot `idx`, or a raw window offset.
    AccessSlot {
        idx: usize,
        frac: u64,
        off: u64,
        kind: AccessKind,
    },
    AccessAny {
        at: u64,
        kind: AccessKind,
    },
    /// Zap [start, start + len) in gfns relative to the window (len 0 and reversed ranges
    /// are invalid input).
    Zap {
        start: u64,
        len: i64,
    },
    ZapAll,
    /// KVM's fast zap: the TDP MMU's vCPUs move to a new root.
    ZapAllFast,
    ZapSlot {
        idx: u32,
    },
    Create {
        idx: usize,
        at: u64,
        readonly: bool,
    },
    Delete {
        idx: usize,
    },
    Move {
        idx: usize,
        at: u64,
    },
    ToggleLog {
        idx: usize,
    },
    /// The host gives a page of slot `idx`'s backing a new frame (migration) and the VMM
    /// zaps the gfn, as an MMU notifier would: stale TLB entries would now be visible.
    Remap {
        idx: usize,
        frac: u64,
    },
}

fn kind() -> impl Strategy<Value = AccessKind> {
    prop_oneof![
        Just(AccessKind::Read),
        Just(AccessKind::Write),
        Just(AccessKind::Fetch)
    ]
}

/// A slot base: a 512 KiB grid point plus 0-2 pages (so some bases are 2M-aligned, some
/// 1 MiB-aligned, some not even 64 KiB-aligned).
fn at() -> impl Strategy<Value = u64> {
    (0..112u64, 0..3u64).prop_map(|(a, b)| a * 512 * K4 / 4 + b * K4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, any::<u64>(), 0..4096u64, kind())
            .prop_map(|(idx, frac, off, kind)| Op::AccessSlot { idx, frac, off, kind }),
        2 => (0..WIN_SIZE + 8 * M1, kind()).prop_map(|(at, kind)| Op::AccessAny { at, kind }),
        2 => (0..WIN_SIZE / PAGE_SIZE, prop_oneof![Just(0i64), -8..0i64, 1..16i64, 1..2048i64, 1..20000i64])
            .prop_map(|(start, len)| Op::Zap { start, len }),
        1 => Just(Op::ZapAll),
        1 => Just(Op::ZapAllFast),
        1 => (0..4u32).prop_map(|idx| Op::ZapSlot { idx }),
        2 => (0..3usize, at(), any::<bool>()).prop_map(|(idx, at, readonly)| Op::Create { idx, at, readonly: readonly && idx == 1 }),
        1 => (0..3usize).prop_map(|idx| Op::Delete { idx }),
        2 => (0..3usize, at()).prop_map(|(idx, at)| Op::Move { idx, at }),
        1 => (0..3usize).prop_map(|idx| Op::ToggleLog { idx }),
        1 => (0..3usize, any::<u64>()).prop_map(|(idx, frac)| Op::Remap { idx, frac }),
    ]
}

struct Harness {
    host: std::sync::Arc<SimHostMemory>,
    vm: TestVm,
    vcpus: Vec<vmmu::hw::Vcpu>,
    /// The model: per slot id, the slot if it exists.
    slots: Vec<Option<SlotSpec>>,
    /// Per slot id: (size, hva), fixed for the test.
    shapes: Vec<(u64, u64)>,
    step: usize,
}

impl Harness {
    fn new() -> Self {
        let (host, vm) = new_vm(VmConfig::default());
        let h0 = mmap(&host, 8 * M1, Backing::Thp);
        let h1 = mmap(&host, 4 * M1, Backing::Page4K);
        let h2 = mmap(&host, 8 * M1, Backing::Thp);
        // 0: 4 MiB of THP from a 2 MiB-aligned hva; 1: 3 MiB + 3 pages of 4K pages;
        // 2: 5 MiB of THP from 1 MiB into a 2 MiB page.
        let shapes = vec![(4 * M1, h0), (3 * M1 + 3 * K4, h1), (5 * M1, h2 + M1)];
        let vcpus = (0..2).map(|_| vm.create_vcpu().unwrap()).collect();
        Harness {
            host,
            vm,
            vcpus,
            slots: vec![None; 3],
            shapes,
            step: 0,
        }
    }

    fn spec(&self, idx: usize, at: u64, flags: MemslotFlags) -> SlotSpec {
        let (size, hva) = self.shapes[idx];
        SlotSpec {
            id: idx as u32,
            gpa: WIN + at,
            size,
            hva,
            flags,
        }
    }

    /// The overlap error the VM must report for `spec`: the lowest-based other slot it
    /// overlaps, if any.
    fn overlap(&self, spec: &SlotSpec) -> Option<Error> {
        let mut others: Vec<&SlotSpec> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.id != spec.id)
            .collect();
        others.sort_by_key(|s| s.gpa);
        others
            .into_iter()
            .find(|s| s.gpa < spec.gpa + spec.size && spec.gpa < s.gpa + s.size)
            .map(|s| Error::Overlap {
                slot: spec.id,
                other: s.id,
            })
    }

    fn access(&mut self, gpa: u64, kind: AccessKind, vcpu: usize) {
        let got = self.vm.access(&mut self.vcpus[vcpu], Gpa(gpa), kind);
        let slot = self
            .slots
            .iter()
            .flatten()
            .find(|s| s.contains_gpa(gpa))
            .copied();
        let want = match slot {
            None => Err(Exit::Mmio {
                gpa: Gpa(gpa),
                write: kind == AccessKind::Write,
            }),
            Some(s) if s.readonly() && kind == AccessKind::Write => Err(Exit::Mmio {
                gpa: Gpa(gpa),
                write: true,
            }),
            Some(s) => Ok(expected_hpa(&self.host, &s, gpa)),
        };
        assert_eq!(
            got,
            want,
            "step {}: {kind:?} of gpa {gpa:#x} (slot {:?})",
            self.step,
            slot.map(|s| s.id)
        );
        if let (Some(s), Ok(_)) = (slot, &got) {
            if kind == AccessKind::Write && s.logging() {
                let page = (gpa - s.gpa) / PAGE_SIZE;
                let marked = with_slots(&self.vm, |sl| {
                    sl.by_id(s.id).unwrap().dirty_bitmap().unwrap().test(page)
                });
                assert!(
                    marked,
                    "step {}: write to logging slot {} not in the bitmap",
                    self.step, s.id
                );
            }
        }
    }

    fn set(&mut self, spec: SlotSpec, want: Result<(), Error>) {
        let got = self.vm.set_user_memory_region(spec.region());
        assert_eq!(
            got, want,
            "step {}: set_user_memory_region({spec:?})",
            self.step
        );
    }

    fn apply(&mut self, op: &Op) {
        self.step += 1;
        let vcpu = self.step % 2;
        match *op {
            Op::AccessSlot {
                idx,
                frac,
                off,
                kind,
            } => match self.slots[idx] {
                Some(s) => {
                    let gpa = s.page_gpa(frac % s.pages()) + (off & !7);
                    self.access(gpa, kind, vcpu);
                }
                None => self.access(WIN + (frac % WIN_SIZE), kind, vcpu),
            },
            Op::AccessAny { at, kind } => self.access(WIN - 4 * M1 + at, kind, vcpu),
            Op::Zap { start, len } => {
                let start = WIN / PAGE_SIZE + start;
                let end = start.wrapping_add_signed(len);
                let want = if len <= 0 {
                    Err(Error::InvalidRange { start, end })
                } else {
                    Ok(())
                };
                let before = if len <= 0 {
                    Some(snapshot(&self.vm))
                } else {
                    None
                };
                assert_eq!(
                    self.vm.zap_gfn_range(Gfn(start), Gfn(end)),
                    want,
                    "step {}",
                    self.step
                );
                if let Some(before) = before {
                    assert_eq!(
                        snapshot(&self.vm),
                        before,
                        "step {}: failed zap changed the VM",
                        self.step
                    );
                } else {
                    let left = leaves(&self.vm);
                    assert!(
                        left.keys()
                            .all(|&(g, l)| g + l.pages() <= start || g >= end),
                        "step {}: a leaf intersecting the zapped range survived",
                        self.step
                    );
                }
            }
            Op::ZapAll => {
                self.vm.zap_all().unwrap();
                assert!(leaves(&self.vm).is_empty());
                assert_eq!(table_count(&self.vm), 1);
            }
            Op::ZapAllFast => {
                self.vm.zap_all_fast().unwrap();
                assert!(leaves(&self.vm).is_empty());
                assert_eq!(table_count(&self.vm), 1);
            }
            Op::ZapSlot { idx } => {
                let exists = self.slots.get(idx as usize).is_some_and(|s| s.is_some());
                let want = if exists {
                    Ok(())
                } else {
                    Err(Error::NoSuchSlot(idx))
                };
                assert_eq!(self.vm.zap_memslot(idx), want, "step {}", self.step);
                if let Some(Some(s)) = self.slots.get(idx as usize) {
                    let s = *s;
                    assert!(leaves(&self.vm)
                        .keys()
                        .all(|&(g, _)| g < s.base_gfn().0 || g >= s.end_gfn().0));
                }
            }
            Op::Create { idx, at, readonly } => {
                if self.slots[idx].is_some() {
                    return;
                }
                let flags = if readonly {
                    MemslotFlags::READONLY
                } else {
                    MemslotFlags::empty()
                };
                let spec = self.spec(idx, at, flags);
                match self.overlap(&spec) {
                    Some(e) => self.set(spec, Err(e)),
                    None => {
                        self.set(spec, Ok(()));
                        self.slots[idx] = Some(spec);
                    }
                }
            }
            Op::Delete { idx } => {
                let spec =
                    self.slots[idx].unwrap_or_else(|| self.spec(idx, 0, MemslotFlags::empty()));
                let del = SlotSpec { size: 0, ..spec };
                if self.slots[idx].is_some() {
                    self.set(del, Ok(()));
                    self.slots[idx] = None;
                    assert!(leaves(&self.vm)
                        .keys()
                        .all(|&(g, _)| g < spec.base_gfn().0 || g >= spec.end_gfn().0));
                } else {
                    self.set(del, Err(Error::ZeroSize { slot: idx as u32 }));
                }
            }
            Op::Move { idx, at } => {
                let Some(old) = self.slots[idx] else { return };
                let spec = SlotSpec {
                    gpa: WIN + at,
                    ..old
                };
                match self.overlap(&spec) {
                    Some(e) => self.set(spec, Err(e)),
                    None => {
                        self.set(spec, Ok(()));
                        self.slots[idx] = Some(spec);
                    }
                }
            }
            Op::ToggleLog { idx } => {
                let Some(mut spec) = self.slots[idx] else {
                    return;
                };
                spec.flags = MemslotFlags::from_bits(
                    spec.flags.bits() ^ MemslotFlags::LOG_DIRTY_PAGES.bits(),
                )
                .unwrap();
                self.set(spec, Ok(()));
                self.slots[idx] = Some(spec);
                if spec.logging() {
                    assert!(
                        leaves(&self.vm).keys().all(|&(g, l)| l.pages() == 1
                            || g + l.pages() <= spec.base_gfn().0
                            || g >= spec.end_gfn().0),
                        "huge leaf survived the start of dirty logging"
                    );
                }
            }
            Op::Remap { idx, frac } => {
                let (size, hva) = self.shapes[idx];
                let page = frac % (size / PAGE_SIZE);
                self.host
                    .remap_page(vmmu::types::Hva(hva + page * PAGE_SIZE))
                    .unwrap();
                if let Some(s) = self.slots[idx] {
                    let gfn = s.base_gfn().0 + page;
                    self.vm.zap_gfn_range(Gfn(gfn), Gfn(gfn + 1)).unwrap();
                }
            }
        }
        self.check();
    }

    fn check(&self) {
        if let Err(e) = self.vm.audit() {
            panic!("step {}: {e}", self.step);
        }
        check_leaves_against_host(&self.vm, &self.host);
        let vm_slots: Vec<(u32, u64, u64, u32)> = with_slots(&self.vm, |s| {
            s.iter()
                .map(|m| (m.id, m.base_gfn.0, m.npages, m.flags.bits()))
                .collect()
        });
        let mut model: Vec<&SlotSpec> = self.slots.iter().flatten().collect();
        model.sort_by_key(|s| s.gpa);
        let model: Vec<(u32, u64, u64, u32)> = model
            .iter()
            .map(|s| (s.id, s.base_gfn().0, s.pages(), s.flags.bits()))
            .collect();
        assert_eq!(
            vm_slots, model,
            "step {}: slot set differs from the model",
            self.step
        );
    }
}

proptest! {
    // 48 cases by default; PROPTEST_CASES overrides (e.g. for a long bug hunt).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_keep_the_mmu_consistent(ops in proptest::collection::vec(op(), 1..80)) {
        let mut h = Harness::new();
        // Start with every slot present, so accesses hit mapped memory early.
        for (idx, at) in [(0usize, 0u64), (1, 16 * M1 + 3 * K4), (2, 32 * M1 + M1)] {
            let spec = h.spec(idx, at, MemslotFlags::empty());
            h.set(spec, Ok(()));
            h.slots[idx] = Some(spec);
        }
        h.check();
        for op in &ops {
            h.apply(op);
        }
        // Finally, every page of every slot translates.
        let specs: Vec<SlotSpec> = h.slots.iter().flatten().copied().collect();
        for s in specs {
            for i in 0..s.pages() {
                h.access(s.page_gpa(i), if s.readonly() { AccessKind::Read } else { kind_for(i) }, 0);
            }
        }
        h.check();
    }
}
