//! Helpers shared by the integration tests: building VMs over simulated host memory,
//! computing the translation a guest access must reach straight from the host, and
//! looking inside the MMU (leaves by level, snapshots) to check what was mapped.
//!
//! The expected translation is never taken from the MMU: it is
//! `host.translate(slot_hva + offset).pfn * 4096 + page offset`, computed from the slot
//! parameters the test chose.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use vmmu::host::{Backing, HostMemory, SimHostMemory};
use vmmu::hw::Vcpu;
use vmmu::rmap;
use vmmu::spte::Spte;
use vmmu::types::{AccessKind, Gfn, Gpa, Hpa, Hva, Level, PAGE_SIZE};
use vmmu::{Exit, MemoryRegion, MemslotFlags, Vm, VmConfig, VmStats};

/// The VM type every test uses.
pub type TestVm = Vm<Arc<SimHostMemory>>;

pub const K4: u64 = 4 << 10;
pub const M1: u64 = 1 << 20;
pub const M2: u64 = 2 << 20;
pub const G1: u64 = 1 << 30;

/// A fresh host and a VM over it.
pub fn new_vm(config: VmConfig) -> (Arc<SimHostMemory>, TestVm) {
    let host = Arc::new(SimHostMemory::new());
    let vm = Vm::new(config, host.clone());
    (host, vm)
}

/// A region argument.
pub fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: MemslotFlags) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

/// A slot as the test set it up: what the expected translations are computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotSpec {
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
    pub hva: u64,
    pub flags: MemslotFlags,
}

impl SlotSpec {
    pub fn region(&self) -> MemoryRegion {
        region(self.id, self.gpa, self.size, self.hva, self.flags)
    }
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
    pub fn base_gfn(&self) -> Gfn {
        Gfn(self.gpa / PAGE_SIZE)
    }
    pub fn end_gfn(&self) -> Gfn {
        Gfn((self.gpa + self.size) / PAGE_SIZE)
    }
    pub fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.gpa + self.size
    }
    /// The gpa of page `i` of the slot.
    pub fn page_gpa(&self, i: u64) -> u64 {
        self.gpa + i * PAGE_SIZE
    }
    pub fn readonly(&self) -> bool {
        self.flags.contains(MemslotFlags::READONLY)
    }
    pub fn logging(&self) -> bool {
        self.flags.contains(MemslotFlags::LOG_DIRTY_PAGES)
    }
    /// The host-virtual address backing `gpa` (in the slot).
    pub fn hva_of(&self, gpa: u64) -> u64 {
        assert!(
            self.contains_gpa(gpa),
            "gpa {gpa:#x} outside slot {}",
            self.id
        );
        self.hva + (gpa - self.gpa)
    }
}

/// Map host memory and create a slot over it; returns the spec.
pub fn add_slot(vm: &TestVm, spec: SlotSpec) -> SlotSpec {
    vm.set_user_memory_region(spec.region())
        .unwrap_or_else(|e| panic!("create slot {spec:?}: {e}"));
    spec
}

/// Map `size` bytes of host memory with `backing`; returns the hva.
pub fn mmap(host: &SimHostMemory, size: u64, backing: Backing) -> u64 {
    host.mmap(size, backing, true).expect("host mmap").0
}

/// The hpa a guest access to `gpa` (in `spec`) must reach, from the host alone.
pub fn expected_hpa(host: &SimHostMemory, spec: &SlotSpec, gpa: u64) -> Hpa {
    let hva = spec.hva_of(gpa);
    let page = host
        .translate(Hva(hva & !(PAGE_SIZE - 1)))
        .unwrap_or_else(|| panic!("host has nothing at hva {hva:#x}"));
    Hpa(page.pfn.0 * PAGE_SIZE + (gpa % PAGE_SIZE))
}

/// Host mapping level at the hva backing `gpa`.
pub fn host_level(host: &SimHostMemory, spec: &SlotSpec, gpa: u64) -> Level {
    host.translate(Hva(spec.hva_of(gpa) & !(PAGE_SIZE - 1)))
        .expect("host mapping")
        .level
}

