//! The operation interpreter: one VM, its host memory, its vCPUs and the [`Model`],
//! driven by [`Op`]s.
//!
//! Every call's result is compared with the model's prediction (errors included, with
//! their payloads); a call the model says must fail is also checked to change nothing
//! ([`view::Snapshot`] before and after). After every step ([`Interp::check`]):
//!
//! 1. the audit passes;
//! 2. the VM's slot set and generation equal the model's, and so do the dirty bitmaps (in
//!    the bitmap modes; in ring mode each ring harvest is checked against the model);
//! 3. every leaf under every root any vCPU may use maps only what the guest may reach,
//!    at the host's current frame, and is writable only where the guest may write and,
//!    while its slot logs, only where the write is already logged ([`view::check_entries`]);
//! 4. every vCPU reads every touched page and gets exactly the model's answer (a TLB
//!    entry that survived a change shows up as a stale host-physical address).
//!
//! Operations with an effect to verify at once check it right after the call: after a
//! zap or an unmap nothing maps the range; after `age` nothing there is young.
//!
//! Table memory can run short ([`Op::FailAlloc`]): the allocator refuses allocations
//! from the Nth on while the next operations run, and the first one that meets the
//! failure must either succeed as the model says or return `OutOfTableMemory` with the VM
//! exactly as before (a guest access may keep the empty intermediate tables it linked,
//! as `error.rs` documents); it is then applied again with memory back. A call the model
//! says must fail with a typed error must fail so even when memory is short: input is
//! checked before anything is allocated.
//!
//! A second VM on a host of its own ([`Op::OtherVm`]) runs beside this one, and vCPUs
//! cross between them (and outlive a dropped VM): every foreign use must be refused with
//! `ForeignVcpu` and change neither VM.
//!
//! At [`teardown`](Interp::teardown) every table, reverse-map descriptor and shadow page
//! must have been freed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use vmmu::host::{Backing, HostMemory, SimHostMemory};
use vmmu::memslot::MemslotLimits;
use vmmu::spte::SpteFormat;
use vmmu::types::{AccessKind, Gfn, Gpa, Hva, Level, PAGE_SIZE};
use vmmu::Vcpu;
use vmmu::{
    Algorithms, DirtyRange, DirtyWrprot, Error, Exit, MemoryRegion, MemslotFlags, MmuKind,
    PageWrprot, RingEntry, RmapDrop, RmapIteration, Vm, VmConfig,
};

use crate::model::{DirtyMode, Expect, Model};
use crate::op::{Bytes, Op, FAIL_ALLOC_OPS};
use crate::view::{self, SimVm, Snapshot, Tables};
use crate::{FailingAllocator, Rng};

/// The VM the interpreter drives: its tables come from an allocator that can be told to
/// run out ([`Op::FailAlloc`]).
pub type InterpVm = Vm<Arc<SimHostMemory>, FailingAllocator>;

/// Guest-physical window of the small slots: 64 MiB from 1 GiB.
pub const WIN: u64 = 1 << 30;
/// Size of the window.
pub const WIN_SIZE: u64 = 64 << 20;
/// Where the 1 GiB hugetlb slot goes (or 2 GiB above).
pub const HUGE_GPA: u64 = 4 << 30;

/// A slot shape: its size and where its host memory comes from.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Slot size.
    pub size: u64,
    /// Host backing of its region.
    pub backing: Backing,
    /// Host region size.
    pub region: u64,
    /// Offset of the slot's first byte in its host region.
    pub hva_off: u64,
}

/// The slot shapes: 0 is 4 MiB of THP from a 2 MiB-aligned hva; 1 is 3 MiB + 3 pages of
/// 4K pages (its bitmap ends in a partial word); 2 is 5 MiB of THP from 1 MiB into a huge
/// page (4K edges); 3 (with `hugetlb`) is 1 GiB of 1 GiB hugetlb pages.
pub const SHAPES: [Shape; 4] = [
    Shape {
        size: 4 << 20,
        backing: Backing::Thp,
        region: 8 << 20,
        hva_off: 0,
    },
    Shape {
        size: (3 << 20) + 3 * PAGE_SIZE,
        backing: Backing::Page4K,
        region: 4 << 20,
        hva_off: 0,
    },
    Shape {
        size: 5 << 20,
        backing: Backing::Thp,
        region: 8 << 20,
        hva_off: 1 << 20,
    },
    Shape {
        size: 1 << 30,
        backing: Backing::HugeTlb1G,
        region: 1 << 30,
        hva_off: 0,
    },
];

/// How a run is set up.
#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    /// The MMU.
    pub mmu: MmuKind,
    /// The dirty-log mode.
    pub dirty: DirtyMode,
    /// Largest mapping level.
    pub max_level: Level,
    /// The shadow MMU's algorithm switches.
    pub algorithms: Algorithms,
    /// Guest-physical width.
    pub gpa_bits: u8,
    /// Most slots at once.
    pub max_slots: u32,
    /// Most vCPUs.
    pub max_vcpus: u32,
    /// vCPUs created at the start.
    pub vcpus: usize,
    /// Whether shape 3 (1 GiB hugetlb) exists.
    pub hugetlb: bool,
    /// Whether the model keeps a dirty bitmap across a move (KVM does).
    pub move_keeps_dirty: bool,
    /// The compatibility option `VmConfig::change_pte` (Linux's `.change_pte`, removed in
    /// 6.10). Off, [`Op::ChangePte`] checks that `change_pte` is refused, then moves the
    /// page as a current kernel does (inside `invalidate_range_start`/`end`).
    pub change_pte: bool,
}

impl RunConfig {
    /// Defaults for `mmu`: GET mode, 1 GiB max level, 3 vCPUs, no hugetlb slot.
    pub fn new(mmu: MmuKind) -> Self {
        RunConfig {
            mmu,
            dirty: DirtyMode::Get,
            max_level: Level::L1G,
            algorithms: Algorithms::default(),
            gpa_bits: 48,
            max_slots: 32764,
            max_vcpus: 1024,
            vcpus: 3,
            hugetlb: false,
            move_keeps_dirty: true,
            change_pte: false,
        }
    }

    /// A configuration from the first bytes of a fuzz input (consumed).
    pub fn decode(r: &mut Bytes<'_>) -> Self {
        let mmu = crate::MMUS[r.u8() as usize % crate::MMUS.len()].1;
        let mut c = RunConfig::new(mmu);
        let b = r.u8();
        c.dirty = match b % 6 {
            0 | 1 => DirtyMode::Get,
            2 => DirtyMode::Manual,
            3 => DirtyMode::ManualInitSet,
            4 => DirtyMode::Ring(4 << ((b as u32 >> 3) % 5)),
            _ => DirtyMode::Ring(4096),
        };
        c.max_level = [Level::L1G, Level::L2M, Level::L4K][r.u8() as usize % 3];
        let b = r.u8();
        c.algorithms = algorithms(b);
        // A bit `algorithms` leaves alone.
        c.change_pte = b & 0x80 != 0;
        let b = r.u8();
        c.gpa_bits = [48, 48, 40, 36, 33][b as usize % 5];
        c.max_slots = [32764, 32764, 3, 2][(b as usize >> 3) % 4];
        let b = r.u8();
        c.max_vcpus = [1024, 1024, 2, 4][b as usize % 4];
        c.vcpus = 1 + (b as usize >> 2) % 3;
        c.hugetlb = b & 0x80 != 0;
        c
    }

    /// Shapes in use.
    pub fn nshapes(&self) -> usize {
        if self.hugetlb {
            4
        } else {
            3
        }
    }
}

