//! Helpers shared by the integration tests: building VMs over simulated host memory,
//! computing the translation a guest access must reach straight from the host, and
//! looking inside the MMU (leaves by level, snapshots) to check what was mapped.
//!
//! The expected translation is never taken from the MMU: it is
//! `host.translate(slot_hva + offset).pfn * 4096 + page offset`, computed from the slot
//! parameters the test chose.
//!
//! # Which MMU
//! Every test runs against the MMU named by the environment variable `VMMU_TEST_MMU`:
//! `shadow` (the default), `tdp-scan`, `tdp-skip` or `tdp-used` (the TDP MMU in each of
//! its iteration modes). [`new_vm`] puts it into any configuration that left `mmu` at its
//! default; the inspection helpers below work on both MMUs. For the shadow MMU they look
//! through the reverse maps and the shadow pages; for the TDP MMU, which has no reverse
//! maps, one view walks the tables with the library's iterator (`vmmu::tdp::TdpIter`, in
//! the VM's own iteration mode, so the used-entries bitmap is checked too) and the other
//! follows the `children` pointers by hand. Tests of mechanisms only one MMU has call
//! [`shadow_only`] and return early, printing why.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use vmmu::host::{Backing, HostMemory, SimHostMemory};
use vmmu::memslot::Memslots;
use vmmu::rmap;
use vmmu::spte::Spte;
use vmmu::table::TableAllocator;
use vmmu::tdp::{TdpIter, TdpPage};
use vmmu::types::{AccessKind, Gfn, Gpa, Hpa, Hva, Level, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{Exit, MemoryRegion, MemslotFlags, MmuKind, TdpIteration, Vm, VmConfig, VmStats};

/// The VM type every test uses.
pub type TestVm = Vm<Arc<SimHostMemory>>;

pub const K4: u64 = 4 << 10;
pub const M1: u64 = 1 << 20;
pub const M2: u64 = 2 << 20;
pub const G1: u64 = 1 << 30;

/// The MMU the tests run against: `VMMU_TEST_MMU` = `shadow` (default) | `tdp-scan` |
/// `tdp-skip` | `tdp-used`.
pub fn test_mmu() -> MmuKind {
    match std::env::var("VMMU_TEST_MMU").as_deref() {
        Err(_) | Ok("") | Ok("shadow") => MmuKind::ShadowDirect,
        Ok("tdp-scan") => MmuKind::Tdp(TdpIteration::ScanAll),
        Ok("tdp-skip") => MmuKind::Tdp(TdpIteration::SkipNonPresent),
        Ok("tdp-used") => MmuKind::Tdp(TdpIteration::UsedEntries),
        Ok(other) => {
            panic!("VMMU_TEST_MMU={other:?}: expected shadow, tdp-scan, tdp-skip or tdp-used")
        }
    }
}

/// Whether the tests run against the TDP MMU.
pub fn testing_tdp() -> bool {
    matches!(test_mmu(), MmuKind::Tdp(_))
}

/// The default configuration with the MMU under test.
pub fn default_config() -> VmConfig {
    with_test_mmu(VmConfig::default())
}

/// `config` with the MMU under test, unless the test chose an MMU itself.
pub fn with_test_mmu(mut config: VmConfig) -> VmConfig {
    if config.mmu == MmuKind::default() {
        config.mmu = test_mmu();
    }
    config
}

/// A fresh host and a VM over it, running the MMU under test (see [`test_mmu`]) unless
/// `config` names an MMU other than the default.
pub fn new_vm(config: VmConfig) -> (Arc<SimHostMemory>, TestVm) {
    let host = Arc::new(SimHostMemory::new());
    let vm = Vm::new(with_test_mmu(config), host.clone());
    (host, vm)
}

/// Whether `vm` runs the TDP MMU.
pub fn is_tdp<H: HostMemory, A: TableAllocator>(vm: &Vm<H, A>) -> bool {
    matches!(vm.config().mmu, MmuKind::Tdp(_))
}

/// For a test (or a part of one) that checks a mechanism of the shadow MMU alone: `true`,
/// after printing `why` past the test harness's capture, when the tests run against the
/// TDP MMU, so the caller returns (or skips that part).
pub fn shadow_only(why: &str) -> bool {
    if !testing_tdp() {
        return false;
    }
    use std::io::Write;
    let name = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    // Straight to the stream: the harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "note: {name}: skipped under {:?}: {why}",
        test_mmu()
    );
    true
}

/// Run `f` with the VM's memslots, under the MMU lock, whichever MMU it runs.
pub fn with_slots<H: HostMemory, A: TableAllocator, R>(
    vm: &Vm<H, A>,
    f: impl FnOnce(&Memslots) -> R,
) -> R {
    if is_tdp(vm) {
        vm.with_tdp(|slots, _| f(slots))
    } else {
        vm.with_mmu(|slots, _| f(slots))
    }
}