/// The level the MMU must map `gpa` at, derived from first principles: the largest level
/// up to `max_level` whose aligned guest page lies wholly in the slot, whose guest and host
/// addresses are congruent modulo the page size, that the host maps at least that large,
/// and not above 4K while the slot logs dirty pages.
pub fn expected_level(host: &SimHostMemory, spec: &SlotSpec, gpa: u64, max_level: Level) -> Level {
    if spec.logging() {
        return Level::L4K;
    }
    let hl = host_level(host, spec, gpa);
    for level in [Level::L1G, Level::L2M] {
        if level > max_level || level > hl {
            continue;
        }
        let bytes = level.bytes();
        let base = gpa & !(bytes - 1);
        let inside = base >= spec.gpa && base + bytes <= spec.gpa + spec.size;
        let congruent = spec.gpa.wrapping_sub(spec.hva) & (bytes - 1) == 0;
        if inside && congruent {
            return level;
        }
    }
    Level::L4K
}

/// Access `gpa` and assert the result is the host's translation.
#[track_caller]
pub fn access_ok(
    vm: &TestVm,
    vcpu: &mut Vcpu,
    host: &SimHostMemory,
    spec: &SlotSpec,
    gpa: u64,
    kind: AccessKind,
) -> Hpa {
    let want = expected_hpa(host, spec, gpa);
    match vm.access(vcpu, Gpa(gpa), kind) {
        Ok(hpa) => {
            assert_eq!(
                hpa, want,
                "{kind:?} gpa {gpa:#x} (slot {}): wrong translation",
                spec.id
            );
            hpa
        }
        Err(e) => panic!(
            "{kind:?} gpa {gpa:#x} (slot {}): unexpected exit {e:?}",
            spec.id
        ),
    }
}

/// Access `gpa` and assert an MMIO exit.
#[track_caller]
pub fn access_mmio(vm: &TestVm, vcpu: &mut Vcpu, gpa: u64, kind: AccessKind) {
    let got = vm.access(vcpu, Gpa(gpa), kind);
    assert_eq!(
        got,
        Err(Exit::Mmio {
            gpa: Gpa(gpa),
            write: kind == AccessKind::Write
        }),
        "{kind:?} gpa {gpa:#x}: expected an MMIO exit"
    );
}

