//! The audit (KVM's `mmu_audit.c`): checks, at a quiescent point, every invariant that
//! ties the tables, the reverse maps, the parent links and the counters together.
//!
//! Checked:
//! - every present leaf SPTE has exactly one reverse-map entry, and every reverse-map
//!   entry names a present leaf of its level mapping its gfn;
//! - every reverse map is well formed (descriptor counts, tail counts, no duplicates);
//! - every present non-leaf SPTE points at the page recorded as its child, whose
//!   `parent_ptes` names it, whose level is one below and whose gfn matches; every
//!   `parent_ptes` entry names such an SPTE;
//! - each page's present and MMIO counters match its table;
//! - no present leaf maps a gfn outside the memslots; no writable SPTE in a READONLY slot;
//!   no huge leaf in a slot that logs dirty pages; every leaf's pfn is aligned to its level;
//! - each page's possibly-writable bitmap and count (seed 001) match its table;
//! - with bitmap logging, every writable leaf of a logging slot is marked dirty;
//! - no page is waiting for a flush (the audit runs at quiescent points);
//! - in direct mode, the leaf-table map names every linked 4K page by its region, and
//!   nothing else;
//! - the descriptor pool's in-use count equals the descriptors the heads hold.

use alloc::format;
use alloc::string::String;
use core::fmt;

use crate::host::HostMemory;
use crate::memslot::{Memslot, Memslots};
use crate::rmap::{self, SpteRef};
use crate::shadow::ShadowMmu;
use crate::spte::Spte;
use crate::table::TableAllocator;
use crate::types::{Gfn, Level, SPTE_ENT_PER_PAGE};

/// What the audit looked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Shadow pages checked.
    pub pages: usize,
    /// Present leaf SPTEs.
    pub leaves: usize,
    /// Present non-leaf SPTEs.
    pub nonleaves: usize,
    /// MMIO SPTEs.
    pub mmio: usize,
    /// Reverse-map entries.
    pub rmap_entries: usize,
}

/// A broken invariant, with a description precise enough to debug from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditError(pub String);

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MMU audit failed: {}", self.0)
    }
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(AuditError(format!($($arg)*)));
        }
    };
}

/// Check that the leaf `spte` of `level` mapping `gfn` in `slot` maps what the host maps
/// now: for each 4 KiB page, the host's frame at the slot's hva is the leaf's frame plus
/// the page's offset, and the host mapping is writable if the leaf is writable or
/// host-writable. `at` names the leaf in the message.
///
/// One translation per host page: where the host reports a huge mapping, its contract
/// ([`crate::host::HostPage`]) makes the rest of that huge page contiguous.
fn check_leaf_against_host<H: HostMemory + ?Sized>(
    host: &H,
    slot: &Memslot,
    gfn: Gfn,
    level: Level,
    spte: Spte,
    at: &dyn fmt::Debug,
) -> Result<(), AuditError> {
    let base = spte.pfn().0;
    let mut k = 0;
    while k < level.pages() {
        let g = Gfn(gfn.0 + k);
        let hva = slot.gfn_to_hva(g);
        let hp = host.translate(hva);
        ensure!(
            hp.is_some(),
            "{} leaf {at:?} maps gfn {g:?}, but the host has nothing at hva {hva} (stale)",
            level.name()
        );
        let hp = hp.expect("checked");
        ensure!(
            hp.pfn.0 == base + k,
            "{} leaf {at:?} maps gfn {g:?} to pfn {:#x}, the host maps hva {hva} to pfn {:#x} (stale)",
            level.name(),
            base + k,
            hp.pfn.0
        );
        ensure!(
            hp.writable || !(spte.is_writable() || spte.is_host_writable()),
            "{} leaf {at:?} is writable or host-writable at gfn {g:?}, the host maps hva {hva} read-only",
            level.name()
        );
        // The rest of the host's (aligned) page around `hva` is contiguous with what was
        // just checked: go to the next one.
        let host_pages = hp.level.pages();
        k += host_pages - (hva.0 >> crate::types::PAGE_SHIFT) % host_pages;
    }
    Ok(())
}