/// One TDP table entry as a walk saw it.
#[derive(Clone, Copy, Debug)]
pub struct TdpEntry {
    /// Whether the walk came from the valid root (or from an invalidated one that a vCPU
    /// still holds).
    pub valid_root: bool,
    pub gfn: u64,
    pub level: Level,
    pub spte: Spte,
}

/// Every entry of the TDP tables that the library's iterator yields in the VM's own
/// iteration mode (every entry in scan-all, the present ones in the other two), for the
/// valid root only or for every root.
pub fn tdp_entries(vm: &TestVm, all_roots: bool) -> Vec<TdpEntry> {
    vm.with_tdp(|_, tdp| {
        let guard = vmmu::tdp::pin();
        let mut out = Vec::new();
        for (root, valid) in tdp.roots(&guard) {
            if !(valid || all_roots) {
                continue;
            }
            let mut it = TdpIter::new(
                root,
                Level::L4K,
                Gfn(0),
                Gfn(1 << 36),
                tdp.mode(),
                u64::MAX,
                &guard,
            );
            while it.valid() {
                out.push(TdpEntry {
                    valid_root: valid,
                    gfn: it.gfn().0,
                    level: it.level(),
                    spte: it.spte,
                });
                it.next();
            }
        }
        out
    })
}

/// Present leaves of the TDP tables through the library's iterator.
fn tdp_iter_leaves(vm: &TestVm, all_roots: bool) -> BTreeMap<(u64, Level), Spte> {
    let mut out = BTreeMap::new();
    for e in tdp_entries(vm, all_roots) {
        if e.spte.is_shadow_present() && e.spte.is_leaf(e.level) {
            let old = out.insert((e.gfn, e.level), e.spte);
            assert!(
                old.is_none() || all_roots,
                "the iterator yielded leaf {:#x} at {:?} twice",
                e.gfn,
                e.level
            );
        }
    }
    out
}

/// What a walk of the TDP tables by hand (following each page's `children`, checking the
/// child against the SPTE, not using the library's iterator) finds under one root.
#[derive(Default)]
struct HandWalk {
    leaves: BTreeMap<(u64, Level), Spte>,
    tables: usize,
}

/// Walk the TDP tables by hand: the valid root's (or every root's) leaves and tables.
fn tdp_hand_walk<H: HostMemory, A: TableAllocator>(vm: &Vm<H, A>, all_roots: bool) -> HandWalk {
    vm.with_tdp(|_, tdp| {
        let guard = vmmu::tdp::pin();
        let mut out = HandWalk::default();
        let mut stack: Vec<&TdpPage> = tdp
            .roots(&guard)
            .filter(|&(_, valid)| valid || all_roots)
            .map(|(root, _)| root)
            .collect();
        while let Some(page) = stack.pop() {
            out.tables += 1;
            for i in 0..512usize {
                let spte = page.table().get(i);
                if !spte.is_shadow_present() {
                    continue;
                }
                if spte.is_leaf(page.level) {
                    out.leaves.insert((page.gfn_at(i).0, page.level), spte);
                    continue;
                }
                // SAFETY: the guard pins the epoch and the VM's lock is held.
                let child = unsafe { page.child(i, &guard).as_ref() }.unwrap_or_else(|| {
                    panic!("non-leaf at {:?} without a child page", page.gfn_at(i))
                });
                assert_eq!(
                    child.frame(),
                    spte.pfn(),
                    "child page differs from its SPTE"
                );
                assert_eq!(Some(child.level), page.level.below(), "child level");
                assert_eq!(child.gfn, page.gfn_at(i), "child gfn");
                stack.push(child);
            }
        }
        out
    })
}

/// Tables the MMU uses now: the shadow MMU's pages, or the tables reachable from the TDP
/// MMU's valid root (an invalidated root a vCPU still holds is not counted).
pub fn table_count<H: HostMemory, A: TableAllocator>(vm: &Vm<H, A>) -> usize {
    if is_tdp(vm) {
        tdp_hand_walk(vm, false).tables
    } else {
        vm.stats().shadow_pages
    }
}

/// Tables reachable from any root (the TDP MMU's valid root and the invalidated roots
/// vCPUs still hold; for the shadow MMU, its pages).
pub fn tables_held<H: HostMemory, A: TableAllocator>(vm: &Vm<H, A>) -> usize {
    if is_tdp(vm) {
        tdp_hand_walk(vm, true).tables
    } else {
        vm.stats().shadow_pages
    }
}

