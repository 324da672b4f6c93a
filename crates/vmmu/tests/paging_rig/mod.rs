//! A guest for the shadow-paging tests (`shadow_access.rs`, `shadow_regress.rs`): its own
//! 4-level page tables in guest memory, a supervisor direct map of the page-table area
//! through which the guest edits its tables (as an OS does), and one checked access:
//! the MMU's answer (`Vm::gva_access`) against the reference walker
//! (`vmmu_testing::reference_walk`), translation, error code and A/D bits.
//!
//! Guest-physical layout (one memslot over all of it):
//! - `[0, TABLE_AREA)`: page-table pages, bump-allocated from 4 KiB;
//! - `[DATA4K, DATA4K + DATA4K_PAGES * 4K)`: 4 KiB data pages;
//! - `[DATA2M, DATA2M + DATA2M_FRAMES * 2M)`: 2 MiB data frames;
//! - when a test maps 1 GiB pages, a second memslot over
//!   `[DATA1G, DATA1G + DATA1G_FRAMES * 1G)`: 1 GiB data frames (no guest memory behind
//!   them: only their translations are used).
//!
//! Guest-virtual: PML4 slot [`DIRECT_MAP_SLOT`] maps `[0, TABLE_AREA)` at
//! [`DIRECT_MAP`] with 4 KiB supervisor pages (P|RW, no US, no NX); the tests put their
//! paths in the low slots.
#![allow(dead_code)]

use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use vmmu::guest::{pte, GuestMemory, PagingState, SimGuestMemory};
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gpa, Gva, Level};
use vmmu::Vcpu;
use vmmu::{Exit, MemoryRegion, MemslotFlags, MmuKind, PagingConfig, Vm, VmConfig};
use vmmu_testing::reference_walk::{self as rw, describe_entry, RefWalk};

pub type PagingVm = Vm<Arc<SimHostMemory>>;

pub const K4: u64 = 4 << 10;
pub const M2: u64 = 2 << 20;
pub const GUEST_MEM: u64 = 64 << 20;
pub const TABLE_AREA: u64 = 16 << 20;
pub const DATA4K: u64 = 16 << 20;
pub const DATA4K_PAGES: u64 = 1024;
pub const DATA2M: u64 = 24 << 20;
pub const DATA2M_FRAMES: u64 = 20;
pub const G1: u64 = 1 << 30;
pub const DATA1G: u64 = G1;
pub const DATA1G_FRAMES: u64 = 2;
pub const DIRECT_MAP_SLOT: u64 = 272;
pub const DIRECT_MAP: u64 = 0xffff_0000_0000_0000 | (DIRECT_MAP_SLOT << 39);
/// The rights of every non-varied entry of a test path: present, writable, user.
pub const FULL: u64 = pte::P | pte::RW | pte::US;

/// The guest's memory and its table allocator.
#[derive(Clone)]
pub struct Guest {
    pub mem: Arc<SimGuestMemory>,
    next_table: u64,
    pub pml4: u64,
    /// Some leaf maps a 1 GiB frame: the VM gets the second memslot (only then: a 2 GiB
    /// slot makes every audit much slower).
    pub one_gib_frames: bool,
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    /// Fresh memory with a PML4 and the direct map, written straight into memory.
    pub fn new() -> Self {
        let mut g = Guest {
            mem: Arc::new(SimGuestMemory::new(GUEST_MEM)),
            next_table: K4,
            pml4: 0,
            one_gib_frames: false,
        };
        g.pml4 = g.alloc_table();
        let pdpt = g.alloc_table();
        let pd = g.alloc_table();
        g.poke(g.pml4 + 8 * DIRECT_MAP_SLOT, pdpt | pte::P | pte::RW);
        g.poke(pdpt, pd | pte::P | pte::RW);
        for i in 0..TABLE_AREA / M2 {
            let pt = g.alloc_table();
            g.poke(pd + 8 * i, pt | pte::P | pte::RW);
            for j in 0..512 {
                g.poke(pt + 8 * j, (i * M2 + j * K4) | pte::P | pte::RW);
            }
        }
        g
    }

    /// A zeroed page-table page.
    pub fn alloc_table(&mut self) -> u64 {
        let t = self.next_table;
        assert!(t < TABLE_AREA, "out of page-table pages");
        self.next_table += K4;
        t
    }

    /// Write guest memory directly (not through a vCPU: the MMU is not told).
    pub fn poke(&self, gpa: u64, val: u64) {
        self.mem.write_u64(Gpa(gpa), val).unwrap();
    }