/// Check every invariant of `mmu` against `slots` and `host`. With `bitmap_logging` (the
/// VM logs into bitmaps, not rings), also check that every writable leaf of a logging
/// slot is marked dirty: a writable page whose bit is clear would take unlogged writes.
pub(crate) fn audit<A: TableAllocator, H: HostMemory + ?Sized>(
    slots: &Memslots,
    mmu: &ShadowMmu<A>,
    host: &H,
    bitmap_logging: bool,
) -> Result<AuditReport, AuditError> {
    let mut rep = AuditReport::default();
    let pages = mmu.pages();
    let pool = mmu.pool();
    ensure!(
        mmu.invalid_pages() == 0,
        "{} pages wait for a flush at a quiescent point",
        mmu.invalid_pages()
    );

    for (id, sp) in pages.iter() {
        rep.pages += 1;
        let level = sp.role.level();
        let (mut present, mut mmio) = (0u32, 0u32);
        for i in 0..SPTE_ENT_PER_PAGE {
            let spte = sp.table().get(i);
            let sref = SpteRef::new(id, i);
            if spte.is_mmio() {
                mmio += 1;
                ensure!(level == Level::L4K, "MMIO SPTE {sref:?} above 4K");
                ensure!(sp.child(i) == 0, "MMIO SPTE {sref:?} has a child recorded");
                continue;
            }
            if !spte.is_shadow_present() {
                ensure!(
                    spte.0 == 0,
                    "non-present SPTE {sref:?} is not zero: {spte:?}"
                );
                ensure!(sp.child(i) == 0, "empty SPTE {sref:?} has a child recorded");
                continue;
            }
            present += 1;
            let gfn = sp.gfn_at(i);
            if spte.is_leaf(level) {
                rep.leaves += 1;
                ensure!(level <= Level::L1G, "leaf {sref:?} at level {level:?}");
                ensure!(sp.child(i) == 0, "leaf {sref:?} has a child recorded");
                ensure!(
                    spte.pfn().0 % level.pages() == 0,
                    "leaf {sref:?} pfn {:?} not aligned to {}",
                    spte.pfn(),
                    level.name()
                );
                let slot = slots.lookup(gfn);
                ensure!(
                    slot.is_some(),
                    "leaf {sref:?} maps gfn {gfn:?} outside every memslot"
                );
                let slot = slot.expect("checked");
                ensure!(
                    slot.contains(crate::types::Gfn(gfn.0 + level.pages() - 1)),
                    "leaf {sref:?} ({}) at gfn {gfn:?} extends past memslot {}",
                    level.name(),
                    slot.id
                );
                check_leaf_against_host(host, slot, gfn, level, spte, &sref)?;
                ensure!(
                    !(slot.is_readonly() && spte.is_writable()),
                    "writable leaf {sref:?} in READONLY memslot {}",
                    slot.id
                );
                ensure!(
                    !(slot.is_logging() && level > Level::L4K),
                    "huge leaf {sref:?} in memslot {} while dirty logging",
                    slot.id
                );
                ensure!(
                    !((0..level.pages())
                        .any(|k| slot.is_write_tracked(crate::types::Gfn(gfn.0 + k)))
                        && (spte.is_mmu_writable() || level > Level::L4K)),
                    "leaf {sref:?} over write-tracked gfns of memslot {} is MMU-writable or huge",
                    slot.id
                );
                if let (true, Some(bitmap)) = (bitmap_logging, slot.dirty_bitmap()) {
                    ensure!(
                        !spte.is_writable() || bitmap.test(gfn.0 - slot.base_gfn.0),
                        "writable leaf {sref:?} for gfn {gfn:?} in logging memslot {} is not marked dirty",
                        slot.id
                    );
                }
                let n = rmap::iter(slot.rmap_head(gfn, level), pool)
                    .filter(|&r| r == sref)
                    .count();
                ensure!(
                    n == 1,
                    "leaf {sref:?} appears {n} times in the rmap of gfn {gfn:?}"
                );
            } else {
                rep.nonleaves += 1;
                let child = sp.child(i);
                let csp = pages.try_get(child);
                ensure!(
                    csp.is_some(),
                    "non-leaf {sref:?} has no child page (id {child})"
                );
                let csp = csp.expect("checked");
                ensure!(
                    csp.frame == spte.pfn(),
                    "non-leaf {sref:?} frame differs from child {child}"
                );
                ensure!(
                    Some(csp.role.level()) == level.below(),
                    "child {child} of {sref:?} has the wrong level"
                );
                // An indirect page's child shadows whatever table the guest entry names
                // (checked against guest memory by `audit_paging`).
                ensure!(
                    sp.has_translations() || csp.gfn == gfn,
                    "child {child} of {sref:?} has gfn {:?}, expected {gfn:?}",
                    csp.gfn
                );
                ensure!(
                    rmap::iter(csp.parent_ptes, pool).any(|p| p == sref),
                    "child {child} does not list parent {sref:?}"
                );
            }
        }
        ensure!(
            present == sp.present,
            "page {id}: present count {} but {present} present",
            sp.present
        );
        ensure!(
            mmio == sp.mmio,
            "page {id}: mmio count {} but {mmio} MMIO",
            sp.mmio
        );
        rmap::check(sp.parent_ptes, pool)
            .map_err(|e| AuditError(format!("page {id} parent_ptes: {e}")))?;
        for p in rmap::iter(sp.parent_ptes, pool) {
            let parent = pages.try_get(p.table_id());
            ensure!(parent.is_some(), "page {id} names a missing parent {p:?}");
            ensure!(
                parent.expect("checked").child(p.index()) == id,
                "parent {p:?} does not point at page {id}"
            );
        }
        if id == mmu.root_id() || sp.root_count != 0 {
            ensure!(sp.parent_ptes.is_empty(), "root {id} has parents");
        } else if sp.hashed {
            // Shadow paging: a page may outlive its last parent, found again by gfn.
        } else {
            ensure!(
                !sp.parent_ptes.is_empty(),
                "page {id} is unreachable but not zapped"
            );
        }
    }
    if !mmu.is_paging() {
        // Direct mode: the leaf-table map names exactly the linked 4K pages.
        let mut linked = 0;
        for (id, sp) in pages.iter() {
            if sp.role.level() == Level::L4K && !sp.parent_ptes.is_empty() {
                linked += 1;
                ensure!(
                    mmu.leaf_tables.get(sp.gfn) == Some(id),
                    "linked 4K page {id} at gfn {:?} is not in the leaf-table map",
                    sp.gfn
                );
            }
        }
        ensure!(
            mmu.leaf_tables.len() == linked,
            "the leaf-table map has {} regions, {linked} 4K pages are linked: {:?}",
            mmu.leaf_tables.len(),
            mmu.leaf_tables.iter().collect::<alloc::vec::Vec<_>>()
        );
    }

    let mut descs = 0;
    for slot in slots.iter() {
        for level in Level::LEAF_LEVELS {
            let mut level_entries = 0u64;
            for (gfn, head) in slot.rmaps(level).iter() {
                ensure!(
                    gfn < slot.end_gfn() && gfn.0 + level.pages() > slot.base_gfn.0,
                    "slot {} rmap {} for gfn {gfn:?} outside the slot",
                    slot.id,
                    level.name()
                );
                let n = rmap::check(head, pool).map_err(|e| {
                    AuditError(format!(
                        "slot {} rmap {} of gfn {gfn:?}: {e}",
                        slot.id,
                        level.name()
                    ))
                })?;
                descs += rmap::desc_count(head, pool);
                for sref in rmap::iter(head, pool) {
                    let sp = pages.try_get(sref.table_id());
                    ensure!(sp.is_some(), "rmap entry {sref:?} names a missing page");
                    let sp = sp.expect("checked");
                    let spte = sp.table().get(sref.index());
                    ensure!(
                        spte.is_shadow_present() && spte.is_leaf(level) && sp.role.level() == level,
                        "rmap entry {sref:?} for gfn {gfn:?} is not a present {} leaf: {spte:?}",
                        level.name()
                    );
                    ensure!(
                        sp.gfn_at(sref.index()) == gfn,
                        "rmap entry {sref:?} maps another gfn"
                    );
                }
                rep.rmap_entries += n;
                level_entries += n as u64;
            }
            ensure!(
                level_entries == slot.rmap_entries(level),
                "slot {} counts {} {} rmap entries, its heads hold {level_entries}",
                slot.id,
                slot.rmap_entries(level),
                level.name()
            );
        }
    }
    ensure!(
        rep.rmap_entries == rep.leaves,
        "{} rmap entries for {} present leaves",
        rep.rmap_entries,
        rep.leaves
    );
    for (_, sp) in pages.iter() {
        descs += rmap::desc_count(sp.parent_ptes, pool);
    }
    ensure!(
        descs == pool.in_use(),
        "pool has {} descriptors in use, heads hold {descs}",
        pool.in_use()
    );
    rep.mmio = pages.iter().map(|(_, p)| p.mmio as usize).sum();
    Ok(rep)
}

