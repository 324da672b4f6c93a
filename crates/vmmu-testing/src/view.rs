//! What the MMU holds, read without side effects under the MMU lock.
//!
//! The tables are walked by hand from every root a vCPU may use (the MMU's roots and each
//! vCPU's loaded root), following frame numbers through the allocator as the CPU does:
//! the same walk for every MMU, since they all build hardware-format tables. Holding the
//! exclusive lock keeps every reachable table allocated (tables are freed only under it,
//! after a flush).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use vmmu::host::{HostMemory, SimHostMemory};
use vmmu::memslot::Memslots;
use vmmu::spte::Spte;
use vmmu::table::{HeapTableAllocator, TableAllocator};
use vmmu::types::{Level, Pfn};
use vmmu::Vcpu;
use vmmu::{MmuKind, Vm, VmStats};

/// The VM type the interpreter and the soak drive.
pub type SimVm = Vm<Arc<SimHostMemory>, HeapTableAllocator>;

/// A present leaf or an MMIO SPTE found in the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The root it was found under.
    pub root: u64,
    /// First gfn it maps.
    pub gfn: u64,
    /// Its level.
    pub level: Level,
    /// The SPTE.
    pub spte: Spte,
}

impl Entry {
    fn key(&self) -> (u64, u64, Level, u64) {
        (self.root, self.gfn, self.level, self.spte.0)
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// One slot as the VM holds it: (id, base gfn, pages, hva, flags).
pub type SlotRow = (u32, u64, u64, u64, u32);

/// Everything read under one hold of the lock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Present leaves and MMIO SPTEs under every root, by root.
    pub entries: Vec<Entry>,
    /// Tables reachable from some root.
    pub tables: usize,
    /// The slots.
    pub slots: Vec<SlotRow>,
    /// The memslot generation.
    pub generation: u64,
    /// Each logging slot's dirty bitmap words, by id.
    pub bitmaps: BTreeMap<u32, Vec<u64>>,
    /// Write-tracked (slot, offset) pairs among `probe_tracked`.
    pub tracked: BTreeSet<(u32, u64)>,
}

/// Run `f` with the memslots and the roots of `vm` under its exclusive MMU lock (the one
/// MMU-specific piece of the walk: a third MMU adds an arm here).
pub fn with_tables<A: TableAllocator + 'static, R>(
    vm: &Vm<Arc<SimHostMemory>, A>,
    f: impl FnOnce(&Memslots, Vec<Pfn>) -> R,
) -> R {
    match vm.config().mmu {
        MmuKind::ShadowDirect | MmuKind::ShadowPaging => {
            vm.with_mmu(|slots, m| f(slots, vec![m.root_frame()]))
        }
        MmuKind::Tdp(_) => vm.with_tdp(|slots, m| {
            let guard = vmmu::tdp::pin();
            let roots = m.roots(&guard).map(|(r, _)| r.frame()).collect();
            f(slots, roots)
        }),
    }
}

/// Walk the tables under `root` (at the top level), pushing leaves and MMIO SPTEs.
///
/// # Safety
/// The MMU lock is held exclusively and `root` is a live root.
unsafe fn walk<A: TableAllocator>(
    alloc: &A,
    root: Pfn,
    out: &mut Vec<Entry>,
    tables: &mut BTreeSet<u64>,
) {
    let mut stack = vec![(root, Level::ROOT, 0u64)];
    while let Some((frame, level, base)) = stack.pop() {
        if !tables.insert(frame.0) {
            continue;
        }
        // SAFETY: the lock keeps every table reachable from a live root allocated.
        let table = unsafe { alloc.table_ptr(frame).as_ref() };
        for i in 0..512usize {
            let spte = table.get(i);
            let gfn = base + ((i as u64) << level.gfn_shift());
            if spte.is_mmio() {
                out.push(Entry {
                    root: root.0,
                    gfn,
                    level,
                    spte,
                });
                continue;
            }
            if !spte.is_shadow_present() {
                continue;
            }
            if spte.is_leaf(level) {
                out.push(Entry {
                    root: root.0,
                    gfn,
                    level,
                    spte,
                });
            } else if let Some(below) = level.below() {
                stack.push((spte.pfn(), below, gfn));
            }
        }
    }
}

/// Read the tables under every root (the MMU's and each of `vcpus`'), the slots, the
/// dirty bitmaps and which of `probe_tracked` (gfns) are write-tracked.
pub fn read_tables<'a, A: TableAllocator + 'static>(
    vm: &Vm<Arc<SimHostMemory>, A>,
    vcpus: impl IntoIterator<Item = &'a Vcpu>,
    probe_tracked: &[u64],
) -> Tables {
    let vcpu_roots: Vec<Pfn> = vcpus.into_iter().map(|v| v.root()).collect();
    let alloc = vm.allocator().clone();
    with_tables(vm, |slots, mut roots| {
        roots.extend(vcpu_roots);
        // Frame 0 is no root: a shadow-paging MMU has no direct root, and a vCPU before
        // its first CR3 load has none loaded.
        roots.retain(|r| r.0 != 0);
        roots.sort();
        roots.dedup();
        let mut t = Tables::default();
        let mut seen = BTreeSet::new();
        for r in roots {
            let mut frames = BTreeSet::new();
            // SAFETY: under the exclusive lock; MMU roots are live, and a vCPU's root is
            // held (referenced) by the vCPU until it loads another.
            unsafe { walk(&alloc, r, &mut t.entries, &mut frames) };
            seen.extend(frames);
        }
        t.tables = seen.len();
        t.generation = slots.generation();
        for s in slots.iter() {
            t.slots.push((
                s.id,
                s.base_gfn.0,
                s.npages,
                s.userspace_addr.0,
                s.flags.bits(),
            ));
            if let Some(b) = s.dirty_bitmap() {
                t.bitmaps.insert(
                    s.id,
                    b.words()
                        .iter()
                        .map(|w| w.load(std::sync::atomic::Ordering::SeqCst))
                        .collect(),
                );
            }
        }
        for &g in probe_tracked {
            if let Some(s) = slots.lookup(vmmu::types::Gfn(g)) {
                if s.is_write_tracked(vmmu::types::Gfn(g)) {
                    t.tracked.insert((s.id, g - s.base_gfn.0));
                }
            }
        }
        t
    })
}