    /// Read guest memory.
    pub fn peek(&self, gpa: u64) -> u64 {
        self.mem.read_u64(Gpa(gpa)).unwrap()
    }

    /// The entry gpa of `gva` at `level`, following the tables from the PML4 as they are
    /// in memory now (`None` if an entry above is not present or is a leaf).
    pub fn entry_gpa(&self, gva: Gva, level: Level) -> Option<u64> {
        let mut table = self.pml4;
        let mut l = Level::L512G;
        loop {
            let gpa = table + 8 * rw::table_index(gva, l);
            if l == level {
                return Some(gpa);
            }
            let e = self.peek(gpa);
            if e & pte::P == 0 || (l != Level::L512G && e & pte::PS != 0) {
                return None;
            }
            table = e & pte::ADDR_MASK;
            l = l.below()?;
        }
    }
}

/// A guest-virtual address from its table indices and an offset.
pub fn gva_of(l4: u64, l3: u64, l2: u64, l1: u64, off: u64) -> Gva {
    let v = (l4 << 39) | (l3 << 30) | (l2 << 21) | (l1 << 12) | off;
    Gva(if v & (1 << 47) != 0 {
        v | 0xffff_0000_0000_0000
    } else {
        v
    })
}

/// The two path shapes of the permission test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A 4 KiB leaf (PTE); the varied upper level is the PDE.
    Pte4K,
    /// A 2 MiB leaf (PDE with PS); the varied upper level is the PDPTE.
    Pde2M,
    /// A 1 GiB leaf (PDPTE with PS); the varied upper level is the PML4E.
    Pdpte1G,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Pte4K => "4K leaf / PDE",
            Family::Pde2M => "2M leaf / PDPTE",
            Family::Pdpte1G => "1G leaf / PML4E",
        }
    }
    /// The name of the varied upper entry.
    pub fn upper_name(self) -> &'static str {
        match self {
            Family::Pte4K => "PDE",
            Family::Pde2M => "PDPTE",
            Family::Pdpte1G => "PML4E",
        }
    }
    pub fn leaf_level(self) -> Level {
        match self {
            Family::Pte4K => Level::L4K,
            Family::Pde2M => Level::L2M,
            Family::Pdpte1G => Level::L1G,
        }
    }
    /// The `i`-th data frame of this family's pool.
    pub fn frame(self, i: u64) -> u64 {
        match self {
            Family::Pte4K => DATA4K + (i % DATA4K_PAGES) * K4,
            Family::Pde2M => DATA2M + (i % DATA2M_FRAMES) * M2,
            Family::Pdpte1G => DATA1G + (i % DATA1G_FRAMES) * G1,
        }
    }
}

/// Varied bits of a leaf, from a 6-bit index: P RW US NX A D.
pub fn leaf_bits(l: u32) -> u64 {
    let b = |i: u32, v: u64| if l & (1 << i) != 0 { v } else { 0 };
    b(0, pte::P) | b(1, pte::RW) | b(2, pte::US) | b(3, pte::NX) | b(4, pte::A) | b(5, pte::D)
}

/// Varied bits of an upper-level entry, from a 5-bit index: P RW US NX A.
pub fn upper_bits(u: u32) -> u64 {
    leaf_bits(u & 0x1f) & !pte::D
}

/// One path of the permission test: the tested gva, the entry gpas top-down, the varied
/// upper entry and the leaf, and the table the upper entry points to.
#[derive(Clone, Debug)]
pub struct Path {
    pub family: Family,
    pub gva: Gva,
    /// Every entry of the walk, top-down (4 for a 4K leaf, 3 for a 2M leaf).
    pub entries: Vec<u64>,
    /// The varied upper entry (PDE or PDPTE).
    pub upper: u64,
    /// The leaf entry.
    pub leaf: u64,
    /// The table the upper entry points to (the PT or the PD).
    pub upper_target: u64,
}