/// The shadow-paging invariants (see `shadow::paging`), on top of [`audit`]: the hash
/// names every hashed page once and no two share gfn and role; invalid pages are roots
/// still in use and unhashed; tables above the last level are write-tracked; while a
/// table has a sync shadow page no SPTE maps it writable; every entry of a sync indirect
/// page agrees with the guest entry in `guest` (links name the guest's table, leaves its
/// gfn with no more rights); the unsync-child marks match the children.
pub(crate) fn audit_paging<A: TableAllocator>(
    slots: &Memslots,
    mmu: &ShadowMmu<A>,
    guest: &dyn crate::guest::GuestMemory,
) -> Result<(), AuditError> {
    use crate::guest::pte;
    use crate::shadow::paging::spte_allowed_by;
    use crate::types::{Gfn, Gpa, PAGE_SHIFT};
    let pages = mmu.pages();
    let hashed = mmu.hashed_pages();
    let mut seen = alloc::collections::BTreeSet::new();
    for &id in &hashed {
        let sp = pages.try_get(id);
        ensure!(sp.is_some(), "hash names missing page {id}");
        let sp = sp.expect("checked");
        ensure!(sp.hashed, "page {id} is in the hash but not marked hashed");
        ensure!(!sp.role.is_invalid(), "invalid page {id} is hashed");
        ensure!(
            seen.insert((sp.gfn.0, sp.role.word())),
            "two hashed pages share gfn {:?} and role {:?}",
            sp.gfn,
            sp.role
        );
        ensure!(
            mmu.find_page(sp.gfn, sp.role) == Some(id),
            "page {id} not found under its gfn"
        );
    }
    for (id, sp) in pages.iter() {
        ensure!(
            sp.role.is_paging(),
            "page {id} of a shadow-paging MMU has a direct-MMU role"
        );
        ensure!(
            sp.hashed || (sp.role.is_invalid() && sp.root_count != 0),
            "page {id} is neither hashed nor an invalid root in use"
        );
        // Unsync-child marks.
        for i in 0..SPTE_ENT_PER_PAGE {
            let c = sp.child(i);
            let want = c != 0 && {
                let csp = pages.get(c);
                csp.unsync || csp.unsync_children != 0
            };
            let have = sp.unsync_child_bitmap[i / 64] & (1 << (i % 64)) != 0;
            ensure!(
                want == have,
                "page {id} entry {i}: unsync-child mark {have}, child says {want}"
            );
        }
        ensure!(
            sp.unsync_children as u32
                == sp
                    .unsync_child_bitmap
                    .iter()
                    .map(|w| w.count_ones())
                    .sum::<u32>(),
            "page {id}: unsync_children count off"
        );
        ensure!(
            !sp.unsync || (sp.role.level() == Level::L4K && !sp.role.is_direct()),
            "page {id} is unsync but not an indirect last-level page"
        );
        if sp.role.is_direct() || !sp.hashed {
            continue;
        }
        let slot = slots.lookup(sp.gfn);
        ensure!(
            slot.is_some(),
            "page {id} shadows gfn {:?} outside the memslots",
            sp.gfn
        );
        let slot = slot.expect("checked");
        let level = sp.role.level();
        if level > Level::L4K {
            ensure!(
                slot.is_write_tracked(sp.gfn),
                "page {id} shadows the level-{} table {:?}, which is not write-tracked",
                level as u8,
                sp.gfn
            );
        } else {
            ensure!(
                slot.disallow_lpage(sp.gfn, Level::L2M) != 0,
                "page {id} shadows last-level table {:?} under a huge-page allowance",
                sp.gfn
            );
        }
        let all_sync = mmu
            .pages_of_gfn(sp.gfn)
            .iter()
            .all(|&p| pages.get(p).role.is_direct() || !pages.get(p).unsync);
        if all_sync {
            for l in Level::LEAF_LEVELS {
                if l > Level::L4K && slot.rmap_entries(l) == 0 {
                    continue;
                }
                for sref in rmap::iter(slot.rmap_head(sp.gfn, l), mmu.pool()) {
                    let spte = mmu.spte(sref);
                    ensure!(
                        !spte.is_writable() && !spte.is_mmu_writable(),
                        "guest table {:?} (page {id}) is mapped writable by {sref:?}",
                        sp.gfn
                    );
                }
            }
        }
        if sp.unsync {
            continue;
        }
        for i in 0..SPTE_ENT_PER_PAGE {
            let spte = sp.table().get(i);
            if !spte.is_shadow_present() {
                continue;
            }
            let gpa = Gpa(sp.gfn.gpa().0 + i as u64 * 8);
            let gpte = guest
                .read_u64(gpa)
                .map_err(|e| AuditError(format!("page {id}: reading guest entry: {e}")))?;
            let frame = Gfn((gpte & pte::ADDR_MASK) >> PAGE_SHIFT);
            if !spte.is_leaf(level) {
                let csp = pages.get(sp.child(i));
                ensure!(
                    gpte & pte::P != 0,
                    "page {id} entry {i} links a table the guest entry no longer maps"
                );
                if csp.role.is_direct() {
                    ensure!(
                        gpte & pte::PS != 0 && csp.gfn == frame.align_down(level),
                        "page {id} entry {i}: direct child {:?} for guest entry {gpte:#x}",
                        csp.gfn
                    );
                } else {
                    ensure!(
                        gpte & pte::PS == 0 && csp.gfn == frame,
                        "page {id} entry {i}: child shadows {:?}, guest entry {gpte:#x}",
                        csp.gfn
                    );
                }
            } else if level == Level::L4K {
                ensure!(
                    spte_allowed_by(spte, gpte, sp.gfn_at(i), sp.role),
                    "page {id} entry {i}: {spte:?} grants more than guest entry {gpte:#x} (gfn {:?})",
                    sp.gfn_at(i)
                );
            } else {
                ensure!(
                    gpte & pte::P != 0
                        && gpte & pte::PS != 0
                        && frame.align_down(level) == sp.gfn_at(i),
                    "page {id} entry {i}: huge leaf for gfn {:?}, guest entry {gpte:#x}",
                    sp.gfn_at(i)
                );
            }
        }
    }
    Ok(())
}