/// The TDP MMU frees unlinked tables through the epoch collector, after every thread
/// that may still see them has moved on: drive the collector (from this thread) until
/// the allocator holds exactly the tables reachable from a root, and return that number.
/// Panics if it never gets there (a table leaked, or one still linked was freed). For
/// the shadow MMU, which frees after the flush, this only checks the allocator.
#[track_caller]
pub fn settle_tables(vm: &TestVm) -> u64 {
    settle_tables_with(vm, || vm.allocator().live())
}

/// [`settle_tables`] for a VM whose allocator reports its live tables through `live`.
#[track_caller]
pub fn settle_tables_with<H: HostMemory, A: TableAllocator>(
    vm: &Vm<H, A>,
    live: impl Fn() -> u64,
) -> u64 {
    let held = tables_held(vm) as u64;
    if is_tdp(vm) {
        for _ in 0..200_000 {
            if live() == held {
                break;
            }
            vmmu::tdp::pin().flush();
            std::thread::yield_now();
        }
    }
    assert_eq!(
        live(),
        held,
        "the allocator holds other tables than the ones the MMU can reach"
    );
    held
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
/// For the TDP MMU, which has none: every present leaf under the valid root, as the
/// library's iterator yields them in the VM's iteration mode.
pub fn leaves(vm: &TestVm) -> BTreeMap<(u64, Level), Spte> {
    if is_tdp(vm) {
        return tdp_iter_leaves(vm, false);
    }
    vm.with_mmu(|slots, mmu| {
        let mut out = BTreeMap::new();
        for slot in slots.iter() {
            for level in Level::LEAF_LEVELS {
                for (gfn, head) in slot.rmaps(level).iter() {
                    let gfn = gfn.0;
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
/// (first gfn, level) -> SPTE. For the TDP MMU: a walk of the valid root by hand,
/// independent of the library's iterator.
pub fn table_leaves(vm: &TestVm) -> BTreeMap<(u64, Level), Spte> {
    if is_tdp(vm) {
        return tdp_hand_walk(vm, false).leaves;
    }
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

/// The leaf (first gfn, level, SPTE) mapping `gfn`, found through the reverse maps (for
/// the TDP MMU: by the library's iterator over `[gfn, gfn + 1)` under the valid root).
pub fn leaf_of(vm: &TestVm, gfn: Gfn) -> Option<(Gfn, Level, Spte)> {
    if is_tdp(vm) {
        return vm.with_tdp(|_, tdp| {
            let guard = vmmu::tdp::pin();
            let mut it = TdpIter::new(
                tdp.root(&guard),
                Level::L4K,
                gfn,
                Gfn(gfn.0 + 1),
                tdp.mode(),
                u64::MAX,
                &guard,
            );
            let mut found = None;
            while it.valid() {
                if it.spte.is_shadow_present() && it.spte.is_leaf(it.level()) {
                    assert!(found.is_none(), "gfn {gfn:?} mapped at two levels");
                    found = Some((it.gfn(), it.level(), it.spte));
                }
                it.next();
            }
            found
        });
    }
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
/// leaf in a logging slot. The reverse-map view and the table view agree (for the TDP
/// MMU: the library's iterator in the VM's mode and the walk by hand agree, and the
/// leaves of invalidated roots that vCPUs still hold are checked against the host too).
#[track_caller]
pub fn check_leaves_against_host(vm: &TestVm, host: &SimHostMemory) {
    let by_rmap = leaves(vm);
    let by_table = table_leaves(vm);
    assert_eq!(
        by_rmap.keys().collect::<Vec<_>>(),
        by_table.keys().collect::<Vec<_>>(),
        "{} and tables disagree on the leaves",
        if is_tdp(vm) {
            "the TDP iterator"
        } else {
            "reverse maps"
        }
    );
    assert_eq!(by_rmap, by_table, "the two views disagree on an SPTE");
    let mut all = by_rmap;
    if is_tdp(vm) {
        let stale = tdp_hand_walk(vm, true).leaves;
        all.extend(stale);
    }
    with_slots(vm, |slots| {
        for (&(gfn, level), spte) in &all {
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

/// For the TDP MMU, `stats.shadow_pages` is replaced by the tables reachable from any
/// root and `stats.mmu.pages_freed` by 0: both move when the epoch collector runs, which
/// any thread may make it do at any time.
pub fn snapshot(vm: &TestVm) -> Snapshot {
    let (slots, generation) = with_slots(vm, |s| {
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
    let mut stats = vm.stats();
    if is_tdp(vm) {
        stats.shadow_pages = tables_held(vm);
        stats.mmu.pages_freed = 0;
    }
    Snapshot {
        stats,
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