impl Path {
    /// Build the fixed part of a path under PML4 slot `l4` (entries above the varied one:
    /// FULL, A clear), with the given indices; the varied upper entry and the leaf are left
    /// zero (for a 1G leaf the varied upper entry is the PML4E itself). `idx` = (l3, l2, l1) indices and the page offset.
    pub fn build(g: &mut Guest, family: Family, l4: u64, idx: (u64, u64, u64), off: u64) -> Path {
        let (i3, i2, i1) = idx;
        let pdpt = g.alloc_table();
        if family == Family::Pdpte1G {
            g.one_gib_frames = true;
            return Path {
                family,
                gva: gva_of(l4, i3, 0, 0, off & (G1 - 1)),
                entries: vec![g.pml4 + 8 * l4, pdpt + 8 * i3],
                upper: g.pml4 + 8 * l4,
                leaf: pdpt + 8 * i3,
                upper_target: pdpt,
            };
        }
        g.poke(g.pml4 + 8 * l4, pdpt | FULL);
        match family {
            Family::Pte4K => {
                let pd = g.alloc_table();
                let pt = g.alloc_table();
                g.poke(pdpt + 8 * i3, pd | FULL);
                Path {
                    family,
                    gva: gva_of(l4, i3, i2, i1, off),
                    entries: vec![g.pml4 + 8 * l4, pdpt + 8 * i3, pd + 8 * i2, pt + 8 * i1],
                    upper: pd + 8 * i2,
                    leaf: pt + 8 * i1,
                    upper_target: pt,
                }
            }
            Family::Pdpte1G => unreachable!(),
            Family::Pde2M => {
                let pd = g.alloc_table();
                Path {
                    family,
                    gva: gva_of(l4, i3, i2, 0, off & (M2 - 1)),
                    entries: vec![g.pml4 + 8 * l4, pdpt + 8 * i3, pd + 8 * i2],
                    upper: pdpt + 8 * i3,
                    leaf: pd + 8 * i2,
                    upper_target: pd,
                }
            }
        }
    }

    /// The varied upper entry with bits `u`.
    pub fn upper_value(&self, u: u32) -> u64 {
        self.upper_target | upper_bits(u)
    }

    /// The leaf with bits `l` mapping `frame`.
    pub fn leaf_value(&self, l: u32, frame: u64) -> u64 {
        frame
            | leaf_bits(l)
            | match self.family {
                Family::Pte4K => 0,
                Family::Pde2M | Family::Pdpte1G => pte::PS,
            }
    }
}

/// The name of an access for messages.
pub fn access_name(kind: AccessKind, cpl: u8) -> String {
    format!(
        "{} {:?}",
        if cpl == 3 { "user" } else { "supervisor" },
        kind
    )
}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_string()
    }
}

/// A VM running shadow paging over a [`Guest`], with one vCPU, and the registers the test
/// set (kept here, not read back from the MMU under test).
///
/// A panic inside the MMU is caught and recorded in [`Rig::broken`] (the operation reports
/// it; later ones are skipped), so that a test reports the case that made the MMU panic;
/// a VM whose MMU panicked is leaked rather than dropped (its teardown would panic again).
/// [`Rig::teardown`] drops the VM and reports a panicking teardown as a failure.
pub struct Rig {
    pub guest: Guest,
    pub host: Arc<SimHostMemory>,
    pub vm: ManuallyDrop<Arc<PagingVm>>,
    /// Set when the MMU panicked: what it was doing and the message.
    pub broken: Option<String>,
    torn_down: bool,
    pub vcpu: Vcpu,
    pub regs: PagingState,
    pub config: PagingConfig,
    /// Checked accesses so far.
    pub checks: u64,
    /// `VMMU_PAGING_TRACE` set: print every operation to stderr (to find the step at which
    /// the MMU panics).
    pub trace: bool,
}

impl Rig {
    /// Start a VM over `guest` (whose tables are already written): one memslot over all
    /// guest memory backed by `backing`, one vCPU with CR3 = the PML4, WP and NX on, CPL 0.
    pub fn start(guest: Guest, config: PagingConfig, backing: Backing) -> Rig {
        let host = Arc::new(SimHostMemory::new());
        // hugetlbfs needs whole GiBs: the small slot is THP then.
        let small = if backing == Backing::HugeTlb1G {
            Backing::Thp
        } else {
            backing
        };
        let hva = host.mmap(GUEST_MEM, small, true).expect("host mmap").0;
        let vm = ManuallyDrop::new(Arc::new(Vm::new_paging(
            VmConfig {
                mmu: MmuKind::ShadowPaging,
                paging: config,
                ..VmConfig::default()
            },
            host.clone(),
            guest.mem.clone() as Arc<dyn GuestMemory>,
        )));
        vm.set_user_memory_region(MemoryRegion {
            slot: 0,
            flags: MemslotFlags::empty(),
            guest_phys_addr: 0,
            memory_size: GUEST_MEM,
            userspace_addr: hva,
        })
        .expect("memslot");
        if guest.one_gib_frames {
            let hva1 = host
                .mmap(DATA1G_FRAMES * G1, backing, true)
                .expect("host mmap")
                .0;
            vm.set_user_memory_region(MemoryRegion {
                slot: 1,
                flags: MemslotFlags::empty(),
                guest_phys_addr: DATA1G,
                memory_size: DATA1G_FRAMES * G1,
                userspace_addr: hva1,
            })
            .expect("memslot 1");
        }
        let mut vcpu = vm.create_vcpu().expect("vcpu");
        let regs = PagingState {
            cr3: Gpa(guest.pml4),
            cr0_wp: true,
            efer_nx: true,
            cpl: 0,
        };
        vm.set_paging(&mut vcpu, regs).expect("set_paging");
        Rig {
            guest,
            host,
            vm,
            vcpu,
            regs,
            config,
            checks: 0,
            broken: None,
            torn_down: false,
            trace: std::env::var_os("VMMU_PAGING_TRACE").is_some(),
        }
    }