/// What must not change when a call is rejected: the tables (every leaf with its A/D
/// bits, the table count), the slots and their generation, the dirty bitmaps, and the
/// counters (for the TDP MMU less the two the epoch collector moves on its own time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Tables, slots, bitmaps.
    pub tables: Tables,
    /// Counters.
    pub stats: VmStats,
}

/// Take a [`Snapshot`].
pub fn snapshot<'a, A: TableAllocator + 'static>(
    vm: &Vm<Arc<SimHostMemory>, A>,
    vcpus: impl IntoIterator<Item = &'a Vcpu>,
) -> Snapshot {
    let tables = read_tables(vm, vcpus, &[]);
    let mut stats = vm.stats();
    if matches!(vm.config().mmu, MmuKind::Tdp(_)) {
        stats.shadow_pages = 0;
        stats.mmu.pages_freed = 0;
    }
    Snapshot { tables, stats }
}

/// Check every leaf and MMIO SPTE against the model's view: a leaf maps only gfns inside a
/// slot, each at the host's current pfn; it is writable only where the guest may write
/// and, while the slot logs, only where the write is already logged; a current-generation
/// MMIO SPTE is only outside every slot. 1 GiB leaves are checked at their ends and at
/// `sample` gfns inside them.
pub fn check_entries(
    t: &Tables,
    model: &crate::Model,
    host: &SimHostMemory,
    sample: &BTreeSet<u64>,
) -> Result<(), String> {
    let gen = t.generation & vmmu::spte::MMIO_GEN_MASK;
    for e in &t.entries {
        if e.spte.is_mmio() {
            if e.spte.mmio_generation() == gen {
                if let Some(s) = model.lookup(e.gfn) {
                    return Err(format!(
                        "current MMIO SPTE for gfn {:#x}, which is in slot {} (root {:#x})",
                        e.gfn, s.id, e.root
                    ));
                }
            }
            continue;
        }
        let pages = e.level.pages();
        let gfns: Vec<u64> = if e.level > Level::L2M {
            let mut v = vec![e.gfn, e.gfn + pages - 1];
            v.extend(sample.range(e.gfn..e.gfn + pages));
            v
        } else {
            (e.gfn..e.gfn + pages).collect()
        };
        for g in gfns {
            let pfn = e.spte.pfn().0 + (g - e.gfn);
            let Some((want, writable)) = model.translation(host, g) else {
                return Err(format!(
                    "{} leaf at gfn {:#x} maps gfn {g:#x}, which the guest may not reach (no slot or no host page) (root {:#x})",
                    e.level.name(),
                    e.gfn,
                    e.root
                ));
            };
            if pfn != want {
                return Err(format!(
                    "stale pfn: {} leaf at gfn {:#x} maps gfn {g:#x} to pfn {pfn:#x}, the host has {want:#x} (root {:#x})",
                    e.level.name(),
                    e.gfn,
                    e.root
                ));
            }
            if e.spte.is_writable() {
                if !writable {
                    return Err(format!(
                        "{} leaf at gfn {:#x} is writable, but the guest may not write gfn {g:#x} (read-only slot or host page, or write-tracked) (root {:#x})",
                        e.level.name(),
                        e.gfn,
                        e.root
                    ));
                }
                let s = model.lookup(g).expect("translation found a slot");
                if s.logging() && !model.logged(s.id, g - s.base) {
                    return Err(format!(
                        "gfn {g:#x} (page {} of logging slot {}) is writable but not logged: a write would escape the dirty log (root {:#x})",
                        g - s.base,
                        s.id,
                        e.root
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The frame behind `hva` now, if any.
pub fn host_pfn(host: &SimHostMemory, hva: u64) -> Option<u64> {
    host.translate(vmmu::types::Hva(hva)).map(|p| p.pfn.0)
}

/// Tables a VM's allocator still holds after the VM is gone, once the epoch collector has
/// run what it can (the TDP MMU frees through it). Drives the collector from this thread
/// for a bounded number of rounds.
pub fn settle_live(alloc: &HeapTableAllocator) -> u64 {
    // The epoch can only advance once every thread of the process has left the
    // operation it pinned for; tests running in parallel may hold a pin through a long
    // operation (splitting a 1 GiB page, say), so wait by time, not by a count of tries.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while alloc.live() != 0 && std::time::Instant::now() < deadline {
        vmmu::tdp::quiesce();
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    alloc.live()
}