/// The seeds' algorithm switches from the bits of `b`.
pub fn algorithms(b: u8) -> Algorithms {
    Algorithms {
        rmap_iteration: if b & 1 == 0 {
            RmapIteration::RestartScan
        } else {
            RmapIteration::Iterator
        },
        rmap_drop: if b & 2 == 0 {
            RmapDrop::OneByOne
        } else {
            RmapDrop::Destroy
        },
        page_wrprot: if b & 4 == 0 {
            PageWrprot::Scan512
        } else {
            PageWrprot::Bitmap
        },
        dirty_wrprot: [
            DirtyWrprot::PerGfn,
            DirtyWrprot::WalkPages,
            DirtyWrprot::Kvm2012,
            DirtyWrprot::Adaptive,
        ][(b as usize >> 3) % 4],
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Operations applied, by kind.
    pub ops: BTreeMap<&'static str, u64>,
    /// Steps whose full check passed.
    pub checks: u64,
    /// Rejected calls verified to change nothing.
    pub rejected: u64,
    /// Accesses checked against the model (operations and the per-step reads).
    pub accesses: u64,
    /// Operations not issued (an access that would wait on the caller's own open
    /// invalidation, or an operation on a slot that does not exist).
    pub skipped: u64,
    /// Operations that met an allocation failure, returned `OutOfTableMemory`, changed
    /// nothing and then succeeded with memory back.
    pub out_of_memory: u64,
    /// Foreign vCPU uses refused with `ForeignVcpu`, both VMs unchanged.
    pub foreign: u64,
}

impl RunStats {
    /// Operations in all.
    pub fn total_ops(&self) -> u64 {
        self.ops.values().sum()
    }
    /// Add another run's counts.
    pub fn add(&mut self, o: &RunStats) {
        for (k, v) in &o.ops {
            *self.ops.entry(k).or_default() += v;
        }
        self.checks += o.checks;
        self.rejected += o.rejected;
        self.accesses += o.accesses;
        self.skipped += o.skipped;
        self.out_of_memory += o.out_of_memory;
        self.foreign += o.foreign;
    }
}

/// A broken property: where and what.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Step (1-based; 0 = setup, past the last = teardown).
    pub step: usize,
    /// The operation, if any.
    pub op: Option<Op>,
    /// What broke.
    pub what: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Some(op) => write!(f, "step {} ({op:?}): {}", self.step, self.what),
            None => write!(f, "step {}: {}", self.step, self.what),
        }
    }
}

impl std::error::Error for Failure {}

/// A host region behind one shape.
#[derive(Clone, Debug)]
struct HostRegion {
    hva: u64,
    shape: Shape,
    /// Ranges munmapped and not yet mapped again.
    holes: Vec<(u64, u64)>,
}

/// The second VM of [`Op::OtherVm`]: its own host, one 4 MiB THP slot at [`WIN`], one
/// vCPU.
struct OtherVm {
    vm: SimVm,
    vcpu: Vcpu,
}

const OTHER_SIZE: u64 = 4 << 20;

impl OtherVm {
    fn new(cfg: &RunConfig) -> Result<Self, Failure> {
        let host = Arc::new(SimHostMemory::new());
        let hva = host
            .mmap(OTHER_SIZE, Backing::Thp, true)
            .map_err(|e| fail0(format!("other VM's host mmap: {e}")))?;
        let vm = Vm::new(
            VmConfig {
                mmu: cfg.mmu,
                dirty_log: cfg.dirty.config(),
                ..VmConfig::default()
            },
            host,
        );
        let f = |e: Error| fail0(format!("the other VM: {e}"));
        vm.set_user_memory_region(MemoryRegion {
            slot: 0,
            flags: MemslotFlags::LOG_DIRTY_PAGES,
            guest_phys_addr: WIN,
            memory_size: OTHER_SIZE,
            userspace_addr: hva.0,
        })
        .map_err(f)?;
        let vcpu = vm.create_vcpu().map_err(f)?;
        Ok(OtherVm { vm, vcpu })
    }
}

const SENTINEL: u64 = 0x5a5a_5a5a_5a5a_5a5a;
const TOUCHED: usize = 24;

/// The interpreter.
pub struct Interp {
    /// The configuration.
    pub cfg: RunConfig,
    /// The host.
    pub host: Arc<SimHostMemory>,
    /// The vCPUs (before the VM: they drop first).
    pub vcpus: Vec<Vcpu>,
    vm: Option<InterpVm>,
    alloc: Arc<FailingAllocator>,
    /// [`Op::FailAlloc`]: allocations each armed operation may make, and operations left.
    armed: Option<(u64, u32)>,
    /// An operation is running with the allocator armed.
    short: bool,
    /// It met the failure: the operation stops at once (see [`Interp::apply`]).
    ran_out: bool,
    /// The host-virtual ranges of the open invalidations.
    open: Vec<(u64, u64)>,
    /// [`Op::OtherVm`]'s VM, once made.
    other: Option<OtherVm>,
    /// A vCPU whose VM was dropped.
    stale: Option<Vcpu>,
    /// The model.
    pub model: Model,
    regions: Vec<HostRegion>,
    touched: VecDeque<u64>,
    /// What was done.
    pub stats: RunStats,
    step: usize,
    op: Option<Op>,
}

impl Interp {
    /// A VM as `cfg` says, its host regions mapped, its vCPUs created; no slot yet.
    pub fn new(cfg: RunConfig) -> Result<Self, Failure> {
        let host = Arc::new(SimHostMemory::new());
        let mut regions = Vec::new();
        for shape in &SHAPES[..cfg.nshapes()] {
            let hva = host
                .mmap(shape.region, shape.backing, true)
                .map_err(|e| fail0(format!("host mmap: {e}")))?
                .0;
            regions.push(HostRegion {
                hva,
                shape: *shape,
                holes: Vec::new(),
            });
        }
        let limits = MemslotLimits {
            max_slots: cfg.max_slots,
            gpa_bits: cfg.gpa_bits,
            ..MemslotLimits::default()
        };
        let config = VmConfig {
            mmu: cfg.mmu,
            max_level: cfg.max_level,
            limits,
            max_vcpus: cfg.max_vcpus,
            algorithms: cfg.algorithms,
            dirty_log: cfg.dirty.config(),
            change_pte: cfg.change_pte,
            ..VmConfig::default()
        };
        if cfg.mmu == MmuKind::ShadowPaging {
            return Err(fail0(
                "the interpreter drives guest-physical accesses; shadow paging runs under the guest OS model".into(),
            ));
        }
        let alloc = Arc::new(FailingAllocator::new());
        let vm = Vm::with_allocator(config, host.clone(), alloc.clone())
            .map_err(|e| fail0(format!("Vm::with_allocator: {e}")))?;
        let mut model = Model::new(limits, cfg.dirty, cfg.max_vcpus);
        model.move_keeps_dirty = cfg.move_keeps_dirty;
        let mut it = Interp {
            cfg,
            host,
            vcpus: Vec::new(),
            vm: Some(vm),
            alloc,
            armed: None,
            short: false,
            ran_out: false,
            open: Vec::new(),
            other: None,
            stale: None,
            model,
            regions,
            touched: VecDeque::new(),
            stats: RunStats::default(),
            step: 0,
            op: None,
        };
        for _ in 0..cfg.vcpus {
            it.create_vcpu()?;
        }
        Ok(it)
    }

    /// Run `ops` from a fresh VM, then tear down.
    pub fn run(cfg: RunConfig, ops: &[Op]) -> Result<RunStats, Failure> {
        let mut it = Interp::new(cfg)?;
        for op in ops {
            it.apply(op)?;
        }
        it.teardown()?;
        Ok(it.stats)
    }

    /// The VM.
    pub fn vm(&self) -> &InterpVm {
        self.vm.as_ref().expect("the VM exists until teardown")
    }

    fn fail<T>(&self, what: impl Into<String>) -> Result<T, Failure> {
        Err(Failure {
            step: self.step,
            op: self.op.clone(),
            what: what.into(),
        })
    }

    fn snap(&self) -> Snapshot {
        view::snapshot(self.vm(), &self.vcpus)
    }