    /// Run `f` on the MMU, catching a panic (recorded in `broken`). Err if the MMU
    /// panicked now or before.
    pub fn guarded<R>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> R) -> Result<R, String> {
        if let Some(b) = &self.broken {
            return Err(format!("skipped: the MMU panicked earlier ({b})"));
        }
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(r) => Ok(r),
            Err(p) => {
                let msg = format!("the MMU panicked in {what}: {}", panic_message(&*p));
                self.broken = Some(msg.clone());
                Err(msg)
            }
        }
    }

    /// Drop the VM now; a panic in its teardown is a failure.
    pub fn teardown(&mut self, fails: &mut Failures) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if let Some(b) = &self.broken {
            fails.push(format!("the VM is leaked, not torn down: {b}"));
            return;
        }
        // SAFETY: taken once (`torn_down`), never used again.
        let vm = unsafe { ManuallyDrop::take(&mut self.vm) };
        if let Err(p) = catch_unwind(AssertUnwindSafe(move || drop(vm))) {
            fails.push(format!(
                "the VM's teardown panicked: {}",
                panic_message(&*p)
            ));
        }
    }

    /// Another vCPU of the same VM (for another thread), with the same registers, sharing
    /// the guest. Only the first rig tears the VM down; this one just lets go of it.
    pub fn another_vcpu(&self) -> Rig {
        let mut vcpu = self.vm.create_vcpu().expect("vcpu");
        self.vm
            .set_paging(&mut vcpu, self.regs)
            .expect("set_paging");
        Rig {
            guest: self.guest.clone(),
            host: self.host.clone(),
            vm: ManuallyDrop::new(Arc::clone(&self.vm)),
            broken: None,
            torn_down: false,
            vcpu,
            regs: self.regs,
            config: self.config,
            checks: 0,
            trace: self.trace,
        }
    }

    /// CR0.WP and EFER.NX (with set_paging; CR3 and CPL unchanged).
    pub fn set_wp_nx(&mut self, wp: bool, nx: bool) {
        if self.trace {
            eprintln!("set_paging wp={} nx={}", wp as u8, nx as u8);
        }
        self.regs.cr0_wp = wp;
        self.regs.efer_nx = nx;
        let _ = self.guarded("set_paging", |r| {
            r.vm.set_paging(&mut r.vcpu, r.regs).expect("set_paging")
        });
    }

    pub fn set_cpl(&mut self, cpl: u8) {
        self.regs.cpl = cpl;
        self.vcpu.set_cpl(cpl);
    }

    pub fn invlpg(&mut self, gva: Gva) {
        if self.trace {
            eprintln!("invlpg {gva}");
        }
        let _ = self.guarded("invlpg", |r| r.vm.invlpg(&mut r.vcpu, gva).expect("invlpg"));
    }

    /// MOV CR3 to another address space.
    pub fn set_cr3(&mut self, cr3: u64) {
        if self.trace {
            eprintln!("load_cr3 {cr3:#x}");
        }
        self.regs.cr3 = Gpa(cr3);
        self.vm
            .load_cr3(&mut self.vcpu, Gpa(cr3))
            .expect("load_cr3");
    }

    /// MOV CR3 with the current CR3 (a full flush of non-global translations).
    pub fn reload_cr3(&mut self) {
        if self.trace {
            eprintln!("load_cr3 {} (same)", self.regs.cr3);
        }
        let cr3 = self.regs.cr3;
        let _ = self.guarded("load_cr3", |r| {
            r.vm.load_cr3(&mut r.vcpu, cr3).expect("load_cr3")
        });
    }

    pub fn audit(&mut self) -> Result<(), String> {
        self.guarded("audit", |r| {
            r.vm.audit().map(|_| ()).map_err(|e| e.to_string())
        })?
    }

    /// A full guest TLB flush.
    pub fn flush_all(&mut self) {
        if self.trace {
            eprintln!("flush_guest_tlb");
        }
        let _ = self.guarded("flush_guest_tlb", |r| {
            r.vm.flush_guest_tlb(&mut r.vcpu).expect("flush_guest_tlb")
        });
    }

    /// Reclaim up to `n` shadow pages; the number zapped (0 if the MMU panicked).
    pub fn reclaim(&mut self, n: usize) -> usize {
        if self.trace {
            eprintln!("reclaim_shadow_pages({n})");
        }
        self.guarded("reclaim_shadow_pages", |r| r.vm.reclaim_shadow_pages(n))
            .unwrap_or(0)
    }

    /// Zap every shadow page.
    pub fn zap_all(&mut self) {
        if self.trace {
            eprintln!("zap_all");
        }
        let _ = self.guarded("zap_all", |r| r.vm.zap_all().expect("zap_all"));
    }

    /// The guest writes `val` to its page-table entry at `gpa`, at CPL 0 through the
    /// direct map, as an OS does: the write itself is checked against the reference (it
    /// must succeed, land in memory and set the direct map's A/D bits).
    pub fn guest_write(&mut self, gpa: u64, val: u64) -> Result<(), String> {
        assert!(gpa < TABLE_AREA);
        let cpl = self.regs.cpl;
        self.set_cpl(0);
        let gva = Gva(DIRECT_MAP + gpa);
        if self.trace {
            eprintln!("guest write [{gpa:#x}] := {val:#x} {}", describe_entry(val));
        }
        let want = rw::walk(&*self.guest.mem, &self.regs, gva, AccessKind::Write);
        let got = self.guarded("gva_write_u64", |r| {
            r.vm.gva_write_u64(&mut r.vcpu, gva, val)
        });
        self.set_cpl(cpl);
        let got = got?;
        let mut err = String::new();
        if want.gpa() != Some(Gpa(gpa)) {
            err += &format!("reference cannot write through the direct map: {want}\n");
        }
        if let Err(e) = got {
            err += &format!("guest write of {val:#x} to PTE gpa {gpa:#x} via {gva}: {e:?}\n");
        }
        let now = self.guest.peek(gpa);
        if now != val {
            err += &format!("guest write of {val:#x} to PTE gpa {gpa:#x}: memory holds {now:#x}\n");
        }
        for (g, v) in want.expected_entries() {
            let m = self.guest.peek(g.0);
            if m != v {
                err += &format!(
                    "direct-map entry {g} after the write: {m:#x} {}, want {v:#x} {}\n",
                    describe_entry(m),
                    describe_entry(v)
                );
            }
        }
        if err.is_empty() {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// Write `val` at `gpa` with `guest_write` unless memory holds it already.
    pub fn guest_set(&mut self, gpa: u64, val: u64, always: bool) -> Result<(), String> {
        if always || self.guest.peek(gpa) != val {
            self.guest_write(gpa, val)
        } else {
            Ok(())
        }
    }

    /// One access of `kind` to `gva` at CPL `cpl`, checked against the reference: the
    /// outcome (gpa or #PF error code) and afterwards every entry in `watch` (the walk's
    /// entries hold what the reference computed, the others are unchanged). Returns the
    /// reference walk, or a description of every difference. An empty `watch` means the
    /// entries the reference walks.
    pub fn check_access(
        &mut self,
        gva: Gva,
        kind: AccessKind,
        cpl: u8,
        watch: &[u64],
    ) -> Result<RefWalk, String> {
        self.set_cpl(cpl);
        self.checks += 1;
        let want = rw::walk(&*self.guest.mem, &self.regs, gva, kind);
        let walked: Vec<u64> = want.entries.iter().map(|e| e.gpa.0).collect();
        let watch = if watch.is_empty() { &walked[..] } else { watch };
        let before: Vec<u64> = watch.iter().map(|&g| self.guest.peek(g)).collect();
        if self.trace {
            eprintln!(
                "{} at {gva}, wp={} nx={}; reference: {want}",
                access_name(kind, cpl),
                self.regs.cr0_wp as u8,
                self.regs.efer_nx as u8
            );
        }
        let got = self.guarded("gva_access", |r| r.vm.gva_access(&mut r.vcpu, gva, kind))?;
        if self.trace {
            eprintln!("  -> {got:?}");
        }
        let mut err = String::new();
        let ok = match (&want.result, &got) {
            (Ok(t), Ok(g)) => t.gpa == *g,
            (
                Err(rw::WalkFault::PageFault { error_code, .. }),
                Err(Exit::GuestPageFault {
                    gva: fgva,
                    error_code: fec,
                }),
            ) => error_code == fec && *fgva == gva,
            _ => false,
        };
        if !ok {
            let want_s = match &want.result {
                Ok(t) => format!("Ok({})", t.gpa),
                Err(rw::WalkFault::PageFault { error_code, .. }) => {
                    format!("#PF {error_code:?}")
                }
                Err(e) => format!("{e:?}"),
            };
            let got_s = match &got {
                Ok(g) => format!("Ok({g})"),
                Err(Exit::GuestPageFault {
                    gva: fgva,
                    error_code,
                }) => format!("#PF {error_code:?} at {fgva}"),
                Err(e) => format!("{e:?}"),
            };
            err += &format!("outcome: want {want_s}, got {got_s}\n");
        }
        let expected = want.expected_entries();
        for (i, &g) in watch.iter().enumerate() {
            let want_v = expected
                .iter()
                .find(|e| e.0 .0 == g)
                .map_or(before[i], |e| e.1);
            let now = self.guest.peek(g);
            if now != want_v {
                err += &format!(
                    "entry {g:#x} after the access: {now:#x} {}, want {want_v:#x} {} (was {:#x})\n",
                    describe_entry(now),
                    describe_entry(want_v),
                    before[i]
                );
            }
        }
        if err.is_empty() {
            Ok(want)
        } else {
            Err(format!("{err}  reference: {want}"))
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if !self.torn_down && self.broken.is_none() && !std::thread::panicking() {
            // SAFETY: `torn_down` is false: the VM was never taken.
            unsafe { ManuallyDrop::drop(&mut self.vm) };
        }
        // Otherwise leaked: a panicking MMU's teardown would panic again.
    }
}

/// Failures collected over a run: the first few in full, and a count.
#[derive(Default)]
pub struct Failures {
    pub list: Vec<String>,
    pub count: usize,
}

impl Failures {
    pub const KEEP: usize = 40;

    pub fn push(&mut self, msg: String) {
        self.count += 1;
        if self.list.len() < Self::KEEP {
            self.list.push(msg);
        }
    }

    /// Record `r`'s error with `ctx`.
    pub fn note<T>(&mut self, r: Result<T, String>, ctx: impl FnOnce() -> String) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(format!(
                    "{}:\n  {}",
                    ctx(),
                    e.trim_end().replace('\n', "\n  ")
                ));
                None
            }
        }
    }

    /// Panic with the failures of every run that had some (each labelled), if any.
    #[track_caller]
    pub fn finish_all(runs: &[(String, Failures, u64)]) {
        let bad: Vec<String> = runs
            .iter()
            .filter(|r| r.1.count > 0)
            .map(|(what, f, checks)| {
                let within = if *checks > 0 {
                    format!(" in {checks} checked accesses")
                } else {
                    String::new()
                };
                format!(
                    "==== {what}: {} failures{within}; the first {}:\n\n{}",
                    f.count,
                    f.list.len(),
                    f.list.join("\n\n")
                )
            })
            .collect();
        if !bad.is_empty() {
            let ok: Vec<&str> = runs
                .iter()
                .filter(|r| r.1.count == 0)
                .map(|r| r.0.as_str())
                .collect();
            panic!(
                "{} of {} runs failed (passed: {ok:?})\n\n{}",
                bad.len(),
                runs.len(),
                bad.join("\n\n")
            );
        }
    }

    /// Panic with the failures, if any.
    #[track_caller]
    pub fn finish(&self, what: &str, checks: u64) {
        if self.count > 0 {
            let within = if checks > 0 {
                format!(" in {checks} checked accesses")
            } else {
                String::new()
            };
            panic!(
                "{what}: {} failures{within}; the first {}:\n\n{}",
                self.count,
                self.list.len(),
                self.list.join("\n\n")
            );
        }
    }
}