/// Run the audit, panicking with its message.
#[track_caller]
pub fn audit(vm: &TestVm) -> vmmu::audit::AuditReport {
    match vm.audit() {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// Every present leaf reachable through the reverse maps: (first gfn, level) -> SPTE.
pub fn leaves(vm: &TestVm) -> BTreeMap<(u64, Level), Spte> {
    vm.with_mmu(|slots, mmu| {
        let mut out = BTreeMap::new();
        for slot in slots.iter() {
            for level in Level::LEAF_LEVELS {
                let shift = level.gfn_shift();
                for (k, &head) in slot.rmaps(level).iter().enumerate() {
                    let gfn = ((slot.base_gfn.0 >> shift) + k as u64) << shift;
                    for sref in rmap::iter(head, mmu.pool()) {
                        let old = out.insert((gfn, level), mmu.spte(sref));
                        assert!(old.is_none(), "two leaves for gfn {gfn:#x} at {level:?}");
                    }
                }
            }
        }
        out
    })
}

/// Leaves by walking the tables from the root (independent of the reverse maps):
/// (first gfn, level) -> SPTE.
pub fn table_leaves(vm: &TestVm) -> BTreeMap<(u64, Level), Spte> {
    vm.with_mmu(|_, mmu| {
        let mut out = BTreeMap::new();
        let mut stack = vec![(mmu.root_id(), Level::ROOT, 0u64)];
        while let Some((id, level, gfn)) = stack.pop() {
            let sp = mmu.pages().get(id);
            for i in 0..512usize {
                let spte = sp.table().get(i);
                if !spte.is_shadow_present() {
                    continue;
                }
                let g = gfn + ((i as u64) << level.gfn_shift());
                if spte.is_leaf(level) {
                    out.insert((g, level), spte);
                } else {
                    stack.push((sp.child(i), level.below().unwrap(), g));
                }
            }
        }
        out
    })
}

/// The leaf (first gfn, level, SPTE) mapping `gfn`, found through the reverse maps.
pub fn leaf_of(vm: &TestVm, gfn: Gfn) -> Option<(Gfn, Level, Spte)> {
    vm.with_mmu(|slots, mmu| {
        let mut found = None;
        for level in Level::LEAF_LEVELS {
            let base = gfn.align_down(level);
            if slots.lookup(base).is_none() {
                continue;
            }
            let e = mmu.rmap_entries(slots, base, level);
            assert!(
                e.len() <= 1,
                "direct MMU: {} leaves for gfn {gfn:?} at {level:?}",
                e.len()
            );
            if let Some(&sref) = e.first() {
                assert!(found.is_none(), "gfn {gfn:?} mapped at two levels");
                found = Some((base, level, mmu.spte(sref)));
            }
        }
        found
    })
}

/// Count of leaves at each level: [4K, 2M, 1G].
pub fn leaf_counts(vm: &TestVm) -> [usize; 3] {
    let mut c = [0; 3];
    for (_, level) in leaves(vm).keys() {
        c[level.leaf_index()] += 1;
    }
    c
}

/// Check every leaf against the host: its pfn is the host frame of the slot's hva at the
/// leaf's first gfn, aligned to the level; no writable leaf in a READONLY slot, no huge
/// leaf in a logging slot. The reverse-map view and the table view agree.
#[track_caller]
pub fn check_leaves_against_host(vm: &TestVm, host: &SimHostMemory) {
    let by_rmap = leaves(vm);
    let by_table = table_leaves(vm);
    assert_eq!(
        by_rmap.keys().collect::<Vec<_>>(),
        by_table.keys().collect::<Vec<_>>(),
        "reverse maps and tables disagree on the leaves"
    );
    vm.with_mmu(|slots, _| {
        for (&(gfn, level), spte) in &by_rmap {
            let slot = slots.lookup(Gfn(gfn)).expect("leaf in a slot");
            let hva = slot.gfn_to_hva(Gfn(gfn));
            let hp = host.translate(hva).expect("host mapping behind a leaf");
            assert!(
                hp.level >= level,
                "gfn {gfn:#x} mapped at {level:?} but host maps {:?}",
                hp.level
            );
            assert_eq!(
                spte.pfn().0,
                hp.pfn.0 & !(level.pages() - 1),
                "leaf for gfn {gfn:#x} at {level:?} maps the wrong frame"
            );
            assert!(
                !(slot.is_readonly() && spte.is_writable()),
                "writable leaf in READONLY slot"
            );
            assert!(
                !(slot.is_logging() && level > Level::L4K),
                "huge leaf in logging slot"
            );
        }
    });
}

/// What must not change when an operation fails: the counters, the leaves (with their
/// A/D bits), the slot set and its generation.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub stats: VmStats,
    pub leaves: BTreeMap<(u64, Level), Spte>,
    pub slots: Vec<(u32, u64, u64, u64, u32)>,
    pub generation: u64,
}

pub fn snapshot(vm: &TestVm) -> Snapshot {
    let (slots, generation) = vm.with_mmu(|s, _| {
        (
            s.iter()
                .map(|m| {
                    (
                        m.id,
                        m.base_gfn.0,
                        m.npages,
                        m.userspace_addr.0,
                        m.flags.bits(),
                    )
                })
                .collect(),
            s.generation(),
        )
    });
    Snapshot {
        stats: vm.stats(),
        leaves: table_leaves(vm),
        slots,
        generation,
    }
}

/// A small deterministic PRNG (xorshift64*), so tests need no extra dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Access kinds in turn, so every path (read, write, fetch) is exercised.
pub fn kind_for(i: u64) -> AccessKind {
    match i % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    }
}