    /// Compare a call's result with the model's; a call that must fail must change
    /// nothing.
    fn call<T: PartialEq + fmt::Debug>(
        &mut self,
        what: &str,
        want: Result<T, Error>,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<Option<T>, Failure> {
        let before = want.is_err().then(|| self.snap());
        let got = f(self);
        if self.short && want.is_ok() && got == Err(Error::OutOfTableMemory) {
            return self.out_of_memory();
        }
        if got != want {
            return self.fail(format!("{what}: got {got:?}, the model says {want:?}"));
        }
        if let Some(before) = before {
            let after = self.snap();
            if after != before {
                return self.fail(format!(
                    "{what} was rejected ({want:?}) but changed the VM: {}",
                    diff(&before, &after)
                ));
            }
            self.stats.rejected += 1;
        }
        Ok(got.ok())
    }

    /// The operation met the allocation failure: stop it here (see [`Interp::apply`]).
    fn out_of_memory<T>(&mut self) -> Result<T, Failure> {
        self.ran_out = true;
        self.fail("out of table memory")
    }

    fn touch(&mut self, gfn: u64) {
        if let Some(i) = self.touched.iter().position(|&g| g == gfn) {
            self.touched.remove(i);
        }
        self.touched.push_back(gfn);
        if self.touched.len() > TOUCHED {
            self.touched.pop_front();
        }
    }

    fn shape_hva(&self, idx: usize) -> u64 {
        let r = &self.regions[idx % self.regions.len()];
        r.hva + r.shape.hva_off
    }

    /// Host-virtual `[start, end)` of pages `[page, page + pages)` of shape `slot`'s
    /// memory (the page may run past the slot, up to the region's end and a little more).
    fn hva_range(&self, slot: u8, page: u64, pages: u64) -> (u64, u64) {
        let idx = slot as usize % self.regions.len();
        let r = &self.regions[idx];
        let span = (r.shape.region - r.shape.hva_off) / PAGE_SIZE + 16;
        let start = self.shape_hva(idx) + (page % span) * PAGE_SIZE;
        (start, start + pages * PAGE_SIZE)
    }

    fn window_gpa(&self, idx: usize, at: u64) -> u64 {
        if idx == 3 {
            HUGE_GPA + (at % 2) * (2 << 30)
        } else {
            WIN + ((at % WIN_SIZE) & !(PAGE_SIZE - 1))
        }
    }

    fn flags(log: bool, readonly: bool) -> MemslotFlags {
        let mut f = MemslotFlags::empty();
        if log {
            f = f | MemslotFlags::LOG_DIRTY_PAGES;
        }
        if readonly {
            f = f | MemslotFlags::READONLY;
        }
        f
    }

    fn create_vcpu(&mut self) -> Result<(), Failure> {
        let want = self.model.clone().create_vcpu().map(|_| ());
        let mut made = None;
        self.call("create_vcpu", want, |it| {
            it.vm().create_vcpu().map(|v| {
                made = Some(v);
            })
        })?;
        if let Some(v) = made {
            self.model.create_vcpu().expect("the model allowed it");
            self.vcpus.push(v);
        }
        Ok(())
    }

    fn set_region(&mut self, r: MemoryRegion) -> Result<(), Failure> {
        let want = self.model.check_region(&r);
        let got = self.call("set_user_memory_region", want.clone().map(|_| ()), |it| {
            it.vm().set_user_memory_region(r)
        })?;
        if got.is_some() {
            self.model.apply_region(&r, want.expect("ok"));
        }
        Ok(())
    }

    /// One access through the CPU model, checked against the model.
    fn access(&mut self, v: usize, gpa: u64, kind: AccessKind) -> Result<(), Failure> {
        let want = self.model.expect_access(&self.host, gpa, kind);
        let Expect::Done(want) = want else {
            self.stats.skipped += 1;
            return Ok(());
        };
        let vm = self.vm.as_ref().expect("vm");
        let was_full = self.vcpus[v].dirty_ring_soft_full();
        let got = vm.access(&mut self.vcpus[v], Gpa(gpa), kind);
        if self.short && got == Err(Exit::Error(Error::OutOfTableMemory)) {
            return self.out_of_memory();
        }
        self.stats.accesses += 1;
        let gfn = gpa >> 12;
        if got == Err(Exit::DirtyRingFull) && self.cfg.dirty.is_ring() {
            if !self.vcpus[v].dirty_ring_soft_full() {
                return self.fail(format!(
                    "vCPU {v}: DirtyRingFull for {kind:?} of {gpa:#x}, but its ring is not soft-full"
                ));
            }
            if !was_full {
                // The access filled the ring: only a write fault pushes, and it made the
                // page writable and logged it before the vCPU stopped (KVM exits with
                // KVM_EXIT_DIRTY_RING_FULL after the fault; the guest retries the write).
                if kind != AccessKind::Write {
                    return self.fail(format!(
                        "vCPU {v}: a {kind:?} of {gpa:#x} filled the dirty ring"
                    ));
                }
                self.model.wrote(v, gpa);
            } else if let Some(s) = self.model.lookup(gfn).copied() {
                if kind == AccessKind::Write && s.logging() {
                    self.model.tried_write(v, s.id, gfn - s.base);
                }
            }
            return Ok(());
        }
        if got != want {
            return self.fail(format!(
                "vCPU {v}: {kind:?} of gpa {gpa:#x}: got {got:?}, the model says {want:?}"
            ));
        }
        if got.is_ok() && kind == AccessKind::Write {
            self.model.wrote(v, gpa);
        }
        self.touch(gfn);
        Ok(())
    }

    fn leaves_in(&self, ranges: &[(u64, u64)]) -> Vec<view::Entry> {
        let t = view::read_tables(self.vm(), &self.vcpus, &[]);
        t.entries
            .into_iter()
            .filter(|e| {
                !e.spte.is_mmio()
                    && ranges
                        .iter()
                        .any(|&(lo, hi)| e.gfn < hi && e.gfn + e.level.pages() > lo)
            })
            .collect()
    }

    fn nothing_mapped(&self, what: &str, ranges: &[(u64, u64)]) -> Result<(), Failure> {
        let left = self.leaves_in(ranges);
        if let Some(e) = left.first() {
            return self.fail(format!(
                "after {what}: a {} leaf at gfn {:#x} still maps the range ({} leaves in all)",
                e.level.name(),
                e.gfn,
                left.len()
            ));
        }
        Ok(())
    }

    /// Host-virtual `[start, end)` with the notifier's protocol around a host change:
    /// `invalidate_range_start`, the change, `invalidate_range_end`.
    fn host_change(
        &mut self,
        start: u64,
        end: u64,
        change: impl FnOnce(&SimHostMemory) -> bool,
    ) -> Result<bool, Failure> {
        let want = self.model.invalidate_start(start, end);
        self.call("invalidate_range_start", want, |it| {
            it.vm().invalidate_range_start(Hva(start), Hva(end))
        })?;
        let ranges = self.model.gfn_ranges(start, end);
        self.nothing_mapped("invalidate_range_start", &ranges)?;
        let changed = change(&self.host);
        let want = self.model.invalidate_end();
        self.call("invalidate_range_end", want, |it| {
            it.vm().invalidate_range_end()
        })?;
        Ok(changed)
    }

    /// [`Op::RingView`]: KVM's VMM loop on vCPU `idx`'s ring, through its view.
    fn ring_view(&mut self, idx: u32, count: u8) -> Result<(), Failure> {
        let want = match self.model.harvest_error(idx) {
            Some(e) => Err(e),
            None => Ok(()),
        };
        let got = self.call("dirty_ring", want, |it| it.vm().dirty_ring(idx).map(|_| ()))?;
        if got.is_none() {
            return Ok(());
        }
        let view = self.vm().dirty_ring(idx).expect("just returned");
        let (pushed, mut k, _) = view.counters();
        let mut taken = Vec::new();
        loop {
            if taken.len() == count as usize || k >= pushed {
                // The next entry is unread (or not pushed): marking it is refused.
                let want = Err(if k < pushed {
                    Error::RingEntryNotRead {
                        vcpu: idx,
                        index: k,
                    }
                } else {
                    Error::RingEntryNotDirty {
                        vcpu: idx,
                        index: k,
                    }
                });
                self.call("mark_harvested (refused)", want, |_| {
                    view.mark_harvested(k).map(|_| ())
                })?;
                break;
            }
            match view.read(k) {
                // Marked by an earlier view: the harvest cursor passes over it.
                RingEntry::Harvested(_) => {}
                RingEntry::Dirty(e) => {
                    if view.mark_harvested(k) != Ok(true) {
                        return self.fail(format!("mark_harvested({k}) of a dirty entry refused"));
                    }
                    taken.push((e.slot, e.offset));
                }
                RingEntry::Empty => {
                    return self.fail(format!(
                        "vCPU {idx}'s ring entry {k} is empty, but {pushed} were pushed"
                    ))
                }
            }
            k += 1;
        }
        if let Err(e) = self.model.harvested_ring_view(idx as usize, &taken) {
            return self.fail(e);
        }
        Ok(())
    }

    /// Apply one operation, check its result, then check everything.
    ///
    /// While a [`Op::FailAlloc`] is armed the operation runs with the allocator failing
    /// after its first `after` allocations. If it meets the failure (a call returns
    /// `OutOfTableMemory` where the model expects success), it stops there; the VM must be
    /// as before the operation (for an access: the same translations, slots, generation
    /// and bitmaps), the model goes back to its state before, and the operation is
    /// applied again with memory back, which must succeed as the model says.
    pub fn apply(&mut self, op: &Op) -> Result<(), Failure> {
        self.step += 1;
        self.op = Some(op.clone());
        *self.stats.ops.entry(op.kind()).or_default() += 1;
        match self.armed {
            Some((after, left)) if !matches!(op, Op::FailAlloc { .. }) => {
                self.armed = (left > 1).then_some((after, left - 1));
                self.apply_short_of_memory(op, after)?;
            }
            _ => self.apply_op(op)?,
        }
        self.check()
    }

    fn apply_short_of_memory(&mut self, op: &Op, after: u64) -> Result<(), Failure> {
        let model = self.model.clone();
        let before = self.snap();
        let failures = self.alloc.failures();
        self.alloc.fail_after(after);
        self.short = true;
        let r = self.apply_op(op);
        self.short = false;
        self.alloc.restore();
        if !std::mem::take(&mut self.ran_out) {
            return r;
        }
        self.armed = None;
        if self.alloc.failures() == failures {
            return self.fail("OutOfTableMemory, but no allocation failed");
        }
        if let Err(e) = self.vm().audit() {
            return self.fail(format!("out of table memory: {e}"));
        }
        let now = self.snap();
        let access = matches!(op, Op::Access { .. } | Op::AccessGpa { .. });
        let (b, a) = (&before.tables, &now.tables);
        let same = if access {
            b.entries == a.entries
                && (&b.slots, b.generation, &b.bitmaps) == (&a.slots, a.generation, &a.bitmaps)
        } else {
            before == now
        };
        if !same {
            return self.fail(format!(
                "OutOfTableMemory, but the VM changed: {}",
                diff(&before, &now)
            ));
        }
        self.model = model;
        self.stats.out_of_memory += 1;
        self.apply_op(op)
    }

    fn apply_op(&mut self, op: &Op) -> Result<(), Failure> {
        let nshapes = self.cfg.nshapes();
        match *op {
            Op::Create {
                slot,
                at,
                log,
                readonly,
            } => {
                let idx = slot as usize % nshapes;
                let r = MemoryRegion {
                    slot: idx as u32,
                    flags: Self::flags(log, readonly),
                    guest_phys_addr: self.window_gpa(idx, at),
                    memory_size: SHAPES[idx].size,
                    userspace_addr: self.shape_hva(idx),
                };
                self.set_region(r)
            }
            Op::Delete { slot } => {
                let id = slot as u32 % 8;
                let mut r = match self.model.slots.get(&id) {
                    Some(s) => s.region(),
                    None => MemoryRegion {
                        slot: id,
                        flags: MemslotFlags::empty(),
                        guest_phys_addr: 0,
                        memory_size: 0,
                        userspace_addr: 0,
                    },
                };
                r.memory_size = 0;
                self.set_region(r)
            }
            Op::Move { slot, at } => {
                let id = slot as u32 % 8;
                let Some(s) = self.model.slots.get(&id).copied() else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                let mut r = s.region();
                r.guest_phys_addr = self.window_gpa(id as usize, at);
                self.set_region(r)
            }
            Op::Flags {
                slot,
                log,
                readonly,
            } => {
                let id = slot as u32 % 8;
                let Some(s) = self.model.slots.get(&id).copied() else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                let mut r = s.region();
                r.flags = Self::flags(log, readonly);
                self.set_region(r)
            }
            Op::Region {
                slot,
                flags,
                gpa,
                size,
                hva,
                hva_off,
            } => {
                let flags = match MemslotFlags::from_bits(flags) {
                    Ok(f) => f,
                    Err(e) => {
                        if e != Error::InvalidFlags(flags) {
                            return self
                                .fail(format!("MemslotFlags::from_bits({flags:#x}): {e:?}"));
                        }
                        return Ok(());
                    }
                };
                let hva = hva.unwrap_or_else(|| {
                    self.shape_hva(slot as usize % nshapes)
                        .wrapping_add(hva_off)
                });
                self.set_region(MemoryRegion {
                    slot,
                    flags,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: hva,
                })
            }
            Op::Access {
                vcpu,
                slot,
                page,
                off,
                kind,
            } => {
                let v = vcpu as usize % self.vcpus.len();
                let id = slot as u32 % 8;
                let off = off as u64 % PAGE_SIZE;
                let gpa = match self.model.slots.get(&id) {
                    Some(s) => (s.base + page % s.npages) * PAGE_SIZE + off,
                    None => WIN + (page % (WIN_SIZE / PAGE_SIZE)) * PAGE_SIZE + off,
                };
                self.access(v, gpa, kind)
            }
            Op::AccessGpa { vcpu, gpa, kind } => {
                let v = vcpu as usize % self.vcpus.len();
                self.access(v, gpa, kind)
            }
            Op::GetLog { slot, short } => self.get_log(slot, short),
            Op::GetRanges { slot } => self.get_ranges(slot),
            Op::ClearRanges { slot, pattern } => self.clear_ranges(slot, pattern),
            Op::ClearLog {
                slot,
                first,
                num,
                pattern,
                short,
            } => self.clear_log(slot, first, num, pattern, short),
            Op::Harvest { vcpu } => {
                let idx = vcpu as u32;
                let want = match self.model.harvest_error(idx) {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
                let mut out = Vec::new();
                let mut n = 0;
                self.call("harvest_dirty_ring", want, |it| {
                    it.vm().harvest_dirty_ring(idx, &mut out).map(|k| {
                        n = k;
                    })
                })?;
                if n != out.len() {
                    return self.fail(format!(
                        "harvest_dirty_ring returned {n} but appended {}",
                        out.len()
                    ));
                }
                if self.model.harvest_error(idx).is_none() {
                    let entries: Vec<(u32, u64)> = out.iter().map(|e| (e.slot, e.offset)).collect();
                    if let Err(e) = self.model.harvested_ring(idx as usize, &entries) {
                        return self.fail(e);
                    }
                }
                Ok(())
            }
            Op::RingView { vcpu, count } => self.ring_view(vcpu as u32, count),
            Op::Reset => {
                let want = self.model.clone().reset_rings();
                let got = self.call("reset_dirty_rings", want, |it| it.vm().reset_dirty_rings())?;
                if got.is_some() {
                    self.model.reset_rings().expect("ring mode");
                }
                Ok(())
            }
            Op::Unmap { slot, page, pages } => {
                let (start, end) = self.hva_range(slot, page, pages);
                self.unmap(start, end)
            }
            Op::Age {
                slot,
                page,
                pages,
                test,
            } => {
                let (start, end) = self.hva_range(slot, page, pages);
                self.age(start, end, test)
            }
            Op::ChangePte { slot, page } if !self.cfg.change_pte => {
                // A current kernel has no change_pte: refused, nothing changed; the host
                // then moves the page inside an invalidation instead.
                let idx = slot as usize % nshapes;
                let hva = self.shape_hva(idx) + (page % (SHAPES[idx].size / PAGE_SIZE)) * PAGE_SIZE;
                let pfn = self
                    .host
                    .translate(Hva(hva))
                    .map_or(vmmu::types::Pfn(1), |p| p.pfn);
                self.call("change_pte", Err(Error::ChangePteRemoved), |it| {
                    it.vm().change_pte(Hva(hva), pfn, false)
                })?;
                self.host_change(hva, hva + PAGE_SIZE, |h| h.remap_page(Hva(hva)).is_ok())?;
                Ok(())
            }
            Op::ChangePte { slot, page } => {
                let idx = slot as usize % nshapes;
                let hva = self.shape_hva(idx) + (page % (SHAPES[idx].size / PAGE_SIZE)) * PAGE_SIZE;
                let Ok(pfn) = self.host.remap_page(Hva(hva)) else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                let writable = self.host.translate(Hva(hva)).is_some_and(|p| p.writable);
                self.call("change_pte", Ok(()), |it| {
                    it.vm().change_pte(Hva(hva), pfn, writable)
                })?;
                Ok(())
            }
            Op::HostRemap { slot, page } => {
                let (start, end) = self.hva_range(slot, page, 1);
                self.host_change(start, end, |h| h.remap_page(Hva(start)).is_ok())?;
                Ok(())
            }
            Op::HostProtect {
                slot,
                page,
                pages,
                writable,
                notify,
            } => {
                let (start, end) = self.hva_range(slot, page, pages);
                if writable && !notify {
                    let _ = self.host.set_writable(Hva(start), end - start, true);
                } else {
                    self.host_change(start, end, |h| {
                        h.set_writable(Hva(start), end - start, writable).is_ok()
                    })?;
                }
                Ok(())
            }
            Op::HostUnmap { slot, page, pages } => {
                let (start, end) = self.hva_range(slot, page, pages);
                let unmapped =
                    self.host_change(start, end, |h| h.munmap(Hva(start), end - start).is_ok())?;
                if unmapped {
                    let idx = slot as usize % self.regions.len();
                    self.regions[idx].holes.push((start, end));
                }
                Ok(())
            }
            Op::HostRestore { slot } => {
                let idx = slot as usize % self.regions.len();
                let backing = self.regions[idx].shape.backing;
                let holes = std::mem::take(&mut self.regions[idx].holes);
                for (s, e) in holes {
                    if self.host.mmap_fixed(Hva(s), e - s, backing, true).is_err() {
                        self.regions[idx].holes.push((s, e));
                    }
                }
                Ok(())
            }
            Op::HostSplit { slot, page } => {
                let (start, _) = self.hva_range(slot, page, 1);
                let lo = start & !((2 << 20) - 1);
                self.host_change(lo, lo + (2 << 20), |h| h.split_huge(Hva(start)).is_ok())?;
                Ok(())
            }
            Op::InvalidateStart { slot, page, pages } => {
                let (start, end) = self.hva_range(slot, page, pages);
                let want = self.model.invalidate_start(start, end);
                let ok = want.is_ok();
                self.call("invalidate_range_start", want, |it| {
                    it.vm().invalidate_range_start(Hva(start), Hva(end))
                })?;
                if ok {
                    self.open.push((start, end));
                    let ranges = self.model.gfn_ranges(start, end);
                    self.nothing_mapped("invalidate_range_start", &ranges)?;
                }
                Ok(())
            }
            Op::InvalidateEnd => {
                let want = self.model.invalidate_end();
                self.call("invalidate_range_end", want, |it| {
                    it.vm().invalidate_range_end()
                })?;
                if self.model.invalidations == 0 {
                    self.open.clear();
                }
                Ok(())
            }
            Op::HostChangeInWindow { page, unmap } => {
                let Some(&(start, end)) = self.open.get(page as usize % self.open.len().max(1))
                else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                let hva = start + (page % ((end - start) / PAGE_SIZE)) * PAGE_SIZE;
                if unmap {
                    if self.host.munmap(Hva(hva), PAGE_SIZE).is_ok() {
                        if let Some(r) = self
                            .regions
                            .iter_mut()
                            .find(|r| hva >= r.hva && hva < r.hva + r.shape.region)
                        {
                            r.holes.push((hva, hva + PAGE_SIZE));
                        }
                    }
                } else {
                    let _ = self.host.remap_page(Hva(hva));
                }
                Ok(())
            }
            Op::FailAlloc { after } => {
                self.armed = Some((after as u64, FAIL_ALLOC_OPS));
                Ok(())
            }
            Op::OtherVm { call, page } => self.other_vm(call, page),
            Op::BadConfig { bits } => self.bad_config(bits),
            Op::HvaRange { which, start, end } => match which {
                0 => self.unmap(start, end),
                1 => self.age(start, end, false),
                _ => self.age(start, end, true),
            },
            Op::Zap { start, len } => {
                let s = WIN / PAGE_SIZE + start;
                self.zap(s, s.wrapping_add_signed(len))
            }
            Op::ZapRaw { start, end } => self.zap(start, end),
            Op::ZapSlot { slot } => {
                let s = self.model.slots.get(&slot).copied();
                let want = match s {
                    Some(_) => Ok(()),
                    None => Err(Error::NoSuchSlot(slot)),
                };
                self.call("zap_memslot", want, |it| it.vm().zap_memslot(slot))?;
                if let Some(s) = s {
                    self.nothing_mapped("zap_memslot", &[(s.base, s.end())])?;
                }
                Ok(())
            }
            Op::ZapAll | Op::ZapAllFast => {
                let fast = matches!(op, Op::ZapAllFast);
                self.call("zap_all", Ok(()), |it| {
                    if fast {
                        it.vm().zap_all_fast()
                    } else {
                        it.vm().zap_all()
                    }
                })?;
                self.nothing_mapped("zap_all", &[(0, u64::MAX)])
            }
            Op::Track {
                slot,
                page,
                untrack,
            } => {
                let id = slot as u32 % 8;
                let gfn = match self.model.slots.get(&id) {
                    Some(s) => s.base + page % s.npages,
                    None => WIN / PAGE_SIZE + page % (WIN_SIZE / PAGE_SIZE),
                };
                self.track(gfn, untrack)
            }
            Op::TrackGfn { gfn, untrack } => self.track(gfn, untrack),
            Op::CreateVcpu => {
                if self.vcpus.len() >= 6 {
                    self.stats.skipped += 1;
                    return Ok(());
                }
                self.create_vcpu()
            }
        }
    }

    /// [`Op::OtherVm`]: see there.
    fn other_vm(&mut self, call: u8, page: u16) -> Result<(), Failure> {
        if self.other.is_none() {
            self.other = Some(OtherVm::new(&self.cfg)?);
        }
        let gpa = WIN + (page as u64 % (OTHER_SIZE / PAGE_SIZE)) * PAGE_SIZE;
        match call {
            0 => {
                let o = self.other.as_mut().expect("made");
                let r = if page & 1 == 0 {
                    o.vm.write(&mut o.vcpu, Gpa(gpa))
                } else {
                    o.vm.read(&mut o.vcpu, Gpa(gpa))
                };
                match r {
                    Ok(_) => {}
                    Err(Exit::DirtyRingFull) if self.cfg.dirty.is_ring() => {
                        let mut out = Vec::new();
                        let reset =
                            o.vm.harvest_dirty_ring(o.vcpu.id, &mut out)
                                .and_then(|_| o.vm.reset_dirty_rings());
                        if let Err(e) = reset {
                            return self.fail(format!("the other VM's ring: {e}"));
                        }
                    }
                    Err(e) => return self.fail(format!("the other VM's access {gpa:#x}: {e:?}")),
                }
                let o = self.other.as_ref().expect("made");
                if let Err(e) = o.vm.audit() {
                    return self.fail(format!("the other VM: {e}"));
                }
                Ok(())
            }
            1 => {
                let before = self.snap();
                let vm = self.vm.as_ref().expect("vm");
                let o = self.other.as_mut().expect("made");
                let v = match self.stale.as_mut() {
                    Some(v) if page & 1 == 1 => v,
                    _ => &mut o.vcpu,
                };
                if let Err(e) = refuses(vm, v, Gpa(gpa)) {
                    return self.fail(format!("this VM, given a foreign vCPU: {e}"));
                }
                self.unchanged("a foreign vCPU's use", &before)
            }
            2 => {
                let before = self.snap();
                let o = self.other.as_mut().expect("made");
                let theirs = view::snapshot(&o.vm, [&o.vcpu]);
                let n = self.vcpus.len();
                let v = &mut self.vcpus[page as usize % n];
                if let Err(e) = refuses(&o.vm, v, Gpa(gpa)) {
                    return self.fail(format!("the other VM, given this VM's vCPU: {e}"));
                }
                let o = self.other.as_ref().expect("made");
                let after = view::snapshot(&o.vm, [&o.vcpu]);
                if after != theirs {
                    return self.fail(format!(
                        "the other VM refused this VM's vCPU but changed: {}",
                        diff(&theirs, &after)
                    ));
                }
                self.unchanged("lending a vCPU to the other VM", &before)
            }
            3 => {
                // The VM goes; its vCPU stays (and must be useless, not dangerous).
                let OtherVm { vm, vcpu } = self.other.take().expect("made");
                drop(vm);
                self.stale = Some(vcpu);
                Ok(())
            }
            _ => {
                let before = self.snap();
                let v = match self.stale.take() {
                    Some(v) => v,
                    None => {
                        let o = self.other.as_ref().expect("made");
                        match o.vm.create_vcpu() {
                            Ok(v) => v,
                            Err(e) => return self.fail(format!("the other VM's vCPU: {e}")),
                        }
                    }
                };
                let id = v.id;
                let r = self.vm().release_vcpu(v);
                if r != Err(Error::ForeignVcpu { vcpu: id }) {
                    return self.fail(format!("release_vcpu of a foreign vCPU: {r:?}"));
                }
                self.unchanged("release_vcpu of a foreign vCPU", &before)
            }
        }
    }

    fn unchanged(&mut self, what: &str, before: &Snapshot) -> Result<(), Failure> {
        let after = self.snap();
        if after != *before {
            return self.fail(format!(
                "{what} was refused but changed the VM: {}",
                diff(before, &after)
            ));
        }
        self.stats.foreign += 1;
        Ok(())
    }

    /// [`Op::BadConfig`]: a VM built from `bits` fails or succeeds as the rules say; a
    /// failure allocates nothing.
    fn bad_config(&mut self, bits: u64) -> Result<(), Failure> {
        let b = bits.to_le_bytes();
        let mut r = Bytes(&b);
        let mmu = if r.u8() % 8 == 0 {
            MmuKind::ShadowPaging
        } else {
            self.cfg.mmu
        };
        let gpa_bits = match r.u8() {
            x if x < 192 => 30 + x % 21,
            x => x,
        };
        let ring_size = match r.u8() % 4 {
            0 => None,
            1 => Some(1u32 << (r.u8() % 32)),
            2 => Some(r.u32()),
            _ => Some(4u32 << (r.u8() % 19)),
        };
        let max_vcpus = r.u8() as u32 % 3;
        let extra = r.u8();
        let ring_limits = if extra & 1 != 0 {
            vmmu::RingLimits::Kvm
        } else {
            vmmu::RingLimits::Vmmu
        };
        let ring_with_bitmap = extra & 2 != 0;
        let config = VmConfig {
            mmu,
            limits: MemslotLimits {
                gpa_bits,
                ..MemslotLimits::default()
            },
            max_vcpus,
            dirty_log: vmmu::DirtyLogConfig {
                ring_size,
                ring_limits,
                ring_with_bitmap,
                ..vmmu::DirtyLogConfig::default()
            },
            ..VmConfig::default()
        };
        // The rules, in the order the VM checks them: shadow paging needs guest memory
        // (`Vm::with_guest_memory`); the tables have four levels (32 to 48 bits); a ring
        // is a power of two from 4 to 2^20 entries (KVM's KVM_DIRTY_RING_MAX_ENTRIES is
        // 65536; vmmu allows more for large guests, and no fewer than a fault can use),
        // or, under KVM's limits, from 256 (one page of entries) to 65536; the backup
        // bitmap needs a ring (KVM enables it only after the ring).
        let ring_ok = |n: u32| match ring_limits {
            vmmu::RingLimits::Vmmu => n.is_power_of_two() && (4..=1 << 20).contains(&n),
            vmmu::RingLimits::Kvm => n.is_power_of_two() && (256..=65536).contains(&n),
        };
        let want: Result<(), Error> = if mmu == MmuKind::ShadowPaging {
            Err(Error::WrongPagingMode(""))
        } else if !(32..=48).contains(&gpa_bits) {
            Err(Error::InvalidConfig(""))
        } else if let Some(n) = ring_size.filter(|&n| !ring_ok(n)) {
            Err(Error::InvalidRingSize { size: n })
        } else if ring_with_bitmap && ring_size.is_none() {
            Err(Error::InvalidConfig(""))
        } else {
            Ok(())
        };
        let alloc = Arc::new(FailingAllocator::new());
        let host = Arc::new(SimHostMemory::new());
        let got = Vm::with_allocator(config, host, alloc.clone());
        let same = match (&got, &want) {
            (Ok(_), Ok(())) => true,
            (Err(Error::WrongPagingMode(_)), Err(Error::WrongPagingMode(_)))
            | (Err(Error::InvalidConfig(_)), Err(Error::InvalidConfig(_))) => true,
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        if !same {
            return self.fail(format!(
                "Vm::with_allocator({config:?}): got {:?}, the rules say {want:?}",
                got.as_ref().map(|_| ())
            ));
        }
        match got {
            Err(_) if alloc.attempts() != 0 => {
                return self.fail(format!(
                    "a refused configuration allocated {} tables",
                    alloc.attempts()
                ));
            }
            Err(_) => self.stats.rejected += 1,
            Ok(vm) => {
                let v = vm.create_vcpu();
                let want = if max_vcpus == 0 {
                    Err(Error::TooManyVcpus { max: 0 })
                } else {
                    Ok(0)
                };
                if v.as_ref().map(|v| v.id).map_err(Clone::clone) != want {
                    return self.fail(format!(
                        "create_vcpu with max_vcpus {max_vcpus}: {:?}",
                        v.as_ref().map(|v| v.id)
                    ));
                }
                if let Ok(mut v) = v {
                    if let Err(e) = vm.write(&mut v, Gpa(WIN)) {
                        if !matches!(e, Exit::Mmio { .. }) {
                            return self.fail(format!("a write to no memory: {e:?}"));
                        }
                    }
                    let _ = vm.release_vcpu(v);
                }
                if let Err(e) = vm.audit() {
                    return self.fail(format!("a VM built from {config:?}: {e}"));
                }
                drop(vm);
                let live = view::settle_live(alloc.heap());
                if live != 0 {
                    return self.fail(format!("{live} tables left by a dropped VM"));
                }
            }
        }
        Ok(())
    }

    fn track(&mut self, gfn: u64, untrack: bool) -> Result<(), Failure> {
        let want = self.model.clone().track_write(gfn, !untrack);
        let got = self.call("track_write", want, |it| {
            if untrack {
                it.vm().untrack_write(Gfn(gfn))
            } else {
                it.vm().track_write(Gfn(gfn))
            }
        })?;
        if got.is_some() {
            self.model
                .track_write(gfn, !untrack)
                .expect("the model allowed it");
            self.touch(gfn);
        }
        Ok(())
    }

    fn zap(&mut self, start: u64, end: u64) -> Result<(), Failure> {
        let want = if start >= end || end > self.model.max_gfn() {
            Err(Error::InvalidRange { start, end })
        } else {
            Ok(())
        };
        let ok = want.is_ok();
        self.call("zap_gfn_range", want, |it| {
            it.vm().zap_gfn_range(Gfn(start), Gfn(end))
        })?;
        if ok {
            self.nothing_mapped("zap_gfn_range", &[(start, end)])?;
        }
        Ok(())
    }

    fn unmap(&mut self, start: u64, end: u64) -> Result<(), Failure> {
        // unmap_hva_range is invalidate_range_start + _end.
        let want = self.model.invalidate_start(start, end);
        let ok = want.is_ok();
        self.call("unmap_hva_range", want, |it| {
            it.vm().unmap_hva_range(Hva(start), Hva(end))
        })?;
        if ok {
            self.model.invalidate_end().expect("just started");
            let ranges = self.model.gfn_ranges(start, end);
            self.nothing_mapped("unmap_hva_range", &ranges)?;
        }
        Ok(())
    }

    fn age(&mut self, start: u64, end: u64, test: bool) -> Result<(), Failure> {
        let bad = (start >= end).then_some(Error::InvalidHvaRange { start, end });
        let ranges = self.model.gfn_ranges(start, end);
        // The interpreter runs only EPT MMUs (shadow paging is refused by `Interp::new`).
        let is_young = |e: &view::Entry| SpteFormat::EPT.is_accessed(e.spte);
        let young_now = || -> bool { self.leaves_in(&ranges).iter().any(is_young) };
        let expect_young = if bad.is_none() && test {
            Some(young_now())
        } else {
            None
        };
        let want: Result<(), Error> = bad.map_or(Ok(()), Err);
        let mut young = false;
        self.call(
            if test {
                "test_age_hva_range"
            } else {
                "age_hva_range"
            },
            want.clone(),
            |it| {
                let r = if test {
                    it.vm().test_age_hva_range(Hva(start), Hva(end))
                } else {
                    it.vm().age_hva_range(Hva(start), Hva(end))
                };
                r.map(|y| {
                    young = y;
                })
            },
        )?;
        if want.is_err() {
            return Ok(());
        }
        if let Some(e) = expect_young {
            if e != young {
                return self.fail(format!(
                    "test_age_hva_range says young={young}, the leaves there say {e}"
                ));
            }
        } else {
            let left = self.leaves_in(&ranges);
            if let Some(e) = left.iter().find(|e| is_young(e)) {
                return self.fail(format!(
                    "after age_hva_range the {} leaf at gfn {:#x} is still young",
                    e.level.name(),
                    e.gfn
                ));
            }
            let again = self.vm().test_age_hva_range(Hva(start), Hva(end));
            if again != Ok(false) {
                return self.fail(format!("test_age right after age: {again:?}"));
            }
        }
        Ok(())
    }

    fn get_log(&mut self, slot: u32, short: u8) -> Result<(), Failure> {
        let needed = self
            .model
            .slots
            .get(&slot)
            .map_or(1, |s| s.npages.div_ceil(64) as usize);
        let len = if short == 0 {
            needed + 1
        } else {
            needed.saturating_sub(short as usize)
        };
        let want = self.model.get_dirty_log(slot, len);
        let mut out = vec![SENTINEL; len];
        let want_count = want
            .as_ref()
            .map(|w| w.iter().map(|x| x.count_ones() as u64).sum::<u64>())
            .map_err(Clone::clone);
        let got = self.call("get_dirty_log", want_count, |it| {
            it.vm().get_dirty_log(slot, &mut out).map(|r| r.dirty_pages)
        })?;
        if let (Some(_), Ok(words)) = (got, want) {
            if out[..words.len()] != words[..] {
                return self.fail(format!(
                    "get_dirty_log copied {:x?}, the model says {words:x?}",
                    &out[..words.len()]
                ));
            }
            if out[words.len()..].iter().any(|&w| w != SENTINEL) {
                return self.fail("get_dirty_log wrote past the slot's words");
            }
            self.model.got_dirty_log(slot);
        }
        Ok(())
    }

    fn get_ranges(&mut self, slot: u32) -> Result<(), Failure> {
        let needed = self
            .model
            .slots
            .get(&slot)
            .map_or(1, |s| s.npages.div_ceil(64) as usize);
        let want = self.model.get_dirty_log(slot, needed);
        let want_count = want
            .as_ref()
            .map(|w| w.iter().map(|x| x.count_ones() as u64).sum::<u64>())
            .map_err(Clone::clone);
        let mut out = Vec::new();
        let got = self.call("get_dirty_ranges", want_count, |it| {
            it.vm()
                .get_dirty_ranges(slot, &mut out)
                .map(|r| r.dirty_pages)
        })?;
        if let (Some(_), Ok(words)) = (got, want) {
            let want_runs = runs(
                (0..words.len() as u64 * 64)
                    .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0),
            );
            let got_runs: Vec<(u64, u64)> = out.iter().map(|r| (r.first_page, r.npages)).collect();
            if got_runs != want_runs {
                return self.fail(format!(
                    "get_dirty_ranges reported {got_runs:x?}, the model says {want_runs:x?}"
                ));
            }
            self.model.got_dirty_log(slot);
        }
        Ok(())
    }

    fn clear_ranges(&mut self, slot: u32, pattern: u64) -> Result<(), Failure> {
        let npages = self.model.slots.get(&slot).map_or(64, |s| s.npages);
        let ranges: Vec<(u64, u64)> = match pattern {
            0 => runs(self.model.dirty.get(&slot).into_iter().flatten().copied()),
            _ => {
                let mut rng = Rng::new(pattern ^ npages);
                (0..1 + rng.below(6))
                    .map(|_| (rng.below(npages + 2), rng.below(npages / 4 + 3)))
                    .collect()
            }
        };
        let arg: Vec<DirtyRange> = ranges
            .iter()
            .map(|&(first_page, npages)| DirtyRange { first_page, npages })
            .collect();
        let mut model = self.model.clone();
        let want = model.clear_dirty_ranges(slot, &ranges);
        let got = self.call("clear_dirty_ranges", want, |it| {
            it.vm().clear_dirty_ranges(slot, &arg)
        })?;
        if got.is_some() {
            self.model = model;
        }
        Ok(())
    }

    fn clear_log(
        &mut self,
        slot: u32,
        first: u64,
        num: u64,
        pattern: u64,
        short: u8,
    ) -> Result<(), Failure> {
        let nwords = num.div_ceil(64).min(1 << 14) as usize;
        let len = nwords.saturating_sub(short as usize);
        let mut bitmap = vec![0u64; len];
        match pattern {
            0 => {
                if let Some(d) = self.model.dirty.get(&slot) {
                    for &p in d.range(first..first.saturating_add(num)) {
                        let i = p - first;
                        if let Some(w) = bitmap.get_mut((i / 64) as usize) {
                            *w |= 1 << (i % 64);
                        }
                    }
                }
            }
            1 => bitmap.fill(u64::MAX),
            _ => {
                let mut rng = Rng::new(pattern ^ first ^ num);
                bitmap.iter_mut().for_each(|w| *w = rng.next_u64());
            }
        }
        let mut model = self.model.clone();
        let want = model.clear_dirty_log(slot, first, num, &bitmap);
        let got = self.call("clear_dirty_log", want, |it| {
            it.vm().clear_dirty_log(slot, first, num, &bitmap)
        })?;
        if got.is_some() {
            self.model = model;
        }
        Ok(())
    }

    /// Check everything (see the module docs).
    pub fn check(&mut self) -> Result<(), Failure> {
        if let Err(e) = self.vm().audit() {
            return self.fail(format!("{e}"));
        }
        let mut probe: Vec<u64> = self.touched.iter().copied().collect();
        for s in self.model.slots.values() {
            probe.push(s.base);
            probe.push(s.end() - 1);
        }
        let t: Tables = view::read_tables(self.vm(), &self.vcpus, &probe);
        let mut rows: Vec<view::SlotRow> = self
            .model
            .slots
            .values()
            .map(|s| (s.id, s.base, s.npages, s.hva, s.flags.bits()))
            .collect();
        rows.sort_by_key(|r| r.1);
        if t.slots != rows {
            return self.fail(format!(
                "slots differ from the model: VM {:x?}, model {rows:x?}",
                t.slots
            ));
        }
        if t.generation != self.model.generation {
            return self.fail(format!(
                "memslot generation {} but the model counted {} updates",
                t.generation, self.model.generation
            ));
        }
        let logging: Vec<u32> = self
            .model
            .slots
            .values()
            .filter(|s| s.logging())
            .map(|s| s.id)
            .collect();
        if t.bitmaps.keys().copied().collect::<Vec<_>>() != logging {
            return self.fail(format!(
                "slots with a dirty bitmap {:?}, logging slots {logging:?}",
                t.bitmaps.keys().collect::<Vec<_>>()
            ));
        }
        if !self.cfg.dirty.is_ring() {
            for (&id, words) in &t.bitmaps {
                let want = self
                    .model
                    .get_dirty_log(id, usize::MAX)
                    .expect("a logging slot");
                if *words != want {
                    let pages = |w: &[u64]| -> Vec<u64> {
                        (0..w.len() as u64 * 64)
                            .filter(|&p| w[(p / 64) as usize] & (1 << (p % 64)) != 0)
                            .collect()
                    };
                    return self.fail(format!(
                        "slot {id}'s dirty bitmap holds pages {:?}, the model says {:?}",
                        pages(words),
                        pages(&want)
                    ));
                }
            }
        }
        for &g in &probe {
            if let Some(s) = self.model.lookup(g) {
                let vm_says = t.tracked.contains(&(s.id, g - s.base));
                if vm_says != (self.model.tracked(s.id, g - s.base) != 0) {
                    return self.fail(format!(
                        "gfn {g:#x}: write-tracked {vm_says} in the VM, count {} in the model",
                        self.model.tracked(s.id, g - s.base)
                    ));
                }
            }
        }
        let sample: BTreeSet<u64> = probe.iter().copied().collect();
        if let Err(e) = view::check_entries(&t, &self.model, &self.host, &sample) {
            return self.fail(e);
        }
        // Every vCPU reads every touched page.
        for v in 0..self.vcpus.len() {
            for &g in &probe {
                self.access(v, g * PAGE_SIZE + 8, AccessKind::Read)?;
            }
        }
        self.stats.checks += 1;
        Ok(())
    }

    /// End the run: close open invalidations, read a sample of every slot's pages from
    /// every vCPU, zap everything and check the MMU holds only its roots, then drop the VM
    /// and check every table went back to the allocator.
    pub fn teardown(&mut self) -> Result<(), Failure> {
        self.step += 1;
        self.op = None;
        self.other = None;
        self.stale = None;
        self.open.clear();
        while self.model.invalidations > 0 {
            self.model.invalidate_end().expect("open");
            if let Err(e) = self.vm().invalidate_range_end() {
                return self.fail(format!("closing an open invalidation: {e}"));
            }
        }
        let slots: Vec<_> = self.model.slots.values().copied().collect();
        for s in slots {
            let step = (s.npages / 64).max(1) | 1;
            let mut p = 0;
            while p < s.npages {
                for v in 0..self.vcpus.len() {
                    self.access(v, (s.base + p) * PAGE_SIZE, AccessKind::Read)?;
                }
                p += step;
            }
            for v in 0..self.vcpus.len() {
                self.access(v, (s.end() - 1) * PAGE_SIZE, AccessKind::Read)?;
            }
        }
        self.check()?;
        self.vm().zap_all().expect("zap_all cannot fail");
        let t = view::read_tables(self.vm(), &self.vcpus, &[]);
        if let Some(e) = t.entries.iter().find(|e| !e.spte.is_mmio()) {
            return self.fail(format!("a leaf at gfn {:#x} survived zap_all", e.gfn));
        }
        match self.cfg.mmu {
            MmuKind::ShadowDirect => {
                let (pages, descs, created, freed) = self.vm().with_mmu(|_, m| {
                    let (c, f) = m.pages().created_freed();
                    (m.pages().len(), m.pool().in_use(), c, f)
                });
                if pages != 1 || descs != 0 || created - freed != 1 {
                    return self.fail(format!(
                        "after zap_all the shadow MMU holds {pages} pages ({created} created, {freed} freed) and {descs} rmap descriptors; only the root should be left"
                    ));
                }
            }
            MmuKind::ShadowPaging => unreachable!("rejected by Interp::new"),
            MmuKind::Tdp(_) => {
                let roots = self.vm().with_tdp(|_, m| {
                    let g = vmmu::tdp::pin();
                    m.roots(&g).count()
                });
                let mut vroots: Vec<_> = self.vcpus.iter().map(|v| v.root().0).collect();
                vroots.sort();
                vroots.dedup();
                if t.tables > roots.max(1) + vroots.len() {
                    return self.fail(format!(
                        "after zap_all {} tables are reachable from {roots} roots",
                        t.tables
                    ));
                }
            }
        }
        self.vcpus.clear();
        self.vm = None;
        let heap = self.alloc.heap();
        let live = view::settle_live(heap);
        if live != 0 {
            return self.fail(format!(
                "{live} tables still allocated after the VM was dropped ({} allocated, {} freed)",
                heap.allocated(),
                heap.freed()
            ));
        }
        Ok(())
    }
}

/// Every call of `vm` that takes a vCPU, given `v` of another VM: each must refuse it with
/// `ForeignVcpu` and leave the vCPU as it was.
fn refuses<A: vmmu::table::TableAllocator + 'static>(
    vm: &Vm<Arc<SimHostMemory>, A>,
    v: &mut Vcpu,
    gpa: Gpa,
) -> Result<(), String> {
    let want = Error::ForeignVcpu { vcpu: v.id };
    let exit = Err(Exit::Error(want.clone()));
    let counters = (v.accesses, v.exits, v.root());
    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
        let got = vm.access(v, gpa, kind);
        if got != exit {
            return Err(format!("{kind:?} of {:#x}: {got:?}", gpa.0));
        }
    }
    let got = vm.page_fault(v, gpa, vmmu::types::ErrorCode::WRITE);
    if got != Err(want.clone()) {
        return Err(format!("page_fault: {got:?}"));
    }
    let gva = vmmu::types::Gva(gpa.0);
    let got = vm.gva_access(v, gva, AccessKind::Write);
    if got != Err(Exit::Error(want.clone())) {
        return Err(format!("gva_access: {got:?}"));
    }
    for (what, got) in [
        ("invlpg", vm.invlpg(v, gva)),
        ("flush_guest_tlb", vm.flush_guest_tlb(v)),
        ("load_cr3", vm.load_cr3(v, gpa)),
    ] {
        if got != Err(want.clone()) {
            return Err(format!("{what}: {got:?}"));
        }
    }
    if (v.accesses, v.exits, v.root()) != counters {
        return Err("the vCPU ran".into());
    }
    Ok(())
}