/// Check every invariant of the TDP MMU `mmu` against `slots` and `host` (at a quiescent
/// point): exactly one valid root; no frozen entry; every present non-leaf SPTE points at
/// the child page recorded beside it, one level down, mapping the same gfns; in
/// used-entries mode every table's bitmap marks exactly its present entries; and the leaf
/// rules of the shadow audit (inside a memslot, aligned, mapping the host's current frames,
/// never writable in a READONLY slot, 4K and logged while the slot logs, never
/// MMU-writable or huge over a write-tracked page), on every root, the invalid roots vCPUs
/// still hold included.
pub(crate) fn audit_tdp<A: TableAllocator + 'static, H: HostMemory + ?Sized>(
    slots: &Memslots,
    mmu: &crate::tdp::TdpMmu<A>,
    host: &H,
    bitmap_logging: bool,
) -> Result<AuditReport, AuditError> {
    use crate::tdp::{TdpIter, TdpIteration};
    let guard = crate::tdp::pin();
    let mut rep = AuditReport::default();
    let valid = mmu.roots(&guard).filter(|(_, v)| *v).count();
    ensure!(valid == 1, "{valid} valid TDP roots");
    let used_mode = mmu.mode() == TdpIteration::UsedEntries;
    for (root, _) in mmu.roots(&guard) {
        let mut it = TdpIter::new(
            root,
            Level::L4K,
            crate::types::Gfn(0),
            crate::types::Gfn(1 << 36),
            TdpIteration::ScanAll,
            u64::MAX,
            &guard,
        );
        while it.valid() {
            let (page, i, level, s) = (it.page(), it.index(), it.level(), it.spte);
            let gfn = it.gfn();
            if i == 0 {
                rep.pages += 1;
            }
            ensure!(!s.is_frozen(), "frozen SPTE at {gfn:?} level {level:?}");
            if used_mode {
                ensure!(
                    page.is_used(i) == s.is_shadow_present(),
                    "used bit {} for {s:?} at {gfn:?} level {level:?}",
                    page.is_used(i)
                );
            }
            if s.is_mmio() {
                rep.mmio += 1;
                ensure!(level == Level::L4K, "MMIO SPTE above 4K at {gfn:?}");
            } else if s.is_shadow_present() && !s.is_leaf(level) {
                rep.nonleaves += 1;
                // SAFETY: the guard pins the epoch.
                let child = unsafe { page.child(i, &guard).as_ref() };
                ensure!(
                    child.is_some(),
                    "non-leaf at {gfn:?} level {level:?} has no child page"
                );
                let c = child.expect("checked");
                ensure!(
                    c.frame() == s.pfn(),
                    "non-leaf at {gfn:?}: child frame differs"
                );
                ensure!(
                    Some(c.level) == level.below(),
                    "child of {gfn:?} has level {:?}",
                    c.level
                );
                ensure!(c.gfn == gfn, "child of {gfn:?} maps {:?}", c.gfn);
            } else if s.is_shadow_present() {
                rep.leaves += 1;
                ensure!(level <= Level::L1G, "leaf at level {level:?}");
                ensure!(
                    s.pfn().0 % level.pages() == 0,
                    "leaf at {gfn:?} misaligned pfn"
                );
                let slot = slots.lookup(gfn);
                ensure!(
                    slot.is_some(),
                    "leaf maps gfn {gfn:?} outside every memslot"
                );
                let slot = slot.expect("checked");
                ensure!(
                    slot.contains(crate::types::Gfn(gfn.0 + level.pages() - 1)),
                    "leaf at {gfn:?} ({}) extends past memslot {}",
                    level.name(),
                    slot.id
                );
                check_leaf_against_host(host, slot, gfn, level, s, &gfn)?;
                ensure!(
                    !(slot.is_readonly() && s.is_writable()),
                    "writable leaf at {gfn:?} in a READONLY slot"
                );
                ensure!(
                    !s.is_writable() || (s.is_mmu_writable() && s.is_host_writable()),
                    "leaf at {gfn:?} writable without MMU- and host-writable"
                );
                ensure!(
                    !(slot.is_logging() && level > Level::L4K),
                    "huge leaf at {gfn:?} while logging"
                );
                ensure!(
                    !((0..level.pages())
                        .any(|k| slot.is_write_tracked(crate::types::Gfn(gfn.0 + k)))
                        && (s.is_mmu_writable() || level > Level::L4K)),
                    "leaf at {gfn:?} over write-tracked gfns is MMU-writable or huge"
                );
                if let (true, Some(bitmap)) = (bitmap_logging, slot.dirty_bitmap()) {
                    ensure!(
                        !s.is_writable() || bitmap.test(gfn.0 - slot.base_gfn.0),
                        "writable leaf at {gfn:?} in logging memslot {} is not marked dirty",
                        slot.id
                    );
                }
            } else {
                ensure!(s.0 == 0, "non-present SPTE at {gfn:?} is not zero: {s:?}");
            }
            it.next();
        }
    }
    Ok(rep)
}