fn fail0(what: String) -> Failure {
    Failure {
        step: 0,
        op: None,
        what,
    }
}

/// What differs between two snapshots, briefly.
pub fn diff(a: &Snapshot, b: &Snapshot) -> String {
    if a.stats != b.stats {
        return format!("counters {:?} -> {:?}", a.stats, b.stats);
    }
    let (x, y) = (&a.tables, &b.tables);
    if x.slots != y.slots || x.generation != y.generation {
        return format!(
            "slots {:x?} (gen {}) -> {:x?} (gen {})",
            x.slots, x.generation, y.slots, y.generation
        );
    }
    if x.bitmaps != y.bitmaps {
        return "a dirty bitmap changed".into();
    }
    if x.tables != y.tables {
        return format!("{} tables -> {}", x.tables, y.tables);
    }
    let (ea, eb): (BTreeSet<_>, BTreeSet<_>) =
        (x.entries.iter().collect(), y.entries.iter().collect());
    if let Some(e) = ea.difference(&eb).next() {
        return format!("entry {e:?} went or changed");
    }
    if let Some(e) = eb.difference(&ea).next() {
        return format!("entry {e:?} appeared");
    }
    "something changed".into()
}

/// Runs of consecutive pages, as (first page, pages), from pages in increasing order.
fn runs(pages: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some((f, n)) if *f + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}
